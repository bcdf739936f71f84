/*
 * test_config.c — config.json parsing for the four families: real-looking configs
 * (shapes of the released models, written as the checkpoints write them) must give the
 * documented fields and layer kinds (model-math §2.1-2.2, §3.1-3.2, §4); malformed ones
 * must fail with MF_ERR_FORMAT and a message naming the key. A mutation fuzzer over
 * the configs checks the parser never crashes or leaks (run under `make asan`).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "core/common.h"
#include "core/config.h"
#include "core/internal.h"
#include "models/deepseek_v3.h"
#include "models/qwen3_next.h"

// The deepseek_v3 family's own keys (models/deepseek_v3.h).
#define DS(c) ((const struct deepseek_v3_config *)(c).arch_cfg)

// Qwen3.6-35B-A3B-4bit style: text_config nesting, rope_parameters, 8-bit routers.
static const char *const QWEN35 =
    "{\"architectures\": [\"Qwen3_5MoeForConditionalGeneration\"],"
    " \"model_type\": \"qwen3_5_moe\", \"tie_word_embeddings\": false,"
    " \"image_token_id\": 248056,"
    " \"quantization\": {\"group_size\": 64, \"bits\": 4, \"mode\": \"affine\","
    "   \"language_model.model.layers.0.mlp.gate\": {\"group_size\": 64, \"bits\": 8},"
    "   \"language_model.model.layers.0.mlp.shared_expert_gate\": {\"group_size\": 64, \"bits\": 8}},"
    " \"text_config\": {\"model_type\": \"qwen3_5_moe_text\", \"hidden_size\": 2048,"
    "   \"num_hidden_layers\": 40, \"num_attention_heads\": 16, \"num_key_value_heads\": 2,"
    "   \"head_dim\": 256, \"rms_norm_eps\": 1e-06, \"vocab_size\": 248320,"
    "   \"max_position_embeddings\": 262144, \"linear_num_key_heads\": 16,"
    "   \"linear_num_value_heads\": 32, \"linear_key_head_dim\": 128,"
    "   \"linear_value_head_dim\": 128, \"linear_conv_kernel_dim\": 4,"
    "   \"full_attention_interval\": 4, \"num_experts\": 256, \"num_experts_per_tok\": 8,"
    "   \"moe_intermediate_size\": 512, \"shared_expert_intermediate_size\": 512,"
    "   \"attn_output_gate\": true, \"eos_token_id\": 248044,"
    "   \"layer_types\": [\"linear_attention\", \"full_attention\"],"
    "   \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 10000000,"
    "     \"partial_rotary_factor\": 0.25, \"mrope_section\": [11, 11, 10],"
    "     \"mrope_interleaved\": true}},"
    " \"vision_config\": {\"depth\": 27, \"hidden_size\": 1152}}";

// Qwen3-Next-80B-A3B style: flat, top-level rope keys, an mlp_only layer for the test.
static const char *const QWEN3_NEXT =
    "{\"architectures\": [\"Qwen3NextForCausalLM\"], \"model_type\": \"qwen3_next\","
    " \"hidden_size\": 2048, \"num_hidden_layers\": 48, \"num_attention_heads\": 16,"
    " \"num_key_value_heads\": 2, \"head_dim\": 256, \"intermediate_size\": 5120,"
    " \"vocab_size\": 151936, \"max_position_embeddings\": 262144, \"rms_norm_eps\": 1e-06,"
    " \"rope_theta\": 10000000, \"partial_rotary_factor\": 0.25,"
    " \"linear_num_key_heads\": 16, \"linear_num_value_heads\": 32,"
    " \"linear_key_head_dim\": 128, \"linear_value_head_dim\": 128,"
    " \"linear_conv_kernel_dim\": 4, \"full_attention_interval\": 4,"
    " \"num_experts\": 512, \"num_experts_per_tok\": 10, \"moe_intermediate_size\": 512,"
    " \"shared_expert_intermediate_size\": 512, \"decoder_sparse_step\": 1,"
    " \"mlp_only_layers\": [5], \"norm_topk_prob\": true, \"tie_word_embeddings\": false,"
    " \"bos_token_id\": 151643, \"eos_token_id\": 151645, \"rope_scaling\": null,"
    " \"quantization\": {\"group_size\": 64, \"bits\": 4,"
    "   \"model.layers.0.mlp.gate\": {\"group_size\": 64, \"bits\": 8}, \"lm_head\": false}}";

// Cogito-V2 / DeepSeek-V3 style: MLA keys, noaux_tc, yarn with "type".
static const char *const DEEPSEEK =
    "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\","
    " \"vocab_size\": 128815, \"hidden_size\": 7168, \"intermediate_size\": 18432,"
    " \"moe_intermediate_size\": 2048, \"num_hidden_layers\": 61,"
    " \"num_attention_heads\": 128, \"num_key_value_heads\": 128, \"q_lora_rank\": 1536,"
    " \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64,"
    " \"v_head_dim\": 128, \"n_routed_experts\": 256, \"num_experts_per_tok\": 8,"
    " \"n_shared_experts\": 1, \"n_group\": 8, \"topk_group\": 4,"
    " \"topk_method\": \"noaux_tc\", \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true,"
    " \"routed_scaling_factor\": 2.5, \"first_k_dense_replace\": 3, \"moe_layer_freq\": 1,"
    " \"rms_norm_eps\": 1e-06, \"rope_theta\": 10000, \"max_position_embeddings\": 163840,"
    " \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40, \"original_max_position_embeddings\": 4096,"
    "   \"beta_fast\": 32, \"beta_slow\": 1, \"mscale\": 1.0, \"mscale_all_dim\": 1.0},"
    " \"bos_token_id\": 0, \"eos_token_id\": [1, 128009], \"tie_word_embeddings\": false,"
    " \"quantization\": {\"group_size\": 64, \"bits\": 4}}";

// Qwen3-30B-A3B style.
static const char *const QWEN3_MOE =
    "{\"architectures\": [\"Qwen3MoeForCausalLM\"], \"model_type\": \"qwen3_moe\","
    " \"hidden_size\": 2048, \"num_hidden_layers\": 48, \"num_attention_heads\": 32,"
    " \"num_key_value_heads\": 4, \"head_dim\": 128, \"intermediate_size\": 6144,"
    " \"vocab_size\": 151936, \"max_position_embeddings\": 40960, \"rms_norm_eps\": 1e-06,"
    " \"rope_theta\": 1000000.0, \"num_experts\": 128, \"num_experts_per_tok\": 8,"
    " \"moe_intermediate_size\": 768, \"decoder_sparse_step\": 1, \"mlp_only_layers\": [],"
    " \"norm_topk_prob\": true, \"tie_word_embeddings\": false, \"bos_token_id\": 151643,"
    " \"eos_token_id\": 151645,"
    " \"quantization\": {\"group_size\": 64, \"bits\": 4, \"mode\": \"affine\"}}";

// GLM-4.5's shapes (its config.json keys, with the MTP layer count it also carries).
static const char *const GLM45 =
    "{\"model_type\": \"glm4_moe\", \"hidden_size\": 5120, \"num_hidden_layers\": 92,"
    " \"num_attention_heads\": 96, \"num_key_value_heads\": 8, \"head_dim\": 128,"
    " \"vocab_size\": 151552, \"max_position_embeddings\": 131072,"
    " \"rms_norm_eps\": 1e-05, \"rope_theta\": 1000000, \"rope_scaling\": null,"
    " \"partial_rotary_factor\": 0.5, \"intermediate_size\": 12288,"
    " \"moe_intermediate_size\": 1536, \"n_routed_experts\": 160,"
    " \"num_experts_per_tok\": 8, \"n_shared_experts\": 1, \"n_group\": 1,"
    " \"topk_group\": 1, \"routed_scaling_factor\": 2.5, \"norm_topk_prob\": true,"
    " \"first_k_dense_replace\": 3, \"use_qk_norm\": false, \"attention_bias\": true,"
    " \"num_nextn_predict_layers\": 1, \"tie_word_embeddings\": false,"
    " \"eos_token_id\": [151329, 151336, 151338], \"quantization\": {\"bits\": 4,"
    " \"group_size\": 64}}";

// gpt-oss-120b's shapes (its config.json keys, mlx-community MXFP4-Q8 quantization
// block), 4 of its 36 layers.
static const char *const GPTOSS =
    "{\"model_type\": \"gpt_oss\", \"architectures\": [\"GptOssForCausalLM\"],"
    " \"hidden_size\": 2880, \"num_hidden_layers\": 4, \"num_attention_heads\": 64,"
    " \"num_key_value_heads\": 8, \"head_dim\": 64, \"vocab_size\": 201088,"
    " \"intermediate_size\": 2880, \"num_local_experts\": 128,"
    " \"num_experts_per_tok\": 4, \"experts_per_token\": 4, \"rms_norm_eps\": 1e-05,"
    " \"sliding_window\": 128, \"rope_theta\": 150000, \"swiglu_limit\": 7.0,"
    " \"max_position_embeddings\": 131072,"
    " \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 32.0, \"beta_fast\": 32.0,"
    "   \"beta_slow\": 1.0, \"truncate\": false, \"original_max_position_embeddings\": 4096},"
    " \"layer_types\": [\"sliding_attention\", \"full_attention\", \"sliding_attention\","
    "   \"full_attention\"], \"tie_word_embeddings\": false, \"eos_token_id\": 200002,"
    " \"quantization\": {\"group_size\": 64, \"bits\": 8, \"mode\": \"affine\","
    "   \"model.layers.0.mlp.experts.gate_proj\": {\"group_size\": 32, \"bits\": 4,"
    "     \"mode\": \"mxfp4\"}}}";

// MiniMax-M2's shapes (its config.json keys: Hugging Face's model_type minimax_m2,
// which mlx-lm runs as minimax).
static const char *const MINIMAX_M2 =
    "{\"model_type\": \"minimax_m2\", \"architectures\": [\"MiniMaxM2ForCausalLM\"],"
    " \"hidden_size\": 3072, \"num_hidden_layers\": 62, \"num_attention_heads\": 48,"
    " \"num_key_value_heads\": 8, \"head_dim\": 128, \"rotary_dim\": 64,"
    " \"partial_rotary_factor\": 0.5, \"vocab_size\": 200064,"
    " \"max_position_embeddings\": 196608, \"rms_norm_eps\": 1e-06,"
    " \"rope_theta\": 5000000, \"intermediate_size\": 1536,"
    " \"num_local_experts\": 256, \"num_experts_per_tok\": 8,"
    " \"shared_intermediate_size\": 0, \"scoring_func\": \"sigmoid\","
    " \"use_routing_bias\": true, \"use_qk_norm\": true, \"qk_norm_type\": \"per_layer\","
    " \"tie_word_embeddings\": false, \"quantization\": {\"group_size\": 64, \"bits\": 4,"
    "   \"model.layers.0.block_sparse_moe.gate\": {\"group_size\": 64, \"bits\": 8}}}";

static int parse(struct mf_config *c, const char *text, char *err, size_t errlen) {
    return mf_config_parse(c, text, strlen(text), "cfg.json", err, errlen);
}

static void test_qwen35(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, QWEN35, err, sizeof err);
    CHECK(rc == MF_OK, "qwen3_5_moe: %s", err);
    if (rc)
        return;
    CHECK(c.arch == MF_ARCH_QWEN3_5_MOE && strcmp(c.model_type, "qwen3_5_moe") == 0,
          "top-level model_type wins over text_config's");
    CHECK(c.hidden_size == 2048 && c.num_hidden_layers == 40 && c.head_dim == 256 &&
              c.num_key_value_heads == 2 && c.vocab_size == 248320,
          "text_config keys read");
    CHECK(c.rope_theta == 1e7 && c.partial_rotary_factor == 0.25,
          "rope_parameters read: %g %g", c.rope_theta, c.partial_rotary_factor);
    CHECK(c.norm_topk_prob == 1, "qwen3_5 default norm_topk_prob is true");
    const struct qwen3_next_config *qc = c.arch_cfg;
    CHECK(qc->linear_num_value_heads == 32 && qc->linear_num_key_heads == 16 &&
              qc->linear_conv_kernel_dim == 4,
          "linear attention keys");
    CHECK(c.eos_token_id == 248044 && c.bos_token_id == -1, "eos from text_config, no bos");
    CHECK(c.n_moe_layers == 40, "every layer MoE (%d)", c.n_moe_layers);
    int ok = 1;
    for (int i = 0; i < 40; i++)
        ok &= c.layer_is_linear[i] == ((i + 1) % 4 != 0) && c.layer_is_moe[i] == 1;
    CHECK(ok, "layers 3, 7, ... full attention, others linear");
    int bits, gs;
    CHECK(mf_config_quant_for(&c, "model.layers.0.mlp.gate", &bits, &gs) == 1 && bits == 8 &&
              gs == 64,
          "override matched through the language_model. prefix");
    CHECK(mf_config_quant_for(&c, "language_model.model.layers.0.mlp.gate", &bits, &gs) == 1 &&
              bits == 8,
          "override matched with the full key");
    CHECK(mf_config_quant_for(&c, "model.layers.10.mlp.gate", &bits, &gs) == 1 && bits == 4,
          "layer 10 router not overridden (no prefix confusion of 0 vs 10)");
    CHECK(mf_config_quant_for(&c, "layers.0.mlp.gate", &bits, &gs) == 1 && bits == 8,
          "dotted suffix match");
    CHECK(mf_config_quant_for(&c, "ers.0.mlp.gate", &bits, &gs) == 1 && bits == 4,
          "suffix must start at a dot");
    CHECK(c.json_text && strcmp(c.json_text, QWEN35) == 0, "text kept");
    mf_config_free(&c);
}

static void test_qwen3_next(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, QWEN3_NEXT, err, sizeof err);
    CHECK(rc == MF_OK, "qwen3_next: %s", err);
    if (rc)
        return;
    CHECK(c.arch == MF_ARCH_QWEN3_NEXT && c.rope_theta == 1e7 &&
              c.partial_rotary_factor == 0.25 && c.intermediate_size == 5120,
          "flat keys");
    CHECK(c.n_moe_layers == 47 && c.layer_is_moe[5] == 0 && c.layer_is_moe[4] == 1,
          "mlp_only_layers [5] is dense");
    CHECK(c.layer_is_linear[3] == 0 && c.layer_is_linear[0] == 1, "hybrid pattern");
    CHECK(c.bos_token_id == 151643 && c.eos_token_id == 151645, "token ids");
    int bits, gs;
    CHECK(mf_config_quant_for(&c, "lm_head", &bits, &gs) == 0, "lm_head: false is float");
    CHECK(mf_config_quant_for(&c, "model.layers.0.mlp.gate", &bits, &gs) == 1 && bits == 8,
          "8-bit router");
    mf_config_free(&c);

    // decoder_sparse_step 2: only odd layers (i+1 even) are MoE.
    char *t = strdup(QWEN3_NEXT);
    char *p = strstr(t, "\"decoder_sparse_step\": 1");
    p[strlen("\"decoder_sparse_step\": ")] = '2';
    rc = parse(&c, t, err, sizeof err);
    CHECK(rc == MF_OK && c.layer_is_moe[0] == 0 && c.layer_is_moe[1] == 1 &&
              c.layer_is_moe[5] == 0 && c.layer_is_moe[7] == 1 && c.n_moe_layers == 23,
          "decoder_sparse_step 2 (%d MoE)", c.n_moe_layers);
    mf_config_free(&c);
    free(t);
}

static void test_deepseek(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, DEEPSEEK, err, sizeof err);
    CHECK(rc == MF_OK, "deepseek_v3: %s", err);
    if (rc)
        return;
    const struct deepseek_v3_config *d = DS(c);
    CHECK(c.arch == MF_ARCH_DEEPSEEK_V3 && c.num_experts == 256 && d->q_lora_rank == 1536 &&
              d->kv_lora_rank == 512 && d->qk_rope_head_dim == 64 && d->v_head_dim == 128,
          "MLA keys");
    CHECK(d->noaux.n_group == 8 && d->noaux.topk_group == 4 &&
              d->noaux.routed_scaling_factor == 2.5 && d->noaux.n_shared_experts == 1 &&
              c.norm_topk_prob == 1,
          "router keys");
    CHECK(d->yarn.on && d->yarn.factor == 40 && d->yarn.orig_max_pos == 4096 &&
              d->yarn.beta_fast == 32 && d->yarn.beta_slow == 1 && d->yarn.mscale == 1 &&
              d->yarn.mscale_all_dim == 1,
          "yarn block");
    CHECK(c.eos_token_id == 1 && c.bos_token_id == 0, "eos list -> first id");
    CHECK(c.n_moe_layers == 58 && !c.layer_is_moe[2] && c.layer_is_moe[3] && c.layer_is_moe[60],
          "first 3 layers dense");
    CHECK(c.layer_is_linear[10] == 0, "no linear attention");
    mf_config_free(&c);

    // q_lora_rank null -> 0, rope_type spelling, moe_layer_freq 2.
    {
        char t[4096];
        const char *a = strstr(DEEPSEEK, "\"q_lora_rank\": 1536");
        const char *b = strstr(DEEPSEEK, "\"type\": \"yarn\"");
        const char *f = strstr(DEEPSEEK, "\"moe_layer_freq\": 1");
        snprintf(t, sizeof t, "%.*s\"q_lora_rank\": null%.*s\"moe_layer_freq\": 2%.*s"
                 "\"rope_type\": \"yarn\"%s",
                 (int)(a - DEEPSEEK), DEEPSEEK, (int)(f - (a + 19)), a + 19,
                 (int)(b - (f + 19)), f + 19, b + 14);
        rc = parse(&c, t, err, sizeof err);
        CHECK(rc == MF_OK, "deepseek variant: %s", err);
        if (!rc) {
            CHECK(DS(c)->q_lora_rank == 0, "q_lora_rank null -> 0");
            CHECK(DS(c)->yarn.on, "rope_type spelling accepted");
            CHECK(c.layer_is_moe[3] == 0 && c.layer_is_moe[4] == 1 && c.layer_is_moe[5] == 0,
                  "moe_layer_freq 2: even layers from 3 on");
            mf_config_free(&c);
        }
    }
}

static void test_kimi_alias(void) {
    char t[4096];
    const char *p = strstr(DEEPSEEK, "\"deepseek_v3\"");
    snprintf(t, sizeof t, "%.*s\"kimi_k2\"%s", (int)(p - DEEPSEEK), DEEPSEEK,
             p + strlen("\"deepseek_v3\""));
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, t, err, sizeof err);
    CHECK(rc == MF_OK && c.arch == MF_ARCH_DEEPSEEK_V3 && strcmp(c.model_type, "kimi_k2") == 0,
          "kimi_k2 runs as deepseek_v3 (mlx-lm remapping): %s", err);
    if (!rc)
        mf_config_free(&c);
}

static void test_qwen3_moe(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, QWEN3_MOE, err, sizeof err);
    CHECK(rc == MF_OK, "qwen3_moe: %s", err);
    if (rc)
        return;
    CHECK(c.arch == MF_ARCH_QWEN3_MOE && c.head_dim == 128 && c.rope_theta == 1e6 &&
              c.partial_rotary_factor == 1.0 && c.n_moe_layers == 48 && c.norm_topk_prob,
          "qwen3_moe keys");
    CHECK(c.layer_is_linear[3] == 0, "no linear attention");
    int bits, gs;
    CHECK(mf_config_quant_for(&c, "model.layers.0.mlp.gate", &bits, &gs) == 1 && bits == 4 &&
              gs == 64,
          "no override: defaults");
    mf_config_free(&c);
}

// text with the first occurrence of `from` replaced by `to`.
static char *edit(const char *text, const char *from, const char *to) {
    const char *p = strstr(text, from);
    if (!p)
        return NULL;
    size_t n = strlen(text) - strlen(from) + strlen(to) + 1;
    char *out = malloc(n);
    if (!out)
        return NULL;
    snprintf(out, n, "%.*s%s%s", (int)(p - text), text, to, p + strlen(from));
    return out;
}

static void expect_error(const char *base, const char *from, const char *to, int status,
                         const char *needle) {
    char *t = edit(base, from, to);
    CHECK(t != NULL, "edit target '%s' not found", from);
    if (!t)
        return;
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, t, err, sizeof err);
    CHECK(rc == status, "%s -> %s: status %d, expected %d (%s)", from, to, rc, status, err);
    CHECK(strstr(err, needle) != NULL, "%s -> %s: message '%s' lacks '%s'", from, to, err,
          needle);
    CHECK(strstr(err, "cfg.json") != NULL, "message names the file: %s", err);
    if (rc == MF_OK)
        mf_config_free(&c);
    free(t);
}

// A family added after the registry (models/glm4_moe.c): its reader is reached by
// model_type and derives its layer kinds; core's shared keys as for the others.
static void test_glm4_moe(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, GLM45, err, sizeof err);
    CHECK(rc == MF_OK, "glm4_moe: %s", err);
    if (rc)
        return;
    CHECK(strcmp(c.model_type, "glm4_moe") == 0 && c.family && c.arch_cfg &&
              c.num_experts == 160 && c.head_dim == 128 && c.num_key_value_heads == 8 &&
              c.partial_rotary_factor == 0.5 && c.norm_topk_prob == 1,
          "glm4_moe shared keys");
    CHECK(c.n_moe_layers == 89 && !c.layer_is_moe[2] && c.layer_is_moe[3] &&
              c.layer_is_moe[91] && !c.layer_is_linear[50],
          "first 3 layers dense, no linear attention");
    CHECK(c.eos_token_id == 151329, "eos list -> first id");
    mf_config_free(&c);
    expect_error(GLM45, "\"n_group\": 1", "\"n_group\": 3", MF_ERR_FORMAT,
                 "multiple of n_group");
    expect_error(GLM45, "\"use_qk_norm\": false", "\"use_qk_norm\": 2", MF_ERR_FORMAT,
                 "use_qk_norm");
    expect_error(GLM45, "\"partial_rotary_factor\": 0.5",
                 "\"partial_rotary_factor\": 0.01", MF_ERR_FORMAT, "rotated dims");
}

// At open, before any weight: a backend without attention_ext is refused by the family
// with the reason (a backend that lacks the optional op, tested without a GPU).
static void gptoss_bind_refusal(const struct mf_config *c) {
    struct mf_backend *cpu = NULL;
    char err[512] = "";
    if (mf_backend_cpu_new(&cpu, err, sizeof err) != MF_OK) {
        CHECK(0, "cpu backend: %s", err);
        return;
    }
    struct mf_backend_ops ops = *cpu->ops;
    ops.name = "cuda";
    ops.attention_ext = NULL;
    struct mf_backend fake = {.ops = &ops, .impl = cpu->impl};
    mf_model m;
    memset(&m, 0, sizeof m);
    m.cfg = *c;
    m.be = &fake;
    int rc = c->family->bind(&m, err, sizeof err);
    CHECK(rc == MF_ERR_UNSUPPORTED && strstr(err, "backend 'cuda'") &&
              strstr(err, "attention_ext"),
          "gpt_oss on a backend without attention_ext: %d %s", rc, err);
    CHECK(m.arch_weights == NULL, "nothing bound");
    cpu->ops->free(cpu);
}

// gpt_oss (models/gpt_oss.c): expert count and width under its own keys, every layer
// MoE, mxfp4 expert overrides taken; layer_types and rope_scaling checked.
static void test_gpt_oss(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, GPTOSS, err, sizeof err);
    CHECK(rc == MF_OK, "gpt_oss: %s", err);
    if (rc)
        return;
    CHECK(c.num_experts == 128 && c.moe_intermediate_size == 2880 && c.n_moe_layers == 4 &&
              c.num_experts_per_tok == 4 && c.head_dim == 64 && c.rope_theta == 150000,
          "gpt_oss shared keys: experts %d width %d moe layers %d", c.num_experts,
          c.moe_intermediate_size, c.n_moe_layers);
    gptoss_bind_refusal(&c);
    mf_config_free(&c);
    expect_error(GPTOSS, "\"full_attention\"], ", "\"full_attention\", \"full_attention\"], ",
                 MF_ERR_FORMAT, "layer_types must list num_hidden_layers (4)");
    expect_error(GPTOSS, "\"full_attention\"], ", "\"local\"], ", MF_ERR_FORMAT,
                 "layer_types[3]");
    expect_error(GPTOSS, "\"rope_type\": \"yarn\"", "\"rope_type\": \"linear\"",
                 MF_ERR_UNSUPPORTED, "linear");
    expect_error(GPTOSS, "\"intermediate_size\": 2880", "\"intermediate_size\": 0",
                 MF_ERR_FORMAT, "intermediate_size");
    expect_error(GPTOSS, "\"sliding_window\": 128", "\"sliding_window\": 0", MF_ERR_FORMAT,
                 "sliding_window");
    expect_error(GPTOSS, "\"bits\": 8, \"mode\": \"affine\"", "\"bits\": 8, \"mode\": \"mxfp4\"",
                 MF_ERR_FORMAT, "mxfp4");
}

// minimax (models/minimax.c), reached through its alias: experts and their width under
// its own keys, every layer MoE, renormalised routing; rotary_dim and top-1 checked.
static void test_minimax(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse(&c, MINIMAX_M2, err, sizeof err);
    CHECK(rc == MF_OK, "minimax: %s", err);
    if (rc)
        return;
    CHECK(strcmp(c.family->model_type, "minimax") == 0 && c.num_experts == 256 &&
              c.moe_intermediate_size == 1536 && c.n_moe_layers == 62 &&
              c.num_experts_per_tok == 8 && c.head_dim == 128 && c.norm_topk_prob == 1,
          "minimax shared keys: experts %d width %d moe layers %d", c.num_experts,
          c.moe_intermediate_size, c.n_moe_layers);
    mf_config_free(&c);
    expect_error(MINIMAX_M2, "\"rotary_dim\": 64,", "", MF_ERR_FORMAT, "rotary_dim");
    expect_error(MINIMAX_M2, "\"rotary_dim\": 64", "\"rotary_dim\": 130", MF_ERR_FORMAT,
                 "rotary_dim must be even");
    expect_error(MINIMAX_M2, "\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 1",
                 MF_ERR_UNSUPPORTED, "num_experts_per_tok 1");
    expect_error(MINIMAX_M2, "\"num_local_experts\": 256", "\"num_local_experts\": 0",
                 MF_ERR_FORMAT, "num_local_experts");
    expect_error(MINIMAX_M2, "\"use_qk_norm\": true", "\"use_qk_norm\": 2", MF_ERR_FORMAT,
                 "use_qk_norm");
}

static void test_errors(void) {
    expect_error(QWEN3_MOE, "\"qwen3_moe\"", "\"llama\"", MF_ERR_FORMAT, "llama");
    expect_error(QWEN3_MOE, "\"qwen3_moe\"", "\"llama\"", MF_ERR_FORMAT, "qwen3_next");
    expect_error(QWEN3_MOE, "\"model_type\": \"qwen3_moe\",", "", MF_ERR_FORMAT, "model_type");
    expect_error(QWEN3_MOE, "\"mode\": \"affine\"", "\"mode\": \"mxfp4\"", MF_ERR_FORMAT,
                 "mxfp4");
    expect_error(QWEN35, "{\"group_size\": 64, \"bits\": 8}", "{\"bits\": 4, \"mode\": \"nvfp4\"}",
                 MF_ERR_FORMAT, "nvfp4");
    expect_error(QWEN3_MOE, "\"bits\": 4", "\"bits\": 7", MF_ERR_FORMAT, "bits 7");
    expect_error(QWEN3_MOE, "\"group_size\": 64", "\"group_size\": 16", MF_ERR_FORMAT,
                 "group_size 16");
    expect_error(QWEN3_MOE, "\"hidden_size\": 2048,", "", MF_ERR_FORMAT, "hidden_size");
    expect_error(QWEN3_MOE, "\"hidden_size\": 2048", "\"hidden_size\": 0", MF_ERR_FORMAT,
                 "hidden_size");
    expect_error(QWEN3_MOE, "\"hidden_size\": 2048", "\"hidden_size\": \"2048\"",
                 MF_ERR_FORMAT, "hidden_size");
    expect_error(QWEN3_MOE, "\"hidden_size\": 2048", "\"hidden_size\": 2048.5",
                 MF_ERR_FORMAT, "hidden_size");
    expect_error(QWEN3_MOE, "\"num_key_value_heads\": 4", "\"num_key_value_heads\": 5",
                 MF_ERR_FORMAT, "num_key_value_heads");
    expect_error(QWEN3_MOE, "\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 129",
                 MF_ERR_FORMAT, "num_experts_per_tok");
    expect_error(QWEN3_MOE, "\"vocab_size\": 151936,", "", MF_ERR_FORMAT, "vocab_size");
    expect_error(QWEN3_MOE, "\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": -1",
                 MF_ERR_FORMAT, "rms_norm_eps");
    expect_error(QWEN3_MOE, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [48]",
                 MF_ERR_FORMAT, "mlp_only_layers");
    expect_error(QWEN3_MOE, "\"eos_token_id\": 151645", "\"eos_token_id\": \"x\"",
                 MF_ERR_FORMAT, "eos_token_id");
    expect_error(QWEN3_NEXT, "\"linear_num_value_heads\": 32", "\"linear_num_value_heads\": 24",
                 MF_ERR_FORMAT, "linear_num_value_heads");
    expect_error(QWEN3_NEXT, "\"linear_key_head_dim\": 128,", "", MF_ERR_FORMAT,
                 "linear_key_head_dim");
    expect_error(QWEN3_NEXT, "\"intermediate_size\": 5120,", "", MF_ERR_FORMAT,
                 "intermediate_size");
    expect_error(QWEN3_NEXT, "\"partial_rotary_factor\": 0.25", "\"partial_rotary_factor\": 2",
                 MF_ERR_FORMAT, "partial_rotary_factor");
    expect_error(QWEN35, "\"text_config\": {", "\"text_config\": 3, \"x\": {", MF_ERR_FORMAT,
                 "text_config");
    expect_error(DEEPSEEK, "\"kv_lora_rank\": 512,", "", MF_ERR_FORMAT, "kv_lora_rank");
    expect_error(DEEPSEEK, "\"n_group\": 8", "\"n_group\": 7", MF_ERR_FORMAT, "n_group");
    expect_error(DEEPSEEK, "\"original_max_position_embeddings\": 4096,", "", MF_ERR_FORMAT,
                 "original_max_position_embeddings");
    expect_error(DEEPSEEK, "\"qk_rope_head_dim\": 64", "\"qk_rope_head_dim\": 63",
                 MF_ERR_FORMAT, "qk_rope_head_dim");
    expect_error(QWEN3_MOE, "\"rope_theta\": 1000000.0,", "\"rope_theta\": 1,\"rope_theta\": 2,",
                 MF_ERR_FORMAT, "duplicate key");
    expect_error(QWEN3_MOE, "}}", "}", MF_ERR_FORMAT, "byte");

    struct mf_config c;
    char err[256];
    CHECK(mf_config_parse(&c, "[1]", 3, "cfg.json", err, sizeof err) == MF_ERR_FORMAT,
          "top level must be an object");
    CHECK(mf_config_load(&c, "/nonexistent/config.json", err, sizeof err) == MF_ERR_IO &&
              strstr(err, "/nonexistent/config.json"),
          "missing file: MF_ERR_IO naming it (%s)", err);
}

/* ==== Fuzzer: mutated configs never crash or leak ==== */

static void test_fuzz(void) {
    uint64_t rng = 0x243f6a8885a308d3ull;
    const char *const seeds[] = {QWEN35, QWEN3_NEXT, DEEPSEEK, QWEN3_MOE};
    static const char digits[] = "0123456789-.e[]{}\",:ntf";
    int n_ok = 0;
    for (int it = 0; it < 6000; it++) {
        const char *seed = seeds[check_rand(&rng) % 4];
        size_t len = strlen(seed);
        char *t = malloc(len + 1);
        if (!t)
            continue;
        memcpy(t, seed, len + 1);
        int n_mut = 1 + (int)(check_rand(&rng) % 3);
        for (int k = 0; k < n_mut && len > 0; k++) {
            size_t pos = check_rand(&rng) % len;
            if (check_rand(&rng) % 4 == 0)
                len = pos;   // truncate
            else
                t[pos] = digits[check_rand(&rng) % (sizeof digits - 1)];
        }
        struct mf_config c;
        char err[256];
        int rc = mf_config_parse(&c, t, len, "fuzz.json", err, sizeof err);
        CHECK(rc == MF_OK || rc == MF_ERR_FORMAT, "fuzz: status %d", rc);
        if (rc == MF_OK) {
            n_ok++;
            CHECK(c.num_hidden_layers > 0 && c.layer_is_moe && c.layer_is_linear,
                  "accepted config has layer tables");
            mf_config_free(&c);
        }
        free(t);
    }
    CHECK(n_ok > 10, "fuzzer produced some valid configs (%d)", n_ok);
}

int main(void) {
    test_qwen35();
    test_qwen3_next();
    test_deepseek();
    test_kimi_alias();
    test_qwen3_moe();
    test_glm4_moe();
    test_gpt_oss();
    test_minimax();
    test_errors();
    test_fuzz();
    return check_finish("test_config");
}
