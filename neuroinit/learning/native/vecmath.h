/* neuroinit native kernels: the vector type and the tanh without libm calls that both libraries use -- the fused
   online step (products.c) and the fused BPTT (bptt.c) -- so that their activations agree. */
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

#endif
