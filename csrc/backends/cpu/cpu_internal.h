/*
 * cpu_internal.h — what the CPU backend's files share: the exec (pool + per-thread
 * scratch), the kernel table chosen at run time by ISA, and the op entry points that
 * cpu_backend.c puts in the op table. Not seen outside csrc/backends/cpu/ (and the C
 * unit tests, which drive kernels of one ISA directly).
 */
#ifndef MF_CPU_INTERNAL_H
#define MF_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "backends/backend.h"
#include "backends/cpu/threadpool.h"

// Per-thread scratch, in floats. Sized for the largest block any op uses: a
// [MF_CPU_ROW_BLOCK, MF_CPU_COL_CHUNK] tile for prefill matmul, a chunk of attention
// scores, a column block of matmul_t. Ops split their work so that nothing larger is
// ever needed, whatever the model's sizes.
#define MF_CPU_ROW_BLOCK 16
#define MF_CPU_COL_CHUNK 1024
#define MF_CPU_SCRATCH_FLOATS (MF_CPU_ROW_BLOCK * MF_CPU_COL_CHUNK + 1024)
// Columns of x the exec's split buffer holds (mf_xsplit; wider products take
// qdot_rows): parts, then a unit and a sum per group of at least 64.
#define MF_CPU_XSPLIT_COLS 32768
#define MF_CPU_XSPLIT_BYTES (MF_CPU_XSPLIT_COLS * 4 + 2 * (MF_CPU_XSPLIT_COLS / 64) * 4)
// Keys scored per chunk of the online softmax.
#define MF_CPU_ATTN_CHUNK 512

// A token's x split for qdot_rows_xs: group g's values are unit[g] times integers of
// four base-128 digits (the top one signed), stored per 64 columns as four runs of 64
// bytes (top digit first), even columns then odd ones in each run; sum[g] is the sum
// of the group's x. Buffers sized by mf_xsplit_bytes, owned by the exec.
struct mf_xsplit {
    int8_t *parts;   // [n_in / 64][4][64]
    float *unit;     // [n_in / gs]
    float *sum;      // [n_in / gs]
    int64_t n_in;
    int gs;
};

// Kernels for one instruction set. Every entry gives the same result as the scalar one
// up to summation order (and, in qdot_rows, the one rounding of a fused s*q + b).
struct mf_cpu_kernels {
    const char *name;   // "scalar", "avx2", "avx512", "avx512vnni", "neon"
    // sum_i a[i] * b[i]
    float (*dot)(const float *a, const float *b, int64_t n);
    // y[i] += alpha * x[i]
    void (*axpy)(float *y, float alpha, const float *x, int64_t n);
    // y[t * y_stride + i] = dot of x[t * x_stride, + n_in) with row r0 + i of a
    // quantized weight (bits 2, 3, 4, 5, 6, 8), for i < n_row, t < n_tok: sum over
    // groups g of sum_c x[c] * w_c, w_c = s_g * q[c] + b_g with the product rounded (as
    // dequant) or fused (one rounding), in a summation order fixed by the set (results
    // do not depend on how rows are split). Several rows per pass, so each loaded x
    // value feeds all of them, and each decoded weight feeds two tokens: the decode and
    // small-batch matvec.
    void (*qdot_rows)(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                      int n_tok, const struct mf_weight *w, int64_t r0, int n_row);
    // Optional (NULL in sets without them): one token against 4-bit affine weights of
    // group size 64 or 128 on integer dot products. xsplit writes s's parts, unit and
    // sum from x[0, s->n_in) (s->gs set; see mf_xsplit) and returns 1, or 0 when x
    // holds a non-finite value or a group too small for the split (the caller then
    // takes qdot_rows). qdot_rows_xs: y[i] = row r0 + i . x for i < n_row, as qdot_rows
    // up to rounding (x is exact to 2^-27 of each group's largest |x|).
    int (*xsplit)(struct mf_xsplit *s, const float *x);
    void (*qdot_rows_xs)(float *y, const struct mf_xsplit *s, const struct mf_weight *w,
                         int64_t r0, int n_row);
    // Up to this many tokens a quantized matmul goes through qdot_rows rather than
    // dequant + gemm_tile with this set (measured on AVX-512: faster up to 3 tokens, a
    // tie at 4; the NEON set takes the x86 value, unmeasured).
    int qdot_max_tok;
    // dst[0, n) = row r, columns [c0, c0 + n) of a quantized weight, each value
    // s*q + b with the product rounded before the sum (bitwise equal across sets);
    // c0 and n are multiples of the group size.
    void (*dequant)(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                    int64_t n);
    // y[t * y_stride + r] += sum_i x[t * x_stride + i] * w[r * w_stride + i] for t < n_tok,
    // r < n_row, i < n: the small matrix-matrix block of prefill, register-blocked so
    // each loaded x and w value feeds several FMAs.
    void (*gemm_tile)(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                      int n_tok, const float *w, int64_t w_stride, int n_row, int64_t n);
    // qdot_rows and dequant for MXFP4 weights (qmode MF_QMODE_MXFP4, cpu_mxfp4*.c):
    // each weight e2m1(q) * 2^(s-127) is exact in f32, so dequant is bitwise
    // mx.dequantize's and qdot_rows differs from x @ W only in summation order.
    void (*qdot_rows_mxfp4)(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                            int n_tok, const struct mf_weight *w, int64_t r0, int n_row);
    void (*dequant_mxfp4)(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                          int64_t n);
    // dst[i] = bf16 src[i] widened to f32 (exact), for float weights stored as BF16.
    void (*bf16_to_f32)(float *dst, const uint16_t *src, int64_t n);
    // The delta-rule row update in two passes over S_i (gdn_recurrence):
    // scale_dot: row[i] *= g, then returns sum_i row[i] * k[i];
    // axpy_dot: row[i] += d * k[i], then returns sum_i row[i] * q[i].
    float (*scale_dot)(float *row, float g, const float *k, int64_t n);
    float (*axpy_dot)(float *row, float d, const float *k, const float *q, int64_t n);
};

// x86-64 SIMD sets are built with target attributes (GCC and clang).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MF_HAVE_X86_KERNELS 1
#endif

// aarch64 always has Advanced SIMD.
#if defined(__aarch64__) && defined(__ARM_NEON)
#define MF_HAVE_NEON_KERNELS 1
#endif

extern const struct mf_cpu_kernels mf_cpu_kernels_scalar;
#if defined(MF_HAVE_NEON_KERNELS)
extern const struct mf_cpu_kernels mf_cpu_kernels_neon;
#endif
#if defined(MF_HAVE_X86_KERNELS)
extern const struct mf_cpu_kernels mf_cpu_kernels_avx2;
extern const struct mf_cpu_kernels mf_cpu_kernels_avx512;
extern const struct mf_cpu_kernels mf_cpu_kernels_avx512vnni;
#endif

// The best kernel set this CPU runs ("scalar" everywhere else), or the one named
// (NULL if unknown or not supported by this CPU).
const struct mf_cpu_kernels *mf_cpu_kernels_best(void);
const struct mf_cpu_kernels *mf_cpu_kernels_find(const char *name);
// Writes the names of the sets this build contains and this CPU runs into buf[cap],
// best first, comma-separated ("avx512,avx2,scalar"; truncated to fit).
void mf_cpu_kernels_list(char *buf, size_t cap);

struct mf_exec {
    struct mf_pool *pool;
    int n_threads;
    float **scratch;                    // [n_threads][MF_CPU_SCRATCH_FLOATS]
    const struct mf_cpu_kernels *k;     // chosen at exec_new
    void *xs_buf;                       // mf_cpu_matmul's split x (k->xsplit): up to
                                        // MF_CPU_XSPLIT_COLS columns (MF_CPU_XSPLIT_BYTES)
};

// Force a kernel set on an exec (tests, benchmarks). MF_ERR_ARG if the name is unknown
// or the CPU lacks the instructions.
int mf_cpu_exec_set_kernels(struct mf_exec *ex, const char *name, char *err,
                            size_t errlen);

// Reference dequantization of row r, columns [c0, c0 + n) of a quantized weight, value
// by value from the bit-stream definition: slow, independent of every kernel set (the
// C tests compare them with it).
void mf_cpu_dequant_ref(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                        int64_t n);
// MXFP4 (cpu_mxfp4.c): the scale of an E8M0 byte as MLX decodes it, the value by value
// reference decoder (mf_cpu_dequant_ref's MXFP4 case), and the kernel entries of each
// set (the sets' tables in cpu_matmul.c, cpu_kernels_x86.c, cpu_kernels_neon.c).
extern const float mf_mxfp4_e2m1[16];   // the E2M1 value of each code
float mf_mxfp4_scale(uint8_t e);
void mf_mxfp4_dequant_ref(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                          int64_t n);
#define MF_MXFP4_DECL(set)                                                               \
    void mf_mxfp4_qdot_rows_##set(float *y, int64_t y_stride, const float *x,             \
                                  int64_t x_stride, int n_tok, const struct mf_weight *w, \
                                  int64_t r0, int n_row);                                 \
    void mf_mxfp4_dequant_##set(float *dst, const struct mf_weight *w, int64_t r,         \
                                int64_t c0, int64_t n);
MF_MXFP4_DECL(scalar)
#if defined(MF_HAVE_NEON_KERNELS)
MF_MXFP4_DECL(neon)
#endif
#if defined(MF_HAVE_X86_KERNELS)
MF_MXFP4_DECL(avx2)
MF_MXFP4_DECL(avx512)
#endif

// Row r, columns [c0, c0 + n) of a float or quantized weight as f32, using ex's kernels.
void mf_cpu_weight_row(const struct mf_exec *ex, float *dst, const struct mf_weight *w,
                       int64_t r, int64_t c0, int64_t n);

// ---- ops (cpu_matmul.c)
void mf_cpu_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                   const float *x, int n_tok);
void mf_cpu_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                     const float *x, int n_tok);
void mf_cpu_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                         int y_head_stride, const struct mf_weight *w, int64_t w_head_rows,
                         int transposed, const float *x, int x_tok_stride,
                         int x_head_stride, int n_tok, int n_head);
void mf_cpu_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                  const int32_t *tokens_host, int n_tok);

// ---- ops (cpu_ops.c)
void mf_cpu_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                    const struct mf_weight *g, int n_rows, int n, float eps, float scale);
void mf_cpu_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                          const struct mf_weight *g, int n_rows, int n, float eps);
void mf_cpu_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                 int head_stride, int n_rot, const float *inv_freq, int pos0,
                 int traditional, float mscale);
void mf_cpu_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                      const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                      int dv, int k_stride, int v_stride, int pos0, float scale);
void mf_cpu_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                          const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                          int dv, int k_stride, int v_stride, int pos0, float scale,
                          const struct mf_attn_ext *ext_host);
void mf_cpu_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                        const struct mf_weight *w, int n_tok, int C, int K);
void mf_cpu_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                             const float *state_in, const float *u,
                             const struct mf_weight *w, int n_tok, int C, int K);
void mf_cpu_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                      const float *b, int ab_stride, const struct mf_weight *A_log,
                      const struct mf_weight *dt_bias, int n_tok, int nv);
void mf_cpu_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                           const float *k, const float *v, int qkv_stride, const float *g,
                           const float *beta, int n_tok, int nk, int nv, int dk, int dv);
void mf_cpu_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S, const float *S_in,
                                const float *q, const float *k, const float *v,
                                int qkv_stride, const float *g, const float *beta,
                                int n_tok, int nk, int nv, int dk, int dv);
void mf_cpu_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                   int n_rows, int n_cols, int in_stride);
void mf_cpu_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                        int n_cols, int g_stride, int g_cols);
void mf_cpu_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n);
void mf_cpu_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                             const int32_t *idx_host, const float *w_host, int n_rows,
                             int n);
void mf_cpu_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                        const int32_t *idx_host, int n_rows, int n);
void mf_cpu_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                          const struct mf_weight *g, int n_tok, int tok_stride, int n_head,
                          int head_stride, int n, float eps, float scale);
void mf_cpu_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n);

// ---- ops (cpu_gptoss.c)
void mf_cpu_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate, const float *up,
                           int n_rows, int n_cols, int in_stride, float alpha, float limit);

// ---- ops (cpu_moe.c)
// Routing scratch is ex->scratch[0]: E floats and E bytes (E <= MF_CPU_MAX_EXPERTS).
#define MF_CPU_MAX_EXPERTS 4096
void mf_cpu_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                      const float *bias, const struct mf_route_params *p, int n_tok,
                      int32_t *idx_host, float *w_host);
void mf_cpu_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                        const struct mf_moe_batch *b);
void mf_cpu_moe_experts_dev(struct mf_exec *ex, float *y, const float *x,
                            const struct mf_moe_dev *d);

#endif /* MF_CPU_INTERNAL_H */
