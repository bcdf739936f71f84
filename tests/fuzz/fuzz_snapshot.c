/*
 * fuzz_snapshot.c — sequence-state snapshots (core/state.c, mf_ctx_state_load).
 *
 * Init loads the five fixture models (zero weights; shapes of converted tiny models),
 * makes a context of each and evaluates three tokens, so each holds a real state: the
 * hybrid families have fixed-size (GatedDeltaNet) and positional segments, deepseek_v3
 * an MLA latent cache. FUZZ_WRITE_SEEDS=dir makes init write their snapshots there (the
 * seed corpus). Input: a snapshot, loaded into the context whose architecture id its
 * header names (qwen3_5_moe when none). Almost every mutation breaks the checksum
 * trailer, so each input is loaded twice: as it is, and with its trailer resealed
 * (the checksum recomputed from its documented definition in state.c), which lets the
 * fuzzer reach the identity, table and length checks behind it.
 *
 * Invariants beyond "no crash": a refused snapshot leaves the context exactly as it
 * was (its position; and, for inputs whose length is a multiple of 8, the bytes of a
 * fresh snapshot); an accepted one saves back to the same bytes, and its position is
 * what the header said.
 */
#include "fuzz_util.h"

#include "core/common.h"

static struct {
    mf_model *model[FUZZ_N_FAMILIES];
    mf_ctx *ctx[FUZZ_N_FAMILIES];
    uint8_t *before[FUZZ_N_FAMILIES];   // the snapshot each ctx holds between inputs
    size_t n_before[FUZZ_N_FAMILIES];
    uint8_t *scratch;                    // resealed input / saved state
    size_t scratch_cap;
} F;

// n_past follows the identity fields, whose count (u32 at offset 8) is per family in
// version 2 and 34 in version 1.
static size_t n_past_at(const uint8_t *snap) {
    uint32_t n_ident = 0;
    for (int i = 0; i < 4; i++) n_ident |= (uint32_t)snap[8 + i] << (8 * i);
    return 12 + 8 * (size_t)n_ident;
}

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

// state.c's snapshot checksum, from its definition: little-endian u64 words into four
// FNV-style lanes (word i to lane i % 4, lane l starting at FNV_OFFSET ^ l), then byte
// FNV-1a over the four lanes, the n % 8 tail bytes and n. Not inlined, so that the
// coverage ignorelist (coverage_ignore.txt) keeps its loop untraced.
__attribute__((noinline)) static uint64_t checksum(const uint8_t *p, size_t n) {
    uint64_t lane[4] = {FNV_OFFSET, FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3};
    size_t words = n / 8;
    for (size_t i = 0; i < words; i++) lane[i % 4] = (lane[i % 4] ^ le64(p + 8 * i)) * FNV_PRIME;
    uint8_t tail[40];
    for (int l = 0; l < 4; l++) put64(tail + 8 * l, lane[l]);
    put64(tail + 32, (uint64_t)n);
    uint64_t h = fnv1a(FNV_OFFSET, tail, 32);
    h = fnv1a(h, p + 8 * words, n % 8);
    return fnv1a(h, tail + 32, 8);
}

static uint8_t *grow(size_t n) {
    if (n > F.scratch_cap) {
        uint8_t *p = realloc(F.scratch, n);
        if (!p) fuzz_die("out of memory for %zu bytes", n);
        F.scratch = p;
        F.scratch_cap = n;
    }
    return F.scratch;
}

// The ctx's current snapshot into F.scratch; its length.
static size_t save(int f) {
    size_t n = mf_ctx_state_size(F.ctx[f]);
    if (mf_ctx_state_save(F.ctx[f], grow(n), n) != (int64_t)n)
        fuzz_die("%s: state_save: %s", fuzz_families[f], mf_ctx_errmsg(F.ctx[f]));
    return n;
}

static void init_family(int f, const char *seed_dir) {
    char dir[FUZZ_DIR_MAX], err[1024];
    size_t n;
    free(fuzz_fixture(f, dir, sizeof dir, &n));
    if (mf_model_load(&F.model[f], dir, NULL, err, sizeof err) != MF_OK)
        fuzz_die("fixture %s does not load: %s", fuzz_families[f], err);
    struct mf_ctx_params p = fuzz_ctx_params(F.model[f]);
    if (mf_ctx_new(&F.ctx[f], F.model[f], &p, err, sizeof err) != MF_OK)
        fuzz_die("fixture %s: no context: %s", fuzz_families[f], err);
    int32_t toks[3] = {1, 2, 3};
    if (mf_ctx_eval(F.ctx[f], toks, 3, NULL, 0) != MF_OK)
        fuzz_die("fixture %s: eval: %s", fuzz_families[f], mf_ctx_errmsg(F.ctx[f]));
    F.n_before[f] = save(f);
    F.before[f] = malloc(F.n_before[f]);
    if (!F.before[f]) fuzz_die("out of memory");
    memcpy(F.before[f], F.scratch, F.n_before[f]);
    if (seed_dir) {
        char name[64];
        snprintf(name, sizeof name, "%s.snap", fuzz_families[f]);
        if (fuzz_write(seed_dir, name, F.before[f], F.n_before[f]) != 0)
            fuzz_die("cannot write %s/%s", seed_dir, name);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    for (int f = 0; f < FUZZ_N_FAMILIES; f++) init_family(f, getenv("FUZZ_WRITE_SEEDS"));
    return 0;
}

// Family whose ctx gets this snapshot: the architecture id in its header (i64 after
// magic, version and the identity count), mapped to fuzz_families' order.
static int family_of(const uint8_t *data, size_t size) {
    // arch id (enum mf_arch_id 1-4, glm4_moe's 5, gpt_oss's 6 (not fuzzed), minimax's
    // 7) -> index
    static const int by_arch[8] = {0, 0, 1, 2, 3, 4, 0, 5};
    if (size < 20) return 0;
    uint64_t id = le64(data + 12);
    return id >= 1 && id <= 7 ? by_arch[id] : 0;
}

static void try_load(int f, const uint8_t *snap, size_t n) {
    mf_ctx *ctx = F.ctx[f];
    int rc = mf_ctx_state_load(ctx, snap, n);
    if (rc != MF_OK) {
        // Refused: the ctx must be exactly as before.
        if (!mf_ctx_errmsg(ctx)[0]) fuzz_die("refused snapshot (status %d) without a message", rc);
        if (mf_ctx_n_past(ctx) != 3) fuzz_die("a refused snapshot moved n_past");
        // A save costs several times a refusal (weights fingerprint, checksum): the
        // bytes are compared for one input length in 8, which still covers every path.
        if (n % 8) return;
        size_t m = save(f);
        if (m != F.n_before[f] || memcmp(F.scratch, F.before[f], m) != 0)
            fuzz_die("a refused snapshot (status %d: %s) changed the ctx", rc,
                     mf_ctx_errmsg(ctx));
        return;
    }
    uint32_t n_past = (uint32_t)(le64(snap + n_past_at(snap)) & 0xffffffffu);
    if (mf_ctx_n_past(ctx) != (int)n_past) fuzz_die("loaded n_past differs from the header");
    if (snap[4] == 1) {
        // Version 1 is read, never written: it saves back as version 2.
        if (mf_ctx_state_load(ctx, F.before[f], F.n_before[f]) != MF_OK)
            fuzz_die("cannot restore the fixture state: %s", mf_ctx_errmsg(ctx));
        return;
    }
    uint8_t *copy = malloc(n);
    if (!copy) fuzz_die("out of memory");
    memcpy(copy, snap, n);   // snap may be F.scratch, which save() reuses
    size_t m = save(f);
    if (m != n || memcmp(F.scratch, copy, n) != 0)
        fuzz_die("an accepted snapshot does not save back to the same bytes");
    free(copy);
    // Back to the state every input starts from.
    if (mf_ctx_state_load(ctx, F.before[f], F.n_before[f]) != MF_OK)
        fuzz_die("cannot restore the fixture state: %s", mf_ctx_errmsg(ctx));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int f = family_of(data, size);
    try_load(f, data, size);
    if (size >= 16) {
        uint8_t *p = grow(size);
        memmove(p, data, size - 8);
        put64(p + size - 8, checksum(p, size - 8));
        try_load(f, p, size);
    }
    return 0;
}
