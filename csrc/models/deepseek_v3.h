/*
 * deepseek_v3.h — the deepseek_v3 family's own config keys (read by its
 * mf_arch.read_config into cfg->arch_cfg; model-math §3.1).
 */
#ifndef MF_DEEPSEEK_V3_H
#define MF_DEEPSEEK_V3_H

#include "models/arch_config.h"
#include "models/yarn.h"

struct deepseek_v3_config {
    int q_lora_rank;               // 0 when null (q_proj used instead)
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    int moe_layer_freq;            // default 1
    struct mf_noaux_cfg noaux;     // routing, shared experts, first dense layers
    struct mf_yarn yarn;           // rope_scaling (models/yarn.h)
};

#endif /* MF_DEEPSEEK_V3_H */
