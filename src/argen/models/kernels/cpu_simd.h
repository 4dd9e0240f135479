/* The vector layer under argen's CPU kernels: they are written once against these names, and each
 * instruction set supplies them at its width VW (floats per vector):
 *
 *   AVX-512 (__AVX512F__)             VW = 16, __m512
 *   AVX2 (__AVX2__ + FMA + F16C)      VW = 8,  __m256
 *   portable C (ARGEN_PORTABLE, or no AVX2): VW = ARGEN_PORTABLE_WIDTH (8 unless set), GCC vectors
 *
 * So the AVX-512 kernels are the AVX2 kernels at twice the width, and the portable build at width
 * 16 runs the AVX-512 kernels' exact arithmetic (same lanes, same operations, same rounding) on any
 * machine: the tests compare it with AVX-512 where the CPU has it and check it everywhere else.
 * Every operation here is one IEEE-rounded operation per lane (fma rounds once), so the portable
 * build gives the same bits as the native one of the same width.
 */
#ifndef ARGEN_CPU_SIMD_H
#define ARGEN_CPU_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(ARGEN_PORTABLE) && defined(__AVX512F__)
#define ARGEN_SIMD_AVX512 1
#elif !defined(ARGEN_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ARGEN_SIMD_AVX2 1
#else
#define ARGEN_SIMD_PORTABLE 1
#endif

#if defined(ARGEN_SIMD_AVX512) || defined(ARGEN_SIMD_AVX2) || defined(__F16C__)
#include <immintrin.h>
#endif

#define ARGEN_INLINE static inline __attribute__((always_inline))

/* fp16 -> fp32 for one value (exact). */
ARGEN_INLINE float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#if defined(ARGEN_SIMD_AVX512)
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
ARGEN_INLINE vf vzero(void) { return _mm512_setzero_ps(); }
ARGEN_INLINE vf vset1(float a) { return _mm512_set1_ps(a); }
ARGEN_INLINE vf vload(const float *p) { return _mm512_loadu_ps(p); }
ARGEN_INLINE void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
ARGEN_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
ARGEN_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
ARGEN_INLINE vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
ARGEN_INLINE vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
ARGEN_INLINE vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
ARGEN_INLINE vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
ARGEN_INLINE vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
ARGEN_INLINE vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
ARGEN_INLINE vi vcvt_f2i(vf a) { return _mm512_cvttps_epi32(a); }
ARGEN_INLINE vf vcvt_i2f(vi a) { return _mm512_cvtepi32_ps(a); }
ARGEN_INLINE vf vcast_i2f(vi a) { return _mm512_castsi512_ps(a); }
ARGEN_INLINE vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
ARGEN_INLINE vi vi_set1(int32_t a) { return _mm512_set1_epi32(a); }
ARGEN_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
#define vi_srli(a, n) _mm512_srli_epi32((a), (n))
#define vi_slli(a, n) _mm512_slli_epi32((a), (n))
/* VW bytes, zero- or sign-extended to 32-bit lanes; VW fp16 values as fp32 */
ARGEN_INLINE vi vload_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
ARGEN_INLINE vi vload_s8(const int8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
ARGEN_INLINE vf vload_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
ARGEN_INLINE float vlane0(vf a) { return _mm512_cvtss_f32(a); }
ARGEN_INLINE vi vi_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
typedef __m512i vb;
ARGEN_INLINE vb vb_load(const void *p) { return _mm512_loadu_si512(p); }
ARGEN_INLINE vb vb_lo4(vb a) { return _mm512_and_si512(a, _mm512_set1_epi8(15)); }
ARGEN_INLINE vb vb_hi4(vb a) { return _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi8(15)); }
ARGEN_INLINE vb vb_bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
#if defined(__AVX512VNNI__)
ARGEN_INLINE vi vdot_u8s8(vi acc, vb u, vb s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
ARGEN_INLINE vi vdot_u8s8(vi acc, vb u, vb s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
#endif
ARGEN_INLINE vi vdot_s8s8(vi acc, vb w, vb s) {
    const vb neg = _mm512_mask_sub_epi8(s, _mm512_movepi8_mask(w), _mm512_setzero_si512(), s);
    return vdot_u8s8(acc, _mm512_abs_epi8(w), neg);
}

#elif defined(ARGEN_SIMD_AVX2)
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
ARGEN_INLINE vf vzero(void) { return _mm256_setzero_ps(); }
ARGEN_INLINE vf vset1(float a) { return _mm256_set1_ps(a); }
ARGEN_INLINE vf vload(const float *p) { return _mm256_loadu_ps(p); }
ARGEN_INLINE void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
ARGEN_INLINE vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
ARGEN_INLINE vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
ARGEN_INLINE vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
ARGEN_INLINE vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
ARGEN_INLINE vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
ARGEN_INLINE vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
ARGEN_INLINE vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
ARGEN_INLINE vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
ARGEN_INLINE vi vcvt_f2i(vf a) { return _mm256_cvttps_epi32(a); }
ARGEN_INLINE vf vcvt_i2f(vi a) { return _mm256_cvtepi32_ps(a); }
ARGEN_INLINE vf vcast_i2f(vi a) { return _mm256_castsi256_ps(a); }
ARGEN_INLINE vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
ARGEN_INLINE vi vi_set1(int32_t a) { return _mm256_set1_epi32(a); }
ARGEN_INLINE vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
#define vi_srli(a, n) _mm256_srli_epi32((a), (n))
#define vi_slli(a, n) _mm256_slli_epi32((a), (n))
ARGEN_INLINE vi vload_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
ARGEN_INLINE vi vload_s8(const int8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
ARGEN_INLINE vf vload_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
ARGEN_INLINE float vlane0(vf a) { return _mm256_cvtss_f32(a); }
ARGEN_INLINE vi vi_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
typedef __m256i vb;
ARGEN_INLINE vb vb_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
ARGEN_INLINE vb vb_lo4(vb a) { return _mm256_and_si256(a, _mm256_set1_epi8(15)); }
ARGEN_INLINE vb vb_hi4(vb a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(15)); }
ARGEN_INLINE vb vb_bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
ARGEN_INLINE vi vdot_u8s8(vi acc, vb u, vb s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
ARGEN_INLINE vi vdot_s8s8(vi acc, vb w, vb s) { return vdot_u8s8(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w)); }

#else /* portable C: GCC vector extensions, one rounded operation per lane */
#ifndef ARGEN_PORTABLE_WIDTH
#define ARGEN_PORTABLE_WIDTH 8
#endif
#define VW ARGEN_PORTABLE_WIDTH
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
ARGEN_INLINE vf vzero(void) { return (vf){0}; }
ARGEN_INLINE vf vset1(float a) { return (vf){0} + a; }
ARGEN_INLINE vf vload(const float *p) { vf a; memcpy(&a, p, sizeof a); return a; }
ARGEN_INLINE void vstore(float *p, vf a) { memcpy(p, &a, sizeof a); }
ARGEN_INLINE vf vfma(vf a, vf b, vf c) { for (int i = 0; i < VW; i++) c[i] = fmaf(a[i], b[i], c[i]); return c; }
ARGEN_INLINE vf vmul(vf a, vf b) { return a * b; }
ARGEN_INLINE vf vadd(vf a, vf b) { return a + b; }
ARGEN_INLINE vf vsub(vf a, vf b) { return a - b; }
ARGEN_INLINE vf vdiv(vf a, vf b) { return a / b; }
/* max/min as x86 computes them: the second operand unless the first is strictly greater (less) */
ARGEN_INLINE vf vmax(vf a, vf b) { for (int i = 0; i < VW; i++) a[i] = a[i] > b[i] ? a[i] : b[i]; return a; }
ARGEN_INLINE vf vmin(vf a, vf b) { for (int i = 0; i < VW; i++) a[i] = a[i] < b[i] ? a[i] : b[i]; return a; }
ARGEN_INLINE vf vround(vf a) { for (int i = 0; i < VW; i++) a[i] = nearbyintf(a[i]); return a; }
ARGEN_INLINE vi vcvt_f2i(vf a) { return __builtin_convertvector(a, vi); }
ARGEN_INLINE vf vcvt_i2f(vi a) { return __builtin_convertvector(a, vf); }
ARGEN_INLINE vf vcast_i2f(vi a) { vf f; memcpy(&f, &a, sizeof f); return f; }
ARGEN_INLINE vi vi_add(vi a, vi b) { return a + b; }
ARGEN_INLINE vi vi_set1(int32_t a) { return (vi){0} + a; }
ARGEN_INLINE vi vi_and(vi a, vi b) { return a & b; }
#define vi_srli(a, n) ((vi)((vu)(a) >> (n)))
#define vi_slli(a, n) ((a) << (n))
ARGEN_INLINE vi vload_u8(const uint8_t *p) { vi a; for (int i = 0; i < VW; i++) a[i] = p[i]; return a; }
ARGEN_INLINE vi vload_s8(const int8_t *p) { vi a; for (int i = 0; i < VW; i++) a[i] = p[i]; return a; }
ARGEN_INLINE vf vload_f16(const uint16_t *p) { vf a; for (int i = 0; i < VW; i++) a[i] = half_to_float(p[i]); return a; }
ARGEN_INLINE float vlane0(vf a) { return a[0]; }
ARGEN_INLINE vi vi_sub(vi a, vi b) { return a - b; }
typedef uint8_t vb __attribute__((vector_size(4 * VW)));
ARGEN_INLINE vb vb_load(const void *p) { vb a; memcpy(&a, p, sizeof a); return a; }
ARGEN_INLINE vb vb_lo4(vb a) { return a & 15; }
ARGEN_INLINE vb vb_hi4(vb a) { return a >> 4; }
ARGEN_INLINE vb vb_bcast4(const int8_t *p) { vb a; for (int i = 0; i < 4 * VW; i++) a[i] = (uint8_t)p[i % 4]; return a; }
ARGEN_INLINE vi vdot_u8s8(vi acc, vb u, vb s) {
    for (int r = 0; r < VW; r++)
        for (int j = 0; j < 4; j++) acc[r] += (int32_t)u[4 * r + j] * (int8_t)s[4 * r + j];
    return acc;
}
ARGEN_INLINE vi vdot_s8s8(vi acc, vb w, vb s) {
    for (int r = 0; r < VW; r++)
        for (int j = 0; j < 4; j++) acc[r] += (int8_t)w[4 * r + j] * (int8_t)s[4 * r + j];
    return acc;
}
#endif

/* The a8 path's integer dot products. A vb holds 4 VW bytes: 4 consecutive columns for each of the
 * VW lanes (output rows). vdot_u8s8(acc, u, s) adds sum_{j<4} u[4r+j] s[4r+j] to 32-bit lane r,
 * exactly, for unsigned u <= 15 (Q4 codes) and signed |s| <= 127 (activations); vdot_s8s8 the same
 * for signed weights (Q8 codes). vb_lo4 / vb_hi4: a byte's low / high nibble; vb_bcast4: 4 bytes in
 * every lane. AVX2 computes them with maddubs + madd (no saturation at these magnitudes),
 * AVX-512 VNNI with vpdpbusd: the same integers. */

/* How a kernel reads an activation it multiplies a vector of weights by (the same value in every
 * lane): AVX2 stores it expanded to a whole vector beforehand (XB = VW floats) and loads that, as a
 * broadcast there takes a shuffle port that the dequantization needs; AVX-512 broadcasts it from
 * memory inside the FMA ({1to16}, no extra instruction), so it is stored once (XB = 1). */
#if defined(ARGEN_SIMD_AVX2)
#define XB VW
ARGEN_INLINE void vxb_put(float *p, float v) { vstore(p, vset1(v)); }
ARGEN_INLINE vf vxb(const float *p) { return vload(p); }
#else
#define XB 1
ARGEN_INLINE void vxb_put(float *p, float v) { *p = v; }
ARGEN_INLINE vf vxb(const float *p) { return vset1(*p); }
#endif

/* -- built from the operations above: the same arithmetic at every width --------------------- */

/* The lanes of a summed in a fixed tree: the upper half of the lanes added to the lower half, again
 * and again, until one is left (the native builds do it with shuffles, the portable one lane by lane). */
ARGEN_INLINE float vhsum(vf a) {
#if defined(ARGEN_SIMD_AVX512) || defined(ARGEN_SIMD_AVX2)
#if defined(ARGEN_SIMD_AVX512)
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
#else
    const __m256 h = a;
#endif
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#else
    float t[VW];
    vstore(t, a);
    for (int w = VW / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] = t[i] + t[i + w];
    return t[0];
#endif
}

ARGEN_INLINE float vhmax(vf a) {
    float t[VW];
    vstore(t, a);
    float m = t[0];
    for (int i = 1; i < VW; i++) m = t[i] > m ? t[i] : m;
    return m;
}

/* The first n < VW lanes from p (the rest 0), and back: tails computed like full vectors. */
ARGEN_INLINE vf vload_n(const float *p, int64_t n) {
    float t[VW] = {0};
    memcpy(t, p, sizeof(float) * n);
    return vload(t);
}

ARGEN_INLINE void vstore_n(float *p, vf a, int64_t n) {
    float t[VW];
    vstore(t, a);
    memcpy(p, t, sizeof(float) * n);
}

/* e^x to about 1 ulp: x = n ln2 + r, a degree-6 polynomial for e^r, times 2^n (n in [-126, 127],
 * built in the exponent bits). Results below ~1e-38 flush towards 0, as softmax and SiLU allow. */
ARGEN_INLINE vf vexp(vf x) {
    x = vmax(vmin(x, vset1(88.0f)), vset1(-87.0f));
    const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    const vf scale = vcast_i2f(vi_slli(vi_add(vcvt_f2i(n), vi_set1(127)), 23));
    return vmul(p, scale);
}
#endif
