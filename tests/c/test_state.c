/*
 * test_state.c — core/state.c without a real model: a fake architecture whose state is
 * two fixed segments (like a GatedDeltaNet layer) and two positional ones (like an
 * attention layer), held in CPU-backend buffers, and a fake "eval" that advances them
 * deterministically. Checks snapshot round trips, every refusal with the ctx left
 * unchanged, checkpoint-based truncation and its ring bound, and a mutation fuzzer over
 * snapshots (bit flips, truncations, resealed field changes) meant for `make asan`.
 * Real-model behaviour (bit-exact continuation, agreement with mlx-lm) is tested in
 * tests/test_state.py.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "core/internal.h"

/* ==== A fake architecture ==== */

#define CONV_BYTES 96
#define REC_BYTES 256
#define ROW_BYTES 32
#define N_CTX 40
// Identity fields in a version-2 snapshot header of a family without fields of its own
// (state.c: 14 shared + 4 tail).
#define N_IDENT 18

struct fake_state {
    uint8_t *conv;   // [CONV_BYTES] device (CPU) buffer
    uint8_t *rec;    // [REC_BYTES]
    uint8_t *k;      // [N_CTX, ROW_BYTES]
    uint8_t *v;
    int n_ctx;
};

static int fake_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    const struct fake_state *s = ctx->arch_state;
    struct mf_state_seg all[4] = {
        {s->conv, 0, CONV_BYTES, 0, MF_SEG_CONV, 0, 0},
        {s->rec, 0, REC_BYTES, 0, MF_SEG_RECURRENT, 0, 0},
        {s->k, ROW_BYTES, 0, 1, MF_SEG_KEY, 0, 0},
        {s->v, ROW_BYTES, 0, 1, MF_SEG_VALUE, 0, 0},
    };
    for (int i = 0; i < 4 && i < cap; i++)
        segs[i] = all[i];
    return 4;
}

static void fake_reset(mf_ctx *ctx) {
    struct fake_state *s = ctx->arch_state;
    memset(s->conv, 0, CONV_BYTES);
    memset(s->rec, 0, REC_BYTES);
    memset(s->k, 0, (size_t)s->n_ctx * ROW_BYTES);
    memset(s->v, 0, (size_t)s->n_ctx * ROW_BYTES);
}

static const struct mf_arch fake_arch = {
    .model_type = "fake",
    .id = MF_ARCH_QWEN3_NEXT,
    .state_reset = fake_reset,
    .state_segments = fake_segments,
};

// "Evaluate" one token: the fixed state is a running mix of every token so far (so
// it cannot be rebuilt from the rows), the rows depend on the token and position.
static void fake_eval(mf_ctx *ctx, int tok) {
    struct fake_state *s = ctx->arch_state;
    for (int i = 0; i < CONV_BYTES; i++)
        s->conv[i] = (uint8_t)(s->conv[i] * 31 + tok + i);
    for (int i = 0; i < REC_BYTES; i++)
        s->rec[i] = (uint8_t)(s->rec[i] * 17 + tok * 3 + i);
    for (int i = 0; i < ROW_BYTES; i++) {
        s->k[(size_t)ctx->n_past * ROW_BYTES + i] = (uint8_t)(tok + i + ctx->n_past);
        s->v[(size_t)ctx->n_past * ROW_BYTES + i] = (uint8_t)(tok * 7 + i);
    }
    ctx->n_past++;
    mf_state_after_eval(ctx);
}

struct fixture {
    struct mf_backend *be;
    mf_model model;
};

static int fixture_init(struct fixture *f) {
    memset(f, 0, sizeof *f);
    char err[256];
    if (mf_backend_cpu_new(&f->be, err, sizeof err) != MF_OK) {
        fprintf(stderr, "cpu backend: %s\n", err);
        return -1;
    }
    f->model.be = f->be;
    f->model.arch = &fake_arch;
    f->model.cfg.arch = MF_ARCH_QWEN3_NEXT;
    f->model.cfg.hidden_size = 64;
    f->model.cfg.num_hidden_layers = 2;
    f->model.cfg.vocab_size = 100;
    f->model.manifest.hash = 0x1234abcdULL;
    f->model.expert_bytes_per_token = 4096;
    return 0;
}

static mf_ctx *ctx_new(struct fixture *f, int n_ctx) {
    mf_ctx *ctx = calloc(1, sizeof *ctx);
    struct fake_state *s = calloc(1, sizeof *s);
    char err[256];
    if (!ctx || !s || f->be->ops->exec_new(f->be, 1, &ctx->ex, err, sizeof err) != MF_OK) {
        free(ctx);
        free(s);
        return NULL;
    }
    ctx->model = &f->model;
    ctx->be = f->be;
    ctx->n_ctx = n_ctx;
    s->n_ctx = n_ctx;
    s->conv = f->be->ops->alloc(ctx->ex, CONV_BYTES);
    s->rec = f->be->ops->alloc(ctx->ex, REC_BYTES);
    s->k = f->be->ops->alloc(ctx->ex, (size_t)n_ctx * ROW_BYTES);
    s->v = f->be->ops->alloc(ctx->ex, (size_t)n_ctx * ROW_BYTES);
    ctx->arch_state = s;
    return ctx;
}

static void ctx_free(mf_ctx *ctx) {
    if (!ctx)
        return;
    struct fake_state *s = ctx->arch_state;
    mf_state_on_reset(ctx);
    ctx->be->ops->dealloc(ctx->ex, s->conv);
    ctx->be->ops->dealloc(ctx->ex, s->rec);
    ctx->be->ops->dealloc(ctx->ex, s->k);
    ctx->be->ops->dealloc(ctx->ex, s->v);
    ctx->be->ops->exec_free(ctx->ex);
    free(s);
    free(ctx);
}

// The observable state: n_past, fixed segments and live rows, as one byte string
// (independent of state.c's format).
static size_t observe(const mf_ctx *ctx, uint8_t *out) {
    const struct fake_state *s = ctx->arch_state;
    size_t n = 0, rows = (size_t)ctx->n_past * ROW_BYTES;
    memcpy(out + n, &ctx->n_past, sizeof ctx->n_past);
    n += sizeof ctx->n_past;
    memcpy(out + n, s->conv, CONV_BYTES);
    n += CONV_BYTES;
    memcpy(out + n, s->rec, REC_BYTES);
    n += REC_BYTES;
    memcpy(out + n, s->k, rows);
    n += rows;
    memcpy(out + n, s->v, rows);
    return n + rows;
}

#define OBS_MAX (sizeof(int) + CONV_BYTES + REC_BYTES + 2 * N_CTX * ROW_BYTES)

static int same_state(const mf_ctx *a, const mf_ctx *b) {
    static_assert(OBS_MAX < 8192, "observation buffer");
    uint8_t x[8192], y[8192];
    size_t nx = observe(a, x), ny = observe(b, y);
    return nx == ny && memcmp(x, y, nx) == 0;
}

static uint8_t *snapshot(mf_ctx *ctx, size_t *n) {
    *n = mf_ctx_state_size(ctx);
    uint8_t *buf = malloc(*n);
    if (!buf)
        return NULL;
    int64_t rc = mf_ctx_state_save(ctx, buf, *n);
    CHECK(rc == (int64_t)*n, "save returned %lld for size %zu", (long long)rc, *n);
    return buf;
}

// The snapshot checksum as documented in state.c (four FNV-1a-style lanes over
// little-endian u64 words, folded with byte FNV-1a with the tail and the length),
// written again here to reseal a modified snapshot.
static uint64_t fnv_bytes(uint64_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void reseal(uint8_t *buf, size_t n) {
    const uint64_t basis = 0xcbf29ce484222325ULL;
    size_t body = n - 8, n_words = body / 8;
    uint64_t lane[4] = {basis, basis ^ 1, basis ^ 2, basis ^ 3};
    for (size_t i = 0; i < n_words; i++) {
        uint64_t w = 0;
        for (int b = 0; b < 8; b++)
            w |= (uint64_t)buf[8 * i + (size_t)b] << (8 * b);
        lane[i % 4] = (lane[i % 4] ^ w) * 0x100000001b3ULL;
    }
    uint8_t le[40];
    for (int l = 0; l < 5; l++) {
        uint64_t v = l < 4 ? lane[l] : (uint64_t)body;
        for (int b = 0; b < 8; b++)
            le[8 * l + b] = (uint8_t)(v >> (8 * b));
    }
    uint64_t h = fnv_bytes(basis, le, 32);
    h = fnv_bytes(h, buf + 8 * n_words, body % 8);
    h = fnv_bytes(h, le + 32, 8);
    for (int i = 0; i < 8; i++)
        buf[n - 8 + i] = (uint8_t)(h >> (8 * i));
}

/* ==== Tests ==== */

static void test_roundtrip(struct fixture *f) {
    mf_ctx *a = ctx_new(f, N_CTX), *b = ctx_new(f, 12), *fresh = ctx_new(f, N_CTX);
    for (int t = 0; t < 10; t++)
        fake_eval(a, 5 + t);
    size_t n;
    uint8_t *snap = snapshot(a, &n);
    for (int t = 0; t < 10; t++)
        fake_eval(fresh, 5 + t);
    fake_eval(a, 99);
    fake_eval(a, 98);
    CHECK(mf_ctx_state_load(a, snap, n) == MF_OK, "load: %s", mf_ctx_errmsg(a));
    CHECK(same_state(a, fresh), "state after load differs");
    // Another ctx with a smaller n_ctx that still holds 10 positions, with stale state.
    fake_eval(b, 1);
    CHECK(mf_ctx_state_load(b, snap, n) == MF_OK, "load into b: %s", mf_ctx_errmsg(b));
    CHECK(same_state(b, fresh), "state in b differs");
    fake_eval(b, 7);
    fake_eval(fresh, 7);
    CHECK(same_state(b, fresh), "continuation in b differs");
    // The loaded point is a truncation target.
    CHECK(mf_ctx_truncate(b, 10) == MF_OK, "truncate to the load point: %s",
          mf_ctx_errmsg(b));
    CHECK(b->n_past == 10, "n_past %d", b->n_past);
    free(snap);
    // Too long for a ctx of n_ctx 8.
    mf_ctx *small = ctx_new(f, 8);
    snap = snapshot(a, &n);
    CHECK(mf_ctx_state_load(small, snap, n) == MF_ERR_STATE, "n_ctx 8 accepted 10");
    CHECK(small->n_past == 0, "small changed");
    CHECK(mf_ctx_state_save(a, snap, n - 1) == MF_ERR_ARG, "short buffer accepted");
    free(snap);
    ctx_free(small);
    ctx_free(a);
    ctx_free(b);
    ctx_free(fresh);
}

static void test_truncate(struct fixture *f) {
    mf_ctx *a = ctx_new(f, N_CTX), *ref = ctx_new(f, N_CTX);
    int toks[20];
    for (int t = 0; t < 20; t++) {
        toks[t] = (t * 37 + 11) % 100;
        fake_eval(a, toks[t]);
    }
    // The ring keeps the 8 most recent end points: 13..20.
    uint8_t before[8192], after[8192];
    size_t nb = observe(a, before);
    int rc = mf_ctx_truncate(a, 12);
    CHECK(rc == MF_ERR_STATE, "truncate(12) gave %d", rc);
    CHECK(strstr(mf_ctx_errmsg(a), "held:") != NULL, "message: %s", mf_ctx_errmsg(a));
    CHECK(observe(a, after) == nb && memcmp(before, after, nb) == 0, "refused truncate "
          "changed the state");
    CHECK(mf_ctx_truncate(a, 21) == MF_ERR_ARG, "truncate past n_past accepted");
    for (int n = 19; n >= 13; n -= 3) {
        CHECK(mf_ctx_truncate(a, n) == MF_OK, "truncate(%d): %s", n, mf_ctx_errmsg(a));
        mf_ctx_reset(ref);
        for (int t = 0; t < n; t++)
            fake_eval(ref, toks[t]);
        CHECK(same_state(a, ref), "truncate(%d) differs from a fresh prefix", n);
    }
    // After truncating to 13, positions above are gone even once re-evaluated past.
    fake_eval(a, 3);
    CHECK(mf_ctx_truncate(a, 16) == MF_ERR_ARG, "truncate past n_past accepted");
    CHECK(mf_ctx_truncate(a, 13) == MF_OK, "truncate(13) again: %s", mf_ctx_errmsg(a));
    CHECK(mf_ctx_truncate(a, 0) == MF_OK && a->n_past == 0, "truncate(0)");
    mf_ctx_reset(ref);
    CHECK(same_state(a, ref), "truncate(0) is not a reset");
    CHECK(a->checkpoints == NULL, "reset kept checkpoints");
    // The count is configurable: 2 keeps the two most recent end points, -1 none.
    CHECK(mf_ctx_checkpoints_set(a, 65) == MF_ERR_ARG, "65 checkpoints accepted");
    CHECK(mf_ctx_checkpoints_set(a, -2) == MF_ERR_ARG, "-2 checkpoints accepted");
    CHECK(mf_ctx_checkpoints_set(a, 2) == MF_OK, "2 checkpoints refused");
    for (int t = 0; t < 6; t++)
        fake_eval(a, toks[t]);
    CHECK(mf_ctx_truncate(a, 4) == MF_ERR_STATE, "truncate(4) with 2 checkpoints");
    CHECK(mf_ctx_truncate(a, 5) == MF_OK, "truncate(5) with 2 checkpoints: %s",
          mf_ctx_errmsg(a));
    CHECK(mf_ctx_checkpoints_set(a, -1) == MF_OK, "-1 checkpoints refused");
    fake_eval(a, 9);
    CHECK(mf_ctx_truncate(a, 5) == MF_ERR_STATE, "truncate with checkpoints off");
    CHECK(strstr(mf_ctx_errmsg(a), "off") != NULL, "message: %s", mf_ctx_errmsg(a));
    CHECK(a->checkpoints == NULL, "checkpoints allocated while off");
    CHECK(mf_ctx_checkpoints_set(a, 0) == MF_OK, "default refused");
    ctx_free(a);
    ctx_free(ref);
}

static void expect_refused(mf_ctx *ctx, const uint8_t *buf, size_t n, int want,
                           const char *what) {
    uint8_t before[8192], after[8192];
    size_t nb = observe(ctx, before);
    int rc = mf_ctx_state_load(ctx, buf, n);
    CHECK(rc == want, "%s: got %d, want %d (%s)", what, rc, want, mf_ctx_errmsg(ctx));
    CHECK(mf_ctx_errmsg(ctx)[0] != '\0', "%s: no message", what);
    CHECK(observe(ctx, after) == nb && memcmp(before, after, nb) == 0,
          "%s: ctx changed", what);
}

static void test_refusals(struct fixture *f) {
    mf_ctx *a = ctx_new(f, N_CTX);
    for (int t = 0; t < 6; t++)
        fake_eval(a, t + 1);
    size_t n;
    uint8_t *snap = snapshot(a, &n);
    uint8_t *buf = malloc(n + 16);
    fake_eval(a, 50);   // so a refused load would be visible
    // Identity fields (12 + 8 i, N_IDENT of them), resealed: another model.
    for (int i = 0; i < N_IDENT; i++) {
        memcpy(buf, snap, n);
        buf[12 + 8 * i] ^= 0x40;
        expect_refused(a, buf, n, MF_ERR_FORMAT, "identity unsealed");
        reseal(buf, n);
        expect_refused(a, buf, n, MF_ERR_STATE, "identity resealed");
    }
    memcpy(buf, snap, n);
    buf[4] = 3;
    reseal(buf, n);
    expect_refused(a, buf, n, MF_ERR_UNSUPPORTED, "version 3");
    buf[4] = 1;   // read as version 1: its 34 fields are not this header's 18
    reseal(buf, n);
    expect_refused(a, buf, n, MF_ERR_FORMAT, "version 1 relabelled");
    buf[4] = 0;
    reseal(buf, n);
    expect_refused(a, buf, n, MF_ERR_FORMAT, "version 0");
    memcpy(buf, snap, n);
    buf[0] = 'X';
    reseal(buf, n);
    expect_refused(a, buf, n, MF_ERR_FORMAT, "magic");
    // The model itself changes shape: the snapshot is of another model now.
    f->model.cfg.hidden_size = 65;
    expect_refused(a, snap, n, MF_ERR_STATE, "hidden_size");
    f->model.cfg.hidden_size = 64;
    f->model.manifest.hash ^= 1;
    expect_refused(a, snap, n, MF_ERR_STATE, "manifest hash");
    f->model.manifest.hash ^= 1;
    for (size_t cut = 0; cut < n; cut += 7)
        expect_refused(a, snap, cut, MF_ERR_FORMAT, "truncated");
    CHECK(mf_ctx_state_load(a, snap, n) == MF_OK, "the original still loads");
    free(buf);
    free(snap);
    ctx_free(a);
}

// Random damage of every kind; run under ASan/UBSan it checks the reader never goes
// out of bounds. Resealed damage may legitimately load (e.g. a changed data byte):
// then the state must be exactly what the damaged bytes say, which observe() cannot
// predict, so only "no crash and a defined status" is asserted for those.
static void test_fuzz(struct fixture *f) {
    mf_ctx *a = ctx_new(f, N_CTX);
    for (int t = 0; t < 9; t++)
        fake_eval(a, t * 3);
    size_t n;
    uint8_t *snap = snapshot(a, &n);
    uint8_t *buf = malloc(n + 64);
    uint64_t rng = 0x9e3779b97f4a7c15ULL;
    for (int it = 0; it < 20000; it++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        size_t len = n;
        memcpy(buf, snap, n);
        int mode = (int)(rng % 4);
        size_t pos = (size_t)((rng >> 8) % n);
        if (mode == 0) {
            buf[pos] ^= (uint8_t)(1u << ((rng >> 40) % 8));
        } else if (mode == 1) {
            len = pos;
        } else if (mode == 2) {
            // A header or table field, resealed.
            size_t hdr = 12 + 8 * N_IDENT + 8 + 4 * 32;
            buf[pos % hdr] = (uint8_t)(rng >> 32);
            reseal(buf, len);
        } else {
            len = n + 1 + (size_t)((rng >> 20) % 63);   // at least one byte more
            memset(buf + n, (int)(rng >> 50), len - n);
            reseal(buf, len);
        }
        int rc = mf_ctx_state_load(a, buf, len);
        CHECK(rc == MF_OK || rc == MF_ERR_FORMAT || rc == MF_ERR_STATE ||
              rc == MF_ERR_UNSUPPORTED, "fuzz %d: status %d", it, rc);
        if (mode != 2)
            CHECK(rc != MF_OK, "fuzz %d: damage (mode %d at %zu) accepted", it, mode, pos);
        if (rc != MF_OK || it % 64 == 0)
            CHECK(mf_ctx_state_load(a, snap, n) == MF_OK, "reload");
    }
    free(buf);
    free(snap);
    ctx_free(a);
}

int main(void) {
    struct fixture f;
    if (fixture_init(&f) != 0)
        return 1;
    test_roundtrip(&f);
    test_truncate(&f);
    test_refusals(&f);
    test_fuzz(&f);
    f.be->ops->free(f.be);
    return check_finish("test_state");
}
