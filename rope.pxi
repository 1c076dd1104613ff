# Included by run.pyx and runq.pyx (no twin in the C): where a model's RoPE frequencies come from.
# run.c computes each one from the base 10000; a v3 file's model (another base, or a scaling)
# brings a table that llama2_cython.formats.rope_frequencies computes once at load, as
# transformers computes it. run_cuda takes the same table.

cdef inline float rope_frequency(const float* table, int head_dim, int head_size) noexcept nogil:
    # the frequency of the pair at head_dim (even) in a head of head_size
    if table == NULL:
        return <float>1.0 / powf(<float>10000.0, head_dim / <float>head_size)  # run.c's
    return table[head_dim // 2]


cdef void rope_row(float* row, const float* table, int pos, int head_size) noexcept nogil:
    # forward()'s cos and sin of each pair of a head at pos, into row[head_dim], row[head_dim + 1]
    cdef int head_dim
    cdef float val
    for head_dim in range(0, head_size, 2):
        val = pos * rope_frequency(table, head_dim, head_size)
        row[head_dim] = cosf(val)
        row[head_dim + 1] = sinf(val)


cdef void rope_rotate(float* vec, const float* row, int n, int head_size) noexcept nogil:
    # forward()'s RoPE rotation of vec[0..n) (whole heads) by rope_row's cos and sin: the same
    # products per pair as forward()'s loop, written head by head without its modulo and branch,
    # so that gcc vectorizes it (in that loop's form, 1.5 ms of a 110M prompt's 135; this, 0.3)
    cdef int h, j
    cdef float v0, v1
    cdef float* head
    for h in range(n // head_size):
        head = vec + h * head_size
        for j in range(0, head_size, 2):
            v0 = head[j]
            v1 = head[j + 1]
            head[j] = v0 * row[j] - v1 * row[j + 1]
            head[j + 1] = v0 * row[j + 1] + v1 * row[j]


cdef inline void rope_and_cache(float* q, float* k, const float* v, const float* row, float* key_slot,
                                float* value_slot, int dim, Py_ssize_t kv_dim, int head_size) noexcept nogil:
    # forward_batch's RoPE of one token (row: rope_row's at its position), then its key and value
    # into their slots in its KV cache, as forward() does
    rope_rotate(q, row, dim, head_size)
    rope_rotate(k, row, kv_dim, head_size)
    memcpy(key_slot, k, kv_dim * sizeof(float))
    memcpy(value_slot, v, kv_dim * sizeof(float))


cdef object rope_table(header, const float** table):
    # the header's frequency table as an array that must stay alive while *table points into it;
    # None (and *table NULL) for run.c's RoPE
    values = rope_frequencies(header)
    if values is None:
        table[0] = NULL
        return None
    cdef float[::1] view = array.array("f", values)
    table[0] = &view[0]
    return view
