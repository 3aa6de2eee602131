/* neuroinit fused step, chip precision: the presynaptic and readout traces on their grids, and the eligibility
   traces as int8 / int16 codes updated with stochastic rounding in one vectorised pass (see fused_run.h for the
   shared layout and random words; neuroinit/learning/fused.py for the Python side). */
#include "fused_run.h"

/* the O(B N) traces (presynaptic, readout), held as float values on their grids; per: values per batch element
   (element k draws by its whole-batch index b0 per + k) */
void quant_vec(const Run *r, int which, float *v, int64_t n, int64_t per) {
    if (!r->quant) return;
    uint32_t key = qkey(r, which);
    const int nearest = (int)r->q_nearest;
    const uint32_t at = (uint32_t)(r->b0 * per);
    float s = r->q_scale[which], lo = r->q_min[which], hi = r->q_max[which];
    for (int64_t k = 0; k < n; k++)
        v[k] = sround(v[k], s, lo, hi, nearest ? 0.0f : unif(key, at + (uint32_t)k), nearest);
}
/* dst = d src + g x (g x: the constant g when x is NULL), rounded like the PyTorch path */
NO_CONTRACT void decay_add(float *dst, const float *src, float d, const float *x, float g, int64_t n) {
    EXACT_FP
    if (x) for (int64_t k = 0; k < n; k++) dst[k] = d * src[k] + g * x[k];
    else for (int64_t k = 0; k < n; k++) dst[k] = d * src[k] + g;
}

/* The eligibility traces (B x N x N and B x N x I) as integer codes, int8 or int16, one row at a time:
       c <- SR(ed c + (post / s) pre),     gradient += (L s) c
   with s the grid's (power-of-two) scale and SR stochastic rounding to the codes [lo, hi] (saturating). The sum is
   taken in float: with nearest rounding as the PyTorch path does (x = fl(fl(ed c) + fl(post pre) / s), the same
   value), with stochastic rounding by a fused multiply-add (x = fl(ed c + fl(post pre) / s), within an ulp of
   it), held as X = 2^k x (exact: a power-of-two scale) and clamped to [2^k lo, 2^k hi]; then
       c = (rint(X) + r) >> k,      r: k random bits (k = 8 for int8 codes, 16 for int16)
   which is ceil or floor of x with P(up) = rint(2^k frac(x)) / 2^k: |E[c] - x| <= 2^-(k+1) of a code (and exactly
   0 when x is on the grid), against 2^-24 for the PyTorch path's float uniform. One 32-bit random word serves
   32 / k elements: in each block of G = 16 (32 / k) elements, element i takes bits k ((i mod G) div 16) .. of word
   16 (i div G) + (i mod 16) of its row's stream (the layout of one 16-lane vector). Nearest rounding (q_nearest):
   c = rint(x), half to even, as torch.round. A row without an increment (post 0: x = fl(ed c)) of int8 codes takes
   rint(2^k x) from a table of its 256 codes (DecayTable, decay8_w): the same codes, 64 per vector. */

/* The portable loop (any CPU; the same codes as the AVX-512 and AVX2 kernels below): per block of G elements
   its 16 random words, then 16 lanes at a time, written so that the compiler vectorises it (SSE, NEON). */
static inline __attribute__((always_inline)) NO_CONTRACT void lanes16(void *codes, const int bytes,
        const int nearest, const float *pre, int64_t i0, int64_t m, const uint32_t *w, int shift, const RowQ *q,
        float *g) {
    EXACT_FP
    const int k = bytes == 1 ? 8 : 16;
    const int32_t mask = (1 << k) - 1;
    const float ed = q->ed, ps = q->ps, lo = q->lo, hi = q->hi, ls = q->ls, inv = 1.0f / (float)(1 << k);
    int8_t *c8 = (int8_t *)codes + i0;
    int16_t *c16 = (int16_t *)codes + i0;
    const float *p = pre + i0, *psv = q->ps_v ? q->ps_v + i0 : NULL, *lsv = q->ls_v ? q->ls_v + i0 : NULL;
    float *gr = g + i0;
#pragma omp simd
    for (int64_t l = 0; l < m; l++) {
        const float c = bytes == 1 ? (float)c8[l] : (float)c16[l];
        const float t2 = (psv ? psv[l] : ps) * p[l];
        float x = nearest ? ed * c + t2 : fmaf(ed, c, t2);
        x = x > lo ? x : lo; /* NaN -> lo */
        x = x < hi ? x : hi;
        const int32_t code = nearest ? (int32_t)rintf(x * inv)
                                     : ((int32_t)rintf(x) + (int32_t)((w[l] >> shift) & (uint32_t)mask)) >> k;
        if (bytes == 1) c8[l] = (int8_t)code; else c16[l] = (int16_t)code;
        gr[l] += (lsv ? lsv[l] : ls) * (float)code;
    }
}
static inline __attribute__((always_inline)) NO_CONTRACT void codes_scalar_w(void *codes, const int bytes,
        const int nearest, const float *pre, int64_t n, const RowQ *q, float *g) {
    EXACT_FP
    const int k = bytes == 1 ? 8 : 16, S = 32 / k;
    const int64_t G = 16 * S;
    uint32_t w[16] = {0};
    for (int64_t i = 0; i < n; i += G) {
        if (!nearest) {
            const uint32_t base = q->ctr + (uint32_t)(i / G) * 16;
#pragma omp simd
            for (int l = 0; l < 16; l++) w[l] = mix32((base + (uint32_t)l) * GOLD ^ q->key);
        }
        for (int s = 0; s < S && i + 16 * s < n; s++) {
            const int64_t left = n - i - 16 * s;
            lanes16(codes, bytes, nearest, pre, i + 16 * s, left < 16 ? left : 16, w, k * s, q, g);
        }
    }
}
static NO_CONTRACT void codes_scalar(void *codes, int bytes, const float *pre, int64_t n, const RowQ *q, float *g) {
    if (q->nearest) {
        if (bytes == 1) codes_scalar_w(codes, 1, 1, pre, n, q, g);
        else codes_scalar_w(codes, 2, 1, pre, n, q, g);
    } else {
        if (bytes == 1) codes_scalar_w(codes, 1, 0, pre, n, q, g);
        else codes_scalar_w(codes, 2, 0, pre, n, q, g);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* A row's constants in registers (loaded once: stores through int8 pointers would force reloads from a struct) */
typedef struct {
    __m512 ed, ps, lo, hi, inv, ls;
} RowV;

/* 16 codes (as int32) from 16 stored codes c: the update above; r: their random bits (k of them) */
static inline __attribute__((always_inline)) __m512i code16(__m512 c, const float *pre, __mmask16 m, __m512i r,
        __m512 ps, const RowV *v, const int k, const int nearest, const int inc, const int clamp) {
    __m512 x;
    if (!inc) /* without an increment (post 0) x = fl(ed c) (+ 0) */
        x = _mm512_mul_ps(c, v->ed);
    else if (nearest) /* fl(fl(ed c) + fl(ps pre)), as the PyTorch path */
        x = _mm512_add_round_ps(_mm512_mul_ps(c, v->ed), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, pre), ps),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else /* fl(ed c + fl(ps pre)) */
        x = _mm512_fmadd_ps(c, v->ed, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, pre), ps));
    if (clamp) x = _mm512_min_ps(_mm512_max_ps(x, v->lo), v->hi); /* max(x, lo): lo for NaN, as lanes16 */
    if (nearest) return _mm512_cvtps_epi32(_mm512_mul_ps(x, v->inv));
    return _mm512_srai_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(x), r), k);
}
/* 16 codes of one row at i0 (mask m): load, update, add to the gradient, store (store 0: returned, for the caller
   to store a whole block packed) */
static inline __attribute__((always_inline)) __m512i group16(void *codes, const int bytes, const int nearest,
        const int inc, const int vec, const int clamp, const int store, const float *pre, int64_t i0, __mmask16 m,
        __m512i r, const RowV *v, const RowQ *q, float *g) {
    const __m512 ps = vec ? _mm512_maskz_loadu_ps(m, q->ps_v + i0) : v->ps;
    const __m512 ls = vec ? _mm512_maskz_loadu_ps(m, q->ls_v + i0) : v->ls;
    __m512i code;
    if (bytes == 1) {
        int8_t *e = (int8_t *)codes + i0;
        code = code16(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, e))), pre + i0, m, r, ps, v,
                      8, nearest, inc, clamp);
        if (store) _mm_mask_storeu_epi8(e, m, _mm512_cvtepi32_epi8(code));
    } else {
        int16_t *e = (int16_t *)codes + i0;
        code = code16(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, e))), pre + i0, m, r,
                      ps, v, 16, nearest, inc, clamp);
        if (store) _mm256_mask_storeu_epi16(e, m, _mm512_cvtepi32_epi16(code));
    }
    _mm512_mask_storeu_ps(g + i0, m, _mm512_fmadd_ps(_mm512_cvtepi32_ps(code), ls, _mm512_maskz_loadu_ps(m, g + i0)));
    return code;
}
/* a whole block's codes (4 groups of int8, 2 of int16; all within the codes' range) stored by packing with
   saturation and one lane permutation, instead of one narrowing store per group (slow on AMD's Zen 4 and 5) */
static inline __attribute__((always_inline)) void store_block(void *codes, const int bytes, int64_t i,
                                                              const __m512i *out) {
    if (bytes == 1) { /* lane l of the packed bytes: elements 4l .. 4l + 3 of groups 0, 1, 2, 3 */
        const __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(out[0], out[1]),
                                             _mm512_packs_epi32(out[2], out[3]));
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_storeu_si512((int8_t *)codes + i, _mm512_permutexvar_epi32(order, p));
    } else { /* lane l: elements 4l .. 4l + 3 of groups 0, 1 */
        const __m512i p = _mm512_packs_epi32(out[0], out[1]);
        const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        _mm512_storeu_si512((int16_t *)codes + i, _mm512_permutexvar_epi64(order, p));
    }
}
/* the random bits of group s (0 .. 32 / k - 1) of a block, from its 16 words */
static inline __attribute__((always_inline)) __m512i bits_of(__m512i w, const int bytes, const int s) {
    if (bytes == 1)
        return s == 3 ? _mm512_srli_epi32(w, 24) : _mm512_and_si512(_mm512_srli_epi32(w, 8 * s), _mm512_set1_epi32(0xff));
    return s == 1 ? _mm512_srli_epi32(w, 16) : _mm512_and_si512(w, _mm512_set1_epi32(0xffff));
}
/* the same values as codes_scalar, 16 lanes at a time (the last block masked) */
static inline __attribute__((always_inline)) void codes_avx512_w(void *codes, const int bytes, const int nearest,
        const int inc, const int vec, const int clamp, const float *pre, int64_t n, const RowQ *q, float *g) {
    const int64_t G = bytes == 1 ? 64 : 32;
    const int S = (int)(G / 16);
    const RowV v = {_mm512_set1_ps(q->ed), _mm512_set1_ps(q->ps), _mm512_set1_ps(q->lo), _mm512_set1_ps(q->hi),
                    _mm512_set1_ps(1.0f / (float)(1 << q->k)), _mm512_set1_ps(q->ls)};
    const __m512i key = _mm512_set1_epi32((int)q->key), step = _mm512_set1_epi32((int)(16 * GOLD));
    /* GOLD (ctr + 16 block + lane): the block's 16 word indices, multiplied */
    __m512i c = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)q->ctr),
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)), _mm512_set1_epi32((int)GOLD));
    __m512i w = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + G <= n; i += G, c = _mm512_add_epi32(c, step)) {
        if (!nearest) w = mix32_v(_mm512_xor_si512(c, key));
        __m512i out[4];
        for (int s = 0; s < S; s++)
            out[s] = group16(codes, bytes, nearest, inc, vec, clamp, 0, pre, i + 16 * s, 0xffff, bits_of(w, bytes, s),
                             &v, q, g);
        store_block(codes, bytes, i, out);
    }
    if (i < n) {
        if (!nearest) w = mix32_v(_mm512_xor_si512(c, key));
        for (int s = 0; s < S && i + 16 * s < n; s++) {
            const int64_t left = n - i - 16 * s;
            group16(codes, bytes, nearest, inc, vec, clamp, 1, pre, i + 16 * s,
                    left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1), bits_of(w, bytes, s), &v, q, g);
        }
    }
}
#if defined(__AVX512VBMI__)
#define CHIP_DECAY_TABLE 1
/* the 64 codes of a block at i (mask m) by the tables h, nl (DecayTable's hi and nlo, 4 registers each) and their
   small parts hs, ns; c: the block's word indices (multiplied) */
static inline __attribute__((always_inline)) void decay8_block(int8_t *codes, int64_t i, const __mmask64 m,
        __m512i c, __m512i key, __m512i order, const __m512i *h, const __m512i *nl, __m512i hs, __m512i ns, __m512 ls,
        float *g, const int nearest) {
    const __m512i v = _mm512_maskz_loadu_epi8(m, codes + i);
    /* codes in [-32, 32) (traces that stay small): one lookup per table, else two and a select by sign */
    const int small = !_mm512_test_epi8_mask(_mm512_add_epi8(v, _mm512_set1_epi8(32)), _mm512_set1_epi8(-64));
    const __mmask64 neg = _mm512_movepi8_mask(v);
    __m512i code = small ? _mm512_permutexvar_epi8(v, hs)
                         : _mm512_mask_blend_epi8(neg, _mm512_permutex2var_epi8(h[0], v, h[1]),
                                                  _mm512_permutex2var_epi8(h[2], v, h[3]));
    if (!nearest) {
        const __m512i nlo = small ? _mm512_permutexvar_epi8(v, ns)
                                  : _mm512_mask_blend_epi8(neg, _mm512_permutex2var_epi8(nl[0], v, nl[1]),
                                                           _mm512_permutex2var_epi8(nl[2], v, nl[3]));
        const __m512i r = _mm512_permutexvar_epi8(order, mix32_v(_mm512_xor_si512(c, key)));
        code = _mm512_mask_add_epi8(code, _mm512_cmpgt_epu8_mask(r, nlo), code, _mm512_set1_epi8(1));
    }
    _mm512_mask_storeu_epi8(codes + i, m, code);
    float *gi = g + i;
    for (int s = 0; s < 4; s++) {
        const __mmask16 ms = (__mmask16)(m >> (16 * s));
        if (!ms) break;
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(code, s)));
        _mm512_mask_storeu_ps(gi + 16 * s, ms, _mm512_fmadd_ps(f, ls, _mm512_maskz_loadu_ps(ms, gi + 16 * s)));
    }
}
/* int8 codes of a row without an increment, 64 at a time by byte-table lookups (DecayTable; the same codes as
   codes_avx512_w: element p of a block takes byte p div 16 of word p mod 16, as there). */
static inline __attribute__((always_inline)) void decay8_w(int8_t *codes, int64_t n, const RowQ *q, float *g,
        const int nearest) {
    const DecayTable *t = q->decay;
    const __m512i h[4] = {_mm512_loadu_si512(t->hi), _mm512_loadu_si512(t->hi + 64),
                          _mm512_loadu_si512(t->hi + 128), _mm512_loadu_si512(t->hi + 192)};
    const __m512i nl[4] = {_mm512_loadu_si512(t->nlo), _mm512_loadu_si512(t->nlo + 64),
                           _mm512_loadu_si512(t->nlo + 128), _mm512_loadu_si512(t->nlo + 192)};
    const __m512i hs = _mm512_loadu_si512(t->hi_small), ns = _mm512_loadu_si512(t->nlo_small);
    const __m512 ls = _mm512_set1_ps(q->ls);
    const __m512i key = _mm512_set1_epi32((int)q->key), step = _mm512_set1_epi32((int)(16 * GOLD));
    __m512i c = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)q->ctr),
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)), _mm512_set1_epi32((int)GOLD));
    /* byte p of the block's random bytes: byte p div 16 of word p mod 16 */
    const __m512i order = _mm512_set_epi8(63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3,
                                          62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,
                                          61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1,
                                          60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64, c = _mm512_add_epi32(c, step)) /* whole blocks: the masks fold away */
        decay8_block(codes, i, ~(__mmask64)0, c, key, order, h, nl, hs, ns, ls, g, nearest);
    if (i < n)
        decay8_block(codes, i, ((__mmask64)1 << (n - i)) - 1, c, key, order, h, nl, hs, ns, ls, g, nearest);
}
#endif

static void codes_avx512(void *codes, int bytes, const float *pre, int64_t n, const RowQ *q, float *g) {
    /* constant widths and modes: the group loops unroll, shifts and masks are immediates */
    const int inc = q->ps_v || q->ps != 0.0f;
#ifdef CHIP_DECAY_TABLE
    if (!inc && bytes == 1 && q->decay) {
        if (q->nearest) decay8_w((int8_t *)codes, n, q, g, 1);
        else decay8_w((int8_t *)codes, n, q, g, 0);
        return;
    }
#endif
    if (q->ps_v) { /* per-element factors: the input and bias traces of a block of rows */
        if (q->nearest) {
            if (bytes == 1) codes_avx512_w(codes, 1, 1, 1, 1, 1, pre, n, q, g);
            else codes_avx512_w(codes, 2, 1, 1, 1, 1, pre, n, q, g);
        } else {
            if (bytes == 1) codes_avx512_w(codes, 1, 0, 1, 1, 1, pre, n, q, g);
            else codes_avx512_w(codes, 2, 0, 1, 1, 1, pre, n, q, g);
        }
    } else if (q->nearest) {
        if (bytes == 1) codes_avx512_w(codes, 1, 1, 1, 0, 1, pre, n, q, g);
        else codes_avx512_w(codes, 2, 1, 1, 0, 1, pre, n, q, g);
    } else if (inc && q->in_range) { /* rows whose sums provably stay within [lo, hi]: no clamp, the same codes */
        if (bytes == 1) codes_avx512_w(codes, 1, 0, 1, 0, 0, pre, n, q, g);
        else codes_avx512_w(codes, 2, 0, 1, 0, 0, pre, n, q, g);
    } else if (inc) {
        if (bytes == 1) codes_avx512_w(codes, 1, 0, 1, 0, 1, pre, n, q, g);
        else codes_avx512_w(codes, 2, 0, 1, 0, 1, pre, n, q, g);
    } else if (q->in_range) {
        if (bytes == 1) codes_avx512_w(codes, 1, 0, 0, 0, 0, pre, n, q, g);
        else codes_avx512_w(codes, 2, 0, 0, 0, 0, pre, n, q, g);
    } else {
        if (bytes == 1) codes_avx512_w(codes, 1, 0, 0, 0, 1, pre, n, q, g);
        else codes_avx512_w(codes, 2, 0, 0, 0, 1, pre, n, q, g);
    }
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__)) && defined(__AVX2__) && defined(__FMA__)
#define CHIP_AVX2 1
/* The AVX2 kernel (CPUs without AVX-512): the portable loop's codes and random bits, 8 lanes at a time. A block's
   16 words are two registers (words 0-7, 8-15): lanes 0-7 of each group of 16 elements take the first, lanes 8-15
   the second. Whole blocks only: a row's last partial block goes through the portable loop. Rows whose sums
   provably stay within [lo, hi] (RowQ.in_range) leave the clamp out: the same codes. */
typedef struct {
    __m256 ed, ps, lo, hi, inv, ls;
} RowV8;

/* 8 codes (as int32) from the 8 stored codes c at element `at` of a row: the update of lanes16 (r: their k random
   bits), and their share of the gradient */
static inline __attribute__((always_inline)) NO_CONTRACT __m256i update8(__m256 c, int64_t at, __m256i r,
        const float *pre, const RowQ *q, const RowV8 *v, float *g, const int k, const int nearest, const int inc,
        const int vec, const int clamp) {
    EXACT_FP
    __m256 x = _mm256_mul_ps(c, v->ed);
    if (inc) {
        const __m256 ps = vec ? _mm256_loadu_ps(q->ps_v + at) : v->ps;
        const __m256 t2 = _mm256_mul_ps(ps, _mm256_loadu_ps(pre + at));
        x = nearest ? _mm256_add_ps(x, t2) : _mm256_fmadd_ps(c, v->ed, t2);
    }
    if (clamp) x = _mm256_min_ps(_mm256_max_ps(x, v->lo), v->hi); /* max(x, lo): lo for NaN, as lanes16 */
    __m256i code;
    if (nearest) code = _mm256_cvtps_epi32(_mm256_mul_ps(x, v->inv));
    else if (k == 8) code = _mm256_srai_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), r), 8);
    else code = _mm256_srai_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), r), 16);
    _mm256_storeu_ps(g + at, _mm256_fmadd_ps(_mm256_cvtepi32_ps(code), vec ? _mm256_loadu_ps(q->ls_v + at) : v->ls,
                                             _mm256_loadu_ps(g + at)));
    return code;
}
/* the random bits of the 8 lanes h (0 .. G / 8 - 1) of a block: half h mod 2 of group h div 2 */
static inline __attribute__((always_inline)) __m256i bits8(__m256i w0, __m256i w1, const int bytes, const int h) {
    const __m256i w = (h & 1) ? w1 : w0;
    const int s = h >> 1;
    if (bytes == 1)
        return s == 3 ? _mm256_srli_epi32(w, 24)
                      : _mm256_and_si256(_mm256_srli_epi32(w, 8 * s), _mm256_set1_epi32(0xff));
    return s == 1 ? _mm256_srli_epi32(w, 16) : _mm256_and_si256(w, _mm256_set1_epi32(0xffff));
}
/* the whole blocks of a row; returns how many codes they hold */
static inline __attribute__((always_inline)) NO_CONTRACT int64_t codes_avx2_w(void *codes, const int bytes,
        const int nearest, const int inc, const int vec, const int clamp, const float *pre, int64_t n, const RowQ *q,
        float *g) {
    EXACT_FP
    const int k = bytes == 1 ? 8 : 16;
    const int64_t G = bytes == 1 ? 64 : 32;
    const RowV8 v = {_mm256_set1_ps(q->ed), _mm256_set1_ps(q->ps), _mm256_set1_ps(q->lo), _mm256_set1_ps(q->hi),
                     _mm256_set1_ps(1.0f / (float)(1 << k)), _mm256_set1_ps(q->ls)};
    const __m256i key = _mm256_set1_epi32((int)q->key), step = _mm256_set1_epi32((int)(16 * GOLD));
    /* GOLD (ctr + 16 block + lane): the word indices of lanes 0-7 and 8-15, multiplied */
    __m256i c0 = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)q->ctr),
                                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                    _mm256_set1_epi32((int)GOLD));
    __m256i c1 = _mm256_add_epi32(c0, _mm256_set1_epi32((int)(8 * GOLD)));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + G <= n; i += G, c0 = _mm256_add_epi32(c0, step), c1 = _mm256_add_epi32(c1, step)) {
        __m256i w0 = _mm256_setzero_si256(), w1 = w0, out[8];
        if (!nearest) {
            w0 = mix32_v8(_mm256_xor_si256(c0, key));
            w1 = mix32_v8(_mm256_xor_si256(c1, key));
        }
        if (bytes == 1) {
            int8_t *e = (int8_t *)codes + i;
            for (int h = 0; h < 8; h++) {
                const __m128i c = _mm_loadl_epi64((const __m128i *)(e + 8 * h));
                out[h] = update8(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), i + 8 * h, bits8(w0, w1, 1, h), pre,
                                 q, &v, g, 8, nearest, inc, vec, clamp);
            }
            for (int h = 0; h < 8; h += 4) { /* 32 int32 codes to bytes (they are in range: no saturation) */
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(out[h], out[h + 1]),
                                                     _mm256_packs_epi32(out[h + 2], out[h + 3]));
                _mm256_storeu_si256((__m256i *)(e + 8 * h), _mm256_permutevar8x32_epi32(p, order));
            }
        } else {
            int16_t *e = (int16_t *)codes + i;
            for (int h = 0; h < 4; h++) {
                const __m128i c = _mm_loadu_si128((const __m128i *)(e + 8 * h));
                out[h] = update8(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(c)), i + 8 * h, bits8(w0, w1, 2, h), pre,
                                 q, &v, g, 16, nearest, inc, vec, clamp);
            }
            for (int h = 0; h < 4; h += 2)
                _mm256_storeu_si256((__m256i *)(e + 8 * h),
                                    _mm256_permute4x64_epi64(_mm256_packs_epi32(out[h], out[h + 1]), 0xD8));
        }
    }
    return i;
}
static NO_CONTRACT void codes_avx2(void *codes, int bytes, const float *pre, int64_t n, const RowQ *q, float *g) {
    /* constant widths and modes: the lane loops unroll, shifts and masks are immediates */
    int64_t done;
    if (q->ps_v) { /* per-element factors: the input and bias traces of a block of rows */
        if (q->nearest) done = bytes == 1 ? codes_avx2_w(codes, 1, 1, 1, 1, 1, pre, n, q, g)
                                          : codes_avx2_w(codes, 2, 1, 1, 1, 1, pre, n, q, g);
        else done = bytes == 1 ? codes_avx2_w(codes, 1, 0, 1, 1, 1, pre, n, q, g)
                               : codes_avx2_w(codes, 2, 0, 1, 1, 1, pre, n, q, g);
    } else if (q->nearest) done = bytes == 1 ? codes_avx2_w(codes, 1, 1, 1, 0, 1, pre, n, q, g)
                                             : codes_avx2_w(codes, 2, 1, 1, 0, 1, pre, n, q, g);
    else if (q->ps == 0.0f && q->in_range) done = bytes == 1 ? codes_avx2_w(codes, 1, 0, 0, 0, 0, pre, n, q, g)
                                                             : codes_avx2_w(codes, 2, 0, 0, 0, 0, pre, n, q, g);
    else if (q->ps == 0.0f) done = bytes == 1 ? codes_avx2_w(codes, 1, 0, 0, 0, 1, pre, n, q, g)
                                              : codes_avx2_w(codes, 2, 0, 0, 0, 1, pre, n, q, g);
    else if (q->in_range) done = bytes == 1 ? codes_avx2_w(codes, 1, 0, 1, 0, 0, pre, n, q, g)
                                            : codes_avx2_w(codes, 2, 0, 1, 0, 0, pre, n, q, g);
    else done = bytes == 1 ? codes_avx2_w(codes, 1, 0, 1, 0, 1, pre, n, q, g)
                           : codes_avx2_w(codes, 2, 0, 1, 0, 1, pre, n, q, g);
    if (done < n) { /* the rest from its block's first word on */
        RowQ t = *q;
        t.ctr = q->ctr + (uint32_t)(done / (16 * (32 / q->k))) * 16;
        t.ps_v = q->ps_v ? q->ps_v + done : NULL;
        t.ls_v = q->ls_v ? q->ls_v + done : NULL;
        codes_scalar((char *)codes + done * bytes, bytes, pre + done, n - done, &t, g + done);
    }
}
#endif

/* one row of codes: the vector kernel where there is one, else the scalar loop (the same codes) */
void chip_row(void *codes, int bytes, const float *pre, int64_t n, const RowQ *q, float *g, int portable) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (!portable) {
        codes_avx512(codes, bytes, pre, n, q, g);
        return;
    }
#elif defined(CHIP_AVX2)
    if (!portable) {
        codes_avx2(codes, bytes, pre, n, q, g);
        return;
    }
#endif
    (void)portable;
    codes_scalar(codes, bytes, pre, n, q, g);
}


static int zero_codes(const char *c, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 64 <= n; i += 64) { /* a cache line at a time, stopping at the first non-zero one */
        const __m512i v = _mm512_loadu_si512((const void *)(c + i));
        if (_mm512_test_epi64_mask(v, v)) return 0;
    }
#elif defined(CHIP_AVX2)
    for (; i + 64 <= n; i += 64) {
        const __m256i v = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(c + i)),
                                          _mm256_loadu_si256((const __m256i *)(c + i + 32)));
        if (!_mm256_testz_si256(v, v)) return 0;
    }
#endif
    for (; i + 64 <= n; i += 64) {
        uint64_t w[8], any = 0;
        memcpy(w, c + i, 64);
        for (int q = 0; q < 8; q++) any |= w[q];
        if (any) return 0;
    }
    for (; i < n; i++)
        if (c[i]) return 0;
    return 1;
}

/* The integer eligibility traces (the chip branch of ni_update), with their gradients: the recurrent trace one row
   (N codes) at a time (chip_elig_rec; or a chunk of steps at a time, chip_chunk_flush). A row of the recurrent
   trace takes words from ctr = row * row_words(N). The input and bias traces (chip_cols) have a few codes per row
   (I, and one): their vectors run across 16 rows instead, one input at a time. */
#ifdef CHIP_DECAY_TABLE
/* DecayTable of the recurrent trace's grid: X(c) = clamp(2^8 ed c, 2^8 lo, 2^8 hi), as the kernels compute it */
static NO_CONTRACT void decay_table(DecayTable *t, const Run *r) {
    EXACT_FP
    const float ed = 256.0f * r->ed, lo = 256.0f * r->q_min[Q_ELIG_REC], hi = 256.0f * r->q_max[Q_ELIG_REC];
    const int nearest = (int)r->q_nearest;
#pragma omp simd
    for (int u = 0; u < 256; u++) {
        float x = ed * (float)(int8_t)u;
        x = x > lo ? x : lo;
        x = x < hi ? x : hi;
        const int32_t T = (int32_t)rintf(x);
        t->hi[u] = (int8_t)(nearest ? (int32_t)rintf(x * (1.0f / 256.0f)) : T >> 8);
        t->nlo[u] = (uint8_t)(nearest ? 255 : 255 - (T & 255));
    }
    for (int u = 0; u < 64; u++) {
        const uint8_t c = (uint8_t)(int8_t)(u < 32 ? u : u - 64);
        t->hi_small[u] = t->hi[c];
        t->nlo_small[u] = t->nlo[c];
    }
}
/* the table of the run's constants (decay, grid, rounding): kept per thread, rebuilt when they change */
static const DecayTable *decay_table_of(const Run *r) {
    static __thread struct {
        int valid;
        float ed, lo, hi;
        int64_t nearest;
        DecayTable table;
    } c;
    const float lo = r->q_min[Q_ELIG_REC], hi = r->q_max[Q_ELIG_REC];
    if (!c.valid || c.ed != r->ed || c.lo != lo || c.hi != hi || c.nearest != r->q_nearest) {
        decay_table(&c.table, r);
        c.valid = 1, c.ed = r->ed, c.lo = lo, c.hi = hi, c.nearest = r->q_nearest;
    }
    return &c.table;
}
#endif

/* max |v_i| (NaN where any v_i is NaN) */
static float abs_max(const float *v, int64_t n) {
    float m = 0.0f;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(v[i]);
        m = a > m ? a : m;
        nan |= a != a;
    }
    return nan ? NAN : m;
}
/* Whether every sum x of a row lies in [lo, hi], x = fl(fl(ed c) + fl(ps pre)) (nearest rounding) or
   fl(ed c + fl(ps pre)) (stochastic: one rounding, a fused multiply-add), for codes c in [c_lo, c_hi] and
   |fl(ps pre)| <= m = fl(|ps| max |pre|). With dec_lo <= ed c_lo and dec_hi >= ed c_hi (decayed_bounds: the
   products rounded outward) both sums lie in [fl(dec_lo - m), fl(dec_hi + m)], as rounding is monotone (ed >= 0).
   False for NaN or infinite bounds. Inlined into its callers, whose arithmetic is not contracted either (m's
   product must stay rounded on its own). */
static inline __attribute__((always_inline)) NO_CONTRACT int in_range(float ed, float dec_lo, float dec_hi, float m,
                                                                      float lo, float hi) {
    EXACT_FP
    const float top = dec_hi + m, bottom = dec_lo - m;
    return ed >= 0.0f && top <= hi && bottom >= lo; /* comparisons with NaN are false */
}
/* [dec_lo, dec_hi] holding ed c for every code c in [c_lo, c_hi] (ed >= 0): fl(ed c_lo) and fl(ed c_hi), each
   moved one float outward (a rounded product is within half a unit in the last place of the exact one) */
static NO_CONTRACT void decayed_bounds(float ed, float c_lo, float c_hi, float *dec_lo, float *dec_hi) {
    EXACT_FP
    *dec_lo = nextafterf(ed * c_lo, -INFINITY);
    *dec_hi = nextafterf(ed * c_hi, INFINITY);
}

/* the recurrent trace's rows j0 <= j < j1 of batch element b at this step (key: its random stream) */
NO_CONTRACT void chip_elig_rec(const Run *r, int64_t b, int64_t j0, int64_t j1, uint32_t key) {
    EXACT_FP
    const int64_t N = r->N;
    const int bytes = (int)r->code_bytes, k = bytes == 1 ? 8 : 16, portable = (int)r->portable;
    const float two_k = (float)(1 << k);
    const float s_rec = r->q_scale[Q_ELIG_REC], f_rec = two_k / s_rec;
    const uint32_t words = row_words(N, k);
    const DecayTable *decay = NULL;
#ifdef CHIP_DECAY_TABLE
    if (bytes == 1 && !portable) decay = decay_table_of(r);
#endif
    /* the largest |ed c| and |pre| of the recurrent rows: a row whose sums cannot leave [lo, hi] skips the clamp */
    const float ed = two_k * r->ed, lo = two_k * r->q_min[Q_ELIG_REC], hi = two_k * r->q_max[Q_ELIG_REC];
    float dec_lo, dec_hi;
    decayed_bounds(ed, r->q_min[Q_ELIG_REC], r->q_max[Q_ELIG_REC], &dec_lo, &dec_hi);
    const float pre_max = abs_max(r->pre_rec + b * N, N);
    const int64_t gb = r->b0 + b; /* the whole batch's index of b: the random words' */
    for (int64_t j = j0; j < j1; j++) {
        const int64_t row = b * N + j;
        const float p = r->post[row];
        char *codes = (char *)r->elig_rec + row * N * bytes;
        /* no increment and zero codes: every x is 0, the codes stay 0 and add nothing (LIF: a neuron away from
           threshold whose traces have decayed away) */
        if (p == 0.0f && zero_codes(codes, N * bytes))
            continue;
        RowQ q = {ed, p * f_rec, lo, hi, r->L[row] * s_rec, key, (uint32_t)(gb * N + j) * words, k,
                  (int)r->q_nearest, NULL, NULL, decay,
                  in_range(ed, dec_lo, dec_hi, fabsf(p * f_rec) * pre_max, lo, hi)};
        chip_row(codes, bytes, r->pre_rec + b * N, N, &q, r->g_rec + j * N, portable);
    }
}

/* The input (which = Q_ELIG_IN, len = I codes per row) or bias (Q_ELIG_BIAS, len = 1) trace of the rows
   jg <= j < jg + nl (nl <= 16, jg a multiple of 16) of batch element b at this step:
       c <- SR(ed c + (post_j / s) pre_i),     gradient_ji += (L_j s) c
   as the recurrent trace's rows (lanes16), with the rows as lanes: element (j, i), i = P h + p (P = 32 / k codes
   per word), takes bits k p .. of word ctr + 16 h + (j - jg) of its step's stream, ctr = (b N + jg) col_blocks(len).
   Always clamped. */
static inline int64_t col_blocks(int64_t len, int k) { return (len + 32 / k - 1) / (32 / k); }

NO_CONTRACT void chip_cols(const Run *r, int which, int64_t b, int64_t jg, int64_t nl, uint32_t key) {
    EXACT_FP
    const int64_t N = r->N, I = r->I, len = which == Q_ELIG_IN ? I : 1;
    const int bytes = (int)r->code_bytes, k = bytes == 1 ? 8 : 16, P = 32 / k, nearest = (int)r->q_nearest;
    const uint32_t mask = k == 8 ? 0xffu : 0xffffu;
    const float two_k = (float)(1 << k), s = r->q_scale[which], f = two_k / s, inv = 1.0f / two_k;
    const float ed = two_k * r->ed, lo = two_k * r->q_min[which], hi = two_k * r->q_max[which];
    const float *src = which == Q_ELIG_IN ? r->pre_in + b * I : r->pre_bias + b;
    const int64_t nb = col_blocks(len, k);
    const uint32_t ctr = (uint32_t)((r->b0 + b) * N + jg) * (uint32_t)nb;
    char *codes = (char *)(which == Q_ELIG_IN ? r->elig_in : r->elig_bias) + (b * N + jg) * len * bytes;
    int8_t *c8 = (int8_t *)codes;
    int16_t *c16 = (int16_t *)codes;
    float *g = which == Q_ELIG_IN ? r->g_in + jg * len : r->g_bias + jg;
    float ps[16], ls[16];
    for (int64_t l = 0; l < nl; l++) ps[l] = r->post[b * N + jg + l] * f, ls[l] = r->L[b * N + jg + l] * s;
    for (int64_t h = 0; h < nb; h++) {
        uint32_t w[16] = {0};
        if (!nearest)
            for (int l = 0; l < 16; l++) w[l] = mix32((ctr + (uint32_t)h * 16 + (uint32_t)l) * GOLD ^ key);
        for (int p = 0; p < P && h * P + p < len; p++) {
            const int64_t i = h * P + p;
            const float pre = src[i];
#pragma omp simd
            for (int64_t l = 0; l < nl; l++) {
                const int64_t e = l * len + i;
                const float c = bytes == 1 ? (float)c8[e] : (float)c16[e], t2 = ps[l] * pre;
                float x = nearest ? ed * c + t2 : fmaf(ed, c, t2);
                x = x > lo ? x : lo; /* NaN -> lo */
                x = x < hi ? x : hi;
                const int32_t code = nearest ? (int32_t)rintf(x * inv)
                                             : ((int32_t)rintf(x) + (int32_t)((w[l] >> (k * p)) & mask)) >> k;
                if (bytes == 1) c8[e] = (int8_t)code; else c16[e] = (int16_t)code;
                g[e] += ls[l] * (float)code;
            }
        }
    }
}


/* ---------------------------------------------------------------- the recurrent traces over a chunk of steps */
/* The per-step kernel above streams every code and gradient row through memory at every step (B N^2 bytes: past
   L2 from N = 256, B = 16 on). Nothing in the forward pass reads the eligibility traces, so their update can wait:
   each step records its factors (chip_chunk_record), and chip_chunk_flush then takes every row through all the
   recorded steps at once, 64 codes at a time held in registers (as floats) with their gradient. Each step's codes
   are chip_row's: the same sums fl(fl(ed c) + fl(ps pre)), the same random words (word w of the row's stream of
   step t: mix32(GOLD (ctr + w) ^ key_t)), the same bits per element. Only the order in which the gradient adds the
   batch elements' terms changes (per chunk: element by element over the steps, instead of step by step over the
   elements): float rounding. */

/* Whether ni_update defers the traces to chip_chunk_flush: with a vector kernel (AVX-512 or AVX2), not when the
   portable loop is asked for (tests), at chip precision with full traces. */
int chip_chunks(const Run *r) {
#if (defined(__AVX512F__) && defined(__AVX512BW__)) || defined(CHIP_AVX2)
    return r->quant && r->full && !r->portable;
#else
    (void)r;
    return 0;
#endif
}

/* this step's factors of the traces (the presynaptic traces, post, L) and its random streams' keys */
void chip_chunk_record(const Run *r, ChipChunk *cc, const uint32_t keys[3]) {
    const int64_t B = r->B, N = r->N, I = r->I, s = cc->n++;
    memcpy(cc->pre + s * B * N, r->pre_rec, sizeof(float) * B * N);
    memcpy(cc->post + s * B * N, r->post, sizeof(float) * B * N);
    memcpy(cc->L + s * B * N, r->L, sizeof(float) * B * N);
    memcpy(cc->pre_in + s * B * I, r->pre_in, sizeof(float) * B * I);
    memcpy(cc->pre_bias + s * B, r->pre_bias, sizeof(float) * B);
    for (int64_t b = 0; b < B; b++) cc->pre_max[s * B + b] = abs_max(r->pre_rec + b * N, N);
    memcpy(cc->key[s], keys, sizeof(uint32_t) * 3);
}

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || defined(CHIP_AVX2)
/* one row over K steps: 2^k ed, the codes' bounds 2^k [lo, hi] and 1 / 2^k (v), step t's 2^k post / s and L s
   (ps[t], ls[t]), its stream key[t] and presynaptic trace pre + t stride; the row's words from ctr */
typedef struct {
    const float *ps, *ls; /* step t's: ps[t fstride], ls[t fstride] */
    const uint32_t (*key)[3]; /* step t's stream: key[t][0] */
    int64_t K, stride, fstride;
    int64_t t_inc; /* the first step with an increment (ps != 0; K: none) */
    uint32_t ctr;
} ChunkRow;
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef RowV ChunkV;


/* 16 ng codes from i (ng = 4 or 8 groups of 16; masks m: the last, partial superblock) through all K steps: the
   codes as floats c[] (exact integers), the gradient's elements in acc[]. Each group's update is a chain of ~16
   cycles of latency per step (convert, multiply, add, round, shift): 8 groups keep the vector units busy. */
static inline __attribute__((always_inline)) void chunk_groups(void *codes, const int bytes, const int nearest,
        const int clamp, const int ng, const int whole, const float *pre, int64_t i, const __mmask16 *m,
        const RowV *v, const ChunkRow *q, float *g) {
    const int k = bytes == 1 ? 8 : 16, per_word = bytes == 1 ? 4 : 2; /* groups per 16 random words */
    __m512 c[8], acc[8];
    for (int u = 0; u < ng; u++) {
        const __mmask16 mu = whole ? 0xffff : m[u];
        const __m512i ci = bytes == 1 ? _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mu, (int8_t *)codes + i + 16 * u))
                                      : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(mu,
                                                                                      (int16_t *)codes + i + 16 * u));
        c[u] = _mm512_cvtepi32_ps(ci);
        acc[u] = _mm512_maskz_loadu_ps(mu, g + i + 16 * u);
    }
    /* the word indices (multiplied) of the blocks of 16 words the groups draw from: block i / G on */
    const int nw = ng / per_word;
    __m512i wi[4];
    wi[0] = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(q->ctr + (uint32_t)(i / (16 * per_word)) * 16)),
                               _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
                               _mm512_set1_epi32((int)GOLD));
    for (int h = 1; h < nw; h++) wi[h] = _mm512_add_epi32(wi[h - 1], _mm512_set1_epi32((int)(16 * GOLD)));
    /* codes that are all 0 stay 0 and add nothing until the first increment */
    __m512 any = c[0];
    for (int u = 1; u < ng; u++) any = _mm512_or_ps(any, c[u]);
    const int64_t t0 = _mm512_test_epi32_mask(_mm512_castps_si512(any), _mm512_castps_si512(any)) ? 0 : q->t_inc;
    for (int64_t t = t0; t < q->K; t++) {
        const float pst = q->ps[t * q->fstride];
        const __m512i key = _mm512_set1_epi32((int)q->key[t][0]);
        __m512i w[4];
        for (int h = 0; h < nw; h++) w[h] = nearest ? _mm512_setzero_si512() : mix32_v(_mm512_xor_si512(wi[h], key));
        const __m512 ps = _mm512_set1_ps(pst), ls = _mm512_set1_ps(q->ls[t * q->fstride]);
        const float *p = pre + t * q->stride + i;
        for (int u = 0; u < ng; u++) {
            const __m512i r = bits_of(w[u / per_word], bytes, u % per_word);
            const __mmask16 mu = whole ? 0xffff : m[u];
            const __m512i code = pst != 0.0f ? code16(c[u], p + 16 * u, mu, r, ps, v, k, nearest, 1, clamp)
                                             : code16(c[u], p + 16 * u, mu, r, ps, v, k, nearest, 0, clamp);
            c[u] = _mm512_cvtepi32_ps(code);
            acc[u] = _mm512_fmadd_ps(c[u], ls, acc[u]);
        }
    }
    __m512i out[8];
    for (int u = 0; u < ng; u++) {
        out[u] = _mm512_cvtps_epi32(c[u]);
        _mm512_mask_storeu_ps(g + i + 16 * u, whole ? 0xffff : m[u], acc[u]);
    }
    if (whole) /* store_block: 64 int8 or 32 int16 codes */
        for (int u = 0; u < ng; u += per_word) store_block(codes, bytes, i + 16 * u, out + u);
    else
        for (int u = 0; u < ng; u++) {
            if (bytes == 1) _mm_mask_storeu_epi8((int8_t *)codes + i + 16 * u, m[u], _mm512_cvtepi32_epi8(out[u]));
            else _mm256_mask_storeu_epi16((int16_t *)codes + i + 16 * u, m[u], _mm512_cvtepi32_epi16(out[u]));
        }
}
static inline __attribute__((always_inline)) void chunk_w(void *codes, const int bytes, const int nearest,
        const int clamp, const float *pre, int64_t n, const RowV *v, const ChunkRow *q, float *g) {
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) chunk_groups(codes, bytes, nearest, clamp, 8, 1, pre, i, NULL, v, q, g);
    if (i + 64 <= n) {
        chunk_groups(codes, bytes, nearest, clamp, 4, 1, pre, i, NULL, v, q, g);
        i += 64;
    }
    if (i < n) {
        __mmask16 m[4];
        for (int u = 0; u < 4; u++) {
            const int64_t left = n - i - 16 * u;
            m[u] = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        chunk_groups(codes, bytes, nearest, clamp, 4, 0, pre, i, m, v, q, g);
    }
}
static void chunk_row(void *codes, int bytes, int nearest, int clamp, const float *pre, int64_t n, const RowV *v,
                      const ChunkRow *q, float *g) {
    /* constant widths and modes: the group loops unroll, shifts and masks are immediates */
    if (nearest) {
        if (bytes == 1) chunk_w(codes, 1, 1, 1, pre, n, v, q, g);
        else chunk_w(codes, 2, 1, 1, pre, n, v, q, g);
    } else if (clamp) {
        if (bytes == 1) chunk_w(codes, 1, 0, 1, pre, n, v, q, g);
        else chunk_w(codes, 2, 0, 1, pre, n, v, q, g);
    } else {
        if (bytes == 1) chunk_w(codes, 1, 0, 0, pre, n, v, q, g);
        else chunk_w(codes, 2, 0, 0, pre, n, v, q, g);
    }
}

/* chip_cols over the K recorded steps: the rows' codes of up to P inputs (one block of words) and their gradient
   held in registers across the steps */
static NO_CONTRACT void cols_chunk(const Run *r, const ChipChunk *cc, int64_t K, int which, int64_t b, int64_t jg,
                                   int64_t nl) {
    EXACT_FP
    const int64_t N = r->N, I = r->I, B = r->B, len = which == Q_ELIG_IN ? I : 1;
    const int bytes = (int)r->code_bytes, k = bytes == 1 ? 8 : 16, P = 32 / k, nearest = (int)r->q_nearest;
    const float two_k = (float)(1 << k), s = r->q_scale[which];
    const __m512 f = _mm512_set1_ps(two_k / s), sv = _mm512_set1_ps(s), inv = _mm512_set1_ps(1.0f / two_k);
    const __m512 ed = _mm512_set1_ps(two_k * r->ed), lo = _mm512_set1_ps(two_k * r->q_min[which]),
                 hi = _mm512_set1_ps(two_k * r->q_max[which]);
    const __mmask16 m = nl >= 16 ? 0xffff : (__mmask16)((1u << nl) - 1);
    const int64_t nb = col_blocks(len, k);
    const uint32_t ctr = (uint32_t)((r->b0 + b) * N + jg) * (uint32_t)nb;
    const int kw = which == Q_ELIG_IN ? 1 : 2;
    char *codes = (char *)(which == Q_ELIG_IN ? r->elig_in : r->elig_bias) + (b * N + jg) * len * bytes;
    float *g = which == Q_ELIG_IN ? r->g_in + jg * len : r->g_bias + jg;
    for (int64_t h = 0; h < nb; h++) {
        const int np = len - h * P < P ? (int)(len - h * P) : P;
        float cv[4][16] = {{0}}, gv[4][16] = {{0}};
        for (int p = 0; p < np; p++) /* the block's codes and gradient elements, row by row (strided: len) */
            for (int64_t l = 0; l < nl; l++) {
                const int64_t e = l * len + h * P + p;
                cv[p][l] = bytes == 1 ? (float)((int8_t *)codes)[e] : (float)((int16_t *)codes)[e];
                gv[p][l] = g[e];
            }
        __m512 c[4], acc[4];
        for (int p = 0; p < 4; p++) c[p] = _mm512_loadu_ps(cv[p]), acc[p] = _mm512_loadu_ps(gv[p]);
        const __m512i wi = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(ctr + (uint32_t)h * 16)),
                           _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
                           _mm512_set1_epi32((int)GOLD));
        for (int64_t t = 0; t < K; t++) {
            const __m512i w = nearest ? _mm512_setzero_si512()
                                      : mix32_v(_mm512_xor_si512(wi, _mm512_set1_epi32((int)cc->key[t][kw])));
            const int64_t row = t * B * N + b * N + jg;
            const __m512 ps = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, cc->post + row), f);
            const __m512 ls = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, cc->L + row), sv);
            const float *pre = which == Q_ELIG_IN ? cc->pre_in + (t * B + b) * I + h * P : cc->pre_bias + t * B + b;
            for (int p = 0; p < np; p++) {
                const __m512 t2 = _mm512_mul_ps(ps, _mm512_set1_ps(pre[p]));
                __m512 x = nearest ? _mm512_add_round_ps(_mm512_mul_ps(c[p], ed), t2,
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                   : _mm512_fmadd_ps(c[p], ed, t2);
                x = _mm512_min_ps(_mm512_max_ps(x, lo), hi); /* max(x, lo): lo for NaN, as chip_cols */
                const __m512i code = nearest ? _mm512_cvtps_epi32(_mm512_mul_ps(x, inv))
                                             : _mm512_srai_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(x),
                                                                                  bits_of(w, bytes, p)), k);
                c[p] = _mm512_cvtepi32_ps(code);
                acc[p] = _mm512_fmadd_ps(c[p], ls, acc[p]);
            }
        }
        for (int p = 0; p < np; p++) _mm512_storeu_ps(cv[p], c[p]), _mm512_storeu_ps(gv[p], acc[p]);
        for (int p = 0; p < np; p++)
            for (int64_t l = 0; l < nl; l++) {
                const int64_t e = l * len + h * P + p;
                if (bytes == 1) ((int8_t *)codes)[e] = (int8_t)cv[p][l]; else ((int16_t *)codes)[e] = (int16_t)cv[p][l];
                g[e] = gv[p][l];
            }
    }
}

#elif defined(CHIP_AVX2)
typedef RowV8 ChunkV;
/* 64 codes from i (int8: one block of words; int16: two) through the K steps, 8 lanes at a time as codes_avx2_w
   takes them (lanes 0-7 of each group of 16 from words 0-7, lanes 8-15 from words 8-15): the codes as floats in
   registers, the gradient's elements updated in place (they stay in L1) */
static inline __attribute__((always_inline)) NO_CONTRACT void chunk64_avx2(void *codes, const int bytes,
        const int nearest, const int clamp, const float *pre, int64_t i, const RowV8 *v, const ChunkRow *q,
        float *g) {
    EXACT_FP
    const int k = bytes == 1 ? 8 : 16;
    __m256 c[8];
    for (int h = 0; h < 8; h++)
        c[h] = _mm256_cvtepi32_ps(bytes == 1 ? _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((int8_t *)codes + i + 8 * h)))
                                             : _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((int16_t *)codes + i + 8 * h))));
    __m256 any = c[0];
    for (int h = 1; h < 8; h++) any = _mm256_or_ps(any, c[h]);
    const int64_t t0 = _mm256_testz_si256(_mm256_castps_si256(any), _mm256_castps_si256(any)) ? q->t_inc : 0;
    const int64_t blk = bytes == 1 ? i / 64 : i / 32;
    __m256i ci[4];
    ci[0] = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)(q->ctr + (uint32_t)blk * 16)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), _mm256_set1_epi32((int)GOLD));
    for (int h = 1; h < 4; h++) ci[h] = _mm256_add_epi32(ci[h - 1], _mm256_set1_epi32((int)(8 * GOLD)));
    for (int64_t t = t0; t < q->K; t++) {
        const float pst = q->ps[t * q->fstride];
        const __m256i key = _mm256_set1_epi32((int)q->key[t][0]);
        __m256i w[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        if (!nearest)
            for (int h = 0; h < (bytes == 1 ? 2 : 4); h++) w[h] = mix32_v8(_mm256_xor_si256(ci[h], key));
        const __m256 ps = _mm256_set1_ps(pst), ls = _mm256_set1_ps(q->ls[t * q->fstride]);
        const float *p = pre + t * q->stride + i;
        for (int h = 0; h < 8; h++) {
            const __m256i r = bytes == 1 ? bits8(w[0], w[1], 1, h) : bits8(w[2 * (h >> 2)], w[2 * (h >> 2) + 1], 2, h & 3);
            __m256 x = _mm256_mul_ps(c[h], v->ed);
            if (pst != 0.0f) {
                const __m256 t2 = _mm256_mul_ps(ps, _mm256_loadu_ps(p + 8 * h));
                x = nearest ? _mm256_add_ps(x, t2) : _mm256_fmadd_ps(c[h], v->ed, t2);
            }
            if (clamp) x = _mm256_min_ps(_mm256_max_ps(x, v->lo), v->hi); /* max(x, lo): lo for NaN */
            const __m256i code = nearest ? _mm256_cvtps_epi32(_mm256_mul_ps(x, v->inv))
                                         : (k == 8 ? _mm256_srai_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), r), 8)
                                                   : _mm256_srai_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), r), 16));
            c[h] = _mm256_cvtepi32_ps(code);
            _mm256_storeu_ps(g + i + 8 * h, _mm256_fmadd_ps(c[h], ls, _mm256_loadu_ps(g + i + 8 * h)));
        }
    }
    __m256i out[8];
    for (int h = 0; h < 8; h++) out[h] = _mm256_cvtps_epi32(c[h]);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    if (bytes == 1)
        for (int h = 0; h < 8; h += 4) { /* 32 int32 codes to bytes (in range: no saturation) */
            const __m256i pk = _mm256_packs_epi16(_mm256_packs_epi32(out[h], out[h + 1]),
                                                  _mm256_packs_epi32(out[h + 2], out[h + 3]));
            _mm256_storeu_si256((__m256i *)((int8_t *)codes + i + 8 * h), _mm256_permutevar8x32_epi32(pk, order));
        }
    else
        for (int h = 0; h < 8; h += 2)
            _mm256_storeu_si256((__m256i *)((int16_t *)codes + i + 8 * h),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(out[h], out[h + 1]), 0xD8));
}
/* a row: whole passes of 64 codes, then the rest step by step through the portable loop (from its block's first
   word on: 64 is a whole number of blocks) */
static inline __attribute__((always_inline)) NO_CONTRACT void chunk_w(void *codes, const int bytes,
        const int nearest, const int clamp, const float *pre, int64_t n, const RowV8 *v, const ChunkRow *q, float *g) {
    EXACT_FP
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) chunk64_avx2(codes, bytes, nearest, clamp, pre, i, v, q, g);
    if (i == n) return;
    const int k = bytes == 1 ? 8 : 16;
    const float ed = _mm256_cvtss_f32(v->ed), lo = _mm256_cvtss_f32(v->lo), hi = _mm256_cvtss_f32(v->hi);
    for (int64_t t = 0; t < q->K; t++) {
        const RowQ rq = {ed, q->ps[t * q->fstride], lo, hi, q->ls[t * q->fstride], q->key[t][0],
                         q->ctr + (uint32_t)(i / (16 * (32 / k))) * 16, k, nearest, NULL, NULL, NULL, 0};
        codes_scalar((char *)codes + i * bytes, bytes, pre + t * q->stride + i, n - i, &rq, g + i);
    }
}
static void chunk_row(void *codes, int bytes, int nearest, int clamp, const float *pre, int64_t n, const RowV8 *v,
                      const ChunkRow *q, float *g) {
    if (nearest) {
        if (bytes == 1) chunk_w(codes, 1, 1, 1, pre, n, v, q, g);
        else chunk_w(codes, 2, 1, 1, pre, n, v, q, g);
    } else if (clamp) {
        if (bytes == 1) chunk_w(codes, 1, 0, 1, pre, n, v, q, g);
        else chunk_w(codes, 2, 0, 1, pre, n, v, q, g);
    } else {
        if (bytes == 1) chunk_w(codes, 1, 0, 0, pre, n, v, q, g);
        else chunk_w(codes, 2, 0, 0, pre, n, v, q, g);
    }
}
/* chip_cols over the K recorded steps: the rows' codes of up to P inputs (one block of words) and their gradient
   elements kept together across the steps (16 lanes each, vectorised by the compiler) */
static NO_CONTRACT void cols_chunk(const Run *r, const ChipChunk *cc, int64_t K, int which, int64_t b, int64_t jg,
                                   int64_t nl) {
    EXACT_FP
    const int64_t N = r->N, I = r->I, B = r->B, len = which == Q_ELIG_IN ? I : 1;
    const int bytes = (int)r->code_bytes, k = bytes == 1 ? 8 : 16, P = 32 / k, nearest = (int)r->q_nearest;
    const uint32_t mask = k == 8 ? 0xffu : 0xffffu;
    const float two_k = (float)(1 << k), s = r->q_scale[which], f = two_k / s, inv = 1.0f / two_k;
    const float ed = two_k * r->ed, lo = two_k * r->q_min[which], hi = two_k * r->q_max[which];
    const int64_t nb = col_blocks(len, k);
    const uint32_t ctr = (uint32_t)((r->b0 + b) * N + jg) * (uint32_t)nb;
    const int kw = which == Q_ELIG_IN ? 1 : 2;
    char *codes = (char *)(which == Q_ELIG_IN ? r->elig_in : r->elig_bias) + (b * N + jg) * len * bytes;
    float *g = which == Q_ELIG_IN ? r->g_in + jg * len : r->g_bias + jg;
    for (int64_t h = 0; h < nb; h++) {
        const int np = len - h * P < P ? (int)(len - h * P) : P;
        float c[4][16] = {{0}}, acc[4][16] = {{0}}, ps[16] = {0}, ls[16] = {0};
        uint32_t wi[16], w[16];
        for (int p = 0; p < np; p++) /* the block's codes and gradient elements, row by row (strided: len) */
            for (int64_t l = 0; l < nl; l++) {
                const int64_t e = l * len + h * P + p;
                c[p][l] = bytes == 1 ? (float)((int8_t *)codes)[e] : (float)((int16_t *)codes)[e];
                acc[p][l] = g[e];
            }
        for (int l = 0; l < 16; l++) wi[l] = (ctr + (uint32_t)h * 16 + (uint32_t)l) * GOLD;
        for (int64_t t = 0; t < K; t++) {
            const uint32_t key = cc->key[t][kw];
            const float *post = cc->post + t * B * N + b * N + jg, *L = cc->L + t * B * N + b * N + jg;
            const float *pre = which == Q_ELIG_IN ? cc->pre_in + (t * B + b) * I + h * P : cc->pre_bias + t * B + b;
            for (int64_t l = 0; l < nl; l++) ps[l] = post[l] * f, ls[l] = L[l] * s;
#pragma omp simd
            for (int l = 0; l < 16; l++) w[l] = nearest ? 0u : mix32(wi[l] ^ key);
            for (int p = 0; p < np; p++) {
                const float pr = pre[p];
#pragma omp simd
                for (int l = 0; l < 16; l++) {
                    const float t2 = ps[l] * pr;
                    float x = nearest ? ed * c[p][l] + t2 : fmaf(ed, c[p][l], t2);
                    x = x > lo ? x : lo; /* NaN -> lo, as chip_cols */
                    x = x < hi ? x : hi;
                    const int32_t code = nearest ? (int32_t)rintf(x * inv)
                                                 : ((int32_t)rintf(x) + (int32_t)((w[l] >> (k * p)) & mask)) >> k;
                    c[p][l] = (float)code;
                    acc[p][l] += ls[l] * c[p][l];
                }
            }
        }
        for (int p = 0; p < np; p++)
            for (int64_t l = 0; l < nl; l++) {
                const int64_t e = l * len + h * P + p;
                if (bytes == 1) ((int8_t *)codes)[e] = (int8_t)c[p][l]; else ((int16_t *)codes)[e] = (int16_t)c[p][l];
                g[e] = acc[p][l];
            }
    }
}
#endif

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || defined(CHIP_AVX2)
/* The recorded steps' updates of the traces and their gradients (chip_elig_rec's recurrent rows and chip_cols'
   input and bias rows, step after step for each row); threads own blocks of rows (whole groups of 16) as in
   ni_update. Empties the chunk. */
NO_CONTRACT void chip_chunk_flush(const Run *r, ChipChunk *cc) {
    EXACT_FP
    const int64_t K = cc->n, B = r->B, N = r->N;
    cc->n = 0;
    if (K == 0) return;
    const int bytes = (int)r->code_bytes, k = bytes == 1 ? 8 : 16, nearest = (int)r->q_nearest;
    const float two_k = (float)(1 << k);
    const float s_rec = r->q_scale[Q_ELIG_REC], f_rec = two_k / s_rec;
    const uint32_t words = row_words(N, k);
    const float ed = two_k * r->ed, lo = two_k * r->q_min[Q_ELIG_REC], hi = two_k * r->q_max[Q_ELIG_REC];
    float dec_lo, dec_hi;
    decayed_bounds(ed, r->q_min[Q_ELIG_REC], r->q_max[Q_ELIG_REC], &dec_lo, &dec_hi);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const ChunkV v = {_mm512_set1_ps(ed), _mm512_setzero_ps(), _mm512_set1_ps(lo), _mm512_set1_ps(hi),
                      _mm512_set1_ps(1.0f / two_k), _mm512_setzero_ps()};
#else
    const ChunkV v = {_mm256_set1_ps(ed), _mm256_setzero_ps(), _mm256_set1_ps(lo), _mm256_set1_ps(hi),
                      _mm256_set1_ps(1.0f / two_k), _mm256_setzero_ps()};
#endif
    const int64_t jb = chip_rows_per_block(N);
    const int par = K * B * N * N >= r->par_work;
#pragma omp parallel for if (par) schedule(dynamic, 1)
    for (int64_t j0 = 0; j0 < N; j0 += jb) {
        const int64_t j1 = j0 + jb < N ? j0 + jb : N;
        enum { R = 64 }; /* rows whose factors are gathered together */
        float ps[CHIP_CHUNK * R], ls[CHIP_CHUNK * R], m[R];
        int64_t inc[R];
        int nan[R];
        for (int64_t b = 0; b < B; b++) {
            const int64_t gb = r->b0 + b;
            for (int64_t ja = j0; ja < j1; ja += R) {
                const int64_t nj = j1 - ja < R ? j1 - ja : R;
                /* each row's steps' factors, and whether every step's sums stay within [lo, hi] (chip_elig_rec's
                   in_range, which is monotone in m = fl(|ps| max |pre|): true for the largest m over the steps
                   exactly when true for each) */
                for (int64_t u = 0; u < nj; u++) m[u] = 0.0f, inc[u] = K, nan[u] = 0;
                for (int64_t t = K - 1; t >= 0; t--) { /* backwards: inc[u] ends as row u's first increment */
                    const float *post = cc->post + t * B * N + b * N + ja, *L = cc->L + t * B * N + b * N + ja;
                    const float pm = cc->pre_max[t * B + b];
#pragma omp simd
                    for (int64_t u = 0; u < nj; u++) {
                        const float f = post[u] * f_rec, a = fabsf(f) * pm;
                        ps[t * R + u] = f;
                        ls[t * R + u] = L[u] * s_rec;
                        m[u] = a > m[u] ? a : m[u];
                        nan[u] |= a != a;
                        inc[u] = post[u] != 0.0f ? t : inc[u];
                    }
                }
                for (int64_t u = 0; u < nj; u++) {
                    const int64_t j = ja + u, row = b * N + j;
                    char *codes = (char *)r->elig_rec + row * N * bytes;
                    if (inc[u] == K && zero_codes(codes, N * bytes)) continue; /* zero codes that only decay */
                    const int fits = !nan[u] && in_range(ed, dec_lo, dec_hi, m[u], lo, hi);
                    const ChunkRow q = {ps + u, ls + u, cc->key, K, B * N, R, inc[u],
                                        (uint32_t)(gb * N + j) * words};
                    chunk_row(codes, bytes, nearest, !fits, cc->pre + b * N, N, &v, &q, r->g_rec + j * N);
                }
            }
            for (int64_t jg = j0; jg < j1; jg += 16) {
                if (r->I) cols_chunk(r, cc, K, Q_ELIG_IN, b, jg, j1 - jg < 16 ? j1 - jg : 16);
                cols_chunk(r, cc, K, Q_ELIG_BIAS, b, jg, j1 - jg < 16 ? j1 - jg : 16);
            }
        }
    }
}
#else
void chip_chunk_flush(const Run *r, ChipChunk *cc) { (void)r; cc->n = 0; }
#endif
