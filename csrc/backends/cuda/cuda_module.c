/*
 * cuda_module.c — the kernel module: NVRTC compiles the embedded kernel source
 * (shaders/, carried as strings by the generated mf_shaders.c) once per GPU
 * architecture, and the image is kept in a cubin cache on disk keyed by a hash of the
 * sources, options, NVRTC and driver versions and the architecture. Cache writes go to
 * a temporary file renamed into place; an entry whose header or checksum is wrong is
 * compiled again and replaced. MOEFLUX_SHADERS_DIR replaces the embedded sources by
 * the files of a folder.
 */
#include "backends/cuda/cuda_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CACHE_MAGIC "MFCUBIN1"
#define CACHE_HEADER 24   // magic, payload bytes, payload FNV-1a (u64 each)

/* ==== Hashing (FNV-1a 64; two seeds give the 128-bit cache key) ==== */

static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t fnv_str(uint64_t h, const char *s) { return fnv(h, s, strlen(s) + 1); }

/* ==== Sources ====
 * The embedded strings, or with MOEFLUX_SHADERS_DIR=<repo>/shaders the files of that
 * folder under the same names (kernel work without a rebuild; they key the cache too). */

struct sources {
    const char *const *text;
    char **owned;                // the texts read from MOEFLUX_SHADERS_DIR, else NULL
};

static void sources_free(struct sources *s) {
    if (s->owned)
        for (int i = 0; i < mf_shader_count; i++)
            free(s->owned[i]);
    free(s->owned);
    s->owned = NULL;
}

static int sources_load(struct sources *s, char *err, size_t errlen) {
    const char *dir = getenv("MOEFLUX_SHADERS_DIR");
    s->text = mf_shader_sources;
    s->owned = NULL;
    if (!dir || !*dir)
        return MF_OK;
    s->owned = calloc((size_t)mf_shader_count, sizeof *s->owned);
    if (!s->owned)
        return mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: out of memory");
    for (int i = 0; i < mf_shader_count; i++) {
        char *path = mf_path_join(dir, mf_shader_names[i]);
        size_t len = 0;
        int rc = path ? mf_read_file(path, &s->owned[i], &len, err, errlen)
                      : mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: out of memory");
        free(path);
        if (rc) {
            sources_free(s);
            return rc;
        }
    }
    s->text = (const char *const *)s->owned;
    return MF_OK;
}

/* ==== Compile ==== */

// The options every compile uses besides the architecture: C++17, no fast math and no
// contraction of a*b+c into an FMA, so each product and sum rounds as in the CPU's f32
// code.
static const char *const base_opts[] = {"-std=c++17", "--fmad=false", "-DMF_NVRTC=1"};
#define N_BASE_OPTS (int)(sizeof base_opts / sizeof base_opts[0])

static int nv_fail(const struct mf_nvrtc_api *nv, nvrtcResult r, const char *what,
                   const char *arch, char *err, size_t errlen) {
    return mf_err(err, errlen, MF_ERR_BACKEND, "cuda backend: %s for %s: %s (%s)", what,
                  arch, nv->GetErrorString(r), nv->path);
}

static char *program_log(const struct mf_nvrtc_api *nv, nvrtcProgram prog) {
    size_t n = 0;
    if (nv->GetProgramLogSize(prog, &n) != 0 || n == 0)
        return NULL;
    char *log = malloc(n + 1);
    if (log && nv->GetProgramLog(prog, log) != 0) {
        free(log);
        return NULL;
    }
    if (log)
        log[n] = '\0';
    return log;
}

// Cubin for "sm_XX", PTX for "compute_XX".
static int take_image(const struct mf_nvrtc_api *nv, nvrtcProgram prog, const char *arch,
                      void **image, size_t *size, char *err, size_t errlen) {
    int ptx = strncmp(arch, "compute_", 8) == 0;
    size_t n = 0;
    nvrtcResult r = ptx ? nv->GetPTXSize(prog, &n) : nv->GetCUBINSize(prog, &n);
    if (r != 0)
        return nv_fail(nv, r, "reading the compiled image size", arch, err, errlen);
    char *buf = malloc(n ? n : 1);
    if (!buf)
        return mf_err(err, errlen, MF_ERR_NOMEM, "cuda backend: no memory for a %zu-byte "
                      "kernel image", n);
    r = ptx ? nv->GetPTX(prog, buf) : nv->GetCUBIN(prog, buf);
    if (r != 0) {
        free(buf);
        return nv_fail(nv, r, "reading the compiled image", arch, err, errlen);
    }
    *image = buf;
    *size = n;
    return MF_OK;
}

static int compile_sources(const struct mf_nvrtc_api *nv, const struct sources *src,
                           const char *arch, void **image, size_t *size, char **log,
                           char *err, size_t errlen) {
    *image = NULL;
    *size = 0;
    *log = NULL;
    nvrtcProgram prog = NULL;
    nvrtcResult r = nv->CreateProgram(&prog, "#include \"mf_kernels.h\"\n", "moeflux.cu",
                                      mf_shader_count, src->text, mf_shader_names);
    if (r != 0)
        return nv_fail(nv, r, "nvrtcCreateProgram", arch, err, errlen);
    char archopt[64];
    snprintf(archopt, sizeof archopt, "--gpu-architecture=%s", arch);
    const char *opts[N_BASE_OPTS + 1];
    opts[0] = archopt;
    for (int i = 0; i < N_BASE_OPTS; i++)
        opts[i + 1] = base_opts[i];
    r = nv->CompileProgram(prog, N_BASE_OPTS + 1, opts);
    *log = program_log(nv, prog);
    int rc = r != 0 ? mf_err(err, errlen, MF_ERR_BACKEND,
                             "cuda backend: NVRTC failed to compile the kernels for %s: %s\n%s",
                             arch, nv->GetErrorString(r), *log ? *log : "(no log)")
                    : take_image(nv, prog, arch, image, size, err, errlen);
    nv->DestroyProgram(&prog);
    return rc;
}

int mf_cuda_compile(const struct mf_nvrtc_api *nv, const char *arch, void **image,
                    size_t *size, char **log, char *err, size_t errlen) {
    struct sources src;
    *image = NULL;
    *size = 0;
    *log = NULL;
    int rc = sources_load(&src, err, errlen);
    if (!rc)
        rc = compile_sources(nv, &src, arch, image, size, log, err, errlen);
    sources_free(&src);
    return rc;
}

// "sm_<cc>" when this NVRTC targets the device, else PTX for the newest architecture
// it knows below it (the driver then compiles the PTX).
static int pick_arch(const struct mf_nvrtc_api *nv, int cc, char *arch, size_t n,
                     char *err, size_t errlen) {
    int count = 0, archs[128], best = 0;
    if (nv->GetNumSupportedArchs(&count) != 0 || count <= 0 || count > 128 ||
        nv->GetSupportedArchs(archs) != 0)
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: NVRTC %d.%d could not list its architectures",
                      nv->major, nv->minor);
    for (int i = 0; i < count; i++) {
        if (archs[i] == cc) {
            snprintf(arch, n, "sm_%d", cc);
            return MF_OK;
        }
        if (archs[i] < cc && archs[i] > best)
            best = archs[i];
    }
    if (!best)
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: NVRTC %d.%d (%s) cannot target compute capability "
                      "%d.%d", nv->major, nv->minor, nv->path, cc / 10, cc % 10);
    snprintf(arch, n, "compute_%d", best);
    return MF_OK;
}

/* ==== Cache ==== */

// <dir>/cuda, made if missing: $MOEFLUX_CACHE_DIR, else $XDG_CACHE_HOME/moeflux, else
// ~/.cache/moeflux. 0 on failure (the cache is then skipped).
static int cache_dir(char *out, size_t n) {
    const char *env = getenv("MOEFLUX_CACHE_DIR"), *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (env && *env)
        snprintf(out, n, "%s/cuda", env);
    else if (xdg && *xdg)
        snprintf(out, n, "%s/moeflux/cuda", xdg);
    else if (home && *home)
        snprintf(out, n, "%s/.cache/moeflux/cuda", home);
    else
        return 0;
    for (char *p = out + 1; *p; p++) {   // mkdir -p
        if (*p != '/')
            continue;
        *p = '\0';
        int bad = mkdir(out, 0755) != 0 && errno != EEXIST;
        *p = '/';
        if (bad)
            return 0;
    }
    return mkdir(out, 0755) == 0 || errno == EEXIST;
}

static void cache_path(char *out, size_t n, const char *dir, const char *arch,
                       int driver_version, const struct mf_nvrtc_api *nv,
                       const struct sources *src) {
    uint64_t h[2] = {0xcbf29ce484222325ull, 0x84222325cbf29ce4ull};
    char ver[96];
    snprintf(ver, sizeof ver, "%s|nvrtc %d.%d|driver %d", arch, nv->major, nv->minor,
             driver_version);
    for (int k = 0; k < 2; k++) {
        h[k] = fnv_str(h[k], CACHE_MAGIC);
        h[k] = fnv_str(h[k], ver);
        for (int i = 0; i < N_BASE_OPTS; i++)
            h[k] = fnv_str(h[k], base_opts[i]);
        for (int i = 0; i < mf_shader_count; i++) {
            h[k] = fnv_str(h[k], mf_shader_names[i]);
            h[k] = fnv_str(h[k], src->text[i]);
        }
    }
    snprintf(out, n, "%s/%016llx%016llx-%s.bin", dir, (unsigned long long)h[0],
             (unsigned long long)h[1], arch);
}

// The payload of a valid entry (malloc), or NULL (missing, short, corrupt).
static void *cache_read(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    unsigned char hdr[CACHE_HEADER];
    uint64_t n = 0, sum = 0;
    void *buf = NULL;
    if (fread(hdr, 1, sizeof hdr, f) == sizeof hdr && memcmp(hdr, CACHE_MAGIC, 8) == 0) {
        memcpy(&n, hdr + 8, 8);
        memcpy(&sum, hdr + 16, 8);
        buf = n > 0 && n < ((uint64_t)1 << 31) ? malloc((size_t)n) : NULL;
    }
    if (buf && (fread(buf, 1, (size_t)n, f) != n || fgetc(f) != EOF ||
                fnv(0xcbf29ce484222325ull, buf, (size_t)n) != sum)) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

// Best effort: a failure leaves no partial file behind and is otherwise ignored.
static void cache_write(const char *path, const void *image, size_t size) {
    char tmp[1300];
    int len = snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%p", path, (long)getpid(), (void *)&tmp);
    if (len < 0 || (size_t)len >= sizeof tmp)
        return;
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return;
    unsigned char hdr[CACHE_HEADER];
    uint64_t n = size, sum = fnv(0xcbf29ce484222325ull, image, size);
    memcpy(hdr, CACHE_MAGIC, 8);
    memcpy(hdr + 8, &n, 8);
    memcpy(hdr + 16, &sum, 8);
    int ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr &&
             fwrite(image, 1, size, f) == size;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0)
        remove(tmp);
}

/* ==== Load ==== */

// NVRTC newer than the driver: cubins of a newer major, and any PTX of a newer
// release, are refused by the driver, so say which to upgrade up front.
static int check_skew(const struct mf_nvrtc_api *nv, int driver_version, int ptx,
                      char *err, size_t errlen) {
    int dmaj = driver_version / 1000, dmin = (driver_version % 1000) / 10;
    if (nv->major > dmaj || (ptx && nv->major == dmaj && nv->minor > dmin))
        return mf_err(err, errlen, MF_ERR_BACKEND,
                      "cuda backend: NVRTC %d.%d (%s) is newer than the driver's CUDA "
                      "%d.%d: upgrade the NVIDIA driver or point MOEFLUX_LIBNVRTC at an "
                      "NVRTC of CUDA %d.%d or older",
                      nv->major, nv->minor, nv->path, dmaj, dmin, dmaj, dmin);
    return MF_OK;
}

static int load_image(const struct mf_cu_api *cu, const void *image, CUmodule *mod,
                      char *err, size_t errlen) {
    CUresult r = cu->ModuleLoadData(mod, image);
    if (r == MF_CUDA_SUCCESS)
        return MF_OK;
    char text[256];
    mf_cu_error_text(cu, r, text, sizeof text);
    *mod = NULL;
    return mf_err(err, errlen, MF_ERR_BACKEND, "cuda backend: cuModuleLoadData: %s", text);
}

// The module from the cache entry of these sources, or compiled (and stored).
static int load_or_compile(const struct mf_cu_api *cu, const struct mf_nvrtc_api *nv,
                           const struct sources *src, const char *arch, int driver_version,
                           CUmodule *mod, char *err, size_t errlen) {
    char dir[1024], path[1200] = "";
    int rc;
    if (cache_dir(dir, sizeof dir))
        cache_path(path, sizeof path, dir, arch, driver_version, nv, src);
    size_t size = 0;
    void *image = path[0] ? cache_read(path, &size) : NULL;
    if (image && load_image(cu, image, mod, err, errlen) == MF_OK) {
        free(image);
        return MF_OK;
    }
    free(image);   // missing, corrupt or refused: compile again
    char *log = NULL;
    rc = compile_sources(nv, src, arch, &image, &size, &log, err, errlen);
    free(log);
    if (rc)
        return rc;
    rc = load_image(cu, image, mod, err, errlen);
    if (!rc && path[0])
        cache_write(path, image, size);
    free(image);
    return rc;
}

int mf_cuda_module_load(const struct mf_cu_api *cu, const struct mf_nvrtc_api *nv, int cc,
                        int driver_version, CUmodule *mod, char *err, size_t errlen) {
    char arch[32];
    struct sources src;
    int rc = pick_arch(nv, cc, arch, sizeof arch, err, errlen);
    if (!rc)
        rc = check_skew(nv, driver_version, arch[0] == 'c', err, errlen);
    if (!rc)
        rc = sources_load(&src, err, errlen);
    if (rc)
        return rc;
    rc = load_or_compile(cu, nv, &src, arch, driver_version, mod, err, errlen);
    sources_free(&src);
    return rc;
}
