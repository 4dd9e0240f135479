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
 * scaled by 1/sqrt(head_dim), SiLU-gated FFN; all fp32. The vector code is cpu_simd.h's layer, so
 * AVX2 and AVX-512 run the same code at their widths.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

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

/* -- vector helpers on cpu_simd.h: a fixed order of operations for a given n, each element's
 *    value independent of n (tails are computed as zero-padded vectors) ---------------------- */
static float dot(const float *a, const float *b, int64_t n) {
    vf acc = vzero();
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
    if (i < n) acc = vfma(vload_n(a + i, n - i), vload_n(b + i, n - i), acc);
    return vhsum(acc);
}

/* s[j] = dot(q, key j) * scale for 8 keys at once: the same values as 8 calls of dot (each key's
 * own chain), with 8 chains in flight to hide the FMA latency. */
static void dot8(const float *q, const float *const k[8], int64_t n, float scale, float *s) {
    vf acc[8];
    for (int j = 0; j < 8; j++) acc[j] = vzero();
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        const vf qv = vload(q + i);
        for (int j = 0; j < 8; j++) acc[j] = vfma(qv, vload(k[j] + i), acc[j]);
    }
    if (i < n) {
        const vf qv = vload_n(q + i, n - i);
        for (int j = 0; j < 8; j++) acc[j] = vfma(qv, vload_n(k[j] + i, n - i), acc[j]);
    }
    for (int j = 0; j < 8; j++) s[j] = vhsum(acc[j]) * scale;
}

/* s[i] = exp(s[i] - shift) */
static void exp_shifted(float *s, int64_t n, float shift) {
    const vf vs = vset1(shift);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(s + i, vexp(vsub(vload(s + i), vs)));
    if (i < n) vstore_n(s + i, vexp(vsub(vload_n(s + i, n - i), vs)), n - i);
}

/* SiLU(gate) * up = gate / (1 + e^-gate) * up */
static inline vf silu_mul_v(vf g, vf u) {
    return vmul(vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g)))), u);
}

static void silu_mul(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(out + i, silu_mul_v(vload(gate + i), vload(up + i)));
    if (i < n) vstore_n(out + i, silu_mul_v(vload_n(gate + i, n - i), vload_n(up + i, n - i)), n - i);
}

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    const vf vinv = vset1(inv);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) vstore(out + i, vmul(vload(w + i), vmul(vload(x + i), vinv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
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

/* o[d] (+)= sum_j p[j] v_j[d] for d in [d0, d0 + NV * VW): per element one fma chain over the keys
 * in order, from 0 (`first`) or from o's value (the same chain, continued over the next keys), NV
 * vectors of o held in registers while the keys stream past. */
ARGEN_INLINE void weighted_block(const int NV, const float *p, const float *const *v, int64_t n, int64_t d0,
                                 float *o, int first) {
    vf acc[8];
    for (int j = 0; j < NV; j++) acc[j] = first ? vzero() : vload(o + d0 + j * VW);
    for (int64_t key = 0; key < n; key++) {
        const vf pk = vset1(p[key]);
        for (int j = 0; j < NV; j++) acc[j] = vfma(pk, vload(v[key] + d0 + j * VW), acc[j]);
    }
    for (int j = 0; j < NV; j++) vstore(o + d0 + j * VW, acc[j]);
}

/* o (+)= sum_j p[j] v_j over D elements: blocks of 8 vectors (enough chains for the FMA latency), then
 * narrower ones, then a zero-padded tail; every element's chain is the same whatever the blocks. */
static void weighted_sum(const float *p, const float *const *v, int64_t n, int64_t D, float *o, int first) {
    int64_t d0 = 0;
    for (; d0 + 8 * VW <= D; d0 += 8 * VW) weighted_block(8, p, v, n, d0, o, first);
    for (; d0 + 4 * VW <= D; d0 += 4 * VW) weighted_block(4, p, v, n, d0, o, first);
    for (; d0 + VW <= D; d0 += VW) weighted_block(1, p, v, n, d0, o, first);
    if (d0 < D) {
        const int64_t tail = D - d0;
        vf acc = first ? vzero() : vload_n(o + d0, tail);
        for (int64_t key = 0; key < n; key++) acc = vfma(vset1(p[key]), vload_n(v[key] + d0, tail), acc);
        vstore_n(o + d0, acc, tail);
    }
}

/* Attention of nh query heads of one token that share a key/value head (grouped-query attention):
 * q and o hold the heads D apart, keys / values the n positions the token sees, in order. The keys
 * and values are read once for all the heads, in chunks that stay in L1; each head's arithmetic is
 * what it would be alone: score_j = (q . k_j) * scale (one fma chain per key), softmax, and
 * o = (sum_j e_j v_j) / sum_j e_j. scores: room for nh * n floats. */
#define KEY_CHUNK 64
static void attend(const float *q, int64_t nh, const float *const *keys, const float *const *values, int64_t n,
                   int64_t D, float scale, float *scores, float *o) {
    for (int64_t j0 = 0; j0 < n; j0 += KEY_CHUNK) {
        const int64_t jn = n - j0 < KEY_CHUNK ? n - j0 : KEY_CHUNK;
        for (int64_t h = 0; h < nh; h++) {
            float *sc = scores + h * n + j0;
            int64_t j = 0;
            for (; j + 8 <= jn; j += 8) dot8(q + h * D, keys + j0 + j, D, scale, sc + j);
            for (; j < jn; j++) sc[j] = dot(q + h * D, keys[j0 + j], D) * scale;
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *sc = scores + h * n, mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
        exp_shifted(sc, n, mx);
    }
    for (int64_t j0 = 0; j0 < n; j0 += KEY_CHUNK) {
        const int64_t jn = n - j0 < KEY_CHUNK ? n - j0 : KEY_CHUNK;
        for (int64_t h = 0; h < nh; h++) weighted_sum(scores + h * n + j0, values + j0, jn, D, o + h * D, j0 == 0);
    }
    for (int64_t h = 0; h < nh; h++) {
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += scores[h * n + j];
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) o[h * D + d] *= inv;
    }
}

/* Threads split a weight's groups of rows; a barrier then makes the result visible to all. */
static void matmul_ld(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int tid, int nt) {
    const int64_t G = argen_groups(w);
    argen_qmatmul_groups(w, x, M, ldx, y, w->n, G * tid / nt, G * (tid + 1) / nt);
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
    const int64_t threads = nthreads > 0 ? nthreads : 1;
    float *all_scores = malloc(sizeof(float) * (max_keys + 1) * group * threads);
    const float **all_keys = malloc(sizeof(float *) * 2 * max_keys * threads); /* keys, then values */
    const int failed = !seg_of || !h || !big || !att || !tmp || !all_scores || !all_keys;
    const float scale = 1.0f / sqrtf((float)D);
    if (!failed) {
        for (int64_t s = 0; s < S; s++)
            for (int64_t r = cu[s]; r < cu[s + 1]; r++) seg_of[r] = s;
#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            float *scores = all_scores + tid * (max_keys + 1) * group;
            const float **keys = all_keys + 2 * tid * max_keys, **values = keys + max_keys;
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
                    /* (key/value head, token, query head) triples, key/value head first, a contiguous
                     * range per thread; a token's query heads that share a key/value head are done
                     * together (their keys read once), and the tokens one after another on the same
                     * key/value head, so its keys and values stay in cache from token to token of a
                     * pass (the order of the tasks changes no head's arithmetic) */
                    for (int64_t task = R * NH * tid / nt, end = R * NH * (tid + 1) / nt; task < end;) {
                        const int64_t g = task / (R * group), r = task / group % R, hq = g * group + task % group;
                        const int64_t s = seg_of[r], t = r - cu[s], T = cu[s + 1] - cu[s], start = starts[s];
                        int64_t nh = (g + 1) * group - hq;
                        nh = nh < end - task ? nh : end - task;
                        const int32_t *table = tables + table_cu[s];
                        const uint8_t *visible = mask_at[s] < 0 ? NULL : mask + mask_at[s] + t * T;
                        /* the keys (and values) this token sees, in position order */
                        int64_t n = 0;
                        for (int64_t j = 0; j < start + T; j++) {
                            if (j >= start && !(visible ? visible[j - start] : j - start <= t)) continue;
                            const int64_t at = table[j / block_size] * bs + (j % block_size) * ss + g * hs;
                            keys[n] = kl + at;
                            values[n++] = vl + at;
                        }
                        attend(big + r * QKV + hq * D, nh, keys, values, n, D, scale, scores,
                               att + r * heads_out + hq * D);
                        task += nh;
                    }
#pragma omp barrier
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
    free(all_keys);
    return failed ? -1 : 0;
}
