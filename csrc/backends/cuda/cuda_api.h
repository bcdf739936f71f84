/*
 * cuda_api.h — our own declarations of the CUDA driver and NVRTC entry points the CUDA
 * backend uses, and their loading by dlopen at run time. No CUDA header or library is
 * needed to build moeflux: every build carries the CUDA backend, and it finds the
 * driver (libcuda) and the run-time compiler (libnvrtc) only when it is asked for.
 */
#ifndef MF_CUDA_API_H
#define MF_CUDA_API_H

#include <stddef.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphNode_st *CUgraphNode;
typedef struct CUgraphExec_st *CUgraphExec;

// A kernel node of a graph: the driver's CUDA_KERNEL_NODE_PARAMS (the v2 layout of
// CUDA 12 and 13, with cuGraphAddKernelNode_v2 and cuGraphExecKernelNodeSetParams_v2).
struct mf_cu_kernel_node {
    CUfunction func;
    unsigned grid[3], block[3];
    unsigned shared_bytes;
    void **params;
    void **extra;
    void *kern;              // a CUkernel, used only when func is NULL
    CUcontext ctx;
};

// A launch attribute (CUlaunchAttribute: an id, then a 64-byte value at offset 8) and
// the configuration of cuLaunchKernelEx (CUlaunchConfig).
struct mf_cu_launch_attr {
    int id;
    char pad[4];
    union {
        char bytes[64];
        int i;
        void *align;
    } value;
};

struct mf_cu_launch_config {
    unsigned grid[3], block[3];
    unsigned shared_bytes;
    CUstream stream;
    struct mf_cu_launch_attr *attrs;
    unsigned n_attrs;
};

// The annotation of a graph edge (CUgraphEdgeData).
struct mf_cu_edge {
    unsigned char from_port, to_port, type, reserved[5];
};

#define MF_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION 6
#define MF_CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC 1
#define MF_CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC 1

#define MF_CUDA_SUCCESS 0
#define MF_CUDA_ERROR_OUT_OF_MEMORY 2
#define MF_CU_DEVICE_ATTRIBUTE_CC_MAJOR 75
#define MF_CU_DEVICE_ATTRIBUTE_CC_MINOR 76
#define MF_CU_MEMHOSTALLOC_PORTABLE 1
#define MF_CU_MEMHOSTREGISTER_PORTABLE 1
#define MF_CU_MEMHOSTREGISTER_READ_ONLY 8
#define MF_CU_STREAM_NON_BLOCKING 1
#define MF_CU_EVENT_DISABLE_TIMING 2
#define MF_CU_FUNC_CARVEOUT 9   // CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT

typedef int nvrtcResult;
typedef struct _nvrtcProgram *nvrtcProgram;

// X(member, symbol, return type, parameters): the driver entry points, by the exported
// (versioned) symbol names of CUDA 12 and 13 drivers.
#define MF_CU_SYMBOLS(X)                                                                \
    X(Init, "cuInit", CUresult, (unsigned flags))                                       \
    X(DriverGetVersion, "cuDriverGetVersion", CUresult, (int *v))                       \
    X(DeviceGetCount, "cuDeviceGetCount", CUresult, (int *n))                           \
    X(DeviceGet, "cuDeviceGet", CUresult, (CUdevice * d, int ordinal))                  \
    X(DeviceGetAttribute, "cuDeviceGetAttribute", CUresult,                             \
      (int *v, int attr, CUdevice d))                                                   \
    X(DeviceGetName, "cuDeviceGetName", CUresult, (char *name, int len, CUdevice d))    \
    X(PrimaryCtxRetain, "cuDevicePrimaryCtxRetain", CUresult,                           \
      (CUcontext * c, CUdevice d))                                                      \
    X(PrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", CUresult, (CUdevice d))        \
    X(CtxSetCurrent, "cuCtxSetCurrent", CUresult, (CUcontext c))                        \
    X(MemAlloc, "cuMemAlloc_v2", CUresult, (CUdeviceptr * p, size_t n))                 \
    X(MemFree, "cuMemFree_v2", CUresult, (CUdeviceptr p))                               \
    X(MemHostAlloc, "cuMemHostAlloc", CUresult, (void **p, size_t n, unsigned flags))   \
    X(MemFreeHost, "cuMemFreeHost", CUresult, (void *p))                                \
    X(MemHostRegister, "cuMemHostRegister_v2", CUresult,                                \
      (void *p, size_t n, unsigned flags))                                              \
    X(MemHostUnregister, "cuMemHostUnregister", CUresult, (void *p))                    \
    X(MemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", CUresult,                                \
      (CUdeviceptr dst, const void *src, size_t n, CUstream s))                         \
    X(MemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", CUresult,                                \
      (void *dst, CUdeviceptr src, size_t n, CUstream s))                               \
    X(MemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", CUresult,                                \
      (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s))                         \
    X(MemsetD8Async, "cuMemsetD8Async", CUresult,                                       \
      (CUdeviceptr dst, unsigned char v, size_t n, CUstream s))                         \
    X(MemGetInfo, "cuMemGetInfo_v2", CUresult, (size_t * free_b, size_t * total_b))     \
    X(StreamCreate, "cuStreamCreate", CUresult, (CUstream * s, unsigned flags))         \
    X(StreamDestroy, "cuStreamDestroy_v2", CUresult, (CUstream s))                      \
    X(StreamSynchronize, "cuStreamSynchronize", CUresult, (CUstream s))                 \
    X(EventCreate, "cuEventCreate", CUresult, (CUevent * e, unsigned flags))            \
    X(EventDestroy, "cuEventDestroy_v2", CUresult, (CUevent e))                         \
    X(EventRecord, "cuEventRecord", CUresult, (CUevent e, CUstream s))                  \
    X(EventSynchronize, "cuEventSynchronize", CUresult, (CUevent e))                    \
    X(StreamWaitEvent, "cuStreamWaitEvent", CUresult,                                   \
      (CUstream s, CUevent e, unsigned flags))                                          \
    X(EventElapsedTime, "cuEventElapsedTime", CUresult,                                 \
      (float *ms, CUevent a, CUevent b))                                                \
    X(ModuleLoadData, "cuModuleLoadData", CUresult, (CUmodule * m, const void *image))  \
    X(ModuleUnload, "cuModuleUnload", CUresult, (CUmodule m))                           \
    X(ModuleGetFunction, "cuModuleGetFunction", CUresult,                               \
      (CUfunction * f, CUmodule m, const char *name))                                   \
    X(LaunchKernel, "cuLaunchKernel", CUresult,                                         \
      (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,   \
       unsigned bz, unsigned shared_bytes, CUstream s, void **params, void **extra))    \
    X(GraphCreate, "cuGraphCreate", CUresult, (CUgraph * g, unsigned flags))            \
    X(GraphDestroy, "cuGraphDestroy", CUresult, (CUgraph g))                            \
    X(GraphAddKernelNode, "cuGraphAddKernelNode_v2", CUresult,                          \
      (CUgraphNode * n, CUgraph g, const CUgraphNode *deps, size_t n_deps,             \
       const struct mf_cu_kernel_node *p))                                              \
    X(GraphInstantiate, "cuGraphInstantiateWithFlags", CUresult,                        \
      (CUgraphExec * x, CUgraph g, unsigned long long flags))                           \
    X(GraphExecKernelNodeSetParams, "cuGraphExecKernelNodeSetParams_v2", CUresult,      \
      (CUgraphExec x, CUgraphNode n, const struct mf_cu_kernel_node *p))                \
    X(GraphLaunch, "cuGraphLaunch", CUresult, (CUgraphExec x, CUstream s))              \
    X(GraphExecDestroy, "cuGraphExecDestroy", CUresult, (CUgraphExec x))                \
    X(GetErrorString, "cuGetErrorString", CUresult, (CUresult r, const char **s))       \
    X(GetErrorName, "cuGetErrorName", CUresult, (CUresult r, const char **s))

// Entry points taken where the driver has them and left NULL otherwise: programmatic
// dependent launch, in streams (cuLaunchKernelEx, CUDA 11.8) and as graph edges
// (cuGraphAddDependencies with edge data, CUDA 12.3); a kernel's shared memory
// carveout (cuFuncSetAttribute, MOEFLUX_GPU_CARVEOUT).
#define MF_CU_OPTIONAL_SYMBOLS(X)                                                       \
    X(FuncSetAttribute, "cuFuncSetAttribute", CUresult, (CUfunction f, int attr, int v)) \
    X(LaunchKernelEx, "cuLaunchKernelEx", CUresult,                                     \
      (const struct mf_cu_launch_config *c, CUfunction f, void **params, void **extra)) \
    X(GraphAddDependencies, "cuGraphAddDependencies_v2", CUresult,                      \
      (CUgraph g, const CUgraphNode *from, const CUgraphNode *to,                       \
       const struct mf_cu_edge *data, size_t n))

#define MF_NVRTC_SYMBOLS(X)                                                             \
    X(Version, "nvrtcVersion", nvrtcResult, (int *major, int *minor))                   \
    X(GetErrorString, "nvrtcGetErrorString", const char *, (nvrtcResult r))             \
    X(CreateProgram, "nvrtcCreateProgram", nvrtcResult,                                 \
      (nvrtcProgram * p, const char *src, const char *name, int n_headers,              \
       const char *const *headers, const char *const *include_names))                   \
    X(DestroyProgram, "nvrtcDestroyProgram", nvrtcResult, (nvrtcProgram * p))           \
    X(CompileProgram, "nvrtcCompileProgram", nvrtcResult,                               \
      (nvrtcProgram p, int n_opt, const char *const *opts))                             \
    X(GetProgramLogSize, "nvrtcGetProgramLogSize", nvrtcResult,                         \
      (nvrtcProgram p, size_t *n))                                                      \
    X(GetProgramLog, "nvrtcGetProgramLog", nvrtcResult, (nvrtcProgram p, char *log))    \
    X(GetCUBINSize, "nvrtcGetCUBINSize", nvrtcResult, (nvrtcProgram p, size_t *n))      \
    X(GetCUBIN, "nvrtcGetCUBIN", nvrtcResult, (nvrtcProgram p, char *out))              \
    X(GetPTXSize, "nvrtcGetPTXSize", nvrtcResult, (nvrtcProgram p, size_t *n))          \
    X(GetPTX, "nvrtcGetPTX", nvrtcResult, (nvrtcProgram p, char *out))                  \
    X(GetNumSupportedArchs, "nvrtcGetNumSupportedArchs", nvrtcResult, (int *n))         \
    X(GetSupportedArchs, "nvrtcGetSupportedArchs", nvrtcResult, (int *archs))

#define MF_API_MEMBER(m, sym, ret, args) ret(*m) args;

struct mf_cu_api {
    void *lib;
    MF_CU_SYMBOLS(MF_API_MEMBER)
    MF_CU_OPTIONAL_SYMBOLS(MF_API_MEMBER)
};

struct mf_nvrtc_api {
    void *lib;
    int major, minor;            // nvrtcVersion
    char path[512];              // the library name or path that loaded
    MF_NVRTC_SYMBOLS(MF_API_MEMBER)
};

// dlopen the driver: MOEFLUX_LIBCUDA, then libcuda.so.1. MF_ERR_BACKEND naming every
// name tried and dlerror() on failure (nothing left open).
int mf_cu_api_load(struct mf_cu_api *api, char *err, size_t errlen);
void mf_cu_api_unload(struct mf_cu_api *api);

// dlopen NVRTC: MOEFLUX_LIBNVRTC, libnvrtc.so.13, libnvrtc.so.12, libnvrtc.so, then the
// lib folders of pip's nvidia-cuda-nvrtc wheels next to this library or under
// $VIRTUAL_ENV. Fills major/minor.
int mf_nvrtc_api_load(struct mf_nvrtc_api *api, char *err, size_t errlen);
void mf_nvrtc_api_unload(struct mf_nvrtc_api *api);

// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)" into buf (name and text of r).
void mf_cu_error_text(const struct mf_cu_api *api, CUresult r, char *buf, size_t n);

#endif /* MF_CUDA_API_H */
