/* q8matmul.h's packed layout as a filter, for tests/test_packed_file.py to hold export.py's NumPy
 * packing to: `q8pack_check MODE D N GS` reads a (D, N) Q8_0 matrix on stdin and writes on stdout
 *   plain:  its packed values, then its packed scales, from q8_pack_block_plain (the definition)
 *   vector: the same from q8_pack_block (AVX-512 VNNI builds only: the code runq packs with)
 *   unpack: reads the packed values and scales instead, and writes the rows back from
 *           q8_unpack_block (what builds without the packed kernel load a packed file with)
 * A matrix is its D * N int8 values, then its D * N / GS float32 scales. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "q8matmul.h"

static void* read_all(size_t bytes) {
    void* p = aligned_alloc(64, bytes + 64);
    if (!p || fread(p, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "q8pack_check: short input\n");
        exit(1);
    }
    return p;
}

int main(int argc, char** argv) {
    if (argc != 5)
        return 2;
    const char* mode = argv[1];
    int d = atoi(argv[2]), n = atoi(argv[3]), gs = atoi(argv[4]);
    int64_t blocks = (d + 15) / 16, values = (int64_t)d * n, scales = values / gs;
    int64_t packed_values = q8_packed_bytes(d, n), packed_scales = q8_packed_scales(d, n, gs);
    if (strcmp(mode, "unpack") == 0) {
        int8_t* pq = read_all(packed_values);
        float* ps = read_all(packed_scales * sizeof(float));
        int8_t* wq = malloc(values + 1);
        float* ws = malloc(scales * sizeof(float) + 1);
        for (int64_t b = 0; b < blocks; b++)
            q8_unpack_block(wq, ws, b, pq, ps, d, n, gs);
        fwrite(wq, 1, values, stdout);
        fwrite(ws, sizeof(float), scales, stdout);
        return 0;
    }
    int8_t* wq = read_all(values);
    float* ws = read_all(scales * sizeof(float));
    int8_t* pq = aligned_alloc(64, packed_values);
    float* ps = aligned_alloc(64, packed_scales * sizeof(float) + 64);
    for (int64_t b = 0; b < blocks; b++) {
        if (strcmp(mode, "plain") == 0)
            q8_pack_block_plain(pq, ps, b, wq, ws, d, n, gs);
        else if (Q8_PACKED)
            q8_pack_block(pq, ps, b, wq, ws, d, n, gs);
        else
            return 3;  /* no vector packer in this build */
    }
    fwrite(pq, 1, packed_values, stdout);
    fwrite(ps, sizeof(float), packed_scales, stdout);
    return 0;
}
