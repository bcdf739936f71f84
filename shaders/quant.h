/*
 * quant.h — reading weights: float tensors of any dtype, MLX affine-quantized codes
 * (model-math §1: w = s*q + b per group of group_size columns, codes packed LSB-first
 * as one bit stream per row), and the per-warp row dots that matvec-shaped kernels
 * share. Float weights: every term is x * w in f32, as the CPU backend computes it; only
 * the summation order differs. Quantized rows in the row dots: per 32-column chunk,
 * s * sum(x q) + b * sum(x) (exact codes, fused multiply-adds), the same value in
 * exact arithmetic, within the reordering bound of the op tests.
 */
#ifndef MF_QUANT_H
#define MF_QUANT_H

#include "mf_prelude.h"
#include "mf_params.h"

// Element i of a float tensor of dtype dt (F32, F16 or BF16) as f32.
MF_FN float mf_load(MF_G const mf_u32 *p, int dt, mf_i64 i) {
    if (dt == MF_SH_F32)
        return mf_as_float(p[i]);
    mf_u32 h = ((MF_G const mf_u16 *)p)[i];
    return dt == MF_SH_BF16 ? mf_bf16_to_f32(h) : mf_f16_to_f32(h);
}

// Code c of the quantized row whose bit stream starts at word row_word; a code of 3,
// 5 or 6 bits may straddle two words.
MF_FN mf_u32 mf_code_at(MF_G const mf_u32 *w, mf_i64 row_word, int bits, int c) {
    mf_i64 bit = (mf_i64)c * bits;
    MF_G const mf_u32 *p = w + row_word + (bit >> 5);
    int sh = (int)(bit & 31);
    mf_u32 v = p[0] >> sh;
    if (sh + bits > 32)
        v |= p[1] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

// W[row, c] as f32 (row counted over the whole tensor).
MF_FN float mf_w_at(MF_G const mf_u32 *w, MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                    int dtype, int sdtype, int bits, int gs, int n_in, mf_i64 row, int c) {
    if (dtype != MF_SH_U32)
        return mf_load(w, dtype, row * n_in + c);
    mf_i64 sg = row * (n_in / gs) + c / gs;
    float s = mf_load(sc, sdtype, sg), b = mf_load(bi, sdtype, sg);
    return s * (float)mf_code_at(w, row * (n_in / 32) * bits, bits, c) + b;
}

// acc[t] += sum_c x[t*x_stride + c] * W[row, c] over this lane's share of the row, for
// t < nt (<= NT, the register tile), for a float weight: lanes stride over columns.
template <int NT>
MF_FN void mf_fdot_tile(MF_TH float *acc, MF_G const mf_u32 *w, int dtype, int n_in,
                        mf_i64 row, MF_G const float *x, int x_stride, int nt, int lane) {
    for (int i = lane; i < n_in; i += 32) {
        const float wv = mf_load(w, dtype, row * n_in + i);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < nt)
                acc[t] += x[(mf_i64)t * x_stride + i] * wv;
    }
}

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

// acc[t] += x[t] . W[row] for t < nt (<= NT) over this lane's share of an MXFP4 row
// (codes wr, E8M0 scale bytes sr): lanes take whole words of eight codes, each weight
// e2m1(q) * 2^(e - 127) formed exactly, as on the CPU.
template <int NT>
MF_FN void mf_mxfp4_tile(MF_TH float *acc, MF_G const mf_u32 *wr, MF_G const mf_u8 *sr,
                         int n_in, MF_G const float *x, int x_stride, int nt, int lane) {
    for (int i = lane; i < n_in / 8; i += 32) {
        const mf_u32 word = wr[i];
        const float s = mf_e8m0((mf_u32)sr[i / 4]);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float wv = mf_e2m1((word >> (4 * k)) & 15u) * s;
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt)
                    acc[t] = mf_fma(x[(mf_i64)t * x_stride + i * 8 + k], wv, acc[t]);
        }
    }
}

// Values a thread of the row and combine kernels loads at once: the loads of a block
// are issued together, so one memory latency covers them, where a loop whose stores
// may alias its loads (or whose addresses come from loads) pays one per element.
#define MF_VB 8

// v[k] = p[i0 + lt + k * nt] where that is below n (0 elsewhere).
MF_FN void mf_row_load(MF_TH float *v, MF_G const float *p, int i0, int lt, int nt, int n) {
#pragma unroll
    for (int k = 0; k < MF_VB; k++) {
        const int i = i0 + lt + k * nt;
        v[k] = i < n ? p[i] : 0.0f;
    }
}

// Sum / max over a threadgroup of MF_THREADS threads: warp butterflies, then the
// warps' results in warp order, so every thread gets the same value in a fixed order.
// red holds MF_THREADS / 32 floats; both end with a barrier so red can be reused.
MF_FN float mf_block_sum(float v, MF_TG float *red, int lt) {
    v = mf_warp_sum(v);
    if ((lt & 31) == 0)
        red[lt >> 5] = v;
    MF_BARRIER();
    float s = 0.0f;
    for (int i = 0; i < MF_THREADS / 32; i++)
        s += red[i];
    MF_BARRIER();
    return s;
}

// 1 / sqrt(mean(x^2) + eps) of a row of n values from the threads' partial sums of
// squares ss (RMSNorm's scale; every norm kernel takes it from here, so they agree bit
// for bit). Ends with a barrier, as mf_block_sum.
MF_FN float mf_rms_inv(float ss, MF_TG float *red, int lt, int n, float eps) {
    ss = mf_block_sum(ss, red, lt);
    return 1.0f / mf_sqrt(ss / (float)n + eps);
}

MF_FN float mf_block_max(float v, MF_TG float *red, int lt) {
    v = mf_warp_max(v);
    if ((lt & 31) == 0)
        red[lt >> 5] = v;
    MF_BARRIER();
    float m = red[0];
    for (int i = 1; i < MF_THREADS / 32; i++)
        m = red[i] > m ? red[i] : m;
    MF_BARRIER();
    return m;
}

// The input RMSNorm a one-token row dot takes of x as it stages it (mf_mv_multi1n):
// x[i] * inv * g[i] (g where has_g), inv from mf_xnorm_inv. mf_rmsnorm writes
// x * inv * g * scale with the same sum of squares, and at scale 1 (times 1 is exact)
// that is the same value, so the staged x is, bit for bit, what staging its output held.
// out: where the normalised x goes too (one threadgroup's, 0 in the others).
struct mf_xnorm {
    MF_G const mf_u32 *g;
    MF_G float *out;
    int g_dtype, has_g;
    float eps, inv;
};

MF_FN struct mf_xnorm mf_xnorm_none() {
    struct mf_xnorm nm = {0, 0, 0, 0, 0.0f, 0.0f};
    return nm;
}

// mf_rms_inv of x[0 .. n) over MF_THREADS threads: thread lt sums x[lt], x[lt +
// MF_THREADS], ... in that order, as mf_rmsnorm's threads do (red: MF_THREADS / 32
// floats of threadgroup memory; ends with a barrier).
MF_FN float mf_xnorm_inv(MF_G const float *x, int n, float eps, MF_TG float *red, int lt) {
    float ss = 0.0f, xv[MF_VB];
    for (int i0 = 0; i0 < n; i0 += MF_VB * MF_THREADS) {
        mf_row_load(xv, x, i0, lt, MF_THREADS, n);
#pragma unroll
        for (int k = 0; k < MF_VB; k++)
            if (i0 + lt + k * MF_THREADS < n)
                ss += xv[k] * xv[k];
    }
    return mf_rms_inv(ss, red, lt, n, eps);
}

// Element i of the normalised x, given v = x[i] and gi = g[i] (read where has_g).
MF_FN float mf_xnorm_at(MF_TH const struct mf_xnorm *nm, float v, float gi) {
    v = v * nm->inv;
    return nm->has_g ? v * gi : v;
}

// Columns of x staged per step by the row-dot kernels, and the padded threadgroup
// tile they use: x[t] is held as 32 chunks of 32 values at stride MF_XS_PAD (36), so
// lane l reads values k .. k + 3 of its chunk l in one 16-byte load, and the eight
// lanes of each quarter warp hit banks 4l + k .. 4l + k + 3 (no conflicts).
#define MF_XS_COLS 1024
#ifndef MF_XS_VEC
#define MF_XS_VEC 1
#endif
#define MF_XS_PAD (MF_XS_VEC ? 36 : 33)
#define MF_XS_TOK (32 * MF_XS_PAD)
#define MF_XS_FLOATS (MF_MV_TT * MF_XS_TOK)
// Threads of a row-dot threadgroup (the grids launch MF_MV_ROWS warps).
#define MF_MV_THREADS (32 * MF_MV_ROWS)

// The R weight rows one warp dots with the staged x: codes of row r start at word
// w[r] (its chunk c at w[r] + c * BITS), its scales / biases at element s0[r] of sc /
// bi; a float row is row s0[r] of the tensor at w[r]. vec: every w[r] is 16-byte aligned (then a lane's BITS words load in one or two
// wide loads when BITS is 2, 4 or 8).
struct mf_rows {
    MF_G const mf_u32 *w[MF_MV_RPW];
    MF_G const mf_u32 *sc[MF_MV_RPW];
    MF_G const mf_u32 *bi[MF_MV_RPW];
    mf_i64 s0[MF_MV_RPW];
    int n;      // live rows, 0..R
    int vec;
};

// Lane chunk c of a row: BITS words, in wide loads where the alignment allows.
template <int BITS>
MF_FN void mf_load_chunk(MF_TH mf_u32 *wd, MF_G const mf_u32 *p, int vec) {
    if (vec && (BITS == 4 || BITS == 8)) {
        for (int i = 0; i < BITS; i += 4)
            mf_ld4(wd + i, p + i);
    } else if (vec && BITS == 2) {
        mf_ld2(wd, p);
    } else {
        for (int i = 0; i < BITS; i++)
            wd[i] = p[i];
    }
}

// Code k (0..31) of a lane's chunk as an exact f32: the code goes into the mantissa of
// 2^23 and 2^23 is taken off again (integer-to-float conversion runs at a quarter of
// the rate of these two operations on current NVIDIA GPUs).
#ifndef MF_CODE_PRMT
#define MF_CODE_PRMT 1
#endif
// Widths of 2, 4 and 8 bits: the word's codes split into BITS byte planes (plane p:
// bits p*BITS .. of every byte), each code a byte of its plane put into that mantissa
// by one byte permute (mf_byte_f; the same value).
template <int BITS>
MF_FN float mf_code_f(MF_TH const mf_u32 *wd, int k) {
    if (MF_CODE_PRMT && (BITS == 2 || BITS == 4 || BITS == 8)) {
        const int per = 32 / BITS, n = k % per, planes = 8 / BITS;
        const mf_u32 w = wd[k / per];
        const mf_u32 m = BITS == 8 ? 0xffffffffu : BITS == 4 ? 0x0f0f0f0fu : 0x03030303u;
        return mf_byte_f((w >> ((n % planes) * BITS)) & m, n / planes);
    }
    const int bit = k * BITS, wi = bit >> 5, sh = bit & 31;
    mf_u32 v = wd[wi] >> sh;
    if (sh + BITS > 32)
        v |= wd[wi + 1] << (32 - sh);
    return mf_as_float(0x4b000000u | (v & ((1u << BITS) - 1u))) - 8388608.0f;
}

// A lane's codes and group parameters for chunk c of every row (zeros where c or the
// row is past the end).
template <int BITS, int R>
MF_FN void mf_load_rows(MF_TH mf_u32 (*wd)[BITS], MF_TH float *s, MF_TH float *b,
                        MF_TH const struct mf_rows *rw, int sdtype, int gs, int c,
                        int n_chunk) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int on = c < n_chunk && r < rw->n;
        if (on) {
            mf_load_chunk<BITS>(wd[r], rw->w[r] + (mf_i64)c * BITS, rw->vec);
        } else {
#pragma unroll
            for (int i = 0; i < BITS; i++)
                wd[r][i] = 0u;
        }
        const mf_i64 g = rw->s0[r] + (on ? (c << 5) / gs : 0);
        s[r] = on ? mf_load(rw->sc[r], sdtype, g) : 0.0f;
        b[r] = on ? mf_load(rw->bi[r], sdtype, g) : 0.0f;
    }
}

// acc[r * MF_MV_TT + t] += s * sum(x q) + b * sum(x) over one 32-column chunk: codes
// wd, x of token t at xt[t * tok_stride + k] (threadgroup memory).
template <int BITS, int NT, int R>
MF_FN void mf_chunk_dot(MF_TH float *acc, MF_TH const mf_u32 (*wd)[BITS],
                        MF_TH const float *s, MF_TH const float *b, MF_TG const float *xt,
                        int tok_stride, int nt) {
    float dq[R * NT], sx[NT];
#pragma unroll
    for (int i = 0; i < R * NT; i++)
        dq[i] = 0.0f;
#pragma unroll
    for (int t = 0; t < NT; t++)
        sx[t] = 0.0f;
    float x4[NT][4];
#pragma unroll
    for (int k = 0; k < 32; k++) {
        float xv[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (MF_XS_VEC && k % 4 == 0)
                mf_lds4(x4[t], xt + t * tok_stride + k, t < nt);
            xv[t] = MF_XS_VEC ? x4[t][k % 4] : t < nt ? xt[t * tok_stride + k] : 0.0f;
            sx[t] += xv[t];
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float q = mf_code_f<BITS>(wd[r], k);
#pragma unroll
            for (int t = 0; t < NT; t++)
                dq[r * NT + t] = mf_fma(xv[t], q, dq[r * NT + t]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[r * MF_MV_TT + t] += s[r] * dq[r * NT + t] + b[r] * sx[t];
}

// Quantized dots of R rows with NT tokens of x (the register tile MF_MV_TT with nt <=
// NT live; one token takes mf_qdot_rows1 below): acc[r * MF_MV_TT + t] += W[r] . x[t]
// over this lane's chunks. A lane takes 32-column chunks (BITS whole words, never
// split across groups since groups are multiples of 32); each x value serves all R
// rows from a register. Per step of MF_XS_COLS columns: the lane's codes and group parameters of
// the step are loaded first, then x of every token is staged through threadgroup
// memory (coalesced loads, all of a thread's in flight before its stores; each lane
// then reads its 32 values without bank conflicts), so the weight bytes travel while
// x is staged and the barrier waits. Per chunk the lane sums x * q over its 32 codes
// and once per row adds s * sum(x q) + b * sum(x). Every thread of the threadgroup
// calls it (barriers); a warp without rows passes rw->n = 0. Measured on the H200 at
// decode shapes: loading two steps' codes ahead, or four, was no faster.
template <int BITS, int NT, int R>
MF_FN void mf_qdot_rows(MF_TH float *acc, MF_TG float *xs, MF_TH const struct mf_rows *rw,
                        int sdtype, int gs, int n_in, MF_G const float *x, int x_stride,
                        int nt, int lt, int lane) {
    const int PER = MF_XS_COLS / MF_MV_THREADS, n_chunk = n_in >> 5, on = rw->n > 0;
    mf_u32 wd[R][BITS];
    float s[R], b[R], xr[NT * PER];
    for (int c0 = 0; c0 < n_in; c0 += MF_XS_COLS) {
        const int c = (c0 >> 5) + lane;
        if (on)
            mf_load_rows<BITS, R>(wd, s, b, rw, sdtype, gs, c, n_chunk);
        if (c0 == 0)
            mf_dep_wait();   // the first step's codes load while the kernel before ends
#pragma unroll
        for (int i = 0; i < NT * PER; i++) {
            const int t = i / PER, k = lt + (i % PER) * MF_MV_THREADS;
            xr[i] = t < nt && c0 + k < n_in ? x[(mf_i64)t * x_stride + c0 + k] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < NT * PER; i++) {
            const int t = i / PER, k = lt + (i % PER) * MF_MV_THREADS;
            xs[t * MF_XS_TOK + (k >> 5) * MF_XS_PAD + (k & 31)] = xr[i];
        }
        MF_BARRIER();
        if (on && c < n_chunk)
            mf_chunk_dot<BITS, NT, R>(acc, wd, s, b, xs + lane * MF_XS_PAD, MF_XS_TOK, nt);
        MF_BARRIER();
    }
}

// Chunks a lane of a one-token row dot takes per step. One: loading two or four
// chunks a step before dotting them measured slower where the registers it takes cost
// warps in flight (H100, session 13: four chunks, q_proj 6.5 -> 9.3 us and the experts
// 35 -> 44.5 us; two, on rows of 4-bit codes only, the lm_head 147 -> 168 us and the
// whole decode step 733 -> 714 tok/s). Kept as a parameter for other GPUs.
#define MF_CH1(BITS, R) 1

// The N staged values xr[i] of columns c0 + lt + i * MF_MV_THREADS normalised in place,
// given their gains gv (and written to nm->out where set). The loads (x, the gains) all
// come before the first store to nm->out, which may alias them for all the compiler
// knows (session 22 thought that order the cost of the fused q/k/v product; session 23
// found the cost elsewhere, a copy of its parameters to local memory: mf_multi_seg).
template <int N>
MF_FN void mf_xnorm_apply(MF_TH float *xr, MF_TH const float *gv,
                          MF_TH const struct mf_xnorm *nm, int c0, int n_in, int lt) {
#pragma unroll
    for (int i = 0; i < N; i++)
        if (c0 + lt + i * MF_MV_THREADS < n_in)
            xr[i] = mf_xnorm_at(nm, xr[i], gv[i]);
    if (nm->out) {
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int c = c0 + lt + i * MF_MV_THREADS;
            if (c < n_in)
                nm->out[c] = xr[i];
        }
    }
}

// The gains of those N columns (1 past n_in or without gains).
template <int N>
MF_FN void mf_xnorm_gains(MF_TH float *gv, MF_TH const struct mf_xnorm *nm, int c0, int n_in,
                          int lt) {
#pragma unroll
    for (int i = 0; i < N; i++) {
        const int c = c0 + lt + i * MF_MV_THREADS;
        gv[i] = nm->has_g && c < n_in ? mf_load(nm->g, nm->g_dtype, c) : 1.0f;
    }
}

template <int N>
MF_FN void mf_xnorm_stage(MF_TH float *xr, MF_TH const struct mf_xnorm *nm, int c0, int n_in,
                          int lt) {
    float gv[N];
    mf_xnorm_gains<N>(gv, nm, c0, n_in, lt);
    mf_xnorm_apply<N>(xr, gv, nm, c0, n_in, lt);
}

// mf_qdot_rows for one token, with CH = MF_CH1(BITS, R) chunks per lane per step: the
// step's codes and group parameters of every chunk are loaded first, then CH tiles of
// x are staged (xs holds a tile per token in the tile path, a tile of the step's
// columns here) behind one barrier, then the chunks are dotted in column order. A
// lane's chunks, and the operations on each, are those of mf_qdot_rows with NT = 1 in
// the same order (the same bits). With CH = 1 it is that path without the token
// tile's loop and bounds, for which ptxas makes shorter code (the 151936-row lm_head
// 160 -> 147 us on the H100).
template <int BITS, int R, int NORM>
MF_FN void mf_qdot_rows1(MF_TH float *acc, MF_TG float *xs, MF_TH const struct mf_rows *rw,
                         int sdtype, int gs, int n_in, MF_G const float *x,
                         struct mf_xnorm nm, int lt, int lane) {
    const int CH = MF_CH1(BITS, R), PER = MF_XS_COLS / MF_MV_THREADS;
    const int n_chunk = n_in >> 5, on = rw->n > 0;
    mf_u32 wd[CH][R][BITS];
    float s[CH][R], b[CH][R], xr[CH * PER];
    for (int c0 = 0; c0 < n_in; c0 += CH * MF_XS_COLS) {
        if (on) {
#pragma unroll
            for (int j = 0; j < CH; j++)
                mf_load_rows<BITS, R>(wd[j], s[j], b[j], rw, sdtype, gs,
                                      (c0 >> 5) + 32 * j + lane, n_chunk);
        }
        if (c0 == 0) {
            mf_dep_wait();
            if (NORM)   // xs is free: the first staging comes after mf_rms_inv's barrier
                nm.inv = mf_xnorm_inv(x, n_in, nm.eps, xs, lt);
        }
#pragma unroll
        for (int i = 0; i < CH * PER; i++) {
            const int k = lt + i * MF_MV_THREADS;
            xr[i] = c0 + k < n_in ? x[c0 + k] : 0.0f;
        }
        if (NORM)
            mf_xnorm_stage<CH * PER>(xr, &nm, c0, n_in, lt);
#pragma unroll
        for (int i = 0; i < CH * PER; i++) {
            const int k = lt + i * MF_MV_THREADS;
            xs[(k >> 10) * MF_XS_TOK + ((k >> 5) & 31) * MF_XS_PAD + (k & 31)] = xr[i];
        }
        MF_BARRIER();
        if (on) {
#pragma unroll
            for (int j = 0; j < CH; j++)
                if ((c0 >> 5) + 32 * j + lane < n_chunk)
                    mf_chunk_dot<BITS, 1, R>(acc, wd[j], s[j], b[j],
                                             xs + j * MF_XS_TOK + lane * MF_XS_PAD, MF_XS_TOK, 1);
        }
        MF_BARRIER();
    }
}

// Columns of x a thread of mf_qdot_rows1h holds: that path takes n_in up to
// MF_XN_HOLD * MF_MV_THREADS (2048 at 8), the general one the rest.
#ifndef MF_XN_HOLD
#define MF_XN_HOLD 8
#endif
#if MF_XN_HOLD % (MF_XS_COLS / MF_MV_THREADS) != 0
#error "MF_XN_HOLD must be a whole number of staging steps (MF_XS_COLS / MF_MV_THREADS)"
#endif

// Whether mf_qdot_rows1h loads every step's codes before its wait (1: the weights of a
// whole row in flight while the kernel before still runs, at the cost of registers) or
// each step's in turn (0). 1 was +0.8-1.0% in whole-model decode on an H100 in every
// round of two runs (bench/RESULTS.md "Session 24"), level in session 25's one round;
// make test-cuda passed with it (session 25).
#ifndef MF_XN_PRELOAD
#define MF_XN_PRELOAD 1
#endif

// mf_qdot_rows1 with its norm (CH 1) where x fits in MF_XN_HOLD values a thread: the
// gains are loaded before the wait (weights), x once after it and held in registers,
// its sum of squares taken in mf_xnorm_inv's order, each step staging held values
// normalised. The same values staged, so the same bits, with one load round trip after
// the wait where the general path takes two or more (x for the sum, then x and the
// gains at each step).
template <int BITS, int R, int NORM>
MF_FN void mf_qdot_rows1h(MF_TH float *acc, MF_TG float *xs, MF_TH const struct mf_rows *rw,
                          int sdtype, int gs, int n_in, MF_G const float *x,
                          struct mf_xnorm nm, int lt, int lane) {
    const int PER = MF_XS_COLS / MF_MV_THREADS, NS = MF_XN_HOLD / PER;
    const int NW = MF_XN_PRELOAD ? NS : 1;
    const int n_chunk = n_in >> 5, on = rw->n > 0;
    mf_u32 wd[NW][R][BITS];
    float s[NW][R], b[NW][R], xh[MF_XN_HOLD], gh[MF_XN_HOLD];
    if (on) {
#pragma unroll
        for (int j = 0; j < NW; j++)
            if (j * MF_XS_COLS < n_in)
                mf_load_rows<BITS, R>(wd[j], s[j], b[j], rw, sdtype, gs, 32 * j + lane,
                                      n_chunk);
    }
    mf_xnorm_gains<MF_XN_HOLD>(gh, &nm, 0, n_in, lt);
    mf_dep_wait();
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < MF_XN_HOLD; i++) {
        const int c = lt + i * MF_MV_THREADS;
        xh[i] = c < n_in ? x[c] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < MF_XN_HOLD; i++)
        if (lt + i * MF_MV_THREADS < n_in)
            ss += xh[i] * xh[i];
    nm.inv = mf_rms_inv(ss, xs, lt, n_in, nm.eps);   // ends with a barrier: xs is free
    mf_xnorm_apply<MF_XN_HOLD>(xh, gh, &nm, 0, n_in, lt);
#pragma unroll
    for (int st = 0; st < NS; st++) {
        const int c0 = st * MF_XS_COLS, j = MF_XN_PRELOAD ? st : 0;
        if (c0 >= n_in)
            break;
        if (!MF_XN_PRELOAD && st > 0 && on)
            mf_load_rows<BITS, R>(wd[0], s[0], b[0], rw, sdtype, gs, (c0 >> 5) + lane,
                                  n_chunk);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int k = lt + i * MF_MV_THREADS;
            xs[((k >> 5) & 31) * MF_XS_PAD + (k & 31)] = xh[st * PER + i];
        }
        MF_BARRIER();
        if (on && (c0 >> 5) + lane < n_chunk)
            mf_chunk_dot<BITS, 1, R>(acc, wd[j], s[j], b[j], xs + lane * MF_XS_PAD,
                                     MF_XS_TOK, 1);
        MF_BARRIER();
    }
}

// Row dots of a warp's R rows for nt tokens: quantized through the staged tile
// (templated on the width, and on one token or a tile), float straight from device
// memory (lanes stride over columns, coalesced). The dtype is the same for the whole
// threadgroup, so the barriers are uniform. ONE: nt is 1 and only the one-token paths
// are compiled (the one-token kernels, whose fewer registers let more warps in flight
// hide memory latency); a row's operations, and so its bits, are the same either way.
template <int R, int ONE>
MF_FN void mf_dot_rows(MF_TH float *acc, MF_TG float *xs, MF_TH const struct mf_rows *rw,
                       int dtype, int sdtype, int bits, int gs, int n_in,
                       MF_G const float *x, int x_stride, int nt, int lt, int lane) {
    if (dtype != MF_SH_U32 || sdtype == MF_SH_U8)
        mf_dep_wait();
    if (dtype != MF_SH_U32) {
#pragma unroll
        for (int r = 0; r < R; r++)
            if (r < rw->n)
                mf_fdot_tile<ONE ? 1 : MF_MV_TT>(acc + r * MF_MV_TT, rw->w[r], dtype, n_in,
                                                 rw->s0[r], x, x_stride, nt, lane);
        return;
    }
    if (sdtype == MF_SH_U8) {   // MXFP4 (bits 4, groups of 32: s0 counts scale bytes)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (r < rw->n)
                mf_mxfp4_tile<ONE ? 1 : MF_MV_TT>(acc + r * MF_MV_TT, rw->w[r],
                                                  (MF_G const mf_u8 *)rw->sc[r] + rw->s0[r],
                                                  n_in, x, x_stride, nt, lane);
        return;
    }
#define MF_QBITS(B)                                                                    \
    if (ONE || nt == 1)                                                                \
        mf_qdot_rows1<B, R, 0>(acc, xs, rw, sdtype, gs, n_in, x, mf_xnorm_none(), lt,   \
              lane);                                                                   \
    else                                                                               \
        mf_qdot_rows<B, MF_MV_TT, R>(acc, xs, rw, sdtype, gs, n_in, x, x_stride, nt, lt, \
                                     lane);
    switch (bits) {
    case 2: MF_QBITS(2); break;
    case 3: MF_QBITS(3); break;
    case 4: MF_QBITS(4); break;
    case 5: MF_QBITS(5); break;
    case 6: MF_QBITS(6); break;
    default: MF_QBITS(8); break;
    }
#undef MF_QBITS
}

// mf_dot_rows of one token of rmsnorm(x) (nm; mf_mv_multi1n): affine codes only,
// the host's choice (mf_rms_multi_params), every other format takes rmsnorm then the
// plain products.
template <int R, int NORM>
MF_FN void mf_dot_rows1n(MF_TH float *acc, MF_TG float *xs, MF_TH const struct mf_rows *rw,
                         int bits, int sdtype, int gs, int n_in, MF_G const float *x,
                         struct mf_xnorm nm, int lt, int lane) {
#define MF_QBITS1N(B)                                                                  \
    if (n_in <= MF_XN_HOLD * MF_MV_THREADS && MF_CH1(B, R) == 1)                       \
        mf_qdot_rows1h<B, R, NORM>(acc, xs, rw, sdtype, gs, n_in, x, nm, lt, lane);    \
    else                                                                               \
        mf_qdot_rows1<B, R, NORM>(acc, xs, rw, sdtype, gs, n_in, x, nm, lt, lane);
    switch (bits) {
    case 2: MF_QBITS1N(2); break;
    case 3: MF_QBITS1N(3); break;
    case 4: MF_QBITS1N(4); break;
    case 5: MF_QBITS1N(5); break;
    case 6: MF_QBITS1N(6); break;
    default: MF_QBITS1N(8); break;
    }
#undef MF_QBITS1N
}

// Row r of a weight [n_out, n_in] (quantized or float) into slot i of rw.
MF_FN void mf_rows_set(MF_TH struct mf_rows *rw, int i, MF_G const mf_u32 *w,
                       MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, int dtype, int bits,
                       int gs, int n_in, mf_i64 row) {
    const int q = dtype == MF_SH_U32;
    rw->w[i] = q ? w + row * (n_in / 32) * bits : w;
    rw->sc[i] = sc;
    rw->bi[i] = bi;
    rw->s0[i] = q ? row * (n_in / gs) : row;   // float rows: the row itself
}

#endif /* MF_QUANT_H */
