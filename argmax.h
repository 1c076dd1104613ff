/* argmax.h: sample_argmax_fast, greedy sampling's index for run.pyx's and runq.pyx's sample()
 * (sampling.pxi says why it exists): run.c's sample_argmax, the first of the largest values,
 * found 16 values at a time. Every build returns run.c's index; tests/argmax_check.c holds each
 * path below to run.c's loop (tests/test_sampling.py compiles it for every path this CPU runs). */
#ifndef LLAMA2_ARGMAX_H
#define LLAMA2_ARGMAX_H

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define ARGMAX_PATH "avx512"
#elif defined(__AVX__)
#define ARGMAX_PATH "avx"
#else
#define ARGMAX_PATH "plain"
#endif

/* whether one of p[0..16) is larger than max_p, C's > for each (an ordered compare: false where
 * either is NaN). With vector compares where the build has them: gcc -O3 compiled the plain loop
 * into 11 us for 32000 values, the vector compares into 2 */
static inline int argmax_any_larger16(const float* p, float max_p) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(max_p), _CMP_GT_OQ) != 0;
#elif defined(__AVX__)
    __m256 best = _mm256_set1_ps(max_p);
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), best, _CMP_GT_OQ),
                                           _mm256_cmp_ps(_mm256_loadu_ps(p + 8), best, _CMP_GT_OQ))) != 0;
#else
    int larger = 0;
    for (int k = 0; k < 16; k++)
        larger |= p[k] > max_p;
    return larger;
#endif
}

/* run.c's loop runs only over the 16 values that hold one larger than the largest before them:
 * over the others it would change nothing */
static inline int sample_argmax_fast(const float* probabilities, int n) {
    int max_i = 0, i = 1;
    float max_p = probabilities[0];
    for (; i + 16 <= n; i += 16)
        if (argmax_any_larger16(probabilities + i, max_p))
            for (int k = i; k < i + 16; k++)
                if (probabilities[k] > max_p) {
                    max_i = k;
                    max_p = probabilities[k];
                }
    for (; i < n; i++)
        if (probabilities[i] > max_p) {
            max_i = i;
            max_p = probabilities[i];
        }
    return max_i;
}

#endif
