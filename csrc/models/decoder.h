/*
 * decoder.h — the plumbing every decoder-only architecture shares: the scratch of one
 * forward chunk (residual stream, normed input, block output, FFN scratch, logits),
 * the chunked token loop (embed, layers with abort polls, final norm and head), and
 * the FFN half of a decoder layer (post-attention norm, routed MoE or dense SwiGLU,
 * residual add). An arch file fills a struct mf_decoder once per ctx and keeps its
 * own recipe for what differs: the attention / linear-attention block of a layer.
 *
 * Not here: anything that depends on the mixer (caches, recurrent state and its
 * commit), binding, config checks.
 */
#ifndef MF_DECODER_H
#define MF_DECODER_H

#include "models/moe.h"

// Intermediates keep their mlx-lm module path as tap name; the taps compile to nothing
// unless the build defines MF_TAP_ENABLED (MOEFLUX_TAP=1 at build time, `make tap`):
// then core/tap.c writes them to $MOEFLUX_TAP_DIR (tools/tap_diff.py compares them with
// the same points of mlx-lm).
#if defined(MF_TAP_ENABLED)
#define MF_TAP(ctx, fmt, il, buf, n) mf_tap((ctx), (fmt), (il), (buf), (int64_t)(n))
#else
#define MF_TAP(ctx, fmt, il, buf, n) ((void)0)
#endif

// Prefill groups. An eval of more than max_tok tokens runs in groups of up to this
// many tokens (a multiple of max_tok), layer-major: each layer's mixer runs chunk by
// chunk (max_tok rows, in order, so caches and recurrent state see the same sequence
// as a chunk-major run), then its MoE runs once over the whole group, so each routed
// expert is read once per group instead of once per 64-token chunk (a 512-token
// prompt read 6.8x its distinct expert bytes before). 512: the group of a 512-token
// prompt is the whole prompt; its scratch (MoE rows x K, residual streams) is about
// 100 MiB at Qwen3.6-35B-A3B shapes and 240 MiB at 397B's, allocated on the first
// prompt longer than max_tok. Not bitwise equal to running the same tokens chunk by
// chunk (an expert's row count, hence the CPU matmul path, changes); within the CPU
// tier (max |diff| 1.4e-5 on logits of scale 10, 600 tokens, tiny qwen3_5_moe).
#define MF_PREFILL_GROUP_TOK 512

// Rows of the final norm and head per block: the logits' scratch is [rows, n_vocab],
// which a GPU backend's 512-token chunks (backend.h prefill_chunk) would make 311 MB
// at a 151936-token vocabulary.
#define MF_HEAD_ROWS 64

// The residual stream of a prefill group and the deferred MoE of the layer in
// progress (decoder.c). Owned by the decoder; buffers grow on first use.
struct mf_prefill_group {
    int cap_tok;                     // rows the buffers hold (0: none yet)
    float *x, *xn, *y;               // [cap_tok, n_embd]: residual, MoE input, output
    int active;                      // a grouped layer is running: defer the MoE
    int row0;                        // group row of the chunk in dec->x
    const struct mf_moe_layer *moe;  // the deferred MoE layer (NULL: none yet)
};

// One decoder layer on the chunk in dec->x (updated in place): tokens at positions
// pos0 .. pos0+n-1; first_chunk is 1 for the first chunk of an eval call.
typedef int (*mf_layer_fn)(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

// Lives inside the arch state. The arch's state_new sets max_tok, the borrowed
// weights, moe_cfg and layer; mf_decoder_alloc fills the sizes from config.json and
// makes the scratch.
struct mf_decoder {
    int max_tok;                       // tokens per chunk: the scratch's row count
    int n_layer;                       // num_hidden_layers
    int n_embd;                        // hidden_size
    int n_vocab;                       // vocab_size
    int n_ff_dense;                    // intermediate_size; 0 when no layer is dense
    float norm_eps;                    // rms_norm_eps of the layer and final norms
    const struct mf_weight *embed;     // [n_vocab, n_embd], borrowed from the model
    const struct mf_weight *norm;      // final norm [n_embd], borrowed
    const struct mf_weight *head;      // [n_vocab, n_embd], borrowed (embed when tied)
    const struct mf_moe_config *moe_cfg;  // borrowed; used by MoE layers only
    mf_layer_fn layer;
    // scratch, device memory owned by the decoder (mf_decoder_alloc / _free)
    float *x;          // [max_tok, n_embd] residual stream
    float *xn;         // [max_tok, n_embd] normed input of a block
    float *y;          // [max_tok, n_embd] block output
    float *ffn_tmp;    // [max_tok, 2*n_ff_dense] (NULL when n_ff_dense == 0)
    float *logits;     // [min(max_tok, MF_HEAD_ROWS), n_vocab]
    int32_t *nonfinite;       // [n_layer + 1] device flags: layer output (or, last,
                              // the logits) had NaN/inf
    int32_t *nonfinite_host;  // [n_layer + 1] host copy, read once per eval
    struct mf_moe_scratch *moe;
    struct mf_prefill_group *group;    // NULL when no layer is MoE
};

// A zero-filled device buffer of n floats (at least one); sets *fail on OOM and
// returns NULL, so a constructor can make many and check once.
float *mf_dev_floats(mf_ctx *ctx, size_t n, int *fail);

// Tokens per chunk for a family whose own chunk is family_max (what the CPU's caches
// like): the backend's prefill_chunk where it asks more (a GPU: a prompt's products
// in one launch per layer), at most n_ctx, never below family_max.
int mf_decoder_chunk(const mf_ctx *ctx, int family_max);

// Fill dec's sizes from the model's config and allocate its scratch (MoE scratch only
// when some layer is MoE). On error dec holds only what mf_decoder_free releases, and
// the message names the arch.
int mf_decoder_alloc(mf_ctx *ctx, struct mf_decoder *dec, const char *arch, char *err,
                     size_t errlen);
// Release dec's scratch; safe on a half-made or zeroed decoder.
void mf_decoder_free(mf_ctx *ctx, struct mf_decoder *dec);

// The FFN half of layer il on n rows: x += r first (r: the mixer's output, dec->y; added
// with the norm in one op; NULL where the mixer added it into x itself, mf_matmul_add),
// then x += FFN(rmsnorm(x) * norm), FFN the routed MoE block (is_moe; its router's call
// takes the norm where the add is done) or the dense SwiGLU, with the NaN/inf flag of
// layer il set from the sum (one op). Uses dec->xn and dec->y (the mixer's output is
// added before the FFN writes there). Inside a prefill group a MoE layer only writes
// the normed rows into the group (the decoder runs the MoE over the whole group after
// the layer's last chunk). It must be the layer's last step, as it is in every arch:
// the decoder relies on it for the layer's flag. Returns MF_OK or the MoE block's
// error (ctx->errmsg set).
int mf_decoder_ffn(mf_ctx *ctx, const struct mf_decoder *dec, const float *r,
                   const struct mf_weight *norm, int is_moe, const struct mf_moe_layer *moe,
                   const struct mf_ffn_layer *ffn, int il, int n);

// The forward of an eval call: chunks of at most max_tok tokens, each embedded, run
// through dec->layer for every layer (polling abort before each; more than max_tok
// tokens on a model with MoE layers: in prefill groups, see above), then, when logits
// is not NULL, the final norm and head on every row (all_logits) or on the last row of
// the call, downloaded to logits [n_tok or 1, n_vocab] (host). Returns MF_OK,
// MF_ABORTED, or a layer's error; MF_ERR_NUMERIC naming the first layer whose output
// held NaN or infinity (or the head, for non-finite logits); committing state is left
// to the caller.
int mf_decoder_run(mf_ctx *ctx, const struct mf_decoder *dec, const int32_t *tokens,
                   int n_tok, float *logits, int all_logits);

#endif /* MF_DECODER_H */
