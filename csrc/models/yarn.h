/*
 * yarn.h — YaRN rope scaling, shared by the families that use it (deepseek_v3,
 * gpt_oss): the rope_scaling block, the attention-scale factor and the correction
 * range over which the frequencies ramp (mlx-lm's YarnRoPE, HF's
 * _compute_yarn_parameters). Each family blends its frequencies over that range in
 * its own reference's arithmetic (deepseek_v3 in double, gpt_oss in float as mlx-lm's
 * YarnRoPE), so the blend stays in the family's file.
 */
#ifndef MF_MODELS_YARN_H
#define MF_MODELS_YARN_H

#include "core/config.h"

struct mf_yarn {
    int on;                         // rope_scaling type (or rope_type) is "yarn"
    double factor;
    double beta_fast, beta_slow;    // defaults 32, 1
    double mscale, mscale_all_dim;  // defaults 1, 0
    double orig_max_pos;            // original_max_position_embeddings
};

// Reads config.json's rope_scaling into *y (on = 0 when absent or of another type).
// *type gets the block's type string (NULL when there is none), for the family to
// refuse the types it does not run. orig_default: the original_max_position_embeddings
// taken when the key is absent; 0 makes it required (a positive integer).
int mf_yarn_read(struct mf_yarn *y, const struct mf_cfg_reader *r, double orig_default,
                 const char **type);

struct mf_ident_field;
// Appends the block's six numbers (factor, beta_fast, beta_slow, mscale,
// mscale_all_dim, original_max_position_embeddings) to a family's snapshot identity
// (models/arch_config.h); whether yarn is on is the family's own field.
void mf_yarn_ident(const struct mf_yarn *y, struct mf_ident_field *out, int *n, int cap);

// 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
float mf_yarn_get_mscale(double scale, double mscale);

// The ramp of rotary pair j runs from *low (1 below it: extrapolated) to *high (1 above
// it: interpolated), for dims rotated dimensions at rope base `base`.
void mf_yarn_range(const struct mf_yarn *y, int dims, double base, double *low,
                   double *high);

#endif
