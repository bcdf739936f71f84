/*
 * cpu_backend.c — the CPU backend: its op table, host memory as "device" memory, and
 * the exec (a persistent thread pool plus per-thread scratch). The ops themselves are in
 * cpu_matmul.c and cpu_ops.c. This backend is the exact oracle the GPU ones are
 * compared against, so it favours plain, checkable code paths.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/cpu/cpu_internal.h"

/* ==== Lifecycle ==== */

// The backend's own state: the kernel set every exec of it starts with, forced by the
// backend name "cpu:<set>" (tests run a whole model under each set); NULL: the best
// set this CPU runs.
struct cpu_impl {
    const struct mf_cpu_kernels *forced;
};

static void cpu_free(struct mf_backend *be) {
    if (!be)
        return;
    free(be->impl);
    free(be);
}

static const void *cpu_map_weights(struct mf_backend *be, const void *host_ptr,
                                   uint64_t bytes, char *err, size_t errlen) {
    (void)be;
    (void)bytes;
    if (!host_ptr)
        mf_err(err, errlen, MF_ERR_ARG, "cpu backend: map_weights of a NULL pointer");
    return host_ptr;
}

static void cpu_unmap_weights(struct mf_backend *be, const void *dev, uint64_t bytes) {
    (void)be;
    (void)dev;
    (void)bytes;   // the view is the caller's mapping itself
}

// Physical RAM: installed, and free (page cache not counted as free).
static int cpu_mem_info(struct mf_backend *be, uint64_t *free_bytes, uint64_t *total_bytes,
                        char *err, size_t errlen) {
    (void)be;
    long page = sysconf(_SC_PAGESIZE), total = sysconf(_SC_PHYS_PAGES);
#if defined(_SC_AVPHYS_PAGES)
    long avail = sysconf(_SC_AVPHYS_PAGES);
#else
    long avail = total;
#endif
    if (page <= 0 || total <= 0 || avail < 0)
        return mf_err(err, errlen, MF_ERR_BACKEND, "cpu backend: sysconf cannot tell RAM");
    *total_bytes = (uint64_t)total * (uint64_t)page;
    *free_bytes = (uint64_t)avail * (uint64_t)page;
    return MF_OK;
}

static int cpu_status(struct mf_exec *ex, char *err, size_t errlen) {
    (void)ex;
    if (err && errlen)
        err[0] = '\0';
    return MF_OK;   // every op has finished, successfully, when it returns
}

static void cpu_exec_free(struct mf_exec *ex) {
    if (!ex)
        return;
    mf_pool_free(ex->pool);
    if (ex->scratch)
        for (int t = 0; t < ex->n_threads; t++)
            free(ex->scratch[t]);
    free(ex->scratch);
    free(ex->xs_buf);
    free(ex);
}

static int cpu_exec_new(struct mf_backend *be, int n_threads, struct mf_exec **out,
                        char *err, size_t errlen) {
    const struct cpu_impl *impl = be->impl;
    *out = NULL;
    if (n_threads < 1)
        return mf_err(err, errlen, MF_ERR_ARG, "cpu backend: n_threads %d < 1", n_threads);
    struct mf_exec *ex = calloc(1, sizeof *ex);
    if (!ex)
        return mf_err(err, errlen, MF_ERR_NOMEM, "cpu backend: out of memory");
    ex->n_threads = n_threads;
    ex->k = impl && impl->forced ? impl->forced : mf_cpu_kernels_best();
    ex->scratch = calloc((size_t)n_threads, sizeof *ex->scratch);
    if (!ex->scratch) {
        cpu_exec_free(ex);
        return mf_err(err, errlen, MF_ERR_NOMEM, "cpu backend: out of memory");
    }
    for (int t = 0; t < n_threads; t++) {
        // 64-byte aligned so SIMD loads of a tile never split a cache line needlessly.
        if (posix_memalign((void **)&ex->scratch[t], 64,
                           MF_CPU_SCRATCH_FLOATS * sizeof(float)) != 0) {
            ex->scratch[t] = NULL;
            cpu_exec_free(ex);
            return mf_err(err, errlen, MF_ERR_NOMEM,
                          "cpu backend: out of memory for %d threads' scratch", n_threads);
        }
    }
    if (posix_memalign(&ex->xs_buf, 64, MF_CPU_XSPLIT_BYTES) != 0) {
        ex->xs_buf = NULL;
        cpu_exec_free(ex);
        return mf_err(err, errlen, MF_ERR_NOMEM, "cpu backend: out of memory");
    }
    int rc = mf_pool_new(&ex->pool, n_threads, err, errlen);
    if (rc != MF_OK) {
        cpu_exec_free(ex);
        return rc;
    }
    *out = ex;
    return MF_OK;
}

int mf_cpu_exec_set_kernels(struct mf_exec *ex, const char *name, char *err,
                            size_t errlen) {
    const struct mf_cpu_kernels *k = mf_cpu_kernels_find(name);
    if (!k)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "cpu backend: kernel set '%s' unknown or not supported by this CPU",
                      name);
    ex->k = k;
    return MF_OK;
}

/* ==== Memory ====
 * Device memory is host memory. Allocations are 64-byte aligned and zero-filled. */

static void *cpu_alloc(struct mf_exec *ex, size_t bytes) {
    (void)ex;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0)
        return NULL;
    memset(p, 0, bytes);
    return p;
}

static void cpu_dealloc(struct mf_exec *ex, void *p) {
    (void)ex;
    free(p);
}

// Host memory for expert reads: 4096-byte aligned (O_DIRECT), zero-filled.
static void *cpu_alloc_host(struct mf_exec *ex, size_t bytes) {
    (void)ex;
    void *p = NULL;
    if (posix_memalign(&p, 4096, bytes ? bytes : 1) != 0)
        return NULL;
    memset(p, 0, bytes);
    return p;
}

static void cpu_upload(struct mf_exec *ex, void *dst, size_t dst_off, const void *src_host,
                       size_t bytes) {
    (void)ex;
    if (bytes)
        memmove((char *)dst + dst_off, src_host, bytes);
}

static void cpu_download(struct mf_exec *ex, void *dst_host, const void *src,
                         size_t src_off, size_t bytes) {
    (void)ex;
    if (bytes)
        memmove(dst_host, (const char *)src + src_off, bytes);
}

static void cpu_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                     size_t src_off, size_t bytes) {
    (void)ex;
    if (bytes)
        memmove((char *)dst + dst_off, (const char *)src + src_off, bytes);
}

static void cpu_upload_async(struct mf_exec *ex, void *dst, size_t dst_off,
                             const void *src_host, size_t bytes, struct mf_fence *done) {
    (void)done;
    cpu_upload(ex, dst, dst_off, src_host, bytes);
}

/* ==== Synchronisation ====
 * Ops have finished when they return: there is nothing to wait for. A fence is a
 * distinct object only so that callers can pair new/free as on other backends. */

struct mf_fence {
    int unused;
};

static void cpu_sync(struct mf_exec *ex) { (void)ex; }

static struct mf_fence *cpu_fence_new(struct mf_exec *ex) {
    (void)ex;
    return calloc(1, sizeof(struct mf_fence));
}

static void cpu_fence_nop(struct mf_exec *ex, struct mf_fence *f) {
    (void)ex;
    (void)f;
}

static void cpu_fence_free(struct mf_exec *ex, struct mf_fence *f) {
    (void)ex;
    free(f);
}

static void cpu_zero(struct mf_exec *ex, void *dst, size_t dst_off, size_t bytes) {
    (void)ex;
    if (bytes)
        memset((char *)dst + dst_off, 0, bytes);
}

/* ==== parallel_for ==== */

struct pfor_job {
    void (*fn)(void *arg, int i);
    void *arg;
};

static void pfor_task(void *arg, int i, int tid) {
    (void)tid;
    const struct pfor_job *j = arg;
    j->fn(j->arg, i);
}

static void cpu_parallel_for(struct mf_exec *ex, void (*fn)(void *arg, int i), void *arg,
                             int n_tasks) {
    struct pfor_job j = {.fn = fn, .arg = arg};
    mf_pool_run(ex->pool, pfor_task, &j, n_tasks);
}

/* ==== The op table ==== */

static const struct mf_backend_ops cpu_ops = {
    .api_version = MF_BACKEND_API_VERSION,
    .name = "cpu",
    .free = cpu_free,
    .map_weights = cpu_map_weights,
    .exec_new = cpu_exec_new,
    .exec_free = cpu_exec_free,
    .unmap_weights = cpu_unmap_weights,
    .mem_info = cpu_mem_info,
    .status = cpu_status,
    .host_is_device = 1,
    .queues_work = 0,
    .alloc = cpu_alloc,
    .dealloc = cpu_dealloc,
    .upload = cpu_upload,
    .download = cpu_download,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .alloc_host = cpu_alloc_host,
    .dealloc_host = cpu_dealloc,
    .upload_async = cpu_upload_async,
    .sync = cpu_sync,
    .fence_new = cpu_fence_new,
    .fence_record = cpu_fence_nop,
    .fence_wait = cpu_fence_nop,
    .fence_wait_device = cpu_fence_nop,
    .fence_free = cpu_fence_free,
    .matmul = mf_cpu_matmul,
    .matmul_t = mf_cpu_matmul_t,
    .matmul_heads = mf_cpu_matmul_heads,
    .embed = mf_cpu_embed,
    .rmsnorm = mf_cpu_rmsnorm,
    .rmsnorm_heads = mf_cpu_rmsnorm_heads,
    .rmsnorm_gated = mf_cpu_rmsnorm_gated,
    .rope = mf_cpu_rope,
    .attention = mf_cpu_attention,
    .attention_ext = mf_cpu_attention_ext,
    .conv1d_silu = mf_cpu_conv1d_silu,
    .gdn_gates = mf_cpu_gdn_gates,
    .gdn_recurrence = mf_cpu_gdn_recurrence,
    .conv1d_silu_from = mf_cpu_conv1d_silu_from,
    .gdn_recurrence_from = mf_cpu_gdn_recurrence_from,
    .swiglu = mf_cpu_swiglu,
    .swiglu_clamped = mf_cpu_swiglu_clamped,
    .mul_sigmoid = mf_cpu_mul_sigmoid,
    .axpy = mf_cpu_axpy,
    .scatter_add_rows = mf_cpu_scatter_add_rows,
    .gather_rows = mf_cpu_gather_rows,
    .gather_rows_dev = mf_cpu_gather_rows,
    .flag_nonfinite = mf_cpu_flag_nonfinite,
    .moe_route = mf_cpu_moe_route,
    .moe_experts = mf_cpu_moe_experts,
    .moe_experts_dev = mf_cpu_moe_experts_dev,
    .parallel_for = cpu_parallel_for,
};

int mf_backend_cpu_new(struct mf_backend **out, char *err, size_t errlen) {
    return mf_backend_cpu_new_kernels(out, NULL, err, errlen);
}

int mf_backend_cpu_new_kernels(struct mf_backend **out, const char *kernels, char *err,
                               size_t errlen) {
    *out = NULL;
    const struct mf_cpu_kernels *k = kernels ? mf_cpu_kernels_find(kernels) : NULL;
    if (kernels && !k) {
        char sets[64];
        mf_cpu_kernels_list(sets, sizeof sets);
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cpu backend: kernel set '%s' unknown or not supported by this CPU "
                      "(this build and CPU run: %s)", kernels, sets);
    }
    struct mf_backend *be = calloc(1, sizeof *be);
    struct cpu_impl *impl = calloc(1, sizeof *impl);
    if (!be || !impl) {
        free(be);
        free(impl);
        return mf_err(err, errlen, MF_ERR_NOMEM, "cpu backend: out of memory");
    }
    impl->forced = k;
    be->ops = &cpu_ops;
    be->impl = impl;
    *out = be;
    return MF_OK;
}
