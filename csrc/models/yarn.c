/*
 * yarn.c — YaRN rope scaling shared by the families (yarn.h).
 */
#include "models/yarn.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core/common.h"
#include "models/arch_config.h"

static int read_orig(struct mf_yarn *y, const struct mf_cfg_reader *r, const mf_json *rs,
                     double orig_default) {
    if (orig_default > 0) {
        y->orig_max_pos = orig_default;
        return mf_cfg_num_in(r, rs, "original_max_position_embeddings", &y->orig_max_pos);
    }
    int64_t orig = 0;
    if (mf_json_get_int(rs, "original_max_position_embeddings", &orig) != 1 || orig <= 0 ||
        orig > INT32_MAX)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: yarn rope_scaling needs a positive integer "
                      "\"original_max_position_embeddings\"", r->name);
    y->orig_max_pos = (double)orig;
    return 0;
}

static int check_yarn(const struct mf_yarn *y, const struct mf_cfg_reader *r) {
    if (!(y->factor > 0) || !(y->orig_max_pos > 0) || !(y->beta_fast > 0) ||
        !(y->beta_slow > 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: yarn rope_scaling needs a positive factor, beta_fast, beta_slow "
                      "and original_max_position_embeddings (got %g, %g, %g, %g)", r->name,
                      y->factor, y->beta_fast, y->beta_slow, y->orig_max_pos);
    return 0;
}

int mf_yarn_read(struct mf_yarn *y, const struct mf_cfg_reader *r, double orig_default,
                 const char **type) {
    memset(y, 0, sizeof *y);
    *type = NULL;
    const mf_json *rs = mf_cfg_node(r, "rope_scaling");
    if (!rs || rs->type == MF_JSON_NULL)
        return 0;
    // HF wrote "type" in older configs and "rope_type" in newer ones.
    if (rs->type != MF_JSON_OBJECT || mf_json_get_str(rs, "type", type) < 0 ||
        (!*type && mf_json_get_str(rs, "rope_type", type) < 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: rope_scaling must be an object whose type (or rope_type) is a "
                      "string", r->name);
    if (!*type || strcmp(*type, "yarn") != 0)
        return 0;
    *y = (struct mf_yarn){.on = 1, .beta_fast = 32, .beta_slow = 1, .mscale = 1};
    int rc;
    if ((rc = mf_cfg_num_in(r, rs, "factor", &y->factor)) ||
        (rc = mf_cfg_num_in(r, rs, "beta_fast", &y->beta_fast)) ||
        (rc = mf_cfg_num_in(r, rs, "beta_slow", &y->beta_slow)) ||
        (rc = mf_cfg_num_in(r, rs, "mscale", &y->mscale)) ||
        (rc = mf_cfg_num_in(r, rs, "mscale_all_dim", &y->mscale_all_dim)) ||
        (rc = read_orig(y, r, rs, orig_default)))
        return rc;
    return check_yarn(y, r);
}

float mf_yarn_get_mscale(double scale, double mscale) {
    return scale <= 1.0 ? 1.0f : (float)(0.1 * mscale * log(scale) + 1.0);
}

static double correction_dim(double n_rot, int dims, double base, double l0) {
    return dims * log(l0 / (n_rot * 2.0 * M_PI)) / (2.0 * log(base));
}

void mf_yarn_range(const struct mf_yarn *y, int dims, double base, double *low,
                   double *high) {
    *low = floor(correction_dim(y->beta_fast, dims, base, y->orig_max_pos));
    *high = ceil(correction_dim(y->beta_slow, dims, base, y->orig_max_pos));
    *low = *low < 0 ? 0 : *low;
    *high = *high > dims - 1 ? dims - 1 : *high;
    if (*low == *high)
        *high += 0.001;   // as mlx-lm: no zero-width ramp
}

void mf_yarn_ident(const struct mf_yarn *y, struct mf_ident_field *out, int *n, int cap) {
    mf_ident_float(out, n, cap, "yarn factor", y->factor);
    mf_ident_float(out, n, cap, "yarn beta_fast", y->beta_fast);
    mf_ident_float(out, n, cap, "yarn beta_slow", y->beta_slow);
    mf_ident_float(out, n, cap, "yarn mscale", y->mscale);
    mf_ident_float(out, n, cap, "yarn mscale_all_dim", y->mscale_all_dim);
    mf_ident_float(out, n, cap, "yarn original_max_position_embeddings", y->orig_max_pos);
}
