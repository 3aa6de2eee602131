"""Fused online e-prop / RFLO step: one native call per step (or per whole trial) on the CPU, float32.

The plain step (:meth:`neuroinit.learning.online.OnlineEprop.step`) costs ~15 eager PyTorch ops (2-3 us each) and
passes over every ``B x N x N`` eligibility trace three times (decay, add, gradient einsum). The fused step does
the network step, the traces and the gradient accumulation in one native function, and updates each stored trace
and accumulates its gradient in a single pass (read + write the trace once per step: the memory roofline of
RFLO and LIF e-prop).

Route (measured on the project's 2-core machine; ``benchmarks/README.md``): a small C file compiled at first use
with the machine's C compiler (``cc -O3 -march=native -fopenmp``, ~1-3 s, cached per source/compiler/CPU under
``$NEUROINIT_CACHE`` or ``~/.cache/neuroinit``) and called through :mod:`ctypes` with one pointer to a struct of
buffers. No new Python dependency; torch's own OpenMP runtime is shared (same soname), so the two thread pools
do not fight. Where no compiler is found, or for float64, CUDA tensors or cells it does not know, callers fall
back to the PyTorch path (:func:`available`, :func:`supports`), which gives the same results.

Semantics equal :func:`neuroinit.learning.online.trace_step` + the gradient accumulation of
``OnlineEprop.step`` (tests: ``tests/test_fused.py``, to 1e-6 in float32). Traces held at chip precision
(``make_trace_quantiser``) use stochastic rounding with an in-kernel counter-based generator seeded from the
rule's ``torch.Generator`` once per step: the same distribution as the PyTorch path, not the same draws.
The fused state is updated in place: a state handed to a step is consumed by it.
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
from pathlib import Path
from typing import Callable

import torch

__all__ = ["available", "unavailable_reason", "supports", "FusedOnline", "library_path", "C_SOURCE"]

C_SOURCE = r"""/* neuroinit fused online e-prop / RFLO step (float32). One call advances the network by one step and, in one
   pass over every stored eligibility trace, updates the trace and accumulates the gradient.
   Mirrors neuroinit.learning.online.trace_step + OnlineEprop.step; see neuroinit/learning/fused.py. */
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
    int64_t reset_zero, n_ref, full, quant, par_work, loss, T;
    uint64_t seed;
    float alpha, kappa, v_th, gamma;
    float pd, pg, ed, rd;
    float q_scale[8], q_min[8], q_max[8];
    float *w_in, *w_rec, *bias, *w_out, *b_out, *fb;
    float *x, *z, *ref, *y;
    float *prev, *post, *act, *L, *err, *yout;
    float *pre_rec, *pre_in, *pre_bias, *elig_rec, *elig_in, *elig_bias, *ro, *ro_bias;
    float *g_in, *g_rec, *g_bias, *g_out, *g_bout;
    float *inputs, *targets, *scale, *outputs;
    int64_t *labels;
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

/* ---------------------------------------------------------------- activations */
static inline float act_f(int a, float x) {
    switch (a) {
        case TANH: return tanhf(x);
        case LINEAR: return x;
        case RELU: return x > 0.0f ? x : 0.0f;
        default: return x > 20.0f ? x : log1pf(expf(x)); /* softplus, torch's threshold 20 */
    }
}
static inline float act_df(int a, float x) {
    switch (a) {
        case TANH: { float t = tanhf(x); return 1.0f - t * t; }
        case LINEAR: return 1.0f;
        case RELU: return x > 0.0f ? 1.0f : 0.0f;
        default: return 1.0f / (1.0f + expf(-x));
    }
}

/* Dot products with several independent accumulators (one accumulator chain is FMA-latency bound: ~1/8 of the
   machine's rate). GCC/Clang vector extensions; -march=native picks the widest registers. */
typedef float v8f __attribute__((vector_size(32)));
static inline v8f ld8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline float dot(const float *a, const float *b, int64_t n) {
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 += ld8(a + i) * ld8(b + i);
        s1 += ld8(a + i + 8) * ld8(b + i + 8);
        s2 += ld8(a + i + 16) * ld8(b + i + 16);
        s3 += ld8(a + i + 24) * ld8(b + i + 24);
    }
    for (; i + 8 <= n; i += 8) s0 += ld8(a + i) * ld8(b + i);
    float r = hsum8((s0 + s1) + (s2 + s3));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* a . b_q for q = 0..3 (b_q = b + q * stride): the row a is read once for four batch elements */
static inline void dot4(const float *a, const float *b, int64_t stride, int64_t n, float *out) {
    const float *b0 = b, *b1 = b + stride, *b2 = b + 2 * stride, *b3 = b + 3 * stride;
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f w = ld8(a + i);
        s0 += w * ld8(b0 + i);
        s1 += w * ld8(b1 + i);
        s2 += w * ld8(b2 + i);
        s3 += w * ld8(b3 + i);
    }
    float r0 = hsum8(s0), r1 = hsum8(s1), r2 = hsum8(s2), r3 = hsum8(s3);
    for (; i < n; i++) { r0 += a[i] * b0[i]; r1 += a[i] * b1[i]; r2 += a[i] * b2[i]; r3 += a[i] * b3[i]; }
    out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3;
}

/* the cell's update of neuron k = b N + j from its total drive d (recurrent + input + bias) */
static inline void cell_update(Run *r, int64_t k, float d) {
    const int model = (int)r->model, a = (int)r->actfn;
    const float al = r->alpha, oma = 1.0f - r->alpha;
    float *x = r->x;
    if (model == VOLTAGE) {
        float xn = oma * x[k] + al * d;
        x[k] = xn;
        r->act[k] = act_f(a, xn);
        r->post[k] = act_df(a, xn);
    } else if (model == RFLO) {
        float xn = oma * x[k] + al * act_f(a, d);
        r->post[k] = al * act_df(a, d);
        r->act[k] = xn;
        x[k] = xn; /* prev holds h_{t-1}: safe to overwrite */
    } else {
        float vold = x[k], zp = r->prev[k];
        float reset = r->reset_zero ? zp * (r->alpha * vold) : zp * r->v_th;
        float v = r->alpha * vold + d - reset;
        float ps = (r->gamma / r->v_th) * fmaxf(1.0f - fabsf(v - r->v_th) / r->v_th, 0.0f);
        float zn = v > r->v_th ? 1.0f : 0.0f;
        if (r->n_ref > 0) {
            float free_ = r->ref[k] <= 0.0f ? 1.0f : 0.0f;
            ps *= free_;
            zn *= free_;
            r->ref[k] = zn > 0.0f ? (float)r->n_ref : fmaxf(r->ref[k] - 1.0f, 0.0f);
        }
        x[k] = v;
        r->post[k] = ps;
        r->act[k] = zn;
        r->z[k] = zn;
    }
}

/* ---------------------------------------------------------------- forward: network + presynaptic traces */
/* Advances the cell state by one step driven by u (B, I); writes y (B, O) to r->yout, the postsynaptic factor
   to r->post, the presynaptic signal to r->prev and the non-eligibility traces. */
void ni_forward(Run *r, const float *u) {
    const int64_t B = r->B, N = r->N, I = r->I, O = r->O;
    const int model = (int)r->model, a = (int)r->actfn;
    float *prev = r->prev, *x = r->x, *act = r->act;
    /* presynaptic signal of the recurrent weights at this step */
    for (int64_t k = 0; k < B * N; k++) prev[k] = model == VOLTAGE ? act_f(a, x[k]) : (model == RFLO ? x[k] : r->z[k]);
    int par = B * N * N >= r->par_work;
    /* recurrent + input drive */
#pragma omp parallel for if (par) schedule(dynamic, 4)
    for (int64_t j = 0; j < N; j++) {
        const float *wr = r->w_rec + j * N, *wi = r->w_in + j * I;
        int64_t b = 0;
        for (; b + 4 <= B; b += 4) {
            float d4[4];
            dot4(wr, prev + b * N, N, N, d4);
            for (int64_t q = 0; q < 4; q++)
                cell_update(r, (b + q) * N + j, d4[q] + dot(wi, u + (b + q) * I, I) + r->bias[j]);
        }
        for (; b < B; b++) cell_update(r, b * N + j, dot(wr, prev + b * N, N) + dot(wi, u + b * I, I) + r->bias[j]);
    }
    /* readout */
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = 0; o < O; o++) {
            float s = dot(r->w_out + o * N, act + b * N, N) + r->b_out[o];
            if (model == LIF) { s = r->kappa * r->y[b * O + o] + s; r->y[b * O + o] = s; }
            r->yout[b * O + o] = s;
        }
    /* presynaptic and readout traces (O(B N)) */
    const float pd = r->pd, pg = r->pg, rd = r->rd;
    for (int64_t k = 0; k < B * N; k++) r->pre_rec[k] = pd * r->pre_rec[k] + pg * prev[k];
    for (int64_t k = 0; k < B * I; k++) r->pre_in[k] = pd * r->pre_in[k] + pg * u[k];
    for (int64_t b = 0; b < B; b++) r->pre_bias[b] = pd * r->pre_bias[b] + pg;
    for (int64_t k = 0; k < B * N; k++) r->ro[k] = rd * r->ro[k] + act[k];
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
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (int64_t o = 0; o < O; o++) s += err[b * O + o] * r->fb[o * N + j];
            L[b * N + j] = s;
        }
    const int par = B * N * (N + I) >= r->par_work;
    if (!r->full) {
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
    const int64_t B = r->B, I = r->I, O = r->O;
    for (int64_t t = t0; t < t1; t++) {
        ni_forward(r, r->inputs + t * B * I);
        memcpy(r->outputs + t * B * O, r->yout, sizeof(float) * B * O);
        output_error(r, t);
        ni_update(r);
        r->seed = r->seed * 6364136223846793005ULL + 1442695040888963407ULL;
    }
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
_PTRS = ("w_in", "w_rec", "bias", "w_out", "b_out", "fb", "x", "z", "ref", "y", "prev", "post", "act", "L",
         "err", "yout", "pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "ro", "ro_bias",
         "g_in", "g_rec", "g_bias", "g_out", "g_bout", "inputs", "targets", "scale", "outputs", "labels")
# below this many multiply-adds per loop a step stays on one thread: a parallel loop ends in a barrier, which costs
# ~1-5 us on a quiet machine but up to a scheduler time slice (ms) when the other core is busy (measured: LIF
# N=64, B=16 at 49 us/step on one thread, 2349 us on two threads next to other work)
PAR_WORK = 1 << 20


class _Run(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("model", "actfn", "B", "N", "I", "O", "reset_zero", "n_ref",
                                               "full", "quant", "par_work", "loss", "T")]
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


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


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
    cc = _compiler() or "none"
    key = hashlib.sha256("\n".join([C_SOURCE, cc, " ".join(FLAGS), _cpu_id(), platform.machine()]).encode())
    return _cache_dir() / f"neuroinit_fused_{key.hexdigest()[:16]}.so"


def _build() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        cc = _compiler()
        if cc is None:
            raise OSError("no C compiler (cc, gcc or clang) on PATH")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "fused.c"
            src.write_text(C_SOURCE)
            out = Path(tmp) / path.name
            proc = subprocess.run([cc, *FLAGS, "-o", str(out), str(src), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(f"compiling the fused step failed: {proc.stderr.strip().splitlines()[:1]}")
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    import torch  # noqa: F401  (torch's OpenMP runtime is loaded first, so the library shares it)
    lib = ctypes.CDLL(str(path))
    for name in ("ni_forward", "ni_update", "ni_run"):
        getattr(lib, name).restype = None
    lib.ni_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ni_update.argtypes = [ctypes.c_void_p]
    lib.ni_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
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
            elif not sys.platform.startswith("linux") and not sys.platform == "darwin":
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

    if isinstance(cell, LIFRNN):
        return _MODELS["lif"], 0
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
        f32 = dict(dtype=torch.float32)
        zeros = lambda *s: torch.zeros(*s, **f32)  # noqa: E731
        self.full = spec.elig_decay != 0.0
        self.model = model
        self.buf = {
            "x": zeros(b, n), "z": zeros(b, n), "ref": zeros(b, n), "y": zeros(b, o),
            "prev": zeros(b, n), "post": zeros(b, n), "act": zeros(b, n), "L": zeros(b, n),
            "err": zeros(b, o), "yout": zeros(b, o),
            "pre_rec": zeros(b, n), "pre_in": zeros(b, i), "pre_bias": zeros(b, 1),
            "elig_rec": zeros(b, n, n) if self.full else None, "elig_in": zeros(b, n, i) if self.full else None,
            "elig_bias": zeros(b, n) if self.full else None, "ro": zeros(b, n), "ro_bias": zeros(b, 1),
        }
        for name in ("w_in", "w_rec", "bias", "w_out", "b_out"):
            g = grads[name]
            if g.dtype != torch.float32 or not g.is_contiguous():
                raise ValueError(f"Invalid gradient buffer {name}: needs a contiguous float32 tensor")
        self.grads = grads
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
        for name, pname in (("g_in", "w_in"), ("g_rec", "w_rec"), ("g_bias", "bias"), ("g_out", "w_out"),
                            ("g_bout", "b_out")):
            setattr(r, name, grads[pname].data_ptr())
        self._feedback = feedback
        self.set_params(params)
        self._ref = ctypes.byref(r)
        self._step_inputs: torch.Tensor | None = None

    # -------------------------------------------------------------- parameters and state
    def set_params(self, params) -> None:
        """Point the step at (new) parameters, e.g. after an optimizer step."""
        self._params = {n: getattr(params, n).detach().contiguous() for n in ("w_in", "w_rec", "bias", "w_out",
                                                                               "b_out")}
        self._params["fb"] = (self._params["w_out"] if self._feedback is None
                              else self._feedback.detach().contiguous())
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

        bf = self.buf
        return Traces(bf["pre_rec"], bf["pre_in"], bf["pre_bias"], bf["elig_rec"], bf["elig_in"], bf["elig_bias"],
                      bf["ro"], bf["ro_bias"])

    def state_bytes(self) -> int:
        """Bytes held across steps (state, traces, scratch, gradient accumulators): independent of T."""
        return sum(t.numel() * 4 for t in self.buf.values() if t is not None) + \
            sum(g.numel() * 4 for g in self.grads.values())

    def _reseed(self) -> None:
        if self.quantised:
            self.run_struct.seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))

    # -------------------------------------------------------------- stepping
    def step(self, u: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One step driven by ``u`` (B, I); ``error(y)`` gives d loss / d y (B, O). Returns y (a new tensor)."""
        u = u.detach().to(torch.float32).contiguous()
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
        self._reseed()
        self.lib.ni_run(self._ref, t0, t1)
        self._keep = keep  # keep the buffers alive while the struct points at them


def attach(rule, batch_size: int) -> FusedOnline | None:
    """A :class:`FusedOnline` for ``rule`` (an ``OnlineEprop`` just started), or None where the fused step does
    not apply: ``rule.fast == "auto"`` also declines chip-precision traces (their random draws would differ)."""
    quantiser = rule.trace_quantiser
    if rule.fast == "auto" and quantiser is not None:
        return None
    if supports(rule.cell, feedback=rule.feedback, quantiser=quantiser) is not None:
        return None
    if any(g.dtype != torch.float32 or not g.is_contiguous() for g in rule._grads.values()):
        return None
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
    rule.start(batch_size)
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
