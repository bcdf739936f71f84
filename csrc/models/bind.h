/*
 * bind.h — weight-binding helpers the family files share (load time): a linear or a
 * vector named by a per-layer format, and the noaux_tc routed-MoE layer (router,
 * correction bias, ungated shared experts) of deepseek_v3 and glm4_moe.
 */
#ifndef MF_BIND_H
#define MF_BIND_H

#include "core/internal.h"
#include "models/moe.h"

// mf_bind_linear / mf_bind_vector of the module named fmt % il.
int mf_bind_lin_at(const mf_model *m, struct mf_weight *out, int64_t n_stack,
                   int64_t n_out, int64_t n_in, char *err, size_t errlen,
                   const char *fmt, int il);
int mf_bind_vec_at(const mf_model *m, struct mf_weight *out, int64_t n, char *err,
                   size_t errlen, const char *fmt, int il);

// model.layers.<il>.mlp as a noaux_tc MoE layer: gate [n_expert, n_embd] (float or
// quantized), gate.e_score_correction_bias (f32 copy when stored in 16 bits) and, when
// mc->n_ff_shexp > 0, shared_experts.{gate,up,down}_proj added without a gate.
int mf_bind_noaux_moe(mf_model *m, struct mf_moe_layer *w, const struct mf_moe_config *mc,
                      int il, char *err, size_t errlen);

#endif /* MF_BIND_H */
