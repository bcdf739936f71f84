/*
 * test_store.c — the on-disk readers below the forward passes: the tensor manifest
 * (ranges, sizes, sorting, hash), the bind helpers (quantized vs float decided by
 * .scales, bits and group size derived from shapes and cross-checked with the
 * manifest and config.json), and the expert store (layout validation in both the
 * moeflux and the reference-system form, per-layer files, byte-exact reads, every
 * refusal, and the calls the asynchronous reader builds on: id and size checks, the
 * O_DIRECT refusal for unaligned experts, mapping and pre-faulting). Files are written
 * into a fresh temporary directory.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/common.h"
#include "core/internal.h"
#include "core/weights.h"

static char tmpdir[256];

/* ==== Manifest ==== */

static const char *const MANIFEST =
    "{\"model\": \"src\", \"num_tensors\": 4, \"tensors\": {"
    " \"z.weight\": {\"offset\": 0, \"size\": 64, \"shape\": [4, 4], \"dtype\": \"F32\"},"
    " \"a.weight\": {\"offset\": 64, \"size\": 32, \"shape\": [4, 4], \"dtype\": \"BF16\"},"
    " \"m.weight\": {\"offset\": 128, \"size\": 16, \"shape\": [2, 2], \"dtype\": \"U32\","
    "   \"bits\": 4, \"group_size\": 64},"
    " \"s\": {\"offset\": 192, \"size\": 4, \"shape\": [], \"dtype\": \"F32\"}},"
    " \"config\": {\"hidden_size\": 4}}";

static int man_parse(struct mf_manifest *m, const char *text, uint64_t bin, char *err,
                     size_t errlen) {
    return mf_manifest_parse(m, text, strlen(text), "mw.json", bin, err, errlen);
}

static char *replace(const char *text, const char *from, const char *to) {
    const char *p = strstr(text, from);
    if (!p)
        return NULL;
    size_t n = strlen(text) - strlen(from) + strlen(to) + 1;
    char *out = malloc(n);
    if (out)
        snprintf(out, n, "%.*s%s%s", (int)(p - text), text, to, p + strlen(from));
    return out;
}

static void man_expect(const char *from, const char *to, uint64_t bin, int status,
                       const char *needle) {
    char *t = replace(MANIFEST, from, to);
    CHECK(t != NULL, "edit '%s' not found", from);
    if (!t)
        return;
    struct mf_manifest m;
    char err[512] = "";
    int rc = man_parse(&m, t, bin, err, sizeof err);
    CHECK(rc == status, "%s -> %s: status %d, expected %d (%s)", from, to, rc, status, err);
    CHECK(strstr(err, needle) != NULL, "%s -> %s: '%s' lacks '%s'", from, to, err, needle);
    CHECK(m.tensors == NULL && m.n_tensors == 0, "nothing held after failure");
    if (!rc)
        mf_manifest_free(&m);
    free(t);
}

static void test_manifest(void) {
    struct mf_manifest m;
    char err[512] = "";
    int rc = man_parse(&m, MANIFEST, 196, err, sizeof err);
    CHECK(rc == MF_OK, "manifest: %s", err);
    if (rc)
        return;
    CHECK(m.n_tensors == 4 && strcmp(m.tensors[0].name, "a.weight") == 0 &&
              strcmp(m.tensors[3].name, "z.weight") == 0,
          "sorted by name");
    const struct mf_tensor_info *t = mf_manifest_find(&m, "m.weight");
    CHECK(t && t->offset == 128 && t->dtype == MF_DTYPE_U32 && t->bits == 4 &&
              t->group_size == 64 && t->ndim == 2 && t->shape[1] == 2,
          "entry fields");
    t = mf_manifest_find(&m, "s");
    CHECK(t && t->ndim == 0 && t->size == 4, "0-d tensor");
    CHECK(!mf_manifest_find(&m, "b.weight") && !mf_manifest_find(&m, ""), "absent names");
    uint64_t h = m.hash;
    mf_manifest_free(&m);
    // Same content in another member order: same hash. Another offset: another hash.
    char *t2 = replace(MANIFEST, "\"model\": \"src\", ", "");
    rc = man_parse(&m, t2, 196, err, sizeof err);
    CHECK(rc == MF_OK && m.hash == h, "hash independent of unrelated keys");
    mf_manifest_free(&m);
    free(t2);
    t2 = replace(MANIFEST, "\"offset\": 192", "\"offset\": 188");
    rc = man_parse(&m, t2, 196, err, sizeof err);
    CHECK(rc == MF_OK && m.hash != h, "hash covers offsets");
    mf_manifest_free(&m);
    free(t2);

    man_expect("\"offset\": 192", "\"offset\": 193", 196, MF_ERR_IO, "\"s\"");
    man_expect("\"offset\": 192", "\"offset\": 193", 196, MF_ERR_IO, "model_weights.bin");
    man_expect("\"offset\": 192", "\"offset\": 18446744073709551615", 196, MF_ERR_FORMAT,
               "offset");
    man_expect("\"size\": 32", "\"size\": 33", 196, MF_ERR_SHAPE, "a.weight");
    man_expect("\"dtype\": \"BF16\"", "\"dtype\": \"Q4\"", 196, MF_ERR_FORMAT, "a.weight");
    man_expect("\"shape\": [4, 4], \"dtype\": \"BF16\"",
               "\"shape\": [1, 1, 1, 4, 4], \"dtype\": \"BF16\"", 196, MF_ERR_FORMAT,
               "shape");
    man_expect("\"shape\": [2, 2]", "\"shape\": [2, -2]", 196, MF_ERR_FORMAT, "m.weight");
    man_expect("\"num_tensors\": 4", "\"num_tensors\": 5", 196, MF_ERR_FORMAT, "num_tensors");
    man_expect("\"tensors\"", "\"tensor\"", 196, MF_ERR_FORMAT, "tensors");
    man_expect("\"size\": 64,", "\"size\": 64, \"size\": 64,", 196, MF_ERR_FORMAT, "duplicate");
    man_expect("\"s\": {", "\"s\\u0000x\": {", 196, MF_ERR_FORMAT, "NUL");
    // A bin exactly one byte short of the last tensor.
    struct mf_manifest m2;
    CHECK(man_parse(&m2, MANIFEST, 195, err, sizeof err) == MF_ERR_IO, "short bin");
}

/* ==== Bind helpers ==== */

static const char *const BIND_CFG =
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 256, \"num_hidden_layers\": 1,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 64,"
    " \"max_position_embeddings\": 128, \"rms_norm_eps\": 1e-6, \"num_experts\": 4,"
    " \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 64, \"intermediate_size\": 64,"
    " \"quantization\": {\"bits\": 4, \"group_size\": 64,"
    "   \"model.q8\": {\"bits\": 8, \"group_size\": 64},"
    "   \"model.q3\": {\"bits\": 3, \"group_size\": 32}}}";

// Entry "name": shape, dtype at a running offset.
struct tb {
    char text[8192];
    size_t n;
    uint64_t off;
};

static void tb_add(struct tb *b, const char *name, const char *dtype, size_t esize,
                   int nd, const int64_t *shape, const char *extra) {
    uint64_t count = 1;
    char sh[64] = "";
    size_t k = 0;
    for (int i = 0; i < nd; i++) {
        count *= (uint64_t)shape[i];
        k += (size_t)snprintf(sh + k, sizeof sh - k, "%s%lld", i ? ", " : "",
                              (long long)shape[i]);
    }
    b->n += (size_t)snprintf(b->text + b->n, sizeof b->text - b->n,
                             "%s\"%s\": {\"offset\": %llu, \"size\": %llu, \"shape\": [%s], "
                             "\"dtype\": \"%s\"%s}",
                             b->n > 13 ? ", " : "", name, (unsigned long long)b->off,
                             (unsigned long long)(count * esize), sh, dtype,
                             extra ? extra : "");
    b->off += (count * esize + 63) / 64 * 64;
}

static void test_bind(void) {
    struct tb b = {.n = 0, .off = 0};
    b.n = (size_t)snprintf(b.text, sizeof b.text, "{\"tensors\": {");
    // 4-bit [64, 256] gs 64
    tb_add(&b, "model.q4.weight", "U32", 4, 2, (int64_t[]){64, 32}, NULL);
    tb_add(&b, "model.q4.scales", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    tb_add(&b, "model.q4.biases", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    // 8-bit router with override
    tb_add(&b, "model.q8.weight", "U32", 4, 2, (int64_t[]){4, 64}, NULL);
    tb_add(&b, "model.q8.scales", "F16", 2, 2, (int64_t[]){4, 4}, NULL);
    tb_add(&b, "model.q8.biases", "F16", 2, 2, (int64_t[]){4, 4}, NULL);
    // 8-bit but the config says 4: must be refused
    tb_add(&b, "model.bad8.weight", "U32", 4, 2, (int64_t[]){4, 64}, NULL);
    tb_add(&b, "model.bad8.scales", "BF16", 2, 2, (int64_t[]){4, 4}, NULL);
    tb_add(&b, "model.bad8.biases", "BF16", 2, 2, (int64_t[]){4, 4}, NULL);
    // 3-bit gs 32 (bit-stream packing: 256 * 3 / 32 = 24 words)
    tb_add(&b, "model.q3.weight", "U32", 4, 2, (int64_t[]){8, 24}, NULL);
    tb_add(&b, "model.q3.scales", "BF16", 2, 2, (int64_t[]){8, 8}, NULL);
    tb_add(&b, "model.q3.biases", "BF16", 2, 2, (int64_t[]){8, 8}, NULL);
    // stacked experts [4, 64, 256] 4-bit
    tb_add(&b, "model.sw.weight", "U32", 4, 3, (int64_t[]){4, 64, 32}, NULL);
    tb_add(&b, "model.sw.scales", "BF16", 2, 3, (int64_t[]){4, 64, 4}, NULL);
    tb_add(&b, "model.sw.biases", "BF16", 2, 3, (int64_t[]){4, 64, 4}, NULL);
    // no biases
    tb_add(&b, "model.nob.weight", "U32", 4, 2, (int64_t[]){64, 32}, NULL);
    tb_add(&b, "model.nob.scales", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    // biases of another dtype
    tb_add(&b, "model.mix.weight", "U32", 4, 2, (int64_t[]){64, 32}, NULL);
    tb_add(&b, "model.mix.scales", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    tb_add(&b, "model.mix.biases", "F32", 4, 2, (int64_t[]){64, 4}, NULL);
    // manifest bits disagree with the shapes
    tb_add(&b, "model.mb.weight", "U32", 4, 2, (int64_t[]){64, 32}, ", \"bits\": 8");
    tb_add(&b, "model.mb.scales", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    tb_add(&b, "model.mb.biases", "BF16", 2, 2, (int64_t[]){64, 4}, NULL);
    // float weights and vectors
    tb_add(&b, "model.f.weight", "F16", 2, 2, (int64_t[]){64, 256}, NULL);
    tb_add(&b, "model.u.weight", "U32", 4, 2, (int64_t[]){64, 256}, NULL);
    tb_add(&b, "model.norm.weight", "BF16", 2, 1, (int64_t[]){256}, NULL);
    tb_add(&b, "model.conv.weight", "F32", 4, 3, (int64_t[]){16, 4, 1}, NULL);
    b.n += (size_t)snprintf(b.text + b.n, sizeof b.text - b.n, "}}");

    mf_model *m = calloc(1, sizeof *m);
    char err[512] = "";
    CHECK(m != NULL, "calloc");
    if (!m)
        return;
    m->dir = strdup("testdir");
    int rc = mf_config_parse(&m->cfg, BIND_CFG, strlen(BIND_CFG), "cfg", err, sizeof err);
    CHECK(rc == MF_OK, "config: %s", err);
    rc = mf_manifest_parse(&m->manifest, b.text, b.n, "mw.json", b.off, err, sizeof err);
    CHECK(rc == MF_OK, "manifest: %s", err);
    if (rc)
        goto out;
    static char base[1];   // only addresses are computed: base + offset
    m->weights_dev = base;
    struct mf_weight w;
    const char *bp = base;

    rc = mf_bind_linear(m, &w, "model.q4", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_OK && w.dtype == MF_DTYPE_U32 && w.bits == 4 && w.group_size == 64 &&
              w.sdtype == MF_DTYPE_BF16 && w.n_out == 64 && w.n_in == 256 &&
              w.w == bp + mf_manifest_find(&m->manifest, "model.q4.weight")->offset &&
              w.scales == bp + mf_manifest_find(&m->manifest, "model.q4.scales")->offset &&
              w.biases == bp + mf_manifest_find(&m->manifest, "model.q4.biases")->offset,
          "4-bit linear: %s", err);
    rc = mf_bind_linear(m, &w, "model.q8", 0, 4, 256, err, sizeof err);
    CHECK(rc == MF_OK && w.bits == 8 && w.group_size == 64 && w.sdtype == MF_DTYPE_F16,
          "8-bit router with override: %s", err);
    rc = mf_bind_linear(m, &w, "model.bad8", 0, 4, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "model.bad8") && strstr(err, "8"),
          "8-bit without override refused: %s", err);
    rc = mf_bind_linear(m, &w, "model.q3", 0, 8, 256, err, sizeof err);
    CHECK(rc == MF_OK && w.bits == 3 && w.group_size == 32, "3-bit gs32: %s", err);
    rc = mf_bind_linear(m, &w, "model.sw", 4, 64, 256, err, sizeof err);
    CHECK(rc == MF_OK && w.bits == 4 && w.n_out == 64, "stacked: %s", err);
    rc = mf_bind_linear(m, &w, "model.sw", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "model.sw"), "stacked bound flat: %s", err);
    rc = mf_bind_linear(m, &w, "model.sw", 8, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "[8, 64, 32]") && strstr(err, "[4, 64, 32]"),
          "wrong stack size names expected and actual: %s", err);
    rc = mf_bind_linear(m, &w, "model.q4", 0, 64, 512, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "model.q4"), "n_in from config differs: %s", err);
    rc = mf_bind_linear(m, &w, "model.q4", 0, 32, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "[32, 32]") && strstr(err, "[64, 32]"),
          "n_out differs: %s", err);
    rc = mf_bind_linear(m, &w, "model.nob", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "model.nob.biases"), "missing biases: %s", err);
    rc = mf_bind_linear(m, &w, "model.mix", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "model.mix.biases"), "biases dtype: %s", err);
    rc = mf_bind_linear(m, &w, "model.mb", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "model_weights.json"), "manifest bits: %s", err);
    rc = mf_bind_linear(m, &w, "model.f", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_OK && w.dtype == MF_DTYPE_F16 && !w.scales && !w.biases && w.bits == 0,
          "float linear: %s", err);
    rc = mf_bind_linear(m, &w, "model.f", 0, 64, 128, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "expected shape [64, 128], got [64, 256]"),
          "float shape message: %s", err);
    rc = mf_bind_linear(m, &w, "model.u", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "U32"), "U32 without scales: %s", err);
    rc = mf_bind_linear(m, &w, "model.none", 0, 64, 256, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "model.none.weight"), "missing: %s", err);
    rc = mf_bind_vector(m, &w, "model.norm.weight", 256, err, sizeof err);
    CHECK(rc == MF_OK && w.dtype == MF_DTYPE_BF16 && w.n_in == 256, "vector: %s", err);
    rc = mf_bind_vector(m, &w, "model.conv.weight", 64, err, sizeof err);
    CHECK(rc == MF_OK && w.dtype == MF_DTYPE_F32, "[C, K, 1] as a vector of C*K: %s", err);
    rc = mf_bind_vector(m, &w, "model.norm.weight", 128, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "128") && strstr(err, "[256]"), "count: %s", err);
    rc = mf_bind_vector(m, &w, "model.q4.weight", 64 * 32, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "U32"), "U32 vector: %s", err);
    CHECK(mf_has_tensor(m, "model.q4.scales") && !mf_has_tensor(m, "model.q4"), "has_tensor");
out:
    mf_manifest_free(&m->manifest);
    mf_config_free(&m->cfg);
    free(m->dir);
    free(m);
}

/* ==== Expert store ==== */

// hid 128, I 64, 4-bit gs 64: W [64, 16] U32, S/B [64, 2] BF16; down W [128, 8],
// S/B [128, 1]. Each block 4096 + 256 + 256 bytes; expert 13824 bytes.
#define EXPERT_BYTES 13824

static void layout_text(char *buf, size_t cap, const char *head, const char *tweak_name,
                        const char *tweak) {
    size_t n = (size_t)snprintf(buf, cap, "{%s\"expert_size\": %d, \"components\": [",
                                head, EXPERT_BYTES);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    uint64_t off = 0;
    for (int p = 0; p < 3; p++) {
        int rows = p == 2 ? 128 : 64, wc = p == 2 ? 8 : 16, sc = p == 2 ? 1 : 2;
        const char *part[3] = {"weight", "scales", "biases"};
        for (int k = 0; k < 3; k++) {
            char name[32];
            snprintf(name, sizeof name, "%s.%s", proj[p], part[k]);
            int cols = k ? sc : wc;
            uint64_t size = (uint64_t)rows * (uint64_t)cols * (k ? 2u : 4u);
            if (tweak_name && strcmp(name, tweak_name) == 0)
                n += (size_t)snprintf(buf + n, cap - n, "%s%s", p || k ? ", " : "", tweak);
            else
                n += (size_t)snprintf(buf + n, cap - n,
                                      "%s{\"name\": \"%s\", \"offset\": %llu, \"size\": %llu, "
                                      "\"dtype\": \"%s\", \"shape\": [%d, %d]}",
                                      p || k ? ", " : "", name, (unsigned long long)off,
                                      (unsigned long long)size, k ? "BF16" : "U32", rows,
                                      cols);
            off += size;
        }
    }
    snprintf(buf + n, cap - n, "]}");
}

static void make_layer(const char *dir, int l, int n_experts, size_t trim) {
    size_t n = (size_t)n_experts * EXPERT_BYTES - trim;
    unsigned char *data = malloc(n);
    if (!data)
        return;
    for (size_t i = 0; i < n; i++)
        data[i] = (unsigned char)((i * 7 + (size_t)l * 131 + i / EXPERT_BYTES) & 0xff);
    char name[32];
    snprintf(name, sizeof name, "layer_%02d.bin", l);
    check_write_file(dir, name, data, n);
    free(data);
}

static const uint8_t IS_MOE[3] = {0, 1, 1};

static int open_with(const char *layout, mf_expert_store **st, char *err, size_t errlen) {
    check_write_file(tmpdir, "layout.json", layout, strlen(layout));
    return mf_expert_store_open(st, tmpdir, 3, IS_MOE, err, errlen);
}

static void store_expect(const char *layout, int status, const char *needle) {
    mf_expert_store *st = (mf_expert_store *)1;
    char err[512] = "";
    int rc = open_with(layout, &st, err, sizeof err);
    CHECK(rc == status && st == NULL, "status %d, expected %d (%s) for %s", rc, status, err,
          layout);
    CHECK(strstr(err, needle) != NULL, "'%s' lacks '%s'", err, needle);
    mf_expert_store_close(rc ? NULL : st);
}

// The calls the asynchronous reader uses (test_reader.c covers them end to end).
static void test_store_modes(mf_expert_store *st) {
    char err[512] = "";
    CHECK(mf_expert_store_total_bytes(st) == 2ull * 4 * EXPERT_BYTES, "total bytes");
    CHECK(mf_expert_store_check(st, 2, 3, err, sizeof err) == MF_OK &&
              mf_expert_store_check(st, 0, 0, err, sizeof err) == MF_ERR_ARG &&
              mf_expert_store_check(st, 1, 4, err, sizeof err) == MF_ERR_ARG, "check ids");
    mf_expert_store_hint(st, 1, 2);
    mf_expert_store_hint(st, 9, 2);   // bad ids: no-op
    // 13824-byte experts cannot be read with O_DIRECT; the answer is kept.
    unsigned char *buf = NULL;
    CHECK(posix_memalign((void **)&buf, 4096, 16384) == 0, "alloc");
    for (int i = 0; i < 2; i++)
        CHECK(mf_expert_store_open_direct(st, err, sizeof err) == MF_ERR_UNSUPPORTED &&
                  strstr(err, "not a multiple of 4096"), "direct refused: %s", err);
    CHECK(buf && mf_expert_store_read_direct(st, 1, 0, buf, err, sizeof err) == MF_ERR_ARG,
          "direct read without direct fds");
    free(buf);
    const void *p = (const void *)1;
    CHECK(mf_expert_store_prefault(st, 1, 0, &p, err, sizeof err) == MF_ERR_ARG && !p,
          "prefault before map");
    CHECK(mf_expert_store_map(st, err, sizeof err) == MF_OK &&
              mf_expert_store_map(st, err, sizeof err) == MF_OK, "map: %s", err);
    CHECK(mf_expert_store_prefault(st, 2, 3, &p, err, sizeof err) == MF_OK && p,
          "prefault: %s", err);
    const unsigned char *b = p;
    int same = b != NULL;
    for (size_t i = 0; same && i < EXPERT_BYTES; i++) {
        size_t fi = 3 * (size_t)EXPERT_BYTES + i;
        same = b[i] == (unsigned char)((fi * 7 + 2 * 131 + fi / EXPERT_BYTES) & 0xff);
    }
    CHECK(same, "mapped bytes of layer 2 expert 3");
    CHECK(mf_expert_store_check_size(st, 2, 3, err, sizeof err) == MF_OK, "size ok");
}

static void test_store(void) {
    char layout[8192];
    make_layer(tmpdir, 1, 4, 0);
    make_layer(tmpdir, 2, 4, 0);
    const char *head = "\"format\": \"moeflux-experts\", \"version\": 1, \"num_layers\": 3, "
                       "\"num_experts\": 4, \"moe_layers\": [1, 2], \"bits\": 4, "
                       "\"group_size\": 64, ";
    layout_text(layout, sizeof layout, head, NULL, NULL);
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = open_with(layout, &st, err, sizeof err);
    CHECK(rc == MF_OK, "open: %s", err);
    if (!rc) {
        const struct mf_expert_layout *L = mf_expert_store_layout(st);
        CHECK(L->expert_size == EXPERT_BYTES && L->num_experts == 4 && L->bits == 4 &&
                  L->group_size == 64 && L->n_components == 9,
              "layout fields");
        const struct mf_expert_component *c = mf_expert_store_component(st, "down_proj.scales");
        CHECK(c && c->offset == 2 * 4608 + 4096 && c->shape[0] == 128 && c->shape[1] == 1,
              "component lookup");
        CHECK(!mf_expert_store_component(st, "gate"), "unknown component");
        unsigned char *buf = malloc(EXPERT_BYTES + 8);
        for (int l = 1; l <= 2 && buf; l++) {
            for (int e = 0; e < 4; e++) {
                memset(buf, 0xee, EXPERT_BYTES + 8);
                rc = mf_expert_store_read(st, l, e, buf, EXPERT_BYTES + 8, err, sizeof err);
                int same = rc == MF_OK;
                for (size_t i = 0; same && i < EXPERT_BYTES; i++) {
                    size_t fi = (size_t)e * EXPERT_BYTES + i;
                    same = buf[i] == (unsigned char)((fi * 7 + (size_t)l * 131 +
                                                      fi / EXPERT_BYTES) & 0xff);
                }
                CHECK(same && buf[EXPERT_BYTES] == 0xee, "layer %d expert %d bytes", l, e);
            }
        }
        if (buf) {
            CHECK(mf_expert_store_read(st, 0, 0, buf, EXPERT_BYTES, err, sizeof err) ==
                      MF_ERR_ARG && strstr(err, "layer 0"),
                  "dense layer has no file: %s", err);
            CHECK(mf_expert_store_read(st, 1, 4, buf, EXPERT_BYTES, err, sizeof err) ==
                      MF_ERR_ARG, "expert out of range");
            CHECK(mf_expert_store_read(st, 1, -1, buf, EXPERT_BYTES, err, sizeof err) ==
                      MF_ERR_ARG, "negative expert");
            CHECK(mf_expert_store_read(st, 3, 0, buf, EXPERT_BYTES, err, sizeof err) ==
                      MF_ERR_ARG, "layer out of range");
            CHECK(mf_expert_store_read(st, 1, 0, buf, EXPERT_BYTES - 1, err, sizeof err) ==
                      MF_ERR_ARG, "small buffer");
        }
        free(buf);
        test_store_modes(st);
        mf_expert_store_close(st);
    }

    // The reference system's layout: no format, version, moe_layers, bits, group_size.
    layout_text(layout, sizeof layout, "\"num_layers\": 3, \"num_experts\": 4, ", NULL, NULL);
    st = NULL;
    rc = open_with(layout, &st, err, sizeof err);
    CHECK(rc == MF_OK && st && mf_expert_store_layout(st)->bits == 4 &&
              mf_expert_store_layout(st)->group_size == 64,
          "reference layout, bits from shapes: %s", err);
    mf_expert_store_close(st);

    char bad[8192];
    layout_text(bad, sizeof bad, head, "up_proj.scales",
                "{\"name\": \"up_proj.scales\", \"offset\": 13800, \"size\": 256, "
                "\"dtype\": \"BF16\", \"shape\": [64, 2]}");
    store_expect(bad, MF_ERR_FORMAT, "up_proj.scales");
    layout_text(bad, sizeof bad, head, "up_proj.scales",
                "{\"name\": \"up_proj.scales\", \"offset\": 0, \"size\": 256, "
                "\"dtype\": \"BF16\", \"shape\": [64, 2]}");
    store_expect(bad, MF_ERR_FORMAT, "overlap");
    layout_text(bad, sizeof bad, head, "up_proj.scales",
                "{\"name\": \"up_proj.scale\", \"offset\": 8704, \"size\": 256, "
                "\"dtype\": \"BF16\", \"shape\": [64, 2]}");
    store_expect(bad, MF_ERR_FORMAT, "up_proj.scales");
    layout_text(bad, sizeof bad, head, "up_proj.scales",
                "{\"name\": \"up_proj.scales\", \"offset\": 8704, \"size\": 255, "
                "\"dtype\": \"BF16\", \"shape\": [64, 2]}");
    store_expect(bad, MF_ERR_FORMAT, "size");
    layout_text(bad, sizeof bad,
                "\"format\": \"moeflux-experts\", \"version\": 3, \"num_layers\": 3, "
                "\"num_experts\": 4, ", NULL, NULL);
    store_expect(bad, MF_ERR_UNSUPPORTED, "version");
    layout_text(bad, sizeof bad, "\"format\": \"other\", \"num_layers\": 3, \"num_experts\": 4, ",
                NULL, NULL);
    store_expect(bad, MF_ERR_FORMAT, "format");
    layout_text(bad, sizeof bad, "\"num_layers\": 4, \"num_experts\": 4, ", NULL, NULL);
    store_expect(bad, MF_ERR_FORMAT, "num_layers");
    layout_text(bad, sizeof bad, "\"num_layers\": 3, \"num_experts\": 4, \"moe_layers\": [0, 1], ",
                NULL, NULL);
    store_expect(bad, MF_ERR_FORMAT, "moe_layers");
    layout_text(bad, sizeof bad, "\"num_layers\": 3, \"num_experts\": 4, \"moe_layers\": [1], ",
                NULL, NULL);
    store_expect(bad, MF_ERR_FORMAT, "moe_layers");
    layout_text(bad, sizeof bad, "\"num_layers\": 3, \"num_experts\": 4, \"bits\": 2, ", NULL,
                NULL);
    store_expect(bad, MF_ERR_FORMAT, "bits");
    store_expect("{\"expert_size\": 1", MF_ERR_FORMAT, "layout.json");
    // More experts than the files hold: the short file is named.
    layout_text(bad, sizeof bad, "\"num_layers\": 3, \"num_experts\": 5, ", NULL, NULL);
    store_expect(bad, MF_ERR_IO, "layer_01.bin");
    // A truncated file, then a missing one.
    make_layer(tmpdir, 2, 4, 1);
    store_expect(layout, MF_ERR_IO, "layer_02.bin");
    char path[512];
    snprintf(path, sizeof path, "%s/layer_02.bin", tmpdir);
    unlink(path);
    store_expect(layout, MF_ERR_IO, "layer_02.bin");
    snprintf(path, sizeof path, "%s/layout.json", tmpdir);
    unlink(path);
    st = NULL;
    rc = mf_expert_store_open(&st, tmpdir, 3, IS_MOE, err, sizeof err);
    CHECK(rc == MF_ERR_IO && strstr(err, "layout.json"), "missing layout: %s", err);
}

static void cleanup(void) {
    static const char *const names[] = {"layout.json", "layer_01.bin", "layer_02.bin"};
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

int main(void) {
    if (check_make_tmpdir(tmpdir, sizeof tmpdir, "mf_store") != 0)
        return 1;
    test_manifest();
    test_bind();
    test_store();
    cleanup();
    return check_finish("test_store");
}
