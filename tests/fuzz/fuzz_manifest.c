/*
 * fuzz_manifest.c — the tensor manifest model_weights.json (core/manifest.c) and its
 * binding to a config (core/weights.c and each family's bind).
 *
 * Input: byte 0 picks the family (mod 6: qwen3_5_moe, qwen3_next, deepseek_v3,
 * qwen3_moe, glm4_moe, minimax) whose fixture config.json and layout.json are held fixed;
 * the rest is
 * model_weights.json. It is parsed in memory against a 1 MiB bin, and the accepted
 * table is checked: sorted by name and each name found by mf_manifest_find, every
 * tensor inside the bin, no two sharing a byte, size = element count x dtype size.
 * Then it goes to the family's model directory (sparse 1 MiB model_weights.bin) and
 * mf_model_load binds every tensor the family needs; a model that loads gets a
 * context, evaluates a token and round-trips a snapshot (fuzz_use_model).
 */
#include "fuzz_util.h"

#include "core/common.h"
#include "core/manifest.h"

static struct {
    char dir[FUZZ_N_FAMILIES][FUZZ_DIR_MAX];
} F;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    for (int f = 0; f < FUZZ_N_FAMILIES; f++) {
        size_t n;
        free(fuzz_fixture(f, F.dir[f], sizeof F.dir[f], &n));
    }
    return 0;
}

static void check_table(const struct mf_manifest *m) {
    for (int i = 0; i < m->n_tensors; i++) {
        const struct mf_tensor_info *t = &m->tensors[i];
        if (i && strcmp(m->tensors[i - 1].name, t->name) >= 0)
            fuzz_die("table not sorted at \"%s\"", t->name);
        if (mf_manifest_find(m, t->name) != t) fuzz_die("\"%s\" not found", t->name);
        if (t->ndim < 0 || t->ndim > MF_MAX_DIMS) fuzz_die("\"%s\": ndim %d", t->name, t->ndim);
        uint64_t count = 1;
        for (int d = 0; d < t->ndim; d++) count *= (uint64_t)t->shape[d];
        if (count * mf_dtype_size(t->dtype) != t->size ||
            t->offset > (uint64_t)FUZZ_BIN_BYTES ||
            t->size > (uint64_t)FUZZ_BIN_BYTES - t->offset)
            fuzz_die("\"%s\": size or range wrong", t->name);
        for (int j = 0; j < i; j++) {
            const struct mf_tensor_info *u = &m->tensors[j];
            if (t->size && u->size && t->offset < u->offset + u->size &&
                u->offset < t->offset + t->size)
                fuzz_die("\"%s\" and \"%s\" overlap", t->name, u->name);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *dir = F.dir[data[0] % FUZZ_N_FAMILIES];
    const char *text = (const char *)data + 1;
    struct mf_manifest man;
    char err[1024];
    err[0] = '\0';
    int rc = mf_manifest_parse(&man, text, size - 1, NULL, (uint64_t)FUZZ_BIN_BYTES, err,
                               sizeof err);
    if (rc != MF_OK) {
        if (!err[0] || man.tensors || man.n_tensors)
            fuzz_die("refused manifest (status %d) left entries or no message", rc);
        return 0;
    }
    if (man.n_tensors <= 512) check_table(&man);   // quadratic: small tables only
    mf_manifest_free(&man);
    char path[FUZZ_PATH_MAX];
    snprintf(path, sizeof path, "%s/model_weights.json", dir);
    if (fuzz_write(dir, "model_weights.json", text, size - 1) != 0)
        fuzz_die("cannot write %s", path);
    mf_model *m = NULL;
    err[0] = '\0';
    if (mf_model_load(&m, dir, NULL, err, sizeof err) == MF_OK)
        fuzz_use_model(m);
    else if (!err[0])
        fuzz_die("mf_model_load failed without a message");
    mf_model_free(m);
    return 0;
}
