/*
 * config.h — the run-time model description, read from a model directory's
 * config.json (the checkpoint's own file, copied by prep).
 *
 * Field names are the config.json keys (mlx-lm ModelArgs habit) so that a reader can
 * grep a key from the file straight into the code. One struct serves every supported
 * family; keys a family does not use stay at their zero defaults. Layer kinds
 * (linear attention or not, MoE or dense) are derived here once, at load, so the
 * forward passes never re-derive them.
 */
#ifndef MF_CONFIG_H
#define MF_CONFIG_H

#include <stddef.h>
#include <stdint.h>

enum mf_arch_id {
    MF_ARCH_QWEN3_5_MOE = 1,   // "qwen3_5_moe" (Qwen3.5 / Qwen3.6 MoE), text_config nested
    MF_ARCH_QWEN3_NEXT = 2,    // "qwen3_next"
    MF_ARCH_DEEPSEEK_V3 = 3,   // "deepseek_v3" (also Cogito-V2, Kimi-K2 remaps)
    MF_ARCH_QWEN3_MOE = 4,     // "qwen3_moe"
};

// A per-module quantization override from the config's "quantization" block,
// keyed by the module path as written there (e.g.
// "language_model.model.layers.0.mlp.gate").
struct mf_quant_override {
    char *path;        // owned
    int quantized;     // 0 when the entry is `false` (module kept in float)
    int bits;
    int group_size;
};

struct mf_config {
    enum mf_arch_id arch;
    char model_type[32];

    // ---- shared by every family
    int hidden_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;                  // qwen: explicit or hidden/heads; deepseek: unused
    int vocab_size;
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    double partial_rotary_factor;  // 1.0 when absent
    int tie_word_embeddings;
    int bos_token_id;              // -1 when absent
    int eos_token_id;              // -1 when absent (first id if config holds a list)

    // ---- MoE (all families). num_experts = n_routed_experts for deepseek.
    int num_experts;
    int num_experts_per_tok;
    int moe_intermediate_size;
    int shared_expert_intermediate_size;  // qwen3_5_moe / qwen3_next; 0 = none
    int intermediate_size;                // dense FFN width
    int norm_topk_prob;                   // default 1 for qwen3_5_moe, config otherwise
    int decoder_sparse_step;              // default 1
    int n_mlp_only_layers;
    int *mlp_only_layers;                 // owned, n_mlp_only_layers entries

    // ---- hybrid (qwen3_5_moe / qwen3_next) linear attention
    int full_attention_interval;   // default 4
    int linear_num_key_heads;      // nk
    int linear_num_value_heads;    // nv
    int linear_key_head_dim;       // dk
    int linear_value_head_dim;     // dv
    int linear_conv_kernel_dim;    // K, default 4

    // ---- deepseek_v3
    int q_lora_rank;               // 0 when null (q_proj used instead)
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    int n_shared_experts;          // 0 when null
    int n_group;
    int topk_group;
    double routed_scaling_factor;
    int first_k_dense_replace;
    int moe_layer_freq;            // default 1
    int has_yarn;                  // rope_scaling.type (or rope_type) == "yarn"
    double yarn_factor;
    int yarn_original_max_position_embeddings;
    double yarn_beta_fast;         // default 32
    double yarn_beta_slow;         // default 1
    double yarn_mscale;            // default 1
    double yarn_mscale_all_dim;    // default 0

    // ---- quantization block
    int quant_bits;                // default bits, 0 = no quantization block
    int quant_group_size;
    int n_quant_overrides;
    struct mf_quant_override *quant_overrides;  // owned

    // ---- derived per layer, [num_hidden_layers], owned
    uint8_t *layer_is_linear;      // hybrid: GatedDeltaNet mixer
    uint8_t *layer_is_moe;         // routed-expert FFN (else dense SwiGLU)
    int n_moe_layers;

    char *json_text;               // the file's text, owned (for mf_model_config_json)
};

// Parse config.json at `path` into *cfg (zeroed first). Nested "text_config" (Qwen3.5)
// is read as the LM config; top-level keys fill what it lacks. Required keys missing,
// unknown model_type or inconsistent values give MF_ERR_FORMAT with a message naming
// the file and key. On failure *cfg holds nothing that needs freeing.
int mf_config_load(struct mf_config *cfg, const char *path, char *err, size_t errlen);

// Same from an in-memory text (for tests and fuzzing); `name` is used in messages.
int mf_config_parse(struct mf_config *cfg, const char *text, size_t len,
                    const char *name, char *err, size_t errlen);

void mf_config_free(struct mf_config *cfg);

// Quantization of module `path` (no .weight suffix) per the config's block: the
// override when one names it, else the defaults. Returns 1 and fills bits/gs when the
// module is quantized by the block's rule, 0 when the override says float.
// (Whether a module is quantized in a file is decided by the presence of .scales;
// this gives bits/group size for it.)
int mf_config_quant_for(const struct mf_config *cfg, const char *path, int *bits, int *gs);

#endif /* MF_CONFIG_H */
