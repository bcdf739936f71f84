/*
 * threadpool.c — the CPU exec's persistent pool (see threadpool.h). Owns the worker
 * threads and the hand-off of one job at a time; knows nothing about ops.
 *
 * A job is published by writing its fields and then bumping an atomic generation;
 * workers spin on the generation for a while (decode runs many short ops back to back,
 * and a futex wake-up per op costs more than the op) and only then sleep on a condvar.
 * Each worker takes task indices from an atomic counter, then decrements an atomic
 * count of workers still inside the job; the caller, after taking tasks itself, spins
 * on that count and only sleeps if the job runs long. So the job's arguments (on the
 * caller's stack) are never touched after mf_pool_run returns, and the common path
 * takes no lock at all.
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
// spins for the workers to finish before sleeping: long enough to bridge consecutive
// ops of a decode step, short enough not to burn a core through longer waits (expert
// reads, the caller's own Python code).
#define WORKER_SPIN_NS 100000
#define CALLER_SPIN_NS 200000

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
    pthread_cond_t cv_done;     // a sleeping caller waits here for n_active == 0
    int sync_ok;                // mutex and condvars initialised
    atomic_uint_fast64_t generation;
    atomic_int stop;
    atomic_int n_sleeping;      // workers blocked (or about to block) on cv_work
    // The current job (written before generation is bumped, read after).
    mf_pool_fn fn;
    void *arg;
    int n_tasks;
    atomic_int next_task;
    atomic_int n_active;        // workers not yet done with the current job
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

static void *worker_main(void *vw) {
    struct worker *w = vw;
    struct mf_pool *p = w->pool;
    uint64_t seen = 0;
    for (;;) {
        seen = wait_job(p, seen);
        if (atomic_load(&p->stop))
            break;
        run_tasks(p, w->tid);
        if (atomic_fetch_sub(&p->n_active, 1) == 1) {
            // Last one out: wake the caller in case it went to sleep.
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
    atomic_init(&p->n_active, 0);
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
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next_task, 0);
    atomic_store(&p->n_active, p->n_started);
    atomic_fetch_add(&p->generation, 1);   // publishes the fields above
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
    }

    run_tasks(p, 0);

    uint64_t t0 = 0;
    for (unsigned spin = 0; atomic_load(&p->n_active) > 0; spin++) {
        cpu_relax();
        if ((spin & 255) != 255)
            continue;
        uint64_t t = now_ns();
        if (t0 == 0) {
            t0 = t;
        } else if (t - t0 > CALLER_SPIN_NS) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->n_active) > 0)
                pthread_cond_wait(&p->cv_done, &p->mu);
            pthread_mutex_unlock(&p->mu);
            break;
        }
    }
    atomic_store(&p->busy, 0);
}
