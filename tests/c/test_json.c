/*
 * test_json.c — the strict JSON parser: a table of valid documents with the values
 * they must decode to, a table of invalid ones that must be refused with MF_ERR_FORMAT,
 * and a deterministic mutation fuzzer (truncations, byte flips, insertions, deep
 * nesting) that must never crash or leak (run under `make asan`).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "core/common.h"
#include "core/json.h"

static mf_json_doc *parse_ok(const char *text, size_t len) {
    mf_json_doc *doc = NULL;
    char err[256] = "";
    int rc = mf_json_parse(&doc, text, len, "t", err, sizeof err);
    CHECK(rc == MF_OK && doc, "valid document refused: %s (%s)", text, err);
    return doc;
}

/* ==== Valid documents ==== */

static void test_valid(void) {
    static const char *const docs[] = {
        "0", "-0", "1", "-1", "1.5", "1e3", "1E+3", "1e-3", "-0.0e0", "true", "false",
        "null", "\"\"", "[]", "{}", " \t\r\n[ ]\n", "[1,2,[3,[4]]]",
        "{\"a\":{\"b\":[{},[]]}}", "\"\\u00e9\\u20ac\\ud83d\\ude00\"",
        "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"", "1.7976931348623157e308",
        "4.9e-324", "1e-400", "9223372036854775807", "-9223372036854775808",
        "{\"a\":1,\"b\":2,\"ab\":3,\"\":4}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++)
        mf_json_free(parse_ok(docs[i], strlen(docs[i])));
}

static void test_values(void) {
    const char *t =
        "{\"i\": 42, \"neg\": -7, \"big\": 9223372036854775807, \"over\": "
        "9223372036854775808, \"f\": 2.5, \"e\": 1e2, \"s\": \"a\\\"b\\\\c\\/\\n\\t\","
        " \"u\": \"\\u00e9\\ud83d\\ude00\", \"nul\": \"x\\u0000y\", \"arr\": [1, \"two\","
        " null, true], \"t\": true, \"n\": null, \"min\": -9223372036854775808}";
    mf_json_doc *doc = parse_ok(t, strlen(t));
    if (!doc)
        return;
    const mf_json *r = mf_json_root(doc);
    int64_t i;
    double d;
    const char *s;
    int b;
    CHECK(r->type == MF_JSON_OBJECT && r->n == 13, "root object with 13 members");
    CHECK(mf_json_get_int(r, "i", &i) == 1 && i == 42, "i == 42");
    CHECK(mf_json_get_int(r, "neg", &i) == 1 && i == -7, "neg == -7");
    CHECK(mf_json_get_int(r, "big", &i) == 1 && i == INT64_MAX, "big == INT64_MAX");
    CHECK(mf_json_get_int(r, "min", &i) == 1 && i == INT64_MIN, "min == INT64_MIN");
    const mf_json *over = mf_json_get(r, "over");
    CHECK(over && !over->num_is_int && over->num == 9223372036854775808.0,
          "2^63 is a double, not an exact int");
    CHECK(mf_json_get_int(r, "f", &i) == -1, "2.5 is not an integer");
    CHECK(mf_json_get_int(r, "e", &i) == 1 && i == 100, "1e2 is integral");
    CHECK(!mf_json_get(r, "e")->num_is_int, "1e2 is not written as an int");
    CHECK(mf_json_get_num(r, "f", &d) == 1 && d == 2.5, "f == 2.5");
    CHECK(mf_json_get_str(r, "s", &s) == 1 && strcmp(s, "a\"b\\c/\n\t") == 0,
          "escapes decoded: %s", s);
    CHECK(mf_json_get_str(r, "u", &s) == 1 &&
              strcmp(s, "\xc3\xa9\xf0\x9f\x98\x80") == 0,
          "\\u escapes with a surrogate pair decode to UTF-8");
    const mf_json *nul = mf_json_get(r, "nul");
    CHECK(nul && nul->str_len == 3 && memcmp(nul->str, "x\0y", 3) == 0,
          "inner NUL kept with its length");
    const mf_json *arr = mf_json_get(r, "arr");
    CHECK(arr && arr->type == MF_JSON_ARRAY && arr->n == 4 &&
              arr->items[0]->type == MF_JSON_NUMBER &&
              arr->items[1]->type == MF_JSON_STRING &&
              arr->items[2]->type == MF_JSON_NULL && arr->items[3]->type == MF_JSON_TRUE,
          "array members in order");
    CHECK(mf_json_get_bool(r, "t", &b) == 1 && b == 1, "t is true");
    CHECK(mf_json_get_bool(r, "i", &b) == -1, "an int is not a bool");
    CHECK(mf_json_get_int(r, "n", &i) == 0, "null reads as absent");
    CHECK(mf_json_get_int(r, "missing", &i) == 0, "missing reads as absent");
    CHECK(mf_json_get_str(r, "i", &s) == -1, "an int is not a string");
    CHECK(mf_json_get(arr, "x") == NULL, "get on an array is NULL");
    CHECK(strcmp(r->items[0]->key, "i") == 0 && strcmp(r->items[12]->key, "min") == 0,
          "member order kept");
    mf_json_free(doc);
}

/* ==== Invalid documents ==== */

static void test_invalid(void) {
    static const char *const docs[] = {
        "", " ", "[", "]", "{", "}", "[1,]", "[,1]", "{\"a\":1,}", "{\"a\"}", "{\"a\" 1}",
        "{a:1}", "{'a':1}", "[1 2]", "01", "-", "+1", "1.", ".5", "1e", "1e+", "0x10",
        "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "tru", "nul", "falsey",
        "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"\\ud800\"", "\"\\udc00\"",
        "\"\\ud800\\u0041\"", "\"\\ud800x\"", "\"a\tb\"", "\"a\nb\"", "\"\x01\"",
        "\"\xc0\xaf\"", "\"\xe0\x80\xaf\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"",
        "\"\xff\"", "\"\x80\"", "\"\xc3\"", "\"\xe2\x82\"", "1 2", "{} {}", "[]]",
        "{\"a\":1,\"a\":2}", "{\"x\":{\"k\":1,\"k\":1}}", "\xef\xbb\xbf{}", "[1]x",
        "\"a\"\"b\"",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        mf_json_doc *doc = (mf_json_doc *)1;
        char err[256] = "";
        int rc = mf_json_parse(&doc, docs[i], strlen(docs[i]), "bad.json", err, sizeof err);
        CHECK(rc == MF_ERR_FORMAT && doc == NULL, "invalid document #%zu accepted: %s", i,
              docs[i]);
        CHECK(strstr(err, "bad.json") && strstr(err, "byte"),
              "message names the document and offset: %s", err);
        mf_json_free(doc);
    }
    // A NUL byte inside the text range is a character like any other: refused.
    mf_json_doc *doc = NULL;
    CHECK(mf_json_parse(&doc, "[1]\0", 4, "t", NULL, 0) == MF_ERR_FORMAT,
          "NUL after the document refused");
    CHECK(mf_json_parse(&doc, "\"a\0b\"", 5, "t", NULL, 0) == MF_ERR_FORMAT,
          "raw NUL in a string refused");
}

static void test_depth(void) {
    char buf[2 * (MF_JSON_MAX_DEPTH + 2)];
    for (int depth = MF_JSON_MAX_DEPTH; depth <= MF_JSON_MAX_DEPTH + 1; depth++) {
        size_t n = 0;
        for (int i = 0; i < depth; i++)
            buf[n++] = '[';
        for (int i = 0; i < depth; i++)
            buf[n++] = ']';
        mf_json_doc *doc = NULL;
        int rc = mf_json_parse(&doc, buf, n, "t", NULL, 0);
        if (depth <= MF_JSON_MAX_DEPTH)
            CHECK(rc == MF_OK, "depth %d accepted", depth);
        else
            CHECK(rc == MF_ERR_FORMAT, "depth %d refused", depth);
        mf_json_free(doc);
    }
    // Far deeper than the limit must fail fast without using deep recursion.
    size_t n = 1000000;
    char *deep = malloc(n);
    CHECK(deep != NULL, "malloc");
    if (deep) {
        memset(deep, '[', n);
        mf_json_doc *doc = NULL;
        CHECK(mf_json_parse(&doc, deep, n, "t", NULL, 0) == MF_ERR_FORMAT, "1e6 '[' refused");
        free(deep);
    }
}

static void test_large_object(void) {
    // Thousands of members (a real manifest has ~2000 tensors): parses and finds dups.
    size_t cap = 64 * 5000;
    char *t = malloc(cap);
    if (!t)
        return;
    size_t n = 0;
    n += (size_t)snprintf(t + n, cap - n, "{");
    for (int i = 0; i < 5000; i++)
        n += (size_t)snprintf(t + n, cap - n, "%s\"model.layers.%d.w\":%d", i ? "," : "", i, i);
    n += (size_t)snprintf(t + n, cap - n, "}");
    mf_json_doc *doc = parse_ok(t, n);
    if (doc) {
        int64_t v;
        CHECK(mf_json_get_int(mf_json_root(doc), "model.layers.4321.w", &v) == 1 && v == 4321,
              "member of a large object");
        mf_json_free(doc);
    }
    // Same with a duplicate at the far end.
    n -= 1;
    n += (size_t)snprintf(t + n, cap - n, ",\"model.layers.7.w\":1}");
    doc = NULL;
    CHECK(mf_json_parse(&doc, t, n, "t", NULL, 0) == MF_ERR_FORMAT, "late duplicate refused");
    free(t);
}

/* ==== Fuzzer ====
 * xorshift64* so runs are reproducible; every mutant is parsed into an exactly sized
 * heap copy so ASan sees any read past the end. */

static void test_fuzz(void) {
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    static const char *const seeds[] = {
        "{\"model_type\": \"qwen3_next\", \"hidden_size\": 2048, \"rope_scaling\": "
        "{\"type\": \"yarn\", \"factor\": 40.0}, \"eos_token_id\": [1, 2], \"x\": null,"
        " \"quantization\": {\"bits\": 4, \"group_size\": 64, \"mode\": \"affine\", "
        "\"model.layers.0.mlp.gate\": {\"bits\": 8}, \"lm_head\": false}}",
        "{\"tensors\": {\"a.weight\": {\"offset\": 0, \"size\": 64, \"shape\": [4, 4], "
        "\"dtype\": \"F32\"}}, \"num_tensors\": 1}",
        "[\"\\u00e9\\ud83d\\ude00\", -1.5e-3, 0, true, false, null, [[[]]], {}]",
        "\"caf\xc3\xa9 \xf0\x9f\x98\x80 \\n\\t\\\\\"",
    };
    static const char alphabet[] = "{}[]\":,.-+eE0123456789tfnul\\ \n\x80\xc3\xed\xf0\xff\0";
    int n_ok = 0, n_bad = 0;
    for (int it = 0; it < 60000; it++) {
        const char *seed = seeds[check_rand(&rng) % (sizeof seeds / sizeof seeds[0])];
        size_t len = strlen(seed);
        char work[1024];
        memcpy(work, seed, len);
        int n_mut = 1 + (int)(check_rand(&rng) % 4);
        for (int k = 0; k < n_mut; k++) {
            size_t pos = len ? check_rand(&rng) % len : 0;
            switch (check_rand(&rng) % 5) {
            case 0:   // truncate
                len = pos;
                break;
            case 1:   // replace a byte
                if (len)
                    work[pos] = alphabet[check_rand(&rng) % (sizeof alphabet - 1)];
                break;
            case 2:   // flip a bit
                if (len)
                    work[pos] ^= (char)(1u << (check_rand(&rng) % 8));
                break;
            case 3:   // insert a byte
                if (len + 1 < sizeof work) {
                    memmove(work + pos + 1, work + pos, len - pos);
                    work[pos] = alphabet[check_rand(&rng) % (sizeof alphabet - 1)];
                    len++;
                }
                break;
            default:   // delete a byte
                if (len) {
                    memmove(work + pos, work + pos + 1, len - pos - 1);
                    len--;
                }
                break;
            }
        }
        char *copy = malloc(len ? len : 1);
        if (!copy)
            continue;
        memcpy(copy, work, len);
        mf_json_doc *doc = NULL;
        char err[128];
        int rc = mf_json_parse(&doc, copy, len, "fuzz", err, sizeof err);
        CHECK(rc == MF_OK || rc == MF_ERR_FORMAT, "fuzz: unexpected status %d", rc);
        CHECK((rc == MF_OK) == (doc != NULL), "fuzz: doc set iff OK");
        if (doc) {
            n_ok++;
            // Walk the typed getters over the root, as config.c does.
            const mf_json *r = mf_json_root(doc);
            int64_t i;
            double d;
            const char *s;
            int b;
            for (size_t j = 0; r->type == MF_JSON_OBJECT && j < r->n; j++) {
                (void)mf_json_get_int(r, r->items[j]->key, &i);
                (void)mf_json_get_num(r, r->items[j]->key, &d);
                (void)mf_json_get_str(r, r->items[j]->key, &s);
                (void)mf_json_get_bool(r, r->items[j]->key, &b);
            }
        } else {
            n_bad++;
        }
        mf_json_free(doc);
        free(copy);
    }
    CHECK(n_ok > 100 && n_bad > 1000, "fuzzer exercised both outcomes (%d ok, %d bad)",
          n_ok, n_bad);
}

int main(void) {
    test_valid();
    test_values();
    test_invalid();
    test_depth();
    test_large_object();
    test_fuzz();
    return check_finish("test_json");
}
