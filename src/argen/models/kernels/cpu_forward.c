/* A whole forward pass of a Llama-family decoder, in C, for a few new tokens per sequence: the
 * decode step (one token per sequence), speculative verification (a chain or tree of drafts under
 * a mask), beams and batched serving rows. Prefills go through torch (runtime.py's path).
 *
 * Why: with the weights 4-bit, the matmuls of a SmolLM2 step take a few ms, and torch's per-op
 * dispatch of ~15 ops per layer (norms, RoPE, cache writes, attention) cost more than that.
 *
 * Batch invariance: each token's arithmetic is the same whatever else is in the pass. Matmuls are
 * (see cpu_kernels.c); each (token, head) attention is done by one thread, over the keys it sees
 * in position order (the cached prefix, then the new tokens the mask lets it see), so a token
 * verified behind drafts, or decoded beside other sequences, gets bit for bit the hidden state that
 * decoding it alone would give.
 *
 * Numerics follow Hugging Face's Llama: RMSNorm as x * 1/sqrt(mean(x^2) + eps) then times the
 * weight, RoPE as q * cos + rotate_half(q) * sin with each product rounded, softmax attention
 * scaled by 1/sqrt(head_dim), SiLU-gated FFN; all fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    argen_qweight qkv, o, gate_up, down;
} argen_layer;

typedef struct {
    int32_t n_layers, n_heads, n_kv_heads, head_dim, hidden, inter;
    float eps;
    int32_t pad;
    const float *rope_cos, *rope_sin; /* [positions][head_dim] */
    const float *final_norm;
    const argen_layer *layers;
} argen_model;

/* -- small vector helpers (deterministic: a fixed order of operations for a given n) --------- */
static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}

static void axpy(float alpha, const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 va = _mm512_set1_ps(alpha);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] = fmaf(alpha, x[i], y[i]);
}

#if defined(__AVX512F__)
/* e^x to about 1 ulp: x = n ln2 + r, a degree-6 polynomial for e^r, times 2^n. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504019f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* s[i] = exp(s[i] - shift): the same value for an element whatever n is (tails are masked). */
static void exp_shifted(float *s, int64_t n, float shift) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(shift);
    for (; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(s + i, k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vs)));
    }
#endif
    for (; i < n; i++) s[i] = expf(s[i] - shift);
}

static void silu_mul(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(k, gate + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* q * cos + rotate_half(q) * sin, each product rounded as torch computes it. */
static void rope(float *v, const float *c, const float *s, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        const float a_cos = a * c[i], b_sin = -b * s[i], b_cos = b * c[i + half], a_sin = a * s[i + half];
        v[i] = a_cos + b_sin;
        v[i + half] = b_cos + a_sin;
    }
}

/* Threads split a weight's output rows; a barrier then makes the result visible to all. */
static void matmul_ld(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int tid, int nt) {
    argen_qmatmul_rows(w, x, M, ldx, y, w->n, w->n * tid / nt, w->n * (tid + 1) / nt);
#pragma omp barrier
}

static void matmul(const argen_qweight *w, const float *x, int64_t M, float *y, int tid, int nt) {
    matmul_ld(w, x, M, w->k, y, tid, nt);
}

/* One packed pass over S segments (a segment: some new tokens of one sequence). Rows (tokens) are
 * laid out segment after segment: segment s owns rows [cu[s], cu[s + 1]). x [rows][H]: embeddings in
 * (overwritten: the residual stream); out [rows][H]: final-normed hidden states.
 *
 * KV memory is paged: kc / vc [layers][blocks][kv heads][block_size][head_dim] with element strides
 * kv_strides (layer, block, head, slot). Segment s's block table is tables[table_cu[s] ..
 * table_cu[s + 1]); its new token j goes to position starts[s] + j, at positions[cu[s] + j] for RoPE.
 * Each new token sees positions [0, starts[s]) and the new tokens j' with mask[mask_at[s] + j * T + j']
 * (T = the segment's token count), or j' <= j where mask_at[s] < 0.
 * plan_attn / plan_ffn: which sub-blocks run (NULL: all). Returns 0, or -1 if memory ran out. */
static inline float *slot_ptr(float *base, const int32_t *table, int64_t block_size, int64_t bs, int64_t ss,
                              int64_t position) {
    return base + table[position / block_size] * bs + (position % block_size) * ss;
}

int argen_forward(const argen_model *m, int nthreads, int64_t S, const int64_t *cu, float *x, float *out,
                  const int64_t *positions, const int64_t *starts, const int32_t *tables, const int64_t *table_cu,
                  int64_t block_size, float *kc, float *vc, const int64_t *kv_strides, const uint8_t *mask,
                  const int64_t *mask_at, const uint8_t *plan_attn, const uint8_t *plan_ffn) {
    const int64_t R = cu[S], H = m->hidden, D = m->head_dim, NH = m->n_heads, NKV = m->n_kv_heads;
    const int64_t QKV = (NH + 2 * NKV) * D, I = m->inter, group = NH / NKV;
    const int64_t wide = QKV > 2 * I ? QKV : 2 * I;
    const int64_t ls = kv_strides[0], bs = kv_strides[1], hs = kv_strides[2], ss = kv_strides[3];
    int64_t max_keys = 1;
    for (int64_t s = 0; s < S; s++) max_keys = starts[s] + cu[s + 1] - cu[s] > max_keys ? starts[s] + cu[s + 1] - cu[s] : max_keys;
    /* row -> segment, for the loops over rows */
    int64_t *seg_of = malloc(sizeof(int64_t) * (R > 0 ? R : 1));
    const int64_t heads_out = NH * D > H ? NH * D : H; /* attention output, then the FFN's */
    float *h = malloc(sizeof(float) * R * H), *big = malloc(sizeof(float) * R * wide);
    float *att = malloc(sizeof(float) * R * heads_out), *tmp = malloc(sizeof(float) * R * (H > I ? H : I));
    float *all_scores = malloc(sizeof(float) * (max_keys + 1) * (nthreads > 0 ? nthreads : 1));
    const int failed = !seg_of || !h || !big || !att || !tmp || !all_scores;
    const float scale = 1.0f / sqrtf((float)D);
    if (!failed) {
        for (int64_t s = 0; s < S; s++)
            for (int64_t r = cu[s]; r < cu[s + 1]; r++) seg_of[r] = s;
#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            float *scores = all_scores + tid * (max_keys + 1);
            for (int64_t l = 0; l < m->n_layers; l++) {
                const argen_layer *L = &m->layers[l];
                float *kl = kc + l * ls, *vl = vc + l * ls;
                if (!plan_attn || plan_attn[l]) {
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++) rms_norm(x + r * H, L->attn_norm, m->eps, H, h + r * H);
                    matmul(&L->qkv, h, R, big, tid, nt);
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++) {
                        const int64_t s = seg_of[r], position = starts[s] + r - cu[s];
                        const int32_t *table = tables + table_cu[s];
                        const float *c = m->rope_cos + positions[r] * D, *sn = m->rope_sin + positions[r] * D;
                        float *row = big + r * QKV;
                        for (int64_t hd = 0; hd < NH + NKV; hd++) rope(row + hd * D, c, sn, D);
                        for (int64_t g = 0; g < NKV; g++) {
                            memcpy(slot_ptr(kl + g * hs, table, block_size, bs, ss, position), row + (NH + g) * D,
                                   sizeof(float) * D);
                            memcpy(slot_ptr(vl + g * hs, table, block_size, bs, ss, position),
                                   row + (NH + NKV + g) * D, sizeof(float) * D);
                        }
                    }
#pragma omp for schedule(static)
                    for (int64_t task = 0; task < R * NH; task++) {
                        const int64_t r = task / NH, hq = task % NH, s = seg_of[r], t = r - cu[s], T = cu[s + 1] - cu[s];
                        const int64_t g = hq / group, start = starts[s];
                        const int32_t *table = tables + table_cu[s];
                        const float *q = big + r * QKV + hq * D;
                        float *kg = kl + g * hs, *vg = vl + g * hs;
                        const uint8_t *visible = mask_at[s] < 0 ? NULL : mask + mask_at[s] + t * T;
                        int64_t n = 0;
                        for (int64_t j = 0; j < start; j++)
                            scores[n++] = dot(q, slot_ptr(kg, table, block_size, bs, ss, j), D) * scale;
                        for (int64_t j = 0; j < T; j++)
                            if (visible ? visible[j] : j <= t)
                                scores[n++] = dot(q, slot_ptr(kg, table, block_size, bs, ss, start + j), D) * scale;
                        float mx = -INFINITY, sum = 0.0f;
                        for (int64_t j = 0; j < n; j++) mx = scores[j] > mx ? scores[j] : mx;
                        exp_shifted(scores, n, mx);
                        for (int64_t j = 0; j < n; j++) sum += scores[j];
                        float *o = att + r * heads_out + hq * D;
                        memset(o, 0, sizeof(float) * D);
                        n = 0;
                        for (int64_t j = 0; j < start; j++) axpy(scores[n++], slot_ptr(vg, table, block_size, bs, ss, j), o, D);
                        for (int64_t j = 0; j < T; j++)
                            if (visible ? visible[j] : j <= t)
                                axpy(scores[n++], slot_ptr(vg, table, block_size, bs, ss, start + j), o, D);
                        const float inv = 1.0f / sum;
                        for (int64_t d = 0; d < D; d++) o[d] *= inv;
                    }
                    matmul_ld(&L->o, att, R, heads_out, tmp, tid, nt);
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t i = 0; i < H; i++) x[r * H + i] += tmp[r * H + i];
                }
                if (!plan_ffn || plan_ffn[l]) {
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++) rms_norm(x + r * H, L->ffn_norm, m->eps, H, h + r * H);
                    matmul(&L->gate_up, h, R, big, tid, nt);
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++) silu_mul(big + r * 2 * I, big + r * 2 * I + I, tmp + r * I, I);
                    matmul(&L->down, tmp, R, att, tid, nt);
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t i = 0; i < H; i++) x[r * H + i] += att[r * H + i];
                }
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) rms_norm(x + r * H, m->final_norm, m->eps, H, out + r * H);
        }
    }
    free(seg_of);
    free(h);
    free(big);
    free(att);
    free(tmp);
    free(all_scores);
    return failed ? -1 : 0;
}
