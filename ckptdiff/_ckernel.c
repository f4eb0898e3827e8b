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
 *               offsets, sizes, hash_max, flags, digests, new_digests
 *               [, identical]) -> int
 *   compare_buffers(buf_a, buf_b, offsets, sizes, hash_max,
 *                   flags, digests, new_digests[, identical]) -> int
 *   SIMD_LEVELS, _set_simd(level) -> int     the BLAKE3 code levels this CPU
 *                                            has; the test hook choosing one
 *
 * compare_run reads span bytes of each file (fd_a from pos_a into buf_a, fd_b
 * from pos_b into buf_b) and then works like compare_buffers. Tensor i is
 * buf[offsets[i] : offsets[i] + sizes[i]] on both sides (offsets and sizes:
 * native int64 arrays of one length n). For each tensor, flags[i] gets
 * FLAG_DIFFERS when its bytes differ and FLAG_HASHED when its size is at most
 * hash_max (and, with identical=0, it differs: a report that lists only the
 * tensors that differ needs no digest of the others); a hashed tensor's
 * old-side digest goes to digests[32 i : 32 i + 32] and, when it differs, its
 * new-side digest to new_digests[32 i : 32 i + 32] (both buffers hold
 * DIGEST_SIZE = 32 bytes per tensor; other bytes are left alone). Both return how many tensors differ; compare_run returns -1
 * instead when a file ends before span bytes were read.
 *
 * BLAKE3 here is written from the specification (default hash mode, 32-byte
 * output), in two forms. The portable one compresses one block at a time.
 * On x86 with GCC or clang, vector code compresses 4 (SSE4.1), 8 (AVX2) or
 * 16 (AVX-512) blocks at once: the chunks of one long input side by side, and, in a run,
 * tensors of equal size side by side, so that even tensors of one chunk or
 * less fill the lanes. The widest code the CPU has is picked when the module
 * loads; SIMD_LEVELS lists the levels it may use ("portable" first) and
 * _set_simd(level) switches between them, for tests and benchmarks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#ifndef _WIN32
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
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
static void blake3_portable(const uint8_t *p, size_t len, uint8_t digest[OUT_LEN])
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
 * BLAKE3 on vectors (x86, GCC or clang)
 *
 * The compression function runs on 4 (SSE4.1) or 8 (AVX2) independent
 * blocks at once: each of the 16 state words becomes a vector whose lane k
 * belongs to block k. Each width provides three primitives on "lane
 * arrays", x[j * W + k] being word j of lane k:
 *
 *   gather(in, off, m)   the 64-byte blocks at in[k] + off, as 16 words of
 *                        W lanes (loaded and transposed)
 *   compress(h, m, ctr, block_len, flags)
 *                        h = the first 8 output words of the compression of
 *                        block m with chaining value h and per-lane counters
 *                        ctr (W low words, then W high words)
 *   blocks(h, in, off, n, ctr, flags, flags_start, flags_end)
 *                        the same for n whole blocks of each input from
 *                        in[k] + off, the state kept in registers; the
 *                        first block adds flags_start, the last flags_end
 *
 * and the algorithms below work for either width:
 *
 * - hash_chunks: one long input, its chunks side by side (lane k hashes
 *   chunk k of a group, carrying its chaining value from block to block).
 *   The tree over the chunks' chaining values is then built level by level:
 *   adjacent pairs become parents, W parents at a time, and an odd last one
 *   moves up unchanged. That is the specification's tree (every left subtree
 *   holds the largest power of two of chunks that leaves something to its
 *   right), because at every level the pairs start at even positions. Long
 *   inputs go in batches of BATCH_CHUNKS chunks, each a whole subtree,
 *   merged on a stack as in blake3_portable.
 *
 * - hash_same_len: up to W inputs of one length, lane k hashing input k.
 *   Every compression of the W trees has the same counter, length and flags,
 *   so all of them, root included, run side by side; this is what makes
 *   short inputs fast, which one at a time have no parallel chunks. The
 *   chaining values stay lane arrays, so a level's pair i is the 16 words
 *   that follow one another at position 2i, a parent block as it is.
 *
 * The width-specific functions are compiled with target attributes, so the
 * module builds with plain x86-64 flags; the widest the CPU has is picked
 * when the module loads.
 */
enum { SIMD_PORTABLE = 0, SIMD_SSE41 = 1, SIMD_AVX2 = 2, SIMD_AVX512 = 3 };
#define MAX_W 16  /* the most lanes */
/* Longest input for hash_same_len (its chaining values stay on the stack);
 * longer ones have enough chunks of their own to fill the lanes. */
#define SAME_MAX_CHUNKS 64

/* CKPTDIFF_NO_SIMD builds the portable code only (to test such builds). */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \
    && !defined(CKPTDIFF_NO_SIMD)
#define HAVE_SIMD 1
#include <immintrin.h>

static const char *const SIMD_NAMES[] = {"portable", "sse4.1", "avx2", "avx512"};

typedef struct {
    int width;
    void (*gather)(const uint8_t *const in[], size_t off, uint32_t *m);
    void (*compress)(uint32_t *h, const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags);
    void (*blocks)(uint32_t *h, const uint8_t *const in[], size_t off, size_t blocks, const uint32_t *ctr,
                   uint32_t flags, uint32_t flags_start, uint32_t flags_end);
} lanes_t;

/* One round on state vectors v[16], message vector j being MSG(j), in the
 * operations ADD, XOR, R16, R12, R8 and R7 (rotations right) that the
 * including function defines for its width. */
#define VG(a, b, c, d, x, y) \
    do { \
        a = ADD(ADD(a, b), x); d = R16(XOR(d, a)); c = ADD(c, d); b = R12(XOR(b, c)); \
        a = ADD(ADD(a, b), y); d = R8(XOR(d, a)); c = ADD(c, d); b = R7(XOR(b, c)); \
    } while (0)
#define VROUND(r) \
    do { \
        const uint8_t *s = SCHEDULE[r]; \
        VG(v[0], v[4], v[8], v[12], MSG(s[0]), MSG(s[1])); \
        VG(v[1], v[5], v[9], v[13], MSG(s[2]), MSG(s[3])); \
        VG(v[2], v[6], v[10], v[14], MSG(s[4]), MSG(s[5])); \
        VG(v[3], v[7], v[11], v[15], MSG(s[6]), MSG(s[7])); \
        VG(v[0], v[5], v[10], v[15], MSG(s[8]), MSG(s[9])); \
        VG(v[1], v[6], v[11], v[12], MSG(s[10]), MSG(s[11])); \
        VG(v[2], v[7], v[8], v[13], MSG(s[12]), MSG(s[13])); \
        VG(v[3], v[4], v[9], v[14], MSG(s[14]), MSG(s[15])); \
    } while (0)
#define VROUNDS() \
    do { \
        VROUND(0); VROUND(1); VROUND(2); VROUND(3); VROUND(4); VROUND(5); VROUND(6); \
    } while (0)

/* --- 4 lanes, SSE4.1 (pshufb is SSSE3) --- */

#define SSE41_FN static inline __attribute__((always_inline, target("sse4.1")))

/* The byte shuffles of the rotations by 16 and 8 (twice, for 32 bytes),
 * loaded at each use: as memory operands they leave every register to the
 * state, which saves a tenth of the time. */
static const uint8_t ROT16_BYTES[32] __attribute__((aligned(32))) = {
    2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
static const uint8_t ROT8_BYTES[32] __attribute__((aligned(32))) = {
    1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12};

/* The pointer passes through an empty asm, so the compiler cannot know the
 * bytes and keep them in a register. */
INLINE const void *opaque(const void *p)
{
    __asm__("" : "+r"(p));
    return p;
}

SSE41_FN __m128i sse_rot16(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_load_si128((const __m128i *)opaque(ROT16_BYTES)));
}

SSE41_FN __m128i sse_rot8(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_load_si128((const __m128i *)opaque(ROT8_BYTES)));
}

SSE41_FN __m128i sse_rot12(__m128i x)
{
    return _mm_or_si128(_mm_srli_epi32(x, 12), _mm_slli_epi32(x, 20));
}

SSE41_FN __m128i sse_rot7(__m128i x)
{
    return _mm_or_si128(_mm_srli_epi32(x, 7), _mm_slli_epi32(x, 25));
}

/* rows r[0..3] (4 words each) become columns: r[j] holds word j of each row */
SSE41_FN void sse_transpose(__m128i r[4])
{
    __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
    __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t2);
    r[1] = _mm_unpackhi_epi64(t0, t2);
    r[2] = _mm_unpacklo_epi64(t1, t3);
    r[3] = _mm_unpackhi_epi64(t1, t3);
}

SSE41_FN void sse_gather(const uint8_t *const in[], size_t off, uint32_t *m)
{
    for (int q = 0; q < 4; q++) {  /* words 4q .. 4q+3 */
        __m128i r[4];
        for (int k = 0; k < 4; k++)
            r[k] = _mm_loadu_si128((const __m128i *)(in[k] + off + 16 * q));
        sse_transpose(r);
        for (int j = 0; j < 4; j++)
            _mm_storeu_si128((__m128i *)(m + 4 * (4 * q + j)), r[j]);
    }
}

/* h = the compression of block m (a lane array) with chaining values h */
SSE41_FN void sse_block(__m128i h[8], const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags)
{
#define ADD _mm_add_epi32
#define XOR _mm_xor_si128
#define R16 sse_rot16
#define R12 sse_rot12
#define R8 sse_rot8
#define R7 sse_rot7
#define MSG(j) _mm_loadu_si128((const __m128i *)(m + 4 * (j)))
    __m128i v[16];
    for (int i = 0; i < 8; i++)
        v[i] = h[i];
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm_set1_epi32((int)IV[i]);
    v[12] = _mm_loadu_si128((const __m128i *)ctr);
    v[13] = _mm_loadu_si128((const __m128i *)(ctr + 4));
    v[14] = _mm_set1_epi32((int)block_len);
    v[15] = _mm_set1_epi32((int)flags);
    VROUNDS();
    for (int i = 0; i < 8; i++)
        h[i] = XOR(v[i], v[i + 8]);
#undef ADD
#undef XOR
#undef R16
#undef R12
#undef R8
#undef R7
#undef MSG
}

__attribute__((target("sse4.1")))
static void gather4(const uint8_t *const in[], size_t off, uint32_t *m)
{
    sse_gather(in, off, m);
}

__attribute__((target("sse4.1")))
static void compress4(uint32_t *h, const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags)
{
    __m128i v[8];
    for (int i = 0; i < 8; i++)
        v[i] = _mm_loadu_si128((const __m128i *)(h + 4 * i));
    sse_block(v, m, ctr, block_len, flags);
    for (int i = 0; i < 8; i++)
        _mm_storeu_si128((__m128i *)(h + 4 * i), v[i]);
}

__attribute__((target("sse4.1")))
static void blocks4(uint32_t *h, const uint8_t *const in[], size_t off, size_t blocks, const uint32_t *ctr,
                    uint32_t flags, uint32_t flags_start, uint32_t flags_end)
{
    __m128i v[8];
    uint32_t m[16 * 4];
    for (int i = 0; i < 8; i++)
        v[i] = _mm_loadu_si128((const __m128i *)(h + 4 * i));
    uint32_t f = flags | flags_start;
    for (size_t b = 0; b < blocks; b++) {
        if (b + 1 == blocks)
            f |= flags_end;
        sse_gather(in, off + BLOCK_LEN * b, m);
        sse_block(v, m, ctr, BLOCK_LEN, f);
        f = flags;
    }
    for (int i = 0; i < 8; i++)
        _mm_storeu_si128((__m128i *)(h + 4 * i), v[i]);
}

/* --- 8 lanes, AVX2 --- */

#define AVX2_FN static inline __attribute__((always_inline, target("avx2")))

AVX2_FN __m256i avx_rot16(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_load_si256((const __m256i *)opaque(ROT16_BYTES)));
}

AVX2_FN __m256i avx_rot8(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_load_si256((const __m256i *)opaque(ROT8_BYTES)));
}

AVX2_FN __m256i avx_rot12(__m256i x)
{
    return _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20));
}

AVX2_FN __m256i avx_rot7(__m256i x)
{
    return _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25));
}

/* rows r[0..7] (8 words each) become columns: r[j] holds word j of each row */
AVX2_FN void avx_transpose(__m256i r[8])
{
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {  /* rows 2i, 2i+1 interleaved: words 0 1 | 4 5, then 2 3 | 6 7 */
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {  /* rows 4i .. 4i+3: word j | word j + 4 */
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}

AVX2_FN void avx_gather(const uint8_t *const in[], size_t off, uint32_t *m)
{
    for (int q = 0; q < 2; q++) {  /* words 8q .. 8q+7 */
        __m256i r[8];
        for (int k = 0; k < 8; k++)
            r[k] = _mm256_loadu_si256((const __m256i *)(in[k] + off + 32 * q));
        avx_transpose(r);
        for (int j = 0; j < 8; j++)
            _mm256_storeu_si256((__m256i *)(m + 8 * (8 * q + j)), r[j]);
    }
}

/* h = the compression of block m (a lane array) with chaining values h */
AVX2_FN void avx_block(__m256i h[8], const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags)
{
#define ADD _mm256_add_epi32
#define XOR _mm256_xor_si256
#define R16 avx_rot16
#define R12 avx_rot12
#define R8 avx_rot8
#define R7 avx_rot7
#define MSG(j) _mm256_loadu_si256((const __m256i *)(m + 8 * (j)))
    __m256i v[16];
    for (int i = 0; i < 8; i++)
        v[i] = h[i];
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm256_set1_epi32((int)IV[i]);
    v[12] = _mm256_loadu_si256((const __m256i *)ctr);
    v[13] = _mm256_loadu_si256((const __m256i *)(ctr + 8));
    v[14] = _mm256_set1_epi32((int)block_len);
    v[15] = _mm256_set1_epi32((int)flags);
    VROUNDS();
    for (int i = 0; i < 8; i++)
        h[i] = XOR(v[i], v[i + 8]);
#undef ADD
#undef XOR
#undef R16
#undef R12
#undef R8
#undef R7
#undef MSG
}

__attribute__((target("avx2")))
static void gather8(const uint8_t *const in[], size_t off, uint32_t *m)
{
    avx_gather(in, off, m);
}

__attribute__((target("avx2")))
static void compress8(uint32_t *h, const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags)
{
    __m256i v[8];
    for (int i = 0; i < 8; i++)
        v[i] = _mm256_loadu_si256((const __m256i *)(h + 8 * i));
    avx_block(v, m, ctr, block_len, flags);
    for (int i = 0; i < 8; i++)
        _mm256_storeu_si256((__m256i *)(h + 8 * i), v[i]);
}

__attribute__((target("avx2")))
static void blocks8(uint32_t *h, const uint8_t *const in[], size_t off, size_t blocks, const uint32_t *ctr,
                    uint32_t flags, uint32_t flags_start, uint32_t flags_end)
{
    __m256i v[8];
    uint32_t m[16 * 8];
    for (int i = 0; i < 8; i++)
        v[i] = _mm256_loadu_si256((const __m256i *)(h + 8 * i));
    uint32_t f = flags | flags_start;
    for (size_t b = 0; b < blocks; b++) {
        if (b + 1 == blocks)
            f |= flags_end;
        avx_gather(in, off + BLOCK_LEN * b, m);
        avx_block(v, m, ctr, BLOCK_LEN, f);
        f = flags;
    }
    for (int i = 0; i < 8; i++)
        _mm256_storeu_si256((__m256i *)(h + 8 * i), v[i]);
}

/* --- 16 lanes, AVX-512 (F only: 32-bit adds, xors and rotations, and the shuffles of the transpose) --- */

#define AVX512_FN static inline __attribute__((always_inline, target("avx512f")))

/* 16 rows of 16 words become columns: r[j] holds word j of each row. Within
 * each 128-bit lane the 4 x 4 blocks are transposed as in sse_transpose; then
 * the lanes move between registers, two shuffles per output. */
AVX512_FN void avx512_transpose(__m512i r[16])
{
    __m512i x[16];
    for (int g = 0; g < 4; g++) {  /* rows 4g .. 4g+3: x[4g + q] lane L holds word 4L + q of the four rows */
        __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
        __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
        __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
        __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
        x[4 * g] = _mm512_unpacklo_epi64(t0, t2);
        x[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
        x[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
        x[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    for (int q = 0; q < 4; q++) {
        /* lanes 0 1 of groups 0 and 1 (then 2 and 3), and lanes 2 3 of each */
        __m512i lo01 = _mm512_shuffle_i32x4(x[q], x[4 + q], 0x44), hi01 = _mm512_shuffle_i32x4(x[q], x[4 + q], 0xEE);
        __m512i lo23 = _mm512_shuffle_i32x4(x[8 + q], x[12 + q], 0x44);
        __m512i hi23 = _mm512_shuffle_i32x4(x[8 + q], x[12 + q], 0xEE);
        r[q] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);       /* word q: lane 0 of groups 0, 1, 2, 3 */
        r[4 + q] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);   /* word 4 + q: lane 1 */
        r[8 + q] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);   /* word 8 + q: lane 2 */
        r[12 + q] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);  /* word 12 + q: lane 3 */
    }
}

AVX512_FN void avx512_gather(const uint8_t *const in[], size_t off, uint32_t *m)
{
    __m512i r[16];
    for (int k = 0; k < 16; k++)
        r[k] = _mm512_loadu_si512((const void *)(in[k] + off));
    avx512_transpose(r);
    for (int j = 0; j < 16; j++)
        _mm512_storeu_si512((void *)(m + 16 * j), r[j]);
}

AVX512_FN void avx512_block(__m512i h[8], const uint32_t *m, const uint32_t *ctr, uint32_t block_len,
                            uint32_t flags)
{
#define ADD _mm512_add_epi32
#define XOR _mm512_xor_si512
#define R16(x) _mm512_ror_epi32(x, 16)
#define R12(x) _mm512_ror_epi32(x, 12)
#define R8(x) _mm512_ror_epi32(x, 8)
#define R7(x) _mm512_ror_epi32(x, 7)
#define MSG(j) _mm512_loadu_si512((const void *)(m + 16 * (j)))
    __m512i v[16];
    for (int i = 0; i < 8; i++)
        v[i] = h[i];
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm512_set1_epi32((int)IV[i]);
    v[12] = _mm512_loadu_si512((const void *)ctr);
    v[13] = _mm512_loadu_si512((const void *)(ctr + 16));
    v[14] = _mm512_set1_epi32((int)block_len);
    v[15] = _mm512_set1_epi32((int)flags);
    VROUNDS();
    for (int i = 0; i < 8; i++)
        h[i] = XOR(v[i], v[i + 8]);
#undef ADD
#undef XOR
#undef R16
#undef R12
#undef R8
#undef R7
#undef MSG
}

__attribute__((target("avx512f")))
static void gather16(const uint8_t *const in[], size_t off, uint32_t *m)
{
    avx512_gather(in, off, m);
}

__attribute__((target("avx512f")))
static void compress16(uint32_t *h, const uint32_t *m, const uint32_t *ctr, uint32_t block_len, uint32_t flags)
{
    __m512i v[8];
    for (int i = 0; i < 8; i++)
        v[i] = _mm512_loadu_si512((const void *)(h + 16 * i));
    avx512_block(v, m, ctr, block_len, flags);
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512((void *)(h + 16 * i), v[i]);
}

__attribute__((target("avx512f")))
static void blocks16(uint32_t *h, const uint8_t *const in[], size_t off, size_t blocks, const uint32_t *ctr,
                     uint32_t flags, uint32_t flags_start, uint32_t flags_end)
{
    __m512i v[8];
    uint32_t m[16 * 16];
    for (int i = 0; i < 8; i++)
        v[i] = _mm512_loadu_si512((const void *)(h + 16 * i));
    uint32_t f = flags | flags_start;
    for (size_t b = 0; b < blocks; b++) {
        if (b + 1 == blocks)
            f |= flags_end;
        avx512_gather(in, off + BLOCK_LEN * b, m);
        avx512_block(v, m, ctr, BLOCK_LEN, f);
        f = flags;
    }
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512((void *)(h + 16 * i), v[i]);
}

static const lanes_t LANES4 = {4, gather4, compress4, blocks4};
static const lanes_t LANES8 = {8, gather8, compress8, blocks8};
static const lanes_t LANES16 = {16, gather16, compress16, blocks16};

/* The lanes for n inputs at a level: the widest the level has, but no wider
 * than the next that more than half fills (16 only for more than 8, 8 for
 * more than 4). */
INLINE const lanes_t *lanes_for(int level, size_t n)
{
    if (level >= SIMD_AVX512 && n > 8)
        return &LANES16;
    return level >= SIMD_AVX2 && n > 4 ? &LANES8 : &LANES4;
}

/* --- the algorithms, for either width --- */

static void lanes_iv(int w, uint32_t *h)
{
    for (int j = 0; j < 8; j++)
        for (int k = 0; k < w; k++)
            h[j * w + k] = IV[j];
}

/* Per-lane counters: counter + k when step is 1 (chunks of one input),
 * counter itself when step is 0. */
static void lanes_counter(int w, uint64_t counter, int step, uint32_t *ctr)
{
    for (int k = 0; k < w; k++) {
        uint64_t c = counter + (uint64_t)(step ? k : 0);
        ctr[k] = (uint32_t)c;
        ctr[w + k] = (uint32_t)(c >> 32);
    }
}

/* The chaining values of the first `count` of the inputs in[0 .. width),
 * each `blocks` whole blocks, to out[0 .. count); the first block adds
 * flags_start to flags and the last flags_end. Every input is read before out
 * is written, so out may overlap them (the parent levels work in place). */
static void lanes_cvs(const lanes_t *L, const uint8_t *const in[], size_t blocks, uint64_t counter, int step,
                      uint32_t flags, uint32_t flags_start, uint32_t flags_end, size_t count, uint32_t (*out)[8])
{
    const int w = L->width;
    uint32_t h[8 * MAX_W], ctr[2 * MAX_W];
    lanes_iv(w, h);
    lanes_counter(w, counter, step, ctr);
    L->blocks(h, in, 0, blocks, ctr, flags, flags_start, flags_end);
    for (size_t k = 0; k < count; k++)
        for (int j = 0; j < 8; j++)
            out[k][j] = h[j * w + (int)k];
}

/* One input on the portable compression function, as lanes_cvs. */
static void one_cv(const uint8_t *p, size_t blocks, uint64_t counter, uint32_t flags, uint32_t flags_start,
                   uint32_t flags_end, uint32_t out[8])
{
    uint32_t cv[8], m[16];
    memcpy(cv, IV, sizeof cv);
    uint32_t f = flags | flags_start;
    for (size_t b = 0; b < blocks; b++) {
        if (b + 1 == blocks)
            f |= flags_end;
        load_block(p + BLOCK_LEN * b, m);
        compress(cv, m, counter, BLOCK_LEN, f, cv);
        f = flags;
    }
    memcpy(out, cv, sizeof cv);
}

/* The chaining values of n inputs of `blocks` whole blocks each, input i at
 * p + i * stride, to out[0 .. n): in groups of the widest lanes that fill
 * more than half (a part-filled group repeats its last input); a single
 * input on the portable code, cheaper than 4 lanes for one. */
static void cvs_many(int level, const uint8_t *p, size_t stride, size_t n, size_t blocks, uint64_t counter,
                     int step, uint32_t flags, uint32_t flags_start, uint32_t flags_end, uint32_t (*out)[8])
{
    while (n > 0) {
        if (n == 1) {
            one_cv(p, blocks, counter, flags, flags_start, flags_end, out[0]);
            return;
        }
        const lanes_t *L = lanes_for(level, n);
        size_t w = (size_t)L->width, k = n < w ? n : w;
        const uint8_t *in[MAX_W];
        for (size_t i = 0; i < w; i++)
            in[i] = p + (i < k ? i : k - 1) * stride;
        lanes_cvs(L, in, blocks, counter, step, flags, flags_start, flags_end, k, out);
        p += k * stride;
        n -= k;
        out += k;
        if (step)
            counter += k;
    }
}

/* Merges n chaining values level by level, in place, until `until` (1 or 2)
 * are left. */
static void reduce_levels(int level, uint32_t (*cv)[8], size_t n, size_t until)
{
    while (n > until) {
        size_t pairs = n / 2;
        /* Pair i is the 64 bytes of cv[2i] and cv[2i+1] (little-endian words on x86). */
        cvs_many(level, (const uint8_t *)cv, 2 * sizeof cv[0], pairs, 1, 0, 0, PARENT, 0, 0, cv);
        if (n & 1)
            memcpy(cv[pairs], cv[n - 1], sizeof cv[0]);
        n = pairs + (n & 1);
    }
}

#define BATCH_CHUNKS 256

/* BLAKE3 of one input of more than one chunk, its chunks side by side. */
static void hash_chunks(int level, const uint8_t *p, size_t len, uint8_t digest[OUT_LEN])
{
    uint32_t stack[64][8], cv[BATCH_CHUNKS][8];
    int depth = 0;
    uint64_t chunk = 0;
    node_t node;
    /* Whole batches, each a subtree, while something follows them. */
    while (len > (size_t)BATCH_CHUNKS * CHUNK_LEN) {
        cvs_many(level, p, CHUNK_LEN, BATCH_CHUNKS, CHUNK_LEN / BLOCK_LEN, chunk, 1, 0, CHUNK_START, CHUNK_END, cv);
        reduce_levels(level, cv, BATCH_CHUNKS, 1);
        chunk += BATCH_CHUNKS;
        for (uint64_t t = chunk / BATCH_CHUNKS; (t & 1) == 0; t >>= 1) {
            parent_node(stack[--depth], cv[0], &node);
            node_cv(&node, cv[0]);
        }
        memcpy(stack[depth++], cv[0], sizeof cv[0]);
        p += (size_t)BATCH_CHUNKS * CHUNK_LEN;
        len -= (size_t)BATCH_CHUNKS * CHUNK_LEN;
    }
    /* The last batch: 1 to BATCH_CHUNKS chunks, the last one possibly partial;
     * its top node is held back for the merges with the stack. */
    size_t whole = len / CHUNK_LEN, rest = len % CHUNK_LEN;
    if (whole + (rest > 0) == 1) {
        chunk_node(p, len, chunk, &node);
    } else {
        cvs_many(level, p, CHUNK_LEN, whole, CHUNK_LEN / BLOCK_LEN, chunk, 1, 0, CHUNK_START, CHUNK_END, cv);
        size_t n = whole;
        if (rest) {
            chunk_node(p + whole * CHUNK_LEN, rest, chunk + whole, &node);
            node_cv(&node, cv[n++]);
        }
        reduce_levels(level, cv, n, 2);
        parent_node(cv[0], cv[1], &node);
    }
    uint32_t top[8];
    while (depth > 0) {
        node_cv(&node, top);
        parent_node(stack[--depth], top, &node);
    }
    compress(node.cv, node.m, 0, node.block_len, node.flags | ROOT, top);
    for (int i = 0; i < 8; i++)
        store_le32(digest + 4 * i, top[i]);
}

/*
 * BLAKE3 of the inputs p[0 .. width), all len bytes (at most
 * SAME_MAX_CHUNKS chunks), side by side; the digests of the first count go
 * to out[0 .. count).
 */
static void hash_same_len(const lanes_t *L, const uint8_t *const p[], size_t len, uint8_t *const out[], size_t count)
{
    const int w = L->width;
    const size_t cv_words = 8 * (size_t)w;  /* one chaining value per lane */
    uint32_t cvs[SAME_MAX_CHUNKS * 8 * MAX_W], h[8 * MAX_W], m[16 * MAX_W], ctr[2 * MAX_W];
    uint8_t pad[MAX_W][BLOCK_LEN];
    const uint8_t *in[MAX_W];
    size_t chunks = len ? (len + CHUNK_LEN - 1) / CHUNK_LEN : 1;
    for (size_t c = 0; c < chunks; c++) {
        size_t start = c * CHUNK_LEN, chunk_len = len - start < CHUNK_LEN ? len - start : CHUNK_LEN;
        size_t blocks = chunk_len ? (chunk_len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
        size_t last_len = chunk_len - BLOCK_LEN * (blocks - 1);  /* 0 to 64 */
        uint32_t end = CHUNK_END | (chunks == 1 ? ROOT : 0);
        lanes_iv(w, h);
        lanes_counter(w, c, 0, ctr);
        if (last_len == BLOCK_LEN) {
            L->blocks(h, p, start, blocks, ctr, 0, CHUNK_START, end);
        } else {  /* the whole blocks, then the last one padded with zeros */
            if (blocks > 1)
                L->blocks(h, p, start, blocks - 1, ctr, 0, CHUNK_START, 0);
            size_t off = start + BLOCK_LEN * (blocks - 1);
            for (int k = 0; k < w; k++) {
                memset(pad[k], 0, BLOCK_LEN);
                if (last_len)
                    memcpy(pad[k], p[k] + off, last_len);
                in[k] = pad[k];
            }
            L->gather(in, 0, m);
            L->compress(h, m, ctr, (uint32_t)last_len, end | (blocks == 1 ? CHUNK_START : 0));
        }
        memcpy(cvs + c * cv_words, h, cv_words * sizeof h[0]);
    }
    /* Levels of parents; the one parent of the last level is the root. */
    lanes_counter(w, 0, 0, ctr);
    for (size_t n = chunks; n > 1;) {
        size_t pairs = n / 2;
        for (size_t i = 0; i < pairs; i++) {
            lanes_iv(w, h);
            L->compress(h, cvs + 2 * i * cv_words, ctr, BLOCK_LEN, PARENT | (n == 2 ? ROOT : 0));
            memcpy(cvs + i * cv_words, h, cv_words * sizeof h[0]);
        }
        if (n & 1)
            memcpy(cvs + pairs * cv_words, cvs + (n - 1) * cv_words, cv_words * sizeof h[0]);
        n = pairs + (n & 1);
    }
    for (size_t k = 0; k < count; k++)
        for (int j = 0; j < 8; j++)
            store_le32(out[k] + 4 * j, h[j * w + (int)k]);
}

static int simd_best = SIMD_PORTABLE, simd_level = SIMD_PORTABLE;

static void simd_detect(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))  /* CPU and OS: libgcc checks the zmm state is enabled */
        simd_best = SIMD_AVX512;
    else if (__builtin_cpu_supports("avx2"))
        simd_best = SIMD_AVX2;
    else if (__builtin_cpu_supports("sse4.1"))
        simd_best = SIMD_SSE41;
    simd_level = simd_best;
}
#else
static const char *const SIMD_NAMES[] = {"portable"};
static int simd_best = 0, simd_level = 0;

static void simd_detect(void)
{
}
#endif

/* BLAKE3 of one input with the code of the given level: one chunk or less
 * gains nothing from the lanes (its blocks depend on each other). */
static void blake3_at(int level, const uint8_t *p, size_t len, uint8_t digest[OUT_LEN])
{
#ifdef HAVE_SIMD
    if (level != SIMD_PORTABLE && len > CHUNK_LEN) {
        hash_chunks(level, p, len, digest);
        return;
    }
#endif
    (void)level;
    blake3_portable(p, len, digest);
}

/*
 * Inputs waiting to be hashed side by side: groups of one length, hashed by
 * hash_same_len when a group fills the lanes, when a group of a new length
 * needs its place, or at the end. Inputs of more than SAME_MAX_CHUNKS chunks,
 * or any when the level is portable, are hashed at once.
 */
#define OPEN_GROUPS 8

typedef struct {
    size_t len, n;
    const uint8_t *p[MAX_W];
    uint8_t *out[MAX_W];
} group_t;

typedef struct {
    int level, width;
    int open;
    group_t g[OPEN_GROUPS];
} batch_t;

static void batch_init(batch_t *bt)
{
    bt->level = simd_level;
    bt->width = bt->level >= SIMD_AVX512 ? 16 : bt->level == SIMD_AVX2 ? 8 : bt->level == SIMD_SSE41 ? 4 : 1;
    bt->open = 0;
}

static void hash_group(const batch_t *bt, group_t *g)
{
#ifdef HAVE_SIMD
    /* A part-filled group whose inputs have more whole chunks each than
     * there are inputs goes one input at a time, its chunks side by side
     * (measured with AVX2: 2 inputs of 51 KiB hashed at 1.0 GB/s in 4 lanes,
     * two of them idle, and at 3.2 GB/s one by one in 8 lanes; 2 inputs of
     * 2 KiB are a little faster side by side). */
    if (g->n > 1 && g->n < (size_t)bt->width && g->len / CHUNK_LEN > g->n) {
        for (size_t k = 0; k < g->n; k++)
            blake3_at(bt->level, g->p[k], g->len, g->out[k]);
        return;
    }
    if (g->n > 1) {
        const lanes_t *L = lanes_for(bt->level, g->n);
        const uint8_t *in[MAX_W];
        for (size_t k = 0; k < (size_t)L->width; k++)
            in[k] = g->p[k < g->n ? k : 0];
        hash_same_len(L, in, g->len, g->out, g->n);
        return;
    }
#endif
    blake3_at(bt->level, g->p[0], g->len, g->out[0]);
}

/* Closes open group i: hashes it and moves the later ones down. */
static void batch_close(batch_t *bt, int i)
{
    hash_group(bt, &bt->g[i]);
    bt->open--;
    memmove(&bt->g[i], &bt->g[i + 1], (size_t)(bt->open - i) * sizeof bt->g[0]);
}

static void batch_add(batch_t *bt, const uint8_t *p, size_t len, uint8_t *out)
{
    if (bt->width == 1 || len > (size_t)SAME_MAX_CHUNKS * CHUNK_LEN) {
        blake3_at(bt->level, p, len, out);
        return;
    }
    int i = 0;
    while (i < bt->open && bt->g[i].len != len)
        i++;
    if (i == bt->open) {
        if (bt->open == OPEN_GROUPS) {
            batch_close(bt, 0);
            i--;
        }
        bt->g[i].len = len;
        bt->g[i].n = 0;
        bt->open++;
    }
    group_t *g = &bt->g[i];
    g->p[g->n] = p;
    g->out[g->n] = out;
    if (++g->n == (size_t)bt->width)
        batch_close(bt, i);
}

static void batch_finish(batch_t *bt)
{
    while (bt->open > 0)
        batch_close(bt, bt->open - 1);
}

static void blake3_hash(const uint8_t *p, size_t len, uint8_t digest[OUT_LEN])
{
    blake3_at(simd_level, p, len, digest);
}

/* ------------------------------------------------------------------------
 * The run kernel
 */

enum { FLAG_DIFFERS = 1, FLAG_HASHED = 2 };

/* native int64 without alignment: offsets may come from any bytes-like object */
INLINE int64_t load_i64(const uint8_t *p, Py_ssize_t i)
{
    int64_t v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

typedef struct {
    Py_buffer a, b, offsets, sizes, flags, digests, new_digests;
    int held;  /* how many of the above are held, in that order */
    Py_ssize_t n;
} args_t;

static void release_args(args_t *x)
{
    Py_buffer *all[7] = {&x->a, &x->b, &x->offsets, &x->sizes, &x->flags, &x->digests, &x->new_digests};
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

/* Takes the seven buffers and checks their sizes; on failure sets an
 * exception and releases what it took. */
static int take_args(args_t *x, PyObject *a, PyObject *b, int writable_ab, PyObject *offsets, PyObject *sizes,
                     PyObject *flags, PyObject *digests, PyObject *new_digests)
{
    x->held = 0;
    if (get_buffer(a, &x->a, writable_ab, "buf_a", x) < 0 || get_buffer(b, &x->b, writable_ab, "buf_b", x) < 0
        || get_buffer(offsets, &x->offsets, 0, "offsets", x) < 0 || get_buffer(sizes, &x->sizes, 0, "sizes", x) < 0
        || get_buffer(flags, &x->flags, 1, "flags", x) < 0 || get_buffer(digests, &x->digests, 1, "digests", x) < 0
        || get_buffer(new_digests, &x->new_digests, 1, "new_digests", x) < 0)
        goto fail;
    if (x->offsets.len % 8 || x->sizes.len != x->offsets.len) {
        PyErr_Format(PyExc_ValueError, "offsets and sizes must be int64 arrays of one length (%zd and %zd bytes)",
                     x->offsets.len, x->sizes.len);
        goto fail;
    }
    x->n = x->offsets.len / 8;
    /* n <= len / 8, so n * OUT_LEN could overflow: divide instead */
    if (x->flags.len < x->n || x->digests.len / OUT_LEN < x->n || x->new_digests.len / OUT_LEN < x->n) {
        PyErr_Format(PyExc_ValueError, "%zd tensors need %zd bytes of flags and %d per tensor of digests and of "
                     "new_digests (got %zd, %zd and %zd)", x->n, x->n, OUT_LEN, x->flags.len, x->digests.len,
                     x->new_digests.len);
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
                              Py_ssize_t hash_max, int identical)
{
    const uint8_t *po = x->offsets.buf, *ps = x->sizes.buf;
    uint8_t *flags = x->flags.buf, *digests = x->digests.buf, *new_digests = x->new_digests.buf;
    /* Runs of frozen tensors are the usual case: one memcmp settles them all. */
    int whole_same = span == 0 || memcmp(a, b, (size_t)span) == 0;
    Py_ssize_t differ = 0;
    batch_t bt;
    batch_init(&bt);
    for (Py_ssize_t i = 0; i < x->n; i++) {
        int64_t off = load_i64(po, i), size = load_i64(ps, i);
        if (!tensor_ok(off, size, span))
            return -2;
        int f = !whole_same && size > 0 && memcmp(a + off, b + off, (size_t)size) != 0;
        if (size <= hash_max && (f || identical)) {
            batch_add(&bt, a + off, (size_t)size, digests + (size_t)i * OUT_LEN);
            if (f)
                batch_add(&bt, b + off, (size_t)size, new_digests + (size_t)i * OUT_LEN);
            f |= FLAG_HASHED;
        }
        flags[i] = (uint8_t)f;
        differ += f & FLAG_DIFFERS;
    }
    batch_finish(&bt);
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
    int identical = 1;
    PyObject *oa, *ob, *ooff, *osz, *ofl, *odg, *onew;
    args_t x;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLiLnOOOOnOOO|p:compare_run", &fd_a, &pos_a, &fd_b, &pos_b, &span, &oa, &ob,
                          &ooff, &osz, &hash_max, &ofl, &odg, &onew, &identical))
        return NULL;
    if (span < 0 || pos_a < 0 || pos_b < 0 || pos_a > LLONG_MAX - span || pos_b > LLONG_MAX - span
        || (sizeof(off_t) < 8 && (pos_a > LONG_MAX - span || pos_b > LONG_MAX - span)))
        return PyErr_Format(PyExc_ValueError, "bad positions or span (%lld, %lld, %zd)", pos_a, pos_b, span);
    if (take_args(&x, oa, ob, 1, ooff, osz, ofl, odg, onew) < 0)
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
    r = got == 1 ? run_tensors(x.a.buf, x.b.buf, span, &x, hash_max, identical) : -1;
    Py_END_ALLOW_THREADS
    release_args(&x);
    if (got < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return run_result(r);
}
#endif

/* Bytes start..start+n of two buffers are equal: memcmp, without the GIL for big ranges. */
static PyObject *equal(PyObject *self, PyObject *args)
{
    PyObject *oa, *ob;
    Py_ssize_t start, n;
    Py_buffer a, b;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnn:equal", &oa, &ob, &start, &n))
        return NULL;
    if (PyObject_GetBuffer(oa, &a, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(ob, &b, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    int same = -1;
    if (start < 0 || n < 0 || start > a.len || n > a.len - start || start > b.len || n > b.len - start) {
        PyErr_Format(PyExc_ValueError, "bytes %zd..%zd are not inside buffers of %zd and %zd bytes", start,
                     start + (n > 0 ? n : 0), a.len, b.len);
    } else if (n >= (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        same = memcmp((const char *)a.buf + start, (const char *)b.buf + start, (size_t)n) == 0;
        Py_END_ALLOW_THREADS
    } else {
        same = n == 0 || memcmp((const char *)a.buf + start, (const char *)b.buf + start, (size_t)n) == 0;
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    if (same < 0)
        return NULL;
    return PyBool_FromLong(same);
}

static PyObject *compare_buffers(PyObject *self, PyObject *args)
{
    Py_ssize_t hash_max;
    int identical = 1;
    PyObject *oa, *ob, *ooff, *osz, *ofl, *odg, *onew;
    args_t x;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnOOO|p:compare_buffers", &oa, &ob, &ooff, &osz, &hash_max, &ofl, &odg, &onew,
                          &identical))
        return NULL;
    if (take_args(&x, oa, ob, 0, ooff, osz, ofl, odg, onew) < 0)
        return NULL;
    Py_ssize_t span = x.a.len < x.b.len ? x.a.len : x.b.len;
    if (check_tensors(&x, span) < 0) {
        release_args(&x);
        return NULL;
    }
    Py_ssize_t r;
    Py_BEGIN_ALLOW_THREADS
    r = run_tensors(x.a.buf, x.b.buf, span, &x, hash_max, identical);
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

static PyObject *set_simd(PyObject *self, PyObject *arg)
{
    (void)self;
    long level = PyLong_AsLong(arg);
    if (level == -1 && PyErr_Occurred())
        return NULL;
    if (level < 0 || level > simd_best)
        return PyErr_Format(PyExc_ValueError, "level %ld is not in SIMD_LEVELS (0 to %d)", level, simd_best);
    int previous = simd_level;
    simd_level = (int)level;
    return PyLong_FromLong(previous);
}

/* glibc raises its mmap threshold to the size of each mapped block freed (up
 * to 32 MiB), after which every block under it comes from the heap, and the
 * heap keeps what is freed at its top until twice that much is free: a
 * 200,000-tensor diff peaked 11 MB higher that way. Fixing the threshold at
 * its initial 128 KiB turns the adjustment off. A process-wide setting: the
 * CLI makes it, the library does not. */
static PyObject *fix_mmap_threshold(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
#if defined(__GLIBC__) && defined(M_MMAP_THRESHOLD)
    return PyBool_FromLong(mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"fix_mmap_threshold", fix_mmap_threshold, METH_NOARGS,
     "fix_mmap_threshold() -> bool: fix glibc's mmap threshold at 128 KiB (no dynamic rise); False elsewhere"},
    {"blake3", blake3_py, METH_O, "blake3(buffer) -> bytes: the 32-byte BLAKE3 digest"},
    {"equal", equal, METH_VARARGS,
     "equal(buf_a, buf_b, start, n) -> bool: bytes start..start+n of the two buffers are equal (memcmp)"},
#ifdef HAVE_PREAD
    {"compare_run", compare_run, METH_VARARGS,
     "compare_run(fd_a, pos_a, fd_b, pos_b, span, buf_a, buf_b, offsets, sizes, hash_max, flags, digests, "
     "new_digests[, identical]) -> int: read span bytes of each file into buf_a/buf_b, then compare_buffers; -1 "
     "when a file ends first"},
#endif
    {"compare_buffers", compare_buffers, METH_VARARGS,
     "compare_buffers(buf_a, buf_b, offsets, sizes, hash_max, flags, digests, new_digests[, identical]) -> int: "
     "for each tensor i (int64 offsets[i], sizes[i]), flags[i] = FLAG_DIFFERS if its bytes differ, | FLAG_HASHED "
     "if sizes[i] <= hash_max (and, with identical false, it differs), whose BLAKE3 digests go to "
     "digests[32i:32i+32] (old) and, if it differs, new_digests[32i:32i+32] (new); returns how many differ"},
    {"_set_simd", set_simd, METH_O,
     "_set_simd(level) -> int: for tests and benchmarks, hash with SIMD_LEVELS[level] (0: the portable code) "
     "from now on; returns the previous level"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernel", "Compare and hash runs of small tensors (see ckptdiff.compare).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernel(void)
{
    simd_detect();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *levels = PyTuple_New(simd_best + 1);
    if (!levels)
        goto fail;
    for (int i = 0; i <= simd_best; i++) {
        PyObject *name = PyUnicode_FromString(SIMD_NAMES[i]);
        if (!name) {
            Py_DECREF(levels);
            goto fail;
        }
        PyTuple_SET_ITEM(levels, i, name);
    }
    if (PyModule_AddObject(m, "SIMD_LEVELS", levels) < 0) {
        Py_DECREF(levels);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "FLAG_DIFFERS", FLAG_DIFFERS) < 0
        || PyModule_AddIntConstant(m, "FLAG_HASHED", FLAG_HASHED) < 0
        || PyModule_AddIntConstant(m, "DIGEST_SIZE", OUT_LEN) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
