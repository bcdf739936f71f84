/*
 * fuzz_config.c — config.json -> model description, weight binding and architecture
 * state creation.
 *
 * Input: config.json, then optionally NUL + model_weights.json, then NUL +
 * packed_experts/layout.json (the seeds are the three files of converted tiny models
 * of every family). The config is first parsed in memory (mf_config_parse, the whole
 * model description); then the three files go to a model directory on tmpfs beside a
 * zero-filled sparse model_weights.bin and expert files, and mf_model_load checks the
 * manifest, the layout against the config and binds every tensor of the family. A
 * loaded model gets a context (mf_ctx_new: KV caches, linear-attention state and
 * scratch sized from the config), evaluates one token and round-trips a snapshot.
 *
 * Harness cap, checked on the parsed config before anything is sized from it: at most
 * FUZZ_MAX_LAYERS layers and every width at most CAP_DIM (experts: CAP_EXPERTS), so a
 * config that describes a huge model is refused here instead of making libFuzzer report
 * its allocations as out-of-memory. Within the cap, bind must fit every tensor inside
 * the 1 MiB bin, which bounds the state further. Invariants checked beyond "no
 * crash": the getters agree with the config, a model that loads gets a context, and a
 * snapshot of it loads back.
 */
#include "fuzz_util.h"

#include "core/config.h"
#include "core/internal.h"

#define CAP_DIM 4096
#define CAP_EXPERTS 512

static struct {
    char dir[FUZZ_DIR_MAX];
} F;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *root = fuzz_tmpdir();
    if (!root || fuzz_model_dir(root, "model", F.dir, sizeof F.dir) != 0)
        fuzz_die("cannot make the model directory under %s", root ? root : "(none)");
    return 0;
}

// 1 when the described model is small enough to load (see the header comment): the
// shared dims, and the family's own integer fields as its snapshot identity lists them
// (mf_arch.ident: shapes such as linear heads, MLA ranks, shared expert widths).
static int within_cap(const struct mf_config *c) {
    const int dims[] = {c->hidden_size, c->num_attention_heads, c->num_key_value_heads,
                        c->head_dim, c->vocab_size, c->moe_intermediate_size,
                        c->intermediate_size};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i] > CAP_DIM) return 0;
    struct mf_ident_field f[MF_IDENT_ARCH_MAX];
    int nf = c->family->ident ? c->family->ident(c, f, MF_IDENT_ARCH_MAX) : 0;
    for (int i = 0; i < nf && i < MF_IDENT_ARCH_MAX; i++)
        if (!f[i].is_float && f[i].i > CAP_DIM) return 0;
    return c->num_hidden_layers <= FUZZ_MAX_LAYERS && c->num_experts <= CAP_EXPERTS &&
           (int64_t)c->num_attention_heads * c->head_dim <= CAP_DIM;
}

static void check_getters(const mf_model *m, const struct mf_config *c) {
    if (mf_model_n_vocab(m) != c->vocab_size || mf_model_n_layer(m) != c->num_hidden_layers ||
        mf_model_n_embd(m) != c->hidden_size ||
        strcmp(mf_model_arch(m), c->model_type) != 0)
        fuzz_die("the loaded model disagrees with its parsed config");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[3] = {NULL, NULL, NULL};
    size_t len[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++)
        if (!fuzz_part(data, size, i, &part[i], &len[i])) part[i] = NULL;
    struct mf_config cfg;
    char err[1024];
    if (mf_config_parse(&cfg, (const char *)part[0], len[0], NULL, err, sizeof err) != MF_OK)
        return 0;
    int small = within_cap(&cfg);
    if (small) {
        fuzz_put_model(F.dir, part[0], len[0], part[1], len[1], part[2], len[2]);
        mf_model *m = NULL;
        if (mf_model_load(&m, F.dir, NULL, err, sizeof err) == MF_OK) {
            check_getters(m, &cfg);
            fuzz_use_model(m);
        } else if (!err[0]) {
            fuzz_die("mf_model_load failed without a message");
        }
        mf_model_free(m);
    }
    mf_config_free(&cfg);
    return 0;
}
