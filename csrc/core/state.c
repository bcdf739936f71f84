/*
 * state.c — sequence-state snapshots and automatic checkpoints (owned by the snapshot
 * work; placeholder until snapshots land).
 */
#include "core/internal.h"

void mf_state_after_eval(mf_ctx *ctx) {
    (void)ctx;
}

void mf_state_on_reset(mf_ctx *ctx) {
    (void)ctx;
}
