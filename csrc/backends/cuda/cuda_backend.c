/*
 * cuda_backend.c — the CUDA backend's lifecycle (libraries, device, primary context,
 * kernel module), its exec (one non-blocking stream per context, the pinned argument
 * ring, a pool of device allocations, op scratch, the sticky first error), memory and
 * copies, fences (CUDA events), weights mapped by copying through pinned staging, and
 * the op table. The compute ops are in cuda_ops.c.
 */
#include "backends/cuda/cuda_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==== Errors ==== */

void mf_cuda_fail(struct mf_exec *ex, int status, const char *fmt, ...) {
    if (ex->status != MF_OK)
        return;
    ex->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ex->err, sizeof ex->err, fmt, ap);
    va_end(ap);
}

int mf_cuda_ck(struct mf_exec *ex, CUresult r, const char *op, const char *call) {
    if (r == MF_CUDA_SUCCESS)
        return 1;
    char text[256];
    mf_cu_error_text(&ex->cb->cu, r, text, sizeof text);
    mf_cuda_fail(ex, MF_ERR_BACKEND, "cuda backend: %s: %s: %s", op, call, text);
    return 0;
}

#define CK(ex, op, call) mf_cuda_ck((ex), (ex)->cb->cu.call, (op), #call)

void mf_cuda_enter(struct mf_exec *ex) { CK(ex, "enter", CtxSetCurrent(ex->cb->ctx)); }

// Backend-level calls (no exec): the message goes to err.
static int be_ck(const struct mf_cuda_be *cb, CUresult r, const char *what, char *err,
                 size_t errlen) {
    if (r == MF_CUDA_SUCCESS)
        return MF_OK;
    char text[256];
    mf_cu_error_text(&cb->cu, r, text, sizeof text);
    return mf_err(err, errlen, MF_ERR_BACKEND, "cuda backend: %s: %s", what, text);
}

/* ==== Lifecycle ==== */

static void cuda_free(struct mf_backend *be) {
    if (!be)
        return;
    struct mf_cuda_be *cb = be->impl;
    if (cb) {
        if (cb->ctx) {
            cb->cu.CtxSetCurrent(cb->ctx);
            if (cb->wstream)
                cb->cu.StreamDestroy(cb->wstream);
            if (cb->mod)
                cb->cu.ModuleUnload(cb->mod);
            cb->cu.PrimaryCtxRelease(cb->dev);
        }
        mf_nvrtc_api_unload(&cb->nv);
        mf_cu_api_unload(&cb->cu);
        free(cb);
    }
    free(be);
}

// The device named by MOEFLUX_CUDA_DEVICE (default 0), its name and capability.
static int pick_device(struct mf_cuda_be *cb, char *err, size_t errlen) {
    int count = 0, ordinal = 0, maj = 0, min = 0;
    const char *env = getenv("MOEFLUX_CUDA_DEVICE");
    if (env && *env)
        ordinal = atoi(env);
    int rc = be_ck(cb, cb->cu.DeviceGetCount(&count), "cuDeviceGetCount", err, errlen);
    if (rc)
        return rc;
    if (ordinal < 0 || ordinal >= count)
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: device %d asked for (MOEFLUX_CUDA_DEVICE), %d present",
                      ordinal, count);
    if ((rc = be_ck(cb, cb->cu.DeviceGet(&cb->dev, ordinal), "cuDeviceGet", err, errlen)) ||
        (rc = be_ck(cb, cb->cu.DeviceGetAttribute(&maj, MF_CU_DEVICE_ATTRIBUTE_CC_MAJOR,
                                                  cb->dev), "cuDeviceGetAttribute", err,
                    errlen)) ||
        (rc = be_ck(cb, cb->cu.DeviceGetAttribute(&min, MF_CU_DEVICE_ATTRIBUTE_CC_MINOR,
                                                  cb->dev), "cuDeviceGetAttribute", err,
                    errlen)))
        return rc;
    cb->cc = 10 * maj + min;
    cb->tc = cb->cc >= 80 && mf_gpu_tc_env();
    cb->mma = cb->cc >= 80;
    if (cb->cu.DeviceGetName(cb->name, (int)sizeof cb->name, cb->dev) != MF_CUDA_SUCCESS)
        snprintf(cb->name, sizeof cb->name, "CUDA device %d", ordinal);
    return MF_OK;
}

// Libraries, cuInit and the driver version: what both the probe and the constructor
// need.
static int open_libraries(struct mf_cuda_be *cb, char *err, size_t errlen) {
    int rc = mf_cu_api_load(&cb->cu, err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.Init(0), "cuInit", err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.DriverGetVersion(&cb->driver_version), "cuDriverGetVersion",
                   err, errlen);
    if (!rc)
        rc = mf_nvrtc_api_load(&cb->nv, err, errlen);
    return rc;
}

const char *const mf_cuda_kernel_names[MF_KID_COUNT] = {
#define K(name, params, n_buf, grid) #name,
#include "../../../shaders/kernels.def"
#undef K
};

// The kernels of the module, each with the carveout MOEFLUX_GPU_CARVEOUT asks for.
static int load_functions(struct mf_cuda_be *cb, char *err, size_t errlen) {
    const char *const *names = mf_cuda_kernel_names;
    const int carve = mf_gpu_carveout_env();
    if (carve == -2)
        return mf_err(err, errlen, MF_ERR_ARG, "cuda backend: MOEFLUX_GPU_CARVEOUT=%s: "
                      MF_CARVEOUT_EXPECTED, getenv("MOEFLUX_GPU_CARVEOUT"));
    if (carve >= 0 && !cb->cu.FuncSetAttribute)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED, "cuda backend: MOEFLUX_GPU_CARVEOUT: "
                      "the driver has no cuFuncSetAttribute");
    for (int i = 0; i < MF_KID_COUNT; i++) {
        int rc = be_ck(cb, cb->cu.ModuleGetFunction(&cb->fn[i], cb->mod, names[i]),
                       names[i], err, errlen);
        if (!rc && carve >= 0)
            rc = be_ck(cb, cb->cu.FuncSetAttribute(cb->fn[i], MF_CU_FUNC_CARVEOUT, carve),
                       "MOEFLUX_GPU_CARVEOUT (cuFuncSetAttribute)", err, errlen);
        if (rc)
            return rc;
    }
    return MF_OK;
}

int mf_backend_cuda_tc(const struct mf_backend *be) {
    const struct mf_cuda_be *cb = be->impl;
    return cb->tc;
}

int mf_backend_cuda_probe(char *err, size_t errlen) {
    struct mf_cuda_be *cb = calloc(1, sizeof *cb);
    if (!cb)
        return mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: out of memory");
    int count = 0;
    int rc = open_libraries(cb, err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.DeviceGetCount(&count), "cuDeviceGetCount", err, errlen);
    if (!rc && count < 1)
        rc = mf_err(err, errlen, MF_ERR_BACKEND, "cuda backend: no CUDA device");
    mf_nvrtc_api_unload(&cb->nv);
    mf_cu_api_unload(&cb->cu);
    free(cb);
    return rc;
}

static const struct mf_backend_ops cuda_ops;

int mf_backend_cuda_new(struct mf_backend **out, char *err, size_t errlen) {
    *out = NULL;
    struct mf_backend *be = calloc(1, sizeof *be);
    struct mf_cuda_be *cb = calloc(1, sizeof *cb);
    if (!be || !cb) {
        free(be);
        free(cb);
        return mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: out of memory");
    }
    be->ops = &cuda_ops;
    be->impl = cb;
    int rc = open_libraries(cb, err, errlen);
    if (!rc)
        rc = pick_device(cb, err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.PrimaryCtxRetain(&cb->ctx, cb->dev),
                   "cuDevicePrimaryCtxRetain", err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.CtxSetCurrent(cb->ctx), "cuCtxSetCurrent", err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.StreamCreate(&cb->wstream, MF_CU_STREAM_NON_BLOCKING),
                   "cuStreamCreate", err, errlen);
    if (!rc)
        rc = mf_cuda_module_load(&cb->cu, &cb->nv, cb->cc, cb->driver_version, &cb->mod,
                                 err, errlen);
    if (!rc)
        rc = load_functions(cb, err, errlen);
    if (rc) {
        cuda_free(be);
        return rc;
    }
    *out = be;
    return MF_OK;
}

/* ==== Weights: device copies made through pinned staging ==== */

#define STAGE_BYTES ((size_t)16 << 20)

// Two pinned buffers alternate: while one is copied to the device the next chunk is
// memcpy'd into the other; an event per buffer says when it is free again.
static int stage_copy(struct mf_cuda_be *cb, CUdeviceptr dst, const void *src, uint64_t n,
                      void *stage[2], CUevent ev[2], char *err, size_t errlen) {
    int rc = MF_OK;
    for (uint64_t off = 0, i = 0; off < n && !rc; off += STAGE_BYTES, i++) {
        size_t len = n - off < STAGE_BYTES ? (size_t)(n - off) : STAGE_BYTES;
        int b = (int)(i & 1);
        if (i >= 2)
            rc = be_ck(cb, cb->cu.EventSynchronize(ev[b]), "cuEventSynchronize", err, errlen);
        if (rc)
            break;
        memcpy(stage[b], (const char *)src + off, len);
        rc = be_ck(cb, cb->cu.MemcpyHtoDAsync(dst + off, stage[b], len, cb->wstream),
                   "cuMemcpyHtoDAsync (weights)", err, errlen);
        if (!rc)
            rc = be_ck(cb, cb->cu.EventRecord(ev[b], cb->wstream), "cuEventRecord", err,
                       errlen);
    }
    int rs = be_ck(cb, cb->cu.StreamSynchronize(cb->wstream), "cuStreamSynchronize", err,
                   errlen);
    return rc ? rc : rs;
}

static const void *cuda_map_weights(struct mf_backend *be, const void *host_ptr,
                                    uint64_t bytes, char *err, size_t errlen) {
    struct mf_cuda_be *cb = be->impl;
    if (!host_ptr || !bytes) {
        mf_err(err, errlen, MF_ERR_ARG, "cuda backend: map_weights of %s",
               host_ptr ? "0 bytes" : "a NULL pointer");
        return NULL;
    }
    void *stage[2] = {NULL, NULL};
    CUevent ev[2] = {NULL, NULL};
    CUdeviceptr dev = 0;
    int rc = be_ck(cb, cb->cu.CtxSetCurrent(cb->ctx), "cuCtxSetCurrent", err, errlen);
    if (!rc && cb->cu.MemAlloc(&dev, (size_t)bytes) != MF_CUDA_SUCCESS)
        rc = mf_err(err, errlen, MF_ERR_NOMEM,
                    "cuda backend: no device memory for %llu bytes of weights",
                    (unsigned long long)bytes);
    for (int i = 0; i < 2 && !rc; i++) {
        rc = be_ck(cb, cb->cu.MemHostAlloc(&stage[i], STAGE_BYTES, MF_CU_MEMHOSTALLOC_PORTABLE),
                   "cuMemHostAlloc (weight staging)", err, errlen);
        if (!rc)
            rc = be_ck(cb, cb->cu.EventCreate(&ev[i], MF_CU_EVENT_DISABLE_TIMING),
                       "cuEventCreate", err, errlen);
    }
    if (!rc)
        rc = stage_copy(cb, dev, host_ptr, bytes, stage, ev, err, errlen);
    for (int i = 0; i < 2; i++) {
        if (ev[i])
            cb->cu.EventDestroy(ev[i]);
        if (stage[i])
            cb->cu.MemFreeHost(stage[i]);
    }
    if (rc && dev) {
        cb->cu.MemFree(dev);
        dev = 0;
    }
    return rc ? NULL : (const void *)(uintptr_t)dev;
}

static void cuda_unmap_weights(struct mf_backend *be, const void *dev, uint64_t bytes) {
    (void)bytes;
    struct mf_cuda_be *cb = be->impl;
    if (!dev)
        return;
    cb->cu.CtxSetCurrent(cb->ctx);
    cb->cu.MemFree(mf_dp(dev));
}

static int cuda_mem_info(struct mf_backend *be, uint64_t *free_bytes, uint64_t *total_bytes,
                         char *err, size_t errlen) {
    struct mf_cuda_be *cb = be->impl;
    size_t f = 0, t = 0;
    int rc = be_ck(cb, cb->cu.CtxSetCurrent(cb->ctx), "cuCtxSetCurrent", err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.MemGetInfo(&f, &t), "cuMemGetInfo", err, errlen);
    *free_bytes = f;
    *total_bytes = t;
    return rc;
}

// Expert file mappings the device's copies read directly (read-only registration: the
// mappings are PROT_READ).
static int cuda_pin_host(struct mf_backend *be, const void *p, size_t n, char *err,
                         size_t errlen) {
    struct mf_cuda_be *cb = be->impl;
    int rc = be_ck(cb, cb->cu.CtxSetCurrent(cb->ctx), "cuCtxSetCurrent", err, errlen);
    if (!rc)
        rc = be_ck(cb, cb->cu.MemHostRegister((void *)(uintptr_t)p, n,
                                              MF_CU_MEMHOSTREGISTER_PORTABLE |
                                                  MF_CU_MEMHOSTREGISTER_READ_ONLY),
                   "cuMemHostRegister (read-only)", err, errlen);
    return rc;
}

static void cuda_unpin_host(struct mf_backend *be, const void *p) {
    struct mf_cuda_be *cb = be->impl;
    cb->cu.CtxSetCurrent(cb->ctx);
    cb->cu.MemHostUnregister((void *)(uintptr_t)p);
}

/* ==== Exec ==== */

static void free_blocks(struct mf_exec *ex, struct mf_cuda_block *b, int n) {
    for (int i = 0; i < n; i++)
        ex->cb->cu.MemFree(b[i].p);
}

static void cuda_exec_free(struct mf_exec *ex) {
    if (!ex)
        return;
    struct mf_cu_api *cu = &ex->cb->cu;
    cu->CtxSetCurrent(ex->cb->ctx);
    if (ex->cst)   // copies into allocations freed below
        cu->StreamSynchronize(ex->cst);
    if (ex->st)
        cu->StreamSynchronize(mf_cuda_stream(ex));
    mf_cuda_graphs_free(ex);
    mf_cuda_prof_free(ex);
    free_blocks(ex, ex->live, ex->n_live);
    free_blocks(ex, ex->pool, ex->n_pool);
    free(ex->live);
    free(ex->pool);
    if (ex->ws)
        cu->MemFree(ex->ws);
    if (ex->route_ws)
        cu->MemFree(ex->route_ws);
    for (int i = 0; i < MF_RING_SEGS; i++)
        if (ex->ring_ev[i])
            cu->EventDestroy(ex->ring_ev[i]);
    if (ex->ring_dev)
        cu->MemFree(ex->ring_dev);
    if (ex->count_dev)
        cu->MemFree(ex->count_dev);
    if (ex->ring_host)
        cu->MemFreeHost(ex->ring_host);
    if (ex->cst)
        cu->StreamDestroy(ex->cst);
    if (ex->st)
        cu->StreamDestroy(ex->st);
    free(ex);
}

// Programmatic dependent launch where the GPU and the driver have it, unless
// MOEFLUX_GPU_PDL=0; tiled prefill attention unless MOEFLUX_GPU_ATTN_TILE=0; the
// attention's query blocks (MOEFLUX_GPU_ATTN_BLOCK); the fusions MOEFLUX_GPU_FUSE names
// (mf_gpu_fuse_env), all read when an exec is made. A switch it cannot read fails the
// exec.
static int pdl_init(struct mf_exec *ex) {
    const char *e = getenv("MOEFLUX_GPU_PDL"), *a = getenv("MOEFLUX_GPU_ATTN_TILE");
    ex->pdl = ex->cb->cc >= 90 && ex->cb->cu.LaunchKernelEx && !(e && strcmp(e, "0") == 0);
    ex->attn_tile = !(a && strcmp(a, "0") == 0);
    ex->attn_block = mf_gpu_attn_block_env();
    ex->fuse = mf_gpu_fuse_env();
    if (ex->fuse < 0)
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: MOEFLUX_GPU_FUSE=%s: " MF_FUSE_EXPECTED,
                     getenv("MOEFLUX_GPU_FUSE"));
    else if (ex->attn_block < 0)
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: MOEFLUX_GPU_ATTN_BLOCK=%s: "
                     MF_ATTN_BLOCK_EXPECTED, getenv("MOEFLUX_GPU_ATTN_BLOCK"));
    return ex->status;
}

static int exec_setup(struct mf_exec *ex) {
    const size_t ring = MF_RING_SEGS * MF_RING_SEG_BYTES;
    void *host = NULL;
    if (!CK(ex, "exec_new", CtxSetCurrent(ex->cb->ctx)) ||
        !CK(ex, "exec_new", StreamCreate(&ex->st, MF_CU_STREAM_NON_BLOCKING)) ||
        !CK(ex, "exec_new", StreamCreate(&ex->cst, MF_CU_STREAM_NON_BLOCKING)) ||
        !CK(ex, "exec_new", MemHostAlloc(&host, ring, MF_CU_MEMHOSTALLOC_PORTABLE)))
        return ex->status;
    ex->ring_host = host;
    if (!CK(ex, "exec_new", MemAlloc(&ex->ring_dev, ring)) ||
        !CK(ex, "exec_new", MemAlloc(&ex->count_dev, MF_COUNT_INTS * sizeof(int))) ||
        !CK(ex, "exec_new", MemsetD8Async(ex->count_dev, 0, MF_COUNT_INTS * sizeof(int),
                                          ex->st)))
        return ex->status;
    for (int i = 0; i < MF_RING_SEGS; i++)
        if (!CK(ex, "exec_new", EventCreate(&ex->ring_ev[i], MF_CU_EVENT_DISABLE_TIMING)))
            return ex->status;
    int rc = pdl_init(ex);
    rc = rc ? rc : mf_cuda_prof_init(ex);
    return rc ? rc : mf_cuda_graphs_init(ex);
}

static int cuda_exec_new(struct mf_backend *be, int n_threads, struct mf_exec **out,
                         char *err, size_t errlen) {
    *out = NULL;
    if (n_threads < 1)
        return mf_err(err, errlen, MF_ERR_ARG, "cuda backend: n_threads %d < 1", n_threads);
    struct mf_exec *ex = calloc(1, sizeof *ex);
    if (!ex)
        return mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: out of memory");
    ex->cb = be->impl;
    int rc = exec_setup(ex);
    if (rc) {
        mf_err(err, errlen, rc, "%s", ex->err);
        cuda_exec_free(ex);
        return rc;
    }
    *out = ex;
    return MF_OK;
}

static int cuda_status(struct mf_exec *ex, char *err, size_t errlen) {
    if (ex->status != MF_OK)
        mf_err(err, errlen, ex->status, "%s", ex->err);
    return ex->status;
}

/* ==== Argument ring and scratch ==== */

CUdeviceptr mf_cuda_ring_put(struct mf_exec *ex, const void *src, size_t n, const char *op) {
    const size_t need = (n + 255) & ~(size_t)255;
    if (need > MF_RING_SEG_BYTES) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: %s: a host argument of %zu bytes "
                     "exceeds the argument ring's %zu-byte segments", op, n,
                     MF_RING_SEG_BYTES);
        return 0;
    }
    if (ex->ring_off + need > MF_RING_SEG_BYTES) {
        // Leave this segment (its last use is queued) and wait until the next one's is done.
        if (!CK(ex, op, EventRecord(ex->ring_ev[ex->ring_seg], mf_cuda_stream(ex))))
            return 0;
        ex->ring_recorded[ex->ring_seg] = 1;
        ex->ring_seg = (ex->ring_seg + 1) % MF_RING_SEGS;
        ex->ring_off = 0;
        if (ex->ring_recorded[ex->ring_seg] &&
            !CK(ex, op, EventSynchronize(ex->ring_ev[ex->ring_seg])))
            return 0;
    }
    const size_t off = (size_t)ex->ring_seg * MF_RING_SEG_BYTES + ex->ring_off;
    ex->ring_off += need;
    if (n)
        memcpy(ex->ring_host + off, src, n);
    if (n && !CK(ex, op, MemcpyHtoDAsync(ex->ring_dev + off, ex->ring_host + off, n,
                                         mf_cuda_stream(ex))))
        return 0;
    return ex->ring_dev + off;
}

CUdeviceptr mf_cuda_scratch(struct mf_exec *ex, CUdeviceptr *buf, size_t *have, size_t n,
                            const char *op) {
    if (*buf && *have >= n)
        return *buf;
    if (*buf) {   // queued kernels may still use the old one
        if (!CK(ex, op, StreamSynchronize(mf_cuda_stream(ex))))
            return 0;
        ex->cb->cu.MemFree(*buf);
        *buf = 0;
        *have = 0;
    }
    size_t want = n < ((size_t)1 << 20) ? ((size_t)1 << 20) : n + n / 4;
    if (!CK(ex, op, MemAlloc(buf, want)))
        return 0;
    *have = want;
    return *buf;
}

// One launch with the programmatic-serialization attribute (cuLaunchKernelEx).
static int launch_pdl(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                      void **args, const char *op) {
    struct mf_cu_launch_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.id = MF_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.i = 1;
    const struct mf_cu_launch_config c = {
        .grid = {g[0], g[1], g[2]},
        .block = {b[0], b[1], b[2]},
        .stream = ex->st,
        .attrs = &attr,
        .n_attrs = 1,
    };
    return CK(ex, op, LaunchKernelEx(&c, ex->cb->fn[kid], args, NULL));
}

int mf_cuda_launch_now(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                       void *params, const CUdeviceptr *bufs, int n_buf, const char *op) {
    void *args[16];
    CUdeviceptr local[15];
    for (int i = 0; i < n_buf; i++) {
        local[i] = bufs[i];
        args[i] = &local[i];
    }
    args[n_buf] = params;
    if (ex->pdl)
        return launch_pdl(ex, kid, g, b, args, op);
    return CK(ex, op, LaunchKernel(ex->cb->fn[kid], g[0], g[1], g[2], b[0], b[1], b[2], 0,
                                   ex->st, args, NULL));
}

void mf_cuda_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                    const void *params, size_t params_bytes, const CUdeviceptr *bufs,
                    int n_buf, const char *op) {
    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || n_buf > 15)
        return;
    if (mf_cuda_graph_record(ex, kid, g, b, params, params_bytes, bufs, n_buf))
        return;
    if (mf_cuda_launch_now(ex, kid, g, b, (void *)params, bufs, n_buf, op))
        mf_cuda_prof_launched(ex, kid);
}

CUstream mf_cuda_stream(struct mf_exec *ex) {
    mf_cuda_graph_flush(ex);
    return ex->st;
}

/* ==== Memory ====
 * Device allocations come from a per-exec pool: a freed block is reused by a later
 * request of at most its size and at least half of it. Blocks are only ever used on
 * this exec's stream, so reuse is ordered after every queued use. */

static int grow(void **arr, int *cap, int need, size_t elem) {
    if (need <= *cap)
        return 1;
    int nc = *cap ? *cap * 2 : 64;
    while (nc < need)
        nc *= 2;
    void *p = realloc(*arr, (size_t)nc * elem);
    if (!p)
        return 0;
    *arr = p;
    *cap = nc;
    return 1;
}

static CUdeviceptr pool_take(struct mf_exec *ex, size_t bytes, size_t *have) {
    int best = -1;
    for (int i = 0; i < ex->n_pool; i++) {
        size_t b = ex->pool[i].bytes;
        if (b >= bytes && b / 2 <= bytes && (best < 0 || b < ex->pool[best].bytes))
            best = i;
    }
    if (best < 0)
        return 0;
    CUdeviceptr p = ex->pool[best].p;
    *have = ex->pool[best].bytes;
    ex->pool[best] = ex->pool[--ex->n_pool];
    return p;
}

// A fresh block; when the device is full, the pool is released first and it is tried
// once more.
static CUdeviceptr fresh_block(struct mf_exec *ex, size_t bytes) {
    CUdeviceptr p = 0;
    CUresult r = ex->cb->cu.MemAlloc(&p, bytes);
    if (r == MF_CUDA_ERROR_OUT_OF_MEMORY && ex->n_pool) {
        ex->cb->cu.StreamSynchronize(mf_cuda_stream(ex));
        free_blocks(ex, ex->pool, ex->n_pool);
        ex->n_pool = 0;
        r = ex->cb->cu.MemAlloc(&p, bytes);
    }
    return r == MF_CUDA_SUCCESS ? p : 0;
}

static void *cuda_alloc(struct mf_exec *ex, size_t bytes) {
    mf_cuda_enter(ex);
    size_t sz = (bytes + 255) & ~(size_t)255;
    if (!sz)
        sz = 256;
    if (!grow((void **)&ex->live, &ex->cap_live, ex->n_live + 1, sizeof *ex->live))
        return NULL;
    size_t have = sz;
    CUdeviceptr p = pool_take(ex, sz, &have);
    if (!p)
        p = fresh_block(ex, sz);
    if (!p)
        return NULL;
    if (!CK(ex, "alloc", MemsetD8Async(p, 0, sz, mf_cuda_stream(ex))))
        return NULL;
    ex->live[ex->n_live].p = p;
    ex->live[ex->n_live].bytes = have;
    ex->n_live++;
    return (void *)(uintptr_t)p;
}

static void cuda_dealloc(struct mf_exec *ex, void *ptr) {
    if (!ptr)
        return;
    for (int i = 0; i < ex->n_live; i++) {
        if (ex->live[i].p != mf_dp(ptr))
            continue;
        struct mf_cuda_block b = ex->live[i];
        ex->live[i] = ex->live[--ex->n_live];
        if (grow((void **)&ex->pool, &ex->cap_pool, ex->n_pool + 1, sizeof *ex->pool)) {
            ex->pool[ex->n_pool++] = b;
        } else {   // no room to remember it: give it back to the driver
            mf_cuda_enter(ex);
            CK(ex, "dealloc", StreamSynchronize(mf_cuda_stream(ex)));
            ex->cb->cu.MemFree(b.p);
        }
        return;
    }
    mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: dealloc of %p, not an allocation of this "
                 "exec", ptr);
}

static void *cuda_alloc_host(struct mf_exec *ex, size_t bytes) {
    mf_cuda_enter(ex);
    void *p = NULL;
    if (ex->cb->cu.MemHostAlloc(&p, bytes ? bytes : 1, MF_CU_MEMHOSTALLOC_PORTABLE) !=
        MF_CUDA_SUCCESS)
        return NULL;
    memset(p, 0, bytes);
    return p;
}

static void cuda_dealloc_host(struct mf_exec *ex, void *p) {
    if (!p)
        return;
    mf_cuda_enter(ex);
    CK(ex, "dealloc_host", StreamSynchronize(ex->cst));  // async copies may still read it
    CK(ex, "dealloc_host", StreamSynchronize(mf_cuda_stream(ex)));
    CK(ex, "dealloc_host", MemFreeHost(p));
}

static void cuda_upload(struct mf_exec *ex, void *dst, size_t dst_off, const void *src_host,
                        size_t bytes) {
    mf_cuda_enter(ex);
    for (size_t off = 0; off < bytes && ex->status == MF_OK; off += MF_RING_SEG_BYTES) {
        size_t n = bytes - off < MF_RING_SEG_BYTES ? bytes - off : MF_RING_SEG_BYTES;
        CUdeviceptr staged = mf_cuda_ring_put(ex, (const char *)src_host + off, n, "upload");
        if (staged)
            CK(ex, "upload", MemcpyDtoDAsync(mf_dp(dst) + dst_off + off, staged, n,
                                             mf_cuda_stream(ex)));
    }
}

static void cuda_upload_async(struct mf_exec *ex, void *dst, size_t dst_off,
                              const void *src_host, size_t bytes, struct mf_fence *done) {
    mf_cuda_enter(ex);
    mf_cuda_graph_flush(ex);   // the compute queued so far starts before this copy
    if (bytes)
        CK(ex, "upload_async", MemcpyHtoDAsync(mf_dp(dst) + dst_off, src_host, bytes,
                                               ex->cst));
    if (done && CK(ex, "upload_async", EventRecord(done->ev, ex->cst)))
        done->recorded = 1;
}

static void cuda_download(struct mf_exec *ex, void *dst_host, const void *src,
                          size_t src_off, size_t bytes) {
    mf_cuda_enter(ex);
    if (bytes)
        CK(ex, "download", MemcpyDtoHAsync(dst_host, mf_dp(src) + src_off, bytes,
                                           mf_cuda_stream(ex)));
    CK(ex, "download", StreamSynchronize(mf_cuda_stream(ex)));
    mf_cuda_prof_flush(ex);
    mf_cuda_graph_step(ex);
}

static void cuda_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                      size_t src_off, size_t bytes) {
    mf_cuda_enter(ex);
    if (bytes)
        CK(ex, "copy", MemcpyDtoDAsync(mf_dp(dst) + dst_off, mf_dp(src) + src_off, bytes,
                                       mf_cuda_stream(ex)));
}

static void cuda_zero(struct mf_exec *ex, void *dst, size_t dst_off, size_t bytes) {
    mf_cuda_enter(ex);
    if (bytes)
        CK(ex, "zero", MemsetD8Async(mf_dp(dst) + dst_off, 0, bytes, mf_cuda_stream(ex)));
}

/* ==== Synchronisation ==== */

static void cuda_sync(struct mf_exec *ex) {
    mf_cuda_enter(ex);
    CK(ex, "sync", StreamSynchronize(ex->cst));
    CK(ex, "sync", StreamSynchronize(mf_cuda_stream(ex)));
    mf_cuda_prof_flush(ex);
    mf_cuda_graph_step(ex);
}

static void cuda_submit(struct mf_exec *ex) {
    mf_cuda_enter(ex);
    mf_cuda_graph_flush(ex);
}

static struct mf_fence *cuda_fence_new(struct mf_exec *ex) {
    struct mf_fence *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    mf_cuda_enter(ex);
    if (!CK(ex, "fence_new", EventCreate(&f->ev, MF_CU_EVENT_DISABLE_TIMING))) {
        free(f);
        return NULL;
    }
    return f;
}

static void cuda_fence_record(struct mf_exec *ex, struct mf_fence *f) {
    mf_cuda_enter(ex);
    if (CK(ex, "fence_record", EventRecord(f->ev, mf_cuda_stream(ex))))
        f->recorded = 1;
}

static void cuda_fence_wait(struct mf_exec *ex, struct mf_fence *f) {
    mf_cuda_enter(ex);
    mf_cuda_graph_flush(ex);   // the host waits: what is held back starts now
    if (f->recorded)
        CK(ex, "fence_wait", EventSynchronize(f->ev));
}

// Both streams wait on the device: the compute stream before kernels that read what a
// copy wrote, the copy stream before overwriting what queued kernels read.
static void cuda_fence_wait_device(struct mf_exec *ex, struct mf_fence *f) {
    mf_cuda_enter(ex);
    if (f->recorded &&
        CK(ex, "fence_wait_device", StreamWaitEvent(mf_cuda_stream(ex), f->ev, 0)))
        CK(ex, "fence_wait_device", StreamWaitEvent(ex->cst, f->ev, 0));
}

static void cuda_fence_free(struct mf_exec *ex, struct mf_fence *f) {
    if (!f)
        return;
    mf_cuda_enter(ex);
    ex->cb->cu.EventDestroy(f->ev);
    free(f);
}

/* ==== The op table ==== */

static const struct mf_backend_ops cuda_ops = {
    .api_version = MF_BACKEND_API_VERSION,
    .name = "cuda",
    .prefill_chunk = 512,   // a prefill's products in one chunk (bench/RESULTS.md)
    .free = cuda_free,
    .map_weights = cuda_map_weights,
    .exec_new = cuda_exec_new,
    .exec_free = cuda_exec_free,
    .unmap_weights = cuda_unmap_weights,
    .mem_info = cuda_mem_info,
    .pin_host = cuda_pin_host,
    .unpin_host = cuda_unpin_host,
    .status = cuda_status,
    .host_is_device = 0,
    .alloc = cuda_alloc,
    .dealloc = cuda_dealloc,
    .upload = cuda_upload,
    .download = cuda_download,
    .copy = cuda_copy,
    .zero = cuda_zero,
    .alloc_host = cuda_alloc_host,
    .dealloc_host = cuda_dealloc_host,
    .upload_async = cuda_upload_async,
    .sync = cuda_sync,
    .submit = cuda_submit,
    .fence_new = cuda_fence_new,
    .fence_record = cuda_fence_record,
    .fence_wait = cuda_fence_wait,
    .fence_free = cuda_fence_free,
    .fence_wait_device = cuda_fence_wait_device,
    .queues_work = 1,
    .matmul = mf_cuda_matmul,
    .matmul_t = mf_cuda_matmul_t,
    .matmul_multi = mf_cuda_matmul_multi,
    .rms_matmul_multi = mf_cuda_rms_matmul_multi,
    .matmul_add = mf_cuda_matmul_add,
    .rms_route = mf_cuda_rms_route,
    .matmul_heads = mf_cuda_matmul_heads,
    .embed = mf_cuda_embed,
    .rmsnorm = mf_cuda_rmsnorm,
    .add_rmsnorm = mf_cuda_add_rmsnorm,
    .rmsnorm_heads = mf_cuda_rmsnorm_heads,
    .rmsnorm_gated = mf_cuda_rmsnorm_gated,
    .rope = mf_cuda_rope,
    .rope_qk = mf_cuda_rope_qk,
    .attention = mf_cuda_attention,
    .attention_ext = mf_cuda_attention_ext,
    .conv1d_silu = mf_cuda_conv1d_silu,
    .gdn_gates = mf_cuda_gdn_gates,
    .gdn_recurrence = mf_cuda_gdn_recurrence,
    .conv1d_silu_from = mf_cuda_conv1d_silu_from,
    .gdn_recurrence_from = mf_cuda_gdn_recurrence_from,
    .swiglu = mf_cuda_swiglu,
    .swiglu_clamped = mf_cuda_swiglu_clamped,
    .mul_sigmoid = mf_cuda_mul_sigmoid,
    .axpy = mf_cuda_axpy,
    .axpy_flag = mf_cuda_axpy_flag,
    .scatter_add_rows = mf_cuda_scatter_add_rows,
    .gather_rows = mf_cuda_gather_rows,
    .gather_rows_dev = mf_cuda_gather_rows_dev,
    .flag_nonfinite = mf_cuda_flag_nonfinite,
    .moe_route = mf_cuda_moe_route,
    .moe_experts = mf_cuda_moe_experts,
    .moe_experts_check = mf_cuda_moe_experts_check,
    .moe_experts_dev = mf_cuda_moe_experts_dev,
    .parallel_for = NULL,
};
