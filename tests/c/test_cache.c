/*
 * test_cache.c — the LFRU slot policy (io/expert_cache.c): a hand-worked sequence
 * where frequency beats recency, then random operation sequences replayed against a
 * brute-force model written from the rules in expert_cache.h (every returned slot,
 * every victim, every counter compared).
 */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "core/common.h"
#include "io/expert_cache.h"

/* ==== Hand-worked ==== */

static void test_by_hand(void) {
    mf_expert_cache *c = NULL;
    char err[256] = "";
    CHECK(mf_expert_cache_new(&c, 2, 8, 2, err, sizeof err) == MF_OK, "new: %s", err);
    if (!c)
        return;
    CHECK(mf_expert_cache_lookup(c, 0, 0) == -1, "cold miss");                 // clock 1
    CHECK(mf_expert_cache_insert(c, 0, 0) == 0, "first empty slot");          // (1, 1)
    CHECK(mf_expert_cache_lookup(c, 0, 1) == -1, "miss");                      // clock 2
    CHECK(mf_expert_cache_insert(c, 0, 1) == 1, "second empty slot");         // (1, 2)
    CHECK(mf_expert_cache_lookup(c, 0, 0) == 0, "hit");                        // clock 3
    // slot 0: 2 * 10 + 3 = 23; slot 1: 1 * 10 + 2 = 12.
    CHECK(mf_expert_cache_lookup(c, 1, 5) == -1, "miss");                      // clock 4
    CHECK(mf_expert_cache_victim(c) == 1, "lower score evicted");
    CHECK(mf_expert_cache_insert(c, 1, 5) == 1, "insert evicts slot 1");      // (1, 4)
    CHECK(mf_expert_cache_find(c, 0, 1) == -1, "evicted key gone");
    for (int i = 0; i < 10; i++)
        mf_expert_cache_lookup(c, 1, 7);                                       // clock 14
    CHECK(mf_expert_cache_lookup(c, 1, 5) == 1, "hit");                       // (2, 15)
    // slot 0: 23, slot 1: 2 * 10 + 15 = 35: the older slot 0 goes first.
    CHECK(mf_expert_cache_victim(c) == 0, "recency counts too");
    mf_expert_cache_pin(c, 0);
    CHECK(mf_expert_cache_victim(c) == 1, "pinned slot never a victim");
    mf_expert_cache_pin(c, 1);
    CHECK(mf_expert_cache_victim(c) == -1 && mf_expert_cache_insert(c, 0, 3) == -1,
          "all pinned: no victim");
    mf_expert_cache_unpin(c, 1);
    mf_expert_cache_remove(c, 1);
    CHECK(mf_expert_cache_victim(c) == 1 && mf_expert_cache_find(c, 1, 5) == -1,
          "removed slot is empty");
    int il = -1, ie = -1;
    CHECK(mf_expert_cache_slot_key(c, 0, &il, &ie) == 1 && il == 0 && ie == 0,
          "slot 0 key %d %d", il, ie);
    CHECK(mf_expert_cache_hits(c) == 2 && mf_expert_cache_misses(c) == 13,
          "counters %lld %lld", (long long)mf_expert_cache_hits(c),
          (long long)mf_expert_cache_misses(c));
    CHECK(mf_expert_cache_lookup(c, 2, 0) == -1 && mf_expert_cache_insert(c, 2, 0) == -1 &&
              mf_expert_cache_insert(c, 0, -1) == -1, "keys out of range");
    mf_expert_cache_free(c);
    c = (mf_expert_cache *)1;
    CHECK(mf_expert_cache_new(&c, 0, 8, 2, err, sizeof err) == MF_ERR_ARG && c == NULL,
          "bad sizes refused");
    CHECK(mf_expert_cache_new(&c, 1 << 15, 1 << 14, 2, err, sizeof err) == MF_ERR_ARG,
          "too many keys refused");
}

/* ==== Brute-force model ==== */

#define MAXS 16

struct model {
    int n_slots;
    int used[MAXS], il[MAXS], ie[MAXS], pins[MAXS];
    long long count[MAXS], last[MAXS], clock, hits, misses;
};

static int m_find(const struct model *m, int il, int ie) {
    for (int s = 0; s < m->n_slots; s++)
        if (m->used[s] && m->il[s] == il && m->ie[s] == ie)
            return s;
    return -1;
}

// The least (occupied, score, index) among unpinned slots, empty counting as 0.
static int m_victim(const struct model *m) {
    int best = -1;
    long long bo = 0, bs = 0;
    for (int s = 0; s < m->n_slots; s++) {
        if (m->pins[s])
            continue;
        long long o = m->used[s], sc = m->used[s] ? m->count[s] * 10 + m->last[s] : 0;
        if (best < 0 || o < bo || (o == bo && sc < bs)) {
            best = s;
            bo = o;
            bs = sc;
        }
    }
    return best;
}

static void fuzz(uint64_t seed, int n_layers, int n_experts, int n_slots, int steps) {
    mf_expert_cache *c = NULL;
    char err[256];
    if (mf_expert_cache_new(&c, n_layers, n_experts, n_slots, err, sizeof err) != MF_OK) {
        CHECK(0, "new: %s", err);
        return;
    }
    struct model m = {.n_slots = n_slots};
    uint64_t rs = seed;
    int bad = 0;
    for (int t = 0; t < steps && !bad; t++) {
        int op = (int)(check_rand(&rs) % 100);
        int il = (int)(check_rand(&rs) % (uint64_t)n_layers);
        int ie = (int)(check_rand(&rs) % (uint64_t)n_experts);
        int s = (int)(check_rand(&rs) % (uint64_t)n_slots);
        if (op < 55) {   // lookup, then insert on a miss as a reader does
            m.clock++;
            int want = m_find(&m, il, ie);
            if (want >= 0) {
                m.hits++;
                m.count[want]++;
                m.last[want] = m.clock;
            } else {
                m.misses++;
            }
            int got = mf_expert_cache_lookup(c, il, ie);
            bad |= got != want;
            if (want < 0 && op < 50) {
                want = m_victim(&m);
                if (want >= 0) {
                    m.used[want] = 1;
                    m.il[want] = il;
                    m.ie[want] = ie;
                    m.count[want] = 1;
                    m.last[want] = m.clock;
                }
                got = mf_expert_cache_insert(c, il, ie);
                bad |= got != want;
            }
        } else if (op < 75) {
            m.pins[s]++;
            mf_expert_cache_pin(c, s);
        } else if (op < 92) {
            m.pins[s] -= m.pins[s] > 0;
            mf_expert_cache_unpin(c, s);
        } else if (op < 96) {
            m.used[s] = 0;
            mf_expert_cache_remove(c, s);
        } else {
            bad |= mf_expert_cache_find(c, il, ie) != m_find(&m, il, ie);
        }
        bad |= mf_expert_cache_victim(c) != m_victim(&m);
        bad |= mf_expert_cache_pins(c, s) != m.pins[s];
        bad |= mf_expert_cache_hits(c) != m.hits || mf_expert_cache_misses(c) != m.misses;
        if (bad)
            CHECK(0, "seed %llu (%d x %d, %d slots): policy differs from the model at "
                  "step %d (op %d, key %d/%d, slot %d)", (unsigned long long)seed,
                  n_layers, n_experts, n_slots, t, op, il, ie, s);
    }
    for (int s = 0; s < n_slots && !bad; s++) {
        int il = -1, ie = -1, has = mf_expert_cache_slot_key(c, s, &il, &ie);
        CHECK(has == m.used[s] && (!has || (il == m.il[s] && ie == m.ie[s])),
              "seed %llu: slot %d key", (unsigned long long)seed, s);
    }
    mf_expert_cache_free(c);
}

int main(void) {
    test_by_hand();
    for (uint64_t seed = 1; seed <= 40; seed++)
        fuzz(seed * 0x9e3779b97f4a7c15ull, 1 + (int)(seed % 3), 2 + (int)(seed % 7),
             1 + (int)(seed % MAXS), 4000);
    return check_finish("test_cache");
}
