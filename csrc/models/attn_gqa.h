/*
 * attn_gqa.h — grouped-query attention with a KV cache, the block qwen3_moe and
 * glm4_moe and minimax share (model-math §4): q/k/v projections (optional biases),
 * optional RMSNorm of q and k (plain gains; per head, or over all of a token's heads
 * at once as minimax's), rotary with rotate-half pairs over the
 * first n_rot dims of each head (partial rotary when n_rot < head_dim), causal
 * attention over the cache, o_proj. Also the plain rope frequency table and the
 * state boilerplate (a KEY and a VALUE segment per layer, chunk scratch), and the
 * per-ctx state of a decoder made only of such layers.
 */
#ifndef MF_ATTN_GQA_H
#define MF_ATTN_GQA_H

#include "core/internal.h"
#include "models/decoder.h"

struct mf_gqa_dims {
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;
    int n_rot;          // rotated dims per head (even, <= head_dim)
    float eps;          // q/k norm eps (rms_norm_eps)
    int qk_norm_full;   // q/k norms span each token's heads x head_dim (minimax's
                        // q_norm [H*D], k_norm [Hkv*D]); 0: per head, [head_dim]
    float scale;        // head_dim^-1/2
};

struct mf_gqa_layer {
    struct mf_weight q_proj, k_proj, v_proj, o_proj;
    struct mf_weight q_norm, k_norm;      // [head_dim]; w NULL when the family has none
    struct mf_weight q_bias, k_bias, v_bias;  // f32; w NULL without attention_bias
};

// Per ctx: every layer's KV cache and one chunk's scratch (device memory).
struct mf_gqa_state {
    float **k_cache;    // [n_layer] -> [n_ctx, Hkv, D] roped (normed) keys
    float **v_cache;    // [n_layer] -> [n_ctx, Hkv, D]
    float *inv_freq;    // [n_rot/2]
    float *q;           // [T, H, D]
    float *attn;        // [T, H, D] attention output
    float *bias_rows;   // [T, H*D] a bias repeated per token; NULL without biases
    int32_t *zero_idx;  // [T] host zeros (gather index of bias_rows)
};

// inv_freq[j] = theta^(-2j/n_rot), j < n_rot/2 (mlx nn.RoPE, traditional=False).
void mf_rope_inv_freq_plain(float *inv_freq, int n_rot, double theta);

// Binds <prefix>.{q,k,v,o}_proj, and <prefix>.{q,k}_norm.weight when qk_norm (of
// head_dim, or of every head's dims when d->qk_norm_full), and
// <prefix>.{q,k,v}_proj.bias when bias (prefix e.g. "model.layers.3.self_attn").
int mf_gqa_bind(mf_model *m, struct mf_gqa_layer *L, const struct mf_gqa_dims *d,
                int n_embd, const char *prefix, int qk_norm, int bias, char *err,
                size_t errlen);

// KV caches for ctx->n_ctx positions and scratch for T tokens per chunk; uploads the
// n_rot/2 host frequencies. `with_bias`: scratch for the projection biases.
int mf_gqa_state_new(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                     int T, const float *inv_freq_host, int with_bias, const char *arch,
                     char *err, size_t errlen);
void mf_gqa_state_free(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d);
void mf_gqa_state_reset(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d);
// A KEY and a VALUE segment per layer (mf_arch.state_segments).
int mf_gqa_state_segments(const struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                          struct mf_state_seg *segs, int cap);

// A decoder whose layers are all GQA attention + FFN (qwen3_moe, glm4_moe, minimax): the
// per-ctx state (ctx->arch_state) is the decoder scratch and the KV caches, made, reset,
// snapshotted and freed alike. The family gives the attention dims, its host rope
// frequencies, whether q/k/v have biases, and its decoder (every field but max_tok,
// which becomes min(n_ctx, max_chunk)).
struct mf_gqa_decoder_state {
    struct mf_decoder dec;
    struct mf_gqa_state gqa;
};
int mf_gqa_decoder_new(mf_ctx *ctx, const struct mf_gqa_dims *d, const float *inv_freq_host,
                       int with_bias, struct mf_decoder dec, int max_chunk, const char *arch,
                       char *err, size_t errlen);
void mf_gqa_decoder_free(mf_ctx *ctx, const struct mf_gqa_dims *d);   // none made: no-op
void mf_gqa_decoder_reset(mf_ctx *ctx, const struct mf_gqa_dims *d);
int mf_gqa_decoder_segments(const mf_ctx *ctx, const struct mf_gqa_dims *d,
                            struct mf_state_seg *segs, int cap);
// The attention half of such a layer on the chunk in the decoder's x (n tokens at
// positions pos0..): x += Attn(RMSNorm(x) * norm) over hid values per token (the
// decoder's y the output projection's scratch; mf_decoder_ffn's r is then NULL).
void mf_gqa_decoder_attn(mf_ctx *ctx, const struct mf_gqa_dims *d,
                         const struct mf_gqa_layer *L, const struct mf_weight *norm,
                         float eps, int hid, int il, int n, int pos0);

// x[n, n_embd] += Attn(xn), xn = RMSNorm(x) * norm (written by the q/k/v products'
// call), for tokens at positions pos0 .. pos0+n-1 (y: the output projection's scratch,
// mf_matmul_add); writes their K/V cache rows of layer il.
void mf_gqa_forward(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                    const struct mf_gqa_layer *L, int il, float *y, float *xn, float *x,
                    const struct mf_weight *norm, float eps, int n, int pos0);

#endif /* MF_ATTN_GQA_H */
