"""Fused online e-prop / RFLO: one native call per step (or per whole trial) on the CPU, float32.

The plain step (:meth:`neuroinit.learning.online.OnlineEprop.step`) costs ~15 eager PyTorch ops (2-3 us each) and
passes over every ``B x N x N`` eligibility trace three times (decay, add, gradient einsum). Here a small C
library does the network step (the forward product in registers, event-driven for spikes), the presynaptic and
readout traces and the learning signal in one native call per step, and the weight gradient is summed in one
of two ways:

* **chunked exact update** (float traces, whole trials: :meth:`FusedOnline.run`). The steps of a chunk record
  their learning signal ``L``, postsynaptic factor and presynaptic traces; at the chunk's end the gradient of
  every step of the chunk is one GEMM over the chunk's ``K B`` rows (``ni_chunk_prepare`` has the equations:
  the eligibility trace's decay is moved onto the learning signal, filtered backwards inside the chunk), and
  full traces are carried to the next chunk by a GEMM per batch element, only when the trial is longer than a
  chunk or the traces are asked for. The same gradient as the per-step rule up to float32 rounding (sums reordered), at
  the matmul rate instead of the memory bandwidth of a per-step trace pass; memory stays independent of T
  (the records hold :func:`chunk_steps` steps).
* **per-step traces** (single :meth:`FusedOnline.step` calls, and chip-precision traces, which are rounded at
  every step): each stored trace is updated and its gradient accumulated in one pass.

Route (measured on the project's 2-core machine; ``benchmarks/README.md``): a C file compiled at first use with
the machine's C compiler (``cc -O3 -march=native -fopenmp``, ~1-3 s, cached per source/compiler/CPU under
``$NEUROINIT_CACHE`` or ``~/.cache/neuroinit``) and called through :mod:`ctypes` with one pointer to a struct of
buffers; the chunk GEMMs are torch's. No new Python dependency; torch's own OpenMP runtime is shared (same
soname), so the two thread pools do not fight. Where no compiler is found, or for float64, CUDA tensors or cells
it does not know, callers fall back to the PyTorch path (:func:`available`, :func:`supports`), which gives the
same results.

Semantics equal :func:`neuroinit.learning.online.trace_step` + the gradient accumulation of
``OnlineEprop.step`` (tests: ``tests/test_fused.py``, to 1e-6 in float32). Traces held at chip precision
(``make_trace_quantiser``) use stochastic rounding with an in-kernel counter-based generator seeded from the
rule's ``torch.Generator`` once per step: the same distribution as the PyTorch path, not the same draws.
The fused state is updated in place: a state handed to a step is consumed by it, and a new run reuses the
previous run's buffers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "supports", "FusedOnline", "chunk_steps", "library_path",
           "C_SOURCE"]

C_SOURCE = r"""/* neuroinit fused online e-prop / RFLO (float32): the network step, presynaptic and readout
   traces and learning signal in one call per step; the eligibility traces either updated per step (one pass that
   also accumulates the gradient) or recorded for the chunked exact update. See neuroinit/learning/fused.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { VOLTAGE = 0, RFLO = 1, LIF = 2 };
enum { TANH = 0, LINEAR = 1, RELU = 2, SOFTPLUS = 3 };
enum { LOSS_NONE = 0, LOSS_MSE = 1, LOSS_CE = 2 };
enum { Q_PRE_REC = 0, Q_PRE_IN, Q_PRE_BIAS, Q_ELIG_REC, Q_ELIG_IN, Q_ELIG_BIAS, Q_READOUT, Q_READOUT_BIAS };

typedef struct {
    int64_t model, actfn, B, N, I, O;
    int64_t reset_zero, n_ref, full, quant, par_work, loss, T, rec_pos;
    uint64_t seed;
    float alpha, kappa, v_th, gamma;
    float pd, pg, ed, rd;
    float q_scale[8], q_min[8], q_max[8];
    float *w_in, *w_rec, *bias, *w_out, *b_out, *fb, *wt_in, *wt_rec, *wp_in, *wp_rec;
    float *x, *z, *ref, *y;
    float *post, *act, *L, *err, *yout, *drive;
    float *pre_rec, *pre_in, *pre_bias, *elig_rec, *elig_in, *elig_bias, *ro, *ro_bias;
    float *g_in, *g_rec, *g_bias, *g_out, *g_bout;
    float *inputs, *targets, *scale, *outputs;
    int64_t *labels, *events;
    float *rec_L, *rec_post, *rec_pre, *rec_pre_in; /* chunk records (K, B, .), or NULL; rec_pre_in: (K, B, I + 1),
                                                    the input traces then the bias trace */
    float *pre_src; /* where the presynaptic trace's previous value is read (NULL: pre_rec) */
} Run;

/* ---------------------------------------------------------------- stochastic rounding (counter-based RNG) */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}
/* uniform in [0, 1) from (key, index): 24 random bits */
static inline float unif(uint32_t key, uint32_t idx) {
    return (float)(mix32(idx * 0x9e3779b9U ^ key) >> 8) * (1.0f / 16777216.0f);
}
static inline float sround(float x, float s, float lo, float hi, float u) {
    /* codes outside [lo - 1, hi + 1] saturate anyway: clamping first keeps the int conversion exact */
    float c = x / s;
    c = c < lo - 1.0f ? lo - 1.0f : c;
    c = c > hi + 1.0f ? hi + 1.0f : c;
    float low = (float)(int32_t)c;
    low -= low > c ? 1.0f : 0.0f; /* floor, vectorisable */
    c = low + ((u >= 1.0f - (c - low)) ? 1.0f : 0.0f);
    c = c < lo ? lo : c;
    c = c > hi ? hi : c;
    return c * s;
}
static inline uint32_t qkey(const Run *r, int which) {
    return mix32((uint32_t)r->seed ^ mix32((uint32_t)(r->seed >> 32) + 0x51ed27u * (uint32_t)(which + 1)));
}
static void quant_vec(const Run *r, int which, float *v, int64_t n) {
    if (!r->quant) return;
    uint32_t key = qkey(r, which);
    float s = r->q_scale[which], lo = r->q_min[which], hi = r->q_max[which];
    for (int64_t k = 0; k < n; k++) v[k] = sround(v[k], s, lo, hi, unif(key, (uint32_t)k));
}

/* ---------------------------------------------------------------- vector helpers */
/* GCC/Clang vector extensions; -march=native picks the widest registers. */
typedef float v8f __attribute__((vector_size(32)));
static inline v8f ld8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void st8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* ---------------------------------------------------------------- activations (vectorisable loops) */
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
/* f = act(d), df = act'(d) for n values; f may alias d */
static void activate(int a, const float *d, float *f, float *df, int64_t n) {
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
static inline float dot(const float *a, const float *b, int64_t n) {
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
static void drive_dense(const float *A, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                        int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                        int par) {
    /* rows in blocks of 6, then 4 (a remainder of 2 turns one block of 6 into two of 4), then single rows */
    const int64_t b6 = 6 * (B / 6 - (B % 6 == 2 && B >= 8)), nb = N / 16;
#pragma omp parallel for if (par) schedule(static)
    for (int64_t jb = 0; jb < nb; jb++) {
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
   skipped). Each row's events are listed once (idx: B x (K + 1), the count last); then per 16-column block, whose
   packed K x 16 panel stays in L1, every row sums its events in four independent accumulator pairs. */
static void drive_events(const float *Z, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                         int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                         int64_t *idx, int par) {
    for (int64_t b = 0; b < B; b++) {
        const float *z = Z + b * K;
        int64_t *ev = idx + b * (K + 1), ne = 0;
        for (int64_t k = 0; k < K; k++) { ev[ne] = k; ne += z[k] != 0.0f; } /* branch-free: no mispredictions */
        ev[K] = ne;
    }
    const int64_t nb = N / 16;
#pragma omp parallel for if (par) schedule(static)
    for (int64_t jb = 0; jb < nb; jb++) {
        const int64_t j0 = jb * 16;
        const float *P = Wp + jb * K * 16, *Pi = Wpi + jb * I * 16;
        for (int64_t b = 0; b < B; b++) {
            const float *z = Z + b * K, *u = U + b * I;
            const int64_t *ev = idx + b * (K + 1), ne = ev[K];
            v8f c[4][2] = {{{0}}};
            c[0][0] = ld8(bias + j0); c[0][1] = ld8(bias + j0 + 8);
            int64_t e = 0;
            for (; e + 4 <= ne; e += 4)
                for (int q = 0; q < 4; q++) {
                    const int64_t k = ev[e + q];
                    c[q][0] += z[k] * ld8(P + 16 * k); c[q][1] += z[k] * ld8(P + 16 * k + 8);
                }
            for (; e < ne; e++) {
                const int64_t k = ev[e];
                c[0][0] += z[k] * ld8(P + 16 * k); c[0][1] += z[k] * ld8(P + 16 * k + 8);
            }
            for (int64_t k = 0; k < I; k++) {
                c[1][0] += u[k] * ld8(Pi + 16 * k); c[1][1] += u[k] * ld8(Pi + 16 * k + 8);
            }
            st8(D + b * N + j0, (c[0][0] + c[1][0]) + (c[2][0] + c[3][0]));
            st8(D + b * N + j0 + 8, (c[0][1] + c[1][1]) + (c[2][1] + c[3][1]));
        }
    }
    for (int64_t j = nb * 16; j < N; j++) /* the last N mod 16 columns */
        for (int64_t b = 0; b < B; b++) {
            const int64_t *ev = idx + b * (K + 1);
            float s = bias[j];
            for (int64_t e = 0; e < ev[K]; e++) s += Z[b * K + ev[e]] * Wt[ev[e] * N + j];
            for (int64_t k = 0; k < I; k++) s += U[b * I + k] * Wti[k * N + j];
            D[b * N + j] = s;
        }
}

/* ---------------------------------------------------------------- forward: network + presynaptic traces */
/* Advances the cell state by one step driven by u (B, I); writes y (B, O) to r->yout, the postsynaptic factor
   to r->post and the non-eligibility traces. Voltage form: r->act holds
   f(x) between steps (fused.py initialises it to f(x_0)). */
void ni_forward(Run *r, const float *u) {
    const int64_t B = r->B, N = r->N, I = r->I, O = r->O, BN = B * N;
    const int model = (int)r->model, a = (int)r->actfn;
    const float al = r->alpha, oma = 1.0f - r->alpha;
    float *x = r->x, *act = r->act, *d = r->drive, *post = r->post;
    /* presynaptic signal of the recurrent weights at this step: read before the cell update below overwrites it
       (the LIF update reads z[k] before writing it) */
    const float *prev = model == VOLTAGE ? act : (model == RFLO ? x : r->z);
    const float pd = r->pd, pg = r->pg, rd = r->rd;
    const float *pre_old = r->pre_src ? r->pre_src : r->pre_rec;
    for (int64_t k = 0; k < BN; k++) r->pre_rec[k] = pd * pre_old[k] + pg * prev[k];
    /* drive d = bias + prev W_rec^T + u W_in^T */
    const int par = B * N * N >= r->par_work;
    if (model == LIF)
        drive_events(prev, B, N, r->wt_rec, r->wp_rec, u, I, r->wt_in, r->wp_in, r->bias, N, d, r->events, par);
    else
        drive_dense(prev, B, N, r->wt_rec, r->wp_rec, u, I, r->wt_in, r->wp_in, r->bias, N, d, par);
    /* the cells' updates */
    if (model == VOLTAGE) {
        for (int64_t k = 0; k < BN; k++) x[k] = oma * x[k] + al * d[k];
        activate(a, x, act, post, BN);
    } else if (model == RFLO) {
        activate(a, d, d, post, BN);
        for (int64_t k = 0; k < BN; k++) { x[k] = oma * x[k] + al * d[k]; act[k] = x[k]; post[k] *= al; }
    } else {
        const float th = r->v_th, gs = r->gamma / r->v_th, nref = (float)r->n_ref;
        const int zero = (int)r->reset_zero, refr = r->n_ref > 0;
        float *z = r->z, *ref = r->ref;
#pragma omp simd
        for (int64_t k = 0; k < BN; k++) {
            const float vold = x[k], zp = z[k]; /* = prev[k] */
            const float reset = zero ? zp * (al * vold) : zp * th;
            const float v = al * vold + d[k] - reset;
            const float dv = v > th ? v - th : th - v, tri = 1.0f - dv / th; /* no libm calls: vectorises */
            float ps = gs * (tri > 0.0f ? tri : 0.0f);
            float zn = v > th ? 1.0f : 0.0f;
            if (refr) {
                const float free_ = ref[k] <= 0.0f ? 1.0f : 0.0f;
                ps *= free_;
                zn *= free_;
                ref[k] = zn > 0.0f ? nref : (ref[k] > 1.0f ? ref[k] - 1.0f : 0.0f);
            }
            x[k] = v;
            post[k] = ps;
            act[k] = zn;
            z[k] = zn;
        }
    }
    /* readout */
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = 0; o < O; o++) {
            float s = dot(r->w_out + o * N, act + b * N, N) + r->b_out[o];
            if (model == LIF) { s = r->kappa * r->y[b * O + o] + s; r->y[b * O + o] = s; }
            r->yout[b * O + o] = s;
        }
    /* the other presynaptic traces and the readout traces (O(B N)) */
    for (int64_t k = 0; k < B * I; k++) r->pre_in[k] = pd * r->pre_in[k] + pg * u[k];
    for (int64_t b = 0; b < B; b++) r->pre_bias[b] = pd * r->pre_bias[b] + pg;
    for (int64_t k = 0; k < BN; k++) r->ro[k] = rd * r->ro[k] + act[k];
    for (int64_t b = 0; b < B; b++) r->ro_bias[b] = rd * r->ro_bias[b] + 1.0f;
    quant_vec(r, Q_PRE_REC, r->pre_rec, B * N);
    quant_vec(r, Q_PRE_IN, r->pre_in, B * I);
    quant_vec(r, Q_PRE_BIAS, r->pre_bias, B);
    quant_vec(r, Q_READOUT, r->ro, B * N);
    quant_vec(r, Q_READOUT_BIAS, r->ro_bias, B);
}

/* ---------------------------------------------------------------- update: eligibility traces + gradients */
/* Given the output error r->err (B, O) of this step: learning signal, eligibility traces (one pass each,
   updated and accumulated into the gradient together) and readout gradients. */
void ni_update(Run *r) {
    const int64_t B = r->B, N = r->N, I = r->I, O = r->O;
    float *L = r->L, *err = r->err;
    for (int64_t b = 0; b < B; b++) { /* learning signal L = err B (feedback B: O x N) */
        float *l = L + b * N;
        for (int64_t j = 0; j < N; j++) l[j] = 0.0f;
        for (int64_t o = 0; o < O; o++) {
            const float e = err[b * O + o], *fb = r->fb + o * N;
            for (int64_t j = 0; j < N; j++) l[j] += e * fb[j];
        }
    }
    const int par = B * N * (N + I) >= r->par_work;
    if (r->rec_L && !r->quant) {
        /* chunked exact update (ni_chunk_prepare + GEMMs in fused.py): record this step's factors, touch no
           eligibility trace */
        const int64_t s = r->rec_pos++; /* L, post and pre_rec were written in place by ni_run's redirection */
        for (int64_t b = 0; b < B; b++) {
            float *row = r->rec_pre_in + (s * B + b) * (I + 1);
            memcpy(row, r->pre_in + b * I, sizeof(float) * I);
            row[I] = r->pre_bias[b];
        }
    } else if (!r->full) {
        /* factorised: e = post (x) pre, never stored */
        float *lp = r->post; /* becomes L * post: post is not needed after this step */
        for (int64_t k = 0; k < B * N; k++) lp[k] = L[k] * lp[k];
#pragma omp parallel for if (par) schedule(dynamic, 4)
        for (int64_t j = 0; j < N; j++) {
            float *gr = r->g_rec + j * N, *gi = r->g_in + j * I;
            float gb = 0.0f;
            int64_t b = 0;
            for (; b + 4 <= B; b += 4) { /* four batch elements per pass over the gradient row */
                const float c0 = lp[b * N + j], c1 = lp[(b + 1) * N + j], c2 = lp[(b + 2) * N + j],
                            c3 = lp[(b + 3) * N + j];
                const float *p0 = r->pre_rec + b * N, *p1 = p0 + N, *p2 = p1 + N, *p3 = p2 + N;
                const float *q0 = r->pre_in + b * I, *q1 = q0 + I, *q2 = q1 + I, *q3 = q2 + I;
#pragma omp simd
                for (int64_t i = 0; i < N; i++) gr[i] += c0 * p0[i] + c1 * p1[i] + c2 * p2[i] + c3 * p3[i];
                for (int64_t i = 0; i < I; i++) gi[i] += c0 * q0[i] + c1 * q1[i] + c2 * q2[i] + c3 * q3[i];
                gb += c0 * r->pre_bias[b] + c1 * r->pre_bias[b + 1] + c2 * r->pre_bias[b + 2]
                      + c3 * r->pre_bias[b + 3];
            }
            for (; b < B; b++) {
                const float c = lp[b * N + j];
                const float *pr = r->pre_rec + b * N, *pi = r->pre_in + b * I;
#pragma omp simd
                for (int64_t i = 0; i < N; i++) gr[i] += c * pr[i];
                for (int64_t i = 0; i < I; i++) gi[i] += c * pi[i];
                gb += c * r->pre_bias[b];
            }
            r->g_bias[j] += gb;
        }
    } else {
        const float ed = r->ed;
        const int quant = (int)r->quant;
        const uint32_t kr = qkey(r, Q_ELIG_REC), ki = qkey(r, Q_ELIG_IN), kb = qkey(r, Q_ELIG_BIAS);
        const float sr = r->q_scale[Q_ELIG_REC], lr = r->q_min[Q_ELIG_REC], hr = r->q_max[Q_ELIG_REC];
        const float si = r->q_scale[Q_ELIG_IN], li = r->q_min[Q_ELIG_IN], hi = r->q_max[Q_ELIG_IN];
        const float sb = r->q_scale[Q_ELIG_BIAS], lb = r->q_min[Q_ELIG_BIAS], hb = r->q_max[Q_ELIG_BIAS];
        /* blocks of jb rows: for each batch element the block's trace rows are one contiguous stream (jb N floats,
           ~32 KB) and the block's gradient rows stay in L1/L2 across the batch; each thread owns whole blocks */
        const int64_t jb = N >= 2048 ? 4 : 8192 / N > 4 ? 8192 / N : 4;
#pragma omp parallel for if (par) schedule(dynamic, 1)
        for (int64_t j0 = 0; j0 < N; j0 += jb) {
            const int64_t j1 = j0 + jb < N ? j0 + jb : N;
            for (int64_t b = 0; b < B; b++) {
                for (int64_t j = j0; j < j1; j++) {
                    float *gr = r->g_rec + j * N, *gi = r->g_in + j * I;
                    const float p = r->post[b * N + j], l = L[b * N + j];
                    const float *pr = r->pre_rec + b * N, *pi = r->pre_in + b * I;
                    float *e = r->elig_rec + (b * N + j) * N, *ei = r->elig_in + (b * N + j) * I;
                    if (!quant) {
    #pragma omp simd
                        for (int64_t i = 0; i < N; i++) {
                            float v = ed * e[i] + p * pr[i];
                            e[i] = v;
                            gr[i] += l * v;
                        }
                        for (int64_t i = 0; i < I; i++) {
                            float v = ed * ei[i] + p * pi[i];
                            ei[i] = v;
                            gi[i] += l * v;
                        }
                        float v = ed * r->elig_bias[b * N + j] + p * r->pre_bias[b];
                        r->elig_bias[b * N + j] = v;
                        r->g_bias[j] += l * v;
                    } else {
                        const uint32_t base = (uint32_t)((b * N + j) * N), basei = (uint32_t)((b * N + j) * I);
    #pragma omp simd
                        for (int64_t i = 0; i < N; i++) {
                            float v = sround(ed * e[i] + p * pr[i], sr, lr, hr, unif(kr, base + (uint32_t)i));
                            e[i] = v;
                            gr[i] += l * v;
                        }
                        for (int64_t i = 0; i < I; i++) {
                            float v = sround(ed * ei[i] + p * pi[i], si, li, hi, unif(ki, basei + (uint32_t)i));
                            ei[i] = v;
                            gi[i] += l * v;
                        }
                        float v = sround(ed * r->elig_bias[b * N + j] + p * r->pre_bias[b], sb, lb, hb,
                                         unif(kb, (uint32_t)(b * N + j)));
                        r->elig_bias[b * N + j] = v;
                        r->g_bias[j] += l * v;
                    }
                }
            }
        }
    }
    /* readout: exact local gradient err (x) readout trace */
    for (int64_t o = 0; o < O; o++) {
        float *go = r->g_out + o * N;
        float gbo = 0.0f;
        for (int64_t b = 0; b < B; b++) {
            const float c = err[b * O + o];
            const float *ro = r->ro + b * N;
            for (int64_t i = 0; i < N; i++) go[i] += c * ro[i];
            gbo += c * r->ro_bias[b];
        }
        r->g_bout[o] += gbo;
    }
}

/* ---------------------------------------------------------------- whole sequences */
static void output_error(Run *r, int64_t t) {
    const int64_t B = r->B, O = r->O;
    for (int64_t b = 0; b < B; b++) {
        const float s = r->scale[t * B + b];
        const float *y = r->yout + b * O;
        float *e = r->err + b * O;
        if (r->loss == LOSS_MSE) {
            const float *tg = r->targets + (t * B + b) * O;
            for (int64_t o = 0; o < O; o++) e[o] = s * (y[o] - tg[o]);
        } else {
            float m = y[0], z = 0.0f;
            for (int64_t o = 1; o < O; o++) m = fmaxf(m, y[o]);
            for (int64_t o = 0; o < O; o++) { e[o] = expf(y[o] - m); z += e[o]; }
            const int64_t lab = r->labels[t * B + b];
            for (int64_t o = 0; o < O; o++) e[o] = s * (e[o] / z - (o == lab ? 1.0f : 0.0f));
        }
    }
}

/* Runs steps t0 <= t < t1 of r->inputs (T, B, I), errors from the loss, outputs into r->outputs (T, B, O).
   ``r->seed`` advances by one per step (stochastic rounding keys). */
void ni_run(Run *r, int64_t t0, int64_t t1) {
    const int64_t B = r->B, I = r->I, O = r->O, BN = B * r->N;
    /* recording (chunked update): this step's L, post and presynaptic trace are written straight into their
       record rows (the trace reads its previous value from the row before) instead of being copied there */
    const int rec = r->rec_L && !r->quant;
    float *post0 = r->post, *L0 = r->L, *pre0 = r->pre_rec;
    for (int64_t t = t0; t < t1; t++) {
        if (rec) {
            const int64_t s = r->rec_pos;
            r->post = r->rec_post + s * BN;
            r->L = r->rec_L + s * BN;
            r->pre_src = s == 0 ? pre0 : r->rec_pre + (s - 1) * BN;
            r->pre_rec = r->rec_pre + s * BN;
        }
        ni_forward(r, r->inputs + t * B * I);
        memcpy(r->outputs + t * B * O, r->yout, sizeof(float) * B * O);
        output_error(r, t);
        ni_update(r);
        r->seed = r->seed * 6364136223846793005ULL + 1442695040888963407ULL;
    }
    if (rec && t1 > t0) memcpy(pre0, r->pre_rec, sizeof(float) * BN); /* the trace's home holds its latest value */
    r->post = post0; r->L = L0; r->pre_rec = pre0; r->pre_src = NULL;
}

/* Chunked exact update, step 1 of 2 (step 2: GEMMs in fused.py). Over the K = rec_pos recorded steps of a chunk
   that starts from the trace e0 (decay ed), the gradient and the trace at the chunk's end are
       sum_s L_s e_s = sum_s (Lf_s * post_s) (x) pre_s + c * e0,   Lf_s = sum_{t >= s} ed^(t - s) L_t,  c = ed Lf_0
       e_K = ed^K e0 + sum_s ed^(K - 1 - s) post_s (x) pre_s
   (e_s = ed^(s + 1) e0 + sum_{q <= s} ed^(s - q) post_q (x) pre_q, summed by parts). In place: rec_L becomes
   Lf * post, rec_post becomes ed^(K - 1 - s) post; c (B, N) receives ed Lf_0.
   Factorised rules (ed = 0) then drop the rows (step, batch element) whose Lf * post is zero -- no learning
   signal, e.g. steps outside the loss mask -- by moving the others (and their presynaptic records) to the front:
   a three-factor update without its third factor changes nothing. Returns the number of rows to sum (K B when
   the traces are full: those rows also carry the traces). */
static int row_is_zero(const float *a, int64_t n) {
    int nonzero = 0;
    for (int64_t j = 0; j < n; j++) nonzero |= a[j] != 0.0f;
    return !nonzero;
}

int64_t ni_chunk_prepare(Run *r, float *c) {
    const int64_t B = r->B, N = r->N, I = r->I, n = B * N, K = r->rec_pos;
    const float ed = r->ed;
    float w = 1.0f;
    for (int64_t k = 0; k < n; k++) c[k] = 0.0f; /* running Lf */
    for (int64_t s = K - 1; s >= 0; s--) {
        float *L = r->rec_L + s * n, *p = r->rec_post + s * n;
        for (int64_t k = 0; k < n; k++) {
            const float lf = L[k] + ed * c[k];
            c[k] = lf;
            L[k] = lf * p[k];
            p[k] *= w;
        }
        w *= ed;
    }
    for (int64_t k = 0; k < n; k++) c[k] *= ed;
    if (r->full) return K * B;
    /* fill each empty row from the front with the last non-empty row (the sum does not depend on the order):
       at most as many rows move as are empty */
    int64_t lo = 0, hi = K * B;
    for (;;) {
        while (lo < hi && !row_is_zero(r->rec_L + lo * N, N)) lo++;
        while (hi > lo && row_is_zero(r->rec_L + (hi - 1) * N, N)) hi--;
        if (lo >= hi) break;
        hi--; /* row hi is non-empty, row lo empty: move hi to lo */
        memcpy(r->rec_L + lo * N, r->rec_L + hi * N, sizeof(float) * N);
        memcpy(r->rec_pre + lo * N, r->rec_pre + hi * N, sizeof(float) * N);
        memcpy(r->rec_pre_in + lo * (I + 1), r->rec_pre_in + hi * (I + 1), sizeof(float) * (I + 1));
        lo++;
    }
    return lo;
}

/* Chunked exact update, the carried part: G += sum_b c[b, j] e0[b, j, :] for the recurrent, input and bias
   traces (c from ni_chunk_prepare), one read of each trace, no temporary. Threads own rows j of G. */
void ni_chunk_carry(Run *r, const float *c) {
    const int64_t B = r->B, N = r->N, I = r->I;
    const int par = B * N * (N + I) >= r->par_work;
#pragma omp parallel for if (par) schedule(static)
    for (int64_t j = 0; j < N; j++) {
        float *gr = r->g_rec + j * N, *gi = r->g_in + j * I, gb = 0.0f;
        for (int64_t b = 0; b < B; b++) {
            const float cb = c[b * N + j];
            const float *e = r->elig_rec + (b * N + j) * N, *ei = r->elig_in + (b * N + j) * I;
#pragma omp simd
            for (int64_t i = 0; i < N; i++) gr[i] += cb * e[i];
            for (int64_t i = 0; i < I; i++) gi[i] += cb * ei[i];
            gb += cb * r->elig_bias[b * N + j];
        }
        r->g_bias[j] += gb;
    }
}

/* The layouts the forward product reads, from W (n x k, row-major: row j = what neuron j receives): wt = W^T
   (k x n) and wp = W^T packed by 16-column blocks (block jb: k x 16, contiguous). */
void ni_pack(const float *w, int64_t n, int64_t k, float *wt, float *wp) {
    const int64_t nb = n / 16;
    for (int64_t jb = 0; jb < nb; jb++) /* 16 rows of W at a time: reads stay in 16 cache lines, writes contiguous */
        for (int64_t i = 0; i < k; i++)
            for (int64_t jj = 0; jj < 16; jj++) {
                const float v = w[(jb * 16 + jj) * k + i];
                wt[i * n + jb * 16 + jj] = v;
                wp[(jb * k + i) * 16 + jj] = v;
            }
    for (int64_t j = nb * 16; j < n; j++)
        for (int64_t i = 0; i < k; i++) wt[i * n + j] = w[j * k + i];
}

/* Memory bandwidth probe for the roofline (neuroinit.bench): ``reps`` in-place passes a <- c a + d over n floats,
   the access pattern of a trace update (read + write each element once per pass). */
void ni_stream(float *a, int64_t n, int64_t reps) {
    for (int64_t r = 0; r < reps; r++) {
#pragma omp parallel for if (n >= 65536) schedule(dynamic, 16384)
        for (int64_t i = 0; i < n; i++) a[i] = 0.999f * a[i] + 0.001f;
    }
}

int ni_abi(void) { return (int)sizeof(Run); }
"""

_MODELS = {"voltage": 0, "rate": 1, "lif": 2}
_ACTS = {"tanh": 0, "linear": 1, "relu": 2, "softplus": 3}
_LOSSES = {"mse": 1, "ce": 2}
_QUANT_NAMES = ("pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "readout", "readout_bias")
_PTRS = ("w_in", "w_rec", "bias", "w_out", "b_out", "fb", "wt_in", "wt_rec", "wp_in", "wp_rec",
         "x", "z", "ref", "y", "post", "act", "L", "err", "yout", "drive",
         "pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "ro", "ro_bias",
         "g_in", "g_rec", "g_bias", "g_out", "g_bout", "inputs", "targets", "scale", "outputs", "labels",
         "events", "rec_L", "rec_post", "rec_pre", "rec_pre_in", "pre_src")
# below this many multiply-adds per loop a step stays on one thread: a parallel loop ends in a barrier, which costs
# ~1-5 us on a quiet machine but up to a scheduler time slice (ms) when the other core is busy (measured: LIF
# N=64, B=16 at 49 us/step on one thread, 2349 us on two threads next to other work)
PAR_WORK = 1 << 20


class _Run(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("model", "actfn", "B", "N", "I", "O", "reset_zero", "n_ref",
                                               "full", "quant", "par_work", "loss", "T", "rec_pos")]
                + [("seed", ctypes.c_uint64)]
                + [(n, ctypes.c_float) for n in ("alpha", "kappa", "v_th", "gamma", "pd", "pg", "ed", "rd")]
                + [(n, ctypes.c_float * 8) for n in ("q_scale", "q_min", "q_max")]
                + [(n, ctypes.c_void_p) for n in _PTRS])


# ------------------------------------------------------------------------------------------ building the library
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("NEUROINIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                             or os.path.expanduser("~/.cache"), "neuroinit")
    return Path(root) / "fused"


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` when set (split like a shell word list, so ``CC="ccache gcc"`` works),
    else the first of cc, gcc, clang on PATH. A ``$CC`` that is not an executable is an error, never a silent
    fall back to another compiler. Raises OSError with the reason."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        import shlex

        words = shlex.split(cc)
        exe = shutil.which(words[0])
        if exe is None:
            raise OSError(f"CC={cc!r} is not an executable on PATH (unset CC to use cc, gcc or clang)")
        return [exe, *words[1:]]
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise OSError("no C compiler (cc, gcc or clang) on PATH; install one or set CC")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor()


FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu99"]


def library_path() -> Path:
    """Where the compiled library for this source, compiler and CPU is (or will be) cached."""
    try:
        cc = " ".join(_compiler())
    except OSError:
        cc = "none"
    key = hashlib.sha256("\n".join([C_SOURCE, cc, " ".join(FLAGS), _cpu_id(), platform.machine()]).encode())
    return _cache_dir() / f"neuroinit_fused_{key.hexdigest()[:16]}.so"


def _build() -> ctypes.CDLL:
    cc = _compiler()  # checked even when a library is cached: a broken CC is reported, not hidden
    path = library_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "fused.c"
            src.write_text(C_SOURCE)
            out = Path(tmp) / path.name
            proc = subprocess.run([*cc, *FLAGS, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                                  check=False)  # the failure is reported below, with the compiler's first line
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["no message"])[0]
                raise OSError(f"compiling the fused step with {' '.join(cc)} failed: {first}")
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    # torch (imported above) has loaded its OpenMP runtime: the library binds to the same one
    lib = ctypes.CDLL(str(path))
    for name in ("ni_forward", "ni_update", "ni_run"):
        getattr(lib, name).restype = None
    lib.ni_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ni_update.argtypes = [ctypes.c_void_p]
    lib.ni_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    for name in ("ni_chunk_prepare", "ni_chunk_carry"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ni_chunk_prepare.restype = ctypes.c_int64
    lib.ni_pack.restype = None
    lib.ni_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.ni_chunk_carry.restype = None
    lib.ni_abi.restype = ctypes.c_int
    lib.ni_stream.restype = None
    lib.ni_stream.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    if lib.ni_abi() != ctypes.sizeof(_Run):
        raise OSError(f"fused step ABI mismatch: C struct {lib.ni_abi()} bytes, ctypes {ctypes.sizeof(_Run)}")
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is None and _reason is None:
            if os.environ.get("NEUROINIT_NO_FUSED"):
                _reason = "disabled by NEUROINIT_NO_FUSED"
            elif not sys.platform.startswith("linux") and sys.platform != "darwin":
                _reason = f"unsupported platform {sys.platform}"
            else:
                try:
                    _lib = _build()
                except OSError as e:
                    _reason = str(e)
    return _lib


def available() -> bool:
    """True when the fused library is (or can be) built and loaded on this machine."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


# ------------------------------------------------------------------------------------------ what it supports
def _cell_code(cell) -> tuple[int, int] | None:
    from neuroinit.cells.lif import LIFRNN
    from neuroinit.cells.rate import RateRNN

    if isinstance(cell, LIFRNN):   # the chip neuron options (synaptic current, >=) run unfused
        plain = cell.tau_syn is None and cell.threshold_compare == ">" and cell.max_spikes == 1 and not cell.reset_leaks
        return (_MODELS["lif"], 0) if plain else None
    if isinstance(cell, RateRNN) and cell.activation_name in _ACTS:
        return _MODELS[cell.form], _ACTS[cell.activation_name]
    return None


def supports(cell, *, feedback: torch.Tensor | None = None, quantiser=None) -> str | None:
    """None when the fused step can run ``cell`` (float32, CPU, a known cell, float traces or a quantiser
    that exposes its grids); otherwise the reason it cannot."""
    if _cell_code(cell) is None:
        return f"unsupported cell {type(cell).__name__}"
    tensors = [getattr(cell, n) for n in ("w_in", "w_rec", "bias", "w_out", "b_out")]
    if feedback is not None:
        tensors.append(feedback)
    if any(t.dtype != torch.float32 for t in tensors):
        return "not float32 (the fused step is single precision; float64 uses the PyTorch path)"
    if any(t.device.type != "cpu" for t in tensors):
        return "not on the CPU"
    if quantiser is not None and getattr(quantiser, "grids", None) is None:
        return "trace quantiser without grids"
    if not available():
        return f"fused library unavailable: {unavailable_reason()}"
    return None


# ------------------------------------------------------------------------------------------ the fused run
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedOnline:
    """Buffers of one online run (state, traces, gradient accumulators) and the native step over them.

    ``grads`` maps parameter names to contiguous float32 accumulators (``OnlineEprop``'s); the fused step adds
    to them in place. ``params`` are the parameters the arithmetic uses (``cell.params()``)."""

    def __init__(self, cell, params, batch_size: int, grads: dict[str, torch.Tensor], *,
                 feedback: torch.Tensor | None = None, quantiser=None,
                 generator: torch.Generator | None = None) -> None:
        why = supports(cell, feedback=feedback, quantiser=quantiser)
        if why is not None:
            raise ValueError(f"Invalid fused step: {why}")
        self.lib = _load()
        self.cell = cell
        self.generator = generator
        model, actfn = _cell_code(cell)
        spec = cell.trace_spec()
        b, n, i, o = batch_size, cell.n_hidden, cell.n_in, cell.n_out
        empty = lambda *s: torch.empty(*s, dtype=torch.float32)
        self.full = spec.elig_decay != 0.0
        self.model = model
        self.buf = {
            "x": empty(b, n), "z": empty(b, n), "ref": empty(b, n), "y": empty(b, o),
            "post": empty(b, n), "act": empty(b, n), "L": empty(b, n),
            "err": empty(b, o), "yout": empty(b, o), "drive": empty(b, n),
            "pre_rec": empty(b, n), "pre_in": empty(b, i), "pre_bias": empty(b, 1),
            "elig_rec": empty(b, n, n) if self.full else None, "elig_in": empty(b, n, i) if self.full else None,
            "elig_bias": empty(b, n) if self.full else None, "ro": empty(b, n), "ro_bias": empty(b, 1),
        }
        r = _Run()
        r.model, r.actfn, r.B, r.N, r.I, r.O = model, actfn, b, n, i, o
        r.full, r.par_work = int(self.full), PAR_WORK
        r.pd, r.pg, r.ed, r.rd = (float(v) for v in spec)
        if model == _MODELS["lif"]:
            r.alpha, r.kappa = float(cell.alpha), float(cell.kappa)
            r.v_th, r.gamma = float(cell.v_th), float(cell.gamma)
            r.reset_zero, r.n_ref = int(cell.reset == "zero"), int(cell.n_refractory)
        else:
            r.alpha = float(cell.alpha)
        if quantiser is not None:
            r.quant = 1
            for k, name in enumerate(_QUANT_NAMES):
                g = quantiser.grids[name]
                r.q_scale[k], r.q_min[k], r.q_max[k] = g.scale, g.code_min, g.code_max
        self.quantised = quantiser is not None
        self.run_struct = r
        for name, t in self.buf.items():
            setattr(r, name, _ptr(t))
        self._events = torch.empty(b, n + 1, dtype=torch.int64)  # scratch: a step's spike indices, their count
        r.events = self._events.data_ptr()
        self._feedback = feedback
        self._layouts: dict[str, torch.Tensor] = {}
        self._ref = ctypes.byref(r)
        # what a later run may reuse these buffers for (:meth:`matches`); references, not ids: a freed object's
        # id can come back for another one
        self._quantiser, self._config = quantiser, _cell_constants(cell)
        # chunked exact update (float traces, whole runs): records, the chunk waiting to enter the full traces
        self._rec: dict[str, torch.Tensor] | None = None
        self.reset(params, grads)
        self._write_zero_traces()  # touched once: the memory a run holds does not depend on its length

    def matches(self, cell, batch_size: int, *, feedback=None, quantiser=None) -> bool:
        """Whether a new run of ``cell`` can reuse these buffers: the same cell (constants unchanged), batch
        size, feedback and quantiser."""
        return (cell is self.cell and batch_size == self.run_struct.B and feedback is self._feedback
                and quantiser is self._quantiser and _cell_constants(cell) == self._config)

    def reset(self, params, grads: dict[str, torch.Tensor]) -> None:
        """Start a new run: zero state and traces, accumulate into ``grads``, compute with ``params``.
        Buffers are reused (allocating and first touching them costs more than a short trial's arithmetic)."""
        for name in ("w_in", "w_rec", "bias", "w_out", "b_out"):
            g = grads[name]
            if g.dtype != torch.float32 or not g.is_contiguous():
                raise ValueError(f"Invalid gradient buffer {name}: needs a contiguous float32 tensor")
        self.grads = grads
        for name, pname in (("g_in", "w_in"), ("g_rec", "w_rec"), ("g_bias", "bias"), ("g_out", "w_out"),
                            ("g_bout", "b_out")):
            setattr(self.run_struct, name, grads[pname].data_ptr())
        for name, t in self.buf.items():
            if t is not None and not name.startswith("elig"):
                t.zero_()
        if self.model == _MODELS["voltage"]:  # the kernel keeps act = f(x) between steps
            self.buf["act"].copy_(self.cell.activation.f(self.buf["x"]))
        self._elig_zero = True  # the full traces are zero; their buffers are written when first needed
        self._pending = 0
        self.run_struct.rec_pos = 0
        self.set_params(params)

    def _write_zero_traces(self) -> None:
        if self._elig_zero and self.full:
            for name in ("elig_rec", "elig_in", "elig_bias"):
                self.buf[name].zero_()
        self._elig_zero = False

    # -------------------------------------------------------------- parameters and state
    def set_params(self, params) -> None:
        """Point the step at (new) parameters, e.g. after an optimizer step."""
        self._params = {n: getattr(params, n).detach().contiguous() for n in ("w_in", "w_rec", "bias", "w_out",
                                                                               "b_out")}
        self._params["fb"] = (self._params["w_out"] if self._feedback is None
                              else self._feedback.detach().contiguous())
        # the forward product reads the transposed matrices (row k: what presynaptic k sends to every neuron),
        # also packed by 16-column blocks (``ni_pack``)
        for name in ("rec", "in"):
            w = self._params["w_" + name]
            n, k = w.shape
            if ("wt_" + name) not in self._layouts:  # allocated once, rewritten at every call
                self._layouts["wt_" + name] = w.new_empty(k, n)
                self._layouts["wp_" + name] = w.new_empty(n // 16, k, 16)
            wt, wp = self._layouts["wt_" + name], self._layouts["wp_" + name]
            self.lib.ni_pack(w.data_ptr(), n, k, wt.data_ptr(), wp.data_ptr())
            self._params["wt_" + name], self._params["wp_" + name] = wt, wp
        for name, t in self._params.items():
            setattr(self.run_struct, name, t.data_ptr())

    def cell_state(self):
        """The cell state as the cell's own NamedTuple, viewing the fused buffers (updated in place)."""
        from neuroinit.cells.lif import LIFState
        from neuroinit.cells.rate import RateState

        bf = self.buf
        if self.model == _MODELS["lif"]:
            return LIFState(v=bf["x"], z=bf["z"], ref=bf["ref"], y=bf["y"])
        return RateState(bf["x"])

    def traces(self):
        """The traces as :class:`~neuroinit.learning.online.Traces`, viewing the fused buffers."""
        from neuroinit.learning.online import Traces

        self._materialise()
        self._write_zero_traces()
        bf = self.buf
        return Traces(bf["pre_rec"], bf["pre_in"], bf["pre_bias"], bf["elig_rec"], bf["elig_in"], bf["elig_bias"],
                      bf["ro"], bf["ro_bias"])

    def state_bytes(self) -> int:
        """Bytes held across steps (state, traces, scratch, gradient accumulators): independent of T."""
        return sum(t.numel() * 4 for t in self.buf.values() if t is not None) + \
            sum(g.numel() * 4 for g in self.grads.values()) + \
            sum(t.numel() * 4 for t in (self._rec or {}).values())

    def _reseed(self) -> None:
        if self.quantised:
            self.run_struct.seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))

    # -------------------------------------------------------------- stepping
    def step(self, u: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One step driven by ``u`` (B, I); ``error(y)`` gives d loss / d y (B, O). Returns y (a new tensor)."""
        u = u.detach().to(torch.float32).contiguous()
        self._materialise()
        self._write_zero_traces()
        self._reseed()
        self.lib.ni_forward(self._ref, u.data_ptr())
        y = self.buf["yout"].clone()
        self.buf["err"].copy_(error(y))
        self.lib.ni_update(self._ref)
        return y

    def run(self, inputs: torch.Tensor, scale: torch.Tensor, outputs: torch.Tensor, *, loss: str,
            targets: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            t0: int = 0, t1: int | None = None) -> None:
        """Steps ``t0 <= t < t1`` of ``inputs`` (T, B, I) in one native call, with the output error of loss
        ``"mse"`` (``scale[t, b] * (y - targets[t, b])``) or ``"ce"`` (``scale * (softmax(y) - onehot(label))``),
        ``scale = mask / sum(mask)``; outputs go to ``outputs`` (T, B, O) (float32, contiguous)."""
        if loss not in _LOSSES:
            raise ValueError(f"Invalid loss {loss!r}: the fused run supports {', '.join(_LOSSES)}")
        r = self.run_struct
        t_len = inputs.shape[0]
        t1 = t_len if t1 is None else t1
        keep = [inputs, scale, outputs, targets, labels]
        for t in keep[:3] + ([targets] if loss == "mse" else [labels]):
            if t is None or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("Invalid fused run buffers: contiguous CPU tensors needed")
        r.loss, r.T = _LOSSES[loss], t_len
        r.inputs, r.scale, r.outputs = inputs.data_ptr(), scale.data_ptr(), outputs.data_ptr()
        r.targets, r.labels = _ptr(targets), _ptr(labels)
        self._keep = keep  # keep the buffers alive while the struct points at them
        if self.quantised:  # chip precision: every trace rounded at every step, by the per-step kernel
            self._write_zero_traces()
            self._reseed()
            self.lib.ni_run(self._ref, t0, t1)
            return
        cap = self._records()
        self._set_records(True)
        try:
            for a in range(t0, t1, cap):
                self._materialise()
                self.lib.ni_run(self._ref, a, min(a + cap, t1))
                self._flush_chunk()
        finally:
            self._set_records(False)  # single steps update the traces themselves

    # -------------------------------------------------------------- chunked exact update (float traces)
    @property
    def chunk_capacity(self) -> int | None:
        """Steps per chunk where the last run used the chunked exact update (None: per-step traces)."""
        return None if self._rec is None else self._rec["rec_L"].shape[0]

    def _records(self) -> int:
        """Allocates the chunk records once; returns their capacity in steps."""
        if self._rec is None:
            b, n, i = (int(getattr(self.run_struct, k)) for k in ("B", "N", "I"))
            cap = chunk_steps(n, i, self.full)
            # zeroed once (buffers are reused across runs): every page is touched, so the memory a run holds
            # does not depend on how many of the rows its length fills
            self._rec = {"rec_L": torch.zeros(cap, b, n), "rec_post": torch.zeros(cap, b, n),
                         "rec_pre": torch.zeros(cap, b, n), "rec_pre_in": torch.zeros(cap, b, i + 1),
                         "c": torch.zeros(b, n)}
        return self._rec["rec_L"].shape[0]

    def _set_records(self, on: bool) -> None:
        for name in ("rec_L", "rec_post", "rec_pre", "rec_pre_in"):
            setattr(self.run_struct, name, self._rec[name].data_ptr() if on else None)

    def _flush_chunk(self) -> None:
        """Adds the gradient of the recorded chunk (``ni_chunk_prepare``'s equations) by two GEMMs; full
        traces are brought to the chunk's end lazily (:meth:`_materialise`), only if anything needs them."""
        k = int(self.run_struct.rec_pos)
        if k == 0:
            return
        rec, g = self._rec, self.grads
        rows = self.lib.ni_chunk_prepare(self._ref, rec["c"].data_ptr())
        n = rec["rec_L"].shape[2]
        a = rec["rec_L"].view(-1, n)[:rows]  # (rows, N): Lf * post (factorised: rows without a learning signal dropped)
        g["w_rec"].addmm_(a.T, rec["rec_pre"].view(-1, n)[:rows])
        # (I + 1, N): one pass over a. Oriented so: MKL's path for a.T @ (K B, I + 1) ran 8x slower (1.2 ms vs
        # 0.16 ms at K B = 1600, N = 256, I + 1 = 9)
        g_in_bias = rec["rec_pre_in"].view(-1, rec["rec_pre_in"].shape[2])[:rows].T @ a
        g["w_in"].add_(g_in_bias[:-1].T)
        g["bias"].add_(g_in_bias[-1])
        if not self.full:
            self.run_struct.rec_pos = 0
            return
        if not self._elig_zero:  # the chunk's first trace, decayed into every step of the chunk
            self.lib.ni_chunk_carry(self._ref, rec["c"].data_ptr())
        self._pending = k

    def _materialise(self) -> None:
        """Brings the full eligibility traces to the end of the last flushed chunk: ``e <- ed^K e + sum_s
        ed^(K - 1 - s) post_s (x) pre_s`` (a GEMM per batch element)."""
        k = self._pending
        if not k:
            return
        rec, bf = self._rec, self.buf
        beta = 0.0 if self._elig_zero else float(self.run_struct.ed) ** k  # beta 0: the old buffer is ignored
        # one GEMM per batch element on strided views of the records: a batched GEMM over the permuted records
        # made contiguous copies of them (memory growing with the number of chunk boundaries)
        for b in range(bf["elig_rec"].shape[0]):
            post = rec["rec_post"][:k, b].T  # (N, K), already weighted by ed^(K - 1 - s)
            bf["elig_rec"][b].addmm_(post, rec["rec_pre"][:k, b], beta=beta)
            in_bias = post @ rec["rec_pre_in"][:k, b]  # (N, I + 1)
            if self._elig_zero:
                bf["elig_in"][b].copy_(in_bias[:, :-1])
                bf["elig_bias"][b].copy_(in_bias[:, -1])
            else:
                bf["elig_in"][b].mul_(beta).add_(in_bias[:, :-1])
                bf["elig_bias"][b].mul_(beta).add_(in_bias[:, -1])
        self._pending = 0
        self._elig_zero = False
        self.run_struct.rec_pos = 0


def _cell_constants(cell) -> tuple:
    """What the fused run copies from a cell when it is built: its rule's constants and configuration."""
    return tuple(cell.trace_spec()), repr(sorted(cell.config().items()))


def chunk_steps(n_hidden: int, n_in: int, full: bool) -> int:
    """Steps per chunk of the chunked exact update. Factorised rules: 64 (GEMMs over 64 B rows run near the
    matmul rate). Full traces: records up to twice the size of the traces themselves (~2 N / 3 steps, 32..512),
    so that most trials fit one chunk and their traces are never materialised, while memory stays independent
    of T."""
    if not full:
        return 64
    return max(32, min(512, 2 * n_hidden * (n_hidden + n_in + 1) // (3 * n_hidden + n_in + 1)))


def attach(rule, batch_size: int, *, reuse: FusedOnline | None = None) -> FusedOnline | None:
    """A :class:`FusedOnline` for ``rule`` (an ``OnlineEprop`` just started), or None where the fused step does
    not apply: ``rule.fast == "auto"`` also declines chip-precision traces (their random draws would differ).
    ``reuse``: the rule's previous one, reset and returned where it fits."""
    quantiser = rule.trace_quantiser
    if rule.fast == "auto" and quantiser is not None:
        return None
    if supports(rule.cell, feedback=rule.feedback, quantiser=quantiser) is not None:
        return None
    if any(g.dtype != torch.float32 or not g.is_contiguous() for g in rule._grads.values()):
        return None
    if reuse is not None and reuse.matches(rule.cell, batch_size, feedback=rule.feedback, quantiser=quantiser):
        reuse.reset(rule._params, rule._grads)
        return reuse
    return FusedOnline(rule.cell, rule._params, batch_size, rule._grads, feedback=rule.feedback,
                       quantiser=quantiser, generator=getattr(rule, "generator", None))


def backward(rule, batch, task, *, optimizer=None, apply_every: int | None = None):
    """``OnlineEprop.backward`` through one native call per learning epoch, or None where it does not apply
    (the caller then runs the PyTorch loop). Same semantics: outputs, loss, gradients written with ``flush``."""
    from neuroinit.learning.base import Trial
    from neuroinit.tasks.base import _mask_total

    if task.loss_kind not in _LOSSES:
        return None
    n_steps, batch_size = batch.inputs.shape[:2]
    rule._begin(batch_size)  # start() without handing out the state (which would write the zero full traces)
    fz = rule._fused
    if fz is None or batch.inputs.device.type != "cpu":
        return None
    f32 = torch.float32
    inputs = batch.inputs.detach().to(f32).contiguous()
    mask = batch.mask
    scale = (mask / _mask_total(mask)).to(f32).contiguous()
    outputs = torch.empty(n_steps, batch_size, rule.cell.n_out, dtype=f32)
    kw = {"targets": batch.targets.to(f32).contiguous()} if task.loss_kind == "mse" else \
        {"labels": batch.targets.to(torch.int64).contiguous()}
    every = apply_every or n_steps
    for t0 in range(0, n_steps, every):
        t1 = min(t0 + every, n_steps)
        fz.run(inputs, scale, outputs, loss=task.loss_kind, t0=t0, t1=t1, **kw)
        if apply_every is not None:
            optimizer.zero_grad()
            rule.flush()
            optimizer.step()
            rule.refresh_params()
    if apply_every is None:
        rule.flush()
    outputs = outputs.to(batch.inputs.dtype)
    with torch.no_grad():
        loss = task.loss(outputs, batch)
    return Trial(loss.detach(), outputs)
