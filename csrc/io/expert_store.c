/*
 * expert_store.c — packed_experts/: layout.json and the per-layer expert files.
 *
 * The layout is validated once at open (every component inside the blob, sizes equal
 * to their shapes, the nine components present and disjoint, every MoE layer's file at
 * least num_experts * expert_size bytes), so a read is a single pread of one blob with
 * no further checks. Layouts written by the reference system lack "format",
 * "version", "moe_layers", "bits" and "group_size": the MoE layers then come from the
 * caller and bits from the component shapes. This file knows nothing of models or of
 * what the bytes mean; moe.c interprets the components.
 */
#include "io/expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/json.h"

#define LAYOUT_VERSION 1

struct mf_expert_store {
    struct mf_expert_layout layout;
    int n_layers;
    int *fds;            // [n_layers], -1 for layers without a file
    char *dir;           // for messages
};

static const char *const component_names[9] = {
    "gate_proj.weight", "gate_proj.scales", "gate_proj.biases",
    "up_proj.weight",   "up_proj.scales",   "up_proj.biases",
    "down_proj.weight", "down_proj.scales", "down_proj.biases",
};

/* ==== layout.json ==== */

static int parse_component(struct mf_expert_component *c, const mf_json *e, size_t i,
                           const char *name, uint64_t expert_size, char *err,
                           size_t errlen) {
    const char *cname = NULL, *dt = NULL;
    int64_t off = -1, size = -1;
    const mf_json *sh = mf_json_get(e, "shape");
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
    if (c->offset > expert_size || c->size > expert_size - c->offset)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: component %s [%llu, %llu) lies outside the %llu-byte expert",
                      name, c->name, (unsigned long long)c->offset,
                      (unsigned long long)(c->offset + c->size),
                      (unsigned long long)expert_size);
    return 0;
}

// The nine components, each present once, pairwise disjoint.
static int check_components(const struct mf_expert_layout *L, const char *name,
                            char *err, size_t errlen) {
    for (int k = 0; k < 9; k++) {
        int found = 0;
        for (int i = 0; i < L->n_components; i++)
            found += strcmp(L->components[i].name, component_names[k]) == 0;
        if (found != 1)
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: component \"%s\" %s", name, component_names[k],
                          found ? "listed more than once" : "missing");
    }
    for (int i = 0; i < L->n_components; i++) {
        for (int j = i + 1; j < L->n_components; j++) {
            const struct mf_expert_component *a = &L->components[i], *b = &L->components[j];
            if (a->offset < b->offset + b->size && b->offset < a->offset + a->size &&
                a->size && b->size)
                return mf_err(err, errlen, MF_ERR_FORMAT,
                              "%s: components %s and %s overlap", name, a->name, b->name);
        }
    }
    return 0;
}

// bits / group_size: from the layout when given, else from the gate projection's
// shapes with the reference system's fixed group size of 64 (hid = scale cols x 64,
// bits = packed cols x 32 / hid).
static int resolve_bits(struct mf_expert_layout *L, const mf_json *root, const char *name,
                        char *err, size_t errlen) {
    int64_t bits = 0, gs = 64;
    if (mf_json_get_int(root, "bits", &bits) < 0 ||
        mf_json_get_int(root, "group_size", &gs) < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: bits/group_size must be integers",
                      name);
    const struct mf_expert_component *w = NULL, *s = NULL;
    for (int i = 0; i < L->n_components; i++) {
        if (!strcmp(L->components[i].name, "gate_proj.weight"))
            w = &L->components[i];
        if (!strcmp(L->components[i].name, "gate_proj.scales"))
            s = &L->components[i];
    }
    if (w->ndim != 2 || s->ndim != 2 || w->dtype != MF_DTYPE_U32 || gs <= 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: gate_proj.weight must be U32 [I, hid*bits/32] and "
                      "gate_proj.scales [I, hid/group_size]", name);
    int64_t hid = s->shape[1] * gs;
    int64_t derived = (w->shape[1] * 32) % hid == 0 ? w->shape[1] * 32 / hid : 0;
    if (!bits)
        bits = derived;
    if (bits != derived || !(bits == 2 || bits == 3 || bits == 4 || bits == 5 ||
                             bits == 6 || bits == 8) ||
        !(gs == 32 || gs == 64 || gs == 128))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: bits %lld / group_size %lld do not fit gate_proj shapes "
                      "[%lld, %lld] / [%lld, %lld]", name, (long long)bits, (long long)gs,
                      (long long)w->shape[0], (long long)w->shape[1],
                      (long long)s->shape[0], (long long)s->shape[1]);
    L->bits = (int)bits;
    L->group_size = (int)gs;
    return 0;
}

static int parse_layout(struct mf_expert_layout *L, const mf_json *root, int n_layers,
                        const uint8_t *is_moe, const char *name, char *err,
                        size_t errlen) {
    if (!root || root->type != MF_JSON_OBJECT)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: top level must be an object", name);
    const char *fmt = NULL;
    int64_t version = LAYOUT_VERSION, es = 0, nl = 0, ne = 0;
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
    if (nl != n_layers)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_layers is %lld but config.json has %d layers", name,
                      (long long)nl, n_layers);
    L->expert_size = (uint64_t)es;
    L->num_layers = (int)nl;
    L->num_experts = (int)ne;
    const mf_json *ml = mf_json_get(root, "moe_layers");
    if (ml && ml->type != MF_JSON_NULL) {
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
                              "%s: moe_layers[%zu] is not a MoE layer of config.json", name,
                              i);
        }
        if ((int)ml->n != n_cfg)
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: moe_layers lists %zu layers, config.json has %d MoE layers",
                          name, ml->n, n_cfg);
    }
    const mf_json *cs = mf_json_get(root, "components");
    if (!cs || cs->type != MF_JSON_ARRAY || cs->n != 9)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: \"components\" must list the 9 expert components", name);
    int rc;
    for (size_t i = 0; i < cs->n; i++) {
        if ((rc = parse_component(&L->components[i], cs->items[i], i, name, L->expert_size,
                                  err, errlen)))
            return rc;
        L->n_components++;
    }
    if ((rc = check_components(L, name, err, errlen)))
        return rc;
    return resolve_bits(L, root, name, err, errlen);
}

/* ==== Open / close ==== */

void mf_expert_store_close(mf_expert_store *st) {
    if (!st)
        return;
    if (st->fds)
        for (int l = 0; l < st->n_layers; l++)
            if (st->fds[l] >= 0)
                close(st->fds[l]);
    free(st->fds);
    free(st->dir);
    free(st);
}

static int open_layer(mf_expert_store *st, int l, char *err, size_t errlen) {
    char fname[32];
    snprintf(fname, sizeof fname, "layer_%02d.bin", l);
    char *path = mf_path_join(st->dir, fname);
    if (!path)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    int rc = MF_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    uint64_t need = (uint64_t)st->layout.num_experts * st->layout.expert_size;
    if (fd < 0) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: cannot open expert file of MoE layer %d: %s",
                    path, l, strerror(errno));
    } else if (fstat(fd, &sb) != 0) {
        rc = mf_err(err, errlen, MF_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (!S_ISREG(sb.st_mode) || (uint64_t)sb.st_size < need) {
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
#if defined(POSIX_FADV_RANDOM)
    // Experts are read whole at router-chosen offsets: kernel readahead past a blob
    // would only waste bandwidth.
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
#endif
    st->fds[l] = fd;
    free(path);
    return MF_OK;
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
    st->fds = malloc((size_t)n_layers * sizeof *st->fds);
    if (!st->dir || !st->fds) {
        mf_expert_store_close(st);
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert store: out of memory");
    }
    for (int l = 0; l < n_layers; l++)
        st->fds[l] = -1;
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
        rc = parse_layout(&st->layout, mf_json_root(doc), n_layers, is_moe, lpath, err,
                          errlen);
    mf_json_free(doc);
    free(text);
    free(lpath);
    for (int l = 0; l < n_layers && !rc; l++)
        if (is_moe[l])
            rc = open_layer(st, l, err, errlen);
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

/* ==== Reads ==== */

int mf_expert_store_read(const mf_expert_store *st, int il, int ie, void *dst,
                         size_t dst_bytes, char *err, size_t errlen) {
    if (il < 0 || il >= st->n_layers || st->fds[il] < 0)
        return mf_err(err, errlen, MF_ERR_ARG, "expert read: layer %d has no expert file",
                      il);
    if (ie < 0 || ie >= st->layout.num_experts)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: expert %d out of range [0, %d) in layer %d", ie,
                      st->layout.num_experts, il);
    size_t n = (size_t)st->layout.expert_size;
    if (dst_bytes < n)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert read: buffer of %zu bytes, an expert needs %zu", dst_bytes, n);
    // 64-bit offsets: one layer file of a large model passes 4 GiB.
    uint64_t off = (uint64_t)ie * st->layout.expert_size;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(st->fds[il], (char *)dst + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return mf_err(err, errlen, MF_ERR_IO,
                          "%s/layer_%02d.bin: read of expert %d at offset %llu failed: %s",
                          st->dir, il, ie, (unsigned long long)(off + got),
                          r < 0 ? strerror(errno) : "unexpected end of file");
        got += (size_t)r;
    }
    return MF_OK;
}
