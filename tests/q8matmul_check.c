/* Checks q8matmul.h's q8_matmul_block, for whichever path the compiler flags select
 * (tests/test_q8matmul.py builds it with several -march values, and with the fast build's flags):
 * random matrices of 1 to 40 rows (blocks cut short included), group sizes 32, 64 (the SIMD
 * paths) and 48 (the plain fallback), 1 to 41 groups a row, 1 to 20 tokens at once.
 * - Every (row, token) of T tokens at once must equal the same token's row alone (T = 1), bit
 *   for bit: what forward_batch against forward() needs, whatever the flags.
 * - Built with IEEE flags and -ffp-contract=off (argument "exact"), every (row, token) must also
 *   equal the reference bit for bit: runq.c's expression on the plain path, its fused form on the
 *   SIMD paths (the header's top says why).
 * - Where the header has a packed layout (Q8_PACKED: AVX-512 VNNI) and the group size is 32 or
 *   64, the matrix is packed (q8_pack_block) and q8_matmul_block_packed must give what
 *   q8_matmul_block gives, bit for bit, for the same T tokens; and q8_pack_block (vector code)
 *   must write q8_pack_block_plain's bytes (a block that differs counts as one differing value);
 *   and every row that q8_dequantize_row_packed reads back from the packed layout must be the
 *   file's row dequantized (runq.c's value times scale), bit for bit.
 * - Where q8_choose_batch_kernel chooses AMX (on a CPU with AMX-INT8, or built with
 *   Q8_AMX_EMULATE on AVX-512 VNNI: the kernel then runs on emulated tiles), for every T from 2 to 40 (tails of 16 tokens), group sizes 32 and 64, 1 to 40 rows (blocks cut
 *   short), n a multiple of 32 that is not one of 64 among others, and extreme values, the
 *   products of 2 or more tokens that q8_matmul_block_packed gives with AMX chosen must be those
 *   it gives without, bit for bit (and, with "exact", the reference's).
 * Prints the path, the number of values compared, the number that differ from the one-token
 * result, the number that differ from the reference (0 when not checked), the number of values
 * compared from the packed layout, the number of those that differ, the number of values compared
 * from the AMX kernel (0 without emulation) and the number of those that differ; then, on a line
 * of its own, the kernel q8_choose_batch_kernel chose for products of 2 or more tokens. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "q8matmul.h"

static float reference(const int8_t* x, const float* xs, const int8_t* w, const float* ws, int n,
                       int gs, int fused) {
    float val = 0.0f;
    for (int j = 0; j <= n - gs; j += gs) {
        int32_t ival = 0;
        for (int k = 0; k < gs; k++)
            ival += ((int32_t)x[j + k]) * ((int32_t)w[j + k]);
        if (fused)
            val = fmaf((float)ival, ws[j / gs] * xs[j / gs], val);
        else
            val += ((float)ival) * ws[j / gs] * xs[j / gs];
    }
    return val;
}

#define MAX_N (64 * 41)
#define MAX_D 40
#define MAX_T 20
#define STRIDE (MAX_N + 8)
#define MAX_AMX_T 40

int main(int argc, char** argv) {
    static int8_t x[MAX_T * STRIDE], w[MAX_D * MAX_N];
    static float xs[MAX_T * STRIDE], ws[MAX_D * MAX_N], out[MAX_T * MAX_D], alone[MAX_D];
    static int32_t xsum[MAX_T * STRIDE];
    static int8_t pq[((MAX_D + 15) / 16) * MAX_N * 16 + 64] __attribute__((aligned(64)));
    static float ps[((MAX_D + 15) / 16) * MAX_N * 16] __attribute__((aligned(64))), packed[MAX_T * MAX_D];
    static int8_t pq_plain[sizeof pq];
    static float ps_plain[sizeof ps / sizeof(float)], row[MAX_N];
    long compared_packed = 0, differ_packed = 0;
    static const int sizes[3] = {32, 64, 48};
    int exact = argc > 1 && strcmp(argv[1], "exact") == 0;
    long compared = 0, differ_alone = 0, differ = 0;
    srand(12345);
    for (int it = 0; it < 600; it++) {
        int gs = sizes[it % 3], groups = 1 + (it * 7) % 41, n = groups * gs;
        int d = 1 + rand() % MAX_D, T = 1 + rand() % MAX_T, extreme = it % 5 == 0;
        if (it % 4 == 0)
            T = 1;  /* decode's case, often */
        for (int i = 0; i < d * n; i++)  /* any int8 (export.py never writes -128, a file may) */
            w[i] = extreme ? (rand() % 2 ? 127 : -128) : (int8_t)(rand() % 256 - 128);
        for (int i = 0; i < d * groups; i++)
            ws[i] = (float)rand() / RAND_MAX - 0.5f;
        for (int t = 0; t < T; t++) {
            for (int i = 0; i < n; i++)  /* quantize() gives x in [-127, 127] */
                x[t * STRIDE + i] = extreme ? (rand() % 2 ? 127 : -127) : (int8_t)(rand() % 255 - 127);
            for (int g = 0; g < groups; g++)
                xs[t * STRIDE + g] = (float)rand() / RAND_MAX - 0.5f;
            q8_group_sums(x + t * STRIDE, xsum + t * STRIDE, n, gs);
        }
        for (int b = 0; b * Q8_ROWS < d; b++)
            q8_matmul_block(out, d, b, x, xsum, xs, T, STRIDE, w, ws, n, gs);
        if (Q8_PACKED && (gs == 32 || gs == 64)) {
            for (int b = 0; b * 16 < d; b++) {
                q8_pack_block(pq, ps, b, w, ws, d, n, gs);
                q8_pack_block_plain(pq_plain, ps_plain, b, w, ws, d, n, gs);
            }
            if (memcmp(pq, pq_plain, q8_packed_bytes(d, n))
                    || memcmp(ps, ps_plain, q8_packed_scales(d, n, gs) * sizeof(float)))
                differ_packed++;
            for (int i = 0; i < d; i++) {
                q8_dequantize_row_packed(row, pq, ps, i, n, gs);
                for (int j = 0; j < n; j++) {
                    float expected = w[i * n + j] * ws[i * groups + j / gs];
                    compared_packed++;
                    if (memcmp(&row[j], &expected, sizeof(float)))
                        differ_packed++;
                }
            }
            for (int b = 0; b * 16 < d; b++)
                q8_matmul_block_packed(packed, d, b, x, xsum, xs, T, STRIDE, pq, ps, n, gs);
            for (int i = 0; i < T * d; i++) {
                compared_packed++;
                if (memcmp(&packed[i], &out[i], sizeof(float)))
                    differ_packed++;
            }
        }
        int fused = Q8_FUSED && (gs == 32 || gs == 64);
        for (int t = 0; t < T; t++) {
            for (int b = 0; b * Q8_ROWS < d; b++)
                q8_matmul_block(alone, d, b, x + t * STRIDE, xsum + t * STRIDE, xs + t * STRIDE, 1, 0,
                                w, ws, n, gs);
            for (int i = 0; i < d; i++) {
                compared++;
                if (memcmp(&out[t * d + i], &alone[i], sizeof(float)))
                    differ_alone++;
                if (exact && out[t * d + i] != reference(x + t * STRIDE, xs + t * STRIDE, w + i * n,
                                                         ws + i * groups, n, gs, fused))
                    differ++;
            }
        }
    }
    long compared_amx = 0, differ_amx = 0;
    const char* chosen = q8_choose_batch_kernel(1);
#if Q8_AMX
    static int8_t amx_x[MAX_AMX_T * STRIDE];
    static float amx_xs[MAX_AMX_T * STRIDE], amx[MAX_AMX_T * MAX_D], vnni[MAX_AMX_T * MAX_D];
    static int32_t amx_xsum[MAX_AMX_T * STRIDE];
    int amx_chosen = strcmp(chosen, "amx+" Q8_KERNEL) == 0;
    for (int it = 0; amx_chosen && it < 2 * (MAX_AMX_T - 1); it++) {
        int gs = it % 2 ? 64 : 32, T = 2 + it / 2, groups = 1 + (it * 5) % 23, n = groups * gs;
        int d = 1 + rand() % MAX_D, extreme = it % 7 == 0;
        for (int i = 0; i < d * n; i++)
            w[i] = extreme ? (rand() % 2 ? 127 : -128) : (int8_t)(rand() % 256 - 128);
        for (int i = 0; i < d * groups; i++)
            ws[i] = (float)rand() / RAND_MAX - 0.5f;
        for (int t = 0; t < T; t++) {
            for (int i = 0; i < n; i++)
                amx_x[t * STRIDE + i] = extreme ? (rand() % 2 ? 127 : -127) : (int8_t)(rand() % 255 - 127);
            for (int g = 0; g < groups; g++)
                amx_xs[t * STRIDE + g] = (float)rand() / RAND_MAX - 0.5f;
            q8_group_sums(amx_x + t * STRIDE, amx_xsum + t * STRIDE, n, gs);
        }
        for (int b = 0; b * 16 < d; b++)
            q8_pack_block(pq, ps, b, w, ws, d, n, gs);
        q8_amx_chosen = 0;
        for (int b = 0; b * 16 < d; b++)
            q8_matmul_block_packed(vnni, d, b, amx_x, amx_xsum, amx_xs, T, STRIDE, pq, ps, n, gs);
        q8_amx_chosen = 1;
        for (int b = 0; b * 16 < d; b++)
            q8_matmul_block_packed(amx, d, b, amx_x, amx_xsum, amx_xs, T, STRIDE, pq, ps, n, gs);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < d; i++) {
                compared_amx++;
                if (memcmp(&amx[t * d + i], &vnni[t * d + i], sizeof(float))
                        || (exact && amx[t * d + i] != reference(amx_x + t * STRIDE, amx_xs + t * STRIDE,
                                                                 w + i * n, ws + i * groups, n, gs, 1)))
                    differ_amx++;
            }
    }
    q8_amx_chosen = 0;
#endif
    printf("%s %ld %ld %ld %ld %ld %ld %ld\n%s\n", Q8_KERNEL, compared, differ_alone, differ,
           compared_packed, differ_packed, compared_amx, differ_amx, chosen);
    return 0;
}
