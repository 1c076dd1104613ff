"""Inference for llama2.c models with forward() on an NVIDIA GPU (CUDA kernels through PyCUDA).

    python run_cuda.py model.bin [options]     (the options of run.c: -t -p -s -n -i -z -m -y)

Everything but forward() comes from the CPU package `run`: checkpoint reading, tokenizer, sampler and
the command line. The kernels are the .cu files in cuda/ next to this file, compiled at start-up.
"""
import importlib.util
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np

import run

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
MATVEC_THREADS = 128  # 4 warps; each warp works on one weight row (or row pair) at a time
EMBED_THREADS = 256
FLOAT_BYTES = 4

LAYER_WEIGHTS = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")
# Device addresses of one layer's weights and of its part of the KV cache.
Layer = namedtuple("Layer", LAYER_WEIGHTS + ("key_cache", "value_cache"))


class CudaUnavailable(RuntimeError):
    """PyCUDA or a CUDA GPU is missing; the message says which."""


def init_cuda():
    """Import PyCUDA and, on the first call, make a context on the first usable GPU.

    Returns the pycuda.driver module and pycuda.compiler.SourceModule; raises CudaUnavailable.
    """
    if importlib.util.find_spec("pycuda") is None:
        raise CudaUnavailable("PyCUDA is not installed (pip install .[cuda])")
    try:
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule
    except ImportError as e:  # typically libcuda.so missing: no driver, so no GPU
        raise CudaUnavailable(f"PyCUDA cannot be loaded ({e})") from None
    try:
        import pycuda.autoinit  # noqa: F401  context on the first usable GPU, popped at exit
    except (cuda.Error, RuntimeError) as e:
        raise CudaUnavailable(f"no CUDA GPU found ({e})") from None
    return cuda, SourceModule


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
        c = self.config
        dim, hidden_dim, n_layers = c["dim"], c["hidden_dim"], c["n_layers"]
        n_heads, n_kv_heads, vocab_size, seq_len = (c["n_heads"], c["n_kv_heads"], c["vocab_size"],
                                                    c["seq_len"])
        head_size = dim // n_heads  # run.Transformer checked: whole heads, even head_size
        kv_dim = dim * n_kv_heads // n_heads
        self._sizes = (dim, hidden_dim, kv_dim, head_size, n_heads // n_kv_heads)

        modules = {path.stem: SourceModule(path.read_text(), include_dirs=[str(CUDA_DIR)])
                   for path in sorted(CUDA_DIR.glob("*.cu"))}
        device = cuda.Context.get_device()
        # at most one wave of matvec blocks: more would only repeat each block's staging of the input
        max_blocks = (device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
                      * (device.get_attribute(cuda.device_attribute.MAX_THREADS_PER_MULTIPROCESSOR)
                         // MATVEC_THREADS))

        def matvec(name, arg_types, items, input_size, what):
            blocks = min(-(-items // (MATVEC_THREADS // 32)), max_blocks)
            return _Launch(cuda, modules["matmul"].get_function(name), arg_types, blocks,
                           MATVEC_THREADS, input_size * FLOAT_BYTES, what)

        self._embed = _Launch(cuda, modules["embed"].get_function("embed"), "PPii",
                              -(-dim // EMBED_THREADS), EMBED_THREADS, 0, "the embedding copy")
        self._qkv_rope = matvec("qkv_rope", "PPPPPPPPiiii", (dim + 2 * kv_dim) // 2, dim,
                                f"the qkv matmul (dim {dim})")
        attention = modules["attention"].get_function("attention")
        attention_threads = min(1024, attention.get_attribute(
            cuda.function_attribute.MAX_THREADS_PER_BLOCK)) // 32 * 32
        if head_size > attention_threads:
            raise ValueError(f"head_size {head_size} is larger than the {attention_threads} threads "
                             "per block the attention kernel can use")
        self._attention = _Launch(cuda, attention, "PPPPiiii", n_heads, attention_threads,
                                  (head_size + attention_threads + seq_len) * FLOAT_BYTES,
                                  f"the attention kernel (seq_len {seq_len})")
        self._wo = matvec("matmul_residual", "PPPii", dim, dim, f"the wo matmul (dim {dim})")
        self._ffn_swiglu = matvec("ffn_swiglu", "PPPPPii", hidden_dim, dim,
                                  f"the w1/w3 matmul (dim {dim})")
        self._w2 = matvec("matmul_residual", "PPPii", dim, hidden_dim,
                          f"the w2 matmul (hidden_dim {hidden_dim})")
        self._classifier = matvec("rmsnorm_matmul", "PPPPii", vocab_size, dim,
                                  f"the classifier matmul (dim {dim})")

        self._memory = []  # keeps the device allocations alive; the kernels get plain addresses
        w = cpu.weights

        def to_gpu(array):
            self._memory.append(cuda.to_device(array))
            return int(self._memory[-1])

        def zeros(count):
            self._memory.append(cuda.mem_alloc(count * FLOAT_BYTES))
            cuda.memset_d32(self._memory[-1], 0, count)
            return int(self._memory[-1])

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
        dim, hidden_dim, kv_dim, head_size, kv_mul = self._sizes
        x, xb, q, hb = self._x, self._xb, self._q, self._hb
        cache_row = pos * kv_dim * FLOAT_BYTES  # this position's row in a layer's KV cache

        self._embed(x, self._token_embedding_table, token, dim)
        for layer in self._layers:
            self._qkv_rope(x, layer.rms_att_weight, layer.wq, layer.wk, layer.wv,
                           q, layer.key_cache + cache_row, layer.value_cache + cache_row,
                           dim, kv_dim, head_size, pos)
            self._attention(q, layer.key_cache, layer.value_cache, xb, pos, kv_dim, head_size, kv_mul)
            self._wo(x, layer.wo, xb, dim, dim)
            self._ffn_swiglu(x, layer.rms_ffn_weight, layer.w1, layer.w3, hb, dim, hidden_dim)
            self._w2(x, layer.w2, hb, hidden_dim, dim)
        self._classifier(self._logits, x, self._rms_final, self._wcls, dim, vocab_size)

        logits = np.empty(vocab_size, dtype=np.float32)
        self._cuda.memcpy_dtoh(logits, self._logits)  # waits for the kernels
        return logits


def main(argv=None):
    try:
        init_cuda()
    except CudaUnavailable as e:
        print(f"run_cuda: {e}", file=sys.stderr)
        return 1
    return run.main(sys.argv if argv is None else argv, transformer_factory=CudaTransformer)


if __name__ == "__main__":
    sys.exit(main())
