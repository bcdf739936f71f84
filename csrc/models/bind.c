/*
 * bind.c — weight-binding helpers the family files share (bind.h).
 */
#include "models/bind.h"

#include <stdio.h>

int mf_bind_lin_at(const mf_model *m, struct mf_weight *out, int64_t n_stack,
                   int64_t n_out, int64_t n_in, char *err, size_t errlen,
                   const char *fmt, int il) {
    char path[256];
    snprintf(path, sizeof path, fmt, il);
    return mf_bind_linear(m, out, path, n_stack, n_out, n_in, err, errlen);
}

int mf_bind_vec_at(const mf_model *m, struct mf_weight *out, int64_t n, char *err,
                   size_t errlen, const char *fmt, int il) {
    char name[256];
    snprintf(name, sizeof name, fmt, il);
    return mf_bind_vector(m, out, name, n, err, errlen);
}

int mf_bind_noaux_moe(mf_model *m, struct mf_moe_layer *w, const struct mf_moe_config *mc,
                      int il, char *err, size_t errlen) {
    w->il = il;
    int rc = mf_bind_lin_at(m, &w->router, 0, mc->n_expert, mc->n_embd, err, errlen,
                            "model.layers.%d.mlp.gate", il);
    if (!rc) {
        // read by moe_route as f32: converted once here if stored as F16/BF16
        char name[256];
        snprintf(name, sizeof name, "model.layers.%d.mlp.gate.e_score_correction_bias", il);
        rc = mf_bind_vector_f32(m, &w->router_bias, name, mc->n_expert, err, errlen);
    }
    if (rc || mc->n_ff_shexp == 0) return rc;
    struct mf_ffn_layer sh;
    char prefix[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp.shared_experts", il);
    rc = mf_ffn_bind(m, &sh, prefix, mc->n_embd, mc->n_ff_shexp, err, errlen);
    if (rc) return rc;
    w->has_shared = 1;  // these shared experts are added without a gate
    w->shared_gate = sh.gate;
    w->shared_up = sh.up;
    w->shared_down = sh.down;
    return MF_OK;
}
