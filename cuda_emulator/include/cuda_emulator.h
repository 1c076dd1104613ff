// The CUDA dialect the emulator understands: what a kernel source sees before its first line.
//
// SourceModule compiles a module as: this header, then the kernel source inside extern "C" { },
// then one entry stub per __global__ function (see compiler.py), linked with runtime.cpp into one
// shared library. Everything is hidden, so each module has its own runtime state.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>
#include <utility>

// ----------------------------------------------------------------------------
// qualifiers

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one after another, so a function's __shared__ variables can be static storage. They
// live in their own section, which is filled with NaN before each block (extern __shared__ arrays
// are rewritten by the loader into pointers to the launch's dynamic shared memory).
#define __shared__ static __attribute__((section("cuemu_shared"), aligned(16)))

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

// ----------------------------------------------------------------------------
// the runtime's side (runtime.cpp)

namespace cuemu {

const int WARP = 32;

struct Fiber {  // a CUDA thread
    void* sp;  // its stack pointer while switched out
    int id;  // linear index in the block
    uint3 thread_idx;
    const char* file;  // where it waits
    int line;
    unsigned shuffle_mask;
    int shuffle_source;  // the lane it reads from, or -1 for __syncwarp
    uint64_t shuffle_value, shuffle_result;
};

extern Fiber* self;  // the running thread
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
extern char* dynamic_shared;

[[noreturn]] void misaligned(const void* p, size_t alignment, const char* what);
void syncthreads(const char* file, int line);
uint64_t shuffle(unsigned mask, uint64_t value, int source, const char* file, int line);

inline void check_aligned(const void* p, size_t alignment, const char* what)
{
    if ((uintptr_t)p & (alignment - 1))
        misaligned(p, alignment, what);
}

template <typename T>
inline T exchange(unsigned mask, T var, int source, const char* file, int line)
{
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffled value is 1-8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof var);
    bits = shuffle(mask, bits, source, file, line);
    memcpy(&var, &bits, sizeof var);
    return var;
}

// the lane a shuffle reads from: outside the caller's group of `width` lanes, its own
inline int source_lane(int source, int width)
{
    int lane = self->id % WARP;
    return source >= 0 && source / width == lane / width ? source : lane;
}

template <typename T>
inline T shfl_xor(unsigned mask, T var, const char* file, int line, int lane_mask, int width = WARP)
{
    return exchange(mask, var, source_lane((self->id % WARP) ^ lane_mask, width), file, line);
}

template <typename T>
inline T shfl_down(unsigned mask, T var, const char* file, int line, unsigned delta, int width = WARP)
{
    return exchange(mask, var, source_lane(self->id % WARP + (int)delta, width), file, line);
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu)
{
    shuffle(mask, 0, -1, file, line);
}

// A kernel's parameters from PyCUDA's packed buffer (the struct module's native layout: each at the
// next multiple of its alignment), and the call.
template <typename T>
inline T load(const char* p)
{
    T value;
    memcpy(&value, p, sizeof value);
    return value;
}

template <typename... A, size_t... I>
inline void invoke(void (*kernel)(A...), const char* buffer, std::index_sequence<I...>)
{
    constexpr size_t count = sizeof...(A);
    constexpr size_t sizes[count + 1] = {sizeof(A)..., 0};
    constexpr size_t aligns[count + 1] = {alignof(A)..., 1};
    size_t offsets[count + 1] = {};
    size_t at = 0;
    for (size_t i = 0; i < count; i++) {
        at = (at + aligns[i] - 1) / aligns[i] * aligns[i];
        offsets[i] = at;
        at += sizes[i];
    }
    kernel(load<A>(buffer + offsets[I])...);
}

template <typename... A>
inline void call(void (*kernel)(A...), const char* buffer)
{
    invoke(kernel, buffer, std::index_sequence_for<A...>{});
}

// What SourceModule checks prepare()'s argument types against: 0 integer, 1 floating, 2 pointer,
// 3 anything else, with sizes.
template <typename T>
constexpr int kind()
{
    return std::is_pointer<T>::value ? 2 : std::is_floating_point<T>::value ? 1
           : std::is_integral<T>::value || std::is_enum<T>::value ? 0 : 3;
}

template <typename... A>
inline int describe(void (*)(A...), int* kinds, int* sizes)
{
    const int k[] = {kind<A>()..., 0}, s[] = {(int)sizeof(A)..., 0};
    for (size_t i = 0; i < sizeof...(A); i++) {
        kinds[i] = k[i];
        sizes[i] = s[i];
    }
    return (int)sizeof...(A);
}

}  // namespace cuemu

// ----------------------------------------------------------------------------
// vector types: loads and stores of float2/float4 check their alignment as the GPU does

struct __attribute__((aligned(8))) float2 {
    float x, y;
    float2() = default;
    float2(float x_, float y_) : x(x_), y(y_) {}
    float2(const float2& o) { cuemu::check_aligned(&o, 8, "float2 load"); x = o.x; y = o.y; }
    float2& operator=(const float2& o)
    {
        cuemu::check_aligned(&o, 8, "float2 load");
        cuemu::check_aligned(this, 8, "float2 store");
        x = o.x; y = o.y;
        return *this;
    }
};

struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
    float4() = default;
    float4(float x_, float y_, float z_, float w_) : x(x_), y(y_), z(z_), w(w_) {}
    float4(const float4& o)
    {
        cuemu::check_aligned(&o, 16, "float4 load");
        x = o.x; y = o.y; z = o.z; w = o.w;
    }
    float4& operator=(const float4& o)
    {
        cuemu::check_aligned(&o, 16, "float4 load");
        cuemu::check_aligned(this, 16, "float4 store");
        x = o.x; y = o.y; z = o.z; w = o.w;
        return *this;
    }
};

static inline float2 make_float2(float x, float y) { return float2(x, y); }
static inline float4 make_float4(float x, float y, float z, float w) { return float4(x, y, z, w); }

// ----------------------------------------------------------------------------
// built-ins

#define threadIdx (static_cast<const uint3&>(cuemu::self->thread_idx))
#define blockIdx (static_cast<const uint3&>(cuemu::block_idx))
#define blockDim (static_cast<const dim3&>(cuemu::block_dim))
#define gridDim (static_cast<const dim3&>(cuemu::grid_dim))
#define warpSize 32

#ifdef __FILE_NAME__
#define CUEMU_FILE __FILE_NAME__
#else
#define CUEMU_FILE __FILE__
#endif
#define __syncthreads() cuemu::syncthreads(CUEMU_FILE, __LINE__)
#define __syncwarp(...) cuemu::syncwarp(CUEMU_FILE, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) cuemu::shfl_xor((mask), (var), CUEMU_FILE, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) cuemu::shfl_down((mask), (var), CUEMU_FILE, __LINE__, __VA_ARGS__)

template <typename T>
static inline T __ldg(const T* p)
{
    cuemu::check_aligned(p, alignof(T), "__ldg");
    return *p;
}

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
