/*
 * sim_cuda.cc — a stand-in for the CUDA driver and NVRTC that runs the kernels of
 * shaders/ on the CPU executor of mf_sim.h (tests only).
 *
 * Built as a shared library that exports the driver and NVRTC entry points the CUDA
 * backend loads (csrc/backends/cuda/cuda_api.h): pointing MOEFLUX_LIBCUDA and
 * MOEFLUX_LIBNVRTC at it makes the real backend (cuda_backend.c, cuda_ops.c,
 * cuda_graph.c, the module cache) run every op on the CPU, so tests/c/test_backend_ops
 * can hold the CUDA ops against the CPU backend on a machine without a GPU. It is one
 * device of compute capability 9.0 whose memory is host memory, whose streams run
 * each launch and copy at once, in order, and whose graphs replay their kernel nodes
 * in the order they were added; NVRTC "compiles" to a token, and a module's functions
 * are the kernels compiled into this library (MF_SIM). MOEFLUX_SIM_SEED picks the
 * executor's thread order (default 2: shuffled).
 *
 * What it cannot show is listed in mf_sim.h; on top of that, concurrency between
 * streams (everything here is serialised) and the launch limits of a real device.
 */
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "mf_sim.h"
// after mf_sim.h: the prelude's MF_SIM branch calls it
#include "../../../shaders/mf_kernels.h"

extern "C" {
#include "backends/cuda/cuda_api.h"
}

namespace {

constexpr CUresult ERR_INVALID_VALUE = 1, ERR_NOT_FOUND = 500, ERR_LAUNCH_FAILED = 719;

// A kernel's entry: its name, the sizes of its parameters, and how to run it from
// the driver's array of pointers to argument values.
struct kernel {
    const char *name;
    std::vector<size_t> sizes;
    CUresult (*run)(const unsigned g[3], const unsigned b[3], void **args);
};

unsigned seed() {
    const char *e = getenv("MOEFLUX_SIM_SEED");
    return e && *e ? (unsigned)strtoul(e, nullptr, 10) : 2u;
}

template <class T>
T load(void *p) {
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}

template <class... A, size_t... I>
CUresult run_fn(void (*f)(A...), const unsigned g[3], const unsigned b[3], void **args,
                std::index_sequence<I...>) {
    std::tuple<A...> a{load<A>(args[I])...};
    const char *err = nullptr;
    if (mf_sim_run(g, b, [&] { std::apply(f, a); }, seed(), &err) != 0) {
        fprintf(stderr, "sim_cuda: %s\n", err);
        return ERR_LAUNCH_FAILED;
    }
    return 0;
}

template <class... A>
std::vector<size_t> sizes_of(void (*)(A...)) {
    return {sizeof(A)...};
}

template <class... A>
constexpr auto seq_of(void (*)(A...)) {
    return std::index_sequence_for<A...>{};
}

template <auto F>
CUresult run_kernel(const unsigned g[3], const unsigned b[3], void **args) {
    return run_fn(F, g, b, args, seq_of(F));
}

const std::vector<kernel> &kernels() {
    static const std::vector<kernel> k = {
#define K(name, params, n_buf, grid) {#name, sizes_of(&name), run_kernel<&name>},
#include "../../../shaders/kernels.def"
#undef K
    };
    return k;
}

// A launch whose argument values are owned (graph nodes).
struct node {
    const kernel *k;
    unsigned g[3], b[3];
    std::vector<char> bytes;
    std::vector<size_t> offs;
};

void node_set(node *n, const struct mf_cu_kernel_node *p) {
    n->k = (const kernel *)p->func;
    memcpy(n->g, p->grid, sizeof n->g);
    memcpy(n->b, p->block, sizeof n->b);
    n->bytes.clear();
    n->offs.clear();
    for (size_t i = 0; i < n->k->sizes.size(); i++) {
        n->offs.push_back(n->bytes.size());
        const char *src = (const char *)p->params[i];
        n->bytes.insert(n->bytes.end(), src, src + n->k->sizes[i]);
    }
}

CUresult node_run(node *n) {
    std::vector<void *> args;
    for (size_t off : n->offs)
        args.push_back(n->bytes.data() + off);
    return n->k->run(n->g, n->b, args.data());
}

struct graph {
    std::vector<node *> nodes;
};

struct graph_exec {
    std::vector<node *> keys;   // the graph's nodes, in order
    std::vector<node> nodes;    // their copies
};

int g_handle;   // the address of a non-null handle for contexts, streams, modules

}  // namespace

extern "C" {

/* ---- driver ---- */

CUresult cuInit(unsigned) { return 0; }
CUresult cuDriverGetVersion(int *v) { return *v = 13000, 0; }
CUresult cuDeviceGetCount(int *n) { return *n = 1, 0; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { return ordinal == 0 ? (*d = 0, 0) : 101; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice) {
    *v = attr == MF_CU_DEVICE_ATTRIBUTE_CC_MAJOR ? 9 : 0;
    return 0;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice) {
    snprintf(name, (size_t)len, "moeflux CPU kernel executor");
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice) {
    return *c = (CUcontext)&g_handle, 0;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return 0; }
CUresult cuCtxSetCurrent(CUcontext) { return 0; }

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    void *m = aligned_alloc(256, (n + 255) / 256 * 256);
    *p = (CUdeviceptr)(uintptr_t)m;
    return m ? 0 : MF_CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(CUdeviceptr p) { return free((void *)(uintptr_t)p), 0; }
CUresult cuMemHostAlloc(void **p, size_t n, unsigned) {
    *p = aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    return *p ? 0 : MF_CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *p) { return free(p), 0; }
CUresult cuMemHostRegister_v2(void *, size_t, unsigned) { return 0; }
CUresult cuMemHostUnregister(void *) { return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream) {
    return memmove((void *)(uintptr_t)dst, src, n), 0;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream) {
    return memmove(dst, (const void *)(uintptr_t)src, n), 0;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n), 0;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return memset((void *)(uintptr_t)dst, v, n), 0;
}
CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total_b) {
    *free_b = (size_t)16 << 30;
    *total_b = (size_t)24 << 30;
    return 0;
}

CUresult cuStreamCreate(CUstream *s, unsigned) { return *s = (CUstream)&g_handle, 0; }
CUresult cuStreamDestroy_v2(CUstream) { return 0; }
CUresult cuStreamSynchronize(CUstream) { return 0; }
CUresult cuEventCreate(CUevent *e, unsigned) { return *e = (CUevent)&g_handle, 0; }
CUresult cuEventDestroy_v2(CUevent) { return 0; }
CUresult cuEventRecord(CUevent, CUstream) { return 0; }
CUresult cuEventSynchronize(CUevent) { return 0; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return 0; }
CUresult cuEventElapsedTime(float *ms, CUevent, CUevent) { return *ms = 0.0f, 0; }

CUresult cuModuleLoadData(CUmodule *m, const void *) { return *m = (CUmodule)&g_handle, 0; }
CUresult cuModuleUnload(CUmodule) { return 0; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule, const char *name) {
    for (const kernel &k : kernels())
        if (strcmp(k.name, name) == 0)
            return *f = (CUfunction)&k, 0;
    return ERR_NOT_FOUND;
}

// Only the carveout, a percent (MOEFLUX_GPU_CARVEOUT); nothing to change here.
CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    return f && attr == MF_CU_FUNC_CARVEOUT && v >= 0 && v <= 100 ? 0 : ERR_INVALID_VALUE;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned, CUstream, void **params,
                        void **) {
    const unsigned g[3] = {gx, gy, gz}, b[3] = {bx, by, bz};
    return ((const kernel *)f)->run(g, b, params);
}
CUresult cuLaunchKernelEx(const struct mf_cu_launch_config *c, CUfunction f, void **params,
                          void **) {
    return ((const kernel *)f)->run(c->grid, c->block, params);
}

CUresult cuGraphCreate(CUgraph *g, unsigned) { return *g = (CUgraph) new graph, 0; }
CUresult cuGraphDestroy(CUgraph g) {
    graph *gr = (graph *)g;
    for (node *n : gr->nodes)
        delete n;
    delete gr;
    return 0;
}
CUresult cuGraphAddKernelNode_v2(CUgraphNode *out, CUgraph g, const CUgraphNode *,
                                 size_t, const struct mf_cu_kernel_node *p) {
    if (!p->func)
        return ERR_INVALID_VALUE;
    node *n = new node;
    node_set(n, p);
    ((graph *)g)->nodes.push_back(n);
    *out = (CUgraphNode)n;
    return 0;
}
CUresult cuGraphAddDependencies_v2(CUgraph, const CUgraphNode *, const CUgraphNode *,
                                   const struct mf_cu_edge *, size_t) {
    return 0;   // nodes run in the order they were added
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec *x, CUgraph g, unsigned long long) {
    graph_exec *e = new graph_exec;
    for (node *n : ((graph *)g)->nodes) {
        e->keys.push_back(n);
        e->nodes.push_back(*n);
    }
    *x = (CUgraphExec)e;
    return 0;
}
CUresult cuGraphExecKernelNodeSetParams_v2(CUgraphExec x, CUgraphNode n,
                                           const struct mf_cu_kernel_node *p) {
    graph_exec *e = (graph_exec *)x;
    for (size_t i = 0; i < e->keys.size(); i++)
        if (e->keys[i] == (node *)n)
            return node_set(&e->nodes[i], p), 0;
    return ERR_INVALID_VALUE;
}
CUresult cuGraphLaunch(CUgraphExec x, CUstream) {
    for (node &n : ((graph_exec *)x)->nodes) {
        CUresult r = node_run(&n);
        if (r)
            return r;
    }
    return 0;
}
CUresult cuGraphExecDestroy(CUgraphExec x) { return delete (graph_exec *)x, 0; }

CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = r == ERR_LAUNCH_FAILED ? "a kernel failed in the CPU executor (see stderr)"
                                : "error in the CPU executor's driver";
    return 0;
}
CUresult cuGetErrorName(CUresult r, const char **s) {
    *s = r == ERR_LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR";
    return 0;
}

/* ---- NVRTC: the kernels are compiled into this library already ---- */

static const char token[] = "moeflux-sim";

nvrtcResult nvrtcVersion(int *major, int *minor) { return *major = 13, *minor = 0, 0; }
const char *nvrtcGetErrorString(nvrtcResult) { return "error in the CPU executor's NVRTC"; }
nvrtcResult nvrtcCreateProgram(nvrtcProgram *p, const char *, const char *, int,
                               const char *const *, const char *const *) {
    return *p = (nvrtcProgram)&g_handle, 0;
}
nvrtcResult nvrtcDestroyProgram(nvrtcProgram *p) { return *p = nullptr, 0; }
nvrtcResult nvrtcCompileProgram(nvrtcProgram, int, const char *const *) { return 0; }
nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram, size_t *n) { return *n = 1, 0; }
nvrtcResult nvrtcGetProgramLog(nvrtcProgram, char *log) { return *log = 0, 0; }
nvrtcResult nvrtcGetCUBINSize(nvrtcProgram, size_t *n) { return *n = sizeof token, 0; }
nvrtcResult nvrtcGetCUBIN(nvrtcProgram, char *out) { return memcpy(out, token, sizeof token), 0; }
nvrtcResult nvrtcGetPTXSize(nvrtcProgram, size_t *n) { return *n = sizeof token, 0; }
nvrtcResult nvrtcGetPTX(nvrtcProgram, char *out) { return memcpy(out, token, sizeof token), 0; }
nvrtcResult nvrtcGetNumSupportedArchs(int *n) { return *n = 1, 0; }
nvrtcResult nvrtcGetSupportedArchs(int *archs) { return archs[0] = 90, 0; }

}  // extern "C"
