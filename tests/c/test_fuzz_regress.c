/*
 * test_fuzz_regress.c — one test per bug the libFuzzer harnesses of tests/fuzz/ found,
 * each the minimized input written out, so the fix stays tested without a fuzzer.
 * Several were undefined behaviour that only a sanitizer sees: those tests also check
 * the refusal's message, which the buggy code did not give, and `make asan` runs them
 * under UBSan.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "core/config.h"
#include "core/manifest.h"
#include "io/expert_store.h"

static char dir[256];

// A layout whose gate_proj.scales has 2 columns (so hid = 2 * group_size) and the
// given group_size: 9 components of a tiny 2-row expert, 1 layer.
static void put_layout_at(const char *group_size, const char *num_experts,
                          const char *expert_size, unsigned first_offset) {
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf,
                                "{\"num_layers\": 1, \"num_experts\": %s, "
                                "\"expert_size\": %s, \"group_size\": %s, "
                                "\"components\": [", num_experts, expert_size, group_size);
    unsigned off = first_offset;
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < 3; k++) {
            unsigned size = k ? 2 * 2 * 2 : 2 * 4 * 4;   // BF16 [2, 2] or U32 [2, 4]
            n += (size_t)snprintf(buf + n, sizeof buf - n,
                                  "%s{\"name\": \"%s.%s\", \"offset\": %u, \"size\": %u, "
                                  "\"dtype\": \"%s\", \"shape\": [2, %d]}",
                                  p || k ? ", " : "", proj[p], part[k], off, size,
                                  k ? "BF16" : "U32", k ? 2 : 4);
            off += size;
        }
    snprintf(buf + n, sizeof buf - n, "]}");
    check_write_file(dir, "layout.json", buf, strlen(buf));
}

static void put_layout_n(const char *group_size, const char *num_experts,
                         const char *expert_size) {
    put_layout_at(group_size, num_experts, expert_size, 0);
}

static void put_layout(const char *group_size) { put_layout_n(group_size, "1", "4096"); }

// fuzz_layout: group_size 2^62 made resolve_bits compute hid = 2 * 2^62 (signed
// overflow) before checking the group size.
static void test_layout_huge_group_size(void) {
    put_layout("4611686018427387904");
    uint8_t is_moe[1] = {1};
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = mf_expert_store_open(&st, dir, 1, is_moe, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && st == NULL && strstr(err, "group_size 4611686018427387904: expected"),
          "huge group_size: status %d, message \"%s\"", rc, err);
    mf_expert_store_close(st);
    // The same layout with a valid group size is accepted (the test input is sound).
    put_layout("32");
    static const uint8_t zeros[4096];
    check_write_file(dir, "layer_00.bin", zeros, sizeof zeros);
    rc = mf_expert_store_open(&st, dir, 1, is_moe, err, sizeof err);
    CHECK(rc == MF_OK, "group_size 32: %s", err);
    mf_expert_store_close(st);
}

// fuzz_layout: num_experts 4 x expert_size 2^62 wrapped to 0 in the file-size check,
// so a 4 KiB layer file "held" four 4-EiB experts (reads then failed, and the model's
// bytes per token overflowed int64).
static void test_layout_wrapped_file_size(void) {
    put_layout_n("32", "4", "4611686018427387904");
    static const uint8_t zeros[4096];
    check_write_file(dir, "layer_00.bin", zeros, sizeof zeros);
    uint8_t is_moe[1] = {1};
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = mf_expert_store_open(&st, dir, 1, is_moe, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && st == NULL && strstr(err, "beyond the"),
          "4 x 2^62-byte experts: status %d, message \"%s\"", rc, err);
    mf_expert_store_close(st);
}

static int open_layout(char *err, size_t errlen) {
    uint8_t is_moe[1] = {1};
    mf_expert_store *st = NULL;
    int rc = mf_expert_store_open(&st, dir, 1, is_moe, err, errlen);
    mf_expert_store_close(st);
    return rc;
}

// fuzz_config: components (and, in mmap mode, experts e * expert_size) at offsets that
// are not multiples of their element size were accepted, and the expert kernels then
// loaded floats and codes from misaligned addresses (UBSan).
static void test_layout_misaligned(void) {
    static const uint8_t zeros[8192];
    check_write_file(dir, "layer_00.bin", zeros, sizeof zeros);
    char err[512] = "";
    put_layout_at("32", "1", "4096", 1);
    int rc = open_layout(err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "must be multiples of its U32 element size 4"),
          "components at odd offsets: status %d, message \"%s\"", rc, err);
    put_layout_at("32", "1", "4098", 0);
    rc = open_layout(err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "expert_size 4098 must be multiples"),
          "expert_size 4098: status %d, message \"%s\"", rc, err);
    put_layout_at("32", "1", "4096", 4);   // aligned, shifted: accepted
    rc = open_layout(err, sizeof err);
    CHECK(rc == MF_OK, "components at offset 4: %s", err);
}

// fuzz_manifest: a tensor at an offset that is not a multiple of its element size was
// accepted and read through misaligned pointers (the first find: a BF16 vector at an
// odd offset, converted by mf_load_f32; UBSan).
static void test_manifest_misaligned(void) {
    static const char *const text[3] = {
        "{\"tensors\": {\"a\": {\"offset\": 66, \"size\": 8, \"shape\": [2], "
        "\"dtype\": \"F32\"}}}",
        "{\"tensors\": {\"a\": {\"offset\": 65, \"size\": 4, \"shape\": [2], "
        "\"dtype\": \"BF16\"}}}",
        "{\"tensors\": {\"a\": {\"offset\": 65, \"size\": 2, \"shape\": [2], "
        "\"dtype\": \"U8\"}}}",   // one-byte elements: any offset is aligned
    };
    for (int i = 0; i < 3; i++) {
        struct mf_manifest m;
        char err[512] = "";
        int rc = mf_manifest_parse(&m, text[i], strlen(text[i]), "model_weights.json", 4096,
                                   err, sizeof err);
        if (i < 2)
            CHECK(rc == MF_ERR_FORMAT && strstr(err, "is not a multiple of its"),
                  "manifest %d: status %d, message \"%s\"", i, rc, err);
        else
            CHECK(rc == MF_OK, "U8 at an odd offset: %s", err);
        if (rc == MF_OK) mf_manifest_free(&m);
    }
}

// qwen3_moe config text with the given num_hidden_layers and mlp_only_layers.
static int parse_qwen3_moe(struct mf_config *c, const char *layers, const char *mlp_only,
                           char *err, size_t errlen) {
    char text[1024];
    snprintf(text, sizeof text,
             "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64, "
             "\"num_hidden_layers\": %s, \"num_attention_heads\": 2, "
             "\"num_key_value_heads\": 1, \"vocab_size\": 300, "
             "\"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-6, "
             "\"intermediate_size\": 128, \"num_experts\": 4, "
             "\"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32, "
             "\"mlp_only_layers\": %s}", layers, mlp_only);
    return mf_config_parse(c, text, strlen(text), "config.json", err, errlen);
}

// fuzz_config: num_hidden_layers 2^31 - 1 made the parser allocate two 2 GiB
// per-layer tables and walk them (the input timed out); now refused at once.
// mlp_only_layers, searched once per layer before, are marked in one pass: the layer
// kinds must stay what the list says.
static void test_config_layer_count(void) {
    struct mf_config c;
    char err[512] = "";
    int rc = parse_qwen3_moe(&c, "2147483647", "[]", err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "num_hidden_layers is 2147483647, more than"),
          "2^31-1 layers: status %d, message \"%s\"", rc, err);
    rc = parse_qwen3_moe(&c, "5", "[3, 1]", err, sizeof err);
    CHECK(rc == MF_OK, "5 layers: %s", err);
    if (rc == MF_OK) {
        static const uint8_t want[5] = {1, 0, 1, 0, 1};
        CHECK(memcmp(c.layer_is_moe, want, 5) == 0 && c.n_moe_layers == 3,
              "mlp_only_layers [3, 1]: layer kinds %d%d%d%d%d", c.layer_is_moe[0],
              c.layer_is_moe[1], c.layer_is_moe[2], c.layer_is_moe[3], c.layer_is_moe[4]);
        mf_config_free(&c);
    }
}

int main(void) {
    if (check_make_tmpdir(dir, sizeof dir, "mf_fuzz_regress") != 0) return 1;
    test_layout_huge_group_size();
    test_config_layer_count();
    test_layout_wrapped_file_size();
    test_layout_misaligned();
    test_manifest_misaligned();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    (void)!system(cmd);
    return check_finish("test_fuzz_regress");
}
