/*
 * cuda_api.c — finding and loading libcuda and libnvrtc at run time (dlopen), and
 * resolving the entry points cuda_api.h lists. A missing library or symbol is an
 * MF_ERR_BACKEND that names every library tried and what the loader said.
 */
#include "backends/cuda/cuda_api.h"

#include <dlfcn.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"

// The driver's layouts of the launch structs (cuda.h of CUDA 12 and 13, 64-bit).
_Static_assert(offsetof(struct mf_cu_launch_attr, value) == 8 &&
                   sizeof(struct mf_cu_launch_attr) == 72,
               "CUlaunchAttribute layout");
_Static_assert(sizeof(void *) != 8 || (offsetof(struct mf_cu_launch_config, stream) == 32 &&
                                       offsetof(struct mf_cu_launch_config, n_attrs) == 48 &&
                                       sizeof(struct mf_cu_launch_config) == 56),
               "CUlaunchConfig layout");
_Static_assert(sizeof(struct mf_cu_edge) == 8, "CUgraphEdgeData layout");

// Resolve the symbols of a table whose first member is the library handle. The
// function pointers are copied from dlsym's void * with memcpy (C has no cast
// between object and function pointers).
struct sym_entry {
    const char *name;
    size_t offset;
};

#define MF_SYM_ENTRY_CU(m, sym, ret, args) {sym, offsetof(struct mf_cu_api, m)},
#define MF_SYM_ENTRY_NV(m, sym, ret, args) {sym, offsetof(struct mf_nvrtc_api, m)},

static const struct sym_entry cu_syms[] = {MF_CU_SYMBOLS(MF_SYM_ENTRY_CU)};
static const struct sym_entry cu_optional[] = {MF_CU_OPTIONAL_SYMBOLS(MF_SYM_ENTRY_CU)};
static const struct sym_entry nv_syms[] = {MF_NVRTC_SYMBOLS(MF_SYM_ENTRY_NV)};

static int resolve(void *lib, void *table, const struct sym_entry *syms, size_t n,
                   const char *libname, char *err, size_t errlen) {
    for (size_t i = 0; i < n; i++) {
        void *p = dlsym(lib, syms[i].name);
        if (!p)
            return mf_err(err, errlen, MF_ERR_BACKEND,
                          "cuda backend: %s lacks the entry point %s (too old?)", libname,
                          syms[i].name);
        memcpy((char *)table + syms[i].offset, &p, sizeof p);
    }
    return MF_OK;
}

// The optional symbols of a table: NULL where the library lacks one.
static void resolve_optional(void *lib, void *table, const struct sym_entry *syms,
                             size_t n) {
    for (size_t i = 0; i < n; i++) {
        void *p = dlsym(lib, syms[i].name);
        memcpy((char *)table + syms[i].offset, &p, sizeof p);
    }
}

// Append "name: dlerror" to the list of tries (truncated quietly when long).
static void note_try(char *tried, size_t n, const char *name) {
    const char *why = dlerror();
    size_t len = strlen(tried);
    if (len + 1 < n)
        snprintf(tried + len, n - len, "%s%s (%s)", len ? "; " : "", name,
                 why ? why : "not found");
}

static void *try_open(const char *name, char *tried, size_t n) {
    // RTLD_NODELETE: the libraries stay mapped after dlclose, as their C++ runtimes
    // expect (unloading libnvrtc orphans libstdc++'s allocations).
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!lib)
        note_try(tried, n, name);
    return lib;
}

int mf_cu_api_load(struct mf_cu_api *api, char *err, size_t errlen) {
    memset(api, 0, sizeof *api);
    char tried[1024] = "";
    const char *env = getenv("MOEFLUX_LIBCUDA");
    if (env && *env)
        api->lib = try_open(env, tried, sizeof tried);
    if (!api->lib)
        api->lib = try_open("libcuda.so.1", tried, sizeof tried);
    if (!api->lib)
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: no CUDA driver: tried %s%s", tried,
                      env && *env ? "" : " (MOEFLUX_LIBCUDA unset)");
    int rc = resolve(api->lib, api, cu_syms, sizeof cu_syms / sizeof cu_syms[0],
                     "libcuda", err, errlen);
    if (rc)
        mf_cu_api_unload(api);
    else
        resolve_optional(api->lib, api, cu_optional,
                         sizeof cu_optional / sizeof cu_optional[0]);
    return rc;
}

void mf_cu_api_unload(struct mf_cu_api *api) {
    if (api->lib)
        dlclose(api->lib);
    memset(api, 0, sizeof *api);
}

// pip's NVRTC wheels: nvidia/cu13/lib (CUDA 13) and nvidia/cuda_nvrtc/lib (12), found
// from site-packages next to this library (a non-editable moeflux install) or under
// $VIRTUAL_ENV.
static void *open_from_wheels(char *path, size_t pathlen, char *tried, size_t n) {
    static const char *const subdirs[] = {"nvidia/cu13/lib/libnvrtc.so.13",
                                          "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"};
    char pattern[1024];
    Dl_info info;
    const char *venv = getenv("VIRTUAL_ENV");
    for (int where = 0; where < 2; where++) {
        if (where == 0) {
            if (!dladdr((void *)&mf_nvrtc_api_load, &info) || !info.dli_fname)
                continue;
            const char *slash = strrchr(info.dli_fname, '/');
            if (!slash)
                continue;
            // <site-packages>/moeflux/_core*.so -> <site-packages>
            snprintf(pattern, sizeof pattern, "%.*s/..", (int)(slash - info.dli_fname),
                     info.dli_fname);
        } else {
            if (!venv || !*venv)
                continue;
            snprintf(pattern, sizeof pattern, "%s/lib/python3*/site-packages", venv);
        }
        for (size_t s = 0; s < sizeof subdirs / sizeof subdirs[0]; s++) {
            char full[1100];
            snprintf(full, sizeof full, "%s/%s", pattern, subdirs[s]);
            glob_t g;
            if (glob(full, 0, NULL, &g) != 0)
                continue;
            void *lib = NULL;
            for (size_t i = 0; i < g.gl_pathc && !lib; i++) {
                lib = try_open(g.gl_pathv[i], tried, n);
                if (lib)
                    snprintf(path, pathlen, "%s", g.gl_pathv[i]);
            }
            globfree(&g);
            if (lib)
                return lib;
        }
    }
    return NULL;
}

int mf_nvrtc_api_load(struct mf_nvrtc_api *api, char *err, size_t errlen) {
    memset(api, 0, sizeof *api);
    char tried[2048] = "";
    const char *names[] = {getenv("MOEFLUX_LIBNVRTC"), "libnvrtc.so.13", "libnvrtc.so.12",
                           "libnvrtc.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !api->lib; i++) {
        if (!names[i] || !*names[i])
            continue;
        api->lib = try_open(names[i], tried, sizeof tried);
        if (api->lib)
            snprintf(api->path, sizeof api->path, "%s", names[i]);
    }
    if (!api->lib)
        api->lib = open_from_wheels(api->path, sizeof api->path, tried, sizeof tried);
    if (!api->lib)
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: no NVRTC (the CUDA run-time compiler): tried %s, and "
                      "pip's nvidia-cuda-nvrtc wheels; set MOEFLUX_LIBNVRTC to its path",
                      tried);
    int rc = resolve(api->lib, api, nv_syms, sizeof nv_syms / sizeof nv_syms[0], api->path,
                     err, errlen);
    if (!rc && api->Version(&api->major, &api->minor) != 0)
        rc = mf_err(err, errlen, MF_ERR_BACKEND, "cuda backend: nvrtcVersion failed (%s)",
                    api->path);
    if (rc)
        mf_nvrtc_api_unload(api);
    return rc;
}

void mf_nvrtc_api_unload(struct mf_nvrtc_api *api) {
    if (api->lib)
        dlclose(api->lib);
    memset(api, 0, sizeof *api);
}

void mf_cu_error_text(const struct mf_cu_api *api, CUresult r, char *buf, size_t n) {
    const char *name = NULL, *text = NULL;
    if (api->GetErrorName)
        api->GetErrorName(r, &name);
    if (api->GetErrorString)
        api->GetErrorString(r, &text);
    snprintf(buf, n, "%s (%s)", name ? name : "CUDA error", text ? text : "no description");
}
