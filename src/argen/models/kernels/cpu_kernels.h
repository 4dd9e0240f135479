/* Shared declarations of argen's CPU kernels (see cpu_kernels.c and cpu_forward.c). */
#ifndef ARGEN_CPU_KERNELS_H
#define ARGEN_CPU_KERNELS_H
#include <stdint.h>

#define QK 32
enum { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8_0 = 2 };

/* A block-quantized weight [n][k] (layout in cpu_kernels.c) and an optional fp32 bias [n]. */
typedef struct {
    int32_t fmt, pad;
    int64_t n, k;
    const void *qs;
    const uint16_t *d, *m;
    const float *bias;
} argen_qweight;

/* Output rows [r0, r1) of y = x W^T (+ bias), one thread; every y[i][r] is computed the same way
 * whatever M, r0 and r1 are (batch invariance). */
void argen_qmatmul_rows(const argen_qweight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                        int64_t r0, int64_t r1);
#endif
