/*
 * kernel_sets.c — prints the CPU kernel sets a moeflux build made by this compiler
 * contains and this CPU runs, comma-separated ("scalar,avx2,avx512,avx512vnni"). `make test`
 * passes it as MOEFLUX_REQUIRE_KERNELS, so a test run that did not exercise one of
 * them fails. Deliberately built apart from the core, from the compiler's target
 * macros and the CPU's own feature bits: a dispatch bug that hid a set from the tests
 * would also hide it from a list the core printed itself.
 * The features per set are those the set's code is compiled for
 * (csrc/backends/cpu/cpu_kernels_x86.c target attributes; NEON is part of aarch64).
 */
#include <stdio.h>

int main(void) {
    printf("scalar");
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        printf(",avx2");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        printf(",avx512");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        printf(",avx512vnni");
#elif defined(__aarch64__) && defined(__ARM_NEON)
    printf(",neon");
#endif
    printf("\n");
    return 0;
}
