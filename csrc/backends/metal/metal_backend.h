/*
 * metal_backend.h — the Metal backend's constructor and availability probe, as plain
 * C. The first two are defined only in macOS builds (metal_backend.m); backend.c calls
 * them under __APPLE__ and answers every other system with a clear MF_ERR_BACKEND.
 */
#ifndef MF_METAL_BACKEND_H
#define MF_METAL_BACKEND_H

#include <stddef.h>

struct mf_backend;

// The system default Metal device with unified memory (Apple Silicon), its command
// queue factory and the kernel library compiled from the embedded shaders/ sources
// (safe math). MF_ERR_BACKEND with the Metal compiler's log on failure.
int mf_backend_metal_new(struct mf_backend **out, char *err, size_t errlen);

// MF_OK when a Metal device with unified memory exists, without compiling anything.
int mf_backend_metal_probe(char *err, size_t errlen);

// Every build (backend.c): MF_OK when the Metal backend can be opened here, else
// MF_ERR_BACKEND with the reason (not macOS; no unified-memory device). "auto" asks it.
int mf_backend_metal_usable(char *err, size_t errlen);

#endif /* MF_METAL_BACKEND_H */
