/*
 * json.c — the strict JSON parser of json.h (RFC 8259).
 *
 * Recursive descent over a byte range with an explicit depth limit, so malformed or
 * hostile input costs bounded stack. Nodes, member keys and decoded strings live in one
 * arena of chunks freed at once by mf_json_free. Children of an array or object are
 * collected on a shared growable stack while the container is open and copied into
 * the arena when it closes, so the tree needs no reallocation. This file does not
 * interpret documents; config.c and manifest.c do.
 */
#include "core/json.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__APPLE__)
#include <xlocale.h>
#endif

#include "core/common.h"

/* ==== Arena ====
 * Chunks of at least ARENA_CHUNK bytes; a request larger than that gets its own chunk.
 * Everything is 16-byte aligned, enough for doubles and pointers. */

#define ARENA_CHUNK ((size_t)64 * 1024)

struct chunk {
    struct chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

struct mf_json_doc {
    mf_json *root;
    struct chunk *chunks;
};

static void *arena_alloc(mf_json_doc *doc, size_t n) {
    n = (n + 15) & ~(size_t)15;
    struct chunk *c = doc->chunks;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > ARENA_CHUNK ? n : ARENA_CHUNK;
        c = malloc(sizeof *c + cap);
        if (!c)
            return NULL;
        c->used = 0;
        c->cap = cap;
        c->next = doc->chunks;
        doc->chunks = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    return p;
}

/* ==== Parser state ==== */

struct parser {
    const char *s;          // text
    size_t len, pos;
    const char *name;       // document name for messages
    char *err;
    size_t errlen;
    int status;             // first failure status (MF_OK while fine)
    mf_json_doc *doc;
    mf_json **stack;        // children of open containers
    size_t stack_n, stack_cap;
    char *buf;              // scratch for decoding strings and numbers
    size_t buf_cap;
    locale_t c_locale;      // "C" numeric locale for strtod_l, made on first use
};

static int fail(struct parser *p, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int fail(struct parser *p, int status, const char *fmt, ...) {
    if (p->status != MF_OK)
        return p->status;
    p->status = status;
    if (p->err && p->errlen) {
        char msg[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        snprintf(p->err, p->errlen, "%s: invalid JSON at byte %zu: %s", p->name,
                 p->pos, msg);
    }
    return status;
}

static int oom(struct parser *p) {
    return fail(p, MF_ERR_NOMEM, "out of memory");
}

static int buf_reserve(struct parser *p, size_t n) {
    if (n <= p->buf_cap)
        return 0;
    size_t cap = p->buf_cap ? p->buf_cap : 256;
    while (cap < n)
        cap *= 2;
    char *b = realloc(p->buf, cap);
    if (!b)
        return oom(p);
    p->buf = b;
    p->buf_cap = cap;
    return 0;
}

static int stack_push(struct parser *p, mf_json *v) {
    if (p->stack_n == p->stack_cap) {
        size_t cap = p->stack_cap ? p->stack_cap * 2 : 64;
        mf_json **s = realloc(p->stack, cap * sizeof *s);
        if (!s)
            return oom(p);
        p->stack = s;
        p->stack_cap = cap;
    }
    p->stack[p->stack_n++] = v;
    return 0;
}

static void skip_ws(struct parser *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        p->pos++;
    }
}

static mf_json *new_node(struct parser *p, enum mf_json_type t) {
    mf_json *v = arena_alloc(p->doc, sizeof *v);
    if (!v) {
        oom(p);
        return NULL;
    }
    memset(v, 0, sizeof *v);
    v->type = t;
    return v;
}

/* ==== Strings ====
 * Decodes into p->buf; the caller copies the bytes into the arena. UTF-8 is validated
 * per RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF. */

// Length of the valid UTF-8 sequence at s[0..n), 0 if invalid.
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;   // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0)
            lo = 0xa0;   // overlong
        if (c == 0xed)
            hi = 0x9f;   // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0)
            lo = 0x90;   // overlong
        if (c == 0xf4)
            hi = 0x8f;   // above U+10FFFF
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return len;
}

static int hex4(struct parser *p, unsigned *out) {
    if (p->len - p->pos < 4)
        return fail(p, MF_ERR_FORMAT, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos + (size_t)i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return fail(p, MF_ERR_FORMAT, "bad hex digit in \\u escape");
        v = v * 16 + d;
    }
    p->pos += 4;
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

// Parse a string starting at the opening quote; result copied into the arena.
static int parse_string(struct parser *p, const char **out, size_t *out_len) {
    p->pos++;   // opening quote
    size_t n = 0;
    for (;;) {
        if (p->pos >= p->len)
            return fail(p, MF_ERR_FORMAT, "unterminated string");
        // Decoded output never exceeds the input consumed, +4 for one code point.
        if (buf_reserve(p, n + 8))
            return p->status;
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20)
            return fail(p, MF_ERR_FORMAT, "control character 0x%02x in string", c);
        if (c == '\\') {
            if (p->pos + 1 >= p->len)
                return fail(p, MF_ERR_FORMAT, "unterminated escape");
            char e = p->s[p->pos + 1];
            p->pos += 2;
            switch (e) {
            case '"': p->buf[n++] = '"'; break;
            case '\\': p->buf[n++] = '\\'; break;
            case '/': p->buf[n++] = '/'; break;
            case 'b': p->buf[n++] = '\b'; break;
            case 'f': p->buf[n++] = '\f'; break;
            case 'n': p->buf[n++] = '\n'; break;
            case 'r': p->buf[n++] = '\r'; break;
            case 't': p->buf[n++] = '\t'; break;
            case 'u': {
                unsigned cp;
                if (hex4(p, &cp))
                    return p->status;
                if (cp >= 0xdc00 && cp <= 0xdfff)
                    return fail(p, MF_ERR_FORMAT, "unpaired low surrogate \\u%04x", cp);
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    unsigned lo;
                    if (p->len - p->pos < 2 || p->s[p->pos] != '\\' ||
                        p->s[p->pos + 1] != 'u')
                        return fail(p, MF_ERR_FORMAT, "unpaired high surrogate \\u%04x",
                                    cp);
                    p->pos += 2;
                    if (hex4(p, &lo))
                        return p->status;
                    if (lo < 0xdc00 || lo > 0xdfff)
                        return fail(p, MF_ERR_FORMAT,
                                    "high surrogate followed by \\u%04x", lo);
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                n += put_utf8(p->buf + n, cp);
                break;
            }
            default:
                p->pos--;
                return fail(p, MF_ERR_FORMAT, "bad escape character 0x%02x",
                            (unsigned char)e);
            }
            continue;
        }
        size_t l = utf8_seq((const unsigned char *)p->s + p->pos, p->len - p->pos);
        if (l == 0)
            return fail(p, MF_ERR_FORMAT, "invalid UTF-8 in string");
        memcpy(p->buf + n, p->s + p->pos, l);
        n += l;
        p->pos += l;
    }
    char *s = arena_alloc(p->doc, n + 1);
    if (!s)
        return oom(p);
    memcpy(s, p->buf, n);
    s[n] = '\0';
    *out = s;
    *out_len = n;
    return 0;
}

/* ==== Numbers ====
 * The grammar is checked by hand (strtod accepts much more: hex, inf, leading '+').
 * The value comes from strtod_l in the "C" locale so a process whose LC_NUMERIC uses
 * ',' still reads "1.5" as 1.5. Integers without fraction or exponent that fit int64
 * are also kept exactly. */

static int parse_number(struct parser *p, mf_json *v) {
    size_t start = p->pos;
    const char *s = p->s;
    size_t i = p->pos;
    int neg = 0, is_int = 1;
    if (i < p->len && s[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= p->len || s[i] < '0' || s[i] > '9')
        return fail(p, MF_ERR_FORMAT, "bad number");
    // Exact int64 accumulation, as a negative value so INT64_MIN fits.
    int64_t acc = 0;
    int fits = 1;
    if (s[i] == '0') {
        i++;
        if (i < p->len && s[i] >= '0' && s[i] <= '9')
            return fail(p, MF_ERR_FORMAT, "leading zero in number");
    } else {
        while (i < p->len && s[i] >= '0' && s[i] <= '9') {
            int d = s[i] - '0';
            if (acc < (INT64_MIN + d) / 10)
                fits = 0;
            else
                acc = acc * 10 - d;
            i++;
        }
    }
    if (i < p->len && s[i] == '.') {
        is_int = 0;
        i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') {
            p->pos = i;
            return fail(p, MF_ERR_FORMAT, "digit expected after '.'");
        }
        while (i < p->len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        is_int = 0;
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') {
            p->pos = i;
            return fail(p, MF_ERR_FORMAT, "digit expected in exponent");
        }
        while (i < p->len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    size_t n = i - start;
    if (buf_reserve(p, n + 1))
        return p->status;
    memcpy(p->buf, s + start, n);
    p->buf[n] = '\0';
    if (!p->c_locale) {
        p->c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
        if (!p->c_locale)
            return oom(p);
    }
    errno = 0;
    char *end = NULL;
    double d = strtod_l(p->buf, &end, p->c_locale);
    if (end != p->buf + n)
        return fail(p, MF_ERR_FORMAT, "bad number");
    if (errno == ERANGE && isinf(d))
        return fail(p, MF_ERR_FORMAT, "number %s overflows a double", p->buf);
    v->num = d;
    if (is_int && fits && (neg || acc != INT64_MIN)) {
        v->num_is_int = 1;
        v->inum = neg ? acc : -acc;
    }
    p->pos = i;
    return 0;
}

/* ==== Values ==== */

static int key_cmp(const void *a, const void *b) {
    const mf_json *x = *(mf_json *const *)a, *y = *(mf_json *const *)b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n);
    if (c)
        return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

static int parse_value(struct parser *p, mf_json **out, int depth);

// Move the children collected since `base` into the container's items array.
static int close_container(struct parser *p, mf_json *v, size_t base) {
    v->n = p->stack_n - base;
    if (v->n) {
        v->items = arena_alloc(p->doc, v->n * sizeof *v->items);
        if (!v->items)
            return oom(p);
        memcpy(v->items, p->stack + base, v->n * sizeof *v->items);
    }
    p->stack_n = base;
    if (v->type == MF_JSON_OBJECT && v->n > 1) {
        // Duplicate keys: sort a copy of the members by key and compare neighbours.
        mf_json **tmp = malloc(v->n * sizeof *tmp);
        if (!tmp)
            return oom(p);
        memcpy(tmp, v->items, v->n * sizeof *tmp);
        qsort(tmp, v->n, sizeof *tmp, key_cmp);
        for (size_t i = 1; i < v->n; i++) {
            if (key_cmp(&tmp[i - 1], &tmp[i]) == 0) {
                char key[64];
                snprintf(key, sizeof key, "%s", tmp[i]->key);
                free(tmp);
                return fail(p, MF_ERR_FORMAT, "duplicate key \"%s\" in object", key);
            }
        }
        free(tmp);
    }
    return 0;
}

static int parse_array(struct parser *p, mf_json *v, int depth) {
    size_t base = p->stack_n;
    p->pos++;   // '['
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == ']') {
        p->pos++;
        return close_container(p, v, base);
    }
    for (;;) {
        mf_json *item;
        if (parse_value(p, &item, depth + 1) || stack_push(p, item))
            return p->status;
        skip_ws(p);
        if (p->pos >= p->len)
            return fail(p, MF_ERR_FORMAT, "unterminated array");
        char c = p->s[p->pos++];
        if (c == ']')
            return close_container(p, v, base);
        if (c != ',') {
            p->pos--;
            return fail(p, MF_ERR_FORMAT, "',' or ']' expected");
        }
        skip_ws(p);
    }
}

static int parse_object(struct parser *p, mf_json *v, int depth) {
    size_t base = p->stack_n;
    p->pos++;   // '{'
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == '}') {
        p->pos++;
        return close_container(p, v, base);
    }
    for (;;) {
        if (p->pos >= p->len || p->s[p->pos] != '"')
            return fail(p, MF_ERR_FORMAT, "string key expected");
        const char *key;
        size_t key_len;
        if (parse_string(p, &key, &key_len))
            return p->status;
        skip_ws(p);
        if (p->pos >= p->len || p->s[p->pos] != ':')
            return fail(p, MF_ERR_FORMAT, "':' expected after key");
        p->pos++;
        mf_json *item;
        if (parse_value(p, &item, depth + 1))
            return p->status;
        item->key = key;
        item->key_len = key_len;
        if (stack_push(p, item))
            return p->status;
        skip_ws(p);
        if (p->pos >= p->len)
            return fail(p, MF_ERR_FORMAT, "unterminated object");
        char c = p->s[p->pos++];
        if (c == '}')
            return close_container(p, v, base);
        if (c != ',') {
            p->pos--;
            return fail(p, MF_ERR_FORMAT, "',' or '}' expected");
        }
        skip_ws(p);
    }
}

static int literal(struct parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0)
        return fail(p, MF_ERR_FORMAT, "unexpected character");
    p->pos += n;
    return 0;
}

static int parse_value(struct parser *p, mf_json **out, int depth) {
    *out = NULL;
    if (depth > MF_JSON_MAX_DEPTH)
        return fail(p, MF_ERR_FORMAT, "nesting deeper than %d", MF_JSON_MAX_DEPTH);
    skip_ws(p);
    if (p->pos >= p->len)
        return fail(p, MF_ERR_FORMAT, "value expected");
    char c = p->s[p->pos];
    mf_json *v;
    switch (c) {
    case '{':
        if (!(v = new_node(p, MF_JSON_OBJECT)) || parse_object(p, v, depth))
            return p->status;
        break;
    case '[':
        if (!(v = new_node(p, MF_JSON_ARRAY)) || parse_array(p, v, depth))
            return p->status;
        break;
    case '"':
        if (!(v = new_node(p, MF_JSON_STRING)) || parse_string(p, &v->str, &v->str_len))
            return p->status;
        break;
    case 't':
        if (!(v = new_node(p, MF_JSON_TRUE)) || literal(p, "true"))
            return p->status;
        break;
    case 'f':
        if (!(v = new_node(p, MF_JSON_FALSE)) || literal(p, "false"))
            return p->status;
        break;
    case 'n':
        if (!(v = new_node(p, MF_JSON_NULL)) || literal(p, "null"))
            return p->status;
        break;
    default:
        if (c == '-' || (c >= '0' && c <= '9')) {
            if (!(v = new_node(p, MF_JSON_NUMBER)) || parse_number(p, v))
                return p->status;
            break;
        }
        return fail(p, MF_ERR_FORMAT, "unexpected character 0x%02x",
                    (unsigned char)c);
    }
    *out = v;
    return 0;
}

/* ==== Public ==== */

void mf_json_free(mf_json_doc *doc) {
    if (!doc)
        return;
    struct chunk *c = doc->chunks;
    while (c) {
        struct chunk *next = c->next;
        free(c);
        c = next;
    }
    free(doc);
}

int mf_json_parse(mf_json_doc **out, const char *text, size_t len, const char *name,
                  char *err, size_t errlen) {
    *out = NULL;
    if (!name)
        name = "JSON";
    mf_json_doc *doc = calloc(1, sizeof *doc);
    if (!doc)
        return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", name);
    struct parser p = {.s = text, .len = text ? len : 0, .name = name, .err = err,
                       .errlen = errlen, .doc = doc};
    mf_json *root = NULL;
    if (parse_value(&p, &root, 1) == 0) {
        skip_ws(&p);
        if (p.pos != p.len)
            fail(&p, MF_ERR_FORMAT, "trailing characters after the document");
    }
    free(p.stack);
    free(p.buf);
    if (p.c_locale)
        freelocale(p.c_locale);
    if (p.status != MF_OK) {
        mf_json_free(doc);
        return p.status;
    }
    doc->root = root;
    *out = doc;
    return MF_OK;
}

const mf_json *mf_json_root(const mf_json_doc *doc) {
    return doc ? doc->root : NULL;
}

const mf_json *mf_json_get(const mf_json *obj, const char *key) {
    if (!obj || obj->type != MF_JSON_OBJECT || !key)
        return NULL;
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->n; i++) {
        const mf_json *m = obj->items[i];
        if (m->key_len == kl && memcmp(m->key, key, kl) == 0)
            return m;
    }
    return NULL;
}

int mf_json_get_int(const mf_json *obj, const char *key, int64_t *out) {
    const mf_json *v = mf_json_get(obj, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_NUMBER)
        return -1;
    if (v->num_is_int) {
        *out = v->inum;
        return 1;
    }
    // An integral value written as 4.0 or 1e6 is accepted; 2^63 and beyond are not.
    if (!isfinite(v->num) || v->num != floor(v->num) || v->num < -9.2e18 ||
        v->num > 9.2e18)
        return -1;
    *out = (int64_t)v->num;
    return 1;
}

int mf_json_get_num(const mf_json *obj, const char *key, double *out) {
    const mf_json *v = mf_json_get(obj, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_NUMBER)
        return -1;
    *out = v->num;
    return 1;
}

int mf_json_get_bool(const mf_json *obj, const char *key, int *out) {
    const mf_json *v = mf_json_get(obj, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_TRUE && v->type != MF_JSON_FALSE)
        return -1;
    *out = v->type == MF_JSON_TRUE;
    return 1;
}

int mf_json_get_str(const mf_json *obj, const char *key, const char **out) {
    const mf_json *v = mf_json_get(obj, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_STRING)
        return -1;
    *out = v->str;
    return 1;
}
