/*
 * bench_reader.c — expert-read bandwidth of the asynchronous reader (io/expert_reader.c)
 * at the engine's read size, by I/O mode and worker count, as ratios to limits
 * measured in the same run.
 *
 * A synthetic layer file of n_experts blobs of expert_size bytes (default 1.69 MiB,
 * Qwen3.6-35B-A3B's 4-bit expert) is written to a temporary directory on disk. Each
 * measurement makes a fresh reader and pulls 64 distinct random experts through it,
 * keeping `depth` (default 8 = K of a decode layer) submits in flight, completing them
 * with wait_any as moe.c will; GB/s = expert bytes / wall time. Configurations are
 * interleaved and repeated (--reps, default 5), and the median and the spread
 * (min-max) are reported.
 *
 * Limits, measured in the same run:
 *   warm  (file in the page cache; pread and mmap): one thread's memcpy rate over
 *         blocks of expert_size from a buffer larger than the last-level cache, and
 *         the rate of plain synchronous pread by `depth` threads over the same
 *         sequence (what moe.c does today on its compute threads, minus compute).
 *   cold  (direct mode: no page cache): the whole file in 8 MiB O_DIRECT requests by
 *         `depth` threads (the device's rate for large requests at that depth).
 * mmap mode moves no bytes: its figure is how fast pointers to pre-faulted experts
 * become available (the consumer then reads the page cache directly), so compare it
 * with the others only as "time the consumer waits".
 * Also: 2 MiB- vs 4 KiB-aligned slots for warm pread (the reference system measured
 * 3.6x for 2 MiB on macOS).
 *
 * Build and run (from the repository root):
 *   sh bench/bench_reader.sh [--expert-size B] [--experts N] [--depth D] [--reps R]
 *        [--slots S (reader slots, default 2 x depth)] [--dir DIR]
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/common.h"
#include "io/expert_reader.h"
#include "io/expert_store.h"

#define N_READS 64
#define N_WARM 64     // unmeasured reads first: slots and buffers faulted in
#define MAX_REPS 32

struct opts {
    uint64_t expert_size;
    int n_experts, depth, reps, slots;   // slots: reader n_slots, 0 = 2 x depth
    const char *dir;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rnd(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

// N_WARM + N_READS distinct experts in random order (the warm-up ones first).
static void pick(int *ids, int n_experts, uint64_t seed) {
    int *perm = malloc((size_t)n_experts * sizeof *perm);
    if (!perm)
        exit(1);   // a benchmark of our own making, not library code
    for (int i = 0; i < n_experts; i++)
        perm[i] = i;
    for (int i = n_experts - 1; i > 0; i--) {
        int j = (int)(rnd(&seed) % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    memcpy(ids, perm, (N_WARM + N_READS) * sizeof *ids);
    free(perm);
}

/* ==== The model file ==== */

static int write_files(const struct opts *o) {
    char path[600];
    snprintf(path, sizeof path, "%s/layout.json", o->dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    // The 13824-byte component set of the C tests at the blob's start; the rest of
    // each blob is padding the reader moves all the same.
    fprintf(f, "{\"num_layers\": 2, \"num_experts\": %d, \"expert_size\": %llu, "
               "\"components\": [", o->n_experts, (unsigned long long)o->expert_size);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    uint64_t off = 0;
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < 3; k++) {
            int rows = p == 2 ? 128 : 64, cols = k ? (p == 2 ? 1 : 2) : (p == 2 ? 8 : 16);
            uint64_t size = (uint64_t)rows * (uint64_t)cols * (k ? 2u : 4u);
            fprintf(f, "%s{\"name\": \"%s.%s\", \"offset\": %llu, \"size\": %llu, "
                       "\"dtype\": \"%s\", \"shape\": [%d, %d]}", p || k ? ", " : "",
                    proj[p], part[k], (unsigned long long)off, (unsigned long long)size,
                    k ? "BF16" : "U32", rows, cols);
            off += size;
        }
    fprintf(f, "]}\n");
    if (fclose(f) != 0)
        return -1;
    snprintf(path, sizeof path, "%s/layer_01.bin", o->dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    uint8_t *blob = malloc(o->expert_size);
    if (fd < 0 || !blob)
        return -1;
    uint64_t s = 1;
    for (uint64_t i = 0; i < o->expert_size; i++)
        blob[i] = (uint8_t)rnd(&s);
    int rc = 0;
    for (int e = 0; e < o->n_experts && rc == 0; e++) {
        memcpy(blob, &e, sizeof e);
        rc = write(fd, blob, o->expert_size) == (ssize_t)o->expert_size ? 0 : -1;
    }
    free(blob);
    return close(fd) == 0 ? rc : -1;
}

static void remove_files(const struct opts *o) {
    char path[600];
    snprintf(path, sizeof path, "%s/layer_01.bin", o->dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/layout.json", o->dir);
    unlink(path);
}

/* ==== One reader run ==== */

static void *offset_alloc(void *user, size_t bytes) {
    (void)user;
    uint8_t *p = NULL;
    // 2 MiB-aligned, then 4 KiB in: 4 KiB-aligned, never 2 MiB-aligned.
    return posix_memalign((void **)&p, 2u << 20, bytes + 4096) == 0 ? p + 4096 : NULL;
}

static void offset_free(void *user, void *p) {
    (void)user;
    free((uint8_t *)p - 4096);
}

// GB/s of one reader pulling ids through with `depth` in flight; < 0 on error.
static double reader_run(mf_expert_store *st, const struct opts *o, enum mf_io_mode mode,
                         int workers, int small_align, const int *ids,
                         enum mf_io_mode *in_effect) {
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    p.mode = mode;
    p.n_workers = workers;
    p.n_slots = o->slots ? o->slots : 2 * o->depth;
    if (small_align) {
        p.alloc_fn = offset_alloc;
        p.free_fn = offset_free;
    }
    mf_expert_reader *r = NULL;
    char err[512];
    if (mf_expert_reader_new(&r, st, &p, err, sizeof err) != MF_OK) {
        fprintf(stderr, "reader: %s\n", err);
        return -1;
    }
    struct mf_expert_reader_stats s;
    mf_expert_reader_stats(r, &s);
    *in_effect = s.mode;
    double dt = 0;
    int bad = 0;
    for (int pass = 0; pass < 2 && !bad; pass++) {
        const int *seq = pass ? ids + N_WARM : ids;
        int n = pass ? N_READS : N_WARM, next = 0, done = 0;
        double t0 = now_s();
        while (done < n && !bad) {
            int t;
            const void *data;
            if (next < n && next - done < o->depth) {
                bad = mf_expert_reader_submit(r, 1, seq[next++], &t, err, sizeof err) !=
                      MF_OK;
                continue;
            }
            bad = mf_expert_reader_wait_any(r, &t, &data, err, sizeof err) != MF_OK;
            mf_expert_reader_release(r, t);
            done++;
        }
        dt = now_s() - t0;
    }
    mf_expert_reader_free(r);
    if (bad)
        fprintf(stderr, "read: %s\n", err);
    return bad ? -1 : (double)N_READS * (double)o->expert_size / dt / 1e9;
}

/* ==== Limits ==== */

// One thread's memcpy of N_READS expert-sized blocks at random places of a buffer
// larger than the last-level cache.
static double memcpy_limit(const struct opts *o, const int *ids) {
    size_t big = (size_t)256 << 20, es = (size_t)o->expert_size;
    size_t n_blk = big / es;
    uint8_t *src = malloc(big), *dst = malloc(es);
    if (!src || !dst || n_blk < 2) {
        free(src);
        free(dst);
        return -1;
    }
    memset(src, 1, big);
    memset(dst, 0, es);
    double t0 = now_s();
    for (int i = 0; i < N_READS; i++)
        memcpy(dst, src + (size_t)ids[N_WARM + i] % n_blk * es, es);
    double dt = now_s() - t0;
    volatile uint8_t sink = dst[es / 2];
    (void)sink;
    free(src);
    free(dst);
    return (double)N_READS * (double)es / dt / 1e9;
}

struct plain_job {
    const mf_expert_store *st;
    const int *ids;
    int first, step;
    size_t bytes;
    void *buf;              // 2 MiB-aligned, faulted in before the clock starts
    int bad;
};

static void *plain_main(void *arg) {
    struct plain_job *j = arg;
    char err[256];
    for (int i = j->first; i < N_READS && !j->bad; i += j->step)
        j->bad = mf_expert_store_read(j->st, 1, j->ids[i], j->buf, j->bytes, err,
                                      sizeof err);
    return NULL;
}

// Synchronous pread of the same sequence by `depth` plain threads (today's moe.c path).
static double plain_limit(const mf_expert_store *st, const struct opts *o, const int *ids) {
    pthread_t th[64];
    struct plain_job jobs[64];
    int n = o->depth < 64 ? o->depth : 64, bad = 0, started = 0;
    for (int i = 0; i < n; i++) {
        jobs[i] = (struct plain_job){st, ids + N_WARM, i, n, (size_t)o->expert_size, NULL, 0};
        bad |= posix_memalign(&jobs[i].buf, 2u << 20, jobs[i].bytes) != 0;
        if (!bad)
            memset(jobs[i].buf, 0, jobs[i].bytes);
    }
    double t0 = now_s();
    for (int i = 0; i < n && !bad; i++) {
        bad = pthread_create(&th[i], NULL, plain_main, &jobs[i]) != 0;
        started += !bad;
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        bad |= jobs[i].bad;
    }
    double dt = now_s() - t0;
    for (int i = 0; i < n; i++)
        free(jobs[i].buf);
    return bad ? -1 : (double)N_READS * (double)o->expert_size / dt / 1e9;
}

struct seq_job {
    int fd, first, step;
    uint64_t total, got;
};

static void *seq_main(void *arg) {
    struct seq_job *j = arg;
    size_t chunk = (size_t)8 << 20;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, chunk) != 0)
        return NULL;
    for (uint64_t off = (uint64_t)j->first * chunk; off < j->total;
         off += (uint64_t)j->step * chunk) {
        ssize_t r = pread(j->fd, buf, chunk, (off_t)off);
        if (r <= 0)
            break;
        j->got += (uint64_t)r;
    }
    free(buf);
    return NULL;
}

// The whole layer file in 8 MiB O_DIRECT requests, `depth` threads interleaved: the
// device's rate for large requests at the reader's queue depth.
static double direct_limit(const struct opts *o) {
    char path[600];
    snprintf(path, sizeof path, "%s/layer_01.bin", o->dir);
#if defined(O_DIRECT)
    int fd = open(path, O_RDONLY | O_DIRECT);
#else
    int fd = -1;
#endif
    if (fd < 0)
        return -1;
    pthread_t th[64];
    struct seq_job jobs[64];
    int n = o->depth < 64 ? o->depth : 64, started = 0;
    uint64_t total = (uint64_t)o->n_experts * o->expert_size, got = 0;
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        jobs[i] = (struct seq_job){fd, i, n, total, 0};
        started += pthread_create(&th[i], NULL, seq_main, &jobs[i]) == 0;
        if (started <= i)
            break;
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        got += jobs[i].got;
    }
    double dt = now_s() - t0;
    close(fd);
    return got == total ? (double)got / dt / 1e9 : -1;
}

/* ==== Report ==== */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Median, min, max of v[n] (sorted in place).
static void summary(double *v, int n, double *med, double *lo, double *hi) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    *lo = v[0];
    *hi = v[n - 1];
    *med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct config {
    const char *label;
    enum mf_io_mode mode;
    int workers, small_align, limit;   // limit: 0 memcpy, 1 plain pread, 2 direct seq
    double v[MAX_REPS];
    enum mf_io_mode in_effect;
};

static const char *const limit_names[3] = {"memcpy", "plain pread", "8 MiB O_DIRECT"};

static int parse(int argc, char **argv, struct opts *o) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--expert-size"))
            o->expert_size = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--experts"))
            o->n_experts = atoi(v);
        else if (!strcmp(k, "--depth"))
            o->depth = atoi(v);
        else if (!strcmp(k, "--reps"))
            o->reps = atoi(v);
        else if (!strcmp(k, "--slots"))
            o->slots = atoi(v);
        else if (!strcmp(k, "--dir"))
            o->dir = v;
        else
            return -1;
    }
    return o->slots >= 0 && o->expert_size >= 4096 && o->n_experts >= N_WARM + N_READS && o->depth >= 1 &&
                   o->depth <= 64 && o->reps >= 1 && o->reps <= MAX_REPS
               ? 0 : -1;
}

static int n_configs(struct config *c) {
    static const int workers[5] = {1, 2, 4, 8, 16};
    static const enum mf_io_mode modes[3] = {MF_IO_PREAD, MF_IO_MMAP, MF_IO_DIRECT};
    int n = 0;
    for (int m = 0; m < 3; m++)
        for (int w = 0; w < 5; w++)
            c[n++] = (struct config){mf_io_mode_name(modes[m]), modes[m], workers[w], 0,
                                     m == 2 ? 2 : 1, {0}, MF_IO_AUTO};
    c[n++] = (struct config){"pread 4K-aligned slots", MF_IO_PREAD, 8, 1, 1, {0}, MF_IO_AUTO};
    return n;
}

static void report(const struct opts *o, struct config *c, int nc, double lim[3][MAX_REPS]) {
    double med[3], lo, hi;
    printf("\nexpert_size %llu bytes, %d experts, %d distinct random reads per run, depth "
           "%d, %d reps (median, min-max)\n\n", (unsigned long long)o->expert_size,
           o->n_experts, N_READS, o->depth, o->reps);
    printf("| limit | GB/s | min-max |\n|---|---|---|\n");
    for (int k = 0; k < 3; k++) {
        summary(lim[k], o->reps, &med[k], &lo, &hi);
        printf("| %s | %.2f | %.2f-%.2f |\n", limit_names[k], med[k], lo, hi);
    }
    printf("\n| mode | workers | GB/s | min-max | / memcpy | / %s |\n|---|---|---|---|---|---|\n",
           "plain pread or 8 MiB O_DIRECT");
    for (int i = 0; i < nc; i++) {
        double m;
        summary(c[i].v, o->reps, &m, &lo, &hi);
        printf("| %s%s | %d | %.2f | %.2f-%.2f | %.2f | %.2f (%s) |\n", c[i].label,
               c[i].in_effect != c[i].mode ? " (fell back)" : "", c[i].workers, m, lo, hi,
               m / med[0], m / med[c[i].limit], limit_names[c[i].limit]);
    }
}

int main(int argc, char **argv) {
    struct opts o = {1769472, 256, 8, 5, 0, NULL};
    if (parse(argc, argv, &o) != 0) {
        fprintf(stderr, "usage: bench_reader [--expert-size B (>= 4096)] [--experts N (>= %d)]"
                        " [--depth D (1-64)] [--reps R (1-%d)] [--slots S] [--dir DIR]\n", N_WARM + N_READS,
                MAX_REPS);
        return 2;
    }
    char dir[512];
    const char *base = o.dir ? o.dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(dir, sizeof dir, "%s/mf_bench_reader_XXXXXX", base);
    if (!mkdtemp(dir)) {
        fprintf(stderr, "mkdtemp %s: %s\n", dir, strerror(errno));
        return 1;
    }
    o.dir = dir;
    static const uint8_t is_moe[2] = {0, 1};
    mf_expert_store *st = NULL;
    char err[600];
    int rc = write_files(&o) == 0 ? MF_OK : MF_ERR_IO;
    if (rc == MF_OK)
        rc = mf_expert_store_open(&st, dir, 2, is_moe, err, sizeof err);
    else
        snprintf(err, sizeof err, "cannot write the model files in %s", dir);
    static struct config c[32];
    static double lim[3][MAX_REPS];
    int nc = n_configs(c), ids[N_WARM + N_READS];
    for (int rep = 0; rc == MF_OK && rep < o.reps; rep++) {
        pick(ids, o.n_experts, 0x9e3779b97f4a7c15ull * (uint64_t)(rep + 1));
        lim[0][rep] = memcpy_limit(&o, ids);
        lim[1][rep] = plain_limit(st, &o, ids);   // also warms the page cache
        lim[2][rep] = direct_limit(&o);
        for (int i = 0; i < nc; i++)
            c[i].v[rep] = reader_run(st, &o, c[i].mode, c[i].workers, c[i].small_align, ids,
                                     &c[i].in_effect);
    }
    if (rc == MF_OK)
        report(&o, c, nc, lim);
    else
        fprintf(stderr, "bench_reader: %s\n", err);
    mf_expert_store_close(st);
    remove_files(&o);
    rmdir(dir);
    return rc == MF_OK ? 0 : 1;
}
