/* dsv4 native CPU kernels (x86-64, AVX-512 F/BW/DQ/VL or AVX2 + FMA + F16C): the inference hot spots of the
 * plain-PyTorch model, fused.
 *
 * Built once per machine by dsv4/kernels/build.py with the system C compiler (-O3 -fopenmp + one ISA's flags; one
 * library per ISA, picked at load from the CPU flags) and called through ctypes; the model keeps its PyTorch path when
 * this cannot be built. The vector code is written against simd.h (VL lanes: 16 with AVX-512, 8 with AVX2), so both
 * builds come from this one source. Each kernel computes what the PyTorch code at its call site computes, in fp32,
 * and is tested against it under each build (tests/model/test_kernels.py).
 *
 * Weights are read in place, row-major [N, K], in bf16 or fp32 (a bf16 weight is widened exactly); activations and
 * sums are fp32 (the wrappers widen bf16 activations). The KV cache (window ring, compressed entries, indexer keys)
 * is read in place in fp32 or bf16 (dtype codes DSV4_F32 = 0 / DSV4_BF16 = 1, simd.h). Up to 63 rows, one output
 * element is VL FMA lane sums over k (ascending) reduced in a fixed order, whatever the number of rows (so the two
 * builds differ only in summation order); from 64 rows the BLAS sgemm of torch's own library does the product when
 * available.
 *
 * Threads: OpenMP, sharing torch's libgomp (same soname, so one pool); the caller passes torch's thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* register blocking: MR token rows x NB weight rows of accumulators. AVX-512: 24 + NB weight vectors + one x vector
 * of 32 zmm. AVX2 keeps the same blocking though 24 accumulators exceed its 16 ymm (some live in L1): the weights,
 * read from memory once per MR rows, dominate (measured on the AVX2 build, 16 experts top-6: MR = 2 took 1.5x the time
 * of MR = 3 or 4 on 4 tokens, and MR = 3 or 4 1.3x that of MR = 6 on 16 tokens) */
#define MR 6 /* token rows per micro-kernel call */
#ifndef PF_ROWS
#define PF_ROWS 16 /* software prefetch distance, in weight rows (four blocks ahead) */
#endif
#define NB 4 /* weight rows per micro-kernel call */

/* the build's vector width in bits (512 or 256): lets the caller check which ISA build it loaded */
int dsv4_isa(void) { return DSV4_ISA_BITS; }

static inline vf load_f32(const float *p) { return vload(p); }
static inline vf load_f32_tail(const float *p, int64_t n) { return vload_tail(p, n); }

/* out[i, j] = dot(x[i, :], w[j, :]) for i < mr, j < nb (compile-time constants after inlining). Each dot is VL lane
 * sums over k (FMA, k ascending) reduced in a fixed order, so a result does not depend on the other rows. */
#define MICRO(NAME, WT, LOAD, LOAD_TAIL)                                                                            \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t ldx, const int mr, const WT *w,  \
                                                           int64_t ldw, const int nb, int64_t K, float *out,       \
                                                           int64_t ldo) {                                          \
        vf acc[MR][NB];                                                                                            \
        for (int i = 0; i < mr; i++)                                                                               \
            for (int j = 0; j < nb; j++) acc[i][j] = vzero();                                                      \
        int64_t k = 0;                                                                                             \
        for (; k + VL <= K; k += VL) {                                                                             \
            vf wv[NB];                                                                                             \
            for (int j = 0; j < nb; j++) {                                                                         \
                _mm_prefetch((const char *)(w + (j + PF_ROWS) * ldw + k), _MM_HINT_T0);                            \
                wv[j] = LOAD(w + j * ldw + k);                                                                     \
            }                                                                                                      \
            for (int i = 0; i < mr; i++) {                                                                         \
                vf xv = vload(x + i * ldx + k);                                                                    \
                for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);                               \
            }                                                                                                      \
        }                                                                                                          \
        if (k < K) {                                                                                               \
            vf wv[NB];                                                                                             \
            for (int j = 0; j < nb; j++) wv[j] = LOAD_TAIL(w + j * ldw + k, K - k);                                \
            for (int i = 0; i < mr; i++) {                                                                         \
                vf xv = vload_tail(x + i * ldx + k, K - k);                                                        \
                for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);                               \
            }                                                                                                      \
        }                                                                                                          \
        for (int i = 0; i < mr; i++) {                                                                             \
            if (nb == 4)                                                                                           \
                _mm_storeu_ps(out + i * ldo, vhsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));                  \
            else                                                                                                   \
                for (int j = 0; j < nb; j++) out[i * ldo + j] = vsum(acc[i][j]);                                   \
        }                                                                                                          \
    }

MICRO(micro_bf16, bf16, vload_bf16, vload_bf16_tail)
MICRO(micro_f32, float, load_f32, load_f32_tail)

/* all M rows against nb (<= NB) weight rows; mr and nb become constants in each switch arm */
#define ROWS(MICROFN, WT)                                                                                          \
    static inline __attribute__((always_inline)) void MICROFN##_nb(const float *x, int64_t M, int64_t K,           \
                                                                   const WT *w, const int nb, float *y,            \
                                                                   int64_t N) {                                    \
        int64_t i = 0;                                                                                             \
        for (; i + MR <= M; i += MR) MICROFN(x + i * K, K, MR, w, K, nb, K, y + i * N, N);                         \
        switch (M - i) {                                                                                           \
        case 5: MICROFN(x + i * K, K, 5, w, K, nb, K, y + i * N, N); break;                                        \
        case 4: MICROFN(x + i * K, K, 4, w, K, nb, K, y + i * N, N); break;                                        \
        case 3: MICROFN(x + i * K, K, 3, w, K, nb, K, y + i * N, N); break;                                        \
        case 2: MICROFN(x + i * K, K, 2, w, K, nb, K, y + i * N, N); break;                                        \
        case 1: MICROFN(x + i * K, K, 1, w, K, nb, K, y + i * N, N); break;                                        \
        default: break;                                                                                            \
        }                                                                                                          \
    }                                                                                                              \
    static void MICROFN##_block(const float *x, int64_t M, int64_t K, const WT *w, int nb, float *y, int64_t N) {   \
        switch (nb) {                                                                                              \
        case 4: MICROFN##_nb(x, M, K, w, 4, y, N); break;                                                          \
        case 3: MICROFN##_nb(x, M, K, w, 3, y, N); break;                                                          \
        case 2: MICROFN##_nb(x, M, K, w, 2, y, N); break;                                                          \
        default: MICROFN##_nb(x, M, K, w, 1, y, N); break;                                                         \
        }                                                                                                          \
    }

ROWS(micro_bf16, bf16)
ROWS(micro_f32, float)

/* Optional BLAS sgemm (Fortran interface, LP64), handed over by the Python side from torch's own library: for many
 * rows it beats the micro-kernels ~2x. NULL: the micro-kernels everywhere. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn blas_sgemm = NULL;
void dsv4_set_sgemm(void *fn) { blas_sgemm = (sgemm_fn)fn; }

#define BLAS_MIN_ROWS 64 /* fewer rows: the micro-kernels (decode); more: BLAS (prefill, many tokens per expert) */
#define BLAS_CHUNK 256   /* bf16 weight rows widened to fp32 per BLAS call */

/* y[:, n0:n0+n] = x[M, K] @ w[n, K]^T with fp32 w, through BLAS (column-major: C[n, M] = w^T' x'). */
static void blas_nt(const float *x, int64_t M, int64_t K, const float *w, int64_t n, float *y, int64_t ldy) {
    int m_ = (int)n, n_ = (int)M, k_ = (int)K, lda = (int)K, ldb = (int)K, ldc = (int)ldy;
    float one = 1.0f, zero = 0.0f;
    blas_sgemm("T", "N", &m_, &n_, &k_, &one, w, &lda, x, &ldb, &zero, y, &ldc);
}

#define MC 96 /* token rows per cache block: x[MC, K] stays in L2 while every weight block passes over it */

/* dst[0..n) = src widened to fp32 (exact) */
static void widen_bf16(const bf16 *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore(dst + i, vload_bf16(src + i));
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* weight block b (rows b*NB ..) of one row block; scratch: NB*K floats when a bf16 W is widened (mc > MR) */
static inline void linear_block(int64_t b, const float *xm, int64_t mc, int64_t K, const void *w, int w_bf16,
                                int64_t N, float *ym, float *scratch) {
    int64_t n0 = b * NB;
    int nb = (int)(N - n0 < NB ? N - n0 : NB);
    if (!w_bf16) {
        micro_f32_block(xm, mc, K, (const float *)w + n0 * K, nb, ym + n0, N);
    } else if (scratch) {
        widen_bf16((const bf16 *)w + n0 * K, nb * K, scratch);
        micro_f32_block(xm, mc, K, scratch, nb, ym + n0, N);
    } else {
        micro_bf16_block(xm, mc, K, (const bf16 *)w + n0 * K, nb, ym + n0, N);
    }
}

/* y[M, N] = x[M, K] @ W[N, K]^T with W row-major in bf16 (w_bf16) or fp32. Rows in blocks of MC (sequential), weight
 * rows in blocks of NB (parallel when the work is worth a fork). Many rows and a bf16 W: each weight block is widened
 * to fp32 once per row block (scratch) instead of in every micro-kernel call; same values, same FMA order. */
void dsv4_linear(const float *x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N, float *y, int nthreads) {
    if (blas_sgemm && M >= BLAS_MIN_ROWS && M < (1 << 30) && K < (1 << 30) && N < (1 << 30)) {
        if (!w_bf16) {
            blas_nt(x, M, K, (const float *)w, N, y, N);
            return;
        }
        int64_t rows = N < BLAS_CHUNK ? N : BLAS_CHUNK;
        float *wf = malloc((size_t)rows * K * sizeof(float));
        for (int64_t n0 = 0; n0 < N; n0 += BLAS_CHUNK) {
            int64_t n = N - n0 < BLAS_CHUNK ? N - n0 : BLAS_CHUNK;
            widen_bf16((const bf16 *)w + n0 * K, n * K, wf);
            blas_nt(x, M, K, wf, n, y + n0, N);
        }
        free(wf);
        return;
    }
    int64_t nblocks = (N + NB - 1) / NB;
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        int64_t mc = M - m0 < MC ? M - m0 : MC;
        const float *xm = x + m0 * K;
        float *ym = y + m0 * N;
        int widen = w_bf16 && mc > MR;
        if (nthreads > 1 && nblocks > 1 && mc * N * K >= (1 << 16)) {
#pragma omp parallel num_threads(nthreads)
            {
                float *scratch = widen ? (float *)malloc((size_t)NB * K * sizeof(float) + 64) : NULL;
#pragma omp for schedule(static)
                for (int64_t b = 0; b < nblocks; b++) linear_block(b, xm, mc, K, w, w_bf16, N, ym, scratch);
                free(scratch);
            }
        } else { /* no thread team: cheap, also from inside another kernel's parallel region */
            float *scratch = widen ? (float *)malloc((size_t)NB * K * sizeof(float) + 64) : NULL;
            for (int64_t b = 0; b < nblocks; b++) linear_block(b, xm, mc, K, w, w_bf16, N, ym, scratch);
            free(scratch);
        }
    }
}

/* ---------------------------------------------------------------- routed + shared experts (model/moe.py) */

/* g[i] = r * (silu(min(g, L)) * clamp(u, -L, L)) (r = 1: no routing weight; L <= 0: no clamp), as Expert.forward */
static inline vf swiglu_vec(vf gi, vf ui, float limit, vf rv) {
    if (limit > 0) {
        gi = vmin(gi, vset1(limit));
        ui = vmin(vmax(ui, vset1(-limit)), vset1(limit));
    }
    vf silu = vdiv(gi, vadd(vset1(1.0f), vexp(vsub(vzero(), gi))));
    return vmul(rv, vmul(silu, ui)); /* weight before w2 */
}
static void swiglu(float *g, const float *u, int64_t n, float limit, float r) {
    vf rv = vset1(r);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore(g + i, swiglu_vec(vload(g + i), vload(u + i), limit, rv));
    if (i < n) vstore_tail(g + i, swiglu_vec(vload_tail(g + i, n - i), vload_tail(u + i, n - i), limit, rv), n - i);
}

/* One expert (Expert.forward) on `cnt` rows: h = rw * (silu(min(g, L)) * clamp(u, -L, L)), out = h @ w2^T, with
 * g = xs @ w1^T, u = xs @ w3^T. rw NULL: the shared expert (no routing weight). g, u: [cnt, F] scratch. */
static void expert_rows(const float *xs, int64_t cnt, int64_t D, int64_t F, const void *w1, const void *w3,
                        const void *w2, int w_bf16, const float *rw, float limit, float *g, float *u, float *out,
                        int nthreads) {
    dsv4_linear(xs, cnt, D, w1, w_bf16, F, g, nthreads);
    dsv4_linear(xs, cnt, D, w3, w_bf16, F, u, nthreads);
    for (int64_t i = 0; i < cnt; i++) swiglu(g + i * F, u + i * F, F, limit, rw ? rw[i] : 1.0f);
    dsv4_linear(g, cnt, F, w2, w_bf16, D, out, nthreads);
}

/* y[T, D] = routed experts + shared expert, as MoE.forward: each token's expert outputs summed in ascending expert id
 * (fp32, from zero), then the shared expert's output added. ids/weights [T, k]; w1s/w3s/w2s: E weight pointers
 * ([F, D], [F, D], [D, F]); shared_*: NULL when the model has none. Experts run in parallel (one thread each, pairs
 * grouped by expert); the sums are then formed per token in the fixed order. Returns 0, or -1 (nothing written)
 * when an id is outside [0, E). */
int dsv4_moe(const float *x, int64_t T, int64_t D, int64_t F, int64_t Fs, const int64_t *ids, const float *weights,
             int64_t k, int64_t E, const void *const *w1s, const void *const *w3s, const void *const *w2s,
             const void *shared_w1, const void *shared_w3, const void *shared_w2, int w_bf16, float limit, float *y,
             int nthreads) {
    int64_t pairs = T * k;
    for (int64_t i = 0; i < pairs; i++)
        if (ids[i] < 0 || ids[i] >= E) return -1;
    int64_t *first = calloc((size_t)E + 1, sizeof(int64_t)), *fill = malloc((size_t)E * sizeof(int64_t));
    int64_t *order = malloc((size_t)pairs * sizeof(int64_t)), *where = malloc((size_t)pairs * sizeof(int64_t));
    float *outs = malloc((size_t)pairs * D * sizeof(float));
    for (int64_t i = 0; i < pairs; i++) first[ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) first[e + 1] += first[e];
    memcpy(fill, first, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < pairs; i++) { /* stable: token order inside an expert */
        where[i] = fill[ids[i]]++;
        order[where[i]] = i;
    }
#pragma omp parallel num_threads(nthreads > 1 ? nthreads : 1)
    {
        int64_t cap = 0;
        for (int64_t e = 0; e < E; e++) cap = first[e + 1] - first[e] > cap ? first[e + 1] - first[e] : cap;
        float *xs = malloc((size_t)cap * D * sizeof(float) + 64), *rw = malloc((size_t)cap * sizeof(float) + 64);
        float *g = malloc((size_t)cap * F * sizeof(float) + 64), *u = malloc((size_t)cap * F * sizeof(float) + 64);
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t a = first[e], cnt = first[e + 1] - a;
            if (cnt == 0) continue;
            for (int64_t j = 0; j < cnt; j++) {
                memcpy(xs + j * D, x + (order[a + j] / k) * D, (size_t)D * sizeof(float));
                rw[j] = weights[order[a + j]];
            }
            expert_rows(xs, cnt, D, F, w1s[e], w3s[e], w2s[e], w_bf16, rw, limit, g, u, outs + a * D, 1);
        }
        free(xs); free(rw); free(g); free(u);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *yt = y + t * D;
            memset(yt, 0, (size_t)D * sizeof(float));
            int64_t last = -1;
            for (int64_t n = 0; n < k; n++) { /* the token's pairs by ascending expert id (k is small) */
                int64_t best = -1;
                for (int64_t j = 0; j < k; j++) {
                    int64_t pr = t * k + j;
                    if (where[pr] > last && (best < 0 || where[pr] < where[best])) best = pr;
                }
                last = where[best];
                const float *o = outs + where[best] * D;
                for (int64_t d = 0; d < D; d++) yt[d] += o[d];
            }
        }
    }
    if (shared_w1) {
        float *g = malloc((size_t)T * Fs * sizeof(float)), *u = malloc((size_t)T * Fs * sizeof(float));
        float *out = malloc((size_t)T * D * sizeof(float));
        expert_rows(x, T, D, Fs, shared_w1, shared_w3, shared_w2, w_bf16, NULL, limit, g, u, out, nthreads);
        for (int64_t i = 0; i < T * D; i++) y[i] += out[i];
        free(g); free(u); free(out);
    }
    free(first); free(fill); free(order); free(where); free(outs);
    return 0;
}

/* ---------------------------------------------------------------- mHC (model/hyper.py) */

/* a . b over n floats: VL FMA lanes, reduced, then the tail */
static inline float dot(const float *a, const float *b, int64_t n) {
    vf acc = vzero();
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc = vfma(vload(a + i), vload(b + i), acc);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float sum_squares(const float *v, int64_t n) { return dot(v, v, n); }

/* x[r] = w * x[r] * rsqrt(mean(x[r]^2) + eps) for each of `rows` rows of width n (w NULL: no weight), in place */
static void rms_rows(float *x, int64_t rows, int64_t n, const float *w, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * n;
        float s = 1.0f / sqrtf(sum_squares(v, n) / (float)n + eps);
        if (w)
            for (int64_t i = 0; i < n; i++) v[i] = w[i] * (v[i] * s);
        else
            for (int64_t i = 0; i < n; i++) v[i] = v[i] * s;
    }
}

/* hc_pre fused with the sub-layer's RMSNorm: x [N, M, D] -> y = norm_w * RMS(sum_j pre_j x_j) [N, D], post [N, M],
 * comb [N, M, M] (Sinkhorn in the official order); fn [(2+M)*M, M*D] fp32; M <= 8. */
void dsv4_hc_pre(const float *x, int64_t N, int64_t M, int64_t D, const float *fn, const float *base,
                 const float *scale, int iters, float hc_eps, float norm_eps, const float *norm_w, float norm_eps2,
                 float *y, float *post, float *comb, int nthreads) {
    int64_t K = (2 + M) * M, MD = M * D;
    float *mixes = malloc((size_t)N * K * sizeof(float));
    dsv4_linear(x, N, MD, fn, 0, K, mixes, nthreads); /* [N, K] = x fn^T, before the per-token RMS factor */
    int par = nthreads > 1 && N >= 4;
#pragma omp parallel for schedule(static) num_threads(par ? nthreads : 1)
    for (int64_t t = 0; t < N; t++) {
        const float *xt = x + t * MD;
        float *mix = mixes + t * K;
        float r = 1.0f / sqrtf(sum_squares(xt, MD) / (float)MD + norm_eps);
        for (int64_t c = 0; c < K; c++) mix[c] *= r;
        float pre[8];
        for (int64_t j = 0; j < M; j++) {
            pre[j] = 1.0f / (1.0f + expf(-(mix[j] * scale[0] + base[j]))) + hc_eps;
            post[t * M + j] = 2.0f / (1.0f + expf(-(mix[M + j] * scale[1] + base[M + j])));
        }
        float *cm = comb + t * M * M;
        for (int64_t j = 0; j < M; j++) { /* row softmax + eps */
            float mx = -INFINITY, s = 0.0f;
            for (int64_t c = 0; c < M; c++) {
                cm[j * M + c] = mix[2 * M + j * M + c] * scale[2] + base[2 * M + j * M + c];
                mx = cm[j * M + c] > mx ? cm[j * M + c] : mx;
            }
            for (int64_t c = 0; c < M; c++) s += (cm[j * M + c] = expf(cm[j * M + c] - mx));
            for (int64_t c = 0; c < M; c++) cm[j * M + c] = cm[j * M + c] / s + hc_eps;
        }
        for (int it = 0; it < iters; it++) {
            if (it > 0)
                for (int64_t j = 0; j < M; j++) { /* rows */
                    float s = 0.0f;
                    for (int64_t c = 0; c < M; c++) s += cm[j * M + c];
                    s += hc_eps;
                    for (int64_t c = 0; c < M; c++) cm[j * M + c] /= s;
                }
            for (int64_t c = 0; c < M; c++) { /* columns */
                float s = 0.0f;
                for (int64_t j = 0; j < M; j++) s += cm[j * M + c];
                s += hc_eps;
                for (int64_t j = 0; j < M; j++) cm[j * M + c] /= s;
            }
        }
        float *yt = y + t * D;
        for (int64_t d = 0; d < D; d++) yt[d] = pre[0] * xt[d];
        for (int64_t j = 1; j < M; j++)
            for (int64_t d = 0; d < D; d++) yt[d] += pre[j] * xt[j * D + d];
        rms_rows(yt, 1, D, norm_w, norm_eps2);
    }
    free(mixes);
}

/* ---------------------------------------------------------------- decode attention (model/attention.py) */

/* a key of the attention: fp32 or bf16 (bf: widened exactly as it is loaded; the fp32 code is the original one) */
static inline vf load_key(const void *key, int bf, int64_t i) {
    return bf ? vload_bf16((const bf16 *)key + i) : vload((const float *)key + i);
}

/* a . key over n: dot() for an fp32 key, the same order for a bf16 one */
static inline float dot_key(const float *a, const void *key, int bf, int64_t n) {
    if (!bf) return dot(a, (const float *)key, n);
    const bf16 *k = key;
    vf acc = vzero();
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc = vfma(vload(a + i), vload_bf16(k + i), acc);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * bf16_to_f32(k[i]);
    return s;
}

/* o[0..c) += p * key */
static inline void axpy_key(float *o, float p, const void *key, int bf, int64_t c) {
    if (!bf) {
        const float *k = key;
        for (int64_t i = 0; i < c; i++) o[i] += p * k[i];
        return;
    }
    const bf16 *k = key;
    vf pv = vset1(p);
    int64_t i = 0;
    for (; i + VL <= c; i += VL) vstore(o + i, vfma(pv, vload_bf16(k + i), vload(o + i)));
    for (; i < c; i++) o[i] += p * bf16_to_f32(k[i]);
}

/* Attention of a chunk of S query tokens per sequence (S = 1: decode), as attention.sparse_attention computes it:
 * out[b, s, h] = softmax([q.k for the window keys, q.k for the compressed keys, sink[h]]) without the sink column,
 * times the same keys (K = V: one shared KV head, so each key is read once for all heads). Query s of sequence b sits
 * at t = start[b] + s (s < len[b]; later rows are padding and get zeros). Window keys: positions max(0, t-w+1) .. t,
 * from the chunk's own keys kv [B, S, c] for positions >= start[b], else from the ring (row slot[b] * w + p % w,
 * written before this chunk). Compressed keys: rows ent_rows[b, s, 0..E) of `entries` [*, c], -1 = none. The ring
 * and the entries are fp32 or bf16 (ring_dt, ent_dt: DSV4_F32 / DSV4_BF16); a bf16 key is read as stored and widened
 * exactly in registers (half the bytes of an fp32 cache), so the sums are the fp32 ones either way. */
void dsv4_chunk_attn(const float *q, const float *kv, int64_t B, int64_t S, int64_t H, int64_t c, const int64_t *start,
                     const int64_t *len, const void *ring, int ring_dt, int64_t w, const int64_t *slots,
                     const void *entries, int ent_dt, const int64_t *ent_rows, int64_t E, const float *sink,
                     float scale, float *out, int nthreads) {
    int par = nthreads > 1 && B * S >= 2;
    int64_t es_ring = ring_dt == DSV4_BF16 ? 2 : 4, es_ent = ent_dt == DSV4_BF16 ? 2 : 4;
#pragma omp parallel num_threads(par ? nthreads : 1)
    {
        float *logit = malloc((size_t)H * (w + E) * sizeof(float) + 64), *mx = malloc((size_t)H * sizeof(float));
        const void **keys = malloc((size_t)(w + E) * sizeof(void *));
        char *kbf = malloc((size_t)(w + E) + 64); /* per key: 1 = bf16 (read as stored), 0 = fp32 */
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t s = 0; s < S; s++) {
                float *ob = out + (b * S + s) * H * c;
                memset(ob, 0, (size_t)H * c * sizeof(float));
                if (s >= len[b]) continue;
                int64_t t = start[b] + s, nk = 0, p0 = t - w + 1 < 0 ? 0 : t - w + 1;
                for (int64_t p = p0; p <= t; p++, nk++) {
                    int own = p >= start[b];
                    keys[nk] = own ? (const void *)(kv + (b * S + p - start[b]) * c)
                                   : (const char *)ring + (slots[b] * w + p % w) * c * es_ring;
                    kbf[nk] = !own && ring_dt == DSV4_BF16;
                }
                const int64_t *rows = ent_rows ? ent_rows + (b * S + s) * E : NULL;
                for (int64_t e = 0; e < E; e++) {
                    if (rows[e] < 0) continue;
                    keys[nk] = (const char *)entries + rows[e] * c * es_ent;
                    kbf[nk++] = ent_dt == DSV4_BF16;
                }
                const float *qb = q + (b * S + s) * H * c;
                for (int64_t h = 0; h < H; h++) mx[h] = sink[h];
                for (int64_t j = 0; j < nk; j++) {
                    int64_t h = 0;
                    const void *key = keys[j];
                    int bf = kbf[j];
                    if (c % VL == 0)
                        for (; h + 4 <= H; h += 4) { /* four heads per pass: one key load, one 4-way sum */
                            const float *q0 = qb + h * c;
                            vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
                            for (int64_t i = 0; i < c; i += VL) {
                                vf kvv = load_key(key, bf, i);
                                a0 = vfma(vload(q0 + i), kvv, a0);
                                a1 = vfma(vload(q0 + c + i), kvv, a1);
                                a2 = vfma(vload(q0 + 2 * c + i), kvv, a2);
                                a3 = vfma(vload(q0 + 3 * c + i), kvv, a3);
                            }
                            float d4[4];
                            _mm_storeu_ps(d4, vhsum4(a0, a1, a2, a3));
                            for (int u = 0; u < 4; u++) {
                                float l = logit[(h + u) * nk + j] = d4[u] * scale;
                                mx[h + u] = l > mx[h + u] ? l : mx[h + u];
                            }
                        }
                    for (; h < H; h++) {
                        float l = logit[h * nk + j] = dot_key(qb + h * c, key, bf, c) * scale;
                        mx[h] = l > mx[h] ? l : mx[h];
                    }
                }
                for (int64_t h = 0; h < H; h++) {
                    float *lh = logit + h * nk, den = expf(sink[h] - mx[h]);
                    for (int64_t j = 0; j < nk; j++) den += (lh[j] = expf(lh[j] - mx[h]));
                    for (int64_t j = 0; j < nk; j++) lh[j] /= den;
                }
                for (int64_t j = 0; j < nk; j++)
                    for (int64_t h = 0; h < H; h++) axpy_key(ob + h * c, logit[h * nk + j], keys[j], kbf[j], c);
            }
        free(logit);
        free(mx);
        free(keys);
        free(kbf);
    }
}

/* ---------------------------------------------------------------- attention projections (model/attention.py) */

/* interleaved RoPE on the last 2 * half dims of each of `rows` vectors of width n; cs/sn [half] (sign -1: inverse) */
static void rope_rows(float *x, int64_t rows, int64_t n, const float *cs, const float *sn, int64_t half, float sign) {
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * n + (n - 2 * half);
        for (int64_t j = 0; j < half; j++) {
            float x0 = v[2 * j], x1 = v[2 * j + 1], s = sign * sn[j];
            v[2 * j] = x0 * cs[j] - x1 * s;
            v[2 * j + 1] = x0 * s + x1 * cs[j];
        }
    }
}

/* Attention inputs for B tokens, as Attention.forward computes them: qr = q_norm(x wq_a^T) [B, Q];
 * q = rope(rms(qr wq_b^T per head)) [B, H, c]; kv = rope(kv_norm(x wkv^T)) [B, c]. cos/sin [B, half]. Weights fp32
 * or bf16 (one flag for all three). */
void dsv4_attn_in(const float *x, int64_t B, int64_t D, const void *wq_a, int64_t Q, const float *q_norm_w,
                  const void *wq_b, int64_t H, int64_t c, const void *wkv, const float *kv_norm_w, const float *cos,
                  const float *sin, int64_t half, float eps, int w_bf16, float *qr, float *q, float *kv,
                  int nthreads) {
    dsv4_linear(x, B, D, wq_a, w_bf16, Q, qr, nthreads);
    rms_rows(qr, B, Q, q_norm_w, eps);
    dsv4_linear(qr, B, Q, wq_b, w_bf16, H * c, q, nthreads);
    dsv4_linear(x, B, D, wkv, w_bf16, c, kv, nthreads);
    for (int64_t b = 0; b < B; b++) {
        rms_rows(q + b * H * c, H, c, NULL, eps);
        rope_rows(q + b * H * c, H, c, cos + b * half, sin + b * half, half, 1.0f);
        rms_rows(kv + b * c, 1, c, kv_norm_w, eps);
        rope_rows(kv + b * c, 1, c, cos + b * half, sin + b * half, half, 1.0f);
    }
}

/* Attention output: inverse RoPE on o [B, H, c] (in place), the grouped low-rank wo_a (group g: heads
 * g*H/G .. (g+1)*H/G - 1 against rows g*R .. (g+1)*R - 1 of wo_a [G*R, H*c/G]), then wo_b [D, G*R] -> y [B, D]. */
void dsv4_attn_out(float *o, int64_t B, int64_t H, int64_t c, const float *cos, const float *sin, int64_t half,
                   const void *wo_a, int64_t G, int64_t R, const void *wo_b, int64_t D, int w_bf16, float *y,
                   int nthreads) {
    int64_t gw = H * c / G, es = w_bf16 ? 2 : 4;
    float *xg = malloc((size_t)B * gw * sizeof(float)), *og = malloc((size_t)B * R * sizeof(float));
    float *mid = malloc((size_t)B * G * R * sizeof(float));
    for (int64_t b = 0; b < B; b++) rope_rows(o + b * H * c, H, c, cos + b * half, sin + b * half, half, -1.0f);
    for (int64_t g = 0; g < G; g++) {
        for (int64_t b = 0; b < B; b++) memcpy(xg + b * gw, o + b * H * c + g * gw, (size_t)gw * sizeof(float));
        dsv4_linear(xg, B, gw, (const char *)wo_a + g * R * gw * es, w_bf16, R, og, nthreads);
        for (int64_t b = 0; b < B; b++) memcpy(mid + (b * G + g) * R, og + b * R, (size_t)R * sizeof(float));
    }
    dsv4_linear(mid, B, G * R, wo_b, w_bf16, D, y, nthreads);
    free(xg); free(og); free(mid);
}

/* hc_post: out[t, k, :] = post[t, k] * f[t, :] + sum_j comb[t, j, k] * res[t, j, :] (the sum over j ascending). */
void dsv4_hc_post(const float *f, const float *res, const float *post, const float *comb, int64_t N, int64_t M,
                  int64_t D, float *out, int nthreads) {
    int par = nthreads > 1 && N >= 4;
#pragma omp parallel for schedule(static) num_threads(par ? nthreads : 1)
    for (int64_t t = 0; t < N; t++)
        for (int64_t k = 0; k < M; k++) {
            float *o = out + (t * M + k) * D;
            const float *cm = comb + t * M * M, *ft = f + t * D;
            for (int64_t d = 0; d < D; d++) o[d] = cm[k] * res[t * M * D + d];
            for (int64_t j = 1; j < M; j++) {
                const float *rj = res + (t * M + j) * D;
                float c = cm[j * M + k];
                for (int64_t d = 0; d < D; d++) o[d] += c * rj[d];
            }
            float p = post[t * M + k];
            for (int64_t d = 0; d < D; d++) o[d] = p * ft[d] + o[d];
        }
}

/* ---------------------------------------------------------------- Lightning Indexer selection (model/indexer.py) */

typedef struct {
    float s;
    int64_t i;
} scored;

/* descending score, then ascending id */
static int scored_cmp(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s < y->s ? 1 : -1;
    return x->i < y->i ? -1 : (x->i > y->i);
}

/* reorder a[0..n) so that its k best (scored_cmp order) come first, in any order (quickselect) */
static void select_best(scored *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        scored pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (scored_cmp(&a[i], &pivot) < 0) i++;
            while (scored_cmp(&a[j], &pivot) > 0) j--;
            if (i <= j) {
                scored t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* Score the visible entries e < n of query b: sc[e] = (sum_h w[b, h] * relu(q[b, h] . key_e), e), keys read in place
 * (entry e of query b is row (page * (P / r) + (e * r % P) / r) of `keys` [*, I] with page = tables[t, e * r / P],
 * t = b / per_seq the query's sequence;
 * fp32 or bf16 per keys_dt, a bf16 key widened exactly into `wide`). Entries [e0, e1) only: callers split the work. */
static void index_scores(const float *q, const float *w, int64_t b, int64_t H, int64_t I, const void *keys,
                         int keys_dt, const int64_t *tables, int64_t ncols, int64_t per_seq, int64_t ratio,
                         int64_t page_size, int64_t e0, int64_t e1, scored *sc, float *wide) {
    int64_t per_page = page_size / ratio, es = keys_dt == DSV4_BF16 ? 2 : 4;
    const int64_t *row = tables + (b / per_seq) * ncols;
    for (int64_t e = e0; e < e1; e++) {
        int64_t page = row[e * ratio / page_size];
        const char *src = (const char *)keys + (page * per_page + (e * ratio % page_size) / ratio) * I * es;
        const float *key = (const float *)src;
        if (keys_dt == DSV4_BF16) {
            widen_bf16((const bf16 *)src, I, wide);
            key = wide;
        }
        float s = 0.0f;
        for (int64_t h = 0; h < H; h++) {
            float d = dot(q + (b * H + h) * I, key, I);
            s += (d > 0.0f ? d : 0.0f) * w[b * H + h];
        }
        sc[e].s = s;
        sc[e].i = e;
    }
}

/* top[b, 0..k) = the k best of sc[0..n), best first (descending score, then ascending id), -1 past n */
static void index_best(scored *sc, int64_t n, int64_t k, int64_t *top) {
    int64_t m = n < k ? n : k;
    if (n > k) select_best(sc, n, k);
    qsort(sc, (size_t)m, sizeof(scored), scored_cmp);
    for (int64_t j = 0; j < k; j++) top[j] = j < m ? sc[j].i : -1;
}

/* Indexer.select for B queries (decode: one per sequence; a prefill chunk: per_seq consecutive queries share a
 * sequence's block-table row, each with its own visible count): score_e = sum_h w[b, h] * relu(q[b, h] . key_e) over the visible entries
 * e < vis[b]; top[b, 0..k) = the k best ids, best first, -1 past the visible count. Few queries: the threads split
 * each query's entries; many (B >= 2 x threads): they split the queries. */
void dsv4_indexer_topk(const float *q, const float *w, int64_t B, int64_t H, int64_t I, const void *keys, int keys_dt,
                       const int64_t *tables, int64_t ncols, int64_t per_seq, int64_t ratio, int64_t page_size,
                       const int64_t *vis, int64_t k, int64_t *top, int nthreads) {
    int64_t nmax = 1;
    for (int64_t b = 0; b < B; b++) nmax = vis[b] > nmax ? vis[b] : nmax;
    if (nthreads > 1 && B >= 2 * nthreads) {
#pragma omp parallel num_threads(nthreads)
        {
            scored *sc = malloc((size_t)nmax * sizeof(scored));
            float *wide = malloc((size_t)I * sizeof(float) + 64);
#pragma omp for schedule(dynamic, 4)
            for (int64_t b = 0; b < B; b++) {
                index_scores(q, w, b, H, I, keys, keys_dt, tables, ncols, per_seq, ratio, page_size, 0, vis[b], sc,
                             wide);
                index_best(sc, vis[b], k, top + b * k);
            }
            free(wide);
            free(sc);
        }
        return;
    }
    scored *sc = malloc((size_t)nmax * sizeof(scored));
    for (int64_t b = 0; b < B; b++) {
        int64_t n = vis[b];
        int par = nthreads > 1 && n * H * I >= (1 << 15);
#pragma omp parallel num_threads(par ? nthreads : 1)
        {
            float *wide = malloc((size_t)I * sizeof(float) + 64);
#pragma omp for schedule(static)
            for (int64_t e = 0; e < n; e++)
                index_scores(q, w, b, H, I, keys, keys_dt, tables, ncols, per_seq, ratio, page_size, e, e + 1, sc,
                             wide);
            free(wide);
        }
        index_best(sc, n, k, top + b * k);
    }
    free(sc);
}

/* ---------------------------------------------------------------- compressor decode update (model/compressor.py) */

/* Compressor.project + group_entries for one new token per sequence (position pos[b]), as the PyTorch path does it:
 * kv = x wkv^T, z = x wgate^T + ape[pos % r] ([B, C], C = coff * c); the token's row goes to the slot's tail state
 * (rows [off + pos % r], off = r when overlapping); when it completes its block (pos + 1 divisible by r) the block is
 * pooled instead: per channel a softmax over the gate values of its r rows (overlap: 2r, the previous block's [:c]
 * half, from state rows [0, r), then this block's [c:] half) weights the values; the entry is RMS-normed (norm_w),
 * RoPE-rotated at position (pos / r) * r (cos/sin [B, half]) and written to its page row; an overlapping compressor
 * then keeps the block's rows as state rows [0, r) for the next entry. state: [slots, 2, rows, C] (kv, z) fp32;
 * wkv/wgate fp32 or bf16 (w_dt); pages fp32 or bf16 (pages_dt: the fp32 entry rounded to nearest even once, as the
 * PyTorch path's .to(pages.dtype)). */
void dsv4_compress_decode(const float *x, int64_t B, int64_t D, const void *wkv, const void *wgate, int w_dt,
                          const float *ape, int64_t C, int64_t c, int64_t r, int overlap, const int64_t *pos,
                          const int64_t *slots, float *state, int64_t rows, const float *norm_w, float eps,
                          const float *cos, const float *sin, int64_t half, void *pages, int pages_dt,
                          const int64_t *tables, int64_t ncols, int64_t page_size, int nthreads) {
    float *kv = malloc((size_t)B * C * sizeof(float)), *z = malloc((size_t)B * C * sizeof(float));
    float *pooled = malloc((size_t)c * sizeof(float));
    dsv4_linear(x, B, D, wkv, w_dt == DSV4_BF16, C, kv, nthreads);
    dsv4_linear(x, B, D, wgate, w_dt == DSV4_BF16, C, z, nthreads);
    int64_t off = overlap ? r : 0, nslot = overlap ? 2 * r : r;
    float *wts = malloc((size_t)nslot * sizeof(float));
    const float **vk = malloc((size_t)nslot * sizeof(float *)), **vz = malloc((size_t)nslot * sizeof(float *));
    for (int64_t b = 0; b < B; b++) {
        int64_t p = pos[b];
        float *kvb = kv + b * C, *zb = z + b * C;
        const float *a = ape + (p % r) * C;
        for (int64_t i = 0; i < C; i++) zb[i] += a[i];
        float *st_kv = state + slots[b] * 2 * rows * C, *st_z = st_kv + rows * C;
        if ((p + 1) % r != 0) { /* the block goes on: remember the token */
            memcpy(st_kv + (off + p % r) * C, kvb, (size_t)C * sizeof(float));
            memcpy(st_z + (off + p % r) * C, zb, (size_t)C * sizeof(float));
            continue;
        }
        int64_t entry = p / r, n = 0, col = overlap ? c : 0;
        if (overlap && entry > 0) /* the previous block's [:c] half */
            for (int64_t j = 0; j < r; j++, n++) {
                vk[n] = st_kv + j * C;
                vz[n] = st_z + j * C;
            }
        for (int64_t j = 0; j < r; j++, n++) { /* this block (its last row is the new token) */
            vk[n] = (j == r - 1 ? kvb : st_kv + (off + j) * C) + col;
            vz[n] = (j == r - 1 ? zb : st_z + (off + j) * C) + col;
        }
        for (int64_t ch = 0; ch < c; ch++) {
            float mx = -INFINITY, den = 0.0f, acc = 0.0f;
            for (int64_t j = 0; j < n; j++) mx = vz[j][ch] > mx ? vz[j][ch] : mx;
            for (int64_t j = 0; j < n; j++) den += (wts[j] = expf(vz[j][ch] - mx));
            for (int64_t j = 0; j < n; j++) acc += (wts[j] / den) * vk[j][ch];
            pooled[ch] = acc;
        }
        rms_rows(pooled, 1, c, norm_w, eps);
        rope_rows(pooled, 1, c, cos + b * half, sin + b * half, half, 1.0f);
        int64_t page = tables[b * ncols + entry * r / page_size];
        int64_t prow = page * (page_size / r) + (entry * r % page_size) / r;
        if (pages_dt == DSV4_BF16)
            for (int64_t i = 0; i < c; i++) ((bf16 *)pages)[prow * c + i] = f32_to_bf16(pooled[i]);
        else
            memcpy((float *)pages + prow * c, pooled, (size_t)c * sizeof(float));
        if (overlap) { /* this block becomes "the previous block" of the next entry */
            for (int64_t j = 0; j < r; j++) {
                memmove(st_kv + j * C, j == r - 1 ? kvb : st_kv + (off + j) * C, (size_t)C * sizeof(float));
                memmove(st_z + j * C, j == r - 1 ? zb : st_z + (off + j) * C, (size_t)C * sizeof(float));
            }
        }
    }
    free(kv); free(z); free(pooled); free(wts); free(vk); free(vz);
}

/* ---------------------------------------------------------------- greedy sampling (engine/sampler.py) */

/* first index k >= 0 of row[0..V) with row[k] == t (NaN: row[k] != row[k]), V when none */
static int64_t find_first(const float *row, int64_t V, float t, int nan) {
    int64_t k = 0;
    for (; k + VL <= V; k += VL) {
        vf v = vload(row + k);
        unsigned m = nan ? vnan_bits(v) : veq_bits(v, t);
        if (m) return k + __builtin_ctz(m);
    }
    for (; k < V; k++)
        if (nan ? row[k] != row[k] : row[k] == t) return k;
    return V;
}

/* out[i] = index of the first maximum of row i of x [M, V] (a NaN counts as the maximum, like torch.max): a vector
 * pass for the maximum (stopping at a NaN), then a vector search for its first index. */
void dsv4_argmax_rows(const float *x, int64_t M, int64_t V, int64_t *out, int nthreads) {
    int par = nthreads > 1 && M * V >= (1 << 16);
#pragma omp parallel for schedule(static) num_threads(par ? nthreads : 1)
    for (int64_t i = 0; i < M; i++) {
        const float *row = x + i * V;
        vf mx = vset1(-INFINITY);
        int nan = 0;
        int64_t j = 0;
        for (; j + VL <= V; j += VL) {
            vf v = vload(row + j);
            if (vnan_bits(v)) {
                nan = 1;
                break;
            }
            mx = vmax(mx, v);
        }
        float best = vmax_all(mx);
        for (; j < V && !nan; j++) {
            if (row[j] != row[j]) nan = 1;
            else if (row[j] > best) best = row[j];
        }
        int64_t k = find_first(row, V, best, nan);
        out[i] = k < V ? k : 0;
    }
}
