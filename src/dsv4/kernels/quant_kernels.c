/* dsv4 native CPU kernels on the published packed weight formats (model/quant.py): a linear layer on FP8 e4m3 weights
 * with ue8m0 128x128 block scales (or on FP4), and the routed experts on stacked FP4 e2m1 weights with ue8m0 1x32
 * scales. The weights are dequantised in registers, never written out whole; activations and sums are fp32.
 *
 * One source for both ISA builds: AVX-512 (F/BW/DQ/VL) when the compiler defines it, otherwise AVX2 + FMA + F16C.
 *   FP8 -> fp32: the e4m3 byte re-biased into an fp16 bit pattern (sign << 15 | magnitude << 7 is the same number
 *   times 2^-8, subnormals included), widened exactly by vcvtph2ps; the 2^8 goes into the block scale, which is
 *   folded into a scaled copy of x per 128-row block, so the inner loop is convert + FMA.
 *   FP4 -> fp32: the nibble indexes a 16-entry value table already multiplied by the row's 1x32 block scale (one
 *   permute per vector; AVX2: an 8-entry magnitude permute and the sign bit xor-ed in).
 * Up to MR token rows, each output is VL-lane FMA sums over k (ascending) reduced in a fixed order; from MR + 1 rows
 * a tile of weight rows is dequantised to fp32 once and multiplied by BLAS sgemm (torch's own, handed over by the
 * Python side) or, without it, the same row kernel on fp32 weights.
 * Threads: OpenMP over weight rows (or expert rows), on torch's pool; the caller passes the thread count.
 * Tested against ops/packed.py's reference (tests/ops/test_packed_native.py). Not here: the Python wrappers
 * (kernels/quant.py) and any choice of when they are used.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QMR 4      /* token rows per row-kernel pass */
#define QTILE 32   /* weight rows dequantised per sgemm tile */
#define Q_TILE_MIN 8 /* rows from which a tile is dequantised once for all of them (below: QMR rows a pass) */
#define QFP8B 128  /* FP8 scale block (both dims) */
#define QFP4B 32   /* FP4 scale block (input dim) */

static const float q_e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* ue8m0 byte -> 2^(b-127) (b = 0: the fp32 subnormal 2^-127) */
static inline float q_e8m0(uint8_t b) {
    uint32_t bits = b ? (uint32_t)b << 23 : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* e4m3 byte -> its value * 2^-8 (what the vector conversion yields before the folded 2^8) */
static inline float q_e4m3_scaled(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return (b & 0x80 ? -v : v) * (1.0f / 256.0f);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define QVL 16
typedef __m512 qvf;
static inline qvf q_zero(void) { return _mm512_setzero_ps(); }
static inline qvf q_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void q_store(float *p, qvf v) { _mm512_storeu_ps(p, v); }
static inline qvf q_fma(qvf a, qvf b, qvf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float q_sum(qvf a) { return _mm512_reduce_add_ps(a); }
/* 16 e4m3 bytes -> 16 floats (value * 2^-8) */
static inline qvf q_fp8(const uint8_t *p) {
    /* byte b in a 16-bit lane: (b << 8) >> 1 (arithmetic) = s s E E E E M M M 0..0, then clear bit 14 */
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 1), _mm256_set1_epi16((short)0xBFFF));
    return _mm512_cvtph_ps(h);
}
typedef __m512 qtab;
static inline qtab q_fp4_table(float s) { return _mm512_mul_ps(_mm512_loadu_ps(q_e2m1), _mm512_set1_ps(s)); }
/* 16 packed bytes -> 32 floats (table values): out[0] = values 0..15, out[1] = 16..31 */
static inline void q_fp4(const uint8_t *p, qtab t, qvf *out) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    out[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), t);
    out[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), t);
}
#define Q_ISA 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QVL 8
typedef __m256 qvf;
static inline qvf q_zero(void) { return _mm256_setzero_ps(); }
static inline qvf q_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void q_store(float *p, qvf v) { _mm256_storeu_ps(p, v); }
static inline qvf q_fma(qvf a, qvf b, qvf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float q_sum(qvf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline qvf q_fp8(const uint8_t *p) {
    __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i h = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(v, 8), 1), _mm_set1_epi16((short)0xBFFF));
    return _mm256_cvtph_ps(h);
}
typedef __m256 qtab; /* the 8 magnitudes, scaled */
static inline qtab q_fp4_table(float s) { return _mm256_mul_ps(_mm256_loadu_ps(q_e2m1), _mm256_set1_ps(s)); }
static inline qvf q_fp4_8(__m128i codes8, qtab t) { /* 8 codes in the low bytes */
    __m256i c = _mm256_cvtepu8_epi32(codes8);
    __m256 mag = _mm256_permutevar8x32_ps(t, _mm256_and_si256(c, _mm256_set1_epi32(7)));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(8)), 28);
    return _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
}
/* 16 packed bytes -> 32 floats in four vectors of 8 */
static inline void q_fp4(const uint8_t *p, qtab t, qvf *out) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
    out[0] = q_fp4_8(c0, t);
    out[1] = q_fp4_8(_mm_srli_si128(c0, 8), t);
    out[2] = q_fp4_8(c1, t);
    out[3] = q_fp4_8(_mm_srli_si128(c1, 8), t);
}
#define Q_ISA 256
#else
#error "quant_kernels.c needs AVX-512 (F/BW/DQ/VL) or AVX2 + FMA + F16C"
#endif

#define Q_FP4_VECS (32 / QVL) /* vectors per 16 packed bytes */

int dsv4_quant_isa(void) { return Q_ISA; }

typedef void (*q_sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                           const float *, const int *, const float *, const int *, const float *, float *, const int *);
static q_sgemm_fn q_sgemm = NULL;
void dsv4_quant_set_sgemm(void *fn) { q_sgemm = (q_sgemm_fn)fn; }

/* weight formats of the C ABI */
#define Q_FP8 0
#define Q_FP4 1

/* One packed weight: rows of `row_bytes`, scale rows of `scale_cols` ue8m0 bytes (FP8: per 128-row block) */
typedef struct {
    const uint8_t *w;
    const uint8_t *s;
    int64_t K, row_bytes, scale_cols;
    int fmt;
} qweight;

static qweight q_make(const void *w, const void *s, int64_t K, int fmt) {
    qweight q = {(const uint8_t *)w, (const uint8_t *)s, K, fmt == Q_FP8 ? K : K / 2,
                 fmt == Q_FP8 ? (K + QFP8B - 1) / QFP8B : (K + QFP4B - 1) / QFP4B, fmt};
    return q;
}

/* ------------------------------------------------------------------ FP8 rows */

/* xs[m, k] = x[m, k] * scale[block, k / 128] * 2^8: the block's scales folded into the activations */
static void q_fp8_scale_x(const float *x, int64_t ldx, int M, const qweight *q, int64_t n, float *xs) {
    const uint8_t *srow = q->s + (n / QFP8B) * q->scale_cols;
    int64_t K = q->K;
    for (int m = 0; m < M; m++)
        for (int64_t k0 = 0; k0 < K; k0 += QFP8B) { /* one scale per 128 columns: a vectorised multiply */
            float sc = q_e8m0(srow[k0 / QFP8B]) * 256.0f;
            int64_t k1 = k0 + QFP8B < K ? k0 + QFP8B : K;
            for (int64_t k = k0; k < k1; k++) xs[m * K + k] = x[m * ldx + k] * sc;
        }
}

/* y[m * ldy + n] = dot(x[m], W[n]) for m < M <= QMR, rows n in [n0, n1) within one 128-row block; xs from above */
static inline __attribute__((always_inline)) void q_fp8_rows(const float *xs, const int M, const qweight *q, int64_t n0, int64_t n1, float *y, int64_t ldy) {
    int64_t K = q->K, kv = K / QVL * QVL;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = q->w + n * q->row_bytes;
        qvf acc[QMR][2];
        for (int m = 0; m < QMR; m++) acc[m][0] = acc[m][1] = q_zero();
        int64_t k = 0;
        for (; k + 2 * QVL <= kv; k += 2 * QVL) {
            qvf a = q_fp8(w + k), b = q_fp8(w + k + QVL);
            for (int m = 0; m < M; m++) {
                acc[m][0] = q_fma(a, q_load(xs + m * K + k), acc[m][0]);
                acc[m][1] = q_fma(b, q_load(xs + m * K + k + QVL), acc[m][1]);
            }
        }
        for (; k < kv; k += QVL) {
            qvf a = q_fp8(w + k);
            for (int m = 0; m < M; m++) acc[m][0] = q_fma(a, q_load(xs + m * K + k), acc[m][0]);
        }
        for (int m = 0; m < M; m++) {
            float s = q_sum(acc[m][0]) + q_sum(acc[m][1]);
            for (int64_t t = kv; t < K; t++) s += q_e4m3_scaled(w[t]) * xs[m * K + t];
            y[m * ldy + n] = s;
        }
    }
}

#if Q_ISA == 256
/* 16 e4m3 bytes -> two vectors of 8 floats (value * 2^-8): the bit trick of q_fp8 on 16 lanes at once */
static inline void q_fp8_16(const uint8_t *p, qvf *lo, qvf *hi) {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 1), _mm256_set1_epi16((short)0xBFFF));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
#endif

/* one token, four weight rows at a time: one load of x per four conversions + FMAs, four independent chains (AVX2:
 * 16 weights a conversion, eight chains) */
static void q_fp8_rows_1x4(const float *xs, const qweight *q, int64_t n0, int64_t n1, float *y) {
    int64_t K = q->K, kv = K / QVL * QVL, rb = q->row_bytes, n = n0;
#if Q_ISA == 256
    if (K % (2 * QVL) == 0) {
        for (; n + 4 <= n1; n += 4) {
            const uint8_t *w = q->w + n * rb;
            qvf acc[4][2], lo, hi;
            for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = q_zero();
            for (int64_t k = 0; k < K; k += 2 * QVL) {
                qvf x0 = q_load(xs + k), x1 = q_load(xs + k + QVL);
                for (int j = 0; j < 4; j++) {
                    q_fp8_16(w + j * rb + k, &lo, &hi);
                    acc[j][0] = q_fma(lo, x0, acc[j][0]);
                    acc[j][1] = q_fma(hi, x1, acc[j][1]);
                }
            }
            for (int j = 0; j < 4; j++) y[n + j] = q_sum(acc[j][0]) + q_sum(acc[j][1]);
        }
        if (n < n1) q_fp8_rows(xs, 1, q, n, n1, y, 0);
        return;
    }
#endif
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *w = q->w + n * rb;
        qvf a0 = q_zero(), a1 = q_zero(), a2 = q_zero(), a3 = q_zero();
        for (int64_t k = 0; k < kv; k += QVL) {
            qvf xv = q_load(xs + k);
            a0 = q_fma(q_fp8(w + k), xv, a0);
            a1 = q_fma(q_fp8(w + rb + k), xv, a1);
            a2 = q_fma(q_fp8(w + 2 * rb + k), xv, a2);
            a3 = q_fma(q_fp8(w + 3 * rb + k), xv, a3);
        }
        float s[4] = {q_sum(a0), q_sum(a1), q_sum(a2), q_sum(a3)};
        for (int j = 0; j < 4; j++) {
            for (int64_t t = kv; t < K; t++) s[j] += q_e4m3_scaled(w[j * rb + t]) * xs[t];
            y[n + j] = s[j];
        }
    }
    if (n < n1) q_fp8_rows(xs, 1, q, n, n1, y, 0);
}

/* ------------------------------------------------------------------ FP4 rows */

static inline __attribute__((always_inline)) void q_fp4_rows(const float *x, int64_t ldx, const int M, const qweight *q, int64_t n0, int64_t n1, float *y,
                       int64_t ldy) {
    int64_t K = q->K, kb = K / QFP4B * QFP4B;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = q->w + n * q->row_bytes, *s = q->s + n * q->scale_cols;
        qvf acc[QMR][2];
        for (int m = 0; m < QMR; m++) acc[m][0] = acc[m][1] = q_zero();
        for (int64_t k = 0; k < kb; k += QFP4B) {
            qvf v[Q_FP4_VECS];
            q_fp4(w + k / 2, q_fp4_table(q_e8m0(s[k / QFP4B])), v);
            for (int m = 0; m < M; m++)
                for (int j = 0; j < Q_FP4_VECS; j++)
                    acc[m][j & 1] = q_fma(v[j], q_load(x + m * ldx + k + j * QVL), acc[m][j & 1]);
        }
        for (int m = 0; m < M; m++) {
            float sum = q_sum(acc[m][0]) + q_sum(acc[m][1]);
            if (kb < K) { /* a partial last scale block (K not a multiple of 32) */
                float sc = q_e8m0(s[kb / QFP4B]);
                for (int64_t t = kb; t < K; t++) {
                    uint8_t b = w[t / 2];
                    sum += q_e2m1[t & 1 ? b >> 4 : b & 15] * sc * x[m * ldx + t];
                }
            }
            y[m * ldy + n] = sum;
        }
    }
}

static void q_fp4_rows_1x4(const float *x, const qweight *q, int64_t n0, int64_t n1, float *y) {
    int64_t K = q->K, kb = K / QFP4B * QFP4B, rb = q->row_bytes, sc = q->scale_cols, n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *w = q->w + n * rb, *s = q->s + n * sc;
        qvf acc[4][2];
        for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = q_zero();
        for (int64_t k = 0; k < kb; k += QFP4B) {
            qvf xv[Q_FP4_VECS];
            for (int i = 0; i < Q_FP4_VECS; i++) xv[i] = q_load(x + k + i * QVL);
            for (int j = 0; j < 4; j++) {
                qvf v[Q_FP4_VECS];
                q_fp4(w + j * rb + k / 2, q_fp4_table(q_e8m0(s[j * sc + k / QFP4B])), v);
                for (int i = 0; i < Q_FP4_VECS; i++) acc[j][i & 1] = q_fma(v[i], xv[i], acc[j][i & 1]);
            }
        }
        for (int j = 0; j < 4; j++) {
            float sum = q_sum(acc[j][0]) + q_sum(acc[j][1]);
            if (kb < K) {
                float scl = q_e8m0(s[j * sc + kb / QFP4B]);
                for (int64_t t = kb; t < K; t++) {
                    uint8_t b = w[j * rb + t / 2];
                    sum += q_e2m1[t & 1 ? b >> 4 : b & 15] * scl * x[t];
                }
            }
            y[n + j] = sum;
        }
    }
    if (n < n1) q_fp4_rows(x, 0, 1, q, n, n1, y, 0);
}

/* ------------------------------------------------------------------ dequantised tiles (many rows) */

static void q_dequant_row(const qweight *q, int64_t n, float *out) {
    int64_t K = q->K;
    const uint8_t *w = q->w + n * q->row_bytes;
    if (q->fmt == Q_FP8) {
        const uint8_t *srow = q->s + (n / QFP8B) * q->scale_cols;
        int64_t kv = K / QVL * QVL;
        for (int64_t k = 0; k < kv; k += QVL) {
            qvf v = q_fp8(w + k);
            float sc = q_e8m0(srow[k / QFP8B]) * 256.0f;
            float tmp[QVL];
            q_store(tmp, v);
            for (int j = 0; j < QVL; j++) out[k + j] = tmp[j] * sc;
        }
        for (int64_t t = kv; t < K; t++) out[t] = q_e4m3_scaled(w[t]) * 256.0f * q_e8m0(srow[t / QFP8B]);
    } else {
        const uint8_t *s = q->s + n * q->scale_cols;
        int64_t kb = K / QFP4B * QFP4B;
        for (int64_t k = 0; k < kb; k += QFP4B) {
            qvf v[Q_FP4_VECS];
            q_fp4(w + k / 2, q_fp4_table(q_e8m0(s[k / QFP4B])), v);
            for (int j = 0; j < Q_FP4_VECS; j++) q_store(out + k + j * QVL, v[j]);
        }
        for (int64_t t = kb; t < K; t++) {
            uint8_t b = w[t / 2];
            out[t] = q_e2m1[t & 1 ? b >> 4 : b & 15] * q_e8m0(s[t / QFP4B]);
        }
    }
}

/* y[m, n] for all M rows and weight rows [n0, n1) through a dequantised fp32 tile (scratch: QTILE * K floats) */
static void q_tile_rows(const float *x, int64_t ldx, int64_t M, const qweight *q, int64_t n0, int64_t n1, float *y,
                        int64_t ldy, float *scratch) {
    int64_t K = q->K;
    for (int64_t t0 = n0; t0 < n1; t0 += QTILE) {
        int64_t nt = n1 - t0 < QTILE ? n1 - t0 : QTILE;
        for (int64_t r = 0; r < nt; r++) q_dequant_row(q, t0 + r, scratch + r * K);
        if (q_sgemm && M < (1 << 30) && K < (1 << 30)) {
            int m_ = (int)nt, n_ = (int)M, k_ = (int)K, lda = (int)K, ldb = (int)ldx, ldc = (int)ldy;
            float one = 1.0f, zero = 0.0f;
            q_sgemm("T", "N", &m_, &n_, &k_, &one, scratch, &lda, x, &ldb, &zero, y + t0, &ldc);
            continue;
        }
        for (int64_t m = 0; m < M; m++)
            for (int64_t r = 0; r < nt; r++) {
                const float *a = x + m * ldx, *b = scratch + r * K;
                qvf acc0 = q_zero(), acc1 = q_zero();
                int64_t k = 0;
                for (; k + 2 * QVL <= K; k += 2 * QVL) {
                    acc0 = q_fma(q_load(a + k), q_load(b + k), acc0);
                    acc1 = q_fma(q_load(a + k + QVL), q_load(b + k + QVL), acc1);
                }
                float s = q_sum(acc0) + q_sum(acc1);
                for (; k < K; k++) s += a[k] * b[k];
                y[m * ldy + t0 + r] = s;
            }
    }
}

/* y[M, n0:n1] (row stride ldy) = x[M, K] (row stride ldx) @ W[n0:n1]^T. scratch: QMR*K (FP8 few rows) or QTILE*K
 * floats. Row ranges of FP8 weights start on a multiple of 32 so a chunk never straddles a 128-row scale block. */
static void q_rows(const float *x, int64_t ldx, int64_t M, const qweight *q, int64_t n0, int64_t n1, float *y,
                   int64_t ldy, float *scratch) {
    if (M >= Q_TILE_MIN) {
        q_tile_rows(x, ldx, M, q, n0, n1, y, ldy, scratch);
        return;
    }
    if (M > QMR) { /* a few rows: the register kernels QMR rows at a time (the weight rows stay in L1/L2) */
        for (int64_t m0 = 0; m0 < M; m0 += QMR)
            q_rows(x + m0 * ldx, ldx, M - m0 < QMR ? M - m0 : QMR, q, n0, n1, y + m0 * ldy, ldy, scratch);
        return;
    }
    /* the row count as a compile-time constant: accumulators stay in registers */
    if (q->fmt == Q_FP4) {
        switch (M) {
        case 1: q_fp4_rows_1x4(x, q, n0, n1, y); break;
        case 2: q_fp4_rows(x, ldx, 2, q, n0, n1, y, ldy); break;
        case 3: q_fp4_rows(x, ldx, 3, q, n0, n1, y, ldy); break;
        default: q_fp4_rows(x, ldx, 4, q, n0, n1, y, ldy); break;
        }
        return;
    }
    for (int64_t b0 = n0; b0 < n1;) { /* per 128-row scale block: one scaled copy of x */
        int64_t b1 = (b0 / QFP8B + 1) * QFP8B;
        if (b1 > n1) b1 = n1;
        q_fp8_scale_x(x, ldx, (int)M, q, b0, scratch);
        switch (M) {
        case 1: q_fp8_rows_1x4(scratch, q, b0, b1, y); break;
        case 2: q_fp8_rows(scratch, 2, q, b0, b1, y, ldy); break;
        case 3: q_fp8_rows(scratch, 3, q, b0, b1, y, ldy); break;
        default: q_fp8_rows(scratch, 4, q, b0, b1, y, ldy); break;
        }
        b0 = b1;
    }
}

static int64_t q_scratch_floats(int64_t M, int64_t K) { return (M > QMR ? QTILE : QMR) * K + 64; }

#define Q_CHUNK 32 /* weight rows per parallel work item */
/* multiply-adds below which a call stays on one thread: a fork/join costs microseconds on an idle machine and up to a
 * scheduler quantum on a loaded one, more than ~1M multiply-adds (~0.1-0.3 ms) of work gain from a second thread */
#define Q_PAR_WORK (1 << 20)

/* y[M, N] = x[M, K] @ W^T, W [N, K] FP8 (scale [ceil(N/128), ceil(K/128)]) or FP4 ([N, K/2], scale [N, ceil(K/32)]) */
void dsv4_qlinear(const float *x, int64_t M, int64_t K, const void *w, const void *s, int fmt, int64_t N, float *y,
                  int nthreads) {
    qweight q = q_make(w, s, K, fmt);
    int64_t chunks = (N + Q_CHUNK - 1) / Q_CHUNK;
    int par = nthreads > 1 && chunks > 1 && M * N * K >= Q_PAR_WORK;
#pragma omp parallel num_threads(par ? nthreads : 1)
    {
        float *scratch = malloc((size_t)q_scratch_floats(M, K) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t n0 = c * Q_CHUNK, n1 = n0 + Q_CHUNK < N ? n0 + Q_CHUNK : N;
            q_rows(x, K, M, &q, n0, n1, y, N, scratch);
        }
        free(scratch);
    }
}

/* ------------------------------------------------------------------ routed experts on stacked FP4 weights */

/* g = r * silu(min(g, L)) * clamp(u, -L, L) (L <= 0: no clamp), the routing weight r applied before w2 (official) */
static void q_swiglu(float *g, const float *u, int64_t n, float limit, float r) {
    for (int64_t i = 0; i < n; i++) {
        float a = g[i], b = u[i];
        if (limit > 0) {
            a = a < limit ? a : limit;
            b = b < -limit ? -limit : (b > limit ? limit : b);
        }
        g[i] = r * (a / (1.0f + expf(-a)) * b);
    }
}

/* y[T, D] = sum over each token's k routed experts, in ascending expert id from fp32 zeros (ops/packed.py's
 * experts_reference order). ids/weights [T, k]; w1/w3 [E, F, D/2] + s1/s3 [E, F, D/32]; w2 [E, D, F/2] + s2
 * [E, D, F/32]. All threads walk the experts together, splitting each expert's rows. Returns 0, or -1 (nothing
 * written) when an id is outside [0, E). */
int dsv4_qexperts(const float *x, int64_t T, int64_t D, int64_t F, const int64_t *ids, const float *weights, int64_t k,
                  int64_t E, const void *w1, const void *s1, const void *w3, const void *s3, const void *w2,
                  const void *s2, float limit, float *y, int nthreads) {
    int64_t pairs = T * k;
    for (int64_t i = 0; i < pairs; i++)
        if (ids[i] < 0 || ids[i] >= E) return -1;
    int64_t *first = calloc((size_t)E + 1, sizeof(int64_t)), *fill = malloc((size_t)E * sizeof(int64_t));
    int64_t *order = malloc((size_t)pairs * sizeof(int64_t)), *where = malloc((size_t)pairs * sizeof(int64_t));
    for (int64_t i = 0; i < pairs; i++) first[ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) first[e + 1] += first[e];
    memcpy(fill, first, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < pairs; i++) { /* stable: token order inside an expert */
        where[i] = fill[ids[i]]++;
        order[where[i]] = i;
    }
    int64_t cap = 0, nact = 0;
    int64_t *act = malloc((size_t)E * sizeof(int64_t)); /* the experts some token picked */
    for (int64_t e = 0; e < E; e++) {
        int64_t cnt = first[e + 1] - first[e];
        cap = cnt > cap ? cnt : cap;
        if (cnt) act[nact++] = e;
    }
    float *xs = malloc((size_t)pairs * D * sizeof(float) + 64); /* inputs of the pairs, in expert order */
    /* g (then h) and u of every pair, in expert order: the work items of all experts run in one loop, no barrier
     * per expert (2 per expert cost a scheduler quantum each on a loaded machine) */
    float *g = malloc((size_t)pairs * F * sizeof(float) + 64), *u = malloc((size_t)pairs * F * sizeof(float) + 64);
    float *outs = malloc((size_t)pairs * D * sizeof(float) + 64);
    int64_t bytes_w13 = F * (D / 2), bytes_w2 = D * (F / 2);
    int64_t sc13 = F * ((D + QFP4B - 1) / QFP4B), sc2 = D * ((F + QFP4B - 1) / QFP4B);
    int64_t work = pairs * F * D;
    int64_t fchunks = (F + Q_CHUNK - 1) / Q_CHUNK, dchunks = (D + Q_CHUNK - 1) / Q_CHUNK;
#pragma omp parallel num_threads(nthreads > 1 && work >= Q_PAR_WORK ? nthreads : 1)
    {
        int64_t kmax = D > F ? D : F;
        float *scratch = malloc((size_t)q_scratch_floats(cap, kmax) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) memcpy(xs + p * D, x + (order[p] / k) * D, (size_t)D * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nact * fchunks; it++) { /* w1, w3 and SwiGLU: (expert, 32 rows of F) */
            int64_t e = act[it / fchunks], c = it % fchunks, a = first[e], cnt = first[e + 1] - a;
            qweight q1 = q_make((const uint8_t *)w1 + e * bytes_w13, (const uint8_t *)s1 + e * sc13, D, Q_FP4);
            qweight q3 = q_make((const uint8_t *)w3 + e * bytes_w13, (const uint8_t *)s3 + e * sc13, D, Q_FP4);
            int64_t f0 = c * Q_CHUNK, f1 = f0 + Q_CHUNK < F ? f0 + Q_CHUNK : F;
            q_rows(xs + a * D, D, cnt, &q1, f0, f1, g + a * F, F, scratch);
            q_rows(xs + a * D, D, cnt, &q3, f0, f1, u + a * F, F, scratch);
            for (int64_t j = 0; j < cnt; j++)
                q_swiglu(g + (a + j) * F + f0, u + (a + j) * F + f0, f1 - f0, limit, weights[order[a + j]]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nact * dchunks; it++) { /* w2: (expert, 32 rows of D) */
            int64_t e = act[it / dchunks], c = it % dchunks, a = first[e], cnt = first[e + 1] - a;
            qweight q2 = q_make((const uint8_t *)w2 + e * bytes_w2, (const uint8_t *)s2 + e * sc2, F, Q_FP4);
            int64_t d0 = c * Q_CHUNK, d1 = d0 + Q_CHUNK < D ? d0 + Q_CHUNK : D;
            q_rows(g + a * F, F, cnt, &q2, d0, d1, outs + a * D, D, scratch);
        }
        free(scratch);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *yt = y + t * D;
            memset(yt, 0, (size_t)D * sizeof(float));
            int64_t last = -1;
            for (int64_t n = 0; n < k; n++) { /* the token's pairs by ascending expert id (k is small) */
                int64_t best = -1;
                for (int64_t j = 0; j < k; j++) {
                    int64_t pr = t * k + j;
                    if (where[pr] > last && (best < 0 || where[pr] < where[best])) best = pr;
                }
                last = where[best];
                const float *o = outs + where[best] * D;
                for (int64_t d = 0; d < D; d++) yt[d] += o[d];
            }
        }
    }
    free(first); free(fill); free(order); free(where); free(act); free(xs); free(g); free(u); free(outs);
    return 0;
}
