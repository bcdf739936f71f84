/*
 * state.c — sequence-state snapshots, truncation and automatic checkpoints, written
 * once for every architecture over the segment list each arch exposes
 * (mf_arch.state_segments).
 *
 * It owns the snapshot byte format ("MFLX", version 1, below), the validation of a
 * snapshot before anything in the ctx changes, and the ring of checkpoints of
 * fixed-size state (GatedDeltaNet conv history and recurrence) that makes truncation of
 * hybrid models exact, kept in the backend's memory. It does not know what a segment
 * holds: it moves bytes between device buffers and host memory through the backend's
 * upload/download/copy only, never by dereferencing a device pointer, so it works
 * unchanged on GPU backends.
 *
 * Snapshot format, version 2 (all integers little-endian; version 1 is read too):
 *   header    "MFLX" | u32 version | u32 n_ident | n_ident x i64 identity fields
 *             (architecture id, shared shape fields, the family's own fields as its
 *             mf_arch.ident lists them, expert bytes per token, manifest hash, hash of
 *             the real-valued constants, weights fingerprint; version 1: a fixed list
 *             of 34, see Identity below)
 *             | u32 n_past | u32 n_seg
 *   table     n_seg x { u32 kind | i32 layer | u64 row_bytes | u64 fixed_bytes |
 *             u64 data_bytes }
 *   data      each segment's bytes in table order: rows [0, n_past) of positional
 *             segments (row_bytes * n_past), of a ring segment (sliding-window
 *             attention, mf_state_seg.ring_rows) the last min(n_past, ring_keep)
 *             positions oldest first, or the whole fixed segment
 *   trailer   u64 checksum of every byte before it (snap_checksum below)
 * n_ctx is deliberately not part of the identity: a snapshot of n_past tokens loads
 * into any ctx of the same model whose n_ctx >= n_past.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

#define SNAP_MAGIC "MFLX"
#define SNAP_VERSION 2u

// Checkpoints kept for exact truncation of models with fixed-size state. Each holds a
// copy of every fixed segment (for Qwen3.5-397B: 45 GatedDeltaNet layers x ~4.1 MiB =
// ~190 MiB), so by default the ring is bounded both by count and by bytes: at most
// DEFAULT_CHECKPOINTS, and no more than fit in CHECKPOINT_BUDGET_BYTES (but at least
// one). mf_ctx_params.n_checkpoints overrides the count (no byte cap then: the caller
// chose), up to MAX_CHECKPOINTS; -1 turns them off. They live in the backend's memory
// (alloc): taking one is a copy queued behind the eval (~190 MiB per token at 397B
// scale), no host round trip; on a GPU a download of that size after every token took
// more time than the token's kernels.
#define DEFAULT_CHECKPOINTS 8
#define MAX_CHECKPOINTS 64
#define CHECKPOINT_BUDGET_BYTES ((uint64_t)1 << 30)

/* ==== Identity ====
 * The fields that must agree between the model that wrote a snapshot and the one
 * reading it. Names are config.json keys so a refusal message can be grepped straight
 * into the config. The manifest hash tells apart models with equal shapes but other
 * tensors; the weights fingerprint tells apart equal layouts with other weights (two
 * synthetic checkpoints of different seeds, or a re-quantised upload).
 *
 * Version 2 (written): the shared fields below, then the family's own integer fields
 * (mf_arch.ident, in its order), then the tail: expert bytes per token, manifest hash,
 * the hash of the real constants (rope_theta, partial_rotary_factor, rms_norm_eps, then
 * the family's real fields in its order, as f64 bits) and the weights fingerprint.
 * Version 1 (read): the fixed list of 34 fields below; a field is looked up by its
 * name among the shared and the family's fields, 0 where the family has none (as the
 * union config of version 1 held it). */

static const char *const core_names[] = {
    "architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
    "number of MoE layers", "norm_topk_prob", "tie_word_embeddings",
};
#define N_CORE ((int)(sizeof core_names / sizeof core_names[0]))

static const char *const tail_names[] = {
    "expert bytes per token", "manifest hash", "rope/norm/scaling constants",
    "weights fingerprint",
};
#define N_TAIL 4   // the last three are hashes, printed in hex

static const char *const v1_names[] = {
    "architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "intermediate_size", "full_attention_interval", "linear_num_key_heads",
    "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace", "number of MoE layers",
    "n_shared_experts", "n_group", "topk_group", "norm_topk_prob",
    "tie_word_embeddings", "expert bytes per token", "manifest hash",
    "rope/norm/scaling constants", "weights fingerprint",
};
#define N_V1 ((int)(sizeof v1_names / sizeof v1_names[0]))

// Real constants of version 1's hash, in its order (after the three shared ones).
static const char *const v1_float_names[] = {
    "routed_scaling_factor", "yarn factor", "yarn beta_fast", "yarn beta_slow",
    "yarn mscale", "yarn mscale_all_dim", "yarn original_max_position_embeddings",
    "rope_scaling yarn",
};

#define MAX_IDENT (N_V1 > N_CORE + MF_IDENT_ARCH_MAX + N_TAIL ? N_V1 \
                   : N_CORE + MF_IDENT_ARCH_MAX + N_TAIL)

struct ident {
    int n;
    int n_hash_from;                 // fields from here on are hashes
    const char *name[MAX_IDENT];
    int64_t v[MAX_IDENT];
};

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}



// FNV-1a over 16 windows of 4 KiB spread evenly over model_weights.bin (64 KiB read,
// whatever the file's size), plus its length. Cheap enough for every save and load,
// and it differs between files of equal layout but other weights.
static uint64_t weights_fingerprint(const mf_model *m) {
    uint64_t h = FNV_OFFSET;
    uint64_t n = m->weights_bytes;
    h = fnv1a(h, (const uint8_t *)&n, sizeof n);
    if (!m->weights_map || n == 0) return h;
    const uint64_t win = 4096, n_win = 16;
    for (uint64_t i = 0; i < n_win; i++) {
        uint64_t off = n > win ? (n - win) / (n_win - 1) * i : 0;
        uint64_t len = n - off < win ? n - off : win;
        h = fnv1a(h, (const uint8_t *)m->weights_map + off, (size_t)len);
    }
    return h;
}

// The family's identity fields (none without an ident hook).
static int arch_fields(const mf_model *m, struct mf_ident_field *f) {
    const struct mf_arch *a = m->arch;
    if (!a || !a->ident) return 0;
    int n = a->ident(&m->cfg, f, MF_IDENT_ARCH_MAX);
    return n > MF_IDENT_ARCH_MAX ? MF_IDENT_ARCH_MAX : n;
}

static void core_values(const mf_model *m, int64_t v[N_CORE]) {
    const struct mf_config *c = &m->cfg;
    const int64_t x[N_CORE] = {
        c->arch, c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
        c->num_key_value_heads, c->head_dim, c->vocab_size, c->num_experts,
        c->num_experts_per_tok, c->moe_intermediate_size, c->intermediate_size,
        c->n_moe_layers, c->norm_topk_prob, c->tie_word_embeddings,
    };
    memcpy(v, x, sizeof x);
}

// The real-valued config constants that change the state a token leaves (keys are
// stored after RoPE; norms and scaling shape every activation), hashed by their bits:
// the shared three, then (v2) the family's real fields in order, or (v1) version 1's
// list by name, 0 where the family has none.
static uint64_t float_consts_hash(const mf_model *m, uint32_t version,
                                  const struct mf_ident_field *f, int nf) {
    const struct mf_config *c = &m->cfg;
    double v[3 + MF_IDENT_ARCH_MAX];
    int n = 0;
    v[n++] = c->rope_theta;
    v[n++] = c->partial_rotary_factor;
    v[n++] = (double)c->rms_norm_eps;
    if (version == 1) {
        for (size_t k = 0; k < sizeof v1_float_names / sizeof v1_float_names[0]; k++) {
            v[n] = 0;
            for (int i = 0; i < nf; i++)
                if (f[i].is_float && strcmp(f[i].name, v1_float_names[k]) == 0)
                    v[n] = f[i].f;
            n++;
        }
    } else {
        for (int i = 0; i < nf; i++)
            if (f[i].is_float) v[n++] = f[i].f;
    }
    return fnv1a(FNV_OFFSET, (const uint8_t *)v, sizeof(double) * (size_t)n);
}

static const char *arch_name(int64_t id) {
    const struct mf_arch *a = mf_arch_find((int)id);
    return a ? a->model_type : "unknown";
}

static void ident_add(struct ident *id, const char *name, int64_t v) {
    id->name[id->n] = name;
    id->v[id->n++] = v;
}

// Value of version 1's field `name`: shared, the family's integer field, or 0.
static int64_t v1_lookup(const char *name, const int64_t core[N_CORE],
                         const struct mf_ident_field *f, int nf) {
    for (int i = 0; i < N_CORE; i++)
        if (strcmp(core_names[i], name) == 0) return core[i];
    for (int i = 0; i < nf; i++)
        if (!f[i].is_float && strcmp(f[i].name, name) == 0) return f[i].i;
    return 0;
}

// This model's identity as snapshot format `version` lists it.
static void ident_fill(const mf_model *m, uint32_t version, struct ident *id) {
    struct mf_ident_field f[MF_IDENT_ARCH_MAX];
    int nf = arch_fields(m, f);
    int64_t core[N_CORE];
    core_values(m, core);
    const int64_t tail[N_TAIL] = {
        m->expert_bytes_per_token, (int64_t)m->manifest.hash,
        (int64_t)float_consts_hash(m, version, f, nf), (int64_t)weights_fingerprint(m),
    };
    id->n = 0;
    if (version == 1) {
        for (int i = 0; i < N_V1 - N_TAIL; i++)
            ident_add(id, v1_names[i], v1_lookup(v1_names[i], core, f, nf));
    } else {
        for (int i = 0; i < N_CORE; i++) ident_add(id, core_names[i], core[i]);
        for (int i = 0; i < nf; i++)
            if (!f[i].is_float) ident_add(id, f[i].name, f[i].i);
    }
    id->n_hash_from = id->n + 1;
    for (int i = 0; i < N_TAIL; i++) ident_add(id, tail_names[i], tail[i]);
}

/* ==== Segments ====
 * The arch's list of state buffers, fetched fresh for every operation because an arch
 * may swap its committed and scratch buffers between evals (double buffering). */

struct segs {
    struct mf_state_seg *v;   // [n] malloc'd
    int n;
    uint64_t fixed_bytes;     // sum of fixed_bytes over fixed segments
};

static int segs_get(const mf_ctx *ctx, struct segs *s) {
    s->v = NULL;
    s->n = 0;
    s->fixed_bytes = 0;
    const struct mf_arch *a = ctx->model->arch;
    if (!a || !a->state_segments) return MF_OK;
    int n = a->state_segments(ctx, NULL, 0);
    if (n <= 0) return MF_OK;
    s->v = calloc((size_t)n, sizeof *s->v);
    if (!s->v) return MF_ERR_NOMEM;
    s->n = a->state_segments(ctx, s->v, n);
    if (s->n > n) s->n = n;
    for (int i = 0; i < s->n; i++)
        if (s->v[i].row_bytes == 0) s->fixed_bytes += s->v[i].fixed_bytes;
    return MF_OK;
}

// Positions of a positional segment a snapshot holds: [first, n_past) (a ring: at
// most ring_keep, and never more than it has rows).
static int seg_first_pos(const struct mf_state_seg *sg, int n_past) {
    int keep = sg->ring_keep < sg->ring_rows ? sg->ring_keep : sg->ring_rows;
    return sg->ring_rows && n_past > keep ? n_past - keep : 0;
}

static uint64_t seg_data_bytes(const struct mf_state_seg *sg, int n_past) {
    return sg->row_bytes ? sg->row_bytes * (uint64_t)(n_past - seg_first_pos(sg, n_past))
                         : sg->fixed_bytes;
}

// Moves a segment's snapshot bytes between host and device: positions [first, n_past)
// in order (a ring's rows wrap, so at most two pieces), or the fixed bytes.
static void seg_move(mf_ctx *ctx, const struct mf_state_seg *sg, int n_past, uint8_t *host,
                     int to_device) {
    int first = seg_first_pos(sg, n_past), n = n_past - first;
    uint64_t done = 0;
    while (sg->row_bytes && n > 0) {
        int row = sg->ring_rows ? first % sg->ring_rows : first;
        int run = sg->ring_rows && n > sg->ring_rows - row ? sg->ring_rows - row : n;
        size_t off = (size_t)row * sg->row_bytes, nb = (size_t)run * sg->row_bytes;
        if (to_device) ctx->be->ops->upload(ctx->ex, sg->buf, off, host + done, nb);
        else ctx->be->ops->download(ctx->ex, host + done, sg->buf, off, nb);
        done += nb;
        first += run;
        n -= run;
    }
    if (!sg->row_bytes && sg->fixed_bytes) {
        if (to_device) ctx->be->ops->upload(ctx->ex, sg->buf, 0, host, sg->fixed_bytes);
        else ctx->be->ops->download(ctx->ex, host, sg->buf, 0, sg->fixed_bytes);
    }
}

/* ==== Byte writer and reader ====
 * Little-endian fixed-width fields; the reader checks every length against what is
 * left so a truncated buffer is reported, never read past. */

static uint8_t *put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + 4;
}

static uint8_t *put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + 8;
}

static uint64_t get_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

// The snapshot checksum. Byte-serial FNV-1a runs at ~0.4 GB/s (one multiply chain per
// byte), which would dominate saving and loading; so the body is read as little-endian
// u64 words, word i going to lane i % 4 (lane l starts at FNV_OFFSET ^ l; per word:
// lane ^= word, lane *= FNV_PRIME), four independent chains that run in parallel. Then
// byte FNV-1a folds the four lanes (as little-endian u64), the n % 8 tail bytes and n
// (as little-endian u64). Every single-bit change alters its lane's result (xor, then
// multiplication by an odd constant, is a bijection) and the length is folded in.
// A little-endian u64 at p: one load on little-endian hosts (GCC does not merge
// get_le's byte loop into a load, which held the checksum at ~2 GB/s instead of ~8).
static uint64_t load_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static uint64_t snap_checksum(const uint8_t *p, size_t n) {
    uint64_t lane[4] = {FNV_OFFSET, FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3};
    size_t n_words = n / 8, i = 0;
    for (; i + 4 <= n_words; i += 4)
        for (int l = 0; l < 4; l++) {
            lane[l] ^= load_le64(p + 8 * (i + (size_t)l));
            lane[l] *= FNV_PRIME;
        }
    for (; i < n_words; i++) {
        lane[i % 4] ^= load_le64(p + 8 * i);
        lane[i % 4] *= FNV_PRIME;
    }
    uint8_t tail[8 * 4 + 8];
    for (int l = 0; l < 4; l++) put_u64(tail + 8 * l, lane[l]);
    put_u64(tail + 32, (uint64_t)n);
    uint64_t h = fnv1a(FNV_OFFSET, tail, 32);
    h = fnv1a(h, p + 8 * n_words, n % 8);
    return fnv1a(h, tail + 32, 8);
}

struct reader {
    const uint8_t *p;
    size_t left;
};

static int rd_u32(struct reader *r, uint32_t *v) {
    if (r->left < 4) return 0;
    *v = (uint32_t)get_le(r->p, 4);
    r->p += 4;
    r->left -= 4;
    return 1;
}

static int rd_u64(struct reader *r, uint64_t *v) {
    if (r->left < 8) return 0;
    *v = get_le(r->p, 8);
    r->p += 8;
    r->left -= 8;
    return 1;
}

#define SEG_TABLE_BYTES (4 + 4 + 8 + 8 + 8)

static uint64_t header_bytes(int n_ident, int n_seg) {
    return 4 + 4 + 4 + 8ull * (uint64_t)n_ident + 4 + 4 +
           (uint64_t)SEG_TABLE_BYTES * (uint64_t)n_seg;
}

/* ==== Save ==== */

size_t mf_ctx_state_size(const mf_ctx *ctx) {
    if (!ctx) return 0;
    struct segs s;
    if (segs_get(ctx, &s) != MF_OK) return 0;
    struct ident id;
    ident_fill(ctx->model, SNAP_VERSION, &id);
    uint64_t n = header_bytes(id.n, s.n) + 8;
    for (int i = 0; i < s.n; i++) n += seg_data_bytes(&s.v[i], ctx->n_past);
    free(s.v);
    return (size_t)n;
}

int64_t mf_ctx_state_save(mf_ctx *ctx, void *dst, size_t cap) {
    if (!ctx) return MF_ERR_ARG;
    ctx->errmsg[0] = '\0';
    if (!dst) return mf_ctx_fail(ctx, MF_ERR_ARG, "state_save: dst is NULL");
    struct segs s;
    if (segs_get(ctx, &s) != MF_OK)
        return mf_ctx_fail(ctx, MF_ERR_NOMEM, "state_save: out of memory");
    struct ident id;
    ident_fill(ctx->model, SNAP_VERSION, &id);
    uint64_t need = header_bytes(id.n, s.n) + 8;
    for (int i = 0; i < s.n; i++) need += seg_data_bytes(&s.v[i], ctx->n_past);
    if (cap < need) {
        free(s.v);
        return mf_ctx_fail(ctx, MF_ERR_ARG,
                           "state_save: buffer of %zu bytes is too small, the snapshot "
                           "needs %" PRIu64 " (ask mf_ctx_state_size first)",
                           cap, need);
    }
    uint8_t *p = dst;
    memcpy(p, SNAP_MAGIC, 4);
    p = put_u32(p + 4, SNAP_VERSION);
    p = put_u32(p, (uint32_t)id.n);
    for (int i = 0; i < id.n; i++) p = put_u64(p, (uint64_t)id.v[i]);
    p = put_u32(p, (uint32_t)ctx->n_past);
    p = put_u32(p, (uint32_t)s.n);
    for (int i = 0; i < s.n; i++) {
        const struct mf_state_seg *sg = &s.v[i];
        p = put_u32(p, (uint32_t)sg->kind);
        p = put_u32(p, (uint32_t)sg->layer);
        p = put_u64(p, sg->row_bytes);
        p = put_u64(p, sg->fixed_bytes);
        p = put_u64(p, seg_data_bytes(sg, ctx->n_past));
    }
    for (int i = 0; i < s.n; i++) {
        seg_move(ctx, &s.v[i], ctx->n_past, p, 0);
        p += seg_data_bytes(&s.v[i], ctx->n_past);
    }
    uint64_t body = (uint64_t)(p - (uint8_t *)dst);
    put_u64(p, snap_checksum(dst, (size_t)body));
    free(s.v);
    return (int64_t)need;
}

/* ==== Checkpoints ====
 * A ring of copies of the fixed segments, keyed by the position they hold the state
 * after. Taken after every successful eval (so decode and prefill positions are all
 * candidates) and on load; dropped by reset and, beyond the target, by truncation.
 * Slots are allocated once and reused, so a long generation does not malloc per
 * token. */

struct ckpt {
    int n_past;          // -1 when empty
    uint8_t *data;       // [fixed_bytes] every fixed segment in order (backend memory)
};

struct ckpt_set {
    int n_slots;
    uint64_t fixed_bytes;
    struct ckpt slot[MAX_CHECKPOINTS];
};

// How many checkpoints this ctx keeps for fixed state of fixed_bytes (0 = none).
static int n_slots_for(const mf_ctx *ctx, uint64_t fixed_bytes) {
    int n = ctx->params.n_checkpoints;
    if (n < 0) return 0;
    if (n > 0) return n > MAX_CHECKPOINTS ? MAX_CHECKPOINTS : n;
    uint64_t fit = CHECKPOINT_BUDGET_BYTES / (fixed_bytes ? fixed_bytes : 1);
    return fit < 1 ? 1 : fit > DEFAULT_CHECKPOINTS ? DEFAULT_CHECKPOINTS : (int)fit;
}

static struct ckpt_set *ckpts_get(mf_ctx *ctx, uint64_t fixed_bytes) {
    struct ckpt_set *cs = ctx->checkpoints;
    if (cs && cs->fixed_bytes != fixed_bytes) {
        mf_state_on_reset(ctx);   // segment sizes changed: none of them fits
        cs = NULL;
    }
    if (cs) return cs;
    cs = calloc(1, sizeof *cs);
    if (!cs) return NULL;
    cs->n_slots = n_slots_for(ctx, fixed_bytes);
    cs->fixed_bytes = fixed_bytes;
    for (int i = 0; i < MAX_CHECKPOINTS; i++) cs->slot[i].n_past = -1;
    ctx->checkpoints = cs;
    return cs;
}

static void ckpt_take(mf_ctx *ctx, const struct segs *s) {
    if (s->fixed_bytes == 0 || n_slots_for(ctx, s->fixed_bytes) == 0) return;
    struct ckpt_set *cs = ckpts_get(ctx, s->fixed_bytes);
    if (!cs) return;   // out of memory: truncation will refuse instead
    // Reuse the slot already at this position, else an empty one, else the oldest
    // position (the most recent positions are the likeliest truncation targets).
    struct ckpt *use = NULL;
    for (int i = 0; i < cs->n_slots && !use; i++)
        if (cs->slot[i].n_past == ctx->n_past) use = &cs->slot[i];
    for (int i = 0; i < cs->n_slots && !use; i++)
        if (cs->slot[i].n_past < 0) use = &cs->slot[i];
    if (!use) {
        use = &cs->slot[0];
        for (int i = 1; i < cs->n_slots; i++)
            if (cs->slot[i].n_past < use->n_past) use = &cs->slot[i];
    }
    if (!use->data) use->data = ctx->be->ops->alloc(ctx->ex, (size_t)s->fixed_bytes);
    if (!use->data) {
        use->n_past = -1;
        return;
    }
    size_t off = 0;
    for (int i = 0; i < s->n; i++) {
        if (s->v[i].row_bytes) continue;
        ctx->be->ops->copy(ctx->ex, use->data, off, s->v[i].buf, 0,
                           (size_t)s->v[i].fixed_bytes);
        off += s->v[i].fixed_bytes;
    }
    use->n_past = ctx->n_past;
}

static void ckpt_drop_after(mf_ctx *ctx, int n) {
    struct ckpt_set *cs = ctx->checkpoints;
    if (!cs) return;
    for (int i = 0; i < cs->n_slots; i++)
        if (cs->slot[i].n_past > n) cs->slot[i].n_past = -1;
}

void mf_state_after_eval(mf_ctx *ctx) {
    struct segs s;
    if (segs_get(ctx, &s) != MF_OK) return;
    ckpt_take(ctx, &s);
    free(s.v);
}

int mf_ctx_checkpoints_set(mf_ctx *ctx, int n) {
    if (!ctx) return MF_ERR_ARG;
    ctx->errmsg[0] = '\0';
    if (n < -1 || n > MAX_CHECKPOINTS)
        return mf_ctx_fail(ctx, MF_ERR_ARG,
                           "checkpoints: %d is not -1 (none), 0 (default) or 1..%d", n,
                           MAX_CHECKPOINTS);
    mf_state_on_reset(ctx);
    ctx->params.n_checkpoints = n;
    return MF_OK;
}

void mf_state_on_reset(mf_ctx *ctx) {
    struct ckpt_set *cs = ctx->checkpoints;
    if (!cs) return;
    for (int i = 0; i < MAX_CHECKPOINTS; i++)
        if (cs->slot[i].data) ctx->be->ops->dealloc(ctx->ex, cs->slot[i].data);
    free(cs);
    ctx->checkpoints = NULL;
}

/* ==== Load ====
 * Everything is checked first: format (magic, version, checksum, table against the
 * data), then identity against this model, then fit in this ctx. Only then are bytes
 * uploaded, so a refused snapshot leaves the ctx exactly as it was. */

static int check_format(mf_ctx *ctx, const uint8_t *src, size_t size) {
    if (size < 12)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot truncated: %zu bytes, shorter than its header", size);
    if (memcmp(src, SNAP_MAGIC, 4) != 0)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "not a moeflux snapshot: magic is not \"MFLX\"");
    uint32_t version = (uint32_t)get_le(src + 4, 4);
    if (version > SNAP_VERSION)
        return mf_ctx_fail(ctx, MF_ERR_UNSUPPORTED,
                           "snapshot format version %u is newer than this build reads "
                           "(%u): upgrade moeflux",
                           version, SNAP_VERSION);
    if (version == 0)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT, "snapshot format version 0 is invalid");
    if (size < header_bytes(0, 0) + 8)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot truncated: %zu bytes, shorter than its header", size);
    uint64_t want = get_le(src + size - 8, 8);
    uint64_t got = snap_checksum(src, size - 8);
    if (want != got)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot corrupted or truncated: checksum %016" PRIx64
                           " does not match its content (%016" PRIx64 ")",
                           want, got);
    return MF_OK;
}

// Reads the identity fields (at most MAX_IDENT) into theirs; the architecture is
// compared before the count, so a snapshot of another family is named as such.
static int check_identity(mf_ctx *ctx, struct reader *r, uint32_t version) {
    struct ident mine;
    ident_fill(ctx->model, version, &mine);
    uint32_t n_ident = 0;
    if (!rd_u32(r, &n_ident) || n_ident < 1 || n_ident > MAX_IDENT)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot header holds %u identity fields, format version %u "
                           "of this %s model has %d",
                           n_ident, version, arch_name(mine.v[0]), mine.n);
    int64_t theirs[MAX_IDENT] = {0};
    for (uint32_t i = 0; i < n_ident; i++) {
        uint64_t v = 0;
        if (!rd_u64(r, &v))
            return mf_ctx_fail(ctx, MF_ERR_FORMAT, "snapshot truncated in its header");
        theirs[i] = (int64_t)v;
    }
    if (theirs[0] != mine.v[0])
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "snapshot is of model %s (architecture id %" PRId64
                           "), this ctx runs %s",
                           arch_name(theirs[0]), theirs[0], arch_name(mine.v[0]));
    if (n_ident != (uint32_t)mine.n)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot header holds %u identity fields, format version %u "
                           "of this %s model has %d",
                           n_ident, version, arch_name(mine.v[0]), mine.n);
    for (int i = 0; i < mine.n; i++) {
        if (theirs[i] == mine.v[i]) continue;
        if (i >= mine.n_hash_from)
            return mf_ctx_fail(ctx, MF_ERR_STATE,
                               "snapshot is of another %s model (%s differs: expected "
                               "%016" PRIx64 ", got %016" PRIx64 ")",
                               arch_name(mine.v[0]), mine.name[i], (uint64_t)mine.v[i],
                               (uint64_t)theirs[i]);
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "snapshot is of another %s model: shape field %s differs: "
                           "expected %" PRId64 ", got %" PRId64,
                           arch_name(mine.v[0]), mine.name[i], mine.v[i], theirs[i]);
    }
    return MF_OK;
}

// Check the segment table against this ctx's segments and the buffer's length.
static int check_segments(mf_ctx *ctx, struct reader *r, const struct segs *s,
                          uint32_t n_past) {
    uint32_t n_seg = 0;
    if (!rd_u32(r, &n_seg))
        return mf_ctx_fail(ctx, MF_ERR_FORMAT, "snapshot truncated in its header");
    if (n_seg != (uint32_t)s->n)
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "snapshot holds %u state segments, this ctx has %d", n_seg,
                           s->n);
    uint64_t total = 0;
    for (int i = 0; i < s->n; i++) {
        uint32_t kind = 0, layer = 0;
        uint64_t row = 0, fixed = 0, data = 0;
        if (!rd_u32(r, &kind) || !rd_u32(r, &layer) || !rd_u64(r, &row) ||
            !rd_u64(r, &fixed) || !rd_u64(r, &data))
            return mf_ctx_fail(ctx, MF_ERR_FORMAT, "snapshot truncated in its table");
        const struct mf_state_seg *sg = &s->v[i];
        if ((int)kind != sg->kind || (int32_t)layer != sg->layer || row != sg->row_bytes ||
            fixed != sg->fixed_bytes)
            return mf_ctx_fail(ctx, MF_ERR_STATE,
                               "snapshot segment %d (kind %u, layer %d, %" PRIu64
                               " bytes/row, %" PRIu64 " fixed bytes) differs from this "
                               "ctx's (kind %d, layer %d, %" PRIu64 ", %" PRIu64 ")",
                               i, kind, (int32_t)layer, row, fixed, sg->kind, sg->layer,
                               sg->row_bytes, sg->fixed_bytes);
        if (data != seg_data_bytes(sg, (int)n_past))
            return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                               "snapshot segment %d holds %" PRIu64 " bytes, %u "
                               "positions need %" PRIu64,
                               i, data, n_past, seg_data_bytes(sg, (int)n_past));
        total += data;
    }
    if (r->left != total)
        return mf_ctx_fail(ctx, MF_ERR_FORMAT,
                           "snapshot data is %zu bytes, its table says %" PRIu64, r->left,
                           total);
    return MF_OK;
}

int mf_ctx_state_load(mf_ctx *ctx, const void *src, size_t size) {
    if (!ctx) return MF_ERR_ARG;
    ctx->errmsg[0] = '\0';
    if (!src) return mf_ctx_fail(ctx, MF_ERR_ARG, "state_load: src is NULL");
    int rc = check_format(ctx, src, size);
    if (rc != MF_OK) return rc;
    // The reader sees what lies between the magic+version and the checksum trailer.
    struct reader r = {(const uint8_t *)src + 8, size - 16};
    rc = check_identity(ctx, &r, (uint32_t)get_le((const uint8_t *)src + 4, 4));
    if (rc != MF_OK) return rc;
    uint32_t n_past = 0;
    if (!rd_u32(&r, &n_past))
        return mf_ctx_fail(ctx, MF_ERR_FORMAT, "snapshot truncated in its header");
    if (n_past > (uint32_t)ctx->n_ctx)
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "snapshot holds %u tokens, more than this ctx's n_ctx %d",
                           n_past, ctx->n_ctx);
    struct segs s;
    if (segs_get(ctx, &s) != MF_OK)
        return mf_ctx_fail(ctx, MF_ERR_NOMEM, "state_load: out of memory");
    rc = check_segments(ctx, &r, &s, n_past);
    if (rc != MF_OK) {
        free(s.v);
        return rc;
    }
    // Valid: from here on nothing can fail.
    for (int i = 0; i < s.n; i++) {
        seg_move(ctx, &s.v[i], (int)n_past, (uint8_t *)r.p, 1);
        r.p += seg_data_bytes(&s.v[i], (int)n_past);
    }
    ctx->n_past = (int)n_past;
    // Old checkpoints belong to another sequence; the loaded state is the first of
    // this one, so truncating back to the snapshot point stays exact.
    mf_state_on_reset(ctx);
    ckpt_take(ctx, &s);
    free(s.v);
    return MF_OK;
}

/* ==== Truncation ==== */

// A ring holds positions [n_past - ring_rows, n_past): truncating to n is exact while
// it still holds the ring_keep positions before n.
static int ring_truncatable(mf_ctx *ctx, const struct segs *s, int n) {
    for (int i = 0; i < s->n; i++) {
        const struct mf_state_seg *sg = &s->v[i];
        int need = n > sg->ring_keep ? n - sg->ring_keep : 0;
        if (!sg->ring_rows || need >= ctx->n_past - sg->ring_rows) continue;
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "truncate(%d) cannot be exact: layer %d keeps its last %d "
                           "positions in a ring of %d rows, which no longer holds "
                           "positions from %d on (truncate by at most %d tokens; 0 is "
                           "always possible), or load a snapshot saved at %d",
                           n, sg->layer, sg->ring_keep, sg->ring_rows, need,
                           sg->ring_rows - sg->ring_keep, n);
    }
    return MF_OK;
}

int mf_ctx_truncate(mf_ctx *ctx, int n) {
    if (!ctx) return MF_ERR_ARG;
    ctx->errmsg[0] = '\0';
    if (n < 0 || n > ctx->n_past)
        return mf_ctx_fail(ctx, MF_ERR_ARG,
                           "truncate(%d): the sequence holds %d tokens (0 <= n <= %d)", n,
                           ctx->n_past, ctx->n_past);
    if (n == ctx->n_past) return MF_OK;
    if (n == 0) {
        mf_ctx_reset(ctx);
        return MF_OK;
    }
    struct segs s;
    if (segs_get(ctx, &s) != MF_OK)
        return mf_ctx_fail(ctx, MF_ERR_NOMEM, "truncate: out of memory");
    int rc = ring_truncatable(ctx, &s, n);
    if (rc != MF_OK) {
        free(s.v);
        return rc;
    }
    if (s.fixed_bytes == 0) {
        // Attention-only: rows at n and beyond become dead; nothing else moves.
        free(s.v);
        ctx->n_past = n;
        ckpt_drop_after(ctx, n);
        return MF_OK;
    }
    struct ckpt_set *cs = ctx->checkpoints;
    const struct ckpt *hit = NULL;
    if (cs && cs->fixed_bytes == s.fixed_bytes)
        for (int i = 0; i < cs->n_slots; i++)
            if (cs->slot[i].n_past == n) hit = &cs->slot[i];
    if (!hit) {
        char held[256] = "";
        size_t len = 0;
        for (int i = 0; cs && i < cs->n_slots; i++) {
            if (cs->slot[i].n_past < 0 || len >= sizeof held) continue;
            int w = snprintf(held + len, sizeof held - len, "%s%d", len ? ", " : "",
                             cs->slot[i].n_past);
            if (w > 0) len += (size_t)w;
        }
        free(s.v);
        return mf_ctx_fail(ctx, MF_ERR_STATE,
                           "truncate(%d) cannot be exact: this model has linear-attention "
                           "state and no checkpoint at position %d is held (held: %s%s; "
                           "0 is always possible). Re-evaluate the prefix, or load a "
                           "snapshot saved at %d",
                           n, n, len ? held : "none",
                           n_slots_for(ctx, s.fixed_bytes) ? ""
                                                            : ", checkpoints are off",
                           n);
    }
    size_t off = 0;
    for (int i = 0; i < s.n; i++) {
        if (s.v[i].row_bytes) continue;
        ctx->be->ops->copy(ctx->ex, s.v[i].buf, 0, hit->data, off,
                           (size_t)s.v[i].fixed_bytes);
        off += s.v[i].fixed_bytes;
    }
    free(s.v);
    ctx->n_past = n;
    ckpt_drop_after(ctx, n);
    return MF_OK;
}
