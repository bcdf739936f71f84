/*
 * model.c — the lifecycle of mf_model and mf_ctx, the evaluation wrapper, getters,
 * errors, statistics and abort.
 *
 * mf_model_load validates everything a forward pass relies on before any arch code
 * runs: config.json, the manifest against model_weights.bin, the expert files against
 * their layout and the config; then the arch binds its tensors. Every constructor
 * initialises its fds to -1 and pointers to NULL before anything can fail, so one
 * destructor frees half-built objects too. mf_ctx_eval checks its arguments, times
 * the call and advances the position only when the arch's forward succeeded, which
 * keeps the "unchanged on error" promise of moeflux.h. Snapshots and truncation live
 * in state.c; the forward passes in models/.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/weights.h"
#include "models/moe.h"

#define STR2(x) #x
#define STR(x) STR2(x)

/* ==== Version, status codes, defaults ==== */

const char *mf_version(void) {
    return STR(MF_VERSION_MAJOR) "." STR(MF_VERSION_MINOR) "." STR(MF_VERSION_PATCH);
}

const char *mf_strerror(int status) {
    switch (status) {
    case MF_OK: return "success";
    case MF_ERR_NOMEM: return "out of memory";
    case MF_ERR_IO: return "input/output error";
    case MF_ERR_FORMAT: return "malformed or unsupported file content";
    case MF_ERR_SHAPE: return "tensor shape or dtype disagrees with config.json";
    case MF_ERR_ARG: return "bad argument";
    case MF_ERR_BACKEND: return "compute backend failure";
    case MF_ERR_STATE: return "request does not fit the context's state";
    case MF_ERR_UNSUPPORTED: return "not supported by this build";
    case MF_ERR_NUMERIC: return "NaN or infinity in the computation";
    case MF_ABORTED: return "aborted";
    default: return "unknown status";
    }
}

struct mf_model_params mf_model_default_params(void) {
    struct mf_model_params p = {.backend = "cpu", .log_fn = NULL, .log_user = NULL,
                                .use_2bit = 0, .gpu_experts = NULL,
                                .gpu_cache_bytes = -1, .gpu_cache_fraction = -1.0};
    return p;
}

struct mf_ctx_params mf_ctx_default_params(void) {
    struct mf_ctx_params p = {.n_ctx = 0, .n_threads = 0, .abort_fn = NULL,
                              .abort_user = NULL, .io_mode = NULL, .io_threads = 0,
                              .expert_cache_bytes = 0, .prefetch = -1};
    return p;
}

void mf_log(const mf_model *m, int level, const char *fmt, ...) {
    if (!m || !m->params.log_fn)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    m->params.log_fn(m->params.log_user, level, line);
}

/* ==== Model ==== */

static void experts_dev_free(mf_model *m) {
    if (!m->experts_dev)
        return;
    for (int il = 0; il < m->cfg.num_hidden_layers; il++)
        if (m->experts_dev[il] && m->be->ops->unmap_weights)
            m->be->ops->unmap_weights(m->be, m->experts_dev[il], m->experts_dev_layer_bytes);
    free((void *)m->experts_dev);
    m->experts_dev = NULL;
}

void mf_model_free(mf_model *m) {
    if (!m)
        return;
    if (m->arch && m->arch_weights && m->arch->unbind)
        m->arch->unbind(m);
    experts_dev_free(m);
    mf_expert_store_close(m->experts);
    if (m->be) {
        mf_derived_free(m);
        if (m->weights_dev && m->be->ops->unmap_weights)
            m->be->ops->unmap_weights(m->be, m->weights_dev, m->weights_bytes);
        m->be->ops->free(m->be);
    }
    mf_weights_unmap(m);
    mf_manifest_free(&m->manifest);
    mf_config_free(&m->cfg);
    free(m->dir);
    free(m);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

// Cross-checks of the expert layout against config.json: a repack of another model
// (or of another quantization) must fail here, not as garbage at run time. Each MoE
// layer's projections (each at its own format) are checked against hidden_size /
// moe_intermediate_size, and the backend is asked whether its kernels take them.
static int check_expert_layout(const mf_model *m, const char *dir, char *err,
                               size_t errlen) {
    const struct mf_expert_layout *L = mf_expert_store_layout(m->experts);
    const struct mf_config *c = &m->cfg;
    if (L->num_experts != c->num_experts)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "%s/layout.json: num_experts is %d, config.json has %d", dir,
                      L->num_experts, c->num_experts);
    return mf_moe_check_experts(m, c->hidden_size, c->moe_intermediate_size, err, errlen);
}

static int open_experts(mf_model *m, char *err, size_t errlen) {
    char *d4 = mf_path_join(m->dir, "packed_experts");
    char *d2 = mf_path_join(m->dir, "packed_experts_2bit");
    int rc = MF_OK;
    if (!d4 || !d2) {
        rc = mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    } else {
        const char *dir = d4;
        if (m->params.use_2bit == 1 || (m->params.use_2bit == -1 && !is_dir(d4)))
            dir = d2;
        if (!is_dir(dir))
            rc = mf_err(err, errlen, MF_ERR_IO,
                        "%s: missing (config.json has %d MoE layers; run `python -m "
                        "moeflux.prep convert`)", dir, m->cfg.n_moe_layers);
        if (!rc)
            rc = mf_expert_store_open(&m->experts, dir, m->cfg.num_hidden_layers,
                                      m->cfg.layer_is_moe, err, errlen);
        if (!rc)
            rc = check_expert_layout(m, dir, err, errlen);
        if (!rc)
            mf_log(m, MF_LOG_INFO, "experts: %s (layout v%d, gate %d-bit, %llu bytes "
                   "each)", dir, mf_expert_store_layout(m->experts)->version,
                   mf_expert_store_layout(m->experts)->bits,
                   (unsigned long long)mf_expert_store_layout(m->experts)->expert_size);
    }
    free(d4);
    free(d2);
    return rc;
}

/* ==== Resident experts ====
 * gpu_experts (moeflux.h): every MoE layer's expert file, mapped read-only, becomes a
 * device view through map_weights (CUDA: copied into device memory through pinned
 * staging; CPU: the mapping itself). */

double mf_device_usable_bytes(uint64_t free_b) {
    return 0.85 * (double)free_b - (double)((uint64_t)2 << 30);
}

// 1 = resident, 0 = stream, for mode (NULL = auto); MF_ERR_ARG for an unknown mode.
static int residency_choice(mf_model *m, const char *mode, int *resident, char *err,
                            size_t errlen) {
    if (mode && strcmp(mode, "auto") != 0) {
        if (strcmp(mode, "resident") != 0 && strcmp(mode, "stream") != 0)
            return mf_err(err, errlen, MF_ERR_ARG, "gpu_experts '%.32s' unknown "
                          "(expected auto, resident or stream)", mode);
        *resident = strcmp(mode, "resident") == 0;
        return MF_OK;
    }
    *resident = 0;
    uint64_t free_b = 0, total_b = 0, need = mf_expert_store_total_bytes(m->experts);
    if (m->be->ops->host_is_device || !m->be->ops->mem_info ||
        m->be->ops->mem_info(m->be, &free_b, &total_b, err, errlen) != MF_OK)
        return MF_OK;
    *resident = (double)need <= mf_device_usable_bytes(free_b);
    mf_log(m, MF_LOG_INFO, "gpu_experts auto: %.2f GB of experts, %.2f GB free: %s",
           (double)need / 1e9, (double)free_b / 1e9, *resident ? "resident" : "stream");
    return MF_OK;
}

static int experts_dev_load(mf_model *m, char *err, size_t errlen) {
    const struct mf_expert_layout *L = mf_expert_store_layout(m->experts);
    const int n = m->cfg.num_hidden_layers;
    m->experts_dev_layer_bytes = (uint64_t)L->num_experts * L->expert_size;
    m->experts_dev = calloc((size_t)n, sizeof *m->experts_dev);
    if (!m->experts_dev)
        return mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    int rc = mf_expert_store_map(m->experts, err, errlen);
    double t0 = mf_now_s();
    for (int il = 0; il < n && rc == MF_OK; il++) {
        const void *data = NULL;
        if (!m->cfg.layer_is_moe[il])
            continue;
        rc = mf_expert_store_prefault(m->experts, il, 0, &data, err, errlen);
        if (rc == MF_OK) {
            m->experts_dev[il] = m->be->ops->map_weights(m->be, data,
                                                         m->experts_dev_layer_bytes, err,
                                                         errlen);
            rc = m->experts_dev[il] ? MF_OK : MF_ERR_BACKEND;
        }
    }
    if (rc == MF_OK)
        mf_log(m, MF_LOG_INFO, "experts resident: %.2f GB in %.1f s",
               (double)mf_expert_store_total_bytes(m->experts) / 1e9, mf_now_s() - t0);
    return rc;
}

static int experts_residency(mf_model *m, const char *mode, char *err, size_t errlen) {
    int resident = 0;
    int rc = residency_choice(m, mode, &resident, err, errlen);
    if (rc == MF_OK && resident)
        rc = experts_dev_load(m, err, errlen);
    return rc;
}

// Everything after the struct is allocated; on failure the caller frees m.
static int model_open(mf_model *m, const char *dir, const char *backend,
                      const char *gpu_experts, char *err, size_t errlen) {
    if (!is_dir(dir))
        return mf_err(err, errlen, MF_ERR_IO, "%s: not a model directory: %s", dir,
                      errno ? strerror(errno) : "not a directory");
    char *cpath = mf_path_join(dir, "config.json");
    char *jpath = mf_path_join(dir, "model_weights.json");
    char *bpath = mf_path_join(dir, "model_weights.bin");
    int rc = MF_OK;
    if (!cpath || !jpath || !bpath)
        rc = mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = mf_config_load(&m->cfg, cpath, err, errlen);
    if (!rc)
        rc = mf_weights_map(m, bpath, err, errlen);
    if (!rc)
        rc = mf_manifest_load(&m->manifest, jpath, m->weights_bytes, err, errlen);
    free(cpath);
    free(jpath);
    free(bpath);
    if (rc)
        return rc;
    if ((rc = mf_backend_new(&m->be, backend, err, errlen)))
        return rc;
    if (m->weights_bytes) {
        m->weights_dev = m->be->ops->map_weights(m->be, m->weights_map, m->weights_bytes,
                                                 err, errlen);
        if (!m->weights_dev)
            return MF_ERR_BACKEND;
    }
    if (m->cfg.n_moe_layers > 0 && (rc = open_experts(m, err, errlen)))
        return rc;
    if (m->experts && (rc = experts_residency(m, gpu_experts, err, errlen)))
        return rc;
    // Checked last so every file-level problem is reported even in a build that
    // lacks the family's forward pass.
    m->arch = mf_arch_find(m->cfg.arch);
    if (!m->arch)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                      "%s: architecture %s is recognised but not implemented in this build",
                      dir, m->cfg.model_type);
    if ((rc = m->arch->bind(m, err, errlen)))
        return rc;
    if (m->experts)
        m->expert_bytes_per_token = (int64_t)m->cfg.n_moe_layers *
                                    m->cfg.num_experts_per_tok *
                                    (int64_t)mf_expert_store_layout(m->experts)->expert_size;
    mf_log(m, MF_LOG_INFO, "loaded %s: %s, %d layers (%d MoE), %d tensors, backend %s",
           dir, m->cfg.model_type, m->cfg.num_hidden_layers, m->cfg.n_moe_layers,
           m->manifest.n_tensors, m->be->ops->name);
    return MF_OK;
}

int mf_model_load(mf_model **out, const char *dir, const struct mf_model_params *params,
                  char *err, size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    if (!out)
        return mf_err(err, errlen, MF_ERR_ARG, "mf_model_load: out is NULL");
    *out = NULL;
    if (!dir)
        return mf_err(err, errlen, MF_ERR_ARG, "mf_model_load: dir is NULL");
    struct mf_model_params p = params ? *params : mf_model_default_params();
    if (p.use_2bit < -1 || p.use_2bit > 1)
        return mf_err(err, errlen, MF_ERR_ARG, "mf_model_load: use_2bit must be -1, 0 or 1");
    if (!(p.gpu_cache_fraction <= 1.0) || p.gpu_cache_bytes < -1)   // NaN fails too
        return mf_err(err, errlen, MF_ERR_ARG, "mf_model_load: gpu_cache_fraction %g "
                      "must be <= 1 (< 0: unset), gpu_cache_bytes %lld >= -1",
                      p.gpu_cache_fraction, (long long)p.gpu_cache_bytes);
    mf_model *m = calloc(1, sizeof *m);
    if (!m)
        return mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    m->weights_fd = -1;
    m->dir = strdup(dir);
    const char *backend = p.backend ? p.backend : "cpu", *gpu_experts = p.gpu_experts;
    p.backend = NULL;   // borrowed for this call only: never kept
    p.gpu_experts = NULL;
    m->params = p;
    errno = 0;
    int rc = m->dir ? model_open(m, dir, backend, gpu_experts, err, errlen)
                    : mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    if (rc) {
        if (err && errlen && !err[0])
            mf_err(err, errlen, rc, "%s: %s", dir, mf_strerror(rc));
        mf_model_free(m);
        return rc;
    }
    *out = m;
    return MF_OK;
}

/* ==== Context ==== */

void mf_ctx_free(mf_ctx *ctx) {
    if (!ctx)
        return;
    const struct mf_arch *arch = ctx->model->arch;
    if (ctx->arch_state) {
        mf_state_on_reset(ctx);   // drops checkpoints (state.c owns them)
        if (arch->state_free)
            arch->state_free(ctx);
    }
    if (ctx->ex)
        ctx->be->ops->exec_free(ctx->ex);
    free(ctx);
}

static int check_io_params(const struct mf_ctx_params *p, char *err, size_t errlen) {
    if (p->io_threads < 0 || p->io_threads > 256)
        return mf_err(err, errlen, MF_ERR_ARG, "io_threads %d out of range [0, 256]",
                      p->io_threads);
    if (p->expert_cache_bytes < 0)
        return mf_err(err, errlen, MF_ERR_ARG, "expert_cache_bytes %lld is negative",
                      (long long)p->expert_cache_bytes);
    if (p->prefetch < -1 || p->prefetch > 1)
        return mf_err(err, errlen, MF_ERR_ARG, "prefetch %d: expected -1, 0 or 1",
                      p->prefetch);
    return MF_OK;
}

int mf_ctx_new(mf_ctx **out, const mf_model *model, const struct mf_ctx_params *params,
               char *err, size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    if (!out)
        return mf_err(err, errlen, MF_ERR_ARG, "mf_ctx_new: out is NULL");
    *out = NULL;
    if (!model)
        return mf_err(err, errlen, MF_ERR_ARG, "mf_ctx_new: model is NULL");
    struct mf_ctx_params p = params ? *params : mf_ctx_default_params();
    int max_ctx = model->cfg.max_position_embeddings;
    enum mf_io_mode io_mode = MF_IO_AUTO;
    if (p.io_mode && mf_io_mode_parse(p.io_mode, &io_mode) != 0)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "io_mode '%.32s' unknown (expected auto, pread, mmap or direct)",
                      p.io_mode);
    if (p.n_ctx == 0)
        p.n_ctx = max_ctx < 4096 ? max_ctx : 4096;
    if (p.n_ctx < 1 || p.n_ctx > max_ctx)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "n_ctx %d out of range [1, %d] (max_position_embeddings)", p.n_ctx,
                      max_ctx);
    if (p.n_threads < 0)
        return mf_err(err, errlen, MF_ERR_ARG, "n_threads %d is negative", p.n_threads);
    int rc = check_io_params(&p, err, errlen);
    if (rc)
        return rc;
    if (p.n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = n < 1 ? 1 : n > 1024 ? 1024 : (int)n;
    }
    mf_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    ctx->model = model;
    ctx->params = p;
    ctx->params.io_mode = NULL;   // borrowed for this call only: parsed into io_mode
    ctx->io_mode = io_mode;
    ctx->be = model->be;
    ctx->n_ctx = p.n_ctx;
    atomic_init(&ctx->abort_flag, 0);
    rc = ctx->be->ops->exec_new(ctx->be, p.n_threads, &ctx->ex, err, errlen);
    if (!rc)
        rc = model->arch->state_new(ctx, err, errlen);
    if (rc) {
        mf_ctx_free(ctx);
        return rc;
    }
    *out = ctx;
    return MF_OK;
}

int mf_ctx_fail(mf_ctx *ctx, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->errmsg, sizeof ctx->errmsg, fmt, ap);
    va_end(ap);
    return status;
}

int mf_ctx_should_abort(mf_ctx *ctx) {
    if (atomic_load(&ctx->abort_flag))
        return 1;
    if (ctx->params.abort_fn && ctx->params.abort_fn(ctx->params.abort_user)) {
        // Latch it, so later polls within this call agree.
        atomic_store(&ctx->abort_flag, 1);
        return 1;
    }
    return 0;
}

void mf_ctx_abort(mf_ctx *ctx) {
    if (ctx)
        atomic_store(&ctx->abort_flag, 1);
}

int mf_ctx_eval(mf_ctx *ctx, const int32_t *tokens, int n_tokens, float *logits,
                int all_logits) {
    if (!ctx)
        return MF_ERR_ARG;
    ctx->errmsg[0] = '\0';
    if (!tokens || n_tokens < 1)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "eval: need at least one token (got %d)",
                           n_tokens);
    if ((int64_t)ctx->n_past + n_tokens > ctx->n_ctx)
        return mf_ctx_fail(ctx, MF_ERR_ARG,
                           "eval: %d tokens after %d would exceed n_ctx = %d", n_tokens,
                           ctx->n_past, ctx->n_ctx);
    int n_vocab = ctx->model->cfg.vocab_size;
    for (int i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= n_vocab)
            return mf_ctx_fail(ctx, MF_ERR_ARG,
                               "eval: token %d at index %d is outside the vocabulary [0, %d)",
                               tokens[i], i, n_vocab);
    if (mf_weights_check(ctx->model, ctx->errmsg, sizeof ctx->errmsg) != MF_OK)
        return MF_ERR_IO;
    atomic_store(&ctx->abort_flag, 0);
    ctx->n_evals++;
    double t0 = mf_now_s();
    int rc = ctx->model->arch->forward(ctx, tokens, n_tokens, logits, all_logits ? 1 : 0);
    if (rc == MF_OK) {
        // queued work that failed on the device (a GPU launch or copy) surfaces here
        char msg[512];
        int st = ctx->be->ops->status(ctx->ex, msg, sizeof msg);
        if (st != MF_OK)
            rc = mf_ctx_fail(ctx, st, "eval: backend %s: %s", ctx->be->ops->name, msg);
    }
    ctx->stats.compute_s += mf_now_s() - t0;
    if (rc == MF_OK) {
        ctx->n_past += n_tokens;
        ctx->stats.n_tokens_evaluated += n_tokens;
        mf_state_after_eval(ctx);
    } else if (!ctx->errmsg[0]) {
        mf_ctx_fail(ctx, rc, "eval: %s", mf_strerror(rc));
    }
    return rc;
}

void mf_ctx_reset(mf_ctx *ctx) {
    if (!ctx)
        return;
    ctx->model->arch->state_reset(ctx);
    mf_state_on_reset(ctx);
    ctx->n_past = 0;
    ctx->errmsg[0] = '\0';
    atomic_store(&ctx->abort_flag, 0);
}

/* ==== Getters and statistics ==== */

int mf_model_n_vocab(const mf_model *m) { return m->cfg.vocab_size; }
int mf_model_n_layer(const mf_model *m) { return m->cfg.num_hidden_layers; }
int mf_model_n_embd(const mf_model *m) { return m->cfg.hidden_size; }
int mf_model_n_ctx_train(const mf_model *m) { return m->cfg.max_position_embeddings; }
const char *mf_model_arch(const mf_model *m) { return m->cfg.model_type; }
const char *mf_model_backend(const mf_model *m) { return m->be->ops->name; }
int mf_model_bos(const mf_model *m) { return m->cfg.bos_token_id; }
int mf_model_eos(const mf_model *m) { return m->cfg.eos_token_id; }
int64_t mf_model_expert_bytes_per_token(const mf_model *m) {
    return m->expert_bytes_per_token;
}
const char *mf_model_config_json(const mf_model *m) { return m->cfg.json_text; }

int mf_ctx_n_past(const mf_ctx *ctx) { return ctx->n_past; }
int mf_ctx_n_ctx(const mf_ctx *ctx) { return ctx->n_ctx; }
const mf_model *mf_ctx_model(const mf_ctx *ctx) { return ctx->model; }
const char *mf_ctx_errmsg(const mf_ctx *ctx) { return ctx ? ctx->errmsg : ""; }

void mf_ctx_stats_get(const mf_ctx *ctx, struct mf_ctx_stats *out) {
    *out = ctx->stats;
    snprintf(out->io_mode, sizeof out->io_mode, "%s", ctx->io_mode_in_effect);
    snprintf(out->io_note, sizeof out->io_note, "%s", ctx->io_note);
}

void mf_ctx_stats_reset(mf_ctx *ctx) {
    memset(&ctx->stats, 0, sizeof ctx->stats);
}
