/*
 * test_kernel_sim.cc — kernels of shaders/ run on the CPU by the executor of
 * tests/c/sim (barriers, shuffles and threadgroup memory as on a GPU; each thread a
 * coroutine), against a float64 reference, and kernels that must agree bit for bit
 * with each other compared so. This checks a kernel's indexing, synchronisation and
 * order of operations on a machine without a GPU; make test-cuda runs the same kernels
 * on one. Each case runs under three thread orders (forward, reverse, shuffled): a
 * threadgroup read that lacks its barrier gives a different result under one of them.
 */
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mf_sim.h"
// after mf_sim.h: the prelude's MF_SIM branch calls it
#include "../../shaders/mf_kernels.h"
#include "../../shaders/grid.h"

static int g_fail;

#define CHECK(cond, ...)                                                               \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                       \
            fprintf(stderr, __VA_ARGS__);                                              \
            fprintf(stderr, "\n");                                                     \
            g_fail++;                                                                  \
        }                                                                              \
    } while (0)

static unsigned g_rng = 12345;
static float frand() {
    g_rng = g_rng * 1664525u + 1013904223u;
    return (float)((g_rng >> 8) & 0xffff) / 32768.0f - 1.0f;
}

template <class P>
static void launch(void (*grid)(const P *, unsigned *, unsigned *), const P &p,
                   unsigned seed, const std::function<void()> &body, const char *what) {
    unsigned g[3], b[3];
    grid(&p, g, b);
    const char *err = nullptr;
    if (mf_sim_run(g, b, body, seed, &err) != 0)
        CHECK(0, "%s: %s", what, err);
}

/* ==== Attention ==== */

struct attn_case {
    int n_tok, n_head, n_kv, dk, dv, pos0, window, ring, sinks;
};

// Keys of (pos0 + n_tok) positions (ring: pos % ring), queries of n_tok tokens.
struct attn_data {
    std::vector<float> q, k, v;
    std::vector<mf_u32> sinks;   // f32 bits
    int k_stride, v_stride, rows;
};

static attn_data attn_make(const attn_case &c) {
    attn_data d;
    d.rows = c.ring > 0 ? c.ring : c.pos0 + c.n_tok;
    d.k_stride = c.n_kv * c.dk + 3;   // rows wider than the heads, as in a fused qkv
    d.v_stride = c.n_kv * c.dv + 5;
    d.q.resize((size_t)c.n_tok * c.n_head * c.dk);
    d.k.resize((size_t)d.rows * d.k_stride);
    d.v.resize((size_t)d.rows * d.v_stride);
    for (float &x : d.q)
        x = 2.0f * frand();
    for (float &x : d.k)
        x = frand();
    for (float &x : d.v)
        x = frand();
    for (int h = 0; h < c.n_head; h++)
        d.sinks.push_back(mf_as_u32(frand()));
    return d;
}

// The float64 reference of query t, head h: all dv outputs into o.
static void attn_ref(const attn_case &c, const attn_data &d, int t, int h, double *o) {
    const int kvh = h / (c.n_head / c.n_kv), n_keys = c.pos0 + t + 1;
    const int lo = c.window > 0 && n_keys - c.window > 0 ? n_keys - c.window : 0;
    std::vector<double> s;
    double m = c.sinks ? (double)mf_as_float(d.sinks[h]) : -INFINITY;
    for (int p = lo; p < n_keys; p++) {
        const int row = c.ring > 0 ? p % c.ring : p;
        double a = 0;
        for (int j = 0; j < c.dk; j++)
            a += (double)d.q[((size_t)t * c.n_head + h) * c.dk + j] *
                 d.k[(size_t)row * d.k_stride + kvh * c.dk + j];
        a *= 1.0 / std::sqrt((double)c.dk);
        s.push_back(a);
        m = a > m ? a : m;
    }
    double l = c.sinks ? std::exp((double)mf_as_float(d.sinks[h]) - m) : 0;
    for (int i = 0; i < c.dv; i++)
        o[i] = 0;
    for (int p = lo; p < n_keys; p++) {
        const int row = c.ring > 0 ? p % c.ring : p;
        const double e = std::exp(s[p - lo] - m);
        l += e;
        for (int i = 0; i < c.dv; i++)
            o[i] += e * d.v[(size_t)row * d.v_stride + kvh * c.dv + i];
    }
    for (int i = 0; i < c.dv; i++)
        o[i] /= l;
}

// The launches of the GPU drivers' attention (blocks of 64 queries, the partials by
// mf_attn_part or, tile set, by mf_attn_tile, then the combine); every block's
// partials are appended to *parts.
static std::vector<float> attn_run(const attn_case &c, const attn_data &d, unsigned seed,
                                   bool tile, std::vector<float> *parts) {
    const int base = c.window > 0 && c.pos0 - c.window + 1 > 0 ? c.pos0 - c.window + 1 : 0;
    const int span = c.pos0 + c.n_tok - base;
    const int chunk = c.n_tok > 4 ? MF_ATTN_CHUNK : span <= 32 * 64 ? 64 : 128;
    struct mf_p_attn p = {c.n_tok, c.n_head, c.n_kv, c.dk, c.dv, d.k_stride, d.v_stride,
                          c.pos0, (span + chunk - 1) / chunk, chunk,
                          1.0f / sqrtf((float)c.dk), c.window, c.ring, base,
                          c.sinks ? (int)MF_SH_F32 : -1};
    std::vector<float> out((size_t)c.n_tok * c.n_head * c.dv, NAN);
    const int qb = 64;
    for (int t0 = 0; t0 < c.n_tok; t0 += qb) {
        struct mf_p_attn pb = p;
        pb.n_tok = c.n_tok - t0 < qb ? c.n_tok - t0 : qb;
        pb.pos0 = c.pos0 + t0;
        pb.n_split = (pb.pos0 + pb.n_tok - base + chunk - 1) / chunk;
        std::vector<float> ws((size_t)pb.n_tok * c.n_head * pb.n_split * (c.dv + 2), NAN);
        const float *qp = d.q.data() + (size_t)t0 * c.n_head * c.dk;
        if (tile)
            launch(mf_grid_attn_tile, pb, seed,
                   [&] { mf_attn_tile(ws.data(), qp, d.k.data(), d.v.data(), pb); },
                   "attn_tile");
        else
            launch(mf_grid_attn_part, pb, seed,
                   [&] { mf_attn_part(ws.data(), qp, d.k.data(), d.v.data(), pb); },
                   "attn_part");
        parts->insert(parts->end(), ws.begin(), ws.end());
        float *o = out.data() + (size_t)t0 * c.n_head * c.dv;
        launch(mf_grid_attn_comb, pb, seed,
               [&] { mf_attn_comb(o, ws.data(), d.sinks.data(), pb); }, "attn_comb");
    }
    return out;
}

// mf_attn_part's partials and outputs against the float64 reference; mf_attn_tile's
// (where the drivers may launch it) equal to them bit for bit, NaN fill included;
// both under three thread orders.
static void test_attention(const attn_case &c) {
    attn_data d = attn_make(c);
    double worst = 0;
    std::vector<float> first, first_parts;
    const bool tile_ok = c.dk <= MF_ATTN_TILE_DMAX && c.dv <= MF_ATTN_TILE_DMAX &&
                         MF_THREADS % c.dv == 0 && c.n_head % c.n_kv == 0;
    for (unsigned seed = 0; seed < 3; seed++)
        for (int tile = 0; tile <= (int)tile_ok; tile++) {
            std::vector<float> parts;
            std::vector<float> o = attn_run(c, d, seed, tile, &parts);
            if (seed == 0 && !tile) {
                first = o;
                first_parts = parts;
            }
            CHECK(memcmp(o.data(), first.data(), o.size() * 4) == 0 &&
                      memcmp(parts.data(), first_parts.data(), parts.size() * 4) == 0,
                  "attention n_tok %d pos0 %d: %s, thread order %u: other bits", c.n_tok,
                  c.pos0, tile ? "mf_attn_tile" : "mf_attn_part", seed);
        }
    std::vector<double> r(c.dv);
    for (int t = 0; t < c.n_tok; t++)
        for (int h = 0; h < c.n_head; h++) {
            attn_ref(c, d, t, h, r.data());
            for (int i = 0; i < c.dv; i++) {
                const double e =
                    std::fabs(first[((size_t)t * c.n_head + h) * c.dv + i] - r[i]);
                worst = e > worst ? e : worst;
            }
        }
    CHECK(worst < 2e-6, "attention n_tok %d heads %d/%d dk %d pos0 %d window %d ring %d: "
          "max error %.3g", c.n_tok, c.n_head, c.n_kv, c.dk, c.pos0, c.window, c.ring, worst);
    printf("attention n_tok %3d heads %2d/%d dk %3d dv %3d pos0 %3d window %3d ring %3d "
           "sinks %d: max error %.2g\n", c.n_tok, c.n_head, c.n_kv, c.dk, c.dv, c.pos0,
           c.window, c.ring, c.sinks, worst);
}

int main() {
    const attn_case cases[] = {
        // n_tok, n_head, n_kv, dk, dv, pos0, window, ring, sinks
        {3, 4, 2, 64, 64, 5, 0, 0, 0},
        {70, 8, 2, 128, 128, 0, 0, 0, 0},      // two query blocks, 16-row tiles
        {9, 16, 2, 256, 256, 290, 0, 0, 0},    // 8-row tiles, three splits
        {21, 6, 6, 80, 64, 3, 0, 0, 0},        // one head per kv head, dk not 32 k
        {12, 4, 1, 128, 32, 250, 0, 0, 0},     // a tile across tokens and splits
        {40, 8, 2, 64, 64, 100, 24, 64, 1},    // window, ring and sinks (gpt-oss)
        {20, 8, 4, 64, 64, 0, 8, 0, 1},        // window within the chunk
        {7, 4, 2, 576, 512, 10, 0, 0, 0},      // MLA's latent heads: mf_attn_part only
    };
    for (const attn_case &c : cases)
        test_attention(c);
    if (g_fail) {
        fprintf(stderr, "%d check(s) failed\n", g_fail);
        return 1;
    }
    printf("all kernel sim tests passed\n");
    return 0;
}
