/*
 * dev_cache.h — the device expert cache of one context: expert blobs kept in device
 * memory for a backend whose device cannot read host memory (CUDA), so a routed expert
 * already there runs with no read and no copy. Written once against the op table.
 *
 * Slots: n_slots blobs of expert_bytes in one device allocation; which (layer, expert)
 * each holds is decided by the LFRU policy of io/expert_cache.h, the one the reader's
 * RAM cache uses. n_slots = 0 keeps nothing: two staging slots used in turn (every
 * request a miss), so a copy still overlaps the previous expert's compute.
 *
 * Per MoE call, in the caller's (deterministic) order:
 *   lookup(il, ie)      a hit returns the slot (its blob: slot_blob) and counts a hit;
 *                       a miss returns -1 and counts a miss.
 *   reserve(il, ie)     a miss's slot (the policy's victim; the ring's next in the
 *                       no-retention mode), chosen at once so the choice depends only
 *                       on the routing, whenever the bytes land.
 *   fill(slot, bytes)   when the bytes land (host memory from alloc_host): the copy
 *                       waits on the device for the slot's last use, runs on the copy
 *                       queue (upload_async) and the exec's later work waits on its
 *                       fence. The host memory must stay until a fence recorded after
 *                       that later work is reached. (Other host memory: see below.)
 *   used(slot)          after the expert's work is queued: records the slot's last use.
 *   wait_copy(slot)     before the host memory of a fill is reused.
 * A slot may be reserved twice before its first fill (a later miss evicts an earlier
 * one of the same call): the fills and the work run in the order filled, each copy
 * after the previous user's work, so every expert reads its own bytes.
 */
#ifndef MF_DEV_CACHE_H
#define MF_DEV_CACHE_H

#include "backends/backend.h"

struct mf_dev_cache;

struct mf_dev_cache_stats {
    int64_t hits, misses;     // requests found / not found in a slot
    int64_t bytes_uploaded;   // bytes copied host -> device (fills)
};

// A cache of n_slots (0: no retention) experts of expert_bytes for keys in
// [0, n_layers) x [0, n_experts). MF_ERR_NOMEM (device memory or host), MF_ERR_ARG.
int mf_dev_cache_new(const struct mf_backend_ops *op, struct mf_exec *ex, int n_layers,
                     int n_experts, uint64_t expert_bytes, int n_slots,
                     struct mf_dev_cache **out, char *err, size_t errlen);
// Waits for the exec's queued work (copies may still write the slots), then frees.
void mf_dev_cache_free(struct mf_dev_cache *c);   // NULL: no-op

int mf_dev_cache_lookup(struct mf_dev_cache *c, int il, int ie);
int mf_dev_cache_reserve(struct mf_dev_cache *c, int il, int ie);
const void *mf_dev_cache_slot_blob(const struct mf_dev_cache *c, int slot);
// staged = 1: src_host is alloc_host memory (a reader slot) or page-locked memory that
// stays (a mapping locked through pin_host), copied by upload_async as above; 0: any
// host memory (a plain mapping in mmap mode), copied by upload in the exec's order
// (host-argument rule: src_host may go once this returns).
void mf_dev_cache_fill(struct mf_dev_cache *c, int slot, const void *src_host,
                       int staged);
void mf_dev_cache_used(struct mf_dev_cache *c, int slot);
// Drop the slot's expert from the cache (a reserved slot that was never filled).
void mf_dev_cache_forget(struct mf_dev_cache *c, int slot);
// Blocks the host until the slot's last staged fill has been copied (its host memory
// may then be reused; a later fill of the slot is queued after it, so waiting for the
// fence re-recorded by it waits for both).
void mf_dev_cache_wait_copy(struct mf_dev_cache *c, int slot);
int mf_dev_cache_n_slots(const struct mf_dev_cache *c);   // retained slots (0: none)
void mf_dev_cache_stats(const struct mf_dev_cache *c, struct mf_dev_cache_stats *out);

#endif /* MF_DEV_CACHE_H */
