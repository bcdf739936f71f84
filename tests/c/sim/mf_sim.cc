/*
 * mf_sim.cc — the CPU executor of mf_sim.h: a threadgroup's threads as coroutines,
 * run one at a time until each reaches a barrier, a shuffle or its end; then the
 * barriers whose threads have all arrived are released, and the next round begins.
 */
#include "mf_sim.h"

#include <ucontext.h>

#include <cstdlib>
#include <vector>

namespace {

enum state { READY, AT_BARRIER, AT_WARP, DONE };

struct sim_thread {
    ucontext_t ctx;
    mf_sim_pos pos;
    state st;
};

struct sim {
    ucontext_t main;
    std::vector<sim_thread> th;
    std::vector<char> stacks;
    std::vector<uint32_t> slot;   // two shuffles' values, one per thread each
    std::vector<unsigned char> gen;   // the half of slot each thread's next shuffle uses
    std::vector<int> order;
    const std::function<void()> *body;
    int cur;
    unsigned rng;
};

constexpr size_t STACK = 128 * 1024;
thread_local sim *g_sim;

void yield(state st) {
    sim_thread &t = g_sim->th[g_sim->cur];
    t.st = st;
    swapcontext(&t.ctx, &g_sim->main);
}

void entry() {
    (*g_sim->body)();
    g_sim->th[g_sim->cur].st = DONE;   // uc_link returns to main
}

unsigned next_rand(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

// The order of this round: by index, reversed, or a fresh shuffle.
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
    int any = 0, live = 0, at_bar = 0;
    for (int w = 0; w < n; w += 32) {
        int wl = 0, wa = 0;
        for (int i = w; i < n && i < w + 32; i++) {
            wl += s->th[i].st != DONE;
            wa += s->th[i].st == AT_WARP;
        }
        if (wa > 0 && wa == wl) {
            for (int i = w; i < n && i < w + 32; i++)
                if (s->th[i].st == AT_WARP)
                    s->th[i].st = READY;
            any = 1;
        }
    }
    if (any)
        return 1;
    for (int i = 0; i < n; i++) {
        live += s->th[i].st != DONE;
        at_bar += s->th[i].st == AT_BARRIER;
    }
    if (at_bar == 0 || at_bar != live)
        return 0;
    for (int i = 0; i < n; i++)
        if (s->th[i].st == AT_BARRIER)
            s->th[i].st = READY;
    return 1;
}

int run_group(sim *s, const int tg[3], unsigned seed, const char **err) {
    const int n = (int)s->th.size();
    for (int i = 0; i < n; i++) {
        sim_thread &t = s->th[i];
        t.pos = mf_sim_pos{{tg[0], tg[1], tg[2]}, i, n};
        t.st = READY;
        s->gen[i] = 0;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = &s->stacks[(size_t)i * STACK];
        t.ctx.uc_stack.ss_size = STACK;
        t.ctx.uc_link = &s->main;
        makecontext(&t.ctx, entry, 0);
    }
    for (;;) {
        make_order(s, seed);
        for (int k = 0; k < n; k++) {
            const int i = s->order[k];
            if (s->th[i].st != READY)
                continue;
            s->cur = i;
            swapcontext(&s->main, &s->th[i].ctx);
        }
        int done = 1;
        for (int i = 0; i < n; i++)
            done &= s->th[i].st == DONE;
        if (done)
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

int mf_sim_run(const unsigned grid[3], const unsigned block[3],
               const std::function<void()> &body, unsigned seed, const char **err) {
    const int n = (int)block[0];
    if (n <= 0 || n > 1024 || block[1] != 1 || block[2] != 1) {
        *err = "bad threadgroup size";
        return -1;
    }
    sim s;
    s.th.resize(n);
    s.stacks.resize((size_t)n * STACK);
    s.slot.resize(2 * (size_t)n);
    s.gen.resize(n);
    s.order.resize(n);
    s.body = &body;
    s.rng = seed;
    sim *outer = g_sim;
    g_sim = &s;
    int rc = 0;
    for (unsigned z = 0; z < grid[2] && rc == 0; z++)
        for (unsigned y = 0; y < grid[1] && rc == 0; y++)
            for (unsigned x = 0; x < grid[0] && rc == 0; x++) {
                const int tg[3] = {(int)x, (int)y, (int)z};
                rc = run_group(&s, tg, seed, err);
            }
    g_sim = outer;
    return rc;
}
