// The CUDA dialect the emulator understands, and the runtime that runs a kernel on the CPU.
//
// SourceModule compiles a module as: this header, then the kernel source inside extern "C" { },
// then one entry stub per __global__ function (see compiler.py). Everything here is static, so each
// module (a shared library loaded with ctypes) has its own runtime state.
//
// How a launch runs: blocks one after another; inside a block every CUDA thread is a fiber (its own
// stack, switched cooperatively by cuemu_switch below) that runs until it must wait: at
// __syncthreads() for the whole block, at a shuffle for the lanes its mask names. The scheduler then
// picks the next runnable fiber by the launch's policy. Whatever a GPU would punish ends the launch
// with a message instead: a barrier nobody can complete (deadlock), a shuffle whose mask names lanes
// that do not exist or whose lanes disagree, a misaligned vector load, a fault on the guard pages
// around device and shared memory, a write into the slack bytes after dynamic shared memory.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <new>
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

namespace cuemu {
static void check_aligned(const void* p, size_t alignment, const char* what);
}

// ----------------------------------------------------------------------------
// vector types: loads and stores of float2/float4 check their alignment as the GPU does

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

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
    float4(const float4& o) { cuemu::check_aligned(&o, 16, "float4 load"); x = o.x; y = o.y; z = o.z; w = o.w; }
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
// the runtime

namespace cuemu {

enum State { RUNNABLE, AT_SYNCTHREADS, AT_SHUFFLE, EXITED };
enum Policy { IN_ORDER, WARP_AHEAD, RANDOM };
enum Result { OK = 0, LAUNCH_ERROR = 1, MEMORY_FAULT = 2, CANARY_OVERWRITTEN = 3 };

const int WARP = 32;
const size_t STACK_BYTES = 64 * 1024;  // per CUDA thread, with a guard page below
const uint32_t SHARED_FILL = 0x7fc5aaed;  // a quiet NaN: shared memory before anyone wrote it
const uint32_t CANARY = 0x7fc0dead;       // a quiet NaN: the slack bytes around allocations

struct Fiber {
    void* sp;  // saved stack pointer while switched out
    uint3 thread_idx;
    int id;  // linear index in the block
    int state;
    const char* file;  // where it waits
    int line;
    unsigned shuffle_mask;
    int shuffle_source;  // the lane it reads from, or -1 for __syncwarp
    uint64_t shuffle_value, shuffle_result;
};

struct WarpQueue {  // the runnable lanes of one warp, in the order they run
    int lanes[WARP];
    int head, count;
};

static Fiber* self;  // the running CUDA thread
static Fiber* fibers;
static char* stacks;
static int capacity;  // fibers and stacks allocated
static int nthreads, nwarps, exited;
static void* main_sp;  // the launching thread's stack while fibers run
static void (*entry)(const char*);
static const char* params;
static dim3 block_dim, grid_dim;
static uint3 block_idx;

// __syncthreads()
static int sync_arrived;
static const char* sync_file;
static int sync_line;

// shuffles: per warp, the lanes that exist, have arrived at a shuffle, have exited
// and the union of the masks of the arrived lanes
static unsigned present[WARP], arrived[WARP], gone[WARP], claimed[WARP];

// run queue
static int policy;
static uint64_t rng;
static int* fifo;  // IN_ORDER: one queue for the block
static int fifo_head, fifo_count;
static WarpQueue warp_queue[WARP];  // WARP_AHEAD, RANDOM: one queue per warp ...
static int warp_at_rank[WARP], rank_of_warp[WARP];  // ... taken by priority rank
static unsigned ready_ranks;

// dynamic shared memory: the buffer ends at a guard page
static char* shared_area;
static size_t shared_area_bytes;
static char* dynamic_shared;
static size_t dynamic_shared_bytes;

// errors
static char* error;
static size_t error_bytes;
static sigjmp_buf fault_jump;
static volatile sig_atomic_t in_launch;
static void* volatile fault_address;
static volatile int fault_is_write;

extern "C" char __start_cuemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_cuemu_shared[] __attribute__((weak, visibility("hidden")));

}  // namespace cuemu

// The context switch: saves the callee-saved registers on the current stack, stores its pointer in
// *save, continues on the stack `to` (x86-64 System V).
extern "C" void cuemu_switch(void** save, void* to);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl cuemu_switch\n"
    ".hidden cuemu_switch\n"
    ".type cuemu_switch, @function\n"
    "cuemu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size cuemu_switch, .-cuemu_switch\n");

namespace cuemu {

static uint64_t random_next()  // splitmix64
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill32(void* p, size_t bytes, uint32_t word)  // word-aligned pattern by address
{
    unsigned char* b = (unsigned char*)p;
    for (size_t i = 0; i < bytes; i++)
        b[i] = (unsigned char)(word >> (8 * (((uintptr_t)(b + i)) & 3)));
}

// The first byte in [p, p + bytes) that differs from the pattern fill32 wrote, or null.
static const void* changed32(const void* p, size_t bytes, uint32_t word)
{
    const unsigned char* b = (const unsigned char*)p;
    for (size_t i = 0; i < bytes; i++)
        if (b[i] != (unsigned char)(word >> (8 * (((uintptr_t)(b + i)) & 3))))
            return b + i;
    return nullptr;
}

// "3", "0-31", "0-15, 17, 20-31"
static void format_threads(char* out, size_t size, const bool* chosen, int n)
{
    size_t used = 0;
    out[0] = 0;
    for (int i = 0; i < n && used + 24 < size; i++) {
        if (!chosen[i] || (i > 0 && chosen[i - 1]))
            continue;
        int j = i;
        while (j + 1 < n && chosen[j + 1])
            j++;
        used += snprintf(out + used, size - used, j > i ? "%s%d-%d" : "%s%d", used ? ", " : "", i, j);
    }
}

static void describe_thread(char* out, size_t size, const Fiber* f)
{
    snprintf(out, size, "block (%u,%u,%u) thread (%u,%u,%u)", block_idx.x, block_idx.y, block_idx.z,
             f->thread_idx.x, f->thread_idx.y, f->thread_idx.z);
}

// Ends the launch with a message: back to the launching stack, never to return.
__attribute__((noreturn, format(printf, 1, 2))) static void fail(const char* format, ...)
{
    va_list ap;
    va_start(ap, format);
    vsnprintf(error, error_bytes, format, ap);
    va_end(ap);
    siglongjmp(fault_jump, LAUNCH_ERROR);
}

static void check_aligned(const void* p, size_t alignment, const char* what)
{
    if (((uintptr_t)p & (alignment - 1)) == 0)
        return;
    char who[96];
    describe_thread(who, sizeof who, self);
    fail("%s: misaligned %s at %p (needs %zu-byte alignment)", who, what, p, alignment);
}

// ---- the run queue

static void push(Fiber* f)
{
    if (policy == IN_ORDER) {
        fifo[(fifo_head + fifo_count++) % nthreads] = f->id;
        return;
    }
    int w = f->id / WARP;
    WarpQueue* q = &warp_queue[w];
    q->lanes[(q->head + q->count++) % WARP] = f->id;
    ready_ranks |= 1u << rank_of_warp[w];
}

static Fiber* pop()
{
    if (policy == IN_ORDER) {
        if (fifo_count == 0)
            return nullptr;
        int id = fifo[fifo_head];
        fifo_head = (fifo_head + 1) % nthreads;
        fifo_count--;
        return &fibers[id];
    }
    if (ready_ranks == 0)
        return nullptr;
    int w = warp_at_rank[__builtin_ctz(ready_ranks)];
    WarpQueue* q = &warp_queue[w];
    int id = q->lanes[q->head];
    q->head = (q->head + 1) % WARP;
    if (--q->count == 0)
        ready_ranks &= ~(1u << rank_of_warp[w]);
    return &fibers[id];
}

// Which warp runs ahead: WARP_AHEAD keeps warp 0 first, RANDOM draws a new order at each
// __syncthreads(). Only called when no lane is queued.
static void rank_warps()
{
    for (int r = 0; r < nwarps; r++)
        warp_at_rank[r] = r;
    if (policy == RANDOM)
        for (int r = nwarps - 1; r > 0; r--) {
            int s = (int)(random_next() % (uint64_t)(r + 1));
            int t = warp_at_rank[r];
            warp_at_rank[r] = warp_at_rank[s];
            warp_at_rank[s] = t;
        }
    for (int r = 0; r < nwarps; r++)
        rank_of_warp[warp_at_rank[r]] = r;
}

// Makes the lanes `lanes` of warp w runnable, in lane order (RANDOM: in a random order).
static void release_lanes(int w, unsigned lanes)
{
    int order[WARP], n = 0;
    for (unsigned m = lanes; m; m &= m - 1)
        order[n++] = w * WARP + __builtin_ctz(m);
    if (policy == RANDOM)
        for (int i = n - 1; i > 0; i--) {
            int s = (int)(random_next() % (uint64_t)(i + 1));
            int t = order[i];
            order[i] = order[s];
            order[s] = t;
        }
    for (int i = 0; i < n; i++) {
        fibers[order[i]].state = RUNNABLE;
        push(&fibers[order[i]]);
    }
}

// The running fiber cannot go on (it waits, or has exited): run the next one, or go back to the
// launching stack when nothing can run (the block is done, or deadlocked).
static void run_next()
{
    Fiber* me = self;
    Fiber* next = pop();
    if (next == me)
        return;
    if (next == nullptr) {
        cuemu_switch(&me->sp, main_sp);
        return;  // not reached: the launcher never resumes a fiber of a finished block
    }
    self = next;
    cuemu_switch(&me->sp, next->sp);
}

// ---- barriers

static void syncthreads(const char* file, int line)
{
    Fiber* me = self;
    if (sync_arrived > 0 && (line != sync_line || strcmp(file, sync_file) != 0)) {
        char who[96];
        describe_thread(who, sizeof who, me);
        fail("%s: divergent __syncthreads(): it waits at %s:%d while other threads of the block "
             "wait at %s:%d", who, file, line, sync_file, sync_line);
    }
    sync_file = file;
    sync_line = line;
    me->state = AT_SYNCTHREADS;
    me->file = file;
    me->line = line;
    if (++sync_arrived == nthreads) {
        sync_arrived = 0;
        if (policy != IN_ORDER)
            rank_warps();
        for (int w = 0; w < nwarps; w++)
            release_lanes(w, present[w]);
    }
    run_next();
}

// The lanes of `mask` in warp w have all arrived or exited: each arrived lane gets its value.
static void complete_shuffle(int w, unsigned mask)
{
    unsigned waiting = arrived[w] & mask;
    for (unsigned m = waiting; m; m &= m - 1) {
        Fiber* f = &fibers[w * WARP + __builtin_ctz(m)];
        if (f->shuffle_source < 0)
            continue;
        if (!(waiting >> f->shuffle_source & 1)) {
            char who[96];
            describe_thread(who, sizeof who, f);
            fail("%s: the shuffle at %s:%d reads lane %d, which %s", who, f->file, f->line,
                 f->shuffle_source,
                 (mask >> f->shuffle_source & 1) ? "has exited" : "is not in the mask");
        }
        f->shuffle_result = fibers[w * WARP + f->shuffle_source].shuffle_value;
    }
    arrived[w] &= ~mask;
    claimed[w] &= ~mask;
    release_lanes(w, waiting);
}

static bool same_shuffle(const Fiber* f, unsigned mask, const char* file, int line)
{
    return f->shuffle_mask == mask && f->line == line && (f->file == file || strcmp(f->file, file) == 0);
}

__attribute__((noreturn)) static void disagree(const Fiber* me, const Fiber* f, unsigned mask,
                                               const char* file, int line)
{
    char who[96];
    describe_thread(who, sizeof who, me);
    fail("%s: lanes of warp %d disagree: lane %d is at the shuffle at %s:%d with mask 0x%08x, "
         "lane %d at %s:%d with mask 0x%08x", who, me->id / WARP, me->id % WARP, file, line, mask,
         f->id % WARP, f->file, f->line, f->shuffle_mask);
}

// A lane arrives at a shuffle (source >= 0: it reads that lane's value) or at __syncwarp (-1).
static uint64_t shuffle(unsigned mask, uint64_t value, int source, const char* file, int line)
{
    Fiber* me = self;
    int w = me->id / WARP, lane = me->id % WARP;
    char who[96];
    if (!(mask >> lane & 1)) {
        describe_thread(who, sizeof who, me);
        fail("%s: the shuffle at %s:%d has mask 0x%08x, which does not name its own lane %d", who,
             file, line, mask, lane);
    }
    if (mask & ~present[w]) {
        describe_thread(who, sizeof who, me);
        fail("%s: the shuffle at %s:%d has mask 0x%08x, which names lanes that do not exist "
             "(warp %d of a %d-thread block has lanes 0x%08x)", who, file, line, mask, w, nthreads,
             present[w]);
    }
    // The lanes it meets (arrived lanes of its mask, or whose mask names it) must be at the same
    // shuffle with the same mask. Lanes that met were checked against each other, so one lane of
    // its mask stands for all; lanes outside its mask are looked at only if one of them names it.
    if (arrived[w] & mask) {
        Fiber* f = &fibers[w * WARP + __builtin_ctz(arrived[w] & mask)];
        if (!same_shuffle(f, mask, file, line))
            disagree(me, f, mask, file, line);
    }
    if ((arrived[w] & ~mask) && (claimed[w] >> lane & 1))
        for (unsigned m = arrived[w] & ~mask; m; m &= m - 1) {
            Fiber* f = &fibers[w * WARP + __builtin_ctz(m)];
            if (f->shuffle_mask >> lane & 1)
                disagree(me, f, mask, file, line);
        }
    me->state = AT_SHUFFLE;
    me->file = file;
    me->line = line;
    me->shuffle_mask = mask;
    me->shuffle_source = source;
    me->shuffle_value = value;
    arrived[w] |= 1u << lane;
    claimed[w] |= mask;
    if (((arrived[w] | gone[w]) & mask) == mask)
        complete_shuffle(w, mask);
    run_next();
    return me->shuffle_result;
}

template <typename T>
static T shfl_xor(unsigned mask, T var, const char* file, int line, int lane_mask, int width = WARP)
{
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffled value is 1-8 bytes");
    int lane = self->id % WARP;
    int source = lane ^ lane_mask;
    if (source / width != lane / width)  // outside its group of `width` lanes: its own value
        source = lane;
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof var);
    bits = shuffle(mask, bits, source, file, line);
    memcpy(&var, &bits, sizeof var);
    return var;
}

template <typename T>
static T shfl_down(unsigned mask, T var, const char* file, int line, unsigned delta, int width = WARP)
{
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffled value is 1-8 bytes");
    int lane = self->id % WARP;
    int source = lane + (int)delta;
    if (source / width != lane / width)
        source = lane;
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof var);
    bits = shuffle(mask, bits, source, file, line);
    memcpy(&var, &bits, sizeof var);
    return var;
}

static void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu)
{
    shuffle(mask, 0, -1, file, line);
}

// ---- a block

__attribute__((noreturn)) static void fiber_main()
{
    entry(params);
    Fiber* me = self;
    int w = me->id / WARP;
    me->state = EXITED;
    exited++;
    gone[w] |= 1u << (me->id % WARP);
    // lanes waiting at a shuffle may have waited for this one only
    for (unsigned m = arrived[w]; m;) {
        unsigned group = fibers[w * WARP + __builtin_ctz(m)].shuffle_mask;
        if (((arrived[w] | gone[w]) & group) == group)
            complete_shuffle(w, group);
        m &= ~group;
    }
    run_next();
    __builtin_unreachable();
}

// The stack of a fiber that has not started: cuemu_switch pops six registers and "returns" into
// fiber_main with the stack aligned as after a call.
static void start_fiber(Fiber* f)
{
    void** top = (void**)(stacks + (size_t)(f->id + 1) * (STACK_BYTES + 4096));
    top -= 2;
    top[0] = (void*)&fiber_main;
    top[1] = nullptr;
    top -= 6;
    for (int i = 0; i < 6; i++)
        top[i] = nullptr;
    f->sp = top;
}

static bool ensure_capacity(int n)
{
    if (n <= capacity)
        return true;
    size_t slot = STACK_BYTES + 4096;
    char* s = (char*)mmap(nullptr, slot * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED)
        return false;
    for (int i = 0; i < n; i++)
        mprotect(s + slot * i, 4096, PROT_NONE);  // below each stack: a guard page
    Fiber* f = new (std::nothrow) Fiber[n];
    int* q = new (std::nothrow) int[n];
    if (!f || !q) {
        munmap(s, slot * n);
        delete[] f;
        delete[] q;
        return false;
    }
    if (stacks) {
        munmap(stacks, slot * capacity);
        delete[] fibers;
        delete[] fifo;
    }
    stacks = s;
    fibers = f;
    fifo = q;
    capacity = n;
    return true;
}

static bool ensure_shared(size_t bytes)
{
    size_t need = (bytes + 16 + 4095) / 4096 * 4096;
    if (need <= shared_area_bytes)
        return true;
    char* a = (char*)mmap(nullptr, need + 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return false;
    mprotect(a, 4096, PROT_NONE);
    mprotect(a + 4096 + need, 4096, PROT_NONE);
    if (shared_area)
        munmap(shared_area - 4096, shared_area_bytes + 2 * 4096);
    shared_area = a + 4096;
    shared_area_bytes = need;
    return true;
}

static void describe_deadlock()
{
    static bool chosen[1024];
    char list[512];
    size_t used = snprintf(error, error_bytes, "block (%u,%u,%u): deadlock:", block_idx.x,
                           block_idx.y, block_idx.z);
    // each group: the threads waiting at one place
    static bool done[1024];
    memset(done, 0, sizeof done);
    for (int i = 0; i < nthreads && used < error_bytes; i++) {
        if (done[i])
            continue;
        const Fiber* a = &fibers[i];
        memset(chosen, 0, sizeof chosen);
        for (int j = i; j < nthreads; j++) {
            const Fiber* b = &fibers[j];
            bool same = b->state == a->state &&
                        (a->state == EXITED || (b->line == a->line && strcmp(b->file, a->file) == 0));
            if (same && !done[j])
                chosen[j] = done[j] = true;
        }
        format_threads(list, sizeof list, chosen, nthreads);
        if (a->state == EXITED)
            used += snprintf(error + used, error_bytes - used, "%s threads %s exited", i ? ";" : "", list);
        else
            used += snprintf(error + used, error_bytes - used, "%s threads %s wait at %s (%s:%d)",
                             i ? ";" : "", list,
                             a->state == AT_SYNCTHREADS ? "__syncthreads()" : "a warp shuffle",
                             a->file, a->line);
    }
}

static void on_fault(int sig, siginfo_t* info, void* context)
{
    if (!in_launch) {  // not ours: the default action
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    fault_address = info->si_addr;
    fault_is_write = sig == SIGSEGV && (((ucontext_t*)context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    siglongjmp(fault_jump, sig == SIGSEGV || sig == SIGBUS ? MEMORY_FAULT : LAUNCH_ERROR);
}

static int run_block()
{
    nwarps = (nthreads + WARP - 1) / WARP;
    exited = 0;
    sync_arrived = 0;
    for (int w = 0; w < nwarps; w++) {
        int lanes = nthreads - w * WARP < WARP ? nthreads - w * WARP : WARP;
        present[w] = lanes == WARP ? 0xffffffffu : (1u << lanes) - 1;
        arrived[w] = gone[w] = claimed[w] = 0;
        warp_queue[w].head = warp_queue[w].count = 0;
    }
    fifo_head = fifo_count = 0;
    ready_ranks = 0;
    if (policy != IN_ORDER)
        rank_warps();
    fill32(dynamic_shared, dynamic_shared_bytes, SHARED_FILL);
    if (__start_cuemu_shared)
        fill32(__start_cuemu_shared, __stop_cuemu_shared - __start_cuemu_shared, SHARED_FILL);
    for (int i = 0; i < nthreads; i++) {
        Fiber* f = &fibers[i];
        f->id = i;
        f->thread_idx.x = i % block_dim.x;
        f->thread_idx.y = i / block_dim.x % block_dim.y;
        f->thread_idx.z = i / (block_dim.x * block_dim.y);
        f->state = RUNNABLE;
        f->file = "";
        f->line = 0;
        start_fiber(f);
    }
    for (int w = 0; w < nwarps; w++)
        release_lanes(w, present[w]);
    self = pop();
    cuemu_switch(&main_sp, self->sp);
    if (exited < nthreads) {
        describe_deadlock();
        return LAUNCH_ERROR;
    }
    char* end = shared_area + shared_area_bytes;
    if (changed32(dynamic_shared + dynamic_shared_bytes, end - (dynamic_shared + dynamic_shared_bytes), CANARY)) {
        snprintf(error, error_bytes, "block (%u,%u,%u): a write past the end of the %zu bytes of "
                 "dynamic shared memory", block_idx.x, block_idx.y, block_idx.z, dynamic_shared_bytes);
        return LAUNCH_ERROR;
    }
    return OK;
}

}  // namespace cuemu

// Runs kernel `kernel` (an entry stub: it unpacks `kernel_params` and calls the kernel) over the
// grid. Returns OK; LAUNCH_ERROR with a message; MEMORY_FAULT with the start of a message, the
// faulting address in *fault and whether it wrote in *fault_write; or CANARY_OVERWRITTEN with the
// first overwritten byte in *fault. `canaries` holds n_canaries (address, length) pairs: the slack
// bytes around the device allocations the kernel was given, checked after the launch.
extern "C" __attribute__((visibility("default"))) int cuemu_launch(
    void (*kernel)(const char*), const char* kernel_params, unsigned gx, unsigned gy, unsigned gz,
    unsigned bx, unsigned by, unsigned bz, size_t shared_bytes, int policy, uint64_t seed,
    const uint64_t* canaries, int n_canaries, char* message, size_t message_bytes, uint64_t* fault,
    int* fault_write)
{
    using namespace cuemu;
    int n = (int)(bx * by * bz);
    error = message;
    error_bytes = message_bytes;
    message[0] = 0;
    *fault = 0;
    *fault_write = 0;
    if (!ensure_capacity(n) || !ensure_shared(shared_bytes)) {
        snprintf(message, message_bytes, "out of host memory for %d threads", n);
        return LAUNCH_ERROR;
    }
    entry = kernel;
    params = kernel_params;
    block_dim = dim3{bx, by, bz};
    grid_dim = dim3{gx, gy, gz};
    nthreads = n;
    cuemu::policy = policy;
    rng = seed;
    char* end = shared_area + shared_area_bytes;
    dynamic_shared = end - (shared_bytes + 15) / 16 * 16;
    dynamic_shared_bytes = shared_bytes;
    fill32(shared_area, shared_area_bytes, CANARY);

    uint64_t blocks = (uint64_t)gx * gy * gz;
    uint32_t* order = new (std::nothrow) uint32_t[blocks];
    if (!order) {
        snprintf(message, message_bytes, "out of host memory for %llu blocks", (unsigned long long)blocks);
        return LAUNCH_ERROR;
    }
    for (uint64_t b = 0; b < blocks; b++)
        order[b] = (uint32_t)b;
    if (policy == RANDOM)
        for (uint64_t b = blocks - 1; b > 0; b--) {
            uint64_t s = random_next() % (b + 1);
            uint32_t t = order[b];
            order[b] = order[s];
            order[s] = t;
        }

    // faults while the kernel runs end the launch; the signal handler runs on its own stack
    static char* alt_stack;
    if (!alt_stack)
        alt_stack = (char*)mmap(nullptr, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    stack_t alt = {}, old_alt;
    alt.ss_sp = alt_stack;
    alt.ss_size = 65536;
    sigaltstack(&alt, &old_alt);
    struct sigaction action = {}, old_segv, old_bus, old_fpe;
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
    sigaction(SIGFPE, &action, &old_fpe);

    int result = OK;
    int jumped = sigsetjmp(fault_jump, 1);
    if (jumped == 0) {
        in_launch = 1;
        for (uint64_t b = 0; b < blocks && result == OK; b++) {
            block_idx = uint3{(unsigned)(order[b] % gx), (unsigned)(order[b] / gx % gy),
                              (unsigned)(order[b] / ((uint64_t)gx * gy))};
            result = run_block();
        }
    } else {  // fail() or a signal
        result = jumped;
        char who[96];
        describe_thread(who, sizeof who, self);
        char* a = (char*)fault_address;
        char* stack_lo = stacks + (size_t)self->id * (STACK_BYTES + 4096);
        if (jumped == LAUNCH_ERROR && message[0] == 0) {
            snprintf(message, message_bytes, "%s: arithmetic fault (integer division by zero?)", who);
        } else if (jumped == MEMORY_FAULT) {
            const char* what = nullptr;
            if (a >= stack_lo && a < stack_lo + 4096)
                what = "stack overflow";
            else if (a >= end && a < end + 4096)
                what = "out of bounds of the dynamic shared memory (past its end)";
            else if (a >= shared_area - 4096 && a < dynamic_shared)
                what = "out of bounds of the dynamic shared memory (before its start)";
            if (what) {
                snprintf(message, message_bytes, "%s: %s, %s %p", who, what,
                         fault_is_write ? "writing" : "reading", fault_address);
                result = LAUNCH_ERROR;
            } else {  // the caller knows the allocations: it says where the address lies
                snprintf(message, message_bytes, "%s: invalid address, ", who);
                *fault = (uint64_t)(uintptr_t)fault_address;
                *fault_write = fault_is_write;
            }
        }
    }
    in_launch = 0;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaction(SIGFPE, &old_fpe, nullptr);
    sigaltstack(&old_alt, nullptr);
    delete[] order;

    for (int i = 0; i < n_canaries && result == OK; i++)
        if (const void* changed = changed32((const void*)(uintptr_t)canaries[2 * i], canaries[2 * i + 1], CANARY)) {
            *fault = (uint64_t)(uintptr_t)changed;
            result = CANARY_OVERWRITTEN;
        }
    return result;
}

// Static shared memory of the module (for SHARED_SIZE_BYTES when nvcc is absent).
extern "C" __attribute__((visibility("default"))) size_t cuemu_static_shared_bytes()
{
    return cuemu::__start_cuemu_shared ? (size_t)(cuemu::__stop_cuemu_shared - cuemu::__start_cuemu_shared) : 0;
}

namespace cuemu {
template <typename T>
static T load(const char* p)
{
    T value;
    memcpy(&value, p, sizeof value);
    return value;
}
}  // namespace cuemu

// Unpacks the kernel's parameters from PyCUDA's packed buffer (struct module's native layout:
// each at the next multiple of its alignment) and calls it.
namespace cuemu {
template <typename... A, size_t... I>
static void invoke(void (*kernel)(A...), const char* buffer, std::index_sequence<I...>)
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
}  // namespace cuemu

// ----------------------------------------------------------------------------
// the CUDA built-ins kernels use

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
