/*
 * json.h — a small strict JSON parser (RFC 8259) into a read-only tree.
 *
 * Total by design: every malformed input (bad syntax, bad escapes, invalid UTF-8,
 * unpaired surrogates, trailing garbage, nesting deeper than MF_JSON_MAX_DEPTH,
 * numbers that overflow a double) returns an error with a byte offset; none crashes.
 * Strings are decoded to UTF-8 and may contain NUL (length kept). Object member order
 * is kept; duplicate keys are an error (a config with two values for a key is
 * ambiguous). The whole tree is one allocation arena freed by mf_json_free.
 */
#ifndef MF_JSON_H
#define MF_JSON_H

#include <stddef.h>
#include <stdint.h>

#define MF_JSON_MAX_DEPTH 128

enum mf_json_type {
    MF_JSON_NULL = 0,
    MF_JSON_FALSE = 1,
    MF_JSON_TRUE = 2,
    MF_JSON_NUMBER = 3,
    MF_JSON_STRING = 4,
    MF_JSON_ARRAY = 5,
    MF_JSON_OBJECT = 6,
};

typedef struct mf_json mf_json;
struct mf_json {
    enum mf_json_type type;
    double num;            // NUMBER
    int num_is_int;        // NUMBER written without fraction/exponent and fits int64
    int64_t inum;          // NUMBER when num_is_int
    const char *str;       // STRING (NUL-terminated; may hold inner NULs), or the
                           // member key when this node is an object member
    size_t str_len;        // STRING length in bytes
    const char *key;       // member key (objects only), NUL-terminated
    size_t key_len;
    size_t n;              // ARRAY / OBJECT element count
    mf_json **items;       // ARRAY / OBJECT elements in order
};

typedef struct mf_json_doc mf_json_doc;

// Parse text[0..len). On success *out gets the document (caller frees with
// mf_json_free). On failure returns MF_ERR_FORMAT (message with byte offset, prefixed
// by `name`) or MF_ERR_NOMEM; *out = NULL.
int mf_json_parse(mf_json_doc **out, const char *text, size_t len, const char *name,
                  char *err, size_t errlen);
void mf_json_free(mf_json_doc *doc);
const mf_json *mf_json_root(const mf_json_doc *doc);

// Member of an object by key, NULL if absent or `obj` is not an object.
const mf_json *mf_json_get(const mf_json *obj, const char *key);
// Typed reads of an optional member: return 1 and set *out when present with the right
// type, 0 when absent or null, -1 when present with the wrong type or out of range.
int mf_json_get_int(const mf_json *obj, const char *key, int64_t *out);
int mf_json_get_num(const mf_json *obj, const char *key, double *out);
int mf_json_get_bool(const mf_json *obj, const char *key, int *out);
int mf_json_get_str(const mf_json *obj, const char *key, const char **out);

#endif /* MF_JSON_H */
