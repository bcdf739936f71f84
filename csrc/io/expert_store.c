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
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/json.h"

#define LAYOUT_VERSION 1
#define MAX_LAYER_FILE_BYTES ((uint64_t)1 << 46)

struct mf_expert_store {
    struct mf_expert_layout layout;
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
    size_t page;                 // sysconf(_SC_PAGESIZE)
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
    // Before any arithmetic with it: a huge group_size overflowed hid below.
    if (!(gs == 32 || gs == 64 || gs == 128))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: group_size %lld: expected 32, 64 or 128", name, (long long)gs);
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
    long page = sysconf(_SC_PAGESIZE);
    st->page = page > 0 ? (size_t)page : 4096;
    if (!st->dir || !st->fds || !st->dfds || !st->maps) {
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

// One expert blob from fd into dst, looping over short reads and EINTR. 64-bit
// offsets: one layer file of a large model passes 4 GiB.
static int read_blob(const mf_expert_store *st, int fd, int il, int ie, void *dst,
                     const char *how, char *err, size_t errlen) {
    size_t n = (size_t)st->layout.expert_size;
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
    return read_blob(st, st->fds[il], il, ie, dst, "", err, errlen);
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
    return read_blob(st, st->dfds[il], il, ie, dst, "O_DIRECT ", err, errlen);
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
