"""cuda_emulator on its own: each class of bug a GPU would punish, planted and caught.

Small kernels with one bug each, and the project's own kernels with a bug put in (a missing
barrier, a shuffle under divergence, undersized shared memory), run through run_cuda.
"""
import shutil

import numpy as np
import pytest

import cuda_emulator
from tests.helpers import REPO, TESTDATA
from cuda_emulator import driver as cuda
from cuda_emulator.compiler import SourceModule, rewrite_extern_shared

KERNELS = r"""
#define FULL_MASK 0xffffffffu

__device__ float warp_sum(float v)
{
    for (int offset = 16; offset > 0; offset /= 2)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// out[block] = the sum of its blockDim.x inputs (correct: the barrier is there)
__global__ void block_total(float* out, const float* x)
{
    __shared__ float partial[32];
    float v = warp_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);
    if (threadIdx.x % 32 == 0)
        partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < blockDim.x / 32; w++)
            total += partial[w];
        out[blockIdx.x] = total;
    }
}

// the same without the barrier: thread 0 reads partial sums nobody wrote yet
__global__ void block_total_no_barrier(float* out, const float* x)
{
    __shared__ float partial[32];
    float v = warp_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);
    if (threadIdx.x % 32 == 0)
        partial[threadIdx.x / 32] = v;
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < blockDim.x / 32; w++)
            total += partial[w];
        out[blockIdx.x] = total;
    }
}

// warp 0 publishes a value that warp 1 reads, with no barrier between
__global__ void publish(float* out)
{
    __shared__ float value;
    if (threadIdx.x == 0)
        value = 42.0f;
    if (threadIdx.x == 32)
        out[blockIdx.x] = value;
}

__global__ void exit_before_barrier(float* out)
{
    if (threadIdx.x >= 64)
        return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barrier(float* out)
{
    if (threadIdx.x < 32)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// half the lanes reduce, the other half go on to the barrier
__global__ void shuffle_under_divergence(float* out)
{
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16)
        v = warp_sum(v);
    __syncthreads();
    out[threadIdx.x] = v;
}

__global__ void full_mask(float* out)
{
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, (float)threadIdx.x, 1);
}

__global__ void read_exited_lane(float* out)
{
    if (threadIdx.x % 32 >= 16)
        return;
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, (float)threadIdx.x, 16);
}

__global__ void down_sum(float* out, const float* x)
{
    float v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2)
        v += __shfl_down_sync(FULL_MASK, v, offset);
    if (threadIdx.x % 32 == 0)
        out[threadIdx.x / 32] = v;
    __syncwarp();
}

__global__ void sum4(float* out, const float* x)
{
    float4 a = ((const float4*)x)[threadIdx.x];
    out[threadIdx.x] = a.x + a.y + a.z + a.w;
}

__global__ void copy(float* out, const float* x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = x[i];
}

// sums n inputs staged in dynamic shared memory
__global__ void staged_sum(float* out, const float* x, int n)
{
    extern __shared__ __align__(16) float staged[];
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        staged[i] = x[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < n; i++)
            total += staged[i];
        out[0] = total;
    }
}

__global__ void shift_down(float* out)
{
    extern __shared__ float slots[];
    slots[(int)threadIdx.x - 1] = 1.0f;  // thread 0 writes before the start
    __syncthreads();
    out[threadIdx.x] = slots[threadIdx.x];
}

// the order the threads ran in (fibers take turns, so the counter needs no atomics here)
__global__ void running_order(int* order)
{
    __shared__ int next;
    if (threadIdx.x == 0)
        next = 0;
    __syncthreads();
    order[blockIdx.x * blockDim.x + threadIdx.x] = next++;
}

__global__ void divide(int* out, int d)
{
    out[threadIdx.x] = 100 / d;
}
"""


@pytest.fixture(autouse=True)
def in_order():
    previous = cuda_emulator.configure(device="h100", schedule="in-order")
    yield
    cuda_emulator.configure(*previous)


@pytest.fixture(scope="module")
def module():
    return SourceModule(KERNELS)


def launch(module, name, arg_types, grid, block, *args, shared_size=0):
    module.get_function(name).prepare(arg_types).prepared_call(grid, block, *args,
                                                               shared_size=shared_size)


def host(allocation, count, dtype=np.float32):
    out = np.empty(count, dtype=dtype)
    cuda.memcpy_dtoh(out, allocation)
    return out


# ----------------------------------------------------------------------------
# correct kernels run, and are counted

def test_correct_kernels_compute(module):
    x = np.arange(512, dtype=np.float32)
    out = cuda.mem_alloc(4 * 4)
    cuda.counters.reset()
    for schedule in ("in-order", "random:5"):
        cuda_emulator.configure(schedule=schedule)
        launch(module, "block_total", "PP", (4, 1), (128, 1, 1), out, cuda.to_device(x))
        np.testing.assert_array_equal(host(out, 4), x.reshape(4, 128).sum(axis=1))
    launch(module, "down_sum", "PP", (1, 1), (64, 1, 1), out, cuda.to_device(x))
    np.testing.assert_array_equal(host(out, 2), x[:64].reshape(2, 32).sum(axis=1))
    assert cuda.counters.launches == 3
    assert cuda.counters.launches_by_kernel == {"block_total": 2, "down_sum": 1}
    assert cuda.counters.htod_bytes == 3 * x.nbytes and cuda.counters.dtoh_bytes == 3 * 16 - 8


def test_schedules(module):
    """In order: thread 0, 1, 2...; random: a permutation that the seed repeats."""
    order = cuda.mem_alloc(4 * 256)

    def run(schedule):
        cuda_emulator.configure(schedule=schedule)
        launch(module, "running_order", "P", (2, 1), (128, 1, 1), order)
        return host(order, 256, np.int32).reshape(2, 128)

    assert (run("in-order") == np.arange(128)).all()
    first, again, other = run("random:1"), run("random:1"), run("random:2")
    assert (np.sort(first, axis=1) == np.arange(128)).all()
    assert (first == again).all() and (first != other).any() and (first != np.arange(128)).any()


def test_extern_shared_becomes_the_launch_buffer():
    line = "    extern __shared__ __align__(16) float xs[];  // the input"
    assert rewrite_extern_shared(line) == (
        "    float* const xs = (float*)cuemu::dynamic_shared;  // the input")


# ----------------------------------------------------------------------------
# planted bugs

def test_missing_barrier_reads_nan(module):
    out = cuda.mem_alloc(4)
    launch(module, "block_total_no_barrier", "PP", (1, 1), (128, 1, 1), out,
           cuda.to_device(np.ones(128, dtype=np.float32)))
    assert np.isnan(host(out, 1)).all()  # shared memory starts as NaN


def test_missing_barrier_only_a_reordered_schedule_catches(module):
    out = cuda.mem_alloc(4 * 8)
    launch(module, "publish", "P", (8, 1), (64, 1, 1), out)
    assert (host(out, 8) == 42).all()  # in order, warp 0 happens to run first
    cuda_emulator.configure(schedule="random:1")
    launch(module, "publish", "P", (8, 1), (64, 1, 1), out)
    assert np.isnan(host(out, 8)).any()  # warp 1 ran ahead in some block


def test_deadlock_at_a_barrier_after_an_early_exit(module):
    with pytest.raises(cuda.LaunchError, match=r"kernel exit_before_barrier: block \(0,0,0\): "
                       r"deadlock: threads 0-63 wait at __syncthreads\(\) \(source.cu:\d+\); "
                       r"threads 64-127 exited"):
        launch(module, "exit_before_barrier", "P", (1, 1), (128, 1, 1), cuda.mem_alloc(512))


def test_barriers_in_divergent_branches(module):
    with pytest.raises(cuda.LaunchError, match="divergent __syncthreads"):
        launch(module, "divergent_barrier", "P", (1, 1), (64, 1, 1), cuda.mem_alloc(256))


def test_shuffle_under_divergence(module):
    with pytest.raises(cuda.LaunchError, match=r"deadlock: threads 0-15, 32-47 wait at a warp "
                       r"shuffle \(source.cu:\d+\); threads 16-31, 48-63 wait at __syncthreads"):
        launch(module, "shuffle_under_divergence", "P", (1, 1), (64, 1, 1), cuda.mem_alloc(256))


def test_shuffle_mask_naming_absent_lanes(module):
    with pytest.raises(cuda.LaunchError, match="names lanes that do not exist"):
        launch(module, "full_mask", "P", (1, 1), (48, 1, 1), cuda.mem_alloc(4 * 48))


def test_shuffle_reading_an_exited_lane(module):
    with pytest.raises(cuda.LaunchError, match="reads lane 16, which has exited"):
        launch(module, "read_exited_lane", "P", (1, 1), (32, 1, 1), cuda.mem_alloc(128))


def test_misaligned_vector_load(module):
    x = cuda.to_device(np.ones(68, dtype=np.float32))
    out = cuda.mem_alloc(64)
    launch(module, "sum4", "PP", (1, 1), (16, 1, 1), out, x)
    assert (host(out, 16) == 4).all()
    with pytest.raises(cuda.LaunchError, match="misaligned float4 load"):
        launch(module, "sum4", "PP", (1, 1), (16, 1, 1), out, int(x) + 4)


def test_out_of_bounds_device_memory(module):
    x = cuda.to_device(np.ones(1000, dtype=np.float32))
    out = cuda.mem_alloc(4000)
    # reading up to the next 256-byte boundary stays in the slack after x; the write into out's
    # slack is found by its canary after the launch
    with pytest.raises(cuda.LaunchError, match=r"out-of-bounds write \(found after the launch\): "
                       r"writing 0x[0-9a-f]+, 0 bytes past the end of allocation #\d+ "
                       r"\(4000 bytes"):
        launch(module, "copy", "PPi", (4, 1), (256, 1, 1), out, x, 1024)
    # further: the guard page after the allocation
    with pytest.raises(cuda.LaunchError, match=r"block \(4,0,0\) thread \(0,0,0\): invalid address, "
                       r"reading 0x[0-9a-f]+, 96 bytes past the end of allocation #\d+"):
        launch(module, "copy", "PPi", (5, 1), (256, 1, 1), out, x, 1280)
    with pytest.raises(cuda.LaunchError, match="argument 1 .* is not a device address"):
        launch(module, "copy", "PPi", (1, 1), (32, 1, 1), out,
               np.ones(32, dtype=np.float32).ctypes.data, 32)


def test_out_of_bounds_shared_memory(module):
    x = cuda.to_device(np.ones(64, dtype=np.float32))
    out = cuda.mem_alloc(4)
    launch(module, "staged_sum", "PPi", (1, 1), (32, 1, 1), out, x, 64, shared_size=256)
    assert host(out, 1)[0] == 64
    with pytest.raises(cuda.LaunchError, match="past the end of the 244 bytes of dynamic shared"):
        launch(module, "staged_sum", "PPi", (1, 1), (32, 1, 1), out, x, 64, shared_size=244)
    with pytest.raises(cuda.LaunchError, match=r"out of bounds of the dynamic shared memory "
                       r"\(past its end\), writing"):
        launch(module, "staged_sum", "PPi", (1, 1), (32, 1, 1), out, x, 64, shared_size=128)


def test_write_before_shared_memory(module):
    with pytest.raises(cuda.LaunchError, match="a write before the start of the 128 bytes of dynamic"):
        launch(module, "shift_down", "P", (1, 1), (32, 1, 1), cuda.mem_alloc(128), shared_size=128)


def test_integer_division_by_zero(module):
    with pytest.raises(cuda.LaunchError, match="arithmetic fault"):
        launch(module, "divide", "Pi", (1, 1), (32, 1, 1), cuda.mem_alloc(128), 0)


def test_host_side_misuse(module):
    func = module.get_function("copy")
    with pytest.raises(cuda.LogicError, match=r"prepare\('PPP'\) does not match"):
        func.prepare("PPP")
    func.prepare("PPi")
    out = cuda.mem_alloc(4 * 1024)
    with pytest.raises(cuda.LaunchError, match="invalid launch shape"):
        func.prepared_call((1, 1), (2048, 1, 1), out, out, 1)
    fa = cuda.function_attribute
    limit = func.get_attribute(fa.MAX_DYNAMIC_SHARED_SIZE_BYTES)
    with pytest.raises(cuda.LaunchError, match="MAX_DYNAMIC_SHARED_SIZE_BYTES"):
        func.prepared_call((1, 1), (32, 1, 1), out, out, 1, shared_size=limit + 4)
    with pytest.raises(cuda.LogicError, match="cuMemcpyDtoH failed: invalid argument"):
        cuda.memcpy_dtoh(np.empty(1025, dtype=np.float32), out)
    with pytest.raises(cuda.LogicError, match="named symbol not found"):
        module.get_function("missing")
    with pytest.raises(cuda.CompileError, match=r"(?s)compilation .*failed.*undeclared"):
        SourceModule("__global__ void broken(float* x) { x[0] = undeclared; }")


def test_device_profiles():
    device = cuda.Context.get_device()
    da = cuda.device_attribute
    assert device.get_attribute(da.MULTIPROCESSOR_COUNT) == 132
    cuda_emulator.configure(device="few-sms")
    assert device.get_attribute(da.MULTIPROCESSOR_COUNT) == 2
    with pytest.raises(cuda.MemoryError, match="cuMemAlloc failed: out of memory"):
        cuda.mem_alloc(65 * 2**20)
    with pytest.raises(ValueError, match="unknown device profile"):
        cuda_emulator.configure(device="h200")
    with pytest.raises(ValueError, match="unknown schedule"):
        cuda_emulator.configure(schedule="sideways")


# ----------------------------------------------------------------------------
# the project's kernels, with a bug put in

@pytest.fixture
def mutated(tmp_path, monkeypatch):
    """run_cuda with a copy of cuda/ where `old` becomes `new` in one file."""
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    import run_cuda
    monkeypatch.setenv("RUN_CUDA_EMULATOR", "1")
    copy = tmp_path / "cuda"
    shutil.copytree(REPO / "cuda", copy)

    def mutate(name, old, new):
        path = copy / name
        assert path.read_text().count(old) == 1, old
        path.write_text(path.read_text().replace(old, new))
        monkeypatch.setattr(run_cuda, "CUDA_DIR", copy)
        return run_cuda
    return mutate


def test_project_kernel_missing_barrier(mutated):
    run_cuda = mutated("matmul.cu", "        xs[j] = x[j];\n    __syncthreads();",
                       "        xs[j] = x[j];")
    logits = run_cuda.CudaTransformer(str(TESTDATA / "tiny_mha.bin")).forward(1, 0)
    assert np.isnan(logits).all()


def test_project_kernel_shuffle_under_divergence(mutated):
    import run
    run_cuda = mutated("matmul.cu", "    return warp_sum(sum);",
                       "    return lane < 16 ? warp_sum(sum) : sum;")
    model = run_cuda.CudaTransformer(str(TESTDATA / "tiny_mha.bin"))
    with pytest.raises(run.LlamaError, match=r"CUDA: kernel qkv_rope: .* the shuffle at "
                       r"common.cuh:\d+ reads lane 16, which has exited"):
        model.forward(1, 0)


def test_project_kernel_undersized_shared_memory(mutated, tmp_path):
    from llama2_cython import export
    import run
    run_cuda = mutated("attention.cu", "float* partial = qs + head_size;",
                       "float* partial = qs + 2 * head_size;")
    config = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=40,
                  seq_len=8)
    path = tmp_path / "model.bin"
    export.write_v0(path, config, export.random_model(config), True)
    model = run_cuda.CudaTransformer(str(path))
    with pytest.raises(run.LlamaError, match=r"CUDA: kernel attention: block \(0,0,0\) thread "
                       r"\(0,0,0\): out of bounds of the dynamic shared memory \(past its end\)"):
        model.forward(1, 0)
