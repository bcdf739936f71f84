/*
 * gptoss.h — the kernels gpt-oss adds, for CUDA and Metal alike (called by both drivers'
 * matmul and swiglu_clamped; compiled by NVRTC and syntax-checked for Metal here, not
 * yet run on a GPU: make test-cuda's test_backend_ops has their cases):
 *   mf_mv_mxfp4: y[t, r] = x[t] . W[r] for an MXFP4 weight (MLX mode "mxfp4": 4-bit
 *     E2M1 codes packed LSB-first, one E8M0 scale byte per 32 columns, no biases), a
 *     warp per row, each lane taking whole words of eight codes; the decode matvec of
 *     gpt-oss's experts and its small batches. Every weight e2m1(q) * 2^(e - 127) is
 *     formed exactly (as on the CPU, csrc/backends/cpu/cpu_mxfp4.c), so only the
 *     summation order differs from the CPU backend.
 *   mf_swiglu_clamped: (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
 *     g = min(gate, limit) (mlx-lm swiglu_oai), laid out as mf_swiglu.
 */
#ifndef MF_GPTOSS_H
#define MF_GPTOSS_H

#include "mf_prelude.h"
#include "mf_params.h"

// The E2M1 value of code q (bit 3 the sign, bits 2-1 the exponent, bit 0 the
// mantissa), built as its f32 bit pattern: exponent 0 is 0 or 0.5, exponent e > 0 is
// 2^(e-1) * (1 + m/2).
MF_FN float mf_e2m1(mf_u32 q) {
    const mf_u32 e = (q >> 1) & 3u, m = q & 1u;
    const mf_u32 mag = e == 0u ? (m ? 0x3f000000u : 0u) : ((e + 126u) << 23) | (m << 22);
    return mf_as_float(mag | ((q & 8u) << 28));
}

// The scale of an E8M0 byte as MLX decodes it: 2^(s - 127), s = 0 the subnormal
// 2^-127, s = 255 +inf.
MF_FN float mf_e8m0(mf_u32 s) {
    if (s == 255u)
        return MF_INF;
    return mf_as_float(s ? s << 23 : 0x00400000u);
}

MF_KERNEL(mf_mv_mxfp4)
MF_BUF(0, float, y)
MF_BUF(1, const mf_u32, w)
MF_BUF(2, const mf_u8, sc)
MF_BUF(3, const float, x)
MF_PARAMS(4, struct mf_p_mxfp4, p) {
    const int row = MF_TG_X * MF_MV_ROWS + MF_WARP, t0 = MF_TG_Y * MF_MV_TT;
    if (row >= p.n_out)
        return;
    const int n_word = p.n_in / 8;
    MF_G const mf_u32 *wr = w + (mf_i64)row * n_word;
    MF_G const mf_u8 *sr = sc + (mf_i64)row * (p.n_in / 32);
    float acc[MF_MV_TT];
#pragma unroll
    for (int t = 0; t < MF_MV_TT; t++)
        acc[t] = 0.0f;
    for (int i = MF_LANE; i < n_word; i += 32) {
        const mf_u32 word = wr[i];
        const float s = mf_e8m0((mf_u32)sr[i / 4]);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float wv = mf_e2m1((word >> (4 * k)) & 15u) * s;
#pragma unroll
            for (int t = 0; t < MF_MV_TT; t++)
                if (t0 + t < p.n_tok)
                    acc[t] = mf_fma(x[(mf_i64)(t0 + t) * p.x_stride + i * 8 + k], wv, acc[t]);
        }
    }
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
