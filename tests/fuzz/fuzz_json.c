/*
 * fuzz_json.c — the JSON parser (core/json.c) on arbitrary bytes.
 *
 * Beyond "no crash, no leak, no undefined behaviour": a parsed tree is walked whole
 * (every string and key read to its stated length, so ASan sees any length that lies),
 * every object member is found again by mf_json_get (duplicate keys are refused, so
 * each key names exactly its member), the typed getters agree with the node types,
 * and a failed parse leaves a message and no document.
 */
#include "fuzz_util.h"

#include "core/common.h"
#include "core/json.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

static unsigned touch(const char *s, size_t n) {
    unsigned h = 0;
    for (size_t i = 0; i < n; i++) h = h * 31 + (unsigned char)s[i];
    return h + (unsigned char)s[n];   // the NUL terminator is promised too
}

static void check_member(const mf_json *obj, const mf_json *v) {
    if (strlen(v->key) != v->key_len) return;   // a key with a NUL: not findable by C string
    if (mf_json_get(obj, v->key) != v) fuzz_die("member \"%s\" not found again", v->key);
    int64_t i;
    double d;
    int b;
    const char *s;
    int ri = mf_json_get_int(obj, v->key, &i), rd = mf_json_get_num(obj, v->key, &d);
    int rb = mf_json_get_bool(obj, v->key, &b), rs = mf_json_get_str(obj, v->key, &s);
    int null = v->type == MF_JSON_NULL;
    if ((rs == 1) != (v->type == MF_JSON_STRING) || (rs == 0) != null ||
        (rb == 1) != (v->type == MF_JSON_TRUE || v->type == MF_JSON_FALSE) ||
        (rd == 1) != (v->type == MF_JSON_NUMBER) || (ri == 1 && v->type != MF_JSON_NUMBER))
        fuzz_die("typed getters disagree with the type of \"%s\"", v->key);
    if (rs == 1 && s != v->str) fuzz_die("get_str returned another string");
    if (ri == 1 && v->num_is_int && i != v->inum)
        fuzz_die("get_int of \"%s\" is %lld, the node holds %lld", v->key, (long long)i,
                 (long long)v->inum);
}

static unsigned walk(const mf_json *v, int depth) {
    if (depth > MF_JSON_MAX_DEPTH + 1) fuzz_die("tree deeper than MF_JSON_MAX_DEPTH");
    unsigned h = (unsigned)v->type;
    switch (v->type) {
    case MF_JSON_STRING: h += touch(v->str, v->str_len); break;
    case MF_JSON_NUMBER:
        if (v->num != v->num) fuzz_die("NaN number");
        break;
    case MF_JSON_ARRAY:
    case MF_JSON_OBJECT:
        for (size_t i = 0; i < v->n; i++) {
            if (v->type == MF_JSON_OBJECT) {
                h += touch(v->items[i]->key, v->items[i]->key_len);
                check_member(v, v->items[i]);
            }
            h += walk(v->items[i], depth + 1);
        }
        break;
    default: break;
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mf_json_doc *doc = NULL;
    char err[256];
    err[0] = '\0';
    int rc = mf_json_parse(&doc, (const char *)data, size, "fuzz.json", err, sizeof err);
    if (rc != MF_OK) {
        if (doc || !err[0] || (rc != MF_ERR_FORMAT && rc != MF_ERR_NOMEM))
            fuzz_die("failed parse: status %d, message \"%s\", document %p", rc, err,
                     (void *)doc);
        return 0;
    }
    const mf_json *root = mf_json_root(doc);
    if (!root) fuzz_die("parsed document without a root");
    volatile unsigned h = walk(root, 0);
    (void)h;
    mf_json_free(doc);
    return 0;
}
