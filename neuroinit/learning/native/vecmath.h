/* neuroinit native kernels: the vector type, the tanh without libm calls and (with AVX-512) the dense product's
   register block that both libraries use -- the fused online step (products.c) and the fused BPTT (bptt.c) -- so
   that their activations agree. */
#ifndef NEUROINIT_VECMATH_H
#define NEUROINIT_VECMATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC/Clang vector extensions; -march=native picks the widest registers. */
typedef float v8f __attribute__((vector_size(32)));
static inline v8f ld8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void st8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* expm1 x for |x| <= 20: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 split in a short and a small part),
   expm1 r by its Taylor polynomial of degree 8 (truncation error r^9 / 9! < 2e-8 |r|), then
   expm1 x = 2^k expm1 r + (2^k - 1). Branch-free so that loops over it vectorise. */
static inline float expm1_small(float x) {
    const float k = floorf(x * 1.44269504f + 0.5f);
    const float r = (x - k * 0.693145751953125f) - k * 1.42860677e-06f;
    const float e = r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
                    + r * (1.0f / 5040 + r * (1.0f / 40320))))))));
    const int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return two_k * e + (two_k - 1.0f);
}
/* tanh x = expm1(2x) / (expm1(2x) + 2), x clamped to [-9, 9] (tanh 9 rounds to 1 in float32); accurate to a few
   ulp near 0 as well (no cancellation: expm1, not exp - 1). */
static inline float tanh_fast(float x) {
    x = x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x);
    const float y = expm1_small(2.0f * x);
    return y / (y + 2.0f);
}

#if defined(__AVX512F__)
/* R rows x 32 columns of a dense product with AVX-512 (GCC's 8-lane vectors above stay 8 lanes wide under
   -march=native, leaving half of each register unused):
       D[q, j0 .. j0 + 31] = C[q, j0 ..] + sum_k A[q, k] P[k, :] + sum_k U[q, k] Pi[k, :],   q < R <= 8,
   in 2 R 16-lane registers, 2 loads + R broadcasts per 2 R FMAs. P0, P1 (Pi0, Pi1): two 16-column panels (K x 16
   and I x 16, contiguous), so that they stay in L1 across row blocks. C: row q at C + q cs (cs = 0: one row for
   all, a bias). Each sum is taken in the order C, k = 0 .. K - 1, then the inputs. R is a constant after
   inlining, so the q loops unroll. */
typedef float v16f __attribute__((vector_size(64)));
static inline v16f ld16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline void st16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) void rows32(const int R, const float *A, int64_t K, const float *P0,
        const float *P1, const float *U, int64_t I, const float *Pi0, const float *Pi1, const float *C, int64_t cs,
        int64_t N, int64_t j0, float *D) {
    v16f c[8][2];
    for (int q = 0; q < R; q++) { c[q][0] = ld16(C + q * cs + j0); c[q][1] = ld16(C + q * cs + j0 + 16); }
    for (int64_t k = 0; k < K; k++) {
        const v16f w0 = ld16(P0 + 16 * k), w1 = ld16(P1 + 16 * k);
        for (int q = 0; q < R; q++) { const float a = A[q * K + k]; c[q][0] += a * w0; c[q][1] += a * w1; }
    }
    for (int64_t k = 0; k < I; k++) {
        const v16f w0 = ld16(Pi0 + 16 * k), w1 = ld16(Pi1 + 16 * k);
        for (int q = 0; q < R; q++) { const float a = U[q * I + k]; c[q][0] += a * w0; c[q][1] += a * w1; }
    }
    for (int q = 0; q < R; q++) { st16(D + q * N + j0, c[q][0]); st16(D + q * N + j0 + 16, c[q][1]); }
}
#endif

#endif
