# cython: language_level=3
# Inference for Llama-2 Transformer model in pure Cython: a line-by-line translation of llama2.c's
# run.c. Sections, names and order follow run.c so the two read side by side; where run.c crashes
# or computes garbage on bad input, this file refuses with a clear message instead (comments say where).

from cython.parallel cimport prange
from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport cosf, expf, powf, sinf, sqrtf
from libc.stdint cimport uint32_t
from libc.stdio cimport FILE, fclose, fflush, fopen, fread, fseek, ftell, fwrite, stdout, SEEK_END, SEEK_SET
from libc.stdlib cimport bsearch, calloc, free, malloc, qsort
from libc.string cimport memcpy, memset, strcmp, strlen
from libc.time cimport time

import builtins
import math
import mmap
import os
import re
import sys
import time as _pytime


class LlamaError(Exception):
    """A bad model file, tokenizer file or argument: the message is one line for the user."""


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

# v1 files (export.py's version1_export) start with this magic and a 256-byte header
DEF V1_MAGIC = 0x616b3432
DEF V1_HEADER_SIZE = 256
DEF V0_HEADER_SIZE = 28  # 7 ints


cdef class Transformer:
    """A llama2.c model file (v0 legacy or v1), memory-mapped, with its run state (KV cache)."""
    # run.c's config and weights; `config` and `weights` are their Python views (properties below)
    cdef Config c_config  # the hyperparameters of the architecture (the blueprint)
    cdef TransformerWeights c_weights  # the weights of the model
    cdef RunState state  # buffers for the "wave" of activations in the forward pass
    cdef readonly int version  # file format: 0 (legacy) or 1
    cdef readonly bint shared_weights  # the classifier is the token embedding table
    cdef readonly Py_ssize_t file_size  # size of the checkpoint file in bytes
    cdef object _mmap  # the memory map keeps the weights' pages alive
    cdef const unsigned char[::1] _data  # the mapped bytes, for their address
    cdef readonly str checkpoint_path

    def __init__(self, checkpoint_path):
        build_transformer(self, checkpoint_path)

    def __dealloc__(self):
        free_run_state(&self.state)

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

    def forward(self, int token, int pos):
        """Logits (a float32 numpy array, a copy) for `token` at position `pos`."""
        import numpy as np
        if not 0 <= token < self.c_config.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.c_config.vocab_size})")
        if not 0 <= pos < self.c_config.seq_len:
            raise ValueError(f"pos {pos} is outside the context [0, {self.c_config.seq_len})")
        cdef float* logits
        with nogil:
            logits = forward(self, token, pos)
        return np.array(<float[:self.c_config.vocab_size]>logits, dtype=np.float32)


CONFIG_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


cdef void malloc_run_state(RunState* s, Config* p) except *:
    # we calloc instead of malloc to keep valgrind happy
    cdef size_t kv_dim = (p.dim * p.n_kv_heads) // p.n_heads
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
        raise MemoryError("malloc failed for the run state (KV cache)")

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
    # run.c never read v1 files; export.py's version1_export writes the norms first, then the
    # embedding table and the matrices, and no RoPE tables.
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


def weights_nbytes(config, int version, bint shared_weights):
    """Bytes of weights that a file of this config holds after its header (Python ints: no overflow)."""
    c = config
    head_size = c["dim"] // c["n_heads"]
    kv_dim = c["n_kv_heads"] * head_size
    n = (c["vocab_size"] * c["dim"]  # token embedding table
         + c["n_layers"] * (2 * c["dim"]  # rms_att, rms_ffn
                            + 2 * c["dim"] * c["dim"] + 2 * c["dim"] * kv_dim  # wq, wo, wk, wv
                            + 3 * c["dim"] * c["hidden_dim"])  # w1, w2, w3
         + c["dim"])  # rms_final
    if version == 0:
        n += 2 * c["seq_len"] * (head_size // 2)  # the legacy freq_cis tables
    if not shared_weights:
        n += c["vocab_size"] * c["dim"]
    return 4 * n


MAX_SEQ_LEN = 1 << 20  # the longest context a header may ask for


def check_config(config, path):
    """Refuses a header whose numbers cannot describe a model; names the field."""
    for name in CONFIG_FIELDS:
        if config[name] <= 0:
            raise LlamaError(f"{path}: bad header: {name} = {config[name]} (must be > 0)")
    if config["dim"] % config["n_heads"]:
        raise LlamaError(f"{path}: bad header: n_heads = {config['n_heads']} does not divide "
                         f"dim = {config['dim']}")
    if config["n_heads"] % config["n_kv_heads"]:
        raise LlamaError(f"{path}: bad header: n_kv_heads = {config['n_kv_heads']} does not divide "
                         f"n_heads = {config['n_heads']}")
    if (config["dim"] // config["n_heads"]) % 2:
        raise LlamaError(f"{path}: bad header: head size {config['dim'] // config['n_heads']} is odd "
                         f"(RoPE rotates pairs)")
    # v1/v2 files hold no table of seq_len rows: the file size does not bound it, so a sane
    # limit does (Llama 2 and 3 use 4096 and 8192)
    if config["seq_len"] > MAX_SEQ_LEN:
        raise LlamaError(f"{path}: bad header: seq_len = {config['seq_len']} is over the limit "
                         f"of {MAX_SEQ_LEN}")
    head_size = config["dim"] // config["n_heads"]
    kv_cache = 2 * 4 * config["n_layers"] * config["seq_len"] * config["n_kv_heads"] * head_size
    if kv_cache > physical_memory():
        raise LlamaError(f"{path}: bad header: seq_len = {config['seq_len']} needs a "
                         f"{kv_cache / 2**30:.1f} GiB KV cache, more than this machine's memory")


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


cdef read_checkpoint(Transformer t, checkpoint):
    # run.c freads the header and mmaps the file; here every size is checked against the file
    # before a pointer is made, and v1 files (magic + version 1) are read too.
    path = os.fsdecode(checkpoint)
    try:
        f = open(checkpoint, "rb")
    except OSError as e:
        raise LlamaError(f"Couldn't open file {path}: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(V1_HEADER_SIZE)
        if file_size < V0_HEADER_SIZE:
            raise LlamaError(f"{path}: file is {file_size} bytes, too small for a model header")
        magic = int.from_bytes(head[:4], sys.byteorder)
        if magic == V1_MAGIC:
            if len(head) < V1_HEADER_SIZE:
                raise LlamaError(f"{path}: file is {file_size} bytes, too small for a v1 header")
            version = int.from_bytes(head[4:8], sys.byteorder, signed=True)
            if version == 2:
                raise LlamaError(f"{path}: is a version 2 (int8 Q8_0) file: run it with runq")
            if version != 1:
                raise LlamaError(f"{path}: unsupported file version {version} (run reads v0 and v1)")
            ints = [int.from_bytes(head[8 + 4 * i:12 + 4 * i], sys.byteorder, signed=True) for i in range(7)]
            shared_weights = head[36] != 0
            header_size = V1_HEADER_SIZE
        else:
            version = 0
            ints = [int.from_bytes(head[4 * i:4 * i + 4], sys.byteorder, signed=True) for i in range(7)]
            # negative vocab size is hacky way of signaling unshared weights. bit yikes.
            shared_weights = ints[5] > 0
            ints[5] = abs(ints[5])
            header_size = V0_HEADER_SIZE
        config = dict(zip(CONFIG_FIELDS, ints))
        check_config(config, path)
        expected = header_size + weights_nbytes(config, version, shared_weights)
        if file_size != expected:
            raise LlamaError(f"{path}: file is {file_size} bytes but its v{version} header "
                             f"({', '.join(f'{k}={v}' for k, v in config.items())}) needs {expected}")
        t._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    t._data = t._mmap
    t.c_config = Config(dim=ints[0], hidden_dim=ints[1], n_layers=ints[2], n_heads=ints[3],
                        n_kv_heads=ints[4], vocab_size=ints[5], seq_len=ints[6])
    t.version = version
    t.shared_weights = shared_weights
    t.file_size = file_size
    cdef float* weights_ptr = <float*>&t._data[<Py_ssize_t>header_size]
    if version == 0:
        memory_map_weights(&t.c_weights, &t.c_config, weights_ptr, shared_weights)
    else:
        memory_map_weights_v1(&t.c_weights, &t.c_config, weights_ptr, shared_weights)

cdef build_transformer(Transformer t, checkpoint_path):
    # read in the Config and the Weights from the checkpoint
    read_checkpoint(t, checkpoint_path)
    t.checkpoint_path = os.fsdecode(checkpoint_path)
    # allocate the RunState buffers
    malloc_run_state(&t.state, &t.c_config)

# ----------------------------------------------------------------------------
# neural net blocks; the dynamics of the Transformer

cdef void rmsnorm(float* o, const float* x, const float* weight, int size) noexcept nogil:
    # calculate sum of squares
    cdef float ss = 0.0
    cdef int j
    for j in range(size):
        ss += x[j] * x[j]
    ss /= size
    ss += <float>1e-5
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
            val = val + w[i * n + j] * x[j]
        xout[i] = val

cdef float* forward(Transformer transformer, int token, int pos) noexcept nogil:
    # a few convenience variables
    cdef Config* p = &transformer.c_config
    cdef TransformerWeights* w = &transformer.c_weights
    cdef RunState* s = &transformer.state
    cdef float* x = s.x
    cdef int dim = p.dim
    cdef int kv_dim = (p.dim * p.n_kv_heads) // p.n_heads
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
        rmsnorm(s.xb, x, w.rms_att_weight + l * dim, dim)

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
            freq = <float>1.0 / powf(<float>10000.0, head_dim / <float>head_size)
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
                    score = score + q[i] * k[i]
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
        rmsnorm(s.xb, x, w.rms_ffn_weight + l * dim, dim)

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
    rmsnorm(x, x, w.rms_final_weight, dim)

    # classifier into logits
    matmul(s.logits, x, w.wcls, p.dim, p.vocab_size)
    return s.logits

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
    if not file or os.path.isdir(tokenizer_path):
        if file:
            fclose(file)
        raise LlamaError(f"couldn't load {path}")
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

cdef int parse_byte_piece(const char* piece, unsigned char* byte_val) noexcept nogil:
    # what sscanf(piece, "<0x%02hhX>", &byte_val) == 1 accepts in run.c: "<0x", then a hex number
    # of at most two characters (after optional white space; a sign counts in the width)
    if piece[0] != c'<' or piece[1] != c'0' or piece[2] != c'x':
        return 0
    cdef const char* c = piece + 3
    while c[0] == c' ' or (c'\t' <= c[0] <= c'\r'):
        c += 1
    cdef int width = 2, negative = 0, digits = 0, value = 0, d
    if c[0] == c'+' or c[0] == c'-':
        negative = c[0] == c'-'
        c += 1
        width -= 1
    while width > 0:
        if c'0' <= c[0] <= c'9':
            d = c[0] - c'0'
        elif c'a' <= c[0] <= c'f':
            d = c[0] - c'a' + 10
        elif c'A' <= c[0] <= c'F':
            d = c[0] - c'A' + 10
        else:
            break
        value = value * 16 + d
        digits += 1
        width -= 1
        c += 1
    if digits == 0:
        return 0
    byte_val[0] = <unsigned char>(-value if negative else value)
    return 1

cdef const char* decode(Tokenizer t, int prev_token, int token) noexcept:
    cdef const char* piece = t.vocab[token]
    # following BOS (1) token, sentencepiece decoder strips any leading whitespace (see PR #89)
    if prev_token == 1 and piece[0] == c' ':
        piece += 1
    # careful, some tokens designate raw bytes, and look like e.g. '<0x01>'
    # parse this and convert and return the actual byte
    cdef unsigned char byte_val
    if parse_byte_piece(piece, &byte_val) == 1:
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

cdef void write_stdout(const char* data, size_t n) except *:
    # printf + fflush of run.c; a closed pipe (`| head`) surfaces as BrokenPipeError, not as
    # output silently lost
    if n and fwrite(data, 1, n, stdout) != n:
        raise BrokenPipeError()

cdef void flush_stdout() except *:
    if fflush(stdout) != 0:
        raise BrokenPipeError()

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
            str_buffer[str_len] = c[0]  # ++ is post-increment, incremented after this line
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
        # greedy argmax sampling: take the token with the highest probability
        next = sample_argmax(logits, sampler.vocab_size)
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
            # top-p (nucleus) sampling, clamping the least likely tokens to zero
            next = sample_topp(logits, sampler.vocab_size, sampler.topp, sampler.probindex, coin)
    return next

# ----------------------------------------------------------------------------
# utilities: time

def time_in_ms():
    # return time in milliseconds, for benchmarking the model speed
    return _pytime.time_ns() // 1000000

# ----------------------------------------------------------------------------
# generation loop

cdef class Generation:
    """run.c's generate() loop as an iterator: each step yields the bytes that step prints."""
    cdef object transformer  # anything with .config and .forward(token, pos) -> float32 logits
    cdef Tokenizer tokenizer
    cdef Sampler sampler
    cdef list prompt_tokens
    cdef int num_prompt_tokens
    cdef readonly int steps
    cdef readonly int pos  # forward passes done so far
    cdef int token  # the token fed at pos
    cdef readonly long long start  # time of the first token, for the tok/s report

    def __init__(self, transformer, Tokenizer tokenizer, Sampler sampler, prompt, int steps):
        if prompt is None:
            prompt = b""
        elif isinstance(prompt, str):
            prompt = prompt.encode("utf-8", "surrogateescape")
        # encode the (string) prompt into tokens sequence
        self.prompt_tokens = encode(tokenizer, prompt, 1, 0)
        self.num_prompt_tokens = len(self.prompt_tokens)
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.steps = steps
        self.token = self.prompt_tokens[0]  # kick off with the first token in the prompt
        self.pos = 0  # position in the sequence
        self.start = 0  # used to time our code, only initialized after first iteration

    def __iter__(self):
        return self

    def __next__(self):
        cdef int next
        cdef float[::1] logits
        if self.pos >= self.steps:
            raise StopIteration
        # forward the transformer to get logits for the next token
        logits = forward_logits(self.transformer, self.token, self.pos)

        # advance the state machine
        if self.pos < self.num_prompt_tokens - 1:
            # if we are still processing the input prompt, force the next prompt token
            next = self.prompt_tokens[self.pos + 1]
        else:
            # otherwise sample the next token from the logits
            next = sample(self.sampler, &logits[0])
        self.pos += 1

        # data-dependent terminating condition: the BOS (=1) token delimits sequences
        if next == 1:
            self.steps = self.pos
            raise StopIteration

        # print the token as string, decode it with the Tokenizer object
        piece = decode(self.tokenizer, self.token, next)
        self.token = next

        # init the timer here because the first iteration can be slower
        if self.start == 0:
            self.start = time_in_ms()
        return <bytes>piece if printable_piece(piece) else b""

cdef float[::1] forward_logits(transformer, int token, int pos):
    # the fp32 Transformer runs forward() in place; other engines (run_cuda) bring their own
    if isinstance(transformer, Transformer):
        return <float[:(<Transformer>transformer).c_config.vocab_size]>forward(transformer, token, pos)
    return transformer.forward(token, pos)

def generate(transformer, Tokenizer tokenizer, Sampler sampler, prompt, int steps):
    """run.c's generate(): prints the continuation of prompt, reports tok/s on stderr."""
    gen = Generation(transformer, tokenizer, sampler, prompt, steps)
    for piece in gen:
        safe_printf(piece)
        flush_stdout()
        # forward() runs in C without the eval loop: look for Ctrl-C once a token, or it would
        # only be seen after the last one
        PyErr_CheckSignals()
    write_stdout(b"\n", 1)
    flush_stdout()

    # report achieved tok/s (pos-1 because the timer starts after first iteration)
    if gen.pos > 1:
        end = time_in_ms()
        # run.c divides by zero when all tokens come within one millisecond
        elapsed = max(end - gen.start, 1)
        sys.stderr.write("achieved tok/s: %f\n" % ((gen.pos - 1) / elapsed * 1000))

def read_stdin(guide):
    # read a line from stdin; None at end of input. run.c reads into a fixed 512-byte buffer with
    # fgets, splitting longer lines; here a line is a line, whatever its length
    write_stdout(guide, len(guide))
    flush_stdout()
    # a Ctrl-C that came while the guide was written is seen now, not after the next line
    PyErr_CheckSignals()
    line = sys.stdin.buffer.readline()
    # a Ctrl-C whose delivery raced with the end of input (the read returned instead of being
    # interrupted) is pending here: raise it now, inside main's handler, not after main returned
    PyErr_CheckSignals()
    if not line:
        return None
    if line.endswith(b"\n"):
        line = line[:len(line) - 1]  # strip newline
    return line.split(b"\0", 1)[0]  # a C string ends at the first NUL

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

    # start the main loop
    cdef bint user_turn = 1  # user starts
    cdef int next = 0  # will store the next token in the sequence
    cdef int token  # stores the current token to feed into the transformer
    cdef int pos = 0  # position in the sequence
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
        if user_idx < num_prompt_tokens:
            # if we are still processing the input prompt, force the next prompt token
            token = prompt_tokens[user_idx]
            user_idx += 1
        else:
            # otherwise use the next token sampled from previous turn
            token = next
        # EOS (=2) token ends the Assistant turn
        if token == 2:
            user_turn = 1

        # forward the transformer to get logits for the next token
        logits = forward_logits(transformer, token, pos)
        next = sample(sampler, &logits[0])
        pos += 1

        if user_idx >= num_prompt_tokens and next != 2:
            # the Assistant is responding, so print its output
            safe_printf(decode(tokenizer, token, next))
            flush_stdout()
        if next == 2:
            write_stdout(b"\n", 1)
        PyErr_CheckSignals()  # Ctrl-C stops at once (see generate)
    write_stdout(b"\n", 1)
    flush_stdout()

# ----------------------------------------------------------------------------
# CLI, include only if not testing

USAGE = """\
Usage:   python -m run <checkpoint> [options]
Example: python -m run model.bin -n 256 -i "Once upon a time"
Options:
  -t <float>  temperature in [0,inf], default 1.0
  -p <float>  p value in top-p (nucleus) sampling in [0,1] default 0.9
  -s <int>    random seed, default time(NULL)
  -n <int>    number of steps to run for, default 256. 0 = max_seq_len
  -i <string> input prompt
  -z <string> optional path to custom tokenizer
  -m <string> mode: generate|chat, default: generate
  -y <string> system prompt in chat mode, default: none
"""

class UsageError(Exception):
    """Bad command line: main prints the message (if any) and the usage text."""

def error_usage(message=None):
    raise UsageError(message)

_INT = re.compile(r"\s*[+-]?\d+\s*\Z")

def parse_float(flag, text):
    # run.c's atof turns "abc" into 0.0 silently; a value that is not a number is refused
    try:
        # CPython's float(), not Cython's inlined parser: under -ffast-math that one turns "nan"
        # into -1.0
        value = builtins.float(text)
    except ValueError:
        value = None
    if value is None or math.isnan(value):
        error_usage(f"{flag} expects a number, got {text!r}")
    return value

def parse_int(flag, text):
    # run.c's atoi: decimal int, refused (instead of silently 0) when it is not one
    if not _INT.match(text) or not -2**31 <= int(text) < 2**31:
        error_usage(f"{flag} expects an integer, got {text!r}")
    return int(text)

def parse_args(argv):
    """run.c's main() argument handling; returns the settings as a dict."""
    # default parameters
    args = dict(checkpoint_path=None, tokenizer_path="tokenizer.bin", temperature=1.0, topp=0.9,
                steps=256, prompt=None, rng_seed=0, mode="generate", system_prompt=None)
    # poor man's C argparse so we can override the defaults above from the command line
    if len(argv) >= 2:
        args["checkpoint_path"] = argv[1]
    else:
        error_usage()
    for i in range(2, len(argv), 2):
        # do some basic validation
        if i + 1 >= len(argv):
            error_usage(f"{argv[i]} needs a value")  # must have arg after flag
        if argv[i][:1] != "-":
            error_usage(f"expected a flag, got {argv[i]!r}")  # must start with dash
        if len(argv[i]) != 2:
            error_usage(f"unknown flag {argv[i]!r}")  # must be -x (one dash, one letter)
        flag, value = argv[i], argv[i + 1]
        # read in the args
        if flag == "-t":
            args["temperature"] = parse_float(flag, value)
        elif flag == "-p":
            args["topp"] = parse_float(flag, value)
        elif flag == "-s":
            # atoi's int lands in an unsigned long long, so -1 is 2^64-1 as in run.c
            args["rng_seed"] = parse_int(flag, value) & 0xFFFFFFFFFFFFFFFF
        elif flag == "-n":
            args["steps"] = parse_int(flag, value)
        elif flag == "-i":
            args["prompt"] = os.fsencode(value)  # the bytes the user typed
        elif flag == "-z":
            args["tokenizer_path"] = value
        elif flag == "-m":
            args["mode"] = value
        elif flag == "-y":
            args["system_prompt"] = os.fsencode(value)
        else:
            error_usage(f"unknown flag {flag!r}")

    # parameter validation/overrides
    if args["rng_seed"] <= 0:
        args["rng_seed"] = <unsigned int>time(NULL)
    if args["temperature"] < 0.0:
        args["temperature"] = 0.0
    if args["topp"] < 0.0 or 1.0 < args["topp"]:
        args["topp"] = 0.9
    if args["steps"] < 0:
        args["steps"] = 0
    if args["mode"] not in ("generate", "chat"):
        error_usage(f"unknown mode: {args['mode']}")
    return args

def main(argv=None, transformer_factory=None):
    """`python -m run model.bin [options]`: run.c's main(). Returns the exit status.

    transformer_factory(path) builds the model (default: Transformer); run_cuda passes its own.
    """
    if argv is None:
        argv = sys.argv
    prog = "run"
    try:
        args = parse_args(argv)

        # build the Transformer via the model .bin file
        transformer = (transformer_factory or Transformer)(args["checkpoint_path"])
        config = transformer.config
        steps = args["steps"]
        if steps == 0 or steps > config["seq_len"]:
            steps = config["seq_len"]  # override to ~max length

        # build the Tokenizer via the tokenizer .bin file
        tokenizer = Tokenizer(args["tokenizer_path"], config["vocab_size"])

        # build the Sampler
        sampler = Sampler(config["vocab_size"], args["temperature"], args["topp"], args["rng_seed"])

        # run!
        if args["mode"] == "generate":
            generate(transformer, tokenizer, sampler, args["prompt"], steps)
        else:
            chat(transformer, tokenizer, sampler, args["prompt"], args["system_prompt"], steps)
    except UsageError as e:
        if e.args and e.args[0]:
            sys.stderr.write(f"{prog}: {e.args[0]}\n")
        sys.stderr.write(USAGE)
        return 1
    except (LlamaError, ValueError) as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return 1
    except MemoryError as e:
        sys.stderr.write(f"{prog}: out of memory{': ' + str(e) if str(e) else ''}\n")
        return 1
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as a C program killed by SIGPIPE would;
        # stdout now goes to devnull so that no flush at exit (libc's or Python's) complains
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, the status of `./run | head` in C
    except KeyboardInterrupt:
        fflush(stdout)
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    return 0

# ----------------------------------------------------------------------------
# Python API: a model and its tokenizer, for Python code that wants no subprocess

class Model:
    """A model file and its tokenizer, loaded once.

    >>> m = Model("model.bin", "tokenizer.bin")
    >>> logits = m.forward(1, 0)  # numpy float32 array of vocab_size
    >>> ids = m.encode("Once upon a time")
    >>> for text in m.generate("Once upon a time", steps=64, temperature=0.0): print(text, end="")
    """

    def __init__(self, checkpoint_path, tokenizer_path="tokenizer.bin"):
        self.transformer = Transformer(checkpoint_path)
        self.config = self.transformer.config
        self.tokenizer = Tokenizer(tokenizer_path, self.config["vocab_size"])

    def forward(self, token, pos):
        """Logits for token at position pos (the KV cache holds positions < pos)."""
        return self.transformer.forward(token, pos)

    def encode(self, text, bos=True, eos=False):
        """Token ids of text, as run.c's encode()."""
        return self.tokenizer.encode(text, bos, eos)

    def decode(self, tokens):
        """The text that printing tokens one after the other gives (invalid UTF-8 replaced);
        as in run.c, a piece right after BOS (1) loses its leading space."""
        pieces = []
        for prev, token in zip([-1] + list(tokens), tokens):
            piece = self.tokenizer.decode(prev, token)
            pieces.append(piece if printable_piece(piece) else b"")
        return b"".join(pieces).decode("utf-8", "replace")

    def generate(self, prompt=None, steps=256, temperature=1.0, topp=0.9, seed=None):
        """Yields the generated text piece by piece, exactly what `python -m run` prints.

        steps, temperature, topp and seed mean what -n, -t, -p and -s mean on the command line.
        """
        import codecs
        if isinstance(prompt, str):
            prompt = prompt.encode("utf-8", "surrogateescape")
        seq_len = self.config["seq_len"]
        steps = seq_len if steps <= 0 or steps > seq_len else steps
        seed = <unsigned int>time(NULL) if not seed else seed & 0xFFFFFFFFFFFFFFFF
        topp = 0.9 if topp < 0.0 or topp > 1.0 else topp
        sampler = Sampler(self.config["vocab_size"], max(temperature, 0.0), topp, seed)
        # a UTF-8 character can be split over byte tokens: yield whole characters only
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in Generation(self.transformer, self.tokenizer, sampler, prompt, steps):
            text = utf8.decode(piece)
            if text:
                yield text
        text = utf8.decode(b"", final=True)
        if text:
            yield text
