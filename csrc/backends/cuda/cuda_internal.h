/*
 * cuda_internal.h — what the CUDA backend's files share: the backend (driver and NVRTC
 * tables, device, primary context, the kernel module), the exec (a stream, the pinned
 * argument ring, the allocation pool, scratch, the sticky first error, the optional
 * per-kernel profile), the kernel manifest as an enum and typed launchers, and the op
 * entry points.
 */
#ifndef MF_CUDA_INTERNAL_H
#define MF_CUDA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "backends/backend.h"
#include "backends/gpu_args.h"
#include "backends/cuda/cuda_api.h"
#include "backends/cuda/cuda_backend.h"
#include "../../../shaders/mf_params.h"
#include "../../../shaders/grid.h"

// The kernel sources, generated from shaders/ by shaders/embed.py (mf_shaders.c).
extern const int mf_shader_count;
extern const char *const mf_shader_names[];
extern const char *const mf_shader_sources[];

// Kernel ids, in manifest order.
enum mf_cuda_kernel {
#define K(name, params, n_buf, grid) MF_KID_##name,
#include "../../../shaders/kernels.def"
#undef K
    MF_KID_COUNT
};

// Kernel names, in manifest order.
extern const char *const mf_cuda_kernel_names[MF_KID_COUNT];

struct mf_cuda_be {
    struct mf_cu_api cu;
    struct mf_nvrtc_api nv;
    CUdevice dev;
    CUcontext ctx;               // the device's primary context, retained
    int cc;                      // compute capability, 10 * major + minor
    int tc;                      // tensor-core kernels (shaders/tc.h): sm_80 and later
                                 // with MOEFLUX_GPU_TC=1 (gpu_args.h)
    int mma;                     // the prefill kernels of shaders/mma.h: sm_80 and later,
                                 // where their matrix step is mma.sync
    int driver_version;
    char name[128];
    CUmodule mod;
    CUfunction fn[MF_KID_COUNT];
    CUstream wstream;            // map_weights copies
};

// Argument ring: host arguments of ops are copied into pinned memory and from there to
// device memory in stream order; a segment is reused once the event recorded when the
// exec last left it has been reached (its copies and the kernels that read them done).
#define MF_RING_SEGS 4
#define MF_RING_SEG_BYTES ((size_t)1 << 20)

// Per-kernel stream time (cuda_profile.c, MOEFLUX_GPU_PROFILE=1): events of one run
// (ev[0] a mark, ev[i] after a launch of kernel kid[i]) and the totals so far.
#define MF_PROF_EVENTS 1024

struct mf_cuda_prof {
    CUevent ev[MF_PROF_EVENTS];
    int kid[MF_PROF_EVENTS];
    int n;
    double ms[MF_KID_COUNT];
    long long calls[MF_KID_COUNT];
};

struct mf_cuda_block {
    CUdeviceptr p;
    size_t bytes;
};

struct mf_exec {
    struct mf_cuda_be *cb;
    CUstream st;
    CUstream cst;                // copy stream of upload_async (API v3)
    int status;                  // first error (MF_OK while none)
    char err[1024];
    unsigned char *ring_host;
    CUdeviceptr ring_dev;
    CUdeviceptr count_dev;       // MF_COUNT_INTS ints the last-threadgroup kernels
                                 // count on and leave at 0 (zeroed when the exec is
                                 // made; gpu_args.h)
    CUevent ring_ev[MF_RING_SEGS];
    int ring_recorded[MF_RING_SEGS];
    int ring_seg;
    size_t ring_off;
    struct mf_cuda_block *live, *pool;   // allocations in use / freed for reuse
    int n_live, cap_live, n_pool, cap_pool;
    CUdeviceptr ws;              // scratch of ops (attention partials)
    size_t ws_bytes;
    CUdeviceptr route_ws;        // moe_route outputs when the caller gives none
    size_t route_bytes;
    struct mf_cuda_prof *prof;   // NULL unless MOEFLUX_GPU_PROFILE=1
    struct mf_cuda_graphs *gr;   // launches held back and replayed as graphs
                                 // (cuda_graph.c); NULL when off
    int pdl;                     // programmatic dependent launch: each kernel may start
                                 // while the one before it finishes (mf_dep_wait in
                                 // shaders/mf_prelude.h); sm_90 and later with
                                 // cuLaunchKernelEx, unless MOEFLUX_GPU_PDL=0
    int attn_tile;               // prefill attention's partials by mf_attn_tile (the
                                 // same bits as mf_attn_part), unless
                                 // MOEFLUX_GPU_ATTN_TILE=0
    int attn_block;              // queries per attention launch pair, 0: by size
                                 // (mf_attn_qblock; MOEFLUX_GPU_ATTN_BLOCK)
    int fuse;                    // the fusions taken, MF_FUSE_* bits
                                 // (gpu_args.h; MOEFLUX_GPU_FUSE)
};

struct mf_fence {
    CUevent ev;
    int recorded;
};

static inline CUdeviceptr mf_dp(const void *p) { return (CUdeviceptr)(uintptr_t)p; }

// ---- cuda_backend.c
// Records the first error of the exec: "op: call: CUDA_ERROR_... (text)". Returns 1
// when r is success.
int mf_cuda_ck(struct mf_exec *ex, CUresult r, const char *op, const char *call);
// Records a first error with its own message and status.
void mf_cuda_fail(struct mf_exec *ex, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
// Makes the backend's context current on the calling thread.
void mf_cuda_enter(struct mf_exec *ex);
// Copies n host bytes into the argument ring; returns their device address (0 after
// an error, which is recorded).
CUdeviceptr mf_cuda_ring_put(struct mf_exec *ex, const void *src, size_t n, const char *op);
// Scratch of at least n bytes (grown after a stream sync); 0 after an error.
CUdeviceptr mf_cuda_scratch(struct mf_exec *ex, CUdeviceptr *buf, size_t *have, size_t n,
                            const char *op);
// A kernel launch on the exec's stream (held back while graphs are on, see below).
void mf_cuda_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                    const void *params, size_t params_bytes, const CUdeviceptr *bufs,
                    int n_buf, const char *op);
// cuLaunchKernel of one kernel now (cuLaunchKernelEx with ex->pdl); 1 on success.
int mf_cuda_launch_now(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                       void *params, const CUdeviceptr *bufs, int n_buf, const char *op);
// The exec's compute stream for anything but a kernel launch (a copy, a memset, an
// event, a wait): the launches held back so far are submitted first, so stream order
// is the order of the calls.
CUstream mf_cuda_stream(struct mf_exec *ex);

// ---- cuda_graph.c: kernel launches recorded in segments of up to MF_GRAPH_SEG and
// submitted at the end of each (segment full, or any other use of the stream). A
// segment seen before at the same place since the last host wait, with the same
// kernels, is replayed as an executable graph, only the changed nodes' parameters
// updated; so a decode step costs a few graph launches instead of one launch per
// kernel. MOEFLUX_GPU_GRAPHS=0 (read when an exec is made) launches every kernel at
// once; so does MOEFLUX_GPU_PROFILE=1.
int mf_cuda_graphs_init(struct mf_exec *ex);
void mf_cuda_graphs_free(struct mf_exec *ex);
// Holds one launch back (1), or 0 when graphs are off (the caller launches it).
int mf_cuda_graph_record(struct mf_exec *ex, int kid, const unsigned g[3],
                         const unsigned b[3], const void *params, size_t params_bytes,
                         const CUdeviceptr *bufs, int n_buf);
// Submits the launches held back (as a graph or one by one).
void mf_cuda_graph_flush(struct mf_exec *ex);
// After a host wait for the whole stream: the next segment is the first of a step.
void mf_cuda_graph_step(struct mf_exec *ex);

// ---- cuda_profile.c: the profile's setup (MF_OK when off), its event after each
// launch, the end of a run at a host wait on the stream, and the table at exec free.
int mf_cuda_prof_init(struct mf_exec *ex);
void mf_cuda_prof_launched(struct mf_exec *ex, int kid);
void mf_cuda_prof_flush(struct mf_exec *ex);
void mf_cuda_prof_free(struct mf_exec *ex);

// Typed launchers: launch_<kernel>(ex, &params, bufs, op), geometry from grid.h.
#define K(name, params, n_buf, grid)                                                   \
    static inline void launch_##name(struct mf_exec *ex, const struct params *p,       \
                                     const CUdeviceptr bufs[n_buf], const char *op) {  \
        unsigned g[3], b[3];                                                           \
        grid(p, g, b);                                                                 \
        mf_cuda_launch(ex, MF_KID_##name, g, b, p, sizeof *p, bufs, n_buf, op);        \
    }
#include "../../../shaders/kernels.def"
#undef K

// ---- cuda_module.c
int mf_cuda_module_load(const struct mf_cu_api *cu, const struct mf_nvrtc_api *nv, int cc,
                        int driver_version, CUmodule *mod, char *err, size_t errlen);

// ---- cuda_ops.c: the compute ops of the table
void mf_cuda_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                    const float *x, int n_tok);
void mf_cuda_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                      const float *x, int n_tok);
void mf_cuda_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                          const struct mf_weight *const *w, const float *x, int n_tok);
void mf_cuda_matmul_add(struct mf_exec *ex, float *y, const struct mf_weight *w,
                        const float *x, int n_tok, float *tmp);
void mf_cuda_rms_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                              const struct mf_weight *const *w, float *xn, const float *x,
                              const struct mf_weight *g, float eps, int n_tok);
void mf_cuda_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                          int y_head_stride, const struct mf_weight *w,
                          int64_t w_head_rows, int transposed, const float *x,
                          int x_tok_stride, int x_head_stride, int n_tok, int n_head);
void mf_cuda_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                   const int32_t *tokens_host, int n_tok);
void mf_cuda_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                     const struct mf_weight *g, int n_rows, int n, float eps, float scale);
void mf_cuda_add_rmsnorm(struct mf_exec *ex, float *y, float *x, const float *r,
                         const struct mf_weight *g, int n_rows, int n, float eps);
void mf_cuda_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                           const struct mf_weight *g, int n_tok, int tok_stride,
                           int n_head, int head_stride, int n, float eps, float scale);
void mf_cuda_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                           const struct mf_weight *g, int n_rows, int n, float eps);
void mf_cuda_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                  int head_stride, int n_rot, const float *inv_freq, int pos0,
                  int traditional, float mscale);
void mf_cuda_rope_qk(struct mf_exec *ex, const struct mf_rope_qk *r);
void mf_cuda_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                       const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                       int dv, int k_stride, int v_stride, int pos0, float scale);
void mf_cuda_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                       const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                       int dv, int k_stride, int v_stride, int pos0, float scale,
                       const struct mf_attn_ext *ext);
void mf_cuda_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                         const struct mf_weight *w, int n_tok, int C, int K);
void mf_cuda_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                              const float *state_in, const float *u,
                              const struct mf_weight *w, int n_tok, int C, int K);
void mf_cuda_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                       const float *b, int ab_stride, const struct mf_weight *A_log,
                       const struct mf_weight *dt_bias, int n_tok, int nv);
void mf_cuda_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                            const float *k, const float *v, int qkv_stride,
                            const float *g, const float *beta, int n_tok, int nk, int nv,
                            int dk, int dv);
void mf_cuda_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S,
                                 const float *S_in, const float *q, const float *k,
                                 const float *v, int qkv_stride, const float *g,
                                 const float *beta, int n_tok, int nk, int nv, int dk,
                                 int dv);
void mf_cuda_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                    int n_rows, int n_cols, int in_stride);
void mf_cuda_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate,
                            const float *up, int n_rows, int n_cols, int in_stride,
                            float alpha, float limit);
void mf_cuda_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                         int n_cols, int g_stride, int g_cols);
void mf_cuda_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n);
void mf_cuda_axpy_flag(struct mf_exec *ex, float *y, float alpha, const float *x, int n,
                       int32_t *flag);
void mf_cuda_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                              const int32_t *idx_host, const float *w_host, int n_rows,
                              int n);
void mf_cuda_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                         const int32_t *idx_host, int n_rows, int n);
void mf_cuda_gather_rows_dev(struct mf_exec *ex, float *dst, const float *src,
                             const int32_t *idx, int n_rows, int n);
void mf_cuda_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n);
void mf_cuda_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                       const float *bias, const struct mf_route_params *p, int n_tok,
                       int32_t *idx_host, float *w_host);
void mf_cuda_rms_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                       const float *bias, const struct mf_route_params *r, int n_tok,
                       const struct mf_weight *router, float *xn, const float *x,
                       const struct mf_weight *g, float eps);
// The grouped kernels take gate and up in one format, down in its own, and float
// biases (mf_moe_experts_gpu_check): refused at model open otherwise.
int mf_cuda_moe_experts_check(struct mf_backend *be, const struct mf_moe_batch *b, int il,
                          char *err, size_t errlen);
void mf_cuda_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                         const struct mf_moe_batch *b);
void mf_cuda_moe_experts_dev(struct mf_exec *ex, float *y, const float *x,
                             const struct mf_moe_dev *d);

#endif /* MF_CUDA_INTERNAL_H */
