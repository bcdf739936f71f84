/*
 * arch.c — the architecture table: config model_type -> forward implementation.
 *
 * Each forward file (csrc/models/<model_type>.c) defines one `const struct mf_arch`
 * and adds one line below, e.g.
 *     extern const struct mf_arch mf_arch_qwen3_next;
 * above the table and `&mf_arch_qwen3_next,` inside it. A family parsed by config.c but
 * absent here makes mf_model_load fail with MF_ERR_UNSUPPORTED. The table is const:
 * no registration at run time, no global state.
 */
#include "core/internal.h"

extern const struct mf_arch mf_arch_qwen3_5_moe;
extern const struct mf_arch mf_arch_qwen3_next;
extern const struct mf_arch mf_arch_deepseek_v3;
extern const struct mf_arch mf_arch_qwen3_moe;

// NULL-terminated so the table may be empty before any arch lands.
static const struct mf_arch *const arch_table[] = {
    &mf_arch_qwen3_5_moe,
    &mf_arch_qwen3_next,
    &mf_arch_deepseek_v3,
    &mf_arch_qwen3_moe,
    NULL,
};

const struct mf_arch *mf_arch_find(enum mf_arch_id id) {
    for (int i = 0; arch_table[i]; i++)
        if (arch_table[i]->id == id)
            return arch_table[i];
    return NULL;
}
