/*
 * ckptdiff._ckernel: compare and hash a run of small tensors in one C call.
 *
 * A model's many small tensors (norms, biases, small convs) lie side by side
 * in a checkpoint. Python pays microseconds per tensor for a slice, a memcmp
 * and a hasher call; this module does the same work in a fraction of a
 * microsecond each: one pread per side fills two buffers, one memcmp tells
 * whether the whole run is identical, and each tensor is compared and hashed
 * with BLAKE3 from its slice, all without the GIL. This module is optional:
 * when it was not built (no C compiler at install time) ckptdiff does the
 * same work in Python with the blake3 package.
 *
 *   blake3(buffer) -> bytes                  the 32-byte BLAKE3 digest
 *   compare_run(fd_a, pos_a, fd_b, pos_b, span, buf_a, buf_b,
 *               offsets, sizes, hash_max, flags, digests) -> int
 *   compare_buffers(buf_a, buf_b, offsets, sizes, hash_max,
 *                   flags, digests) -> int
 *
 * compare_run reads span bytes of each file (fd_a from pos_a into buf_a, fd_b
 * from pos_b into buf_b) and then works like compare_buffers. Tensor i is
 * buf[offsets[i] : offsets[i] + sizes[i]] on both sides (offsets and sizes:
 * native int64 arrays of one length n). For each tensor, flags[i] gets
 * FLAG_DIFFERS when its bytes differ and FLAG_HASHED when its size is at most
 * hash_max; a hashed tensor's old-side digest goes to digests[64 i : 64 i + 32]
 * and, when it differs, its new-side digest to digests[64 i + 32 : 64 i + 64].
 * Both return how many tensors differ; compare_run returns -1 instead when
 * a file ends before span bytes were read.
 *
 * BLAKE3 here is a plain one-block-at-a-time implementation written from the
 * specification (default hash mode, 32-byte output). It beats the blake3
 * package for inputs of a few KiB only because it is called without Python
 * in between; the package's SIMD code, hashing several chunks at once, is far
 * faster on large inputs, which the caller keeps hashing with the package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#ifndef _WIN32
#include <unistd.h>
#define HAVE_PREAD 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* ------------------------------------------------------------------------
 * BLAKE3
 */

#define BLOCK_LEN 64
#define CHUNK_LEN 1024
#define OUT_LEN 32

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

/* The IV is SHA-256's; in the default hash mode it is also the key. */
static const uint32_t IV[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au, 0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

/* The message word each round reads at each position: round 0 reads the
 * block in order and every later round applies the specification's
 * permutation (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8) to the
 * previous round's order. Indexing through this table spares the copy that
 * permuting the words in place would cost between rounds. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* Byte-wise little-endian loads and stores: right on any byte order, and
 * GCC/clang turn them into single moves on little-endian machines. */
INLINE uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

INLINE void store_le32(uint8_t *p, uint32_t w)
{
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
    p[3] = (uint8_t)(w >> 24);
}

INLINE void load_block(const uint8_t *p, uint32_t m[16])
{
    for (int i = 0; i < 16; i++)
        m[i] = load_le32(p + 4 * i);
}

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

#define G(a, b, c, d, x, y) \
    do { \
        a += b + (x); d = ROTR(d ^ a, 16); c += d; b = ROTR(b ^ c, 12); \
        a += b + (y); d = ROTR(d ^ a, 8); c += d; b = ROTR(b ^ c, 7); \
    } while (0)

/* The compression function, keeping only the first 8 output words: a
 * chaining value, or the first 32 bytes of a root output, which is all a
 * 32-byte digest needs. cv and out may be the same array. */
static void compress(const uint32_t cv[8], const uint32_t m[16], uint64_t counter, uint32_t block_len,
                     uint32_t flags, uint32_t out[8])
{
    /* Sixteen scalars rather than an array, so the state stays in registers. */
    uint32_t v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
    uint32_t v8 = IV[0], v9 = IV[1], v10 = IV[2], v11 = IV[3];
    uint32_t v12 = (uint32_t)counter, v13 = (uint32_t)(counter >> 32), v14 = block_len, v15 = flags;
    /* Unrolled, so every message index is a constant. */
#define ROUND(r) \
    do { \
        const uint8_t *s = SCHEDULE[r]; \
        G(v0, v4, v8, v12, m[s[0]], m[s[1]]);   /* columns */ \
        G(v1, v5, v9, v13, m[s[2]], m[s[3]]); \
        G(v2, v6, v10, v14, m[s[4]], m[s[5]]); \
        G(v3, v7, v11, v15, m[s[6]], m[s[7]]); \
        G(v0, v5, v10, v15, m[s[8]], m[s[9]]);  /* diagonals */ \
        G(v1, v6, v11, v12, m[s[10]], m[s[11]]); \
        G(v2, v7, v8, v13, m[s[12]], m[s[13]]); \
        G(v3, v4, v9, v14, m[s[14]], m[s[15]]); \
    } while (0)
    ROUND(0);
    ROUND(1);
    ROUND(2);
    ROUND(3);
    ROUND(4);
    ROUND(5);
    ROUND(6);
#undef ROUND
    out[0] = v0 ^ v8;
    out[1] = v1 ^ v9;
    out[2] = v2 ^ v10;
    out[3] = v3 ^ v11;
    out[4] = v4 ^ v12;
    out[5] = v5 ^ v13;
    out[6] = v6 ^ v14;
    out[7] = v7 ^ v15;
}

/* The last compression of a node, held back until we know whether the node
 * is the root (which adds ROOT and makes this compression the output). */
typedef struct {
    uint32_t cv[8];
    uint32_t m[16];
    uint64_t counter;
    uint32_t block_len, flags;
} node_t;

/* All blocks of one chunk (0 to 1024 bytes) but the last, which is left in
 * *node. Only the very first chunk of an empty input has 0 bytes: it is one
 * empty block. */
static void chunk_node(const uint8_t *p, size_t len, uint64_t chunk, node_t *node)
{
    uint32_t flags = CHUNK_START;
    memcpy(node->cv, IV, sizeof IV);
    while (len > BLOCK_LEN) {
        load_block(p, node->m);
        compress(node->cv, node->m, chunk, BLOCK_LEN, flags, node->cv);
        flags = 0;
        p += BLOCK_LEN;
        len -= BLOCK_LEN;
    }
    if (len == BLOCK_LEN) {
        load_block(p, node->m);
    } else {
        uint8_t last[BLOCK_LEN] = {0};  /* a partial last block is padded with zeros */
        if (len)
            memcpy(last, p, len);
        load_block(last, node->m);
    }
    node->counter = chunk;
    node->block_len = (uint32_t)len;
    node->flags = flags | CHUNK_END;
}

INLINE void node_cv(const node_t *node, uint32_t out[8])
{
    compress(node->cv, node->m, node->counter, node->block_len, node->flags, out);
}

/* A parent node: one block of its two children's chaining values. */
static void parent_node(const uint32_t left[8], const uint32_t right[8], node_t *node)
{
    memcpy(node->cv, IV, sizeof IV);
    memcpy(node->m, left, 8 * sizeof(uint32_t));
    memcpy(node->m + 8, right, 8 * sizeof(uint32_t));
    node->counter = 0;
    node->block_len = BLOCK_LEN;
    node->flags = PARENT;
}

/*
 * The tree over chunks: each left subtree holds the largest power of two of
 * chunks that leaves at least one byte to the right. Hashing left to right,
 * the chaining values of finished subtrees wait on a stack; after the k-th
 * chunk, as many merges happen as k has trailing zero bits, so the stack
 * always holds one subtree per set bit of the chunk count (at most 54 for a
 * 64-bit length). The last chunk is held back so that its merges happen at
 * the end, where the topmost one is the root.
 */
static void blake3_hash(const uint8_t *p, size_t len, uint8_t digest[OUT_LEN])
{
    uint32_t stack[64][8];
    int depth = 0;
    uint64_t chunk = 0;
    node_t node;
    uint32_t cv[8];
    while (len > CHUNK_LEN) {
        chunk_node(p, CHUNK_LEN, chunk, &node);
        node_cv(&node, cv);
        chunk++;
        for (uint64_t t = chunk; (t & 1) == 0; t >>= 1) {
            node_t parent;
            parent_node(stack[--depth], cv, &parent);
            node_cv(&parent, cv);
        }
        memcpy(stack[depth++], cv, sizeof cv);
        p += CHUNK_LEN;
        len -= CHUNK_LEN;
    }
    chunk_node(p, len, chunk, &node);
    while (depth > 0) {
        node_cv(&node, cv);
        parent_node(stack[--depth], cv, &node);
    }
    /* The root's counter counts output blocks, and a 32-byte digest is block 0. */
    compress(node.cv, node.m, 0, node.block_len, node.flags | ROOT, cv);
    for (int i = 0; i < 8; i++)
        store_le32(digest + 4 * i, cv[i]);
}

/* ------------------------------------------------------------------------
 * The run kernel
 */

enum { FLAG_DIFFERS = 1, FLAG_HASHED = 2 };
#define DIGEST_STRIDE 64

/* native int64 without alignment: offsets may come from any bytes-like object */
INLINE int64_t load_i64(const uint8_t *p, Py_ssize_t i)
{
    int64_t v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

typedef struct {
    Py_buffer a, b, offsets, sizes, flags, digests;
    int held;  /* how many of the above are held, in that order */
    Py_ssize_t n;
} args_t;

static void release_args(args_t *x)
{
    Py_buffer *all[6] = {&x->a, &x->b, &x->offsets, &x->sizes, &x->flags, &x->digests};
    for (int i = 0; i < x->held; i++)
        PyBuffer_Release(all[i]);
    x->held = 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what, args_t *x)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        /* Name the argument, but keep other errors (a closed mmap's ValueError). */
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_BufferError))
            return -1;
        PyErr_Format(PyExc_TypeError, writable ? "%s must be a writable contiguous buffer"
                                               : "%s must be a contiguous buffer", what);
        return -1;
    }
    x->held++;
    return 0;
}

/* Takes the six buffers and checks their sizes; on failure sets an exception
 * and releases what it took. */
static int take_args(args_t *x, PyObject *a, PyObject *b, int writable_ab, PyObject *offsets, PyObject *sizes,
                     PyObject *flags, PyObject *digests)
{
    x->held = 0;
    if (get_buffer(a, &x->a, writable_ab, "buf_a", x) < 0 || get_buffer(b, &x->b, writable_ab, "buf_b", x) < 0
        || get_buffer(offsets, &x->offsets, 0, "offsets", x) < 0 || get_buffer(sizes, &x->sizes, 0, "sizes", x) < 0
        || get_buffer(flags, &x->flags, 1, "flags", x) < 0 || get_buffer(digests, &x->digests, 1, "digests", x) < 0)
        goto fail;
    if (x->offsets.len % 8 || x->sizes.len != x->offsets.len) {
        PyErr_Format(PyExc_ValueError, "offsets and sizes must be int64 arrays of one length (%zd and %zd bytes)",
                     x->offsets.len, x->sizes.len);
        goto fail;
    }
    x->n = x->offsets.len / 8;
    /* n <= len / 8, so n * DIGEST_STRIDE could overflow: divide instead */
    if (x->flags.len < x->n || x->digests.len / DIGEST_STRIDE < x->n) {
        PyErr_Format(PyExc_ValueError, "%zd tensors need %zd bytes of flags and %d per tensor of digests "
                     "(got %zd and %zd)", x->n, x->n, DIGEST_STRIDE, x->flags.len, x->digests.len);
        goto fail;
    }
    return 0;
fail:
    release_args(x);
    return -1;
}

/* Whether tensor i lies inside span bytes; the test cannot overflow. */
INLINE int tensor_ok(int64_t off, int64_t size, Py_ssize_t span)
{
    return off >= 0 && size >= 0 && off <= (int64_t)span && size <= (int64_t)span - off;
}

/* Checks every offset and size before any work, for an error that names the
 * first bad tensor. */
static int check_tensors(const args_t *x, Py_ssize_t span)
{
    const uint8_t *po = x->offsets.buf, *ps = x->sizes.buf;
    for (Py_ssize_t i = 0; i < x->n; i++) {
        int64_t off = load_i64(po, i), size = load_i64(ps, i);
        if (!tensor_ok(off, size, span)) {
            PyErr_Format(PyExc_ValueError, "tensor %zd at offset %lld of %lld bytes is not inside the %zd-byte span",
                         i, (long long)off, (long long)size, span);
            return -1;
        }
    }
    return 0;
}

/*
 * The per-tensor work; runs without the GIL. Returns how many tensors
 * differ, or -2 when an offset or size is out of bounds: they were checked
 * already, but another thread may write to the arrays meanwhile, so each
 * value is loaded once and checked again right where it is used.
 */
static Py_ssize_t run_tensors(const uint8_t *a, const uint8_t *b, Py_ssize_t span, const args_t *x,
                              Py_ssize_t hash_max)
{
    const uint8_t *po = x->offsets.buf, *ps = x->sizes.buf;
    uint8_t *flags = x->flags.buf, *digests = x->digests.buf;
    /* Runs of frozen tensors are the usual case: one memcmp settles them all. */
    int whole_same = span == 0 || memcmp(a, b, (size_t)span) == 0;
    Py_ssize_t differ = 0;
    for (Py_ssize_t i = 0; i < x->n; i++) {
        int64_t off = load_i64(po, i), size = load_i64(ps, i);
        if (!tensor_ok(off, size, span))
            return -2;
        int f = !whole_same && size > 0 && memcmp(a + off, b + off, (size_t)size) != 0;
        if (size <= hash_max) {
            uint8_t *d = digests + (size_t)i * DIGEST_STRIDE;
            blake3_hash(a + off, (size_t)size, d);
            if (f)
                blake3_hash(b + off, (size_t)size, d + OUT_LEN);
            f |= FLAG_HASHED;
        }
        flags[i] = (uint8_t)f;
        differ += f & FLAG_DIFFERS;
    }
    return differ;
}

static PyObject *run_result(Py_ssize_t r)
{
    if (r == -2)
        return PyErr_Format(PyExc_ValueError, "offsets or sizes changed while in use");
    return PyLong_FromSsize_t(r);
}

#ifdef HAVE_PREAD
/* Largest single read: Linux transfers at most 0x7ffff000 bytes per call. */
#define MAX_READ ((size_t)1 << 30)

/* Reads n bytes at pos. Returns 1, or 0 when the file ends first, or -1
 * with *err set to errno. Interrupted reads are retried. */
static int read_full(int fd, uint8_t *p, size_t n, long long pos, int *err)
{
    while (n > 0) {
        ssize_t r = pread(fd, p, n < MAX_READ ? n : MAX_READ, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return -1;
        }
        if (r == 0)
            return 0;
        p += r;
        n -= (size_t)r;
        pos += r;
    }
    return 1;
}

static PyObject *compare_run(PyObject *self, PyObject *args)
{
    int fd_a, fd_b;
    long long pos_a, pos_b;
    Py_ssize_t span, hash_max;
    PyObject *oa, *ob, *ooff, *osz, *ofl, *odg;
    args_t x;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLiLnOOOOnOO:compare_run", &fd_a, &pos_a, &fd_b, &pos_b, &span, &oa, &ob, &ooff,
                          &osz, &hash_max, &ofl, &odg))
        return NULL;
    if (span < 0 || pos_a < 0 || pos_b < 0 || pos_a > LLONG_MAX - span || pos_b > LLONG_MAX - span
        || (sizeof(off_t) < 8 && (pos_a > LONG_MAX - span || pos_b > LONG_MAX - span)))
        return PyErr_Format(PyExc_ValueError, "bad positions or span (%lld, %lld, %zd)", pos_a, pos_b, span);
    if (take_args(&x, oa, ob, 1, ooff, osz, ofl, odg) < 0)
        return NULL;
    if (x.a.len < span || x.b.len < span) {
        PyErr_Format(PyExc_ValueError, "buffers of %zd and %zd bytes cannot hold %zd", x.a.len, x.b.len, span);
        release_args(&x);
        return NULL;
    }
    if (check_tensors(&x, span) < 0) {
        release_args(&x);
        return NULL;
    }
    Py_ssize_t r;
    int err = 0, got;
    Py_BEGIN_ALLOW_THREADS
    got = read_full(fd_a, x.a.buf, (size_t)span, pos_a, &err);
    if (got == 1)
        got = read_full(fd_b, x.b.buf, (size_t)span, pos_b, &err);
    r = got == 1 ? run_tensors(x.a.buf, x.b.buf, span, &x, hash_max) : -1;
    Py_END_ALLOW_THREADS
    release_args(&x);
    if (got < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return run_result(r);
}
#endif

static PyObject *compare_buffers(PyObject *self, PyObject *args)
{
    Py_ssize_t hash_max;
    PyObject *oa, *ob, *ooff, *osz, *ofl, *odg;
    args_t x;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnOO:compare_buffers", &oa, &ob, &ooff, &osz, &hash_max, &ofl, &odg))
        return NULL;
    if (take_args(&x, oa, ob, 0, ooff, osz, ofl, odg) < 0)
        return NULL;
    Py_ssize_t span = x.a.len < x.b.len ? x.a.len : x.b.len;
    if (check_tensors(&x, span) < 0) {
        release_args(&x);
        return NULL;
    }
    Py_ssize_t r;
    Py_BEGIN_ALLOW_THREADS
    r = run_tensors(x.a.buf, x.b.buf, span, &x, hash_max);
    Py_END_ALLOW_THREADS
    release_args(&x);
    return run_result(r);
}

/* Below this size, releasing and retaking the GIL costs more than it frees. */
#define GIL_FREE_BYTES 16384

static PyObject *blake3_py(PyObject *self, PyObject *arg)
{
    Py_buffer data;
    uint8_t digest[OUT_LEN];
    (void)self;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (data.len >= GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        blake3_hash(data.buf, (size_t)data.len, digest);
        Py_END_ALLOW_THREADS
    } else {
        blake3_hash(data.buf, (size_t)data.len, digest);
    }
    PyBuffer_Release(&data);
    return PyBytes_FromStringAndSize((const char *)digest, OUT_LEN);
}

static PyMethodDef methods[] = {
    {"blake3", blake3_py, METH_O, "blake3(buffer) -> bytes: the 32-byte BLAKE3 digest"},
#ifdef HAVE_PREAD
    {"compare_run", compare_run, METH_VARARGS,
     "compare_run(fd_a, pos_a, fd_b, pos_b, span, buf_a, buf_b, offsets, sizes, hash_max, flags, digests) -> int: "
     "read span bytes of each file into buf_a/buf_b, then compare_buffers; -1 when a file ends first"},
#endif
    {"compare_buffers", compare_buffers, METH_VARARGS,
     "compare_buffers(buf_a, buf_b, offsets, sizes, hash_max, flags, digests) -> int: for each tensor i "
     "(int64 offsets[i], sizes[i]), flags[i] |= FLAG_DIFFERS if its bytes differ and FLAG_HASHED if "
     "sizes[i] <= hash_max, whose BLAKE3 digests go to digests[64i:64i+32] (old) and, if it differs, "
     "digests[64i+32:64i+64] (new); returns how many differ"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernel", "Compare and hash runs of small tensors (see ckptdiff.compare).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernel(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "FLAG_DIFFERS", FLAG_DIFFERS) < 0
        || PyModule_AddIntConstant(m, "FLAG_HASHED", FLAG_HASHED) < 0
        || PyModule_AddIntConstant(m, "DIGEST_STRIDE", DIGEST_STRIDE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
