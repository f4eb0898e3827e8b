/*
 * ckptdiff._cheader: the common safetensors header, read in one pass in C.
 *
 * Opening a file of 200,000 tensors costs ~7 us a tensor in Python
 * (json.loads builds a dict and two lists per entry, then every entry is
 * checked). This module reads the plain common case directly into columns
 * and answers None for anything else, so the strict Python parser
 * (ckptdiff/formats/safetensors_format.py, _parse) decides every unusual
 * header and says what is wrong with it. The rule: whatever scan accepts,
 * _parse accepts too, with the same tensors and metadata. Bad input never
 * raises here; only wrong argument types do (TypeError, ValueError), and
 * MemoryError.
 *
 *   scan(header, data_len, dtypes, hint) -> tuple | None
 *
 * header is the JSON header (bytes-like), data_len the length of the data
 * section after it, dtypes maps a safetensors dtype code to (canonical name,
 * itemsize), hint is None or a list of str (the names of a similar file).
 * The tuple is
 *   (names, dtype_names, shapes, begins, nbytes, metadata_span, same_as_hint)
 * names, dtype_names and shapes are lists in header order (dtype_names holds
 * the name objects of dtypes; equal shapes met close together are one tuple
 * object); begins and nbytes are bytes of native int64, the data offset of
 * each tensor relative to the data section and its length; metadata_span is
 * None or (start, end), where the __metadata__ object lies in header;
 * same_as_hint is True when names is hint element for element (names then
 * holds hint's str objects: names[i] is hint[i]).
 *
 * Accepted (anything else answers None):
 *   - one JSON object, JSON whitespace around and between tokens;
 *   - strings without backslash escapes or control characters, valid UTF-8;
 *   - tensor entries of exactly "dtype", "shape" and "data_offsets", once
 *     each in any order: a dtype code of dtypes, a shape of dims in
 *     1..2**48 with a product of at most 2**48, and two offsets with
 *     end == begin + numel * itemsize and end <= data_len; numbers are
 *     plain digits (no sign, fraction, exponent or leading zero), at most 18;
 *   - "__metadata__" at most once, an object of strings to strings with no
 *     key twice;
 *   - no tensor name twice, and the tensors, in offset order, tile the data
 *     section exactly from 0 to data_len.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NUMEL ((int64_t)1 << 48)
#define MAX_DIGITS 18       /* below 10**18 < 2**62: no sum or product below overflows */
#define MAX_NDIM 64
#define MAX_ITEMSIZE 1024
#define MAX_DTYPES 64
#define SHAPE_CACHE 16

/* Status of a parsing step: go on, not the plain case (answer None), or a Python error is set. */
enum { OK = 0, NO = 1, ERR = -1 };

typedef struct {
    const char *code;   /* UTF-8 of the dtype code, owned by the dict key */
    Py_ssize_t len;
    PyObject *name;     /* borrowed from the dict value */
    int64_t itemsize;
} dtype_t;

typedef struct {
    int ndim;
    int64_t dims[MAX_NDIM];
    PyObject *tuple;    /* owned */
} shape_slot;

typedef struct {
    int64_t *v;
    Py_ssize_t len, cap;
} i64s;

typedef struct {
    const unsigned char *p, *end;
    int64_t data_len;
    dtype_t dtype[MAX_DTYPES];
    int ndtypes, last_dtype;
    shape_slot shapes[SHAPE_CACHE];
    int nshapes, next_shape, last_shape;
    PyObject *dtypes;   /* a copy of the dtypes dict (owned): the codes and names point into it */
    PyObject *hint;     /* borrowed list or NULL */
    int same;           /* every name so far is hint's object at the same index */
    PyObject *names, *dtype_names, *shape_list;
    i64s begins, nbytes;
    i64s name_at;       /* offset and length in the header of each name */
    Py_ssize_t meta_start, meta_end;  /* -1 when there is no __metadata__ */
    const unsigned char *base;
} ctx_t;

static int push(i64s *a, int64_t x)
{
    if (a->len == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 1024;
        int64_t *v = PyMem_Realloc(a->v, (size_t)cap * sizeof(int64_t));
        if (!v) {
            PyErr_NoMemory();
            return ERR;
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = x;
    return OK;
}

/* Equal bytes, for the short keys and dtype codes (a library memcmp call costs more). */
static inline int same(const unsigned char *a, const char *b, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (a[i] != (unsigned char)b[i])
            return 0;
    return 1;
}

static inline void skip_ws(ctx_t *c)
{
    const unsigned char *p = c->p, *end = c->end;
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    c->p = p;
}

/* Consume ch after optional whitespace. */
static inline int expect(ctx_t *c, unsigned char ch)
{
    skip_ws(c);
    if (c->p >= c->end || *c->p != ch)
        return NO;
    c->p++;
    return OK;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The high bit of a byte of x that is 0 is set (and maybe that of a later byte). */
static inline uint64_t zero_byte(uint64_t x)
{
    return (x - ONES) & ~x & HIGHS;
}

/* A string without escapes or control characters: its bytes are [*s, *s + *n). */
static inline int string(ctx_t *c, const unsigned char **s, Py_ssize_t *n, int *ascii)
{
    skip_ws(c);
    const unsigned char *p = c->p, *end = c->end;
    if (p >= end || *p != '"')
        return NO;
    const unsigned char *start = ++p;
    /* Eight bytes at a time while none is a quote, a backslash, a control character or non-ASCII. */
    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        if (zero_byte(w ^ (ONES * '"')) | zero_byte(w ^ (ONES * '\\')) | ((w - ONES * 0x20) & ~w & HIGHS) | (w & HIGHS))
            break;
        p += 8;
    }
    unsigned high = 0;
    for (;; p++) {
        if (p >= end)
            return NO;
        unsigned ch = *p;
        if (ch == '"')
            break;
        if (ch == '\\' || ch < 0x20)
            return NO;
        high |= ch;
    }
    *s = start;
    *n = p - start;
    *ascii = high < 0x80;
    c->p = p + 1;
    return OK;
}

/* A JSON integer of plain digits, at most MAX_DIGITS of them. */
static inline int integer(ctx_t *c, int64_t *out)
{
    skip_ws(c);
    const unsigned char *p = c->p, *end = c->end;
    if (p >= end || *p < '0' || *p > '9')
        return NO;
    if (*p == '0') {
        p++;
        if (p < end && *p >= '0' && *p <= '9')
            return NO;
        *out = 0;
        c->p = p;
        return OK;
    }
    int64_t v = 0;
    int digits = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (++digits > MAX_DIGITS)
            return NO;
        v = v * 10 + (*p - '0');
        p++;
    }
    *out = v;
    c->p = p;
    return OK;
}

/* ',' -> 1, the closing bracket -> 0, anything else -> -1. */
static inline int next_or_close(ctx_t *c, unsigned char close)
{
    skip_ws(c);
    if (c->p >= c->end)
        return -1;
    if (*c->p == ',') {
        c->p++;
        return 1;
    }
    if (*c->p == close) {
        c->p++;
        return 0;
    }
    return -1;
}

/* Decode UTF-8 bytes; NO (no exception left) when they are not valid UTF-8. */
static int decode(const unsigned char *s, Py_ssize_t n, int ascii, PyObject **out)
{
    PyObject *o;
    if (ascii) {
        o = PyUnicode_New(n, 127);
        if (!o)
            return ERR;
        memcpy(PyUnicode_1BYTE_DATA(o), s, (size_t)n);
    } else {
        o = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
        if (!o) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                return NO;
            }
            return ERR;
        }
    }
    *out = o;
    return OK;
}

/* The name of tensor i: hint's object at i when it holds the same text, else a new str. */
static int tensor_name(ctx_t *c, const unsigned char *s, Py_ssize_t n, int ascii, PyObject **out)
{
    Py_ssize_t i = PyList_GET_SIZE(c->names);
    PyObject *h = NULL;
    if (c->hint && i < PyList_GET_SIZE(c->hint)) {
        h = PyList_GET_ITEM(c->hint, i);
        if (!PyUnicode_CheckExact(h))
            h = NULL;
    }
    if (h && ascii && PyUnicode_IS_COMPACT_ASCII(h)) {
        if (PyUnicode_GET_LENGTH(h) == n && memcmp(PyUnicode_1BYTE_DATA(h), s, (size_t)n) == 0) {
            *out = Py_NewRef(h);
            return OK;
        }
        h = NULL;  /* an ASCII str of other text */
    }
    Py_XINCREF(h);  /* decoding allocates: a collection's finalizer could empty the list */
    PyObject *o;
    int st = decode(s, n, ascii, &o);
    if (st != OK) {
        Py_XDECREF(h);
        return st;
    }
    if (h) {
        int eq = PyObject_RichCompareBool(o, h, Py_EQ);
        if (eq != 0) {
            Py_DECREF(o);
            if (eq < 0) {
                Py_DECREF(h);
                return ERR;
            }
            *out = h;
            return OK;
        }
        Py_DECREF(h);
    }
    c->same = 0;
    *out = o;
    return OK;
}

static int find_dtype(ctx_t *c, const unsigned char *s, Py_ssize_t n)
{
    if (!c->ndtypes)
        return -1;
    dtype_t *d = &c->dtype[c->last_dtype];
    if (d->len == n && same(s, d->code, n))
        return c->last_dtype;
    for (int i = 0; i < c->ndtypes; i++) {
        d = &c->dtype[i];
        if (d->len == n && same(s, d->code, n)) {
            c->last_dtype = i;
            return i;
        }
    }
    return -1;
}

/* The shape's tuple: a recent one of the same dims, else a new one (kept for the next). */
static PyObject *shape_tuple(ctx_t *c, const int64_t *dims, int ndim)
{
    size_t bytes = (size_t)ndim * sizeof(int64_t);
    shape_slot *sl = &c->shapes[c->last_shape];
    if (c->nshapes && sl->ndim == ndim && memcmp(sl->dims, dims, bytes) == 0) {
        Py_INCREF(sl->tuple);
        return sl->tuple;
    }
    for (int i = 0; i < c->nshapes; i++) {
        sl = &c->shapes[i];
        if (sl->ndim == ndim && memcmp(sl->dims, dims, bytes) == 0) {
            c->last_shape = i;
            Py_INCREF(sl->tuple);
            return sl->tuple;
        }
    }
    PyObject *t = PyTuple_New(ndim);
    if (!t)
        return NULL;
    for (int i = 0; i < ndim; i++) {
        PyObject *v = PyLong_FromLongLong(dims[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    int slot = c->next_shape;
    c->next_shape = (slot + 1) % SHAPE_CACHE;
    if (c->nshapes < SHAPE_CACHE)
        c->nshapes++;
    else
        Py_DECREF(c->shapes[slot].tuple);
    sl = &c->shapes[slot];
    sl->ndim = ndim;
    memcpy(sl->dims, dims, bytes);
    Py_INCREF(t);
    sl->tuple = t;
    c->last_shape = slot;
    return t;
}

/* {"dtype": ..., "shape": [...], "data_offsets": [b, e]} in any order, then the tensor's columns. */
static int entry(ctx_t *c, const unsigned char *name, Py_ssize_t name_len, int name_ascii)
{
    int64_t dims[MAX_NDIM];
    int ndim = 0, dt = -1, seen = 0, more;
    int64_t begin = 0, end = 0;
    if (expect(c, '{') != OK)
        return NO;
    do {
        const unsigned char *k;
        Py_ssize_t kn;
        int kascii;
        if (string(c, &k, &kn, &kascii) != OK || expect(c, ':') != OK)
            return NO;
        if (kn == 5 && same(k, "dtype", 5)) {
            const unsigned char *s;
            Py_ssize_t n;
            int ascii;
            if ((seen & 1) || string(c, &s, &n, &ascii) != OK)
                return NO;
            seen |= 1;
            if ((dt = find_dtype(c, s, n)) < 0)
                return NO;
        } else if (kn == 5 && same(k, "shape", 5)) {
            if ((seen & 2) || expect(c, '[') != OK)
                return NO;
            seen |= 2;
            skip_ws(c);
            if (c->p < c->end && *c->p == ']') {
                c->p++;
            } else {
                do {
                    int64_t d;
                    if (ndim == MAX_NDIM || integer(c, &d) != OK || d < 1 || d > MAX_NUMEL)
                        return NO;
                    dims[ndim++] = d;
                } while ((more = next_or_close(c, ']')) == 1);
                if (more < 0)
                    return NO;
            }
        } else if (kn == 12 && same(k, "data_offsets", 12)) {
            if ((seen & 4) || expect(c, '[') != OK || integer(c, &begin) != OK || expect(c, ',') != OK
                || integer(c, &end) != OK || expect(c, ']') != OK)
                return NO;
            seen |= 4;
        } else {
            return NO;
        }
    } while ((more = next_or_close(c, '}')) == 1);
    if (more < 0 || seen != 7)
        return NO;

    int64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (count > MAX_NUMEL / dims[i])
            return NO;
        count *= dims[i];
    }
    /* count <= 2**48, itemsize <= 2**10, begin < 10**18: no overflow */
    int64_t size = count * c->dtype[dt].itemsize;
    if (end != begin + size || end > c->data_len)
        return NO;

    PyObject *nm;
    int st = tensor_name(c, name, name_len, name_ascii, &nm);
    if (st != OK)
        return st;
    st = PyList_Append(c->names, nm) < 0 ? ERR : OK;
    Py_DECREF(nm);
    if (st != OK || push(&c->name_at, name - c->base) != OK || push(&c->name_at, name_len) != OK)
        return ERR;
    if (PyList_Append(c->dtype_names, c->dtype[dt].name) < 0)
        return ERR;
    PyObject *t = shape_tuple(c, dims, ndim);
    if (!t)
        return ERR;
    st = PyList_Append(c->shape_list, t) < 0 ? ERR : OK;
    Py_DECREF(t);
    if (st != OK || push(&c->begins, begin) != OK || push(&c->nbytes, size) != OK)
        return ERR;
    return OK;
}

/* The __metadata__ object: strings to strings, no key twice. */
static int metadata(ctx_t *c)
{
    if (c->meta_start >= 0)
        return NO;  /* listed twice */
    skip_ws(c);
    const unsigned char *start = c->p;
    if (expect(c, '{') != OK)
        return NO;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
    } else {
        PyObject *keys = PySet_New(NULL);
        if (!keys)
            return ERR;
        int more = -1, st = OK;
        do {
            const unsigned char *s;
            Py_ssize_t n;
            int ascii;
            PyObject *k;
            if (string(c, &s, &n, &ascii) != OK || expect(c, ':') != OK) {
                st = NO;
                break;
            }
            if ((st = decode(s, n, ascii, &k)) != OK)
                break;
            Py_ssize_t before = PySet_GET_SIZE(keys);
            int added = PySet_Add(keys, k);
            Py_DECREF(k);
            if (added < 0) {
                st = ERR;
                break;
            }
            if (PySet_GET_SIZE(keys) == before) {
                st = NO;  /* a key twice */
                break;
            }
            if (string(c, &s, &n, &ascii) != OK) {
                st = NO;
                break;
            }
            if (!ascii) {  /* only its validity matters */
                PyObject *v;
                if ((st = decode(s, n, ascii, &v)) != OK)
                    break;
                Py_DECREF(v);
            }
        } while ((more = next_or_close(c, '}')) == 1);
        Py_DECREF(keys);
        if (st != OK)
            return st;
        if (more < 0)
            return NO;
    }
    c->meta_start = start - c->base;
    c->meta_end = c->p - c->base;
    return OK;
}

static int header_object(ctx_t *c)
{
    if (expect(c, '{') != OK)
        return NO;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
    } else {
        int more;
        do {
            const unsigned char *s;
            Py_ssize_t n;
            int ascii, st;
            if (string(c, &s, &n, &ascii) != OK || expect(c, ':') != OK)
                return NO;
            if (n == 12 && same(s, "__metadata__", 12))
                st = metadata(c);
            else
                st = entry(c, s, n, ascii);
            if (st != OK)
                return st;
        } while ((more = next_or_close(c, '}')) == 1);
        if (more < 0)
            return NO;
    }
    skip_ws(c);
    return c->p == c->end ? OK : NO;
}

static uint64_t hash_bytes(const unsigned char *s, Py_ssize_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n, w;
    for (; n >= 8; s += 8, n -= 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    w = 0;
    memcpy(&w, s, (size_t)n);
    h ^= w;
    h = (h ^ (h >> 33)) * 0xff51afd7ed558ccdULL;  /* every bit of h reaches the low bits */
    h = (h ^ (h >> 33)) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

/* No name twice: equal names are equal bytes, as no string holds an escape. An
 * open-addressing table of name indices; past a budget of probes (names made
 * to collide) the answer is None, and the Python parser's dict decides. */
static int unique_names(ctx_t *c)
{
    Py_ssize_t n = c->name_at.len / 2, size = 16;
    const int64_t *at = c->name_at.v;
    while (size < 2 * n)
        size *= 2;
    Py_ssize_t *slots = PyMem_Calloc((size_t)size, sizeof(Py_ssize_t));
    uint64_t *hashes = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (!slots || !hashes) {
        PyMem_Free(slots);
        PyMem_Free(hashes);
        PyErr_NoMemory();
        return ERR;
    }
    int64_t budget = 8 * (int64_t)n + 1024;
    int st = OK;
    for (Py_ssize_t i = 0; i < n && st == OK; i++) {
        const unsigned char *s = c->base + at[2 * i];
        Py_ssize_t len = (Py_ssize_t)at[2 * i + 1];
        uint64_t h = hashes[i] = hash_bytes(s, len);
        for (size_t k = (size_t)h & (size_t)(size - 1);; k = (k + 1) & (size_t)(size - 1)) {
            Py_ssize_t j = slots[k];
            if (!j) {
                slots[k] = i + 1;
                break;
            }
            j--;
            if (--budget < 0 || (hashes[j] == h && at[2 * j + 1] == len
                                 && memcmp(c->base + at[2 * j], s, (size_t)len) == 0)) {
                st = NO;  /* a name twice, or too many collisions to tell cheaply */
                break;
            }
        }
    }
    PyMem_Free(slots);
    PyMem_Free(hashes);
    return st;
}

typedef struct {
    int64_t begin, end;
} span_t;

static int by_begin(const void *a, const void *b)
{
    int64_t x = ((const span_t *)a)->begin, y = ((const span_t *)b)->begin;
    return (x > y) - (x < y);
}

/* In offset order, the tensors cover [0, data_len) with no gap and no overlap. */
static int tiles(ctx_t *c)
{
    Py_ssize_t n = c->begins.len;
    const int64_t *b = c->begins.v, *sz = c->nbytes.v;
    int64_t covered = 0;
    int sorted = 1;
    for (Py_ssize_t i = 1; i < n && sorted; i++)
        sorted = b[i - 1] <= b[i];
    if (sorted) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (b[i] != covered)
                return NO;
            covered = b[i] + sz[i];
        }
    } else {
        span_t *s = PyMem_Malloc((size_t)n * sizeof(span_t));
        if (!s) {
            PyErr_NoMemory();
            return ERR;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            s[i].begin = b[i];
            s[i].end = b[i] + sz[i];
        }
        qsort(s, (size_t)n, sizeof(span_t), by_begin);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (s[i].begin != covered) {
                PyMem_Free(s);
                return NO;
            }
            covered = s[i].end;
        }
        PyMem_Free(s);
    }
    return covered == c->data_len ? OK : NO;
}

static int load_dtypes(ctx_t *c, PyObject *given)
{
    PyObject *key, *value, *dtypes;
    Py_ssize_t pos = 0;
    if (!PyDict_Check(given)) {
        PyErr_SetString(PyExc_TypeError, "dtypes must be a dict");
        return ERR;
    }
    if (!(dtypes = c->dtypes = PyDict_Copy(given)))
        return ERR;
    if (PyDict_GET_SIZE(dtypes) > MAX_DTYPES) {
        PyErr_Format(PyExc_ValueError, "at most %d dtypes", MAX_DTYPES);
        return ERR;
    }
    while (PyDict_Next(dtypes, &pos, &key, &value)) {
        dtype_t *d = &c->dtype[c->ndtypes];
        if (!PyUnicode_Check(key) || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2
            || !PyUnicode_Check(PyTuple_GET_ITEM(value, 0)) || !PyLong_Check(PyTuple_GET_ITEM(value, 1))) {
            PyErr_SetString(PyExc_TypeError, "dtypes must map str to (str, int)");
            return ERR;
        }
        d->code = PyUnicode_AsUTF8AndSize(key, &d->len);
        if (!d->code)
            return ERR;
        d->name = PyTuple_GET_ITEM(value, 0);
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(value, 1));
        if (size == -1 && PyErr_Occurred())
            return ERR;
        if (size < 1 || size > MAX_ITEMSIZE) {
            PyErr_Format(PyExc_ValueError, "itemsize %lld out of range", size);
            return ERR;
        }
        d->itemsize = size;
        c->ndtypes++;
    }
    return OK;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer header;
    long long data_len;
    PyObject *dtypes, *hint, *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*LOO:scan", &header, &data_len, &dtypes, &hint))
        return NULL;
    if (hint != Py_None && !PyList_Check(hint)) {
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_TypeError, "hint must be a list or None");
        return NULL;
    }
    ctx_t *c = PyMem_Calloc(1, sizeof(ctx_t));
    if (!c) {
        PyBuffer_Release(&header);
        return PyErr_NoMemory();
    }
    c->base = c->p = header.buf;
    c->end = c->p + header.len;
    c->data_len = data_len;
    c->hint = hint == Py_None ? NULL : hint;
    c->same = c->hint != NULL;
    c->meta_start = c->meta_end = -1;
    int st = load_dtypes(c, dtypes);
    if (st == OK && data_len < 0)
        st = NO;
    if (st == OK) {
        c->names = PyList_New(0);
        c->dtype_names = PyList_New(0);
        c->shape_list = PyList_New(0);
        st = c->names && c->dtype_names && c->shape_list ? OK : ERR;
    }
    if (st == OK)
        st = header_object(c);
    if (st == OK)
        st = unique_names(c);
    if (st == OK)
        st = tiles(c);
    if (st == OK) {
        Py_ssize_t n = PyList_GET_SIZE(c->names);
        int same = c->same && PyList_GET_SIZE(c->hint) == n;
        PyObject *begins = PyBytes_FromStringAndSize((const char *)c->begins.v, n * (Py_ssize_t)sizeof(int64_t));
        PyObject *nbytes = PyBytes_FromStringAndSize((const char *)c->nbytes.v, n * (Py_ssize_t)sizeof(int64_t));
        PyObject *span = c->meta_start < 0 ? Py_NewRef(Py_None) : Py_BuildValue("(nn)", c->meta_start, c->meta_end);
        if (begins && nbytes && span)
            result = PyTuple_Pack(7, c->names, c->dtype_names, c->shape_list, begins, nbytes, span,
                                  same ? Py_True : Py_False);
        Py_XDECREF(begins);
        Py_XDECREF(nbytes);
        Py_XDECREF(span);
    } else if (st == NO) {
        result = Py_NewRef(Py_None);
    }
    for (int i = 0; i < c->nshapes; i++)
        Py_DECREF(c->shapes[i].tuple);
    Py_XDECREF(c->names);
    Py_XDECREF(c->dtype_names);
    Py_XDECREF(c->shape_list);
    Py_XDECREF(c->dtypes);
    PyMem_Free(c->begins.v);
    PyMem_Free(c->nbytes.v);
    PyMem_Free(c->name_at.v);
    PyMem_Free(c);
    PyBuffer_Release(&header);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(header, data_len, dtypes, hint) -> (names, dtype_names, shapes, begins, nbytes, metadata_span, "
     "same_as_hint), or None when the header is not the plain common case"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cheader", "The common safetensors header in one pass (see safetensors_format).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cheader(void)
{
    return PyModule_Create(&module);
}
