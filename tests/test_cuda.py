"""The GPU path: cuda/*.cu and run_cuda.py.

Anywhere nvcc is installed: every kernel file compiles the way PyCUDA's SourceModule compiles it,
for sm_80 and sm_90, with no spills. The GPU tests (CudaTransformer's logits against run.pyx's and
the NumPy reference, run_cuda.py's stdout against C's and `python -m run`'s, the refusals) run on a
real GPU where PyCUDA sees one, and otherwise, as in CI, on cuda_emulator (RUN_CUDA_EMULATOR=1
forces it): twice, in order on the H100 profile, then under a seeded random schedule on the
2-SM profile (so that the matvec kernels' grid-stride loops iterate). The emulator's counters hold
the structure: launches per token, bytes between host and device, one wave of matvec blocks.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llama2_cython import export
from tests.helpers import (REPO, TESTDATA, assert_one_line_error, fixture_path, golden_argv,
                      golden_cases, golden_outputs, run_cli)
from tests.reference import ReferenceTransformer

KERNEL_FILES = sorted((REPO / "cuda").glob("*.cu"))
LOGIT_TOKENS = json.loads((TESTDATA / "logits" / "README.json").read_text())["tokens"]
TOKENIZER = TESTDATA / "tok512.bin"
NVCC = shutil.which("nvcc")


def gpu_available():
    """Whether PyCUDA imports and sees a CUDA device."""
    try:
        import pycuda.driver as cuda
        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # not installed, no driver (ImportError), or cuInit failed (pycuda's Error)
        return False


EMULATED = os.environ.get("RUN_CUDA_EMULATOR", "") not in ("", "0") or not gpu_available()
# (schedule, device profile) of each emulated run; None: the real GPU
BACKENDS = [("in-order", "h100"), ("random:1", "few-sms")] if EMULATED else [None]


def backend_env(backend):
    """The environment run_cuda.py runs in for a backend."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUN_CUDA_EMULATOR", "CUDA_EMULATOR_SCHEDULE", "CUDA_EMULATOR_DEVICE")}
    if backend is not None:
        env.update(RUN_CUDA_EMULATOR="1", CUDA_EMULATOR_SCHEDULE=backend[0],
                   CUDA_EMULATOR_DEVICE=backend[1])
    return env


def run_cuda_cli(args, stdin=b"", env=None):
    """`python run_cuda.py args...` from the repo root; the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "run_cuda.py", *map(str, args)], input=stdin, cwd=REPO,
                          capture_output=True, timeout=300, env=env)


@pytest.fixture(scope="module", params=BACKENDS,
                ids=lambda b: "gpu" if b is None else f"emulator-{b[0]}-{b[1]}")
def backend(request):
    """The backend of the GPU tests; the emulator is configured for it while they run."""
    b = request.param
    if b is None:
        yield None
        return
    import cuda_emulator
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUN_CUDA_EMULATOR", "1")
        previous = cuda_emulator.configure(device=b[1], schedule=b[0])
        yield b
        cuda_emulator.configure(*previous)


@pytest.fixture(scope="module")
def run_cuda(backend):
    """The run_cuda module, for tests that need the built CPU package and a backend."""
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    import run_cuda
    return run_cuda


@pytest.fixture
def emulator(monkeypatch):
    """cuda_emulator's driver, selected for run_cuda, counters reset; its settings restored after."""
    import cuda_emulator
    from cuda_emulator import driver
    monkeypatch.setenv("RUN_CUDA_EMULATOR", "1")
    previous = cuda_emulator.configure()
    driver.counters.reset()
    yield driver
    cuda_emulator.configure(*previous)


def write_model(path, config, seed=3, shared=True):
    export.write_v0(path, config, export.random_model(config, seed=seed, shared=shared), shared)
    return path


# ----------------------------------------------------------------------------
# static checks with nvcc

def wrapped_kernel(tmp_path, path):
    """The file as SourceModule hands it to nvcc: inside extern "C" { }."""
    (tmp_path / "kernel.cu").write_text('extern "C" {\n%s\n}\n' % path.read_text())
    return "kernel.cu"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda path: path.name)
def test_kernel_compiles_without_spills(tmp_path, path, arch):
    """As SourceModule does it (nvcc --cubin, cuda/ included): no message at all; then with
    `-Xptxas -v`: every kernel's registers leave room for 1024-thread blocks, and nothing spills."""
    source = wrapped_kernel(tmp_path, path)
    command = ["nvcc", "--cubin", f"-arch={arch}", f"-I{REPO / 'cuda'}", source]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (proc.stdout + proc.stderr).strip()  # SourceModule would warn about any output
    assert (tmp_path / "kernel.cubin").stat().st_size > 0

    from cuda_emulator.compiler import kernel_names, parse_ptxas
    proc = subprocess.run(command + ["-Xptxas", "-v"], cwd=tmp_path, capture_output=True, text=True)
    info = parse_ptxas(proc.stdout + proc.stderr)
    assert sorted(info) == sorted(kernel_names(path.read_text()))
    for name, kernel in info.items():
        assert kernel["arch"] == arch
        assert kernel["spill_stores"] == kernel["spill_loads"] == 0, (name, kernel)
        assert 0 < kernel["registers"] <= 64, (name, kernel)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_emulated_kernels_have_nvccs_attributes(emulator, tmp_path):
    """The emulator's function attributes are ptxas's numbers for the profile's architecture."""
    from cuda_emulator.compiler import SourceModule, parse_ptxas
    source = wrapped_kernel(tmp_path, REPO / "cuda" / "matmul.cu")
    proc = subprocess.run(["nvcc", "--cubin", "-arch=sm_90", "-Xptxas", "-v", f"-I{REPO / 'cuda'}",
                           source], cwd=tmp_path, capture_output=True, text=True)
    expected = parse_ptxas(proc.stdout + proc.stderr)
    module = SourceModule('#line 1 "matmul.cu"\n' + (REPO / "cuda" / "matmul.cu").read_text(),
                          include_dirs=[REPO / "cuda"])  # as run_cuda.py compiles it
    fa = emulator.function_attribute
    for name, kernel in expected.items():
        func = module.get_function(name)
        assert func.get_attribute(fa.NUM_REGS) == kernel["registers"]
        assert func.get_attribute(fa.SHARED_SIZE_BYTES) == kernel["shared"]
        assert func.get_attribute(fa.LOCAL_SIZE_BYTES) == kernel["stack"]


# ----------------------------------------------------------------------------
# without a GPU

def test_import_needs_no_pycuda():
    code = ("import sys, run_cuda; assert 'pycuda' not in sys.modules; "
            "assert 'cuda_emulator' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=backend_env(None))
    if "No module named 'run" in proc.stderr:
        pytest.skip("the CPU package `run` is not built")
    assert proc.returncode == 0, proc.stderr


def test_without_gpu_says_what_is_missing():
    if gpu_available():
        pytest.skip("PyCUDA and a GPU are present")
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    proc = run_cuda_cli([TESTDATA / "tiny_mha.bin", "-z", TOKENIZER], env=backend_env(None))
    err = assert_one_line_error(proc)
    assert err.startswith("run_cuda: ") and ("PyCUDA" in err or "GPU" in err), err
    assert "RUN_CUDA_EMULATOR=1" in err
    assert proc.stdout == b""


# ----------------------------------------------------------------------------
# on the GPU, or on the emulator

@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa", "tiny_gqa.v1", "stories260K"])
def test_logits_match_cpu(run_cuda, model):
    import run
    path = str(fixture_path(model + ".bin"))
    cuda_model, cpu_model = run_cuda.CudaTransformer(path), run.Transformer(path)
    assert cuda_model.config == cpu_model.config
    for pos, token in enumerate(LOGIT_TOKENS):
        expected = cpu_model.forward(token, pos)
        got = cuda_model.forward(token, pos)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


SHAPES = {
    # dim, hidden_dim and head_size not multiples of 4: the kernels' scalar paths
    "scalar_loads": dict(dim=30, hidden_dim=50, n_layers=2, n_heads=5, n_kv_heads=1,
                         vocab_size=70, seq_len=24),
    "multi_query": dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=1,
                        vocab_size=300, seq_len=16),
    # more positions than the attention block has threads
    "long_context": dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         vocab_size=40, seq_len=1100),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shapes_match_reference(run_cuda, tmp_path, shape):
    """Against the float64 NumPy forward: over 1000 positions float32 sums in any order drift by
    ~1e-4 of the largest logit (the CPU port's too)."""
    config = SHAPES[shape]
    weights = export.random_model(config, seed=3, shared=False)
    path = tmp_path / "model.bin"
    export.write_v0(path, config, weights, False)
    cuda_model, reference = run_cuda.CudaTransformer(str(path)), ReferenceTransformer(config, weights)
    tokens = np.random.default_rng(0).integers(config["vocab_size"], size=config["seq_len"])
    for pos, token in enumerate(tokens.tolist()):
        expected = reference.forward(token, pos)
        got = cuda_model.forward(token, pos)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=3e-4 * np.abs(expected).max(),
                                   err_msg=f"pos {pos}")


def test_refuses_a_context_too_long_for_shared_memory(run_cuda, backend, tmp_path):
    config = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=40,
                  seq_len=100_000)
    path = write_model(tmp_path / "model.bin", config)
    with pytest.raises(ValueError, match="seq_len 100000"):
        run_cuda.CudaTransformer(str(path))
    assert_one_line_error(run_cuda_cli([path, "-z", TOKENIZER], env=backend_env(backend)))


@pytest.mark.parametrize("case", [case for case in golden_cases("run") if case["robust"]],
                         ids=lambda case: case["name"])
def test_golden_stdout(backend, case):
    """Byte for byte what C's run printed: greedy, seeded sampling and chat."""
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    proc = run_cuda_cli(golden_argv(case), stdin=case["stdin"].encode(), env=backend_env(backend))
    assert proc.returncode == case["returncode"], proc.stderr.decode()
    assert proc.stdout in golden_outputs(case)


@pytest.mark.parametrize("args, stdin", [
    (["-t", "0.9", "-p", "0.8", "-s", "123", "-n", "96", "-i", "A cat"], b""),
    (["-t", "1.1", "-p", "0", "-s", "9", "-n", "0"], b""),
    (["-m", "chat", "-t", "0.8", "-s", "5", "-n", "110", "-y", "Be brief."],
     b"Hi there\nTell me a story\n"),
], ids=["topp", "multinomial", "chat"])
@pytest.mark.parametrize("model", ["tiny_mha", "tiny_gqa"])
def test_matches_cpu_port(backend, model, args, stdin):
    pytest.importorskip("run", reason="the CPU package `run` is not built")
    argv = [TESTDATA / f"{model}.bin", "-z", TOKENIZER, *args]
    # one OpenMP thread: the same output, and no collapse when the other core is busy
    expected = run_cli("run", argv, stdin=stdin, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = run_cuda_cli(argv, stdin=stdin, env=backend_env(backend))
    assert got.returncode == expected.returncode == 0, got.stderr.decode()
    assert got.stdout == expected.stdout and len(got.stdout) > 20


# ----------------------------------------------------------------------------
# the structure, counted by the emulator

def test_launches_and_bytes_per_token(emulator):
    """5 launches per layer and 2 per token; the weights (and the head_size / 2 RoPE frequencies)
    go to the device once, only the logits come back."""
    import run
    import run_cuda
    path = str(TESTDATA / "tiny_gqa.bin")
    cpu = run.Transformer(path)
    model = run_cuda.CudaTransformer(path)
    c = model.config
    weights = {id(array): array.nbytes for array in cpu.weights.values()}
    rope_table = c["dim"] // c["n_heads"] // 2 * 4
    assert emulator.counters.htod_bytes == sum(weights.values()) + rope_table
    assert emulator.counters.launches == 0
    emulator.counters.reset()
    tokens = 5
    for pos in range(tokens):
        model.forward(7, pos)
    counts = emulator.counters.snapshot()
    assert counts["launches"] == tokens * (5 * c["n_layers"] + 2)
    assert counts["launches_by_kernel"] == {
        "embed": tokens, "qkv_rope": tokens * c["n_layers"], "attention": tokens * c["n_layers"],
        "matmul_residual": 2 * tokens * c["n_layers"], "ffn_swiglu": tokens * c["n_layers"],
        "rmsnorm_matmul": tokens}
    assert counts["htod_bytes"] == 0
    assert counts["dtoh_bytes"] == tokens * c["vocab_size"] * 4


@pytest.mark.parametrize("device", ["h100", "few-sms"])
def test_matvec_grid_is_one_wave_of_what_the_registers_allow(emulator, tmp_path, device):
    """The classifier (8000 rows) gets as many blocks as fit on the GPU at once, by the occupancy
    the kernel's registers, its shared memory and the multiprocessor's limits allow."""
    import cuda_emulator
    import run_cuda
    cuda_emulator.configure(device=device)
    config = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8000,
                  seq_len=32)
    model = run_cuda.CudaTransformer(str(write_model(tmp_path / "model.bin", config)))
    profile = emulator.PROFILES[device].attributes
    da, fa = emulator.device_attribute, emulator.function_attribute
    func = model._classifier._func
    registers = func.get_attribute(fa.NUM_REGS)
    block_registers = -(-registers * 32 // 256) * 256 * 4  # 4 warps, allocated by 256 per warp
    block_shared = 64 * 4 + func.get_attribute(fa.SHARED_SIZE_BYTES) + 1024
    per_sm = min(profile[da.MAX_REGISTERS_PER_MULTIPROCESSOR] // block_registers,
                 profile[da.MAX_THREADS_PER_MULTIPROCESSOR] // 128,
                 profile[da.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR] // block_shared,
                 profile[da.MAX_BLOCKS_PER_MULTIPROCESSOR])
    assert model._classifier.blocks == profile[da.MULTIPROCESSOR_COUNT] * per_sm
    if NVCC:  # ptxas's 36-46 registers: fewer blocks per SM than the thread limit alone allows
        assert per_sm < profile[da.MAX_THREADS_PER_MULTIPROCESSOR] // 128
    logits = model.forward(3, 0)
    assert np.isfinite(logits).all() and logits.shape == (8000,)


def test_out_of_device_memory_is_one_line(emulator, tmp_path):
    """A KV cache larger than the device (the 64 MiB profile): one line, no traceback."""
    config = dict(dim=128, hidden_dim=32, n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=40,
                  seq_len=20_000)
    path = write_model(tmp_path / "model.bin", config)
    env = backend_env(("in-order", "few-sms"))
    err = assert_one_line_error(run_cuda_cli([path, "-z", TOKENIZER], env=env))
    assert re.match(r"run_cuda: CUDA: cuMemAlloc failed: out of memory", err), err
