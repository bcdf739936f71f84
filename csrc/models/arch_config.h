/*
 * arch_config.h — config blocks several families share, read by their
 * mf_arch.read_config (models/<type>.c) into their private config structs:
 *   - the Qwen sparse-layer rule (decoder_sparse_step, mlp_only_layers), qwen3_moe and
 *     qwen3_next;
 *   - noaux_tc routing with shared experts and leading dense layers (n_group,
 *     topk_group, routed_scaling_factor, n_shared_experts, first_k_dense_replace),
 *     deepseek_v3 and glm4_moe;
 * and the helpers that turn them into snapshot identity fields and layer kinds.
 */
#ifndef MF_ARCH_CONFIG_H
#define MF_ARCH_CONFIG_H

#include "core/internal.h"

struct mf_sparse_step_cfg {
    int decoder_sparse_step;       // default 1
    int n_mlp_only_layers;
    int *mlp_only_layers;          // owned, n_mlp_only_layers entries
};

int mf_read_sparse_step(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                        struct mf_sparse_step_cfg *out);
void mf_sparse_step_free(struct mf_sparse_step_cfg *s);
// layer_is_moe[i] = routed experts on layer i: not an mlp_only layer and on the
// decoder_sparse_step grid ((i + 1) % step == 0), when the model has experts.
void mf_sparse_step_layers(struct mf_config *cfg, const struct mf_sparse_step_cfg *s);

struct mf_noaux_cfg {
    int n_shared_experts;          // 0 when absent or null
    int n_group;                   // default 1
    int topk_group;                // default 1
    double routed_scaling_factor;  // default 1
    int first_k_dense_replace;     // default 0
};

// `experts_key` names the expert count in messages (n_routed_experts).
int mf_read_noaux(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                  struct mf_noaux_cfg *out);

// Appends an integer / a real identity field to out[*n] when *n < cap.
void mf_ident_int(struct mf_ident_field *out, int *n, int cap, const char *name,
                  int64_t v);
void mf_ident_float(struct mf_ident_field *out, int *n, int cap, const char *name,
                    double v);

#endif /* MF_ARCH_CONFIG_H */
