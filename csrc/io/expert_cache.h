/*
 * expert_cache.h — the policy of an expert cache, and nothing else: which slot holds
 * which (layer, expert), which slot a new expert evicts, which slots may not be
 * evicted. It owns no expert memory, so one policy serves the reader's RAM slots
 * (expert_reader.c) and the device expert cache's slots in GPU memory
 * (models/dev_cache.c: lookup, then insert on a miss; it never pins).
 *
 * Policy: LFRU, CUDA-FM's measured choice (it beat pure LRU by 34-63%; W from 1 to 50
 * made no difference). Each occupied slot has a use count and the logical time of its
 * last use; its score is count * MF_EXPERT_CACHE_W + last_used, and an insert evicts
 * the unpinned slot of lowest score. The clock ticks once per lookup, so last_used is
 * "how many lookups ago", independent of wall time.
 *
 * Exact rules (the unit test replays them against a brute-force model):
 *   lookup(key)  clock += 1; a hit sets count += 1 and last_used = clock, and counts a
 *                hit; a miss counts a miss. Returns the slot or -1.
 *   find(key)    the slot or -1, changing nothing (for prefetch and tests).
 *   victim()     the lowest-index empty unpinned slot, else the unpinned slot of lowest
 *                score (ties: lowest index), else -1.
 *   insert(key)  puts key in victim() (dropping the key it held) with count = 1 and
 *                last_used = clock; returns the slot, or -1 when every slot is pinned.
 *   remove(slot) empties the slot (its pins stay).
 *   pin/unpin    a counter per slot; a slot with pins > 0 is never a victim.
 * Not thread-safe: the owner serialises calls (the reader holds its lock).
 */
#ifndef MF_EXPERT_CACHE_H
#define MF_EXPERT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#define MF_EXPERT_CACHE_W 10   // weight of the use count against recency

typedef struct mf_expert_cache mf_expert_cache;

// A policy over n_slots slots for keys (il, ie) in [0, n_layers) x [0, n_experts).
// MF_ERR_ARG for sizes < 1 or too large (n_layers * n_experts > 2^28), MF_ERR_NOMEM.
// *out = NULL on failure.
int mf_expert_cache_new(mf_expert_cache **out, int n_layers, int n_experts, int n_slots,
                        char *err, size_t errlen);
void mf_expert_cache_free(mf_expert_cache *c);   // NULL: no-op

int mf_expert_cache_n_slots(const mf_expert_cache *c);
// Keys out of range are never present: lookup counts a miss, insert returns -1.
int mf_expert_cache_lookup(mf_expert_cache *c, int il, int ie);
int mf_expert_cache_find(const mf_expert_cache *c, int il, int ie);
int mf_expert_cache_victim(const mf_expert_cache *c);
// The key must be absent (find() == -1); if present its slot is returned unchanged.
int mf_expert_cache_insert(mf_expert_cache *c, int il, int ie);
void mf_expert_cache_remove(mf_expert_cache *c, int slot);
void mf_expert_cache_pin(mf_expert_cache *c, int slot);
void mf_expert_cache_unpin(mf_expert_cache *c, int slot);   // pins stay >= 0
int mf_expert_cache_pins(const mf_expert_cache *c, int slot);
// 1 and the key when the slot holds one, else 0.
int mf_expert_cache_slot_key(const mf_expert_cache *c, int slot, int *il, int *ie);
// Counters since creation.
int64_t mf_expert_cache_hits(const mf_expert_cache *c);
int64_t mf_expert_cache_misses(const mf_expert_cache *c);

#endif /* MF_EXPERT_CACHE_H */
