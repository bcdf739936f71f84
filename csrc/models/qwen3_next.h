/*
 * qwen3_next.h — the hybrid Qwen families' own config keys (qwen3_next and
 * qwen3_5_moe; read by their mf_arch.read_config into cfg->arch_cfg; model-math §2.1).
 */
#ifndef MF_QWEN3_NEXT_H
#define MF_QWEN3_NEXT_H

#include "models/arch_config.h"

struct qwen3_next_config {
    int full_attention_interval;          // default 4
    int linear_num_key_heads;             // nk
    int linear_num_value_heads;           // nv
    int linear_key_head_dim;              // dk
    int linear_value_head_dim;            // dv
    int linear_conv_kernel_dim;           // K, default 4
    int shared_expert_intermediate_size;  // 0 = none
    struct mf_sparse_step_cfg sparse;     // qwen3_next's MoE layer rule
};

#endif /* MF_QWEN3_NEXT_H */
