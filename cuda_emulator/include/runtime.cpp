// The emulator's runtime: runs a kernel's grid on the CPU, one block after another.
//
// Inside a block every CUDA thread is a fiber (its own stack, switched by cuemu_switch below) that
// runs until it must wait: at __syncthreads() for the whole block, at a shuffle for the lanes its
// mask names. The next fiber to run is the first runnable lane of the warp with the best rank: a
// warp runs as far as it can before the next one starts. IN_ORDER ranks warps by number and takes
// lanes in order; RANDOM draws the warps' ranks anew at each __syncthreads(), picks lanes at random
// and runs the blocks in a random order. Whatever a GPU would punish ends the launch with a message
// instead: a barrier nobody can complete (deadlock), a shuffle whose mask names lanes that do not
// exist or whose lanes disagree, a misaligned vector access, a fault on the guard pages around
// device memory, shared memory and the fiber stacks, a write into the slack bytes after dynamic
// shared memory or around the allocations the kernel was given.
#include "cuda_emulator.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <new>

namespace cuemu {

Fiber* self;
uint3 block_idx;
dim3 block_dim, grid_dim;
char* dynamic_shared;

namespace {

enum Policy { IN_ORDER, RANDOM };
enum Result { OK, LAUNCH_ERROR, MEMORY_FAULT, CANARY_OVERWRITTEN };

const size_t PAGE = 4096;
const size_t STACK_BYTES = 64 * 1024;  // per CUDA thread, with a guard page below
const uint32_t SHARED_FILL = 0x7fc5aaed;  // a quiet NaN: shared memory before anyone wrote it
const uint32_t CANARY = 0x7fc0dead;       // a quiet NaN: the slack bytes after dynamic shared memory

struct Warp {  // its lanes as bit masks
    unsigned present, runnable, at_sync, arrived, gone;  // arrived: waiting at a shuffle
    unsigned group_mask;  // the shuffle its first arrived lane waits at
    const char* group_file;
    int group_line;
};

Fiber* fibers;
char* stacks;
int capacity;  // fibers and stacks allocated
int nthreads, nwarps, exited;
Warp warps[WARP];
void* main_sp;  // the launching thread's stack while fibers run
void (*entry)(const char*);
const char* params;

int sync_arrived;  // __syncthreads()
const char* sync_file;
int sync_line;

int policy;
uint64_t rng;
int warp_at_rank[WARP], rank_of_warp[WARP];
unsigned ready_ranks;  // the ranks of the warps with runnable lanes

char* shared_area;  // dynamic shared memory ends at its end, a guard page follows
size_t shared_area_bytes, dynamic_shared_bytes;

char* error;
size_t error_bytes;
sigjmp_buf fault_jump;
void* volatile fault_address;
volatile int fault_is_write;

}  // namespace
}  // namespace cuemu

extern "C" char __start_cuemu_shared[] __attribute__((weak));
extern "C" char __stop_cuemu_shared[] __attribute__((weak));

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
namespace {

uint64_t random_next()  // splitmix64
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void fill32(void* p, size_t bytes, uint32_t word)  // the pattern by address: word-aligned
{
    unsigned char* b = (unsigned char*)p;
    size_t i = 0;
    for (; i < bytes && ((uintptr_t)(b + i) & 3); i++)
        b[i] = (unsigned char)(word >> (8 * ((uintptr_t)(b + i) & 3)));
    for (; i + 4 <= bytes; i += 4)
        memcpy(b + i, &word, 4);
    for (; i < bytes; i++)
        b[i] = (unsigned char)(word >> (8 * ((uintptr_t)(b + i) & 3)));
}

// The first byte in [p, p + bytes) that differs from what fill32 wrote, or null.
const void* changed32(const void* p, size_t bytes, uint32_t word)
{
    const unsigned char* b = (const unsigned char*)p;
    for (size_t i = 0; i < bytes; i++)
        if (b[i] != (unsigned char)(word >> (8 * ((uintptr_t)(b + i) & 3))))
            return b + i;
    return nullptr;
}

void describe_thread(char* out, size_t size, const Fiber* f)
{
    snprintf(out, size, "block (%u,%u,%u) thread (%u,%u,%u)", block_idx.x, block_idx.y, block_idx.z,
             f->thread_idx.x, f->thread_idx.y, f->thread_idx.z);
}

// Ends the launch with a message about thread f: back to the launching stack, never to return.
// Out of line, so that the paths that check stay small.
__attribute__((noreturn, noinline, cold, format(printf, 2, 3)))
void fail(const Fiber* f, const char* format, ...)
{
    describe_thread(error, error_bytes, f);
    size_t used = strlen(error);
    used += snprintf(error + used, error_bytes - used, ": ");
    va_list ap;
    va_start(ap, format);
    vsnprintf(error + used, error_bytes - used, format, ap);
    va_end(ap);
    siglongjmp(fault_jump, LAUNCH_ERROR);
}

// ---- the run queue

void make_runnable(int w, unsigned lanes)
{
    warps[w].runnable |= lanes;
    ready_ranks |= 1u << rank_of_warp[w];
}

Fiber* pop()
{
    if (ready_ranks == 0)
        return nullptr;
    int rank = __builtin_ctz(ready_ranks);
    int w = warp_at_rank[rank];
    unsigned lanes = warps[w].runnable;
    int lane;
    if (policy == RANDOM) {  // the first runnable lane from a random one on
        int k = (int)(random_next() & (WARP - 1));
        lane = (__builtin_ctz((lanes >> k) | (lanes << ((WARP - k) & (WARP - 1)))) + k) & (WARP - 1);
    } else {
        lane = __builtin_ctz(lanes);
    }
    warps[w].runnable = lanes & ~(1u << lane);
    if (warps[w].runnable == 0)
        ready_ranks &= ~(1u << rank);
    return &fibers[w * WARP + lane];
}

// The warps' ranks: IN_ORDER keeps warp 0 first, RANDOM draws a new order. Only called when no lane
// is runnable.
void rank_warps()
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

// The running fiber cannot go on (it waits, or has exited): run the next one, or go back to the
// launching stack when nothing can run (the block is done, or deadlocked).
void run_next()
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

// ---- shuffles

__attribute__((noreturn, noinline, cold)) void disagree(const Fiber* me, const Fiber* f, unsigned mask,
                                                        const char* file, int line)
{
    fail(me, "lanes of warp %d disagree: lane %d is at the shuffle at %s:%d with mask 0x%08x, "
         "lane %d at %s:%d with mask 0x%08x", me->id / WARP, me->id % WARP, file, line, mask,
         f->id % WARP, f->file, f->line, f->shuffle_mask);
}

// The lanes a shuffle meets (arrived lanes of its mask, or whose mask names it) must wait at the same
// shuffle with the same mask. Lanes that met were checked against each other, so one lane of the
// mask stands for all of it.
__attribute__((noinline)) void check_meeting(const Fiber* me, const Warp* warp, unsigned mask,
                                             const char* file, int line)
{
    const Fiber* base = &fibers[me->id / WARP * WARP];
    if (warp->arrived & mask) {
        const Fiber* f = base + __builtin_ctz(warp->arrived & mask);
        if (f->shuffle_mask != mask || f->line != line || (f->file != file && strcmp(f->file, file)))
            disagree(me, f, mask, file, line);
    }
    for (unsigned m = warp->arrived & ~mask; m; m &= m - 1) {
        const Fiber* f = base + __builtin_ctz(m);
        if (f->shuffle_mask >> (me->id % WARP) & 1)
            disagree(me, f, mask, file, line);
    }
}

// All lanes of `mask` in warp w have arrived or exited: each arrived lane gets its value.
void complete_shuffle(int w, unsigned mask)
{
    Warp* warp = &warps[w];
    Fiber* base = &fibers[w * WARP];
    unsigned waiting = warp->arrived & mask;
    for (unsigned m = waiting; m; m &= m - 1) {
        Fiber* f = base + __builtin_ctz(m);
        int source = f->shuffle_source;
        if (source < 0)
            continue;
        if (!(waiting >> source & 1))
            fail(f, "the shuffle at %s:%d reads lane %d, which %s", f->file, f->line, source,
                 (mask >> source & 1) ? "has exited" : "is not in the mask");
        f->shuffle_result = base[source].shuffle_value;
    }
    warp->arrived &= ~mask;
    if (warp->arrived) {  // another group of lanes still waits
        const Fiber* f = base + __builtin_ctz(warp->arrived);
        warp->group_mask = f->shuffle_mask;
        warp->group_file = f->file;
        warp->group_line = f->line;
    }
    make_runnable(w, waiting);
}

}  // namespace

void syncthreads(const char* file, int line)
{
    Fiber* me = self;
    if (sync_arrived == 0) {
        sync_file = file;
        sync_line = line;
    } else if (line != sync_line || (file != sync_file && strcmp(file, sync_file) != 0)) {
        fail(me, "divergent __syncthreads(): it waits at %s:%d while other threads of the block "
             "wait at %s:%d", file, line, sync_file, sync_line);
    }
    me->file = file;
    me->line = line;
    warps[me->id / WARP].at_sync |= 1u << (me->id % WARP);
    if (++sync_arrived == nthreads) {
        sync_arrived = 0;
        if (policy == RANDOM)
            rank_warps();
        for (int w = 0; w < nwarps; w++) {
            warps[w].at_sync = 0;
            warps[w].runnable = warps[w].present;
        }
        ready_ranks = nwarps == WARP ? ~0u : (1u << nwarps) - 1;
    }
    run_next();
}

// A lane arrives at a shuffle (source >= 0: it reads that lane's value) or at __syncwarp (-1).
uint64_t shuffle(unsigned mask, uint64_t value, int source, const char* file, int line)
{
    Fiber* me = self;
    int w = me->id / WARP, lane = me->id % WARP;
    Warp* warp = &warps[w];
    if (!(mask >> lane & 1))
        fail(me, "the shuffle at %s:%d has mask 0x%08x, which does not name its own lane %d", file,
             line, mask, lane);
    if (mask & ~warp->present)
        fail(me, "the shuffle at %s:%d has mask 0x%08x, which names lanes that do not exist "
             "(warp %d of a %d-thread block has lanes 0x%08x)", file, line, mask, w, nthreads,
             warp->present);
    if (warp->arrived == 0) {
        warp->group_mask = mask;
        warp->group_file = file;
        warp->group_line = line;
    } else if (mask != warp->group_mask || line != warp->group_line || file != warp->group_file
               || (warp->arrived & ~mask)) {
        check_meeting(me, warp, mask, file, line);
    }
    me->file = file;
    me->line = line;
    me->shuffle_mask = mask;
    me->shuffle_source = source;
    me->shuffle_value = value;
    warp->arrived |= 1u << lane;
    if (((warp->arrived | warp->gone) & mask) == mask)
        complete_shuffle(w, mask);
    run_next();
    return me->shuffle_result;
}

void misaligned(const void* p, size_t alignment, const char* what)
{
    fail(self, "misaligned %s at %p (needs %zu-byte alignment)", what, p, alignment);
}

namespace {

// ---- a block

__attribute__((noreturn)) void fiber_main()
{
    entry(params);
    Fiber* me = self;
    int w = me->id / WARP;
    Warp* warp = &warps[w];
    warp->gone |= 1u << (me->id % WARP);
    exited++;
    // lanes waiting at a shuffle may have waited for this one only
    for (unsigned m = warp->arrived; m; m &= warp->arrived) {
        unsigned group = fibers[w * WARP + __builtin_ctz(m)].shuffle_mask;
        if (((warp->arrived | warp->gone) & group) == group)
            complete_shuffle(w, group);
        m &= ~group;
    }
    run_next();
    __builtin_unreachable();
}

// A fiber about to start: cuemu_switch pops six registers and "returns" into fiber_main with the
// stack aligned as after a call. The stacks' tops are staggered: at the same offset in every
// page, the stacks' hot lines would all compete for the same cache sets.
void start_fiber(Fiber* f)
{
    size_t stagger = (size_t)f->id * 1088 % 16384 / 16 * 16;
    void** top = (void**)(stacks + (size_t)(f->id + 1) * (STACK_BYTES + PAGE) - stagger);
    top -= 2;
    top[0] = (void*)&fiber_main;
    top[1] = nullptr;
    top -= 6;
    for (int i = 0; i < 6; i++)
        top[i] = nullptr;
    f->sp = top;
}

bool ensure_capacity(int n)
{
    if (n <= capacity)
        return true;
    size_t slot = STACK_BYTES + PAGE;
    char* s = (char*)mmap(nullptr, slot * n, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED)
        return false;
    for (int i = 0; i < n; i++)
        mprotect(s + slot * i, PAGE, PROT_NONE);  // below each stack: a guard page
    Fiber* f = new (std::nothrow) Fiber[n];
    if (!f) {
        munmap(s, slot * n);
        return false;
    }
    if (stacks) {
        munmap(stacks, slot * capacity);
        delete[] fibers;
    }
    stacks = s;
    fibers = f;
    capacity = n;
    return true;
}

bool ensure_shared(size_t bytes)
{
    size_t need = (bytes + 16 + PAGE - 1) / PAGE * PAGE;
    if (need <= shared_area_bytes)
        return true;
    char* a = (char*)mmap(nullptr, need + 2 * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return false;
    mprotect(a, PAGE, PROT_NONE);
    mprotect(a + PAGE + need, PAGE, PROT_NONE);
    if (shared_area)
        munmap(shared_area - PAGE, shared_area_bytes + 2 * PAGE);
    shared_area = a + PAGE;
    shared_area_bytes = need;
    return true;
}

// "3", "0-31", "0-15, 17, 20-31"
void format_threads(char* out, size_t size, const bool* chosen, int n)
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

// Nothing can run but some threads have not exited: the threads, grouped by where they are.
void describe_deadlock()
{
    static bool chosen[1024], done[1024];
    char list[512];
    size_t used = snprintf(error, error_bytes, "block (%u,%u,%u): deadlock:", block_idx.x,
                           block_idx.y, block_idx.z);
    auto where = [](int i) {  // 0 exited, 1 at __syncthreads(), 2 at a shuffle
        unsigned bit = 1u << (i % WARP);
        const Warp& warp = warps[i / WARP];
        return (warp.gone & bit) ? 0 : (warp.at_sync & bit) ? 1 : 2;
    };
    memset(done, 0, sizeof done);
    for (int i = 0; i < nthreads && used < error_bytes; i++) {
        if (done[i])
            continue;
        memset(chosen, 0, sizeof chosen);
        const Fiber* a = &fibers[i];
        for (int j = i; j < nthreads; j++) {
            const Fiber* b = &fibers[j];
            if (!done[j] && where(j) == where(i)
                && (where(i) == 0 || (b->line == a->line && strcmp(b->file, a->file) == 0)))
                chosen[j] = done[j] = true;
        }
        format_threads(list, sizeof list, chosen, nthreads);
        const char* separator = i ? ";" : "";
        if (where(i) == 0)
            used += snprintf(error + used, error_bytes - used, "%s threads %s exited", separator, list);
        else
            used += snprintf(error + used, error_bytes - used, "%s threads %s wait at %s (%s:%d)",
                             separator, list, where(i) == 1 ? "__syncthreads()" : "a warp shuffle",
                             a->file, a->line);
    }
}

void on_fault(int sig, siginfo_t* info, void* context)
{
    fault_address = info->si_addr;
    fault_is_write = sig == SIGSEGV && (((ucontext_t*)context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    siglongjmp(fault_jump, sig == SIGFPE ? LAUNCH_ERROR : MEMORY_FAULT);
}

int run_block()
{
    exited = 0;
    sync_arrived = 0;
    for (int w = 0; w < nwarps; w++) {
        Warp& warp = warps[w];
        warp.runnable = warp.present;
        warp.at_sync = warp.arrived = warp.gone = 0;
    }
    rank_warps();
    ready_ranks = nwarps == WARP ? ~0u : (1u << nwarps) - 1;
    fill32(dynamic_shared, dynamic_shared_bytes, SHARED_FILL);
    if (__start_cuemu_shared)
        fill32(__start_cuemu_shared, __stop_cuemu_shared - __start_cuemu_shared, SHARED_FILL);
    for (int i = 0; i < nthreads; i++)
        start_fiber(&fibers[i]);
    self = pop();
    cuemu_switch(&main_sp, self->sp);
    if (exited < nthreads) {
        describe_deadlock();
        return LAUNCH_ERROR;
    }
    char* end = shared_area + shared_area_bytes;
    char* slack = dynamic_shared + dynamic_shared_bytes;
    const char* where = changed32(slack, end - slack, CANARY) ? "past the end"
                        : changed32(shared_area, dynamic_shared - shared_area, CANARY) ? "before the start"
                        : nullptr;
    if (where) {
        snprintf(error, error_bytes, "block (%u,%u,%u): a write %s of the %zu bytes of dynamic "
                 "shared memory", block_idx.x, block_idx.y, block_idx.z, where, dynamic_shared_bytes);
        return LAUNCH_ERROR;
    }
    return OK;
}

// Where a fault in the runtime's own memory lies, or null (the caller knows the allocations).
const char* describe_fault(const char* a)
{
    char* stack_low = stacks + (size_t)self->id * (STACK_BYTES + PAGE);
    char* end = shared_area + shared_area_bytes;
    if (a >= stack_low && a < stack_low + PAGE)
        return "stack overflow";
    if (a >= end && a < end + PAGE)
        return "out of bounds of the dynamic shared memory (past its end)";
    if (a >= shared_area - PAGE && a < dynamic_shared)
        return "out of bounds of the dynamic shared memory (before its start)";
    return nullptr;
}

}  // namespace
}  // namespace cuemu

// Runs kernel `kernel` (an entry stub: it unpacks `kernel_params` and calls the kernel) over the
// grid, under `policy` (0 in order, 1 random with `seed`). Returns OK; LAUNCH_ERROR with a message;
// MEMORY_FAULT with the start of a message, the faulting address in *fault and whether it wrote in
// *fault_write; or CANARY_OVERWRITTEN with the first overwritten byte in *fault. `canaries` holds
// n_canaries (address, length, word) triples: the slack bytes around the device allocations the
// kernel was given and the word they were filled with, checked after the launch.
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
    nwarps = (n + WARP - 1) / WARP;
    for (int w = 0; w < nwarps; w++) {
        int lanes = n - w * WARP < WARP ? n - w * WARP : WARP;
        warps[w].present = lanes == WARP ? ~0u : (1u << lanes) - 1;
    }
    for (int i = 0; i < n; i++) {
        Fiber* f = &fibers[i];
        f->id = i;
        f->thread_idx = uint3{i % bx, i / bx % by, i / (bx * by)};
        f->file = "";
        f->line = 0;
    }
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

    // faults while the kernel runs end the launch; the handler runs on its own stack
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
        for (uint64_t b = 0; b < blocks && result == OK; b++) {
            block_idx = uint3{(unsigned)(order[b] % gx), (unsigned)(order[b] / gx % gy),
                              (unsigned)(order[b] / ((uint64_t)gx * gy))};
            result = run_block();
        }
    } else {  // fail() or a signal
        result = jumped;
        char who[96];
        describe_thread(who, sizeof who, self);
        if (jumped == LAUNCH_ERROR && message[0] == 0) {
            snprintf(message, message_bytes, "%s: arithmetic fault (integer division by zero?)", who);
        } else if (jumped == MEMORY_FAULT) {
            const char* what = describe_fault((const char*)fault_address);
            if (what) {
                snprintf(message, message_bytes, "%s: %s, %s %p", who, what,
                         fault_is_write ? "writing" : "reading", fault_address);
                result = LAUNCH_ERROR;
            } else {
                snprintf(message, message_bytes, "%s: invalid address, ", who);
                *fault = (uint64_t)(uintptr_t)fault_address;
                *fault_write = fault_is_write;
            }
        }
    }
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaction(SIGFPE, &old_fpe, nullptr);
    sigaltstack(&old_alt, nullptr);
    delete[] order;

    for (int i = 0; i < n_canaries && result == OK; i++)
        if (const void* changed = changed32((const void*)(uintptr_t)canaries[3 * i], canaries[3 * i + 1],
                                            (uint32_t)canaries[3 * i + 2])) {
            *fault = (uint64_t)(uintptr_t)changed;
            result = CANARY_OVERWRITTEN;
        }
    return result;
}

// The module's static shared memory (SHARED_SIZE_BYTES when nvcc is absent).
extern "C" __attribute__((visibility("default"))) size_t cuemu_static_shared_bytes()
{
    return __start_cuemu_shared ? (size_t)(__stop_cuemu_shared - __start_cuemu_shared) : 0;
}
