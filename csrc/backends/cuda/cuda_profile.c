/*
 * cuda_profile.c — GPU time per kernel in the engine's own stream
 * (MOEFLUX_GPU_PROFILE=1, read when an exec is made). An event is recorded after every
 * launch; the time between two consecutive events is charged to the kernel launched
 * between them, so it holds the kernel and the gap before it (launch latency, and any
 * copy or memset queued in between), and the sum is the stream's busy time between host
 * waits. A host wait for the stream to drain (download, sync, the routed ids of a
 * streamed layer) ends a run of events: they are resolved then, and the next launch
 * starts a new run with a mark of its own, so that wait is never charged to a kernel.
 * A fence wait does not end a run (the stream need not be idle then): if the stream
 * runs dry during one, the next kernel is charged the rest. The table goes to stderr
 * when the exec is freed. The events cost a little on the device; Nsight Compute
 * gives each kernel alone, this gives them in the running step.
 */
#include "backends/cuda/cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(ex, op, call) mf_cuda_ck((ex), (ex)->cb->cu.call, (op), #call)

int mf_cuda_prof_init(struct mf_exec *ex) {
    const char *e = getenv("MOEFLUX_GPU_PROFILE");
    if (!e || strcmp(e, "1") != 0)
        return MF_OK;
    ex->prof = calloc(1, sizeof *ex->prof);
    if (!ex->prof) {
        mf_cuda_fail(ex, MF_ERR_NOMEM, "cuda backend: profile: out of memory");
        return ex->status;
    }
    for (int i = 0; i < MF_PROF_EVENTS; i++)
        if (!CK(ex, "profile", EventCreate(&ex->prof->ev[i], 0)))
            return ex->status;
    return MF_OK;
}

// Resolves the run of events recorded so far (waits for the last one).
void mf_cuda_prof_flush(struct mf_exec *ex) {
    struct mf_cuda_prof *pr = ex->prof;
    if (!pr || pr->n == 0)
        return;
    const int n = pr->n;
    pr->n = 0;
    if (!CK(ex, "profile", EventSynchronize(pr->ev[n - 1])))
        return;
    for (int i = 1; i < n; i++) {
        float ms = 0.0f;
        if (!CK(ex, "profile", EventElapsedTime(&ms, pr->ev[i - 1], pr->ev[i])))
            return;
        pr->ms[pr->kid[i]] += ms;
        pr->calls[pr->kid[i]]++;
    }
}

static int prof_record(struct mf_exec *ex, int kid) {
    struct mf_cuda_prof *pr = ex->prof;
    pr->kid[pr->n] = kid;
    if (!CK(ex, "profile", EventRecord(pr->ev[pr->n], ex->st)))
        return 0;
    pr->n++;
    return 1;
}

// After launch kid: its event (a full pool is resolved first, and a run starts with a
// mark).
void mf_cuda_prof_launched(struct mf_exec *ex, int kid) {
    struct mf_cuda_prof *pr = ex->prof;
    if (!pr)
        return;
    if (pr->n == MF_PROF_EVENTS)
        mf_cuda_prof_flush(ex);
    if (pr->n == 0 && !prof_record(ex, 0))   // the mark: never charged (i starts at 1)
        return;
    prof_record(ex, kid);
}

static int by_time(const void *a, const void *b, const struct mf_cuda_prof *pr) {
    const double x = pr->ms[*(const int *)a], y = pr->ms[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : 0;
}

// The table on stderr (kernels by time, then the total), then the events are freed.
void mf_cuda_prof_free(struct mf_exec *ex) {
    struct mf_cuda_prof *pr = ex->prof;
    if (!pr)
        return;
    mf_cuda_prof_flush(ex);
    int order[MF_KID_COUNT], n = 0;
    double total = 0.0;
    long long calls = 0;
    for (int k = 0; k < MF_KID_COUNT; k++) {
        total += pr->ms[k];
        calls += pr->calls[k];
        if (pr->calls[k])
            order[n++] = k;
    }
    for (int i = 1; i < n; i++)   // insertion sort by time, largest first
        for (int j = i; j > 0 && by_time(&order[j - 1], &order[j], pr) > 0; j--) {
            const int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    if (calls > 0) {
        fprintf(stderr, "moeflux GPU profile: %lld launches, %.3f ms of stream time "
                "(each kernel with the gap before it)\n", calls, total);
        fprintf(stderr, "%-22s %9s %11s %9s %6s\n", "kernel", "launches", "total ms",
                "mean us", "share");
        for (int i = 0; i < n; i++) {
            const int k = order[i];
            fprintf(stderr, "%-22s %9lld %11.3f %9.2f %5.1f%%\n", mf_cuda_kernel_names[k],
                    pr->calls[k], pr->ms[k], 1e3 * pr->ms[k] / (double)pr->calls[k],
                    total > 0.0 ? 100.0 * pr->ms[k] / total : 0.0);
        }
    }
    for (int i = 0; i < MF_PROF_EVENTS; i++)
        if (pr->ev[i])
            ex->cb->cu.EventDestroy(pr->ev[i]);
    free(pr);
    ex->prof = NULL;
}
