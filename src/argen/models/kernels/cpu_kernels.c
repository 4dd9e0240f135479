/* argen's CPU kernels: GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) times fp32 activations.
 *
 * Why hand-written: torch's stock weight-only kernels are slower than fp32 on these CPUs
 * (`_weight_int4pack_mm_for_cpu` 126 ms per SmolLM2 step against 25 ms for fp32 GEMV), and the
 * libraries that read GGUF blocks in registers (ggml) always quantize the activations to 8 bits
 * too. These kernels keep the GGUF's bytes (4 or 8 bits per weight plus an fp16 scale, and for
 * Q4_1 an fp16 minimum, per block of 32), dequantize in registers exactly as gguf-py's reference
 * dequantizer does (w = d * q + m is one rounding, as fma computes it), and multiply with fp32
 * activations and fp32 accumulation. So the weights are bit for bit the fp32 model's, and only the
 * summation order differs from a dense fp32 matmul.
 *
 * Layout (repacked at load time by quant.py's `pack`, same bytes as the GGUF's blocks, in another
 * order): the weight rows in groups of VW (the vector width: 8 on AVX2, 16 on AVX-512), the last
 * group padded with zero rows. Each group has, for each block b of 32 columns, one record:
 *   d[VW] fp16 (the group's rows' scales), then for Q4_1 m[VW] fp16 (their minimums), then codes:
 *   Q4: 16 x VW bytes: byte p * VW + r = q[r][32b + 2p] | q[r][32b + 2p + 1] << 4
 *   Q8: 32 x VW int8:  byte k * VW + r = q[r][32b + k]
 * so one vector load gives one column of VW output rows (ggml's q4_0x8 interleaving has the same
 * aim). Records are stored chunk by chunk (CHUNK groups), block-major within a chunk: the order the
 * kernel reads them. Q4_0 has no m: w = d * (q - 8) = fma(q, d, -8 d), exactly.
 *
 * The kernel is an outer product: for each column k, a vector of VW weights times x[i][k] of each of
 * MT activation rows (the same value in every lane), into MT x NT vector accumulators (NT groups at
 * once): no horizontal sums, one weight dequantization per MT FMAs, and tile shapes sized for the
 * register file (16 vectors on AVX2, 32 on AVX-512). Many rows run near the FMA peak (report:
 * benchmarks/kernel_peak/); one row is bound by the dequantization (about 3.5 instructions per vector
 * of weights on top of its one FMA), which exactness requires.
 *
 * Summation order (fixed, whatever M, the tile or the thread: batch invariance): for each output
 * y[i][r], each block's 32 products are summed in column order by one fma chain from 0,
 * s_b = fma(x[k], w[k], ... fma(x[32b], w[32b], 0)), and the blocks' sums are added in block
 * order, t = ((s_0 + s_1) + s_2) + ..., then y = t + bias. Its rounding error is at most
 * (31 + K/32) u sum_k |x_k w_k| (u = 2^-24) to first order, plus u |y| for the bias: 50 u for
 * K = 576, 79 u for K = 1536.
 *
 * x is [M][K] fp32 (rows ldx apart), y is [M][N] fp32 (rows ldy apart), bias [N] or NULL.
 * nthreads: the caller's thread count (torch's), passed because OpenMP's is per calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

const char *argen_isa(void) {
#if defined(ARGEN_SIMD_AVX512) && defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(ARGEN_SIMD_AVX512)
    return "avx512";
#elif defined(ARGEN_SIMD_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

/* The rows per group this build packs and reads (its vector width). */
int argen_width(void) { return VW; }

static inline int64_t codes_at(int fmt) { return (fmt == FMT_Q4_1 ? 4 : 2) * VW; }
static inline int64_t record_bytes(int fmt) { return codes_at(fmt) + (fmt == FMT_Q8_0 ? 32 : 16) * VW; }

/* Groups per chunk: the unit of the layout (records block-major within it) and of the loops. */
#define CHUNK 64
int argen_chunk(void) { return CHUNK; }

/* Byte offset of group g's record for block b. */
static inline int64_t record_at(const argen_qweight *w, int64_t g, int64_t b) {
    const int64_t G = argen_groups(w), nb = w->k / QK, c = g / CHUNK;
    const int64_t cg = G - c * CHUNK < CHUNK ? G - c * CHUNK : CHUNK;
    return (c * CHUNK * nb + b * cg + g % CHUNK) * record_bytes(w->fmt);
}

/* Software prefetch. A tile asks for the records PF_AHEAD tile steps ahead of those it computes on:
 * further in this block's run, else in the run it reads next (prefetch_next: the same groups' next
 * block, or the next chunk's first). Why: one row's tile does little arithmetic per byte, so without
 * it every new cache line stalls the tile (the hardware prefetcher alone falls behind, most where
 * threads split a chunk and each reads every other run of records). Measured on an AMD EPYC Zen 4,
 * 2 threads, one-row decode step: 10.4 -> 8.7 ms (AVX-512 build), 9.1 -> 7.3 ms (AVX2 build); the
 * a8 path, bound by bandwidth, gained nothing and has none. A prefetch never faults: a guess past the
 * end costs nothing. Override PF_AHEAD (0: off) with -D to re-measure. */
static inline const uint8_t *prefetch_next(const argen_qweight *w, int64_t ga, int64_t gb, int64_t g1, int64_t b) {
    if (b + 1 < w->k / QK) return w->data + record_at(w, ga, b + 1);
    return w->data + record_at(w, gb < g1 ? gb : ga, 0);
}

#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif
/* One block of 32 columns for MT activation rows and ng groups, NT at a time (ng a multiple of NT),
 * whose records for this block follow each other from r0: group g's block sum for row i goes to
 * tot[(g * MT + i) * VW], stored on the first block and added after. The activation (i, k) is
 * xe[(k * MT + i) * XB] if `expanded`, else x[i * ldx + k]. MT, NT, fmt and expanded are
 * constants at every call, so the accumulators live in registers and the loops unroll. */
ARGEN_INLINE void block_tile(const int fmt, const int MT, const int NT, const int expanded, const uint8_t *r0,
                             const uint8_t *pf, int ng, const float *x, int64_t ldx, int first, float *tot) {
    const int64_t rec = record_bytes(fmt), at = codes_at(fmt);
    const vi low = vi_set1(15);
#define X(i, k) (expanded ? vxb(x + ((k) * MT + (i)) * XB) : vset1(x[(i) * ldx + (k)]))
    for (int g = 0; g < ng; g += NT) {
        const uint8_t *r = r0 + g * rec;
        if (PF_AHEAD) { /* see prefetch_next */
            const int ga = g + PF_AHEAD * NT;
            const uint8_t *p = ga < ng ? r0 + ga * rec : pf + (ga - ng) * rec;
            for (int64_t o = 0; o < NT * rec; o += 64) __builtin_prefetch(p + o, 0, 3);
        }
        vf d[4], m[4], acc[16][4]; /* fixed sizes: [MT][NT] used, held in registers */
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            d[t] = vload_f16((const uint16_t *)(r + t * rec));
            m[t] = fmt == FMT_Q4_1 ? vload_f16((const uint16_t *)(r + t * rec + 2 * VW)) : vmul(d[t], vset1(-8.0f));
        }
#pragma GCC unroll 16
        for (int i = 0; i < MT; i++)
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) acc[i][t] = vzero();
        if (fmt == FMT_Q8_0) {
#pragma GCC unroll 2
            for (int k = 0; k < QK; k++) {
#pragma GCC unroll 4
                for (int t = 0; t < NT; t++) {
                    const vf w = vmul(vcvt_i2f(vload_s8((const int8_t *)(r + t * rec + at + k * VW))), d[t]);
#pragma GCC unroll 16
                    for (int i = 0; i < MT; i++) acc[i][t] = vfma(X(i, k), w, acc[i][t]);
                }
            }
        } else {
#pragma GCC unroll 2
            for (int p = 0; p < QK / 2; p++) {
#pragma GCC unroll 4
                for (int t = 0; t < NT; t++) {
                    const vi q = vload_u8(r + t * rec + at + p * VW);
                    const vf lo = vfma(vcvt_i2f(vi_and(q, low)), d[t], m[t]);
#pragma GCC unroll 16
                    for (int i = 0; i < MT; i++) acc[i][t] = vfma(X(i, 2 * p), lo, acc[i][t]);
                    const vf hi = vfma(vcvt_i2f(vi_srli(q, 4)), d[t], m[t]);
#pragma GCC unroll 16
                    for (int i = 0; i < MT; i++) acc[i][t] = vfma(X(i, 2 * p + 1), hi, acc[i][t]);
                }
            }
        }
#pragma GCC unroll 16
        for (int i = 0; i < MT; i++)
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                float *o = tot + ((g + t) * MT + i) * VW;
                vstore(o, first ? acc[i][t] : vadd(vload(o), acc[i][t]));
            }
    }
#undef X
}

/* Tile shapes: MT activation rows x NT groups, by the rows left, few enough accumulators to stay
 * in registers (16 on AVX2, 32 on AVX-512). Tiles of EXPANDED rows or more read the activations
 * from `xe` (see XB). Many rows are bound by FMAs and want at least 8 accumulators for the FMA
 * latency; few rows are bound by loading and dequantizing the weights, and there fewer groups a tile
 * measured faster. On AMD Zen 4 (the kernels' matmuls, and the one-row decode step, interleaved in
 * one process): AVX-512 one row 14.2 ms a step with 4 groups against 10.8 with 2; 2-3 rows 10-15%
 * faster with 2 groups than 4; 4-7 rows 10-18% faster with 1 than 2. AVX2 one row 10.8 ms with 4
 * groups against 11.9 with 2 (1 thread); 2 rows 6-7% faster with 2 groups than 4 and 4 rows 5-6% with 1
 * than 2 (benchmarks/kernel_ab/avx2-tiles), while 3 rows ran 20% slower with 1 group than 2 (a trial
 * build in the same harness). Any tiling gives the same sums. */
#if defined(ARGEN_SIMD_PORTABLE)
/* Portable C: a few shapes (they compile slowly and run slowly anyway). */
#define MT_MAX 4
#define EXPANDED 3
static inline int tile_groups(int mt) { return mt >= 3 ? 1 : 2; }
#define SHAPES(X, F) X(F, 4, 1) X(F, 3, 1) X(F, 2, 2) X(F, 2, 1) X(F, 1, 2) X(F, 1, 1)
#elif VW >= 16
#define MT_MAX 16
#define EXPANDED 8
static inline int tile_groups(int mt) { return mt >= 4 ? 1 : 2; }
#define SHAPES(X, F)                                                                                            \
    X(F, 16, 1) X(F, 15, 1) X(F, 14, 1) X(F, 13, 1) X(F, 12, 1) X(F, 11, 1) X(F, 10, 1) X(F, 9, 1) X(F, 8, 1)     \
    X(F, 7, 1) X(F, 6, 1) X(F, 5, 1) X(F, 4, 1) X(F, 3, 2) X(F, 3, 1) X(F, 2, 2) X(F, 2, 1) X(F, 1, 2) X(F, 1, 1)
#else
#define MT_MAX 8
#define EXPANDED 5
static inline int tile_groups(int mt) { return mt >= 4 ? 1 : mt >= 2 ? 2 : 4; }
#define SHAPES(X, F)                                                                                            \
    X(F, 8, 1) X(F, 7, 1) X(F, 6, 1) X(F, 5, 1) X(F, 4, 1) X(F, 3, 2) X(F, 3, 1) X(F, 2, 2) X(F, 2, 1)         \
    X(F, 1, 4) X(F, 1, 2) X(F, 1, 1)
#endif

#define TILE_FN(F, MT, NT)                                                                                      \
    static void tile_##F##_##MT##_##NT(const uint8_t *r0, const uint8_t *pf, int ng, const float *x, int64_t ldx, \
                                       int first, float *tot) {                                                \
        block_tile(F, MT, NT, MT >= EXPANDED, r0, pf, ng, x, ldx, first, tot);                                 \
    }
#define TILE_CASE(F, MT, NT)                                                                                    \
    case MT * 16 + NT:                                                                                          \
        tile_##F##_##MT##_##NT(r0, pf, ng, x, ldx, first, tot);                                                 \
        return;
SHAPES(TILE_FN, FMT_Q4_0)
SHAPES(TILE_FN, FMT_Q4_1)
SHAPES(TILE_FN, FMT_Q8_0)

static void run_tile(int fmt, int mt, int nt, const uint8_t *r0, const uint8_t *pf, int ng, const float *x,
                     int64_t ldx, int first, float *tot) {
    if (fmt == FMT_Q4_0) {
        switch (mt * 16 + nt) { SHAPES(TILE_CASE, FMT_Q4_0) }
    } else if (fmt == FMT_Q4_1) {
        switch (mt * 16 + nt) { SHAPES(TILE_CASE, FMT_Q4_1) }
    } else {
        switch (mt * 16 + nt) { SHAPES(TILE_CASE, FMT_Q8_0) }
    }
}

/* y rows i0 .. i0 + mt for groups ga .. ga + ng from the tile totals, plus the bias. */
static void store_rows(const argen_qweight *w, const float *tot, int64_t ga, int ng, int64_t i0, int mt, float *y,
                       int64_t ldy) {
    for (int g = 0; g < ng; g++) {
        const int64_t r0 = (ga + g) * VW, lanes = w->n - r0 < VW ? w->n - r0 : VW;
        for (int i = 0; i < mt; i++) {
            const float *o = tot + (g * mt + i) * VW;
            float *yr = y + (i0 + i) * ldy + r0;
            if (w->bias)
                for (int64_t r = 0; r < lanes; r++) yr[r] = o[r] + w->bias[r0 + r];
            else
                memcpy(yr, o, sizeof(float) * lanes);
        }
    }
}

/* -- the a8 path: activations rounded to int8 per block of 32, as llama.cpp computes -----------
 *
 * Each activation row's block b becomes int8 codes qx with a scale dx = max|x| / 127 (qx = x / dx
 * rounded to nearest, even on ties), and sq = sum qx. A weight block then meets it as integers:
 * isum = sum_k q_k qx_k, exact, and its contribution is d dx isum (Q8_0), d dx (isum - 8 sq) (Q4_0)
 * or d dx isum + m (dx sq) (Q4_1), rounded in that order; the blocks' contributions are added in
 * block order, then the bias: still a fixed order per row, so the path stays batch-invariant.
 * The a8 layout differs from the fp32 one only in the codes' order, for vdot's 4 columns a lane:
 *   Q4: 4 x 4VW bytes: byte u * 4VW + 4r + j = q[r][32b + 4u + j] | q[r][32b + 16 + 4u + j] << 4
 *   Q8: 8 x 4VW int8:  byte t * 4VW + 4r + j = q[r][32b + 4t + j] */
typedef struct {
    int8_t *q;     /* [M][K] */
    float *d, *s;  /* [M][K/32]: dx and dx * sq */
    int32_t *sq;   /* [M][K/32] */
} act8;

static void quantize_rows(const float *x, int64_t M, int64_t ldx, int64_t K, act8 a) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < M; i++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + i * ldx + QK * b;
            vf mx = vzero();
            for (int k = 0; k < QK; k += VW) mx = vmax(mx, vmax(vload(xb + k), vsub(vzero(), vload(xb + k))));
            const float amax = vhmax(mx), d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t q[QK], sum = 0;
            for (int k = 0; k < QK; k += VW) {
                const vi qv = vcvt_f2i(vround(vmul(vload(xb + k), vset1(id))));
                memcpy(q + k, &qv, sizeof qv);
            }
            for (int k = 0; k < QK; k++) {
                a.q[i * K + QK * b + k] = (int8_t)q[k];
                sum += q[k];
            }
            a.d[i * nb + b] = d;
            a.sq[i * nb + b] = sum;
            a.s[i * nb + b] = d * (float)sum;
        }
}

/* One block for MT activation rows and ng groups whose records for this block follow each other
 * from r0: group g's contribution for row i to tot[(g * MT + i) * VW] (stored on the first block). */
ARGEN_INLINE void block_tile_a8(const int fmt, const int MT, const uint8_t *r0, int ng, act8 a, int64_t K,
                                int64_t b, int first, float *tot) {
    const int64_t rec = record_bytes(fmt), at = codes_at(fmt), nb = K / QK;
    for (int g = 0; g < ng; g++) {
        const uint8_t *r = r0 + g * rec;
        vi isum[16];
#pragma GCC unroll 16
        for (int i = 0; i < MT; i++) isum[i] = vi_set1(0);
        if (fmt == FMT_Q8_0) {
#pragma GCC unroll 8
            for (int t = 0; t < QK / 4; t++) {
                const vb w = vb_load(r + at + t * 4 * VW);
#pragma GCC unroll 16
                for (int i = 0; i < MT; i++) isum[i] = vdot_s8s8(isum[i], w, vb_bcast4(a.q + i * K + QK * b + 4 * t));
            }
        } else {
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                const vb raw = vb_load(r + at + u * 4 * VW), lo = vb_lo4(raw), hi = vb_hi4(raw);
#pragma GCC unroll 16
                for (int i = 0; i < MT; i++) {
                    const int8_t *xq = a.q + i * K + QK * b;
                    isum[i] = vdot_u8s8(vdot_u8s8(isum[i], lo, vb_bcast4(xq + 4 * u)), hi, vb_bcast4(xq + 16 + 4 * u));
                }
            }
        }
        const vf d = vload_f16((const uint16_t *)r);
        const vf m = fmt == FMT_Q4_1 ? vload_f16((const uint16_t *)(r + 2 * VW)) : vzero();
#pragma GCC unroll 16
        for (int i = 0; i < MT; i++) {
            const int64_t ib = i * nb + b;
            const vi n = fmt == FMT_Q4_0 ? vi_sub(isum[i], vi_set1(8 * a.sq[ib])) : isum[i];
            const vf dd = vmul(d, vset1(a.d[ib]));
            const vf v = fmt == FMT_Q4_1 ? vfma(vcvt_i2f(n), dd, vmul(m, vset1(a.s[ib]))) : vmul(vcvt_i2f(n), dd);
            float *o = tot + (g * MT + i) * VW;
            vstore(o, first ? v : vadd(vload(o), v));
        }
    }
}

#define A8_FN(F, MT)                                                                                            \
    static void a8_##F##_##MT(const uint8_t *r0, int ng, act8 a, int64_t K, int64_t b, int first, float *tot) {   \
        block_tile_a8(F, MT, r0, ng, a, K, b, first, tot);                                                     \
    }
#define A8_CASE(F, MT)                                                                                          \
    case MT:                                                                                                    \
        a8_##F##_##MT(r0, ng, a, K, b, first, tot);                                                            \
        return;
#if defined(ARGEN_SIMD_PORTABLE)
#define A8_SHAPES(X, F) X(F, 4) X(F, 3) X(F, 2) X(F, 1)
#elif VW >= 16
#define A8_SHAPES(X, F)                                                                                         \
    X(F, 16) X(F, 15) X(F, 14) X(F, 13) X(F, 12) X(F, 11) X(F, 10) X(F, 9) X(F, 8) X(F, 7) X(F, 6) X(F, 5) X(F, 4) \
    X(F, 3) X(F, 2) X(F, 1)
#else
#define A8_SHAPES(X, F) X(F, 8) X(F, 7) X(F, 6) X(F, 5) X(F, 4) X(F, 3) X(F, 2) X(F, 1)
#endif
A8_SHAPES(A8_FN, FMT_Q4_0)
A8_SHAPES(A8_FN, FMT_Q4_1)
A8_SHAPES(A8_FN, FMT_Q8_0)

static void run_tile_a8(int fmt, int mt, const uint8_t *r0, int ng, act8 a, int64_t K, int64_t b, int first,
                        float *tot) {
    if (fmt == FMT_Q4_0) {
        switch (mt) { A8_SHAPES(A8_CASE, FMT_Q4_0) }
    } else if (fmt == FMT_Q4_1) {
        switch (mt) { A8_SHAPES(A8_CASE, FMT_Q4_1) }
    } else {
        switch (mt) { A8_SHAPES(A8_CASE, FMT_Q8_0) }
    }
}

/* The same loops as the fp32 path's (below), on activations quantized once per call. */
static void qmatmul_groups_a8(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                              int64_t g0, int64_t g1) {
    const int64_t K = w->k, nb = K / QK;
    char *mem = malloc((size_t)(M * K + M * nb * 12));
    if (!mem) abort(); /* M <= 64 rows: a few hundred KB at most */
    act8 a = {(int8_t *)mem, (float *)(mem + M * K), (float *)(mem + M * K + M * nb * 4),
              (int32_t *)(mem + M * K + M * nb * 8)};
    quantize_rows(x, M, ldx, K, a);
    float tot[CHUNK * MT_MAX * VW];
    for (int64_t ga = g0; ga < g1;) {
        const int64_t c = ga / CHUNK, gb = (c + 1) * CHUNK < g1 ? (c + 1) * CHUNK : g1;
        const int ng = (int)(gb - ga);
        for (int64_t i0 = 0; i0 < M;) {
            const int mt = (int)(M - i0 < MT_MAX ? M - i0 : MT_MAX);
            const act8 at = {a.q + i0 * K, a.d + i0 * nb, a.s + i0 * nb, a.sq + i0 * nb};
            for (int64_t b = 0; b < nb; b++) run_tile_a8(w->fmt, mt, w->data + record_at(w, ga, b), ng, at, K, b, b == 0, tot);
            store_rows(w, tot, ga, ng, i0, mt, y, ldy);
            i0 += mt;
        }
        ga = gb;
    }
    free(mem);
}

/* Groups [g0, g1) chunk by chunk; in a chunk, tiles of activation rows, each over every block
 * (the chunk's weights stay in cache for the next tile) and within a block over the chunk's groups
 * (a tile's activations, expanded once per block, serve them all). */
void argen_qmatmul_groups(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                          int64_t g0, int64_t g1) {
    if (w->act8) {
        qmatmul_groups_a8(w, x, M, ldx, y, ldy, g0, g1);
        return;
    }
    const int64_t nb = w->k / QK, rec = record_bytes(w->fmt);
    float tot[CHUNK * MT_MAX * VW];
    float xe[QK * MT_MAX * XB] __attribute__((aligned(64)));
    for (int64_t ga = g0; ga < g1;) {
        const int64_t c = ga / CHUNK, gb = (c + 1) * CHUNK < g1 ? (c + 1) * CHUNK : g1;
        const int ng = (int)(gb - ga);
        for (int64_t i0 = 0; i0 < M;) {
            const int mt = (int)(M - i0 < MT_MAX ? M - i0 : MT_MAX), nt = tile_groups(mt);
            const float *xt = x + i0 * ldx;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *r0 = w->data + record_at(w, ga, b), *pf = prefetch_next(w, ga, gb, g1, b);
                const float *xs = xt + QK * b;
                int64_t lds = ldx;
                if (mt >= EXPANDED) {
                    for (int k = 0; k < QK; k++)
                        for (int i = 0; i < mt; i++) vxb_put(xe + (k * mt + i) * XB, xt[i * ldx + QK * b + k]);
                    xs = xe;
                    lds = 0;
                }
                /* NT groups at a time, then narrower tiles for the rest: the same sums */
                for (int g = 0, step = nt; g < ng; step /= 2) {
                    const int n = (ng - g) / step * step;
                    if (n) run_tile(w->fmt, mt, step, r0 + g * rec, pf, n, xs, lds, b == 0, tot + g * mt * VW);
                    g += n;
                }
            }
            store_rows(w, tot, ga, ng, i0, mt, y, ldy);
            i0 += mt;
        }
        ga = gb;
    }
}

/* y = x W^T (+ bias), the weight's groups split evenly between the threads. */
void argen_qmatmul(const argen_qweight *w, int nthreads, const float *x, int64_t M, int64_t ldx, float *y,
                   int64_t ldy) {
    const int64_t G = argen_groups(w);
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        argen_qmatmul_groups(w, x, M, ldx, y, ldy, G * t / nt, G * (t + 1) / nt);
    }
}

/* Weight row `row`, block b, as 32 fp32 values: the same arithmetic as the tile's (either layout). */
static inline void dequantize_block(const argen_qweight *w, int64_t row, int64_t b, float *out) {
    const int64_t at = codes_at(w->fmt);
    const uint8_t *r = w->data + record_at(w, row / VW, b), *codes = r + at;
    const int lane = (int)(row % VW);
    const float d = half_to_float(((const uint16_t *)r)[lane]);
    if (w->fmt == FMT_Q8_0) {
        for (int k = 0; k < QK; k++) {
            const int64_t i = w->act8 ? (k / 4) * 4 * VW + 4 * lane + k % 4 : k * VW + lane;
            out[k] = d * (float)((const int8_t *)codes)[i];
        }
        return;
    }
    const float m = w->fmt == FMT_Q4_1 ? half_to_float(((const uint16_t *)(r + 2 * VW))[lane]) : -8.0f * d;
    for (int k = 0; k < QK; k++) {
        int q;
        if (w->act8) {
            const uint8_t byte = codes[(k % 16 / 4) * 4 * VW + 4 * lane + k % 4];
            q = k < 16 ? byte & 0x0F : byte >> 4;
        } else {
            const uint8_t byte = codes[(k / 2) * VW + lane];
            q = k % 2 ? byte >> 4 : byte & 0x0F;
        }
        out[k] = fmaf((float)q, d, m);
    }
}

/* W as fp32 [N][K], exactly gguf-py's dequantization (for prefills, which MKL's GEMM does best). */
void argen_dequantize(const argen_qweight *w, int nthreads, float *out) {
    const int64_t K = w->k, nb = K / QK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < w->n; r++)
        for (int64_t b = 0; b < nb; b++) dequantize_block(w, r, b, out + r * K + QK * b);
}

/* Rows ids[0..n) of W as fp32 [n][K] (token embeddings from a tied vocabulary matrix). */
void argen_dequantize_rows(const argen_qweight *w, const int64_t *ids, int64_t n, float *out) {
    const int64_t K = w->k;
    for (int64_t i = 0; i < n; i++)
        for (int64_t b = 0; b < K / QK; b++) dequantize_block(w, ids[i], b, out + i * K + QK * b);
}

/* The FMA peak: each thread runs `iters` steps of 12 independent fma chains (enough to cover the
 * FMA latency on every x86 core here) on vectors of this build's width. Returns the floating-point
 * operations done by all threads; seconds[t] gets thread t's CPU time (robust to other processes
 * sharing the cores), seconds[nthreads] the wall time of the whole region. */
double argen_fma_peak(int nthreads, int64_t iters, double *seconds) {
    double sink = 0.0, start = omp_get_wtime();
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    {
        struct timespec t0, t1;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
        const vf a = vset1(0.999999f), c = vset1(1e-3f);
        vf acc[12];
        for (int j = 0; j < 12; j++) acc[j] = vset1((float)j);
        for (int64_t it = 0; it < iters; it++)
#pragma GCC unroll 12
            for (int j = 0; j < 12; j++) acc[j] = vfma(acc[j], a, c);
        for (int j = 0; j < 12; j++) sink += vhsum(acc[j]);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
        seconds[omp_get_thread_num()] = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    }
    seconds[nthreads] = omp_get_wtime() - start;
    return sink > -1.0 ? 2.0 * 12 * VW * (double)iters * nthreads : 0.0; /* (sink keeps the loop alive) */
}
