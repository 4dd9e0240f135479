/* Shared declarations of argen's CPU kernels (see cpu_kernels.c and cpu_forward.c). */
#ifndef ARGEN_CPU_KERNELS_H
#define ARGEN_CPU_KERNELS_H
#include <stdint.h>

#define QK 32
enum { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8_0 = 2 };

/* A block-quantized weight [n][k], packed in groups of `width` rows (the layouts in cpu_kernels.c;
 * width is the kernels' vector width, argen_width()), and an optional fp32 bias [n]. */
typedef struct {
    int32_t fmt, width;
    int64_t n, k;
    const uint8_t *data;
    const float *bias;
    int32_t act8, pad; /* act8: the "a8" path (activations rounded to 8 bits per block; cpu_kernels.c) */
} argen_qweight;

/* y[i][r] = x[i] . W[r] (+ bias[r]) for rows i < M and the weight rows of groups [g0, g1), on the
 * calling thread. Every y[i][r] is computed by the same operations whatever M, g0 and g1 are. */
void argen_qmatmul_groups(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                          int64_t g0, int64_t g1);

static inline int64_t argen_groups(const argen_qweight *w) { return (w->n + w->width - 1) / w->width; }
#endif
