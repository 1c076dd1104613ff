/* f32dot_check: f32dot.h's products on pseudo-random matrices, written to stdout as raw float32.
 * tests/test_f32dot.py compiles it with several flag sets and compares the outputs.
 *
 *   f32dot_check n d B seed   ->  out (B, d) from f32_matmul_rows over all rows at once, then
 *                                 out (B, d) again, one vector at a time and one row at a time,
 *                                 then (B, d) from f32_scores: each x against w's rows as keys,
 *                                 then (B, d) from f32_scores on the first half of each row
 *                                 (stride n) and (B, d) from f32_matmul_rows on those halves,
 *                                 then (B, d) all at once with x and out rows padded apart */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "f32dot.h"

static unsigned long long state;

static float random_float(void) {
    /* xorshift64*: values in [-1, 1), some of them tiny or large to vary the exponents */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    unsigned int bits = (unsigned int)((state * 0x2545F4914F6CDD1Dull) >> 32);
    float v = (float)(bits >> 8) / 8388608.0f - 1.0f;
    if ((bits & 15) == 0) v *= 1024.0f;
    if ((bits & 15) == 1) v /= 4096.0f;
    return v;
}

int main(int argc, char** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: f32dot_check n d B seed\n");
        return 2;
    }
    int n = atoi(argv[1]), d = atoi(argv[2]), B = atoi(argv[3]);
    state = strtoull(argv[4], NULL, 10) | 1;
    float* w = malloc(sizeof(float) * n * d);
    float* x = malloc(sizeof(float) * n * B);
    float* out = malloc(sizeof(float) * d * B);
    float* one = malloc(sizeof(float) * d);
    if (!w || !x || !out || !one) return 1;
    for (int i = 0; i < n * d; i++) w[i] = random_float();
    for (int i = 0; i < n * B; i++) x[i] = random_float();
    f32_matmul_rows(out, d, x, n, w, n, d, B, 0, d);
    fwrite(out, sizeof(float), (size_t)d * B, stdout);
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < d; i++)
            f32_matmul_rows(one, d, x + (size_t)b * n, n, w, n, d, 1, i, i + 1);
        fwrite(one, sizeof(float), d, stdout);
    }
    for (int b = 0; b < B; b++) {
        f32_scores(one, x + (size_t)b * n, w, n, d, n);
        fwrite(one, sizeof(float), d, stdout);
    }
    int half = (n + 1) / 2;
    float* halves = malloc(sizeof(float) * half * d);
    if (!halves) return 1;
    for (int i = 0; i < d; i++)
        memcpy(halves + (size_t)i * half, w + (size_t)i * n, sizeof(float) * half);
    for (int b = 0; b < B; b++) {
        f32_scores(one, x + (size_t)b * n, w, n, d, half);
        fwrite(one, sizeof(float), d, stdout);
    }
    for (int b = 0; b < B; b++) {
        f32_matmul_rows(one, d, x + (size_t)b * n, n, halves, half, d, 1, 0, d);
        fwrite(one, sizeof(float), d, stdout);
    }
    free(halves);
    /* all at once again, with the vectors f32_token_stride apart and the outputs d + 5 apart */
    size_t xs = f32_token_stride(n), os = (size_t)d + 5;
    float* padded_x = calloc(xs * B, sizeof(float));
    float* padded_out = calloc(os * B, sizeof(float));
    if (!padded_x || !padded_out) return 1;
    for (int b = 0; b < B; b++)
        memcpy(padded_x + b * xs, x + (size_t)b * n, sizeof(float) * n);
    f32_matmul_rows(padded_out, os, padded_x, xs, w, n, d, B, 0, d);
    for (int b = 0; b < B; b++)
        fwrite(padded_out + b * os, sizeof(float), d, stdout);
    free(padded_x);
    free(padded_out);
    free(w);
    free(x);
    free(out);
    free(one);
    return 0;
}
