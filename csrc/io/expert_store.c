/*
 * expert_store.c — packed_experts/: layout.json and the per-layer expert files.
 *
 * The layout is validated once at open (every component inside the blob, sizes equal
 * to their shapes, names unique, components disjoint; version 1: the nine components
 * present; every projection's parts consistent with its weight's format; every MoE
 * layer's file at least num_experts * expert_size bytes), so a read is a single pread
 * of one blob with no further checks. Layouts written by the reference system lack
 * "format", "version", "moe_layers", "bits" and "group_size": the MoE layers then
 * come from the caller and bits from the component shapes. Version 2 adds per-weight
 * "mode" / "bits" / "group_size", ".bias" parts and "layer_components" (a table per
 * layer where the recipe changes with the layer). This file knows nothing of models
 * or of what the bytes mean; moe.c interprets the projections.
 */
#include "io/expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/json.h"

#define LAYOUT_VERSION 2
#define MAX_LAYER_FILE_BYTES ((uint64_t)1 << 46)

struct mf_expert_store {
    struct mf_expert_layout layout;
    struct mf_expert_table *tables;   // [n_layers] each layer's components
    uint64_t *used;      // [n_layers] bytes of a blob its components reach (version 2:
                         // a read stops there, a smaller layer's padding is not read;
                         // version 1: expert_size)
    int n_layers;
    int *fds;            // [n_layers], -1 for layers without a file
    char *dir;           // for messages
    // What the reader's modes add, made on first use by whichever ctx asks first and
    // shared by all of them (one mapping and one O_DIRECT fd per file per model).
    pthread_mutex_t lock;        // guards the fields below while they are made
    int lock_ok;                 // lock initialised (close is safe on a half-built store)
    int mapped;                  // 1 = maps[] made, -1 = mapping failed (msg in map_err)
    uint8_t **maps;              // [n_layers] PROT_READ mappings, NULL without a file
    char map_err[256];
    int direct;                  // 0 untried, 1 dfds[] open, -1 refused (why in direct_why)
    int *dfds;                   // [n_layers] O_DIRECT / F_NOCACHE fds, -1 without a file
    char direct_why[256];
    int pins;                    // mf_expert_store_pin counts; maps[] locked while > 0
    struct mf_expert_pin pin;    // the callbacks that locked them
    size_t page;                 // sysconf(_SC_PAGESIZE)
};

static const char *const component_names[9] = {
    "gate_proj.weight", "gate_proj.scales", "gate_proj.biases",
    "up_proj.weight",   "up_proj.scales",   "up_proj.biases",
    "down_proj.weight", "down_proj.scales", "down_proj.biases",
};

/* ==== layout.json ==== */

static int is_float(enum mf_dtype dt) {
    return dt == MF_DTYPE_F32 || dt == MF_DTYPE_F16 || dt == MF_DTYPE_BF16;
}

// The optional per-component format fields of version 2: "mode" (affine, float, mxfp4),
// "bits", "group_size". "interleaved" rows (gpt-oss's gate_up before mlx-lm's
// sanitize) are refused: prep writes gate and up split, or fused in two row blocks.
static int parse_format(struct mf_expert_component *c, const mf_json *e, const char *name,
                        char *err, size_t errlen) {
    const char *mode = NULL;
    int64_t bits = 0, gs = 0;
    int inter = 0;
    if (mf_json_get_str(e, "mode", &mode) < 0 || mf_json_get_int(e, "bits", &bits) < 0 ||
        mf_json_get_int(e, "group_size", &gs) < 0 ||
        mf_json_get_bool(e, "interleaved", &inter) < 0 || bits < 0 || bits > 64 ||
        gs < 0 || gs > 4096)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: component %s: mode must be a string, bits and group_size "
                      "small integers, interleaved a boolean", name, c->name);
    if (mode && strcmp(mode, "affine") != 0 && strcmp(mode, "float") != 0 &&
        strcmp(mode, "mxfp4") != 0)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                      "%s: component %s: mode \"%.32s\" is not read by this build "
                      "(affine, float, mxfp4)", name, c->name, mode);
    if (inter)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                      "%s: component %s: interleaved gate/up rows are not read (prep "
                      "writes gate_proj and up_proj split, or gate_up_proj as gate rows "
                      "then up rows)", name, c->name);
    c->mode = !mode ? MF_EXPERT_MODE_NONE
              : strcmp(mode, "affine") == 0 ? MF_EXPERT_MODE_AFFINE
              : strcmp(mode, "mxfp4") == 0 ? MF_EXPERT_MODE_MXFP4
                                            : MF_EXPERT_MODE_FLOAT;
    c->bits = (int)bits;
    c->group_size = (int)gs;
    return MF_OK;
}

static int parse_component(struct mf_expert_component *c, const mf_json *e, size_t i,
                           const char *name, uint64_t expert_size, char *err,
                           size_t errlen) {
    const char *cname = NULL, *dt = NULL;
    int64_t off = -1, size = -1;
    const mf_json *sh = mf_json_get(e, "shape");
    memset(c, 0, sizeof *c);
    if (e->type != MF_JSON_OBJECT || mf_json_get_str(e, "name", &cname) != 1 ||
        strlen(cname) >= sizeof c->name || mf_json_get_int(e, "offset", &off) != 1 ||
        mf_json_get_int(e, "size", &size) != 1 || off < 0 || size < 0 ||
        mf_json_get_str(e, "dtype", &dt) != 1 || mf_dtype_parse(dt, &c->dtype) != 0 ||
        !sh || sh->type != MF_JSON_ARRAY || sh->n < 1 || sh->n > 2)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: components[%zu] needs name, offset, size, dtype (F32, F16, "
                      "BF16, U32, U8, I32) and a 1- or 2-D shape", name, i);
    snprintf(c->name, sizeof c->name, "%s", cname);
    c->offset = (uint64_t)off;
    c->size = (uint64_t)size;
    c->ndim = (int)sh->n;
    uint64_t count = 1;
    for (size_t d = 0; d < sh->n; d++) {
        const mf_json *v = sh->items[d];
        if (v->type != MF_JSON_NUMBER || !v->num_is_int || v->inum <= 0 ||
            v->inum > ((int64_t)1 << 30))
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: component %s: shape[%zu] is not a dimension", name, c->name,
                          d);
        c->shape[d] = v->inum;
        count *= (uint64_t)v->inum;
    }
    if (count * mf_dtype_size(c->dtype) != c->size)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: component %s: size %llu bytes but shape x %s needs %llu", name,
                      c->name, (unsigned long long)c->size, mf_dtype_name(c->dtype),
                      (unsigned long long)(count * mf_dtype_size(c->dtype)));
    // Kernels read components through typed pointers, at blob + offset, and in mmap
    // mode blobs start at e * expert_size: both must keep the element alignment.
    size_t esz = mf_dtype_size(c->dtype);
    if (c->offset % esz != 0 || expert_size % esz != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: component %s: offset %llu and expert_size %llu must be "
                      "multiples of its %s element size %zu", name, c->name,
                      (unsigned long long)c->offset, (unsigned long long)expert_size,
                      mf_dtype_name(c->dtype), esz);
    if (c->offset > expert_size || c->size > expert_size - c->offset)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: component %s [%llu, %llu) lies outside the %llu-byte expert",
                      name, c->name, (unsigned long long)c->offset,
                      (unsigned long long)(c->offset + c->size),
                      (unsigned long long)expert_size);
    return parse_format(c, e, name, err, errlen);
}

static const struct mf_expert_component *table_find(const struct mf_expert_table *t,
                                                    const char *name) {
    for (int i = 0; i < t->n_components; i++)
        if (strcmp(t->components[i].name, name) == 0)
            return &t->components[i];
    return NULL;
}

// Names unique, components pairwise disjoint.
static int check_disjoint(const struct mf_expert_table *t, const char *name, char *err,
                          size_t errlen) {
    for (int i = 0; i < t->n_components; i++) {
        for (int j = i + 1; j < t->n_components; j++) {
            const struct mf_expert_component *a = &t->components[i], *b = &t->components[j];
            if (strcmp(a->name, b->name) == 0)
                return mf_err(err, errlen, MF_ERR_FORMAT,
                              "%s: component \"%s\" listed more than once", name, a->name);
            if (a->offset < b->offset + b->size && b->offset < a->offset + a->size &&
                a->size && b->size)
                return mf_err(err, errlen, MF_ERR_FORMAT,
                              "%s: components %s and %s overlap", name, a->name, b->name);
        }
    }
    return 0;
}

// Version 1 (the reference system's): the nine components, each present once.
static int check_nine(const struct mf_expert_table *t, const char *name, char *err,
                      size_t errlen) {
    if (t->n_components != 9)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: \"components\" must list the 9 expert components", name);
    for (int k = 0; k < 9; k++)
        if (!table_find(t, component_names[k]))
            return mf_err(err, errlen, MF_ERR_FORMAT, "%s: component \"%s\" missing",
                          name, component_names[k]);
    return 0;
}

// "<proj>.<part>" -> proj (into buf) and part; -1 when the name has no '.'.
static int split_name(const char *full, char *buf, size_t n, const char **part) {
    const char *dot = strrchr(full, '.');
    if (!dot || dot == full || (size_t)(dot - full) >= n)
        return -1;
    memcpy(buf, full, (size_t)(dot - full));
    buf[dot - full] = '\0';
    *part = dot + 1;
    return 0;
}

static const struct mf_expert_component *part_of(const struct mf_expert_table *t,
                                                 const char *proj, const char *part) {
    char full[64];
    snprintf(full, sizeof full, "%s.%s", proj, part);
    return table_find(t, full);
}

static int valid_bits(int64_t b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }
static int valid_gs(int64_t g) { return g == 32 || g == 64 || g == 128; }

// An affine projection: U32 codes with float scales and biases of one shape; bits and
// group size from the component, else the layout's defaults, else (bits) the shapes.
static int check_affine(struct mf_expert_component *w, const struct mf_expert_table *t,
                        const char *proj, int dbits, int dgs, const char *name, char *err,
                        size_t errlen) {
    const struct mf_expert_component *s = part_of(t, proj, "scales"),
                                     *b = part_of(t, proj, "biases");
    if (!s || !b || !is_float(s->dtype) || b->dtype != s->dtype || s->ndim != 2 ||
        b->ndim != 2 || w->ndim != 2 || s->shape[0] != w->shape[0] ||
        b->shape[0] != s->shape[0] || b->shape[1] != s->shape[1])
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s: U32 codes need %s.scales and %s.biases, float, of one 2-D "
                      "shape [rows, n_in/group_size] with the weight's rows", name,
                      w->name, proj, proj);
    int64_t gs = w->group_size ? w->group_size : dgs ? dgs : 64;
    int64_t n_in = s->shape[1] * gs;
    int64_t derived = (w->shape[1] * 32) % n_in == 0 ? w->shape[1] * 32 / n_in : 0;
    int64_t bits = w->bits ? w->bits : dbits ? dbits : derived;
    if (!valid_gs(gs) || !valid_bits(bits) || bits != derived)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s: bits %lld / group_size %lld do not fit its shapes [%lld, "
                      "%lld] / scales [%lld, %lld] (bits 2-6 or 8, group 32/64/128)",
                      name, w->name, (long long)bits, (long long)gs,
                      (long long)w->shape[0], (long long)w->shape[1],
                      (long long)s->shape[0], (long long)s->shape[1]);
    w->mode = MF_EXPERT_MODE_AFFINE;
    w->bits = (int)bits;
    w->group_size = (int)gs;
    return MF_OK;
}

// An MXFP4 projection (marked "mxfp4": U32 codes are affine unless marked): U32 codes
// [rows, n_in/8], U8 E8M0 scales [rows, n_in/32], no biases; bits 4 and group 32
// when given.
static int check_mxfp4(struct mf_expert_component *w, const struct mf_expert_table *t,
                       const char *proj, const char *name, char *err, size_t errlen) {
    const struct mf_expert_component *s = part_of(t, proj, "scales");
    if (w->dtype != MF_DTYPE_U32 || w->ndim != 2 || !s || s->dtype != MF_DTYPE_U8 ||
        s->ndim != 2 || s->shape[0] != w->shape[0] || part_of(t, proj, "biases"))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s marked mxfp4: expected U32 codes [rows, n_in/8] with "
                      "%s.scales U8 [rows, n_in/32] and no %s.biases", name, w->name,
                      proj, proj);
    if (s->shape[1] * 32 != w->shape[1] * 8 || (w->bits && w->bits != 4) ||
        (w->group_size && w->group_size != 32))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s marked mxfp4: shape [%lld, %lld] with scales [%lld, %lld], "
                      "bits %d, group_size %d; mxfp4 is 4 bits in groups of 32",
                      name, w->name, (long long)w->shape[0], (long long)w->shape[1],
                      (long long)s->shape[0], (long long)s->shape[1], w->bits,
                      w->group_size);
    w->bits = 4;
    w->group_size = 32;
    return MF_OK;
}

// One projection: its weight's mode decides which other parts it must (not) have.
static int check_projection(struct mf_expert_component *w, const struct mf_expert_table *t,
                            const char *proj, int dbits, int dgs, const char *name,
                            char *err, size_t errlen) {
    const struct mf_expert_component *bias = part_of(t, proj, "bias");
    if (bias && (!is_float(bias->dtype) || bias->ndim != 1 || w->ndim != 2 ||
                 bias->shape[0] != w->shape[0]))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s.bias: expected float [%lld] (the weight's rows), got %s "
                      "%d-D", name, proj, (long long)w->shape[0],
                      mf_dtype_name(bias->dtype), bias->ndim);
    if (w->mode == MF_EXPERT_MODE_MXFP4)
        return check_mxfp4(w, t, proj, name, err, errlen);
    if (w->dtype == MF_DTYPE_U32 && w->mode != MF_EXPERT_MODE_FLOAT)
        return check_affine(w, t, proj, dbits, dgs, name, err, errlen);
    if (!is_float(w->dtype) || w->mode == MF_EXPERT_MODE_AFFINE || w->ndim != 2 ||
        part_of(t, proj, "scales") || part_of(t, proj, "biases"))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: %s: %s %d-D%s: expected U32 affine codes with scales and "
                      "biases, or a float (F32/F16/BF16) [rows, n_in] matrix alone",
                      name, w->name, mf_dtype_name(w->dtype), w->ndim,
                      w->mode == MF_EXPERT_MODE_AFFINE ? " marked affine" : "");
    w->mode = MF_EXPERT_MODE_FLOAT;
    w->bits = w->group_size = 0;
    return MF_OK;
}

// Every component is part of a projection whose weight is listed; each weight's
// format is resolved (dbits / dgs: the layout's top-level defaults, 0 = none).
static int check_projections(struct mf_expert_table *t, int dbits, int dgs,
                             const char *name, char *err, size_t errlen) {
    static const char *const parts[4] = {"weight", "scales", "biases", "bias"};
    for (int i = 0; i < t->n_components; i++) {
        struct mf_expert_component *c = &t->components[i];
        char proj[32];
        const char *part = NULL;
        int known = 0;
        if (split_name(c->name, proj, sizeof proj, &part) == 0)
            for (int k = 0; k < 4; k++)
                known |= strcmp(part, parts[k]) == 0;
        if (!known)
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: component %s: expected <projection>.weight, .scales, "
                          ".biases or .bias", name, c->name);
        if (strcmp(part, "weight") != 0) {
            if (!part_of(t, proj, "weight"))
                return mf_err(err, errlen, MF_ERR_FORMAT,
                              "%s: component %s without %s.weight", name, c->name, proj);
            continue;
        }
        int rc = check_projection(c, t, proj, dbits, dgs, name, err, errlen);
        if (rc)
            return rc;
    }
    return MF_OK;
}

static int parse_table(struct mf_expert_table *t, const mf_json *cs, uint64_t es,
                       const char *name, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    if (!cs || cs->type != MF_JSON_ARRAY || cs->n < 1 || cs->n > MF_EXPERT_MAX_COMPONENTS)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: a component list must hold 1 to %d components", name,
                      MF_EXPERT_MAX_COMPONENTS);
    for (size_t i = 0; i < cs->n; i++) {
        int rc = parse_component(&t->components[i], cs->items[i], i, name, es, err, errlen);
        if (rc)
            return rc;
        t->n_components++;
    }
    return check_disjoint(t, name, err, errlen);
}

// bits / group_size of the top level: defaults of the components that give none.
// Version 1 without them: the reference system's fixed group of 64, bits from the
// gate projection's shapes (check_affine derives them).
static int top_bits(const mf_json *root, int64_t *bits, int64_t *gs, const char *name,
                    char *err, size_t errlen) {
    *bits = 0;
    *gs = 0;
    if (mf_json_get_int(root, "bits", bits) < 0 ||
        mf_json_get_int(root, "group_size", gs) < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: bits/group_size must be integers",
                      name);
    // Before any arithmetic with it: a huge group_size overflowed n_in.
    if (*gs && !valid_gs(*gs))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: group_size %lld: expected 32, 64 or 128", name, (long long)*gs);
    if (*bits && !valid_bits(*bits))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: bits %lld: expected 2, 3, 4, 5, 6 or 8", name, (long long)*bits);
    return MF_OK;
}

static int parse_header(struct mf_expert_layout *L, const mf_json *root, int n_layers,
                        const char *name, char *err, size_t errlen) {
    if (!root || root->type != MF_JSON_OBJECT)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: top level must be an object", name);
    const char *fmt = NULL;
    int64_t version = 1, es = 0, nl = 0, ne = 0;
    if (mf_json_get_str(root, "format", &fmt) < 0 ||
        (fmt && strcmp(fmt, "moeflux-experts") != 0))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: \"format\" is not \"moeflux-experts\"", name);
    if (mf_json_get_int(root, "version", &version) < 0 || version < 1)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: bad \"version\"", name);
    if (version > LAYOUT_VERSION)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                      "%s: layout version %lld is newer than this build reads (%d)", name,
                      (long long)version, LAYOUT_VERSION);
    if (mf_json_get_int(root, "expert_size", &es) != 1 || es <= 0 ||
        mf_json_get_int(root, "num_layers", &nl) != 1 ||
        mf_json_get_int(root, "num_experts", &ne) != 1 || ne <= 0 || ne > (1 << 20))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: needs positive integers expert_size, num_layers, num_experts",
                      name);
    // The file check multiplies them (a wrapped product let a tiny file pass), and so
    // does the model's bytes-per-token figure: at most 64 TiB per layer file, four
    // orders of magnitude above the largest real one.
    if ((uint64_t)es > MAX_LAYER_FILE_BYTES / (uint64_t)ne)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_experts %lld x expert_size %lld is beyond the %llu bytes a "
                      "layer file may hold", name, (long long)ne, (long long)es,
                      (unsigned long long)MAX_LAYER_FILE_BYTES);
    if (nl != n_layers)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_layers is %lld but config.json has %d layers", name,
                      (long long)nl, n_layers);
    L->expert_size = (uint64_t)es;
    L->num_layers = (int)nl;
    L->num_experts = (int)ne;
    L->version = (int)version;
    return MF_OK;
}

static int check_moe_layers(const mf_json *root, int n_layers, const uint8_t *is_moe,
                            const char *name, char *err, size_t errlen) {
    const mf_json *ml = mf_json_get(root, "moe_layers");
    if (!ml || ml->type == MF_JSON_NULL)
        return MF_OK;
    if (ml->type != MF_JSON_ARRAY)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: \"moe_layers\" must be a list",
                      name);
    // Must name exactly the layers config.json makes MoE.
    int n_cfg = 0;
    for (int l = 0; l < n_layers; l++)
        n_cfg += is_moe[l] != 0;
    for (size_t i = 0; i < ml->n; i++) {
        const mf_json *v = ml->items[i];
        if (v->type != MF_JSON_NUMBER || !v->num_is_int || v->inum < 0 ||
            v->inum >= n_layers || !is_moe[v->inum])
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: moe_layers[%zu] is not a MoE layer of config.json", name, i);
    }
    if ((int)ml->n != n_cfg)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: moe_layers lists %zu layers, config.json has %d MoE layers",
                      name, ml->n, n_cfg);
    return MF_OK;
}

// "layer_components" (version 2): {"<layer>": [components]} for the MoE layers whose
// experts differ from the default table (a recipe whose bits change with the layer).
static int parse_layer_tables(struct mf_expert_table *tables, const mf_json *root,
                              const struct mf_expert_layout *L, const uint8_t *is_moe,
                              int dbits, int dgs, const char *name, char *err,
                              size_t errlen) {
    const mf_json *lc = mf_json_get(root, "layer_components");
    if (!lc || lc->type == MF_JSON_NULL)
        return MF_OK;
    if (lc->type != MF_JSON_OBJECT || L->version < 2)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: \"layer_components\" must be an object (layout version 2)",
                      name);
    for (size_t i = 0; i < lc->n; i++) {
        // canonical decimal only: "1" and "01" must not both name layer 1
        const char *key = lc->items[i]->key;
        char *end = NULL;
        long il = strtol(key, &end, 10);
        if (!(key[0] >= '0' && key[0] <= '9') || (key[0] == '0' && key[1]) || *end ||
            il >= L->num_layers || !is_moe[il])
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: layer_components key \"%.16s\" is not a MoE layer", name,
                          lc->items[i]->key);
        int rc = parse_table(&tables[il], lc->items[i], L->expert_size, name, err, errlen);
        if (!rc)
            rc = check_projections(&tables[il], dbits, dgs, name, err, errlen);
        if (rc)
            return rc;
    }
    return MF_OK;
}

// The default table into L (and L's informational bits), then every layer's table.
static int parse_layout(struct mf_expert_layout *L, struct mf_expert_table *tables,
                        const mf_json *root, int n_layers, const uint8_t *is_moe,
                        const char *name, char *err, size_t errlen) {
    int64_t dbits = 0, dgs = 0;
    struct mf_expert_table def;
    int rc = parse_header(L, root, n_layers, name, err, errlen);
    if (!rc)
        rc = check_moe_layers(root, n_layers, is_moe, name, err, errlen);
    if (!rc)
        rc = top_bits(root, &dbits, &dgs, name, err, errlen);
    if (!rc)
        rc = parse_table(&def, mf_json_get(root, "components"), L->expert_size, name,
                         err, errlen);
    if (!rc && L->version == 1)
        rc = check_nine(&def, name, err, errlen);
    if (!rc)
        rc = check_projections(&def, (int)dbits, (int)dgs, name, err, errlen);
    if (rc)
        return rc;
    L->n_components = def.n_components;
    memcpy(L->components, def.components, sizeof def.components);
    const struct mf_expert_component *g = table_find(&def, "gate_proj.weight");
    if (g && g->mode == MF_EXPERT_MODE_AFFINE) {
        L->bits = g->bits;
        L->group_size = g->group_size;
    }
    for (int l = 0; l < n_layers; l++)
        tables[l] = def;
    return parse_layer_tables(tables, root, L, is_moe, (int)dbits, (int)dgs, name, err,
                              errlen);
}

/* ==== Open / close ==== */

// Bytes of one layer file that hold experts (the file may be longer).
static size_t layer_bytes(const mf_expert_store *st) {
    return (size_t)((uint64_t)st->layout.num_experts * st->layout.expert_size);
}

void mf_expert_store_close(mf_expert_store *st) {
    if (!st)
        return;
    if (st->fds)
        for (int l = 0; l < st->n_layers; l++)
            if (st->fds[l] >= 0)
                close(st->fds[l]);
    free(st->fds);
    for (int l = 0; st->maps && l < st->n_layers; l++)
        if (st->maps[l])
            munmap(st->maps[l], layer_bytes(st));
    free(st->maps);
    for (int l = 0; st->dfds && l < st->n_layers; l++)
        if (st->dfds[l] >= 0)
            close(st->dfds[l]);
    free(st->dfds);
    free(st->tables);
    free(st->used);
    if (st->lock_ok)
        pthread_mutex_destroy(&st->lock);
    free(st->dir);
    free(st);
}

#if defined(__APPLE__)
/* ==== macOS read hints ====
 * macOS has neither POSIX_FADV_RANDOM nor WILLNEED. The reference system measured its
 * hints on Apple Silicon: F_RDAHEAD on or off neutral (off kept, as FADV_RANDOM here),
 * F_RDADVISE before each read 4-8% slower; so readahead is off and F_RDADVISE is only
 * the prefetch hint, where WILLNEED is used elsewhere. */

static void apple_no_readahead(int fd) { (void)fcntl(fd, F_RDAHEAD, 0); }

static void apple_read_advise(int fd, uint64_t off, uint64_t len) {
    if (len > (uint64_t)INT_MAX)
        return;
    struct radvisory ra = {.ra_offset = (off_t)off, .ra_count = (int)len};
    (void)fcntl(fd, F_RDADVISE, &ra);
}
#endif

static int open_layer(mf_expert_store *st, int l, char *err, size_t errlen) {
    char fname[32];
    snprintf(fname, sizeof fname, "layer_%02d.bin", l);
    char *path = mf_path_join(st->dir, fname);
    if (!path)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    int rc = MF_OK;
    // O_NONBLOCK: a FIFO in the file's place is refused below instead of blocking
    // open() until a writer appears (cleared for the regular file).
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat sb;
    uint64_t need = (uint64_t)st->layout.num_experts * st->layout.expert_size;
    if (fd < 0) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: cannot open expert file of MoE layer %d: %s",
                    path, l, strerror(errno));
    } else if (fstat(fd, &sb) != 0) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (!S_ISREG(sb.st_mode)) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: expert file of MoE layer %d is not a "
                    "regular file", path, l);
    } else if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: fcntl: %s", path, strerror(errno));
    } else if ((uint64_t)sb.st_size < need) {
        rc = mf_err(err, errlen, MF_ERR_IO,
                    "%s: expert file is %lld bytes, expected at least %llu (%d experts x "
                    "%llu bytes; truncated?)", path, (long long)sb.st_size,
                    (unsigned long long)need, st->layout.num_experts,
                    (unsigned long long)st->layout.expert_size);
    }
    if (rc) {
        if (fd >= 0)
            close(fd);
        free(path);
        return rc;
    }
    // Experts are read whole at router-chosen offsets: kernel readahead past a blob
    // would only waste bandwidth.
#if defined(__APPLE__)
    apple_no_readahead(fd);
#elif defined(POSIX_FADV_RANDOM)
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
#endif
    st->fds[l] = fd;
    free(path);
    return MF_OK;
}

// n descriptors, all -1, so that closing a store whose construction failed part way
// closes only what it opened (an array left as malloc gave it could hold the numbers
// of another model's open files); NULL when out of memory.
static int *fd_array(int n) {
    int *a = malloc((size_t)n * sizeof *a);
    for (int i = 0; a && i < n; i++)
        a[i] = -1;
    return a;
}

int mf_expert_store_open(mf_expert_store **out, const char *dir, int n_layers,
                         const uint8_t *is_moe, char *err, size_t errlen) {
    *out = NULL;
    if (n_layers <= 0 || !is_moe)
        return mf_err(err, errlen, MF_ERR_ARG, "expert store: bad layer list");
    mf_expert_store *st = calloc(1, sizeof *st);
    if (!st)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    st->n_layers = n_layers;
    st->dir = strdup(dir);
    st->fds = fd_array(n_layers);
    st->dfds = fd_array(n_layers);
    st->maps = calloc((size_t)n_layers, sizeof *st->maps);
    st->tables = calloc((size_t)n_layers, sizeof *st->tables);
    st->used = calloc((size_t)n_layers, sizeof *st->used);
    long page = sysconf(_SC_PAGESIZE);
    st->page = page > 0 ? (size_t)page : 4096;
    if (!st->dir || !st->fds || !st->dfds || !st->maps || !st->tables || !st->used) {
        mf_expert_store_close(st);
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    }
    if (pthread_mutex_init(&st->lock, NULL) != 0) {
        mf_expert_store_close(st);
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: cannot create a mutex");
    }
    st->lock_ok = 1;
    char *lpath = mf_path_join(dir, "layout.json");
    char *text = NULL;
    size_t len = 0;
    mf_json_doc *doc = NULL;
    int rc = lpath ? MF_OK : mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    if (!rc)
        rc = mf_read_file(lpath, &text, &len, err, errlen);
    if (!rc)
        rc = mf_json_parse(&doc, text, len, lpath, err, errlen);
    if (!rc)
        rc = parse_layout(&st->layout, st->tables, mf_json_root(doc), n_layers, is_moe,
                          lpath, err, errlen);
    mf_json_free(doc);
    free(text);
    free(lpath);
    for (int l = 0; l < n_layers && !rc; l++) {
        // version 1 reads whole blobs, as the reference system does
        const struct mf_expert_table *t = &st->tables[l];
        if (st->layout.version == 1)
            st->used[l] = st->layout.expert_size;
        for (int i = 0; i < t->n_components; i++)
            if (t->components[i].offset + t->components[i].size > st->used[l])
                st->used[l] = t->components[i].offset + t->components[i].size;
        if (is_moe[l])
            rc = open_layer(st, l, err, errlen);
    }
    if (rc) {
        mf_expert_store_close(st);
        return rc;
    }
    *out = st;
    return MF_OK;
}

const struct mf_expert_layout *mf_expert_store_layout(const mf_expert_store *st) {
    return &st->layout;
}

const struct mf_expert_component *mf_expert_store_component(const mf_expert_store *st,
                                                            const char *name) {
    for (int i = 0; i < st->layout.n_components; i++)
        if (strcmp(st->layout.components[i].name, name) == 0)
            return &st->layout.components[i];
    return NULL;
}

int mf_expert_store_proj(const mf_expert_store *st, int il, const char *proj,
                         struct mf_expert_proj *out) {
    memset(out, 0, sizeof *out);
    if (il < 0 || il >= st->n_layers)
        return 0;
    const struct mf_expert_table *t = &st->tables[il];
    out->weight = part_of(t, proj, "weight");
    if (!out->weight)
        return 0;
    out->scales = part_of(t, proj, "scales");
    out->biases = part_of(t, proj, "biases");
    out->bias = part_of(t, proj, "bias");
    out->mode = out->weight->mode;
    out->bits = out->weight->bits;
    out->group_size = out->weight->group_size;
    out->rows = out->weight->shape[0];
    out->n_in = out->mode == MF_EXPERT_MODE_AFFINE ? out->scales->shape[1] * out->group_size
                : out->mode == MF_EXPERT_MODE_MXFP4 ? out->weight->shape[1] * 8
                                                     : out->weight->shape[1];
    return 1;
}

/* ==== Reads ==== */

int mf_expert_store_check(const mf_expert_store *st, int il, int ie, char *err,
                          size_t errlen) {
    if (il < 0 || il >= st->n_layers || st->fds[il] < 0)
        return mf_err(err, errlen, MF_ERR_ARG, "expert read: layer %d has no expert file",
                      il);
    if (ie < 0 || ie >= st->layout.num_experts)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: expert %d out of range [0, %d) in layer %d", ie,
                      st->layout.num_experts, il);
    return MF_OK;
}

// One expert blob from fd into dst (the bytes its layer's components reach, rounded
// up to `align`; the rest of dst is left as it was), looping over short reads and
// EINTR. 64-bit offsets: one layer file of a large model passes 4 GiB.
static int read_blob(const mf_expert_store *st, int fd, int il, int ie, void *dst,
                     uint64_t align, const char *how, char *err, size_t errlen) {
    uint64_t want = (st->used[il] + align - 1) / align * align;
    size_t n = (size_t)(want < st->layout.expert_size ? want : st->layout.expert_size);
    uint64_t off = (uint64_t)ie * st->layout.expert_size;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)dst + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return mf_err(err, errlen, MF_ERR_IO,
                          "%s/layer_%02d.bin: %sread of layer %d expert %d at offset %llu "
                          "failed: %s", st->dir, il, how, il, ie,
                          (unsigned long long)(off + got),
                          r < 0 ? strerror(errno) : "unexpected end of file");
        got += (size_t)r;
    }
    return MF_OK;
}

int mf_expert_store_read(const mf_expert_store *st, int il, int ie, void *dst,
                         size_t dst_bytes, char *err, size_t errlen) {
    int rc = mf_expert_store_check(st, il, ie, err, errlen);
    if (rc != MF_OK)
        return rc;
    size_t n = (size_t)st->layout.expert_size;
    if (dst_bytes < n)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: buffer of %zu bytes, an expert needs %zu", dst_bytes, n);
    return read_blob(st, st->fds[il], il, ie, dst, 1, "", err, errlen);
}

uint64_t mf_expert_store_total_bytes(const mf_expert_store *st) {
    uint64_t n = 0;
    for (int l = 0; l < st->n_layers; l++)
        n += st->fds[l] >= 0 ? (uint64_t)st->layout.num_experts * st->layout.expert_size
                             : 0;
    return n;
}

void mf_expert_store_hint(const mf_expert_store *st, int il, int ie) {
    if (mf_expert_store_check(st, il, ie, NULL, 0) != MF_OK)
        return;
    // Asynchronous: the kernel queues the reads and returns.
#if defined(__APPLE__)
    apple_read_advise(st->fds[il], (uint64_t)ie * st->layout.expert_size,
                      st->layout.expert_size);
#elif defined(POSIX_FADV_WILLNEED)
    (void)posix_fadvise(st->fds[il], (off_t)((uint64_t)ie * st->layout.expert_size),
                        (off_t)st->layout.expert_size, POSIX_FADV_WILLNEED);
#endif
}

/* ==== O_DIRECT ====
 * A second fd per file, opened uncached, shared by every reader in direct mode.
 * O_DIRECT wants file offsets, lengths and buffers aligned to the device's logical
 * block; 4096 covers every current device, so expert_size (hence every offset) must be
 * a multiple of it. A file system may refuse O_DIRECT at open or only at the first
 * read (EINVAL), so one aligned probe read decides. */

#define DIRECT_ALIGN 4096

static int open_uncached(const char *path, int *fd, char *why, size_t whylen) {
#if defined(O_DIRECT)
    *fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (*fd < 0)
        return mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s: O_DIRECT refused: %s", path,
                      strerror(errno));
#elif defined(__APPLE__)
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0)
        return mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s: cannot open: %s", path,
                      strerror(errno));
    if (fcntl(*fd, F_NOCACHE, 1) == -1) {
        int e = errno;
        close(*fd);
        *fd = -1;
        return mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s: F_NOCACHE refused: %s", path,
                      strerror(e));
    }
#else
    *fd = -1;
    return mf_err(why, whylen, MF_ERR_UNSUPPORTED,
                  "%s: this system has neither O_DIRECT nor F_NOCACHE", path);
#endif
    return MF_OK;
}

// One aligned block read through the new fd: refusals that open does not report.
static int probe_direct(int fd, const char *path, char *why, size_t whylen) {
    void *buf = NULL;
    if (posix_memalign(&buf, DIRECT_ALIGN, DIRECT_ALIGN) != 0)
        return mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s: no memory for the O_DIRECT probe",
                      path);
    ssize_t r;
    do
        r = pread(fd, buf, DIRECT_ALIGN, 0);
    while (r < 0 && errno == EINTR);
    int e = errno;
    free(buf);
    if (r < 0)
        return mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s: O_DIRECT read refused: %s",
                      path, strerror(e));
    return MF_OK;
}

static int open_direct_all(mf_expert_store *st) {
    if (st->layout.expert_size % DIRECT_ALIGN != 0)
        return mf_err(st->direct_why, sizeof st->direct_why, MF_ERR_UNSUPPORTED,
                      "expert_size %llu is not a multiple of %d, so expert offsets are "
                      "not aligned for O_DIRECT",
                      (unsigned long long)st->layout.expert_size, DIRECT_ALIGN);
    for (int l = 0; l < st->n_layers; l++) {
        if (st->fds[l] < 0)
            continue;
        char fname[32];
        snprintf(fname, sizeof fname, "layer_%02d.bin", l);
        char *path = mf_path_join(st->dir, fname);
        if (!path)
            return mf_err(st->direct_why, sizeof st->direct_why, MF_ERR_NOMEM,
                          "expert store: out of memory");
        int rc = open_uncached(path, &st->dfds[l], st->direct_why, sizeof st->direct_why);
        if (rc == MF_OK)
            rc = probe_direct(st->dfds[l], path, st->direct_why, sizeof st->direct_why);
        free(path);
        if (rc != MF_OK)
            return rc;
    }
    return MF_OK;
}

int mf_expert_store_open_direct(mf_expert_store *st, char *why, size_t whylen) {
    pthread_mutex_lock(&st->lock);
    if (st->direct == 0) {
        int rc = open_direct_all(st);
        st->direct = rc == MF_OK ? 1 : -1;
        for (int l = 0; rc != MF_OK && l < st->n_layers; l++) {
            if (st->dfds[l] >= 0)
                close(st->dfds[l]);
            st->dfds[l] = -1;
        }
    }
    int ok = st->direct == 1;
    if (!ok)
        mf_err(why, whylen, MF_ERR_UNSUPPORTED, "%s", st->direct_why);
    pthread_mutex_unlock(&st->lock);
    return ok ? MF_OK : MF_ERR_UNSUPPORTED;
}

int mf_expert_store_read_direct(const mf_expert_store *st, int il, int ie, void *dst,
                                char *err, size_t errlen) {
    int rc = mf_expert_store_check(st, il, ie, err, errlen);
    if (rc != MF_OK)
        return rc;
    if (st->direct != 1 || ((uintptr_t)dst % DIRECT_ALIGN) != 0)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: direct read without mf_expert_store_open_direct or "
                      "into a buffer not %d-byte aligned", DIRECT_ALIGN);
    return read_blob(st, st->dfds[il], il, ie, dst, DIRECT_ALIGN, "O_DIRECT ", err,
                     errlen);
}

/* ==== mmap ====
 * Every layer file mapped once, read-only and shared, on the first request of any
 * reader; unmapped at close. Pre-faulting touches one byte per page so the kernel
 * reads the pages in the worker's time, not in the compute thread's. */

static int map_all(mf_expert_store *st) {
    size_t n = layer_bytes(st);
    if ((uint64_t)n != (uint64_t)st->layout.num_experts * st->layout.expert_size)
        return mf_err(st->map_err, sizeof st->map_err, MF_ERR_UNSUPPORTED,
                      "%s: a layer file of %llu bytes does not fit this address space",
                      st->dir, (unsigned long long)st->layout.num_experts *
                                   st->layout.expert_size);
    for (int l = 0; l < st->n_layers; l++) {
        if (st->fds[l] < 0)
            continue;
        void *p = mmap(NULL, n, PROT_READ, MAP_SHARED, st->fds[l], 0);
        if (p == MAP_FAILED)
            return mf_err(st->map_err, sizeof st->map_err, MF_ERR_IO,
                          "%s/layer_%02d.bin: cannot map %zu bytes: %s", st->dir, l, n,
                          strerror(errno));
        st->maps[l] = p;
#if defined(MADV_RANDOM)
        // Experts are touched whole at router-chosen offsets (the pre-fault asks for
        // each one's pages explicitly): no readahead around them.
        (void)madvise(p, n, MADV_RANDOM);
#endif
    }
    return MF_OK;
}

int mf_expert_store_map(mf_expert_store *st, char *err, size_t errlen) {
    pthread_mutex_lock(&st->lock);
    if (st->mapped == 0) {
        int rc = map_all(st);
        st->mapped = rc == MF_OK ? 1 : -1;
        for (int l = 0; rc != MF_OK && l < st->n_layers; l++) {
            if (st->maps[l])
                munmap(st->maps[l], layer_bytes(st));
            st->maps[l] = NULL;
        }
    }
    int ok = st->mapped == 1;
    if (!ok)
        mf_err(err, errlen, MF_ERR_IO, "%s", st->map_err);
    pthread_mutex_unlock(&st->lock);
    return ok ? MF_OK : MF_ERR_IO;
}

static void unpin_layers(mf_expert_store *st, int n) {
    for (int l = 0; l < n; l++)
        if (st->maps[l])
            st->pin.unpin(st->pin.user, st->maps[l]);
}

static int pin_layers(mf_expert_store *st, char *err, size_t errlen) {
    char why[256];
    for (int l = 0; l < st->n_layers; l++) {
        if (!st->maps[l] || st->pin.pin(st->pin.user, st->maps[l], layer_bytes(st), why,
                                        sizeof why) == MF_OK)
            continue;
        unpin_layers(st, l);
        return mf_err(err, errlen, MF_ERR_BACKEND, "%s/layer_%02d.bin: cannot page-lock "
                      "its %zu-byte mapping: %s", st->dir, l, layer_bytes(st), why);
    }
    return MF_OK;
}

int mf_expert_store_pin(mf_expert_store *st, const struct mf_expert_pin *how, char *err,
                        size_t errlen) {
    int rc = MF_OK;
    pthread_mutex_lock(&st->lock);
    if (st->mapped != 1) {
        rc = mf_err(err, errlen, MF_ERR_ARG, "expert store: pin before a mapping");
    } else if (st->pins == 0) {
        st->pin = *how;
        rc = pin_layers(st, err, errlen);
    } else if (st->pin.pin != how->pin || st->pin.user != how->user) {
        rc = mf_err(err, errlen, MF_ERR_ARG, "expert store: already page-locked for "
                    "another device");
    }
    st->pins += rc == MF_OK;
    pthread_mutex_unlock(&st->lock);
    return rc;
}

void mf_expert_store_unpin(mf_expert_store *st) {
    pthread_mutex_lock(&st->lock);
    if (st->pins > 0 && --st->pins == 0)
        unpin_layers(st, st->n_layers);
    pthread_mutex_unlock(&st->lock);
}

int mf_expert_store_check_size(const mf_expert_store *st, int il, int ie, char *err,
                               size_t errlen) {
    uint64_t off = (uint64_t)ie * st->layout.expert_size, n = st->layout.expert_size;
    // A page of a mapping past the end of its file raises SIGBUS when touched: check
    // the size now (a truncation after this check still can).
    struct stat sb;
    if (fstat(st->fds[il], &sb) != 0)
        return mf_err(err, errlen, MF_ERR_IO, "%s/layer_%02d.bin: cannot stat: %s",
                      st->dir, il, strerror(errno));
    if ((uint64_t)sb.st_size < off + n)
        return mf_err(err, errlen, MF_ERR_IO,
                      "%s/layer_%02d.bin: layer %d expert %d at offset %llu: the file is "
                      "now %lld bytes, the expert ends at %llu (truncated after open?)",
                      st->dir, il, il, ie, (unsigned long long)off,
                      (long long)(sb.st_size), (unsigned long long)(off + n));
    return MF_OK;
}

int mf_expert_store_resident(const mf_expert_store *st, int il, int ie, const void **data) {
    if (st->mapped != 1)
        return 0;
    const uint64_t off = (uint64_t)ie * st->layout.expert_size;
    const uint8_t *p = st->maps[il] + off;
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(st->page - 1);
    const uintptr_t end = (uintptr_t)p + st->layout.expert_size;
    unsigned char vec[256];   // one byte per page, 256 pages per call
    while (a < end) {
        size_t n = (size_t)(end - a) < sizeof vec * st->page ? (size_t)(end - a)
                                                            : sizeof vec * st->page;
        if (mincore((void *)a, n, (void *)vec) != 0)
            return 0;
        for (size_t i = 0; i < (n + st->page - 1) / st->page; i++)
            if (!(vec[i] & 1))
                return 0;
        a += n;
    }
    *data = p;
    return 1;
}

int mf_expert_store_prefault(const mf_expert_store *st, int il, int ie,
                             const void **data, char *err, size_t errlen) {
    *data = NULL;
    int rc = mf_expert_store_check(st, il, ie, err, errlen);
    if (rc != MF_OK)
        return rc;
    if (st->mapped != 1)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: mmap read without mf_expert_store_map");
    rc = mf_expert_store_check_size(st, il, ie, err, errlen);
    if (rc != MF_OK)
        return rc;
    uint64_t off = (uint64_t)ie * st->layout.expert_size, n = st->layout.expert_size;
    const uint8_t *p = st->maps[il] + off;
    uintptr_t a0 = (uintptr_t)p & ~(uintptr_t)(st->page - 1);
#if defined(MADV_WILLNEED)
    (void)madvise((void *)a0, (size_t)((uintptr_t)p + n - a0), MADV_WILLNEED);
#endif
    unsigned sum = 0;
    for (uintptr_t a = a0; a < (uintptr_t)p + n; a += st->page)
        sum += *(const volatile uint8_t *)(a < (uintptr_t)p ? (uintptr_t)p : a);
    (void)sum;
    *data = p;
    return MF_OK;
}
