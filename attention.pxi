# Included by run.pyx and runq.pyx (no twin in the C): forward_batch's attention arithmetic. The
# scores are f32dot.h's products (forward()'s loop in the IEEE build; under -Ofast its fixed order,
# 16 keys at a time on AVX-512, where gcc had vectorized each key's sum with its own reduction);
# the weighted sum of a head's values is forward()'s loop with its running sums kept in registers.

cdef extern from "f32dot.h" nogil:
    void f32_scores(float* att, const float* q, const float* k, size_t stride, int n, int m)

cdef extern from *:
    """
    #include <string.h>
    #if defined(__AVX512F__)
    #include <immintrin.h>
    #endif
    /* xb[i] = the sum over t < n of att[t] * v[t * kv_dim + i] for i < head_size, each element's
     * terms added in t order from 0 as forward()'s loop adds them (xb[i] = xb[i] + a * v[i] for
     * t = 0, 1, ...), which gcc compiles to one fused multiply-add per term where the CPU has FMA.
     * That loop reads and writes xb for every t: in a prompt the stores waited on each other and
     * took a third of the attention. On AVX-512 the sums of 16 elements stay in a register, each
     * term the same fused multiply-add, 64 elements (4 registers) a pass over t: with one
     * register a pass, each multiply-add waited for the one before (84% of the time outside
     * the scores, in an int8 prompt). Elsewhere it is forward()'s loop. (Written in Cython with
     * a local array, gcc -Ofast reassociated the sums over t: other bits.) */
    #if defined(__AVX512F__)
    static inline __mmask16 attention_lanes(int left) {  /* the first `left` of 16 lanes */
        return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    }
    #endif
    static void weighted_values(float* xb, const float* att, const float* v, Py_ssize_t kv_dim,
                                int n, int head_size) {
    #if defined(__AVX512F__)
        for (int i0 = 0; i0 < head_size; i0 += 64) {
            __mmask16 m0 = attention_lanes(head_size - i0), m1 = attention_lanes(head_size - i0 - 16),
                      m2 = attention_lanes(head_size - i0 - 32), m3 = attention_lanes(head_size - i0 - 48);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int t = 0; t < n; t++) {
                const float* row = v + t * kv_dim + i0;
                __m512 weight = _mm512_set1_ps(att[t]);
                a0 = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(m0, row), a0);
                a1 = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(m1, row + 16), a1);
                a2 = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(m2, row + 32), a2);
                a3 = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(m3, row + 48), a3);
            }
            _mm512_mask_storeu_ps(xb + i0, m0, a0);
            _mm512_mask_storeu_ps(xb + i0 + 16, m1, a1);
            _mm512_mask_storeu_ps(xb + i0 + 32, m2, a2);
            _mm512_mask_storeu_ps(xb + i0 + 48, m3, a3);
        }
    #else
        memset(xb, 0, head_size * sizeof(float));
        for (int t = 0; t < n; t++) {
            const float* row = v + t * kv_dim;
            float a = att[t];
            for (int i = 0; i < head_size; i++)
                xb[i] = xb[i] + a * row[i];
        }
    #endif
    }
    """
    void weighted_values(float* xb, const float* att, const float* v, Py_ssize_t kv_dim, int n,
                         int head_size) noexcept nogil
