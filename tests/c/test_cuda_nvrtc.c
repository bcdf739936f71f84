/*
 * test_cuda_nvrtc.c — checks of the CUDA backend that need no GPU: the embedded kernel
 * source compiles with NVRTC for sm_80, sm_90 and sm_100 with no error and no warning
 * (skipped where libnvrtc is absent), the embedded sources are those of shaders/
 * (byte for byte), MOEFLUX_SHADERS_DIR replaces them, and without a CUDA driver mf_backend_new("cuda") fails with
 * MF_ERR_BACKEND naming the libraries it tried. The PTX (compute_90) shows no kernel
 * keeping an array or struct in local memory beyond sinf / cosf's own.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backends/backend.h"
#include "backends/cuda/cuda_internal.h"
#include "check.h"

int mf_cuda_compile(const struct mf_nvrtc_api *nv, const char *arch, void **image,
                    size_t *size, char **log, char *err, size_t errlen);

// MOEFLUX_SHADERS_DIR: the files of that folder replace the embedded sources (a
// planted #error must surface in the message with NVRTC's log; a missing file is named).
static void test_shaders_dir(const struct mf_nvrtc_api *nv) {
    char dir[200], err[8192] = "";
    if (check_make_tmpdir(dir, sizeof dir, "mf_shaders") != 0)
        return;
    for (int i = 0; i < mf_shader_count; i++) {
        int broken = strcmp(mf_shader_names[i], "rope.h") == 0;
        char *text = malloc(strlen(mf_shader_sources[i]) + 64);
        CHECK(text != NULL, "out of memory");
        if (!text)
            return;
        sprintf(text, "%s%s", mf_shader_sources[i],
                broken ? "#error moeflux-test-broken-kernel\n" : "");
        check_write_file(dir, mf_shader_names[i], text, strlen(text));
        free(text);
    }
    setenv("MOEFLUX_SHADERS_DIR", dir, 1);
    void *image = NULL;
    size_t size = 0;
    char *log = NULL;
    int rc = mf_cuda_compile(nv, "sm_90", &image, &size, &log, err, sizeof err);
    CHECK(rc == MF_ERR_BACKEND && strstr(err, "moeflux-test-broken-kernel"),
          "a broken kernel file from MOEFLUX_SHADERS_DIR: %d %.300s", rc, err);
    free(image), free(log);
    char path[600];
    snprintf(path, sizeof path, "%s/rope.h", dir);
    remove(path);
    rc = mf_cuda_compile(nv, "sm_90", &image, &size, &log, err, sizeof err);
    CHECK(rc != MF_OK && strstr(err, "rope.h"), "a missing kernel file is named: %d %s", rc,
          err);
    free(image), free(log);
    unsetenv("MOEFLUX_SHADERS_DIR");
    for (int i = 0; i < mf_shader_count; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, mf_shader_names[i]);
        remove(path);
    }
    remove(dir);
}

// What a compile for one architecture gave, sent back from the child process that ran
// it (the architectures compile at once, each in its own process: about a minute each).
struct compiled {
    int rc;
    size_t size;
    int log_blank;      // NVRTC's log is empty or whitespace: a clean compile
    int n_local;        // PTX: functions with a local array over MF_PTX_LOCAL_MAX bytes
    double secs;
    char msg[1536];     // err, or the start of a non-empty log
    char local[1024];   // PTX: those functions, "name (bytes)" each
};

// The most local memory a kernel's PTX may declare: the 7 words sinf / cosf keep for
// their slow argument reduction (mf_rope, mf_rope_qk). More means an array or struct
// indexed by a value known only at run time, which the compiler copies to local memory
// on every thread (mf_mv_multi1n's 212-byte parameters, session 23: 29.8 us where 12.3
// without).
#define MF_PTX_LOCAL_MAX 28

// Line [*p, end) of text, *p moved past it; 0 at the end.
static int next_line(const char **p, const char *end, const char **line, size_t *n) {
    if (*p >= end || **p == '\0')
        return 0;
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    *line = *p;
    *n = nl ? (size_t)(nl - *p) : (size_t)(end - *p);
    *p = nl ? nl + 1 : end;
    return 1;
}

// The functions of PTX text whose __local_depot is over MF_PTX_LOCAL_MAX bytes, into c.
static void ptx_locals(const char *ptx, size_t size, struct compiled *c) {
    const char *p = ptx, *end = ptx + size, *line;
    char fn[128] = "?";
    size_t n, used = 0;
    while (next_line(&p, end, &line, &n)) {
        const char *e = memmem(line, n, ".entry ", 7), *f = memmem(line, n, ".func ", 6);
        const char *name = e ? e + 7 : f ? f + 6 : NULL;
        if (name && *name == '(') {   // .func (.param ... retval) name(
            const char *r = memchr(name, ')', (size_t)(line + n - name));
            name = r ? r + 1 + strspn(r + 1, " ") : name;
        }
        if (name) {
            size_t k = strcspn(name, "( \n");
            snprintf(fn, sizeof fn, "%.*s", (int)(k < 127 ? k : 127), name);
        }
        const char *d = memmem(line, n, "__local_depot", 13);
        const char *b = d ? memchr(d, '[', (size_t)(line + n - d)) : NULL;
        if (!b || !memmem(line, n, ".local", 6))
            continue;
        const long bytes = strtol(b + 1, NULL, 10);
        if (bytes <= MF_PTX_LOCAL_MAX)
            continue;
        c->n_local++;
        int w = snprintf(c->local + used, sizeof c->local - used, "%s%s (%ld)",
                         used ? ", " : "", fn, bytes);
        if (w > 0 && (size_t)w < sizeof c->local - used)
            used += (size_t)w;
    }
}

static void compile_child(const struct mf_nvrtc_api *nv, const char *arch, int fd) {
    struct compiled c = {0};
    void *image = NULL;
    char *log = NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    c.rc = mf_cuda_compile(nv, arch, &image, &c.size, &log, c.msg, sizeof c.msg);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c.secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    c.log_blank = !log || strspn(log, " \n") == strlen(log);
    if (c.rc == MF_OK && strncmp(arch, "compute_", 8) == 0)
        ptx_locals(image, c.size, &c);
    if (!c.log_blank)
        snprintf(c.msg, sizeof c.msg, "%s", log);
    ssize_t w = write(fd, &c, sizeof c);
    _exit(w == (ssize_t)sizeof c ? 0 : 1);
}

static void test_compile(void) {
    struct mf_nvrtc_api nv;
    char err[4096];
    if (mf_nvrtc_api_load(&nv, err, sizeof err) != MF_OK) {
        printf("SKIP: no NVRTC (%s)\n", err);
        return;
    }
    printf("NVRTC %d.%d from %s\n", nv.major, nv.minor, nv.path);
    enum { N_ARCH = 4 };
    const char *archs[N_ARCH] = {"sm_80", "sm_90", "sm_100", "compute_90"};
    int fds[N_ARCH];
    pid_t pids[N_ARCH];
    fflush(stdout);
    for (int i = 0; i < N_ARCH; i++) {
        int pfd[2];
        pids[i] = -1;
        fds[i] = -1;
        if (pipe(pfd) != 0) {
            CHECK(0, "pipe: %s", strerror(errno));
            continue;
        }
        pids[i] = fork();
        if (pids[i] == 0) {
            close(pfd[0]);
            compile_child(&nv, archs[i], pfd[1]);
        }
        close(pfd[1]);
        fds[i] = pfd[0];
        CHECK(pids[i] > 0, "fork: %s", strerror(errno));
    }
    for (int i = 0; i < N_ARCH; i++) {
        struct compiled c = {.rc = -1};
        ssize_t got = fds[i] >= 0 ? read(fds[i], &c, sizeof c) : -1;
        int status = 0;
        if (pids[i] > 0)
            waitpid(pids[i], &status, 0);
        if (fds[i] >= 0)
            close(fds[i]);
        CHECK(got == (ssize_t)sizeof c && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the compile for %s did not report (status %d)", archs[i], status);
        if (got != (ssize_t)sizeof c)
            continue;
        CHECK(c.rc == MF_OK, "compile for %s: %s", archs[i], c.msg);
        CHECK(c.rc != MF_OK || c.size > 1000, "%s: a %zu-byte image", archs[i], c.size);
        // NVRTC's log is empty on a clean compile; any text (a warning) fails.
        CHECK(c.log_blank, "NVRTC log for %s is not empty:\n%s", archs[i], c.msg);
        CHECK(c.n_local == 0, "%s: %d functions keep more than %d bytes in local memory "
              "(an array or struct indexed by a run-time value?): %s", archs[i], c.n_local,
              MF_PTX_LOCAL_MAX, c.local);
        printf("compiled for %s: %zu bytes in %.2f s\n", archs[i], c.size, c.secs);
    }
    test_shaders_dir(&nv);
    mf_nvrtc_api_unload(&nv);
}

// Every embedded source equals the file of the same name in shaders/ (run from the
// repository root, as `make ctest` does): the generated file is current.
static void test_embedded_current(void) {
    CHECK(mf_shader_count >= 10, "%d embedded kernel files", mf_shader_count);
    for (int i = 0; i < mf_shader_count; i++) {
        char path[256];
        snprintf(path, sizeof path, "shaders/%s", mf_shader_names[i]);
        FILE *f = fopen(path, "rb");
        if (!f) {
            printf("SKIP: %s not found (not run from the repository root)\n", path);
            return;
        }
        size_t n = strlen(mf_shader_sources[i]);
        char *buf = malloc(n + 2);
        CHECK(buf != NULL, "out of memory");
        size_t got = buf ? fread(buf, 1, n + 1, f) : 0;
        fclose(f);
        CHECK(buf && got == n && memcmp(buf, mf_shader_sources[i], n) == 0,
              "embedded %s differs from the file: rebuild (shaders/embed.py)", path);
        free(buf);
    }
}

static void test_no_driver(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib) {
        dlclose(lib);
        printf("SKIP: a CUDA driver is present; its absence is not testable here\n");
        return;
    }
    struct mf_backend *be = (struct mf_backend *)1;
    char err[2048] = "";
    int rc = mf_backend_new(&be, "cuda", err, sizeof err);
    CHECK(rc == MF_ERR_BACKEND, "mf_backend_new(cuda) without a driver: %d", rc);
    CHECK(be == NULL, "no backend returned on failure");
    CHECK(strstr(err, "libcuda.so.1") != NULL, "message names libcuda.so.1: %s", err);
    CHECK(strstr(err, "MOEFLUX_LIBCUDA") != NULL, "message names MOEFLUX_LIBCUDA: %s", err);
    CHECK(mf_backend_cuda_probe(err, sizeof err) == MF_ERR_BACKEND, "probe fails: %s", err);
    // An override that does not exist is named too.
    setenv("MOEFLUX_LIBCUDA", "/nonexistent/libcuda-moeflux-test.so", 1);
    rc = mf_backend_new(&be, "cuda", err, sizeof err);
    unsetenv("MOEFLUX_LIBCUDA");
    CHECK(rc == MF_ERR_BACKEND && strstr(err, "/nonexistent/libcuda-moeflux-test.so") &&
              strstr(err, "libcuda.so.1"),
          "override and default both named: %s", err);
    printf("no driver: %s\n", err);
}

int main(void) {
    test_embedded_current();
    test_no_driver();
    test_compile();
    return check_finish("test_cuda_nvrtc");
}
