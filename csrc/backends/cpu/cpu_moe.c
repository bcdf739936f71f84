/*
 * cpu_moe.c — the CPU backend's MoE ops: routing (moe_route) and the grouped SwiGLU
 * experts (moe_experts). Routing is f32 on one thread (k <= 16 rounds of arg-max over
 * E <= a few hundred scores per token is nothing next to the router matmul) and follows
 * model-math §2.6 (softmax) and §3.5 (noaux_tc); the GPU backends reproduce its tie rule.
 */
#include <math.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"

/* ==== Routing ====
 * Top-k is a repeated arg-max with strict '>' so ties go to the lower index. `taken`
 * marks chosen entries (n bytes of scratch). */

static void topk_desc(int32_t *idx, const float *v, int n, int k, uint8_t *taken) {
    memset(taken, 0, (size_t)n);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++)
            if (!taken[e] && (best < 0 || v[e] > v[best]))
                best = e;
        idx[j] = best;
        taken[best] = 1;
    }
}

// Weights of the chosen experts from p, renormalised to sum 1 when asked.
static void pick_weights(float *w, const int32_t *idx, const float *p, int K, int renorm,
                         float scale) {
    float wsum = 0.0f;
    for (int j = 0; j < K; j++) {
        w[j] = p[idx[j]];
        wsum += w[j];
    }
    for (int j = 0; j < K; j++) {
        if (renorm)
            w[j] /= wsum;
        w[j] *= scale;
    }
}

static void route_softmax(const struct mf_route_params *p, float *logit, int32_t *idx,
                          float *w, uint8_t *taken) {
    int E = p->n_expert;
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
    topk_desc(idx, logit, E, p->n_used, taken);
    pick_weights(w, idx, logit, p->n_used, p->norm_topk_prob, 1.0f);
}

// Masks to 0.0 (not -inf, as mlx-lm and HF do: a negative biased score in a kept group
// can lose to a masked one) every expert outside the topk_group groups whose two best
// biased scores sum highest.
static void mask_groups(const struct mf_route_params *p, float *biased, uint8_t *taken) {
    int G = p->n_group, per = p->n_expert / G;
    float gscore[256];
    int32_t gidx[256];
    uint8_t keep[256] = {0};
    for (int g = 0; g < G; g++) {
        int32_t top2[2];
        topk_desc(top2, biased + g * per, per, 2, taken);
        gscore[g] = biased[g * per + top2[0]] + biased[g * per + top2[1]];
    }
    topk_desc(gidx, gscore, G, p->topk_group, taken);
    for (int j = 0; j < p->topk_group; j++)
        keep[gidx[j]] = 1;
    for (int e = 0; e < p->n_expert; e++)
        if (!keep[e / per])
            biased[e] = 0.0f;
}

static void route_noaux_tc(const struct mf_route_params *p, float *logit, const float *bias,
                           int32_t *idx, float *w, uint8_t *taken, float *biased) {
    int E = p->n_expert, K = p->n_used;
    for (int e = 0; e < E; e++) {
        logit[e] = 1.0f / (1.0f + expf(-logit[e]));
        biased[e] = logit[e] + (bias ? bias[e] : 0.0f);
    }
    if (p->n_group > 1)
        mask_groups(p, biased, taken);
    topk_desc(idx, biased, E, K, taken);
    pick_weights(w, idx, logit, K, K > 1 && p->norm_topk_prob, p->routed_scaling_factor);
}

// gpt-oss: the k largest biased logits, weighted by a softmax over those k alone.
static void route_topk_softmax(const struct mf_route_params *p, float *logit,
                               const float *bias, int32_t *idx, float *w, uint8_t *taken) {
    int E = p->n_expert, K = p->n_used;
    if (bias)
        for (int e = 0; e < E; e++)
            logit[e] += bias[e];
    topk_desc(idx, logit, E, K, taken);
    float mx = logit[idx[0]], sum = 0.0f;
    for (int j = 0; j < K; j++) {
        w[j] = expf(logit[idx[j]] - mx);
        sum += w[j];
    }
    for (int j = 0; j < K; j++)
        w[j] /= sum;
}

void mf_cpu_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                      const float *bias, const struct mf_route_params *p, int n_tok,
                      int32_t *idx_host, float *w_host) {
    // scratch: biased scores [E] f32, then the taken mask [E] bytes
    float *biased = ex->scratch[0];
    uint8_t *taken = (uint8_t *)(biased + p->n_expert);
    int K = p->n_used;
    for (int t = 0; t < n_tok; t++) {
        float *lg = logits + (size_t)t * p->n_expert;
        int32_t *it = idx_host ? idx_host + t * K : idx + t * K;
        float *wt = w_host ? w_host + t * K : w + t * K;
        if (p->kind == MF_ROUTE_NOAUX_TC)
            route_noaux_tc(p, lg, bias, it, wt, taken, biased);
        else if (p->kind == MF_ROUTE_TOPK_SOFTMAX)
            route_topk_softmax(p, lg, bias, it, wt, taken);
        else
            route_softmax(p, lg, it, wt, taken);
        if (idx && idx_host)
            memcpy(idx + t * K, it, (size_t)K * sizeof *it);
        if (w && w_host)
            memcpy(w + t * K, wt, (size_t)K * sizeof *wt);
    }
}

/* ==== Grouped experts ====
 * Each expert's rows run as today's per-expert ops (the matmul of m rows, SwiGLU over
 * the up half, down), each projection at its own format (a mixed recipe's 3-bit gate
 * and 6-bit down, a float down), then its bias when the layout has one: a row's
 * result depends only on its expert and row count. */

// y[r, :] += bias (the expert's float vector at blob + offset) for m rows of n.
static void add_bias(float *y, const struct mf_weight *bias, const void *blob, int m,
                     int64_t n) {
    if (!bias)
        return;
    struct mf_weight v = mf_weight_at(bias, blob);
    for (int r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++)
            y[r * n + j] += mf_load_f32(v.w, v.dtype, (size_t)j);
}

void mf_cpu_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                        const struct mf_moe_batch *b) {
    int64_t H = b->gate->n_in, I = b->gate->n_out;
    for (int i = 0; i < b->n; i++) {
        int m = b->n_rows_host[i];
        int64_t r0 = b->row0_host[i];
        if (m < 1)
            continue;
        struct mf_weight wg = mf_weight_at(b->gate, b->blob_host[i]);
        struct mf_weight wu = mf_weight_at(b->up, b->blob_host[i]);
        struct mf_weight wd = mf_weight_at(b->down, b->blob_host[i]);
        float *g = gu + r0 * 2 * I, *u = g + (int64_t)m * I;   // [m, I] each
        const float *x = xg + r0 * H;
        mf_cpu_matmul(ex, g, &wg, x, m);
        add_bias(g, b->gate_bias, b->blob_host[i], m, I);
        mf_cpu_matmul(ex, u, &wu, x, m);
        add_bias(u, b->up_bias, b->blob_host[i], m, I);
        if (b->act == MF_MOE_ACT_SWIGLU_CLAMPED)
            mf_cpu_swiglu_clamped(ex, u, g, u, m, (int)I, (int)I, b->act_alpha,
                                  b->act_limit);
        else
            mf_cpu_swiglu(ex, u, g, u, m, (int)I, (int)I);
        mf_cpu_matmul(ex, eo + r0 * H, &wd, u, m);
        add_bias(eo + r0 * H, b->down_bias, b->blob_host[i], m, H);
    }
}

/* ==== Device-routed experts (resident mode) ====
 * The CPU's device memory is host memory, so the "device" routing is read directly,
 * and the op is the host-routed path itself: the (token, expert) pairs grouped by
 * expert in ascending order (tokens in order within an expert), each expert's rows in
 * one moe_experts entry (a row's bits depend on its expert's row count here), then
 * zero + scatter_add_rows in the same grouped order. The pairs are found by scanning
 * idx once per distinct expert (n_tok * k is small when routing stays on the device). */

#define DEV_CHUNK 64

// The smallest expert id in idx[0 .. n) above last, or -1.
static int next_expert(const int32_t *idx, int n, int last) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (idx[i] > last && (best < 0 || idx[i] < best))
            best = idx[i];
    return best;
}

// Gathers expert e's rows into xg at row *cursor and adds its batch entry.
static void dev_group(const struct mf_moe_dev *d, const float *x, int e, int H, int *cursor,
                      const void **blob, int32_t *row0, int32_t *rows) {
    const int n = d->n_tok * d->k;
    *blob = (const uint8_t *)d->base + (int64_t)e * d->stride;
    *row0 = *cursor;
    for (int i = 0; i < n; i++)
        if (d->idx[i] == e)
            memcpy(d->xg + (int64_t)(*cursor)++ * H, x + (int64_t)(i / d->k) * H,
                   (size_t)H * sizeof(float));
    *rows = *cursor - *row0;
}

void mf_cpu_moe_experts_dev(struct mf_exec *ex, float *y, const float *x,
                            const struct mf_moe_dev *d) {
    const int H = (int)d->gate->n_in, n = d->n_tok * d->k;
    const void *blob[DEV_CHUNK];
    int32_t row0[DEV_CHUNK], rows[DEV_CHUNK];
    int cursor = 0, nb = 0;
    for (int e = next_expert(d->idx, n, -1); e >= 0; e = next_expert(d->idx, n, e)) {
        dev_group(d, x, e, H, &cursor, &blob[nb], &row0[nb], &rows[nb]);
        if (++nb == DEV_CHUNK || next_expert(d->idx, n, e) < 0) {
            struct mf_moe_batch b = {.n = nb, .blob_host = blob, .row0_host = row0,
                                     .n_rows_host = rows, .gate = d->gate, .up = d->up,
                                     .down = d->down, .gate_bias = d->gate_bias,
                                     .up_bias = d->up_bias, .down_bias = d->down_bias,
                                     .act = d->act, .act_alpha = d->act_alpha,
                                     .act_limit = d->act_limit};
            mf_cpu_moe_experts(ex, d->eo, d->gu, d->xg, &b);
            nb = 0;
        }
    }
    memset(y, 0, (size_t)d->n_tok * H * sizeof(float));
    int r = 0;
    for (int e = next_expert(d->idx, n, -1); e >= 0; e = next_expert(d->idx, n, e))
        for (int i = 0; i < n; i++)
            if (d->idx[i] == e) {
                int32_t t = i / d->k;
                mf_cpu_scatter_add_rows(ex, y, d->eo + (int64_t)r++ * H, &t, d->w + i, 1, H);
            }
    if (d->shared)
        mf_cpu_axpy(ex, y, 1.0f, d->shared, d->n_tok * H);
    if (d->resid) {
        mf_cpu_axpy(ex, d->resid, 1.0f, y, d->n_tok * H);
        if (d->flag)
            mf_cpu_flag_nonfinite(ex, d->flag, d->resid, (int64_t)d->n_tok * H);
    }
}
