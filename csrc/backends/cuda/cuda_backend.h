/*
 * cuda_backend.h — the CUDA backend's constructor and a cheap availability probe.
 * Every build has them; without a CUDA driver both return MF_ERR_BACKEND naming the
 * libraries tried.
 */
#ifndef MF_CUDA_BACKEND_H
#define MF_CUDA_BACKEND_H

#include <stddef.h>

struct mf_backend;

// Loads libcuda and libnvrtc, picks the device (MOEFLUX_CUDA_DEVICE, default 0),
// retains its primary context and loads the kernel module (cubin cache or NVRTC).
int mf_backend_cuda_new(struct mf_backend **out, char *err, size_t errlen);

// MF_OK when a CUDA device and NVRTC are usable (libraries load, cuInit succeeds, at
// least one device), without compiling anything.
int mf_backend_cuda_probe(char *err, size_t errlen);

// Whether a CUDA backend from mf_backend_cuda_new takes the tensor-core kernels
// (shaders/tc.h: an sm_80 or later device and MOEFLUX_GPU_TC=1 when it was made).
int mf_backend_cuda_tc(const struct mf_backend *be);

#endif /* MF_CUDA_BACKEND_H */
