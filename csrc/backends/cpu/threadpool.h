/*
 * threadpool.h — a persistent worker pool owned by one CPU exec. Threads are created in
 * mf_pool_new and joined in mf_pool_free; a run hands out task indices [0, n_tasks)
 * through an atomic counter and the calling thread works too, so nothing is spawned per
 * op. Which thread runs a task is not fixed, so callers must make each task's output
 * depend only on the task index (that is what makes results independent of the thread
 * count).
 */
#ifndef MF_CPU_THREADPOOL_H
#define MF_CPU_THREADPOOL_H

#include <stddef.h>

struct mf_pool;

// One task: `task` in [0, n_tasks), `tid` in [0, n_threads) names the thread running it
// (for per-thread scratch; 0 is the caller).
typedef void (*mf_pool_fn)(void *arg, int task, int tid);

// Constructor: n_threads >= 1 (n_threads - 1 workers are started). MF_ERR_ARG /
// MF_ERR_NOMEM / MF_ERR_BACKEND (pthread failure) with a message; *out = NULL then.
int mf_pool_new(struct mf_pool **out, int n_threads, char *err, size_t errlen);
// Destructor: stops and joins the workers. NULL is a no-op.
void mf_pool_free(struct mf_pool *p);
int mf_pool_n_threads(const struct mf_pool *p);
// Runs fn(arg, i, tid) for every i in [0, n_tasks) and returns when all are done.
// A call made from inside a running task (nested) runs its tasks inline on that thread.
// Used by one thread at a time (the exec's owner).
void mf_pool_run(struct mf_pool *p, mf_pool_fn fn, void *arg, int n_tasks);

#endif /* MF_CPU_THREADPOOL_H */
