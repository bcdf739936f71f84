/*
 * driver.c — a main() for the harnesses where libFuzzer is not available: replays
 * every file given (directories: every file in them, one level) through
 * LLVMFuzzerTestOneInput once, so the committed corpora run under any C compiler
 * (the Makefile builds it with gcc and ASan + UBSan when clang's libFuzzer is
 * missing). Exit status 0 when every input ran; a crash or a harness's abort ends it.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        uint8_t *nb = realloc(buf, cap *= 2);
        if (!nb) free(buf);
        buf = nb;
    }
    int bad = ferror(f) || !buf;
    fclose(f);
    if (!bad) LLVMFuzzerTestOneInput(buf, len);
    free(buf);
    if (bad) fprintf(stderr, "%s: cannot read\n", path);
    return bad ? -1 : 0;
}

static int run_path(const char *path, int *n) {
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        (*n)++;
        return run_file(path);
    }
    DIR *d = opendir(path);
    if (!d) {
        perror(path);
        return -1;
    }
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && !rc) {
        char sub[4096];
        if (e->d_name[0] == '.') continue;
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        if (stat(sub, &st) == 0 && S_ISREG(st.st_mode)) {
            (*n)++;
            rc = run_file(sub);
        }
    }
    closedir(d);
    return rc;
}

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize(&argc, &argv) != 0) return 1;
    int n = 0, rc = 0;
    for (int i = 1; i < argc && !rc; i++) rc = run_path(argv[i], &n);
    printf("%s: replayed %d input(s)%s\n", argv[0], n, rc ? ", stopped by an error" : "");
    return rc ? 1 : 0;
}
