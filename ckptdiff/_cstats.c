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

/* What measure and measure_row share: the pair measured whole, without the GIL, into
 * acc (zeroed here), round_mask (cut to the kind's candidates) and rw; returns the
 * out_of_tolerance count. b may be NULL (a chunk known to be identical). */
static long long measure_buffers(int kind, const void *a, const void *b, Py_ssize_t nbytes, double atol,
                                 double rtol, acc_t *acc, int *round_mask, rows_t *rw)
{
    memset(acc, 0, sizeof *acc);
    acc->dn.scale = acc->on.scale = 1.0;
    *round_mask &= round_candidates(kind);
    if (kind == K_F16)
        need_f16_table();
    Py_BEGIN_ALLOW_THREADS
    measure_all(kind, a, b, nbytes / ITEMSIZE[kind], atol, rtol, acc, round_mask, rw);
    Py_END_ALLOW_THREADS
    return (atol != 0.0 || rtol != 0.0) ? acc->beyond + acc->moves : acc->changed;
}

/* The first changed rows rw found, as a tuple of int. */
static PyObject *first_rows(const rows_t *rw)
{
    PyObject *first = PyTuple_New(rw->nfirst);
    if (!first)
        return NULL;
    for (int i = 0; i < rw->nfirst; i++) {
        PyObject *v = PyLong_FromLongLong(rw->first_buf[i]);
        if (!v) {
            Py_DECREF(first);
            return NULL;
        }
        PyTuple_SET_ITEM(first, i, v);
    }
    return first;
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
    long long out_of_tol = measure_buffers(kind, a.buf, has_b ? b.buf : NULL, a.len, atol, rtol, &acc,
                                           &round_mask, &rw);
    PyBuffer_Release(&a);
    if (has_b) PyBuffer_Release(&b);
    PyObject *first = first_rows(&rw);
    if (!first)
        return NULL;
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

/* ---- measure and classify in one call: the row of a changed tensor -----
 *
 * configure_causes(fit_cosine, decay_max_c, min_elements, uniform_min,
 *                  step_max_cosine, step_min_changed, decay_component_cosine,
 *                  sparse_max_fraction, sparse_min_rows, reinit_max_cosine,
 *                  reinit_min_rel_l2, running_stat_names)
 *     takes ckptdiff.cause's thresholds (the one place they are written), once.
 *
 * measure_row(kind, old, new, atol, rtol, row_len, round_mask, is_float,
 *             numel, rows, name, want_rows)
 *     -> (changed, out_of_tolerance, nan_new, inf_new, max_abs_delta,
 *         mean_abs_delta, rel_l2, cause, cause_detail) | None
 *
 * What ckptdiff.stats.DeltaStats.of_pair, then ckptdiff.cause.sums_of and
 * classify, give for a changed tensor whose two sides are whole in memory
 * (rows: the first dimension of a tensor of two or more, else -1), as plain
 * values: a changed row of a run of small tensors cost ~9 us of Python in
 * those three steps, and ~1 us here. The arithmetic is cause.classify's,
 * operation for operation (float64, no contraction into fused multiply-adds:
 * -ffp-contract=off), and the evidence is rounded as cause._round does, with
 * CPython's own float formatting and parsing, so the values are equal, not
 * merely close; tests/engine/test_cause_c.py checks that against the Python
 * classifier over crafted and random sums. None means "not handled here" (a
 * name that is not valid UTF-8, a tensor of 2**53 elements or more): the
 * caller then takes the Python path. */

typedef struct { int ok; double v; } opt_t;  /* a float or None */

static struct {
    int ready;
    double fit_cosine, decay_max_c, uniform_min, step_max_cosine, step_min_changed, decay_component_cosine,
        sparse_max_fraction, reinit_max_cosine, reinit_min_rel_l2;
    long long min_elements, sparse_min_rows;
    PyObject *running;  /* tuple of str */
} RULES;

enum {
    S_NAN_INF, S_RUNNING_STATS, S_PRECISION_ROUNDTRIP, S_WEIGHT_DECAY, S_RESCALED, S_SPARSE_ROWS,
    S_REINITIALIZED, S_OPTIMIZER_STEP, S_DENSE_UPDATE,
    S_NAN_NEW, S_INF_NEW, S_BUFFER, S_REL_L2, S_DTYPE, S_MAX_ABS_DELTA, S_C, S_COSINE, S_ROWS, S_OF, S_FIRST,
    S_NEW_NORM_RATIO, S_TYPICAL_ABS_DELTA, S_UNIFORMITY, S_DECAY_C, S_DECAY_SHARE, S_COUNT
};
static const char *const STR_TEXT[S_COUNT] = {
    "nan_inf", "running_stats", "precision_roundtrip", "weight_decay", "rescaled", "sparse_rows",
    "reinitialized", "optimizer_step", "dense_update",
    "nan_new", "inf_new", "buffer", "rel_l2", "dtype", "max_abs_delta", "c", "cosine", "rows", "of", "first",
    "new_norm_ratio", "typical_abs_delta", "uniformity", "decay_c", "decay_share",
};
static PyObject *STR[S_COUNT];
static PyObject *ROUND_STR[R_COUNT];

static PyObject *configure_causes(PyObject *self, PyObject *args)
{
    PyObject *running;
    (void)self;
    if (!PyArg_ParseTuple(args, "ddLdddddLddO!:configure_causes", &RULES.fit_cosine, &RULES.decay_max_c,
                          &RULES.min_elements, &RULES.uniform_min, &RULES.step_max_cosine, &RULES.step_min_changed,
                          &RULES.decay_component_cosine, &RULES.sparse_max_fraction, &RULES.sparse_min_rows,
                          &RULES.reinit_max_cosine, &RULES.reinit_min_rel_l2, &PyTuple_Type, &running))
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(running); i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(running, i)))
            return PyErr_Format(PyExc_TypeError, "running_stat_names must be a tuple of str");
    Py_INCREF(running);
    Py_XSETREF(RULES.running, running);
    RULES.ready = 1;
    Py_RETURN_NONE;
}

static opt_t some(double v) { opt_t o = {1, v}; return o; }
static const opt_t NONE_OPT = {0, 0.0};

/* cause._ratio */
static opt_t ratio(double a, double b)
{
    if (b > 0 && isfinite(a) && isfinite(b))
        return some(a / b);
    return NONE_OPT;
}

/* cause._cos: a cosine from a dot product and two norms (two divisions: a * b may underflow to 0) */
static opt_t cosine(double dot, double a, double b)
{
    if (!(a > 0 && b > 0) || !(isfinite(dot) && isfinite(a) && isfinite(b)))
        return NONE_OPT;
    double v = dot / a / b;
    double lo = v < 1.0 ? v : 1.0;  /* min(1.0, v) */
    return some(lo > -1.0 ? lo : -1.0);  /* max(-1.0, ...) */
}

/* cause._round: to a few significant digits, as float("%.*g" % (digits, x)); None stays None */
static PyObject *rounded(opt_t x, int digits)
{
    if (!x.ok)
        Py_RETURN_NONE;
    if (!isfinite(x.v) || x.v == 0.0)
        return PyFloat_FromDouble(x.v);
    char *s = PyOS_double_to_string(x.v, 'g', digits, 0, NULL);
    if (!s)
        return NULL;
    double v = PyOS_string_to_double(s, NULL, NULL);
    PyMem_Free(s);
    if (v == -1.0 && PyErr_Occurred())
        return NULL;
    return PyFloat_FromDouble(v);
}

/* Set d[key] = value, stealing value; -1 on error (value may be NULL: an error already set). */
static int put(PyObject *d, int key, PyObject *value)
{
    if (!value)
        return -1;
    int r = PyDict_SetItem(d, STR[key], value);
    Py_DECREF(value);
    return r;
}

/* cause.running_stat: name.rsplit(".", 1)[-1].rsplit("/", 1)[-1].split(":")[0], if one of the names */
static PyObject *running_stat(const char *name, Py_ssize_t len)
{
    Py_ssize_t start = 0, end = len;
    for (Py_ssize_t i = len; i > 0; i--)
        if (name[i - 1] == '.') { start = i; break; }
    for (Py_ssize_t i = len; i > start; i--)
        if (name[i - 1] == '/') { start = i; break; }
    for (Py_ssize_t i = start; i < len; i++)
        if (name[i] == ':') { end = i; break; }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(RULES.running); k++) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(RULES.running, k), &n);
        if (!s)
            return NULL;
        if (n == end - start && memcmp(s, name + start, (size_t)n) == 0)
            return PyTuple_GET_ITEM(RULES.running, k);  /* borrowed */
    }
    return Py_None;  /* borrowed */
}

typedef struct {
    int is_float;
    long long numel, changed, nan_new, inf_new, rows, changed_rows;  /* rows: -1 for None */
    double sum_abs, max_abs, delta_norm, old_norm, sum_od;
    int round_mask;
    PyObject *first;  /* tuple of int */
} sums_t;

/* cause.classify: sets *cause (a new reference) and returns the detail dict; NULL on error. */
static PyObject *classify(const sums_t *s, const char *name, Py_ssize_t name_len, PyObject **cause)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    int which;
    if (s->nan_new || s->inf_new) {
        which = S_NAN_INF;
        if (put(d, S_NAN_NEW, PyLong_FromLongLong(s->nan_new)) < 0 ||
            put(d, S_INF_NEW, PyLong_FromLongLong(s->inf_new)) < 0)
            goto fail;
        goto done;
    }
    PyObject *stat = running_stat(name, name_len);
    if (!stat)
        goto fail;
    double old2 = s->old_norm, d2 = s->delta_norm, sod = s->sum_od;
    if (stat != Py_None) {
        which = S_RUNNING_STATS;
        Py_INCREF(stat);
        if (put(d, S_BUFFER, stat) < 0 || put(d, S_REL_L2, rounded(ratio(d2, old2), 6)) < 0)
            goto fail;
        goto done;
    }
    if (s->round_mask && s->changed) {
        int f = 0;
        while (!(s->round_mask & (1 << f)))
            f++;
        which = S_PRECISION_ROUNDTRIP;
        Py_INCREF(ROUND_STR[f]);
        if (put(d, S_DTYPE, ROUND_STR[f]) < 0 || put(d, S_MAX_ABS_DELTA, rounded(some(s->max_abs), 6)) < 0)
            goto fail;
        goto done;
    }
    /* ||new||^2 = ||old||^2 + 2 sum old*delta + ||delta||^2, all from the same sums */
    double new_sq = old2 * old2 + 2 * sod + d2 * d2;
    double tiny = 1e-6 * old2;
    double new_norm = (new_sq > tiny * tiny && isfinite(new_sq)) ? sqrt(new_sq) : 0.0;
    opt_t cos_d = cosine(sod, d2, old2);
    opt_t cos_new = cosine(old2 * old2 + sod, new_norm, old2);
    opt_t rel = ratio(d2, old2);
    int statistical = s->is_float && s->numel >= RULES.min_elements;
    if (statistical && cos_d.ok && fabs(cos_d.v) >= RULES.fit_cosine) {
        double c = sod / old2 / old2;
        if (-RULES.decay_max_c < c && c < 0) {
            which = S_WEIGHT_DECAY;
            if (put(d, S_C, rounded(some(-c), 4)) < 0 || put(d, S_COSINE, rounded(some(-cos_d.v), 6)) < 0 ||
                put(d, S_REL_L2, rounded(rel, 6)) < 0)
                goto fail;
            goto done;
        }
        if (c > 0) {
            which = S_RESCALED;
            if (put(d, S_C, rounded(some(c), 4)) < 0 || put(d, S_COSINE, rounded(cos_d, 6)) < 0 ||
                put(d, S_REL_L2, rounded(rel, 6)) < 0)
                goto fail;
            goto done;
        }
    }
    if (s->rows >= 0 && s->rows >= RULES.sparse_min_rows && 0 < s->changed_rows &&
        (double)s->changed_rows <= RULES.sparse_max_fraction * (double)s->rows) {
        which = S_SPARSE_ROWS;
        PyObject *first = PySequence_List(s->first);
        if (put(d, S_ROWS, PyLong_FromLongLong(s->changed_rows)) < 0 ||
            put(d, S_OF, PyLong_FromLongLong(s->rows)) < 0 || put(d, S_FIRST, first) < 0)
            goto fail;
        goto done;
    }
    if (statistical && old2 > 0 && (new_norm == 0.0 || (cos_new.ok && fabs(cos_new.v) <= RULES.reinit_max_cosine &&
                                                        rel.ok && rel.v >= RULES.reinit_min_rel_l2))) {
        which = S_REINITIALIZED;
        if (put(d, S_COSINE, rounded(new_norm != 0.0 ? cos_new : NONE_OPT, 6)) < 0 ||
            put(d, S_REL_L2, rounded(rel, 6)) < 0 ||
            put(d, S_NEW_NORM_RATIO, rounded(ratio(new_norm, old2), 6)) < 0)
            goto fail;
        goto done;
    }
    opt_t uniformity = NONE_OPT, typical = NONE_OPT;
    long long finite_changed = s->changed - s->nan_new - s->inf_new;
    if (finite_changed > 0 && d2 > 0 && isfinite(s->sum_abs) && isfinite(d2)) {
        double q = s->sum_abs / d2;
        double u = q * q / (double)finite_changed;
        uniformity = some(u < 1.0 ? u : 1.0);
    }
    if (finite_changed > 0)
        typical = some(s->sum_abs / (double)finite_changed);
    if (statistical && uniformity.ok && uniformity.v >= RULES.uniform_min &&
        (!cos_d.ok || fabs(cos_d.v) <= RULES.step_max_cosine) &&
        (double)s->changed >= RULES.step_min_changed * (double)s->numel) {
        which = S_OPTIMIZER_STEP;
        if (put(d, S_TYPICAL_ABS_DELTA, rounded(typical, 6)) < 0 || put(d, S_UNIFORMITY, rounded(uniformity, 6)) < 0)
            goto fail;
        if (cos_d.ok && fabs(cos_d.v) >= RULES.decay_component_cosine) {
            if (put(d, S_DECAY_C, rounded(some(-sod / old2 / old2), 4)) < 0 ||
                put(d, S_DECAY_SHARE, rounded(some(cos_d.v * cos_d.v), 4)) < 0)
                goto fail;
        }
        goto done;
    }
    which = S_DENSE_UPDATE;
    if (put(d, S_COSINE, rounded(cos_d, 6)) < 0 || put(d, S_UNIFORMITY, rounded(uniformity, 6)) < 0 ||
        put(d, S_TYPICAL_ABS_DELTA, rounded(typical, 6)) < 0)
        goto fail;
done:
    Py_INCREF(STR[which]);
    *cause = STR[which];
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *float_or_none(opt_t x)
{
    if (!x.ok)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(x.v);
}

static PyObject *measure_row(PyObject *self, PyObject *args)
{
    int kind, round_mask, is_float;
    Py_buffer a, b;
    double atol, rtol;
    Py_ssize_t row_len;
    long long numel, rows;
    Py_ssize_t want_rows;
    PyObject *name_obj;
    (void)self;
    if (!RULES.ready)
        return PyErr_Format(PyExc_RuntimeError, "configure_causes() was not called");
    if (!PyArg_ParseTuple(args, "iy*y*ddnipLLUn:measure_row", &kind, &a, &b, &atol, &rtol, &row_len,
                          &round_mask, &is_float, &numel, &rows, &name_obj, &want_rows))
        return NULL;
    PyObject *result = NULL, *detail = NULL, *cause = NULL, *first = NULL;
    if (kind < 0 || kind >= K_COUNT || row_len < 0 || want_rows < 0 || want_rows > 64 || a.len != b.len ||
        a.len % ITEMSIZE[kind]) {
        PyErr_SetString(PyExc_ValueError, "bad kind, row arguments or buffers");
        goto out;
    }
    Py_ssize_t name_len;
    const char *name = PyUnicode_AsUTF8AndSize(name_obj, &name_len);
    if (!name) {  /* lone surrogates: the Python path words it */
        PyErr_Clear();
        result = Py_NewRef(Py_None);
        goto out;
    }
    if (numel < 0 || numel >= (1LL << 53)) {  /* counts compared as float64 must be exact */
        result = Py_NewRef(Py_None);
        goto out;
    }
    acc_t acc;
    rows_t rw;
    memset(&rw, 0, sizeof rw);
    rw.row_len = row_len;
    rw.last_row = -1;
    rw.want = want_rows;
    long long out_of_tol = measure_buffers(kind, a.buf, b.buf, a.len, atol, rtol, &acc, &round_mask, &rw);
    first = first_rows(&rw);
    if (!first)
        goto out;
    /* DeltaStats.of_pair, then sums_of: a norm merged into an empty one is itself unless its ssq is 0 */
    norm_t dn = {1.0, 0.0}, on = {1.0, 0.0};
    if (acc.dn.ssq != 0.0) dn = acc.dn;
    if (acc.on.ssq != 0.0) on = acc.on;
    sums_t s;
    s.is_float = is_float;
    s.numel = numel;
    s.changed = acc.changed;
    s.nan_new = acc.nan_new;
    s.inf_new = acc.inf_new;
    s.sum_abs = 0.0 + acc.sum_abs;
    s.max_abs = acc.max_abs > 0.0 ? acc.max_abs : 0.0;
    s.delta_norm = dn.ssq != 0.0 ? dn.scale * sqrt(dn.ssq) : 0.0;
    s.old_norm = on.ssq != 0.0 ? on.scale * sqrt(on.ssq) : 0.0;
    s.sum_od = 0.0 + acc.sum_od;
    s.round_mask = round_mask;
    s.rows = rows;
    s.changed_rows = rw.changed_rows;
    s.first = first;
    detail = classify(&s, name, name_len, &cause);
    if (!detail)
        goto out;
    /* TensorDiff's numbers (engine._with_stats): over the positions finite on both sides, None without any */
    opt_t mx = NONE_OPT, mean = NONE_OPT, rel = NONE_OPT;
    if (acc.finite_both) {
        mx = some(s.max_abs);
        mean = some(s.sum_abs / (double)acc.finite_both);
        /* _Norm.ratio */
        if (on.ssq == 0.0)
            rel = some(dn.ssq == 0.0 ? 0.0 : INFINITY);
        else if (dn.ssq == 0.0)
            rel = some(0.0);
        else
            rel = some((dn.scale / on.scale) * sqrt(dn.ssq / on.ssq));
    }
    result = Py_BuildValue("(LLLLNNNNN)", acc.changed, out_of_tol, acc.nan_new, acc.inf_new, float_or_none(mx),
                           float_or_none(mean), float_or_none(rel), cause, detail);
    cause = detail = NULL;  /* stolen by N */
out:
    Py_XDECREF(cause);
    Py_XDECREF(detail);
    Py_XDECREF(first);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS,
     "measure(kind, old, new_or_None, atol, rtol) -> (changed, out_of_tolerance, finite_both, max_abs, "
     "sum_abs, nan_new, inf_new, delta_scale, delta_ssq, old_scale, old_ssq, sum_old_delta, round_mask, "
     "changed_rows, last_row, first_rows); optional row_len, elem_offset, last_row, want_rows, round_mask"},
    {"decode", decode_py, METH_VARARGS, "decode(kind, buffer) -> list of float (at most 1024 elements)"},
    {"configure_causes", configure_causes, METH_VARARGS,
     "configure_causes(fit_cosine, decay_max_c, min_elements, uniform_min, step_max_cosine, step_min_changed, "
     "decay_component_cosine, sparse_max_fraction, sparse_min_rows, reinit_max_cosine, reinit_min_rel_l2, "
     "running_stat_names): ckptdiff.cause's thresholds, for measure_row"},
    {"measure_row", measure_row, METH_VARARGS,
     "measure_row(kind, old, new, atol, rtol, row_len, round_mask, is_float, numel, rows, name, want_rows) -> "
     "(changed, out_of_tolerance, nan_new, inf_new, max_abs_delta, mean_abs_delta, rel_l2, cause, cause_detail) "
     "or None: a changed tensor measured and classified as ckptdiff.cause.classify does"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cstats", "Statistics of changed tensor chunks (see ckptdiff.stats).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cstats(void)
{
    build_tables();
    for (int i = 0; i < S_COUNT; i++)
        if (!STR[i] && !(STR[i] = PyUnicode_InternFromString(STR_TEXT[i])))
            return NULL;
    for (int i = 0; i < R_COUNT; i++)
        if (!ROUND_STR[i] && !(ROUND_STR[i] = PyUnicode_InternFromString(ROUND_NAMES[i])))
            return NULL;
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
