/*
 * metal_internal.h — what the Metal backend's files share, in plain C so that the
 * Objective-C glue (metal_backend.m) stays small and the rest compiles and is tested
 * on every system: the kernel manifest as an enum and a name table (the pipeline
 * table is made from these, one X-macro, no second list), the glue's entry points the
 * ops call, and the ops. Nothing here clashes with cuda_internal.h, so a test can
 * hold both drivers' ops side by side.
 *
 * Device pointers are CPU addresses inside shared-storage MTLBuffers (unified memory):
 * alloc returns a buffer's contents, map_weights wraps the weights mapping without a
 * copy, alloc_host wraps 16 KiB-aligned host memory. The glue turns an address back
 * into (buffer, offset) when it encodes a dispatch.
 */
#ifndef MF_METAL_INTERNAL_H
#define MF_METAL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "backends/backend.h"
#include "backends/gpu_args.h"
#include "backends/metal/metal_backend.h"
#include "../../../shaders/mf_params.h"
#include "../../../shaders/grid.h"

// The kernel sources, generated from shaders/ by shaders/embed.py (mf_shaders.c).
extern const int mf_shader_count;
extern const char *const mf_shader_names[];
extern const char *const mf_shader_sources[];

// Kernel ids, in manifest order; mf_metal_kernel_names[id] is the function name.
enum mf_metal_kernel {
#define K(name, params, n_buf, grid) MF_MKID_##name,
#include "../../../shaders/kernels.def"
#undef K
    MF_MKID_COUNT
};

extern const char *const mf_metal_kernel_names[MF_MKID_COUNT];
extern const int mf_metal_kernel_n_buf[MF_MKID_COUNT];

// ---- metal_source.c
// The kernel program as one text (mf_kernels.h with the embedded includes expanded
// once each, #line-marked); dir (MOEFLUX_SHADERS_DIR) not NULL or empty: the same
// files read from there. *out is malloc'd. MF_ERR_FORMAT / MF_ERR_IO / MF_ERR_NOMEM.
int mf_metal_program_source(const char *dir, char **out, char *err, size_t errlen);

// ---- the glue (metal_backend.m), called by the ops
// Encodes kernel kid on the exec's open command buffer: buffer i is the MTLBuffer
// holding device address bufs[i] at its offset (NULL: a small zero buffer), params go
// by setBytes at index n_buf. Records an error instead when an address is in no buffer.
void mf_metal_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                     const void *params, size_t params_bytes, const void *const *bufs,
                     int n_buf, const char *op);
// A copy of n host bytes in a shared buffer that lives until the work queued with it
// is done: the device address of the copy, NULL after an error (recorded).
const void *mf_metal_host_arg(struct mf_exec *ex, const void *src, size_t n, const char *op);
// Scratch of the exec (slot 0 attention partials, 1 routing outputs) of at least n
// bytes; NULL after an error (recorded).
void *mf_metal_scratch(struct mf_exec *ex, int slot, size_t n, const char *op);
// The start of the buffer region holding address p, which ops may reach from p by
// offsets: an allocation, a host slot, a weights window, or a page-aligned wrap made
// now of memory the backend does not know (an expert file mapping), extending at least
// `need` bytes past p. NULL after an error (recorded).
const void *mf_metal_region(struct mf_exec *ex, const void *p, size_t need, const char *op);
// Commits the open command buffer and waits for everything queued (records errors).
void mf_metal_wait(struct mf_exec *ex, const char *op);
// The op table's copy and download (ordered after the queued work).
void mf_metal_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                   size_t src_off, size_t bytes);
void mf_metal_download(struct mf_exec *ex, void *dst_host, const void *src, size_t src_off,
                       size_t bytes);
// Records the first error of the exec (later ones are dropped).
void mf_metal_fail(struct mf_exec *ex, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
// 1 once an error is recorded: ops then encode nothing.
int mf_metal_failed(const struct mf_exec *ex);
// 1 when the ops take the tensor-core kernels (shaders/tc.h, in their portable form
// here): MOEFLUX_GPU_TC=1 when the backend was made, as on CUDA.
int mf_metal_tc(const struct mf_exec *ex);
// 1 when a prefill's products take the kernels of shaders/mma.h: 0 here for now, as
// their matrix step would run by shuffles (the portable form), which the SIMT kernels
// are expected to beat; the twin test turns it on to compare the launches.
int mf_metal_mma(const struct mf_exec *ex);
// 1 when prefill attention's partials take mf_attn_tile: unless MOEFLUX_GPU_ATTN_TILE=0
// when the exec was made, as on CUDA.
int mf_metal_attn_tile(const struct mf_exec *ex);
// Queries per attention launch pair: MOEFLUX_GPU_ATTN_BLOCK when the exec was made, 0
// (by size, mf_attn_qblock) unset, as on CUDA.
int mf_metal_attn_block(const struct mf_exec *ex);
// The fusions the exec takes, MF_FUSE_* bits (gpu_args.h): those
// MOEFLUX_GPU_FUSE named when the exec was made, as on CUDA.
int mf_metal_fuse(const struct mf_exec *ex);
// The exec's MF_COUNT_INTS ints the last-threadgroup kernels count on and leave at 0
// (zeroed when first made, freed with the exec); NULL after an error (recorded).
int *mf_metal_counter(struct mf_exec *ex, const char *op);

// ---- metal_ops.c: the compute ops of the table (the CUDA ops' twins)
void mf_metal_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                     const float *x, int n_tok);
void mf_metal_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                       const float *x, int n_tok);
void mf_metal_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                           const struct mf_weight *const *w, const float *x, int n_tok);
void mf_metal_matmul_add(struct mf_exec *ex, float *y, const struct mf_weight *w,
                         const float *x, int n_tok, float *tmp);
void mf_metal_rms_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                               const struct mf_weight *const *w, float *xn, const float *x,
                               const struct mf_weight *g, float eps, int n_tok);
void mf_metal_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                           int y_head_stride, const struct mf_weight *w,
                           int64_t w_head_rows, int transposed, const float *x,
                           int x_tok_stride, int x_head_stride, int n_tok, int n_head);
void mf_metal_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                    const int32_t *tokens_host, int n_tok);
void mf_metal_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                      const struct mf_weight *g, int n_rows, int n, float eps, float scale);
void mf_metal_add_rmsnorm(struct mf_exec *ex, float *y, float *x, const float *r,
                          const struct mf_weight *g, int n_rows, int n, float eps);
void mf_metal_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                            const struct mf_weight *g, int n_tok, int tok_stride,
                            int n_head, int head_stride, int n, float eps, float scale);
void mf_metal_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                            const struct mf_weight *g, int n_rows, int n, float eps);
void mf_metal_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                   int head_stride, int n_rot, const float *inv_freq, int pos0,
                   int traditional, float mscale);
void mf_metal_rope_qk(struct mf_exec *ex, const struct mf_rope_qk *r);
void mf_metal_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                        const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                        int dv, int k_stride, int v_stride, int pos0, float scale);
void mf_metal_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                        const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                        int dv, int k_stride, int v_stride, int pos0, float scale,
                        const struct mf_attn_ext *ext);
void mf_metal_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                          const struct mf_weight *w, int n_tok, int C, int K);
void mf_metal_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                               const float *state_in, const float *u,
                               const struct mf_weight *w, int n_tok, int C, int K);
void mf_metal_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                        const float *b, int ab_stride, const struct mf_weight *A_log,
                        const struct mf_weight *dt_bias, int n_tok, int nv);
void mf_metal_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                             const float *k, const float *v, int qkv_stride,
                             const float *g, const float *beta, int n_tok, int nk, int nv,
                             int dk, int dv);
void mf_metal_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S,
                                  const float *S_in, const float *q, const float *k,
                                  const float *v, int qkv_stride, const float *g,
                                  const float *beta, int n_tok, int nk, int nv, int dk,
                                  int dv);
void mf_metal_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                     int n_rows, int n_cols, int in_stride);
void mf_metal_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate,
                             const float *up, int n_rows, int n_cols, int in_stride,
                             float alpha, float limit);
void mf_metal_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                          int n_cols, int g_stride, int g_cols);
void mf_metal_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n);
void mf_metal_axpy_flag(struct mf_exec *ex, float *y, float alpha, const float *x, int n,
                        int32_t *flag);
void mf_metal_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                               const int32_t *idx_host, const float *w_host, int n_rows,
                               int n);
void mf_metal_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                          const int32_t *idx_host, int n_rows, int n);
void mf_metal_gather_rows_dev(struct mf_exec *ex, float *dst, const float *src,
                              const int32_t *idx, int n_rows, int n);
void mf_metal_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n);
void mf_metal_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                        const float *bias, const struct mf_route_params *p, int n_tok,
                        int32_t *idx_host, float *w_host);
void mf_metal_rms_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                        const float *bias, const struct mf_route_params *r, int n_tok,
                        const struct mf_weight *router, float *xn, const float *x,
                        const struct mf_weight *g, float eps);
// The grouped kernels take gate and up in one format, down in its own, and float
// biases (mf_moe_experts_gpu_check): refused at model open otherwise.
int mf_metal_moe_experts_check(struct mf_backend *be, const struct mf_moe_batch *b, int il,
                          char *err, size_t errlen);
void mf_metal_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                          const struct mf_moe_batch *b);

#endif /* MF_METAL_INTERNAL_H */
