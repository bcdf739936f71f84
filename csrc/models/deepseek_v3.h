/*
 * deepseek_v3.h — the deepseek_v3 family's own config keys (read by its
 * mf_arch.read_config into cfg->arch_cfg; model-math §3.1).
 */
#ifndef MF_DEEPSEEK_V3_H
#define MF_DEEPSEEK_V3_H

#include "models/arch_config.h"

struct deepseek_v3_config {
    int q_lora_rank;               // 0 when null (q_proj used instead)
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    int moe_layer_freq;            // default 1
    struct mf_noaux_cfg noaux;     // routing, shared experts, first dense layers
    int has_yarn;                  // rope_scaling.type (or rope_type) == "yarn"
    double yarn_factor;
    int yarn_original_max_position_embeddings;
    double yarn_beta_fast;         // default 32
    double yarn_beta_slow;         // default 1
    double yarn_mscale;            // default 1
    double yarn_mscale_all_dim;    // default 0
};

#endif /* MF_DEEPSEEK_V3_H */
