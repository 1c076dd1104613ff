// Multi-head attention over the KV cache for the current position: run.c's loop over heads.
#include "common.cuh"

// run.c's softmax of x[0..size) in place (max, exp and sum, normalize), by the whole block.
__device__ void softmax(float* x, int size)
{
    __shared__ float scratch[WARP_SIZE];
    float max_val = -INFINITY;
    for (int i = threadIdx.x; i < size; i += blockDim.x)
        max_val = fmaxf(max_val, x[i]);
    max_val = block_max(max_val, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < size; i += blockDim.x) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    sum = block_sum(sum, scratch);
    for (int i = threadIdx.x; i < size; i += blockDim.x)
        x[i] /= sum;
    __syncthreads();
}

// One block per query head h; its kv head is h / kv_mul (grouped-query attention).
// key_cache and value_cache point at this layer, (seq_len, kv_dim) with rows 0..pos filled, and q is
// already rotated. Needs blockDim.x >= head_size and head_size + blockDim.x + seq_len floats of
// dynamic shared memory.
__global__ void attention(const float* q, const float* key_cache, const float* value_cache, float* xb,
                          int pos, int kv_dim, int head_size, int kv_mul)
{
    extern __shared__ __align__(16) float smem[];  // qs is read as float4
    float* qs = smem;                   // this head's query
    float* partial = qs + head_size;    // one partial weighted sum per thread
    float* att = partial + blockDim.x;  // scores, then weights, for t = 0..pos
    int h = blockIdx.x;
    int kv_offset = (h / kv_mul) * head_size;

    for (int i = threadIdx.x; i < head_size; i += blockDim.x)
        qs[i] = q[h * head_size + i];
    __syncthreads();

    // scores q.k / sqrt(head_size), one thread per timestep; rows are 16-byte aligned when
    // head_size % 4 == 0 (kv_dim is a multiple of head_size)
    bool vec4 = head_size % 4 == 0 && aligned16(key_cache);
    float scale = sqrtf((float)head_size);
    for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
        const float* k = key_cache + (size_t)t * kv_dim + kv_offset;
        float score = 0.0f;
        if (vec4) {
            const float4* q4 = (const float4*)qs;
            const float4* k4 = (const float4*)k;
            #pragma unroll 4
            for (int i = 0; i < head_size / 4; i++) {
                float4 a = q4[i];
                float4 b = k4[i];
                score += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
            }
        } else {
            for (int i = 0; i < head_size; i++)
                score += qs[i] * k[i];
        }
        att[t] = score / scale;
    }
    __syncthreads();

    softmax(att, pos + 1);

    // weighted sum of the values: a group of head_size threads per timestep t = g, g + groups, ...,
    // each thread one dimension i (coalesced reads of a value row), then the groups are added up
    int groups = blockDim.x / head_size;
    int i = threadIdx.x % head_size;
    int g = threadIdx.x / head_size;
    float acc = 0.0f;
    if (g < groups) {
        #pragma unroll 4
        for (int t = g; t <= pos; t += groups)
            acc += att[t] * value_cache[(size_t)t * kv_dim + kv_offset + i];
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < head_size) {
        float sum = 0.0f;
        for (g = 0; g < groups; g++)
            sum += partial[g * head_size + threadIdx.x];
        xb[h * head_size + threadIdx.x] = sum;
    }
}
