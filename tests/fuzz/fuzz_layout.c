/*
 * fuzz_layout.c — packed_experts/layout.json (io/expert_store.c), through the store's
 * real open path: the file is written to a directory on tmpfs beside sparse expert
 * files of FUZZ_LAYER_BYTES each, then mf_expert_store_open parses, validates and opens
 * the layer files.
 *
 * Input: byte 0 gives the layer count (low 4 bits + 1), byte 1 which of the first 8
 * layers are MoE (layers from 8 on are MoE when byte 1's top bit is set; no MoE
 * layer at all becomes layer 0); the rest is layout.json. Invariants of an accepted
 * layout, then used: the nine components lie inside the blob, disjoint; every
 * MoE layer's file holds num_experts whole experts; the first and last expert of each
 * MoE layer read back (pread) and map (mmap + prefault) inside the file.
 */
#include "fuzz_util.h"

#include "core/common.h"
#include "io/expert_store.h"

static struct {
    char dir[FUZZ_SUBDIR_MAX];   // the packed_experts directory
    uint8_t *buf;   // [FUZZ_LAYER_BYTES]
} F;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *root = fuzz_tmpdir();
    char model[FUZZ_DIR_MAX];
    if (!root || fuzz_model_dir(root, "layout", model, sizeof model) != 0)
        fuzz_die("cannot make the expert directory under %s", root ? root : "(none)");
    snprintf(F.dir, sizeof F.dir, "%s/packed_experts", model);
    F.buf = malloc((size_t)FUZZ_LAYER_BYTES);
    if (!F.buf) fuzz_die("out of memory");
    return 0;
}

static void check_layout(const struct mf_expert_layout *L) {
    if (L->n_components < 1 || L->n_components > MF_EXPERT_MAX_COMPONENTS ||
        (L->version == 1 && L->n_components != 9) || L->num_experts < 1 ||
        L->expert_size < 1)
        fuzz_die("accepted a version %d layout of %d components, %d experts, %llu bytes",
                 L->version, L->n_components, L->num_experts,
                 (unsigned long long)L->expert_size);
    for (int i = 0; i < L->n_components; i++) {
        const struct mf_expert_component *c = &L->components[i];
        if (c->offset > L->expert_size || c->size > L->expert_size - c->offset)
            fuzz_die("component %s lies outside the expert", c->name);
        for (int j = 0; j < i; j++) {
            const struct mf_expert_component *d = &L->components[j];
            if (c->size && d->size && c->offset < d->offset + d->size &&
                d->offset < c->offset + c->size)
                fuzz_die("components %s and %s overlap", c->name, d->name);
        }
    }
    // Every MoE layer file is FUZZ_LAYER_BYTES: an accepted layout must fit in it.
    if (L->expert_size > (uint64_t)FUZZ_LAYER_BYTES / (uint64_t)L->num_experts)
        fuzz_die("accepted %d experts of %llu bytes in a %lld-byte file", L->num_experts,
                 (unsigned long long)L->expert_size, (long long)FUZZ_LAYER_BYTES);
}

// The bytes of a layer's experts that its components reach: what a read must deliver
// (a version-2 layer whose table is smaller than the largest reads no further).
static uint64_t layer_reach(const mf_expert_store *st, int il) {
    static const char *const projs[] = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"};
    uint64_t end = 0;
    for (size_t i = 0; i < sizeof projs / sizeof projs[0]; i++) {
        struct mf_expert_proj pr;
        if (!mf_expert_store_proj(st, il, projs[i], &pr)) continue;
        const struct mf_expert_component *c[4] = {pr.weight, pr.scales, pr.biases, pr.bias};
        for (int k = 0; k < 4; k++)
            if (c[k] && c[k]->offset + c[k]->size > end) end = c[k]->offset + c[k]->size;
    }
    return end;
}

static void use_store(mf_expert_store *st, int n_layers, const uint8_t *is_moe) {
    const struct mf_expert_layout *L = mf_expert_store_layout(st);
    char err[512];
    int mapped = mf_expert_store_map(st, err, sizeof err) == MF_OK;
    for (int l = 0; l < n_layers; l++) {
        if (!is_moe[l]) continue;
        int ids[2] = {0, L->num_experts - 1};
        for (int k = 0; k < 2; k++) {
            if (mf_expert_store_check(st, l, ids[k], err, sizeof err) != MF_OK)
                fuzz_die("check of layer %d expert %d: %s", l, ids[k], err);
            if (mf_expert_store_read(st, l, ids[k], F.buf, (size_t)L->expert_size, err,
                                     sizeof err) != MF_OK)
                fuzz_die("read of layer %d expert %d: %s", l, ids[k], err);
            const void *p = NULL;
            if (mapped && mf_expert_store_prefault(st, l, ids[k], &p, err, sizeof err) == MF_OK &&
                memcmp(p, F.buf, (size_t)layer_reach(st, l)) != 0)
                fuzz_die("mapped and read expert %d of layer %d differ", ids[k], l);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    int n_layers = (data[0] & 15) + 1;
    uint8_t is_moe[16];
    int any = 0;
    for (int l = 0; l < n_layers; l++) {
        is_moe[l] = l < 8 ? (data[1] >> l) & 1 : data[1] >> 7;
        any |= is_moe[l];
    }
    if (!any) is_moe[0] = 1;
    if (fuzz_write(F.dir, "layout.json", data + 2, size - 2) != 0)
        fuzz_die("cannot write %s/layout.json", F.dir);
    mf_expert_store *st = NULL;
    char err[1024];
    err[0] = '\0';
    int rc = mf_expert_store_open(&st, F.dir, n_layers, is_moe, err, sizeof err);
    if (rc == MF_OK) {
        check_layout(mf_expert_store_layout(st));
        use_store(st, n_layers, is_moe);
    } else if (st || !err[0]) {
        fuzz_die("refused layout (status %d) left a store or no message", rc);
    }
    mf_expert_store_close(st);
    return 0;
}
