// Matrix-vector kernels: run.c's matmul, W (d,n) @ x (n,) -> (d,), with the small steps next to each
// matmul in forward() folded in (rmsnorm before; RoPE, SwiGLU or the residual add after) to save
// launches and round trips through global memory.
//
// Each block first stages its input vector in shared memory (normalized, where run.c normalizes
// first; 16-byte aligned). Then every warp takes one output row, or a pair of rows, at a time: its
// 32 lanes read the row with coalesced float4 loads and combine their partial sums with shuffles.
// Every weight is read once per token, so these kernels are bound by memory bandwidth, and they
// decide the speed. A grid of at most one wave of blocks strides over the rows, so that each block
// stages its input once for many rows.
#include "common.cuh"

// The warps of the grid take items (rows or row pairs) in turn: first_item(), then += item_stride().
__device__ __forceinline__ int first_item()
{
    return blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
}

__device__ __forceinline__ int item_stride()
{
    return gridDim.x * (blockDim.x / WARP_SIZE);
}

// xs = x (n floats), by the whole block.
__device__ void stage_input(float* xs, const float* x, int n)
{
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        xs[j] = x[j];
    __syncthreads();
}

// xs = run.c's rmsnorm(x, weight) (n floats), by the whole block; eps is run.c's 1e-5f or the
// model file's (v3).
__device__ void stage_rmsnorm(float* xs, const float* x, const float* weight, int n, float eps)
{
    __shared__ float scratch[WARP_SIZE];
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        ss += x[j] * x[j];
    ss = block_sum(ss, scratch);
    ss /= n;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        xs[j] = weight[j] * (ss * x[j]);
    __syncthreads();
}

// Dot product of the weight row w (n floats) with xs, by the whole warp; every lane gets the result.
// vec4: n % 4 == 0 and w is 16-byte aligned, so the row can be read as float4 (xs always can);
// otherwise one float at a time.
__device__ float row_dot(const float* __restrict__ w, const float* xs, int n, bool vec4)
{
    int lane = threadIdx.x % WARP_SIZE;
    float sum = 0.0f;
    if (vec4) {
        const float4* w4 = (const float4*)w;
        const float4* x4 = (const float4*)xs;
        #pragma unroll 4
        for (int j = lane; j < n / 4; j += WARP_SIZE) {
            float4 a = __ldg(w4 + j);
            float4 b = x4[j];
            sum += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        for (int j = lane; j < n; j += WARP_SIZE)
            sum += __ldg(w + j) * xs[j];
    }
    return warp_sum(sum);
}

// q, k, v = wq, wk, wv @ rmsnorm(x), then RoPE on q and k: run.c's attention rmsnorm, qkv matmuls
// and RoPE loop. k and v point at this position's row of the KV cache, so they land there directly.
// The rows of wq, wk and wv count as one (dim + 2 * kv_dim)-row matrix; a warp takes the pair of
// rows (i, i + 1) that RoPE rotates together. rope_freqs holds the head_size / 2 frequencies
// (run.c's 1 / 10000^(head_dim / head_size), or a v3 file's), computed once on the host.
__global__ void qkv_rope(const float* x, const float* rms_weight,
                         const float* wq, const float* wk, const float* wv,
                         float* q, float* k, float* v, const float* rope_freqs,
                         int dim, int kv_dim, int head_size, int pos, float eps)
{
    extern __shared__ __align__(16) float xs[];
    stage_rmsnorm(xs, x, rms_weight, dim, eps);
    bool vec4 = dim % 4 == 0 && aligned16(wq) && aligned16(wk) && aligned16(wv);
    int pairs = (dim + 2 * kv_dim) / 2;
    for (int pair = first_item(); pair < pairs; pair += item_stride()) {
        int row = 2 * pair;
        const float* w;
        float* out;
        int i;
        if (row < dim) {
            w = wq; out = q; i = row;
        } else if (row < dim + kv_dim) {
            w = wk; out = k; i = row - dim;
        } else {
            w = wv; out = v; i = row - dim - kv_dim;
        }
        float v0 = row_dot(w + (size_t)i * dim, xs, dim, vec4);
        float v1 = row_dot(w + (size_t)(i + 1) * dim, xs, dim, vec4);
        if (threadIdx.x % WARP_SIZE != 0)
            continue;
        if (row < dim + kv_dim) {  // q or k: rotate
            int head_dim = i % head_size;
            float freq = rope_freqs[head_dim / 2];
            float val = pos * freq;
            float fcr = cosf(val);
            float fci = sinf(val);
            out[i] = v0 * fcr - v1 * fci;
            out[i + 1] = v0 * fci + v1 * fcr;
        } else {
            out[i] = v0;
            out[i + 1] = v1;
        }
    }
}

// x += w @ xin: run.c's wo and w2 matmuls with the residual connection that follows each.
__global__ void matmul_residual(float* x, const float* w, const float* xin, int n, int d)
{
    extern __shared__ __align__(16) float xs[];
    stage_input(xs, xin, n);
    bool vec4 = n % 4 == 0 && aligned16(w);
    for (int row = first_item(); row < d; row += item_stride()) {
        float val = row_dot(w + (size_t)row * n, xs, n, vec4);
        if (threadIdx.x % WARP_SIZE == 0)
            x[row] += val;
    }
}

// hb = silu(w1 @ rmsnorm(x)) * (w3 @ rmsnorm(x)): run.c's ffn rmsnorm, w1 and w3 matmuls and
// SwiGLU; a warp takes row i of both w1 and w3.
__global__ void ffn_swiglu(const float* x, const float* rms_weight, const float* w1, const float* w3,
                           float* hb, int dim, int hidden_dim, float eps)
{
    extern __shared__ __align__(16) float xs[];
    stage_rmsnorm(xs, x, rms_weight, dim, eps);
    bool vec4 = dim % 4 == 0 && aligned16(w1) && aligned16(w3);
    for (int i = first_item(); i < hidden_dim; i += item_stride()) {
        float val = row_dot(w1 + (size_t)i * dim, xs, dim, vec4);
        float up = row_dot(w3 + (size_t)i * dim, xs, dim, vec4);
        if (threadIdx.x % WARP_SIZE == 0)
            hb[i] = val * (1.0f / (1.0f + expf(-val))) * up;
    }
}

// out = w @ rmsnorm(x): run.c's final rmsnorm and classifier matmul.
__global__ void rmsnorm_matmul(float* out, const float* x, const float* rms_weight, const float* w,
                               int n, int d, float eps)
{
    extern __shared__ __align__(16) float xs[];
    stage_rmsnorm(xs, x, rms_weight, n, eps);
    bool vec4 = n % 4 == 0 && aligned16(w);
    for (int row = first_item(); row < d; row += item_stride()) {
        float val = row_dot(w + (size_t)row * n, xs, n, vec4);
        if (threadIdx.x % WARP_SIZE == 0)
            out[row] = val;
    }
}
