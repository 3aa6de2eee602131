/* neuroinit fused step: the network's arithmetic -- activations, and the forward product (dense, and event-driven
   for spikes) -- that ni_forward (fused_step.c) runs every step. */
#include "fused_run.h"
#include "vecmath.h"

/* ---------------------------------------------------------------- activations (vectorisable loops) */
/* f = act(d), df = act'(d) for n values; f may alias d */
void activate(int a, const float *d, float *f, float *df, int64_t n) {
    switch (a) {
        case TANH:
#pragma omp simd
            for (int64_t k = 0; k < n; k++) { const float t = tanh_fast(d[k]); f[k] = t; df[k] = 1.0f - t * t; }
            break;
        case LINEAR:
            for (int64_t k = 0; k < n; k++) { f[k] = d[k]; df[k] = 1.0f; }
            break;
        case RELU:
#pragma omp simd
            for (int64_t k = 0; k < n; k++) {
                const float v = d[k];
                f[k] = v > 0.0f ? v : 0.0f;
                df[k] = v > 0.0f ? 1.0f : 0.0f;
            }
            break;
        default: /* softplus with torch's threshold 20; derivative: the logistic function */
            for (int64_t k = 0; k < n; k++) {
                const float v = d[k];
                f[k] = v > 20.0f ? v : log1pf(expf(v));
                df[k] = 1.0f / (1.0f + expf(-v));
            }
    }
}

/* ---------------------------------------------------------------- products */
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
float dot(const float *a, const float *b, int64_t n) {
    v8f s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { s0 += ld8(a + i) * ld8(b + i); s1 += ld8(a + i + 8) * ld8(b + i + 8); }
    for (; i + 8 <= n; i += 8) s0 += ld8(a + i) * ld8(b + i);
    float r = hsum8(s0 + s1);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* The forward product: the drive of every neuron, D (B, N) = bias + A (B, K) Wt (K, N) + U (B, I) Wti (I, N), all
   row-major (Wt, Wti: the transposed weight matrices, row k = what presynaptic k sends to every neuron). */

/* R rows x 16 columns of D in 2 R vector registers (R = 6 or 4: 2 loads + R broadcasts per 2 R FMAs). P, Pi: the
   column block's K x 16 and I x 16 panels of Wt and Wti, packed contiguously (fused.py), so that the panel stays in
   L1 across row blocks (rows of Wt 4 KB apart would all fall into a few L1 sets). R is a constant after inlining,
   so the q loops unroll. */
static inline __attribute__((always_inline)) void drive_rows(const int R, const float *A, int64_t K, const float *P,
        const float *U, int64_t I, const float *Pi, const float *bias, int64_t N, int64_t j0, float *D) {
    v8f c[6][2];
    const v8f b0 = ld8(bias + j0), b1 = ld8(bias + j0 + 8);
    for (int q = 0; q < R; q++) { c[q][0] = b0; c[q][1] = b1; }
    for (int64_t k = 0; k < K; k++) {
        const v8f w0 = ld8(P + 16 * k), w1 = ld8(P + 16 * k + 8);
        for (int q = 0; q < R; q++) { const float a = A[q * K + k]; c[q][0] += a * w0; c[q][1] += a * w1; }
    }
    for (int64_t k = 0; k < I; k++) {
        const v8f w0 = ld8(Pi + 16 * k), w1 = ld8(Pi + 16 * k + 8);
        for (int q = 0; q < R; q++) { const float a = U[q * I + k]; c[q][0] += a * w0; c[q][1] += a * w1; }
    }
    for (int q = 0; q < R; q++) { st8(D + q * N + j0, c[q][0]); st8(D + q * N + j0 + 8, c[q][1]); }
}

/* one row x 16 columns: K split four ways (a single accumulator chain is FMA-latency bound) */
static void drive_row(const float *a, int64_t K, const float *P, const float *u, int64_t I, const float *Pi,
                      const float *bias, int64_t j0, float *d) {
    v8f c[4][2] = {{{0}}};
    c[0][0] = ld8(bias + j0); c[0][1] = ld8(bias + j0 + 8);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
        for (int q = 0; q < 4; q++) {
            const float *w = P + 16 * (k + q);
            c[q][0] += a[k + q] * ld8(w); c[q][1] += a[k + q] * ld8(w + 8);
        }
    for (; k < K; k++) { c[0][0] += a[k] * ld8(P + 16 * k); c[0][1] += a[k] * ld8(P + 16 * k + 8); }
    for (k = 0; k < I; k++) { c[1][0] += u[k] * ld8(Pi + 16 * k); c[1][1] += u[k] * ld8(Pi + 16 * k + 8); }
    st8(d + j0, (c[0][0] + c[1][0]) + (c[2][0] + c[3][0]));
    st8(d + j0 + 8, (c[0][1] + c[1][1]) + (c[2][1] + c[3][1]));
}

/* Wp, Wpi: Wt and Wti packed by 16-column blocks (block jb: K x 16, then I x 16, contiguous) */
void drive_dense(const float *A, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                        int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                        int par) {
    /* rows in blocks of 6, then 4 (a remainder of 2 turns one block of 6 into two of 4), then single rows */
    const int64_t b6 = 6 * (B / 6 - (B % 6 == 2 && B >= 8)), nb = N / 16;
#if defined(__AVX512F__)
    /* pairs of column blocks by rows32 (vecmath.h; rows in blocks of 8, then 4), then as below: the last odd block */
    const int64_t npair = nb / 2;
#pragma omp parallel for if (par) schedule(static)
    for (int64_t jp = 0; jp < npair; jp++) {
        const int64_t j0 = jp * 32;
        const float *P0 = Wp + 2 * jp * K * 16, *P1 = P0 + K * 16;
        const float *Pi0 = Wpi + 2 * jp * I * 16, *Pi1 = Pi0 + I * 16;
        int64_t b = 0;
        for (; b + 8 <= B; b += 8) rows32(8, A + b * K, K, P0, P1, U + b * I, I, Pi0, Pi1, bias, 0, N, j0, D + b * N);
        for (; b + 4 <= B; b += 4) rows32(4, A + b * K, K, P0, P1, U + b * I, I, Pi0, Pi1, bias, 0, N, j0, D + b * N);
        for (; b < B; b++) {
            drive_row(A + b * K, K, P0, U + b * I, I, Pi0, bias, j0, D + b * N);
            drive_row(A + b * K, K, P1, U + b * I, I, Pi1, bias, j0 + 16, D + b * N);
        }
    }
    const int64_t jb_first = 2 * npair;
#else
    const int64_t jb_first = 0;
#endif
#pragma omp parallel for if (par) schedule(static)
    for (int64_t jb = jb_first; jb < nb; jb++) {
        const int64_t j0 = jb * 16;
        const float *P = Wp + jb * K * 16, *Pi = Wpi + jb * I * 16;
        int64_t b = 0;
        for (; b < b6; b += 6) drive_rows(6, A + b * K, K, P, U + b * I, I, Pi, bias, N, j0, D + b * N);
        for (; b + 4 <= B; b += 4) drive_rows(4, A + b * K, K, P, U + b * I, I, Pi, bias, N, j0, D + b * N);
        for (; b < B; b++) drive_row(A + b * K, K, P, U + b * I, I, Pi, bias, j0, D + b * N);
    }
    for (int64_t j = nb * 16; j < N; j++) /* the last N mod 16 columns */
        for (int64_t b = 0; b < B; b++) {
            float s = bias[j];
            for (int64_t k = 0; k < K; k++) s += A[b * K + k] * Wt[k * N + j];
            for (int64_t k = 0; k < I; k++) s += U[b * I + k] * Wti[k * N + j];
            D[b * N + j] = s;
        }
}

/* The same for sparse A (spikes): only the rows of Wt whose presynaptic entry is non-zero are added, so the cost
   follows the number of spikes (event-driven, as on a chip); the same sum as the dense product (zero terms
   skipped). Each row's events are listed once (event_list, int32 indices); then per group of EV_PG packed
   16-column panels (K x 16 each, contiguous: the group stays in L1/L2 across rows), every row holds its
   EV_PG x 16 outputs in EV_CH x EV_PG x 16 / EV_W vector registers and adds each event's panel rows (the
   widest registers -march=native gives: AVX-512 or AVX2, else GCC's generic vectors), without multiplying
   where the row holds only 0 and 1 (spikes). Measured at N = 256, B = 16, ~18% spikes, one thread (Xeon, under
   load): 11 -> 5.5 us per step (AVX-512 build), 11.3 -> 8.0 us (AVX2 build). */
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define EV_W 16 /* floats per vector register */
#define EV_PG 4 /* panels per pass: 4 x 16 columns */
#else
#define EV_W 8
#define EV_PG 2 /* 16 registers (AVX2): 2 x 16 columns, 4 vectors */
#endif
#define EV_CH 2 /* accumulator chains per vector: with EV_PG 16 / EV_W vectors, 8 independent FMA chains */
typedef float evf __attribute__((vector_size(4 * EV_W)));
static inline evf ldw(const float *p) { evf v; memcpy(&v, p, sizeof v); return v; }
static inline void stw(float *p, evf v) { memcpy(p, &v, sizeof v); }

#if !defined(__AVX512F__) && defined(__AVX2__)
/* mask of 8 lanes -> the positions of its set bits in order, 4 bits each (event_list's AVX2 path) */
static uint32_t set_bits8[256];
__attribute__((constructor)) static void set_bits8_init(void) {
    for (unsigned m = 0; m < 256; m++) {
        uint32_t packed = 0;
        for (unsigned bit = 0, c = 0; bit < 8; bit++)
            if (m >> bit & 1u) packed |= bit << (4 * c++);
        set_bits8[m] = packed;
    }
}
#endif

/* Row z (K values) -> the indices of its non-zero entries, in order, into ev; returns their count. ev has room for
   `room` >= K entries (a vector store may write up to 15 past the count where room allows). *unit: whether every
   non-zero entry is 1 (spikes), so that the product may add weights without multiplying (the same values). */
static int32_t event_list(const float *z, int64_t K, int32_t *ev, int64_t room, int *unit) {
    int32_t ne = 0;
    int64_t k = 0, other = 0; /* other: entries that are neither 0 nor 1 */
#if defined(__AVX512F__)
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; k + 16 <= K; k += 16) { /* compress in a register, then one plain store (a compressing store to memory
                                      is microcoded on some AMD cores) */
        const __m512 v = _mm512_loadu_ps(z + k);
        const __mmask16 m = _mm512_cmpneq_ps_mask(v, _mm512_setzero_ps());
        const __m512i idx = _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32((int)k)));
        other |= m & ~_mm512_cmpeq_ps_mask(v, _mm512_set1_ps(1.0f));
        if (ne + 16 <= room) _mm512_storeu_si512((void *)(ev + ne), idx);
        else _mm512_mask_storeu_epi32(ev + ne, (__mmask16)((1u << __builtin_popcount(m)) - 1), idx);
        ne += __builtin_popcount(m);
    }
#elif defined(__AVX2__)
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; k + 8 <= K; k += 8) { /* a mask of 8 lanes, its set bits' positions from a table, one plain store */
        const __m256 v = _mm256_loadu_ps(z + k);
        const unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
        other |= m & ~(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(1.0f), _CMP_EQ_OQ));
        const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)set_bits8[m]), shifts),
                                             _mm256_set1_epi32(15));
        const __m256i idx = _mm256_add_epi32(pos, _mm256_set1_epi32((int)k));
        if (ne + 8 <= room) {
            _mm256_storeu_si256((__m256i *)(void *)(ev + ne), idx);
        } else {
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)(void *)t, idx);
            memcpy(ev + ne, t, sizeof(int32_t) * (size_t)__builtin_popcount(m));
        }
        ne += __builtin_popcount(m);
    }
#endif
    (void)room;
    for (; k < K; k++) { /* branch-free: no mispredictions */
        ev[ne] = (int32_t)k;
        ne += z[k] != 0.0f;
        other |= z[k] != 0.0f && z[k] != 1.0f;
    }
    *unit = other == 0;
    return ne;
}

/* NP 16-column panels (Wp, Wpi: packed by ni_pack) of one output row d from column j0: bias + sum over the events
   of z[k] Wt[k, .] + u Wti, the events split over EV_CH accumulator chains (summed at the end) */
static inline __attribute__((always_inline)) void events_panels(const int NP, const int unit, const float *z,
        const int32_t *ev, int32_t ne, const float *P, int64_t K, const float *u, const float *Pi, int64_t I,
        const float *bias, int64_t j0, float *d) {
    enum { PV = 16 / EV_W }; /* vectors per panel row */
    evf c[EV_CH][EV_PG * PV];
    for (int v = 0; v < NP * PV; v++) {
        c[0][v] = ldw(bias + j0 + v * EV_W);
        for (int q = 1; q < EV_CH; q++) c[q][v] = (evf){0};
    }
    int32_t e = 0;
    for (; e + EV_CH <= ne; e += EV_CH)
        for (int q = 0; q < EV_CH; q++) {
            const int64_t k = ev[e + q];
            const float s = z[k];
            for (int v = 0; v < NP * PV; v++) {
                const evf w = ldw(P + v / PV * K * 16 + 16 * k + v % PV * EV_W);
                c[q][v] += unit ? w : s * w; /* unit: s = 1, no broadcast to load */
            }
        }
    for (; e < ne; e++) {
        const int64_t k = ev[e];
        const float s = z[k];
        for (int v = 0; v < NP * PV; v++) {
            const evf w = ldw(P + v / PV * K * 16 + 16 * k + v % PV * EV_W);
            c[0][v] += unit ? w : s * w;
        }
    }
    for (int64_t k = 0; k < I; k++) {
        const float s = u[k];
        for (int v = 0; v < NP * PV; v++) c[EV_CH - 1][v] += s * ldw(Pi + v / PV * I * 16 + 16 * k + v % PV * EV_W);
    }
    for (int v = 0; v < NP * PV; v++) {
        evf t = c[0][v];
        for (int q = 1; q < EV_CH; q++) t += c[q][v];
        stw(d + j0 + v * EV_W, t);
    }
}

/* events_panels with the panel count and unit flag as constants */
static void events_panels_any(int64_t np, int unit, const float *z, const int32_t *ev, const float *P, int64_t K,
                              const float *u, const float *Pi, int64_t I, const float *bias, int64_t j0, float *d) {
    const int32_t ne = ev[K];
    if (np == EV_PG && unit) events_panels(EV_PG, 1, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
    else if (np == EV_PG) events_panels(EV_PG, 0, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
    else if (np == 2 && unit) events_panels(2, 1, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
    else if (np == 2) events_panels(2, 0, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
    else if (unit) events_panels(1, 1, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
    else events_panels(1, 0, z, ev, ne, P, K, u, Pi, I, bias, j0, d);
}

/* par_work: the fewest multiply-adds (events x N) worth a parallel loop */
void drive_events(const float *Z, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                         int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                         int64_t *idx, int64_t par_work) {
    /* in idx's 2 B (K + 1) int32: B rows of K + 1 (the count last), then B unit flags */
    int32_t *lists = (int32_t *)idx, *units = lists + B * (K + 1);
    int64_t events = 0;
    for (int64_t b = 0; b < B; b++) {
        int32_t *ev = lists + b * (K + 1);
        int unit;
        ev[K] = event_list(Z + b * K, K, ev, (B - b) * (K + 1), &unit); /* stores stay before the flags */
        units[b] = unit;
        events += ev[K];
    }
    const int par = (events + B * I) * N >= par_work; /* the work done, not B K N: sparse steps stay on one thread */
    const int64_t nb = N / 16, ng = (nb + EV_PG - 1) / EV_PG;
#pragma omp parallel for if (par) schedule(static)
    for (int64_t g = 0; g < ng; g++) {
        const int64_t p0 = g * EV_PG, np = nb - p0 < EV_PG ? nb - p0 : EV_PG;
        for (int64_t b = 0; b < B; b++) {
            const float *z = Z + b * K, *u = U + b * I;
            const int32_t *ev = lists + b * (K + 1);
            float *d = D + b * N;
            for (int64_t p = p0, w; p < p0 + np; p += w) { /* the last group's panels: 2 then 1 at a time */
                const int64_t left = p0 + np - p;
                w = left >= EV_PG ? EV_PG : (left >= 2 ? 2 : 1);
                events_panels_any(w, units[b], z, ev, Wp + p * K * 16, K, u, Wpi + p * I * 16, I, bias, p * 16, d);
            }
        }
    }
    for (int64_t j = nb * 16; j < N; j++) /* the last N mod 16 columns */
        for (int64_t b = 0; b < B; b++) {
            const int32_t *ev = lists + b * (K + 1);
            float s = bias[j];
            for (int32_t e = 0; e < ev[K]; e++) s += Z[b * K + ev[e]] * Wt[ev[e] * N + j];
            for (int64_t k = 0; k < I; k++) s += U[b * I + k] * Wti[k * N + j];
            D[b * N + j] = s;
        }
}

/* ---------------------------------------------------------------- the weight gradient's GEMM */
/* C (M, N) += A^T B for A (R, M) and B (R, N), all row-major: a weight gradient summed over recorded rows (the
   chunked e-prop update, the fused BPTT), each entry summed in the order C, r = 0 .. R - 1. With AVX-512: blocks
   of 8 rows x 32 columns of C in 16 registers, per row r 2 loads of B + 8 broadcasts of A per 16 FMAs; the rows r
   in chunks of GEMM_RB, so that a chunk of A and of B stays in L2 while every block of C passes over it; the
   column blocks split over `threads` threads. The rows and columns that do not fill a block (and every entry
   without AVX-512): a plain loop. For CPUs where torch's BLAS would not run AVX-512 code (fused.py: own_gemm). */
#define GEMM_RB 256
void ni_gemm_tn(const float *A, const float *B, int64_t R, int64_t M, int64_t N, float *C, int64_t threads) {
    int64_t m0 = 0, n0 = 0;
#if defined(__AVX512F__)
    const int64_t nb = N / 32, mb = M / 8;
    m0 = 8 * mb, n0 = 32 * nb;
    for (int64_t r0 = 0; r0 < R; r0 += GEMM_RB) {
        const int64_t r1 = r0 + GEMM_RB < R ? r0 + GEMM_RB : R;
#pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(static)
        for (int64_t jb = 0; jb < nb; jb++) {
            const int64_t j0 = 32 * jb;
            for (int64_t i0 = 0; i0 < m0; i0 += 8) {
                v16f c[8][2];
                float *ci = C + i0 * N + j0;
                for (int q = 0; q < 8; q++) { c[q][0] = ld16(ci + q * N); c[q][1] = ld16(ci + q * N + 16); }
                for (int64_t r = r0; r < r1; r++) {
                    const float *a = A + r * M + i0;
                    const v16f w0 = ld16(B + r * N + j0), w1 = ld16(B + r * N + j0 + 16);
                    for (int q = 0; q < 8; q++) { c[q][0] += a[q] * w0; c[q][1] += a[q] * w1; }
                }
                for (int q = 0; q < 8; q++) { st16(ci + q * N, c[q][0]); st16(ci + q * N + 16, c[q][1]); }
            }
        }
    }
#else
    (void)threads;
#endif
    for (int64_t i = 0; i < M; i++) { /* rows i >= m0: every column; rows i < m0: the columns j >= n0 */
        const int64_t j0 = i < m0 ? n0 : 0;
        float *c = C + i * N;
        for (int64_t r = 0; r < R; r++) {
            const float a = A[r * M + i], *b = B + r * N;
#pragma omp simd
            for (int64_t j = j0; j < N; j++) c[j] += a * b[j];
        }
    }
}
/* 1 where the library was built with its AVX-512 dense kernels (rows32, ni_gemm_tn's blocks) */
int ni_wide(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
