/*
 * mf_sim.cc — the CPU executor of mf_sim.h: a threadgroup's threads as coroutines,
 * run one at a time until each reaches a barrier, a shuffle or its end; then the
 * barriers whose threads have all arrived are released, and the next round begins.
 * On x86-64 a coroutine switch saves the callee-saved registers and the stack pointer
 * (a few instructions: a warp's shuffle switches 32 times); elsewhere ucontext, whose
 * switches also save the signal mask (a system call each).
 *
 * A grid's threadgroups are shared out over OS threads (the caller and a pool kept
 * for the process; MF_SIM_THREADS of them, by default one per CPU), each taking the
 * next from a counter, as a GPU's multiprocessors do: threadgroup memory is
 * thread_local (the prelude), and threadgroups that meet through device memory do so
 * through real atomics and fences. Each threadgroup's thread order comes from the
 * seed and its own index, so it does not depend on which OS thread runs it.
 */
#include "mf_sim.h"

#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace {

void entry();

#if defined(__x86_64__)
// mf_sim_switch(from, to): pushes the callee-saved registers, stores the stack pointer
// in *from, loads to, pops that context's registers and returns into it.
extern "C" void mf_sim_switch(void **from, void *to);
asm(".text\n"
    ".globl mf_sim_switch\n"
    ".type mf_sim_switch, @function\n"
    "mf_sim_switch:\n"
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
    ".size mf_sim_switch, .-mf_sim_switch\n");

struct context {
    void *sp;
};

// A context that starts entry() on the stack [base, base + size): six zero registers,
// then entry's address as the return address, with the stack as after a call.
void ctx_make(context *c, char *base, size_t size, context *) {
    uintptr_t top = ((uintptr_t)base + size) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;              // entry's own return address: it never returns
    *--sp = (void *)&entry;
    for (int i = 0; i < 6; i++)
        *--sp = nullptr;
    c->sp = sp;
}

void ctx_switch(context *from, context *to) { mf_sim_switch(&from->sp, to->sp); }
#else
struct context {
    ucontext_t uc;
};

void ctx_make(context *c, char *base, size_t size, context *back) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = base;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = &back->uc;
    makecontext(&c->uc, entry, 0);
}

void ctx_switch(context *from, context *to) { swapcontext(&from->uc, &to->uc); }
#endif

enum state { READY, AT_BARRIER, AT_WARP, DONE };

struct sim_thread {
    context ctx;
    mf_sim_pos pos;
    state st;
};

struct sim {
    context main;
    std::vector<sim_thread> th;
    char *stacks;   // the calling OS thread's (stacks_of)
    std::vector<uint32_t> slot;   // two shuffles' values, one per thread each
    std::vector<unsigned char> gen;   // the half of slot each thread's next shuffle uses
    std::vector<int> order;           // the threads in the order they run each round
    std::vector<int> warp_wait, warp_live;   // per warp: lanes at a shuffle, not done
    int bar_wait, live;                // threads at the barrier, not done
    const std::function<void()> *body;
    int cur;
    unsigned rng;
};

constexpr size_t STACK = 128 * 1024;
thread_local sim *g_sim;

// Coroutine stacks for n threads, kept for the OS thread's later runs (a fresh
// allocation per launch would fault in its pages every time). NULL when out of memory.
char *stacks_of(int n) {
    static thread_local std::vector<char *> kept;
    while ((int)kept.size() < n) {
        char *p = (char *)malloc(STACK);
        if (!p)
            return nullptr;
        kept.push_back(p);
    }
    return (char *)kept.data();
}

void yield(state st) {
    sim *s = g_sim;
    sim_thread &t = s->th[s->cur];
    const int w = s->cur >> 5;
    t.st = st;
    if (st == AT_WARP)
        s->warp_wait[w]++;
    else if (st == AT_BARRIER)
        s->bar_wait++;
    else
        s->warp_live[w]--, s->live--;
    ctx_switch(&t.ctx, &s->main);
}

void entry() {
    (*g_sim->body)();
    yield(DONE);   // never resumed
}

unsigned next_rand(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

// A threadgroup's order: by index, reversed, or shuffled (then each round walks it
// forward or backward in turn).
void make_order(sim *s, unsigned seed) {
    const int n = (int)s->th.size();
    for (int i = 0; i < n; i++)
        s->order[i] = seed == 1 ? n - 1 - i : i;
    if (seed < 2)
        return;
    for (int i = n - 1; i > 0; i--) {
        const int j = (int)(next_rand(&s->rng) % (unsigned)(i + 1));
        const int t = s->order[i];
        s->order[i] = s->order[j];
        s->order[j] = t;
    }
}

// Releases every warp whose live lanes all wait at a shuffle, else the threadgroup
// barrier when every live thread waits at it. 1 when some thread became ready.
int release(sim *s) {
    const int n = (int)s->th.size();
    int any = 0;
    for (int w = 0; w * 32 < n; w++) {
        if (s->warp_wait[w] == 0 || s->warp_wait[w] != s->warp_live[w])
            continue;
        for (int i = w * 32; i < n && i < w * 32 + 32; i++)
            if (s->th[i].st == AT_WARP)
                s->th[i].st = READY;
        s->warp_wait[w] = 0;
        any = 1;
    }
    if (any || s->bar_wait == 0 || s->bar_wait != s->live)
        return any;
    for (int i = 0; i < n; i++)
        if (s->th[i].st == AT_BARRIER)
            s->th[i].st = READY;
    s->bar_wait = 0;
    return 1;
}

void run_round(sim *s, int backward) {
    const int n = (int)s->th.size();
    for (int k = 0; k < n; k++) {
        const int i = s->order[backward ? n - 1 - k : k];
        if (s->th[i].st != READY)
            continue;
        s->cur = i;
        ctx_switch(&s->main, &s->th[i].ctx);
    }
}

int run_group(sim *s, const int tg[3], unsigned seed, const char **err) {
    const int n = (int)s->th.size();
    for (int i = 0; i < n; i++) {
        sim_thread &t = s->th[i];
        t.pos = mf_sim_pos{{tg[0], tg[1], tg[2]}, i, n};
        t.st = READY;
        s->gen[i] = 0;
        ctx_make(&t.ctx, ((char **)s->stacks)[i], STACK, &s->main);
    }
    for (int w = 0; w * 32 < n; w++) {
        s->warp_wait[w] = 0;
        s->warp_live[w] = n - w * 32 < 32 ? n - w * 32 : 32;
    }
    s->bar_wait = 0;
    s->live = n;
    make_order(s, seed);
    for (int round = 0;; round++) {
        run_round(s, seed >= 2 && (round & 1));
        if (s->live == 0)
            return 0;
        if (!release(s)) {
            *err = "deadlock: threads wait at a barrier or shuffle others never reach";
            return -1;
        }
    }
}

}  // namespace

const mf_sim_pos *mf_sim_self() { return &g_sim->th[g_sim->cur].pos; }

void mf_sim_barrier() { yield(AT_BARRIER); }

// The two halves of slot alternate: a lane that stores into a half again has passed
// the next shuffle, which every lane reaches only after reading this one.
uint32_t mf_sim_shfl(uint32_t v, int src) {
    sim *s = g_sim;
    const int me = s->cur, n = (int)s->th.size();
    const size_t half = (size_t)s->gen[me] * n;
    s->gen[me] ^= 1;
    s->slot[half + me] = v;
    yield(AT_WARP);   // every lane has stored its value
    return g_sim->slot[half + (me & ~31) + (src & 31)];
}

namespace {

// One launch: its grid, the next threadgroup to take and the first error.
struct job {
    unsigned grid[3];
    int n;
    const std::function<void()> *body;
    unsigned seed;
    uint64_t total;
    std::atomic<uint64_t> next{0};
    std::atomic<const char *> err{nullptr};
};

// A seed's own order for threadgroup idx (seeds 0 and 1: index order, reversed).
unsigned group_rng(unsigned seed, uint64_t idx) {
    unsigned h = seed * 0x9e3779b9u ^ (unsigned)(idx + 1) * 0x85ebca6bu;
    h ^= h >> 15;
    return h * 0x2c1b3c6du;
}

// Runs threadgroups of j until none is left or one has failed.
void run_groups(job *j) {
    sim s;
    s.th.resize(j->n);
    s.stacks = stacks_of(j->n);
    if (!s.stacks) {
        const char *none = nullptr;
        j->err.compare_exchange_strong(none, "out of memory for coroutine stacks");
        return;
    }
    s.slot.resize(2 * (size_t)j->n);
    s.gen.resize(j->n);
    s.order.resize(j->n);
    s.warp_wait.resize((j->n + 31) / 32);
    s.warp_live.resize((j->n + 31) / 32);
    s.body = j->body;
    sim *outer = g_sim;
    g_sim = &s;
    for (;;) {
        const uint64_t idx = j->next.fetch_add(1);
        if (idx >= j->total || j->err.load())
            break;
        const int tg[3] = {(int)(idx % j->grid[0]), (int)(idx / j->grid[0] % j->grid[1]),
                           (int)(idx / j->grid[0] / j->grid[1])};
        s.rng = group_rng(j->seed, idx);
        const char *e = nullptr;
        if (run_group(&s, tg, j->seed, &e) != 0) {
            const char *none = nullptr;
            j->err.compare_exchange_strong(none, e);
        }
    }
    g_sim = outer;
}

// The OS threads beside the caller, kept for the process: each waits for a launch,
// runs its share and reports back.
struct pool {
    std::mutex m;
    std::condition_variable go, done;
    std::mutex use;   // one launch at a time (others run on their caller alone)
    std::vector<std::thread> th;
    const pid_t pid = getpid();   // a forked child has none of the threads
    job *cur = nullptr;
    unsigned gen = 0;
    int busy = 0;
    bool stop = false;

    explicit pool(int n) {
        for (int i = 0; i < n; i++)
            th.emplace_back([this] { work(); });
    }
    ~pool() {
        {
            std::lock_guard<std::mutex> l(m);
            stop = true;
        }
        go.notify_all();
        for (std::thread &t : th)
            t.join();
    }
    void work() {
        unsigned seen = 0;
        for (;;) {
            job *j;
            {
                std::unique_lock<std::mutex> l(m);
                go.wait(l, [&] { return stop || gen != seen; });
                if (stop)
                    return;
                seen = gen;
                j = cur;
            }
            run_groups(j);
            std::lock_guard<std::mutex> l(m);
            if (--busy == 0)
                done.notify_all();
        }
    }
    // Runs j on the caller and every pool thread; returns when all are done with it.
    void run(job *j) {
        {
            std::lock_guard<std::mutex> l(m);
            cur = j;
            busy = (int)th.size();
            gen++;
        }
        go.notify_all();
        run_groups(j);
        std::unique_lock<std::mutex> l(m);
        done.wait(l, [&] { return busy == 0; });
    }
};

int threads_wanted() {
    const char *e = getenv("MF_SIM_THREADS");
    const int n = e && *e ? atoi(e) : (int)std::thread::hardware_concurrency();
    return n < 1 ? 1 : n > 64 ? 64 : n;
}

// The process's pool (threads_wanted() - 1 threads), made at its first use.
pool &the_pool() {
    static pool p(threads_wanted() - 1);
    return p;
}

}  // namespace

int mf_sim_run(const unsigned grid[3], const unsigned block[3],
               const std::function<void()> &body, unsigned seed, const char **err) {
    const int n = (int)block[0];
    if (n <= 0 || n > 1024 || block[1] != 1 || block[2] != 1) {
        *err = "bad threadgroup size";
        return -1;
    }
    job j;
    for (int i = 0; i < 3; i++)
        j.grid[i] = grid[i];
    j.n = n;
    j.body = &body;
    j.seed = seed;
    j.total = (uint64_t)grid[0] * grid[1] * grid[2];
    if (j.total == 0)
        return 0;
    // One threadgroup, a launch from inside a kernel's run, from a forked child or
    // beside another launch: this thread alone.
    pool &p = the_pool();
    if (j.total > 1 && !g_sim && !p.th.empty() && p.pid == getpid() && p.use.try_lock()) {
        p.run(&j);
        p.use.unlock();
    } else {
        run_groups(&j);
    }
    if (j.err.load()) {
        *err = j.err.load();
        return -1;
    }
    return 0;
}
