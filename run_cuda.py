"""Inference for llama2.c models with forward() on an NVIDIA GPU (CUDA kernels through PyCUDA).

    python run_cuda.py model.bin [options]     (the options of run.c: -t -p -s -n -i -z -m -y)
    RUN_CUDA_EMULATOR=1 python run_cuda.py model.bin [options]   (the same kernels on the CPU)

Everything but forward() comes from the CPU package `run`: checkpoint reading, tokenizer, sampler and
the command line. The kernels are the .cu files in cuda/ next to this file, compiled at start-up.
With RUN_CUDA_EMULATOR=1 (also for the API and the tests), cuda_emulator stands in for PyCUDA and
runs them on the CPU, checking what a GPU would punish (see cuda_emulator/__init__.py).

How llama2.cu's run.cu maps onto cuda/: run.cu launches 14 kernels per layer (cuBLAS sgemv for
every matmul, a kernel for each small step) plus two copies into the KV cache. Here five kernels
per layer do the same work, each weight matrix read once per token, and every small step is folded
into the matmul next to it, because at batch 1 a launch and a round trip through global memory
cost more than the step:
- rmsnorm_kernel + the q, k, v sgemv calls + RoPe_rotation_kernel + the KV-cache copies
  -> qkv_rope: each block recomputes rmsnorm(x) into shared memory (dim floats: cheaper than a
  launch), warps take rows of wq/wk/wv as one matrix, the lane holding a row pair rotates it, and
  k and v land straight in this position's row of the cache.
- multi_head_attention_kernel (scores, softmax, weighted sum) -> attention: one block per query
  head reading kv head h / kv_mul (grouped-query attention), one thread per position while they
  fit, the scores in shared memory, the weighted sum read row by row so that value loads coalesce.
- the wo sgemv + accum_kernel (residual) -> matmul_residual: x += wo @ xb in one pass.
- rmsnorm_kernel + the w1 and w3 sgemv calls + f_silu_elementwise_mul_w3_kernel -> ffn_swiglu:
  one warp computes row i of w1 and of w3 and writes silu(h1) * h3 at once.
- the w2 sgemv + accum_kernel -> matmul_residual again.
- the final rmsnorm_kernel + the classifier sgemv -> rmsnorm_matmul; the token's embedding row
  copy -> embed. Only the logits come back to the host.
The matvec kernels read each row with float4 loads across a warp and reduce with shuffles; they
need no cuBLAS, which PyCUDA does not wrap.
"""
import importlib.util
import os
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np

import run
from llama2_cython.formats import rope_frequencies

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
MATVEC_THREADS = 128  # 4 warps; each warp works on one weight row (or row pair) at a time
EMBED_THREADS = 256
FLOAT_BYTES = 4

LAYER_WEIGHTS = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")
# Device addresses of one layer's weights and of its part of the KV cache.
Layer = namedtuple("Layer", LAYER_WEIGHTS + ("key_cache", "value_cache"))


class CudaUnavailable(RuntimeError):
    """PyCUDA or a CUDA GPU is missing; the message says which."""


def use_emulator():
    """Whether RUN_CUDA_EMULATOR asks for cuda_emulator instead of PyCUDA (set, and not 0)."""
    return os.environ.get("RUN_CUDA_EMULATOR", "") not in ("", "0")


def init_cuda():
    """Import PyCUDA (or, with RUN_CUDA_EMULATOR set, the emulator) and, on the first call, make a
    context on the first usable GPU.

    Returns the driver module and SourceModule; raises CudaUnavailable.
    """
    if use_emulator():
        from cuda_emulator import autoinit, driver  # noqa: F401  (autoinit: the context)
        from cuda_emulator.compiler import SourceModule
        return driver, SourceModule
    if importlib.util.find_spec("pycuda") is None:
        raise CudaUnavailable("PyCUDA is not installed (pip install .[cuda]; "
                              "RUN_CUDA_EMULATOR=1 runs the kernels on the CPU)")
    try:
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule
    except ImportError as e:  # typically libcuda.so missing: no driver, so no GPU
        raise CudaUnavailable(f"PyCUDA cannot be loaded ({e})") from None
    try:
        import pycuda.autoinit  # noqa: F401  context on the first usable GPU, popped at exit
    except (cuda.Error, RuntimeError) as e:
        raise CudaUnavailable(f"no CUDA GPU found ({e}; RUN_CUDA_EMULATOR=1 runs the kernels on the "
                              "CPU)") from None
    return cuda, SourceModule


def blocks_per_multiprocessor(cuda, func, threads, shared_bytes):
    """How many blocks of a launch fit on one multiprocessor at once (CUDA's occupancy rule).

    Registers are allocated per warp in units of 256; the kernel's count comes from its
    attributes (what ptxas gave it), as do its static shared memory; each block also holds the
    driver's reserved shared memory.
    """
    device = cuda.Context.get_device()
    attr, fattr = cuda.device_attribute, cuda.function_attribute
    warps = -(-threads // 32)
    warp_registers = -(-func.get_attribute(fattr.NUM_REGS) * 32 // 256) * 256
    block_shared = (shared_bytes + func.get_attribute(fattr.SHARED_SIZE_BYTES)
                    + device.get_attribute(attr.RESERVED_SHARED_MEMORY_PER_BLOCK))
    return max(1, min(
        device.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR) // max(warp_registers, 1) // warps,
        device.get_attribute(attr.MAX_THREADS_PER_MULTIPROCESSOR) // (warps * 32),
        device.get_attribute(attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR) // block_shared,
        device.get_attribute(attr.MAX_BLOCKS_PER_MULTIPROCESSOR)))


def one_line(error):
    """A driver error in one line: its first, or for a compile error its first line naming an error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    detail = next((line for line in lines[1:] if "error" in line.lower()), None)
    return f"{lines[0]} {detail}" if detail else lines[0]


class _Launch:
    """A kernel with a fixed launch shape, checked once against what the device and kernel allow."""

    def __init__(self, cuda, func, arg_types, blocks, threads, shared_bytes, what):
        attr = cuda.function_attribute
        if threads > func.get_attribute(attr.MAX_THREADS_PER_BLOCK):
            raise ValueError(f"{what} needs {threads} threads per block, more than this GPU can run")
        device = cuda.Context.get_device()
        shared_limit = (device.get_attribute(cuda.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                        - func.get_attribute(attr.SHARED_SIZE_BYTES))
        if shared_bytes > shared_limit:
            raise ValueError(f"{what} needs {shared_bytes} bytes of shared memory per block, "
                             f"more than the {shared_limit} this GPU has")
        if shared_bytes > func.get_attribute(attr.MAX_DYNAMIC_SHARED_SIZE_BYTES):
            func.set_attribute(attr.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes)  # beyond 48 KiB
        func.prepare(arg_types)
        self._func = func
        self.blocks = blocks
        self._grid = (blocks, 1)
        self._block = (threads, 1, 1)
        self._shared = shared_bytes

    def __call__(self, *args):
        self._func.prepared_call(self._grid, self._block, *args, shared_size=self._shared)


class CudaTransformer:
    """run.Transformer with forward() on the GPU.

    run.Transformer reads and checks the checkpoint; its weights are copied to the GPU once, the
    activations and the KV cache live there, and each forward() copies back only the logits.
    """

    def __init__(self, checkpoint_path):
        cuda, SourceModule = init_cuda()
        self._cuda = cuda
        cpu = run.Transformer(checkpoint_path)
        self.config = dict(cpu.config)
        self.header = cpu.header
        c = self.config
        # the model's RMSNorm epsilon and RoPE frequencies: run.c's, or a v3 file's (rope.pxi)
        self._norm_eps = np.float32(cpu.header.norm_eps)
        self._rope_table = rope_table(cpu.header)
        dim, n_heads, n_kv_heads = c["dim"], c["n_heads"], c["n_kv_heads"]
        head_size = dim // n_heads  # run.Transformer checked: whole heads, even head_size
        kv_dim = dim * n_kv_heads // n_heads
        self._sizes = (dim, c["hidden_dim"], kv_dim, head_size, n_heads // n_kv_heads)

        try:
            self._build(cuda, SourceModule, cpu.weights)
        except cuda.Error as e:
            raise run.LlamaError(f"CUDA: {one_line(e)}") from None

    def _build(self, cuda, SourceModule, w):
        """Compiles the kernels, fixes their launch shapes and copies the weights to the device."""
        c = self.config
        dim, hidden_dim, kv_dim, head_size, _ = self._sizes
        n_layers, n_heads, vocab_size, seq_len = (c["n_layers"], c["n_heads"], c["vocab_size"],
                                                  c["seq_len"])
        # the #line directive names the file in compiler messages (and in the emulator's)
        modules = {path.stem: SourceModule(f'#line 1 "{path.name}"\n{path.read_text()}',
                                           include_dirs=[str(CUDA_DIR)])
                   for path in sorted(CUDA_DIR.glob("*.cu"))}
        multiprocessors = cuda.Context.get_device().get_attribute(
            cuda.device_attribute.MULTIPROCESSOR_COUNT)

        def matvec(name, arg_types, items, input_size, what):
            # at most one wave of blocks (as many as fit on the GPU at once): more would only
            # repeat each block's staging of the input; the grid strides over the rest
            func = modules["matmul"].get_function(name)
            shared_bytes = input_size * FLOAT_BYTES
            wave = multiprocessors * blocks_per_multiprocessor(cuda, func, MATVEC_THREADS, shared_bytes)
            blocks = min(-(-items // (MATVEC_THREADS // 32)), wave)
            return _Launch(cuda, func, arg_types, blocks, MATVEC_THREADS, shared_bytes, what)

        self._embed = _Launch(cuda, modules["embed"].get_function("embed"), "PPii",
                              -(-dim // EMBED_THREADS), EMBED_THREADS, 0, "the embedding copy")
        self._qkv_rope = matvec("qkv_rope", "PPPPPPPPPiiiif", (dim + 2 * kv_dim) // 2, dim,
                                f"the qkv matmul (dim {dim})")
        attention = modules["attention"].get_function("attention")
        # one thread per position while they fit in a block: more would only idle at every barrier
        attention_threads = min(1024, attention.get_attribute(
            cuda.function_attribute.MAX_THREADS_PER_BLOCK), -(-max(seq_len, head_size) // 32) * 32
                                ) // 32 * 32
        if head_size > attention_threads:
            raise ValueError(f"head_size {head_size} is larger than the {attention_threads} threads "
                             "per block the attention kernel can use")
        self._attention = _Launch(cuda, attention, "PPPPiiii", n_heads, attention_threads,
                                  (head_size + attention_threads + seq_len) * FLOAT_BYTES,
                                  f"the attention kernel (seq_len {seq_len})")
        self._wo = matvec("matmul_residual", "PPPii", dim, dim, f"the wo matmul (dim {dim})")
        self._ffn_swiglu = matvec("ffn_swiglu", "PPPPPiif", hidden_dim, dim,
                                  f"the w1/w3 matmul (dim {dim})")
        self._w2 = matvec("matmul_residual", "PPPii", dim, hidden_dim,
                          f"the w2 matmul (hidden_dim {hidden_dim})")
        self._classifier = matvec("rmsnorm_matmul", "PPPPiif", vocab_size, dim,
                                  f"the classifier matmul (dim {dim})")

        self._memory = []  # keeps the device allocations alive; the kernels get plain addresses

        def to_gpu(array):
            self._memory.append(cuda.to_device(array))
            return int(self._memory[-1])

        def zeros(count):
            self._memory.append(cuda.mem_alloc(count * FLOAT_BYTES))
            cuda.memset_d32(self._memory[-1], 0, count)
            return int(self._memory[-1])

        self._rope_freqs = to_gpu(self._rope_table)
        self._token_embedding_table = to_gpu(w["token_embedding_table"])
        self._rms_final = to_gpu(w["rms_final_weight"])
        shared_classifier = np.may_share_memory(w["wcls"], w["token_embedding_table"])
        self._wcls = self._token_embedding_table if shared_classifier else to_gpu(w["wcls"])
        bases = {name: to_gpu(w[name]) for name in LAYER_WEIGHTS}
        key_cache = zeros(n_layers * seq_len * kv_dim)
        value_cache = zeros(n_layers * seq_len * kv_dim)
        cache_layer = seq_len * kv_dim * FLOAT_BYTES
        self._layers = [
            Layer(*(bases[name] + l * w[name][0].nbytes for name in LAYER_WEIGHTS),
                  key_cache + l * cache_layer, value_cache + l * cache_layer)
            for l in range(n_layers)]
        self._x = zeros(dim)
        self._xb = zeros(dim)
        self._q = zeros(dim)
        self._hb = zeros(hidden_dim)
        self._logits = zeros(vocab_size)

    def forward(self, token, pos):
        """run.c's forward(): the logits (a new float32 array) for token at position pos.

        The KV cache must already hold positions 0..pos-1 of the same sequence.
        """
        vocab_size, seq_len = self.config["vocab_size"], self.config["seq_len"]
        if not 0 <= token < vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary 0..{vocab_size - 1}")
        if not 0 <= pos < seq_len:
            raise ValueError(f"position {pos} is outside 0..{seq_len - 1}")
        try:
            return self._forward(token, pos)
        except self._cuda.Error as e:
            raise run.LlamaError(f"CUDA: {one_line(e)}") from None

    def _forward(self, token, pos):
        vocab_size = self.config["vocab_size"]
        dim, hidden_dim, kv_dim, head_size, kv_mul = self._sizes
        x, xb, q, hb = self._x, self._xb, self._q, self._hb
        cache_row = pos * kv_dim * FLOAT_BYTES  # this position's row in a layer's KV cache

        self._embed(x, self._token_embedding_table, token, dim)
        for layer in self._layers:
            self._qkv_rope(x, layer.rms_att_weight, layer.wq, layer.wk, layer.wv,
                           q, layer.key_cache + cache_row, layer.value_cache + cache_row,
                           self._rope_freqs, dim, kv_dim, head_size, pos, self._norm_eps)
            self._attention(q, layer.key_cache, layer.value_cache, xb, pos, kv_dim, head_size, kv_mul)
            self._wo(x, layer.wo, xb, dim, dim)
            self._ffn_swiglu(x, layer.rms_ffn_weight, layer.w1, layer.w3, hb, dim, hidden_dim,
                             self._norm_eps)
            self._w2(x, layer.w2, hb, hidden_dim, dim)
        self._classifier(self._logits, x, self._rms_final, self._wcls, dim, vocab_size,
                         self._norm_eps)

        logits = np.empty(vocab_size, dtype=np.float32)
        self._cuda.memcpy_dtoh(logits, self._logits)  # waits for the kernels
        return logits


def rope_table(header):
    """The head_size / 2 RoPE frequencies qkv_rope rotates with, as float32: a v3 file's
    (llama2_cython.formats.rope_frequencies), or run.c's 1 / 10000^(head_dim / head_size)."""
    table = rope_frequencies(header)
    if table is not None:
        return np.array(table, dtype=np.float32)
    head_size = header.config["dim"] // header.config["n_heads"]
    exponents = np.arange(0, head_size, 2, dtype=np.float32) / np.float32(head_size)
    return (np.float32(1.0) / np.power(np.float32(10000.0), exponents)).astype(np.float32)


def main(argv=None):
    try:
        init_cuda()
    except CudaUnavailable as e:
        print(f"run_cuda: {e}", file=sys.stderr)
        return 1
    return run.main(sys.argv if argv is None else argv, prog="run_cuda", transformer_factory=CudaTransformer)


if __name__ == "__main__":
    sys.exit(main())
