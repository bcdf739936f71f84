/*
 * arch.c — the architecture table: config model_type -> the family's file.
 *
 * Each family lives in one file (csrc/models/<model_type>.c) that defines one
 * `const struct mf_arch` (its config reader, layer kinds, snapshot identity fields,
 * router kind and expert components, weight binding, state and forward pass) and adds
 * one line below, e.g.
 * The table is const: no registration at run time, no global state.
 */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

extern const struct mf_arch mf_arch_qwen3_5_moe;
extern const struct mf_arch mf_arch_qwen3_next;
extern const struct mf_arch mf_arch_deepseek_v3;
extern const struct mf_arch mf_arch_qwen3_moe;
extern const struct mf_arch mf_arch_glm4_moe;
extern const struct mf_arch mf_arch_gpt_oss;
extern const struct mf_arch mf_arch_minimax;

// NULL-terminated so the table may be empty before any arch lands.
static const struct mf_arch *const arch_table[] = {
    &mf_arch_qwen3_5_moe,
    &mf_arch_qwen3_next,
    &mf_arch_deepseek_v3,
    &mf_arch_qwen3_moe,
    &mf_arch_glm4_moe,
    &mf_arch_gpt_oss,
    &mf_arch_minimax,
    NULL,
};

const struct mf_arch *mf_arch_find(int id) {
    for (int i = 0; arch_table[i]; i++)
        if (arch_table[i]->id == id)
            return arch_table[i];
    return NULL;
}

const struct mf_arch *mf_arch_by_type(const char *model_type) {
    for (int i = 0; arch_table[i]; i++) {
        const struct mf_arch *a = arch_table[i];
        if (strcmp(a->model_type, model_type) == 0 ||
            (a->alias && strcmp(a->alias, model_type) == 0))
            return a;
    }
    return NULL;
}

void mf_arch_names(char *buf, size_t n) {
    size_t used = 0;
    if (n) buf[0] = '\0';
    for (int i = 0; arch_table[i] && used < n; i++) {
        const struct mf_arch *a = arch_table[i];
        int w = snprintf(buf + used, n - used, "%s%s%s%s%s", i ? ", " : "",
                         a->model_type, a->alias ? " (and " : "",
                         a->alias ? a->alias : "", a->alias ? ")" : "");
        if (w < 0) return;
        used += (size_t)w;
    }
}
