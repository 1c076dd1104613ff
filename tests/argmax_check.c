/* Checks argmax.h's sample_argmax_fast, for whichever path the compiler flags select
 * (tests/test_sampling.py builds it with several), against run.c's sample_argmax: rows of every
 * length from 1 to 100 and some long ones, random values, ties, the largest first or last or at
 * a 16-value step's edge, rising rows (a larger value in every step), infinities and, where the
 * build keeps IEEE comparisons (no -ffast-math), NaN. Prints the path, the rows compared and
 * the number whose index differs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "argmax.h"

static int run_c_argmax(const float* probabilities, int n) {  /* run.c's sample_argmax */
    int max_i = 0;
    float max_p = probabilities[0];
    for (int i = 1; i < n; i++)
        if (probabilities[i] > max_p) {
            max_i = i;
            max_p = probabilities[i];
        }
    return max_i;
}

static float uniform(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

int main(void) {
    static float row[40000];
    long compared = 0, differ = 0;
    srand(7);
    for (int it = 0; it < 20000; it++) {
        int kind = it % 8;
        int n = it < 10000 ? 1 + it % 100 : 1 + rand() % 40000;
        for (int i = 0; i < n; i++)
            row[i] = kind == 1 ? (float)(rand() % 5) : kind == 2 ? (float)i : uniform();
        if (kind == 3)  /* the largest at a step's edge, tied with another */
            row[rand() % n] = row[(16 * (rand() % 4) + 15) % n] = 2.0f;
        if (kind == 4)
            row[rand() % n] = INFINITY;
        if (kind == 5)
            for (int i = 0; i < n; i++)
                row[i] = -INFINITY;
        if (kind == 6)
            row[0] = 3.0f;  /* the first is the largest */
#if !defined(__FAST_MATH__)
        if (kind == 7)
            for (int i = rand() % n; i < n; i += 1 + rand() % 20)
                row[i] = NAN;
#endif
        compared++;
        differ += sample_argmax_fast(row, n) != run_c_argmax(row, n);
    }
    printf("%s %ld %ld\n", ARGMAX_PATH, compared, differ);
    return 0;
}
