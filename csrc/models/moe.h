/*
 * moe.h — the blocks every architecture shares: the routed-expert MoE FFN (router,
 * expert reads from the expert store, SwiGLU experts, optional shared expert) and the
 * dense SwiGLU FFN. Written once against the backend op table; the forward files of
 * qwen3_5_moe / qwen3_next, deepseek_v3 and qwen3_moe call these instead of repeating
 * them.
 *
 * Prefill reads each routed expert once per call: tokens are grouped by expert, the
 * expert's rows are gathered, run as one small matrix-matrix product, and
 * scatter-added back with their routing weights.
 */
#ifndef MF_MOE_H
#define MF_MOE_H

#include "core/internal.h"

enum mf_router_kind {
    MF_ROUTER_SOFTMAX = 0,    // qwen: p = softmax(logits); top-k; renormalise if
                              // norm_topk_prob (model-math §2.6)
    MF_ROUTER_NOAUX_TC = 1,   // deepseek_v3: sigmoid scores, correction bias for
                              // choosing only, group top-2 sums, topk_group groups,
                              // unbiased weights renormalised x routed_scaling_factor
                              // (model-math §3.5)
    MF_ROUTER_TOPK_SOFTMAX = 2,  // gpt_oss: logits + the router's linear bias; top-k;
                                 // softmax over the k chosen
};

// Experts per MoE layer this build handles (the CPU router's scratch).
#define MF_MOE_MAX_EXPERTS 4096

struct mf_moe_config {
    enum mf_router_kind router;
    int n_embd;               // hidden_size
    int n_expert;             // num_experts / n_routed_experts
    int n_expert_used;        // num_experts_per_tok
    int n_ff_exp;             // moe_intermediate_size
    int n_ff_shexp;           // shared expert width (0 = none)
    int norm_topk_prob;
    int n_group;              // noaux_tc
    int topk_group;           // noaux_tc
    float routed_scaling_factor;  // noaux_tc (1 for softmax routers)
    enum mf_moe_act act;      // the experts' activation (0: SwiGLU)
    float act_alpha, act_limit;   // MF_MOE_ACT_SWIGLU_CLAMPED (gpt_oss)
};

// Bound weights of one MoE FFN layer.
struct mf_moe_layer {
    int il;                          // model layer index (selects the expert file)
    struct mf_weight router;         // mlp.gate [n_expert, n_embd], float or quantized
    struct mf_weight router_bias;    // [n_expert] f32: noaux_tc's e_score_correction_bias,
                                     // topk_softmax's router linear bias; w NULL if none
    int has_shared;
    struct mf_weight shared_gate;    // [n_ff_shexp, n_embd]
    struct mf_weight shared_up;      // [n_ff_shexp, n_embd]
    struct mf_weight shared_down;    // [n_embd, n_ff_shexp]
    int has_shared_gate;             // qwen hybrid: sigmoid(shared_expert_gate(x)) scale
    struct mf_weight shared_expert_gate;  // [1, n_embd]
};

// Dense SwiGLU FFN weights: y = down(silu(gate x) * up x).
struct mf_ffn_layer {
    struct mf_weight gate;   // [n_ff, n_embd]
    struct mf_weight up;     // [n_ff, n_embd]
    struct mf_weight down;   // [n_embd, n_ff]
};

struct mf_moe_scratch;

// The expert views of one MoE layer, pointers byte offsets inside a blob: gate, up,
// down (each at its own format: affine at its bits / group size, or float) and the
// per-expert output biases bias[0..2] of gate, up, down where has_bias is set.
struct mf_moe_views {
    struct mf_weight gate, up, down;
    struct mf_weight bias[3];
    int has_bias[3];
    enum mf_moe_act act;             // from mf_moe_config (mf_moe_scratch_new)
    float act_alpha, act_limit;
};

// Views of layer il's experts from the store's layout, checked against n_embd / n_ff
// (MF_ERR_SHAPE naming the layer and projection; MF_ERR_FORMAT when the projections
// are not gate_proj + up_proj or gate_up_proj, plus down_proj).
int mf_moe_layer_views(const mf_expert_store *st, int il, int n_embd, int n_ff,
                       struct mf_moe_views *v, char *err, size_t errlen);
// A batch whose gate/up/down and biases point into v (n and the arrays left 0).
struct mf_moe_batch mf_moe_views_batch(const struct mf_moe_views *v);
// At model open: every MoE layer's views, and the backend's moe_experts_check on
// them (a GPU backend refuses formats its kernels do not take: MF_ERR_UNSUPPORTED).
int mf_moe_check_experts(const mf_model *m, int n_embd, int n_ff, char *err,
                         size_t errlen);

// Scratch for up to max_tok tokens per call, allocated through ctx->be/ctx->ex.
int mf_moe_scratch_new(mf_ctx *ctx, const struct mf_moe_config *c, int max_tok,
                       struct mf_moe_scratch **out, char *err, size_t errlen);
void mf_moe_scratch_free(mf_ctx *ctx, struct mf_moe_scratch *s);
// Make the scratch hold max_tok tokens per call (a prefill group; no-op when it
// already does). MF_ERR_NOMEM leaves it as it was.
int mf_moe_scratch_reserve(mf_ctx *ctx, struct mf_moe_scratch *s,
                           const struct mf_moe_config *c, int max_tok, char *err,
                           size_t errlen);

// The block's input norm when the router's call takes it: x = rmsnorm(resid) * g (eps)
// is written by that call (mf_rms_matmul_multi). g NULL (or no struct): x is given.
struct mf_moe_norm {
    const struct mf_weight *g;
    float eps;
};

// y[n_tok, n_embd] = MoE(x[n_tok, n_embd]) (y is overwritten, must not alias x); then,
// when resid is not NULL, resid += y with flag[0] = 1 where a sum is NaN or infinite
// (flag is required with resid; mf_axpy_flag's bits; the resident device-routed path
// does it in the experts' last launch). With in->g, x is written first (struct
// mf_moe_norm; resid required). Returns MF_OK, or MF_ERR_IO with ctx->errmsg set when
// an expert read fails (resid then untouched). Adds to ctx->stats (expert reads, bytes,
// read seconds).
int mf_moe_forward(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                   const struct mf_moe_layer *w, float *y, float *x, int n_tok,
                   float *resid, int32_t *flag, const struct mf_moe_norm *in);

// y[n_tok, n_embd] = dense SwiGLU FFN of x; tmp holds [n_tok, 2 * n_ff] floats.
void mf_ffn_forward(mf_ctx *ctx, float *y, float *tmp, const struct mf_ffn_layer *w,
                    const float *x, int n_tok, int n_ff);

// Bind helpers (load time): the shared/dense weights under a module prefix, e.g.
// "model.layers.3.mlp.shared_expert" -> gate_proj/up_proj/down_proj.
int mf_ffn_bind(const mf_model *m, struct mf_ffn_layer *out, const char *prefix,
                int n_embd, int n_ff, char *err, size_t errlen);

#endif /* MF_MOE_H */
