/* f32dot.h: the fp32 matrix products of run.pyx's forward_batch, which decodes and takes prompts
 * for the command line and the API (forward() stays run.c's, the reference it is tested against),
 * and the attention scores of both programs' forward_batch (f32_scores: each one such a product).
 *
 * f32_matmul_rows(out, os, x, xs, w, n, d, B, i0, i1) computes rows i0 .. i1 - 1 of W (d, n) times
 * each of B vectors x (B, n; vector b at x + b * xs), into out (B, d; vector b at out + b * os);
 * matmul_batch spreads blocks of rows over threads. Every output is the dot product of one weight
 * row and one vector, and each is summed by the same arithmetic whatever B is and wherever it
 * falls in a tile, so a token's logits do not depend on what else is in the batch:
 *
 *   - IEEE builds (no fast-math: make run, make exact): run.c's loop, one product after the other
 *     in order, so that every sum is matmul()'s bit for bit (and the output C's -O3 output).
 *   - fast-math builds (make runomp, pip install): 16 running sums per dot product, one per column
 *     j mod 16 (multiply-add, fused where the CPU has FMA; a last chunk of fewer than 16 columns
 *     is padded with zeros), then added pairwise: lanes 0-7 + 8-15, 0-3 + 4-7, 0-1 + 2-3, 0 + 1.
 *     That is the order gcc 12 gives run.c's loop with -Ofast -march=znver4 (this project's AMD
 *     machines) when n is a multiple of 16; other CPUs' -Ofast builds of run.c sum in 8 lanes, or
 *     with other tails. Written out here, the order no longer depends on the CPU (AVX-512 runs a
 *     16-lane vector as one register, AVX2 as two), nor on the call site: the functions below are
 *     compiled without fast-math's reassociation, which would let gcc pick an order per context.
 *
 * Tiles: 4 rows x 4 vectors on AVX-512 (16 running sums in registers, each load of w serving 4
 * products and each load of x 4), 2 x 2 with AVX2's 16 registers. Each pass over a tile's rows
 * also prefetches the next tile's rows, which the hardware prefetcher alone does not fetch early
 * enough to keep one token's decode at the memory's speed. */
#ifndef LLAMA2_F32DOT_H
#define LLAMA2_F32DOT_H

#include <string.h>

#if defined(__FAST_MATH__) && defined(__GNUC__)
#define F32_FIXED_ORDER 1
#else
#define F32_FIXED_ORDER 0
#endif

#if F32_FIXED_ORDER && defined(__AVX512F__)
#define F32_TILE_ROWS 4
#define F32_TILE_VECS 4
#elif F32_FIXED_ORDER
#define F32_TILE_ROWS 2
#define F32_TILE_VECS 2
#else
#define F32_TILE_VECS 8
#endif

/* a prompt's rows of F32_LONG_ROW columns or more go through a tile F32_CHUNK columns at a time
 * (f32_tile_rows says why) */
#define F32_LONG_ROW 4096
#define F32_CHUNK 1024

#if defined(__GNUC__)
#define F32_PREFETCH(address) __builtin_prefetch(address)
#define F32_API static __attribute__((unused))  /* runq uses the scores alone */
#else
#define F32_PREFETCH(address) ((void)0)
#define F32_API static
#endif

/* How far apart forward_batch keeps the vectors of a batch that go into a product (its x): an odd
 * number of 64-byte lines, as q8_token_stride does for runq. At 2048 columns (8 KB: 110M's
 * hidden_dim, 1B's dim) a tile's 4 vectors fell on the same L1 sets as each other and as w's
 * rows: those products ran at 0.85 of the others' FLOP rate on one core here, 0.9 padded */
F32_API size_t f32_token_stride(int n) {
    size_t lines = ((size_t)n + 15) / 16;
    return 16 * (lines % 2 ? lines : lines + 1);
}

#if F32_FIXED_ORDER

#if defined(__clang__)
#pragma clang fp reassociate(off)
#else
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

/* Loads, as macros (like F32_SUM16 below): a function returning a 64-byte vector draws an ABI
 * warning from gcc where AVX-512 is off, although it would be inlined */
#define F32_LOAD16(p) (*(const f32x16_unaligned*)(p))

/* m < 16 columns, the rest zeros: a masked load where there is one (a memcpy call or an element
 * loop here makes gcc keep the running sums in memory for the whole loop) */
#if defined(__AVX512F__)
#define F32_LOAD_TAIL(p, m) ((f32x16)_mm512_maskz_loadu_ps((__mmask16)((1u << (m)) - 1), (p)))
#elif defined(__AVX2__)
#define F32_LOAD_TAIL(p, m) ({                                                                   \
    const __m256i lane_ = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                            \
    __m256 lo_ = _mm256_maskload_ps((p), _mm256_cmpgt_epi32(_mm256_set1_epi32(m), lane_));      \
    __m256 hi_ = _mm256_maskload_ps((p) + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32((m) - 8), lane_)); \
    f32x16 v_;                                                                                   \
    memcpy(&v_, &lo_, sizeof lo_);                                                               \
    memcpy((char*)&v_ + sizeof lo_, &hi_, sizeof hi_);                                           \
    v_;                                                                                          \
})
#else
#define F32_LOAD_TAIL(p, m) ({                                                                   \
    f32x16 v_;                                                                                   \
    for (int k_ = 0; k_ < 16; k_++)                                                              \
        v_[k_] = k_ < (m) ? (p)[k_] : 0.0f;                                                      \
    v_;                                                                                          \
})
#endif

/* lanes 0-7 + 8-15, 0-3 + 4-7, then (0 + 2) + (1 + 3) */
#define F32_SUM16(v) ({                                                                          \
    f32x8 a8_ = (f32x8){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}                         \
              + (f32x8){v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};                 \
    f32x4 a4_ = (f32x4){a8_[0], a8_[1], a8_[2], a8_[3]} + (f32x4){a8_[4], a8_[5], a8_[6], a8_[7]}; \
    float s0_ = a4_[0] + a4_[2];                                                                 \
    float s1_ = a4_[1] + a4_[3];                                                                 \
    s0_ + s1_;                                                                                   \
})

/* R rows from i0 times T vectors from b0, R and T at most 4. They are constants where this is
 * inlined, so the code for the products outside R x T goes, and the running sums (named, not an
 * array, which gcc would keep in memory) stay in registers. prefetch_w: rows to fetch meanwhile,
 * or NULL */
#define F32_ROWS_X_VEC(t, X)                                  \
    if (T > t) {                                              \
        xv = X;                                               \
        F32_KEEP(xv);                                         \
        a0##t += w0 * xv;                                     \
        if (R > 1) a1##t += w1 * xv;                          \
        if (R > 2) a2##t += w2 * xv;                          \
        if (R > 3) a3##t += w3 * xv;                          \
    }
#define F32_STORE(r, t) \
    if (R > r && T > t) out[(b0 + t) * os + i0 + r] = F32_SUM16(a##r##t);

/* a loaded vector stays in its register: without this gcc loads the rows again for every vector.
 * Only where a 16-lane vector fits one register (AVX-512) */
#if defined(__AVX512F__)
#define F32_KEEP(v) __asm__("" : "+v"(v))
#else
#define F32_KEEP(v) ((void)0)
#endif

#if defined(__AVX512F__)
/* F32_SUM16 of 16 vectors at once: lane 4q + e of the result is F32_SUM16(v[4e + q]). Each level
 * adds the same pairs of lanes as F32_SUM16 does (so every result is its bits), for two or four
 * sums per instruction, and the shuffles that line the lanes up are shared: 30 shuffles and 15
 * adds instead of 4 and 4 per sum, which had taken a tenth of a prompt's time. */
#define F32_HALVES(a, b, lo, hi) _mm512_add_ps(_mm512_shuffle_f32x4(a, b, lo), _mm512_shuffle_f32x4(a, b, hi))
#define F32_PAIRS(a, b, lo, hi) _mm512_add_ps(_mm512_shuffle_ps(a, b, lo), _mm512_shuffle_ps(a, b, hi))
static inline __attribute__((always_inline)) __m512 f32_sum16x16(const __m512* v) {
    __m512 p[8], q[4], r[2];
    int k;
    for (k = 0; k < 8; k++)  /* lanes 0-7 + 8-15 of two sums: [v[2k]'s 8, v[2k+1]'s 8] */
        p[k] = F32_HALVES(v[2 * k], v[2 * k + 1], 0x44, 0xEE);
    for (k = 0; k < 4; k++)  /* 0-3 + 4-7 of four: quarter j = v[4k + j]'s 4 */
        q[k] = F32_HALVES(p[2 * k], p[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
    for (k = 0; k < 2; k++)  /* lanes 0 + 2 and 1 + 3 of each quarter */
        r[k] = F32_PAIRS(q[2 * k], q[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
    /* (0 + 2) + (1 + 3) */
    return F32_PAIRS(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
}

/* a full 4 x 4 tile's sums, given in the order row * 4 + token: token t's 4 rows come out in
 * quarter t, stored together */
static inline __attribute__((always_inline)) void f32_store_4x4(
        float* out, size_t os, int i0, int b0, f32x16 a00, f32x16 a01, f32x16 a02, f32x16 a03,
        f32x16 a10, f32x16 a11, f32x16 a12, f32x16 a13, f32x16 a20, f32x16 a21, f32x16 a22,
        f32x16 a23, f32x16 a30, f32x16 a31, f32x16 a32, f32x16 a33) {
    const __m512 v[16] = {(__m512)a00, (__m512)a01, (__m512)a02, (__m512)a03, (__m512)a10,
                          (__m512)a11, (__m512)a12, (__m512)a13, (__m512)a20, (__m512)a21,
                          (__m512)a22, (__m512)a23, (__m512)a30, (__m512)a31, (__m512)a32,
                          (__m512)a33};
    __m512 s = f32_sum16x16(v);
    int k;
    for (k = 0; k < 4; k++)
        _mm_storeu_ps(out + (b0 + k) * os + i0, _mm512_extractf32x4_ps(s, k));
}
#endif

static inline __attribute__((always_inline)) void f32_tile_RxT(
        float* out, size_t os, const float* x, size_t xs, const float* w, int n, int i0, int b0,
        const int R, const int T, const float* prefetch_w, int j0, int j1, f32x16* acc) {
    const f32x16 zero = {0};
    f32x16 a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero,
           a13 = zero, a20 = zero, a21 = zero, a22 = zero, a23 = zero, a30 = zero, a31 = zero,
           a32 = zero, a33 = zero;
    if (j0 > 0) {  /* the running sums of the columns before j0, as the last chunk left them */
        a00 = acc[0]; a01 = acc[1]; a02 = acc[2]; a03 = acc[3]; a10 = acc[4]; a11 = acc[5];
        a12 = acc[6]; a13 = acc[7]; a20 = acc[8]; a21 = acc[9]; a22 = acc[10]; a23 = acc[11];
        a30 = acc[12]; a31 = acc[13]; a32 = acc[14]; a33 = acc[15];
    }
    f32x16 w0 = zero, w1 = zero, w2 = zero, w3 = zero, xv;
    const float* wr = w + (size_t)i0 * n;
    const float* xb = x + b0 * xs;
    int j, r;
    for (j = j0; j + 16 <= j1; j += 16) {
        if (prefetch_w)
            for (r = 0; r < R; r++)
                F32_PREFETCH(prefetch_w + (size_t)r * n + j);
        w0 = F32_LOAD16(wr + j);
        if (R > 1) w1 = F32_LOAD16(wr + n + j);
        if (R > 2) w2 = F32_LOAD16(wr + 2 * (size_t)n + j);
        if (R > 3) w3 = F32_LOAD16(wr + 3 * (size_t)n + j);
        F32_KEEP(w0);
        if (R > 1) F32_KEEP(w1);
        if (R > 2) F32_KEEP(w2);
        if (R > 3) F32_KEEP(w3);
        F32_ROWS_X_VEC(0, F32_LOAD16(xb + j))
        F32_ROWS_X_VEC(1, F32_LOAD16(xb + xs + j))
        F32_ROWS_X_VEC(2, F32_LOAD16(xb + 2 * xs + j))
        F32_ROWS_X_VEC(3, F32_LOAD16(xb + 3 * xs + j))
    }
    if (j1 < n) {  /* more columns to come: the sums wait in acc */
        acc[0] = a00; acc[1] = a01; acc[2] = a02; acc[3] = a03; acc[4] = a10; acc[5] = a11;
        acc[6] = a12; acc[7] = a13; acc[8] = a20; acc[9] = a21; acc[10] = a22; acc[11] = a23;
        acc[12] = a30; acc[13] = a31; acc[14] = a32; acc[15] = a33;
        return;
    }
    if (j < n) {
        int m = n - j;
        w0 = F32_LOAD_TAIL(wr + j, m);
        if (R > 1) w1 = F32_LOAD_TAIL(wr + n + j, m);
        if (R > 2) w2 = F32_LOAD_TAIL(wr + 2 * (size_t)n + j, m);
        if (R > 3) w3 = F32_LOAD_TAIL(wr + 3 * (size_t)n + j, m);
        F32_ROWS_X_VEC(0, F32_LOAD_TAIL(xb + j, m))
        F32_ROWS_X_VEC(1, F32_LOAD_TAIL(xb + xs + j, m))
        F32_ROWS_X_VEC(2, F32_LOAD_TAIL(xb + 2 * xs + j, m))
        F32_ROWS_X_VEC(3, F32_LOAD_TAIL(xb + 3 * xs + j, m))
    }
#if defined(__AVX512F__)
    if (R == 4 && T == 4) {
        f32_store_4x4(out, os, i0, b0, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23,
                      a30, a31, a32, a33);
        return;
    }
#endif
    F32_STORE(0, 0) F32_STORE(1, 0) F32_STORE(2, 0) F32_STORE(3, 0)
    F32_STORE(0, 1) F32_STORE(1, 1) F32_STORE(2, 1) F32_STORE(3, 1)
    F32_STORE(0, 2) F32_STORE(1, 2) F32_STORE(2, 2) F32_STORE(3, 2)
    F32_STORE(0, 3) F32_STORE(1, 3) F32_STORE(2, 3) F32_STORE(3, 3)
}

/* one function per tile shape: inlined together into one, gcc keeps the running sums in memory.
 * f32_chunk_RxT takes columns j0 .. j1 - 1 (f32_tile_rows_shared); f32_tile_RxT all of them, its
 * code what it was before chunks (decode through the chunked ones measured 1.5% slower in one
 * alternating run, near the noise: not worth it where nothing is chunked) */
#define F32_TILE_FUNCTION(R, T)                                                                  \
    static __attribute__((noinline)) void f32_tile_##R##x##T(                                   \
            float* out, size_t os, const float* x, size_t xs, const float* w, int n, int i0,    \
            int b0, const float* prefetch_w) {                                                   \
        f32_tile_RxT(out, os, x, xs, w, n, i0, b0, R, T, prefetch_w, 0, n, NULL);                \
    }                                                                                            \
    static __attribute__((noinline)) void f32_chunk_##R##x##T(                                  \
            float* out, size_t os, const float* x, size_t xs, const float* w, int n, int i0,    \
            int b0, int j0, int j1, f32x16* acc) {                                               \
        f32_tile_RxT(out, os, x, xs, w, n, i0, b0, R, T, NULL, j0, j1, acc);                     \
    }
F32_TILE_FUNCTION(1, 1) F32_TILE_FUNCTION(1, 2)
F32_TILE_FUNCTION(F32_TILE_ROWS, 1) F32_TILE_FUNCTION(F32_TILE_ROWS, 2)
#if F32_TILE_VECS == 4
F32_TILE_FUNCTION(1, 3) F32_TILE_FUNCTION(1, 4)
F32_TILE_FUNCTION(F32_TILE_ROWS, 3) F32_TILE_FUNCTION(F32_TILE_ROWS, 4)
#endif

/* the tile function for R rows and T vectors: f32_chunk_RxT (columns j0 .. j1 - 1, the running
 * sums in acc) where chunked, f32_tile_RxT (all columns) elsewhere */
#define F32_TILE_CASE(R, T)                                                              \
    case T:                                                                              \
        if (chunked)                                                                     \
            f32_chunk_##R##x##T(out, os, x, xs, w, n, i0, b0, j0, j1, acc);              \
        else                                                                             \
            f32_tile_##R##x##T(out, os, x, xs, w, n, i0, b0, prefetch_w);                \
        break;

static inline __attribute__((always_inline)) void f32_tile_call(
        float* out, size_t os, const float* x, size_t xs, const float* w, int n, int i0, int b0,
        int R, int T, const float* prefetch_w, const int chunked, int j0, int j1, f32x16* acc) {
    if (R == 1) {
        switch (T) {
            F32_TILE_CASE(1, 1) F32_TILE_CASE(1, 2)
#if F32_TILE_VECS == 4
            F32_TILE_CASE(1, 3) F32_TILE_CASE(1, 4)
#endif
        }
    } else {
        switch (T) {
            F32_TILE_CASE(F32_TILE_ROWS, 1) F32_TILE_CASE(F32_TILE_ROWS, 2)
#if F32_TILE_VECS == 4
            F32_TILE_CASE(F32_TILE_ROWS, 3) F32_TILE_CASE(F32_TILE_ROWS, 4)
#endif
        }
    }
}

/* f32_tile_rows with 8 groups of vectors or more (a prompt), and rows after these to fetch.
 *
 * Each group fetches its share of the next R rows before its pass. All in the first pass (as
 * f32_tile_rows does with fewer groups), they came too late from memory, and a prompt's products
 * ran 10% slower with weights from memory than from L3 (one core, 768 x 768, 128 vectors: 98 vs
 * 109 GFLOP/s; shared out, 109 from memory). Fewer than 8 groups ran faster the first way (8
 * vectors: 39 vs 33).
 *
 * Long rows also go F32_CHUNK columns at a time, each group's running sums kept in sums between
 * chunks (stored and loaded as they are: the same arithmetic). 4 rows of 8192 columns (1B's w2)
 * are 128 KB, read again from L2 for every group; a chunk's 16 KB stay in L1 (one core, 128
 * vectors: 83 -> 92 GFLOP/s; the 1B fp32 prompt on 2 threads, alternating 5 rounds: 86.6 -> 88.6
 * tok/s). Rows of 2048 gained on their own, but not in a 110M prompt (w2 3% slower), so they
 * stay whole. (This function, and the tile functions for chunks, stand apart from decode's: in
 * its loop they made decode 5-10% slower.) */
static __attribute__((noinline)) void f32_tile_rows_shared(
        float* out, size_t os, const float* x, size_t xs, const float* w, int n, int B, int i0,
        const int R, const float* next, int groups) {
    const size_t lines = ((size_t)R * n + 15) / 16;  /* of 64 bytes (R rows are contiguous) */
    const size_t share = (lines + groups - 1) / groups;
    size_t fetched = 0;
    const int chunk = n >= F32_LONG_ROW && groups <= 64 ? F32_CHUNK : n;  /* sums <= 64 KB */
    f32x16 sums[chunk < n ? groups : 1][16];
    int b0, j0, j1;
    for (j0 = 0; j0 < n; j0 = j1) {
        j1 = n - j0 > chunk ? j0 + chunk : n;
        for (b0 = 0; b0 < B; b0 += F32_TILE_VECS) {
            int T = B - b0 < F32_TILE_VECS ? B - b0 : F32_TILE_VECS;
            if (j0 == 0) {
                size_t end = fetched + share < lines ? fetched + share : lines;
                for (; fetched < end; fetched++)
                    F32_PREFETCH(next + fetched * 16);
            }
            if (chunk == n)
                f32_tile_call(out, os, x, xs, w, n, i0, b0, R, T, NULL, 0, 0, n, NULL);
            else
                f32_tile_call(out, os, x, xs, w, n, i0, b0, R, T, NULL, 1, j0, j1, sums[b0 / F32_TILE_VECS]);
        }
    }
}

static inline __attribute__((always_inline)) void f32_tile_rows(
        float* out, size_t os, const float* x, size_t xs, const float* w, int n, int d, int B,
        int i0, const int R) {
    /* the next R rows are fetched while the first group of vectors passes over these */
    const float* prefetch_w = i0 + 2 * R <= d ? w + (size_t)(i0 + R) * n : NULL;
    const int groups = (B + F32_TILE_VECS - 1) / F32_TILE_VECS;
    int b0;
    if (prefetch_w && groups >= 8) {
        f32_tile_rows_shared(out, os, x, xs, w, n, B, i0, R, prefetch_w, groups);
        return;
    }
    for (b0 = 0; b0 < B; b0 += F32_TILE_VECS) {
        int T = B - b0 < F32_TILE_VECS ? B - b0 : F32_TILE_VECS;
        f32_tile_call(out, os, x, xs, w, n, i0, b0, R, T, prefetch_w, 0, 0, n, NULL);
        prefetch_w = NULL;
    }
}

F32_API void f32_matmul_rows(float* out, size_t os, const float* x, size_t xs, const float* w,
                             int n, int d, int B, int i0, int i1) {
    int i;
    for (i = i0; i + F32_TILE_ROWS <= i1; i += F32_TILE_ROWS)
        f32_tile_rows(out, os, x, xs, w, n, d, B, i, F32_TILE_ROWS);
    for (; i < i1; i++)  /* the rows left over when i1 - i0 is not a multiple of the tile */
        f32_tile_rows(out, os, x, xs, w, n, d, B, i, 1);
}

/* forward_batch's attention scores: att[t] = the dot product of q and the key at k + t * stride,
 * for t < n, each in the order above (what f32_matmul_rows gives a key as a one-row matrix). On
 * AVX-512, 16 keys at a time, their running sums side by side (one key's alone waited on each
 * multiply-add before the next: 3% of a prompt), end in one f32_sum16x16 */
#if defined(__AVX512F__)
#define F32_KEY_STEP(e, X) acc[e] += X * F32_LOAD16(key[e] + j);
#define F32_KEY_TAIL(e, X) acc[e] += X * F32_LOAD_TAIL(key[e] + j, m - j);
#define F32_16_KEYS(STEP, X)                                                                     \
    STEP(0, X) STEP(1, X) STEP(2, X) STEP(3, X) STEP(4, X) STEP(5, X) STEP(6, X) STEP(7, X)      \
    STEP(8, X) STEP(9, X) STEP(10, X) STEP(11, X) STEP(12, X) STEP(13, X) STEP(14, X) STEP(15, X)
#endif
F32_API void f32_scores(float* att, const float* q, const float* k, size_t stride, int n, int m) {
    int t = 0, j;
#if defined(__AVX512F__)
    for (; t + 16 <= n; t += 16) {
        f32x16 acc[16];
        const float* key[16];
        int e;
        for (e = 0; e < 16; e++) {  /* acc[4e + q] is key 4q + e, so that lane t is key t */
            key[e] = k + (t + 4 * (e % 4) + e / 4) * stride;
            acc[e] = (f32x16){0};
        }
        for (j = 0; j + 16 <= m; j += 16) {
            f32x16 qj = F32_LOAD16(q + j);
            F32_16_KEYS(F32_KEY_STEP, qj)
        }
        if (j < m) {
            f32x16 qj = F32_LOAD_TAIL(q + j, m - j);
            F32_16_KEYS(F32_KEY_TAIL, qj)
        }
        _mm512_storeu_ps(att + t, f32_sum16x16((const __m512*)acc));
    }
#endif
    for (; t < n; t++) {
        const float* kr = k + t * stride;
        f32x16 acc = {0};
        for (j = 0; j + 16 <= m; j += 16)
            acc += F32_LOAD16(q + j) * F32_LOAD16(kr + j);
        if (j < m)
            acc += F32_LOAD_TAIL(q + j, m - j) * F32_LOAD_TAIL(kr + j, m - j);
        att[t] = F32_SUM16(acc);
    }
}

#if defined(__clang__)
#pragma clang fp reassociate(on)
#else
#pragma GCC pop_options
#endif

#else /* IEEE: run.c's loop for each product. Eight vectors share a pass over a row (eight
         independent sums keep the FPU busy, each load of w serves eight products) */

static inline void f32_row_times_vecs(float* out, size_t os, const float* x, size_t xs,
                                      const float* wi, int n, int b, const int T) {
    float val[F32_TILE_VECS] = {0};
    int j, k;
    for (j = 0; j < n; j++)
        for (k = 0; k < T; k++)
            val[k] += wi[j] * x[(b + k) * xs + j];
    for (k = 0; k < T; k++)
        out[(b + k) * os] = val[k];
}

F32_API void f32_matmul_rows(float* out, size_t os, const float* x, size_t xs, const float* w,
                             int n, int d, int B, int i0, int i1) {
    int i, j, b;
    for (i = i0; i < i1; i++) {
        const float* wi = w + (size_t)i * n;
        if (i + 2 < d)  /* the row after next is on its way from memory meanwhile */
            for (j = 0; j < n; j += 16)
                F32_PREFETCH(wi + 2 * (size_t)n + j);
        for (b = 0; b + F32_TILE_VECS <= B; b += F32_TILE_VECS)
            f32_row_times_vecs(out + i, os, x, xs, wi, n, b, F32_TILE_VECS);
        for (; b < B; b++)
            f32_row_times_vecs(out + i, os, x, xs, wi, n, b, 1);
    }
}


/* forward()'s attention scores: att[t] = q . (k + t * stride), summed in order */
F32_API void f32_scores(float* att, const float* q, const float* k, size_t stride, int n, int m) {
    int t, i;
    for (t = 0; t < n; t++) {
        const float* kr = k + t * stride;
        float score = 0.0f;
        for (i = 0; i < m; i++)
            score = score + q[i] * kr[i];
        att[t] = score;
    }
}

#endif

#endif
