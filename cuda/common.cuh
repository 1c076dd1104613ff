// Helpers shared by the kernels. PyCUDA's SourceModule wraps each .cu file (with this header) in
// extern "C" { ... }, so everything here is plain C: no templates, no overloads.
// Block sizes are multiples of 32, so every warp is full and the shuffles can use a full mask.
#pragma once

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v)
{
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. scratch: 32 floats of shared memory.
__device__ float block_sum(float v, float* scratch)
{
    int lane = threadIdx.x % WARP_SIZE;
    int warp = threadIdx.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be in use by a previous reduction
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / WARP_SIZE ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum over the whole block; every thread gets the result. scratch: 32 floats of shared memory.
__device__ float block_max(float v, float* scratch)
{
    int lane = threadIdx.x % WARP_SIZE;
    int warp = threadIdx.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / WARP_SIZE ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

__device__ __forceinline__ bool aligned16(const void* p)
{
    return ((size_t)p & 15) == 0;
}
