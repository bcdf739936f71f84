/*
 * test_faults.c — fault injection against a whole model, in the core built with
 * -DMF_FAULT_INJECTION (core/common.h renames every allocation and expert pread to
 * counting hooks; the Makefile builds this program alone that way).
 *
 *   allocations  allocation N fails, for N = 1, 2, ... until model open + ctx creation
 *                (then an evaluation, a snapshot save and a snapshot load) succeeds:
 *                each failure must return an error status with a message and a NULL
 *                handle (the ctx unchanged), or else be tolerated and work correctly;
 *                `make asan` runs this under LeakSanitizer, so any half-built object
 *                not freed on an error path fails the run.
 *   expert reads every pread short (the read must be completed), failing with EIO or
 *                ending early (EOF), after 0, 1 and 3 good reads, in pread and direct
 *                modes: a refused eval names the layer file and offset, leaves n_past
 *                and the state unchanged, and the next eval gives the logits of a
 *                fault-free context bit for bit.
 *
 * The model is a tiny qwen3_moe written here with float dense weights (pseudo-random)
 * and 4-bit experts whose size is a multiple of 4096 (so direct mode can run).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "core/common.h"   // the fault hooks (this build only)
#include "moeflux.h"

#ifndef MF_FAULT_INJECTION
#error "test_faults.c needs the core built with -DMF_FAULT_INJECTION (see the Makefile)"
#endif

/* ==== The model ==== */

#define HID 256
#define N_LAYER 2
#define N_HEAD 2
#define HEAD_DIM 64
#define VOCAB 64
#define N_EXPERT 8
#define FF 256
#define GS 64
// Per projection: 4-bit codes (rows x in / 2 bytes), BF16 scales and biases per group.
#define PROJ_BYTES(rows, in) ((rows) * (in) / 2 + 2 * (rows) * ((in) / GS) * 2)
#define EXPERT_BYTES (2 * PROJ_BYTES(FF, HID) + PROJ_BYTES(HID, FF))

static char dir[256];          // the model written here
static const char *model_dir;  // the model under test: dir, or one of $MOEFLUX_FAULT_MODELS
static int n_vocab;            // its vocabulary
#define MAX_VOCAB 4096
static uint64_t rng = 0x9e3779b97f4a7c15ull;

static const char *const CONFIG =
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 256, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"head_dim\": 64,"
    " \"vocab_size\": 64, \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-6,"
    " \"rope_theta\": 10000, \"tie_word_embeddings\": false, \"num_experts\": 8,"
    " \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 256,"
    " \"intermediate_size\": 512, \"decoder_sparse_step\": 1, \"mlp_only_layers\": [],"
    " \"norm_topk_prob\": true, \"quantization\": {\"bits\": 4, \"group_size\": 64}}";

struct tensor {
    char name[96];
    int rows, cols;   // cols 0: a vector of `rows`
    float base;       // norms 1 + noise, matrices noise only
};

static int tensor_list(struct tensor *t) {
    int n = 0;
    t[n++] = (struct tensor){"model.embed_tokens.weight", VOCAB, HID, 0};
    t[n++] = (struct tensor){"model.norm.weight", HID, 0, 1};
    t[n++] = (struct tensor){"lm_head.weight", VOCAB, HID, 0};
    static const struct {
        const char *name;
        int rows, cols;
        float base;
    } per_layer[] = {
        {"input_layernorm.weight", HID, 0, 1},
        {"post_attention_layernorm.weight", HID, 0, 1},
        {"self_attn.q_proj.weight", N_HEAD * HEAD_DIM, HID, 0},
        {"self_attn.k_proj.weight", HEAD_DIM, HID, 0},
        {"self_attn.v_proj.weight", HEAD_DIM, HID, 0},
        {"self_attn.o_proj.weight", HID, N_HEAD * HEAD_DIM, 0},
        {"self_attn.q_norm.weight", HEAD_DIM, 0, 1},
        {"self_attn.k_norm.weight", HEAD_DIM, 0, 1},
        {"mlp.gate.weight", N_EXPERT, HID, 0},
    };
    for (int l = 0; l < N_LAYER; l++)
        for (size_t i = 0; i < sizeof per_layer / sizeof per_layer[0]; i++) {
            struct tensor *x = &t[n++];
            snprintf(x->name, sizeof x->name, "model.layers.%d.%s", l, per_layer[i].name);
            x->rows = per_layer[i].rows;
            x->cols = per_layer[i].cols;
            x->base = per_layer[i].base;
        }
    return n;
}

static float noise(float amp) {
    return amp * ((float)(check_rand(&rng) >> 40) / (float)(1 << 24) - 0.5f) * 2.0f;
}

// model_weights.bin (F32, 64-byte aligned) and its manifest.
static void write_weights(void) {
    struct tensor t[3 + 9 * N_LAYER];
    int n = tensor_list(t);
    size_t total = 0, off[sizeof t / sizeof t[0]];
    for (int i = 0; i < n; i++) {
        off[i] = total;
        total += ((size_t)t[i].rows * (size_t)(t[i].cols ? t[i].cols : 1) * 4 + 63) & ~63u;
    }
    float *bin = (calloc)(total / 4, 4);
    char *json = (malloc)(16384);
    CHECK(bin && json, "out of memory");
    if (!bin || !json)
        goto out;
    size_t k = (size_t)snprintf(json, 16384, "{\"tensors\": {");
    for (int i = 0; i < n; i++) {
        size_t count = (size_t)t[i].rows * (size_t)(t[i].cols ? t[i].cols : 1);
        for (size_t j = 0; j < count; j++)
            bin[off[i] / 4 + j] = t[i].base + noise(t[i].base ? 0.1f : 0.08f);
        char shape[32];
        if (t[i].cols)
            snprintf(shape, sizeof shape, "[%d, %d]", t[i].rows, t[i].cols);
        else
            snprintf(shape, sizeof shape, "[%d]", t[i].rows);
        k += (size_t)snprintf(json + k, 16384 - k,
                              "%s\"%s\": {\"offset\": %zu, \"size\": %zu, \"shape\": %s, "
                              "\"dtype\": \"F32\"}", i ? ", " : "", t[i].name, off[i],
                              count * 4, shape);
    }
    snprintf(json + k, 16384 - k, "}}");
    check_write_file(dir, "model_weights.bin", bin, total);
    check_write_file(dir, "model_weights.json", json, strlen(json));
out:
    free(bin);
    free(json);
}

static void write_layout(const char *edir) {
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf,
                                "{\"num_layers\": %d, \"num_experts\": %d, "
                                "\"expert_size\": %d, \"components\": [",
                                N_LAYER, N_EXPERT, EXPERT_BYTES);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    int off = 0;
    for (int p = 0; p < 3; p++) {
        int rows = p == 2 ? HID : FF, in = p == 2 ? FF : HID;
        for (int q = 0; q < 3; q++) {
            int cols = q ? in / GS : in / 8, size = rows * cols * (q ? 2 : 4);
            n += (size_t)snprintf(buf + n, sizeof buf - n,
                                  "%s{\"name\": \"%s.%s\", \"offset\": %d, \"size\": %d, "
                                  "\"dtype\": \"%s\", \"shape\": [%d, %d]}",
                                  p || q ? ", " : "", proj[p], part[q], off, size,
                                  q ? "BF16" : "U32", rows, cols);
            off += size;
        }
    }
    snprintf(buf + n, sizeof buf - n, "]}");
    check_write_file(edir, "layout.json", buf, strlen(buf));
}

// bf16 bits of a float (truncation is fine for test data).
static uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

// One projection of one expert at p: random codes, scales ~0.01, biases centring them.
static uint8_t *fill_proj(uint8_t *p, int rows, int in) {
    size_t codes = (size_t)rows * (size_t)in / 2, groups = (size_t)rows * (size_t)(in / GS);
    for (size_t i = 0; i < codes; i++)
        p[i] = (uint8_t)check_rand(&rng);
    uint16_t *s = (uint16_t *)(p + codes), *b = s + groups;
    for (size_t g = 0; g < groups; g++) {
        float scale = 0.01f + noise(0.004f);
        s[g] = bf16(scale);
        b[g] = bf16(-7.5f * scale);
    }
    return p + codes + 4 * groups;
}

static void write_experts(void) {
    char edir[300];
    snprintf(edir, sizeof edir, "%s/packed_experts", dir);
    CHECK(mkdir(edir, 0700) == 0, "mkdir %s: %s", edir, strerror(errno));
    write_layout(edir);
    uint8_t *data = (malloc)((size_t)N_EXPERT * EXPERT_BYTES);
    CHECK(data != NULL, "out of memory");
    for (int l = 0; data && l < N_LAYER; l++) {
        uint8_t *p = data;
        for (int e = 0; e < N_EXPERT; e++) {
            p = fill_proj(p, FF, HID);
            p = fill_proj(p, FF, HID);
            p = fill_proj(p, HID, FF);
        }
        char name[32];
        snprintf(name, sizeof name, "layer_%02d.bin", l);
        check_write_file(edir, name, data, (size_t)N_EXPERT * EXPERT_BYTES);
    }
    free(data);
}

static void write_model(void) {
    check_write_file(dir, "config.json", CONFIG, strlen(CONFIG));
    write_weights();
    write_experts();
}

static void remove_model(void) {
    static const char *const files[] = {
        "packed_experts/layout.json", "packed_experts/layer_00.bin",
        "packed_experts/layer_01.bin", "packed_experts", "config.json",
        "model_weights.bin", "model_weights.json", ""};
    char path[512];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (remove(path) != 0)
            fprintf(stderr, "note: cannot remove %s: %s\n", path, strerror(errno));
    }
}

/* ==== Running it ==== */

static const int32_t PROMPT[] = {1, 5, 9, 2, 33, 17, 60, 4, 41, 12};
static const int32_t DECODE[] = {7, 11, 3};
#define N_PROMPT ((int)(sizeof PROMPT / sizeof PROMPT[0]))
#define N_DECODE ((int)(sizeof DECODE / sizeof DECODE[0]))
#define N_ROWS (1 + N_DECODE)

static struct mf_ctx_params ctx_params(const char *io_mode) {
    struct mf_ctx_params p = mf_ctx_default_params();
    p.n_ctx = 64;
    p.n_threads = 1;
    p.io_threads = 4;
    p.io_mode = io_mode;
    return p;
}

// The prompt's last logits, then each decode step's: N_ROWS rows of n_vocab.
static int run(mf_ctx *c, float *out) {
    int rc = mf_ctx_eval(c, PROMPT, N_PROMPT, out, 0);
    for (int i = 0; rc == MF_OK && i < N_DECODE; i++)
        rc = mf_ctx_eval(c, &DECODE[i], 1, out + (size_t)(i + 1) * n_vocab, 0);
    return rc;
}

static float ref[N_ROWS * MAX_VOCAB];   // from a fault-free context

static int reference(mf_model *m) {
    mf_ctx *c = NULL;
    char err[512] = "";
    struct mf_ctx_params p = ctx_params("pread");
    int rc = mf_ctx_new(&c, m, &p, err, sizeof err);
    CHECK(rc == MF_OK, "reference ctx: %s", err);
    if (rc)
        return rc;
    rc = run(c, ref);
    CHECK(rc == MF_OK, "reference eval: %s", mf_ctx_errmsg(c));
    int finite = 1;
    for (int i = 0; i < N_ROWS * n_vocab; i++)
        finite &= ref[i] == ref[i] && ref[i] - ref[i] == 0;
    CHECK(finite, "reference logits are not finite");
    mf_ctx_free(c);
    return rc;
}

// got[0 .. rows) equal, bit for bit, to the reference's rows from `first` on.
static int same_as_ref(const float *got, int first, int rows) {
    return memcmp(got, ref + (size_t)first * n_vocab,
                  (size_t)rows * (size_t)n_vocab * sizeof(float)) == 0;
}

/* ==== Allocation failures ==== */

#define MAX_FD 256

// Which descriptors below MAX_FD are open.
static void open_fds(uint8_t is_open[MAX_FD]) {
    for (int fd = 0; fd < MAX_FD; fd++)
        is_open[fd] = fcntl(fd, F_GETFD) != -1;
}

// A failed open must close exactly what it opened: no descriptor left behind, and
// none of anyone else's closed (e.g. fd 0, or the long-lived model's files).
static void check_fds(const uint8_t before[MAX_FD], long n) {
    uint8_t after[MAX_FD];
    open_fds(after);
    for (int fd = 0; fd < MAX_FD; fd++)
        CHECK(before[fd] == after[fd], "allocation %ld failing: fd %d %s", n, fd,
              before[fd] ? "was closed by someone else's error path" : "was leaked");
}

// Allocation n of model open + ctx creation fails. Returns the allocations the two
// made (below n: the armed failure was never reached, so both had to succeed).
static long open_with_failure(long n, int *n_refused) {
    mf_model *m = (mf_model *)1;
    mf_ctx *c = (mf_ctx *)1;
    char err[512] = "";
    struct mf_ctx_params p = ctx_params("pread");
    uint8_t fds[MAX_FD];
    open_fds(fds);
    mf_fault_alloc_arm(n);
    int rc = mf_model_load(&m, model_dir, NULL, err, sizeof err);
    if (rc == MF_OK)
        rc = mf_ctx_new(&c, m, &p, err, sizeof err);
    long used = mf_fault_alloc_count();
    mf_fault_alloc_arm(0);
    if (rc != MF_OK) {
        CHECK(rc < 0 && err[0] != '\0', "allocation %ld: status %d, message '%s'", n, rc,
              err);
        CHECK(used >= n, "allocation %ld never failed, yet status %d: %s", n, rc, err);
        CHECK(c == NULL || c == (mf_ctx *)1, "allocation %ld: ctx handle not NULL", n);
        if (m != NULL && m != (mf_model *)1)
            mf_model_free(m);   // the ctx failed: the model was fine
        else
            CHECK(m == NULL, "allocation %ld: model handle not NULL", n);
        (*n_refused)++;
        check_fds(fds, n);
        return used;
    }
    // Success despite a failed allocation (a tolerated one) must still compute right.
    float out[N_ROWS * MAX_VOCAB];
    CHECK(run(c, out) == MF_OK && same_as_ref(out, 0, N_ROWS),
          "allocation %ld failed, open succeeded, but the logits differ: %s", n,
          mf_ctx_errmsg(c));
    mf_ctx_free(c);
    mf_model_free(m);
    return used;
}

static void test_alloc_open(void) {
    int refused = 0;
    long n = 1, used;
    while ((used = open_with_failure(n, &refused)) >= n)
        n++;
    CHECK(refused > 10, "only %d refusals in %ld allocations", refused, used);
    printf("open + ctx: %ld allocations; failing each one: %d refused cleanly, %ld "
           "tolerated\n", used, refused, n - 1 - refused);
}

// Allocation n of an eval fails: refused with n_past unchanged, or tolerated with the
// right logits.
static void test_alloc_eval(mf_model *m) {
    mf_ctx *c = NULL;
    char err[512] = "";
    struct mf_ctx_params p = ctx_params("pread");
    CHECK(mf_ctx_new(&c, m, &p, err, sizeof err) == MF_OK, "ctx: %s", err);
    if (!c)
        return;
    float out[N_ROWS * MAX_VOCAB];
    long n = 1, used = 0;
    int refused = 0;
    for (;; n++) {
        mf_fault_alloc_arm(n);
        int rc = run(c, out);
        used = mf_fault_alloc_count();
        mf_fault_alloc_arm(0);
        if (rc != MF_OK) {
            CHECK(used >= n && rc < 0 && mf_ctx_errmsg(c)[0],
                  "eval allocation %ld: %d '%s'", n, rc, mf_ctx_errmsg(c));
            refused++;
        } else {
            CHECK(same_as_ref(out, 0, N_ROWS), "eval allocation %ld failed and was "
                  "tolerated, but the logits differ", n);
        }
        mf_ctx_reset(c);   // run() may have stopped after the prompt went in
        if (used < n)
            break;
    }
    printf("eval: %ld allocations; failing each one: %d refused cleanly, %ld tolerated\n",
           used, refused, n - 1 - refused);
    mf_ctx_free(c);
}

// Allocation n of mf_ctx_state_save, then of mf_ctx_state_load into a fresh ctx,
// fails: refused with a message and the ctx untouched; the snapshot finally loaded
// continues exactly as the reference.
static long save_with_failure(mf_ctx *c, uint8_t *buf, size_t cap, int64_t *written) {
    long n = 1, used;
    for (;; n++) {
        mf_fault_alloc_arm(n);
        *written = mf_ctx_state_save(c, buf, cap);
        used = mf_fault_alloc_count();
        mf_fault_alloc_arm(0);
        CHECK(*written > 0 || (used >= n && mf_ctx_errmsg(c)[0] &&
                               mf_ctx_n_past(c) == N_PROMPT),
              "state_save, allocation %ld failing: %lld '%s'", n, (long long)*written,
              mf_ctx_errmsg(c));
        if (used < n)
            return used;
    }
}

static long load_with_failure(mf_ctx *c, const uint8_t *buf, int64_t size) {
    long n = 1, used;
    for (;; n++) {
        mf_fault_alloc_arm(n);
        int rc = mf_ctx_state_load(c, buf, (size_t)size);
        used = mf_fault_alloc_count();
        mf_fault_alloc_arm(0);
        CHECK(rc == MF_OK || (rc < 0 && used >= n && mf_ctx_errmsg(c)[0] &&
                              mf_ctx_n_past(c) == 0),
              "state_load, allocation %ld failing: %d '%s'", n, rc, mf_ctx_errmsg(c));
        if (used < n)
            return used;
        if (rc == MF_OK)
            mf_ctx_reset(c);
    }
}

static void test_alloc_state(mf_model *m) {
    mf_ctx *a = NULL, *b = NULL;
    char err[512] = "";
    struct mf_ctx_params p = ctx_params("pread");
    CHECK(mf_ctx_new(&a, m, &p, err, sizeof err) == MF_OK &&
              mf_ctx_new(&b, m, &p, err, sizeof err) == MF_OK, "ctx: %s", err);
    float out[MAX_VOCAB];
    size_t cap = 0;
    uint8_t *buf = NULL;
    if (a && b && mf_ctx_eval(a, PROMPT, N_PROMPT, out, 0) == MF_OK) {
        cap = mf_ctx_state_size(a);
        buf = (malloc)(cap ? cap : 1);
    }
    CHECK(buf != NULL && cap > 0, "no snapshot buffer (%zu bytes)", cap);
    if (buf) {
        int64_t written = 0;
        long saves = save_with_failure(a, buf, cap, &written);
        long loads = load_with_failure(b, buf, written);
        CHECK(mf_ctx_n_past(b) == N_PROMPT, "loaded n_past %d", mf_ctx_n_past(b));
        CHECK(mf_ctx_eval(b, DECODE, 1, out, 0) == MF_OK && same_as_ref(out, 1, 1),
              "after the snapshot loaded: logits differ (%s)", mf_ctx_errmsg(b));
        printf("state: save %ld, load %ld allocations; each failure refused cleanly\n",
               saves, loads);
    }
    free(buf);
    mf_ctx_free(a);
    mf_ctx_free(b);
}

/* ==== Expert read faults ==== */

// A context in `mode`; says which mode it got (direct may fall back to pread).
static mf_ctx *io_ctx(mf_model *m, const char *mode, char *got, size_t cap) {
    mf_ctx *c = NULL;
    char err[512] = "";
    struct mf_ctx_params p = ctx_params(mode);
    CHECK(mf_ctx_new(&c, m, &p, err, sizeof err) == MF_OK, "%s ctx: %s", mode, err);
    if (c) {
        struct mf_ctx_stats st;
        mf_ctx_stats_get(c, &st);
        snprintf(got, cap, "%s", st.io_mode);
    }
    return c;
}

static void test_short_reads(mf_model *m, const char *mode) {
    char got[16] = "";
    mf_ctx *c = io_ctx(m, mode, got, sizeof got);
    if (!c)
        return;
    float out[N_ROWS * MAX_VOCAB];
    if (strcmp(got, mode) != 0) {
        struct mf_ctx_stats st;
        mf_ctx_stats_get(c, &st);
        printf("note: io_mode %s gave %s: %s\n", mode, got, st.io_note);
    }
    mf_fault_io_arm(MF_FAULT_IO_SHORT, 0);
    int rc = run(c, out);
    long preads = mf_fault_io_count();
    mf_fault_io_arm(MF_FAULT_IO_OFF, 0);
    CHECK(rc == MF_OK, "%s, every read short: %s", got, mf_ctx_errmsg(c));
    CHECK(preads > 2 * N_ROWS, "%s: only %ld preads went through the hook", got, preads);
    CHECK(rc != MF_OK || same_as_ref(out, 0, N_ROWS), "%s, short reads: logits differ", got);
    mf_ctx_free(c);
}

// The refused eval's message names the layer file, the offset and the cause.
static void check_io_message(const char *msg, int kind, const char *what) {
    const char *cause = kind == MF_FAULT_IO_EIO ? strerror(EIO) : "unexpected end of file";
    CHECK(strstr(msg, "packed_experts/layer_0") && strstr(msg, ".bin") &&
              strstr(msg, "at offset") && strstr(msg, cause),
          "%s: message '%s' lacks the layer file, offset or '%s'", what, msg, cause);
}

// Reads fail (kind) after `after` good ones, during the prompt or a decode step: the
// eval is refused with the ctx unchanged, and the same eval then succeeds exactly.
static void read_fault(mf_model *m, const char *mode, int kind, long after, int at_decode) {
    char got[16] = "", what[96];
    mf_ctx *c = io_ctx(m, mode, got, sizeof got);
    if (!c)
        return;
    snprintf(what, sizeof what, "%s, %s after %ld reads, at %s", got,
             kind == MF_FAULT_IO_EIO ? "EIO" : "EOF", after, at_decode ? "decode" : "prompt");
    float out[N_ROWS * MAX_VOCAB];
    int rc = at_decode ? mf_ctx_eval(c, PROMPT, N_PROMPT, out, 0) : MF_OK;
    const int32_t *toks = at_decode ? DECODE : PROMPT;
    int n = at_decode ? 1 : N_PROMPT, past = mf_ctx_n_past(c);
    mf_fault_io_arm(kind, after);
    rc = rc ? rc : mf_ctx_eval(c, toks, n, out, 0);
    long preads = mf_fault_io_count();
    mf_fault_io_arm(MF_FAULT_IO_OFF, 0);
    CHECK(preads > after, "%s: the hook saw %ld preads", what, preads);
    CHECK(rc == MF_ERR_IO, "%s: status %d (%s)", what, rc, mf_ctx_errmsg(c));
    check_io_message(mf_ctx_errmsg(c), kind, what);
    CHECK(mf_ctx_n_past(c) == past, "%s: n_past %d, was %d", what, mf_ctx_n_past(c), past);
    rc = mf_ctx_eval(c, toks, n, out, 0);
    CHECK(rc == MF_OK && same_as_ref(out, at_decode, 1),
          "%s: the retried eval differs from a fresh context (%s)", what,
          mf_ctx_errmsg(c));
    mf_ctx_free(c);
}

static void test_read_faults(mf_model *m, const char *mode) {
    test_short_reads(m, mode);
    static const long afters[] = {0, 1, 3};
    for (int kind = MF_FAULT_IO_EIO; kind <= MF_FAULT_IO_EOF; kind++)
        for (size_t i = 0; i < sizeof afters / sizeof afters[0]; i++)
            for (int at_decode = 0; at_decode < 2; at_decode++)
                read_fault(m, mode, kind, afters[i], at_decode);
}

// Every test on the model at path (a model dir made elsewhere, e.g. by prep convert,
// may be of any architecture).
static void test_model(const char *path) {
    model_dir = path;
    mf_model *m = NULL;
    char err[512] = "";
    int rc = mf_model_load(&m, path, NULL, err, sizeof err);
    CHECK(rc == MF_OK, "%s does not load: %s", path, err);
    n_vocab = m ? mf_model_n_vocab(m) : 0;
    CHECK(n_vocab <= MAX_VOCAB, "%s: n_vocab %d above %d", path, n_vocab, MAX_VOCAB);
    printf("== %s (%s)\n", path, m ? mf_model_arch(m) : "?");
    if (rc == MF_OK && n_vocab <= MAX_VOCAB && reference(m) == MF_OK) {
        test_alloc_open();
        test_alloc_eval(m);
        test_alloc_state(m);
        test_read_faults(m, "pread");
        test_read_faults(m, "direct");
    }
    mf_model_free(m);
}

// $MOEFLUX_FAULT_MODELS: more model directories to test, separated by ':'
// (tests/test_faults.py passes converted models of every architecture).
static void test_env_models(void) {
    const char *env = getenv("MOEFLUX_FAULT_MODELS");
    char path[1024];
    while (env && *env) {
        size_t n = strcspn(env, ":");
        if (n > 0 && n < sizeof path) {
            memcpy(path, env, n);
            path[n] = '\0';
            test_model(path);
        }
        env += n + (env[n] == ':');
    }
}

int main(void) {
    if (check_make_tmpdir(dir, sizeof dir, "mf_faults") != 0)
        return 1;
    write_model();
    test_model(dir);
    remove_model();
    test_env_models();
    return check_finish("test_faults");
}
