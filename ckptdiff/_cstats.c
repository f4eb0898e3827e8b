/*
 * ckptdiff._cstats: statistics of a changed chunk pair in one pass, in C.
 *
 * The same numbers as ckptdiff/stats_numpy.py (float64 arithmetic, the same
 * NaN/Inf convention), for the cost of reading the bytes once: numpy needs
 * ~10 passes over a float64 copy of each block, and ~50 ms just to import,
 * which is a fifth of a whole 1 GB diff. This module is optional: when it
 * was not built (no C compiler at install time) ckptdiff uses numpy.
 *
 *   measure(kind, old, new, atol, rtol[, row_len, elem_offset, last_row,
 *           want_rows, round_mask])      -> tuple of 16 items
 *   measure(kind, old, None, 0, 0, ...)  -> the same, for a chunk known to be
 *                                          identical (only ||old|| grows)
 *
 * kind indexes KINDS (canonical dtype names); old/new are buffers of raw
 * little-endian elements of that kind, of equal length. The tuple is
 *   (changed, out_of_tolerance, finite_both, max_abs, sum_abs, nan_new,
 *    inf_new, delta_scale, delta_ssq, old_scale, old_ssq)
 * where a norm is scale * sqrt(ssq) (see stats._Norm), followed by the sums
 * the cause classifier reads (ckptdiff.cause):
 *   (sum_old_delta, round_mask, changed_rows, last_row, first_rows)
 * sum_old_delta is the sum of old*(new-old) over positions finite on both
 * sides; round_mask keeps the bits of the given round_mask (ROUND_NAMES)
 * whose narrower format every new value is old rounded to (round to nearest
 * even); changed_rows counts rows of row_len elements (the chunk starting at
 * element elem_offset) with a changed element, other than last_row (the last
 * changed row of the previous chunk), first_rows lists the first want_rows
 * of them, and last_row is the last one seen. The GIL is released
 * while the bytes are read, so the engine's worker threads measure in
 * parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Four float64 lanes: GCC and clang turn these into SSE2 pairs, or AVX2
 * registers in the avx2 clone of measure_all (see CLONES); other compilers
 * get the plain loops. */
#if defined(__GNUC__) || defined(__clang__)
#define HAVE_VEC 1
typedef double v4d __attribute__((vector_size(32)));
typedef long long v4l __attribute__((vector_size(32)));
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

enum {
    K_F64, K_F32, K_F16, K_BF16, K_F8E4M3FN, K_F8E5M2,
    K_I64, K_I32, K_I16, K_I8, K_U64, K_U32, K_U16, K_U8, K_BOOL, K_COUNT
};

static const char *const KIND_NAMES[K_COUNT] = {
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
};
static const int ITEMSIZE[K_COUNT] = {8, 4, 2, 2, 1, 1, 8, 4, 2, 1, 8, 4, 2, 1, 1};

/* Elements per block: two float64 blocks and the inequality mask stay in L1. */
#define BLOCK 1024

/* Decoding tables for the types without a C equivalent. The two fp8 tables are
 * built at import; float16's (256 KiB) when a float16 tensor first needs it, so a
 * run without one neither spends the time nor faults the pages in. */
static float F16_TABLE[65536];
static int f16_table_built;
static float E4M3FN_TABLE[256];
static float E5M2_TABLE[256];

static double minifloat(unsigned bits, int ebits, int mbits, int bias, int ieee_specials)
{
    unsigned sign = bits >> (ebits + mbits);
    unsigned e = (bits >> mbits) & ((1u << ebits) - 1);
    unsigned m = bits & ((1u << mbits) - 1);
    double v;
    if (ieee_specials && e == (1u << ebits) - 1) {
        v = m ? NAN : INFINITY;
    } else if (!ieee_specials && e == (1u << ebits) - 1 && m == (1u << mbits) - 1) {
        v = NAN;  /* e4m3fn: only S.1111.111 is NaN, no infinities */
    } else if (e == 0) {
        v = ldexp((double)m, 1 - bias - mbits);  /* zero and subnormals */
    } else {
        v = ldexp((double)((1u << mbits) | m), (int)e - bias - mbits);
    }
    return sign ? -v : v;
}

/* Call with the GIL held (every caller does, before releasing it): the table is
 * complete before any thread reads it, and no two threads build it at once. */
static void need_f16_table(void)
{
    if (f16_table_built)
        return;
    for (unsigned i = 0; i < 65536; i++)
        F16_TABLE[i] = (float)minifloat(i, 5, 10, 15, 1);
    f16_table_built = 1;
}

static void build_tables(void)
{
    for (unsigned i = 0; i < 256; i++) {
        E4M3FN_TABLE[i] = (float)minifloat(i, 4, 3, 7, 0);
        E5M2_TABLE[i] = (float)minifloat(i, 5, 2, 15, 1);
    }
}

/* Loads through memcpy: tensors in a file start at any byte offset (compilers
 * turn these into plain loads). */
#define DEFINE_LOAD(NAME, T) \
    static inline T NAME(const unsigned char *p, Py_ssize_t i) \
    { T v; memcpy(&v, p + (size_t)i * sizeof(T), sizeof(T)); return v; }
DEFINE_LOAD(ld_f32, float)
DEFINE_LOAD(ld_u16, uint16_t)
DEFINE_LOAD(ld_u32, uint32_t)
DEFINE_LOAD(ld_u64, uint64_t)
DEFINE_LOAD(ld_i16, int16_t)
DEFINE_LOAD(ld_i32, int32_t)
DEFINE_LOAD(ld_i64, int64_t)

INLINE void decode(int kind, const unsigned char *p, Py_ssize_t n, double *out)
{
    Py_ssize_t i;
    switch (kind) {
    case K_F64: memcpy(out, p, (size_t)n * 8); break;
    case K_F32: for (i = 0; i < n; i++) out[i] = ld_f32(p, i); break;
    case K_F16: for (i = 0; i < n; i++) out[i] = F16_TABLE[ld_u16(p, i)]; break;
    case K_BF16:
        for (i = 0; i < n; i++) {
            uint32_t w = (uint32_t)ld_u16(p, i) << 16;
            float f;
            memcpy(&f, &w, 4);
            out[i] = f;
        }
        break;
    case K_F8E4M3FN: for (i = 0; i < n; i++) out[i] = E4M3FN_TABLE[p[i]]; break;
    case K_F8E5M2: for (i = 0; i < n; i++) out[i] = E5M2_TABLE[p[i]]; break;
    case K_I64: for (i = 0; i < n; i++) out[i] = (double)ld_i64(p, i); break;
    case K_I32: for (i = 0; i < n; i++) out[i] = ld_i32(p, i); break;
    case K_I16: for (i = 0; i < n; i++) out[i] = ld_i16(p, i); break;
    case K_I8: for (i = 0; i < n; i++) out[i] = (int8_t)p[i]; break;
    case K_U64: for (i = 0; i < n; i++) out[i] = (double)ld_u64(p, i); break;
    case K_U32: for (i = 0; i < n; i++) out[i] = ld_u32(p, i); break;
    case K_U16: for (i = 0; i < n; i++) out[i] = ld_u16(p, i); break;
    case K_U8: for (i = 0; i < n; i++) out[i] = p[i]; break;
    case K_BOOL: for (i = 0; i < n; i++) out[i] = p[i] != 0; break;
    }
}

/* How many elements differ in any bit. */
INLINE Py_ssize_t count_unequal(int size, const unsigned char *a, const unsigned char *b, Py_ssize_t n)
{
    Py_ssize_t i, count = 0;
    switch (size) {
    case 8: for (i = 0; i < n; i++) count += ld_u64(a, i) != ld_u64(b, i); break;
    case 4: for (i = 0; i < n; i++) count += ld_u32(a, i) != ld_u32(b, i); break;
    case 2: for (i = 0; i < n; i++) count += ld_u16(a, i) != ld_u16(b, i); break;
    default: for (i = 0; i < n; i++) count += a[i] != b[i]; break;
    }
    return count;
}

INLINE int unequal_at(int size, const unsigned char *a, const unsigned char *b, Py_ssize_t i)
{
    return memcmp(a + (size_t)i * size, b + (size_t)i * size, (size_t)size) != 0;
}

typedef struct { double scale, ssq; } norm_t;

/* Add scale * sqrt(ssq) to a norm without overflowing: stats._Norm._merge. */
INLINE void norm_merge(norm_t *nm, double scale, double ssq)
{
    if (ssq == 0.0)
        return;
    if (nm->ssq == 0.0) {
        nm->scale = scale;
        nm->ssq = ssq;
    } else if (scale > nm->scale) {
        double r = nm->scale / scale;
        nm->ssq = nm->ssq * r * r + ssq;
        nm->scale = scale;
    } else if (scale == nm->scale) {
        nm->ssq += ssq;  /* also inf == inf, where the ratio would be NaN */
    } else {
        double r = scale / nm->scale;
        nm->ssq += ssq * r * r;
    }
}

/* Add a float64 block's sum of squares; values that could overflow or
 * underflow when squared are scaled by the largest magnitude, as in
 * stats_numpy._Norm.add (only float64 can hold such values). */
INLINE void norm_add_careful(norm_t *nm, const double *x, const unsigned char *use, Py_ssize_t n)
{
    double m = 0.0, ssq = 0.0;
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        if (!use || use[i]) {
            double v = fabs(x[i]);
            if (v > m) m = v;
        }
    if (m == 0.0)
        return;
    if (m == INFINITY) {  /* a delta that overflowed float64 itself */
        norm_merge(nm, INFINITY, 1.0);
        return;
    }
    if (m > 1e-140 && m < 1e140) {
        for (i = 0; i < n; i++)
            if (!use || use[i]) ssq += x[i] * x[i];
        norm_merge(nm, 1.0, ssq);
    } else {
        for (i = 0; i < n; i++)
            if (!use || use[i]) { double s = x[i] / m; ssq += s * s; }
        norm_merge(nm, m, ssq);
    }
}

typedef struct {
    long long changed, beyond, moves, finite_both, nan_new, inf_new;
    double max_abs, sum_abs, sum_od;
    norm_t dn, on;
} acc_t;

INLINE double sumsq(const double *x, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    double r = 0.0;
#ifdef HAVE_VEC
    v4d s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    for (; i + 8 <= n; i += 8) {
        v4d a, b;
        memcpy(&a, x + i, sizeof a);
        memcpy(&b, x + i + 4, sizeof b);
        s0 += a * a;
        s1 += b * b;
    }
    s0 += s1;
    r = (s0[0] + s0[1]) + (s0[2] + s0[3]);
#endif
    for (; i < n; i++) r += x[i] * x[i];
    return r;
}

/* Largest |x| of a block (NaN compares false, so NaNs are skipped). */
INLINE double maxabs(const double *x, Py_ssize_t n)
{
    double m = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = fabs(x[i]);
        m = v > m ? v : m;
    }
    return m;
}

/* A plain sum of squares is exact enough when the block's largest magnitude
 * is in this range: nothing overflows, and what underflows is negligible
 * beside it (the same test as norm_add_careful; only float64 can fail it). */
INLINE int plain_ok(double m)
{
    return m == 0.0 || (m > 1e-140 && m < 1e140);
}

/* A block of an identical chunk: only ||old|| and the finite count grow. */
INLINE void old_only(acc_t *acc, int is_float, int careful, const double *xa, Py_ssize_t n, unsigned char *use)
{
    Py_ssize_t i, fin = 0;
    double ssq = sumsq(xa, n);
    /* Narrow floats and ints cannot overflow float64: a finite sum means
     * every value was finite. float64 also needs a magnitude in range. */
    if (!is_float || (isfinite(ssq) && (!careful || plain_ok(maxabs(xa, n))))) {
        acc->finite_both += n;
        norm_merge(&acc->on, 1.0, ssq);
        return;
    }
    for (i = 0; i < n; i++)
        fin += use[i] = isfinite(xa[i]) != 0;
    acc->finite_both += fin;
    norm_add_careful(&acc->on, xa, use, n);
}

/* The common changed block: every value finite (ints always are) and, for
 * float64, of a magnitude whose square is safe. Returns 0, having recorded
 * nothing, when a sum shows a NaN/Inf somewhere or a float64 magnitude is out
 * of range; the caller then measures the block position by position. */
INLINE int changed_fast(acc_t *acc, int is_float, int careful, const double *xa, const double *xb,
                        Py_ssize_t n, double atol, double rtol, int tol)
{
    double o = 0, s = 0, s2 = 0, m = 0, od = 0;
    Py_ssize_t i = 0;
#ifdef HAVE_VEC
    const v4l absmask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    v4d so = {0, 0, 0, 0}, sd = so, sd2 = so, mx = so, sod = so;
    v4d so1 = so, sd1 = so, sd21 = so, mx1 = so, sod1 = so;
    for (; i + 8 <= n; i += 8) {
        v4d x, y, x1, y1;
        memcpy(&x, xa + i, sizeof x);
        memcpy(&y, xb + i, sizeof y);
        memcpy(&x1, xa + i + 4, sizeof x1);
        memcpy(&y1, xb + i + 4, sizeof y1);
        v4d e = y - x, e1 = y1 - x1;
        v4d d = (v4d)((v4l)e & absmask);
        v4d d1 = (v4d)((v4l)e1 & absmask);
        sod += x * e;
        sod1 += x1 * e1;
        so += x * x;
        so1 += x1 * x1;
        sd += d;
        sd1 += d1;
        sd2 += d * d;
        sd21 += d1 * d1;
        v4l gt = d > mx, gt1 = d1 > mx1;
        mx = (v4d)(((v4l)d & gt) | ((v4l)mx & ~gt));
        mx1 = (v4d)(((v4l)d1 & gt1) | ((v4l)mx1 & ~gt1));
    }
    so += so1;
    sd += sd1;
    sd2 += sd21;
    sod += sod1;
    {
        v4l gt = mx1 > mx;
        mx = (v4d)(((v4l)mx1 & gt) | ((v4l)mx & ~gt));
    }
    o = (so[0] + so[1]) + (so[2] + so[3]);
    s = (sd[0] + sd[1]) + (sd[2] + sd[3]);
    s2 = (sd2[0] + sd2[1]) + (sd2[2] + sd2[3]);
    od = (sod[0] + sod[1]) + (sod[2] + sod[3]);
    m = fmax(fmax(mx[0], mx[1]), fmax(mx[2], mx[3]));
#endif
    for (; i < n; i++) {
        double x = xa[i], e = xb[i] - x, d = fabs(e);
        o += x * x; s += d; s2 += d * d; od += x * e;
        if (d > m) m = d;
    }
    if (is_float && !(isfinite(o) && isfinite(s)))
        return 0;
    if (careful && !(plain_ok(m) && plain_ok(maxabs(xa, n))))
        return 0;  /* float64 values whose squares could overflow or underflow */
    acc->finite_both += n;
    norm_merge(&acc->on, 1.0, o);
    if (m > acc->max_abs) acc->max_abs = m;
    acc->sum_abs += s;
    acc->sum_od += od;
    norm_merge(&acc->dn, 1.0, s2);
    if (tol) {
        long long beyond = 0;
        for (i = 0; i < n; i++)
            beyond += fabs(xb[i] - xa[i]) > atol + rtol * fabs(xa[i]);
        acc->beyond += beyond;
    }
    return 1;
}

/* Any changed block, position by position: NaN/Inf on either side, and
 * float64 (whose squares can overflow). Statistics cover the positions
 * finite on both sides; nan_new/inf_new count what became NaN/Inf. */
INLINE void changed_careful(acc_t *acc, int careful, const double *xa, double *xb, int size,
                            const unsigned char *pa, const unsigned char *pb, unsigned char *use, Py_ssize_t n,
                            double atol, double rtol, int tol)
{
    Py_ssize_t i, fin = 0;
    double s = 0, m = 0, od = 0;
    long long beyond = 0;
    for (i = 0; i < n; i++) {
        double x = xa[i], y = xb[i];
        if (isfinite(x) && isfinite(y)) {
            double d = fabs(y - x);
            use[i] = 1;
            fin++;
            s += d;
            od += x * (y - x);
            if (d > m) m = d;
            if (tol) beyond += d > atol + rtol * fabs(x);
            xb[i] = d;  /* xb becomes |delta| for the norm below */
        } else {
            int nx = isnan(x) != 0, ny = isnan(y) != 0;
            use[i] = 0;
            acc->nan_new += ny && !nx;
            acc->inf_new += isinf(y) && !isinf(x);
            acc->moves += !(nx && ny) && unequal_at(size, pa, pb, i);
        }
    }
    acc->finite_both += fin;
    if (m > acc->max_abs) acc->max_abs = m;
    acc->sum_abs += s;
    acc->sum_od += od;
    acc->beyond += beyond;
    if (careful) {
        norm_add_careful(&acc->on, xa, use, n);
        norm_add_careful(&acc->dn, xb, use, n);
    } else {
        double o = 0, d2 = 0;
        for (i = 0; i < n; i++)
            if (use[i]) { o += xa[i] * xa[i]; d2 += xb[i] * xb[i]; }
        norm_merge(&acc->on, 1.0, o);
        norm_merge(&acc->dn, 1.0, d2);
    }
}


/* Narrower formats a tensor may have been rounded through: precision_roundtrip. */
enum { R_F32, R_F16, R_BF16, R_E4M3FN, R_E5M2, R_COUNT };
static const char *const ROUND_NAMES[R_COUNT] = {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"};
/* (mantissa bits, smallest normal exponent, largest finite value, overflow gives NaN) */
static const struct { int mbits, emin; double max; int overflow_nan; } ROUND_FMT[R_COUNT] = {
    {23, -126, 3.4028234663852886e38, 0},
    {10, -14, 65504.0, 0},
    {7, -126, 3.3895313892515355e38, 0},
    {3, -6, 448.0, 1},
    {2, -14, 57344.0, 0},
};

/* Which formats are narrower than each kind (checking a format at least as
 * wide would be trivially true of unchanged values and false of changed ones). */
static int round_candidates(int kind)
{
    switch (kind) {
    case K_F64: return (1 << R_COUNT) - 1;
    case K_F32: return (1 << R_F16) | (1 << R_BF16) | (1 << R_E4M3FN) | (1 << R_E5M2);
    case K_F16: case K_BF16: return (1 << R_E4M3FN) | (1 << R_E5M2);
    default: return 0;
    }
}

/* x rounded to nearest even in format f, in float64 (exact: every such
 * format's values are float64 values, and x / ulp is an exact scaling). */
static double round_to(int f, double x)
{
    int e;
    if (!isfinite(x) || x == 0.0)
        return x;
    frexp(x, &e);  /* |x| = m * 2^e, m in [0.5, 1) */
    e -= 1;
    if (e < ROUND_FMT[f].emin)
        e = ROUND_FMT[f].emin;  /* subnormals share the smallest normal spacing */
    double ulp = ldexp(1.0, e - ROUND_FMT[f].mbits);
    double r = nearbyint(x / ulp) * ulp;  /* the default rounding mode: to nearest, ties to even */
    if (fabs(r) > ROUND_FMT[f].max)
        return ROUND_FMT[f].overflow_nan ? NAN : copysign(INFINITY, x);
    return r;
}

/* Drop from mask every format for which some new value is not old rounded to it.
 * A format usually fails at its first element, so this costs next to nothing
 * for an ordinary update. */
static int round_check(int mask, const double *xa, const double *xb, Py_ssize_t n)
{
    for (int f = 0; f < R_COUNT; f++) {
        if (!(mask & (1 << f)))
            continue;
        for (Py_ssize_t i = 0; i < n; i++) {
            double r = round_to(f, xa[i]), y = xb[i];
            if (!(y == r || (isnan(y) && isnan(r)))) {
                mask &= ~(1 << f);
                break;
            }
        }
    }
    return mask;
}

typedef struct {
    Py_ssize_t row_len, elem_offset, last_row, want;
    long long changed_rows;
    long long first_buf[64];
    int nfirst;
} rows_t;

/* Count the rows with a changed element in one block (elements off..off+n of the chunk). */
static void rows_scan(rows_t *rw, int size, const unsigned char *pa, const unsigned char *pb,
                      Py_ssize_t off, Py_ssize_t n)
{
    Py_ssize_t g = rw->elem_offset + off;
    Py_ssize_t r = g / rw->row_len, in_row = g % rw->row_len, i = 0;
    while (i < n) {
        Py_ssize_t seg = rw->row_len - in_row;
        if (seg > n - i) seg = n - i;
        if (r != rw->last_row && memcmp(pa + (size_t)i * size, pb + (size_t)i * size, (size_t)seg * size)) {
            rw->changed_rows++;
            rw->last_row = r;
            if (rw->nfirst < rw->want)
                rw->first_buf[rw->nfirst++] = r;
        }
        i += seg;
        r++;
        in_row = 0;
    }
}

CLONES static void measure_all(int kind, const unsigned char *a, const unsigned char *b, Py_ssize_t count,
                        double atol, double rtol, acc_t *acc, int *round_mask, rows_t *rw)
{
    double xa[BLOCK], xb[BLOCK];
    unsigned char use[BLOCK];
    int size = ITEMSIZE[kind];
    int is_float = kind <= K_F8E5M2;
    int careful = kind == K_F64;
    int tol = atol != 0.0 || rtol != 0.0;
    for (Py_ssize_t off = 0; off < count; off += BLOCK) {
        Py_ssize_t n = count - off < BLOCK ? count - off : BLOCK;
        const unsigned char *pa = a + (size_t)off * size;
        const unsigned char *pb = b ? b + (size_t)off * size : NULL;
        Py_ssize_t changed = 0;
        if (pb && memcmp(pa, pb, (size_t)n * size) != 0)
            changed = count_unequal(size, pa, pb, n);
        decode(kind, pa, n, xa);
        if (!changed) {
            if (*round_mask)
                *round_mask = round_check(*round_mask, xa, xa, n);
            old_only(acc, is_float, careful, xa, n, use);
            continue;
        }
        acc->changed += changed;
        if (rw->row_len > 0)
            rows_scan(rw, size, pa, pb, off, n);
        decode(kind, pb, n, xb);
        if (*round_mask)
            *round_mask = round_check(*round_mask, xa, xb, n);
        if (changed_fast(acc, is_float, careful, xa, xb, n, atol, rtol, tol))
            continue;
        changed_careful(acc, careful, xa, xb, size, pa, pb, use, n, atol, rtol, tol);
    }
}

static PyObject *measure(PyObject *self, PyObject *args)
{
    int kind;
    Py_buffer a, b;
    int has_b = 0;
    PyObject *new_obj;
    double atol, rtol;
    rows_t rw;
    int round_mask = 0;
    memset(&rw, 0, sizeof rw);
    rw.last_row = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*Odd|nnnni:measure", &kind, &a, &new_obj, &atol, &rtol,
                          &rw.row_len, &rw.elem_offset, &rw.last_row, &rw.want, &round_mask))
        return NULL;
    if (rw.row_len < 0 || rw.elem_offset < 0 || rw.want < 0 || rw.want > 64) {
        PyBuffer_Release(&a);
        return PyErr_Format(PyExc_ValueError, "bad row arguments");
    }
    if (kind < 0 || kind >= K_COUNT) {
        PyBuffer_Release(&a);
        return PyErr_Format(PyExc_ValueError, "unknown kind %d", kind);
    }
    if (new_obj != Py_None) {
        if (PyObject_GetBuffer(new_obj, &b, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&a);
            return NULL;
        }
        has_b = 1;
        if (b.len != a.len) {
            PyBuffer_Release(&a);
            PyBuffer_Release(&b);
            return PyErr_Format(PyExc_ValueError, "buffers differ in length (%zd vs %zd bytes)", a.len, b.len);
        }
    }
    if (a.len % ITEMSIZE[kind]) {
        PyBuffer_Release(&a);
        if (has_b) PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %s elements",
                            a.len, KIND_NAMES[kind]);
    }
    acc_t acc;
    memset(&acc, 0, sizeof acc);
    acc.dn.scale = acc.on.scale = 1.0;
    round_mask &= round_candidates(kind);
    if (kind == K_F16)
        need_f16_table();
    Py_BEGIN_ALLOW_THREADS
    measure_all(kind, a.buf, has_b ? b.buf : NULL, a.len / ITEMSIZE[kind], atol, rtol, &acc, &round_mask, &rw);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    if (has_b) PyBuffer_Release(&b);
    long long out_of_tol = (atol != 0.0 || rtol != 0.0) ? acc.beyond + acc.moves : acc.changed;
    PyObject *first = PyTuple_New(rw.nfirst);
    if (!first)
        return NULL;
    for (int i = 0; i < rw.nfirst; i++) {
        PyObject *v = PyLong_FromLongLong(rw.first_buf[i]);
        if (!v) {
            Py_DECREF(first);
            return NULL;
        }
        PyTuple_SET_ITEM(first, i, v);
    }
    return Py_BuildValue("(LLLddLLdddddiLnN)", acc.changed, out_of_tol, acc.finite_both, acc.max_abs, acc.sum_abs,
                         acc.nan_new, acc.inf_new, acc.dn.scale, acc.dn.ssq, acc.on.scale, acc.on.ssq,
                         acc.sum_od, round_mask, (long long)rw.changed_rows, rw.last_row, first);
}

static PyObject *decode_py(PyObject *self, PyObject *args)
{
    /* decode(kind, buffer) -> list of floats: the tables, for the tests. */
    int kind;
    Py_buffer a;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*:decode", &kind, &a))
        return NULL;
    if (kind < 0 || kind >= K_COUNT || a.len % ITEMSIZE[kind] || a.len / ITEMSIZE[kind] > BLOCK) {
        PyBuffer_Release(&a);
        return PyErr_Format(PyExc_ValueError, "bad kind or length");
    }
    Py_ssize_t n = a.len / ITEMSIZE[kind];
    double out[BLOCK];
    if (kind == K_F16)
        need_f16_table();
    decode(kind, a.buf, n, out);
    PyBuffer_Release(&a);
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(out[i]);
        if (!f) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, f);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS,
     "measure(kind, old, new_or_None, atol, rtol) -> (changed, out_of_tolerance, finite_both, max_abs, "
     "sum_abs, nan_new, inf_new, delta_scale, delta_ssq, old_scale, old_ssq, sum_old_delta, round_mask, "
     "changed_rows, last_row, first_rows); optional row_len, elem_offset, last_row, want_rows, round_mask"},
    {"decode", decode_py, METH_VARARGS, "decode(kind, buffer) -> list of float (at most 1024 elements)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cstats", "Statistics of changed tensor chunks (see ckptdiff.stats).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cstats(void)
{
    build_tables();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *kinds = PyTuple_New(K_COUNT);
    if (!kinds) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *s = PyUnicode_FromString(KIND_NAMES[i]);
        if (!s) {
            Py_DECREF(kinds);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(kinds, i, s);
    }
    if (PyModule_AddObject(m, "KINDS", kinds) < 0) {
        Py_DECREF(kinds);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *rounds = Py_BuildValue("(sssss)", ROUND_NAMES[0], ROUND_NAMES[1], ROUND_NAMES[2], ROUND_NAMES[3],
                                     ROUND_NAMES[4]);
    if (!rounds || PyModule_AddObject(m, "ROUND_NAMES", rounds) < 0) {
        Py_XDECREF(rounds);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
