/*
 * expert_cache.c — LFRU slot policy (expert_cache.h has the exact rules).
 *
 * Keys map to slots through a dense table of n_layers x n_experts entries (a 61-layer,
 * 256-expert model needs 62 KiB), so lookup is O(1). The victim search is a linear
 * scan of the slots: a miss costs a disk read of megabytes, next to which scanning
 * even thousands of slots is noise, and the scan keeps the rule obviously right.
 */
#include "io/expert_cache.h"

#include <stdlib.h>

#include "core/common.h"

struct mf_expert_cache {
    int n_layers, n_experts, n_slots;
    int32_t *where;        // [n_layers * n_experts] slot holding the key, -1 if none
    int32_t *key;          // [n_slots] il * n_experts + ie, -1 when empty
    int64_t *count;        // [n_slots] uses since the key was inserted
    int64_t *last;         // [n_slots] clock at the last use
    int32_t *pins;         // [n_slots]
    int64_t clock, hits, misses;
};

void mf_expert_cache_free(mf_expert_cache *c) {
    if (!c)
        return;
    free(c->where);
    free(c->key);
    free(c->count);
    free(c->last);
    free(c->pins);
    free(c);
}

int mf_expert_cache_new(mf_expert_cache **out, int n_layers, int n_experts, int n_slots,
                        char *err, size_t errlen) {
    *out = NULL;
    if (n_layers < 1 || n_experts < 1 || n_slots < 1 ||
        (uint64_t)n_layers * (uint64_t)n_experts > ((uint64_t)1 << 28))
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert cache: bad sizes (%d layers x %d experts, %d slots)",
                      n_layers, n_experts, n_slots);
    mf_expert_cache *c = calloc(1, sizeof *c);
    size_t nk = (size_t)n_layers * (size_t)n_experts, ns = (size_t)n_slots;
    if (c) {
        c->where = malloc(nk * sizeof *c->where);
        c->key = malloc(ns * sizeof *c->key);
        c->count = calloc(ns, sizeof *c->count);
        c->last = calloc(ns, sizeof *c->last);
        c->pins = calloc(ns, sizeof *c->pins);
    }
    if (!c || !c->where || !c->key || !c->count || !c->last || !c->pins) {
        mf_expert_cache_free(c);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "expert cache: out of memory (%d layers x %d experts, %d slots)",
                      n_layers, n_experts, n_slots);
    }
    c->n_layers = n_layers;
    c->n_experts = n_experts;
    c->n_slots = n_slots;
    for (size_t i = 0; i < nk; i++)
        c->where[i] = -1;
    for (size_t i = 0; i < ns; i++)
        c->key[i] = -1;
    *out = c;
    return MF_OK;
}

int mf_expert_cache_n_slots(const mf_expert_cache *c) {
    return c->n_slots;
}

// Dense index of a key, -1 when out of range.
static int key_of(const mf_expert_cache *c, int il, int ie) {
    if (il < 0 || il >= c->n_layers || ie < 0 || ie >= c->n_experts)
        return -1;
    return il * c->n_experts + ie;
}

int mf_expert_cache_find(const mf_expert_cache *c, int il, int ie) {
    int k = key_of(c, il, ie);
    return k < 0 ? -1 : c->where[k];
}

int mf_expert_cache_lookup(mf_expert_cache *c, int il, int ie) {
    c->clock++;
    int s = mf_expert_cache_find(c, il, ie);
    if (s < 0) {
        c->misses++;
        return -1;
    }
    c->hits++;
    c->count[s]++;
    c->last[s] = c->clock;
    return s;
}

int mf_expert_cache_victim(const mf_expert_cache *c) {
    int best = -1;
    int64_t best_score = 0;
    for (int s = 0; s < c->n_slots; s++) {
        if (c->pins[s] > 0)
            continue;
        if (c->key[s] < 0)
            return s;
        int64_t score = c->count[s] * MF_EXPERT_CACHE_W + c->last[s];
        if (best < 0 || score < best_score) {
            best = s;
            best_score = score;
        }
    }
    return best;
}

int mf_expert_cache_insert(mf_expert_cache *c, int il, int ie) {
    int k = key_of(c, il, ie);
    if (k < 0)
        return -1;
    if (c->where[k] >= 0)
        return c->where[k];
    int s = mf_expert_cache_victim(c);
    if (s < 0)
        return -1;
    if (c->key[s] >= 0)
        c->where[c->key[s]] = -1;
    c->key[s] = k;
    c->where[k] = s;
    c->count[s] = 1;
    c->last[s] = c->clock;
    return s;
}

void mf_expert_cache_remove(mf_expert_cache *c, int slot) {
    if (slot < 0 || slot >= c->n_slots || c->key[slot] < 0)
        return;
    c->where[c->key[slot]] = -1;
    c->key[slot] = -1;
}

void mf_expert_cache_pin(mf_expert_cache *c, int slot) {
    if (slot >= 0 && slot < c->n_slots)
        c->pins[slot]++;
}

void mf_expert_cache_unpin(mf_expert_cache *c, int slot) {
    if (slot >= 0 && slot < c->n_slots && c->pins[slot] > 0)
        c->pins[slot]--;
}

int mf_expert_cache_pins(const mf_expert_cache *c, int slot) {
    return slot >= 0 && slot < c->n_slots ? c->pins[slot] : 0;
}

int mf_expert_cache_slot_key(const mf_expert_cache *c, int slot, int *il, int *ie) {
    if (slot < 0 || slot >= c->n_slots || c->key[slot] < 0)
        return 0;
    *il = c->key[slot] / c->n_experts;
    *ie = c->key[slot] % c->n_experts;
    return 1;
}

int64_t mf_expert_cache_hits(const mf_expert_cache *c) {
    return c->hits;
}

int64_t mf_expert_cache_misses(const mf_expert_cache *c) {
    return c->misses;
}
