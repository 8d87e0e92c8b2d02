/* dsv4 native kernels: the small vector layer every C source here is written against, one definition per ISA build
 * (dsv4/kernels/build.py passes the ISA flags; the compiler's macros pick the block below).
 *
 *   vf          VL fp32 lanes (AVX-512: 16 in a zmm, AVX2: 8 in a ymm)
 *   vload/vstore, vload_tail/vstore_tail(p, n) (n < VL lanes; the others read as 0, not written)
 *   vload_bf16(_tail)   bf16 widened exactly to fp32 (a left shift by 16)
 *   vfma(a, b, c) = a*b + c, vfnma(a, b, c) = c - a*b, vadd/vsub/vmul/vdiv/vmin/vmax
 *   vsum / vmax_all     horizontal reductions in a fixed order; vhsum4: four sums at once -> __m128
 *   veq_bits / vnan_bits  lane bitmasks of v == t / isnan(v)
 *   vexp        Cephes expf (about 1 ulp on [-87, 88]; inputs clamped there)
 *
 * The AVX-512 block is the intrinsics the kernels used before the AVX2 build existed (same instructions, same
 * results). Not here: anything wider than one vector (the micro-kernels' register blocking is per ISA in the .c file).
 */
#ifndef DSV4_SIMD_H
#define DSV4_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

/* dtype codes of the C ABI (int arguments named *_dt) */
#define DSV4_F32 0
#define DSV4_BF16 1

static inline float bf16_to_f32(bf16 h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* round to nearest even, as torch's .to(torch.bfloat16) (a NaN stays a quiet NaN) */
static inline bf16 f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x0040u);
    return (bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define DSV4_ISA_BITS 512
#define VL 16
typedef __m512 vf;

static inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vload_tail(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
static inline void vstore_tail(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
static inline vf vload_bf16(const bf16 *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline vf vload_bf16_tail(const bf16 *p, int64_t n) {
    __m256i v = _mm256_maskz_loadu_epi16(tail_mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float vmax_all(vf v) { return _mm512_reduce_max_ps(v); }
static inline unsigned veq_bits(vf v, float t) { return _mm512_cmp_ps_mask(v, _mm512_set1_ps(t), _CMP_EQ_OQ); }
static inline unsigned vnan_bits(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* p * 2^n, n integral */

/* the four horizontal sums of a, b, c, d at once (a fixed order, ~half the shuffles of four separate ones) */
static inline __m128 vhsum4(vf a, vf b, vf c, vf d) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSV4_ISA_BITS 256
#define VL 8
typedef __m256 vf;

/* lanes [0, n) on: a window into 8 on-words followed by 8 off-words */
static inline __m256i tail_mask(int64_t n) {
    static const int32_t on_off[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(on_off + 8 - n));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vload_tail(const float *p, int64_t n) { return _mm256_maskload_ps(p, tail_mask(n)); }
static inline void vstore_tail(float *p, vf v, int64_t n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
static inline vf vload_bf16(const bf16 *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline vf vload_bf16_tail(const bf16 *p, int64_t n) { /* AVX2 has no 16-bit masked load */
    bf16 tmp[8] = {0};
    memcpy(tmp, p, (size_t)n * sizeof(bf16));
    return vload_bf16(tmp);
}
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vmax_all(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline unsigned veq_bits(vf v, float t) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(t), _CMP_EQ_OQ));
}
static inline unsigned vnan_bits(vf v) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^n for integral n in [-252, 254] in two exact steps (2^n alone overflows the exponent at n = 128) */
static inline vf vscale2(vf p, vf n) {
    __m256i ni = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(ni, 1);
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    __m256 b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}
static inline __m128 vhsum4(vf a, vf b, vf c, vf d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#else
#error "the dsv4 kernels need AVX-512 F/BW/DQ/VL or AVX2 + FMA + F16C (dsv4/kernels/build.py passes the flags)"
#endif

/* exp on VL lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp on [-87, 88]; inputs are
 * clamped there, which keeps silu finite for any finite input) */
static inline vf vexp(vf x) {
    x = vmin(vmax(x, vset1(-87.3f)), vset1(88.7f));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnma(n, vset1(0.693359375f), x);
    r = vfnma(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vscale2(p, n);
}

#endif
