/*
 * arch_config.c — the config blocks several families share (arch_config.h).
 * Defaults and checks are mlx-lm's (model-math §3.1, §4); messages name the file and
 * the key through the reader.
 */
#include "models/arch_config.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"

int mf_read_sparse_step(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                        struct mf_sparse_step_cfg *out) {
    out->decoder_sparse_step = 1;
    int rc = mf_cfg_pos_int(r, "decoder_sparse_step", 0, &out->decoder_sparse_step);
    if (rc) return rc;
    return mf_cfg_layer_list(r, "mlp_only_layers", cfg->num_hidden_layers,
                             &out->mlp_only_layers, &out->n_mlp_only_layers);
}

void mf_sparse_step_free(struct mf_sparse_step_cfg *s) {
    free(s->mlp_only_layers);
    s->mlp_only_layers = NULL;
    s->n_mlp_only_layers = 0;
}

void mf_sparse_step_layers(struct mf_config *cfg, const struct mf_sparse_step_cfg *s) {
    // mlp_only_layers marked first (entries were checked to be layer indices): one
    // pass over the list, not a search of it per layer (layers x entries steps).
    for (int i = 0; i < s->n_mlp_only_layers; i++)
        cfg->layer_is_moe[s->mlp_only_layers[i]] = 2;
    for (int i = 0; i < cfg->num_hidden_layers; i++) {
        int mlp_only = cfg->layer_is_moe[i] == 2;
        cfg->layer_is_moe[i] = (uint8_t)(!mlp_only && cfg->num_experts > 0 &&
                                         (i + 1) % s->decoder_sparse_step == 0);
    }
}

static int noaux_checks(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                        const struct mf_noaux_cfg *o) {
    if (o->n_shared_experts < 0 || o->first_k_dense_replace < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: n_shared_experts and first_k_dense_replace must not be "
                      "negative", r->name);
    if (cfg->num_experts > 0 && (cfg->num_experts % o->n_group != 0 ||
                                 o->topk_group > o->n_group))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: n_routed_experts (%d) must be a multiple of n_group (%d) and "
                      "topk_group (%d) at most n_group", r->name, cfg->num_experts,
                      o->n_group, o->topk_group);
    if (!(o->routed_scaling_factor > 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: routed_scaling_factor must be positive", r->name);
    return 0;
}

int mf_read_noaux(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                  struct mf_noaux_cfg *out) {
    memset(out, 0, sizeof *out);
    out->n_group = 1;
    out->topk_group = 1;
    out->routed_scaling_factor = 1.0;
    int rc;
    if ((rc = mf_cfg_int(r, "n_shared_experts", 0, &out->n_shared_experts)) ||
        (rc = mf_cfg_pos_int(r, "n_group", 0, &out->n_group)) ||
        (rc = mf_cfg_pos_int(r, "topk_group", 0, &out->topk_group)) ||
        (rc = mf_cfg_num(r, "routed_scaling_factor", 0, &out->routed_scaling_factor)) ||
        (rc = mf_cfg_int(r, "first_k_dense_replace", 0, &out->first_k_dense_replace)))
        return rc;
    return noaux_checks(cfg, r, out);
}

void mf_ident_int(struct mf_ident_field *out, int *n, int cap, const char *name,
                  int64_t v) {
    if (*n < cap) out[*n] = (struct mf_ident_field){.name = name, .i = v};
    (*n)++;
}

void mf_ident_float(struct mf_ident_field *out, int *n, int cap, const char *name,
                    double v) {
    if (*n < cap) out[*n] = (struct mf_ident_field){.name = name, .is_float = 1, .f = v};
    (*n)++;
}
