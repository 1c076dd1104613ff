/* q8matmul.h: runq's matmul W (d,n) @ x (n,) for one token or for T tokens, int8 x int8 in Q8_0
 * groups of gs values (n % gs == 0; each group of a row or of x has one float scale).
 *
 * runq.pyx's matmul and matmul_batch call q8_matmul_block for blocks of Q8_ROWS rows (OpenMP
 * spreads the blocks), after q8_group_sums gave each token's sum of x per group; on AVX-512 VNNI
 * matmul_batch calls q8_matmul_block_packed instead, on the matrices runq.pyx packs at load or
 * maps packed from a file (see the packed layout below), with the same results. For row i and
 * token t the result is runq.c's loop:
 *
 *     for each group g, in order:  val += (float)(integer dot product of the group) * ws[g] * xs[g]
 *
 * Integer sums are exact in any order, so the SIMD paths compute them however is fastest. The
 * float accumulation over groups is one sequential chain per (row, token), and its arithmetic
 * is fixed here, not left to the compiler, so that a (row, token) gets the same bits whatever T
 * is and whichever kernel below runs it: matmul and matmul_batch agree bit for bit on every
 * build, IEEE or -Ofast (the fp32 steps around them are another matter):
 *   - the plain path is runq.c's expression, (float)ival * ws * xs rounded, then added, in a
 *     function that is never inlined or cloned (q8_row_plain), so every caller runs the same code
 *     even where -Ofast would compile an inlined copy differently by context. With IEEE flags
 *     (make run: -O3, no -march) this is runq.c's -O3 arithmetic bit for bit.
 *   - the SIMD paths keep one lane per row (one vector per token) and do, lane by lane, in
 *     group order: val = fma((float)isum, ws * xs, val) with the FMA intrinsic (one rounding
 *     for the multiply-add). gcc 12 -Ofast compiles runq.c's line as val + (float)ival * (ws *
 *     xs) with two roundings; written with a vector add, gcc would be free to fuse it or not by
 *     context. AVX-512 and AVX2 builds therefore give the same numbers; -Ofast runq.c's differ
 *     by that one rounding, which only the non-robust golden cases can see.
 *
 * Which path: chosen at build time from the compiler's target macros (Q8_KERNEL says which). The
 * builds that care about speed (make runomp, pip install) use -march=native, which defines the
 * macros of the CPU that builds and runs the extension; a build without -march (make run's
 * IEEE build, MSVC's default) gets the plain loop. Run-time dispatch would need per-function
 * target attributes (not in MSVC) and would make the IEEE build's numbers depend on the CPU.
 * One exception, which changes no number: on the AVX-512 VNNI build, where the CPU has AMX-INT8,
 * the products of 2 or more tokens on packed blocks use AMX tiles (q8_choose_batch_kernel, at
 * run time; gcc and clang on x86-64 Linux), with the same integer sums and the same float step.
 *   - AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes: (w xor 0x80) = w + 128 is
 *     unsigned, and dot(w + 128, x) - 128 * sum(x) = dot(w, x) exactly for any int8 values
 *     (sums of at most 64 * 255 * 128 fit int32). sum(x) per group is q8_group_sums', once
 *     per matmul. Group sizes 32 and 64; others take the plain path.
 *     One token (decode): each row's 64-byte block gives 16 int32 lanes; 16 rows' vectors are
 *     added together in a tree of unpacks and 128-bit shuffles (30 shuffles for 16 rows) that
 *     ends with lane r = row r's group sum, so the float step is one vector op for 16 rows.
 *     Several tokens (prefill, batched decode): the 16 rows' block is transposed once (lane r =
 *     4 bytes of row r) and each token then needs one vpdpbusd per 4 bytes of x, broadcast,
 *     with no reduction: the shuffles are paid once per weight block, not once per token.
 *   - AVX2 (with FMA): vpmaddubsw multiplies |w| (unsigned; 128 for -128) by x carrying w's
 *     sign and adds pairs into int16, which cannot saturate while x is in [-127, 127]:
 *     quantize() gives that (with a NaN or infinite scale the row's sum is not finite whatever
 *     the integers are). vpmaddwd adds pairs into int32; 8 rows' lanes are summed in a tree as
 *     above, one token at a time, while the 8 rows stay in cache. Group sizes 32 and 64.
 *   - plain C: the loop, for any other CPU, compiler or group size. */
#ifndef LLAMA2_Q8MATMUL_H
#define LLAMA2_Q8MATMUL_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define Q8_KERNEL "avx512vnni"
#define Q8_SIMD 512
#define Q8_ROWS 16
#elif defined(__AVX2__) && defined(__FMA__)
#define Q8_KERNEL "avx2"
#define Q8_SIMD 256
#define Q8_ROWS 8
#else
#define Q8_KERNEL "plain"
#define Q8_SIMD 0
#define Q8_ROWS 4
#endif
/* 1 where the float step is fused (the SIMD paths), 0 where it is runq.c's expression */
#define Q8_FUSED (Q8_SIMD != 0)

#if Q8_SIMD
#include <immintrin.h>
#endif

#if defined(_MSC_VER)
#define Q8_INLINE static __forceinline
#define Q8_NOINLINE static __declspec(noinline)
#elif defined(__GNUC__)
#define Q8_INLINE static inline __attribute__((always_inline))
#if defined(__clang__) || __GNUC__ < 8
#define Q8_NOINLINE static __attribute__((noinline))
#else  /* noinline alone still lets gcc make a specialised clone for a caller */
#define Q8_NOINLINE static __attribute__((noipa))
#endif
#else
#define Q8_INLINE static inline
#define Q8_NOINLINE static
#endif

/* How far apart a batch's tokens are kept in matmul_batch's buffers (int8 values, and in the same
 * units the group sums and scales), for the widest row: an odd number of 64-byte lines. At
 * 2048 (110M's hidden_dim) the tokens' rows fall on the same L1 sets and evict each other: a
 * batch of 16 took 1.5x the time. */
static int64_t q8_token_stride(int64_t widest) {
    int64_t lines = (widest + 63) / 64;
    return 64 * (lines % 2 ? lines : lines + 1);
}

/* each group's sum of x's n values (gs of them a group), for the AVX-512 path's sign fix-up */
static void q8_group_sums(const int8_t* x, int32_t* xsum, int n, int gs) {
    for (int j = 0, g = 0; j < n; j += gs, g++) {
        int32_t sum = 0;
        for (int k = 0; k < gs; k++)
            sum += x[j + k];
        xsum[g] = sum;
    }
}

/* ---------------------------------------------------------------------------------------------
 * plain C: runq.c's row */

Q8_INLINE float q8_row_loop(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                            int n, int gs) {
    float val = 0.0f;
    for (int j = 0, g = 0; j < n; j += gs, g++) {
        int32_t ival = 0;
        for (int k = 0; k < gs; k++)
            ival += (int32_t)x[j + k] * (int32_t)w[j + k];
        val += (float)ival * ws[g] * xs[g];
    }
    return val;
}

/* out of line on purpose (see the top); the group sizes export.py writes get a constant gs */
Q8_NOINLINE float q8_row_plain(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                               int n, int gs) {
    if (gs == 64)
        return q8_row_loop(x, xs, w, ws, n, 64);
    if (gs == 32)
        return q8_row_loop(x, xs, w, ws, n, 32);
    return q8_row_loop(x, xs, w, ws, n, gs);
}

/* A row that is not made of whole groups (n % gs != 0): runq.c's matmul assumes n % GS == 0,
 * otherwise row i starts in the middle of a weight group, (in + j) / GS picks the wrong scales
 * and the last n % GS columns are skipped (stories42M's w2, hidden_dim 1376 with GS 64). Here
 * the row is cut where either the x group or the w group ends, so each piece has one scale of
 * each, and every column counts. wq and ws are the matrix's, the row starts at value in. Out of
 * line for the same reason as q8_row_plain. */
Q8_NOINLINE float q8_row_ragged(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws,
                                int64_t in, int n, int gs) {
    float val = 0.0f;
    int64_t j = 0;
    while (j < n) {
        int64_t end = (j / gs + 1) * gs;                 /* where x's group ends */
        int64_t w_end = ((in + j) / gs + 1) * gs - in;   /* where w's group ends */
        if (w_end < end)
            end = w_end;
        if (n < end)
            end = n;
        int32_t ival = 0;
        for (int64_t k = j; k < end; k++)
            ival += (int32_t)xq[k] * (int32_t)wq[in + k];
        val += (float)ival * ws[(in + j) / gs] * xs[j / gs];
        j = end;
    }
    return val;
}

Q8_INLINE void q8_block_plain(float* out, int d, int row0, int rows, const int8_t* xq,
                              const float* xs, int T, int64_t xstride, const int8_t* wq,
                              const float* ws, int n, int gs) {
    for (int r = 0; r < rows; r++) {
        int64_t i = row0 + r;
        for (int t = 0; t < T; t++)
            out[(int64_t)t * d + i] = q8_row_plain(xq + t * xstride, xs + t * xstride, wq + i * n,
                                                   ws + i * (n / gs), n, gs);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The packed layout: what q8_block16_many makes of every 16 rows and 64 columns for each batch,
 * made once for all tokens and batches. runq.pyx packs each matrix at load (q8_pack_block, AVX-512
 * VNNI only), or reads it so from a file (llama2_cython/formats.py's layout 1; export.py's
 * --packed), which builds without the packed kernel unpack (q8_unpack_block). A block of 16 rows is
 * ceil(n / 64) chunks of 1024 bytes; in chunk c, 64-byte vector k holds, for rows r = 0 .. 15 in
 * turn, the 4 bytes 64c + 4k .. 64c + 4k + 3 of row r, as w + 128 (rows past d and columns past n
 * are 0, stored as 128). Its scales follow the rows the same way: 16 floats per group, lane r =
 * row r's (0 past d). One token then needs per 64 bytes of weights one vpdpbusd and one broadcast
 * of x, instead of q8_block16_one's loads, byte flips and tree of 30 shuffles, and each thread
 * reads one contiguous stream, which the hardware prefetcher follows. The sums are the same
 * integers, and the float step the same, so every result is q8_block_simd's bits. The kernel
 * reads the vectors aligned: a packed matrix starts at a multiple of 64 bytes. */

static int64_t q8_packed_bytes(int d, int n) {
    return (int64_t)((d + 15) / 16) * ((n + 63) / 64) * 1024;
}

static int64_t q8_packed_scales(int d, int n, int gs) {
    return (int64_t)((d + 15) / 16) * (n / gs) * 16;
}

/* rows block * 16 .. of W (d, n) (values wq, scales ws) into the packed layout at pq and ps, a byte
 * at a time: the definition, which q8_pack_block's vector code must match (tests/q8matmul_check.c;
 * inline only so that builds where nothing else calls it get no unused-function warning) */
static inline void q8_pack_block_plain(int8_t* pq, float* ps, int64_t block, const int8_t* wq,
                                       const float* ws, int d, int n, int gs) {
    int chunks = (n + 63) / 64, groups = n / gs;
    int8_t* bq = pq + block * chunks * 1024;
    float* bs = ps + block * groups * 16;
    for (int r = 0; r < 16; r++) {
        int64_t i = block * 16 + r;
        for (int j = 0; j < chunks * 64; j += 4) {  /* n is a multiple of gs: 4 bytes or none */
            uint32_t v = 0;
            if (i < d && j < n)
                memcpy(&v, wq + i * n + j, 4);
            v ^= 0x80808080u;
            memcpy(bq + (j / 64) * 1024 + ((j % 64) / 4) * 64 + r * 4, &v, 4);
        }
        for (int g = 0; g < groups; g++)
            bs[g * 16 + r] = i < d ? ws[i * groups + g] : 0.0f;
    }
}

/* the inverse: rows block * 16 .. (at most d) of the packed pq and ps back into W's rows at wq and
 * ws (the padding is dropped), for every build; a block's 16 rows stay in cache while each is
 * gathered 4 bytes at a time */
static void q8_unpack_block(int8_t* wq, float* ws, int64_t block, const int8_t* pq, const float* ps,
                            int d, int n, int gs) {
    int chunks = (n + 63) / 64, groups = n / gs;
    const int8_t* bq = pq + block * chunks * 1024;
    const float* bs = ps + block * groups * 16;
    for (int r = 0; r < 16 && block * 16 + r < d; r++) {
        int64_t i = block * 16 + r;
        for (int j = 0; j < n; j += 4) {
            uint32_t v;
            memcpy(&v, bq + (j / 64) * 1024 + ((j % 64) / 4) * 64 + r * 4, 4);
            v ^= 0x80808080u;
            memcpy(wq + i * n + j, &v, 4);
        }
        for (int g = 0; g < groups; g++)
            ws[i * groups + g] = bs[g * 16 + r];
    }
}

/* row `row` of a matrix in the packed layout (pq, ps), dequantized into x: runq.c's dequantize() of
 * that row (each int8 value times its group's scale), read from the packed bytes: the same values
 * and scales, so the same floats. runq.pyx reads the token embedding here when the classifier,
 * packed, is the embedding table (tests/q8matmul_check.c compares every row with the rows') */
static void q8_dequantize_row_packed(float* x, const int8_t* pq, const float* ps, int64_t row,
                                     int n, int gs) {
    int chunks = (n + 63) / 64, groups = n / gs, r = (int)(row % 16);
    const int8_t* bq = pq + row / 16 * chunks * 1024;
    const float* bs = ps + row / 16 * groups * 16;
    for (int j = 0; j < n; j++) {
        int8_t q = (int8_t)(bq[(j / 64) * 1024 + ((j % 64) / 4) * 64 + r * 4 + j % 4] ^ 0x80);
        x[j] = q * bs[(j / gs) * 16 + r];
    }
}

#if Q8_SIMD == 512
/* ---------------------------------------------------------------------------------------------
 * AVX-512 VNNI */

/* the float step of 16 lanes: val + (float)isum * (ws * xs), fused (see the top) */
Q8_INLINE __m512 q8_step16(__m512 val, __m512i isum, __m512 ws, float xs) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(ws, _mm512_set1_ps(xs)), val);
}

/* 64 bytes of a row (the first `bytes` of them, the rest 0), as w + 128 (unsigned) */
Q8_INLINE __m512i q8_load_w(const int8_t* p, int bytes) {
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i v = bytes == 64 ? _mm512_loadu_si512(p)
                            : _mm512_maskz_loadu_epi8((__mmask64)((1ULL << bytes) - 1), p);
    return _mm512_xor_si512(v, bias);
}

/* the levels of the tree that adds 16 rows' lanes together: neighbouring 32-bit lanes, 64-bit
 * lanes, and 128-bit parts ([a0+a1, a2+a3, b0+b1, b2+b3]) of a and b */
Q8_INLINE __m512i q8_add32(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
Q8_INLINE __m512i q8_add64(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
Q8_INLINE __m512i q8_add128(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

/* 16 vectors of 16 int32 (vector r, lane k) -> 16 vectors of (vector k, lane r) */
Q8_INLINE void q8_transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int j = 0; j < 4; j++) {  /* r[4j + i], 128-bit part c: lane 4c + i of r[4j .. 4j+3] */
        r[4 * j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
        r[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
        r[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
        r[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
    }
    for (int i = 0; i < 4; i++) {
        __m512i ab_lo = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x44);
        __m512i ab_hi = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xEE);
        __m512i cd_lo = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x44);
        __m512i cd_hi = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xEE);
        t[i] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
        t[4 + i] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
        t[8 + i] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
        t[12 + i] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
    }
    for (int k = 0; k < 16; k++)
        r[k] = t[k];
}

/* The scales of 16 rows for groups g0 .. g0+count-1 (count <= 16), lane r = row r: sr[r] points
 * at row r's scales. A gather per group did the same at several times the cost. */
Q8_INLINE void q8_scales16(__m512* out, const float* const* sr, int g0, int count) {
    __m512i v[16];
    __mmask16 m = (__mmask16)((1u << count) - 1);
    for (int r = 0; r < 16; r++)
        v[r] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, sr[r] + g0));
    q8_transpose16(v);
    for (int g = 0; g < count; g++)
        out[g] = _mm512_castsi512_ps(v[g]);
}

/* One token, 16 rows (wr[r] and sr[r]: row r's values and scales; rows past d repeat the last
 * one): lane r of the result is row r's. A 64-byte block is one group (gs 64) or two (gs 32):
 * its 16 rows' vpdpbusd lanes go through the tree, which leaves lane r = row r's sum. */
Q8_INLINE __m512 q8_block16_one(const int8_t* const* wr, const float* const* sr, const int8_t* x,
                                const int32_t* xsum, const float* xs, int n, int gs,
                                const int8_t* next) {
    __m512 val = _mm512_setzero_ps();
    int groups = n / gs;
    for (int g0 = 0; g0 < groups; g0 += 16) {
        int count = groups - g0 < 16 ? groups - g0 : 16;
        __m512 ws[16];
        q8_scales16(ws, sr, g0, count);
        for (int g = g0; g < g0 + count; g += 64 / gs) {
            int j = g * gs, bytes = n - j < 64 ? n - j : 64;  /* 32 after an odd number of 32-groups */
            __m512i xv = bytes == 64 ? _mm512_loadu_si512(x + j)
                                     : _mm512_maskz_loadu_epi8((__mmask64)((1ULL << bytes) - 1), x + j);
            __m512i v[16], p[8], q[4];
            /* 16 rows of n bytes make 16 short streams that the hardware prefetcher does not
             * follow: the next block's bytes (contiguous) are asked for at the pace these are read */
            for (int r = 0; r < 16; r++)
                _mm_prefetch((const char*)next + 16 * j + 64 * r, _MM_HINT_T0);
            for (int r = 0; r < 16; r++)
                v[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q8_load_w(wr[r] + j, bytes), xv);
            for (int i = 0; i < 8; i++)  /* lanes: rows 2i, 2i+1 alternately, partial sums */
                p[i] = q8_add32(v[2 * i], v[2 * i + 1]);
            for (int i = 0; i < 4; i++)  /* each 128-bit part: rows 4i .. 4i+3, partial sums */
                q[i] = q8_add64(p[2 * i], p[2 * i + 1]);
            /* parts: rows 0-3 of the block's first half, of its second half, 4-7 likewise; 8-15 */
            __m512i u0 = q8_add128(q[0], q[1]), u1 = q8_add128(q[2], q[3]);
            if (gs == 64) {
                __m512i isum = q8_add128(u0, u1);  /* lane r: row r */
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * xsum[g]));
                val = q8_step16(val, isum, ws[g - g0], xs[g]);
            } else {  /* the block's first group in u0 and u1's even parts, its second in the odd */
                __m512i first = _mm512_shuffle_i32x4(u0, u1, 0x88);
                first = _mm512_sub_epi32(first, _mm512_set1_epi32(128 * xsum[g]));
                val = q8_step16(val, first, ws[g - g0], xs[g]);
                if (g + 1 < groups) {
                    __m512i second = _mm512_shuffle_i32x4(u0, u1, 0xDD);
                    second = _mm512_sub_epi32(second, _mm512_set1_epi32(128 * xsum[g + 1]));
                    val = q8_step16(val, second, ws[g + 1 - g0], xs[g + 1]);
                }
            }
        }
    }
    return val;
}

Q8_INLINE __m512i q8_broadcast4(const int8_t* p) {  /* 4 bytes of x in every lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* NT tokens (a constant) times one group of the 16 transposed rows: the group is the 4-byte
 * columns k0 .. k0+nk-1 of wt; x[t] points at the block's start in token t's values. Two chains
 * per token so that the vpdpbusd latencies overlap. */
Q8_INLINE void q8_dot_tokens(__m512i* isum, const __m512i* wt, int k0, int nk,
                             const int8_t* const* x, int NT) {
    __m512i a[4], b[4];
    for (int t = 0; t < NT; t++)
        a[t] = b[t] = _mm512_setzero_si512();
    for (int k = k0; k < k0 + nk; k += 2)
        for (int t = 0; t < NT; t++) {
            a[t] = _mm512_dpbusd_epi32(a[t], wt[k], q8_broadcast4(x[t] + 4 * k));
            b[t] = _mm512_dpbusd_epi32(b[t], wt[k + 1], q8_broadcast4(x[t] + 4 * k + 4));
        }
    for (int t = 0; t < NT; t++)
        isum[t] = _mm512_add_epi32(a[t], b[t]);
}

/* tokens t0 .. t0+NT-1 (NT a constant, at most 4) through one block of transposed rows: its
 * group g (gs 64), or its groups g and g+1 (gs 32; g+1 only if there is one) */
Q8_INLINE void q8_tokens_block(__m512* val, const __m512i* wt, const __m512* ws, int j, int g,
                               int groups, const int8_t* xq, const int32_t* xsum, const float* xs,
                               int64_t xstride, int t0, int NT, int gs) {
    const int8_t* x[4];
    __m512i isum[4];
    for (int t = 0; t < NT; t++)
        x[t] = xq + (t0 + t) * xstride + j;
    q8_dot_tokens(isum, wt, 0, gs == 64 ? 16 : 8, x, NT);
    for (int t = 0; t < NT; t++) {
        int64_t o = (t0 + t) * xstride;
        __m512i s = _mm512_sub_epi32(isum[t], _mm512_set1_epi32(128 * xsum[o + g]));
        val[t0 + t] = q8_step16(val[t0 + t], s, ws[0], xs[o + g]);
    }
    if (gs == 32 && g + 1 < groups) {
        q8_dot_tokens(isum, wt, 8, 8, x, NT);
        for (int t = 0; t < NT; t++) {
            int64_t o = (t0 + t) * xstride;
            __m512i s = _mm512_sub_epi32(isum[t], _mm512_set1_epi32(128 * xsum[o + g + 1]));
            val[t0 + t] = q8_step16(val[t0 + t], s, ws[1], xs[o + g + 1]);
        }
    }
}

/* T tokens (2 .. 16), 16 rows: each 64-byte block of the rows is transposed once (lane r = 4
 * bytes of row r), then every token multiplies it with x's 4 bytes broadcast: no tree */
Q8_INLINE void q8_block16_many(__m512* val, const int8_t* const* wr, const float* const* sr,
                               const int8_t* xq, const int32_t* xsum, const float* xs, int T,
                               int64_t xstride, int n, int gs, const int8_t* next) {
    int groups = n / gs;
    for (int t = 0; t < 16; t++)  /* all 16: for T tokens gcc called memset, 4% of a prefill */
        val[t] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < groups; g0 += 16) {
        int count = groups - g0 < 16 ? groups - g0 : 16;
        __m512 ws[16];
        q8_scales16(ws, sr, g0, count);
        for (int g = g0; g < g0 + count; g += 64 / gs) {
            int j = g * gs, bytes = n - j < 64 ? n - j : 64;
            __m512i wt[16];
            for (int r = 0; r < 16; r++)  /* as in q8_block16_one */
                _mm_prefetch((const char*)next + 16 * j + 64 * r, _MM_HINT_T0);
            for (int r = 0; r < 16; r++)
                wt[r] = q8_load_w(wr[r] + j, bytes);
            q8_transpose16(wt);
            int t = 0;
            for (; t + 4 <= T; t += 4)
                q8_tokens_block(val, wt, ws + (g - g0), j, g, groups, xq, xsum, xs, xstride, t, 4, gs);
            switch (T - t) {
            case 3: q8_tokens_block(val, wt, ws + (g - g0), j, g, groups, xq, xsum, xs, xstride, t, 3, gs); break;
            case 2: q8_tokens_block(val, wt, ws + (g - g0), j, g, groups, xq, xsum, xs, xstride, t, 2, gs); break;
            case 1: q8_tokens_block(val, wt, ws + (g - g0), j, g, groups, xq, xsum, xs, xstride, t, 1, gs); break;
            }
        }
    }
}

Q8_INLINE void q8_block_simd(float* out, int d, int row0, int rows, const int8_t* xq,
                             const int32_t* xsum, const float* xs, int T, int64_t xstride,
                             const int8_t* wq, const float* ws, int n, int gs) {
    const int8_t* wr[16];
    const float* sr[16];
    int groups = n / gs;
    __mmask16 lanes = (__mmask16)((1u << rows) - 1);
    for (int r = 0; r < 16; r++) {
        int64_t i = row0 + (r < rows ? r : rows - 1);
        wr[r] = wq + i * n;
        sr[r] = ws + i * groups;
    }
    /* the next block, for the prefetches, if it has 16 rows (else this block asks for itself) */
    const int8_t* next = wq + (int64_t)(row0 + 32 <= d ? row0 + 16 : row0) * n;
    if (T == 1) {
        _mm512_mask_storeu_ps(out + row0, lanes, q8_block16_one(wr, sr, xq, xsum, xs, n, gs, next));
        return;
    }
    for (int t0 = 0; t0 < T; t0 += 16) {  /* 16 tokens at a time: more take another pass */
        int nt = T - t0 < 16 ? T - t0 : 16;
        __m512 val[16];
        q8_block16_many(val, wr, sr, xq + t0 * xstride, xsum + t0 * xstride, xs + t0 * xstride, nt,
                        xstride, n, gs, next);
        for (int t = 0; t < nt; t++)
            _mm512_mask_storeu_ps(out + (int64_t)(t0 + t) * d + row0, lanes, val[t]);
    }
}

#define Q8_PACKED 1  /* this build multiplies in the packed layout */

/* q8_pack_block_plain's bytes, 64 columns of the 16 rows at a time: loaded, transposed as
 * q8_block16_many transposes them, flipped and stored: on one core here (AMD EPYC), 45 MB of 7B's
 * w1 packed at 1-3.5 GB/s with the byte loop, 10.5 GB/s with this. Stores to a 64-byte aligned pq
 * bypass the cache (nothing reads the copy until decode) */
static void q8_pack_block(int8_t* pq, float* ps, int64_t block, const int8_t* wq, const float* ws,
                          int d, int n, int gs) {
    int chunks = (n + 63) / 64, groups = n / gs;
    int64_t row0 = block * 16;
    int rows = d - row0 < 16 ? (int)(d - row0) : 16;
    int8_t* bq = pq + block * chunks * 1024;
    float* bs = ps + block * groups * 16;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    int stream = ((uintptr_t)bq & 63) == 0;
    for (int c = 0; c < chunks; c++) {
        int bytes = n - 64 * c < 64 ? n - 64 * c : 64;
        __mmask64 m = bytes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << bytes) - 1);
        __m512i v[16];
        for (int r = 0; r < 16; r++)
            v[r] = r < rows ? _mm512_maskz_loadu_epi8(m, wq + (row0 + r) * n + 64 * c)
                            : _mm512_setzero_si512();
        q8_transpose16(v);
        for (int k = 0; k < 16; k++) {
            __m512i out = _mm512_xor_si512(v[k], bias);
            if (stream)
                _mm512_stream_si512((__m512i*)(bq + c * 1024 + 64 * k), out);
            else
                _mm512_storeu_si512(bq + c * 1024 + 64 * k, out);
        }
    }
    for (int r = 0; r < 16; r++) {
        const float* src = ws + (row0 + r) * groups;
        for (int g = 0; g < groups; g++)
            bs[g * 16 + r] = r < rows ? src[g] : 0.0f;
    }
    _mm_sfence();  /* the streamed stores are visible before anyone is told the block is done */
}

/* q8_block_simd on a packed block: T tokens, 16 at a time, each chunk's vectors used as they lie */
Q8_INLINE void q8_block_packed(float* out, int d, int row0, int rows, const int8_t* xq,
                               const int32_t* xsum, const float* xs, int T, int64_t xstride,
                               const int8_t* bq, const float* bs, int n, int gs) {
    int groups = n / gs;
    __mmask16 lanes = (__mmask16)((1u << rows) - 1);
    for (int t0 = 0; t0 < T; t0 += 16) {
        int nt = T - t0 < 16 ? T - t0 : 16;
        const int8_t* x = xq + t0 * xstride;
        const int32_t* xsm = xsum + t0 * xstride;
        const float* xsc = xs + t0 * xstride;
        __m512 val[16];
        for (int t = 0; t < 16; t++)  /* as in q8_block16_many */
            val[t] = _mm512_setzero_ps();
        for (int g = 0; g < groups; g += 64 / gs) {
            int j = g * gs;
            const __m512i* wt = (const __m512i*)(bq + (j / 64) * 1024);
            const __m512* ws = (const __m512*)(bs + g * 16);
            for (int r = 0; r < 16; r++)  /* two chunks ahead: the stream is ready when it is read */
                _mm_prefetch((const char*)wt + 2048 + 64 * r, _MM_HINT_T0);
            int t = 0;
            for (; t + 4 <= nt; t += 4)
                q8_tokens_block(val, wt, ws, j, g, groups, x, xsm, xsc, xstride, t, 4, gs);
            switch (nt - t) {
            case 3: q8_tokens_block(val, wt, ws, j, g, groups, x, xsm, xsc, xstride, t, 3, gs); break;
            case 2: q8_tokens_block(val, wt, ws, j, g, groups, x, xsm, xsc, xstride, t, 2, gs); break;
            case 1: q8_tokens_block(val, wt, ws, j, g, groups, x, xsm, xsc, xstride, t, 1, gs); break;
            }
        }
        for (int t = 0; t < nt; t++)
            _mm512_mask_storeu_ps(out + (int64_t)(t0 + t) * d + row0, lanes, val[t]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * AMX-INT8 (Intel Xeon since Sapphire Rapids): the products of 2 or more tokens on a packed block,
 * where the CPU and the OS allow AMX (q8_choose_batch_kernel, at run time: the build's -march
 * need not name AMX). A packed group is an AMX "B" tile as it lies in memory: gs / 4 rows of 64
 * bytes, row k = bytes 4k .. 4k+3 of each of the 16 weight rows, as w + 128 (unsigned). Up to 16
 * tokens' x of the group, a row per token, is an "A" tile (gs signed bytes a row), and tdpbsud
 * gives C[t][r] = dot(x_t, w_r + 128): the integer that q8_tokens_block has before its - 128 *
 * xsum. The fix-up and q8_step16 follow for each group in group order, so every result is
 * q8_block_packed's bits. One group's integer sum is one tdpbsud (K = gs <= 64), because each
 * group has its own scales; 4 groups' sums are made in 4 C tiles before their float steps.
 *
 * The tile instructions go through q8_tile_*: the intrinsics, in functions compiled for AMX by a
 * target attribute (gcc >= 11, clang >= 12, x86-64 Linux: the only place the OS permission call
 * below exists), or, with Q8_AMX_EMULATE defined, plain C that follows Intel's definitions of
 * the instructions for the configured shapes, so that this kernel runs, and is checked bit for
 * bit, on CPUs without AMX (tests/q8matmul_check.c). */

#if defined(Q8_AMX_EMULATE)
#include <stdio.h>
#include <stdlib.h>
#define Q8_AMX 1
#define Q8_AMX_TARGET

typedef struct {
    int rows, colsb;
    uint8_t data[16][64];
} q8_emulated_tile;
static __thread q8_emulated_tile q8_tiles[8];  /* tiles are per thread, as in the CPU */

static void q8_emulated_fault(const char* what) {  /* where the CPU would raise #UD */
    fprintf(stderr, "q8matmul.h AMX emulation: %s\n", what);
    abort();
}

static void q8_emulated_loadconfig(const void* config) {
    const uint8_t* c = (const uint8_t*)config;
    if (c[0] != 1)
        q8_emulated_fault("palette is not 1");
    for (int i = 0; i < 8; i++) {
        uint16_t colsb;
        memcpy(&colsb, c + 16 + 2 * i, 2);
        q8_tiles[i].rows = c[48 + i];
        q8_tiles[i].colsb = colsb;
        if (q8_tiles[i].rows > 16 || q8_tiles[i].colsb > 64)
            q8_emulated_fault("tile larger than palette 1's");
        memset(q8_tiles[i].data, 0, sizeof q8_tiles[i].data);  /* ldtilecfg zeroes the tiles */
    }
}

/* tileloadd: rows of colsb bytes, stride bytes apart; the rest of the tile is zeroed */
static void q8_emulated_loadd(int tmm, const void* base, int64_t stride) {
    q8_emulated_tile* t = &q8_tiles[tmm];
    if (t->rows == 0)
        q8_emulated_fault("tileloadd of an unconfigured tile");
    memset(t->data, 0, sizeof t->data);
    for (int r = 0; r < t->rows; r++)
        memcpy(t->data[r], (const uint8_t*)base + r * stride, (size_t)t->colsb);
}

static void q8_emulated_stored(int tmm, void* base, int64_t stride) {
    const q8_emulated_tile* t = &q8_tiles[tmm];
    if (t->rows == 0)
        q8_emulated_fault("tilestored of an unconfigured tile");
    for (int r = 0; r < t->rows; r++)
        memcpy((uint8_t*)base + r * stride, t->data[r], (size_t)t->colsb);
}

static void q8_emulated_zero(int tmm) {
    memset(q8_tiles[tmm].data, 0, sizeof q8_tiles[tmm].data);
}

/* tdpbsud: C[m][n] += sum over k < A.colsb / 4 and i < 4 of A[m][4k + i] (signed) * B[k][4n + i]
 * (unsigned), in int32 that wraps; the shapes must agree as the CPU requires */
static void q8_emulated_dpbsud(int c, int a, int b) {
    q8_emulated_tile *C = &q8_tiles[c], *A = &q8_tiles[a], *B = &q8_tiles[b];
    if (C->rows == 0 || A->rows != C->rows || B->rows != A->colsb / 4 || B->colsb != C->colsb
            || C->colsb % 4 || A->colsb % 4)
        q8_emulated_fault("tdpbsud's tile shapes do not agree");
    for (int m = 0; m < C->rows; m++)
        for (int n = 0; n < C->colsb / 4; n++) {
            uint32_t acc;
            memcpy(&acc, C->data[m] + 4 * n, 4);
            for (int k = 0; k < A->colsb / 4; k++)
                for (int i = 0; i < 4; i++)
                    acc += (uint32_t)((int32_t)(int8_t)A->data[m][4 * k + i] * (int32_t)B->data[k][4 * n + i]);
#if defined(Q8_AMX_EMULATE_FAULT)  /* for tests/test_q8matmul.py: a tile unit with one sum wrong */
            acc += m == 0 && n == 0;
#endif
            memcpy(C->data[m] + 4 * n, &acc, 4);
        }
}

static void q8_emulated_release(void) {
    memset(q8_tiles, 0, sizeof q8_tiles);
}

#define q8_tile_loadconfig(config) q8_emulated_loadconfig(config)
#define q8_tile_load(tmm, base, stride) q8_emulated_loadd(tmm, base, stride)
#define q8_tile_store(tmm, base, stride) q8_emulated_stored(tmm, base, stride)
#define q8_tile_zero(tmm) q8_emulated_zero(tmm)
#define q8_tile_dpbsud(c, a, b) q8_emulated_dpbsud(c, a, b)
#define q8_tile_release() q8_emulated_release()

#elif defined(__x86_64__) && defined(__linux__) \
    && (defined(__clang__) ? __clang_major__ >= 12 : defined(__GNUC__) && __GNUC__ >= 11)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define Q8_AMX 1
#define Q8_AMX_TARGET __attribute__((target("amx-tile,amx-int8")))
/* gcc's _tile_loadconfig tells the compiler that it reads 8 bytes of the configuration: the
 * barrier makes every byte of it be stored first. Tile numbers must be literal constants. */
#define q8_tile_loadconfig(config) \
    do { __asm__ volatile("" : : "r"(config) : "memory"); _tile_loadconfig(config); } while (0)
#define q8_tile_load(tmm, base, stride) _tile_loadd(tmm, base, stride)
#define q8_tile_store(tmm, base, stride) _tile_stored(tmm, base, stride)
#define q8_tile_zero(tmm) _tile_zero(tmm)
#define q8_tile_dpbsud(c, a, b) _tile_dpbsud(c, a, b)
#define q8_tile_release() _tile_release()

#else
#define Q8_AMX 0
#endif

#if Q8_AMX
/* palette 1's configuration: 64 bytes, tile i's bytes per row at 16 + 2i, its rows at 48 + i */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} q8_tile_config;

/* tiles 0-3: C, 4 groups' sums (nt rows of 16 int32); 4, 5: A, x (nt rows of gs bytes); 6, 7:
 * B, a group of the packed block (gs / 4 rows of 64 bytes) */
static void q8_amx_config(q8_tile_config* c, int nt, int gs) {
    memset(c, 0, sizeof *c);
    c->palette = 1;
    for (int i = 0; i < 4; i++) {
        c->rows[i] = (uint8_t)nt;
        c->colsb[i] = 64;
    }
    for (int i = 4; i < 6; i++) {
        c->rows[i] = (uint8_t)nt;
        c->colsb[i] = (uint16_t)gs;
    }
    for (int i = 6; i < 8; i++) {
        c->rows[i] = (uint8_t)(gs / 4);
        c->colsb[i] = 64;
    }
}

/* group g's integer sums for the nt tokens (x at the block's first token) into C tile c, via A
 * tile a and B tile b (literal tile numbers) */
#define Q8_AMX_GROUP(c, a, b, g)                                       \
    do {                                                               \
        q8_tile_zero(c);                                               \
        q8_tile_load(a, x + (int64_t)(g) * gs, xstride);               \
        q8_tile_load(b, bq + (int64_t)(g) * gs * 16, 64);              \
        q8_tile_dpbsud(c, a, b);                                       \
    } while (0)

/* q8_block_packed for T >= 1 tokens, its integer sums from the tiles */
Q8_AMX_TARGET Q8_NOINLINE void q8_block_amx(float* out, int d, int row0, int rows, const int8_t* xq,
                                            const int32_t* xsum, const float* xs, int T,
                                            int64_t xstride, const int8_t* bq, const float* bs,
                                            int n, int gs) {
    int groups = n / gs, configured = 0;
    __mmask16 lanes = (__mmask16)((1u << rows) - 1);
    q8_tile_config config __attribute__((aligned(64)));
    int32_t sums[4][16][16] __attribute__((aligned(64)));  /* C tile i, token t, row r */
    for (int t0 = 0; t0 < T; t0 += 16) {
        int nt = T - t0 < 16 ? T - t0 : 16;
        const int8_t* x = xq + t0 * xstride;
        const int32_t* xsm = xsum + t0 * xstride;
        const float* xsc = xs + t0 * xstride;
        if (nt != configured) {  /* the first block of 16 tokens, and a shorter last one */
            q8_amx_config(&config, nt, gs);
            q8_tile_loadconfig(&config);
            configured = nt;
        }
        __m512 val[16];
        for (int t = 0; t < 16; t++)
            val[t] = _mm512_setzero_ps();
        for (int g0 = 0; g0 < groups; g0 += 4) {
            int count = groups - g0 < 4 ? groups - g0 : 4;
            Q8_AMX_GROUP(0, 4, 6, g0);
            if (count > 1)
                Q8_AMX_GROUP(1, 5, 7, g0 + 1);
            if (count > 2)
                Q8_AMX_GROUP(2, 4, 6, g0 + 2);
            if (count > 3)
                Q8_AMX_GROUP(3, 5, 7, g0 + 3);
            q8_tile_store(0, sums[0], 64);
            if (count > 1)
                q8_tile_store(1, sums[1], 64);
            if (count > 2)
                q8_tile_store(2, sums[2], 64);
            if (count > 3)
                q8_tile_store(3, sums[3], 64);
            for (int i = 0; i < count; i++) {  /* q8_tokens_block's float step, group by group */
                int g = g0 + i;
                __m512 ws = _mm512_loadu_ps(bs + g * 16);
                for (int t = 0; t < nt; t++) {
                    int64_t o = t * xstride;
                    __m512i s = _mm512_sub_epi32(_mm512_load_si512(sums[i][t]),
                                                 _mm512_set1_epi32(128 * xsm[o + g]));
                    val[t] = q8_step16(val[t], s, ws, xsc[o + g]);
                }
            }
        }
        for (int t = 0; t < nt; t++)
            _mm512_mask_storeu_ps(out + (int64_t)(t0 + t) * d + row0, lanes, val[t]);
    }
    q8_tile_release();
}
#undef Q8_AMX_GROUP

/* whether this CPU and OS let this process use AMX-INT8: the CPU says it has AMX-TILE and
 * AMX-INT8 (CPUID leaf 7: EDX bits 24, 25), Linux grants the tile data state to the process
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, 18; it refuses, among other reasons,
 * where a thread's signal stack is too small for it) and the OS saves the tiles (XCR0 bits 17
 * and 18). Under emulation, yes. */
static int q8_amx_usable(void) {
#if defined(Q8_AMX_EMULATE)
    return 1;
#else
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(d & (1u << 24)) || !(d & (1u << 25)))
        return 0;
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0)
        return 0;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27)))  /* OSXSAVE: without it xgetbv does not exist */
        return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo >> 17 & 3) == 3;
#endif
}

/* No AMX CPU was at hand when this was written (it was checked under emulation): before AMX is
 * used, small products through it and through q8_block_packed must agree bit for bit: 48 rows
 * (3 blocks) x 256 columns with gs 32 and 64 and 19 tokens (a block of 16 and a tail of 3), and
 * 288 columns with gs 32 and 17 tokens (9 groups: a last round of fewer than 4 groups and a
 * half chunk, a tail of 1 token, as stories15M's dim 288 and a 17-token prompt have); any int8
 * weights and x in [-127, 127] from a fixed generator. */
static int q8_amx_self_check(void) {
    enum { D = 48, MAX_N = 288, MAX_T = 19, STRIDE = 320 };
    static const int cases[3][3] = {{256, 19, 32}, {256, 19, 64}, {288, 17, 32}};  /* n, T, gs */
    static int8_t wq[D * MAX_N], xq[MAX_T * STRIDE];
    static int8_t pq[D / 16 * ((MAX_N + 63) / 64) * 1024] __attribute__((aligned(64)));
    static float ws[D * MAX_N / 32], ps[D * MAX_N / 32] __attribute__((aligned(64))),
        xs[MAX_T * STRIDE];
    static int32_t xsum[MAX_T * STRIDE];
    static float amx[MAX_T * D], vnni[MAX_T * D];
    uint32_t state = 2463534242u;
#define Q8_NEXT() (state ^= state << 13, state ^= state >> 17, state ^= state << 5, state)
    for (int i = 0; i < D * MAX_N; i++)
        wq[i] = (int8_t)Q8_NEXT();
    for (int i = 0; i < MAX_T * STRIDE; i++)
        xq[i] = (int8_t)(Q8_NEXT() % 255 - 127);
    for (int i = 0; i < D * MAX_N / 32; i++)
        ws[i] = (float)(Q8_NEXT() % 2001) / 1000.0f - 1.0f;
    for (int i = 0; i < MAX_T * STRIDE; i++)
        xs[i] = (float)(Q8_NEXT() % 2001) / 1000.0f - 1.0f;
#undef Q8_NEXT
    for (int c = 0; c < 3; c++) {
        int n = cases[c][0], T = cases[c][1], gs = cases[c][2];
        for (int t = 0; t < T; t++)
            q8_group_sums(xq + t * STRIDE, xsum + t * STRIDE, n, gs);
        for (int b = 0; b < D / 16; b++) {
            q8_pack_block_plain(pq, ps, b, wq, ws, D, n, gs);
            const int8_t* bq = pq + b * ((n + 63) / 64) * 1024;
            const float* bs = ps + b * (n / gs) * 16;
            q8_block_amx(amx, D, 16 * b, 16, xq, xsum, xs, T, STRIDE, bq, bs, n, gs);
            q8_block_packed(vnni, D, 16 * b, 16, xq, xsum, xs, T, STRIDE, bq, bs, n, gs);
        }
        if (memcmp(amx, vnni, sizeof(float) * T * D))
            return 0;
    }
    return 1;
}
#endif

#elif Q8_SIMD == 256
/* ---------------------------------------------------------------------------------------------
 * AVX2 */

Q8_INLINE __m256 q8_step8(__m256 val, __m256i isum, __m256 ws, float xs) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(ws, _mm256_set1_ps(xs)), val);
}

/* 8 int32 lanes that add up to the dot product of 32 int8 values of x and w */
Q8_INLINE __m256i q8_dot32(const int8_t* x, const int8_t* w) {
    __m256i xv = _mm256_loadu_si256((const __m256i*)x), wv = _mm256_loadu_si256((const __m256i*)w);
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

Q8_INLINE __m256i q8_add32x8(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}
Q8_INLINE __m256i q8_add64x8(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}

/* one token, 8 rows: lane r of the result is row r's */
Q8_INLINE __m256 q8_block8_one(const int8_t* const* wr, const float* ws, __m256i scale_index,
                               const int8_t* x, const float* xs, int n, int gs) {
    __m256 val = _mm256_setzero_ps();
    for (int j = 0, g = 0; j < n; j += gs, g++) {
        __m256i v[8], p[4];
        for (int r = 0; r < 8; r++) {
            v[r] = q8_dot32(x + j, wr[r] + j);
            if (gs == 64)
                v[r] = _mm256_add_epi32(v[r], q8_dot32(x + j + 32, wr[r] + j + 32));
        }
        for (int i = 0; i < 4; i++)  /* as in the AVX-512 tree */
            p[i] = q8_add32x8(v[2 * i], v[2 * i + 1]);
        __m256i q0 = q8_add64x8(p[0], p[1]), q1 = q8_add64x8(p[2], p[3]);
        __m256i isum = _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                                        _mm256_permute2x128_si256(q0, q1, 0x31));
        val = q8_step8(val, isum, _mm256_i32gather_ps(ws + g, scale_index, 4), xs[g]);
    }
    return val;
}

Q8_INLINE void q8_block_simd(float* out, int d, int row0, int rows, const int8_t* xq,
                             const int32_t* xsum, const float* xs, int T, int64_t xstride,
                             const int8_t* wq, const float* ws, int n, int gs) {
    (void)xsum;
    const int8_t* wr[8];
    int groups = n / gs;
    for (int r = 0; r < 8; r++)
        wr[r] = wq + (int64_t)(row0 + (r < rows ? r : rows - 1)) * n;
    __m256i scale_index = _mm256_mullo_epi32(
        _mm256_min_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(rows - 1)),
        _mm256_set1_epi32(groups));
    ws += (int64_t)row0 * groups;
    /* one token after the other: the 8 rows (at most 16 KB for n = 2048) stay in L1 */
    for (int t = 0; t < T; t++) {
        __m256 val = q8_block8_one(wr, ws, scale_index, xq + t * xstride, xs + t * xstride, n, gs);
        float lanes[8];
        _mm256_storeu_ps(lanes, val);
        for (int r = 0; r < rows; r++)
            out[(int64_t)t * d + row0 + r] = lanes[r];
    }
}

#endif

/* ---------------------------------------------------------------------------------------------
 * the entry point: rows block * Q8_ROWS .. (at most d) of W (d, n) times T tokens' x, into
 * out[t * d + row]. Token t's int8 values, group sums and scales start at xq, xsum and xs +
 * t * xstride; W's row i at wq + i * n, its scales at ws + i * (n / gs). n % gs == 0. */
static void q8_matmul_block(float* out, int d, int64_t block, const int8_t* xq, const int32_t* xsum,
                            const float* xs, int T, int64_t xstride, const int8_t* wq,
                            const float* ws, int n, int gs) {
    int row0 = (int)(block * Q8_ROWS), rows = d - row0 < Q8_ROWS ? d - row0 : Q8_ROWS;
    if (T <= 0 || rows <= 0)
        return;
#if Q8_SIMD
    if (gs == 64) {
        q8_block_simd(out, d, row0, rows, xq, xsum, xs, T, xstride, wq, ws, n, 64);
        return;
    }
    if (gs == 32) {
        q8_block_simd(out, d, row0, rows, xq, xsum, xs, T, xstride, wq, ws, n, 32);
        return;
    }
#else
    (void)xsum;
#endif
    q8_block_plain(out, d, row0, rows, xq, xs, T, xstride, wq, ws, n, gs);
}


#ifndef Q8_AMX
#define Q8_AMX 0
#endif

/* Whether q8_matmul_block_packed multiplies 2 or more tokens with AMX: 0 until
 * q8_choose_batch_kernel says otherwise (runq.pyx calls it once, before any product). */
static int q8_amx_chosen = 0;

/* The kernel that products of 2 or more tokens on packed blocks use from now on, by name: AMX
 * with this build's kernel for the rest ("amx+avx512vnni") where allow_amx, AMX is usable
 * (q8_amx_usable) and its self-check passes, else this build's kernel (Q8_KERNEL), with a note
 * when AMX was found but failed its self-check. Not thread-safe: call it before the products. */
static const char* q8_choose_batch_kernel(int allow_amx) {
    q8_amx_chosen = 0;
#if Q8_AMX
    if (!allow_amx || !q8_amx_usable())
        return Q8_KERNEL;
    if (!q8_amx_self_check())
        return Q8_KERNEL " (AMX failed its self-check: not used)";
    q8_amx_chosen = 1;
    return "amx+" Q8_KERNEL;
#else
    (void)allow_amx;
    return Q8_KERNEL;
#endif
}

/* the packed layout's entry point: q8_matmul_block for a matrix that q8_pack_block packed (pq
 * and ps: the whole matrix's), gs 32 or 64, n % gs == 0. Only where Q8_PACKED is 1 (AVX-512
 * VNNI); elsewhere runq.pyx packs nothing and calls q8_matmul_block */
#if Q8_SIMD == 512
static void q8_matmul_block_packed(float* out, int d, int64_t block, const int8_t* xq,
                                   const int32_t* xsum, const float* xs, int T, int64_t xstride,
                                   const int8_t* pq, const float* ps, int n, int gs) {
    int row0 = (int)(block * 16), rows = d - row0 < 16 ? d - row0 : 16;
    if (T <= 0 || rows <= 0)
        return;
    const int8_t* bq = pq + block * ((n + 63) / 64) * 1024;
    const float* bs = ps + block * (n / gs) * 16;
#if Q8_AMX
    if (T >= 2 && q8_amx_chosen) {
        q8_block_amx(out, d, row0, rows, xq, xsum, xs, T, xstride, bq, bs, n, gs);
        return;
    }
#endif
    if (gs == 64)
        q8_block_packed(out, d, row0, rows, xq, xsum, xs, T, xstride, bq, bs, n, 64);
    else
        q8_block_packed(out, d, row0, rows, xq, xsum, xs, T, xstride, bq, bs, n, 32);
}
#else
#define Q8_PACKED 0
static void q8_pack_block(int8_t* pq, float* ps, int64_t block, const int8_t* wq, const float* ws,
                          int d, int n, int gs) {
    (void)pq; (void)ps; (void)block; (void)wq; (void)ws; (void)d; (void)n; (void)gs;
}
static void q8_matmul_block_packed(float* out, int d, int64_t block, const int8_t* xq,
                                   const int32_t* xsum, const float* xs, int T, int64_t xstride,
                                   const int8_t* pq, const float* ps, int n, int gs) {
    q8_matmul_block(out, d, block, xq, xsum, xs, T, xstride, pq, ps, n, gs);
}
#endif

#endif
