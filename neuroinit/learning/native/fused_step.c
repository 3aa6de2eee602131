/* neuroinit fused online e-prop / RFLO (float32): the network step, presynaptic and readout
   traces and learning signal in one call per step; the eligibility traces either updated per step (one pass that
   also accumulates the gradient) or recorded for the chunked exact update. See neuroinit/learning/fused.py. */
#include "fused_run.h"

/* The LIF cells' update from the drive (r->drive) and the previous spikes z (read before they are overwritten):
       v = alpha v_old + d - reset,  reset = z th (subtract) or z alpha v_old (zero),
       z_new = v > th,  post = psi(v) = gamma / th max(0, 1 - |v - th| / th) (LIFRNN and pseudo_derivative in
   neuroinit/cells/lif.py), both 0 while refractory (ref > 0; ref <- n_ref after a spike, else counts down). */
static inline __attribute__((always_inline)) void lif_update(Run *r, const int zero, const int refr, const int pow2,
                                                              int64_t n) {
    /* pow2: th is a power of two, so x / th = x (1 / th) exactly (both the correctly rounded x 2^-k) */
    const float al = r->alpha, th = r->v_th, gs = r->gamma / r->v_th, nref = (float)r->n_ref, inv = 1.0f / th;
    float *restrict x = r->x, *restrict z = r->z, *restrict ref = r->ref, *restrict post = r->post;
    float *restrict act = r->act;
    const float *restrict d = r->drive;
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {
        const float vold = x[k], zp = z[k];
        const float reset = zero ? zp * (al * vold) : zp * th;
        const float v = al * vold + d[k] - reset;
        const float tri = 1.0f - (pow2 ? fabsf(v - th) * inv : fabsf(v - th) / th); /* fabsf: a bit mask */
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
    decay_add(r->pre_rec, pre_old, pd, prev, pg, BN);
    /* drive d = bias + prev W_rec^T + u W_in^T */
    const int par = B * N * N >= r->par_work;
    if (model == LIF)
        drive_events(prev, B, N, r->wt_rec, r->wp_rec, u, I, r->wt_in, r->wp_in, r->bias, N, d, r->events,
                     r->par_work);
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
        int e;
        const int pow2 = frexpf(r->v_th, &e) == 0.5f && isnormal(1.0f / r->v_th);
        /* the flags as constants: branch-free loops, no per-element test, no division where th = 2^k */
        switch ((int)r->reset_zero | (r->n_ref > 0) << 1 | pow2 << 2) {
            case 0: lif_update(r, 0, 0, 0, BN); break;
            case 1: lif_update(r, 1, 0, 0, BN); break;
            case 2: lif_update(r, 0, 1, 0, BN); break;
            case 3: lif_update(r, 1, 1, 0, BN); break;
            case 4: lif_update(r, 0, 0, 1, BN); break;
            case 5: lif_update(r, 1, 0, 1, BN); break;
            case 6: lif_update(r, 0, 1, 1, BN); break;
            default: lif_update(r, 1, 1, 1, BN);
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
    decay_add(r->pre_in, r->pre_in, pd, u, pg, B * I);
    decay_add(r->pre_bias, r->pre_bias, pd, NULL, pg, B);
    decay_add(r->ro, r->ro, rd, act, 1.0f, BN);
    decay_add(r->ro_bias, r->ro_bias, rd, NULL, 1.0f, B);
    quant_vec(r, Q_PRE_REC, r->pre_rec, B * N, N);
    quant_vec(r, Q_PRE_IN, r->pre_in, B * I, I);
    quant_vec(r, Q_PRE_BIAS, r->pre_bias, B, 1);
    quant_vec(r, Q_READOUT, r->ro, B * N, N);
    quant_vec(r, Q_READOUT_BIAS, r->ro_bias, B, 1);
}

/* ---------------------------------------------------------------- update: eligibility traces + gradients */
/* Given the output error r->err (B, O) of this step: learning signal, eligibility traces (one pass each,
   updated and accumulated into the gradient together) and readout gradients. With a chunk cc (chip precision,
   chip_chunks) the recurrent traces' factors are recorded instead, and their update waits for the chunk's flush. */
static void update(Run *r, ChipChunk *cc) {
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
        const int64_t s = r->rec_pos++, BS = r->bs ? r->bs : B; /* L, post, pre_rec: in place (ni_run) */
        for (int64_t b = 0; b < B; b++) {
            float *row = r->rec_pre_in + (s * BS + b) * (I + 1);
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
    } else if (r->quant) { /* chip precision: integer codes (chip_traces.c) */
        const uint32_t keys[3] = {qkey(r, Q_ELIG_REC), qkey(r, Q_ELIG_IN), qkey(r, Q_ELIG_BIAS)};
        if (cc) {
            chip_chunk_record(r, cc, keys);
            if (cc->n == CHIP_CHUNK) chip_chunk_flush(r, cc);
        } else {
            /* blocks of rows (whole groups of 16 for the input and bias traces): each thread owns whole blocks */
            const int64_t jb = chip_rows_per_block(N);
#pragma omp parallel for if (par) schedule(dynamic, 1)
            for (int64_t j0 = 0; j0 < N; j0 += jb) {
                const int64_t j1 = j0 + jb < N ? j0 + jb : N;
                for (int64_t b = 0; b < B; b++) {
                    chip_elig_rec(r, b, j0, j1, keys[0]);
                    for (int64_t jg = j0; jg < j1; jg += 16) {
                        if (I) chip_cols(r, Q_ELIG_IN, b, jg, j1 - jg < 16 ? j1 - jg : 16, keys[1]);
                        chip_cols(r, Q_ELIG_BIAS, b, jg, j1 - jg < 16 ? j1 - jg : 16, keys[2]);
                    }
                }
            }
        }
    } else {
        const float ed = r->ed;
        /* blocks of jb rows: for each batch element the block's trace rows are one contiguous stream (jb N floats,
           ~32 KB) and the block's gradient rows stay in L1/L2 across the batch; each thread owns whole blocks */
        const int64_t jb = N >= 2048 ? 4 : 8192 / N > 4 ? 8192 / N : 4;
#pragma omp parallel for if (par) schedule(dynamic, 1)
        for (int64_t j0 = 0; j0 < N; j0 += jb) {
            const int64_t j1 = j0 + jb < N ? j0 + jb : N;
            for (int64_t b = 0; b < B; b++) {
                float *ER = r->elig_rec, *EI = r->elig_in, *EB = r->elig_bias;
                for (int64_t j = j0; j < j1; j++) {
                    float *gr = r->g_rec + j * N, *gi = r->g_in + j * I;
                    const float p = r->post[b * N + j], l = L[b * N + j];
                    const float *pr = r->pre_rec + b * N, *pi = r->pre_in + b * I;
                    float *e = ER + (b * N + j) * N, *ei = EI + (b * N + j) * I;
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
                    float v = ed * EB[b * N + j] + p * r->pre_bias[b];
                    EB[b * N + j] = v;
                    r->g_bias[j] += l * v;
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

void ni_update(Run *r) { update(r, NULL); }

/* ---------------------------------------------------------------- whole sequences */
static void output_error(Run *r, int64_t t) {
    const int64_t B = r->B, O = r->O, BS = r->bs ? r->bs : B;
    for (int64_t b = 0; b < B; b++) {
        const float s = r->scale[t * BS + b];
        const float *y = r->yout + b * O;
        float *e = r->err + b * O;
        if (r->loss == LOSS_MSE) {
            const float *tg = r->targets + (t * BS + b) * O;
            for (int64_t o = 0; o < O; o++) e[o] = s * (y[o] - tg[o]);
        } else {
            float m = y[0], z = 0.0f;
            for (int64_t o = 1; o < O; o++) m = fmaxf(m, y[o]);
            for (int64_t o = 0; o < O; o++) { e[o] = expf(y[o] - m); z += e[o]; }
            const int64_t lab = r->labels[t * BS + b];
            for (int64_t o = 0; o < O; o++) e[o] = s * (e[o] / z - (o == lab ? 1.0f : 0.0f));
        }
    }
}

/* the seed of the next step's random words (a 64-bit LCG step: Knuth's MMIX constants) */
static inline uint64_t next_seed(uint64_t s) { return s * 6364136223846793005ULL + 1442695040888963407ULL; }

/* Runs steps t0 <= t < t1 of r->inputs (T, B, I), errors from the loss, outputs into r->outputs (T, B, O): the
   batch elements of r, or of a slice of it (r->bs: the full batch, the stride of the per-step arrays). ``r->seed``
   advances by one per step (stochastic rounding keys). */
static void run_steps(Run *r, int64_t t0, int64_t t1) {
    const int64_t B = r->B, I = r->I, O = r->O, BN = B * r->N, BS = r->bs ? r->bs : B, BSN = BS * r->N;
    /* recording (chunked update): this step's L, post and presynaptic trace are written straight into their
       record rows (the trace reads its previous value from the row before) instead of being copied there */
    const int rec = r->rec_L && !r->quant;
    float *post0 = r->post, *L0 = r->L, *pre0 = r->pre_rec;
    /* chip precision: the recurrent traces a chunk of steps at a time (chip_chunk_flush), when the buffers exist */
    ChipChunk chunk = {0}, *cc = NULL;
    if (chip_chunks(r) && t1 > t0) {
        const size_t per = (size_t)(CHIP_CHUNK * BN), in = (size_t)(CHIP_CHUNK * B * I), one = (size_t)(CHIP_CHUNK * B);
        float *buf = malloc(sizeof(float) * (3 * per + in + 2 * one));
        if (buf) {
            chunk.pre = buf, chunk.post = buf + per, chunk.L = buf + 2 * per, chunk.pre_in = buf + 3 * per;
            chunk.pre_bias = chunk.pre_in + in, chunk.pre_max = chunk.pre_bias + one;
            cc = &chunk;
        }
    }
    for (int64_t t = t0; t < t1; t++) {
        if (rec) {
            const int64_t s = r->rec_pos;
            r->post = r->rec_post + s * BSN;
            r->L = r->rec_L + s * BSN;
            r->pre_src = s == 0 ? pre0 : r->rec_pre + (s - 1) * BSN;
            r->pre_rec = r->rec_pre + s * BSN;
        }
        ni_forward(r, r->inputs + t * BS * I);
        memcpy(r->outputs + t * BS * O, r->yout, sizeof(float) * B * O);
        output_error(r, t);
        update(r, cc);
        r->seed = next_seed(r->seed);
    }
    if (cc) {
        chip_chunk_flush(r, cc);
        free(chunk.pre);
    }
    if (rec && t1 > t0) memcpy(pre0, r->pre_rec, sizeof(float) * BN); /* the trace's home holds its latest value */
    r->post = post0; r->L = L0; r->pre_rec = pre0; r->pre_src = NULL;
}

/* s: batch elements b0 <= b < b1 of r (the steps touch only their own batch elements' state, records, traces and
   outputs), its readout gradients into g (O N + O floats, zero); at chip precision also its gradients of the
   other weights into gw (N N + N I + N floats, zero; else unused) */
static void batch_slice(Run *s, const Run *r, int64_t b0, int64_t b1, float *g, float *gw) {
    const int64_t N = r->N, I = r->I, O = r->O;
    *s = *r;
    s->B = b1 - b0;
    s->bs = r->B;
    s->b0 = r->b0 + b0;
    s->par_work = INT64_MAX; /* no nested parallel loops */
    float **rows_n[] = {&s->x, &s->z, &s->ref, &s->post, &s->act, &s->L, &s->drive, &s->pre_rec, &s->ro,
                        &s->rec_L, &s->rec_post, &s->rec_pre};
    for (size_t k = 0; k < sizeof rows_n / sizeof *rows_n; k++)
        if (*rows_n[k]) *rows_n[k] += b0 * N; /* the records are NULL at chip precision */
    s->y += b0 * O; s->yout += b0 * O; s->err += b0 * O; s->outputs += b0 * O;
    if (s->targets) s->targets += b0 * O;
    if (s->labels) s->labels += b0;
    s->inputs += b0 * I; s->pre_in += b0 * I;
    if (s->rec_pre_in) s->rec_pre_in += b0 * (I + 1);
    s->pre_bias += b0; s->ro_bias += b0; s->scale += b0;
    s->events += b0 * (N + 1); /* drive_events' B (N + 1) int64 of scratch per slice */
    s->g_out = g; s->g_bout = g + O * N;
    if (r->quant) { /* chip precision: the slice's trace codes, its own weight gradients */
        const int64_t cb = r->code_bytes;
        s->elig_rec = (char *)r->elig_rec + b0 * N * N * cb;
        s->elig_in = (char *)r->elig_in + b0 * N * I * cb;
        s->elig_bias = (char *)r->elig_bias + b0 * N * cb;
        s->g_rec = gw; s->g_in = gw + N * N; s->g_bias = gw + N * N + N * I;
    } else {
        s->g_in = s->g_rec = s->g_bias = NULL; /* not touched while recording */
        s->elig_rec = s->elig_in = s->elig_bias = NULL;
    }
}

/* Runs steps t0 <= t < t1 (run_steps). With more than one thread and enough work, while recording (the chunked
   update) or at chip precision (every trace rounded at every step), the batch is split over the threads, each
   running all the steps of its slice in one parallel region (one barrier per call, none per step); the gradients
   are summed per slice, then added in slice order (the same result for the same thread count; chip precision
   draws its random words by whole-batch index, so the codes are the same for any count). Returns the number of
   slices (1: not split). */
int64_t ni_run(Run *r, int64_t t0, int64_t t1) {
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    nt = nt < r->B ? nt : (int)r->B;
    const int64_t N = r->N, I = r->I, O = r->O, go = O * N + O, gw = r->quant ? N * N + N * I + N : 0;
    const int splits = (r->rec_L && !r->quant) || (r->quant && r->full);
    const int split = splits && nt > 1 && (t1 - t0) * r->B * N * N >= 8 * r->par_work;
    float *part = split ? calloc((size_t)(nt * (go + gw)), sizeof(float)) : NULL;
    if (!part) {
        run_steps(r, t0, t1);
        return 1;
    }
    float *const part_w = part + (int64_t)nt * go; /* the weight gradients' parts (chip precision), after g_out's */
#pragma omp parallel num_threads(nt)
    {
        int t = 0, n = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        Run s;
        batch_slice(&s, r, r->B * t / n, r->B * (t + 1) / n, part + t * go, part_w + t * gw);
        run_steps(&s, t0, t1);
#pragma omp single nowait
        nt = n;
    }
    if (!r->quant) r->rec_pos += t1 - t0;
    for (int64_t t = t0; t < t1; t++) /* the seed run_steps advances once per step (the slices advanced copies) */
        r->seed = next_seed(r->seed);
    for (int t = 0; t < nt; t++) {
        const float *g = part + t * go, *w = part_w + t * gw;
        for (int64_t k = 0; k < O * N; k++) r->g_out[k] += g[k];
        for (int64_t o = 0; o < O; o++) r->g_bout[o] += g[O * N + o];
        if (!r->quant) continue;
        for (int64_t k = 0; k < N * N; k++) r->g_rec[k] += w[k];
        for (int64_t k = 0; k < N * I; k++) r->g_in[k] += w[N * N + k];
        for (int64_t k = 0; k < N; k++) r->g_bias[k] += w[N * N + N * I + k];
    }
    free(part);
    return nt;
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
    /* elements k are independent: threads own blocks of 2048 of them for every step (a block's 8 KB of each
       step's records stream better than 1 KB pieces 4 B N bytes apart: 0.45 -> 0.30 ms per Romo trial, B = 32,
       N = 256, K = 56, one AVX2 core) */
#pragma omp parallel for if (K * n * 4 >= r->par_work) schedule(static)
    for (int64_t k0 = 0; k0 < n; k0 += 2048) {
        const int64_t k1 = k0 + 2048 < n ? k0 + 2048 : n;
        float w = 1.0f;
        for (int64_t k = k0; k < k1; k++) c[k] = 0.0f; /* running Lf */
        for (int64_t s = K - 1; s >= 0; s--) {
            float *L = r->rec_L + s * n, *p = r->rec_post + s * n;
#pragma omp simd
            for (int64_t k = k0; k < k1; k++) {
                const float lf = L[k] + ed * c[k];
                c[k] = lf;
                L[k] = lf * p[k];
                p[k] *= w;
            }
            w *= ed;
        }
        for (int64_t k = k0; k < k1; k++) c[k] *= ed;
    }
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
            const float *e = (const float *)r->elig_rec + (b * N + j) * N;
            const float *ei = (const float *)r->elig_in + (b * N + j) * I;
#pragma omp simd
            for (int64_t i = 0; i < N; i++) gr[i] += cb * e[i];
            for (int64_t i = 0; i < I; i++) gi[i] += cb * ei[i];
            gb += cb * ((const float *)r->elig_bias)[b * N + j];
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
   the access pattern of a trace update (read + write each element once per pass). One parallel region for all
   passes: each thread streams its own slice (whole cache lines) every pass, with no barrier between passes. */
void ni_stream(float *a, int64_t n, int64_t reps) {
#pragma omp parallel if (n >= 65536)
    {
        int64_t i0 = 0, i1 = n;
#ifdef _OPENMP
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num(), lines = (n + 15) / 16;
        i0 = lines * t / nt * 16;
        i1 = lines * (t + 1) / nt * 16;
        i1 = i1 < n ? i1 : n;
#endif
        for (int64_t r = 0; r < reps; r++) {
#pragma omp simd
            for (int64_t i = i0; i < i1; i++) a[i] = 0.999f * a[i] + 0.001f;
            __asm__ volatile("" ::: "memory"); /* each pass goes through memory: no fusing of passes (unroll-and-jam) */
        }
    }
}

/* Random-word rate probe for the chip path's roofline (neuroinit.bench): n words of the counter-based generator
   of the integer traces (mix32(GOLD w ^ key), 16 lanes at a time where the vector kernel runs), xor-folded. */
uint32_t ni_random_words(int64_t n, uint32_t key) {
    uint32_t acc = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i k = _mm512_set1_epi32((int)key), step = _mm512_set1_epi32((int)(16 * GOLD));
    __m512i c = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                   _mm512_set1_epi32((int)GOLD));
    __m512i a = _mm512_setzero_si512();
    int64_t w = 0;
    for (; w + 16 <= n; w += 16, c = _mm512_add_epi32(c, step)) a = _mm512_xor_si512(a, mix32_v(_mm512_xor_si512(c, k)));
    acc = (uint32_t)_mm512_reduce_or_epi32(a);
    for (; w < n; w++) acc ^= mix32((uint32_t)w * GOLD ^ key);
#else
    for (int64_t w = 0; w < n; w++) acc ^= mix32((uint32_t)w * GOLD ^ key);
#endif
    return acc;
}

/* In-cache rate probe for the chip path's roofline (neuroinit.bench): ``reps`` updates of one row of ``n`` codes
   (``bytes`` each, n <= 4096: codes, presynaptic trace and gradient stay in L1/L2) through the same kernel as
   chip_elig, stochastic rounding, a post factor that keeps the codes moving; returns a checksum. */
float ni_chip_probe(int64_t reps, int64_t n, int64_t bytes) {
    static int16_t codes[4096];
    static float pre[4096], g[4096];
    n = n > 4096 ? 4096 : n;
    for (int64_t i = 0; i < n; i++) { codes[i] = 0; pre[i] = (float)(i % 13) * 0.25f; g[i] = 0.0f; }
    const int k = bytes == 1 ? 8 : 16;
    const float two_k = (float)(1 << k);
    for (int64_t t = 0; t < reps; t++) {
        RowQ q = {two_k * 0.9f, two_k * (t % 3 ? 0.7f : 0.0f) * 0.5f, two_k * -64.0f, two_k * 63.0f, 0.01f,
                  mix32((uint32_t)t), (uint32_t)t * row_words(n, k), k, 0, NULL, NULL, NULL, 0};
        chip_row(codes, (int)bytes, pre, n, &q, g, 0);
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += g[i];
    return sum;
}

int ni_abi(void) { return (int)sizeof(Run); }
