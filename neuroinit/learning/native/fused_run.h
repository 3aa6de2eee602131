/* neuroinit fused online e-prop / RFLO: what fused_step.c (the step, traces, chunked update), products.c (the
   activations and forward products) and chip_traces.c (eligibility traces as integer codes at a chip's precision)
   share: the run's layout (mirrored by ctypes in fused_step.py), the counter-based random words, rounding onto a
   trace grid, and each file's entry points. */
#ifndef NEUROINIT_FUSED_RUN_H
#define NEUROINIT_FUSED_RUN_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
    int64_t code_bytes, q_nearest; /* chip precision: bytes per stored trace code (1, 2); round to nearest */
    int64_t portable;               /* 1: the scalar loop even where a vector kernel exists (tests: same codes) */
    int64_t bs; /* batch stride of the per-step inputs, outputs and records (0: B; ni_run's batch slices) */
    int64_t b0; /* the first batch element's index in the whole batch (ni_run's batch slices; else 0): the random
                   words of chip precision are drawn by whole-batch index, so a slice draws what the whole would */
    uint64_t seed;
    float alpha, kappa, v_th, gamma;
    float pd, pg, ed, rd;
    float q_scale[8], q_min[8], q_max[8];
    float *w_in, *w_rec, *bias, *w_out, *b_out, *fb, *wt_in, *wt_rec, *wp_in, *wp_rec;
    float *x, *z, *ref, *y;
    float *post, *act, *L, *err, *yout, *drive;
    float *pre_rec, *pre_in, *pre_bias;
    void *elig_rec, *elig_in, *elig_bias; /* float traces, or int8 / int16 codes when quant (chip_elig) */
    float *ro, *ro_bias;
    float *g_in, *g_rec, *g_bias, *g_out, *g_bout;
    float *inputs, *targets, *scale, *outputs;
    int64_t *labels, *events;
    float *rec_L, *rec_post, *rec_pre, *rec_pre_in; /* chunk records (K, B, .), or NULL; rec_pre_in: (K, B, I + 1),
                                                    the input traces then the bias trace */
    float *pre_src; /* where the presynaptic trace's previous value is read (NULL: pre_rec) */
} Run;

/* ---------------------------------------------------------------- chip precision: rounding onto trace grids */
/* Trace arithmetic here must round like the PyTorch path (separate products and sums, no fused multiply-add),
   so that with nearest rounding the codes are the same bit for bit. */
#if defined(__clang__)
#define NO_CONTRACT
#define EXACT_FP _Pragma("clang fp contract(off)")
#else
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define EXACT_FP

#endif

/* counter-based random words: mix32 is a 32-bit integer hash (xor-shift-multiply, full avalanche); word w of
   stream key is mix32(GOLD w ^ key). MIX32 is its one definition, for a uint32_t and, lane by lane, for GCC's
   vectors of them (mix32_v, mix32_v8 below). */
#define GOLD 0x9e3779b9U
#define MIX32(x) ((x) ^= (x) >> 16, (x) *= 0x7feb352dU, (x) ^= (x) >> 15, (x) *= 0x846ca68bU, (x) ^= (x) >> 16, (x))
static inline uint32_t mix32(uint32_t x) { return MIX32(x); }
/* uniform in [0, 1) from (key, index): 24 random bits */
static inline float unif(uint32_t key, uint32_t idx) {
    return (float)(mix32(idx * GOLD ^ key) >> 8) * (1.0f / 16777216.0f);
}
/* x on the grid (scale s, codes lo..hi): stochastic with the uniform u, or nearest (half to even) */
static inline float sround(float x, float s, float lo, float hi, float u, int nearest) {
    /* codes outside [lo - 1, hi + 1] saturate anyway: clamping first keeps the int conversion exact */
    float c = x / s;
    c = c < lo - 1.0f ? lo - 1.0f : c;
    c = c > hi + 1.0f ? hi + 1.0f : c;
    if (nearest) {
        c = rintf(c);
    } else {
        float low = (float)(int32_t)c;
        low -= low > c ? 1.0f : 0.0f; /* floor, vectorisable */
        c = low + ((u >= 1.0f - (c - low)) ? 1.0f : 0.0f);
    }
    c = c < lo ? lo : c;
    c = c > hi ? hi : c;
    return c * s;
}
static inline uint32_t qkey(const Run *r, int which) {
    return mix32((uint32_t)r->seed ^ mix32((uint32_t)(r->seed >> 32) + 0x51ed27u * (uint32_t)(which + 1)));
}

/* int8 codes of rows without an increment (post 0): every code c goes to (T + r) >> 8 with T = rint(X(c)), the
   same X as the vector kernel's; held as hi = T >> 8 and nlo = 255 - (T & 255), so that the new code is
   hi + (r > nlo) (with nearest rounding hi is the code, nlo 255). Indexed by the code's byte (uint8_t) c; the
   small tables hold the codes -32 <= c < 32 at c & 63 (one 64-byte register each). */
typedef struct {
    int8_t hi[256];
    uint8_t nlo[256];
    int8_t hi_small[64];
    uint8_t nlo_small[64];
} DecayTable;

typedef struct {
    float ed, ps, lo, hi; /* 2^k ed, 2^k post / s, 2^k lo, 2^k hi */
    float ls;             /* L s */
    uint32_t key, ctr;    /* the row's random words: mix32(GOLD (ctr + w) ^ key), w = 0, 1, ... */
    int k, nearest;
    const float *ps_v, *ls_v; /* per-element ps and ls instead of ps and ls (NULL: the scalars) */
    const DecayTable *decay;  /* int8 rows without an increment by table (NULL: the arithmetic; the same codes) */
    int in_range;             /* 1: every sum is provably within [lo, hi] (chip_elig): kernels may skip the clamp */
} RowQ;

/* random words per row of n codes (a whole number of 16-word blocks) */
static inline uint32_t row_words(int64_t n, int k) {
    const int64_t G = 16 * (32 / k);
    return (uint32_t)((n + G - 1) / G * 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
typedef uint32_t u32x16 __attribute__((vector_size(64)));
static inline __m512i mix32_v(__m512i x) { u32x16 v = (u32x16)x; return (__m512i)MIX32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef uint32_t u32x8 __attribute__((vector_size(32)));
static inline __m256i mix32_v8(__m256i x) { u32x8 v = (u32x8)x; return (__m256i)MIX32(v); }
#endif

/* The eligibility traces of up to CHIP_CHUNK steps, deferred (chip_chunk_flush): each step's factors are recorded,
   then every row's codes are updated over all recorded steps while they stay in registers. */
#define CHIP_CHUNK 32
typedef struct {
    int64_t n;                     /* steps recorded */
    float *pre, *post, *L;         /* (CHIP_CHUNK, B, N): each step's presynaptic trace, post factor, signal */
    float *pre_in, *pre_bias;      /* (CHIP_CHUNK, B, I) and (CHIP_CHUNK, B): the input and bias traces */
    float *pre_max;                /* (CHIP_CHUNK, B): max |pre| of each step's batch element */
    uint32_t key[CHIP_CHUNK][3];   /* each step's random streams of the recurrent, input and bias traces */
} ChipChunk;

/* chip_traces.c (internal to the library: not exported) */
#define NI_INTERNAL __attribute__((visibility("hidden")))
NI_INTERNAL void quant_vec(const Run *r, int which, float *v, int64_t n, int64_t per);
NI_INTERNAL void decay_add(float *dst, const float *src, float d, const float *x, float g, int64_t n);
NI_INTERNAL void chip_row(void *codes, int bytes, const float *pre, int64_t n, const RowQ *q, float *g, int portable);
NI_INTERNAL void chip_elig_rec(const Run *r, int64_t b, int64_t j0, int64_t j1, uint32_t key);
NI_INTERNAL void chip_cols(const Run *r, int which, int64_t b, int64_t jg, int64_t nl, uint32_t key);
NI_INTERNAL int chip_chunks(const Run *r);
/* rows per block of the chip traces' update (whole groups of 16: chip_cols), about 8 K codes of the recurrent
   trace: a thread's share */
static inline int64_t chip_rows_per_block(int64_t N) {
    const int64_t jb = 8192 / N;
    return jb <= 16 ? 16 : (jb + 15) / 16 * 16;
}
NI_INTERNAL void chip_chunk_record(const Run *r, ChipChunk *cc, const uint32_t keys[3]);
NI_INTERNAL void chip_chunk_flush(const Run *r, ChipChunk *cc);

/* products.c (internal to the library) */
NI_INTERNAL void activate(int a, const float *d, float *f, float *df, int64_t n);
NI_INTERNAL float dot(const float *a, const float *b, int64_t n);
NI_INTERNAL void drive_dense(const float *A, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                             int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                             int par);
NI_INTERNAL void drive_events(const float *Z, int64_t B, int64_t K, const float *Wt, const float *Wp, const float *U,
                              int64_t I, const float *Wti, const float *Wpi, const float *bias, int64_t N, float *D,
                              int64_t *idx, int64_t par_work);

#endif
