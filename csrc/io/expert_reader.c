/*
 * expert_reader.c — a context's asynchronous expert reads (expert_reader.h).
 *
 * One mutex guards everything shared with the workers: slot states, tickets, the two
 * job queues (demand reads first, then prefetches), the LFRU policy and the counters.
 * A worker pops a slot to load, does the read or pre-fault with the lock released
 * (the slot is pinned, so nobody else touches its buffer), then publishes the result
 * and wakes the consumer. Errors travel in the slot (status + message) to every
 * ticket on it and are reported by wait; a failed slot forgets its key once no ticket
 * holds it, so asking again retries the read.
 */
#include "io/expert_reader.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/expert_cache.h"

#define ERR_LEN 320
#define DIRECT_ALIGN 4096
#define HUGE_ALIGN ((size_t)2 << 20)
#if defined(__APPLE__)
// Apple Silicon pages are 16 KiB: slots on page boundaries can be wrapped as Metal
// buffers without a copy (newBufferWithBytesNoCopy wants page-aligned memory).
#define SLOT_ALIGN 16384
#else
#define SLOT_ALIGN DIRECT_ALIGN
#endif
#define MAX_WORKERS 256

enum slot_state { S_EMPTY, S_QUEUED, S_LOADING, S_READY, S_FAILED };
enum ticket_state { T_FREE, T_PENDING, T_TAKEN };

struct slot {
    uint8_t *buf;           // slot_bytes, NULL in mmap mode
    const void *data;       // the expert's bytes when S_READY
    enum slot_state state;
    int il, ie;             // key being loaded / held
    int status;             // of the last load
    int n_tickets;          // live tickets on this slot
    int prefetched;         // loaded by a prefetch, not yet claimed by a submit
    char *err;              // [ERR_LEN] message of a failed load
};

struct ticket {
    enum ticket_state state;
    int slot;               // -1: refused at submit (status and err below)
    int il, ie;
    int status;
    uint64_t seq;           // submission order, for wait_any
    char *err;              // [ERR_LEN]
};

struct queue {
    int *items;             // [cap] slot ids
    int head, n, cap;
};

struct mf_expert_reader {
    mf_expert_store *st;
    enum mf_io_mode mode;
    int pinned;                      // holds one mf_expert_store_pin count
    uint64_t expert_bytes;
    size_t slot_bytes;
    int n_slots, n_tickets, n_workers, n_started;
    int keep_released;               // cache on: released slots keep their expert
    int ticket_hi;                   // tickets in use all lie below this (scans stop)
    struct slot *slots;
    struct ticket *tickets;
    char *errs;                      // [(n_slots + n_tickets) * ERR_LEN]
    mf_expert_cache *cache;
    struct queue demand, prefetch;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;          // workers wait here for a job or stop
    pthread_cond_t done_cv;          // the consumer waits here for a finished load
    int sync_ok;                     // mu and both cvs initialised
    int stop;
    uint64_t seq;
    void *(*alloc_fn)(void *, size_t);
    void (*free_fn)(void *, void *);
    void *alloc_user;
    struct mf_expert_reader_stats stats;
};

/* ==== Modes ==== */

// Measured (bench/RESULTS.md, streaming section; 2-vCPU virtio machine): with the
// experts in the page cache, mmap decodes with no copy (warm decode 0.81 of the
// memory bound against pread's 0.43 and direct's 0.32, which rereads the disk); cold,
// direct beat pread (0.95 against 0.71 of the disk bound: a buffered miss also pays
// the page-cache insertion). With the page cache holding only a quarter to a half of
// the experts (RAM held by the bench, session 6), pread and mmap decode level and
// direct 20-35 % slower, as the part still cached goes unused; so beyond 0.75 x RAM
// the rule keeps the reference system's pread, one of the two best there.
enum mf_io_mode mf_io_auto_mode(uint64_t expert_bytes, uint64_t ram_bytes) {
    // ram / 4 * 3 cannot overflow, unlike ram * 3 / 4.
    return ram_bytes == 0 || expert_bytes > ram_bytes / 4 * 3 ? MF_IO_PREAD : MF_IO_MMAP;
}

static const char *const mode_names[4] = {"auto", "pread", "mmap", "direct"};

int mf_io_mode_parse(const char *s, enum mf_io_mode *out) {
    for (int m = 0; s && m < 4; m++)
        if (strcmp(s, mode_names[m]) == 0) {
            *out = (enum mf_io_mode)m;
            return 0;
        }
    return -1;
}

const char *mf_io_mode_name(enum mf_io_mode m) {
    return (int)m >= 0 && (int)m < 4 ? mode_names[m] : "?";
}

uint64_t mf_io_physical_ram(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (uint64_t)pages * (uint64_t)size : 0;
}

struct mf_expert_reader_params mf_expert_reader_default_params(void) {
    struct mf_expert_reader_params p = {0};
    p.n_workers = MF_EXPERT_READER_WORKERS;
    p.n_slots = 16;
    p.mode = MF_IO_AUTO;
    return p;
}

/* ==== Queues and time ==== */

static void queue_push(struct queue *q, int s) {
    // Each slot is queued at most once at a time and cap = n_slots: never full.
    q->items[(q->head + q->n++) % q->cap] = s;
}

static int queue_pop(struct queue *q) {
    int s = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->n--;
    return s;
}

// Take slot s out of q if queued there; 1 if it was.
static int queue_remove(struct queue *q, int s) {
    int found = 0, n = q->n;
    for (int i = 0; i < n; i++) {
        int x = queue_pop(q);
        if (x == s && !found)
            found = 1;
        else
            queue_push(q, x);
    }
    return found;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ==== Workers ==== */

// The I/O of one slot, lock released. Returns the status; *data the bytes.
static int load(mf_expert_reader *r, struct slot *sl, int il, int ie, const void **data,
                char *err) {
    *data = NULL;
    int rc;
    if (r->mode == MF_IO_MMAP)
        return mf_expert_store_prefault(r->st, il, ie, data, err, ERR_LEN);
    if (r->mode == MF_IO_DIRECT)
        rc = mf_expert_store_read_direct(r->st, il, ie, sl->buf, err, ERR_LEN);
    else
        rc = mf_expert_store_read(r->st, il, ie, sl->buf, r->slot_bytes, err, ERR_LEN);
    if (rc == MF_OK)
        *data = sl->buf;
    return rc;
}

// A failed slot nobody holds forgets its key, so the next submit reads again.
static void forget_if_failed(mf_expert_reader *r, int s) {
    struct slot *sl = &r->slots[s];
    if (sl->state == S_FAILED && sl->n_tickets == 0) {
        mf_expert_cache_remove(r->cache, s);
        sl->state = S_EMPTY;
        sl->prefetched = 0;
    }
}

static void finish(mf_expert_reader *r, int s, int rc, const void *data, const char *err) {
    struct slot *sl = &r->slots[s];
    sl->status = rc;
    sl->data = data;
    sl->state = rc == MF_OK ? S_READY : S_FAILED;
    if (rc != MF_OK) {
        snprintf(sl->err, ERR_LEN, "%s", err);
    } else if (r->mode != MF_IO_MMAP) {
        r->stats.reads++;
        r->stats.bytes_disk += (int64_t)r->expert_bytes;
    }
    mf_expert_cache_unpin(r->cache, s);   // the load's own pin
    forget_if_failed(r, s);
    pthread_cond_broadcast(&r->done_cv);
}

static void *worker_main(void *arg) {
    mf_expert_reader *r = arg;
    char err[ERR_LEN];
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        struct queue *q = r->demand.n ? &r->demand : r->prefetch.n ? &r->prefetch : NULL;
        if (!q) {
            pthread_cond_wait(&r->work_cv, &r->mu);
            continue;
        }
        int s = queue_pop(q);
        struct slot *sl = &r->slots[s];
        int il = sl->il, ie = sl->ie;
        sl->state = S_LOADING;
        pthread_mutex_unlock(&r->mu);
        const void *data;
        err[0] = '\0';
        int rc = load(r, sl, il, ie, &data, err);
        pthread_mutex_lock(&r->mu);
        finish(r, s, rc, data, err);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ==== Construction ==== */

static void *default_alloc(void *user, size_t bytes) {
    (void)user;
    void *p = NULL;
    size_t align = bytes >= HUGE_ALIGN ? HUGE_ALIGN : SLOT_ALIGN;
    return posix_memalign(&p, align, bytes) == 0 ? p : NULL;
}

static void default_free(void *user, void *p) {
    (void)user;
    free(p);
}

static void stop_workers(mf_expert_reader *r) {
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->work_cv);
    pthread_mutex_unlock(&r->mu);
    for (int i = 0; i < r->n_started; i++)
        pthread_join(r->threads[i], NULL);
    r->n_started = 0;
}

void mf_expert_reader_free(mf_expert_reader *r) {
    if (!r)
        return;
    if (r->sync_ok) {
        stop_workers(r);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->work_cv);
        pthread_cond_destroy(&r->done_cv);
    }
    for (int s = 0; r->slots && s < r->n_slots; s++)
        if (r->slots[s].buf)
            r->free_fn(r->alloc_user, r->slots[s].buf);
    free(r->slots);
    free(r->tickets);
    free(r->errs);
    free(r->demand.items);
    free(r->prefetch.items);
    free(r->threads);
    mf_expert_cache_free(r->cache);
    if (r->pinned)
        mf_expert_store_unpin(r->st);
    free(r);
}

// The requested mode: MOEFLUX_IO over params.mode.
static int requested_mode(mf_expert_reader *r, enum mf_io_mode pm, enum mf_io_mode *m,
                          char *err, size_t errlen) {
    const char *env = getenv("MOEFLUX_IO");
    *m = pm;
    if (env && *env) {
        if (mf_io_mode_parse(env, m) != 0)
            return mf_err(err, errlen, MF_ERR_ARG,
                          "MOEFLUX_IO=\"%.64s\": expected pread, mmap, direct or auto", env);
        snprintf(r->stats.mode_note, sizeof r->stats.mode_note, "MOEFLUX_IO=%s; ", env);
    } else if ((int)pm < 0 || (int)pm > 3) {
        return mf_err(err, errlen, MF_ERR_ARG, "expert reader: unknown I/O mode %d",
                      (int)pm);
    }
    return MF_OK;
}

// Append to the mode note.
static void note(mf_expert_reader *r, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void note(mf_expert_reader *r, const char *fmt, ...) {
    size_t n = strlen(r->stats.mode_note);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->stats.mode_note + n, sizeof r->stats.mode_note - n, fmt, ap);
    va_end(ap);
}

// mmap for a device: page-lock the mappings (counted in the store); where that fails,
// pread into pinned slots for an automatic choice, plain mmap for an explicit one.
static enum mf_io_mode pin_mappings(mf_expert_reader *r,
                                    const struct mf_expert_reader_params *p, int automatic) {
    char why[320];
    if (mf_expert_store_pin(r->st, &p->pin, why, sizeof why) == MF_OK) {
        r->pinned = 1;
        r->stats.pinned = 1;
        return MF_IO_MMAP;
    }
    note(r, "page-locking failed, %s: %s; ", automatic ? "using pread" : "plain mmap", why);
    return automatic ? MF_IO_PREAD : MF_IO_MMAP;
}

static int choose_mode(mf_expert_reader *r, const struct mf_expert_reader_params *p,
                       char *err, size_t errlen) {
    enum mf_io_mode m;
    int rc = requested_mode(r, p->mode, &m, err, errlen);
    if (rc != MF_OK)
        return rc;
    const int automatic = m == MF_IO_AUTO;
    if (m == MF_IO_AUTO && p->to_device) {
        uint64_t ram = p->ram_bytes ? p->ram_bytes : mf_io_physical_ram();
        uint64_t tot = mf_expert_store_total_bytes(r->st);
        m = p->pin.pin && tot <= ram / 2 ? MF_IO_MMAP : MF_IO_PREAD;
        if (m == MF_IO_MMAP)
            note(r, "auto: mmap page-locked for the device's copies (experts %.2f GiB <= "
                 "0.5 x RAM %.2f GiB); ", (double)tot / (1 << 30),
                 (double)ram / (1 << 30) * 0.5);
        else
            note(r, "auto: pread (the experts are copied to the device from the slots); ");
    }
    if (m == MF_IO_AUTO) {
        uint64_t ram = p->ram_bytes ? p->ram_bytes : mf_io_physical_ram();
        uint64_t tot = mf_expert_store_total_bytes(r->st);
        m = mf_io_auto_mode(tot, ram);
        note(r, "auto: %s (experts %.2f GiB vs 0.75 x RAM %.2f GiB); ", mf_io_mode_name(m),
             (double)tot / (1 << 30), (double)ram / (1 << 30) * 0.75);
    }
    if (m == MF_IO_DIRECT) {
        char why[256] = "";
        if (mf_expert_store_open_direct(r->st, why, sizeof why) != MF_OK) {
            note(r, "direct unavailable, using pread: %s; ", why);
            m = MF_IO_PREAD;
        }
    }
    if (m == MF_IO_MMAP && (rc = mf_expert_store_map(r->st, err, errlen)) != MF_OK)
        return rc;
    if (m == MF_IO_MMAP && p->to_device && p->pin.pin)
        m = pin_mappings(r, p, automatic);
    r->mode = m;
    note(r, "mode %s", mf_io_mode_name(m));
    return MF_OK;
}

static int make_slots(mf_expert_reader *r, char *err, size_t errlen) {
    int misaligned = 0;
    for (int s = 0; s < r->n_slots; s++) {
        r->slots[s].err = r->errs + (size_t)s * ERR_LEN;
        r->slots[s].state = S_EMPTY;
        if (r->mode == MF_IO_MMAP)
            continue;
        r->slots[s].buf = r->alloc_fn(r->alloc_user, r->slot_bytes);
        if (!r->slots[s].buf)
            return mf_err(err, errlen, MF_ERR_NOMEM,
                          "expert reader: out of memory for slot %d of %d (%zu bytes each)",
                          s, r->n_slots, r->slot_bytes);
        misaligned |= ((uintptr_t)r->slots[s].buf % DIRECT_ALIGN) != 0;
    }
    if (misaligned && r->mode == MF_IO_DIRECT) {
        r->mode = MF_IO_PREAD;
        note(r, "; slots from alloc_fn are not %d-byte aligned: using pread",
             DIRECT_ALIGN);
    }
    return MF_OK;
}

static int alloc_tables(mf_expert_reader *r, const mf_expert_store *st, char *err,
                        size_t errlen) {
    const struct mf_expert_layout *L = mf_expert_store_layout(st);
    size_t ns = (size_t)r->n_slots, nt = (size_t)r->n_tickets;
    r->slots = calloc(ns, sizeof *r->slots);
    r->tickets = calloc(nt, sizeof *r->tickets);
    r->errs = calloc(ns + nt, ERR_LEN);
    r->demand.items = malloc(ns * sizeof(int));
    r->prefetch.items = malloc(ns * sizeof(int));
    r->threads = calloc((size_t)r->n_workers, sizeof *r->threads);
    if (!r->slots || !r->tickets || !r->errs || !r->demand.items || !r->prefetch.items ||
        !r->threads)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert reader: out of memory");
    r->demand.cap = r->prefetch.cap = r->n_slots;
    for (size_t t = 0; t < nt; t++)
        r->tickets[t].err = r->errs + (ns + t) * ERR_LEN;
    return mf_expert_cache_new(&r->cache, L->num_layers, L->num_experts, r->n_slots, err,
                               errlen);
}

static int init_sync(mf_expert_reader *r, char *err, size_t errlen) {
    if (pthread_mutex_init(&r->mu, NULL) != 0)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert reader: cannot make a mutex");
    if (pthread_cond_init(&r->work_cv, NULL) != 0) {
        pthread_mutex_destroy(&r->mu);
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert reader: cannot make a condvar");
    }
    if (pthread_cond_init(&r->done_cv, NULL) != 0) {
        pthread_cond_destroy(&r->work_cv);
        pthread_mutex_destroy(&r->mu);
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert reader: cannot make a condvar");
    }
    r->sync_ok = 1;
    return MF_OK;
}

static int start_workers(mf_expert_reader *r, char *err, size_t errlen) {
    for (int i = 0; i < r->n_workers; i++) {
        int e = pthread_create(&r->threads[i], NULL, worker_main, r);
        if (e != 0)
            return mf_err(err, errlen, MF_ERR_BACKEND,
                          "expert reader: cannot start I/O thread %d of %d: %s", i,
                          r->n_workers, strerror(e));
        r->n_started++;
    }
    return MF_OK;
}

static int check_params(const struct mf_expert_reader_params *p, uint64_t slot_bytes,
                        char *err, size_t errlen) {
    if (p->n_workers < 1 || p->n_workers > MAX_WORKERS || p->n_slots < 1 ||
        p->n_slots > (1 << 20) || !p->alloc_fn != !p->free_fn)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert reader: n_workers %d (1..%d), n_slots %d (1..2^20), alloc_fn "
                      "and free_fn both or neither", p->n_workers, MAX_WORKERS, p->n_slots);
    if (p->cache_bytes / slot_bytes > (uint64_t)(1 << 20))
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert reader: cache_bytes %llu is over 2^20 slots of %llu bytes",
                      (unsigned long long)p->cache_bytes, (unsigned long long)slot_bytes);
    return MF_OK;
}

int mf_expert_reader_new(mf_expert_reader **out, mf_expert_store *st,
                         const struct mf_expert_reader_params *p, char *err,
                         size_t errlen) {
    *out = NULL;
    if (!st || !p)
        return mf_err(err, errlen, MF_ERR_ARG, "expert reader: NULL store or params");
    uint64_t es = mf_expert_store_layout(st)->expert_size;
    uint64_t sb = (es + DIRECT_ALIGN - 1) / DIRECT_ALIGN * DIRECT_ALIGN;
    int rc = check_params(p, sb, err, errlen);
    if (rc != MF_OK)
        return rc;
    mf_expert_reader *r = calloc(1, sizeof *r);
    if (!r)
        return mf_err(err, errlen, MF_ERR_NOMEM, "expert reader: out of memory");
    r->st = st;
    r->expert_bytes = es;
    r->slot_bytes = (size_t)sb;
    r->n_slots = p->n_slots + (int)(p->cache_bytes / sb);
    r->keep_released = r->n_slots > p->n_slots;
    r->n_tickets = 2 * r->n_slots;   // the same expert may be held twice
    r->n_workers = p->n_workers;
    r->alloc_fn = p->alloc_fn ? p->alloc_fn : default_alloc;
    r->free_fn = p->free_fn ? p->free_fn : default_free;
    r->alloc_user = p->alloc_user;
    rc = choose_mode(r, p, err, errlen);
    if (rc == MF_OK)
        rc = alloc_tables(r, st, err, errlen);
    if (rc == MF_OK)
        rc = make_slots(r, err, errlen);
    if (rc == MF_OK)
        rc = init_sync(r, err, errlen);
    if (rc == MF_OK)
        rc = start_workers(r, err, errlen);
    if (rc != MF_OK) {
        mf_expert_reader_free(r);
        return rc;
    }
    r->stats.mode = r->mode;
    r->stats.n_slots = r->n_slots;
    r->stats.n_workers = r->n_workers;
    *out = r;
    return MF_OK;
}

/* ==== Submit ==== */

// Slots a demand miss should not take while another is free: prefetched, unclaimed
// experts of the same layer (the rest of this layer's submits are about to hit them).
static void guard_prefetched(mf_expert_reader *r, int il, int on) {
    for (int s = 0; s < r->n_slots; s++) {
        struct slot *sl = &r->slots[s];
        if (sl->prefetched && sl->il == il && sl->state == S_READY) {
            if (on)
                mf_expert_cache_pin(r->cache, s);
            else
                mf_expert_cache_unpin(r->cache, s);
        }
    }
}

// A slot pinned by a load but by no ticket: it frees itself when the read ends.
static int load_only_pins(const mf_expert_reader *r) {
    for (int s = 0; s < r->n_slots; s++)
        if (r->slots[s].n_tickets == 0 && mf_expert_cache_pins(r->cache, s) > 0)
            return 1;
    return 0;
}

// Queue a load of (il, ie) into slot s (already holding the key in the policy). In
// mmap mode an expert whose pages are all in the page cache is ready at once: waking
// an I/O thread to pre-fault it cost ~50 us per expert on a 2-vCPU machine (the woken
// thread takes the submitter's CPU), more than the expert's compute saves.
static void start_load(mf_expert_reader *r, int s, int il, int ie, int is_prefetch) {
    struct slot *sl = &r->slots[s];
    sl->state = S_QUEUED;
    sl->il = il;
    sl->ie = ie;
    sl->data = NULL;
    sl->prefetched = is_prefetch;
    const void *data;
    if (r->mode == MF_IO_MMAP && mf_expert_store_resident(r->st, il, ie, &data)) {
        sl->status = MF_OK;
        sl->data = data;
        sl->state = S_READY;
        r->stats.resident++;
        return;
    }
    mf_expert_cache_pin(r->cache, s);   // released by finish()
    queue_push(is_prefetch ? &r->prefetch : &r->demand, s);
    pthread_cond_signal(&r->work_cv);
}

// The slot for a demand submit: a hit, or a victim loaded anew; -1 when every slot is
// pinned by tickets. May wait (lock held by the caller) for a prefetch read to end.
static int claim_slot(mf_expert_reader *r, int il, int ie) {
    for (;;) {
        int s = mf_expert_cache_find(r->cache, il, ie);
        if (s >= 0) {
            mf_expert_cache_lookup(r->cache, il, ie);
            r->stats.hits++;
            r->stats.prefetch_hits += r->slots[s].prefetched;
            r->slots[s].prefetched = 0;
            // Wanted now: a prefetch not yet started moves ahead of other prefetches.
            if (r->slots[s].state == S_QUEUED && queue_remove(&r->prefetch, s))
                queue_push(&r->demand, s);
            if (r->mode != MF_IO_MMAP)
                r->stats.bytes_cache += (int64_t)r->expert_bytes;
            return s;
        }
        guard_prefetched(r, il, 1);
        int v = mf_expert_cache_victim(r->cache);
        guard_prefetched(r, il, 0);
        if (v < 0)
            v = mf_expert_cache_victim(r->cache);
        if (v >= 0) {
            mf_expert_cache_lookup(r->cache, il, ie);   // the miss: ticks the clock
            r->stats.misses++;
            // Emptied, v is the slot insert takes: were there an empty unpinned slot
            // of lower index, victim() would have returned it (the guard pins only
            // occupied slots).
            mf_expert_cache_remove(r->cache, v);
            s = mf_expert_cache_insert(r->cache, il, ie);
            start_load(r, s, il, ie, 0);
            return s;
        }
        if (!load_only_pins(r))
            return -1;
        double t0 = now_s();
        pthread_cond_wait(&r->done_cv, &r->mu);
        r->stats.wait_s += now_s() - t0;
    }
}

// The lowest free ticket (so live ones stay below ticket_hi, and scans stay short
// even when a large cache makes n_tickets large); -1 if none.
static int free_ticket(mf_expert_reader *r) {
    for (int t = 0; t < r->n_tickets; t++)
        if (r->tickets[t].state == T_FREE) {
            r->ticket_hi = t + 1 > r->ticket_hi ? t + 1 : r->ticket_hi;
            return t;
        }
    return -1;
}

// Bind free ticket t to (il, ie): bad ids (and, in mmap mode, a file now too short)
// make a ticket that carries its error; otherwise it pins the expert's slot. Returns
// -1, leaving the ticket free, when no slot can be had.
static int bind_ticket(mf_expert_reader *r, int t, int il, int ie) {
    struct ticket *tk = &r->tickets[t];
    tk->status = mf_expert_store_check(r->st, il, ie, tk->err, ERR_LEN);
    // mmap: a hit hands out the mapping without a worker's pre-fault (which checks
    // too), so the file's size is checked here on every submit.
    if (tk->status == MF_OK && r->mode == MF_IO_MMAP)
        tk->status = mf_expert_store_check_size(r->st, il, ie, tk->err, ERR_LEN);
    tk->slot = tk->status == MF_OK ? claim_slot(r, il, ie) : -1;
    if (tk->status == MF_OK && tk->slot < 0)
        return -1;
    tk->state = T_PENDING;
    tk->il = il;
    tk->ie = ie;
    tk->seq = r->seq++;
    if (tk->slot >= 0) {
        r->slots[tk->slot].n_tickets++;
        mf_expert_cache_pin(r->cache, tk->slot);
    }
    if (r->mode == MF_IO_MMAP && tk->status == MF_OK)
        r->stats.bytes_mmap += (int64_t)r->expert_bytes;
    return 0;
}

int mf_expert_reader_submit(mf_expert_reader *r, int il, int ie, int *ticket, char *err,
                            size_t errlen) {
    if (!r || !ticket)
        return mf_err(err, errlen, MF_ERR_ARG, "expert reader: NULL reader or ticket");
    pthread_mutex_lock(&r->mu);
    int t = free_ticket(r);
    if (t >= 0 && bind_ticket(r, t, il, ie) != 0)
        t = -1;
    *ticket = t;
    pthread_mutex_unlock(&r->mu);
    if (t < 0)
        return mf_err(err, errlen, MF_EXPERT_READER_FULL,
                      "expert reader: all %d slots (or %d tickets) are held by unreleased "
                      "tickets", r->n_slots, r->n_tickets);
    return MF_OK;
}

/* ==== Wait and release ==== */

static int ticket_done(const mf_expert_reader *r, const struct ticket *tk) {
    if (tk->slot < 0)
        return 1;
    enum slot_state st = r->slots[tk->slot].state;
    return st == S_READY || st == S_FAILED;
}

// Hand a completed ticket's result over (lock held).
static int take(mf_expert_reader *r, int t, const void **data, char *err, size_t errlen) {
    struct ticket *tk = &r->tickets[t];
    tk->state = T_TAKEN;
    if (tk->slot >= 0) {
        const struct slot *sl = &r->slots[tk->slot];
        tk->status = sl->status;
        if (sl->status != MF_OK)
            snprintf(tk->err, ERR_LEN, "%s", sl->err);
        *data = sl->status == MF_OK ? sl->data : NULL;
    }
    if (tk->status != MF_OK) {
        mf_err(err, errlen, tk->status, "%s", tk->err);
        r->stats.errors++;
    }
    return tk->status;
}

int mf_expert_reader_wait(mf_expert_reader *r, int ticket, const void **data, char *err,
                          size_t errlen) {
    *data = NULL;
    pthread_mutex_lock(&r->mu);
    if (ticket < 0 || ticket >= r->n_tickets || r->tickets[ticket].state != T_PENDING) {
        pthread_mutex_unlock(&r->mu);
        return mf_err(err, errlen, MF_ERR_ARG,
                      "expert reader: ticket %d is not submitted and unwaited", ticket);
    }
    double t0 = now_s();
    while (!ticket_done(r, &r->tickets[ticket]))
        pthread_cond_wait(&r->done_cv, &r->mu);
    r->stats.wait_s += now_s() - t0;
    int rc = take(r, ticket, data, err, errlen);
    pthread_mutex_unlock(&r->mu);
    return rc;
}

// The earliest-submitted complete pending ticket; -1 if none, and *pending whether any
// ticket is pending at all.
static int first_done(const mf_expert_reader *r, int *pending) {
    int best = -1;
    *pending = 0;
    for (int t = 0; t < r->ticket_hi; t++) {
        const struct ticket *tk = &r->tickets[t];
        if (tk->state != T_PENDING)
            continue;
        *pending = 1;
        if (ticket_done(r, tk) && (best < 0 || tk->seq < r->tickets[best].seq))
            best = t;
    }
    return best;
}

int mf_expert_reader_wait_any(mf_expert_reader *r, int *ticket, const void **data,
                              char *err, size_t errlen) {
    *data = NULL;
    *ticket = -1;
    pthread_mutex_lock(&r->mu);
    double t0 = now_s();
    int pending, t;
    while ((t = first_done(r, &pending)) < 0 && pending)
        pthread_cond_wait(&r->done_cv, &r->mu);
    r->stats.wait_s += now_s() - t0;
    int rc = t < 0 ? mf_err(err, errlen, MF_ERR_STATE,
                            "expert reader: wait_any with no ticket outstanding")
                   : take(r, t, data, err, errlen);
    *ticket = t;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

static void release_locked(mf_expert_reader *r, int t) {
    struct ticket *tk = &r->tickets[t];
    if (tk->state == T_FREE)
        return;
    if (tk->slot >= 0) {
        struct slot *sl = &r->slots[tk->slot];
        sl->n_tickets--;
        mf_expert_cache_unpin(r->cache, tk->slot);
        forget_if_failed(r, tk->slot);
        // Cache off: an idle slot is emptied, and empty slots are reused lowest index
        // first, so reads cycle through as few slots as they need, which stay in the
        // CPU's last-level cache. Measured (bench/bench_reader.c, 1.7 MB experts, 32 MiB
        // L3): with idle slots kept and recycled oldest-first, 16 slots pulled 0.6x
        // the bytes/s of plain pread threads, 8 slots 1.0x.
        if (!r->keep_released && sl->state == S_READY &&
            mf_expert_cache_pins(r->cache, tk->slot) == 0) {
            mf_expert_cache_remove(r->cache, tk->slot);
            sl->state = S_EMPTY;
        }
    }
    tk->state = T_FREE;
    tk->slot = -1;
}

void mf_expert_reader_release(mf_expert_reader *r, int ticket) {
    if (!r || ticket < 0 || ticket >= r->n_tickets)
        return;
    pthread_mutex_lock(&r->mu);
    release_locked(r, ticket);
    pthread_mutex_unlock(&r->mu);
}

// 1 while a load is queued or running (lock held).
static int loads_pending(const mf_expert_reader *r) {
    if (r->demand.n || r->prefetch.n)
        return 1;
    for (int s = 0; s < r->n_slots; s++)
        if (r->slots[s].state == S_LOADING)
            return 1;
    return 0;
}

// An error path's cleanup waits for every load already queued or running (lock
// held). Otherwise the next eval's submit could find such a load still in flight,
// join it and inherit its failure: a transient read error would then fail the retry
// as well, with an error from a read made before the retry began. Loads nobody holds
// a ticket for end up forgotten when they fail (forget_if_failed) or kept like a
// prefetch when they succeed.
static void drain_locked(mf_expert_reader *r) {
    while (!r->stop && loads_pending(r))
        pthread_cond_wait(&r->done_cv, &r->mu);
}

void mf_expert_reader_release_all(mf_expert_reader *r) {
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    for (int t = 0; t < r->ticket_hi; t++)
        release_locked(r, t);
    r->ticket_hi = 0;
    drain_locked(r);
    pthread_mutex_unlock(&r->mu);
}

int mf_expert_reader_ticket_expert(mf_expert_reader *r, int ticket, int *il,
                                   int *ie) {
    if (!r || ticket < 0 || ticket >= r->n_tickets)
        return -1;
    pthread_mutex_lock(&r->mu);
    const struct ticket *tk = &r->tickets[ticket];
    int live = tk->state != T_FREE, l = tk->il, e = tk->ie;
    pthread_mutex_unlock(&r->mu);
    if (!live)
        return -1;
    if (il)
        *il = l;
    if (ie)
        *ie = e;
    return e;
}

int mf_expert_reader_n_tickets(const mf_expert_reader *r) {
    return r->n_tickets;
}

/* ==== Prefetch and stats ==== */

static void prefetch_one(mf_expert_reader *r, int il, int ie) {
    if (mf_expert_store_check(r->st, il, ie, NULL, 0) != MF_OK ||
        mf_expert_cache_find(r->cache, il, ie) >= 0)
        return;
    int s = mf_expert_cache_insert(r->cache, il, ie);
    if (s >= 0) {
        start_load(r, s, il, ie, 1);
        r->stats.prefetch_issued++;
    } else if (r->mode == MF_IO_PREAD) {
        mf_expert_store_hint(r->st, il, ie);
        r->stats.prefetch_hints++;
    }
}

void mf_expert_reader_prefetch(mf_expert_reader *r, int il, const int32_t *ids, int n) {
    if (!r || !ids)
        return;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < n; i++)
        prefetch_one(r, il, ids[i]);
    pthread_mutex_unlock(&r->mu);
}

void mf_expert_reader_stats(mf_expert_reader *r, struct mf_expert_reader_stats *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->stats;
    pthread_mutex_unlock(&r->mu);
}
