/*
 * cpu_matmul.c — the CPU backend's linear algebra: matmul (x @ W^T), matmul_t (x @ W),
 * embed, the scalar kernel set and the run-time choice of kernel set by ISA.
 *
 * Weights are float (F32/BF16/F16) or MLX affine-quantized (model-math §1: w = s*q + b
 * per group of gs columns, codes packed LSB-first, bit-stream order for 3/5/6 bits).
 * Every term is x * (s*q + b) in f32 as in mlx's float32 reference, with s*q + b
 * rounded once or twice (SIMD qdot_rows fuse it for wider codes); only the summation
 * order differs. Each output element is computed by exactly one task in a fixed order,
 * so results do not depend on the thread count. The SIMD kernel sets live in
 * cpu_kernels_*.c; this file holds what is shared and the scalar reference set.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"
#include "core/common.h"

/* ==== Scalar kernels ====
 * The portable reference: every other kernel set is tested against these. */

static float scalar_dot(const float *a, const float *b, int64_t n) {
    // Four partial sums: keeps the scalar path from being latency-bound.
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void scalar_axpy(float *y, float alpha, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] += alpha * x[i];
}

static inline int64_t srow(const struct mf_weight *w, int64_t r) {
    return r * (w->n_in / w->group_size);
}

// Eight codes from `bits` bytes of the row's bit stream: eight values of any width fill
// exactly `bits` bytes (model-math §1.2), so groups (multiples of 8 values) never split
// a run. Built byte by byte: no read past the run, any host byte order. For 2/4/8 bits
// this is the same as the LSB-first packing within uint32 words.
static inline __attribute__((always_inline)) uint64_t
run8(const uint8_t *row, int64_t c, const int bits) {
    const uint8_t *p = row + c / 8 * bits;
    uint64_t u = 0;
    for (int i = 0; i < bits; i++)
        u |= (uint64_t)p[i] << (8 * i);
    return u;
}

// Functions taking `const int bits` are always inlined at call sites where it is a
// compile-time constant, so the shifts and masks are constants.
// Row r . x, summed per group and then over groups, each term x * (s*q + b) with s*q
// rounded (as dequant). Written straight so the compiler vectorizes the run of eight.
static inline __attribute__((always_inline)) float
qdot_bits(const float *x, const struct mf_weight *w, int64_t r, const int bits) {
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int gs = w->group_size;
    const uint64_t mask = (1u << bits) - 1u;
    const int64_t n_group = w->n_in / gs, s0 = srow(w, r);
    float total = 0.0f;
    for (int64_t g = 0; g < n_group; g++) {
        float s = mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g));
        float b = mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g));
        float acc = 0.0f;
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            const uint64_t u = run8(row, c, bits);
            for (int k = 0; k < 8; k++)
                acc += x[c + k] * (s * (float)((u >> (bits * k)) & mask) + b);
        }
        total += acc;
    }
    return total;
}

// One token at a time: the scalar set gains nothing from sharing a decode between
// tokens (the shared form does not vectorize), so it keeps qdot_max_tok = 1.
static inline __attribute__((always_inline)) void
qdot_rows_bits(float *y, int64_t ys, const float *x, int64_t xs, int n_tok,
               const struct mf_weight *w, int64_t r0, int n_row, const int bits) {
    for (int i = 0; i < n_row; i++)
        for (int t = 0; t < n_tok; t++)
            y[t * ys + i] = qdot_bits(x + t * xs, w, r0 + i, bits);
}

static void scalar_qdot_rows(float *y, int64_t ys, const float *x, int64_t xs, int n_tok,
                             const struct mf_weight *w, int64_t r0, int n_row) {
    switch (w->bits) {
    case 2: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 2); break;
    case 3: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 3); break;
    case 4: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 4); break;
    case 5: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 5); break;
    case 6: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 6); break;
    default: qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 8); break;
    }
}

static inline __attribute__((always_inline)) void
dequant_bits(float *dst, const struct mf_weight *w, int64_t r, int64_t c0, int64_t n,
             const int bits) {
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int gs = w->group_size;
    const uint64_t mask = (1u << bits) - 1u;
    const int64_t s0 = srow(w, r);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        float s = mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g));
        float b = mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            const uint64_t u = run8(row, c, bits);
            for (int k = 0; k < 8; k++)
                dst[c - c0 + k] = s * (float)((u >> (bits * k)) & mask) + b;
        }
    }
}

static void scalar_dequant(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                           int64_t n) {
    switch (w->bits) {
    case 2: dequant_bits(dst, w, r, c0, n, 2); break;
    case 3: dequant_bits(dst, w, r, c0, n, 3); break;
    case 4: dequant_bits(dst, w, r, c0, n, 4); break;
    case 5: dequant_bits(dst, w, r, c0, n, 5); break;
    case 6: dequant_bits(dst, w, r, c0, n, 6); break;
    default: dequant_bits(dst, w, r, c0, n, 8); break;
    }
}

static void scalar_gemm_tile(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                             int n_tok, const float *w, int64_t w_stride, int n_row,
                             int64_t n) {
    for (int t = 0; t < n_tok; t++)
        for (int r = 0; r < n_row; r++)
            y[t * y_stride + r] += scalar_dot(x + t * x_stride, w + r * w_stride, n);
}

static void scalar_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = mf_bf16_to_f32(src[i]);
}

static float scalar_scale_dot(float *row, float g, const float *k, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        row[i] *= g;
    return scalar_dot(row, k, n);
}

static float scalar_axpy_dot(float *row, float d, const float *k, const float *q,
                             int64_t n) {
    scalar_axpy(row, d, k, n);
    return scalar_dot(row, q, n);
}

const struct mf_cpu_kernels mf_cpu_kernels_scalar = {
    .name = "scalar",
    .dot = scalar_dot,
    .axpy = scalar_axpy,
    .qdot_rows = scalar_qdot_rows,
    .qdot_max_tok = 1,
    .dequant = scalar_dequant,
    .qdot_rows_mxfp4 = mf_mxfp4_qdot_rows_scalar,
    .dequant_mxfp4 = mf_mxfp4_dequant_scalar,
    .gemm_tile = scalar_gemm_tile,
    .bf16_to_f32 = scalar_bf16_to_f32,
    .scale_dot = scalar_scale_dot,
    .axpy_dot = scalar_axpy_dot,
};

/* ==== Kernel choice ====
 * By CPU features at run time, so one build serves every x86-64 (setup.py compiles
 * without -march). */

static int kernels_supported(const struct mf_cpu_kernels *k) {
    if (k == &mf_cpu_kernels_scalar)
        return 1;
#if defined(MF_HAVE_NEON_KERNELS)
    if (k == &mf_cpu_kernels_neon)
        return 1;
#endif
#if defined(MF_HAVE_X86_KERNELS)
    // No __builtin_cpu_init: the runtime's constructor has run by the time any exec is
    // made, and calling it here would write shared state from concurrent exec_new calls.
    if (k == &mf_cpu_kernels_avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (k == &mf_cpu_kernels_avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    if (k == &mf_cpu_kernels_avx512vnni)
        return kernels_supported(&mf_cpu_kernels_avx512) &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

// Best first.
static const struct mf_cpu_kernels *const all_kernels[] = {
#if defined(MF_HAVE_NEON_KERNELS)
    &mf_cpu_kernels_neon,
#endif
#if defined(MF_HAVE_X86_KERNELS)
    &mf_cpu_kernels_avx512vnni,
    &mf_cpu_kernels_avx512,
    &mf_cpu_kernels_avx2,
#endif
    &mf_cpu_kernels_scalar,
};

const struct mf_cpu_kernels *mf_cpu_kernels_best(void) {
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (kernels_supported(all_kernels[i]))
            return all_kernels[i];
    return &mf_cpu_kernels_scalar;
}

const struct mf_cpu_kernels *mf_cpu_kernels_find(const char *name) {
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (strcmp(all_kernels[i]->name, name) == 0)
            return kernels_supported(all_kernels[i]) ? all_kernels[i] : NULL;
    return NULL;
}

void mf_cpu_kernels_list(char *buf, size_t cap) {
    size_t used = 0;
    if (cap)
        buf[0] = '\0';
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++) {
        if (!kernels_supported(all_kernels[i]) || used >= cap)
            continue;
        int n = snprintf(buf + used, cap - used, "%s%s", used ? "," : "",
                         all_kernels[i]->name);
        used = n < 0 ? cap : used + (size_t)n;
    }
}

/* ==== Rows of a weight as f32 ==== */

void mf_cpu_dequant_ref(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                        int64_t n) {
    if (w->qmode == MF_QMODE_MXFP4) {
        mf_mxfp4_dequant_ref(dst, w, r, c0, n);
        return;
    }
    // Value by value, straight from the definition (model-math §1.2): value c occupies
    // stream bits [c*bits, (c+1)*bits) of the row, LSB first, within two bytes.
    const int bits = w->bits, gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t s0 = srow(w, r);
    for (int64_t c = c0; c < c0 + n; c++) {
        float s = mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + c / gs));
        float b = mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + c / gs));
        int64_t bit = c * bits;
        int sh = (int)(bit & 7);
        uint32_t v = row[bit >> 3];
        if (sh + bits > 8)
            v |= (uint32_t)row[(bit >> 3) + 1] << 8;
        dst[c - c0] = s * (float)((v >> sh) & mask) + b;
    }
}

void mf_cpu_weight_row(const struct mf_exec *ex, float *dst, const struct mf_weight *w,
                       int64_t r, int64_t c0, int64_t n) {
    if (w->dtype == MF_DTYPE_U32) {
        if (w->qmode == MF_QMODE_MXFP4)
            ex->k->dequant_mxfp4(dst, w, r, c0, n);
        else
            ex->k->dequant(dst, w, r, c0, n);
        return;
    }
    size_t base = (size_t)(r * w->n_in + c0);
    if (w->dtype == MF_DTYPE_F32) {
        memcpy(dst, (const float *)w->w + base, (size_t)n * sizeof(float));
        return;
    }
    if (w->dtype == MF_DTYPE_BF16) {
        ex->k->bf16_to_f32(dst, (const uint16_t *)w->w + base, n);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        dst[i] = mf_load_f32(w->w, w->dtype, base + (size_t)i);
}

// Columns converted per step for F16/BF16 rows: small enough for the stack.
#define ROW_STEP 512

// sum_c x[c] * W[r, c] for one row of a float weight.
static float row_dot(const struct mf_exec *ex, const struct mf_weight *w, int64_t r,
                     const float *x) {
    if (w->dtype == MF_DTYPE_F32)
        return ex->k->dot(x, (const float *)w->w + r * w->n_in, w->n_in);
    float tmp[ROW_STEP];
    float total = 0.0f;
    for (int64_t c0 = 0; c0 < w->n_in; c0 += ROW_STEP) {
        int64_t n = w->n_in - c0 < ROW_STEP ? w->n_in - c0 : ROW_STEP;
        mf_cpu_weight_row(ex, tmp, w, r, c0, n);
        total += ex->k->dot(x + c0, tmp, n);
    }
    return total;
}

// Whether matmul of n_tok tokens over w goes through rows_dot: one token always; up to
// the kernel set's qdot_max_tok tokens over quantized weights (rather than
// dequantizing tiles for the gemm).
static int use_rows_dot(const struct mf_exec *ex, const struct mf_weight *w, int n_tok) {
    return n_tok == 1 || (w->dtype == MF_DTYPE_U32 && n_tok <= ex->k->qdot_max_tok);
}

// y[t * ys + r - r0] = sum_c x[t * xs + c] * W[r, c] for rows [r0, r1) and t < n_tok
// (n_tok 1 unless W is quantized, see use_rows_dot).
static void rows_dot(const struct mf_exec *ex, float *y, int64_t ys,
                     const struct mf_weight *w, int64_t r0, int64_t r1, const float *x,
                     int64_t xs, int n_tok) {
    if (w->dtype == MF_DTYPE_U32) {
        if (w->qmode == MF_QMODE_MXFP4)
            ex->k->qdot_rows_mxfp4(y, ys, x, xs, n_tok, w, r0, (int)(r1 - r0));
        else
            ex->k->qdot_rows(y, ys, x, xs, n_tok, w, r0, (int)(r1 - r0));
        return;
    }
    for (int64_t r = r0; r < r1; r++)
        y[r - r0] = row_dot(ex, w, r, x);
}

/* ==== matmul: y[n_tok, n_out] = x[n_tok, n_in] @ W^T ====
 * One token (and up to qdot_max_tok tokens over quantized weights): each task owns a
 * block of output rows and dots them straight from the packed codes. More tokens: each
 * task dequantizes a [ROW_BLOCK, COL_CHUNK] tile of its rows once into its scratch and
 * applies it to every token, so the weight is decoded once per call instead of once
 * per token. */

struct matmul_job {
    struct mf_exec *ex;
    float *y;
    const struct mf_weight *w;
    const float *x;
    const struct mf_xsplit *xs;   // one token on the set's integer products, or NULL
    int n_tok;
    int64_t rows_per_task;
};

static void matvec_task(void *arg, int task, int tid) {
    (void)tid;
    const struct matmul_job *j = arg;
    int64_t r0 = task * j->rows_per_task;
    int64_t r1 = r0 + j->rows_per_task < j->w->n_out ? r0 + j->rows_per_task : j->w->n_out;
    if (j->xs)
        j->ex->k->qdot_rows_xs(j->y + r0, j->xs, j->w, r0, (int)(r1 - r0));
    else
        rows_dot(j->ex, j->y + r0, j->w->n_out, j->w, r0, r1, j->x, j->w->n_in, j->n_tok);
}

// x split for the set's one-token integer products (mf_xsplit) where the set has them
// and w is 4-bit affine with groups of 64 or 128, at most MF_CPU_XSPLIT_COLS wide;
// NULL otherwise, or where x holds a value the split does not take (qdot_rows then:
// the same product up to rounding).
static const struct mf_xsplit *split_x(struct mf_exec *ex, struct mf_xsplit *s,
                                       const struct mf_weight *w, const float *x) {
    if (!ex->k->xsplit || w->dtype != MF_DTYPE_U32 || w->qmode != MF_QMODE_AFFINE ||
        w->bits != 4 || (w->group_size != 64 && w->group_size != 128) ||
        w->n_in % w->group_size != 0 || w->n_in > MF_CPU_XSPLIT_COLS)
        return NULL;
    const int64_t n_group = w->n_in / w->group_size;
    s->parts = ex->xs_buf;
    s->unit = (float *)(s->parts + w->n_in * 4);
    s->sum = s->unit + n_group;
    s->n_in = w->n_in;
    s->gs = w->group_size;
    return ex->k->xsplit(s, x) ? s : NULL;
}

static void matmat_task(void *arg, int task, int tid) {
    const struct matmul_job *j = arg;
    const struct mf_weight *w = j->w;
    float *tile = j->ex->scratch[tid];   // [ROW_BLOCK, COL_CHUNK]
    const int64_t n_in = w->n_in, n_out = w->n_out;
    int64_t r0 = task * (int64_t)MF_CPU_ROW_BLOCK;
    int64_t r1 = r0 + MF_CPU_ROW_BLOCK < n_out ? r0 + MF_CPU_ROW_BLOCK : n_out;
    for (int t = 0; t < j->n_tok; t++)
        memset(j->y + t * n_out + r0, 0, (size_t)(r1 - r0) * sizeof(float));
    for (int64_t c0 = 0; c0 < n_in; c0 += MF_CPU_COL_CHUNK) {
        int64_t nc = n_in - c0 < MF_CPU_COL_CHUNK ? n_in - c0 : MF_CPU_COL_CHUNK;
        for (int64_t r = r0; r < r1; r++)
            mf_cpu_weight_row(j->ex, tile + (r - r0) * nc, w, r, c0, nc);
        j->ex->k->gemm_tile(j->y + r0, n_out, j->x + c0, n_in, j->n_tok, tile, nc,
                            (int)(r1 - r0), nc);
    }
}

void mf_cpu_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                   const float *x, int n_tok) {
    if (n_tok <= 0 || w->n_out <= 0)
        return;
    struct matmul_job j = {.ex = ex, .y = y, .w = w, .x = x, .n_tok = n_tok};
    if (use_rows_dot(ex, w, n_tok)) {
        struct mf_xsplit s;
        if (n_tok == 1)
            j.xs = split_x(ex, &s, w, x);
        // Enough tasks to balance the threads, few enough to keep the hand-out cheap.
        j.rows_per_task = 32;
        int64_t n_task = (w->n_out + j.rows_per_task - 1) / j.rows_per_task;
        mf_pool_run(ex->pool, matvec_task, &j, (int)n_task);
        return;
    }
    int64_t n_task = (w->n_out + MF_CPU_ROW_BLOCK - 1) / MF_CPU_ROW_BLOCK;
    mf_pool_run(ex->pool, matmat_task, &j, (int)n_task);
}

/* ==== matmul_t: y[n_tok, n_in] = x[n_tok, n_out] @ W ====
 * Each task owns a block of columns of W (= of y) and walks all rows of W in order,
 * accumulating x[t, o] * W[o, cols] into its slice of y. */

// Columns per task: a multiple of every group size.
#define T_COLS 256

static void matmul_t_task(void *arg, int task, int tid) {
    const struct matmul_job *j = arg;
    const struct mf_weight *w = j->w;
    float *tmp = j->ex->scratch[tid];   // [T_COLS]
    const int64_t n_in = w->n_in, n_out = w->n_out;
    int64_t c0 = (int64_t)task * T_COLS;
    int64_t nc = n_in - c0 < T_COLS ? n_in - c0 : T_COLS;
    for (int t = 0; t < j->n_tok; t++)
        memset(j->y + t * n_in + c0, 0, (size_t)nc * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        const float *row = tmp;
        if (w->dtype == MF_DTYPE_F32)
            row = (const float *)w->w + o * n_in + c0;
        else
            mf_cpu_weight_row(j->ex, tmp, w, o, c0, nc);
        for (int t = 0; t < j->n_tok; t++)
            j->ex->k->axpy(j->y + t * n_in + c0, j->x[t * n_out + o], row, nc);
    }
}

void mf_cpu_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                     const float *x, int n_tok) {
    if (n_tok <= 0 || w->n_in <= 0)
        return;
    struct matmul_job j = {.ex = ex, .y = y, .w = w, .x = x, .n_tok = n_tok};
    int64_t n_task = (w->n_in + T_COLS - 1) / T_COLS;
    mf_pool_run(ex->pool, matmul_t_task, &j, (int)n_task);
}

/* ==== matmul_heads: one product per head in one call ====
 * The work is split over heads x row blocks (x @ W_h^T) or heads x column blocks
 * (x @ W_h), one task per pair, so a call with 128 small heads is one hand-off to the
 * pool instead of 128 (MLA issues this per layer). Each output element is computed by
 * one task in the same order as matmul / matmul_t compute it, whatever the threads. */

struct heads_job {
    struct mf_exec *ex;
    float *y;
    const struct mf_weight *w;   // head 0's [n_out, n_in] view
    const float *x;
    int64_t w_head_rows;
    int y_tok_stride, y_head_stride, x_tok_stride, x_head_stride;
    int n_tok;
    int64_t n_block;             // row or column blocks per head
};

// Rows [r0, r0 + n) of the weight w starts at (same columns), as a view.
static struct mf_weight head_view(const struct mf_weight *w, int64_t r0) {
    struct mf_weight row = *w;
    row.n_out = 1;
    struct mf_weight v = mf_weight_slice(&row, r0);
    v.n_out = w->n_out;
    return v;
}

// y_h[t, r] for the rows of one block: packed-code dots for one token, dequantized
// tiles applied to every token otherwise (matvec_task / matmat_task per head).
static void heads_task(void *arg, int task, int tid) {
    const struct heads_job *j = arg;
    int64_t h = task / j->n_block, blk = task % j->n_block;
    struct mf_weight w = head_view(j->w, h * j->w_head_rows);
    const float *x = j->x + h * j->x_head_stride;
    float *y = j->y + h * j->y_head_stride;
    const int direct = use_rows_dot(j->ex, &w, j->n_tok);
    const int64_t n_in = w.n_in, rows = direct ? 32 : MF_CPU_ROW_BLOCK;
    int64_t r0 = blk * rows, r1 = r0 + rows < w.n_out ? r0 + rows : w.n_out;
    if (direct) {
        rows_dot(j->ex, y + r0, j->y_tok_stride, &w, r0, r1, x, j->x_tok_stride, j->n_tok);
        return;
    }
    float *tile = j->ex->scratch[tid];   // [ROW_BLOCK, COL_CHUNK]
    for (int t = 0; t < j->n_tok; t++)
        memset(y + (int64_t)t * j->y_tok_stride + r0, 0, (size_t)(r1 - r0) * sizeof(float));
    for (int64_t c0 = 0; c0 < n_in; c0 += MF_CPU_COL_CHUNK) {
        int64_t nc = n_in - c0 < MF_CPU_COL_CHUNK ? n_in - c0 : MF_CPU_COL_CHUNK;
        for (int64_t r = r0; r < r1; r++)
            mf_cpu_weight_row(j->ex, tile + (r - r0) * nc, &w, r, c0, nc);
        j->ex->k->gemm_tile(y + r0, j->y_tok_stride, x + c0, j->x_tok_stride, j->n_tok,
                            tile, nc, (int)(r1 - r0), nc);
    }
}

// y_h[t, cols] for one column block of W_h, walking its rows in order (matmul_t_task
// per head).
static void heads_t_task(void *arg, int task, int tid) {
    const struct heads_job *j = arg;
    int64_t h = task / j->n_block, blk = task % j->n_block;
    struct mf_weight w = head_view(j->w, h * j->w_head_rows);
    const float *x = j->x + h * j->x_head_stride;
    float *y = j->y + h * j->y_head_stride;
    float *tmp = j->ex->scratch[tid];   // [T_COLS]
    const int64_t n_in = w.n_in;
    int64_t c0 = blk * T_COLS, nc = n_in - c0 < T_COLS ? n_in - c0 : T_COLS;
    for (int t = 0; t < j->n_tok; t++)
        memset(y + (int64_t)t * j->y_tok_stride + c0, 0, (size_t)nc * sizeof(float));
    for (int64_t o = 0; o < w.n_out; o++) {
        const float *row = tmp;
        if (w.dtype == MF_DTYPE_F32)
            row = (const float *)w.w + o * n_in + c0;
        else
            mf_cpu_weight_row(j->ex, tmp, &w, o, c0, nc);
        for (int t = 0; t < j->n_tok; t++)
            j->ex->k->axpy(y + (int64_t)t * j->y_tok_stride + c0,
                           x[(int64_t)t * j->x_tok_stride + o], row, nc);
    }
}

void mf_cpu_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                         int y_head_stride, const struct mf_weight *w, int64_t w_head_rows,
                         int transposed, const float *x, int x_tok_stride,
                         int x_head_stride, int n_tok, int n_head) {
    if (n_tok <= 0 || n_head <= 0 || w->n_out <= 0 || w->n_in <= 0)
        return;
    struct heads_job j = {.ex = ex, .y = y, .w = w, .x = x, .w_head_rows = w_head_rows,
                          .y_tok_stride = y_tok_stride, .y_head_stride = y_head_stride,
                          .x_tok_stride = x_tok_stride, .x_head_stride = x_head_stride,
                          .n_tok = n_tok};
    if (transposed) {
        j.n_block = (w->n_in + T_COLS - 1) / T_COLS;
        mf_pool_run(ex->pool, heads_t_task, &j, (int)(j.n_block * n_head));
        return;
    }
    int64_t rows = use_rows_dot(ex, w, n_tok) ? 32 : MF_CPU_ROW_BLOCK;
    j.n_block = (w->n_out + rows - 1) / rows;
    mf_pool_run(ex->pool, heads_task, &j, (int)(j.n_block * n_head));
}

/* ==== embed: rows of W, dequantized ==== */

struct embed_job {
    struct mf_exec *ex;
    float *y;
    const struct mf_weight *w;
    const int32_t *tokens;
};

static void embed_task(void *arg, int t, int tid) {
    (void)tid;
    const struct embed_job *j = arg;
    float *yt = j->y + (int64_t)t * j->w->n_in;
    int32_t tok = j->tokens[t];
    // The core validates tokens; an out-of-range id still must not read outside W.
    if (tok < 0 || tok >= j->w->n_out) {
        memset(yt, 0, (size_t)j->w->n_in * sizeof(float));
        return;
    }
    mf_cpu_weight_row(j->ex, yt, j->w, tok, 0, j->w->n_in);
}

void mf_cpu_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                  const int32_t *tokens_host, int n_tok) {
    struct embed_job j = {.ex = ex, .y = y, .w = w, .tokens = tokens_host};
    mf_pool_run(ex->pool, embed_task, &j, n_tok);
}
