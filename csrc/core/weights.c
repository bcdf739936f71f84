/*
 * weights.c — model_weights.bin: its read-only mapping and the bind helpers through
 * which every arch file turns manifest entries into struct mf_weight views.
 *
 * A module is quantized iff "<path>.scales" exists (model-math §1.3, what mlx-lm's
 * loader does); bits and group size then follow from the shapes alone (packed columns
 * x 32 / n_in, n_in / scale columns) and are cross-checked against the manifest entry
 * and the config's quantization block, so a checkpoint whose shapes disagree with
 * config.json fails at load with a message naming the tensor instead of producing
 * garbage at run time. This file does not decide which tensors an arch needs.
 */
#include "core/weights.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/common.h"

/* ==== Mapping ==== */

int mf_weights_map(mf_model *m, const char *path, char *err, size_t errlen) {
    m->weights_fd = -1;
    m->weights_map = NULL;
    m->weights_bytes = 0;
    int fd;
    uint64_t bytes;
    int rc = mf_open_regular(path, &fd, &bytes, err, errlen);
    if (rc != MF_OK)
        return rc;
    void *map = NULL;
    // mmap of length 0 is invalid; an empty bin (a model with no dense tensors cannot
    // exist, but the manifest check reports it better) maps nothing.
    if (bytes > 0) {
        // MAP_PRIVATE + PROT_READ: pages stay shared with the page cache and nothing
        // we do can write to the file.
        map = mmap(NULL, (size_t)bytes, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return mf_err(err, errlen, MF_ERR_IO, "%s: mmap of %llu bytes failed: %s",
                          path, (unsigned long long)bytes, strerror(e));
        }
        // Dense weights are touched on every token; ask the kernel to read ahead.
        (void)madvise(map, (size_t)bytes, MADV_WILLNEED);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        if (map)
            munmap(map, (size_t)bytes);
        close(fd);
        return mf_err(err, errlen, MF_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    m->weights_fd = fd;
    m->weights_map = map;
    m->weights_bytes = bytes;
    m->weights_mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    return MF_OK;
}

int mf_weights_check(const mf_model *m, char *err, size_t errlen) {
    if (m->weights_fd < 0)
        return MF_OK;
    struct stat st;
    if (fstat(m->weights_fd, &st) != 0)
        return mf_err(err, errlen, MF_ERR_IO, "%s/model_weights.bin: cannot stat: %s",
                      m->dir, strerror(errno));
    int64_t mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if ((uint64_t)st.st_size != m->weights_bytes || mtime != m->weights_mtime_ns)
        return mf_err(err, errlen, MF_ERR_IO,
                      "%s/model_weights.bin was changed on disk after the model was opened "
                      "(%llu bytes then, %llu now%s); its mapping can no longer be trusted: "
                      "open the model again", m->dir,
                      (unsigned long long)m->weights_bytes, (unsigned long long)st.st_size,
                      mtime != m->weights_mtime_ns ? ", modified" : "");
    return MF_OK;
}

void mf_weights_unmap(mf_model *m) {
    if (m->weights_map)
        munmap(m->weights_map, (size_t)m->weights_bytes);
    if (m->weights_fd >= 0)
        close(m->weights_fd);
    m->weights_map = NULL;
    m->weights_fd = -1;
    m->weights_bytes = 0;
}

/* ==== Binding ==== */

// "[a, b, c]" into buf.
static const char *shape_str(char *buf, size_t n, const int64_t *shape, int ndim) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n)
        snprintf(buf + k, n - k, "]");
    return buf;
}

static int is_float(enum mf_dtype dt) {
    return dt == MF_DTYPE_F32 || dt == MF_DTYPE_F16 || dt == MF_DTYPE_BF16;
}

static const void *dev_ptr(const mf_model *m, const struct mf_tensor_info *t) {
    return (const char *)m->weights_dev + t->offset;
}

// Check t's shape against [n_stack?, rows, cols].
static int check_shape(const struct mf_tensor_info *t, int64_t n_stack, int64_t rows,
                       int64_t cols, char *err, size_t errlen) {
    int64_t want[3];
    int nd = 0;
    if (n_stack > 0)
        want[nd++] = n_stack;
    want[nd++] = rows;
    want[nd++] = cols;
    int ok = t->ndim == nd;
    for (int i = 0; ok && i < nd; i++)
        ok = t->shape[i] == want[i];
    if (ok)
        return 0;
    char a[96], b[96];
    return mf_err(err, errlen, MF_ERR_SHAPE, "tensor %s: expected shape %s, got %s %s",
                  t->name, shape_str(a, sizeof a, want, nd),
                  shape_str(b, sizeof b, t->shape, t->ndim), mf_dtype_name(t->dtype));
}

static int valid_bits(int b) {
    return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
}

static int bind_quantized(const mf_model *m, struct mf_weight *out, const char *path,
                          const struct mf_tensor_info *w, const struct mf_tensor_info *s,
                          int64_t n_stack, int64_t n_out, int64_t n_in, char *err,
                          size_t errlen) {
    char bname[512];
    snprintf(bname, sizeof bname, "%s.biases", path);
    const struct mf_tensor_info *b = mf_manifest_find(&m->manifest, bname);
    if (!b)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "tensor %s: missing (has %s.scales; only affine quantization with "
                      "biases is supported)", bname, path);
    if (w->dtype != MF_DTYPE_U32)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s.weight: quantized module needs dtype U32, got %s", path,
                      mf_dtype_name(w->dtype));
    if (!is_float(s->dtype))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: scales need a float dtype, got %s", s->name,
                      mf_dtype_name(s->dtype));
    int sd = s->ndim;
    int want_nd = n_stack > 0 ? 3 : 2;
    if (sd != want_nd || w->ndim != sd) {
        char a[96], b[96];
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s.weight / .scales: expected %d dimensions ([%s%lld, "
                      "n_in*bits/32] / [.., n_in/group_size]), got %s / %s", path, want_nd,
                      n_stack > 0 ? "n_stack, " : "", (long long)n_out,
                      shape_str(a, sizeof a, w->shape, w->ndim),
                      shape_str(b, sizeof b, s->shape, s->ndim));
    }
    int64_t pcols = w->shape[sd - 1], scols = s->shape[sd - 1];
    // Derive bits and group size from the shapes; both must divide exactly.
    if (pcols <= 0 || scols <= 0 || (pcols * 32) % n_in != 0 || n_in % scols != 0)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s.weight / .scales: %lld packed and %lld scale columns do "
                      "not fit n_in = %lld of a quantized module", path, (long long)pcols,
                      (long long)scols, (long long)n_in);
    int bits = (int)(pcols * 32 / n_in);
    int64_t gs = n_in / scols;
    if (!valid_bits(bits) || (gs != 32 && gs != 64 && gs != 128))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s.weight: shapes imply %d bits and group size %lld, not a "
                      "supported affine quantization (n_in = %lld)", path, bits,
                      (long long)gs, (long long)n_in);
    int rc;
    if ((rc = check_shape(w, n_stack, n_out, pcols, err, errlen)) ||
        (rc = check_shape(s, n_stack, n_out, scols, err, errlen)) ||
        (rc = check_shape(b, n_stack, n_out, scols, err, errlen)))
        return rc;
    if (b->dtype != s->dtype)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: dtype %s differs from the scales' %s", b->name,
                      mf_dtype_name(b->dtype), mf_dtype_name(s->dtype));
    if ((w->bits && w->bits != bits) || (w->group_size && w->group_size != gs))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: model_weights.json says %d bits / group %d but the "
                      "shapes give %d / %lld", w->name, w->bits, w->group_size, bits,
                      (long long)gs);
    int cbits, cgs;
    if (mf_config_quant_for(&m->cfg, path, &cbits, &cgs) == 1 &&
        (cbits != bits || cgs != gs))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: config.json quantization says %d bits / group %d but the "
                      "shapes give %d / %lld", w->name, cbits, cgs, bits, (long long)gs);
    memset(out, 0, sizeof *out);
    out->w = dev_ptr(m, w);
    out->scales = dev_ptr(m, s);
    out->biases = dev_ptr(m, b);
    out->dtype = MF_DTYPE_U32;
    out->sdtype = s->dtype;
    out->bits = bits;
    out->group_size = (int)gs;
    out->n_out = n_out;
    out->n_in = n_in;
    return MF_OK;
}

int mf_bind_linear(const mf_model *m, struct mf_weight *out, const char *path,
                   int64_t n_stack, int64_t n_out, int64_t n_in, char *err,
                   size_t errlen) {
    memset(out, 0, sizeof *out);
    if (n_out <= 0 || n_in <= 0 || n_stack < 0)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "bind %s: bad logical shape [%lld, %lld] (stack %lld)", path,
                      (long long)n_out, (long long)n_in, (long long)n_stack);
    char wname[512], sname[512];
    if ((size_t)snprintf(wname, sizeof wname, "%s.weight", path) >= sizeof wname ||
        (size_t)snprintf(sname, sizeof sname, "%s.scales", path) >= sizeof sname)
        return mf_err(err, errlen, MF_ERR_ARG, "bind: tensor path too long: %.64s...", path);
    const struct mf_tensor_info *w = mf_manifest_find(&m->manifest, wname);
    if (!w)
        return mf_err(err, errlen, MF_ERR_FORMAT, "tensor %s: missing from %s/%s", wname,
                      m->dir, "model_weights.json");
    const struct mf_tensor_info *s = mf_manifest_find(&m->manifest, sname);
    if (s)
        return bind_quantized(m, out, path, w, s, n_stack, n_out, n_in, err, errlen);
    if (!is_float(w->dtype))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: dtype %s without %s (a float weight must be F32, F16 or "
                      "BF16)", wname, mf_dtype_name(w->dtype), sname);
    int rc = check_shape(w, n_stack, n_out, n_in, err, errlen);
    if (rc)
        return rc;
    out->w = dev_ptr(m, w);
    out->dtype = w->dtype;
    out->sdtype = w->dtype;
    out->n_out = n_out;
    out->n_in = n_in;
    return MF_OK;
}

int mf_bind_vector(const mf_model *m, struct mf_weight *out, const char *name, int64_t n,
                   char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    const struct mf_tensor_info *t = mf_manifest_find(&m->manifest, name);
    if (!t)
        return mf_err(err, errlen, MF_ERR_FORMAT, "tensor %s: missing from %s/%s", name,
                      m->dir, "model_weights.json");
    if (!is_float(t->dtype))
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: expected a float dtype (F32, F16, BF16), got %s", name,
                      mf_dtype_name(t->dtype));
    int64_t count = 1;
    for (int i = 0; i < t->ndim; i++)
        count *= t->shape[i];
    if (count != n) {
        char a[96];
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "tensor %s: expected %lld elements, got shape %s (%lld)", name,
                      (long long)n, shape_str(a, sizeof a, t->shape, t->ndim),
                      (long long)count);
    }
    out->w = dev_ptr(m, t);
    out->dtype = t->dtype;
    out->sdtype = t->dtype;
    out->n_out = 1;
    out->n_in = n;
    return MF_OK;
}

struct mf_derived {
    float *host;
    const void *dev;
    uint64_t bytes;
    struct mf_derived *next;
};

int mf_bind_vector_f32(mf_model *m, struct mf_weight *out, const char *name, int64_t n,
                       char *err, size_t errlen) {
    int rc = mf_bind_vector(m, out, name, n, err, errlen);
    if (rc != MF_OK || out->dtype == MF_DTYPE_F32)
        return rc;
    const struct mf_tensor_info *t = mf_manifest_find(&m->manifest, name);
    struct mf_derived *d = calloc(1, sizeof *d);
    if (d)
        d->host = malloc((size_t)n * sizeof(float));
    if (!d || !d->host) {
        if (d)
            free(d);
        return mf_err(err, errlen, MF_ERR_NOMEM, "tensor %s: out of memory for f32 copy",
                      name);
    }
    const uint8_t *src = (const uint8_t *)m->weights_map + t->offset;
    for (int64_t i = 0; i < n; i++)
        d->host[i] = mf_load_f32(src, t->dtype, (size_t)i);
    d->bytes = (uint64_t)n * sizeof(float);
    d->dev = m->be->ops->map_weights(m->be, d->host, d->bytes, err, errlen);
    if (!d->dev) {
        free(d->host);
        free(d);
        return MF_ERR_BACKEND;
    }
    d->next = m->derived;
    m->derived = d;
    out->w = d->dev;
    out->dtype = out->sdtype = MF_DTYPE_F32;
    return MF_OK;
}

void mf_derived_free(mf_model *m) {
    while (m->derived) {
        struct mf_derived *d = m->derived;
        m->derived = d->next;
        if (m->be->ops->unmap_weights)
            m->be->ops->unmap_weights(m->be, d->dev, d->bytes);
        free(d->host);
        free(d);
    }
}

int mf_has_tensor(const mf_model *m, const char *name) {
    return mf_manifest_find(&m->manifest, name) != NULL;
}
