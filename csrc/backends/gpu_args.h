/*
 * gpu_args.h — what the GPU drivers (CUDA, Metal) derive alike from an op's arguments:
 * the matvec's choices and the kernel params of the fused ops, so that both launch the
 * same work (the twin test checks they do). Plain C over backend.h and
 * shaders/mf_params.h.
 */
#ifndef MF_GPU_ARGS_H
#define MF_GPU_ARGS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "../../shaders/mf_params.h"
#include "../../shaders/grid.h"

_Static_assert(MF_MULTI_MAX == MF_MATMUL_MULTI, "matmul_multi limits must agree");
_Static_assert(MF_ROPE_D_MAX == MF_ROPE_QK_NORM_MAX, "rope_qk head limits must agree");

// Tokens above which matmul uses the tiled GEMM instead of the register-tiled matvec.
#define MF_MV_MAX_TOK 8

static inline int mf_aligned16(uintptr_t a) { return (a & 15u) == 0; }

// The tensor-core kernels (shaders/tc.h) are taken only where MOEFLUX_GPU_TC=1: on the
// H200 they were correct but slower than the SIMT row dots at decode shapes
// (bench/RESULTS.md, "Session 9").
static inline int mf_gpu_tc_env(void) {
    const char *e = getenv("MOEFLUX_GPU_TC");
    return e && strcmp(e, "1") == 0;
}

// The fusions a GPU exec takes, bits of its fuse field (MOEFLUX_GPU_FUSE, read
// when the exec is made; each gives the bits of the ops it replaces), of one token:
// norm: a layer's input RMSNorm inside its first products (mf_mv_multi1n); add: the
// output projection added into the residual stream (mf_mv1 adding); attn: a query's
// combine by the last of its key splits (mf_attn_part1); route: the MoE input norm,
// router and routing in one launch (mf_route1n); comb: the device-routed experts'
// combine (with the shared expert's and the residual adds) by the down kernel's last
// threadgroups (mf_moe_down1c). And one for prefill chunks: gemm: the tensor-core
// products of one input (a layer's q, k and v) in one launch (mf_gemm_mma_multi).
enum {
    MF_FUSE_NORM = 1,
    MF_FUSE_ADD = 2,
    MF_FUSE_ATTN = 4,
    MF_FUSE_ROUTE = 8,
    MF_FUSE_COMB = 16,
    MF_FUSE_GEMM = 32,
    MF_FUSE_ALL = 63,
    // On unless named otherwise: those measured faster than the ops apart (bench/RESULTS.md
    // "Session 23": route was slower on an H100, norm too until session 23's fix;
    // "Session 24": comb no faster; "Session 26": gemm +2.5% prefill-512).
    MF_FUSE_DEFAULT = MF_FUSE_NORM | MF_FUSE_ADD | MF_FUSE_ATTN | MF_FUSE_GEMM,
};

// The fusions MOEFLUX_GPU_FUSE names: unset or empty the default, "0" none, "1" or "all"
// every one, else a comma list of norm, add, attn, route, comb, gemm; -1 for anything else
// (the drivers fail the exec with MF_FUSE_EXPECTED in their message).
#define MF_FUSE_EXPECTED \
    "expected 0, 1, all or a comma list of norm, add, attn, route, comb, gemm"
static inline int mf_gpu_fuse_env(void) {
    static const char *const names[] = {"norm", "add", "attn", "route", "comb", "gemm"};
    const char *e = getenv("MOEFLUX_GPU_FUSE");
    if (!e || !*e)
        return MF_FUSE_DEFAULT;
    if (strcmp(e, "0") == 0)
        return 0;
    if (strcmp(e, "1") == 0 || strcmp(e, "all") == 0)
        return MF_FUSE_ALL;
    int bits = 0;
    for (const char *p = e; *p;) {
        const size_t n = strcspn(p, ",");
        int bit = 0;
        for (int i = 0; i < (int)(sizeof names / sizeof names[0]) && !bit; i++)
            if (n == strlen(names[i]) && strncmp(p, names[i], n) == 0)
                bit = 1 << i;
        if (!bit)
            return -1;
        bits |= bit;
        p += n + (p[n] == ',');
    }
    return bits;
}

// The shared memory carveout every kernel asks for, in percent of the most an SM has
// (MOEFLUX_GPU_CARVEOUT, read when a CUDA backend is made): unset or empty -1 (no
// preference: the driver picks per kernel), else a whole number 0 .. 100; -2 for
// anything else (the backend fails, with MF_CARVEOUT_EXPECTED in its message). One value
// for all lets an SM hold the threadgroups of consecutive kernels together, which
// programmatic dependent launch needs, where kernels of different shared memory sizes
// could be given different carveouts.
#define MF_CARVEOUT_EXPECTED "expected a whole percent 0 .. 100 (unset: the driver's choice)"
static inline int mf_gpu_carveout_env(void) {
    const char *e = getenv("MOEFLUX_GPU_CARVEOUT");
    if (!e || !*e)
        return -1;
    int v = 0;
    for (const char *p = e; *p; p++) {
        if (*p < '0' || *p > '9' || p - e >= 3)
            return -2;
        v = 10 * v + (*p - '0');
    }
    return v <= 100 ? v : -2;
}

// A matvec's params for weight w (one head; tokens, strides and rpw are the caller's);
// vec: the codes may be read 16 bytes at a time.
static inline struct mf_p_mv mf_mv_params(const struct mf_weight *w) {
    struct mf_p_mv p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_head = 1,
                        .dtype = (int)w->dtype, .sdtype = (int)w->sdtype, .bits = w->bits,
                        .group_size = w->group_size > 0 ? w->group_size : 32,
                        .vec = mf_aligned16((uintptr_t)w->w)};
    return p;
}

// Rows per warp of a matvec: one for one token (the one-token kernels mf_mv1 and
// mf_mv_multi1, which run more warps at once: on an H100 one row per warp was faster
// at every decode shape measured, the 151936-row lm_head included; bench/RESULTS.md
// "Session 11"), else MF_MV_RPW.
static inline int mf_mv_rpw(int n_tok) { return n_tok == 1 ? 1 : MF_MV_RPW; }

// A segment of a matmul_multi launch: the product of w over n_tok tokens of its own x
// rows, as a matmul gives it to its kernel.
static inline struct mf_p_mv mf_multi_seg_params(const struct mf_weight *w, int n_tok) {
    struct mf_p_mv q = mf_mv_params(w);
    q.n_tok = n_tok;
    q.x_tok_stride = q.n_in;
    q.y_tok_stride = q.n_out;
    q.rpw = mf_mv_rpw(n_tok);
    return q;
}

// matmul_multi as one mf_mv_multi launch: when every product would be an mf_mv (affine
// or float weights of one n_in, n_tok <= MF_MV_MAX_TOK), its params (segment s the
// matvec of w[s]; unused segments repeat w[0] with no threadgroups) and 1; else 0
// (one matmul each).
static inline int mf_mv_multi_params(int n, const struct mf_weight *const *w, int n_tok,
                                     struct mf_p_mv_multi *p) {
    int fused = n >= 1 && n <= MF_MULTI_MAX && n_tok >= 1 && n_tok <= MF_MV_MAX_TOK;
    for (int i = 0; fused && i < n; i++)
        fused = w[i]->qmode == MF_QMODE_AFFINE && w[i]->n_out > 0 &&
                w[i]->n_in == w[0]->n_in && w[i]->n_in > 0;
    if (!fused)
        return 0;
    *p = (struct mf_p_mv_multi){.n_seg = n};
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        const struct mf_weight *ws = w[s < n ? s : 0];
        const struct mf_p_mv q = mf_multi_seg_params(ws, n_tok);
        p->seg[s] = q;
        unsigned g[3], bl[3];
        mf_grid_mv(&q, g, bl);
        p->blk0[s + 1] = p->blk0[s] + (s < n ? (int)g[0] : 0);
    }
    return 1;
}

// Threadgroups below which mf_mv_tc gives each threadgroup fewer 16-row tiles.
#define MF_TC_MIN_TG 256
// Experts per token the grouped tensor-core kernels size their threadgroups for.
#define MF_TC_EXPERTS 8

// The formats the tensor-core kernels take (shaders/tc.h): affine 2- or 4-bit codes
// whose group quarters are whole words (4-bit: groups of 32, 64 or 128; 2-bit: 64 or
// 128), n_in <= MF_TC_MAX_IN. Pointers are not looked at (expert views hold offsets).
static inline int mf_tc_format(const struct mf_weight *w) {
    const int gs = w->group_size;
    return w->dtype == MF_DTYPE_U32 && w->qmode == MF_QMODE_AFFINE &&
           (w->bits == 4 || w->bits == 2) && (gs == 32 || gs == 64 || gs == 128) &&
           gs * w->bits >= 128 && w->n_in > 0 && w->n_in % gs == 0 &&
           w->n_in <= MF_TC_MAX_IN && w->n_out > 0;
}

// One-token products the tensor-core matvec takes: its formats, with scales, biases
// and 16-byte aligned codes.
static inline int mf_tc_ok(const struct mf_weight *w) {
    return mf_tc_format(w) && w->scales && w->biases && mf_aligned16((uintptr_t)w->w);
}

// Row tiles per mf_mv_tc threadgroup: the most of 8, 4, 2 that still leaves
// MF_TC_MIN_TG threadgroups for n_tiles tiles, else 1.
static inline int mf_tc_rt(int64_t n_tiles) {
    int rt = 8;
    while (rt > 1 && n_tiles / rt < MF_TC_MIN_TG)
        rt /= 2;
    return rt;
}

// The products of one token with n weights of one n_in (n_head heads of one weight
// when n is 1) as one mf_mv_tc launch: its params (head strides are the caller's) and
// 1, or 0 when a weight is not for it. Unused segments repeat w[0] with no
// threadgroups.
static inline int mf_mv_tc_params(int n, const struct mf_weight *const *w, int n_tok,
                                  int n_head, struct mf_p_mv_multi *p) {
    int ok = n >= 1 && n <= MF_MULTI_MAX && n_tok == 1 && n_head >= 1 &&
             (n == 1 || n_head == 1);
    for (int i = 0; ok && i < n; i++)
        ok = mf_tc_ok(w[i]) && w[i]->n_in == w[0]->n_in;
    if (!ok)
        return 0;
    *p = (struct mf_p_mv_multi){.n_seg = n};
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        const struct mf_weight *ws = w[s < n ? s : 0];
        struct mf_p_mv q = mf_mv_params(ws);
        const int64_t tiles = (ws->n_out + MF_TC_ROWS - 1) / MF_TC_ROWS;
        q.n_tok = 1;
        q.n_head = n_head;
        q.x_tok_stride = q.n_in;
        q.y_tok_stride = q.n_out;
        q.rpw = mf_tc_rt(tiles * n_head);
        p->seg[s] = q;
        p->blk0[s + 1] = p->blk0[s] + (s < n ? (int)mf_cdiv(tiles, q.rpw) : 0);
    }
    return 1;
}

// A matmul_heads call (p: its mf_mv params, heads and strides set) as one mf_mv_tc
// launch: *t its params and 1, or 0 when it does not take the tensor cores (or tc, the
// driver's switch for them, is 0).
static inline int mf_mv_tc_heads(const struct mf_p_mv *p, const struct mf_weight *w,
                                 int transposed, int tc, struct mf_p_mv_multi *t) {
    if (!tc || transposed || !mf_mv_tc_params(1, &w, p->n_tok, p->n_head, t))
        return 0;
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        t->seg[s].w_head_rows = p->w_head_rows;
        t->seg[s].x_head_stride = p->x_head_stride;
        t->seg[s].y_head_stride = p->y_head_stride;
    }
    return 1;
}

// The formats of the prefill tensor-core pair (shaders/mma.h): affine 2- or 4-bit
// codes whose group quarters are whole words (4-bit: groups of 32, 64 or 128; 2-bit:
// 64 or 128), any width.
static inline int mf_mma_format(const struct mf_weight *w) {
    const int gs = w->group_size;
    return w->dtype == MF_DTYPE_U32 && w->qmode == MF_QMODE_AFFINE &&
           (w->bits == 4 || w->bits == 2) && (gs == 32 || gs == 64 || gs == 128) &&
           gs * w->bits >= 128 && w->n_in > 0 && w->n_in % gs == 0 && w->n_out > 0;
}

// Whether mf_gemm_mma takes the product p (more than MF_MV_MAX_TOK tokens) of w at x:
// the driver's switch (mma: the device has the matrix step), w in mf_mma_format with
// 16-byte aligned codes, x and its strides 16-byte aligned.
static inline int mf_gemm_mma_ok(const struct mf_p_mv *p, const struct mf_weight *w,
                                 uintptr_t x, int mma) {
    return mma && mf_mma_format(w) && p->vec && mf_aligned16(x) &&
           p->x_tok_stride % 4 == 0 && p->x_head_stride % 4 == 0;
}

// matmul_multi of more than MF_MV_MAX_TOK tokens as one mf_gemm_mma_multi launch: when
// mf_gemm_mma would take each product alone (mma: the driver's switch; x the shared
// input), its params (segment s the product of w[s] as a matmul gives it to mf_gemm_mma;
// blk0 in row tiles of MF_MMA_ROWS, unused segments repeat w[0] with none) and 1; else
// 0.
static inline int mf_gemm_mma_multi_params(int n, const struct mf_weight *const *w,
                                           int n_tok, uintptr_t x, int mma,
                                           struct mf_p_mv_multi *p) {
    if (n < 1 || n > MF_MULTI_MAX || n_tok <= MF_MV_MAX_TOK)
        return 0;
    *p = (struct mf_p_mv_multi){.n_seg = n};
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        const struct mf_weight *ws = w[s < n ? s : 0];
        const struct mf_p_mv q = mf_multi_seg_params(ws, n_tok);
        if (ws->n_in != w[0]->n_in || !mf_gemm_mma_ok(&q, ws, x, mma))
            return 0;
        p->seg[s] = q;
        p->blk0[s + 1] = p->blk0[s] + (s < n ? (int)mf_cdiv(q.n_out, MF_MMA_ROWS) : 0);
    }
    return 1;
}

// How a matmul_multi call runs on a GPU: one mf_mv_tc launch, one mf_mv_multi launch
// (mf_mv_multi1 for one token), one mf_gemm_mma_multi launch (*p their params), or one
// matmul each, also when only some of the products would take the tensor cores (each
// then gives the bits of its own matmul); tc: the driver's switch for the one-token
// tensor-core kernels, mma for the prefill ones; x the input.
enum mf_multi_plan { MF_MULTI_SEPARATE, MF_MULTI_MV, MF_MULTI_MV1, MF_MULTI_TC, MF_MULTI_MMA };

static inline enum mf_multi_plan mf_matmul_multi_plan(int n, const struct mf_weight *const *w,
                                                      int n_tok, int tc, int mma, uintptr_t x,
                                                      struct mf_p_mv_multi *p) {
    if (tc && mf_mv_tc_params(n, w, n_tok, 1, p))
        return MF_MULTI_TC;
    if (mf_gemm_mma_multi_params(n, w, n_tok, x, mma, p))
        return MF_MULTI_MMA;
    for (int i = 0; tc && i < n; i++)
        if (n_tok == 1 && mf_tc_ok(w[i]))
            return MF_MULTI_SEPARATE;
    if (!mf_mv_multi_params(n, w, n_tok, p))
        return MF_MULTI_SEPARATE;
    return n_tok == 1 ? MF_MULTI_MV1 : MF_MULTI_MV;
}

// mf_route's params for n_tok tokens of r (bias: whether a correction bias is given).
static inline struct mf_p_route mf_route_p(const struct mf_route_params *r, int n_tok,
                                           int bias) {
    struct mf_p_route p = {.n_tok = n_tok, .n_expert = r->n_expert, .n_used = r->n_used,
                           .kind = (int)r->kind, .norm_topk_prob = r->norm_topk_prob,
                           .n_group = r->n_group, .topk_group = r->topk_group,
                           .has_bias = bias, .scaling = r->routed_scaling_factor};
    return p;
}

// matmul_add in one mf_mv1 launch (*p its params, the product added to y in its
// epilogue): the driver's switch on (MOEFLUX_GPU_FUSE), one token of an affine or
// float weight, unless the tensor-core kernels are on and take it; 0: matmul into tmp,
// then axpy.
static inline int mf_matmul_add_params(const struct mf_weight *w, int n_tok, int tc, int on,
                                       struct mf_p_mv *p) {
    if (!on || n_tok != 1 || w->qmode != MF_QMODE_AFFINE || (tc && mf_tc_ok(w)))
        return 0;
    *p = mf_mv_params(w);
    p->n_tok = 1;
    p->x_tok_stride = p->n_in;
    p->y_tok_stride = p->n_out;
    p->rpw = 1;
    p->acc = 1;
    return 1;
}

// rms_matmul_multi of one token in one mf_mv_multi1n launch (*p its params): the
// driver's switch on (MOEFLUX_GPU_FUSE), mf_mv_multi1's plan with affine codes in
// every product (float and MXFP4 rows read x from device memory, not through the
// staged tile where the norm is taken); 0: rmsnorm, then matmul_multi. The drivers
// refuse quantized gains first, as their rmsnorm does.
static inline int mf_rms_multi_params(int n, const struct mf_weight *const *w, int n_tok,
                                      int tc, const struct mf_weight *g, float eps, int on,
                                      struct mf_p_mv_norm *p) {
    if (!on || mf_matmul_multi_plan(n, w, n_tok, tc, 0, 0, &p->mv) != MF_MULTI_MV1)
        return 0;
    for (int i = 0; i < n; i++)
        if (w[i]->dtype != MF_DTYPE_U32)
            return 0;
    p->has_g = g != NULL;
    p->g_dtype = g ? (int)g->dtype : 0;
    p->eps = eps;
    return 1;
}

// A weight the GPU products read: float, or MLX affine codes (2-6/8 bits, groups of
// 32/64/128 dividing n_in, float scales and biases: U8 scales mark MXFP4 in the
// kernels). The drivers' check_weight and the grouped expert check share it.
static inline int mf_gpu_weight_ok(const struct mf_weight *w) {
    if (w->dtype == MF_DTYPE_F32 || w->dtype == MF_DTYPE_F16 || w->dtype == MF_DTYPE_BF16)
        return 1;
    const int gs = w->group_size;
    return w->dtype == MF_DTYPE_U32 && w->qmode == MF_QMODE_AFFINE && w->bits >= 2 &&
           w->bits <= 8 && w->bits != 7 && (gs == 32 || gs == 64 || gs == 128) &&
           w->n_in % gs == 0 && w->scales && w->biases &&
           (w->sdtype == MF_DTYPE_F32 || w->sdtype == MF_DTYPE_F16 ||
            w->sdtype == MF_DTYPE_BF16);
}

// A weight the grouped expert kernels read: mf_gpu_weight_ok's, or MXFP4 (4-bit E2M1
// codes, U8 E8M0 scales per 32 columns).
static inline int mf_moe_weight_ok(const struct mf_weight *w) {
    if (w->dtype == MF_DTYPE_U32 && w->qmode == MF_QMODE_MXFP4)
        return w->bits == 4 && w->group_size == 32 && w->sdtype == MF_DTYPE_U8 &&
               w->scales && w->n_in > 0 && w->n_in % 32 == 0;
    return mf_gpu_weight_ok(w);
}

static inline int mf_moe_bias_ok(const struct mf_weight *b, int64_t n) {
    return !b || ((b->dtype == MF_DTYPE_F32 || b->dtype == MF_DTYPE_F16 ||
                   b->dtype == MF_DTYPE_BF16) &&
                  b->n_out * (b->n_in > 0 ? b->n_in : 1) >= n);
}

// Whether the grouped expert kernels take gate g, up u and down d: gate and up in one
// format and shape [n_ff, n_embd], down [n_embd, n_ff] in a format of its own.
static inline int mf_moe_formats_ok(const struct mf_weight *g, const struct mf_weight *u,
                                    const struct mf_weight *d) {
    return mf_moe_weight_ok(g) && mf_moe_weight_ok(d) && u->dtype == g->dtype &&
           u->qmode == g->qmode && u->sdtype == g->sdtype && u->bits == g->bits &&
           u->group_size == g->group_size && u->n_in == g->n_in && u->n_out == g->n_out &&
           d->n_in == g->n_out && d->n_out == g->n_in;
}

// Whether the grouped kernels take batch b (mf_moe_formats_ok, and float biases of
// the projections' rows); else 0 and why in buf.
static inline int mf_moe_batch_ok(const struct mf_moe_batch *b, char *buf, size_t n) {
    const struct mf_weight *g = b->gate, *u = b->up, *d = b->down;
    if (mf_moe_formats_ok(g, u, d) && mf_moe_bias_ok(b->gate_bias, g->n_out) &&
        mf_moe_bias_ok(b->up_bias, g->n_out) && mf_moe_bias_ok(b->down_bias, d->n_out))
        return 1;
    char f0[64], f1[64], f2[64];
    snprintf(buf, n, "gate %s [%lld, %lld], up %s, down %s [%lld, %lld]: expected gate and "
             "up alike, each projection float, affine (bits 2-6/8, group 32/64/128 "
             "dividing n_in) or MXFP4, and float biases", mf_weight_format(g, f0, sizeof f0),
             (long long)g->n_out, (long long)g->n_in, mf_weight_format(u, f1, sizeof f1),
             mf_weight_format(d, f2, sizeof f2), (long long)d->n_out, (long long)d->n_in);
    return 0;
}

// Sets p's per-expert biases (blob offsets of gb, ub, db; -1 where NULL) and its
// activation (act, alpha, limit: enum mf_moe_act's).
static inline void mf_moe_extras(struct mf_p_moe *p, const struct mf_weight *gb,
                                 const struct mf_weight *ub, const struct mf_weight *db,
                                 int act, float alpha, float limit) {
    const struct mf_weight *any = gb ? gb : ub ? ub : db;
    p->gate_bias = gb ? (int)(uintptr_t)gb->w : -1;
    p->up_bias = ub ? (int)(uintptr_t)ub->w : -1;
    p->down_bias = db ? (int)(uintptr_t)db->w : -1;
    p->bias_dtype = any ? (int)any->dtype : 0;
    p->act = act;
    p->alpha = alpha;
    p->limit = limit;
}

// Which pair of grouped expert kernels runs: the tensor-core pair (mf_moe_gu_tc,
// mf_moe_down_tc), mf_moe_gu / mf_moe_down, or their one-row forms (mf_moe_gu1 /
// mf_moe_down1, the same bits), or the prefill pair on tensor cores (mf_moe_gu_mma,
// mf_moe_down_mma) for the entries of many rows.
enum mf_moe_kernels { MF_MOE_SIMT, MF_MOE_SIMT1, MF_MOE_TC, MF_MOE_MMA };

// Whether p has neither per-expert biases nor the clamped SwiGLU.
static inline int mf_moe_plain(const struct mf_p_moe *p) {
    return p->gate_bias < 0 && p->up_bias < 0 && p->down_bias < 0 && p->act == 0;
}

// The grouped expert launches for p (moe_params of gate g, up u, down d, with n_exp,
// max_rows and vec set; its format is the gate's): gp for the gate/up kernel, dp, in
// down's format, for the down kernel, and which pair. The tensor cores or not is
// chosen from the formats (and tc, the driver's switch) alone, never from the rows, so
// that an expert's row gets the same bits in every call (decode or prefill, host- or
// device-routed); the SIMT kernels give a row the same bits whatever its call.
// mf_moe_plan decides, from each entry's rows, which entries leave this pair.
static inline enum mf_moe_kernels mf_moe_launch(const struct mf_p_moe *p,
                                                const struct mf_weight *g,
                                                const struct mf_weight *u,
                                                const struct mf_weight *d, int tc,
                                                struct mf_p_moe *gp, struct mf_p_moe *dp) {
    *gp = *dp = *p;
    dp->dtype = (int)d->dtype;   // down in its own format (mixed expert recipes)
    dp->sdtype = (int)d->sdtype;
    dp->bits = d->bits;
    dp->group_size = d->group_size > 0 ? d->group_size : 32;
    if (tc && mf_moe_plain(p) && p->vec && mf_tc_format(g) && mf_tc_format(u) && mf_tc_format(d)) {
        // Tiles per threadgroup set how a tile's warps split its row's groups, and so
        // the bits: from the shapes alone (those of a one-token call of MF_TC_EXPERTS
        // experts), never from this call's experts or rows (mf_moe_plan may still move
        // the entries of many rows to the prefill pair).
        gp->rpw = mf_tc_rt(mf_cdiv(p->n_ff, MF_TC_ROWS / 2) * MF_TC_EXPERTS);
        dp->rpw = mf_tc_rt(mf_cdiv(p->n_embd, MF_TC_ROWS) * MF_TC_EXPERTS);
        return MF_MOE_TC;
    }
    gp->rpw = dp->rpw = p->max_rows == 1 ? 1 : MF_MV_RPW;   // decode: more, shorter warps
    return p->max_rows == 1 ? MF_MOE_SIMT1 : MF_MOE_SIMT;
}

// Whether a product p of more than MF_MV_MAX_TOK tokens outside mf_gemm_mma is better
// as mf_mv's row dots than as mf_gemm's tiles: when those are too few to fill a GPU.
static inline int mf_gemm_few(const struct mf_p_mv *p) {
    return mf_cdiv(p->n_out, MF_GEMM_TILE) * mf_cdiv(p->n_tok, MF_GEMM_TILE) * p->n_head <
           MF_GEMM_MIN_TG;
}

// The kernel pairs of one grouped call, run in order.
struct mf_moe_plan {
    int n;
    enum mf_moe_kernels kind[2];
    struct mf_p_moe gp[2], dp[2];
};

// The pairs for p (as mf_moe_launch takes it) over the n entries of tab ({blob lo, hi,
// row0, n_rows} each; mma_ok: the driver's switch of the prefill pair, on where the
// device has its matrix step). Where mf_moe_launch picks the SIMT or the tensor-core
// pair for more than one row an entry, mma_ok holds, every projection has a
// format of the prefill tensor-core pair, the codes are 16-byte aligned and so are x
// and gu (xvec), the entries of at least MF_MMA_MIN_ROWS rows go to that pair and the
// rest stay with the first, each pair's max_rows from its own entries. An entry's
// kernels so depend on the formats and its own row count alone: in every call, grouped
// or not, an expert of fewer rows gets the bits of the one-row kernels (those of the
// device-routed path, which models/moe.c takes for at most 4 tokens).
static inline void mf_moe_plan(const struct mf_p_moe *p, const int32_t *tab, int n,
                               const struct mf_weight *g, const struct mf_weight *u,
                               const struct mf_weight *d, int tc, int mma_ok, int xvec,
                               struct mf_moe_plan *pl) {
    struct mf_p_moe gp, dp;
    const enum mf_moe_kernels k = mf_moe_launch(p, g, u, d, tc, &gp, &dp);
    int big = 0, small = 0;
    const int mma = mma_ok && (k == MF_MOE_SIMT || k == MF_MOE_TC) && p->max_rows > 1 &&
                    mf_moe_plain(p) && p->vec && xvec && mf_mma_format(g) &&
                    mf_mma_format(u) && mf_mma_format(d);
    for (int i = 0; mma && i < n; i++) {
        const int r = tab[4 * i + 3];
        if (r >= MF_MMA_MIN_ROWS)
            big = r > big ? r : big;
        else
            small = r > small ? r : small;
    }
    pl->n = 0;
    if (!mma || small > 0) {
        pl->kind[0] = k;
        pl->gp[0] = gp;
        pl->dp[0] = dp;
        if (mma)
            pl->gp[0].max_rows = pl->dp[0].max_rows = small;
        pl->n = 1;
    }
    if (big > 0) {
        pl->kind[pl->n] = MF_MOE_MMA;
        pl->gp[pl->n] = gp;
        pl->dp[pl->n] = dp;
        pl->gp[pl->n].max_rows = pl->dp[pl->n].max_rows = big;
        pl->n++;
    }
    for (int i = 0; mma && i < pl->n; i++)
        pl->gp[i].mma_rows = pl->dp[i].mma_rows = MF_MMA_MIN_ROWS;
}

// Keys per attention split for n_tok queries over span positions: a decode step's few
// queries alone fill too few threadgroups with the long serial loops of 256-key
// chunks (32 heads: 32 threadgroups up to 256 positions), so they take chunks of 64
// keys while that makes at most 32 splits, 128 to 64 splits; prefill chunks and long
// contexts keep MF_ATTN_CHUNK (the combine walks the splits in order).
static inline int mf_attn_chunk(int n_tok, int span) {
    if (n_tok > 4)
        return MF_ATTN_CHUNK;
    return span <= 32 * 64 ? 64 : span <= 64 * 128 ? 128 : MF_ATTN_CHUNK;
}

// The attention pair's params (ext NULL: plain causal attention, base 0): the splits
// start at the first position the call's first query sees, so a sliding window over
// a long context launches only the splits it reads. 0 and *why set when the call is
// refused.
static inline int mf_attn_params(struct mf_p_attn *p, int n_tok, int n_head, int n_kv_head,
                                 int dk, int dv, int k_stride, int v_stride, int pos0,
                                 float scale, const struct mf_attn_ext *ext,
                                 const char **why) {
    const int window = ext ? ext->window : 0, ring = ext ? ext->ring : 0;
    const struct mf_weight *sk = ext ? ext->sinks : NULL;
    const int base = window > 0 && pos0 - window + 1 > 0 ? pos0 - window + 1 : 0;
    const int chunk = mf_attn_chunk(n_tok, pos0 + n_tok - base);
    *why = dk > MF_ATTN_DK_MAX || n_tok > 65535 || n_head > 65535 ? "sizes"
           : window < 0 || ring < 0 || (ring > 0 && window > 0 && ring < window + n_tok - 1) ||
                   (ring > 0 && window == 0 && ring < pos0 + n_tok)
               ? "window / ring"
           : sk && (sk->dtype == MF_DTYPE_U32 || sk->n_out * (sk->n_in > 0 ? sk->n_in : 1) <
                                                     n_head)
               ? "sinks"
               : NULL;
    *p = (struct mf_p_attn){.n_tok = n_tok, .n_head = n_head, .n_kv_head = n_kv_head,
                            .dk = dk, .dv = dv, .k_stride = k_stride, .v_stride = v_stride,
                            .pos0 = pos0, .scale = scale,
                            .chunk = chunk,
                            .n_split = (pos0 + n_tok - base + chunk - 1) / chunk,
                            .window = window, .ring = ring, .base = base,
                            .sink_dtype = sk ? (int)sk->dtype : -1};
    return *why == NULL;
}

// Queries per attention launch pair. A block's partials take queries x heads x splits
// x (dv + 2) floats of scratch, so a prefill chunk runs in blocks of as many queries as
// MF_ATTN_WS_BYTES holds (a 512-token prompt of A3B shapes: one block, 17 MB), never
// fewer than MF_ATTN_QBLOCK (the blocks of every chunk before session 26: 64 queries of
// 32 heads at 32k positions take 136 MB); block > 0 (MOEFLUX_GPU_ATTN_BLOCK) sets the
// size. One launch pair of several waves in place of eight pairs of at most one wave
// each (A3B shapes: 128-256 threadgroups a block), each waiting for the one before; a
// query's bits do not depend on its block (mf_attn_block).
#define MF_ATTN_QBLOCK 64
#define MF_ATTN_WS_BYTES (32ll << 20)

static inline int mf_attn_qblock(const struct mf_p_attn *p, int block) {
    long long nb = block;
    if (nb <= 0) {
        nb = MF_ATTN_WS_BYTES / ((long long)p->n_head * p->n_split * (p->dv + 2) * 4);
        nb = nb < MF_ATTN_QBLOCK ? MF_ATTN_QBLOCK : nb;
    }
    return nb < p->n_tok ? (int)nb : p->n_tok;
}

// Queries per attention launch pair MOEFLUX_GPU_ATTN_BLOCK asks for (read when an exec
// is made): unset or empty 0 (mf_attn_qblock's choice), else a whole number 1 .. 65535;
// -1 for anything else (the drivers fail the exec with MF_ATTN_BLOCK_EXPECTED).
#define MF_ATTN_BLOCK_EXPECTED "expected a whole number of queries 1 .. 65535 (unset: by size)"
static inline int mf_gpu_attn_block_env(void) {
    const char *e = getenv("MOEFLUX_GPU_ATTN_BLOCK");
    if (!e || !*e)
        return 0;
    int v = 0;
    for (const char *c = e; *c; c++) {
        if (*c < '0' || *c > '9' || c - e >= 5)
            return -1;
        v = 10 * v + (*c - '0');
    }
    return v >= 1 && v <= 65535 ? v : -1;
}

// 1 when a block of queries takes mf_attn_tile for its partials (the same bits as
// mf_attn_part, each split's keys and values read once per tile of query rows): the
// driver's switch on (MOEFLUX_GPU_ATTN_TILE), more than 4 queries (a decode step's few
// keep a threadgroup per query and head), whole groups of heads per kv head, head
// dimensions the tile holds.
static inline int mf_attn_tile_ok(const struct mf_p_attn *p, int on) {
    return on && p->n_tok > 4 && p->n_head % p->n_kv_head == 0 &&
           p->dk <= MF_ATTN_TILE_DMAX &&
           p->dv <= MF_ATTN_TILE_DMAX && MF_THREADS % p->dv == 0 &&
           p->chunk <= MF_ATTN_CHUNK;
}

// The params of queries t0 .. t0 + nb - 1 (nb at most qblock) of the call p: the same
// chunk and base, so each query has the splits of the whole call in the same order
// (those past its last position, empty, are dropped: the combine skips empty ones), and
// so the same bits.
static inline struct mf_p_attn mf_attn_block(const struct mf_p_attn *p, int t0, int qblock) {
    struct mf_p_attn b = *p;
    b.n_tok = p->n_tok - t0 < qblock ? p->n_tok - t0 : qblock;
    b.pos0 = p->pos0 + t0;
    b.n_split = (b.pos0 + b.n_tok - p->base + p->chunk - 1) / p->chunk;
    return b;
}

// The ints of a context the last-threadgroup kernels count on (each left at 0 by its
// last threadgroup): mf_route1n's at 0, mf_attn_part1's from MF_COUNT_ATTN (one per
// query and head of a block of queries), mf_moe_down1c's from MF_COUNT_COMB (one per
// token and threadgroup column).
#define MF_COUNT_ATTN 64
#define MF_COUNT_COMB 2048
#define MF_COUNT_INTS 4096

// 1 when a block of queries takes mf_attn_part1 (the partials and, by each query's last
// split, the combine, in one launch; the bits of mf_attn_part then mf_attn_comb): the
// driver's switch on (MOEFLUX_GPU_FUSE), not a tiled block, a counter per query and
// head.
static inline int mf_attn_fuse_ok(const struct mf_p_attn *p, int on, int tile) {
    return on && !tile && (long long)p->n_tok * p->n_head <= MF_COUNT_COMB - MF_COUNT_ATTN;
}

// 1 when a device-routed experts call takes mf_moe_down1c (the down rows and the
// combine in one launch; the bits of mf_moe_down1 then mf_moe_combine): the driver's
// switch on (MOEFLUX_GPU_FUSE), the one-row pair planned (pl), a counter per token and
// threadgroup column of dp.
static inline int mf_comb_fuse_ok(const struct mf_moe_plan *pl, int n_tok, int on) {
    if (!on || pl->n != 1 || pl->kind[0] != MF_MOE_SIMT1)
        return 0;
    const long long nblk = mf_cdiv(pl->dp[0].n_embd, MF_MV_ROWS * MF_DOWN1_RPW);
    return (long long)n_tok * nblk <= MF_COUNT_INTS - MF_COUNT_COMB;
}

// How a rope_qk call runs on a GPU.
enum mf_rope_qk_plan {
    MF_ROPE_QK_NONE,    // nothing to rotate or normalise
    MF_ROPE_QK_FUSED,   // one mf_rope_qk launch with *p
    MF_ROPE_QK_BAD,     // refused: a quantized norm weight, or a normalised head longer
                        // than MF_ROPE_QK_NORM_MAX (mf_rope_qk splits those)
};

static inline enum mf_rope_qk_plan mf_rope_qk_plan(const struct mf_rope_qk *r,
                                                   struct mf_p_rope_qk *p) {
    const int has_norm = r->norm[0] || r->norm[1];
    if (r->n_tok <= 0 || r->heads[0] < 0 || r->heads[1] < 0 ||
        r->heads[0] + r->heads[1] <= 0 || r->head_dim <= 0 || (!has_norm && r->n_rot < 2))
        return MF_ROPE_QK_NONE;
    for (int i = 0; i < 2; i++)
        if (r->norm[i] && r->norm[i]->dtype == MF_DTYPE_U32)
            return MF_ROPE_QK_BAD;
    if (has_norm && r->head_dim > MF_ROPE_QK_NORM_MAX)
        return MF_ROPE_QK_BAD;
    *p = (struct mf_p_rope_qk){.n_tok = r->n_tok, .head_dim = r->head_dim,
                               .n_rot = r->n_rot, .pos0 = r->pos0,
                               .traditional = r->traditional, .eps = r->eps,
                               .mscale = r->mscale};
    for (int i = 0; i < 2; i++) {
        p->heads[i] = r->heads[i];
        p->tok_stride[i] = r->tok_stride[i];
        p->head_stride[i] = r->head_stride[i];
        p->has_g[i] = r->norm[i] != NULL;
        p->g_dtype[i] = r->norm[i] ? (int)r->norm[i]->dtype : 0;
    }
    return MF_ROPE_QK_FUSED;
}

// Source rows of one scatter_add_rows launch: its table (3 x this + 1 ints) stays well
// inside a CUDA argument-ring segment. Larger calls are launched in parts, in order.
#define MF_SCATTER_PART 16384

static inline int mf_cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

// mf_scatter_add's table for the n_rows (<= MF_SCATTER_PART) rows idx: the distinct
// destinations d[m], the offsets off[m + 1] of their sources in rows[n_rows], each
// destination's sources ascending. tab holds 3 * n_rows + 1 ints; key is scratch of
// n_rows. Returns m.
static inline int mf_scatter_tab(const int32_t *idx, int n_rows, int32_t *tab, int64_t *key) {
    for (int i = 0; i < n_rows; i++)
        key[i] = (int64_t)idx[i] * 4294967296 + i;   // by destination, then source
    qsort(key, (size_t)n_rows, sizeof *key, mf_cmp_i64);
    int m = 0;
    for (int i = 0; i < n_rows; i++)
        m += i == 0 || idx[key[i] & 0xffffffff] != idx[key[i - 1] & 0xffffffff];
    int32_t *off = tab + m, *rows = off + m + 1;
    for (int i = 0, d = -1; i < n_rows; i++) {
        const int32_t src = (int32_t)(key[i] & 0xffffffff);
        if (i == 0 || idx[src] != tab[d]) {
            tab[++d] = idx[src];
            off[d] = i;
        }
        rows[i] = src;
    }
    off[m] = n_rows;
    return m;
}

// Rows up to which a scatter_add_rows call's table lives in its mf_scatter_buf (a
// streamed decode step's k rows per layer: no allocation per token).
#define MF_SCATTER_SMALL 64

// Host scratch of one scatter_add_rows call, launched in parts of `part` source rows;
// tab / key point into the struct itself for small calls (do not copy it).
struct mf_scatter_buf {
    int part;
    int32_t *tab;
    int64_t *key;
    int32_t tab_small[3 * MF_SCATTER_SMALL + 1];
    int64_t key_small[MF_SCATTER_SMALL];
};

// The scratch for a call of n_rows (> 0) rows; 0 when out of memory (nothing held).
static inline int mf_scatter_buf_new(struct mf_scatter_buf *sb, int n_rows) {
    sb->part = n_rows < MF_SCATTER_PART ? n_rows : MF_SCATTER_PART;
    if (sb->part <= MF_SCATTER_SMALL) {
        sb->tab = sb->tab_small;
        sb->key = sb->key_small;
        return 1;
    }
    sb->tab = malloc((3 * (size_t)sb->part + 1) * sizeof *sb->tab);
    sb->key = malloc((size_t)sb->part * sizeof *sb->key);
    if (sb->tab && sb->key)
        return 1;
    free(sb->tab);
    free(sb->key);
    return 0;
}

static inline void mf_scatter_buf_free(struct mf_scatter_buf *sb) {
    if (sb->tab == sb->tab_small)
        return;
    free(sb->tab);
    free(sb->key);
}

// The part of the call starting at row i0 of n_rows: its rows (*nr), its table in
// sb->tab (*bytes long). Returns its destination count.
static inline int mf_scatter_part(struct mf_scatter_buf *sb, const int32_t *idx, int i0,
                                  int n_rows, int *nr, size_t *bytes) {
    *nr = n_rows - i0 < sb->part ? n_rows - i0 : sb->part;
    const int m = mf_scatter_tab(idx + i0, *nr, sb->tab, sb->key);
    *bytes = (2 * (size_t)m + 1 + (size_t)*nr) * sizeof *sb->tab;
    return m;
}

#endif /* MF_GPU_ARGS_H */
