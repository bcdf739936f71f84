/*
 * mf_prelude.h — the dialect prelude every kernel file includes first. It maps one
 * kernel source to CUDA C++ (NVRTC, or nvcc), to the Metal Shading Language
 * (__METAL_VERSION__), and for the tests to host C++ run by a CPU executor (MF_SIM,
 * tests/c/sim): pointer address spaces, kernel signatures, thread indices,
 * barriers, warp shuffles, integer types and the math functions kernels may use.
 * No CUDA or Metal header beyond <metal_stdlib> is needed, so NVRTC compiles it with
 * no include path. Pointer qualifiers (MF_G device memory, MF_C constant, MF_TG
 * threadgroup, MF_TH thread) go on every helper's pointer parameters; MF_SHARED
 * declares threadgroup arrays (CUDA's __shared__ is a declaration word, not a pointer
 * qualifier, hence two macros). Same math mode on both: no fast math (the driver passes
 * --fmad=false to NVRTC so every product and sum rounds as the CPU's f32 code does).
 */
#ifndef MF_PRELUDE_H
#define MF_PRELUDE_H

#if defined(__METAL_VERSION__)
/* ---- Metal Shading Language ---- */
#include <metal_stdlib>
using namespace metal;

#define MF_METAL 1
#define MF_G device
#define MF_C constant
#define MF_TG threadgroup
#define MF_TH thread
#define MF_SHARED threadgroup
#define MF_FN static inline
#define MF_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MF_KERNEL(name) kernel void name(
#define MF_BUF(i, T, n) device T *n [[buffer(i)]],
// Closes the parameter list: the params struct, then the thread-position attributes.
#define MF_PARAMS(i, T, p)                                                             \
    constant T &p [[buffer(i)]], uint3 mf_tg3 [[threadgroup_position_in_grid]],       \
        uint3 mf_lt3 [[thread_position_in_threadgroup]],                              \
        uint3 mf_nt3 [[threads_per_threadgroup]],                                     \
        uint mf_lane_id [[thread_index_in_simdgroup]],                                \
        uint mf_warp_id [[simdgroup_index_in_threadgroup]])
#define MF_TG_X ((int)mf_tg3.x)
#define MF_TG_Y ((int)mf_tg3.y)
#define MF_TG_Z ((int)mf_tg3.z)
#define MF_LT ((int)mf_lt3.x)
#define MF_NT ((int)mf_nt3.x)
#define MF_LANE ((int)mf_lane_id)
#define MF_WARP ((int)mf_warp_id)

typedef uint mf_u32;
typedef ushort mf_u16;
typedef uchar mf_u8;
typedef ulong mf_u64;
typedef long mf_i64;
typedef float4 mf_f4;   // four floats, 16-byte aligned (.x .y .z .w)

MF_FN float mf_as_float(mf_u32 u) { return as_type<float>(u); }
MF_FN mf_u32 mf_as_u32(float f) { return as_type<uint>(f); }
MF_FN float mf_shfl_xor(float v, int o) { return simd_shuffle_xor(v, (ushort)o); }
MF_FN int mf_shfl_xor_i(int v, int o) { return simd_shuffle_xor(v, (ushort)o); }
MF_FN mf_u32 mf_shfl_u32(mf_u32 v, int src) { return simd_shuffle(v, (ushort)src); }
MF_FN float mf_exp(float x) { return precise::exp(x); }
MF_FN float mf_log(float x) { return precise::log(x); }
MF_FN float mf_sqrt(float x) { return precise::sqrt(x); }
MF_FN float mf_cos(float x) { return precise::cos(x); }
MF_FN float mf_sin(float x) { return precise::sin(x); }
MF_FN float mf_fabs(float x) { return precise::fabs(x); }
MF_FN float mf_fma(float a, float b, float c) { return fma(a, b, c); }
// Four / two consecutive words (the caller guarantees 16 / 8-byte alignment).
MF_FN void mf_ld4(MF_TH mf_u32 *d, MF_G const mf_u32 *p) {
    const uint4 v = *((MF_G const uint4 *)p);
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
}
MF_FN void mf_ld2(MF_TH mf_u32 *d, MF_G const mf_u32 *p) {
    const uint2 v = *((MF_G const uint2 *)p);
    d[0] = v.x;
    d[1] = v.y;
}
// Four consecutive floats of threadgroup memory (16-byte aligned), or zeros when !on.
MF_FN void mf_lds4(MF_TH float *d, MF_TG const float *p, int on) {
    if (on) {
        const float4 v = *((MF_TG const float4 *)p);
        d[0] = v.x;
        d[1] = v.y;
        d[2] = v.z;
        d[3] = v.w;
    } else {
        d[0] = d[1] = d[2] = d[3] = 0.0f;
    }
}
// MSL has no log1p: log(u) * x / (u - 1) with u = 1 + x corrects u's rounding.
MF_FN float mf_log1p(float x) {
    float u = 1.0f + x;
    return u == 1.0f ? x : mf_log(u) * (x / (u - 1.0f));
}
#define MF_INF INFINITY
// Metal runs a command buffer's kernels one after another: nothing to wait for.
MF_FN void mf_dep_wait() {}
// The last threadgroup of a kernel to finish (mf_route1n, mf_attn_part1): a thread's
// device writes before mf_fence_device are seen by a threadgroup that reads them after
// seeing its mf_atomic_add, through mf_ldcg (device-scope fence: Metal 3.2).
MF_FN void mf_fence_device() {
    atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
}
MF_FN int mf_atomic_add(MF_G int *p, int v) {
    return atomic_fetch_add_explicit((device atomic_int *)p, v, memory_order_relaxed);
}
MF_FN float mf_ldcg(MF_G const float *p) { return *p; }

#elif defined(MF_SIM)
/* ---- host C++ under the tests' CPU executor (tests/c/sim/mf_sim.h), which the test
 * includes first, with <cmath> and <cstring>: the kernel files include nothing else */
#define MF_G
#define MF_C
#define MF_TG
#define MF_TH
#define MF_SHARED static thread_local   // each OS thread runs its own threadgroups
#define MF_FN static inline
#define MF_BARRIER() mf_sim_barrier()
#define MF_KERNEL(name) void name(
#define MF_BUF(i, T, n) T *n,
#define MF_PARAMS(i, T, p) const T p)
#define MF_TG_X (mf_sim_self()->tg[0])
#define MF_TG_Y (mf_sim_self()->tg[1])
#define MF_TG_Z (mf_sim_self()->tg[2])
#define MF_LT (mf_sim_self()->lt)
#define MF_NT (mf_sim_self()->nt)
#define MF_LANE (MF_LT & 31)
#define MF_WARP (MF_LT >> 5)

typedef uint32_t mf_u32;
typedef uint16_t mf_u16;
typedef uint8_t mf_u8;
typedef uint64_t mf_u64;
typedef int64_t mf_i64;
struct alignas(16) mf_f4 {
    float x, y, z, w;
};

MF_FN float mf_as_float(mf_u32 u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
MF_FN mf_u32 mf_as_u32(float f) {
    mf_u32 u;
    memcpy(&u, &f, sizeof u);
    return u;
}
MF_FN float mf_shfl_xor(float v, int o) {
    return mf_as_float(mf_sim_shfl(mf_as_u32(v), MF_LANE ^ o));
}
MF_FN int mf_shfl_xor_i(int v, int o) { return (int)mf_sim_shfl((mf_u32)v, MF_LANE ^ o); }
MF_FN mf_u32 mf_shfl_u32(mf_u32 v, int src) { return mf_sim_shfl(v, src); }
MF_FN void mf_ld4(MF_TH mf_u32 *d, MF_G const mf_u32 *p) { memcpy(d, p, 16); }
MF_FN void mf_ld2(MF_TH mf_u32 *d, MF_G const mf_u32 *p) { memcpy(d, p, 8); }
MF_FN void mf_lds4(MF_TH float *d, MF_TG const float *p, int on) {
    if (on)
        memcpy(d, p, 16);
    else
        d[0] = d[1] = d[2] = d[3] = 0.0f;
}
#define MF_INF INFINITY
MF_FN void mf_dep_wait() {}
// threadgroups run on several OS threads (tests/c/sim/mf_sim.cc)
MF_FN void mf_fence_device() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
MF_FN int mf_atomic_add(MF_G int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
MF_FN float mf_ldcg(MF_G const float *p) {
    float v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}

#else
/* ---- CUDA C++ (NVRTC or nvcc) ---- */
#define MF_CUDA 1
#define MF_G
#define MF_C
#define MF_TG
#define MF_TH
#define MF_SHARED __shared__
#define MF_FN static __device__ __forceinline__
#define MF_BARRIER() __syncthreads()
// At most MF_THREADS threads per threadgroup, and registers for mf_occ(name)
// threadgroups per multiprocessor (__launch_bounds__'s second argument: ptxas keeps a
// thread within 65536 / (256 n) registers). 2 (<= 128 registers) by default: the
// row-dot kernels' widest paths would take ~170 and halve the warps in flight that
// hide memory latency. The one-token products have no other cover for their loads than
// warps in flight, so they ask for more (H100, A3B shapes, 48 layers: decode 248-251 ->
// 263-275 tok/s; the decode experts 31.0 -> 26.2-27.4 us): gate/up 6 (40 registers,
// a few bytes spilled, measured faster than 5 without spills), down 4 (60, no spills;
// 6 measured no faster), the one-token matvecs 5 (47-48; with the input norm too, a
// few bytes spilled). A compile-time choice per kernel; the operations, so the bits,
// are the same for any.
#ifndef MF_OCC_GU1
#define MF_OCC_GU1 6
#endif
#ifndef MF_OCC_DOWN1
#define MF_OCC_DOWN1 4
#endif
#ifndef MF_OCC_MV1
#define MF_OCC_MV1 5
#endif
#ifndef MF_OCC_MV1N   // the one-token matvec with its input norm (mf_mv_multi1n)
#define MF_OCC_MV1N MF_OCC_MV1
#endif
__device__ constexpr bool mf_occ_is(const char *a, const char *b) {
    return *a == *b && (*a == '\0' || mf_occ_is(a + 1, b + 1));
}
// At most what an SM holds of 256-thread threadgroups: 1536 threads on sm_86 / sm_89,
// 1024 on sm_75 (ptxas ignores more, with a warning).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
#define MF_OCC_CAP 4
#else
#define MF_OCC_CAP 6
#endif
__device__ constexpr int mf_occ_n(const char *k) {
    return mf_occ_is(k, "mf_moe_gu1")     ? MF_OCC_GU1
           : mf_occ_is(k, "mf_moe_down1") || mf_occ_is(k, "mf_moe_down1c") ? MF_OCC_DOWN1
           : mf_occ_is(k, "mf_mv_multi1") || mf_occ_is(k, "mf_mv1")        ? MF_OCC_MV1
           : mf_occ_is(k, "mf_mv_multi1n") || mf_occ_is(k, "mf_route1n") ? MF_OCC_MV1N
                                                                           : 2;
}
__device__ constexpr int mf_occ(const char *k) {
    return mf_occ_n(k) < MF_OCC_CAP ? mf_occ_n(k) : MF_OCC_CAP;
}
#define MF_KERNEL(name) extern "C" __global__ void __launch_bounds__(256, mf_occ(#name)) name(
#define MF_BUF(i, T, n) T *n,
#define MF_PARAMS(i, T, p) const T p)
#define MF_TG_X ((int)blockIdx.x)
#define MF_TG_Y ((int)blockIdx.y)
#define MF_TG_Z ((int)blockIdx.z)
#define MF_LT ((int)threadIdx.x)
#define MF_NT ((int)blockDim.x)
#define MF_LANE ((int)(threadIdx.x & 31u))
#define MF_WARP ((int)(threadIdx.x >> 5))

typedef unsigned int mf_u32;
typedef unsigned short mf_u16;
typedef unsigned char mf_u8;
typedef unsigned long long mf_u64;
typedef long long mf_i64;
typedef float4 mf_f4;   // four floats, 16-byte aligned (.x .y .z .w)

MF_FN float mf_as_float(mf_u32 u) { return __uint_as_float(u); }
MF_FN mf_u32 mf_as_u32(float f) { return __float_as_uint(f); }
MF_FN float mf_shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
MF_FN int mf_shfl_xor_i(int v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
MF_FN mf_u32 mf_shfl_u32(mf_u32 v, int src) { return __shfl_sync(0xffffffffu, v, src); }
// Four / two consecutive words in one 128 / 64-bit load (the caller guarantees 16 /
// 8-byte alignment).
MF_FN void mf_ld4(MF_TH mf_u32 *d, MF_G const mf_u32 *p) {
    const uint4 v = *reinterpret_cast<const uint4 *>(p);
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
}
MF_FN void mf_ld2(MF_TH mf_u32 *d, MF_G const mf_u32 *p) {
    const uint2 v = *reinterpret_cast<const uint2 *>(p);
    d[0] = v.x;
    d[1] = v.y;
}
// Four consecutive floats of shared memory in one 128-bit load (16-byte aligned), or
// zeros when !on.
MF_FN void mf_lds4(MF_TH float *d, MF_TG const float *p, int on) {
    float4 v = {0.0f, 0.0f, 0.0f, 0.0f};
    if (on)
        v = *reinterpret_cast<const float4 *>(p);
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
}
// The last threadgroup of a kernel to finish (mf_route1n, mf_attn_part1): a thread's
// device writes before mf_fence_device are seen by a threadgroup that reads them after
// seeing its mf_atomic_add, through mf_ldcg (from L2: an L1 may hold an older copy).
MF_FN void mf_fence_device() { __threadfence(); }
MF_FN int mf_atomic_add(MF_G int *p, int v) { return atomicAdd(p, v); }
MF_FN float mf_ldcg(MF_G const float *p) { return __ldcg(p); }
#define MF_INF __int_as_float(0x7f800000)
// Programmatic dependent launch (sm_90 and later; the driver launches with it where the
// GPU has it, csrc/backends/cuda): a kernel's threadgroups may start while the kernel
// before it on the stream is still running. mf_dep_wait returns once that kernel has
// finished and its writes are visible (at once after an ordinary launch), and then lets
// the next kernel's threadgroups start. Every kernel calls it before it touches memory
// that another kernel writes or reads; only immutable weights may be read before it,
// and what a kernel two or more back wrote: since each kernel waits before it lets the
// next one start, a kernel starts only once the kernel two back has finished, at most
// two kernels of a stream are resident at a time, and each finds all earlier kernels'
// writes visible after its wait.
MF_FN void mf_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The tensor-core step of the row-tile kernels (tc.h) is the mma instruction (sm_80 and
// later), unless MF_TC_EMU is defined (then its portable form, which Metal and older
// GPUs take; the op test runs it on CUDA too).
#if !defined(MF_TC_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MF_TC_MMA 1
// d += A b for a 16 x 16 bf16 tile A (four pair registers a) and a 16 x 8 bf16 tile b
// (two pair registers), f32 d: one warp-wide mma.sync (sm_80 and later); the layout
// is that of the portable form below.
MF_FN void mf_mma_bf16(MF_TH float *d, MF_TH const mf_u32 *a, MF_TH const mf_u32 *b,
                       int lane) {
    (void)lane;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// d = A b (no addend): mf_mma_bf16 from zero.
MF_FN void mf_mma_bf16_0(MF_TH float *d, MF_TH const mf_u32 *a, MF_TH const mf_u32 *b,
                         int lane) {
    (void)lane;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
}
// Both bf16 halves of u plus those of c (exact for the codes 128 + q of tc.h and mma.h
// less 128 or 128 + a centre).
MF_FN mf_u32 mf_bf2_add(mf_u32 u, mf_u32 c) {
    mf_u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(u), "r"(0x3f803f80u), "r"(c));
    return r;
}
#endif
#endif

#if !defined(__METAL_VERSION__)
// C's float functions: CUDA's device library, or the host's C library under MF_SIM.
MF_FN float mf_exp(float x) { return expf(x); }
MF_FN float mf_log(float x) { return logf(x); }
MF_FN float mf_sqrt(float x) { return sqrtf(x); }
MF_FN float mf_cos(float x) { return cosf(x); }
MF_FN float mf_sin(float x) { return sinf(x); }
MF_FN float mf_fabs(float x) { return fabsf(x); }
MF_FN float mf_log1p(float x) { return log1pf(x); }
// An explicit fused multiply-add: one rounding, also under --fmad=false (which only
// stops the compiler from contracting a * b + c written out).
MF_FN float mf_fma(float a, float b, float c) { return fmaf(a, b, c); }
#endif

/* ---- shared by all dialects ---- */

// Sum over the 32 lanes of a warp (simdgroup) by a butterfly: every lane gets the sum,
// and the order of additions is the same on both APIs.
MF_FN float mf_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v += mf_shfl_xor(v, o);
    return v;
}

MF_FN float mf_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = mf_shfl_xor(v, o);
        v = w > v ? w : v;
    }
    return v;
}

// 1 / (1 + e^-x) and x * sigmoid(x), written as the CPU backend writes them.
MF_FN float mf_sigmoid(float x) { return 1.0f / (1.0f + mf_exp(-x)); }
MF_FN float mf_silu(float x) { return x * mf_sigmoid(x); }

// IEEE half to float by bits (no half type needed): normal, subnormal, inf and NaN.
MF_FN float mf_f16_to_f32(mf_u32 h) {
    mf_u32 sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1fu)
        return mf_as_float(sign | 0x7f800000u | (man << 13));
    if (exp != 0)
        return mf_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    // Subnormal: man * 2^-24, exact in f32.
    float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
}

MF_FN float mf_bf16_to_f32(mf_u32 h) { return mf_as_float(h << 16); }

// Byte b (0..3) of w as an exact float: the byte put into the mantissa of 2^23 (one
// byte permute on CUDA), then 2^23 taken off.
MF_FN float mf_byte_f(mf_u32 w, int b) {
#if defined(MF_CUDA)
    const mf_u32 u = __byte_perm(w, 0x4b000000u, 0x7540u | (mf_u32)b);
#else
    const mf_u32 u = ((w >> (8 * b)) & 0xffu) | 0x4b000000u;
#endif
    return mf_as_float(u) - 8388608.0f;
}

#ifndef MF_TC_MMA
// The portable tensor-core step: what mma.sync m16n8k16 computes, by shuffles. Lane
// (g = lane / 4, t = lane % 4) holds A rows g (a[0], a[2]) and g + 8 (a[1], a[3]) at
// columns 2t, 2t + 1 (a[0], a[1]) and 2t + 8, 2t + 9 (a[2], a[3]), b column g at rows
// 2t, 2t + 1 (b[0]) and 2t + 8, 2t + 9 (b[1]), d rows g (d[0], d[1]) and g + 8 (d[2],
// d[3]) at columns 2t, 2t + 1; low half = lower index. Sums run over k in order.
MF_FN float mf_bf_lo(mf_u32 u) { return mf_as_float(u << 16); }
MF_FN float mf_bf_hi(mf_u32 u) { return mf_as_float(u & 0xffff0000u); }
MF_FN void mf_mma_bf16(MF_TH float *d, MF_TH const mf_u32 *a, MF_TH const mf_u32 *b,
                       int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int kp = 0; kp < 8; kp++) {
        const int q = kp & 3, hi = kp >> 2;
        const mf_u32 ag = mf_shfl_u32(hi ? a[2] : a[0], g * 4 + q);
        const mf_u32 ag8 = mf_shfl_u32(hi ? a[3] : a[1], g * 4 + q);
        const mf_u32 b0 = mf_shfl_u32(hi ? b[1] : b[0], 2 * t * 4 + q);
        const mf_u32 b1 = mf_shfl_u32(hi ? b[1] : b[0], (2 * t + 1) * 4 + q);
        d[0] = mf_fma(mf_bf_hi(ag), mf_bf_hi(b0), mf_fma(mf_bf_lo(ag), mf_bf_lo(b0), d[0]));
        d[1] = mf_fma(mf_bf_hi(ag), mf_bf_hi(b1), mf_fma(mf_bf_lo(ag), mf_bf_lo(b1), d[1]));
        d[2] = mf_fma(mf_bf_hi(ag8), mf_bf_hi(b0), mf_fma(mf_bf_lo(ag8), mf_bf_lo(b0), d[2]));
        d[3] = mf_fma(mf_bf_hi(ag8), mf_bf_hi(b1), mf_fma(mf_bf_lo(ag8), mf_bf_lo(b1), d[3]));
    }
}
MF_FN void mf_mma_bf16_0(MF_TH float *d, MF_TH const mf_u32 *a, MF_TH const mf_u32 *b,
                         int lane) {
    for (int i = 0; i < 4; i++)
        d[i] = 0.0f;
    mf_mma_bf16(d, a, b, lane);
}
MF_FN mf_u32 mf_bf2_add(mf_u32 u, mf_u32 c) {
    const float lo = mf_bf_lo(u) + mf_bf_lo(c), hi = mf_bf_hi(u) + mf_bf_hi(c);
    return (mf_as_u32(hi) & 0xffff0000u) | (mf_as_u32(lo) >> 16);
}
#endif

// Both bf16 halves of u less 128 (exact for the codes 128 + q of tc.h).
MF_FN mf_u32 mf_bf2_sub128(mf_u32 u) { return mf_bf2_add(u, 0xc300c300u); }

// Whether this threadgroup is the last of the n that count on *cnt to get here (every
// thread calls it, after the threadgroup's device writes; last: a threadgroup word).
// The last may then read the others' writes through mf_ldcg, and must itself set *cnt
// back to 0 for the next launch (mf_route1n, mf_attn_part1, mf_moe_down1c).
MF_FN int mf_last_tg(MF_G int *cnt, int n, MF_TG int *last, int lt) {
    mf_fence_device();
    MF_BARRIER();
    if (lt == 0)
        last[0] = mf_atomic_add(cnt, 1) == n - 1;
    MF_BARRIER();
    if (!last[0])
        return 0;
    mf_fence_device();
    return 1;
}

#endif /* MF_PRELUDE_H */
