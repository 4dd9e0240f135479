/* argen's CPU kernels: GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) times fp32 activations.
 *
 * Why hand-written: torch's stock weight-only kernels are slower than fp32 on these CPUs
 * (`_weight_int4pack_mm_for_cpu` 126 ms per SmolLM2 step against 25 ms for fp32 GEMV), and the
 * libraries that read GGUF blocks in registers (ggml) always quantize the activations to 8 bits
 * too. These kernels keep the weights as the GGUF stores them (4 or 8 bits per weight plus an
 * fp16 scale, and for Q4_1 an fp16 minimum, per block of 32), dequantize each block in registers
 * exactly as gguf-py's reference dequantizer does (w = d * q + m is exact in fp32), and multiply
 * with fp32 activations and fp32 accumulation. So the weights are bit for bit the fp32 model's,
 * and only the summation order differs from a dense fp32 matmul.
 *
 * Batch invariance: every output y[i][r] is computed by the same sequence of operations whatever
 * the number of rows M and whichever tile or thread computes it, so a sequence's logits do not
 * depend on what else shares its forward pass (batched serving, speculative verification).
 *
 * Layout (split from the GGUF's interleaved blocks at load time; same bytes):
 *   qs: Q4 [N][K/2] bytes, block b of row r at qs[r][16 b]: byte j holds weight j (low nibble)
 *       and weight j + 16 (high nibble); Q8 [N][K] int8.
 *   d, m: [N][K/32] fp16 scale and minimum (Q4_0 has no m: w = d * (q - 8)).
 * x is [M][K] fp32 (rows ldx apart), y is [M][N] fp32 (rows ldy apart), bias [N] or NULL.
 * nthreads: the caller's thread count (torch's), passed because OpenMP's is per calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

const char *argen_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

static inline float half_to_float(uint16_t h) {
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

static inline void halves_to_floats(const uint16_t *h, int64_t n, float *f) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

/* One weight row's scales (and minimums) as fp32, so the inner loop broadcasts from memory. For
 * Q4_0, m = -8 d: then fma(q, d, m) = d * (q - 8) exactly, as gguf-py computes it. */
static inline void row_scales(int fmt, const uint16_t *d, const uint16_t *m, int64_t nb, float *df, float *mf) {
    halves_to_floats(d, nb, df);
    if (fmt == FMT_Q4_1) {
        halves_to_floats(m, nb, mf);
    } else {
        for (int64_t b = 0; b < nb; b++) mf[b] = fmt == FMT_Q4_0 ? -8.0f * df[b] : 0.0f;
    }
}

#define MAX_TILE 8
#define MAX_RT 4

#if defined(__AVX512F__)
/* RT weight rows (rows ldq bytes and nb scales apart) against MT rows of x: out[r][i] = x[i] . w[r].
 * Each (r, i) has its own two accumulators (weights 0-15 and 16-31 of every block), summed in block
 * order and reduced the same way whatever RT and MT are: that is what makes results batch-invariant.
 * Several weight rows at once give the FMAs independent chains to hide their latency. */
static inline __attribute__((always_inline)) void q4_tile(const int RT, const int MT, const float *x, int64_t ldx,
                                                          int64_t nb, const uint8_t *q, int64_t ldq, const float *df,
                                                          const float *mf, float *out) {
    __m512 acc[MAX_RT][MAX_TILE][2];
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        __m512 wl[MAX_RT], wh[MAX_RT];
        for (int r = 0; r < RT; r++) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + r * ldq + 16 * b));
            const __m512 ql = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
            const __m512 qh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
            const __m512 vd = _mm512_set1_ps(df[r * nb + b]), vm = _mm512_set1_ps(mf[r * nb + b]);
            wl[r] = _mm512_fmadd_ps(ql, vd, vm);
            wh[r] = _mm512_fmadd_ps(qh, vd, vm);
        }
        for (int i = 0; i < MT; i++) {
            const __m512 x0 = _mm512_loadu_ps(x + i * ldx + QK * b), x1 = _mm512_loadu_ps(x + i * ldx + QK * b + 16);
            for (int r = 0; r < RT; r++) {
                acc[r][i][0] = _mm512_fmadd_ps(wl[r], x0, acc[r][i][0]);
                acc[r][i][1] = _mm512_fmadd_ps(wh[r], x1, acc[r][i][1]);
            }
        }
    }
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) out[r * MAX_TILE + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
}

static inline __attribute__((always_inline)) void q8_tile(const int RT, const int MT, const float *x, int64_t ldx,
                                                          int64_t nb, const int8_t *q, int64_t ldq, const float *df,
                                                          float *out) {
    __m512 acc[MAX_RT][MAX_TILE][2];
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 w0[MAX_RT], w1[MAX_RT];
        for (int r = 0; r < RT; r++) {
            const int8_t *qb = q + r * ldq + QK * b;
            const __m512 vd = _mm512_set1_ps(df[r * nb + b]);
            w0[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb))), vd);
            w1[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16)))), vd);
        }
        for (int i = 0; i < MT; i++) {
            const __m512 x0 = _mm512_loadu_ps(x + i * ldx + QK * b), x1 = _mm512_loadu_ps(x + i * ldx + QK * b + 16);
            for (int r = 0; r < RT; r++) {
                acc[r][i][0] = _mm512_fmadd_ps(w0[r], x0, acc[r][i][0]);
                acc[r][i][1] = _mm512_fmadd_ps(w1[r], x1, acc[r][i][1]);
            }
        }
    }
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) out[r * MAX_TILE + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
}

#elif defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void q4_tile(const int RT, const int MT, const float *x, int64_t ldx,
                                                          int64_t nb, const uint8_t *q, int64_t ldq, const float *df,
                                                          const float *mf, float *out) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int r = 0; r < RT; r++) {
        __m256 acc[MAX_TILE][4];
        for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + r * ldq + 16 * b));
            const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            const __m256 vd = _mm256_set1_ps(df[r * nb + b]), vm = _mm256_set1_ps(mf[r * nb + b]);
            __m256 w[4];
            w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
            w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
            w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
            w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
            for (int i = 0; i < MT; i++) {
                const float *xb = x + i * ldx + QK * b;
                for (int j = 0; j < 4; j++) acc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + 8 * j), acc[i][j]);
            }
        }
        for (int i = 0; i < MT; i++)
            out[r * MAX_TILE + i] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]),
                                                          _mm256_add_ps(acc[i][2], acc[i][3])));
    }
}

static inline __attribute__((always_inline)) void q8_tile(const int RT, const int MT, const float *x, int64_t ldx,
                                                          int64_t nb, const int8_t *q, int64_t ldq, const float *df,
                                                          float *out) {
    for (int r = 0; r < RT; r++) {
        __m256 acc[MAX_TILE][4];
        for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256 vd = _mm256_set1_ps(df[r * nb + b]);
            __m256 w[4];
            for (int j = 0; j < 4; j++) {
                const __m128i raw = _mm_loadl_epi64((const __m128i *)(q + r * ldq + QK * b + 8 * j));
                w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), vd);
            }
            for (int i = 0; i < MT; i++) {
                const float *xb = x + i * ldx + QK * b;
                for (int j = 0; j < 4; j++) acc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + 8 * j), acc[i][j]);
            }
        }
        for (int i = 0; i < MT; i++)
            out[r * MAX_TILE + i] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]),
                                                          _mm256_add_ps(acc[i][2], acc[i][3])));
    }
}

#else /* portable C: correct everywhere, vectorised as far as the compiler manages */
static inline void q4_tile(const int RT, const int MT, const float *x, int64_t ldx, int64_t nb, const uint8_t *q,
                           int64_t ldq, const float *df, const float *mf, float *out) {
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) {
            float acc[QK] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = x + i * ldx + QK * b, d = df[r * nb + b], m = mf[r * nb + b];
                for (int j = 0; j < 16; j++) {
                    const uint8_t byte = q[r * ldq + 16 * b + j];
                    acc[j] = fmaf(fmaf((float)(byte & 0x0F), d, m), xb[j], acc[j]);
                    acc[j + 16] = fmaf(fmaf((float)(byte >> 4), d, m), xb[j + 16], acc[j + 16]);
                }
            }
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += acc[j];
            out[r * MAX_TILE + i] = s;
        }
}

static inline void q8_tile(const int RT, const int MT, const float *x, int64_t ldx, int64_t nb, const int8_t *q,
                           int64_t ldq, const float *df, float *out) {
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) {
            float acc[QK] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = x + i * ldx + QK * b;
                for (int j = 0; j < QK; j++) acc[j] = fmaf((float)q[r * ldq + QK * b + j] * df[r * nb + b], xb[j], acc[j]);
            }
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += acc[j];
            out[r * MAX_TILE + i] = s;
        }
}
#endif

/* Tiles of RT weight rows x MT activation rows; both are compile-time constants in each call, so
 * the accumulators live in registers. Many rows of x: tall tiles amortise dequantizing a block;
 * few: wide tiles give the FMAs independent chains. Any tiling gives the same y (see q4_tile). */
#define TILES(CALL)                                  \
    if (mt == 8) CALL(1, 8);                         \
    else if (mt >= 4) { mt = 4; CALL(2, 4); }        \
    else if (mt >= 2) { mt = 2; CALL(4, 2); }        \
    else CALL(4, 1);

static inline void tile_rows(const argen_qweight *w, const float *x, int64_t ldx, int mt_max, int64_t r, int rt,
                             const float *df, const float *mf, float *out, int *mt_done) {
    const int64_t K = w->k, nb = K / QK;
    int mt = mt_max;
    /* A tile of fewer weight rows than the table says (the last rows of a split): one row at a time,
     * which computes the same values. */
#define CALL_Q(RT, MT)                                                                                    \
    do {                                                                                                  \
        if (rt == (RT)) {                                                                                 \
            if (w->fmt == FMT_Q8_0) q8_tile(RT, MT, x, ldx, nb, (const int8_t *)w->qs + r * K, K, df, out); \
            else q4_tile(RT, MT, x, ldx, nb, (const uint8_t *)w->qs + r * (K / 2), K / 2, df, mf, out);     \
        } else {                                                                                          \
            for (int rr = 0; rr < rt; rr++) {                                                             \
                if (w->fmt == FMT_Q8_0)                                                                   \
                    q8_tile(1, MT, x, ldx, nb, (const int8_t *)w->qs + (r + rr) * K, K, df + rr * nb, out + rr * MAX_TILE); \
                else                                                                                      \
                    q4_tile(1, MT, x, ldx, nb, (const uint8_t *)w->qs + (r + rr) * (K / 2), K / 2, df + rr * nb, \
                            mf + rr * nb, out + rr * MAX_TILE);                                           \
            }                                                                                             \
        }                                                                                                 \
    } while (0)
    TILES(CALL_Q)
#undef CALL_Q
    *mt_done = mt;
}

void argen_qmatmul_rows(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                        int64_t r0, int64_t r1) {
    const int64_t nb = w->k / QK;
    float df[MAX_RT * nb], mf[MAX_RT * nb], out[MAX_RT * MAX_TILE];
    for (int64_t i0 = 0; i0 < M;) {
        const int want = (int)(M - i0 < MAX_TILE ? M - i0 : MAX_TILE);
        int done = want;
        /* Weight rows in groups of MAX_RT (wide tiles use them all; tall ones fewer), scales converted once. */
        for (int64_t r = r0; r < r1; r += MAX_RT) {
            const int rows = (int)(r1 - r < MAX_RT ? r1 - r : MAX_RT);
            for (int rr = 0; rr < rows; rr++)
                row_scales(w->fmt, w->d + (r + rr) * nb, w->m ? w->m + (r + rr) * nb : w->d, nb, df + rr * nb, mf + rr * nb);
            int rt_table = want == 8 ? 1 : want >= 4 ? 2 : 4;
            for (int rs = 0; rs < rows; rs += rt_table) {
                const int rt = rows - rs < rt_table ? rows - rs : rt_table;
                tile_rows(w, x + i0 * ldx, ldx, want, r + rs, rt, df + rs * nb, mf + rs * nb, out, &done);
                for (int rr = 0; rr < rt; rr++) {
                    const float b = w->bias ? w->bias[r + rs + rr] : 0.0f;
                    for (int i = 0; i < done; i++) y[(i0 + i) * ldy + r + rs + rr] = out[rr * MAX_TILE + i] + b;
                }
            }
        }
        i0 += done;
    }
}

/* y[i][r] = sum_k x[i][k] * W[r][k] (+ bias[r]) for a Q4_0 / Q4_1 / Q8_0 weight W [N][K]. */
void argen_qmatmul(const argen_qweight *w, int nthreads, const float *x, int64_t M, int64_t ldx, float *y,
                   int64_t ldy) {
    const int64_t N = w->n;
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        argen_qmatmul_rows(w, x, M, ldx, y, ldy, N * t / nt, N * (t + 1) / nt);
    }
}

/* W as fp32 [N][K], exactly gguf-py's dequantization (for prefills, which MKL's GEMM does best). */
void argen_dequantize(int fmt, int nthreads, int64_t K, const void *qs, const uint16_t *d, const uint16_t *m, int64_t N, float *w) {
    const int64_t nb = K / QK;
#pragma omp parallel num_threads(nthreads)
    {
        float df[nb], mf[nb];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            row_scales(fmt, d + r * nb, m ? m + r * nb : d, nb, df, mf);
            float *wr = w + r * K;
            for (int64_t b = 0; b < nb; b++) {
                if (fmt == FMT_Q8_0) {
                    const int8_t *q = (const int8_t *)qs + r * K + QK * b;
                    for (int j = 0; j < QK; j++) wr[QK * b + j] = (float)q[j] * df[b];
                } else {
                    const uint8_t *q = (const uint8_t *)qs + r * (K / 2) + 16 * b;
                    for (int j = 0; j < 16; j++) {
                        wr[QK * b + j] = fmaf((float)(q[j] & 0x0F), df[b], mf[b]);
                        wr[QK * b + j + 16] = fmaf((float)(q[j] >> 4), df[b], mf[b]);
                    }
                }
            }
        }
    }
}
