# Included by run.pyx and runq.pyx after their forward_batch (written once: it has no twin in the
# C, and is the same for both): two steps of forward_batch that both share, and the drivers that
# feed tokens through forward_batch, for the Transformer's forward and forward_prompt, generate
# and chat.

cdef void rope_and_cache_batch(BatchState* bs, BatchEntry* batch, int B, Py_ssize_t loff, int dim,
                               Py_ssize_t kv_dim, int head_size, int threads) noexcept nogil:
    # forward_batch's RoPE of each token at its position, then its key and value into its KV
    # cache (rope_and_cache, rope.pxi). A batch of THREADED_TOKENS or more (team.pxi) goes on all
    # threads: a prompt's writes are the cache's first, page faults that took 4% of a 110M prompt
    # on one thread. A decode step stays on this thread
    cdef int b
    if B >= THREADED_TOKENS:
        for b in prange(B, schedule="static", num_threads=threads):
            rope_and_cache(bs.q + b * dim, bs.k + b * kv_dim, bs.v + b * kv_dim, bs.rope + b * head_size,
                           batch[b].s.key_cache + loff + batch[b].pos * kv_dim,
                           batch[b].s.value_cache + loff + batch[b].pos * kv_dim, dim, kv_dim, head_size)
    else:
        for b in range(B):
            rope_and_cache(bs.q + b * dim, bs.k + b * kv_dim, bs.v + b * kv_dim, bs.rope + b * head_size,
                           batch[b].s.key_cache + loff + batch[b].pos * kv_dim,
                           batch[b].s.value_cache + loff + batch[b].pos * kv_dim, dim, kv_dim, head_size)

cdef void swiglu_batch(float* hb, const float* hb2, Py_ssize_t stride, int hidden_dim, int B,
                       int threads) noexcept nogil:
    # forward_batch's SwiGLU for B tokens (token b's at b * stride): on all threads for a batch of
    # THREADED_TOKENS or more, as rope_and_cache_batch
    cdef int b
    if B >= THREADED_TOKENS:
        for b in prange(B, schedule="static", num_threads=threads):
            swiglu(hb + b * stride, hb2 + b * stride, hidden_dim)
    else:
        for b in range(B):
            swiglu(hb + b * stride, hb2 + b * stride, hidden_dim)

# Every batch goes through this pointer, not a direct call. Called directly with a constant batch
# size (forward_next's 1), gcc compiles a copy of forward_batch for that size, and under -Ofast
# that copy may round differently (its loops vectorized another way): the same token would get
# other bits alone than in a batch. Through a pointer set at run time there is one forward_batch.
ctypedef void (*forward_batch_fn)(Transformer, BatchState*, BatchEntry*, int) noexcept nogil
cdef forward_batch_fn run_forward_batch = forward_batch

cdef void forward_pass(Transformer transformer, BatchState* bs, BatchEntry* batch, int B) noexcept nogil:
    # forward_batch on as many threads as the batch state's Team chooses (team.pxi)
    cdef double start = team_begin(&bs.team, B)
    run_forward_batch(transformer, bs, batch, B)
    team_end(&bs.team, B, start)

cdef float* forward_next(Transformer transformer, int token, int pos) noexcept nogil:
    # forward() through forward_batch: one token of the transformer's own sequence, whose logits
    # it returns (in the batch state, until the next call). The command line and the API decode
    # with it, so that a token's logits are the same bits whether it comes alone, in a prompt, or
    # beside other sequences' tokens (forward() is run.c's, the reference that tests hold it to)
    cdef BatchEntry entry
    entry.s = &transformer.state
    entry.token = token
    entry.pos = pos
    entry.want_logits = True
    forward_pass(transformer, &transformer.batch, &entry, 1)
    return transformer.batch.logits

cdef void forward_prompt(Transformer transformer, BatchState* bs, const int* tokens, int n, int pos,
                         bint all_logits) noexcept nogil:
    # tokens[0..n) at positions pos.. on the transformer's own run state, MAX_BATCH at a time,
    # through the batch state bs (the transformer's own, or generate_batch's for its sequences).
    # The last token's logits go to its state (s.logits), as n calls of forward() leave them; with
    # all_logits (n <= MAX_LOGITS), every token's logits stay in the batch state's rows instead
    cdef BatchEntry batch[MAX_BATCH]
    cdef int start = 0, B, b
    while start < n:
        B = min(MAX_BATCH, n - start)
        for b in range(B):
            batch[b].s = &transformer.state
            batch[b].token = tokens[start + b]
            batch[b].pos = pos + start + b
            batch[b].want_logits = all_logits or start + b == n - 1
        forward_pass(transformer, bs, batch, B)
        start += B
    if not all_logits:
        memcpy(transformer.state.logits, bs.logits,
               transformer.c_config.vocab_size * sizeof(float))

cdef int prefill(transformer, list tokens, int n, Transformer through=None) except -1:
    # tokens[0..n) at positions 0..n-1 through forward_batch: the KV cache that n forward() calls
    # leave, through the batch state of through (default: the transformer's own). Returns n, or
    # 0 for an engine without a batched forward (run_cuda)
    if n <= 0 or not isinstance(transformer, Transformer):
        return 0
    cdef int[::1] ids = array.array("i", tokens[:n])
    cdef Transformer t = transformer
    if through is None:
        through = t
    with nogil:
        forward_prompt(t, &through.batch, &ids[0], n, 0, False)
    return n

cdef int prompt_chunk(Transformer transformer, list tokens, int start, int n, int pos) except -1:
    # tokens[start..start+n) at positions pos.., at most MAX_LOGITS of them, through forward_batch,
    # their logits left in the batch state (batch_logits); returns how many went
    n = min(n, MAX_LOGITS)
    cdef int[::1] ids = array.array("i", tokens[start:start + n])
    with nogil:
        forward_prompt(transformer, &transformer.batch, &ids[0], n, pos, True)
    return n

cdef float[::1] batch_logits(Transformer transformer, int row):
    # the logits of the row-th token of the last prompt_chunk
    cdef int vocab_size = transformer.c_config.vocab_size
    return <float[:vocab_size]>(transformer.batch.logits + <Py_ssize_t>row * vocab_size)
