# cython: language_level=3
# Inference for Llama-2 Transformer model in pure Cython, int8 quantized forward pass: a line-by-line
# translation of llama2.c's runq.c. Sections, names and order follow runq.c so the two read side by
# side; where runq.c crashes or computes garbage on bad input, this file refuses with a clear message
# or computes the right numbers instead (comments say where). The tokenizer, sampler, generate and
# chat are those of run.pyx, repeated on purpose as runq.c repeats run.c's: each file reads like
# its C twin.

cimport cython
from cython.parallel cimport prange, threadid
from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport cosf, expf, fabsf, powf, roundf, sinf, sqrtf
from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t
from libc.stdio cimport FILE, fclose, fopen, fread, fseek, ftell, sscanf, SEEK_END, SEEK_SET
from libc.errno cimport errno
from libc.stdlib cimport bsearch, calloc, free, malloc, qsort
from libc.string cimport memcpy, memset, strcmp, strlen

cdef extern from "q8matmul.h" nogil:
    # runq's int8 matmul kernels (the header says what each SIMD path does and how one is chosen)
    const char* Q8_KERNEL
    int Q8_ROWS
    void q8_group_sums(const int8_t* x, int32_t* xsum, int n, int gs)
    void q8_matmul_block(float* out, int d, int64_t block, const int8_t* xq, const int32_t* xsum,
                         const float* xs, int T, int64_t xstride, const int8_t* wq, const float* ws,
                         int n, int gs)
    float q8_row_ragged(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws,
                        int64_t in_, int n, int gs)
    int64_t q8_token_stride(int64_t widest)
    bint Q8_PACKED
    int64_t q8_packed_bytes(int d, int n)
    int64_t q8_packed_scales(int d, int n, int gs)
    void q8_pack_block(int8_t* pq, float* ps, int64_t block, const int8_t* wq, const float* ws,
                       int d, int n, int gs)
    void q8_matmul_block_packed(float* out, int d, int64_t block, const int8_t* xq,
                                const int32_t* xsum, const float* xs, int T, int64_t xstride,
                                const int8_t* pq, const float* ps, int n, int gs)
    void q8_unpack_block(int8_t* wq, float* ws, int64_t block, const int8_t* pq, const float* ps,
                         int d, int n, int gs)
    void q8_dequantize_row_packed(float* x, const int8_t* pq, const float* ps, int64_t row, int n,
                                  int gs)
    const char* q8_choose_batch_kernel(int allow_amx)

import array
import mmap
import os
import sys
import threading
import time as _pytime

# what has no twin in runq.c is written once for run, runq and run_cuda (llama2_cython/)
from llama2_cython import LlamaError
from llama2_cython.api import exclusive_state
from llama2_cython.chat import chat_loop
from llama2_cython.cli import ExitStatus, parse_args, read_line
from llama2_cython.formats import (available_memory, map_model, packed_start, quantized_tensors,
                                   rope_frequencies)

# which of q8matmul.h's kernels this build compiled: "avx512vnni", "avx2" or "plain"
INT8_KERNEL = (<bytes>Q8_KERNEL).decode("ascii")
_int8_batch_kernel = None

def int8_batch_kernel():
    """The kernel of forward_batch's products of 2 or more tokens on packed matrices, chosen at the
    first call (the first model load makes it): "amx+avx512vnni" where the CPU and the OS allow
    AMX-INT8 and it passed its self-check, else INT8_KERNEL (with a note if AMX failed the check).
    LLAMA2_INT8_KERNEL=<INT8_KERNEL> in the environment keeps AMX off; "auto" or unset chooses."""
    global _int8_batch_kernel
    if _int8_batch_kernel is None:
        wanted = os.environ.get("LLAMA2_INT8_KERNEL") or "auto"
        if wanted not in ("auto", INT8_KERNEL):
            raise LlamaError(f"LLAMA2_INT8_KERNEL={wanted!r}: this build runs 'auto' (AMX where the "
                             f"CPU has it) or {INT8_KERNEL!r}")
        _int8_batch_kernel = (<bytes>q8_choose_batch_kernel(wanted == "auto")).decode("ascii")
        if "self-check" in _int8_batch_kernel:  # the CPU or the compiler does not do what was meant
            print(f"runq: this CPU's AMX tiles disagreed with AVX-512 VNNI on a known product: "
                  f"prompts run on {INT8_KERNEL} (please report it)", file=sys.stderr)
    return _int8_batch_kernel


# ----------------------------------------------------------------------------
# Globals
# runq.c keeps the group size in a global (int GS = 0). Here each Transformer carries its own
# (Transformer.group_size) and hands it to quantize, dequantize_row and matmul as their GS
# argument, so that models with different group sizes can live in one process.

include "team.pxi"  # how many threads decode with
include "rope.pxi"  # the RoPE frequencies (run.c's, or a v3 file's)
include "attention.pxi"  # forward_batch's attention scores and weighted sum of values

# ----------------------------------------------------------------------------
# Transformer model

cdef struct Config:
    int dim  # transformer dimension
    int hidden_dim  # for ffn layers
    int n_layers  # number of layers
    int n_heads  # number of query heads
    int n_kv_heads  # number of key/value heads (can be < query heads because of multiquery)
    int vocab_size  # vocabulary size, usually 256 (byte-level)
    int seq_len  # max sequence length

cdef struct QuantizedTensor:
    int8_t* q  # quantized values
    float* s  # scaling factors

cdef struct TransformerWeights:
    # token embedding table
    QuantizedTensor* q_tokens  # (vocab_size, dim)
    # (runq.c also keeps float* token_embedding_table, the whole table dequantized at load: vocab_size
    # x dim floats, 0.5 GB at 7B, for one row a token. Here forward() dequantizes the token's row.)
    # weights for rmsnorms
    float* rms_att_weight  # (layer, dim) rmsnorm weights
    float* rms_ffn_weight  # (layer, dim)
    # weights for matmuls. note dim == n_heads * head_size
    QuantizedTensor* wq  # (layer, dim, n_heads * head_size)
    QuantizedTensor* wk  # (layer, dim, n_kv_heads * head_size)
    QuantizedTensor* wv  # (layer, dim, n_kv_heads * head_size)
    QuantizedTensor* wo  # (layer, n_heads * head_size, dim)
    # weights for ffn
    QuantizedTensor* w1  # (layer, hidden_dim, dim)
    QuantizedTensor* w2  # (layer, dim, hidden_dim)
    QuantizedTensor* w3  # (layer, hidden_dim, dim)
    # final rmsnorm
    float* rms_final_weight  # (dim,)
    # (optional) classifier weights for the logits, on the last layer
    QuantizedTensor* wcls

cdef struct RunState:
    # current wave of activations
    float* x  # activation at current time stamp (dim,)
    float* xb  # same, but inside a residual branch (dim,)
    float* xb2  # an additional buffer just for convenience (dim,)
    float* hb  # buffer for hidden dimension in the ffn (hidden_dim,)
    float* hb2  # buffer for hidden dimension in the ffn (hidden_dim,)
    QuantizedTensor xq  # quantized x (dim,)
    QuantizedTensor hq  # quantized hb (hidden_dim,)
    int32_t* xsum  # the group sums of xq.q or hq.q for matmul (max(dim, hidden_dim),); not in runq.c
    float* q  # query (dim,)
    float* k  # key (dim,)
    float* v  # value (dim,)
    float* att  # buffer for scores/attention values (n_heads, seq_len)
    float* logits  # output logits
    # kv cache
    float* key_cache  # (layer, seq_len, dim)
    float* value_cache  # (layer, seq_len, dim)

# v2 files (export.py's version2_export) start with this magic and a 256-byte header


# forward_batch's buffers (not in runq.c: see forward_batch)
DEF MAX_BATCH = 128  # tokens that go through a layer together: a prompt of 128 reads the weights once
DEF MAX_LOGITS = 32  # rows of logits a pass keeps (a chat turn's prompt tokens, generate_batch's sequences)

cdef struct BatchEntry:
    RunState* s  # the sequence's run state: its KV cache
    int token
    int pos
    bint want_logits

cdef struct BatchState:
    # forward()'s activations, one row per token of the batch
    float* x  # (MAX_BATCH, dim)
    float* xb  # (MAX_BATCH, dim)
    float* xb2  # (MAX_BATCH, dim)
    float* hb  # (MAX_BATCH, hidden_dim)
    float* hb2  # (MAX_BATCH, hidden_dim)
    float* q  # (MAX_BATCH, dim)
    float* k  # (MAX_BATCH, kv_dim)
    float* v  # (MAX_BATCH, kv_dim)
    float* att  # (att_rows, seq_len): a row for each thread's (token, head) of the moment
    int att_rows  # the threads attention may run on
    float* rope  # (MAX_BATCH, head_size): each token's RoPE cos and sin, pair by pair
    float* logits  # (MAX_LOGITS, vocab_size)
    Team team  # how many threads its passes run on (team.pxi)
    # the quantized matmul inputs, a row of q8_token_stride(max(dim, hidden_dim)) per token (xq and
    # hq of forward())
    int8_t* xq_q
    float* xq_s
    int32_t* xsum  # and their group sums (q8_group_sums)

@cython.no_gc_clear  # __dealloc__ needs weights_owner: the GC must not clear it first
cdef class Transformer:
    """A llama2.c model file with Q8_0 weights (v2, v3), memory-mapped, with its run state (KV
    cache)."""
    # runq.c's config and weights; `config` and `weights` are their Python views (properties below)
    cdef Config c_config  # the hyperparameters of the architecture (the blueprint)
    cdef TransformerWeights c_weights  # the weights of the model
    cdef RunState state  # buffers for the "wave" of activations in the forward pass
    cdef BatchState batch  # the same for forward_batch (not in runq.c)
    cdef readonly int version  # file format: 2, or 3 with Q8_0 weights
    cdef readonly int group_size  # the group size used in quantization (runq.c's global GS)
    cdef readonly bint shared_classifier  # the classifier is the token embedding table
    cdef readonly Py_ssize_t file_size  # size of the checkpoint file in bytes
    cdef object _mmap  # the memory map keeps the weights' pages alive
    cdef const unsigned char[::1] _data  # the mapped bytes, for their address
    cdef readonly str checkpoint_path
    # not in the C: what the header says (llama2_cython.formats.Header), and from it the model's
    # RMSNorm epsilon and RoPE frequencies (rope.pxi): run.c's constants, or a v3 file's values
    cdef readonly object header
    cdef float norm_eps
    cdef const float* rope_freqs
    cdef object _rope_table  # owns rope_freqs
    # what is not in runq.c's struct: a Transformer made by with_new_state() shares the weights of
    # the one that loaded them (weights_owner keeps it alive), and state_lock keeps two threads
    # or two generations from running on one run state at once (exclusive_state)
    cdef Transformer weights_owner
    cdef readonly object state_lock
    # forward_batch's weights: c_weights, or where q8matmul.h has a packed layout (pack_weights),
    # the same with the matrices packed into packed_map, an anonymous memory map, or mapped from a
    # file that holds them packed (layout 1), whose rows are then unpacked into rows_map where
    # they are needed (unpack_weights); both maps are owned by the weights' owner
    cdef TransformerWeights c_packed
    cdef readonly bint packed
    cdef object packed_map
    cdef QuantizedTensor* packed_tensors
    cdef object rows_map

    def __init__(self, checkpoint_path, *, bint pack=True):
        """pack=False: forward_batch multiplies the matrices in runq.c's rows, read from the
        mapped file without a packed copy (pack_weights), or unpacked from a file that holds them
        packed (the same results, slower on AVX-512 VNNI; less memory for a v2 file)."""
        build_transformer(self, checkpoint_path, pack)

    def with_new_state(self):
        """A Transformer on the same mapped weights with a run state (KV cache) of its own: one
        per sequence, so that sequences never see each other's activations."""
        return new_state(self, True)

    def __dealloc__(self):
        free_transformer(self)

    @property
    def config(self):
        """The 7 ints of the header, as a dict."""
        cdef Config* p = &self.c_config
        return dict(dim=p.dim, hidden_dim=p.hidden_dim, n_layers=p.n_layers, n_heads=p.n_heads,
                    n_kv_heads=p.n_kv_heads, vocab_size=p.vocab_size, seq_len=p.seq_len)

    @property
    def weights(self):
        """Zero-copy numpy views of the mapped weights, named as in runq.c: float32 arrays for the
        rmsnorm weights, (int8 values, float32 scales) pairs for the quantized matrices, whose
        scales cover group_size consecutive values of one layer's matrix in row-major order.
        token_embedding_table is the quantized table (runq.c's q_tokens). A file that holds the
        matrices packed has them viewed in rows unpacked into memory the first time."""
        import numpy as np
        cdef Config* p = &self.c_config
        cdef TransformerWeights* w = &self.c_weights
        cdef Py_ssize_t L = p.n_layers, dim = p.dim
        cdef const char* origin = <const char*>&self._data[0]
        cdef const char* rows_origin = NULL
        ensure_rows(self)
        rows_map = (self.weights_owner or self).rows_map  # a packed file's matrices, unpacked
        if rows_map is not None:
            rows_origin = address_of(rows_map)
        views = {
            "rms_att_weight": np.frombuffer(self._mmap, np.float32, L * dim,
                                            <const char*>w.rms_att_weight - origin).reshape(L, dim),
            "rms_ffn_weight": np.frombuffer(self._mmap, np.float32, L * dim,
                                            <const char*>w.rms_ffn_weight - origin).reshape(L, dim),
            "rms_final_weight": np.frombuffer(self._mmap, np.float32, dim,
                                              <const char*>w.rms_final_weight - origin),
        }
        cdef QuantizedTensor* qt
        for name, count, rows, cols in quantized_tensors(self.config, self.shared_classifier):
            qt = tensor_of(w, name)
            # a layer's values and scales follow each other, so layer l + 1 starts one tensor later
            step = rows * cols + 4 * (rows * cols // self.group_size)
            buffer, start = self._mmap, origin
            if rows_map is not None and name != "token_embedding_table":
                buffer, start = rows_map, rows_origin
            q = np.ndarray((count, rows, cols), np.int8, buffer, <const char*>qt.q - start,
                           (step, cols, 1))
            s = np.ndarray((count, rows * cols // self.group_size), np.float32, buffer,
                           <const char*>qt.s - start, (step, 4))
            views[name] = (q[0], s[0]) if name in ("token_embedding_table", "wcls") else (q, s)
        if self.shared_classifier:
            views["wcls"] = views["token_embedding_table"]
        return views

    def forward(self, int token, int pos, *, bint reference=False):
        """Logits (a float32 numpy array, a copy) for `token` at position `pos`. With
        reference=True, from C's forward() itself, which the batched engine (what everything else
        runs) is tested against."""
        import numpy as np
        if not 0 <= token < self.c_config.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.c_config.vocab_size})")
        if not 0 <= pos < self.c_config.seq_len:
            raise ValueError(f"pos {pos} is outside the context [0, {self.c_config.seq_len})")
        cdef float* logits
        if reference:
            ensure_rows(self)
        with exclusive_state(self):
            with nogil:
                logits = forward(self, token, pos) if reference else forward_next(self, token, pos)
            return np.array(<float[:self.c_config.vocab_size]>logits, dtype=np.float32)

    def forward_prompt(self, tokens, int pos=0):
        """The logits after feeding tokens at positions pos, pos + 1, ... (a copy): what as many
        forward() calls give, bit for bit, with the tokens going through each layer together
        (reference=True's, C's forward(), bit for bit on the IEEE build only)."""
        import numpy as np
        cdef int[::1] ids = np.array(tokens, dtype=np.intc).reshape(-1)
        cdef Py_ssize_t n = ids.shape[0]
        if n == 0:
            raise ValueError("no tokens to feed")
        if not (0 <= np.min(ids) and np.max(ids) < self.c_config.vocab_size):
            raise ValueError(f"a token is outside the vocabulary [0, {self.c_config.vocab_size})")
        if not (0 <= pos and pos + n <= self.c_config.seq_len):
            raise ValueError(f"positions {pos} to {pos + n - 1} are outside the context "
                             f"[0, {self.c_config.seq_len})")
        with exclusive_state(self):
            with nogil:
                forward_prompt(self, &self.batch, &ids[0], <int>n, pos, False)
            return np.array(<float[:self.c_config.vocab_size]>self.state.logits, dtype=np.float32)


cdef void malloc_run_state(RunState* s, Config* p) except *:
    # we calloc instead of malloc to keep valgrind happy
    cdef size_t kv_dim = (<size_t>p.dim * p.n_kv_heads) // p.n_heads
    s.x = <float*>calloc(p.dim, sizeof(float))
    s.xb = <float*>calloc(p.dim, sizeof(float))
    s.xb2 = <float*>calloc(p.dim, sizeof(float))
    s.hb = <float*>calloc(p.hidden_dim, sizeof(float))
    s.hb2 = <float*>calloc(p.hidden_dim, sizeof(float))
    s.xq.q = <int8_t*>calloc(p.dim, sizeof(int8_t))
    s.xq.s = <float*>calloc(p.dim, sizeof(float))
    s.hq.q = <int8_t*>calloc(p.hidden_dim, sizeof(int8_t))
    s.hq.s = <float*>calloc(p.hidden_dim, sizeof(float))
    s.xsum = <int32_t*>calloc(max(p.dim, p.hidden_dim), sizeof(int32_t))
    s.q = <float*>calloc(p.dim, sizeof(float))
    s.k = <float*>calloc(kv_dim, sizeof(float))
    s.v = <float*>calloc(kv_dim, sizeof(float))
    s.att = <float*>calloc(<size_t>p.n_heads * p.seq_len, sizeof(float))
    s.logits = <float*>calloc(p.vocab_size, sizeof(float))
    s.key_cache = <float*>calloc(<size_t>p.n_layers * p.seq_len * kv_dim, sizeof(float))
    s.value_cache = <float*>calloc(<size_t>p.n_layers * p.seq_len * kv_dim, sizeof(float))
    # ensure all mallocs went fine (runq.c forgets to check xq and hq)
    if (not s.x or not s.xb or not s.xb2 or not s.hb or not s.hb2 or not s.xq.q or not s.xq.s
            or not s.hq.q or not s.hq.s or not s.xsum or not s.q or not s.k or not s.v or not s.att
            or not s.logits or not s.key_cache or not s.value_cache):
        free_run_state(s)
        raise MemoryError(f"malloc failed for the run state, whose KV cache alone is "
                          f"{2 * p.n_layers * p.seq_len * kv_dim * sizeof(float)} bytes")

cdef void free_run_state(RunState* s) noexcept:
    free(s.x)
    free(s.xb)
    free(s.xb2)
    free(s.hb)
    free(s.hb2)
    free(s.xq.q)
    free(s.xq.s)
    free(s.hq.q)
    free(s.hq.s)
    free(s.xsum)
    free(s.q)
    free(s.k)
    free(s.v)
    free(s.att)
    free(s.logits)
    free(s.key_cache)
    free(s.value_cache)
    memset(s, 0, sizeof(RunState))

# ----------------------------------------------------------------------------
# Quantization functions

cdef void dequantize_row(const QuantizedTensor* qx, float* x, int row, int n, int GS) noexcept nogil:
    # runq.c's dequantize(), for row `row` of a (rows, n) tensor only: runq.c's one caller
    # dequantizes the whole embedding table at load (see TransformerWeights)
    cdef Py_ssize_t i, start = <Py_ssize_t>row * n
    for i in range(start, start + n):
        x[i - start] = qx.q[i] * qx.s[i // GS]

cdef void quantize(QuantizedTensor* qx, const float* x, int n, int GS) noexcept nogil:
    # runq.c quantizes n // GS whole groups and leaves the last n % GS values alone (its matmul
    # then skips them). Here a shorter last group covers them, so a row length that is not a
    # multiple of GS (stories42M's hidden_dim 1376 with GS 64) is quantized whole.
    cdef int num_groups = (n + GS - 1) // GS
    cdef float Q_MAX = 127.0
    cdef int group, i, group_len
    cdef float wmax, val, scale, quant_value
    cdef int8_t quantized
    # not in runq.c: the output pointers held in locals. A store through an int8_t pointer may
    # change any memory, qx.q itself included, so gcc read qx.q again for every value and kept the
    # loop scalar (runq.c's too); with locals it vectorizes the same arithmetic, the same bits, 4x
    # faster (this loop was 4.5% of an int8 prompt's work, 1% of a 110M decode step)
    cdef int8_t* q = qx.q
    cdef float* s = qx.s

    for group in range(num_groups):
        group_len = min(GS, n - group * GS)

        # find the max absolute value in the current group
        wmax = 0.0
        for i in range(group_len):
            val = fabsf(x[group * GS + i])
            if val > wmax:
                wmax = val

        # calculate and write the scaling factor
        scale = wmax / Q_MAX
        s[group] = scale

        # calculate and write the quantized values
        for i in range(group_len):
            quant_value = x[group * GS + i] / scale  # scale
            # runq.c divides 0 by 0 for an all-zero group and casts the NaN to int8_t (undefined
            # behaviour; 0 on x86): such a group quantizes to 0 here, on every machine
            quantized = <int8_t>roundf(quant_value) if scale != 0 else 0  # round and clamp
            q[group * GS + i] = quantized

cdef QuantizedTensor* init_quantized_tensors(char** ptr, int n, Py_ssize_t size_each, int GS) except NULL:
    # initialize `n` x quantized tensor (with `size_each` elements), starting from memory pointed at *ptr
    cdef char* p = ptr[0]
    cdef QuantizedTensor* res = <QuantizedTensor*>malloc(n * sizeof(QuantizedTensor))
    if not res:
        raise MemoryError()
    cdef int i
    for i in range(n):
        # map quantized int8 values
        res[i].q = <int8_t*>p
        p += size_each
        # map scale factors
        res[i].s = <float*>p
        p += (size_each // GS) * sizeof(float)
    ptr[0] = p  # advance ptr to current position
    return res

cdef void memory_map_weights(TransformerWeights* w, Config* p, char* ptr, bint shared_classifier,
                             int GS) except *:
    cdef Py_ssize_t head_size = p.dim // p.n_heads
    # make sure the multiplications below are done in 64bit to fit the parameter counts of 13B+ models
    cdef Py_ssize_t n_layers = p.n_layers, dim = p.dim, hidden_dim = p.hidden_dim
    cdef Py_ssize_t vocab_size = p.vocab_size
    # first are the parameters that are kept in fp32 (the rmsnorm (1D) weights)
    cdef float* fptr = <float*>ptr  # cast our pointer to float*
    w.rms_att_weight = fptr
    fptr += n_layers * dim
    w.rms_ffn_weight = fptr
    fptr += n_layers * dim
    w.rms_final_weight = fptr
    fptr += dim

    # now read all the quantized weights
    ptr = <char*>fptr  # now cast the pointer back to char*
    w.q_tokens = init_quantized_tensors(&ptr, 1, vocab_size * dim, GS)
    # (runq.c dequantizes the whole token embedding table here: see TransformerWeights)

    w.wq = init_quantized_tensors(&ptr, p.n_layers, dim * (p.n_heads * head_size), GS)
    w.wk = init_quantized_tensors(&ptr, p.n_layers, dim * (p.n_kv_heads * head_size), GS)
    w.wv = init_quantized_tensors(&ptr, p.n_layers, dim * (p.n_kv_heads * head_size), GS)
    w.wo = init_quantized_tensors(&ptr, p.n_layers, (p.n_heads * head_size) * dim, GS)

    w.w1 = init_quantized_tensors(&ptr, p.n_layers, dim * hidden_dim, GS)
    w.w2 = init_quantized_tensors(&ptr, p.n_layers, hidden_dim * dim, GS)
    w.w3 = init_quantized_tensors(&ptr, p.n_layers, dim * hidden_dim, GS)

    w.wcls = w.q_tokens if shared_classifier else init_quantized_tensors(&ptr, 1, dim * vocab_size, GS)

cdef QuantizedTensor* init_packed_tensors(char** ptr, QuantizedTensor* res, int n, int d, int cols,
                                          int GS) noexcept:
    # init_quantized_tensors for `n` (d, cols) matrices in q8matmul.h's packed layout, into res (not
    # in runq.c): each one's packed values, then its packed scales
    cdef char* p = ptr[0]
    cdef int i
    for i in range(n):
        res[i].q = <int8_t*>p
        p += q8_packed_bytes(d, cols)
        res[i].s = <float*>p
        p += q8_packed_scales(d, cols, GS) * sizeof(float)
    ptr[0] = p
    return res

cdef QuantizedTensor* rows_to_come(int n) except NULL:
    # `n` matrices whose rows unpack_weights makes when they are needed
    cdef QuantizedTensor* res = <QuantizedTensor*>calloc(n, sizeof(QuantizedTensor))
    if not res:
        raise MemoryError()
    return res

cdef void memory_map_packed_weights(TransformerWeights* w, TransformerWeights* packed,
                                    QuantizedTensor* slots, Config* p, char* ptr, char* packed_ptr,
                                    bint shared_classifier, int GS) except *:
    # a file whose matrices are packed (layout 1, not in runq.c): the norms and the token embedding
    # table where memory_map_weights maps them; every matrix (the classifier always) packed from
    # packed_ptr on, into `packed` (its 7 * n_layers + 1 tensors in slots); w's matrices get their
    # rows from unpack_weights
    cdef Py_ssize_t n_layers = p.n_layers, dim = p.dim
    cdef int L = p.n_layers, kv_dim = p.n_kv_heads * (p.dim // p.n_heads)
    cdef float* fptr = <float*>ptr
    w.rms_att_weight = fptr
    fptr += n_layers * dim
    w.rms_ffn_weight = fptr
    fptr += n_layers * dim
    w.rms_final_weight = fptr
    fptr += dim
    ptr = <char*>fptr
    w.q_tokens = init_quantized_tensors(&ptr, 1, p.vocab_size * dim, GS)
    w.wq, w.wk, w.wv, w.wo = rows_to_come(L), rows_to_come(L), rows_to_come(L), rows_to_come(L)
    w.w1, w.w2, w.w3 = rows_to_come(L), rows_to_come(L), rows_to_come(L)
    w.wcls = w.q_tokens if shared_classifier else rows_to_come(1)

    packed[0] = w[0]
    packed.wq = init_packed_tensors(&packed_ptr, slots, L, p.dim, p.dim, GS)
    packed.wk = init_packed_tensors(&packed_ptr, slots + L, L, kv_dim, p.dim, GS)
    packed.wv = init_packed_tensors(&packed_ptr, slots + 2 * L, L, kv_dim, p.dim, GS)
    packed.wo = init_packed_tensors(&packed_ptr, slots + 3 * L, L, p.dim, p.dim, GS)
    packed.w1 = init_packed_tensors(&packed_ptr, slots + 4 * L, L, p.hidden_dim, p.dim, GS)
    packed.w2 = init_packed_tensors(&packed_ptr, slots + 5 * L, L, p.dim, p.hidden_dim, GS)
    packed.w3 = init_packed_tensors(&packed_ptr, slots + 6 * L, L, p.hidden_dim, p.dim, GS)
    packed.wcls = init_packed_tensors(&packed_ptr, slots + 7 * L, 1, p.vocab_size, p.dim, GS)

cdef QuantizedTensor* tensor_of(TransformerWeights* w, name) except NULL:
    # the mapped tensors by their name in quantized_tensors()
    cdef QuantizedTensor* tensors[9]
    tensors[:] = [w.q_tokens, w.wq, w.wk, w.wv, w.wo, w.w1, w.w2, w.w3, w.wcls]
    return tensors[["token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
                    "wcls"].index(name)]


# forward_batch's copy of the matrices (not in runq.c). On AVX-512 VNNI, q8matmul.h multiplies
# 16 rows at a time in a packed layout (its q8_pack_block says which) with a fraction of the
# instructions the file's layout needs: one token's decode would otherwise be bound by the
# instructions, not by the memory. The matrices are packed once, here, and the mapped pages of
# the file are given back (the kernel keeps them in its page cache): forward_batch reads only
# the copy, forward() and the `weights` views read the file as before. Every result is the same:
# the packed kernel adds the same integers and takes the same float steps.
#
# Memory: the file is mapped without MAP_POPULATE (map_model's populate=False), and each job of
# rows hands its file pages back as soon as it is packed, so that the process holds the file's
# pages only for the rows being packed beside the copy made so far: at every moment of loading
# about the file's size, not twice it. Threads: pthreads started and joined in C, each packing
# every n-th job. Not OpenMP: a process forked after OpenMP ran (multiprocessing, the fuzz tests)
# hangs in its first parallel region. Not Python threads: a Ctrl-C raised in the main thread
# between two lines of Python could free the copy while a thread still writes into it.

cdef extern from *:
    """
    #if defined(__unix__) || defined(__APPLE__)
    #include <sys/mman.h>
    #include <unistd.h>
    /* the whole pages over [p - margin, p + bytes + margin), outward, within the mapping [lo, hi),
     * handed back (MADV_DONTNEED): the file's pages stay in the page cache, and come back on the
     * next read (refaults of a neighbour's pages are cheap and change nothing) */
    static void runq_drop_pages(const void* p, int64_t bytes, int64_t margin, const void* lo,
                                const void* hi) {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t start = (uintptr_t)p - (uintptr_t)lo > (uintptr_t)margin ? (uintptr_t)p - margin
                                                                           : (uintptr_t)lo;
        uintptr_t end = (uintptr_t)p + (uintptr_t)(bytes + margin);
        if (end > (uintptr_t)hi)
            end = (uintptr_t)hi;
        start &= ~(page - 1);
        end = (end + page - 1) & ~(page - 1);
        madvise((void*)start, end - start, MADV_DONTNEED);
    }
    /* the pages of a mapped file read in and mapped now, huge where the page cache gives them
     * (MADV_HUGEPAGE first: readahead then reads in 2 MB folios): fewer TLB misses in decode.
     * MADV_POPULATE_READ (Linux 5.14) does what MAP_POPULATE does at mmap time; elsewhere the
     * pages are read ahead (MADV_WILLNEED) and mapped as they are first touched */
    static void runq_map_now(const void* p, int64_t bytes) {
        void* start = (void*)((uintptr_t)p & ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1));
        size_t length = (size_t)((const char*)p + bytes - (const char*)start);
    #ifdef MADV_HUGEPAGE
        madvise(start, length, MADV_HUGEPAGE);
    #endif
    #ifdef __linux__
        if (madvise(start, length, 22 /* MADV_POPULATE_READ */) == 0)
            return;
    #endif
        madvise(start, length, MADV_WILLNEED);
    }
    #else
    static void runq_drop_pages(const void* p, int64_t bytes, int64_t margin, const void* lo,
                                const void* hi) {
        (void)p; (void)bytes; (void)margin; (void)lo; (void)hi;
    }
    static void runq_map_now(const void* p, int64_t bytes) { (void)p; (void)bytes; }
    #endif

    /* fn(arg, i, n) for i = 0 .. n-1, on n threads (the calling one included), returning when all
     * have returned; a thread that cannot be started runs its share here. One thread without
     * pthreads (Windows). */
    typedef void (*runq_share_fn)(void* arg, int64_t first, int64_t step);
    #if defined(__unix__) || defined(__APPLE__)
    #include <pthread.h>
    typedef struct { runq_share_fn fn; void* arg; int64_t first, step; } runq_share;
    static void* runq_share_main(void* p) {
        runq_share* s = (runq_share*)p;
        s->fn(s->arg, s->first, s->step);
        return NULL;
    }
    static void runq_run_shares(runq_share_fn fn, void* arg, int n) {
        pthread_t threads[64];
        runq_share shares[64];
        int started[64] = {0};
        if (n > 64)
            n = 64;
        for (int i = 1; i < n; i++) {
            shares[i].fn = fn; shares[i].arg = arg; shares[i].first = i; shares[i].step = n;
            started[i] = pthread_create(&threads[i], NULL, runq_share_main, &shares[i]) == 0;
        }
        fn(arg, 0, n);
        for (int i = 1; i < n; i++) {
            if (started[i])
                pthread_join(threads[i], NULL);
            else
                fn(arg, i, n);
        }
    }
    #else
    static void runq_run_shares(runq_share_fn fn, void* arg, int n) { (void)n; fn(arg, 0, 1); }
    #endif
    """
    void runq_drop_pages(const void* p, int64_t bytes, int64_t margin, const void* lo,
                         const void* hi) noexcept nogil
    void runq_map_now(const void* p, int64_t bytes) noexcept nogil
    ctypedef void (*runq_share_fn)(void* arg, int64_t first, int64_t step) noexcept nogil
    void runq_run_shares(runq_share_fn fn, void* arg, int n) noexcept nogil

cdef struct PackJob:
    const QuantizedTensor* src  # a matrix (d, n) in the file
    QuantizedTensor* dst  # its copy in the other layout
    int d, n
    Py_ssize_t block0, block1  # the blocks of 16 rows this job copies

cdef struct PackPlan:
    PackJob* jobs
    Py_ssize_t n_jobs
    int GS
    bint unpack  # from the packed layout to rows (q8_unpack_block), else rows to packed
    bint drop  # hand back the file pages each job read (hand_back)
    const char* file_start  # the mapped file
    const char* file_end

# A read of a mapped file maps the pages around it too: fault-around, and on Linux 6.18 with ext4
# the whole folio of the page cache the page is in, up to 2 MB. A job's first and last reads then
# map pages of the jobs beside it, which stayed mapped when those had already handed theirs back
# (at Llama 3.2 1B, 30 MB of the file's pages, evenly spread, at the end of packing). So a job hands
# back this much more on either side: a neighbour still copying reads those pages back (cheap).
DEF DROP_MARGIN = 1 << 21

cdef inline void hand_back(const PackPlan* plan, const void* p, Py_ssize_t nbytes) noexcept nogil:
    # the file pages of [p, p + nbytes), and DROP_MARGIN bytes on either side, handed back
    runq_drop_pages(p, nbytes, DROP_MARGIN, plan.file_start, plan.file_end)

cdef void pack_jobs(void* plan, int64_t first, int64_t step) noexcept nogil:
    # jobs first, first + step, ... of the PackPlan: copy their rows, then hand back the file
    # pages they read
    cdef PackJob* jobs = (<PackPlan*>plan).jobs
    cdef Py_ssize_t n_jobs = (<PackPlan*>plan).n_jobs
    cdef int GS = (<PackPlan*>plan).GS
    cdef bint unpack = (<PackPlan*>plan).unpack
    cdef Py_ssize_t j, block, row0, row1, groups, chunk_bytes
    cdef const PackJob* job
    j = first
    while j < n_jobs:  # (range() with a variable step is not C in Cython)
        job = &jobs[j]
        j += step
        groups = job.n // GS
        if unpack:
            for block in range(job.block0, job.block1):
                q8_unpack_block(job.dst.q, job.dst.s, block, job.src.q, job.src.s, job.d, job.n, GS)
            if (<PackPlan*>plan).drop:
                chunk_bytes = (job.n + 63) // 64 * 1024
                hand_back(<PackPlan*>plan, job.src.q + job.block0 * chunk_bytes,
                          (job.block1 - job.block0) * chunk_bytes)
                hand_back(<PackPlan*>plan, job.src.s + job.block0 * groups * 16,
                          (job.block1 - job.block0) * groups * 16 * sizeof(float))
            continue
        for block in range(job.block0, job.block1):
            q8_pack_block(job.dst.q, job.dst.s, block, job.src.q, job.src.s, job.d, job.n, GS)
        if (<PackPlan*>plan).drop:
            row0 = job.block0 * 16
            row1 = min(job.block1 * 16, <Py_ssize_t>job.d)
            hand_back(<PackPlan*>plan, job.src.q + row0 * job.n, (row1 - row0) * job.n)
            hand_back(<PackPlan*>plan, job.src.s + row0 * groups, (row1 - row0) * groups * sizeof(float))

def pack_threads():
    """Threads to pack with: OMP_NUM_THREADS when set (the threads the user gives runq), else
    the CPUs this process may run on."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        n = 0
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)

cdef char* address_of(buffer) except NULL:
    # the first byte of a writable buffer (an anonymous mmap, which stays where it is)
    cdef unsigned char[::1] view = buffer
    return <char*>&view[0]

DEF PACK_JOB_BYTES = 1 << 21  # the file's bytes a job reads (about): its pages are held until it ends

cdef object copy_matrices(Transformer t, list shapes, QuantizedTensor** sources,
                          QuantizedTensor** copies, int GS, bint unpack, bint drop):
    # the matrices sources[k][m] (shapes[k]: count, rows d, columns n; in t's mapped file) copied
    # into the other layout (packed, or rows where unpack) in a new anonymous memory map, which is
    # returned, with copies[k][m] pointed at each copy; None where there is no room for it (nothing
    # copied). drop: each job hands back the file pages it read
    cdef int k, m, count, d, n
    cdef Py_ssize_t n_jobs = 0, blocks, step, b0
    cdef PackJob* job
    cdef PackPlan plan
    if unpack:
        sizes = [(<Py_ssize_t>d * n, <Py_ssize_t>d * n // GS * 4) for count, d, n in shapes]
    else:
        sizes = [(q8_packed_bytes(d, n), q8_packed_scales(d, n, GS) * 4) for count, d, n in shapes]
    cdef Py_ssize_t total = sum(shape[0] * (values + scales)
                                for shape, (values, scales) in zip(shapes, sizes))
    # the copy is anonymous memory: without room for it, nothing is swapped out or killed. The
    # file's own pages are reclaimable page cache.
    if total > available_memory():
        return None
    try:
        # private anonymous memory, touched only as it is written; huge pages where the kernel
        # gives them on request: fewer page faults while copying, and fewer TLB misses in decode
        # (7B on this project's VM: 1.22 of numpy's sgemv bandwidth with them, 0.86 without)
        if hasattr(mmap, "MAP_PRIVATE"):
            copy = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE)
        else:  # Windows: anonymous maps take no flags
            copy = mmap.mmap(-1, total)
    except (OSError, ValueError):
        return None
    try:
        copy.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no such advice here: 4 KB pages
        pass
    for count, d, n in shapes:
        step = max(1, PACK_JOB_BYTES // (16 * n))
        n_jobs += count * (((d + 15) // 16 + step - 1) // step)
    plan.jobs = <PackJob*>malloc(n_jobs * sizeof(PackJob))
    if not plan.jobs:
        return None
    plan.n_jobs, plan.GS, plan.unpack, plan.drop = 0, GS, unpack, drop
    plan.file_start = <const char*>&t._data[0]
    plan.file_end = plan.file_start + t.file_size
    cdef char* ptr = address_of(copy)  # page-aligned; a packed tensor's size is a multiple of 64
    for k in range(len(shapes)):
        count, d, n = shapes[k]
        blocks = (d + 15) // 16
        step = max(1, PACK_JOB_BYTES // (16 * n))
        for m in range(count):
            copies[k][m].q = <int8_t*>ptr
            ptr += <Py_ssize_t>sizes[k][0]
            copies[k][m].s = <float*>ptr
            ptr += <Py_ssize_t>sizes[k][1]
            for b0 in range(0, blocks, step):
                job = &plan.jobs[plan.n_jobs]
                job.src, job.dst, job.d, job.n = &sources[k][m], &copies[k][m], d, n
                job.block0, job.block1 = b0, min(b0 + step, blocks)
                plan.n_jobs += 1
    cdef int threads = pack_threads()
    with nogil:
        runq_run_shares(pack_jobs, &plan, threads)
    free(plan.jobs)
    return copy

cdef list matrix_shapes(Transformer t):
    # (tensors, rows, columns) of the matrices forward_batch multiplies with, in c_weights' order
    # (the file's), the classifier last
    cdef Config* p = &t.c_config
    cdef Py_ssize_t L = p.n_layers, dim = p.dim, hidden_dim = p.hidden_dim
    cdef Py_ssize_t kv_dim = (dim * p.n_kv_heads) // p.n_heads
    return [(L, dim, dim), (L, kv_dim, dim), (L, kv_dim, dim), (L, dim, dim),
            (L, hidden_dim, dim), (L, dim, hidden_dim), (L, hidden_dim, dim), (1, p.vocab_size, dim)]

cdef pack_weights(Transformer t):
    # c_packed: c_weights with the matrices packed, where q8matmul.h has the layout (Q8_PACKED),
    # the group size is 32 or 64 and every row is made of whole groups; else c_weights itself
    cdef Config* p = &t.c_config
    cdef TransformerWeights* w = &t.c_weights
    cdef int GS = t.group_size, k
    cdef QuantizedTensor* sources[8]
    cdef QuantizedTensor* packed[8]
    if not Q8_PACKED or GS not in (32, 64) or p.dim % GS or p.hidden_dim % GS:
        return
    t.packed_tensors = <QuantizedTensor*>malloc((7 * p.n_layers + 1) * sizeof(QuantizedTensor))
    if not t.packed_tensors:  # then from the mapped file, as elsewhere
        return
    for k in range(8):
        packed[k] = t.packed_tensors + k * p.n_layers
    sources[:] = [w.wq, w.wk, w.wv, w.wo, w.w1, w.w2, w.w3, w.wcls]
    t.packed_map = copy_matrices(t, matrix_shapes(t), sources, packed, GS, False, True)
    if t.packed_map is None:
        free(t.packed_tensors)
        t.packed_tensors = NULL
        return
    t.c_packed.wq, t.c_packed.wk, t.c_packed.wv, t.c_packed.wo = packed[0], packed[1], packed[2], packed[3]
    t.c_packed.w1, t.c_packed.w2, t.c_packed.w3, t.c_packed.wcls = packed[4], packed[5], packed[6], packed[7]
    t.packed = True
    if hasattr(mmap, "MADV_DONTNEED"):  # the norms and the embedding rows that were read
        t._mmap.madvise(mmap.MADV_DONTNEED)

cdef unpack_weights(Transformer t, bint drop):
    # the rows of a file whose matrices are packed (layout 1) into c_weights' matrices, in rows_map:
    # at load where this build has no packed kernel or pack=False (drop: each piece's file pages
    # handed back as it is unpacked, the mirror of pack_weights), or when forward(reference=True)
    # or the weights views first need runq.c's rows (ensure_rows)
    cdef TransformerWeights* w = &t.c_weights
    cdef TransformerWeights* packed = &t.c_packed
    cdef QuantizedTensor* sources[8]
    cdef QuantizedTensor* rows[8]
    sources[:] = [packed.wq, packed.wk, packed.wv, packed.wo, packed.w1, packed.w2, packed.w3,
                  packed.wcls]
    rows[:] = [w.wq, w.wk, w.wv, w.wo, w.w1, w.w2, w.w3, w.wcls]
    shapes = matrix_shapes(t)
    if t.shared_classifier:  # its rows are the embedding table's, in the file
        shapes.pop()
    t.rows_map = copy_matrices(t, shapes, sources, rows, t.group_size, True, drop)
    if t.rows_map is None:
        raise LlamaError(f"{t.checkpoint_path}: no room in memory to unpack its packed matrices "
                         f"into rows (about {t.file_size / 1e9:.1f} GB)")

_rows_lock = threading.Lock()

cdef ensure_rows(Transformer t):
    # runq.c's rows of every matrix, which a file that holds them packed gets on demand
    cdef Transformer owner = t.weights_owner or t
    with _rows_lock:
        if owner.c_weights.wq[0].q == NULL:
            unpack_weights(owner, False)

cdef read_checkpoint(Transformer t, checkpoint, bint pack):
    # runq.c freads the header and mmaps the file, trusting every number in it; here map_model
    # checks the magic number, the version, the group size and every size against the file first.
    # The pages of a v2 file are mapped at once (populate) unless pack_weights is to copy them: it
    # maps each piece as it reads it, and lets it go (unpack_weights likewise from a packed file;
    # build_transformer maps the pages of a packed file it multiplies from)
    header, t._mmap = map_model(checkpoint, True, "runq", populate=lambda header: (
        not header.layout and not (pack and Q8_PACKED)))
    t._data = t._mmap
    t.c_config = header.config
    t.version = header.version
    t.header = header
    t.norm_eps = header.norm_eps
    t._rope_table = rope_table(header, &t.rope_freqs)
    t.group_size = header.group_size
    t.shared_classifier = header.shared_classifier
    t.file_size = len(t._mmap)
    t.checkpoint_path = os.fsdecode(checkpoint)
    cdef char* weights_ptr = <char*>&t._data[<Py_ssize_t>header.size]  # skip header bytes. char is 1 byte
    try:
        if not header.layout:
            memory_map_weights(&t.c_weights, &t.c_config, weights_ptr, t.shared_classifier,
                               t.group_size)
            return
        t.packed_tensors = <QuantizedTensor*>malloc((7 * header.config["n_layers"] + 1) *
                                                    sizeof(QuantizedTensor))
        if not t.packed_tensors:
            raise MemoryError()
        memory_map_packed_weights(&t.c_weights, &t.c_packed, t.packed_tensors, &t.c_config,
                                  weights_ptr, <char*>&t._data[<Py_ssize_t>packed_start(header)],
                                  t.shared_classifier, t.group_size)
    except MemoryError as e:
        raise LlamaError(f"{os.fsdecode(checkpoint)}: out of memory: {e}") from None

cdef build_transformer(Transformer t, checkpoint_path, bint pack):
    int8_batch_kernel()  # not in runq.c: q8matmul.h's run-time choice, made once
    # read in the Config and the Weights from the checkpoint
    read_checkpoint(t, checkpoint_path, pack)
    if t.header.layout and pack and Q8_PACKED:
        # the file holds the matrices packed: forward_batch multiplies them where they lie, and
        # processes that run the file share its pages (the page cache's)
        t.packed = True
        if t.file_size <= available_memory():  # (else map_model warned: read from disk)
            with nogil:
                runq_map_now(&t._data[0], t.file_size)
    elif t.header.layout:
        # no packed kernel in this build (or pack=False): runq.c's rows, from the packed file
        unpack_weights(t, True)
        t.c_packed = t.c_weights
    else:
        t.c_packed = t.c_weights
        if pack:
            pack_weights(t)
    if (Q8_PACKED and pack and not t.packed and t.file_size <= available_memory()
            and hasattr(mmap, "MADV_WILLNEED")):
        # mapped unpopulated for a copy that was not made (another group size, no room for
        # it): decode reads the file, so have it read in now rather than a page at a time
        t._mmap.madvise(mmap.MADV_WILLNEED)
    # allocate the RunState buffers
    malloc_states(t)

cdef Transformer new_state(Transformer self, bint batch_state):
    # with_new_state(); without batch_state, a run state alone, for generate_batch's sequences
    # after the first, which go through the first's batch state (batch.pxi: prefill's through).
    # Allocated for each sequence of each call, forward_batch's buffers (11 MB at 110M) came back
    # from glibc's heap when freed, and a process that called generate_batch with 16 prompts
    # again and again grew by some 75 MB a call. Such a Transformer never leaves generate_batch
    cdef Transformer t = Transformer.__new__(Transformer)
    t.weights_owner = self.weights_owner or self
    t.c_config = self.c_config
    t.c_weights = self.c_weights
    t.c_packed = self.c_packed
    t.packed = self.packed
    t._mmap = self._mmap
    t._data = self._data
    t.version = self.version
    t.shared_classifier = self.shared_classifier
    t.group_size = self.group_size
    t.file_size = self.file_size
    t.checkpoint_path = self.checkpoint_path
    t.header = self.header
    t.norm_eps = self.norm_eps
    t.rope_freqs = self.rope_freqs
    t._rope_table = self._rope_table
    malloc_states(t, batch_state)
    return t

cdef malloc_states(Transformer t, bint batch_state=True):
    # the run state and forward_batch's, refused in one line that names the model on failure
    try:
        malloc_run_state(&t.state, &t.c_config)
        if batch_state:
            malloc_batch_state(&t.batch, &t.c_config)
    except MemoryError as e:
        raise LlamaError(f"{t.checkpoint_path}: out of memory: {e}") from None
    t.state_lock = threading.Lock()

cdef void free_transformer(Transformer t) noexcept:
    cdef TransformerWeights* w = &t.c_weights
    # free the QuantizedTensors, unless they are another Transformer's (with_new_state)
    free_batch_state(&t.batch)
    if t.weights_owner is not None:
        free_run_state(&t.state)
        return
    free(w.q_tokens)
    free(w.wq)
    free(w.wk)
    free(w.wv)
    free(w.wo)
    free(w.w1)
    free(w.w2)
    free(w.w3)
    if w.wcls != w.q_tokens:
        free(w.wcls)
    memset(w, 0, sizeof(TransformerWeights))
    free(t.packed_tensors)
    t.packed_tensors = NULL  # (packed_map unmaps itself with its last reference)
    # the memory map closes when the last view of it goes
    # free the RunState buffers
    free_run_state(&t.state)

# ----------------------------------------------------------------------------
# neural net blocks; the dynamics of the Transformer

cdef void rmsnorm(float* o, const float* x, const float* weight, int size, float eps) noexcept nogil:
    # eps: run.c's 1e-5f, or the file's (v3)
    # calculate sum of squares
    cdef float ss = 0.0
    cdef int j
    for j in range(size):
        ss += x[j] * x[j]
    ss /= size
    ss += eps
    ss = <float>1.0 / sqrtf(ss)
    # normalize and scale
    for j in range(size):
        o[j] = weight[j] * (ss * x[j])

cdef void softmax(float* x, int size) noexcept nogil:
    # find max value (for numerical stability)
    cdef float max_val = x[0]
    cdef int i
    for i in range(1, size):
        if x[i] > max_val:
            max_val = x[i]
    # exp and sum
    cdef float sum = 0.0
    for i in range(size):
        x[i] = expf(x[i] - max_val)
        sum += x[i]
    # normalize
    for i in range(size):
        x[i] /= sum

cdef void matmul(float* xout, const QuantizedTensor* x, const QuantizedTensor* w, int n, int d,
                 int GS, int32_t* xsum) noexcept nogil:
    # W (d,n) @ x (n,) -> xout (d,)
    # by far the most amount of time is spent inside this little function
    # inputs to this function are both quantized
    cdef Py_ssize_t i, block
    if n % GS:
        # rows that are not made of whole groups: see q8_row_ragged in q8matmul.h
        for i in prange(d, schedule="static"):
            xout[i] = q8_row_ragged(x.q, x.s, w.q, w.s, i * n, n, GS)
        return
    # do the matmul in groups of GS, Q8_ROWS rows at a time: runq.c's row product, int8 times int8
    # with the SIMD instructions the build targets (Q8_KERNEL says which), the groups' floats added
    # in runq.c's order. The same kernel serves matmul_batch, so a row gets the same bits in both.
    q8_group_sums(x.q, xsum, n, GS)  # x's sum per group, once for all rows (the header says why)
    for block in prange((d + Q8_ROWS - 1) // Q8_ROWS, schedule="static"):
        q8_matmul_block(xout, d, block, x.q, xsum, x.s, 1, 0, w.q, w.s, n, GS)

cdef float* forward(Transformer transformer, int token, int pos) noexcept nogil:
    # a few convenience variables
    cdef Config* p = &transformer.c_config
    cdef TransformerWeights* w = &transformer.c_weights
    cdef RunState* s = &transformer.state
    cdef float* x = s.x
    cdef int dim = p.dim
    cdef Py_ssize_t kv_dim = (<Py_ssize_t>p.dim * p.n_kv_heads) // p.n_heads  # 64-bit: pos * kv_dim
    cdef int kv_mul = p.n_heads // p.n_kv_heads  # integer multiplier of the kv sharing in multiquery
    cdef int hidden_dim = p.hidden_dim
    cdef int head_size = dim // p.n_heads
    cdef int GS = transformer.group_size
    cdef Py_ssize_t l, loff
    cdef int i, h, t, v, rotn, head_dim
    cdef float freq, val, fcr, fci, v0, v1, score, a
    cdef float* vec
    cdef float* q
    cdef float* k
    cdef float* att
    cdef float* xb
    cdef float* v_ptr
    cdef float* key_cache_row
    cdef float* value_cache_row

    # copy the token embedding into x (runq.c copies the row of its dequantized table; here the row
    # is dequantized: the same products, so the same bits)
    dequantize_row(w.q_tokens, x, token, dim, GS)

    # forward all the layers
    for l in range(p.n_layers):

        # attention rmsnorm
        rmsnorm(s.xb, x, w.rms_att_weight + l * dim, dim, transformer.norm_eps)

        # qkv matmuls for this position
        quantize(&s.xq, s.xb, dim, GS)
        matmul(s.q, &s.xq, w.wq + l, dim, dim, GS, s.xsum)
        matmul(s.k, &s.xq, w.wk + l, dim, kv_dim, GS, s.xsum)
        matmul(s.v, &s.xq, w.wv + l, dim, kv_dim, GS, s.xsum)

        # RoPE relative positional encoding: complex-valued rotate q and k in each head
        for i in range(0, dim, 2):
            head_dim = i % head_size
            freq = rope_frequency(transformer.rope_freqs, head_dim, head_size)
            val = pos * freq
            fcr = cosf(val)
            fci = sinf(val)
            rotn = 2 if i < kv_dim else 1  # how many vectors? 2 = q & k, 1 = q only
            for v in range(rotn):
                vec = s.q if v == 0 else s.k  # the vector to rotate (query or key)
                v0 = vec[i]
                v1 = vec[i + 1]
                vec[i] = v0 * fcr - v1 * fci
                vec[i + 1] = v0 * fci + v1 * fcr

        # save key,value at this time step (pos) to our kv cache
        loff = l * p.seq_len * kv_dim  # kv cache layer offset for convenience
        key_cache_row = s.key_cache + loff + pos * kv_dim
        value_cache_row = s.value_cache + loff + pos * kv_dim
        memcpy(key_cache_row, s.k, kv_dim * sizeof(float))
        memcpy(value_cache_row, s.v, kv_dim * sizeof(float))

        # multihead attention. iterate over all heads
        for h in prange(p.n_heads, schedule="static"):
            # get the query vector for this head
            q = s.q + h * head_size
            # attention scores for this head
            att = s.att + h * p.seq_len
            # iterate over all timesteps, including the current one
            for t in range(pos + 1):
                # get the key vector for this head and at this timestep
                k = s.key_cache + loff + t * kv_dim + (h // kv_mul) * head_size
                # calculate the attention score as the dot product of q and k
                score = 0.0
                for i in range(head_size):
                    score = score + q[i] * k[i]  # not +=, which prange takes as a reduction
                score = score / sqrtf(head_size)
                # save the score to the attention buffer
                att[t] = score

            # softmax the scores to get attention weights, from 0..pos inclusively
            softmax(att, pos + 1)

            # weighted sum of the values, store back into xb
            xb = s.xb + h * head_size
            memset(xb, 0, head_size * sizeof(float))
            for t in range(pos + 1):
                # get the value vector for this head and at this timestep
                v_ptr = s.value_cache + loff + t * kv_dim + (h // kv_mul) * head_size
                # get the attention weight for this timestep
                a = att[t]
                # accumulate the weighted value into xb
                for i in range(head_size):
                    xb[i] = xb[i] + a * v_ptr[i]

        # final matmul to get the output of the attention
        quantize(&s.xq, s.xb, dim, GS)
        matmul(s.xb2, &s.xq, w.wo + l, dim, dim, GS, s.xsum)

        # residual connection back into x
        for i in range(dim):
            x[i] += s.xb2[i]

        # ffn rmsnorm
        rmsnorm(s.xb, x, w.rms_ffn_weight + l * dim, dim, transformer.norm_eps)

        # Now for FFN in PyTorch we have: self.w2(F.silu(self.w1(x)) * self.w3(x))
        # first calculate self.w1(x) and self.w3(x)
        quantize(&s.xq, s.xb, dim, GS)
        matmul(s.hb, &s.xq, w.w1 + l, dim, hidden_dim, GS, s.xsum)
        matmul(s.hb2, &s.xq, w.w3 + l, dim, hidden_dim, GS, s.xsum)

        # SwiGLU non-linearity
        for i in range(hidden_dim):
            val = s.hb[i]
            # silu(x)=x*σ(x), where σ(x) is the logistic sigmoid
            val *= (<float>1.0 / (<float>1.0 + expf(-val)))
            # elementwise multiply with w3(x)
            val *= s.hb2[i]
            s.hb[i] = val

        # final matmul to get the output of the ffn
        quantize(&s.hq, s.hb, hidden_dim, GS)
        matmul(s.xb, &s.hq, w.w2 + l, hidden_dim, dim, GS, s.xsum)

        # residual connection
        for i in range(dim):
            x[i] += s.xb[i]

    # final rmsnorm
    rmsnorm(x, x, w.rms_final_weight, dim, transformer.norm_eps)

    # classifier into logits
    quantize(&s.xq, x, dim, GS)
    matmul(s.logits, &s.xq, w.wcls, dim, p.vocab_size, GS, s.xsum)
    return s.logits

# ----------------------------------------------------------------------------
# batched forward: not in runq.c, the one deliberate structural addition
# runq.c feeds a prompt one token at a time, so every weight is read from memory once per token.
# forward_batch takes several tokens through each layer together (a prompt's tokens, or one token
# of each of several sequences), so that a weight row read from memory serves all of them while it
# is in cache. Decode runs through it too (forward_next, batch.pxi). Each dot product is
# q8matmul.h's (the same integer sums, the groups' floats added in the same order), and every other
# step is forward()'s code applied to one token: built with IEEE flags (make run), the logits and
# KV caches are forward()'s, bit for bit; under -Ofast they agree to rounding (see run.pyx's
# forward_batch), and a token gets the same bits however it is batched.

cdef void malloc_batch_state(BatchState* b, Config* p) except *:
    cdef size_t kv_dim = (<size_t>p.dim * p.n_kv_heads) // p.n_heads
    cdef size_t widest = max(p.dim, p.hidden_dim)
    b.x = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.xb = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.xb2 = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.hb = <float*>calloc(MAX_BATCH * p.hidden_dim, sizeof(float))
    b.hb2 = <float*>calloc(MAX_BATCH * p.hidden_dim, sizeof(float))
    b.q = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.k = <float*>calloc(MAX_BATCH * kv_dim, sizeof(float))
    b.v = <float*>calloc(MAX_BATCH * kv_dim, sizeof(float))
    b.rope = <float*>calloc(MAX_BATCH * (p.dim // p.n_heads), sizeof(float))
    b.att_rows = max(team_max_threads(), 1)
    b.att = <float*>calloc(<size_t>b.att_rows * p.seq_len, sizeof(float))
    b.logits = <float*>calloc(<size_t>MAX_LOGITS * p.vocab_size, sizeof(float))
    cdef size_t stride = q8_token_stride(widest)
    b.xq_q = <int8_t*>calloc(MAX_BATCH * stride, sizeof(int8_t))
    b.xq_s = <float*>calloc(MAX_BATCH * stride, sizeof(float))
    b.xsum = <int32_t*>calloc(MAX_BATCH * stride, sizeof(int32_t))
    if (not b.x or not b.xb or not b.xb2 or not b.hb or not b.hb2 or not b.q or not b.k or not b.v
            or not b.att or not b.rope or not b.logits or not b.xq_q or not b.xq_s or not b.xsum):
        free_batch_state(b)
        raise MemoryError("malloc failed for the batch state")

cdef void free_batch_state(BatchState* b) noexcept:
    free(b.x)
    free(b.xb)
    free(b.xb2)
    free(b.hb)
    free(b.hb2)
    free(b.q)
    free(b.k)
    free(b.v)
    free(b.att)
    free(b.rope)
    free(b.logits)
    free(b.xq_q)
    free(b.xq_s)
    free(b.xsum)
    memset(b, 0, sizeof(BatchState))

cdef void matmul_batch(float* xout, BatchState* bs, const float* x, const QuantizedTensor* w,
                       int n, int d, int GS, int B, int widest, bint packed) noexcept nogil:
    # W (d,n) @ x (B,n) -> xout (B,d): each row of x quantized as forward() quantizes it, then
    # matmul()'s kernel for all B rows at once, so that each weight row is read from memory once
    # for all of them (q8matmul.h: the row product of a (row, token) does not depend on B)
    matmul_batch3(bs, x, n, GS, B, widest, packed, xout, w, d, NULL, NULL, 0, NULL, NULL, 0)

cdef void matmul_batch3(BatchState* bs, const float* x, int n, int GS, int B, int widest,
                        bint packed, float* out1, const QuantizedTensor* w1, int d1,
                        float* out2, const QuantizedTensor* w2, int d2,
                        float* out3, const QuantizedTensor* w3, int d3) noexcept nogil:
    # matmul_batch for up to three matrices that multiply the same x (q, k and v; w1 and w3): x is
    # quantized once, and the three share one parallel region (each region ends with the threads
    # waiting for each other, which costs a lot when another program holds one of the cores)
    cdef Py_ssize_t i, b, block
    cdef Py_ssize_t stride = q8_token_stride(widest)  # as malloc_batch_state allocated them
    cdef Py_ssize_t blocks1 = (d1 + Q8_ROWS - 1) // Q8_ROWS
    cdef Py_ssize_t blocks2 = (d2 + Q8_ROWS - 1) // Q8_ROWS
    cdef Py_ssize_t blocks3 = (d3 + Q8_ROWS - 1) // Q8_ROWS
    if B == 1:  # decode: one row is not worth waking the threads for
        quantize_row(bs, x, n, GS, stride, 0)
    else:
        for b in prange(B, schedule="static"):
            quantize_row(bs, x, n, GS, stride, b)
    if n % GS:
        for i in prange(d1 + d2 + d3, schedule="static"):
            for b in range(B):
                if i < d1:
                    out1[b * d1 + i] = q8_row_ragged(bs.xq_q + b * stride, bs.xq_s + b * stride,
                                                     w1.q, w1.s, i * n, n, GS)
                elif i < d1 + d2:
                    out2[b * d2 + i - d1] = q8_row_ragged(bs.xq_q + b * stride, bs.xq_s + b * stride,
                                                          w2.q, w2.s, (i - d1) * n, n, GS)
                else:
                    out3[b * d3 + i - d1 - d2] = q8_row_ragged(bs.xq_q + b * stride, bs.xq_s + b * stride,
                                                               w3.q, w3.s, (i - d1 - d2) * n, n, GS)
        return
    if packed:  # the same blocks of rows, from pack_weights' copy
        for block in prange(blocks1 + blocks2 + blocks3, schedule="static"):
            if block < blocks1:
                q8_matmul_block_packed(out1, d1, block, bs.xq_q, bs.xsum, bs.xq_s, B, stride, w1.q,
                                       w1.s, n, GS)
            elif block < blocks1 + blocks2:
                q8_matmul_block_packed(out2, d2, block - blocks1, bs.xq_q, bs.xsum, bs.xq_s, B,
                                       stride, w2.q, w2.s, n, GS)
            else:
                q8_matmul_block_packed(out3, d3, block - blocks1 - blocks2, bs.xq_q, bs.xsum,
                                       bs.xq_s, B, stride, w3.q, w3.s, n, GS)
        return
    for block in prange(blocks1 + blocks2 + blocks3, schedule="static"):
        if block < blocks1:
            q8_matmul_block(out1, d1, block, bs.xq_q, bs.xsum, bs.xq_s, B, stride, w1.q, w1.s, n, GS)
        elif block < blocks1 + blocks2:
            q8_matmul_block(out2, d2, block - blocks1, bs.xq_q, bs.xsum, bs.xq_s, B, stride, w2.q,
                            w2.s, n, GS)
        else:
            q8_matmul_block(out3, d3, block - blocks1 - blocks2, bs.xq_q, bs.xsum, bs.xq_s, B,
                            stride, w3.q, w3.s, n, GS)

cdef void quantize_row(BatchState* bs, const float* x, int n, int GS, Py_ssize_t stride,
                       Py_ssize_t b) noexcept nogil:
    # row b of x (B,n) quantized as forward() quantizes it, with its group sums, into the batch state
    cdef QuantizedTensor xq
    xq.q = bs.xq_q + b * stride
    xq.s = bs.xq_s + b * stride
    quantize(&xq, x + b * n, n, GS)
    if n % GS == 0:
        q8_group_sums(xq.q, bs.xsum + b * stride, n, GS)

cdef void forward_batch(Transformer transformer, BatchState* bs, BatchEntry* batch, int B) noexcept nogil:
    # forward() for B entries at once (B <= MAX_BATCH): each entry's token at its position, on its
    # run state's KV cache. Entries of one sequence come in position order, so that the keys and
    # values a token attends to are in its cache by the time attention runs (causal). The logits
    # of the entries that want them (at most MAX_LOGITS) are left in bs.logits, one row each, in
    # entry order.
    cdef Config* p = &transformer.c_config
    cdef TransformerWeights* w = &transformer.c_packed  # c_weights, packed where it can be
    cdef bint packed = transformer.packed
    cdef int dim = p.dim
    cdef Py_ssize_t kv_dim = (<Py_ssize_t>p.dim * p.n_kv_heads) // p.n_heads  # 64-bit: pos * kv_dim
    cdef int kv_mul = p.n_heads // p.n_kv_heads
    cdef int hidden_dim = p.hidden_dim
    cdef int head_size = dim // p.n_heads
    cdef int GS = transformer.group_size
    cdef int widest = max(dim, hidden_dim)
    cdef Py_ssize_t l, loff, bh
    cdef int b, i, h, t, pos, n_out
    # attention runs on as many threads as team.pxi chose, one scratch row each, and so do a
    # batch's longest per-token steps when it has THREADED_TOKENS tokens or more (team.pxi). The
    # other per-token steps stay on this thread: as parallel loops they took 1.5% off a prompt and
    # added 6% to a 15M decode, where starting a parallel region, even of one thread, costs ~1 us.
    cdef int threads = min(bs.att_rows, team_max_threads())
    cdef float* x
    cdef float* q
    cdef float* att
    cdef RunState* s

    # copy the token embeddings into x
    for b in range(B):
        embedding_row(transformer, bs.x + b * dim, batch[b].token)

    # RoPE's cos and sin at each token's position, for every layer and head: forward()'s values
    # (the same cosf and sinf of the same val), computed once instead of in each layer and head
    for b in range(B):
        rope_row(bs.rope + b * head_size, transformer.rope_freqs, batch[b].pos, head_size)

    # forward all the layers
    for l in range(p.n_layers):

        # attention rmsnorm
        for b in range(B):
            rmsnorm(bs.xb + b * dim, bs.x + b * dim, w.rms_att_weight + l * dim, dim,
                    transformer.norm_eps)

        # qkv matmuls for these positions
        matmul_batch3(bs, bs.xb, dim, GS, B, widest, packed, bs.q, w.wq + l, dim, bs.k, w.wk + l, kv_dim,
                      bs.v, w.wv + l, kv_dim)

        # RoPE as in forward(), each token at its position; then key and value into its KV cache
        loff = l * p.seq_len * kv_dim  # kv cache layer offset for convenience
        rope_and_cache_batch(bs, batch, B, loff, dim, kv_dim, head_size, threads)

        # multihead attention as in forward(), over all heads of all tokens, dealt out one at a time
        # (in a prompt a later token attends to more positions: in halves, one thread got 3/4),
        # head by head, so that a thread's next token reads the same head's keys and values (in
        # its cache) instead of another head's
        for bh in prange(B * p.n_heads, schedule="static", chunksize=1, num_threads=threads):
            h = bh // B
            b = bh % B
            s = batch[b].s
            pos = batch[b].pos
            q = bs.q + b * dim + h * head_size
            att = bs.att + threadid() * p.seq_len
            # each key's score: forward()'s loop in the IEEE build, f32dot.h's order under -Ofast
            f32_scores(att, q, s.key_cache + loff + (h // kv_mul) * head_size, kv_dim, pos + 1,
                       head_size)
            for t in range(pos + 1):
                att[t] = att[t] / sqrtf(head_size)
            softmax(att, pos + 1)
            weighted_values(bs.xb + b * dim + h * head_size, att,
                            s.value_cache + loff + (h // kv_mul) * head_size, kv_dim, pos + 1, head_size)

        # final matmul to get the output of the attention, and the residual connection
        matmul_batch(bs.xb2, bs, bs.xb, w.wo + l, dim, dim, GS, B, widest, packed)
        for b in range(B):
            x = bs.x + b * dim
            for i in range(dim):
                x[i] += bs.xb2[b * dim + i]

        # ffn rmsnorm
        for b in range(B):
            rmsnorm(bs.xb + b * dim, bs.x + b * dim, w.rms_ffn_weight + l * dim, dim,
                    transformer.norm_eps)

        # w1(x) and w3(x), SwiGLU, w2
        matmul_batch3(bs, bs.xb, dim, GS, B, widest, packed, bs.hb, w.w1 + l, hidden_dim, bs.hb2, w.w3 + l,
                      hidden_dim, NULL, NULL, 0)
        swiglu_batch(bs.hb, bs.hb2, hidden_dim, hidden_dim, B, threads)
        matmul_batch(bs.xb, bs, bs.hb, w.w2 + l, hidden_dim, dim, GS, B, widest, packed)

        # residual connection
        for b in range(B):
            x = bs.x + b * dim
            for i in range(dim):
                x[i] += bs.xb[b * dim + i]

    # final rmsnorm and the classifier, for the entries that want logits (gathered in xb)
    n_out = 0
    for b in range(B):
        if batch[b].want_logits:
            x = bs.x + b * dim
            rmsnorm(x, x, w.rms_final_weight, dim, transformer.norm_eps)  # in place, as in forward()
            memcpy(bs.xb + n_out * dim, x, dim * sizeof(float))
            n_out += 1
    matmul_batch(bs.logits, bs, bs.xb, w.wcls, dim, p.vocab_size, GS, n_out, widest, packed)

cdef void embedding_row(Transformer t, float* x, int token) noexcept nogil:
    # forward()'s dequantize_row of the token's embedding, for forward_batch. Where the classifier
    # is the embedding table and forward_batch multiplies it packed (pack_weights' copy, or a packed
    # file's), the row comes from there (the same values and scales: the same bits): read from the
    # file beside pack_weights' copy, each row would fault the file's pages back in, with more
    # around them (0.25 GB of them within a minute of a Llama 3.2 1B decode)
    if t.packed and t.shared_classifier:
        q8_dequantize_row_packed(x, t.c_packed.wcls.q, t.c_packed.wcls.s, token, t.c_config.dim,
                                 t.group_size)
    else:
        dequantize_row(t.c_packed.q_tokens, x, token, t.c_config.dim, t.group_size)

cdef void swiglu(float* hb, const float* hb2, int hidden_dim) noexcept nogil:
    # forward()'s SwiGLU loop for one token of a batch
    cdef int i
    cdef float val
    for i in range(hidden_dim):
        val = hb[i]
        val *= (<float>1.0 / (<float>1.0 + expf(-val)))
        val *= hb2[i]
        hb[i] = val

include "batch.pxi"

# ----------------------------------------------------------------------------
# The Byte Pair Encoding (BPE) Tokenizer that translates strings <-> tokens

cdef struct TokenIndex:
    const char* str
    int id

cdef class Tokenizer:
    """A llama2.c tokenizer file: vocab_size pieces with their merge scores."""
    cdef char** vocab
    cdef float* vocab_scores
    cdef TokenIndex* sorted_vocab
    cdef readonly int vocab_size
    cdef readonly unsigned int max_token_length
    cdef unsigned char byte_pieces[512]  # stores all single-byte strings

    def __init__(self, tokenizer_path, int vocab_size):
        build_tokenizer(self, tokenizer_path, vocab_size)

    def __dealloc__(self):
        free_tokenizer(self)

    def encode(self, text, bint bos=True, bint eos=False):
        """Token ids of `text` (str or bytes), with BOS (1) and EOS (2) as asked."""
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        return encode(self, text, bos, eos)

    def decode(self, int prev_token, int token):
        """The bytes that token prints after prev_token (the raw piece, before safe_printf)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        return <bytes>decode(self, prev_token, token)

    def piece(self, int token):
        """The raw vocabulary entry of token."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        return <bytes>self.vocab[token]

cdef int compare_tokens(const void* a, const void* b) noexcept nogil:
    return strcmp((<TokenIndex*>a).str, (<TokenIndex*>b).str)

cdef build_tokenizer(Tokenizer t, tokenizer_path, int vocab_size):
    # i should have written the vocab_size into the tokenizer file... sigh
    cdef int i, length
    cdef long file_size
    cdef FILE* file
    path = os.fsdecode(tokenizer_path)
    if vocab_size <= 0:
        raise LlamaError(f"{path}: vocab_size must be > 0, got {vocab_size}")
    # the file is opened (and its size checked) before the mallocs, which run.c does first: a
    # vocab_size of 2^31 with a small file is refused instead of allocating 16 GiB
    file = fopen(os.fsencode(tokenizer_path), "rb")
    if not file:
        # a Ctrl-C that interrupted the open (a FIFO nobody writes to) is that, not a bad file
        PyErr_CheckSignals()
        raise LlamaError(f"couldn't load {path}: {os.strerror(errno)}")
    if os.path.isdir(tokenizer_path):
        fclose(file)
        raise LlamaError(f"couldn't load {path}: it is a directory")
    try:
        fseek(file, 0, SEEK_END)
        file_size = ftell(file)
        fseek(file, 0, SEEK_SET)
        # each piece takes at least 8 bytes (its score and length) after the 4-byte header
        if file_size < 4 + 8 * <long>vocab_size:
            raise LlamaError(f"{path}: file is {file_size} bytes, too small for the model's "
                             f"vocab_size = {vocab_size} pieces")
        t.vocab_size = vocab_size
        # malloc space to hold the scores and the strings
        t.vocab = <char**>calloc(vocab_size, sizeof(char*))
        t.vocab_scores = <float*>malloc(vocab_size * sizeof(float))
        if not t.vocab or not t.vocab_scores:
            raise MemoryError()
        for i in range(256):
            t.byte_pieces[i * 2] = <unsigned char>i
            t.byte_pieces[i * 2 + 1] = 0
        # read in the file
        if fread(&t.max_token_length, sizeof(int), 1, file) != 1:
            raise LlamaError(f"{path}: failed read: file is {file_size} bytes, too small for a tokenizer")
        # encode() sizes its merge buffer from max_token_length: the header's value is not
        # trusted (an understated one overflows the buffer in C, an absurd one is a giant
        # malloc), the real longest piece is taken instead; no longer merge can exist
        t.max_token_length = 0
        for i in range(vocab_size):
            if fread(t.vocab_scores + i, sizeof(float), 1, file) != 1 or fread(&length, sizeof(int), 1, file) != 1:
                raise LlamaError(f"{path}: failed read: the file ends after {i} pieces, "
                                 f"the model's vocab_size is {vocab_size}")
            # runq.c mallocs whatever length the file says: check it against the bytes left first
            if length < 0 or length > file_size - ftell(file):
                raise LlamaError(f"{path}: corrupt piece {i}: length {length} does not fit the file")
            t.vocab[i] = <char*>malloc(length + 1)
            if not t.vocab[i]:
                raise MemoryError()
            if length and fread(t.vocab[i], length, 1, file) != 1:
                raise LlamaError(f"{path}: failed read in piece {i}")
            t.vocab[i][length] = 0  # add the string terminating token
            if <unsigned int>length > t.max_token_length:
                t.max_token_length = length
    finally:
        fclose(file)

cdef void free_tokenizer(Tokenizer t) noexcept:
    cdef int i
    if t.vocab:
        for i in range(t.vocab_size):
            free(t.vocab[i])
    free(t.vocab)
    free(t.vocab_scores)
    free(t.sorted_vocab)
    t.vocab = NULL
    t.vocab_scores = NULL
    t.sorted_vocab = NULL

cdef const char* decode(Tokenizer t, int prev_token, int token) noexcept:
    cdef const char* piece = t.vocab[token]
    # following BOS (1) token, sentencepiece decoder strips any leading whitespace (see PR #89)
    if prev_token == 1 and piece[0] == c' ':
        piece += 1
    # careful, some tokens designate raw bytes, and look like e.g. '<0x01>'
    # parse this and convert and return the actual byte
    cdef unsigned char byte_val
    if sscanf(piece, "<0x%02hhX>", &byte_val) == 1:
        piece = <const char*>t.byte_pieces + byte_val * 2
    return piece

cdef inline bint isprint_c(unsigned char c) noexcept nogil:
    return 0x20 <= c <= 0x7e  # isprint() in the "C" locale runq.c runs in

cdef inline bint isspace_c(unsigned char c) noexcept nogil:
    return c == c' ' or (c'\t' <= c <= c'\r')

cdef bint printable_piece(const char* piece) noexcept nogil:
    # piece might be a raw byte token, and we only want to print printable chars or whitespace
    # because some of the other bytes can be various control codes, backspace, etc.
    if piece == NULL:
        return False
    if piece[0] == 0:
        return False
    cdef unsigned char byte_val
    if piece[1] == 0:
        byte_val = piece[0]
        if not (isprint_c(byte_val) or isspace_c(byte_val)):
            return False  # bad byte, don't print it
    return True

cdef void safe_printf(const char* piece) except *:
    if printable_piece(piece):
        write_stdout(piece, strlen(piece))

include "stdout.pxi"

cdef int str_lookup(const char* str, TokenIndex* sorted_vocab, int vocab_size) noexcept:
    # efficiently find the perfect match for str in vocab, return its index or -1 if not found
    cdef TokenIndex tok
    tok.str = str  # acts as the key to search for
    cdef TokenIndex* res = <TokenIndex*>bsearch(&tok, sorted_vocab, vocab_size, sizeof(TokenIndex),
                                                compare_tokens)
    return res.id if res != NULL else -1

cdef list encode(Tokenizer t, bytes text, bint bos, bint eos):
    # encode the string text (input) into an upper-bound preallocated tokens[] array
    # bos != 0 means prepend the BOS token (=1), eos != 0 means append the EOS token (=2)
    if b"\0" in text:  # a C string ends there: the rest would be dropped without a word
        raise ValueError("text holds a NUL byte, which the tokenizer cannot encode")
    cdef const char* c_text = text
    cdef int i, id, best_idx, right
    cdef size_t str_len = 0
    cdef const char* c
    cdef int n_tokens = 0
    cdef size_t text_len = strlen(c_text)
    cdef MergeCandidate best
    cdef int heap_size = 0
    cdef int steps = 0  # code points read and pairs taken, to look for Ctrl-C now and then
    if text_len > MAX_ENCODE_BYTES:
        raise LlamaError(f"the text to encode is {text_len} bytes, more than encode takes "
                         f"({MAX_ENCODE_BYTES})")
    if t.sorted_vocab == NULL:
        # lazily malloc and sort the vocabulary
        t.sorted_vocab = <TokenIndex*>malloc(t.vocab_size * sizeof(TokenIndex))
        if not t.sorted_vocab:
            raise MemoryError()
        for i in range(t.vocab_size):
            t.sorted_vocab[i].str = t.vocab[i]
            t.sorted_vocab[i].id = i
        qsort(t.sorted_vocab, t.vocab_size, sizeof(TokenIndex), compare_tokens)

    # create a temporary buffer that will store merge candidates of always two consecutive tokens
    # *2 for concat, +1 for null terminator +2 for UTF8 (in case max_token_length is 1)
    # (at least 4 bytes + null: one UTF-8 code point is gathered there even with tiny pieces)
    cdef size_t buffer_size = max(t.max_token_length, 2) * 2 + 1 + 2
    cdef char* str_buffer = <char*>malloc(buffer_size)
    # +4 for ?BOS, the dummy prefix (up to 1 byte token), ?EOS
    cdef int* tokens = <int*>malloc((text_len + 4) * sizeof(int))
    # the merge loop's linked list (prev and next token of each) and heap of candidate pairs
    cdef int* prev = <int*>malloc((text_len + 4) * sizeof(int))
    cdef int* next = <int*>malloc((text_len + 4) * sizeof(int))
    cdef MergeCandidate* heap = <MergeCandidate*>malloc(2 * (text_len + 4) * sizeof(MergeCandidate))
    if not str_buffer or not tokens or not prev or not next or not heap:
        free(str_buffer)
        free(tokens)
        free(prev)
        free(next)
        free(heap)
        raise MemoryError()
    try:
        # add optional BOS (=1) token, if desired
        if bos:
            tokens[n_tokens] = 1
            n_tokens += 1

        # add_dummy_prefix is true by default
        # so prepend a dummy prefix token to the input string, but only if text != ""
        # runq.c adds str_lookup(" ") blindly, -1 (and a crash) when the vocabulary has no " "
        # piece; here " " goes through the same code-point path as the text, so a vocabulary
        # without it falls back to the byte token of ' '
        if c_text[0] != 0:
            n_tokens = append_code_point(t, b" ", 1, tokens, n_tokens)

        # process the raw (UTF-8) byte sequence of the input string
        c = c_text
        while c[0] != 0:
            # reset buffer if the current byte is ASCII or a leading byte
            # 0xC0 is 11000000, so (*c & 0xC0) keeps the first 2 bits and zeros the rest
            # 0x80 is 10000000
            # in UTF-8, all continuation bytes start with "10" in first two bits
            # so in English this is: "if this byte is not a continuation byte"
            if (c[0] & 0xC0) != 0x80:
                # this byte must be either a leading byte (11...) or an ASCII char (0x...)
                # => reset our location, as we're starting a new UTF-8 codepoint
                str_len = 0

            # append the current byte to the buffer
            str_buffer[str_len] = c[0]  # runq.c: str_buffer[str_len++] = *c
            str_len += 1
            str_buffer[str_len] = 0

            # while the next character is a continuation byte, continue appending
            # but if there are too many of them, just stop to avoid overruning str_buffer size.
            if (c[1] & 0xC0) == 0x80 and str_len < 4:
                c += 1
                continue

            # ok c+1 is not a continuation byte, so we've read in a full codepoint
            n_tokens = append_code_point(t, str_buffer, str_len, tokens, n_tokens)
            str_len = 0  # protect against a sequence of stray UTF8 continuation bytes
            c += 1
            steps += 1
            if steps == SIGNAL_CHECK_EVERY:
                steps = 0
                PyErr_CheckSignals()  # Ctrl-C stops a long prompt at once

        # merge the best consecutive pair each iteration, according the scores in vocab_scores
        # runq.c rescans every pair for each merge:
        #     while (1) { best_score = -1e10; best_id = -1; best_idx = -1;
        #         for (int i = 0; i < (n_tokens-1); i++) { ...sprintf the pair, str_lookup it...
        #             if (id != -1 && vocab_scores[id] > best_score) { record score, id, i } }
        #         if (best_idx == -1) break;
        #         tokens[best_idx] = best_id; shift tokens[best_idx+2..] back by one; n_tokens--; }
        # which is quadratic: a 64 KB prompt takes ~100 s, a 1 MB one hours. Here the same merges
        # are done in the same order in O(n log n): each pair whose merge exists waits in a heap
        # ordered as that scan chooses (highest score, then leftmost: the scan's strict > keeps
        # the first of equal scores), the tokens form a linked list so that a merge deletes a
        # token without shifting the rest, a merge queues the two pairs it creates with its
        # neighbours, and queued pairs that a merge has since changed are skipped when they come
        # out of the heap. Same tokens as runq.c.
        for i in range(n_tokens):
            prev[i] = i - 1
            next[i] = i + 1 if i + 1 < n_tokens else -1
        for i in range(n_tokens - 1):
            queue_pair(t, tokens, i, i + 1, str_buffer, buffer_size, heap, &heap_size)

        while heap_size > 0:
            best = heap_pop(heap, &heap_size)
            steps += 1
            if steps == SIGNAL_CHECK_EVERY:
                steps = 0
                PyErr_CheckSignals()
            best_idx = best.left
            right = next[best_idx]
            if tokens[best_idx] != best.left_id or right == -1 or tokens[right] != best.right_id:
                continue  # a merge changed this pair after it was queued

            # merge the consecutive pair (best_idx, right) into new token best.id
            tokens[best_idx] = best.id
            # delete token at position right: unlink it from the list (-1 marks it deleted)
            tokens[right] = -1
            next[best_idx] = next[right]
            if next[right] != -1:
                prev[next[right]] = best_idx
            n_tokens -= 1  # token length decreased
            # the new token's pairs with its neighbours may merge in their turn
            if prev[best_idx] != -1:
                queue_pair(t, tokens, prev[best_idx], best_idx, str_buffer, buffer_size, heap,
                           &heap_size)
            if next[best_idx] != -1:
                queue_pair(t, tokens, best_idx, next[best_idx], str_buffer, buffer_size, heap,
                           &heap_size)

        # gather the list back into tokens[0..n_tokens) (the first token is never deleted)
        right = 0
        for i in range(n_tokens):
            tokens[i] = tokens[right]
            right = next[right]

        # add optional EOS (=2) token, if desired
        if eos:
            tokens[n_tokens] = 2
            n_tokens += 1

        result = [tokens[i] for i in range(n_tokens)]
    finally:
        free(str_buffer)
        free(tokens)
        free(prev)
        free(next)
        free(heap)
    for id in result:
        if id >= t.vocab_size:
            raise LlamaError(f"the prompt needs token {id}, but the vocabulary has only {t.vocab_size}"
                             f" pieces")
    return result

cdef int append_code_point(Tokenizer t, const char* code_point, size_t str_len, int* tokens,
                           int n_tokens) noexcept:
    cdef int id = str_lookup(code_point, t.sorted_vocab, t.vocab_size)
    cdef size_t i
    if id != -1:
        # we found this codepoint in vocab, add it as a token
        tokens[n_tokens] = id
        n_tokens += 1
    else:
        # byte_fallback encoding: just encode each byte as a token
        # +3 is here because the first 3 vocab elements are <unk>, <s>, </s>
        # so the individual bytes only start at index 3
        for i in range(str_len):
            tokens[n_tokens] = <unsigned char>code_point[i] + 3
            n_tokens += 1
    return n_tokens

cdef bint concat_fits(Tokenizer t, int a, int b, char* str_buffer, size_t buffer_size) noexcept:
    # sprintf(str_buffer, "%s%s", vocab[a], vocab[b]) of runq.c; byte-fallback ids past the
    # vocabulary (tiny vocabularies) have no piece and cannot merge
    if a >= t.vocab_size or b >= t.vocab_size:
        return False
    cdef size_t la = strlen(t.vocab[a]), lb = strlen(t.vocab[b])
    if la + lb + 1 > buffer_size:
        return False
    memcpy(str_buffer, t.vocab[a], la)
    memcpy(str_buffer + la, t.vocab[b], lb + 1)
    return True

# encode's merge loop: a binary heap of the adjacent pairs whose concatenation is a piece

cdef struct MergeCandidate:
    float score  # vocab_scores[id]
    int id  # the piece the pair merges into
    int left  # position of the pair's first token in encode's tokens[] (its list node)
    int left_id  # the pair's tokens when it was queued: a merge that changed either one makes
    int right_id  # the entry stale

cdef enum:
    # encode looks for Ctrl-C once in this many code points and heap entries
    SIGNAL_CHECK_EVERY = 1 << 14
    # longer texts would overflow encode's int positions (and take 52 bytes of buffers per byte)
    MAX_ENCODE_BYTES = (1 << 30) - 8

cdef inline bint comes_first(const MergeCandidate* a, const MergeCandidate* b) noexcept nogil:
    # runq.c's choice among pairs: the highest score, the leftmost of equal scores
    return a.score > b.score or (a.score == b.score and a.left < b.left)

cdef void heap_push(MergeCandidate* heap, int* size, MergeCandidate item) noexcept nogil:
    cdef int i = size[0], parent
    size[0] += 1
    while i > 0:
        parent = (i - 1) // 2
        if not comes_first(&item, &heap[parent]):
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = item

cdef MergeCandidate heap_pop(MergeCandidate* heap, int* size) noexcept nogil:
    cdef MergeCandidate top = heap[0]
    size[0] -= 1
    cdef MergeCandidate last = heap[size[0]]
    cdef int i = 0, child
    while True:
        child = 2 * i + 1
        if child >= size[0]:
            break
        if child + 1 < size[0] and comes_first(&heap[child + 1], &heap[child]):
            child += 1
        if not comes_first(&heap[child], &last):
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top

cdef void queue_pair(Tokenizer t, const int* tokens, int left, int right, char* str_buffer,
                     size_t buffer_size, MergeCandidate* heap, int* heap_size) noexcept:
    # runq.c's test of one pair: the two pieces concatenated are a piece, whose score beats the
    # initial best_score of -1e10
    cdef float best_score = -1e10
    cdef MergeCandidate item
    if not concat_fits(t, tokens[left], tokens[right], str_buffer, buffer_size):
        return
    item.id = str_lookup(str_buffer, t.sorted_vocab, t.vocab_size)
    if item.id != -1 and t.vocab_scores[item.id] > best_score:
        item.score = t.vocab_scores[item.id]
        item.left = left
        item.left_id = tokens[left]
        item.right_id = tokens[right]
        heap_push(heap, heap_size, item)

include "hf_tokenizer.pxi"  # a Hugging Face tokenizer in this one's place (not in runq.c)

# ----------------------------------------------------------------------------
# The Sampler, which takes logits and returns a sampled token
# sampling can be done in a few ways: greedy argmax, sampling, top-p sampling

cdef struct ProbIndex:
    float prob
    int index  # struct used when sorting probabilities during top-p sampling

cdef class Sampler:
    """Greedy, multinomial or top-p sampling with runq.c's xorshift RNG."""
    cdef readonly int vocab_size
    cdef ProbIndex* probindex  # buffer used in top-p sampling
    cdef readonly float temperature
    cdef readonly float topp
    cdef public unsigned long long rng_state

    def __init__(self, int vocab_size, float temperature, float topp, unsigned long long rng_seed):
        build_sampler(self, vocab_size, temperature, topp, rng_seed)

    def __dealloc__(self):
        free(self.probindex)

    def sample(self, float[::1] logits):
        """The next token from logits (float32, vocab_size long; modified in place, as in runq.c)."""
        if logits.shape[0] != self.vocab_size:
            raise ValueError(f"expected {self.vocab_size} logits, got {logits.shape[0]}")
        return sample(self, &logits[0])

cdef int sample_argmax(const float* probabilities, int n) noexcept nogil:
    # return the index that has the highest probability
    cdef int max_i = 0, i
    cdef float max_p = probabilities[0]
    for i in range(1, n):
        if probabilities[i] > max_p:
            max_i = i
            max_p = probabilities[i]
    return max_i

cdef int sample_mult(const float* probabilities, int n, float coin) noexcept nogil:
    # sample index from probabilities (they must sum to 1!)
    # coin is a random number in [0, 1), usually from random_f32()
    cdef float cdf = 0.0
    cdef int i
    for i in range(n):
        cdf += probabilities[i]
        if coin < cdf:
            return i
    return n - 1  # in case of rounding errors

cdef int compare(const void* a, const void* b) noexcept nogil:
    cdef ProbIndex* a_ = <ProbIndex*>a
    cdef ProbIndex* b_ = <ProbIndex*>b
    if a_.prob > b_.prob:
        return -1
    if a_.prob < b_.prob:
        return 1
    return 0

cdef int sample_topp(const float* probabilities, int n, float topp, ProbIndex* probindex,
                     float coin) noexcept nogil:
    # top-p sampling (or "nucleus sampling") samples from the smallest set of
    # tokens that exceed probability topp. This way we never sample tokens that
    # have very low probabilities and are less likely to go "off the rails".
    # coin is a random number in [0, 1), usually from random_f32()
    cdef int n0 = 0, i
    # quicksort indices in descending order of probabilities
    # values smaller than (1 - topp) / (n - 1) cannot be part of the result
    # so for efficiency we crop these out as candidates before sorting
    cdef float cutoff = (<float>1.0 - topp) / (n - 1)
    for i in range(n):
        if probabilities[i] >= cutoff:
            probindex[n0].index = i
            probindex[n0].prob = probabilities[i]
            n0 += 1
    # libc's qsort, as in runq.c: it is not stable, and ties must break the same way
    qsort(probindex, n0, sizeof(ProbIndex), compare)
    if n0 == 0:
        # runq.c goes on with last_idx = -1 and returns probindex[-1].index, read from before the
        # array. No probability reaches the cut-off only if all are below (1 - topp) / (n - 1),
        # which needs topp < 1/n <= the largest probability: the nucleus is that one token.
        return sample_argmax(probabilities, n)

    # truncate the list where cumulative probability exceeds topp
    cdef float cumulative_prob = 0.0
    cdef int last_idx = n0 - 1  # in case of rounding errors consider all elements
    for i in range(n0):
        cumulative_prob += probindex[i].prob
        if cumulative_prob > topp:
            last_idx = i
            break  # we've exceeded topp by including last_idx

    # sample from the truncated list
    cdef float r = coin * cumulative_prob
    cdef float cdf = 0.0
    for i in range(last_idx + 1):
        cdf += probindex[i].prob
        if r < cdf:
            return probindex[i].index
    return probindex[last_idx].index  # in case of rounding errors

include "sampling.pxi"  # sample_argmax_fast and sample_topp_fast: run.c's token, sooner

cdef build_sampler(Sampler sampler, int vocab_size, float temperature, float topp,
                   unsigned long long rng_seed):
    sampler.vocab_size = vocab_size
    sampler.temperature = temperature
    sampler.topp = topp
    sampler.rng_state = rng_seed
    # buffer only used with nucleus sampling; may not need but it's ~small
    sampler.probindex = <ProbIndex*>malloc(vocab_size * sizeof(ProbIndex))
    if not sampler.probindex:
        raise MemoryError()

cdef inline bint is_infinite(float x) noexcept nogil:
    # from the bits: with -Ofast (-ffinite-math-only) gcc folds isinf(x) to false
    cdef uint32_t bits
    memcpy(&bits, &x, sizeof(float))
    return (bits & 0x7FFFFFFF) == 0x7F800000

cdef unsigned int random_u32(unsigned long long* state) noexcept nogil:
    # xorshift rng: https://en.wikipedia.org/wiki/Xorshift#xorshift.2A
    state[0] ^= state[0] >> 12
    state[0] ^= state[0] << 25
    state[0] ^= state[0] >> 27
    return <unsigned int>((state[0] * <unsigned long long>0x2545F4914F6CDD1D) >> 32)

cdef float random_f32(unsigned long long* state) noexcept nogil:
    # random float32 in [0,1)
    return (random_u32(state) >> 8) / <float>16777216.0

cdef int sample(Sampler sampler, float* logits) noexcept:
    # sample the token given the logits and some hyperparameters
    cdef int next, q
    cdef float coin
    if sampler.temperature == 0.0:
        # greedy argmax sampling: take the token with the highest probability (sample_argmax's,
        # 16 logits at a time: sampling.pxi says why)
        next = sample_argmax_fast(logits, sampler.vocab_size)
    else:
        # apply the temperature to the logits
        if is_infinite(sampler.temperature):
            # x / inf is 0 for any finite x: runq.c built with -O3 samples uniformly. With -Ofast,
            # gcc vectorizes the division below as a multiplication by the reciprocal estimate
            # r = rcpps(t) refined by a Newton step, r * (2 - t * r); for t = inf that is
            # 0 * (2 - inf * 0) = NaN, so every logit became NaN (top-p then found no candidate,
            # see sample_topp, and printed <unk> forever). The logits get the 0 they should be.
            for q in range(sampler.vocab_size):
                logits[q] = 0.0
        else:
            for q in range(sampler.vocab_size):
                logits[q] /= sampler.temperature
        # apply softmax to the logits to get the probabilities for next token
        softmax(logits, sampler.vocab_size)
        # flip a (float) coin (this is our source of entropy for sampling)
        coin = random_f32(&sampler.rng_state)
        # we sample from this distribution to get the next token
        if sampler.topp <= 0 or sampler.topp >= 1:
            # simply sample from the predicted probability distribution
            next = sample_mult(logits, sampler.vocab_size, coin)
        else:
            # top-p (nucleus) sampling, clamping the least likely tokens to zero (runq.c's
            # sample_topp gives the same token; sampling.pxi says why this one)
            next = sample_topp_fast(logits, sampler.vocab_size, sampler.topp, sampler.probindex, coin)
    return next

# ----------------------------------------------------------------------------
# utilities: time

def time_in_ms():
    # return time in milliseconds, for benchmarking the model speed
    return _pytime.time_ns() // 1000000

# ----------------------------------------------------------------------------
# generation loop

def generate(transformer, tokenizer, Sampler sampler, prompt, int steps):
    """runq.c's generate() as a generator: it yields each piece's bytes where runq.c prints them
    (print_generation prints them for the command line; the API decodes them). It returns what
    print_generation reports: (tok/s of the tokens fed one at a time after the first, or None;
    the number of prompt tokens fed together, and their tok/s). The tokenizer is runq.c's
    Tokenizer or a Hugging Face one (load_tokenizer)."""
    # encode the (string) prompt into tokens sequence (run.c's encode() with BOS, or a Hugging Face
    # tokenizer's: hf_tokenizer.pxi has the points where the two differ)
    cdef list prompt_tokens = prompt_tokens_of(tokenizer, prompt)
    cdef int num_prompt_tokens = len(prompt_tokens)

    # start the main loop
    cdef long long start = 0  # used to time our code, only initialized after first iteration
    cdef int next  # will store the next token in the sequence
    cdef int token = prompt_tokens[0]  # kick off with the first token in the prompt
    cdef int pos = 0  # position in the sequence
    cdef float[::1] logits
    cdef bytes piece
    cdef double prefill_start, prefill_seconds
    cdef int prefilled
    # no other thread or generation may run on this run state (KV cache) meanwhile
    with exclusive_state(transformer):
        # not in runq.c: a prompt that does not start with BOS (Hugging Face) prints its first token
        piece = first_piece(tokenizer, prompt_tokens)
        if piece:
            yield piece
        # not in runq.c: the prompt tokens whose logits go unused (all but the last) go through
        # the model together first (forward_batch); the loop below skips their forward()
        prefill_start = _pytime.perf_counter()
        prefilled = prefill(transformer, prompt_tokens, min(num_prompt_tokens - 1, steps))
        prefill_seconds = _pytime.perf_counter() - prefill_start
        while pos < steps:

            # forward the transformer to get logits for the next token
            if pos >= prefilled:
                logits = forward_logits(transformer, token, pos)

            # advance the state machine
            if pos < num_prompt_tokens - 1:
                # if we are still processing the input prompt, force the next prompt token
                next = prompt_tokens[pos + 1]
            else:
                # otherwise sample the next token from the logits
                next = sample(sampler, &logits[0])
            pos += 1

            # data-dependent terminating condition: the BOS (=1) token delimits sequences
            # (a Hugging Face tokenizer's: a sampled EOS)
            if ends_sequence(tokenizer, next, pos >= num_prompt_tokens):
                break

            # print the token as string, decode it with the Tokenizer object
            piece = printed_piece(tokenizer, token, next)
            if piece:  # safe_printf's test (run.c's Tokenizer); the consumer prints
                yield piece
            token = next

            # init the timer here because the first iteration can be slower
            if start == 0 and pos > prefilled:
                start = time_in_ms()

    # report achieved tok/s (pos-1 because the timer starts after first iteration; the prefilled
    # tokens apart); runq.c divides by zero when all tokens come within one millisecond
    tok_per_s = None
    if pos - prefilled > 1:
        tok_per_s = (pos - prefilled - 1) / <double>max(time_in_ms() - start, 1) * 1000
    return tok_per_s, prefilled, prefilled / max(prefill_seconds, 1e-9)

include "generate_batch.pxi"

cdef float[::1] forward_logits(transformer, int token, int pos):
    # the Q8_0 Transformer decodes through forward_batch (forward_next: batch.pxi says why);
    # anything with a forward(token, pos) works too
    if isinstance(transformer, Transformer):
        return <float[:(<Transformer>transformer).c_config.vocab_size]>forward_next(transformer, token, pos)
    return transformer.forward(token, pos)

def read_stdin(guide):
    # read a line from stdin, after the guide; None at end of input (cli.read_line says how it
    # differs from runq.c's fgets into a 512-byte buffer)
    write_stdout(guide, len(guide))
    flush_stdout()
    # a Ctrl-C that came while the guide was written is seen now, not after the next line
    PyErr_CheckSignals()
    return read_line()

# ----------------------------------------------------------------------------
# chat loop
# I manually inspected the tokens for a few chat conversations compared to
# python reference and that seemed ok, but this was not thoroughly tested and
# is not safely implemented, it's more a proof of concept atm.

def chat(transformer, Tokenizer tokenizer, Sampler sampler, cli_user_prompt, cli_system_prompt,
         int steps):
    # buffers for reading the system prompt and user prompt from stdin
    cdef bytes system_prompt = b"", user_prompt = b"", rendered_prompt
    cdef list prompt_tokens = []
    cdef int num_prompt_tokens = 0
    cdef int user_idx = 0
    cdef float[::1] logits
    cdef bint from_prompt  # the token fed is one of the turn's prompt tokens
    cdef int chunk_start = 0, chunk_end = 0  # the prompt tokens whose logits forward_batch holds

    # start the main loop
    cdef bint user_turn = 1  # user starts
    cdef int next = 0  # will store the next token in the sequence
    cdef int token  # stores the current token to feed into the transformer
    cdef int pos = 0  # position in the sequence
    # no other thread or generation may run on this run state (KV cache) meanwhile
    with exclusive_state(transformer):
        while pos < steps:

            # when it is the user's turn to contribute tokens to the dialog...
            if user_turn:
                # get the (optional) system prompt at position 0
                if pos == 0:
                    # at position 0, the user can also contribute a system prompt
                    if cli_system_prompt is None:
                        # system prompt was not passed in, attempt to get it from stdin
                        system_prompt = read_stdin(b"Enter system prompt (optional): ") or b""
                    else:
                        # system prompt was passed in, use it
                        system_prompt = cli_system_prompt
                # get the user prompt
                if pos == 0 and cli_user_prompt is not None:
                    # user prompt for position 0 was passed in, use it
                    user_prompt = cli_user_prompt
                else:
                    # otherwise get user prompt from stdin
                    line = read_stdin(b"User: ")
                    # runq.c loops on its stale buffer at end of input until steps run out; the
                    # conversation simply ends here
                    if line is None:
                        break
                    user_prompt = line
                # render user/system prompts into the Llama 2 Chat schema
                if pos == 0 and system_prompt:
                    rendered_prompt = b"[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]" % (system_prompt, user_prompt)
                else:
                    rendered_prompt = b"[INST] %s [/INST]" % user_prompt
                # encode the rendered prompt into tokens
                prompt_tokens = encode(tokenizer, rendered_prompt, 1, 0)
                num_prompt_tokens = len(prompt_tokens)
                user_idx = 0  # reset the user index
                user_turn = 0
                write_stdout(b"Assistant: ", 11)

            # determine the token to pass into the transformer next
            from_prompt = user_idx < num_prompt_tokens
            if from_prompt:
                # if we are still processing the input prompt, force the next prompt token
                token = prompt_tokens[user_idx]
                user_idx += 1
            else:
                # otherwise use the next token sampled from previous turn
                token = next
            # EOS (=2) token ends the Assistant turn
            if token == 2:
                user_turn = 1

            # forward the transformer to get logits for the next token. Not in runq.c: a turn's
            # prompt tokens go through forward_batch together, MAX_LOGITS at a time, each one's
            # logits kept for its turn in the loop (the sampler draws for every one, as in runq.c)
            if from_prompt and isinstance(transformer, Transformer):
                if user_idx == 1 or user_idx > chunk_end:
                    chunk_start = user_idx - 1
                    chunk_end = chunk_start + prompt_chunk(transformer, prompt_tokens, chunk_start,
                                                           min(num_prompt_tokens - chunk_start, steps - pos), pos)
                logits = batch_logits(transformer, user_idx - 1 - chunk_start)
            else:
                logits = forward_logits(transformer, token, pos)
            next = sample(sampler, &logits[0])
            pos += 1

            if user_idx >= num_prompt_tokens and next != 2:
                # the Assistant is responding, so print its output
                safe_printf(decode(tokenizer, token, next))
                flush_stdout()
            if next == 2:
                write_stdout(b"\n", 1)
            PyErr_CheckSignals()  # Ctrl-C stops at once (see print_generation)
    write_stdout(b"\n", 1)
    flush_stdout()

# ----------------------------------------------------------------------------
# CLI: flag parsing, usage text and error reporting are llama2_cython.cli's, shared by run,
# runq and run_cuda

def main(argv=None, prog="runq", transformer_factory=None):
    """`python -m runq model_q80.bin [options]`: runq.c's main(). Returns the exit status.

    prog names the program in messages; transformer_factory(path) builds the model (default:
    Transformer).
    """
    with ExitStatus(prog, flush_quietly) as status:
        args = parse_args(sys.argv if argv is None else argv)

        # build the Transformer via the model .bin file
        transformer = (transformer_factory or Transformer)(args["checkpoint_path"])
        config = transformer.config
        steps = args["steps"]
        if steps == 0 or steps > config["seq_len"]:
            steps = config["seq_len"]  # override to ~max length

        # build the Tokenizer via the tokenizer .bin file (or a Hugging Face tokenizer)
        tokenizer = load_tokenizer(args["tokenizer_path"], config["vocab_size"])

        # build the Sampler
        sampler = Sampler(config["vocab_size"], args["temperature"], args["topp"], args["rng_seed"])

        # run!
        if args["mode"] == "generate":
            print_generation(generate(transformer, tokenizer, sampler, args["prompt"], steps))
        elif isinstance(tokenizer, Tokenizer):
            chat(transformer, tokenizer, sampler, args["prompt"], args["system_prompt"], steps)
        else:
            # not in the C: a Hugging Face tokenizer chats in its model's own template
            chat_loop(transformer, tokenizer, sampler, args["prompt"], args["system_prompt"], steps,
                      read_stdin, write_and_flush)
    return status.code
