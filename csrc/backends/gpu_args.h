/*
 * gpu_args.h — what the GPU drivers (CUDA, Metal) derive alike from an op's arguments:
 * the matvec's choices and the kernel params of the fused ops, so that both launch the
 * same work (the twin test checks they do). Plain C over backend.h and
 * shaders/mf_params.h.
 */
#ifndef MF_GPU_ARGS_H
#define MF_GPU_ARGS_H

#include <stdint.h>

#include "backends/backend.h"
#include "../../shaders/mf_params.h"
#include "../../shaders/grid.h"

_Static_assert(MF_MULTI_MAX == MF_MATMUL_MULTI, "matmul_multi limits must agree");
_Static_assert(MF_ROPE_D_MAX == MF_ROPE_QK_NORM_MAX, "rope_qk head limits must agree");

// Tokens above which matmul uses the tiled GEMM instead of the register-tiled matvec.
#define MF_MV_MAX_TOK 8
// Threadgroups of 4-row warps below which a one-token matvec takes one row per warp.
#define MF_MV_FEW_BLOCKS 512

static inline int mf_aligned16(uintptr_t a) { return (a & 15u) == 0; }

// A matvec's params for weight w (one head; tokens, strides and rpw are the caller's);
// vec: the codes may be read 16 bytes at a time.
static inline struct mf_p_mv mf_mv_params(const struct mf_weight *w) {
    struct mf_p_mv p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_head = 1,
                        .dtype = (int)w->dtype, .sdtype = (int)w->sdtype, .bits = w->bits,
                        .group_size = w->group_size > 0 ? w->group_size : 32,
                        .vec = mf_aligned16((uintptr_t)w->w)};
    return p;
}

// Rows per warp of a matvec: one for a decode product that 4-row warps would spread
// over fewer than MF_MV_FEW_BLOCKS threadgroups (the H200's 132 multiprocessors hold
// two each).
static inline int mf_mv_rpw(const struct mf_weight *w, int n_tok, int n_head) {
    const int64_t few = (int64_t)MF_MV_FEW_BLOCKS * MF_MV_ROWS * MF_MV_RPW;
    return n_tok == 1 && w->n_out * n_head < few ? 1 : MF_MV_RPW;
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
        struct mf_p_mv q = mf_mv_params(ws);
        q.n_tok = n_tok;
        q.x_tok_stride = q.n_in;
        q.y_tok_stride = q.n_out;
        q.rpw = mf_mv_rpw(ws, n_tok, 1);
        p->seg[s] = q;
        unsigned g[3], bl[3];
        mf_grid_mv(&q, g, bl);
        p->blk0[s + 1] = p->blk0[s] + (s < n ? (int)g[0] : 0);
    }
    return 1;
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

#endif /* MF_GPU_ARGS_H */
