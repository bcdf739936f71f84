/*
 * test_reader.c — the asynchronous expert reader (io/expert_reader.c) on real files:
 * every mode (pread, mmap, direct, and the RAM cache) hands out the bytes the files
 * hold, for random sequences with many reads in flight; slots are recycled when a
 * layer needs more experts than slots; errors (bad ids, a short read, a file truncated
 * after open) come back at wait with a message naming the file, layer, expert and
 * offset; direct mode falls back to pread and says why; the auto rule and the
 * MOEFLUX_IO override; prefetch counters; free with reads in flight; offsets past
 * 4 GiB (a sparse file); several readers on one store in parallel threads; mmap
 * experts already in the page cache handed out without a worker's pre-fault.
 *
 * The expected bytes are a hash of (layer, file offset), computed here independently
 * of the code under test, so a read from a wrong offset (e.g. truncated to 32 bits)
 * or a wrong layer cannot match.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "core/common.h"
#include "io/expert_reader.h"
#include "io/expert_store.h"

#define ES 16384          // expert_size: 4 pages, so O_DIRECT applies
#define NE 16             // experts per layer
static const uint8_t IS_MOE[3] = {0, 1, 1};
static char dir_disk[256];

/* ==== Model files ==== */

static uint8_t pattern(int l, uint64_t off) {
    uint64_t x = (off + 1) ^ ((uint64_t)l << 44);
    x *= 0x9e3779b97f4a7c15ull;
    return (uint8_t)(x >> 56);
}

static int blob_ok(const void *p, int l, int e, uint64_t es) {
    const uint8_t *b = p;
    if (!b)
        return 0;
    for (uint64_t i = 0; i < es; i++)
        if (b[i] != pattern(l, (uint64_t)e * es + i))
            return 0;
    return 1;
}

// layout.json for n_layers layers of ne experts of es bytes (components as in
// test_store.c: 13824 bytes of 4-bit gs-64 projections at the start of each blob).
static void write_layout(const char *dir, int n_layers, int ne, uint64_t es) {
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf,
                                "{\"num_layers\": %d, \"num_experts\": %d, "
                                "\"expert_size\": %llu, \"components\": [",
                                n_layers, ne, (unsigned long long)es);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    uint64_t off = 0;
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < 3; k++) {
            int rows = p == 2 ? 128 : 64, cols = k ? (p == 2 ? 1 : 2) : (p == 2 ? 8 : 16);
            uint64_t size = (uint64_t)rows * (uint64_t)cols * (k ? 2u : 4u);
            n += (size_t)snprintf(buf + n, sizeof buf - n,
                                  "%s{\"name\": \"%s.%s\", \"offset\": %llu, \"size\": %llu, "
                                  "\"dtype\": \"%s\", \"shape\": [%d, %d]}",
                                  p || k ? ", " : "", proj[p], part[k],
                                  (unsigned long long)off, (unsigned long long)size,
                                  k ? "BF16" : "U32", rows, cols);
            off += size;
        }
    snprintf(buf + n, sizeof buf - n, "]}");
    check_write_file(dir, "layout.json", buf, strlen(buf));
}

static void write_layer(const char *dir, int l, int ne, uint64_t es) {
    size_t n = (size_t)ne * (size_t)es;
    uint8_t *data = malloc(n);
    CHECK(data != NULL, "out of memory");
    if (!data)
        return;
    for (size_t i = 0; i < n; i++)
        data[i] = pattern(l, i);
    char name[32];
    snprintf(name, sizeof name, "layer_%02d.bin", l);
    check_write_file(dir, name, data, n);
    free(data);
}

static void write_model(const char *dir, uint64_t es) {
    write_layout(dir, 3, NE, es);
    write_layer(dir, 1, NE, es);
    write_layer(dir, 2, NE, es);
}

static mf_expert_store *open_store(const char *dir) {
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = mf_expert_store_open(&st, dir, 3, IS_MOE, err, sizeof err);
    CHECK(rc == MF_OK, "store open %s: %s", dir, err);
    return st;
}

static mf_expert_reader *make_reader(mf_expert_store *st, enum mf_io_mode mode,
                                     int n_workers, int n_slots, uint64_t cache_bytes) {
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    p.mode = mode;
    p.n_workers = n_workers;
    p.n_slots = n_slots;
    p.cache_bytes = cache_bytes;
    mf_expert_reader *r = NULL;
    char err[512] = "";
    int rc = mf_expert_reader_new(&r, st, &p, err, sizeof err);
    CHECK(rc == MF_OK && r, "reader (%s): %s", mf_io_mode_name(mode), err);
    return r;
}

static void remove_model(const char *dir) {
    static const char *const names[] = {"layout.json", "layer_01.bin", "layer_02.bin"};
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
}

/* ==== Bytes in every mode ==== */

// A random (layer, expert) sequence, up to `depth` submits in flight, completed by a
// random mix of wait (oldest first) and wait_any; every blob checked. Returns the
// number of blobs that matched.
static int run_random(mf_expert_reader *r, uint64_t seed, int n_req, int depth) {
    int tk[64], lay[64], exp_[64], n_out = 0, good = 0;
    uint64_t rs = seed;
    char err[512];
    for (int i = 0; i < n_req || n_out; ) {
        if (i < n_req && n_out < depth) {
            int l = 1 + (int)(check_rand(&rs) % 2), e = (int)(check_rand(&rs) % NE);
            int rc = mf_expert_reader_submit(r, l, e, &tk[n_out], err, sizeof err);
            CHECK(rc == MF_OK, "submit %d/%d: %d %s", l, e, rc, err);
            if (rc != MF_OK)
                return good;
            lay[n_out] = l;
            exp_[n_out++] = e;
            i++;
            continue;
        }
        const void *data = NULL;
        int j = 0, t, rc;
        if (check_rand(&rs) & 1) {
            t = tk[0];
            rc = mf_expert_reader_wait(r, t, &data, err, sizeof err);
        } else {
            rc = mf_expert_reader_wait_any(r, &t, &data, err, sizeof err);
            while (j < n_out && tk[j] != t)
                j++;
        }
        CHECK(rc == MF_OK && j < n_out, "wait: %d %s", rc, err);
        if (j >= n_out)
            return good;
        int il = -1, ie = -1;
        CHECK(mf_expert_reader_ticket_expert(r, t, &il, &ie) == exp_[j] && il == lay[j],
              "ticket_expert");
        good += blob_ok(data, lay[j], exp_[j], ES);
        mf_expert_reader_release(r, t);
        n_out--;
        memmove(tk + j, tk + j + 1, (size_t)(n_out - j) * sizeof *tk);
        memmove(lay + j, lay + j + 1, (size_t)(n_out - j) * sizeof *lay);
        memmove(exp_ + j, exp_ + j + 1, (size_t)(n_out - j) * sizeof *exp_);
    }
    return good;
}

static void test_modes(mf_expert_store *st) {
    static const enum mf_io_mode modes[3] = {MF_IO_PREAD, MF_IO_MMAP, MF_IO_DIRECT};
    for (int m = 0; m < 3; m++) {
        for (int cached = 0; cached < 2; cached++) {
            mf_expert_reader *r = make_reader(st, modes[m], 4, 6, cached ? 12 * ES : 0);
            if (!r)
                continue;
            int good = run_random(r, 17 + (uint64_t)m, 300, 5);
            struct mf_expert_reader_stats s;
            mf_expert_reader_stats(r, &s);
            CHECK(good == 300, "%s cache %d: %d of 300 blobs right", mf_io_mode_name(modes[m]),
                  cached, good);
            // /tmp is on disk here (ext4): direct mode must take, not fall back.
            CHECK(s.mode == modes[m], "%s: mode in effect %s (%s)",
                  mf_io_mode_name(modes[m]), mf_io_mode_name(s.mode), s.mode_note);
            CHECK(s.hits + s.misses == 300 && s.errors == 0, "%s: hits %lld misses %lld",
                  mf_io_mode_name(modes[m]), (long long)s.hits, (long long)s.misses);
            if (modes[m] == MF_IO_MMAP)
                CHECK(s.bytes_mmap == 300LL * ES && s.reads == 0 && s.bytes_disk == 0,
                      "mmap byte counts");
            else
                CHECK(s.reads == s.misses && s.bytes_disk == s.misses * ES &&
                          s.bytes_cache == s.hits * ES, "%s byte counts",
                      mf_io_mode_name(modes[m]));
            CHECK(s.n_slots == 6 + (cached ? 12 : 0) && s.n_workers == 4, "sizes");
            mf_expert_reader_free(r);
        }
    }
}

/* ==== Slot recycling (prefill) and sharing ==== */

static void test_recycling(mf_expert_store *st) {
    mf_expert_reader *r = make_reader(st, MF_IO_PREAD, 3, 4, 0);
    if (!r)
        return;
    char err[512];
    int seen[NE] = {0}, n_full = 0, n_out = 0, good = 0;
    // Every expert of layer 2, twice over, through 4 slots: the loop moe.c will run.
    for (int k = 0; k < 2 * NE; k++) {
        int t, rc;
        while ((rc = mf_expert_reader_submit(r, 2, k % NE, &t, err, sizeof err)) ==
               MF_EXPERT_READER_FULL) {
            n_full++;
            const void *data;
            int rc2 = mf_expert_reader_wait_any(r, &t, &data, err, sizeof err);
            int ie = mf_expert_reader_ticket_expert(r, t, NULL, NULL);
            CHECK(rc2 == MF_OK && ie >= 0, "wait_any: %s", err);
            good += ie >= 0 && blob_ok(data, 2, ie, ES);
            seen[ie >= 0 ? ie : 0]++;
            mf_expert_reader_release(r, t);
            n_out--;
        }
        CHECK(rc == MF_OK, "submit: %s", err);
        n_out++;
    }
    for (; n_out > 0; n_out--) {
        const void *data;
        int t, rc = mf_expert_reader_wait_any(r, &t, &data, err, sizeof err);
        int ie = mf_expert_reader_ticket_expert(r, t, NULL, NULL);
        CHECK(rc == MF_OK && ie >= 0, "drain: %s", err);
        good += ie >= 0 && blob_ok(data, 2, ie, ES);
        seen[ie >= 0 ? ie : 0]++;
        mf_expert_reader_release(r, t);
    }
    const void *data;
    int t;
    CHECK(mf_expert_reader_wait_any(r, &t, &data, err, sizeof err) == MF_ERR_STATE &&
              t == -1, "wait_any with nothing outstanding");
    int all2 = 1;
    for (int e = 0; e < NE; e++)
        all2 &= seen[e] == 2;
    CHECK(good == 2 * NE && all2 && n_full > 0, "recycling: %d good, %d FULL", good, n_full);

    // FULL when every slot is held; the same expert twice shares one slot.
    int tk[5];
    for (int e = 0; e < 4; e++)
        CHECK(mf_expert_reader_submit(r, 1, e, &tk[e], err, sizeof err) == MF_OK, "fill");
    CHECK(mf_expert_reader_submit(r, 1, 9, &tk[4], err, sizeof err) ==
              MF_EXPERT_READER_FULL && tk[4] == -1 && strstr(err, "4 slots"),
          "full: %s", err);
    struct mf_expert_reader_stats s0, s1;
    mf_expert_reader_stats(r, &s0);
    CHECK(mf_expert_reader_submit(r, 1, 2, &tk[4], err, sizeof err) == MF_OK,
          "a held expert needs no new slot");
    mf_expert_reader_stats(r, &s1);
    CHECK(s1.hits == s0.hits + 1, "shared slot is a hit");
    const void *a, *b;
    CHECK(mf_expert_reader_wait(r, tk[2], &a, err, sizeof err) == MF_OK &&
              mf_expert_reader_wait(r, tk[4], &b, err, sizeof err) == MF_OK && a == b &&
              blob_ok(a, 1, 2, ES), "same slot, same bytes");
    CHECK(mf_expert_reader_wait(r, tk[4], &b, err, sizeof err) == MF_ERR_ARG && !b,
          "waiting twice is refused");
    mf_expert_reader_release(r, tk[0]);
    CHECK(mf_expert_reader_submit(r, 1, 9, &tk[0], err, sizeof err) == MF_OK,
          "a released slot is reused");
    mf_expert_reader_release_all(r);
    CHECK(mf_expert_reader_ticket_expert(r, tk[1], NULL, NULL) == -1, "all released");
    mf_expert_reader_free(r);
}

/* ==== RAM cache on / off ==== */

static const void *read_once(mf_expert_reader *r, int il, int ie) {
    char err[512];
    int t;
    const void *data = NULL;
    CHECK(mf_expert_reader_submit(r, il, ie, &t, err, sizeof err) == MF_OK &&
              mf_expert_reader_wait(r, t, &data, err, sizeof err) == MF_OK &&
              blob_ok(data, il, ie, ES), "read %d/%d: %s", il, ie, err);
    mf_expert_reader_release(r, t);
    return data;
}

static void test_cache_on_off(mf_expert_store *st) {
    // Off: a released slot is emptied (the same expert again is read again) and the
    // next read reuses that slot (the fewest slots, kept warm in the CPU cache).
    mf_expert_reader *r = make_reader(st, MF_IO_PREAD, 2, 4, 0);
    struct mf_expert_reader_stats s;
    if (r) {
        const void *a = read_once(r, 1, 3), *b = read_once(r, 1, 3), *c = read_once(r, 2, 7);
        mf_expert_reader_stats(r, &s);
        CHECK(s.reads == 3 && s.hits == 0 && a == b && b == c, "cache off: %lld reads",
              (long long)s.reads);
        mf_expert_reader_free(r);
    }
    // On: 2 working slots + 3 cache slots; released experts stay until LFRU evicts.
    r = make_reader(st, MF_IO_PREAD, 2, 2, 3 * ES);
    if (r) {
        for (int i = 0; i < 3; i++)
            read_once(r, 1, 3);   // clock 1-3: count 3, last 3: score 33
        for (int e = 8; e < 12; e++)
            read_once(r, 2, e);   // clock 4-7: scores 14..17; all five slots full
        read_once(r, 2, 12);      // evicts 2/8 (14); LRU would evict 1/3 instead
        read_once(r, 1, 3);
        mf_expert_reader_stats(r, &s);
        CHECK(s.reads == 6 && s.hits == 3 && s.bytes_cache == 3LL * ES &&
                  s.bytes_disk == 6LL * ES, "cache on: %lld reads %lld hits", (long long)s.reads,
              (long long)s.hits);
        read_once(r, 2, 8);
        mf_expert_reader_stats(r, &s);
        CHECK(s.reads == 7, "LFRU evicted 2/8: %lld reads", (long long)s.reads);
        mf_expert_reader_free(r);
    }
}

/* ==== Errors ==== */

static int wait_err(mf_expert_reader *r, int il, int ie, char *err, size_t errlen) {
    int t;
    const void *data = (const void *)1;
    int rc = mf_expert_reader_submit(r, il, ie, &t, err, errlen);
    CHECK(rc == MF_OK, "submit %d/%d returns %d (errors belong to wait)", il, ie, rc);
    if (rc != MF_OK)
        return rc;
    rc = mf_expert_reader_wait(r, t, &data, err, errlen);
    CHECK(rc == MF_OK ? data != NULL : data == NULL, "data on error");
    mf_expert_reader_release(r, t);
    return rc;
}

static void truncate_layer(const char *dir, int l, uint64_t bytes) {
    char path[512];
    snprintf(path, sizeof path, "%s/layer_%02d.bin", dir, l);
    CHECK(truncate(path, (off_t)bytes) == 0, "truncate %s", path);
}

static void test_errors(const char *dir) {
    static const enum mf_io_mode modes[3] = {MF_IO_PREAD, MF_IO_MMAP, MF_IO_DIRECT};
    char err[512];
    for (int m = 0; m < 3; m++) {
        write_model(dir, ES);
        mf_expert_store *st = open_store(dir);
        mf_expert_reader *r = st ? make_reader(st, modes[m], 2, 4, 0) : NULL;
        if (!r) {
            mf_expert_store_close(st);
            continue;
        }
        const char *mn = mf_io_mode_name(modes[m]);
        CHECK(wait_err(r, 0, 0, err, sizeof err) == MF_ERR_ARG && strstr(err, "layer 0"),
              "%s dense layer: %s", mn, err);
        CHECK(wait_err(r, 1, NE, err, sizeof err) == MF_ERR_ARG && strstr(err, "expert 16"),
              "%s expert out of range: %s", mn, err);
        CHECK(wait_err(r, 7, -1, err, sizeof err) == MF_ERR_ARG && strstr(err, "layer 7"),
              "%s layer out of range: %s", mn, err);
        // Truncated after open: expert 12 now ends past the end of the file, half of it
        // still there (a short read after progress), expert 14 wholly gone.
        truncate_layer(dir, 2, 12 * ES + ES / 2);
        int rc = wait_err(r, 2, 12, err, sizeof err);
        CHECK(rc == MF_ERR_IO && strstr(err, "layer_02.bin") && strstr(err, "layer 2") &&
                  strstr(err, "expert 12") &&
                  (strstr(err, "offset 204800") || strstr(err, "offset 196608")),
              "%s short read: %d %s", mn, rc, err);
        rc = wait_err(r, 2, 14, err, sizeof err);
        CHECK(rc == MF_ERR_IO && strstr(err, "expert 14") && strstr(err, "offset 229376"),
              "%s truncated: %d %s", mn, rc, err);
        CHECK(wait_err(r, 2, 3, err, sizeof err) == MF_OK, "%s below the cut: %s", mn, err);
        // A failed read is not cached: once the file is whole again, it reads.
        write_layer(dir, 2, NE, ES);
        int t;
        const void *data = NULL;
        CHECK(mf_expert_reader_submit(r, 2, 14, &t, err, sizeof err) == MF_OK &&
                  mf_expert_reader_wait(r, t, &data, err, sizeof err) == MF_OK &&
                  blob_ok(data, 2, 14, ES), "%s retry after repair: %s", mn, err);
        mf_expert_reader_release(r, t);
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.errors == 5, "%s: %lld errors counted", mn, (long long)s.errors);
        CHECK(mf_expert_reader_wait(r, 99, &data, err, sizeof err) == MF_ERR_ARG &&
                  mf_expert_reader_wait(r, 0, &data, err, sizeof err) == MF_ERR_ARG,
              "bad tickets");
        mf_expert_reader_release(r, -3);   // no-op
        mf_expert_reader_free(r);
        mf_expert_store_close(st);
    }
    // mmap with the cache on: a truncated file is caught at submit even when the
    // expert is still in a slot (no worker pre-fault would run to notice).
    write_model(dir, ES);
    mf_expert_store *st = open_store(dir);
    mf_expert_reader *r = st ? make_reader(st, MF_IO_MMAP, 2, 2, 4 * ES) : NULL;
    if (r) {
        CHECK(wait_err(r, 2, 5, err, sizeof err) == MF_OK, "mmap read: %s", err);
        truncate_layer(dir, 2, 4 * ES);
        int rc = wait_err(r, 2, 5, err, sizeof err);
        CHECK(rc == MF_ERR_IO && strstr(err, "expert 5") && strstr(err, "truncated"),
              "mmap cached slot after truncation: %d %s", rc, err);
    }
    mf_expert_reader_free(r);
    mf_expert_store_close(st);
}

/* ==== Direct fallback, allocator ==== */

struct counting_alloc {
    int n_alloc, n_free, offset;
};

static void *c_alloc(void *user, size_t bytes) {
    struct counting_alloc *a = user;
    uint8_t *p = NULL;
    if (posix_memalign((void **)&p, 4096, bytes + 4096) != 0)
        return NULL;
    a->n_alloc++;
    return p + a->offset;
}

static void c_free(void *user, void *p) {
    struct counting_alloc *a = user;
    a->n_free++;
    free((uint8_t *)p - a->offset);
}

static void test_direct_fallback(void) {
    char d[256];
    if (check_make_tmpdir(d, sizeof d, "mf_reader_odd") != 0)
        return;
    // 13824 is not a multiple of 4096: offsets cannot be aligned.
    write_layout(d, 3, NE, 13824);
    write_layer(d, 1, NE, 13824);
    write_layer(d, 2, NE, 13824);
    mf_expert_store *st = open_store(d);
    mf_expert_reader *r = st ? make_reader(st, MF_IO_DIRECT, 2, 4, 0) : NULL;
    if (r) {
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.mode == MF_IO_PREAD && strstr(s.mode_note, "not a multiple of 4096"),
              "unaligned expert_size: %s %s", mf_io_mode_name(s.mode), s.mode_note);
        char err[512];
        int t;
        const void *data = NULL;
        CHECK(mf_expert_reader_submit(r, 1, 5, &t, err, sizeof err) == MF_OK &&
                  mf_expert_reader_wait(r, t, &data, err, sizeof err) == MF_OK &&
                  blob_ok(data, 1, 5, 13824), "fallback bytes: %s", err);
    }
    mf_expert_reader_free(r);
    mf_expert_store_close(st);
    remove_model(d);
    rmdir(d);

    // Slots from the caller's allocator; misaligned ones push direct back to pread.
    st = open_store(dir_disk);
    for (int off = 0; st && off <= 64; off += 64) {
        struct counting_alloc a = {0, 0, off};
        struct mf_expert_reader_params p = mf_expert_reader_default_params();
        p.mode = MF_IO_DIRECT;
        p.n_slots = 3;
        p.alloc_fn = c_alloc;
        p.free_fn = c_free;
        p.alloc_user = &a;
        char err[512] = "";
        r = NULL;
        CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_OK, "new: %s", err);
        if (!r)
            continue;
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(off ? s.mode == MF_IO_PREAD && strstr(s.mode_note, "aligned")
                  : s.mode == MF_IO_DIRECT, "allocator offset %d: %s", off, s.mode_note);
        CHECK(run_random(r, 5, 40, 3) == 40, "bytes via alloc_fn slots");
        mf_expert_reader_free(r);
        CHECK(a.n_alloc == 3 && a.n_free == 3, "alloc %d free %d", a.n_alloc, a.n_free);
    }
    mf_expert_store_close(st);
}

// tmpfs: older kernels refuse O_DIRECT there (EINVAL at open), Linux 6.6+ accepts it.
// Either way the bytes are right and the note agrees with the mode.
static void test_direct_tmpfs(void) {
    char d[256] = "/dev/shm/mf_reader_XXXXXX";
    if (!mkdtemp(d)) {
        printf("test_reader: no /dev/shm, tmpfs direct case skipped\n");
        return;
    }
    write_model(d, ES);
    mf_expert_store *st = open_store(d);
    mf_expert_reader *r = st ? make_reader(st, MF_IO_DIRECT, 2, 4, 0) : NULL;
    if (r) {
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.mode == MF_IO_DIRECT ? strstr(s.mode_note, "unavailable") == NULL
                                     : s.mode == MF_IO_PREAD &&
                                           strstr(s.mode_note, "O_DIRECT") != NULL,
              "tmpfs: %s (%s)", mf_io_mode_name(s.mode), s.mode_note);
        printf("test_reader: tmpfs direct mode: %s\n", s.mode_note);
        CHECK(run_random(r, 9, 60, 4) == 60, "tmpfs bytes");
    }
    mf_expert_reader_free(r);
    mf_expert_store_close(st);
    remove_model(d);
    rmdir(d);
}

/* ==== Auto rule and MOEFLUX_IO ==== */

static void *c_alloc_any(void *user, size_t bytes) {
    (void)user;
    return malloc(bytes);
}

static void test_auto_env(mf_expert_store *st) {
    CHECK(mf_io_auto_mode(75, 100) == MF_IO_MMAP && mf_io_auto_mode(76, 100) == MF_IO_PREAD,
          "0.75 x RAM boundary");
    CHECK(mf_io_auto_mode(1, 0) == MF_IO_PREAD, "unknown RAM: pread");
    CHECK(mf_io_auto_mode(UINT64_MAX / 4 * 3, UINT64_MAX) == MF_IO_MMAP &&
              mf_io_auto_mode(UINT64_MAX, UINT64_MAX) == MF_IO_PREAD, "no overflow");
    CHECK(mf_io_physical_ram() > 0, "physical RAM known");
    enum mf_io_mode m = MF_IO_AUTO;
    CHECK(mf_io_mode_parse("direct", &m) == 0 && m == MF_IO_DIRECT &&
              mf_io_mode_parse("Direct", &m) == -1 && mf_io_mode_parse(NULL, &m) == -1,
          "parse");
    // The store holds 2 x 16 x 16 KiB = 512 KiB of experts.
    uint64_t total = mf_expert_store_total_bytes(st);
    CHECK(total == 2ull * NE * ES, "total bytes %llu", (unsigned long long)total);
    // big: 0.75 x RAM above the experts (mmap) unless they go on to a device (pread).
    for (int i = 0; i < 3; i++) {
        int big = i > 0, to_device = i == 2;
        struct mf_expert_reader_params p = mf_expert_reader_default_params();
        p.ram_bytes = big ? total * 2 : total;   // 0.75 x RAM below / above the experts
        p.to_device = to_device;
        mf_expert_reader *r = NULL;
        char err[512];
        CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_OK, "auto: %s", err);
        struct mf_expert_reader_stats s;
        if (r) {
            mf_expert_reader_stats(r, &s);
            enum mf_io_mode want = big && !to_device ? MF_IO_MMAP : MF_IO_PREAD;
            CHECK(s.mode == want && strstr(s.mode_note, "auto") &&
                      (!to_device || strstr(s.mode_note, "device")),
                  "auto picks %s: %s", mf_io_mode_name(s.mode), s.mode_note);
            CHECK(run_random(r, 3, 30, 4) == 30, "auto bytes");
        }
        mf_expert_reader_free(r);
    }
    // MOEFLUX_IO beats the param; a bad value is an error naming it.
    CHECK(setenv("MOEFLUX_IO", "mmap", 1) == 0, "setenv");
    mf_expert_reader *r = make_reader(st, MF_IO_PREAD, 2, 4, 0);
    if (r) {
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.mode == MF_IO_MMAP && strstr(s.mode_note, "MOEFLUX_IO=mmap"), "env: %s",
              s.mode_note);
    }
    mf_expert_reader_free(r);
    setenv("MOEFLUX_IO", "fast", 1);
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    char err[512] = "";
    r = (mf_expert_reader *)1;
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_ERR_ARG && r == NULL &&
              strstr(err, "MOEFLUX_IO") && strstr(err, "fast"), "bad env: %s", err);
    unsetenv("MOEFLUX_IO");
    p.n_workers = 0;
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_ERR_ARG, "0 workers");
    p = mf_expert_reader_default_params();
    p.n_slots = 1 << 30;
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_ERR_ARG &&
              strstr(err, "n_slots"), "absurd slot count: %s", err);
    p = mf_expert_reader_default_params();
    p.alloc_fn = c_alloc_any;
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_ERR_ARG,
          "alloc_fn without free_fn");
    p = mf_expert_reader_default_params();
    p.mode = (enum mf_io_mode)9;
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_ERR_ARG, "bad mode");
}

/* ==== Prefetch ==== */

static void test_prefetch(mf_expert_store *st) {
    for (int m = 0; m < 2; m++) {
        enum mf_io_mode mode = m ? MF_IO_MMAP : MF_IO_PREAD;
        mf_expert_reader *r = make_reader(st, mode, 2, 8, 0);
        if (!r)
            continue;
        const int32_t ids[4] = {3, 5, 7, 99};   // 99: ignored
        mf_expert_reader_prefetch(r, 1, ids, 4);
        char err[512];
        int tk[3];
        const int want[3] = {3, 5, 9};
        for (int i = 0; i < 3; i++)
            CHECK(mf_expert_reader_submit(r, 1, want[i], &tk[i], err, sizeof err) == MF_OK,
                  "submit");
        for (int i = 0; i < 3; i++) {
            const void *data = NULL;
            CHECK(mf_expert_reader_wait(r, tk[i], &data, err, sizeof err) == MF_OK &&
                      blob_ok(data, 1, want[i], ES), "prefetched bytes %d", want[i]);
        }
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.prefetch_issued == 3 && s.prefetch_hits == 2 && s.hits == 2 &&
                  s.misses == 1, "%s prefetch: issued %lld hits %lld (hits %lld misses %lld)",
              mf_io_mode_name(mode), (long long)s.prefetch_issued,
              (long long)s.prefetch_hits, (long long)s.hits, (long long)s.misses);
        // With every slot held, pread mode can only hint the kernel.
        int more[5];
        for (int i = 0; i < 5; i++)
            CHECK(mf_expert_reader_submit(r, 2, i, &more[i], err, sizeof err) == MF_OK,
                  "fill");
        mf_expert_reader_prefetch(r, 2, ids, 3);   // 3, 5, 7: 3 is held, 5 and 7 not
        mf_expert_reader_stats(r, &s);
        CHECK(s.prefetch_issued == 3 && s.prefetch_hints == (m ? 0 : 2),
              "%s: no slot, %lld hints", mf_io_mode_name(mode), (long long)s.prefetch_hints);
        mf_expert_reader_free(r);   // 8 tickets still held: free releases everything
    }
}

/* ==== Free with reads in flight ==== */

static void test_free_in_flight(mf_expert_store *st) {
    for (int round = 0; round < 12; round++) {
        enum mf_io_mode mode = (enum mf_io_mode)(1 + round % 3);
        mf_expert_reader *r = make_reader(st, mode, 1 + round % 4, 24, 0);
        if (!r)
            continue;
        char err[512];
        for (int i = 0; i < 24; i++) {
            int t;
            CHECK(mf_expert_reader_submit(r, 1 + i % 2, i % NE, &t, err, sizeof err) ==
                      MF_OK, "submit");
        }
        const int32_t ids[3] = {1, 2, 3};
        mf_expert_reader_prefetch(r, 1, ids, 3);
        mf_expert_reader_free(r);
    }
}

/* ==== Offsets past 4 GiB ==== */

#define BIG_NE (262144 + 8)   // x 16 KiB: experts 262144.. start at 4 GiB and beyond

static void test_big_offsets(void) {
    char d[256];
    if (check_make_tmpdir(d, sizeof d, "mf_reader_big") != 0)
        return;
    static const uint8_t is_moe[2] = {0, 1};
    write_layout(d, 2, BIG_NE, ES);
    char path[512];
    snprintf(path, sizeof path, "%s/layer_01.bin", d);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)BIG_NE * ES) == 0, "sparse file %s", path);
    static const int probe[6] = {0, 5, 262143, 262144, 262147, BIG_NE - 1};
    uint8_t *blob = malloc(ES);
    for (int i = 0; fd >= 0 && blob && i < 6; i++) {
        uint64_t off = (uint64_t)probe[i] * ES;
        for (size_t k = 0; k < ES; k++)
            blob[k] = pattern(1, off + k);
        CHECK(pwrite(fd, blob, ES, (off_t)off) == ES, "pwrite expert %d", probe[i]);
    }
    free(blob);
    if (fd >= 0)
        close(fd);
    mf_expert_store *st = NULL;
    char err[512] = "";
    CHECK(mf_expert_store_open(&st, d, 2, is_moe, err, sizeof err) == MF_OK, "big: %s",
          err);
    static const enum mf_io_mode modes[3] = {MF_IO_PREAD, MF_IO_MMAP, MF_IO_DIRECT};
    for (int m = 0; st && m < 3; m++) {
        mf_expert_reader *r = make_reader(st, modes[m], 3, 6, 0);
        if (!r)
            continue;
        int tk[6];
        for (int i = 0; i < 6; i++)
            CHECK(mf_expert_reader_submit(r, 1, probe[i], &tk[i], err, sizeof err) == MF_OK,
                  "submit");
        for (int i = 0; i < 6; i++) {
            const void *data = NULL;
            int rc = mf_expert_reader_wait(r, tk[i], &data, err, sizeof err);
            CHECK(rc == MF_OK && blob_ok(data, 1, probe[i], ES),
                  "%s: expert %d at offset %llu: %d %s", mf_io_mode_name(modes[m]), probe[i],
                  (unsigned long long)probe[i] * ES, rc, err);
        }
        struct mf_expert_reader_stats s;
        mf_expert_reader_stats(r, &s);
        CHECK(s.mode == modes[m], "big file mode %s: %s", mf_io_mode_name(modes[m]),
              s.mode_note);
        mf_expert_reader_free(r);
    }
    // The plain synchronous read, too.
    uint8_t *buf = malloc(ES);
    CHECK(st && buf && mf_expert_store_read(st, 1, 262147, buf, ES, err, sizeof err) == MF_OK &&
              blob_ok(buf, 1, 262147, ES), "store read past 4 GiB: %s", err);
    free(buf);
    mf_expert_store_close(st);
    unlink(path);
    snprintf(path, sizeof path, "%s/layout.json", d);
    unlink(path);
    rmdir(d);
}

/* ==== Many readers, one store ==== */

struct thread_job {
    mf_expert_store *st;
    enum mf_io_mode mode;
    uint64_t cache_bytes, seed;
    int good;
};

static void *reader_thread(void *arg) {
    struct thread_job *j = arg;
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    p.mode = j->mode;
    p.n_workers = 3;
    p.n_slots = 5;
    p.cache_bytes = j->cache_bytes;
    mf_expert_reader *r = NULL;
    char err[512];
    if (mf_expert_reader_new(&r, j->st, &p, err, sizeof err) != MF_OK)
        return NULL;
    j->good = run_random(r, j->seed, 200, 4);
    mf_expert_reader_free(r);
    return NULL;
}

static void test_many_readers(void) {
    // A fresh store, so the readers race to make its mappings and direct fds.
    mf_expert_store *st = open_store(dir_disk);
    if (!st)
        return;
    struct thread_job jobs[6];
    pthread_t th[6];
    for (int i = 0; i < 6; i++) {
        jobs[i] = (struct thread_job){st, (enum mf_io_mode)(1 + i % 3),
                                      i >= 3 ? 4 * ES : 0, 100 + (uint64_t)i, 0};
        CHECK(pthread_create(&th[i], NULL, reader_thread, &jobs[i]) == 0, "thread");
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(th[i], NULL);
        CHECK(jobs[i].good == 200, "reader %d (%s): %d of 200 right", i,
              mf_io_mode_name(jobs[i].mode), jobs[i].good);
    }
    mf_expert_store_close(st);
}

/* ==== Page-locking for a device (params.pin) ====
 * Counting callbacks stand in for a GPU's cuMemHostRegister: auto with to_device picks
 * mmap with every layer mapping locked once per store when the experts take at most
 * half the RAM, pread above that; a lock that fails leaves nothing locked and falls
 * back (pread for auto, plain mmap when mmap was asked for); two readers lock once and
 * the last one freed unlocks. */

struct pins {
    int locked, calls, fail;   // fail > 0: calls from the fail-th on are refused
};

static int pin_count(void *user, const void *p, size_t n, char *err, size_t errlen) {
    struct pins *c = user;
    c->calls++;
    if ((c->fail && c->calls >= c->fail) || !p || n != (size_t)NE * ES) {
        snprintf(err, errlen, "refused");
        return MF_ERR_BACKEND;
    }
    c->locked++;
    return MF_OK;
}

static void unpin_count(void *user, const void *p) {
    struct pins *c = user;
    c->locked -= p != NULL;
}

static mf_expert_reader *pin_reader(mf_expert_store *st, struct pins *c,
                                    enum mf_io_mode mode, uint64_t ram) {
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    p.mode = mode;
    p.to_device = 1;
    p.ram_bytes = ram;
    p.pin = (struct mf_expert_pin){.pin = pin_count, .unpin = unpin_count, .user = c};
    mf_expert_reader *r = NULL;
    char err[512];
    CHECK(mf_expert_reader_new(&r, st, &p, err, sizeof err) == MF_OK, "pin reader: %s", err);
    return r;
}

static void expect_mode(mf_expert_reader *r, enum mf_io_mode mode, int pinned,
                        const char *note, const char *what) {
    struct mf_expert_reader_stats s;
    if (!r)
        return;
    mf_expert_reader_stats(r, &s);
    CHECK(s.mode == mode && s.pinned == pinned && strstr(s.mode_note, note),
          "%s: mode %s pinned %d: %s", what, mf_io_mode_name(s.mode), s.pinned,
          s.mode_note);
    CHECK(run_random(r, 5, 20, 4) == 20, "%s: bytes", what);
}

static void test_pin(mf_expert_store *st) {
    const uint64_t total = 2ull * NE * ES;
    struct pins c = {0};
    mf_expert_reader *a = pin_reader(st, &c, MF_IO_AUTO, total * 2);
    expect_mode(a, MF_IO_MMAP, 1, "page-locked", "auto, half the RAM");
    CHECK(c.locked == 2 && c.calls == 2, "two layer files locked: %d of %d calls",
          c.locked, c.calls);
    mf_expert_reader *b = pin_reader(st, &c, MF_IO_MMAP, total * 2);
    expect_mode(b, MF_IO_MMAP, 1, "mmap", "second reader");
    CHECK(c.calls == 2, "the second reader locks nothing again: %d calls", c.calls);
    mf_expert_reader_free(a);
    CHECK(c.locked == 2, "still locked while a reader uses them: %d", c.locked);
    mf_expert_reader_free(b);
    CHECK(c.locked == 0, "unlocked with the last reader: %d", c.locked);
    c = (struct pins){0};
    mf_expert_reader *r = pin_reader(st, &c, MF_IO_AUTO, total * 2 - 1);
    expect_mode(r, MF_IO_PREAD, 0, "pread", "auto, more than half the RAM");
    mf_expert_reader_free(r);
    CHECK(c.calls == 0, "nothing locked for pread: %d calls", c.calls);
    c = (struct pins){.fail = 2};   // the second file's lock fails: the first is undone
    r = pin_reader(st, &c, MF_IO_AUTO, total * 4);
    expect_mode(r, MF_IO_PREAD, 0, "page-locking failed, using pread", "auto, lock fails");
    mf_expert_reader_free(r);
    CHECK(c.calls == 2 && c.locked == 0, "a half-done lock is undone: %d locked", c.locked);
    c = (struct pins){.fail = 1};
    r = pin_reader(st, &c, MF_IO_MMAP, total * 4);
    expect_mode(r, MF_IO_MMAP, 0, "page-locking failed, plain mmap", "mmap, lock fails");
    mf_expert_reader_free(r);
    CHECK(c.locked == 0, "a failed lock leaves nothing locked: %d", c.locked);
}

/* ==== mmap: experts already in the page cache skip the pre-fault ==== */

// 1 when posix_fadvise(DONTNEED) dropped layer l's pages from the page cache (files
// nobody maps, on a disk file system); the store answers whether it did.
static int evict_layer(const char *dir, int l) {
    char path[512];
    snprintf(path, sizeof path, "%s/layer_%02d.bin", dir, l);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0, "open %s", path);
    if (fd < 0)
        return 0;
    int rc = fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0;
    close(fd);
    return rc;
}

// Submits (l, e), waits, checks the bytes; returns the reader's `resident` count.
static int64_t fetch(mf_expert_reader *r, int l, int e) {
    char err[512] = "";
    int t = -1;
    const void *data = NULL;
    int rc = mf_expert_reader_submit(r, l, e, &t, err, sizeof err);
    if (rc == MF_OK)
        rc = mf_expert_reader_wait(r, t, &data, err, sizeof err);
    CHECK(rc == MF_OK && blob_ok(data, l, e, ES), "mmap %d/%d: %d %s", l, e, rc, err);
    if (t >= 0)
        mf_expert_reader_release(r, t);
    struct mf_expert_reader_stats s;
    mf_expert_reader_stats(r, &s);
    return s.resident;
}

static void test_resident(void) {
    char d[256];
    if (check_make_tmpdir(d, sizeof d, "mf_reader_res") != 0)
        return;
    write_model(d, ES);   // just written: every page in the page cache
    mf_expert_store *st = open_store(d);
    const void *data = NULL;
    CHECK(st && !mf_expert_store_resident(st, 1, 0, &data) && !data,
          "resident before the store is mapped");
    mf_expert_reader *r = st ? make_reader(st, MF_IO_MMAP, 2, 4, 0) : NULL;
    if (r) {
        CHECK(fetch(r, 1, 3) == 1, "a cached expert is handed out without a pre-fault");
        CHECK(fetch(r, 1, 3) == 2, "and again once released (cache off: a new miss)");
        if (evict_layer(d, 2) && !mf_expert_store_resident(st, 2, 5, &data)) {
            CHECK(fetch(r, 2, 5) == 2, "an evicted expert goes through a worker");
            CHECK(mf_expert_store_resident(st, 2, 5, &data) &&
                      data != NULL && blob_ok(data, 2, 5, ES),
                  "the worker's pre-fault brought it back");
        } else {
            printf("test_reader: layer 2 stayed in the page cache after DONTNEED; the "
                   "evicted case was not run\n");
        }
        mf_expert_reader_free(r);
    }
    mf_expert_store_close(st);
    remove_model(d);
    rmdir(d);
}

int main(void) {
    unsetenv("MOEFLUX_IO");
    if (check_make_tmpdir(dir_disk, sizeof dir_disk, "mf_reader") != 0)
        return 1;
    write_model(dir_disk, ES);
    mf_expert_store *st = open_store(dir_disk);
    if (st) {
        test_modes(st);
        test_recycling(st);
        test_cache_on_off(st);
        test_auto_env(st);
        test_prefetch(st);
        test_free_in_flight(st);
        test_pin(st);
    }
    mf_expert_store_close(st);
    test_many_readers();
    test_direct_fallback();
    test_direct_tmpfs();
    test_big_offsets();
    test_resident();
    char d[256];
    if (check_make_tmpdir(d, sizeof d, "mf_reader_err") == 0) {
        test_errors(d);
        remove_model(d);
        rmdir(d);
    }
    remove_model(dir_disk);
    rmdir(dir_disk);
    return check_finish("test_reader");
}
