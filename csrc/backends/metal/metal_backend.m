/*
 * metal_backend.m — the Metal backend's Objective-C glue, macOS only: the device and
 * the kernel library (compiled at open from the embedded shaders/ sources, safe math),
 * one compute pipeline per manifest row, the exec (one command queue per context, the
 * open command buffer and encoder, the sticky first error), memory, copies, fences,
 * and the op table. The compute ops are plain C in metal_ops.c.
 *
 * Manual reference counting (ARC off; the file is built without -fobjc-arc): objects
 * live in plain C structs, every new/alloc/retain has its release in the matching
 * free, and each entry point drains its autoreleased temporaries in @autoreleasepool.
 *
 * Memory is unified (the device must report hasUnifiedMemory): every buffer is
 * MTLStorageModeShared, a device address is the CPU address of a buffer's contents,
 * and a sorted table of regions maps it back to (buffer, offset) when a dispatch is
 * encoded. The weights mapping and the expert slots are wrapped without a copy
 * (newBufferWithBytesNoCopy, page-aligned). Work is encoded on one command buffer per
 * stretch between host synchronisations (download, sync, fence, routing to the host);
 * the dispatches of a compute encoder run serially, which orders dependent kernels.
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include "backends/metal/metal_internal.h"

// A universal (arm64 + x86_64) Python builds extensions for macOS 10.9 and up, older
// than some Metal calls here (maxBufferLength 10.14, hasUnifiedMemory 10.15). Every
// path runs only after has_unified() answered yes, which needs macOS 10.15 (in
// practice 11: Apple Silicon), so the compile-time availability warning is off.
#pragma clang diagnostic ignored "-Wunguarded-availability-new"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HUGE_ALIGN ((size_t)2 << 20)   // expert slots: 2 MiB-aligned reads are faster
#define MAX_PENDING 64                 // committed command buffers not yet checked

/* ==== Regions: device address -> (buffer, offset) ==== */

enum region_kind { R_ALLOC, R_HOST, R_WEIGHTS, R_TEMP };

struct region {
    uintptr_t base;
    size_t len;
    id<MTLBuffer> buf;       // retained
    int kind;
    const void *owner;       // weights: the address map_weights returned
};

struct regions {
    struct region *r;        // sorted by base
    int n, cap;
};

struct mf_metal_be {
    id<MTLDevice> dev;
    id<MTLLibrary> lib;
    id<MTLComputePipelineState> pipe[MF_MKID_COUNT];
    size_t page;
    size_t max_len;          // the device's maxBufferLength, page-rounded down
    pthread_mutex_t lock;    // guards weights (mapped at load, read by every exec)
    int lock_ok;
    struct regions weights;
    int tc;                  // mf_metal_tc
};

struct mf_exec {
    struct mf_metal_be *mb;
    id<MTLCommandQueue> queue;
    id<MTLCommandBuffer> cb;                // open, or nil
    id<MTLComputeCommandEncoder> enc;       // open on cb, or nil
    id<MTLBlitCommandEncoder> blit;         // open on cb, or nil
    id<MTLCommandBuffer> pending[MAX_PENDING];   // committed, status not yet read
    uint64_t pending_seq[MAX_PENDING];           // their commit numbers
    int n_pending;
    uint64_t n_committed;
    struct regions mem;                     // allocations, host slots, temporaries
    id<MTLBuffer> zero;                     // bound where an op passes NULL
    void *scratch[2];
    size_t scratch_bytes[2];
    int status;                             // first error (MF_OK while none)
    int attn_tile;                          // mf_metal_attn_tile
    int attn_block;                         // mf_metal_attn_block
    int fuse;                               // mf_metal_fuse
    int *counter;                           // mf_metal_counter (a host slot)
    char err[1024];
};

struct mf_fence {
    id<MTLCommandBuffer> cb;                // the last one committed at record, or nil
    uint64_t seq;                           // its commit number
};

// The region holding p: the last one whose base is <= p and that contains p. Regions
// overlap only in two ways, weight windows and wraps of unknown memory from one page,
// and the later (longer-reaching) one wins; a short look back covers the rest. -1 if
// none.
#define LOOK_BACK 8

static int region_find(const struct regions *t, uintptr_t p) {
    int lo = 0, hi = t->n - 1, at = -1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (t->r[mid].base <= p) {
            at = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    for (int i = at; i >= 0 && i > at - LOOK_BACK; i--)
        if (p < t->r[i].base + t->r[i].len)
            return i;
    return -1;
}

static int region_add(struct regions *t, struct region r) {
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 64;
        struct region *q = realloc(t->r, (size_t)cap * sizeof *q);
        if (!q)
            return 0;
        t->r = q;
        t->cap = cap;
    }
    int at = t->n;
    while (at > 0 && t->r[at - 1].base > r.base)
        at--;
    memmove(t->r + at + 1, t->r + at, (size_t)(t->n - at) * sizeof *t->r);
    t->r[at] = r;
    t->n++;
    return 1;
}

// Removes entry i and releases its buffer.
static void region_drop(struct regions *t, int i) {
    [t->r[i].buf release];
    memmove(t->r + i, t->r + i + 1, (size_t)(t->n - i - 1) * sizeof *t->r);
    t->n--;
}

static void regions_free(struct regions *t) {
    for (int i = 0; i < t->n; i++) {
        [t->r[i].buf release];
        if (t->r[i].kind == R_HOST)
            free((void *)t->r[i].base);
    }
    free(t->r);
    t->r = NULL;
    t->n = t->cap = 0;
}

/* ==== Errors ==== */

void mf_metal_fail(struct mf_exec *ex, int status, const char *fmt, ...) {
    if (ex->status != MF_OK)
        return;
    ex->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ex->err, sizeof ex->err, fmt, ap);
    va_end(ap);
}

int mf_metal_failed(const struct mf_exec *ex) { return ex->status != MF_OK; }

int mf_metal_tc(const struct mf_exec *ex) { return ex->mb->tc; }
int mf_metal_mma(const struct mf_exec *ex) { (void)ex; return 0; }
int mf_metal_attn_tile(const struct mf_exec *ex) { return ex->attn_tile; }
int mf_metal_attn_block(const struct mf_exec *ex) { return ex->attn_block; }
int mf_metal_fuse(const struct mf_exec *ex) { return ex->fuse; }

static const char *ns_text(NSError *e) {
    const char *s = e ? [[e localizedDescription] UTF8String] : NULL;
    return s ? s : "no description";
}

static int metal_status(struct mf_exec *ex, char *err, size_t errlen) {
    if (ex->status != MF_OK)
        mf_err(err, errlen, ex->status, "%s", ex->err);
    return ex->status;
}

/* ==== Command buffers ==== */

static id<MTLCommandBuffer> open_cb(struct mf_exec *ex, const char *op) {
    if (!ex->cb) {
        ex->cb = [[ex->queue commandBuffer] retain];
        if (!ex->cb)
            mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: no command buffer", op);
    }
    return ex->cb;
}

static void end_encoders(struct mf_exec *ex) {
    if (ex->enc) {
        [ex->enc endEncoding];
        [ex->enc release];
        ex->enc = nil;
    }
    if (ex->blit) {
        [ex->blit endEncoding];
        [ex->blit release];
        ex->blit = nil;
    }
}

static id<MTLComputeCommandEncoder> compute_encoder(struct mf_exec *ex, const char *op) {
    if (ex->blit)
        end_encoders(ex);
    if (!ex->enc && open_cb(ex, op)) {
        ex->enc = [[ex->cb computeCommandEncoder] retain];
        if (!ex->enc)
            mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: no compute encoder", op);
    }
    return ex->enc;
}

static id<MTLBlitCommandEncoder> blit_encoder(struct mf_exec *ex, const char *op) {
    if (ex->enc)
        end_encoders(ex);
    if (!ex->blit && open_cb(ex, op)) {
        ex->blit = [[ex->cb blitCommandEncoder] retain];
        if (!ex->blit)
            mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: no blit encoder", op);
    }
    return ex->blit;
}

// A finished command buffer's error, if any, becomes the exec's first error.
static void check_done(struct mf_exec *ex, id<MTLCommandBuffer> cb, const char *op) {
    if ([cb status] == MTLCommandBufferStatusError)
        mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: command buffer failed: %s",
                      op, ns_text([cb error]));
}

static void wait_pending(struct mf_exec *ex, int keep, const char *op) {
    int n = ex->n_pending - keep;
    for (int i = 0; i < n; i++) {
        [ex->pending[i] waitUntilCompleted];
        check_done(ex, ex->pending[i], op);
        [ex->pending[i] release];
    }
    memmove(ex->pending, ex->pending + n, (size_t)keep * sizeof ex->pending[0]);
    memmove(ex->pending_seq, ex->pending_seq + n, (size_t)keep * sizeof ex->pending_seq[0]);
    ex->n_pending = keep;
}

// Temporaries (host arguments, wraps of unknown memory) leave the table at commit:
// the command buffer retains what it was encoded with.
static void drop_temps(struct mf_exec *ex) {
    for (int i = ex->mem.n - 1; i >= 0; i--)
        if (ex->mem.r[i].kind == R_TEMP)
            region_drop(&ex->mem, i);
}

// Submits the open command buffer (no wait). Returns it (nil when nothing was open).
static id<MTLCommandBuffer> commit(struct mf_exec *ex, const char *op) {
    end_encoders(ex);
    id<MTLCommandBuffer> cb = ex->cb;
    ex->cb = nil;
    drop_temps(ex);
    if (!cb)
        return ex->n_pending ? ex->pending[ex->n_pending - 1] : nil;
    if (ex->n_pending == MAX_PENDING)
        wait_pending(ex, MAX_PENDING / 2, op);
    [cb commit];
    ex->pending_seq[ex->n_pending] = ++ex->n_committed;
    ex->pending[ex->n_pending++] = cb;
    return cb;
}

void mf_metal_wait(struct mf_exec *ex, const char *op) {
    @autoreleasepool {
        commit(ex, op);
        wait_pending(ex, 0, op);
    }
}

/* ==== Dispatch ==== */

// Buffer and offset of device address p (NULL: the exec's zero buffer).
static id<MTLBuffer> resolve(struct mf_exec *ex, const void *p, NSUInteger *off) {
    *off = 0;
    if (!p)
        return ex->zero;
    int i = region_find(&ex->mem, (uintptr_t)p);
    if (i >= 0) {
        *off = (NSUInteger)((uintptr_t)p - ex->mem.r[i].base);
        return ex->mem.r[i].buf;
    }
    struct mf_metal_be *mb = ex->mb;
    pthread_mutex_lock(&mb->lock);
    i = region_find(&mb->weights, (uintptr_t)p);
    id<MTLBuffer> buf = i >= 0 ? mb->weights.r[i].buf : nil;
    if (i >= 0)
        *off = (NSUInteger)((uintptr_t)p - mb->weights.r[i].base);
    pthread_mutex_unlock(&mb->lock);
    return buf;
}

static int bind_buffers(struct mf_exec *ex, id<MTLComputeCommandEncoder> enc,
                        const void *const *bufs, int n_buf, const char *op) {
    for (int i = 0; i < n_buf; i++) {
        NSUInteger off = 0;
        id<MTLBuffer> buf = resolve(ex, bufs[i], &off);
        if (!buf) {
            mf_metal_fail(ex, MF_ERR_ARG, "metal backend: %s: buffer %d at %p is not "
                          "memory of this backend (alloc, alloc_host or mapped weights)",
                          op, i, bufs[i]);
            return 0;
        }
        [enc setBuffer:buf offset:off atIndex:(NSUInteger)i];
    }
    return 1;
}

void mf_metal_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                     const void *params, size_t params_bytes, const void *const *bufs,
                     int n_buf, const char *op) {
    if (ex->status != MF_OK || g[0] == 0 || g[1] == 0 || g[2] == 0)
        return;
    id<MTLComputePipelineState> pipe = ex->mb->pipe[kid];
    NSUInteger threads = (NSUInteger)b[0] * b[1] * b[2];
    if (threads > [pipe maxTotalThreadsPerThreadgroup]) {
        mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: kernel %s wants %lu threads "
                      "per threadgroup, the pipeline allows %lu", op,
                      mf_metal_kernel_names[kid], (unsigned long)threads,
                      (unsigned long)[pipe maxTotalThreadsPerThreadgroup]);
        return;
    }
    @autoreleasepool {
        id<MTLComputeCommandEncoder> enc = compute_encoder(ex, op);
        if (!enc || !bind_buffers(ex, enc, bufs, n_buf, op))
            return;
        [enc setComputePipelineState:pipe];
        [enc setBytes:params length:params_bytes atIndex:(NSUInteger)n_buf];
        [enc dispatchThreadgroups:MTLSizeMake(g[0], g[1], g[2])
            threadsPerThreadgroup:MTLSizeMake(b[0], b[1], b[2])];
    }
}

const void *mf_metal_host_arg(struct mf_exec *ex, const void *src, size_t n, const char *op) {
    if (ex->status != MF_OK)
        return NULL;
    id<MTLBuffer> buf = [ex->mb->dev newBufferWithBytes:src length:(n ? n : 4)
                                                options:MTLResourceStorageModeShared];
    struct region r = {.base = (uintptr_t)[buf contents], .len = n ? n : 4, .buf = buf,
                       .kind = R_TEMP};
    if (!buf || !region_add(&ex->mem, r)) {
        [buf release];
        mf_metal_fail(ex, MF_ERR_NOMEM, "metal backend: %s: no buffer for %zu bytes of "
                      "host arguments", op, n);
        return NULL;
    }
    return [buf contents];
}

/* ==== Memory ==== */

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static void *metal_alloc(struct mf_exec *ex, size_t bytes) {
    size_t sz = round_up(bytes ? bytes : 1, 256);
    id<MTLBuffer> buf = [ex->mb->dev newBufferWithLength:sz
                                                 options:MTLResourceStorageModeShared];
    if (!buf)
        return NULL;
    memset([buf contents], 0, sz);   // fresh: no queued work can touch it yet
    struct region r = {.base = (uintptr_t)[buf contents], .len = sz, .buf = buf,
                       .kind = R_ALLOC};
    if (!region_add(&ex->mem, r)) {
        [buf release];
        return NULL;
    }
    return [buf contents];
}

// The buffer is released at once: command buffers that use it hold it until done.
static void metal_dealloc(struct mf_exec *ex, void *p) {
    if (!p)
        return;
    int i = region_find(&ex->mem, (uintptr_t)p);
    if (i >= 0 && ex->mem.r[i].base == (uintptr_t)p && ex->mem.r[i].kind == R_ALLOC) {
        region_drop(&ex->mem, i);
        return;
    }
    mf_metal_fail(ex, MF_ERR_ARG, "metal backend: dealloc of %p, not an allocation of "
                  "this exec", p);
}

void *mf_metal_scratch(struct mf_exec *ex, int slot, size_t n, const char *op) {
    if (ex->scratch[slot] && ex->scratch_bytes[slot] >= n)
        return ex->scratch[slot];
    metal_dealloc(ex, ex->scratch[slot]);
    size_t want = n < ((size_t)1 << 20) ? ((size_t)1 << 20) : n + n / 4;
    ex->scratch[slot] = metal_alloc(ex, want);
    ex->scratch_bytes[slot] = ex->scratch[slot] ? want : 0;
    if (!ex->scratch[slot])
        mf_metal_fail(ex, MF_ERR_NOMEM, "metal backend: %s: no scratch of %zu bytes", op,
                      want);
    return ex->scratch[slot];
}

static void *metal_alloc_host(struct mf_exec *ex, size_t bytes);

int *mf_metal_counter(struct mf_exec *ex, const char *op) {
    if (!ex->counter)
        ex->counter = metal_alloc_host(ex, MF_COUNT_INTS * sizeof(int));   // zeroed
    if (!ex->counter)
        mf_metal_fail(ex, MF_ERR_NOMEM, "metal backend: %s: no counter", op);
    return ex->counter;
}

// Page-aligned host memory wrapped without a copy: expert slots (filled by pread in
// place, 2 MiB-aligned when large) and staging.
static void *metal_alloc_host(struct mf_exec *ex, size_t bytes) {
    size_t page = ex->mb->page, len = round_up(bytes ? bytes : 1, page);
    void *p = NULL;
    if (posix_memalign(&p, len >= HUGE_ALIGN ? HUGE_ALIGN : page, len) != 0)
        return NULL;
    memset(p, 0, len);
    id<MTLBuffer> buf = [ex->mb->dev newBufferWithBytesNoCopy:p length:len
                                                      options:MTLResourceStorageModeShared
                                                  deallocator:nil];
    struct region r = {.base = (uintptr_t)p, .len = len, .buf = buf, .kind = R_HOST};
    if (!buf || !region_add(&ex->mem, r)) {
        [buf release];
        free(p);
        return NULL;
    }
    return p;
}

static void metal_dealloc_host(struct mf_exec *ex, void *p) {
    if (!p)
        return;
    mf_metal_wait(ex, "dealloc_host");   // queued work may still read it
    int i = region_find(&ex->mem, (uintptr_t)p);
    if (i < 0 || ex->mem.r[i].base != (uintptr_t)p || ex->mem.r[i].kind != R_HOST) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: dealloc_host of %p, not alloc_host "
                      "memory of this exec", p);
        return;
    }
    region_drop(&ex->mem, i);
    free(p);
}

// A wrap of page-aligned memory the backend does not know (an expert file mapping in
// mmap mode), from p's page to `need` bytes past p, used by the open command buffer.
static const void *wrap_unknown(struct mf_exec *ex, const void *p, size_t need,
                                const char *op) {
    size_t page = ex->mb->page;
    uintptr_t a0 = (uintptr_t)p / page * page;
    size_t len = round_up((uintptr_t)p + need - a0, page);
    id<MTLBuffer> buf = [ex->mb->dev newBufferWithBytesNoCopy:(void *)a0 length:len
                                                      options:MTLResourceStorageModeShared
                                                  deallocator:nil];
    struct region r = {.base = a0, .len = len, .buf = buf, .kind = R_TEMP};
    if (!buf || !region_add(&ex->mem, r)) {
        [buf release];
        mf_metal_fail(ex, MF_ERR_BACKEND, "metal backend: %s: %p (%zu bytes) is not "
                      "memory of this backend and could not be wrapped as a buffer", op, p,
                      need);
        return NULL;
    }
    return (const void *)a0;
}

const void *mf_metal_region(struct mf_exec *ex, const void *p, size_t need, const char *op) {
    if (ex->status != MF_OK)
        return NULL;
    int i = region_find(&ex->mem, (uintptr_t)p);
    if (i >= 0 && (uintptr_t)p + need <= ex->mem.r[i].base + ex->mem.r[i].len)
        return (const void *)ex->mem.r[i].base;
    struct mf_metal_be *mb = ex->mb;
    pthread_mutex_lock(&mb->lock);
    i = region_find(&mb->weights, (uintptr_t)p);
    uintptr_t base = i >= 0 && (uintptr_t)p + need <= mb->weights.r[i].base +
                                                          mb->weights.r[i].len
                         ? mb->weights.r[i].base
                         : 0;
    pthread_mutex_unlock(&mb->lock);
    if (base)
        return (const void *)base;
    @autoreleasepool {
        return wrap_unknown(ex, p, need, op);
    }
}

/* ==== Copies ==== */

// Blits need 4-byte multiples on macOS; anything else is done by the CPU after the
// queued work (shared memory).
static int blit_ok(size_t a, size_t b, size_t n) { return (a | b | n) % 4 == 0; }

static void metal_copy_impl(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                            size_t src_off, size_t bytes, const char *op) {
    NSUInteger so = 0, dof = 0;
    id<MTLBuffer> sb = resolve(ex, (const char *)src + src_off, &so);
    id<MTLBuffer> db = resolve(ex, (char *)dst + dst_off, &dof);
    if (!sb || !db) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: %s: %s %p is not memory of this "
                      "backend", op, sb ? "destination" : "source", sb ? dst : src);
        return;
    }
    if (!blit_ok(so, dof, bytes)) {
        mf_metal_wait(ex, op);
        memmove((char *)dst + dst_off, (const char *)src + src_off, bytes);
        return;
    }
    id<MTLBlitCommandEncoder> blit = blit_encoder(ex, op);
    if (blit)
        [blit copyFromBuffer:sb sourceOffset:so toBuffer:db destinationOffset:dof size:bytes];
}

void mf_metal_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                   size_t src_off, size_t bytes) {
    if (ex->status != MF_OK || !bytes)
        return;
    @autoreleasepool {
        metal_copy_impl(ex, dst, dst_off, src, src_off, bytes, "copy");
    }
}

// Host bytes are copied into a shared buffer now (the host-argument rule), then blitted
// in queue order; where a blit cannot be used, written by the CPU after the queued work.
static void metal_upload(struct mf_exec *ex, void *dst, size_t dst_off, const void *src_host,
                         size_t bytes) {
    if (ex->status != MF_OK || !bytes)
        return;
    @autoreleasepool {
        NSUInteger off = 0;
        if (!resolve(ex, (char *)dst + dst_off, &off)) {
            mf_metal_fail(ex, MF_ERR_ARG, "metal backend: upload: %p is not memory of "
                          "this backend", dst);
            return;
        }
        if (!blit_ok(off, 0, bytes)) {
            mf_metal_wait(ex, "upload");
            memcpy((char *)dst + dst_off, src_host, bytes);
            return;
        }
        const void *tmp = mf_metal_host_arg(ex, src_host, bytes, "upload");
        if (tmp)
            metal_copy_impl(ex, dst, dst_off, tmp, 0, bytes, "upload");
    }
}

void mf_metal_download(struct mf_exec *ex, void *dst_host, const void *src, size_t src_off,
                       size_t bytes) {
    mf_metal_wait(ex, "download");
    if (ex->status == MF_OK && bytes)
        memcpy(dst_host, (const char *)src + src_off, bytes);
}

static void metal_zero(struct mf_exec *ex, void *dst, size_t dst_off, size_t bytes) {
    if (ex->status != MF_OK || !bytes)
        return;
    @autoreleasepool {
        NSUInteger off = 0;
        id<MTLBuffer> buf = resolve(ex, (char *)dst + dst_off, &off);
        if (!buf) {
            mf_metal_fail(ex, MF_ERR_ARG, "metal backend: zero: %p is not memory of this "
                          "backend", dst);
            return;
        }
        if (!blit_ok(off, 0, bytes)) {
            mf_metal_wait(ex, "zero");
            memset((char *)dst + dst_off, 0, bytes);
            return;
        }
        id<MTLBlitCommandEncoder> blit = blit_encoder(ex, "zero");
        if (blit)
            [blit fillBuffer:buf range:NSMakeRange(off, bytes) value:0];
    }
}

/* ==== Synchronisation ==== */

static void metal_sync(struct mf_exec *ex) { mf_metal_wait(ex, "sync"); }

static void metal_submit(struct mf_exec *ex) {
    @autoreleasepool {
        commit(ex, "submit");
    }
}

static struct mf_fence *metal_fence_new(struct mf_exec *ex) {
    (void)ex;
    return calloc(1, sizeof(struct mf_fence));
}

static void metal_fence_record(struct mf_exec *ex, struct mf_fence *f) {
    @autoreleasepool {
        id<MTLCommandBuffer> cb = commit(ex, "fence_record");
        [f->cb release];
        f->cb = [cb retain];
        f->seq = ex->n_committed;
    }
}

// Command buffers of one queue may overlap when they share no resource, so the work
// before the fence is done only when every one committed up to it is.
static void metal_fence_wait(struct mf_exec *ex, struct mf_fence *f) {
    if (!f->cb)
        return;
    @autoreleasepool {
        for (int i = 0; i < ex->n_pending && ex->pending_seq[i] < f->seq; i++) {
            [ex->pending[i] waitUntilCompleted];
            check_done(ex, ex->pending[i], "fence_wait");
        }
        [f->cb waitUntilCompleted];
        check_done(ex, f->cb, "fence_wait");
    }
}

// One command queue per exec, and upload_async encodes its copy into the same command
// stream: work is already ordered after every fence, so there is nothing to wait on.
static void metal_fence_wait_device(struct mf_exec *ex, struct mf_fence *f) {
    (void)ex;
    (void)f;
}

static void metal_fence_free(struct mf_exec *ex, struct mf_fence *f) {
    (void)ex;
    if (!f)
        return;
    [f->cb release];
    free(f);
}

static void metal_upload_async(struct mf_exec *ex, void *dst, size_t dst_off,
                               const void *src_host, size_t bytes, struct mf_fence *done) {
    if (ex->status == MF_OK && bytes) {
        @autoreleasepool {
            metal_copy_impl(ex, dst, dst_off, src_host, 0, bytes, "upload_async");
        }
    }
    if (done)
        metal_fence_record(ex, done);
}

/* ==== Exec ==== */

static void metal_exec_free(struct mf_exec *ex) {
    if (!ex)
        return;
    @autoreleasepool {
        if (ex->queue)
            mf_metal_wait(ex, "exec_free");
        end_encoders(ex);
        [ex->cb release];
        regions_free(&ex->mem);
        [ex->zero release];
        [ex->queue release];
    }
    free(ex);
}

static int metal_exec_new(struct mf_backend *be, int n_threads, struct mf_exec **out,
                          char *err, size_t errlen) {
    *out = NULL;
    if (n_threads < 1)
        return mf_err(err, errlen, MF_ERR_ARG, "metal backend: n_threads %d < 1", n_threads);
    struct mf_exec *ex = calloc(1, sizeof *ex);
    if (!ex)
        return mf_err(err, errlen, MF_ERR_NOMEM, "metal backend: out of memory");
    ex->mb = be->impl;
    ex->queue = [ex->mb->dev newCommandQueue];
    ex->zero = [ex->mb->dev newBufferWithLength:256 options:MTLResourceStorageModeShared];
    if (!ex->queue || !ex->zero) {
        metal_exec_free(ex);
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "metal backend: no command queue or buffer for a new context");
    }
    memset([ex->zero contents], 0, 256);
    const char *tile = getenv("MOEFLUX_GPU_ATTN_TILE");
    ex->attn_tile = !(tile && strcmp(tile, "0") == 0);
    ex->fuse = mf_gpu_fuse_env();
    if (ex->fuse < 0) {
        metal_exec_free(ex);
        return mf_err(err, errlen, MF_ERR_ARG, "metal backend: MOEFLUX_GPU_FUSE=%s: "
                      MF_FUSE_EXPECTED, getenv("MOEFLUX_GPU_FUSE"));
    }
    ex->attn_block = mf_gpu_attn_block_env();
    if (ex->attn_block < 0) {
        metal_exec_free(ex);
        return mf_err(err, errlen, MF_ERR_ARG, "metal backend: MOEFLUX_GPU_ATTN_BLOCK=%s: "
                      MF_ATTN_BLOCK_EXPECTED, getenv("MOEFLUX_GPU_ATTN_BLOCK"));
    }
    *out = ex;
    return MF_OK;
}

/* ==== Weights ==== */

// Copies of host memory that is not page-aligned (derived f32 tensors).
static const void *map_copy(struct mf_metal_be *mb, const void *host, uint64_t bytes,
                            char *err, size_t errlen) {
    id<MTLBuffer> buf = bytes <= mb->max_len
                            ? [mb->dev newBufferWithBytes:host length:(NSUInteger)bytes
                                                  options:MTLResourceStorageModeShared]
                            : nil;
    struct region r = {.base = (uintptr_t)[buf contents], .len = (size_t)bytes, .buf = buf,
                       .kind = R_WEIGHTS, .owner = [buf contents]};
    if (!buf || !region_add(&mb->weights, r)) {
        [buf release];
        mf_err(err, errlen, MF_ERR_NOMEM, "metal backend: no buffer for %llu bytes of "
               "weights (largest buffer %zu)", (unsigned long long)bytes, mb->max_len);
        return NULL;
    }
    return [buf contents];
}

// Window i of a page-aligned mapping: windows of the largest buffer length at half
// that stride, so every tensor up to half of it lies whole in one window.
static int map_window(struct mf_metal_be *mb, const void *host, size_t total, size_t at,
                      size_t len, char *err, size_t errlen) {
    void *p = (char *)host + at;
    id<MTLBuffer> buf = [mb->dev newBufferWithBytesNoCopy:p length:len
                                                  options:MTLResourceStorageModeShared
                                              deallocator:nil];
    struct region r = {.base = (uintptr_t)p, .len = len, .buf = buf, .kind = R_WEIGHTS,
                       .owner = host};
    if (buf && region_add(&mb->weights, r))
        return MF_OK;
    [buf release];
    return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: cannot wrap bytes %zu..%zu "
                  "of the %zu-byte weights mapping as a buffer", at, at + len, total);
}

static void unmap_owner(struct mf_metal_be *mb, const void *owner) {
    for (int i = mb->weights.n - 1; i >= 0; i--)
        if (mb->weights.r[i].owner == owner)
            region_drop(&mb->weights, i);
}

static const void *map_nocopy(struct mf_metal_be *mb, const void *host, uint64_t bytes,
                              char *err, size_t errlen) {
    size_t total = round_up((size_t)bytes, mb->page);
    size_t win = total <= mb->max_len ? total : mb->max_len;
    size_t step = win == total ? total : win / 2 / mb->page * mb->page;
    int rc = MF_OK;
    for (size_t at = 0; rc == MF_OK && at < total; at += step) {
        size_t len = total - at < win ? total - at : win;
        rc = map_window(mb, host, total, at, len, err, errlen);
        if (at + len >= total)
            break;
    }
    if (rc != MF_OK)
        unmap_owner(mb, host);
    return rc == MF_OK ? host : NULL;
}

static const void *metal_map_weights(struct mf_backend *be, const void *host_ptr,
                                     uint64_t bytes, char *err, size_t errlen) {
    struct mf_metal_be *mb = be->impl;
    if (!host_ptr || !bytes) {
        mf_err(err, errlen, MF_ERR_ARG, "metal backend: map_weights of %s",
               host_ptr ? "0 bytes" : "a NULL pointer");
        return NULL;
    }
    const void *dev = NULL;
    pthread_mutex_lock(&mb->lock);
    @autoreleasepool {
        if ((uintptr_t)host_ptr % mb->page == 0)
            dev = map_nocopy(mb, host_ptr, bytes, err, errlen);
        if (!dev)   // not page-aligned, or Metal refused the wrap: a copy
            dev = map_copy(mb, host_ptr, bytes, err, errlen);
    }
    pthread_mutex_unlock(&mb->lock);
    return dev;
}

static void metal_unmap_weights(struct mf_backend *be, const void *dev, uint64_t bytes) {
    (void)bytes;
    struct mf_metal_be *mb = be->impl;
    if (!dev)
        return;
    pthread_mutex_lock(&mb->lock);
    unmap_owner(mb, dev);
    pthread_mutex_unlock(&mb->lock);
}

static int metal_mem_info(struct mf_backend *be, uint64_t *free_bytes, uint64_t *total_bytes,
                          char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    struct mf_metal_be *mb = be->impl;
    uint64_t total = [mb->dev recommendedMaxWorkingSetSize];
    uint64_t used = (uint64_t)[mb->dev currentAllocatedSize];
    *total_bytes = total;
    *free_bytes = total > used ? total - used : 0;
    return MF_OK;
}

/* ==== Lifecycle ==== */

static void metal_free(struct mf_backend *be) {
    if (!be)
        return;
    struct mf_metal_be *mb = be->impl;
    if (mb) {
        @autoreleasepool {
            regions_free(&mb->weights);
            for (int i = 0; i < MF_MKID_COUNT; i++)
                [mb->pipe[i] release];
            [mb->lib release];
            [mb->dev release];
        }
        if (mb->lock_ok)
            pthread_mutex_destroy(&mb->lock);
        free(mb);
    }
    free(be);
}

// Safe math, as NVRTC runs without fast math: mathMode where the OS has it (macOS 15),
// else the older fastMathEnabled switch.
static MTLCompileOptions *compile_options(void) {
    MTLCompileOptions *o = [[MTLCompileOptions alloc] init];
    if (@available(macOS 15.0, *)) {
        o.mathMode = MTLMathModeSafe;
    } else {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
        o.fastMathEnabled = NO;
#pragma clang diagnostic pop
    }
    return o;
}

// The embedded kernel sources, or with MOEFLUX_SHADERS_DIR=<repo>/shaders the files
// there (kernel work without a rebuild, as on CUDA).
static int make_library(struct mf_metal_be *mb, char *err, size_t errlen) {
    char *src = NULL;
    int rc = mf_metal_program_source(getenv("MOEFLUX_SHADERS_DIR"), &src, err, errlen);
    if (rc != MF_OK)
        return rc;
    NSString *text = [[NSString alloc] initWithUTF8String:src];
    free(src);
    MTLCompileOptions *opts = compile_options();
    NSError *e = nil;
    mb->lib = text ? [mb->dev newLibraryWithSource:text options:opts error:&e] : nil;
    [text release];
    [opts release];
    if (!mb->lib)
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: the kernel library "
                      "did not compile: %s", text ? ns_text(e) : "source is not UTF-8");
    return MF_OK;
}

static int make_pipeline(struct mf_metal_be *mb, int i, char *err, size_t errlen) {
    const char *name = mf_metal_kernel_names[i];
    id<MTLFunction> fn = [mb->lib newFunctionWithName:[NSString stringWithUTF8String:name]];
    if (!fn)
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: kernel %s (kernels.def) "
                      "is not in the compiled library", name);
    NSError *e = nil;
    mb->pipe[i] = [mb->dev newComputePipelineStateWithFunction:fn error:&e];
    [fn release];
    if (!mb->pipe[i])
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: pipeline %s: %s", name,
                      ns_text(e));
    if ([mb->pipe[i] threadExecutionWidth] != 32)
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: pipeline %s: simdgroup "
                      "width %lu, the kernels assume 32", name,
                      (unsigned long)[mb->pipe[i] threadExecutionWidth]);
    return MF_OK;
}

// Unified memory, asked only where the OS has the question (macOS 10.15).
static int has_unified(id<MTLDevice> dev) {
    if (@available(macOS 10.15, *))
        return dev && [dev hasUnifiedMemory];
    return 0;
}

static int open_device(struct mf_metal_be *mb, char *err, size_t errlen) {
    mb->dev = MTLCreateSystemDefaultDevice();
    if (!mb->dev)
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: no Metal device");
    if (!has_unified(mb->dev))
        return mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: device %s has no unified "
                      "memory (the backend needs Apple Silicon)", [[mb->dev name] UTF8String]);
    long page = sysconf(_SC_PAGESIZE);
    mb->page = page > 0 ? (size_t)page : 16384;
    mb->max_len = (size_t)[mb->dev maxBufferLength] / mb->page * mb->page;
    mb->tc = mf_gpu_tc_env();
    return MF_OK;
}

int mf_backend_metal_probe(char *err, size_t errlen) {
    int rc;
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        rc = !dev ? mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: no Metal device")
             : !has_unified(dev)
                 ? mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: the Metal device has "
                          "no unified memory (the backend needs Apple Silicon)")
                 : MF_OK;
        [dev release];
    }
    return rc;
}

static const struct mf_backend_ops metal_ops;

int mf_backend_metal_new(struct mf_backend **out, char *err, size_t errlen) {
    *out = NULL;
    struct mf_backend *be = calloc(1, sizeof *be);
    struct mf_metal_be *mb = calloc(1, sizeof *mb);
    if (!be || !mb) {
        free(be);
        free(mb);
        return mf_err(err, errlen, MF_ERR_NOMEM, "metal backend: out of memory");
    }
    be->ops = &metal_ops;
    be->impl = mb;
    int rc = pthread_mutex_init(&mb->lock, NULL) == 0
                 ? MF_OK
                 : mf_err(err, errlen, MF_ERR_BACKEND, "metal backend: pthread_mutex_init");
    mb->lock_ok = rc == MF_OK;
    @autoreleasepool {
        if (!rc)
            rc = open_device(mb, err, errlen);
        if (!rc)
            rc = make_library(mb, err, errlen);
        for (int i = 0; !rc && i < MF_MKID_COUNT; i++)
            rc = make_pipeline(mb, i, err, errlen);
    }
    if (rc) {
        metal_free(be);
        return rc;
    }
    *out = be;
    return MF_OK;
}

/* ==== The op table ==== */

static const struct mf_backend_ops metal_ops = {
    .api_version = MF_BACKEND_API_VERSION,
    .name = "metal",
    .free = metal_free,
    .map_weights = metal_map_weights,
    .exec_new = metal_exec_new,
    .exec_free = metal_exec_free,
    .unmap_weights = metal_unmap_weights,
    .mem_info = metal_mem_info,
    .status = metal_status,
    .host_is_device = 1,
    .queues_work = 1,
    .alloc = metal_alloc,
    .dealloc = metal_dealloc,
    .upload = metal_upload,
    .download = mf_metal_download,
    .copy = mf_metal_copy,
    .zero = metal_zero,
    .alloc_host = metal_alloc_host,
    .dealloc_host = metal_dealloc_host,
    .upload_async = metal_upload_async,
    .sync = metal_sync,
    .submit = metal_submit,
    .fence_new = metal_fence_new,
    .fence_record = metal_fence_record,
    .fence_wait = metal_fence_wait,
    .fence_wait_device = metal_fence_wait_device,
    .fence_free = metal_fence_free,
    .matmul = mf_metal_matmul,
    .matmul_t = mf_metal_matmul_t,
    .matmul_multi = mf_metal_matmul_multi,
    .rms_matmul_multi = mf_metal_rms_matmul_multi,
    .matmul_add = mf_metal_matmul_add,
    .rms_route = mf_metal_rms_route,
    .matmul_heads = mf_metal_matmul_heads,
    .embed = mf_metal_embed,
    .rmsnorm = mf_metal_rmsnorm,
    .add_rmsnorm = mf_metal_add_rmsnorm,
    .rmsnorm_heads = mf_metal_rmsnorm_heads,
    .rmsnorm_gated = mf_metal_rmsnorm_gated,
    .rope = mf_metal_rope,
    .rope_qk = mf_metal_rope_qk,
    .attention = mf_metal_attention,
    .attention_ext = mf_metal_attention_ext,
    .conv1d_silu = mf_metal_conv1d_silu,
    .gdn_gates = mf_metal_gdn_gates,
    .gdn_recurrence = mf_metal_gdn_recurrence,
    .conv1d_silu_from = mf_metal_conv1d_silu_from,
    .gdn_recurrence_from = mf_metal_gdn_recurrence_from,
    .swiglu = mf_metal_swiglu,
    .swiglu_clamped = mf_metal_swiglu_clamped,
    .mul_sigmoid = mf_metal_mul_sigmoid,
    .axpy = mf_metal_axpy,
    .axpy_flag = mf_metal_axpy_flag,
    .scatter_add_rows = mf_metal_scatter_add_rows,
    .gather_rows = mf_metal_gather_rows,
    .gather_rows_dev = mf_metal_gather_rows_dev,
    .flag_nonfinite = mf_metal_flag_nonfinite,
    .moe_route = mf_metal_moe_route,
    .moe_experts = mf_metal_moe_experts,
    .moe_experts_check = mf_metal_moe_experts_check,
    .parallel_for = NULL,
};
