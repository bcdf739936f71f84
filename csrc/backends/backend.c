/*
 * backend.c — what every backend shares: sizes and slices of weight views, and the
 * choice of backend by name ("auto": Metal on Apple Silicon, CUDA where a device
 * answers, else the CPU). The backends themselves live in backends/<name>/.
 */
#include "backends/backend.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/metal/metal_backend.h"

#include <stdio.h>
#include <string.h>

int64_t mf_weight_w_bytes(const struct mf_weight *w) {
    if (w->dtype == MF_DTYPE_U32)
        return w->n_out * (w->n_in * w->bits / 32) * 4;
    return w->n_out * w->n_in * (int64_t)mf_dtype_size(w->dtype);
}

int64_t mf_weight_s_bytes(const struct mf_weight *w) {
    if (w->dtype != MF_DTYPE_U32)
        return 0;
    return w->n_out * (w->n_in / w->group_size) * (int64_t)mf_dtype_size(w->sdtype);
}

struct mf_weight mf_weight_slice(const struct mf_weight *w, int64_t i) {
    struct mf_weight s = *w;
    s.w = (const char *)w->w + i * mf_weight_w_bytes(w);
    if (w->scales)
        s.scales = (const char *)w->scales + i * mf_weight_s_bytes(w);
    if (w->biases)
        s.biases = (const char *)w->biases + i * mf_weight_s_bytes(w);
    return s;
}

struct mf_weight mf_weight_at(const struct mf_weight *v, const void *base) {
    struct mf_weight w = *v;
    const char *b = base;
    w.w = b + (uintptr_t)v->w;
    // by dtype, not by a NULL test: a component may sit at blob offset 0. An MXFP4
    // weight has scales (E8M0 exponents) and no biases.
    if (v->dtype == MF_DTYPE_U32) {
        w.scales = b + (uintptr_t)v->scales;
        if (v->qmode == MF_QMODE_AFFINE)
            w.biases = b + (uintptr_t)v->biases;
    }
    return w;
}

const char *mf_weight_format(const struct mf_weight *w, char *buf, size_t n) {
    if (w->dtype == MF_DTYPE_U32 && w->qmode == MF_QMODE_MXFP4)
        snprintf(buf, n, "mxfp4 group %d", w->group_size);
    else if (w->dtype == MF_DTYPE_U32)
        snprintf(buf, n, "affine %d-bit group %d (%s scales)", w->bits, w->group_size,
                 mf_dtype_name(w->sdtype));
    else
        snprintf(buf, n, "float %s", mf_dtype_name(w->dtype));
    return buf;
}

void mf_matmul_multi(const struct mf_backend_ops *op, struct mf_exec *ex, int n,
                     float *const *y, const struct mf_weight *const *w, const float *x,
                     int n_tok) {
    if (op->matmul_multi && n > 1 && n <= MF_MATMUL_MULTI) {
        op->matmul_multi(ex, n, y, w, x, n_tok);
        return;
    }
    for (int i = 0; i < n; i++)
        op->matmul(ex, y[i], w[i], x, n_tok);
}

void mf_matmul_add(const struct mf_backend_ops *op, struct mf_exec *ex, float *y,
                   const struct mf_weight *w, const float *x, int n_tok, float *tmp) {
    if (op->matmul_add) {
        op->matmul_add(ex, y, w, x, n_tok, tmp);
        return;
    }
    op->matmul(ex, tmp, w, x, n_tok);
    op->axpy(ex, y, 1.0f, tmp, n_tok * (int)w->n_out);
}

void mf_rms_route(const struct mf_backend_ops *op, struct mf_exec *ex, int32_t *idx, float *w,
                  float *logits, const float *bias, const struct mf_route_params *r,
                  int n_tok, const struct mf_weight *router, float *xn, const float *x,
                  const struct mf_weight *g, float eps) {
    if (op->rms_route) {
        op->rms_route(ex, idx, w, logits, bias, r, n_tok, router, xn, x, g, eps);
        return;
    }
    float *const y[1] = {logits};
    const struct mf_weight *const wr[1] = {router};
    mf_rms_matmul_multi(op, ex, 1, y, wr, xn, x, g, eps, n_tok);
    op->moe_route(ex, idx, w, logits, bias, r, n_tok, NULL, NULL);
}

void mf_rms_matmul_multi(const struct mf_backend_ops *op, struct mf_exec *ex, int n,
                         float *const *y, const struct mf_weight *const *w, float *xn,
                         const float *x, const struct mf_weight *g, float eps, int n_tok) {
    if (op->rms_matmul_multi && n >= 1 && n <= MF_MATMUL_MULTI) {
        op->rms_matmul_multi(ex, n, y, w, xn, x, g, eps, n_tok);
        return;
    }
    op->rmsnorm(ex, xn, x, g, n_tok, (int)w[0]->n_in, eps, 1.0f);
    mf_matmul_multi(op, ex, n, y, w, xn, n_tok);
}

void mf_add_rmsnorm(const struct mf_backend_ops *op, struct mf_exec *ex, float *y, float *x,
                    const float *r, const struct mf_weight *g, int n_rows, int n,
                    float eps) {
    if (r && op->add_rmsnorm) {
        op->add_rmsnorm(ex, y, x, r, g, n_rows, n, eps);
        return;
    }
    if (r)
        op->axpy(ex, x, 1.0f, r, n_rows * n);
    op->rmsnorm(ex, y, x, g, n_rows, n, eps, 1.0f);
}

void mf_rope_qk(const struct mf_backend_ops *op, struct mf_exec *ex,
                const struct mf_rope_qk *r) {
    const int norm = r->norm[0] || r->norm[1];
    if (op->rope_qk && (!norm || r->head_dim <= MF_ROPE_QK_NORM_MAX)) {
        op->rope_qk(ex, r);
        return;
    }
    for (int i = 0; i < 2; i++) {
        const int hd = r->head_dim, dense = r->head_stride[i] == hd &&
                                            r->tok_stride[i] == r->heads[i] * hd;
        if (r->norm[i] && dense)
            op->rmsnorm(ex, r->x[i], r->x[i], r->norm[i], r->n_tok * r->heads[i], hd,
                        r->eps, 1.0f);
        else if (r->norm[i])
            op->rmsnorm_heads(ex, r->x[i], r->x[i], r->norm[i], r->n_tok, r->tok_stride[i],
                              r->heads[i], r->head_stride[i], hd, r->eps, 1.0f);
    }
    for (int i = 0; i < 2; i++)
        op->rope(ex, r->x[i], r->n_tok, r->heads[i], r->tok_stride[i], r->head_stride[i],
                 r->n_rot, r->inv_freq, r->pos0, r->traditional, r->mscale);
}

void mf_axpy_flag(const struct mf_backend_ops *op, struct mf_exec *ex, float *y,
                  float alpha, const float *x, int n, int32_t *flag) {
    if (op->axpy_flag) {
        op->axpy_flag(ex, y, alpha, x, n, flag);
        return;
    }
    op->axpy(ex, y, alpha, x, n);
    op->flag_nonfinite(ex, flag, y, n);
}

static int same_format(const struct mf_weight *a, const struct mf_weight *b) {
    return a->dtype == b->dtype &&
           (a->dtype != MF_DTYPE_U32 ||
            (a->qmode == b->qmode && a->sdtype == b->sdtype && a->bits == b->bits &&
             a->group_size == b->group_size));
}

int mf_moe_experts_gpu_check(const char *backend, const struct mf_moe_batch *b, int il,
                             char *err, size_t errlen) {
    const struct mf_weight *w[2] = {b->gate, b->up},
                           *bias[3] = {b->gate_bias, b->up_bias, b->down_bias};
    static const char *const names[3] = {"gate_proj", "up_proj", "down_proj"};
    char f0[64], f1[64];
    for (int p = 0; p < 3; p++)
        if (bias[p] && bias[p]->dtype != MF_DTYPE_F32 && bias[p]->dtype != MF_DTYPE_F16 &&
            bias[p]->dtype != MF_DTYPE_BF16)
            return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                          "%s backend: layer %d experts: %s.bias is %s; its expert kernels "
                          "take float biases; use backend 'cpu'", backend, il, names[p],
                          mf_dtype_name(bias[p]->dtype));
    if (!same_format(w[1], w[0]))
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                      "%s backend: layer %d experts: up_proj is %s but gate_proj %s; its "
                      "expert kernels take gate and up in one format (down_proj may have "
                      "its own; such layouts run on backend 'cpu')", backend, il,
                      mf_weight_format(w[1], f1, sizeof f1),
                      mf_weight_format(w[0], f0, sizeof f0));
    return MF_OK;
}

// Metal exists only in macOS builds (its driver is Objective-C); elsewhere the name
// is known but refused with the reason.
static int metal_new(struct mf_backend **out, char *err, size_t errlen) {
#if defined(__APPLE__)
    return mf_backend_metal_new(out, err, errlen);
#else
    (void)out;
    return mf_err(err, errlen, MF_ERR_BACKEND,
                  "backend 'metal' needs macOS on Apple Silicon; this build is for "
                  "another system (use 'cpu', 'cuda' or 'auto')");
#endif
}

int mf_backend_metal_usable(char *err, size_t errlen) {
#if defined(__APPLE__)
    return mf_backend_metal_probe(err, errlen);
#else
    return metal_new(NULL, err, errlen);
#endif
}

// The first usable of Metal and CUDA, else the CPU. A GPU that answers the probe but
// then fails to open is an error, not a silent fall back to the CPU.
static int auto_new(struct mf_backend **out, char *err, size_t errlen) {
    char why[512];
    if (mf_backend_metal_usable(why, sizeof why) == MF_OK)
        return metal_new(out, err, errlen);
    if (mf_backend_cuda_probe(why, sizeof why) == MF_OK)
        return mf_backend_cuda_new(out, err, errlen);
    return mf_backend_cpu_new(out, err, errlen);
}

int mf_backend_new(struct mf_backend **out, const char *name, char *err, size_t errlen) {
    *out = NULL;
    if (!name || strcmp(name, "cpu") == 0)
        return mf_backend_cpu_new(out, err, errlen);
    if (strncmp(name, "cpu:", 4) == 0)
        return mf_backend_cpu_new_kernels(out, name + 4, err, errlen);
    if (strcmp(name, "cuda") == 0)
        return mf_backend_cuda_new(out, err, errlen);
    if (strcmp(name, "metal") == 0)
        return metal_new(out, err, errlen);
    if (strcmp(name, "auto") == 0)
        return auto_new(out, err, errlen);
    return mf_err(err, errlen, MF_ERR_BACKEND,
                  "unknown backend '%s' (expected auto, cpu, cuda or metal)", name);
}
