/*
 * test_model.c — mf_model_load's failure paths on model directories written by hand:
 * each stage (directory, config.json, model_weights.bin/.json, backend, expert files,
 * layout vs config, the arch's tensor binding) must fail with its status and a message
 * naming the file or tensor, and free everything it built (run under `make asan`,
 * whose leak checker sees any half-built model not freed). Also the static parts of
 * the API: version, strerror, default params, NULL handling.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "moeflux.h"

static char dir[256], exp_dir[300];

static void put_text(const char *d, const char *name, const char *text) {
    check_write_file(d, name, text, strlen(text));
}

// qwen3_next, 2 layers, hid 128, 4 experts of I 64 (4-bit gs 64).
static const char *const CONFIG =
    "{\"model_type\": \"qwen3_next\", \"hidden_size\": 128, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"head_dim\": 64,"
    " \"intermediate_size\": 128, \"vocab_size\": 64, \"max_position_embeddings\": 256,"
    " \"rms_norm_eps\": 1e-6, \"rope_theta\": 10000, \"partial_rotary_factor\": 0.25,"
    " \"linear_num_key_heads\": 1, \"linear_num_value_heads\": 2,"
    " \"linear_key_head_dim\": 64, \"linear_value_head_dim\": 64,"
    " \"linear_conv_kernel_dim\": 4, \"full_attention_interval\": 2,"
    " \"num_experts\": 4, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 64,"
    " \"shared_expert_intermediate_size\": 64, \"decoder_sparse_step\": 1,"
    " \"mlp_only_layers\": [], \"norm_topk_prob\": true,"
    " \"quantization\": {\"bits\": 4, \"group_size\": 64}}";

#define EXPERT_BYTES 13824

static void put_layout(const char *d, int n_experts) {
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf,
                                "{\"num_layers\": 2, \"num_experts\": %d, \"expert_size\": %d, "
                                "\"components\": [", n_experts, EXPERT_BYTES);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    unsigned off = 0;
    for (int p = 0; p < 3; p++) {
        int rows = p == 2 ? 128 : 64, wc = p == 2 ? 8 : 16, sc = p == 2 ? 1 : 2;
        for (int k = 0; k < 3; k++) {
            int cols = k ? sc : wc;
            unsigned size = (unsigned)(rows * cols * (k ? 2 : 4));
            n += (size_t)snprintf(buf + n, sizeof buf - n,
                                  "%s{\"name\": \"%s.%s\", \"offset\": %u, \"size\": %u, "
                                  "\"dtype\": \"%s\", \"shape\": [%d, %d]}",
                                  p || k ? ", " : "", proj[p], part[k], off, size,
                                  k ? "BF16" : "U32", rows, cols);
            off += size;
        }
    }
    snprintf(buf + n, sizeof buf - n, "]}");
    put_text(d, "layout.json", buf);
}

static void put_experts(int l, size_t bytes) {
    char *data = calloc(1, bytes ? bytes : 1);
    char name[32];
    snprintf(name, sizeof name, "layer_%02d.bin", l);
    if (data)
        check_write_file(exp_dir, name, data, bytes);
    free(data);
}

static void expect(int status, const char *needle, const char *backend) {
    struct mf_model_params p = mf_model_default_params();
    if (backend)
        p.backend = backend;
    mf_model *m = (mf_model *)1;
    char err[1024] = "";
    int rc = mf_model_load(&m, dir, &p, err, sizeof err);
    CHECK(rc == status && m == NULL, "status %d, expected %d: %s", rc, status, err);
    CHECK(strstr(err, needle) != NULL, "'%s' lacks '%s'", err, needle);
    if (rc == MF_OK)
        mf_model_free(m);
}

static void test_load_failures(void) {
    char missing[300];
    snprintf(missing, sizeof missing, "%s/none", dir);
    mf_model *m = (mf_model *)1;
    char err[512] = "";
    CHECK(mf_model_load(&m, missing, NULL, err, sizeof err) == MF_ERR_IO && !m &&
              strstr(err, missing),
          "missing dir: %s", err);
    CHECK(mf_model_load(&m, NULL, NULL, err, sizeof err) == MF_ERR_ARG, "NULL dir");
    CHECK(mf_model_load(NULL, dir, NULL, err, sizeof err) == MF_ERR_ARG, "NULL out");

    expect(MF_ERR_IO, "config.json", NULL);
    put_text(dir, "config.json", "{\"model_type\": ");
    expect(MF_ERR_FORMAT, "config.json", NULL);
    put_text(dir, "config.json", CONFIG);
    expect(MF_ERR_IO, "model_weights.bin", NULL);
    static const unsigned char bin[64];
    check_write_file(dir, "model_weights.bin", bin, sizeof bin);
    expect(MF_ERR_IO, "model_weights.json", NULL);
    put_text(dir, "model_weights.json",
             "{\"tensors\": {\"model.norm.weight\": {\"offset\": 0, \"size\": 256, "
             "\"shape\": [128], \"dtype\": \"BF16\"}}}");
    expect(MF_ERR_IO, "model.norm.weight", NULL);
    put_text(dir, "model_weights.json",
             "{\"tensors\": {\"model.norm.weight\": {\"offset\": 0, \"size\": 64, "
             "\"shape\": [32], \"dtype\": \"BF16\"}}}");
    expect(MF_ERR_BACKEND, "nosuch", "nosuch");
    expect(MF_ERR_IO, "packed_experts", NULL);
    CHECK(mkdir(exp_dir, 0700) == 0, "mkdir %s: %s", exp_dir, strerror(errno));
    expect(MF_ERR_IO, "layout.json", NULL);
    put_layout(exp_dir, 4);
    expect(MF_ERR_IO, "layer_00.bin", NULL);
    put_experts(0, 4 * EXPERT_BYTES);
    put_experts(1, 4 * EXPERT_BYTES - 1);
    expect(MF_ERR_IO, "layer_01.bin", NULL);
    put_experts(1, 4 * EXPERT_BYTES);
    // Every file is in place; the arch binder now finds the tensors missing.
    expect(MF_ERR_FORMAT, "model_weights.json", NULL);
    // A layout of fewer experts than config.json says.
    put_layout(exp_dir, 2);
    expect(MF_ERR_SHAPE, "num_experts", NULL);
    // A config whose MoE width disagrees with the expert components.
    char cfg[4096];
    const char *p = strstr(CONFIG, "\"moe_intermediate_size\": 64");
    snprintf(cfg, sizeof cfg, "%.*s\"moe_intermediate_size\": 128%s", (int)(p - CONFIG),
             CONFIG, p + strlen("\"moe_intermediate_size\": 64"));
    put_text(dir, "config.json", cfg);
    put_layout(exp_dir, 4);
    expect(MF_ERR_SHAPE, "gate_proj", NULL);
    // 2-bit requested but absent.
    put_text(dir, "config.json", CONFIG);
    struct mf_model_params mp = mf_model_default_params();
    mp.use_2bit = 1;
    CHECK(mf_model_load(&m, dir, &mp, err, sizeof err) == MF_ERR_IO &&
              strstr(err, "packed_experts_2bit"),
          "2-bit dir: %s", err);
}

static void test_static_api(void) {
    CHECK(strcmp(mf_version(), "0.1.0") == 0, "version %s", mf_version());
    int codes[] = {MF_OK, MF_ERR_NOMEM, MF_ERR_IO, MF_ERR_FORMAT, MF_ERR_SHAPE, MF_ERR_ARG,
                   MF_ERR_BACKEND, MF_ERR_STATE, MF_ERR_UNSUPPORTED, MF_ABORTED, -99};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        CHECK(mf_strerror(codes[i]) && mf_strerror(codes[i])[0], "strerror %d", codes[i]);
    CHECK(strcmp(mf_strerror(-99), mf_strerror(MF_ERR_IO)) != 0, "unknown code text");
    struct mf_model_params mp = mf_model_default_params();
    struct mf_ctx_params cp = mf_ctx_default_params();
    CHECK(mp.backend && strcmp(mp.backend, "cpu") == 0 && !mp.log_fn && mp.use_2bit == 0,
          "model defaults");
    CHECK(cp.n_ctx == 0 && cp.n_threads == 0 && !cp.abort_fn, "ctx defaults");
    mf_model_free(NULL);
    mf_ctx_free(NULL);
    mf_ctx_abort(NULL);
    mf_ctx *c = (mf_ctx *)1;
    char err[128] = "";
    CHECK(mf_ctx_new(&c, NULL, NULL, err, sizeof err) == MF_ERR_ARG && c == NULL,
          "ctx of NULL model");
    CHECK(mf_ctx_eval(NULL, NULL, 1, NULL, 0) == MF_ERR_ARG, "eval on NULL ctx");
    CHECK(strcmp(mf_ctx_errmsg(NULL), "") == 0, "errmsg of NULL");
}

static void cleanup(void) {
    const char *names[] = {"layout.json", "layer_00.bin", "layer_01.bin"};
    char path[512];
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", exp_dir, names[i]);
        unlink(path);
    }
    rmdir(exp_dir);
    const char *top[] = {"config.json", "model_weights.bin", "model_weights.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, top[i]);
        unlink(path);
    }
    rmdir(dir);
}

int main(void) {
    if (check_make_tmpdir(dir, sizeof dir, "mf_model") != 0)
        return 1;
    snprintf(exp_dir, sizeof exp_dir, "%s/packed_experts", dir);
    test_static_api();
    test_load_failures();
    cleanup();
    return check_finish("test_model");
}
