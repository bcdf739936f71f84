/*
 * dev_cache.c — the device expert cache (dev_cache.h): slots in one device allocation,
 * the LFRU policy of io/expert_cache.c, and two fences per slot: `copied` (its last
 * fill's copy is done: the work that reads the slot waits on it) and `used` (the last
 * work reading it is done: the next fill's copy waits on it). Both waits are on the
 * device (fence_wait_device); the host never waits here.
 */
#include "models/dev_cache.h"

#include <stdlib.h>

#include "io/expert_cache.h"

#define SLOT_ALIGN 256   // slot stride: the alignment of the backends' allocations
#define RING_SLOTS 2     // no-retention mode: copy of one while the other computes

struct mf_dev_cache {
    const struct mf_backend_ops *op;
    struct mf_exec *ex;
    mf_expert_cache *policy;   // NULL: no retention (ring of RING_SLOTS)
    int n_slots;               // slots allocated
    int ring_next;
    uint64_t expert_bytes, stride;
    uint8_t *base;             // device: slot i at base + i * stride
    struct mf_fence **copied;  // [n_slots]
    struct mf_fence **used;    // [n_slots]
    struct mf_dev_cache_stats stats;
};

void mf_dev_cache_free(struct mf_dev_cache *c) {
    if (!c)
        return;
    c->op->sync(c->ex);
    for (int i = 0; i < c->n_slots; i++) {
        if (c->copied && c->copied[i])
            c->op->fence_free(c->ex, c->copied[i]);
        if (c->used && c->used[i])
            c->op->fence_free(c->ex, c->used[i]);
    }
    free(c->copied);
    free(c->used);
    if (c->base)
        c->op->dealloc(c->ex, c->base);
    mf_expert_cache_free(c->policy);
    free(c);
}

static int make_fences(struct mf_dev_cache *c) {
    c->copied = calloc((size_t)c->n_slots, sizeof *c->copied);
    c->used = calloc((size_t)c->n_slots, sizeof *c->used);
    if (!c->copied || !c->used)
        return 0;
    for (int i = 0; i < c->n_slots; i++) {
        c->copied[i] = c->op->fence_new(c->ex);
        c->used[i] = c->op->fence_new(c->ex);
        if (!c->copied[i] || !c->used[i])
            return 0;
        // The first copy into the slot comes after the alloc's zero-fill (queued on
        // the compute queue), as every later one after the slot's last reader.
        c->op->fence_record(c->ex, c->used[i]);
    }
    return 1;
}

int mf_dev_cache_new(const struct mf_backend_ops *op, struct mf_exec *ex, int n_layers,
                     int n_experts, uint64_t expert_bytes, int n_slots,
                     struct mf_dev_cache **out, char *err, size_t errlen) {
    *out = NULL;
    if (n_slots < 0 || expert_bytes == 0 || !op->fence_wait_device)
        return mf_err(err, errlen, MF_ERR_ARG, "device expert cache: %d slots of %llu "
                      "bytes on backend %s (needs fence_wait_device)", n_slots,
                      (unsigned long long)expert_bytes, op->name);
    struct mf_dev_cache *c = calloc(1, sizeof *c);
    if (!c)
        return mf_err(err, errlen, MF_ERR_NOMEM, "device expert cache: out of memory");
    c->op = op;
    c->ex = ex;
    c->expert_bytes = expert_bytes;
    c->stride = (expert_bytes + SLOT_ALIGN - 1) / SLOT_ALIGN * SLOT_ALIGN;
    c->n_slots = n_slots ? n_slots : RING_SLOTS;
    int rc = n_slots ? mf_expert_cache_new(&c->policy, n_layers, n_experts, n_slots, err,
                                           errlen)
                     : MF_OK;
    if (rc == MF_OK) {
        c->base = op->alloc(ex, (size_t)(c->stride * (uint64_t)c->n_slots));
        if (!c->base || !make_fences(c))   // make_fences after alloc: see there
            rc = mf_err(err, errlen, MF_ERR_NOMEM, "device expert cache: no %s memory "
                        "for %d slots of %llu bytes", op->name, c->n_slots,
                        (unsigned long long)expert_bytes);
    }
    if (rc != MF_OK) {
        mf_dev_cache_free(c);
        return rc;
    }
    *out = c;
    return MF_OK;
}

int mf_dev_cache_lookup(struct mf_dev_cache *c, int il, int ie) {
    int slot = c->policy ? mf_expert_cache_lookup(c->policy, il, ie) : -1;
    if (slot >= 0)
        c->stats.hits++;
    else
        c->stats.misses++;
    return slot;
}

int mf_dev_cache_reserve(struct mf_dev_cache *c, int il, int ie) {
    if (!c->policy) {
        c->ring_next = (c->ring_next + 1) % RING_SLOTS;
        return c->ring_next;
    }
    // No slot is ever pinned, so a key in range always gets one (moe.c's keys are).
    return mf_expert_cache_insert(c->policy, il, ie);
}

const void *mf_dev_cache_slot_blob(const struct mf_dev_cache *c, int slot) {
    return c->base + (uint64_t)slot * c->stride;
}

void mf_dev_cache_fill(struct mf_dev_cache *c, int slot, const void *src_host,
                       int staged) {
    size_t off = (size_t)((uint64_t)slot * c->stride);
    if (staged) {
        c->op->fence_wait_device(c->ex, c->used[slot]);   // the old bytes' last reader
        c->op->upload_async(c->ex, c->base, off, src_host, (size_t)c->expert_bytes,
                            c->copied[slot]);
        c->op->fence_wait_device(c->ex, c->copied[slot]);   // readers after the copy
    } else {   // in the exec's order, after the slot's readers and any earlier copy
        c->op->upload(c->ex, c->base, off, src_host, (size_t)c->expert_bytes);
    }
    c->stats.bytes_uploaded += (int64_t)c->expert_bytes;
}

void mf_dev_cache_wait_copy(struct mf_dev_cache *c, int slot) {
    c->op->fence_wait(c->ex, c->copied[slot]);
}

void mf_dev_cache_used(struct mf_dev_cache *c, int slot) {
    c->op->fence_record(c->ex, c->used[slot]);
}

void mf_dev_cache_forget(struct mf_dev_cache *c, int slot) {
    if (c->policy)
        mf_expert_cache_remove(c->policy, slot);
}

int mf_dev_cache_n_slots(const struct mf_dev_cache *c) {
    return c->policy ? c->n_slots : 0;
}

void mf_dev_cache_stats(const struct mf_dev_cache *c, struct mf_dev_cache_stats *out) {
    *out = c->stats;
}
