/*
 * threadpool.c — the CPU exec's persistent pool (see threadpool.h). Owns the worker
 * threads and the hand-off of one job at a time; knows nothing about ops.
 *
 * A job is published by writing its fields, opening a join window tagged with the job's
 * generation, and bumping an atomic generation that workers spin on for a while (decode
 * runs many short ops back to back, and a futex wake-up per op costs more than the op)
 * before sleeping on a condvar. A worker that sees the new generation joins the job with
 * one CAS on the window, takes task indices from an atomic counter, and leaves. The
 * caller takes tasks too; once every task is handed out it closes the window and waits
 * only for the workers that joined. A worker that was descheduled (other processes on
 * the cores, expert-read threads) never delays an op: it finds the window closed and goes
 * back to waiting. No worker touches the job's arguments (on the caller's stack) after
 * mf_pool_run returns, and the common path takes no lock.
 */
#include "backends/cpu/threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

// How long a worker spins for the next job before sleeping, and how long the caller
// spins for joined workers to finish before sleeping: long enough to bridge consecutive
// ops of a decode step, short enough not to burn a core through longer waits (expert
// reads, the caller's own Python code).
#define WORKER_SPIN_NS 100000
#define CALLER_SPIN_NS 200000

// The join window: generation (low 32 bits) in the high half, then a closed flag and the
// number of workers that joined.
#define WIN_CLOSED (UINT64_C(1) << 31)
#define WIN_COUNT UINT64_C(0x7FFFFFFF)

struct worker {
    struct mf_pool *pool;
    int tid;
};

struct mf_pool {
    int n_threads;
    int n_started;              // workers actually created (for a partial free)
    pthread_t *threads;         // [n_threads]; [0] is unused (the caller)
    struct worker *workers;     // [n_threads]
    pthread_mutex_t mu;
    pthread_cond_t cv_work;     // sleeping workers wait here for a new generation
    pthread_cond_t cv_done;     // a sleeping caller waits here for joined workers
    int sync_ok;                // mutex and condvars initialised
    atomic_uint_fast64_t generation;
    atomic_int stop;
    atomic_int n_sleeping;      // workers blocked (or about to block) on cv_work
    atomic_int caller_sleeping; // the caller is blocked (or about to block) on cv_done
    atomic_uint_fast64_t window;// join window of the current job (see WIN_*)
    atomic_int n_left;          // joined workers that have finished the current job
    // The current job: read only by workers that joined it, while the caller waits.
    mf_pool_fn fn;
    void *arg;
    int n_tasks;
    atomic_int next_task;
    atomic_int busy;            // a job is running: nested runs go inline
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void run_tasks(struct mf_pool *p, int tid) {
    for (;;) {
        int i = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);
        if (i >= p->n_tasks)
            break;
        p->fn(p->arg, i, tid);
    }
}

// Wait until generation != seen (or stop); returns the new generation.
static uint64_t wait_job(struct mf_pool *p, uint64_t seen) {
    uint64_t t0 = 0;
    for (unsigned spin = 0;; spin++) {
        uint64_t g = atomic_load(&p->generation);
        if (g != seen || atomic_load(&p->stop))
            return g;
        cpu_relax();
        if ((spin & 255) == 255) {
            uint64_t t = now_ns();
            if (t0 == 0)
                t0 = t;
            else if (t - t0 > WORKER_SPIN_NS)
                break;
        }
    }
    // Sleep. n_sleeping is raised before re-checking the generation, and the caller
    // bumps the generation before reading n_sleeping (both seq_cst), so a wake-up is
    // never lost: either we see the new job here or the caller sees us and broadcasts.
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->n_sleeping, 1);
    while (!atomic_load(&p->stop) && atomic_load(&p->generation) == seen)
        pthread_cond_wait(&p->cv_work, &p->mu);
    atomic_fetch_sub(&p->n_sleeping, 1);
    pthread_mutex_unlock(&p->mu);
    return atomic_load(&p->generation);
}

// Join job `gen` if its window is still open; 1 if joined.
static int join_job(struct mf_pool *p, uint64_t gen) {
    uint64_t w = atomic_load(&p->window);
    for (;;) {
        if ((w >> 32) != (gen & 0xFFFFFFFFu) || (w & WIN_CLOSED))
            return 0;
        if (atomic_compare_exchange_weak(&p->window, &w, w + 1))
            return 1;
    }
}

static void *worker_main(void *vw) {
    struct worker *w = vw;
    struct mf_pool *p = w->pool;
    uint64_t seen = 0;
    for (;;) {
        seen = wait_job(p, seen);
        if (atomic_load(&p->stop))
            break;
        if (!join_job(p, seen))
            continue;   // too late: the caller already did the work
        run_tasks(p, w->tid);
        atomic_fetch_add(&p->n_left, 1);
        if (atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

int mf_pool_new(struct mf_pool **out, int n_threads, char *err, size_t errlen) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 4096)
        return mf_err(err, errlen, MF_ERR_ARG, "thread pool: n_threads %d not in [1, 4096]",
                      n_threads);
    struct mf_pool *p = calloc(1, sizeof *p);
    if (!p)
        return mf_err(err, errlen, MF_ERR_NOMEM, "thread pool: out of memory");
    p->n_threads = n_threads;
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    p->workers = calloc((size_t)n_threads, sizeof *p->workers);
    if (!p->threads || !p->workers) {
        mf_pool_free(p);
        return mf_err(err, errlen, MF_ERR_NOMEM, "thread pool: out of memory");
    }
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        mf_pool_free(p);
        return mf_err(err, errlen, MF_ERR_BACKEND, "thread pool: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&p->cv_work, NULL) != 0) {
        pthread_mutex_destroy(&p->mu);
        mf_pool_free(p);
        return mf_err(err, errlen, MF_ERR_BACKEND, "thread pool: pthread_cond_init failed");
    }
    if (pthread_cond_init(&p->cv_done, NULL) != 0) {
        pthread_cond_destroy(&p->cv_work);
        pthread_mutex_destroy(&p->mu);
        mf_pool_free(p);
        return mf_err(err, errlen, MF_ERR_BACKEND, "thread pool: pthread_cond_init failed");
    }
    p->sync_ok = 1;
    atomic_init(&p->generation, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->next_task, 0);
    atomic_init(&p->busy, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->caller_sleeping, 0);
    atomic_init(&p->window, WIN_CLOSED);
    atomic_init(&p->n_left, 0);
    for (int t = 1; t < n_threads; t++) {
        p->workers[t].pool = p;
        p->workers[t].tid = t;
        int rc = pthread_create(&p->threads[t], NULL, worker_main, &p->workers[t]);
        if (rc != 0) {
            mf_pool_free(p);
            return mf_err(err, errlen, MF_ERR_BACKEND,
                          "thread pool: pthread_create for thread %d of %d: %s", t,
                          n_threads, strerror(rc));
        }
        p->n_started = t;
    }
    *out = p;
    return MF_OK;
}

void mf_pool_free(struct mf_pool *p) {
    if (!p)
        return;
    if (p->sync_ok) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->stop, 1);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
        for (int t = 1; t <= p->n_started; t++)
            pthread_join(p->threads[t], NULL);
        pthread_cond_destroy(&p->cv_done);
        pthread_cond_destroy(&p->cv_work);
        pthread_mutex_destroy(&p->mu);
    }
    free(p->workers);
    free(p->threads);
    free(p);
}

int mf_pool_n_threads(const struct mf_pool *p) { return p->n_threads; }

// The id of the calling thread (0 = the pool's owner), for nested runs.
static int current_tid(const struct mf_pool *p) {
    pthread_t self = pthread_self();
    for (int t = 1; t <= p->n_started; t++)
        if (pthread_equal(self, p->threads[t]))
            return t;
    return 0;
}

void mf_pool_run(struct mf_pool *p, mf_pool_fn fn, void *arg, int n_tasks) {
    if (n_tasks <= 0)
        return;
    if (p->n_threads == 1 || n_tasks == 1 || atomic_load(&p->busy)) {
        // Inline: single thread, a single task, or called from inside a task (the pool
        // is already fully occupied by the outer job).
        int tid = atomic_load(&p->busy) ? current_tid(p) : 0;
        for (int i = 0; i < n_tasks; i++)
            fn(arg, i, tid);
        return;
    }
    atomic_store(&p->busy, 1);
    // No worker is inside a job here (the last run waited for every one that joined),
    // so the job fields can be written plainly.
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next_task, 0);
    atomic_store(&p->n_left, 0);
    uint64_t gen = atomic_load(&p->generation) + 1;
    atomic_store(&p->window, (gen & 0xFFFFFFFFu) << 32);   // open, nobody joined
    atomic_store(&p->generation, gen);                     // publishes all of the above
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
    }

    run_tasks(p, 0);

    // Every task is handed out: close the window and wait for those who joined.
    int n_joined = (int)(atomic_fetch_or(&p->window, WIN_CLOSED) & WIN_COUNT);
    uint64_t t0 = 0;
    for (unsigned spin = 0; atomic_load(&p->n_left) < n_joined; spin++) {
        cpu_relax();
        if ((spin & 255) != 255)
            continue;
        uint64_t t = now_ns();
        if (t0 == 0) {
            t0 = t;
        } else if (t - t0 > CALLER_SPIN_NS) {
            // caller_sleeping is raised before n_left is re-checked, and a worker bumps
            // n_left before reading caller_sleeping (seq_cst): no lost wake-up.
            pthread_mutex_lock(&p->mu);
            atomic_store(&p->caller_sleeping, 1);
            while (atomic_load(&p->n_left) < n_joined)
                pthread_cond_wait(&p->cv_done, &p->mu);
            atomic_store(&p->caller_sleeping, 0);
            pthread_mutex_unlock(&p->mu);
            break;
        }
    }
    atomic_store(&p->busy, 0);
}
