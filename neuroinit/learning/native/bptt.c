/* neuroinit fused BPTT (float32): the forward loop with records and the backward recursion, one call each.
   The equations are in neuroinit/learning/fused_bptt.py (module docstring); the weight gradients are GEMMs
   there. Products with spikes (LIF forward) and with sparse errors (LIF backward: the pseudo-derivative is zero
   away from the threshold) skip the zero entries (event-driven). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "vecmath.h"

enum { VOLTAGE = 0, RATE = 1, LIF = 2 };
enum { TANH = 0, LINEAR = 1, RELU = 2, SOFTPLUS = 3 };

typedef struct {
    int64_t model, actfn, T, B, N, reset_zero, n_ref;
    float alpha, v_th, gamma;
    const float *wp_fwd; /* W_rec^T packed by 16-column blocks: (N / 16, N, 16); d = a W_rec^T */
    const float *wt_fwd; /* W_rec^T row-major (N, N): the last N mod 16 columns */
    const float *wp_bwd; /* W_rec packed likewise: e W_rec */
    const float *wt_bwd;
    const float *drive_in; /* (T, B, N): W_in u_t + b */
    float *states;         /* (T + 1, B, N): presynaptic signal; row 0 the zero state's */
    float *deriv;          /* (T, B, N): f'(x_t) | a f'(d_t) | psi_t */
    float *extra;          /* (T, B, N): LIF reset to zero: alpha v_t; else NULL */
    float *direct;         /* (T, B, N): g_t W_out (LIF: gy_t W_out); overwritten */
    float *err;            /* (T, B, N): dx_t | e_t | e_t */
    float *scratch;        /* (3, B, N) */
    int64_t *events;       /* (B, N + 1) */
    void *sgemm;           /* a BLAS sgemm_ (Fortran interface, 32-bit ints) for the dense products, or NULL */
} BpttRun;

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);

/* D (B, N) += A (B, K) Wt (K, N), Wt packed by 16-column blocks (Wp). A row's non-zero entries are listed first
   (ev: B x (K + 1), the count last), so that zero entries cost nothing. */
static void product_add(const float *A, int64_t B, int64_t K, const float *Wp, const float *Wt, int64_t N,
                        float *D, int64_t *ev_all) {
    for (int64_t b = 0; b < B; b++) {
        const float *a = A + b * K;
        int64_t *ev = ev_all + b * (K + 1), ne = 0;
        for (int64_t k = 0; k < K; k++) { ev[ne] = k; ne += a[k] != 0.0f; }
        ev[K] = ne;
    }
    const int64_t nb = N / 16;
    for (int64_t jb = 0; jb < nb; jb++) {
        const float *P = Wp + jb * K * 16;
        for (int64_t b = 0; b < B; b++) {
            const float *a = A + b * K;
            const int64_t *ev = ev_all + b * (K + 1), ne = ev[K];
            float *d = D + b * N + jb * 16;
            v8f c[4][2] = {{{0}}};
            int64_t e = 0;
            for (; e + 4 <= ne; e += 4)
                for (int q = 0; q < 4; q++) {
                    const int64_t k = ev[e + q];
                    c[q][0] += a[k] * ld8(P + 16 * k); c[q][1] += a[k] * ld8(P + 16 * k + 8);
                }
            for (; e < ne; e++) {
                const int64_t k = ev[e];
                c[0][0] += a[k] * ld8(P + 16 * k); c[0][1] += a[k] * ld8(P + 16 * k + 8);
            }
            st8(d, ld8(d) + ((c[0][0] + c[1][0]) + (c[2][0] + c[3][0])));
            st8(d + 8, ld8(d + 8) + ((c[0][1] + c[1][1]) + (c[2][1] + c[3][1])));
        }
    }
    for (int64_t j = nb * 16; j < N; j++)
        for (int64_t b = 0; b < B; b++) {
            const int64_t *ev = ev_all + b * (K + 1);
            float s = 0.0f;
            for (int64_t e = 0; e < ev[K]; e++) s += A[b * K + ev[e]] * Wt[ev[e] * N + j];
            D[b * N + j] += s;
        }
}

#if defined(__AVX512F__)
/* D (B, N) += A (B, K) M (K, N) with AVX-512 (N a multiple of 32): rows32 (vecmath.h) over pairs of Mp's 16-column
   panels, rows in blocks of 8, 4, 2, 1 */
static void product_wide(const float *A, int64_t B, int64_t K, const float *Mp, int64_t N, float *D) {
    for (int64_t j0 = 0; j0 < N; j0 += 32) {
        const float *P0 = Mp + j0 * K, *P1 = P0 + 16 * K;
        int64_t b = 0;
        for (; b + 8 <= B; b += 8) rows32(8, A + b * K, K, P0, P1, NULL, 0, NULL, NULL, D + b * N, N, N, j0, D + b * N);
        for (; b + 4 <= B; b += 4) rows32(4, A + b * K, K, P0, P1, NULL, 0, NULL, NULL, D + b * N, N, N, j0, D + b * N);
        for (; b + 2 <= B; b += 2) rows32(2, A + b * K, K, P0, P1, NULL, 0, NULL, NULL, D + b * N, N, N, j0, D + b * N);
        for (; b < B; b++) rows32(1, A + b * K, K, P0, P1, NULL, 0, NULL, NULL, D + b * N, N, N, j0, D + b * N);
    }
}
#define WIDE 1
#else
#define WIDE 0
#endif

/* D (B, N) += A (B, K) M (K, N), all row-major, M packed as Mp for the own kernels: through the BLAS where one was
   given (column-major: D^T = M^T A^T), else the AVX-512 kernel (N a multiple of 32), else the event-driven kernel
   above. */
static void product_dense(const BpttRun *r, const float *A, const float *Mp, const float *M, float *D) {
    if (r->sgemm) {
        const int n = (int)r->N, b = (int)r->B;
        const float one = 1.0f;
        ((sgemm_fn)r->sgemm)("N", "N", &n, &b, &n, &one, M, &n, A, &n, &one, D, &n);
    }
#if WIDE
    else if (r->N % 32 == 0) product_wide(A, r->B, r->N, Mp, r->N, D);
#endif
    else product_add(A, r->B, r->N, Mp, M, r->N, D, r->events);
}

static inline float act(int a, float x, float *df) {
    switch (a) {
        case TANH: { const float t = tanh_fast(x); *df = 1.0f - t * t; return t; }
        case LINEAR: *df = 1.0f; return x;
        case RELU: *df = x > 0.0f ? 1.0f : 0.0f; return x > 0.0f ? x : 0.0f;
        default: *df = 1.0f / (1.0f + expf(-x)); return x > 20.0f ? x : log1pf(expf(x));
    }
}

/* One LIF step over the n = B N neurons (lif_step): membrane x, refractory counters ref, spikes next, psi dv
   (and alpha v in ex). Branch-free, the options loop-invariant: the loop vectorises. */
static void lif_update(const BpttRun *r, int64_t n, const float *restrict pre, const float *restrict d,
                       float *restrict x, float *restrict ref, float *restrict next, float *restrict dv,
                       float *restrict ex) {
    const float a = r->alpha, th = r->v_th, gs = r->gamma / r->v_th, nref = (float)r->n_ref;
    const int zero = (int)r->reset_zero, refractory = r->n_ref > 0;
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {
        const float av = a * x[k], zp = pre[k];
        /* leak and reset first, as lif_step does: alpha v - alpha v is exactly 0 */
        const float v = (zero ? av - zp * av : av - zp * th) + d[k];
        const float tri = 1.0f - fabsf(v - th) / th, free_ = refractory && ref[k] > 0.0f ? 0.0f : 1.0f;
        const float z = v > th ? free_ : 0.0f;
        if (refractory) ref[k] = z > 0.0f ? nref : (ref[k] > 1.0f ? ref[k] - 1.0f : 0.0f);
        x[k] = v;
        next[k] = z;
        dv[k] = gs * (tri > 0.0f ? tri : 0.0f) * free_;
        if (zero) ex[k] = a * v;
    }
}

/* The forward loop (fused_bptt.py's module docstring), writing states, deriv (and extra). */
void nb_forward(BpttRun *r) {
    const int64_t T = r->T, B = r->B, N = r->N, BN = B * N;
    const float a = r->alpha;
    float *x = r->scratch, *d = r->scratch + BN, *ref = r->scratch + 2 * BN;
    float df;
    for (int64_t k = 0; k < BN; k++) {
        x[k] = 0.0f; ref[k] = 0.0f;
        r->states[k] = r->model == VOLTAGE ? act((int)r->actfn, 0.0f, &df) : 0.0f;
    }
    for (int64_t t = 0; t < T; t++) {
        const float *pre = r->states + t * BN;
        float *next = r->states + (t + 1) * BN, *dv = r->deriv + t * BN;
        memcpy(d, r->drive_in + t * BN, sizeof(float) * BN);
        if (r->model == LIF) /* spikes: event-driven */
            product_add(pre, B, N, r->wp_fwd, r->wt_fwd, N, d, r->events);
        else
            product_dense(r, pre, r->wp_fwd, r->wt_fwd, d);
        if (r->model == VOLTAGE && r->actfn == TANH) { /* the common case, in a loop that vectorises */
            for (int64_t k = 0; k < BN; k++) {
                x[k] = (1.0f - a) * x[k] + a * d[k];
                const float th_ = tanh_fast(x[k]);
                next[k] = th_;
                dv[k] = 1.0f - th_ * th_;
            }
        } else if (r->model == VOLTAGE) {
            for (int64_t k = 0; k < BN; k++) {
                x[k] = (1.0f - a) * x[k] + a * d[k];
                next[k] = act((int)r->actfn, x[k], &dv[k]);
            }
        } else if (r->model == RATE && r->actfn == TANH) {
            for (int64_t k = 0; k < BN; k++) {
                const float f = tanh_fast(d[k]);
                dv[k] = a * (1.0f - f * f);
                next[k] = pre[k] + a * (f - pre[k]);
            }
        } else if (r->model == RATE) {
            for (int64_t k = 0; k < BN; k++) {
                const float f = act((int)r->actfn, d[k], &dv[k]);
                dv[k] *= a;
                next[k] = pre[k] + a * (f - pre[k]);
            }
        } else {
            lif_update(r, BN, pre, d, x, ref, next, dv, r->extra ? r->extra + t * BN : NULL);
        }
    }
}

/* The backward recursion from step T - 1 down to 0, writing err (direct is used as scratch). */
void nb_backward(BpttRun *r) {
    const int64_t T = r->T, B = r->B, N = r->N, BN = B * N;
    const float a = r->alpha, th = r->v_th;
    float *scaled = r->scratch; /* voltage form: a dx_{t+1}, what the product needs */
    for (int64_t t = T - 1; t >= 0; t--) {
        float *dr = r->direct + t * BN, *e = r->err + t * BN;
        const float *dv = r->deriv + t * BN, *en = r->err + (t + 1) * BN, *dn = r->direct + (t + 1) * BN;
        const int last = t == T - 1;
        if (!last) {
            if (r->model == VOLTAGE) {
                for (int64_t k = 0; k < BN; k++) scaled[k] = a * en[k];
                product_dense(r, scaled, r->wp_bwd, r->wt_bwd, dr);
            } else {
                product_dense(r, en, r->wp_bwd, r->wt_bwd, dr);
            }
        }
        if (last) { /* nothing flows back from beyond the last step */
            for (int64_t k = 0; k < BN; k++) e[k] = dr[k] * dv[k];
        } else if (r->model == VOLTAGE) {
            for (int64_t k = 0; k < BN; k++) e[k] = dr[k] * dv[k] + (1.0f - a) * en[k];
        } else if (r->model == RATE) {
            for (int64_t k = 0; k < BN; k++) {
                dr[k] += (1.0f - a) * dn[k]; /* dh_t, kept in direct for the step before */
                e[k] = dr[k] * dv[k];
            }
        } else if (r->extra) { /* reset to zero */
            const float *zt = r->states + (t + 1) * BN, *ex = r->extra + t * BN;
            for (int64_t k = 0; k < BN; k++) e[k] = (dr[k] - ex[k] * en[k]) * dv[k] + a * (1.0f - zt[k]) * en[k];
        } else {
            for (int64_t k = 0; k < BN; k++) e[k] = (dr[k] - th * en[k]) * dv[k] + a * en[k];
        }
    }
}

/* The recurrent weights' gradient from sparse presynaptic rows (spikes): gT (K x N) += sum_r Z[r, k] E[r, :] over
   the rows r < R of E (R x N) and Z (R x K), visiting only the non-zero Z[r, k] -- dW_rec^T = Z^T E at the cost of
   the spikes, not of a dense GEMM. */
void nb_grad_events(const float *E, const float *Z, int64_t R, int64_t N, int64_t K, float *gT) {
    for (int64_t r = 0; r < R; r++) {
        const float *e = E + r * N, *z = Z + r * K;
        for (int64_t k = 0; k < K; k++) {
            if (z[k] == 0.0f) continue;
            float *g = gT + k * N;
            const float c = z[k];
            for (int64_t j = 0; j < N; j++) g[j] += c * e[j];
        }
    }
}

/* wp: W (n x n, row-major) transposed and packed by 16-column blocks: wp[(jb n + k) 16 + jj] = W[jb 16 + jj][k];
   with transpose = 0 the same layout of W itself (wp[(jb n + k) 16 + jj] = W[k][jb 16 + jj]). */
void nb_pack(const float *w, int64_t n, int transpose, float *wp) {
    const int64_t nb = n / 16;
    for (int64_t jb = 0; jb < nb; jb++)
        for (int64_t k = 0; k < n; k++)
            for (int64_t jj = 0; jj < 16; jj++)
                wp[(jb * n + k) * 16 + jj] = transpose ? w[(jb * 16 + jj) * n + k] : w[k * n + jb * 16 + jj];
}

int nb_abi(void) { return (int)sizeof(BpttRun); }
/* 1 where the library was built with its AVX-512 dense kernel (product_wide) */
int nb_wide(void) { return WIDE; }
