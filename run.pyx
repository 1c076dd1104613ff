# cython: language_level=3
# Inference for Llama-2 Transformer model in pure Cython: a line-by-line translation of llama2.c's
# run.c. Sections, names and order follow run.c so the two read side by side; where run.c crashes
# or computes garbage on bad input, this file refuses with a clear message instead (comments say where).

cimport cython
from cython.parallel cimport prange, threadid
from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport cosf, expf, powf, sinf, sqrtf
from libc.stdint cimport uint32_t
from libc.stdio cimport FILE, fclose, fopen, fread, fseek, ftell, sscanf, SEEK_END, SEEK_SET
from libc.errno cimport errno
from libc.stdlib cimport bsearch, calloc, free, malloc, qsort
from libc.string cimport memcpy, memset, strcmp, strlen

import array
import os
import sys
import threading
import time as _pytime

# what has no twin in run.c is written once for run, runq and run_cuda (llama2_cython/)
from llama2_cython import LlamaError
from llama2_cython.api import exclusive_state
from llama2_cython.chat import chat_loop
from llama2_cython.cli import ExitStatus, parse_args, read_line
from llama2_cython.formats import map_model, rope_frequencies

cdef extern from "f32dot.h" nogil:
    # forward_batch's matrix products (the header says how each sum is ordered, and why)
    void f32_matmul_rows(float* out, size_t out_stride, const float* x, size_t x_stride,
                         const float* w, int n, int d, int B, int i0, int i1)
    size_t f32_token_stride(int n)


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

cdef struct TransformerWeights:
    # token embedding table
    float* token_embedding_table  # (vocab_size, dim)
    # weights for rmsnorms
    float* rms_att_weight  # (layer, dim) rmsnorm weights
    float* rms_ffn_weight  # (layer, dim)
    # weights for matmuls. note dim == n_heads * head_size
    float* wq  # (layer, dim, n_heads * head_size)
    float* wk  # (layer, dim, n_kv_heads * head_size)
    float* wv  # (layer, dim, n_kv_heads * head_size)
    float* wo  # (layer, n_heads * head_size, dim)
    # weights for ffn
    float* w1  # (layer, hidden_dim, dim)
    float* w2  # (layer, dim, hidden_dim)
    float* w3  # (layer, hidden_dim, dim)
    # final rmsnorm
    float* rms_final_weight  # (dim,)
    # (optional) classifier weights for the logits, on the last layer
    float* wcls

cdef struct RunState:
    # current wave of activations
    float* x  # activation at current time stamp (dim,)
    float* xb  # same, but inside a residual branch (dim,)
    float* xb2  # an additional buffer just for convenience (dim,)
    float* hb  # buffer for hidden dimension in the ffn (hidden_dim,)
    float* hb2  # buffer for hidden dimension in the ffn (hidden_dim,)
    float* q  # query (dim,)
    float* k  # key (dim,)
    float* v  # value (dim,)
    float* att  # buffer for scores/attention values (n_heads, seq_len)
    float* logits  # output logits
    # kv cache
    float* key_cache  # (layer, seq_len, dim)
    float* value_cache  # (layer, seq_len, dim)


# forward_batch's buffers (not in run.c: see forward_batch)
DEF MAX_BATCH = 128  # tokens that go through a layer together: a prompt of 128 reads the weights once
DEF MAX_LOGITS = 32  # rows of logits a pass keeps (a chat turn's prompt tokens, generate_batch's sequences)
DEF F32_BLOCK_ROWS = 16  # weight rows per unit of work across threads (a multiple of f32dot.h's tile)

cdef struct BatchEntry:
    RunState* s  # the sequence's run state: its KV cache, and its logits if wanted
    int token
    int pos
    bint want_logits

cdef struct BatchState:
    # forward()'s activations, one row per token of the batch
    float* x  # (MAX_BATCH, dim)
    float* xb  # (MAX_BATCH, xb_stride): dim values a row, each row padded to xb_stride
    float* xb2  # (MAX_BATCH, dim)
    float* hb  # (MAX_BATCH, hb_stride): hidden_dim values a row, padded to hb_stride
    float* hb2  # (MAX_BATCH, hb_stride)
    Py_ssize_t xb_stride  # f32_token_stride(dim): xb and hb go into products (f32dot.h says why)
    Py_ssize_t hb_stride  # f32_token_stride(hidden_dim)
    float* q  # (MAX_BATCH, dim)
    float* k  # (MAX_BATCH, kv_dim)
    float* v  # (MAX_BATCH, kv_dim)
    float* att  # (att_rows, seq_len): a row for each thread's (token, head) of the moment
    int att_rows  # the threads attention may run on
    float* rope  # (MAX_BATCH, head_size): each token's RoPE cos and sin, pair by pair
    float* logits  # (MAX_LOGITS, vocab_size)
    Team team  # how many threads its passes run on (team.pxi)

@cython.no_gc_clear  # __dealloc__ needs weights_owner: the GC must not clear it first
cdef class Transformer:
    """A llama2.c model file with fp32 weights (v0 legacy, v1, v3), memory-mapped, with its run
    state (KV cache)."""
    # run.c's config and weights; `config` and `weights` are their Python views (properties below)
    cdef Config c_config  # the hyperparameters of the architecture (the blueprint)
    cdef TransformerWeights c_weights  # the weights of the model
    cdef RunState state  # buffers for the "wave" of activations in the forward pass
    cdef BatchState batch  # the same for forward_batch (not in run.c)
    cdef readonly int version  # file format: 0 (legacy), 1, or 3 with fp32 weights
    cdef readonly bint shared_weights  # the classifier is the token embedding table
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
    # what is not in run.c's struct: a Transformer made by with_new_state() shares the weights of
    # the one that loaded them (weights_owner keeps it alive), and state_lock keeps two threads
    # or two generations from running on one run state at once (exclusive_state)
    cdef Transformer weights_owner
    cdef readonly object state_lock

    def __init__(self, checkpoint_path):
        build_transformer(self, checkpoint_path)

    def with_new_state(self):
        """A Transformer on the same mapped weights with a run state (KV cache) of its own: one
        per sequence, so that sequences never see each other's activations."""
        return new_state(self, True)

    def __dealloc__(self):
        free_run_state(&self.state)
        free_batch_state(&self.batch)

    @property
    def config(self):
        """The 7 ints of the header, as a dict (vocab_size always positive)."""
        cdef Config* p = &self.c_config
        return dict(dim=p.dim, hidden_dim=p.hidden_dim, n_layers=p.n_layers, n_heads=p.n_heads,
                    n_kv_heads=p.n_kv_heads, vocab_size=p.vocab_size, seq_len=p.seq_len)

    @property
    def weights(self):
        """Zero-copy float32 numpy views of the mapped weights, named as in run.c."""
        import numpy as np
        cdef Config* p = &self.c_config
        cdef TransformerWeights* w = &self.c_weights
        cdef Py_ssize_t head_size = p.dim // p.n_heads
        cdef Py_ssize_t kv_dim = p.n_kv_heads * head_size
        cdef Py_ssize_t L = p.n_layers, dim = p.dim, hidden = p.hidden_dim, vocab = p.vocab_size
        cdef const char* origin = <const char*>&self._data[0]
        tensors = [
            ("token_embedding_table", <const char*>w.token_embedding_table - origin, (vocab, dim)),
            ("rms_att_weight", <const char*>w.rms_att_weight - origin, (L, dim)),
            ("wq", <const char*>w.wq - origin, (L, dim, dim)),
            ("wk", <const char*>w.wk - origin, (L, kv_dim, dim)),
            ("wv", <const char*>w.wv - origin, (L, kv_dim, dim)),
            ("wo", <const char*>w.wo - origin, (L, dim, dim)),
            ("rms_ffn_weight", <const char*>w.rms_ffn_weight - origin, (L, dim)),
            ("w1", <const char*>w.w1 - origin, (L, hidden, dim)),
            ("w2", <const char*>w.w2 - origin, (L, dim, hidden)),
            ("w3", <const char*>w.w3 - origin, (L, hidden, dim)),
            ("rms_final_weight", <const char*>w.rms_final_weight - origin, (dim,)),
            ("wcls", <const char*>w.wcls - origin, (vocab, dim)),
        ]
        return {name: np.frombuffer(self._mmap, dtype=np.float32, count=int(np.prod(shape)),
                                    offset=offset).reshape(shape)
                for name, offset, shape in tensors}

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
    s.q = <float*>calloc(p.dim, sizeof(float))
    s.key_cache = <float*>calloc(<size_t>p.n_layers * p.seq_len * kv_dim, sizeof(float))
    s.value_cache = <float*>calloc(<size_t>p.n_layers * p.seq_len * kv_dim, sizeof(float))
    s.att = <float*>calloc(<size_t>p.n_heads * p.seq_len, sizeof(float))
    s.logits = <float*>calloc(p.vocab_size, sizeof(float))
    # ensure all mallocs went fine
    if (not s.x or not s.xb or not s.xb2 or not s.hb or not s.hb2 or not s.q
            or not s.key_cache or not s.value_cache or not s.att or not s.logits):
        free_run_state(s)
        raise MemoryError(f"malloc failed for the run state, whose KV cache alone is "
                          f"{2 * p.n_layers * p.seq_len * kv_dim * sizeof(float)} bytes")

cdef void free_run_state(RunState* s) noexcept:
    free(s.x)
    free(s.xb)
    free(s.xb2)
    free(s.hb)
    free(s.hb2)
    free(s.q)
    free(s.att)
    free(s.logits)
    free(s.key_cache)
    free(s.value_cache)
    memset(s, 0, sizeof(RunState))

cdef void memory_map_weights(TransformerWeights* w, Config* p, float* ptr, bint shared_weights) noexcept:
    cdef size_t head_size = p.dim // p.n_heads
    # make sure the multiplications below are done in 64bit to fit the parameter counts of 13B+ models
    cdef size_t n_layers = p.n_layers, dim = p.dim, hidden_dim = p.hidden_dim
    w.token_embedding_table = ptr
    ptr += <size_t>p.vocab_size * dim
    w.rms_att_weight = ptr
    ptr += n_layers * dim
    w.wq = ptr
    ptr += n_layers * dim * (p.n_heads * head_size)
    w.wk = ptr
    ptr += n_layers * dim * (p.n_kv_heads * head_size)
    w.wv = ptr
    ptr += n_layers * dim * (p.n_kv_heads * head_size)
    w.wo = ptr
    ptr += n_layers * (p.n_heads * head_size) * dim
    w.rms_ffn_weight = ptr
    ptr += n_layers * dim
    w.w1 = ptr
    ptr += n_layers * dim * hidden_dim
    w.w2 = ptr
    ptr += n_layers * hidden_dim * dim
    w.w3 = ptr
    ptr += n_layers * dim * hidden_dim
    w.rms_final_weight = ptr
    ptr += dim
    ptr += p.seq_len * head_size // 2  # skip what used to be freq_cis_real (for RoPE)
    ptr += p.seq_len * head_size // 2  # skip what used to be freq_cis_imag (for RoPE)
    w.wcls = w.token_embedding_table if shared_weights else ptr

cdef void memory_map_weights_v1(TransformerWeights* w, Config* p, float* ptr, bint shared_weights) noexcept:
    # run.c never read v1 files; they hold the norms first, then the embedding table and the
    # matrices, and no RoPE tables (export.py's write_v1)
    cdef size_t head_size = p.dim // p.n_heads
    cdef size_t n_layers = p.n_layers, dim = p.dim, hidden_dim = p.hidden_dim
    w.rms_att_weight = ptr
    ptr += n_layers * dim
    w.rms_ffn_weight = ptr
    ptr += n_layers * dim
    w.rms_final_weight = ptr
    ptr += dim
    w.token_embedding_table = ptr
    ptr += <size_t>p.vocab_size * dim
    w.wq = ptr
    ptr += n_layers * dim * (p.n_heads * head_size)
    w.wk = ptr
    ptr += n_layers * dim * (p.n_kv_heads * head_size)
    w.wv = ptr
    ptr += n_layers * dim * (p.n_kv_heads * head_size)
    w.wo = ptr
    ptr += n_layers * (p.n_heads * head_size) * dim
    w.w1 = ptr
    ptr += n_layers * dim * hidden_dim
    w.w2 = ptr
    ptr += n_layers * hidden_dim * dim
    w.w3 = ptr
    ptr += n_layers * dim * hidden_dim
    w.wcls = w.token_embedding_table if shared_weights else ptr


cdef read_checkpoint(Transformer t, checkpoint):
    # run.c freads the header and mmaps the file; here map_model checks every size against the
    # file first, and reads v1 files too (run.c reads v0 only)
    header, t._mmap = map_model(checkpoint, False, "run")
    t._data = t._mmap
    t.c_config = header.config
    t.version = header.version
    t.header = header
    t.norm_eps = header.norm_eps
    t._rope_table = rope_table(header, &t.rope_freqs)
    t.shared_weights = header.shared_classifier
    t.file_size = len(t._mmap)
    cdef float* weights_ptr = <float*>&t._data[<Py_ssize_t>header.size]
    if t.version == 0:
        memory_map_weights(&t.c_weights, &t.c_config, weights_ptr, t.shared_weights)
    else:
        memory_map_weights_v1(&t.c_weights, &t.c_config, weights_ptr, t.shared_weights)

cdef build_transformer(Transformer t, checkpoint_path):
    # read in the Config and the Weights from the checkpoint
    read_checkpoint(t, checkpoint_path)
    t.checkpoint_path = os.fsdecode(checkpoint_path)
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
    t._mmap = self._mmap
    t._data = self._data
    t.version = self.version
    t.shared_weights = self.shared_weights
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

cdef void matmul(float* xout, const float* x, const float* w, int n, int d) noexcept nogil:
    # W (d,n) @ x (n,) -> xout (d,)
    # by far the most amount of time is spent inside this little function
    cdef Py_ssize_t i, j
    cdef float val
    for i in prange(d, schedule="static"):
        val = 0.0
        for j in range(n):
            # not `val += ...`: inside prange Cython takes += as a reduction across the loop's
            # threads and then refuses the reset above; this form keeps val private to the row
            val = val + w[i * n + j] * x[j]
        xout[i] = val

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
    cdef Py_ssize_t l, loff
    cdef int i, h, t, v, rotn, head_dim
    cdef float freq, val, fcr, fci, v0, v1, score, a
    cdef float* vec
    cdef float* q
    cdef float* k
    cdef float* att
    cdef float* xb
    cdef float* v_ptr

    # copy the token embedding into x
    cdef float* content_row = w.token_embedding_table + <Py_ssize_t>token * dim
    memcpy(x, content_row, dim * sizeof(float))

    # forward all the layers
    for l in range(p.n_layers):

        # attention rmsnorm
        rmsnorm(s.xb, x, w.rms_att_weight + l * dim, dim, transformer.norm_eps)

        # key and value point to the kv cache
        loff = l * p.seq_len * kv_dim  # kv cache layer offset for convenience
        s.k = s.key_cache + loff + pos * kv_dim
        s.v = s.value_cache + loff + pos * kv_dim

        # qkv matmuls for this position
        matmul(s.q, s.xb, w.wq + l * dim * dim, dim, dim)
        matmul(s.k, s.xb, w.wk + l * dim * kv_dim, dim, kv_dim)
        matmul(s.v, s.xb, w.wv + l * dim * kv_dim, dim, kv_dim)

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
        matmul(s.xb2, s.xb, w.wo + l * dim * dim, dim, dim)

        # residual connection back into x
        for i in range(dim):
            x[i] += s.xb2[i]

        # ffn rmsnorm
        rmsnorm(s.xb, x, w.rms_ffn_weight + l * dim, dim, transformer.norm_eps)

        # Now for FFN in PyTorch we have: self.w2(F.silu(self.w1(x)) * self.w3(x))
        # first calculate self.w1(x) and self.w3(x)
        matmul(s.hb, s.xb, w.w1 + l * dim * hidden_dim, dim, hidden_dim)
        matmul(s.hb2, s.xb, w.w3 + l * dim * hidden_dim, dim, hidden_dim)

        # SwiGLU non-linearity
        for i in range(hidden_dim):
            val = s.hb[i]
            # silu(x)=x*σ(x), where σ(x) is the logistic sigmoid
            val *= (<float>1.0 / (<float>1.0 + expf(-val)))
            # elementwise multiply with w3(x)
            val *= s.hb2[i]
            s.hb[i] = val

        # final matmul to get the output of the ffn
        matmul(s.xb, s.hb, w.w2 + l * dim * hidden_dim, hidden_dim, dim)

        # residual connection
        for i in range(dim):
            x[i] += s.xb[i]

    # final rmsnorm
    rmsnorm(x, x, w.rms_final_weight, dim, transformer.norm_eps)

    # classifier into logits
    matmul(s.logits, x, w.wcls, p.dim, p.vocab_size)
    return s.logits

# ----------------------------------------------------------------------------
# batched forward: not in run.c, the one deliberate structural addition
# run.c feeds a prompt one token at a time, so every weight is read from memory once per token.
# forward_batch takes several tokens through each layer together (a prompt's tokens, or one token
# of each of several sequences), so that a weight row read from memory serves all of them while it
# is in cache: prompts go through at the compute speed instead of the memory speed. Decode runs
# through it too (forward_next, batch.pxi), so a token gets the same bits however it is batched.
# Every step other than the products is forward()'s code applied to one token; the products are
# f32dot.h's. Built with IEEE flags (make run) each is matmul()'s loop in its order, and the logits
# and KV caches are forward()'s bit for bit. Under -Ofast f32dot.h sums in a fixed order of its own
# and gcc compiles forward()'s other steps differently in the two functions (a division becomes a
# hoisted reciprocal in one and not the other), so the two agree to rounding only.

cdef void malloc_batch_state(BatchState* b, Config* p) except *:
    cdef size_t kv_dim = (<size_t>p.dim * p.n_kv_heads) // p.n_heads
    b.x = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.xb_stride = f32_token_stride(p.dim)
    b.hb_stride = f32_token_stride(p.hidden_dim)
    b.xb = <float*>calloc(MAX_BATCH * b.xb_stride, sizeof(float))
    b.xb2 = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.hb = <float*>calloc(MAX_BATCH * b.hb_stride, sizeof(float))
    b.hb2 = <float*>calloc(MAX_BATCH * b.hb_stride, sizeof(float))
    b.q = <float*>calloc(MAX_BATCH * p.dim, sizeof(float))
    b.k = <float*>calloc(MAX_BATCH * kv_dim, sizeof(float))
    b.v = <float*>calloc(MAX_BATCH * kv_dim, sizeof(float))
    b.rope = <float*>calloc(MAX_BATCH * (p.dim // p.n_heads), sizeof(float))
    b.att_rows = max(team_max_threads(), 1)
    b.att = <float*>calloc(<size_t>b.att_rows * p.seq_len, sizeof(float))
    b.logits = <float*>calloc(<size_t>MAX_LOGITS * p.vocab_size, sizeof(float))
    if (not b.x or not b.xb or not b.xb2 or not b.hb or not b.hb2 or not b.q or not b.k or not b.v
            or not b.att or not b.rope or not b.logits):
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
    memset(b, 0, sizeof(BatchState))

cdef void matmul_batch(float* xout, Py_ssize_t os, const float* x, Py_ssize_t xs, const float* w,
                       int n, int d, int B) noexcept nogil:
    # W (d,n) @ x (B,n) -> xout (B,d): matmul() for B vectors, each weight row read from memory
    # once for all of them (vector b of x at x + b * xs, of xout at xout + b * os). f32dot.h has
    # the products, and says in which order each is summed
    matmul_batch3(x, xs, n, B, xout, os, w, d, NULL, 0, NULL, 0, NULL, 0, NULL, 0)

cdef void matmul_batch3(const float* x, Py_ssize_t xs, int n, int B, float* out1, Py_ssize_t os1,
                        const float* w1, int d1, float* out2, Py_ssize_t os2, const float* w2, int d2,
                        float* out3, Py_ssize_t os3, const float* w3, int d3) noexcept nogil:
    # matmul_batch for up to three matrices that multiply the same x (q, k and v; w1 and w3) in one
    # parallel region: each region ends with the threads waiting for each other, which costs
    # little on an idle machine and a lot when another program holds one of the cores
    cdef Py_ssize_t blocks1 = (d1 + F32_BLOCK_ROWS - 1) // F32_BLOCK_ROWS
    cdef Py_ssize_t blocks2 = (d2 + F32_BLOCK_ROWS - 1) // F32_BLOCK_ROWS
    cdef Py_ssize_t blocks3 = (d3 + F32_BLOCK_ROWS - 1) // F32_BLOCK_ROWS
    cdef Py_ssize_t block, i
    for block in prange(blocks1 + blocks2 + blocks3, schedule="static"):
        if block < blocks1:
            i = block * F32_BLOCK_ROWS
            f32_matmul_rows(out1, os1, x, xs, w1, n, d1, B, i, min(d1, i + F32_BLOCK_ROWS))
        elif block < blocks1 + blocks2:
            i = (block - blocks1) * F32_BLOCK_ROWS
            f32_matmul_rows(out2, os2, x, xs, w2, n, d2, B, i, min(d2, i + F32_BLOCK_ROWS))
        else:
            i = (block - blocks1 - blocks2) * F32_BLOCK_ROWS
            f32_matmul_rows(out3, os3, x, xs, w3, n, d3, B, i, min(d3, i + F32_BLOCK_ROWS))

cdef void forward_batch(Transformer transformer, BatchState* bs, BatchEntry* batch, int B) noexcept nogil:
    # forward() for B entries at once (B <= MAX_BATCH): each entry's token at its position, on its
    # run state's KV cache. Entries of one sequence come in position order, so that the keys and
    # values a token attends to are in its cache by the time attention runs (causal). The logits
    # of the entries that want them (at most MAX_LOGITS) are left in bs.logits, one row each, in
    # entry order.
    cdef Config* p = &transformer.c_config
    cdef TransformerWeights* w = &transformer.c_weights
    cdef int dim = p.dim
    cdef Py_ssize_t kv_dim = (<Py_ssize_t>p.dim * p.n_kv_heads) // p.n_heads  # 64-bit: pos * kv_dim
    cdef int kv_mul = p.n_heads // p.n_kv_heads
    cdef int hidden_dim = p.hidden_dim
    cdef int head_size = dim // p.n_heads
    cdef Py_ssize_t xs = bs.xb_stride, hs = bs.hb_stride
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
        memcpy(bs.x + b * dim, w.token_embedding_table + <Py_ssize_t>batch[b].token * dim,
               dim * sizeof(float))

    # RoPE's cos and sin at each token's position, for every layer and head: forward()'s values
    # (the same cosf and sinf of the same val), computed once instead of in each layer and head
    for b in range(B):
        rope_row(bs.rope + b * head_size, transformer.rope_freqs, batch[b].pos, head_size)

    # forward all the layers
    for l in range(p.n_layers):

        # attention rmsnorm
        for b in range(B):
            rmsnorm(bs.xb + b * xs, bs.x + b * dim, w.rms_att_weight + l * dim, dim,
                    transformer.norm_eps)

        # qkv matmuls for these positions
        loff = l * p.seq_len * kv_dim  # kv cache layer offset for convenience
        matmul_batch3(bs.xb, xs, dim, B, bs.q, dim, w.wq + l * dim * dim, dim,
                      bs.k, kv_dim, w.wk + l * dim * kv_dim, kv_dim,
                      bs.v, kv_dim, w.wv + l * dim * kv_dim, kv_dim)

        # RoPE as in forward(), each token at its position; then key and value into its KV cache
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
            weighted_values(bs.xb + b * xs + h * head_size, att,
                            s.value_cache + loff + (h // kv_mul) * head_size, kv_dim, pos + 1, head_size)

        # final matmul to get the output of the attention, and the residual connection
        matmul_batch(bs.xb2, dim, bs.xb, xs, w.wo + l * dim * dim, dim, dim, B)
        for b in range(B):
            x = bs.x + b * dim
            for i in range(dim):
                x[i] += bs.xb2[b * dim + i]

        # ffn rmsnorm
        for b in range(B):
            rmsnorm(bs.xb + b * xs, bs.x + b * dim, w.rms_ffn_weight + l * dim, dim,
                    transformer.norm_eps)

        # w1(x) and w3(x), SwiGLU, w2
        matmul_batch3(bs.xb, xs, dim, B, bs.hb, hs, w.w1 + l * dim * hidden_dim, hidden_dim,
                      bs.hb2, hs, w.w3 + l * dim * hidden_dim, hidden_dim, NULL, 0, NULL, 0)
        swiglu_batch(bs.hb, bs.hb2, hs, hidden_dim, B, threads)
        matmul_batch(bs.xb, xs, bs.hb, hs, w.w2 + l * dim * hidden_dim, hidden_dim, dim, B)

        # residual connection
        for b in range(B):
            x = bs.x + b * dim
            for i in range(dim):
                x[i] += bs.xb[b * xs + i]

    # final rmsnorm and the classifier, for the entries that want logits (gathered in xb)
    n_out = 0
    for b in range(B):
        if batch[b].want_logits:
            x = bs.x + b * dim
            rmsnorm(x, x, w.rms_final_weight, dim, transformer.norm_eps)  # in place, as in forward()
            memcpy(bs.xb + n_out * xs, x, dim * sizeof(float))
            n_out += 1
    matmul_batch(bs.logits, p.vocab_size, bs.xb, xs, w.wcls, p.dim, p.vocab_size, n_out)

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
            # run.c mallocs whatever length the file says: check it against the bytes left first
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
    return 0x20 <= c <= 0x7e  # isprint() in the "C" locale run.c runs in

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
        # run.c adds str_lookup(" ") blindly, -1 (and a crash) when the vocabulary has no " "
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
            str_buffer[str_len] = c[0]  # run.c: str_buffer[str_len++] = *c
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
        # run.c rescans every pair for each merge:
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
        # out of the heap. Same tokens as run.c.
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
    # sprintf(str_buffer, "%s%s", vocab[a], vocab[b]) of run.c; byte-fallback ids past the
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
    # run.c's choice among pairs: the highest score, the leftmost of equal scores
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
    # run.c's test of one pair: the two pieces concatenated are a piece, whose score beats the
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

include "hf_tokenizer.pxi"  # a Hugging Face tokenizer in this one's place (not in run.c)

# ----------------------------------------------------------------------------
# The Sampler, which takes logits and returns a sampled token
# sampling can be done in a few ways: greedy argmax, sampling, top-p sampling

cdef struct ProbIndex:
    float prob
    int index  # struct used when sorting probabilities during top-p sampling

cdef class Sampler:
    """Greedy, multinomial or top-p sampling with run.c's xorshift RNG."""
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
        """The next token from logits (float32, vocab_size long; modified in place, as in run.c)."""
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
    # libc's qsort, as in run.c: it is not stable, and ties must break the same way
    qsort(probindex, n0, sizeof(ProbIndex), compare)
    if n0 == 0:
        # run.c goes on with last_idx = -1 and returns probindex[-1].index, read from before the
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
            # x / inf is 0 for any finite x: run.c built with -O3 samples uniformly. With -Ofast,
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
            # top-p (nucleus) sampling, clamping the least likely tokens to zero (run.c's
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
    """run.c's generate() as a generator: it yields each piece's bytes where run.c prints them
    (print_generation prints them for the command line; the API decodes them). It returns what
    print_generation reports: (tok/s of the tokens fed one at a time after the first, or None;
    the number of prompt tokens fed together, and their tok/s). The tokenizer is run.c's
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
        # not in run.c: a prompt that does not start with BOS (Hugging Face) prints its first token
        piece = first_piece(tokenizer, prompt_tokens)
        if piece:
            yield piece
        # not in run.c: the prompt tokens whose logits go unused (all but the last) go through
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
    # tokens apart); run.c divides by zero when all tokens come within one millisecond
    tok_per_s = None
    if pos - prefilled > 1:
        tok_per_s = (pos - prefilled - 1) / <double>max(time_in_ms() - start, 1) * 1000
    return tok_per_s, prefilled, prefilled / max(prefill_seconds, 1e-9)

include "generate_batch.pxi"

cdef float[::1] forward_logits(transformer, int token, int pos):
    # the fp32 Transformer decodes through forward_batch (forward_next: batch.pxi says why); other
    # engines (run_cuda) bring their own
    if isinstance(transformer, Transformer):
        return <float[:(<Transformer>transformer).c_config.vocab_size]>forward_next(transformer, token, pos)
    return transformer.forward(token, pos)

def read_stdin(guide):
    # read a line from stdin, after the guide; None at end of input (cli.read_line says how it
    # differs from run.c's fgets into a 512-byte buffer)
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
                    # run.c loops on its stale buffer at end of input until steps run out; the
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

            # forward the transformer to get logits for the next token. Not in run.c: a turn's
            # prompt tokens go through forward_batch together, MAX_LOGITS at a time, each one's
            # logits kept for its turn in the loop (the sampler draws for every one, as in run.c)
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

def main(argv=None, prog="run", transformer_factory=None):
    """`python -m run model.bin [options]`: run.c's main(). Returns the exit status.

    prog names the program in messages; transformer_factory(path) builds the model (default:
    Transformer); run_cuda passes its own.
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
