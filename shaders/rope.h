/*
 * rope.h — rotary embedding in place: a thread per (token, head, rotated pair), both
 * pairings ((2j, 2j+1) traditional, (j, j + n_rot/2) otherwise), partial n_rot, and
 * mscale applied to the rotated values before the rotation (YaRN).
 */
#ifndef MF_ROPE_H
#define MF_ROPE_H

#include "mf_prelude.h"
#include "mf_params.h"

MF_KERNEL(mf_rope)
MF_BUF(0, float, x)
MF_BUF(1, const float, inv_freq)
MF_PARAMS(2, struct mf_p_rope, p) {
    const int half = p.n_rot / 2;
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (half <= 0 || id >= (mf_i64)p.n_tok * p.n_heads * half)
        return;
    const int i = (int)(id % half);
    const mf_i64 th = id / half;
    const int hh = (int)(th % p.n_heads), t = (int)(th / p.n_heads);
    // f32 position times f32 inverse frequency, as mlx computes the angle.
    const float theta = (float)(p.pos0 + t) * inv_freq[i];
    const float c = mf_cos(theta), s = mf_sin(theta);
    const int i1 = p.traditional ? 2 * i : i, i2 = p.traditional ? 2 * i + 1 : i + half;
    MF_G float *xh = x + (mf_i64)t * p.tok_stride + (mf_i64)hh * p.head_stride;
    const float a = p.mscale * xh[i1], b = p.mscale * xh[i2];
    xh[i1] = a * c - b * s;
    xh[i2] = a * s + b * c;
}

#endif /* MF_ROPE_H */
