/*
 * fuzz_util.h — what the libFuzzer harnesses of tests/fuzz/ share: a per-process
 * scratch directory (on /dev/shm when it exists, so "files on disk" cost no disk I/O),
 * writing a file there, splitting an input into NUL-separated parts, and the model
 * directory the config, manifest and snapshot harnesses load.
 *
 * A harness is one translation unit plus this header plus the core; it is linked either
 * with libFuzzer (clang -fsanitize=fuzzer) or with driver.c (a plain main that replays
 * files, for compilers without libFuzzer). libFuzzer's interface is two free functions
 * with no user pointer, so each harness keeps its fixture in one static struct made by
 * LLVMFuzzerInitialize; that is the only process-wide state and it is never changed by
 * an input. Failures of the fixture itself (no temp dir, no disk) print and return -1
 * from init, or are reported with fuzz_die (abort: a harness bug, not an input).
 */
#ifndef MF_FUZZ_UTIL_H
#define MF_FUZZ_UTIL_H

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moeflux.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// A broken fixture or a violated invariant: stop so libFuzzer records the input.
#define fuzz_die(...)                                                     \
    do {                                                                  \
        fprintf(stderr, "fuzz harness: " __VA_ARGS__);                    \
        fprintf(stderr, "\n");                                            \
        abort();                                                          \
    } while (0)

// Buffer sizes: directories under the scratch root, and paths of files in them.
#define FUZZ_DIR_MAX 384
#define FUZZ_SUBDIR_MAX 512   // a directory inside one of those
#define FUZZ_PATH_MAX 1024

// Scratch directory removed at exit (libFuzzer exits through exit() after a run).
static char fuzz_tmp_root[256];

static inline void fuzz_rm_tree(const char *path) {
    char cmd[400];
    if (snprintf(cmd, sizeof cmd, "rm -rf '%s'", path) < (int)sizeof cmd && path[0])
        (void)!system(cmd);
}

static inline void fuzz_cleanup(void) { fuzz_rm_tree(fuzz_tmp_root); }

// Make the scratch directory once; returns its path or NULL.
static inline const char *fuzz_tmpdir(void) {
    if (fuzz_tmp_root[0]) return fuzz_tmp_root;
    struct stat st;
    const char *base = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) ? "/dev/shm"
                       : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(fuzz_tmp_root, sizeof fuzz_tmp_root, "%s/mf-fuzz-XXXXXX", base);
    if (!mkdtemp(fuzz_tmp_root)) {
        perror("fuzz: mkdtemp");
        fuzz_tmp_root[0] = '\0';
        return NULL;
    }
    atexit(fuzz_cleanup);
    return fuzz_tmp_root;
}

// dir/name := bytes (created or replaced). Returns 0 or -1.
static inline int fuzz_write(const char *dir, const char *name, const void *p, size_t n) {
    char path[FUZZ_PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    const uint8_t *b = p;
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        b += w;
        n -= (size_t)w;
    }
    return close(fd);
}

// dir/name as a sparse file of `size` bytes (reads give zeros). Returns 0 or -1.
static inline int fuzz_sparse(const char *dir, const char *name, off_t size) {
    char path[FUZZ_PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    int rc = ftruncate(fd, size);
    return close(fd) | rc;
}

// Whole file into a malloc'd buffer (NULL on failure; *n its length).
static inline uint8_t *fuzz_slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *buf = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap ? 2 * cap : 65536);
            if (!nb) break;
            buf = nb;
            cap = cap ? 2 * cap : 65536;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    *n = len;
    return buf;
}

// The k-th NUL-separated part of data (k from 0): *p, *n; 0 if there are fewer parts.
static inline int fuzz_part(const uint8_t *data, size_t size, int k, const uint8_t **p,
                     size_t *n) {
    static const uint8_t empty[1] = {0};
    if (!data || !size) {
        data = empty;   // memchr and pointer arithmetic on NULL are undefined
        size = 0;
    }
    size_t start = 0;
    for (int i = 0; i < k; i++) {
        const uint8_t *z = size > start ? memchr(data + start, 0, size - start) : NULL;
        if (!z) return 0;
        start = (size_t)(z - data) + 1;
    }
    const uint8_t *z = size > start ? memchr(data + start, 0, size - start) : NULL;
    *p = data + start;
    *n = z ? (size_t)(z - (data + start)) : size - start;
    return 1;
}

/* ==== The model directory ====
 * config.json, model_weights.json and packed_experts/layout.json come from the input;
 * model_weights.bin and the expert files are sparse files made once at init, large
 * enough for every fixture model (a manifest or layout that asks for more is refused
 * by the loader as a short file, which is a path worth fuzzing too). Their contents
 * are zeros: the harnesses test parsing, binding and state creation, not numerics. */

#define FUZZ_BIN_BYTES ((off_t)1 << 20)       // model_weights.bin
#define FUZZ_LAYER_BYTES ((off_t)1 << 20)     // each packed_experts/layer_NN.bin
#define FUZZ_MAX_LAYERS 16                    // layer files made (the layer cap)

// Make dir/<sub> holding the sparse bin and expert files. Returns 0 or -1.
static inline int fuzz_model_dir(const char *root, const char *sub, char *out, size_t outlen) {
    snprintf(out, outlen, "%s/%s", root, sub);
    char pe[FUZZ_SUBDIR_MAX];
    snprintf(pe, sizeof pe, "%s/packed_experts", out);
    if (mkdir(out, 0700) != 0 || mkdir(pe, 0700) != 0) return -1;
    if (fuzz_sparse(out, "model_weights.bin", FUZZ_BIN_BYTES) != 0) return -1;
    for (int l = 0; l < FUZZ_MAX_LAYERS; l++) {
        char name[32];
        snprintf(name, sizeof name, "layer_%02d.bin", l);
        if (fuzz_sparse(pe, name, FUZZ_LAYER_BYTES) != 0) return -1;
    }
    return 0;
}

// Write the three JSON files of a model directory (a NULL part: the file is removed).
static inline void fuzz_put_model(const char *dir, const uint8_t *cfg, size_t ncfg,
                           const uint8_t *man, size_t nman, const uint8_t *lay,
                           size_t nlay) {
    const char *names[3] = {"config.json", "model_weights.json",
                            "packed_experts/layout.json"};
    const uint8_t *parts[3] = {cfg, man, lay};
    size_t lens[3] = {ncfg, nman, nlay};
    for (int i = 0; i < 3; i++) {
        char path[FUZZ_PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (!parts[i]) {
            unlink(path);
        } else if (fuzz_write(dir, names[i], parts[i], lens[i]) != 0) {
            fuzz_die("cannot write %s", path);
        }
    }
}

// The fixture models (tests/fuzz/models/<family>.model, each the three files joined
// by NUL as in the config harness's input), for the harnesses that fuzz one file of a
// model against the others held fixed. FUZZ_MODELS_DIR is set by the Makefile; the
// environment variable of that name overrides it (binaries run on another machine).
#ifndef FUZZ_MODELS_DIR
#define FUZZ_MODELS_DIR "tests/fuzz/models"
#endif
#define FUZZ_N_FAMILIES 6
static const char *const fuzz_families[FUZZ_N_FAMILIES] = {"qwen3_5_moe", "qwen3_next",
                                                           "deepseek_v3", "qwen3_moe",
                                                           "glm4_moe", "minimax"};

// The fixture of family f: its bytes (caller frees) and a model directory made for it
// under the scratch root holding all three files. Dies when the fixture is missing.
static inline uint8_t *fuzz_fixture(int f, char *dir, size_t dirlen, size_t *n) {
    char path[FUZZ_PATH_MAX];
    const char *models = getenv("FUZZ_MODELS_DIR");
    snprintf(path, sizeof path, "%s/%s.model", models && *models ? models : FUZZ_MODELS_DIR,
             fuzz_families[f]);
    uint8_t *text = fuzz_slurp(path, n);
    const char *root = fuzz_tmpdir();
    if (!text || !root || fuzz_model_dir(root, fuzz_families[f], dir, dirlen) != 0)
        fuzz_die("fixture %s: cannot read it or make its directory", path);
    const uint8_t *p[3];
    size_t len[3];
    for (int i = 0; i < 3; i++)
        if (!fuzz_part(text, *n, i, &p[i], &len[i])) fuzz_die("%s: not 3 parts", path);
    fuzz_put_model(dir, p[0], len[0], p[1], len[1], p[2], len[2]);
    return text;
}

// The context every harness makes: a few positions, one compute and one I/O thread
// (thread creation would otherwise dominate an execution).
static inline struct mf_ctx_params fuzz_ctx_params(const mf_model *m) {
    struct mf_ctx_params p = mf_ctx_default_params();
    int max = mf_model_n_ctx_train(m);
    p.n_ctx = max < 8 ? max : 8;
    p.n_threads = 1;
    p.io_threads = 1;
    p.io_mode = "pread";
    return p;
}

// A context, one token and a snapshot round trip on a model that loaded.
static inline void fuzz_use_model(const mf_model *m) {
    struct mf_ctx_params p = fuzz_ctx_params(m);
    mf_ctx *ctx = NULL;
    char err[1024];
    int rc = mf_ctx_new(&ctx, m, &p, err, sizeof err);
    if (rc == MF_ERR_NOMEM) return;
    if (rc != MF_OK) fuzz_die("mf_ctx_new refused a loaded model: %s", err);
    int32_t tok = mf_model_n_vocab(m) - 1;
    float *logits = malloc((size_t)mf_model_n_vocab(m) * sizeof *logits);
    if (logits && mf_ctx_eval(ctx, &tok, 1, logits, 0) == MF_OK) {
        size_t n = mf_ctx_state_size(ctx);
        void *snap = malloc(n);
        if (snap && mf_ctx_state_save(ctx, snap, n) != (int64_t)n)
            fuzz_die("state_save: %s", mf_ctx_errmsg(ctx));
        if (snap && mf_ctx_state_load(ctx, snap, n) != MF_OK)
            fuzz_die("state_load of its own snapshot: %s", mf_ctx_errmsg(ctx));
        free(snap);
    }
    free(logits);
    mf_ctx_free(ctx);
}

#endif /* MF_FUZZ_UTIL_H */
