/*
 * moe.c — the routed-expert MoE FFN and the dense SwiGLU FFN shared by every
 * architecture (moe.h).
 *
 * Owns: routing on the host (softmax top-k for the Qwen families, noaux_tc for
 * deepseek_v3), grouping a call's tokens by expert so that each routed expert is read
 * from the expert store ONCE per call (prefill reads each needed expert once per
 * chunk, not once per token), parallel reads of a batch of experts into per-slot
 * buffers, the per-expert SwiGLU on the gathered rows and the weighted scatter-add
 * back, and the optional (gated) shared expert.
 *
 * Does not own: the expert files (io/expert_store.c), the weights of the router and
 * shared expert (bound by each arch file), or any arithmetic on activations, which
 * goes through the backend op table so the same code runs on every backend.
 */
#include "models/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== Scratch ====
 * Everything a call needs, sized once for max_tok tokens. Host arrays hold the
 * routing (the router logits must come to the host anyway: top-k picks which files to
 * read). Device arrays hold activations. Expert blobs land in n_slot host-visible
 * buffers; a call with more distinct experts than slots processes them in batches of
 * n_slot, still reading each expert once. */

#define SLOT_ERR_LEN 256

struct mf_moe_scratch {
    int max_tok;
    int n_slot;
    uint64_t expert_bytes;
    // host
    float *logits_host;      // [max_tok, n_expert] f32
    uint8_t *bias_raw;       // [n_expert] raw bytes of the correction bias (noaux_tc)
    float *bias_host;        // [n_expert] f32
    int32_t *sel_idx;        // [max_tok, k] chosen experts
    float *sel_w;            // [max_tok, k] their weights
    int32_t *count;          // [n_expert] tokens routed to each expert
    int32_t *start;          // [n_expert + 1] prefix sums of count
    int32_t *tok_of;         // [max_tok * k] token index, grouped by expert
    float *w_of;             // [max_tok * k] weight, grouped like tok_of
    int32_t *used;           // [n_expert] distinct experts in this call, ascending
    uint8_t *taken;          // [n_expert] selection mask
    float *biased;           // [n_expert] noaux_tc biased scores
    int *slot_status;        // [n_slot]
    int *slot_expert;        // [n_slot]
    char *slot_err;          // [n_slot, SLOT_ERR_LEN]
    // device
    float *logits_dev;       // [max_tok, n_expert]
    float *xg;               // [max_tok, n_embd] gathered rows of one expert
    float *gu;               // [max_tok, 2 * n_ff_exp] gate | up halves
    float *eo;               // [max_tok, n_embd] one expert's output
    float *sh_tmp;           // [max_tok, 2 * n_ff_shexp]
    float *sh_out;           // [max_tok, n_embd]
    float *sh_gate;          // [max_tok, 1]
    void **slot;             // [n_slot] expert blobs (host-visible device memory)
    // expert weight views relative to a blob at address 0 (pointers are offsets)
    struct mf_weight ex_gate, ex_up, ex_down;
    int has_store;
};

static void *dev_alloc(mf_ctx *ctx, size_t bytes) {
    return ctx->be->ops->alloc(ctx->ex, bytes ? bytes : 4);
}

static void dev_free(mf_ctx *ctx, void *p) {
    if (p)
        ctx->be->ops->dealloc(ctx->ex, p);
}

// One expert projection as a weight view whose pointers are byte offsets inside a
// blob; forward adds the slot's base address. Bits and group size come from the
// component shapes (the layout's own bits field is cross-checked by this).
static int expert_view(const mf_expert_store *st, struct mf_weight *out, const char *proj,
                       int64_t n_out, int64_t n_in, char *err, size_t errlen) {
    char name[40];
    snprintf(name, sizeof name, "%s.weight", proj);
    const struct mf_expert_component *w = mf_expert_store_component(st, name);
    snprintf(name, sizeof name, "%s.scales", proj);
    const struct mf_expert_component *s = mf_expert_store_component(st, name);
    snprintf(name, sizeof name, "%s.biases", proj);
    const struct mf_expert_component *b = mf_expert_store_component(st, name);
    if (!w)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: component %s.weight missing", proj);
    memset(out, 0, sizeof *out);
    out->n_out = n_out;
    out->n_in = n_in;
    out->w = (const void *)(uintptr_t)w->offset;
    if (w->ndim != 2 || w->shape[0] != n_out)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "packed_experts/layout.json: %s.weight rows: expected %lld, got "
                      "%lld (ndim %d)", proj, (long long)n_out,
                      (long long)(w->ndim >= 1 ? w->shape[0] : -1), w->ndim);
    if (!s) {
        // float experts: a plain [n_out, n_in] matrix
        if (w->dtype == MF_DTYPE_U32 || w->shape[1] != n_in)
            return mf_err(err, errlen, MF_ERR_SHAPE,
                          "packed_experts/layout.json: %s.weight: expected float [%lld, "
                          "%lld] without scales, got %s [%lld, %lld]", proj,
                          (long long)n_out, (long long)n_in, mf_dtype_name(w->dtype),
                          (long long)w->shape[0], (long long)w->shape[1]);
        out->dtype = w->dtype;
        return MF_OK;
    }
    if (!b || w->dtype != MF_DTYPE_U32 || s->ndim != 2 || s->shape[0] != n_out ||
        s->shape[1] < 1 || n_in % s->shape[1] != 0 || (w->shape[1] * 32) % n_in != 0)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "packed_experts/layout.json: %s: expected U32 codes with scales "
                      "and biases for [%lld, %lld], got weight %s [%lld, %lld]%s", proj,
                      (long long)n_out, (long long)n_in, mf_dtype_name(w->dtype),
                      (long long)w->shape[0], (long long)w->shape[1],
                      b ? "" : " and no biases");
    out->dtype = MF_DTYPE_U32;
    out->sdtype = s->dtype;
    out->scales = (const void *)(uintptr_t)s->offset;
    out->biases = (const void *)(uintptr_t)b->offset;
    out->bits = (int)(w->shape[1] * 32 / n_in);
    out->group_size = (int)(n_in / s->shape[1]);
    if (out->bits < 2 || out->bits > 8 || out->bits == 7 ||
        (out->group_size != 32 && out->group_size != 64 && out->group_size != 128))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: %s: inferred bits %d / group size %d "
                      "unsupported (n_in %lld)", proj, out->bits, out->group_size,
                      (long long)n_in);
    return MF_OK;
}

static struct mf_weight view_at(const struct mf_weight *v, const void *base) {
    struct mf_weight w = *v;
    const char *b = base;
    w.w = b + (uintptr_t)v->w;
    if (v->scales) {
        w.scales = b + (uintptr_t)v->scales;
        w.biases = b + (uintptr_t)v->biases;
    }
    return w;
}

int mf_moe_scratch_new(mf_ctx *ctx, const struct mf_moe_config *c, int max_tok,
                       struct mf_moe_scratch **out, char *err, size_t errlen) {
    *out = NULL;
    if (c->n_expert < 1 || c->n_expert_used < 1 || c->n_expert_used > c->n_expert ||
        max_tok < 1)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "moe: bad sizes (num_experts %d, num_experts_per_tok %d, "
                      "max_tok %d)", c->n_expert, c->n_expert_used, max_tok);
    if (c->router == MF_ROUTER_NOAUX_TC &&
        (c->n_group < 1 || c->n_group > 256 || c->n_expert % c->n_group ||
         c->topk_group < 1 ||
         c->topk_group > c->n_group || c->n_expert / c->n_group < 2 ||
         c->n_expert_used > c->topk_group * (c->n_expert / c->n_group)))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "moe: noaux_tc router needs n_group dividing %d experts into groups "
                      "of >= 2 and topk_group in [1, n_group] holding >= %d experts "
                      "(n_group %d, topk_group %d)", c->n_expert, c->n_expert_used,
                      c->n_group, c->topk_group);
    struct mf_moe_scratch *s = calloc(1, sizeof *s);
    if (!s)
        return mf_err(err, errlen, MF_ERR_NOMEM, "moe: out of memory");
    const mf_expert_store *st = ctx->model->experts;
    size_t E = (size_t)c->n_expert, T = (size_t)max_tok, K = (size_t)c->n_expert_used;
    s->max_tok = max_tok;
    // Enough slots to read all of one token's experts at once (decode), at least 8 so
    // prefill batches keep the read pool busy, never more than there are experts.
    s->n_slot = c->n_expert_used > 8 ? c->n_expert_used : 8;
    if (s->n_slot > c->n_expert)
        s->n_slot = c->n_expert;
    int rc = MF_OK;
    if (st) {
        s->has_store = 1;
        s->expert_bytes = mf_expert_store_layout(st)->expert_size;
        rc = expert_view(st, &s->ex_gate, "gate_proj", c->n_ff_exp, c->n_embd, err,
                         errlen);
        if (rc == MF_OK)
            rc = expert_view(st, &s->ex_up, "up_proj", c->n_ff_exp, c->n_embd, err,
                             errlen);
        if (rc == MF_OK)
            rc = expert_view(st, &s->ex_down, "down_proj", c->n_embd, c->n_ff_exp, err,
                             errlen);
        if (rc != MF_OK) {
            mf_moe_scratch_free(ctx, s);
            return rc;
        }
    }
    s->logits_host = calloc(T * E, sizeof(float));
    s->bias_raw = calloc(E, 4);
    s->bias_host = calloc(E, sizeof(float));
    s->sel_idx = calloc(T * K, sizeof(int32_t));
    s->sel_w = calloc(T * K, sizeof(float));
    s->count = calloc(E, sizeof(int32_t));
    s->start = calloc(E + 1, sizeof(int32_t));
    s->tok_of = calloc(T * K, sizeof(int32_t));
    s->w_of = calloc(T * K, sizeof(float));
    s->used = calloc(E, sizeof(int32_t));
    s->taken = calloc(E, 1);
    s->biased = calloc(E, sizeof(float));
    s->slot_status = calloc((size_t)s->n_slot, sizeof(int));
    s->slot_expert = calloc((size_t)s->n_slot, sizeof(int));
    s->slot_err = calloc((size_t)s->n_slot, SLOT_ERR_LEN);
    s->slot = calloc((size_t)s->n_slot, sizeof(void *));
    size_t F = sizeof(float), H = (size_t)c->n_embd;
    s->logits_dev = dev_alloc(ctx, T * E * F);
    s->xg = dev_alloc(ctx, T * H * F);
    s->gu = dev_alloc(ctx, T * 2 * (size_t)c->n_ff_exp * F);
    s->eo = dev_alloc(ctx, T * H * F);
    if (c->n_ff_shexp > 0) {
        s->sh_tmp = dev_alloc(ctx, T * 2 * (size_t)c->n_ff_shexp * F);
        s->sh_out = dev_alloc(ctx, T * H * F);
        s->sh_gate = dev_alloc(ctx, T * F);
    }
    int ok = s->logits_host && s->bias_raw && s->bias_host && s->sel_idx && s->sel_w &&
             s->count && s->start && s->tok_of && s->w_of && s->used && s->taken &&
             s->biased && s->slot_status &&
             s->slot_expert && s->slot_err && s->slot && s->logits_dev && s->xg &&
             s->gu && s->eo &&
             (c->n_ff_shexp <= 0 || (s->sh_tmp && s->sh_out && s->sh_gate));
    for (int i = 0; ok && s->has_store && i < s->n_slot; i++) {
        void *(*ah)(struct mf_exec *, size_t) =
            ctx->be->ops->alloc_host ? ctx->be->ops->alloc_host : ctx->be->ops->alloc;
        s->slot[i] = ah(ctx->ex, (size_t)s->expert_bytes);
        ok = s->slot[i] != NULL;
    }
    if (!ok) {
        mf_moe_scratch_free(ctx, s);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "moe: out of memory for scratch (%d tokens, %d experts of %llu "
                      "bytes in %d slots)", max_tok, c->n_expert,
                      (unsigned long long)s->expert_bytes,
                      s->n_slot);
    }
    *out = s;
    return MF_OK;
}

void mf_moe_scratch_free(mf_ctx *ctx, struct mf_moe_scratch *s) {
    if (!s)
        return;
    free(s->logits_host);
    free(s->bias_raw);
    free(s->bias_host);
    free(s->sel_idx);
    free(s->sel_w);
    free(s->count);
    free(s->start);
    free(s->tok_of);
    free(s->w_of);
    free(s->used);
    free(s->taken);
    free(s->biased);
    free(s->slot_status);
    free(s->slot_expert);
    free(s->slot_err);
    dev_free(ctx, s->logits_dev);
    dev_free(ctx, s->xg);
    dev_free(ctx, s->gu);
    dev_free(ctx, s->eo);
    dev_free(ctx, s->sh_tmp);
    dev_free(ctx, s->sh_out);
    dev_free(ctx, s->sh_gate);
    if (s->slot)
        for (int i = 0; i < s->n_slot; i++)
            dev_free(ctx, s->slot[i]);
    free(s->slot);
    free(s);
}

/* ==== Routing (host, f32) ====
 * Top-k is a repeated arg-max with strict '>' so ties go to the lower expert index;
 * this makes routing deterministic whatever the backend. k <= E is small (<= 16 in
 * every target model), so O(k*E) per token is nothing next to the router matmul. */

static void topk_desc(int32_t *idx, const float *v, const uint8_t *excluded, int n, int k,
                      uint8_t *taken) {
    memset(taken, 0, (size_t)n);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            if (taken[e] || (excluded && excluded[e]))
                continue;
            if (best < 0 || v[e] > v[best])
                best = e;
        }
        idx[j] = best;
        taken[best] = 1;
    }
}

// Softmax router (model-math §2.6): p = softmax(logits) in f32, k largest,
// renormalised when norm_topk_prob.
static void route_softmax(const struct mf_moe_config *c, float *logit, int32_t *idx,
                          float *w, uint8_t *taken) {
    int E = c->n_expert, K = c->n_expert_used;
    float mx = logit[0];
    for (int e = 1; e < E; e++)
        mx = logit[e] > mx ? logit[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        logit[e] = expf(logit[e] - mx);
        sum += logit[e];
    }
    for (int e = 0; e < E; e++)
        logit[e] /= sum;
    topk_desc(idx, logit, NULL, E, K, taken);
    float wsum = 0.0f;
    for (int j = 0; j < K; j++) {
        w[j] = logit[idx[j]];
        wsum += w[j];
    }
    if (c->norm_topk_prob)
        for (int j = 0; j < K; j++)
            w[j] /= wsum;
}

// noaux_tc router (model-math §3.5): sigmoid scores; the correction bias only
// steers the choice; groups scored by the sum of their two best biased scores; the
// experts of all but the topk_group best groups are masked to 0.0 (not -inf, as
// mlx-lm and HF do, so a negative biased score in a kept group can lose to a masked
// one); weights are the unbiased sigmoids, renormalised, times routed_scaling_factor.
static void route_noaux_tc(const struct mf_moe_config *c, float *logit, const float *bias,
                           int32_t *idx, float *w, uint8_t *taken, float *biased) {
    int E = c->n_expert, K = c->n_expert_used, G = c->n_group, per = E / G;
    for (int e = 0; e < E; e++) {
        logit[e] = 1.0f / (1.0f + expf(-logit[e]));
        biased[e] = logit[e] + (bias ? bias[e] : 0.0f);
    }
    if (G > 1) {
        float gscore[256];
        int32_t gidx[256];
        for (int g = 0; g < G; g++) {
            int32_t top2[2];
            topk_desc(top2, biased + g * per, NULL, per, 2, taken);
            gscore[g] = biased[g * per + top2[0]] + biased[g * per + top2[1]];
        }
        topk_desc(gidx, gscore, NULL, G, c->topk_group, taken);
        uint8_t keep[256] = {0};
        for (int j = 0; j < c->topk_group; j++)
            keep[gidx[j]] = 1;
        for (int e = 0; e < E; e++)
            if (!keep[e / per])
                biased[e] = 0.0f;
    }
    topk_desc(idx, biased, NULL, E, K, taken);
    float wsum = 0.0f;
    for (int j = 0; j < K; j++) {
        w[j] = logit[idx[j]];
        wsum += w[j];
    }
    for (int j = 0; j < K; j++) {
        if (K > 1 && c->norm_topk_prob)
            w[j] /= wsum;
        w[j] *= c->routed_scaling_factor;
    }
}

// Group the call's (token, expert) pairs by expert: tok_of/w_of hold, for expert e,
// entries start[e] .. start[e+1]-1 in token order; used lists distinct experts.
static int group_by_expert(struct mf_moe_scratch *s, const struct mf_moe_config *c,
                           int n_tok) {
    int E = c->n_expert, K = c->n_expert_used;
    memset(s->count, 0, (size_t)E * sizeof(int32_t));
    for (int i = 0; i < n_tok * K; i++)
        s->count[s->sel_idx[i]]++;
    int n_used = 0;
    s->start[0] = 0;
    for (int e = 0; e < E; e++) {
        s->start[e + 1] = s->start[e] + s->count[e];
        if (s->count[e])
            s->used[n_used++] = e;
        s->count[e] = 0;   // reused as fill cursor below
    }
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < K; j++) {
            int e = s->sel_idx[t * K + j];
            int at = s->start[e] + s->count[e]++;
            s->tok_of[at] = t;
            s->w_of[at] = s->sel_w[t * K + j];
        }
    return n_used;
}

static int route(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                 const struct mf_moe_layer *w, const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    int E = c->n_expert, K = c->n_expert_used;
    op->matmul(ctx->ex, s->logits_dev, &w->router, x, n_tok);
    op->download(ctx->ex, s->logits_host, s->logits_dev, 0,
                 (size_t)n_tok * E * sizeof(float));
    const float *bias = NULL;
    if (c->router == MF_ROUTER_NOAUX_TC && w->router_bias.w) {
        op->download(ctx->ex, s->bias_raw, w->router_bias.w, 0,
                     (size_t)E * mf_dtype_size(w->router_bias.dtype));
        for (int e = 0; e < E; e++)
            s->bias_host[e] = mf_load_f32(s->bias_raw, w->router_bias.dtype, (size_t)e);
        bias = s->bias_host;
    }
    uint8_t *taken = s->taken;
    float *biased = s->biased;
    for (int t = 0; t < n_tok; t++) {
        float *lg = s->logits_host + (size_t)t * E;
        if (c->router == MF_ROUTER_NOAUX_TC)
            route_noaux_tc(c, lg, bias, s->sel_idx + t * K, s->sel_w + t * K, taken,
                           biased);
        else
            route_softmax(c, lg, s->sel_idx + t * K, s->sel_w + t * K, taken);
    }
    return group_by_expert(s, c, n_tok);
}

/* ==== Expert reads ====
 * A batch of up to n_slot experts is read in parallel on the exec's threads (pread
 * is thread-safe on the shared store). Errors are kept per slot and reported after
 * the batch so the message names the first failed expert. */

struct read_job {
    const mf_expert_store *st;
    struct mf_moe_scratch *s;
    int il;
};

static void read_one(void *arg, int i) {
    struct read_job *j = arg;
    j->s->slot_status[i] =
        mf_expert_store_read(j->st, j->il, j->s->slot_expert[i], j->s->slot[i],
                             (size_t)j->s->expert_bytes,
                             j->s->slot_err + (size_t)i * SLOT_ERR_LEN, SLOT_ERR_LEN);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int read_batch(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n) {
    struct read_job job = {ctx->model->experts, s, il};
    double t0 = now_s();
    ctx->be->ops->parallel_for(ctx->ex, read_one, &job, n);
    ctx->stats.expert_read_s += now_s() - t0;
    for (int i = 0; i < n; i++)
        if (s->slot_status[i] != MF_OK)
            return mf_ctx_fail(ctx, s->slot_status[i], "layer %d expert %d: %s", il,
                               s->slot_expert[i], s->slot_err + (size_t)i * SLOT_ERR_LEN);
    ctx->stats.expert_reads += n;
    ctx->stats.expert_bytes_read += (int64_t)n * (int64_t)s->expert_bytes;
    return MF_OK;
}

/* ==== Expert compute ====
 * For expert e with m routed rows: xg[m] = x[tok_of], gu = [gate xg | up xg],
 * a = silu(gate) * up (written over the up half), eo = down a, y[tok_of] += w * eo. */

static void expert_apply(mf_ctx *ctx, struct mf_moe_scratch *s,
                         const struct mf_moe_config *c, const void *blob, float *y,
                         const float *x, int e) {
    const struct mf_backend_ops *op = ctx->be->ops;
    int m = s->start[e + 1] - s->start[e];
    const int32_t *toks = s->tok_of + s->start[e];
    int I = c->n_ff_exp;
    struct mf_weight wg = view_at(&s->ex_gate, blob);
    struct mf_weight wu = view_at(&s->ex_up, blob);
    struct mf_weight wd = view_at(&s->ex_down, blob);
    op->gather_rows(ctx->ex, s->xg, x, toks, m, c->n_embd);
    float *g = s->gu, *u = s->gu + (size_t)m * I;       // [m, I] each
    op->matmul(ctx->ex, g, &wg, s->xg, m);
    op->matmul(ctx->ex, u, &wu, s->xg, m);
    op->swiglu(ctx->ex, u, g, u, m, I, I);
    op->matmul(ctx->ex, s->eo, &wd, u, m);
    op->scatter_add_rows(ctx->ex, y, s->eo, toks, s->w_of + s->start[e], m, c->n_embd);
}

static void shared_apply(mf_ctx *ctx, struct mf_moe_scratch *s,
                         const struct mf_moe_config *c, const struct mf_moe_layer *w,
                         float *y, const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_ffn_layer f = {w->shared_gate, w->shared_up, w->shared_down};
    mf_ffn_forward(ctx, s->sh_out, s->sh_tmp, &f, x, n_tok, c->n_ff_shexp);
    if (w->has_shared_gate) {
        // qwen: shared output scaled per token by sigmoid(shared_expert_gate(x))
        op->matmul(ctx->ex, s->sh_gate, &w->shared_expert_gate, x, n_tok);
        op->mul_sigmoid(ctx->ex, s->sh_out, s->sh_gate, n_tok, c->n_embd, 1, 1);
    }
    op->axpy(ctx->ex, y, 1.0f, s->sh_out, n_tok * c->n_embd);
}

int mf_moe_forward(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                   const struct mf_moe_layer *w, float *y, const float *x, int n_tok) {
    if (n_tok > s->max_tok)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "moe: %d tokens exceed the scratch size %d",
                           n_tok, s->max_tok);
    if (!s->has_store)
        return mf_ctx_fail(ctx, MF_ERR_STATE, "layer %d: MoE layer but no expert store",
                           w->il);
    ctx->be->ops->zero(ctx->ex, y, 0, (size_t)n_tok * c->n_embd * sizeof(float));
    int n_used = route(ctx, s, c, w, x, n_tok);
    for (int b0 = 0; b0 < n_used; b0 += s->n_slot) {
        int n = n_used - b0 < s->n_slot ? n_used - b0 : s->n_slot;
        for (int i = 0; i < n; i++)
            s->slot_expert[i] = s->used[b0 + i];
        int rc = read_batch(ctx, s, w->il, n);
        if (rc != MF_OK)
            return rc;
        for (int i = 0; i < n; i++)
            expert_apply(ctx, s, c, s->slot[i], y, x, s->slot_expert[i]);
    }
    if (w->has_shared && c->n_ff_shexp > 0)
        shared_apply(ctx, s, c, w, y, x, n_tok);
    return MF_OK;
}

/* ==== Dense SwiGLU FFN ==== */

void mf_ffn_forward(mf_ctx *ctx, float *y, float *tmp, const struct mf_ffn_layer *w,
                    const float *x, int n_tok, int n_ff) {
    const struct mf_backend_ops *op = ctx->be->ops;
    float *g = tmp, *u = tmp + (size_t)n_tok * n_ff;   // [n_tok, n_ff] each
    op->matmul(ctx->ex, g, &w->gate, x, n_tok);
    op->matmul(ctx->ex, u, &w->up, x, n_tok);
    op->swiglu(ctx->ex, u, g, u, n_tok, n_ff, n_ff);
    op->matmul(ctx->ex, y, &w->down, u, n_tok);
}

int mf_ffn_bind(const mf_model *m, struct mf_ffn_layer *out, const char *prefix,
                int n_embd, int n_ff, char *err, size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s.gate_proj", prefix);
    int rc = mf_bind_linear(m, &out->gate, path, 0, n_ff, n_embd, err, errlen);
    if (rc != MF_OK)
        return rc;
    snprintf(path, sizeof path, "%s.up_proj", prefix);
    rc = mf_bind_linear(m, &out->up, path, 0, n_ff, n_embd, err, errlen);
    if (rc != MF_OK)
        return rc;
    snprintf(path, sizeof path, "%s.down_proj", prefix);
    return mf_bind_linear(m, &out->down, path, 0, n_embd, n_ff, err, errlen);
}
