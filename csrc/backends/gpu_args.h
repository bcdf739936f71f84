/*
 * gpu_args.h — what the GPU drivers (CUDA, Metal) derive alike from an op's arguments:
 * the kernel params of the fused ops, so that both launch the same work (the twin test
 * checks they do). Plain C over backend.h and shaders/mf_params.h.
 */
#ifndef MF_GPU_ARGS_H
#define MF_GPU_ARGS_H

#include "backends/backend.h"
#include "../../shaders/mf_params.h"

// How a rope_qk call runs on a GPU.
enum mf_rope_qk_plan {
    MF_ROPE_QK_NONE,    // nothing to rotate or normalise
    MF_ROPE_QK_FUSED,   // one mf_rope_qk launch with *p
    MF_ROPE_QK_SPLIT,   // rmsnorm_heads and rope launches: a normalised head is longer
                        // than the kernel's row buffer (MF_ROPE_D_MAX)
    MF_ROPE_QK_QUANT,   // refused: a quantized norm weight
};

static inline enum mf_rope_qk_plan mf_rope_qk_plan(const struct mf_rope_qk *r,
                                                   struct mf_p_rope_qk *p) {
    const int has_norm = r->norm[0] || r->norm[1];
    if (r->n_tok <= 0 || r->heads[0] < 0 || r->heads[1] < 0 ||
        r->heads[0] + r->heads[1] <= 0 || r->head_dim <= 0 || (!has_norm && r->n_rot < 2))
        return MF_ROPE_QK_NONE;
    for (int i = 0; i < 2; i++)
        if (r->norm[i] && r->norm[i]->dtype == MF_DTYPE_U32)
            return MF_ROPE_QK_QUANT;
    if (has_norm && r->head_dim > MF_ROPE_D_MAX)
        return MF_ROPE_QK_SPLIT;
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
