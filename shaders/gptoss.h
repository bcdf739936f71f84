/*
 * gptoss.h — the kernels gpt-oss adds, for CUDA and Metal alike (called by both drivers'
 * matmul and swiglu_clamped; make test-cuda's test_backend_ops checks them against the
 * CPU; the model's experts run in moe.h's grouped kernels):
 *   mf_mv_mxfp4: y[t, r] = x[t] . W[r] for an MXFP4 weight (MLX mode "mxfp4": 4-bit
 *     E2M1 codes packed LSB-first, one E8M0 scale byte per 32 columns, no biases), a
 *     warp per row, each lane taking whole words of eight codes (mf_mxfp4_tile of
 *     quant.h, which the grouped expert kernels use too). Every weight
 *     e2m1(q) * 2^(e - 127) is formed exactly (as on the CPU,
 *     csrc/backends/cpu/cpu_mxfp4.c), so only the summation order differs from the CPU
 *     backend.
 *   mf_swiglu_clamped: (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
 *     g = min(gate, limit) (mlx-lm swiglu_oai), laid out as mf_swiglu.
 */
#ifndef MF_GPTOSS_H
#define MF_GPTOSS_H

#include "quant.h"

MF_KERNEL(mf_mv_mxfp4)
MF_BUF(0, float, y)
MF_BUF(1, const mf_u32, w)
MF_BUF(2, const mf_u8, sc)
MF_BUF(3, const float, x)
MF_PARAMS(4, struct mf_p_mxfp4, p) {
    mf_dep_wait();
    const int row = MF_TG_X * MF_MV_ROWS + MF_WARP, t0 = MF_TG_Y * MF_MV_TT;
    if (row >= p.n_out)
        return;
    MF_G const mf_u32 *wr = w + (mf_i64)row * (p.n_in / 8);
    MF_G const mf_u8 *sr = sc + (mf_i64)row * (p.n_in / 32);
    float acc[MF_MV_TT];
#pragma unroll
    for (int t = 0; t < MF_MV_TT; t++)
        acc[t] = 0.0f;
    mf_mxfp4_tile<MF_MV_TT>(acc, wr, sr, p.n_in, x + (mf_i64)t0 * p.x_stride, p.x_stride,
                            p.n_tok - t0, MF_LANE);
#pragma unroll
    for (int t = 0; t < MF_MV_TT; t++) {
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1)
            v += mf_shfl_xor(v, o);
        if (MF_LANE == 0 && t0 + t < p.n_tok)
            y[(mf_i64)(t0 + t) * p.y_stride + row] = v;
    }
}

MF_KERNEL(mf_swiglu_clamped)
MF_BUF(0, float, y)
MF_BUF(1, const float, gate)
MF_BUF(2, const float, up)
MF_PARAMS(3, struct mf_p_swiglu_clamped, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id >= (mf_i64)p.n_rows * p.n_cols)
        return;
    const mf_i64 r = id / p.n_cols, c = id % p.n_cols;
    const float gi = gate[r * p.stride + c], ui = up[r * p.stride + c];
    const float g = gi < p.limit ? gi : p.limit;
    const float u = ui < -p.limit ? -p.limit : ui > p.limit ? p.limit : ui;
    y[id] = (u + 1.0f) * (g * mf_sigmoid(p.alpha * g));
}

#endif /* MF_GPTOSS_H */
