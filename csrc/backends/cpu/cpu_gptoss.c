/*
 * cpu_gptoss.c — the CPU ops gpt-oss adds to the elementwise set: its clamped SwiGLU
 * (mlx-lm activations.swiglu_oai), in f32 and in mlx-lm's order of operations. Rows
 * are split over tasks; each element is computed by one task, so results do not depend
 * on the thread count. (Its attention pieces, sinks and the sliding window, are in
 * cpu_ops.c's attention; its MXFP4 weights in cpu_mxfp4*.c.)
 */
#include <math.h>

#include "backends/cpu/cpu_internal.h"

// Elements per task; below this, one task does everything.
#define GPTOSS_ELEMS_PER_TASK 16384

struct swiglu_clamped_job {
    float *y;
    const float *gate, *up;
    int n_rows, n_cols, stride, rows_per_task;
    float alpha, limit;
};

// (clip(u, -limit, limit) + 1) * (g * sigmoid(alpha * g)), g = min(gate, limit).
static float swiglu_clamped_1(float gate, float up, float alpha, float limit) {
    float g = gate < limit ? gate : limit;
    float u = up < -limit ? -limit : up > limit ? limit : up;
    return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(alpha * g)))));
}

static void swiglu_clamped_task(void *arg, int task, int tid) {
    (void)tid;
    const struct swiglu_clamped_job *j = arg;
    int r0 = task * j->rows_per_task;
    int r1 = r0 + j->rows_per_task < j->n_rows ? r0 + j->rows_per_task : j->n_rows;
    for (int r = r0; r < r1; r++) {
        const float *g = j->gate + (int64_t)r * j->stride;
        const float *u = j->up + (int64_t)r * j->stride;
        float *y = j->y + (int64_t)r * j->n_cols;
        for (int c = 0; c < j->n_cols; c++)
            y[c] = swiglu_clamped_1(g[c], u[c], j->alpha, j->limit);
    }
}

void mf_cpu_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate, const float *up,
                           int n_rows, int n_cols, int in_stride, float alpha,
                           float limit) {
    if (n_rows <= 0 || n_cols <= 0)
        return;
    struct swiglu_clamped_job j = {.y = y, .gate = gate, .up = up, .n_rows = n_rows,
                                   .n_cols = n_cols, .stride = in_stride, .alpha = alpha,
                                   .limit = limit};
    j.rows_per_task = GPTOSS_ELEMS_PER_TASK / n_cols;
    if (j.rows_per_task < 1)
        j.rows_per_task = 1;
    mf_pool_run(ex->pool, swiglu_clamped_task, &j,
                (n_rows + j.rows_per_task - 1) / j.rows_per_task);
}
