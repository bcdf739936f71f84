/*
 * manifest.c — model_weights.json: the tensor table of model_weights.bin.
 *
 * Every entry is checked once here (offset and size inside the bin, size equal to the
 * element count times the dtype size, at most MF_MAX_DIMS dimensions) so the weight
 * binder and the forward passes can trust the ranges. The table is sorted by name for
 * binary search, and hashed (FNV-1a) so snapshots can tell which model wrote them.
 * The "config" member is ignored: config.json is the source of truth.
 */
#include "core/manifest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/json.h"

static int cmp_info(const void *a, const void *b) {
    return strcmp(((const struct mf_tensor_info *)a)->name,
                  ((const struct mf_tensor_info *)b)->name);
}

// One entry of "tensors". `t->name` is already set.
static int parse_entry(struct mf_tensor_info *t, const mf_json *e, const char *name,
                       uint64_t bin_size, char *err, size_t errlen) {
    if (e->type != MF_JSON_OBJECT)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: tensor \"%s\": entry must be an object",
                      name, t->name);
    int64_t off = 0, size = 0, bits = 0, gs = 0;
    const char *dt = NULL;
    if (mf_json_get_int(e, "offset", &off) != 1 || off < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": \"offset\" missing or not a non-negative integer",
                      name, t->name);
    if (mf_json_get_int(e, "size", &size) != 1 || size < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": \"size\" missing or not a non-negative integer",
                      name, t->name);
    if (mf_json_get_str(e, "dtype", &dt) != 1 || mf_dtype_parse(dt, &t->dtype) != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": \"dtype\" missing or not one of F32, F16, BF16, "
                      "U32, U8, I32 (got %.16s)", name, t->name, dt ? dt : "nothing");
    if (mf_json_get_int(e, "bits", &bits) < 0 || mf_json_get_int(e, "group_size", &gs) < 0 ||
        bits < 0 || bits > 32 || gs < 0 || gs > 1 << 20)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": \"bits\"/\"group_size\" must be small integers",
                      name, t->name);
    const mf_json *sh = mf_json_get(e, "shape");
    if (!sh || sh->type != MF_JSON_ARRAY || sh->n > MF_MAX_DIMS)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": \"shape\" missing or not a list of at most %d "
                      "dimensions", name, t->name, MF_MAX_DIMS);
    // Element count with an overflow guard: a shape whose product passes 2^62 cannot
    // match any real file.
    uint64_t count = 1;
    t->ndim = (int)sh->n;
    for (size_t i = 0; i < sh->n; i++) {
        const mf_json *d = sh->items[i];
        if (d->type != MF_JSON_NUMBER || !d->num_is_int || d->inum < 0 ||
            d->inum > ((int64_t)1 << 40))
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: tensor \"%s\": shape[%zu] is not a dimension", name,
                          t->name, i);
        t->shape[i] = d->inum;
        if (d->inum && count > (UINT64_C(1) << 62) / (uint64_t)d->inum)
            return mf_err(err, errlen, MF_ERR_SHAPE,
                          "%s: tensor \"%s\": shape too large", name, t->name);
        count *= (uint64_t)d->inum;
    }
    t->offset = (uint64_t)off;
    t->size = (uint64_t)size;
    t->bits = (int)bits;
    t->group_size = (int)gs;
    uint64_t want = count * mf_dtype_size(t->dtype);
    if (want != t->size)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "%s: tensor \"%s\": size is %llu bytes but shape x %s needs %llu",
                      name, t->name, (unsigned long long)t->size, mf_dtype_name(t->dtype),
                      (unsigned long long)want);
    if (t->offset > bin_size || t->size > bin_size - t->offset)
        return mf_err(err, errlen, MF_ERR_IO,
                      "%s: tensor \"%s\" [%llu, %llu) runs past the end of "
                      "model_weights.bin (%llu bytes; truncated file?)",
                      name, t->name, (unsigned long long)t->offset,
                      (unsigned long long)(t->offset + t->size),
                      (unsigned long long)bin_size);
    // Kernels read elements through typed pointers: an offset that is not a multiple
    // of the element size would make every such load a misaligned one (undefined
    // behaviour; a fault on some targets). prep aligns every tensor to 64 bytes.
    if (t->offset % mf_dtype_size(t->dtype) != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: tensor \"%s\": offset %llu is not a multiple of its %s element "
                      "size %zu", name, t->name, (unsigned long long)t->offset,
                      mf_dtype_name(t->dtype), mf_dtype_size(t->dtype));
    return 0;
}

static int cmp_offset(const void *a, const void *b) {
    const struct mf_tensor_info *x = *(const struct mf_tensor_info *const *)a;
    const struct mf_tensor_info *y = *(const struct mf_tensor_info *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

// No two tensors may share a byte of the bin (a damaged or hand-edited manifest would
// otherwise bind one tensor's bytes as another's).
static int check_disjoint(const struct mf_manifest *m, const char *name, char *err,
                          size_t errlen) {
    if (m->n_tensors < 2)
        return 0;
    const struct mf_tensor_info **by_off = malloc((size_t)m->n_tensors * sizeof *by_off);
    if (!by_off)
        return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", name);
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].size)
            by_off[n++] = &m->tensors[i];
    qsort(by_off, (size_t)n, sizeof *by_off, cmp_offset);
    int rc = 0;
    for (int i = 0; i + 1 < n && !rc; i++) {
        const struct mf_tensor_info *a = by_off[i], *b = by_off[i + 1];
        if (a->offset + a->size > b->offset)
            rc = mf_err(err, errlen, MF_ERR_FORMAT,
                        "%s: tensors \"%s\" [%llu, %llu) and \"%s\" [%llu, %llu) overlap",
                        name, a->name, (unsigned long long)a->offset,
                        (unsigned long long)(a->offset + a->size), b->name,
                        (unsigned long long)b->offset,
                        (unsigned long long)(b->offset + b->size));
    }
    free(by_off);
    return rc;
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

// Hash over the sorted table: names (with their NUL), offsets, shapes and dtypes, each
// integer as 8 little-endian bytes so the value does not depend on the host.
static uint64_t manifest_hash(const struct mf_manifest *m) {
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (int i = 0; i < m->n_tensors; i++) {
        const struct mf_tensor_info *t = &m->tensors[i];
        h = fnv1a(h, t->name, strlen(t->name) + 1);
        uint64_t v[2 + MF_MAX_DIMS] = {t->offset, (uint64_t)t->dtype};
        for (int d = 0; d < t->ndim; d++)
            v[2 + d] = (uint64_t)t->shape[d];
        for (int k = 0; k < 2 + t->ndim; k++) {
            unsigned char le[8];
            for (int j = 0; j < 8; j++)
                le[j] = (unsigned char)(v[k] >> (8 * j));
            h = fnv1a(h, le, 8);
        }
    }
    return h;
}

int mf_manifest_parse(struct mf_manifest *m, const char *text, size_t len,
                      const char *name, uint64_t bin_size, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    if (!name)
        name = "model_weights.json";
    mf_json_doc *doc = NULL;
    int rc = mf_json_parse(&doc, text, len, name, err, errlen);
    if (rc)
        return rc;
    const mf_json *root = mf_json_root(doc);
    const mf_json *ts = mf_json_get(root, "tensors");
    if (!ts || ts->type != MF_JSON_OBJECT) {
        mf_json_free(doc);
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: \"tensors\" object missing (not a moeflux/flash-moe manifest?)",
                      name);
    }
    if (ts->n > INT32_MAX) {
        mf_json_free(doc);
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: too many tensors", name);
    }
    int64_t declared = 0;
    if (mf_json_get_int(root, "num_tensors", &declared) == 1 && declared != (int64_t)ts->n) {
        size_t n = ts->n;
        mf_json_free(doc);
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_tensors is %lld but \"tensors\" has %zu entries", name,
                      (long long)declared, n);
    }
    if (ts->n) {
        m->tensors = calloc(ts->n, sizeof *m->tensors);
        if (!m->tensors) {
            mf_json_free(doc);
            return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", name);
        }
    }
    for (size_t i = 0; i < ts->n && !rc; i++) {
        struct mf_tensor_info *t = &m->tensors[i];
        if (strlen(ts->items[i]->key) != ts->items[i]->key_len) {
            rc = mf_err(err, errlen, MF_ERR_FORMAT, "%s: tensor name with a NUL byte", name);
            break;
        }
        t->name = strdup(ts->items[i]->key);
        if (!t->name) {
            rc = mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", name);
            break;
        }
        m->n_tensors++;
        rc = parse_entry(t, ts->items[i], name, bin_size, err, errlen);
    }
    mf_json_free(doc);
    if (!rc)
        rc = check_disjoint(m, name, err, errlen);
    if (rc) {
        mf_manifest_free(m);
        return rc;
    }
    if (m->n_tensors > 1)
        qsort(m->tensors, (size_t)m->n_tensors, sizeof *m->tensors, cmp_info);
    m->hash = manifest_hash(m);
    return MF_OK;
}

int mf_manifest_load(struct mf_manifest *m, const char *json_path, uint64_t bin_size,
                     char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    char *text = NULL;
    size_t len = 0;
    int rc = mf_read_file(json_path, &text, &len, err, errlen);
    if (rc)
        return rc;
    rc = mf_manifest_parse(m, text, len, json_path, bin_size, err, errlen);
    free(text);
    return rc;
}

void mf_manifest_free(struct mf_manifest *m) {
    if (!m)
        return;
    for (int i = 0; i < m->n_tensors; i++)
        free(m->tensors[i].name);
    free(m->tensors);
    memset(m, 0, sizeof *m);
}

const struct mf_tensor_info *mf_manifest_find(const struct mf_manifest *m,
                                              const char *name) {
    int lo = 0, hi = m->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(m->tensors[mid].name, name);
        if (c == 0)
            return &m->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}
