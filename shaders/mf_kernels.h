/*
 * mf_kernels.h — the whole kernel source: every kernel file, in manifest order. NVRTC
 * compiles this one program (the other files reach it as in-memory headers); the
 * Metal driver would compile the same text.
 */
#ifndef MF_KERNELS_H
#define MF_KERNELS_H

#include "mf_prelude.h"
#include "mf_params.h"
#include "quant.h"
#include "matmul.h"
#include "norm.h"
#include "rope.h"
#include "attn.h"
#include "gdn.h"
#include "elementwise.h"
#include "moe.h"
#include "tc.h"
#include "mma.h"
#include "gptoss.h"

#endif /* MF_KERNELS_H */
