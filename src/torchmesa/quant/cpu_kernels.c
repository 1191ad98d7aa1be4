/* Fused CPU kernels for torchmesa's quantizer: one read of the activation for its group
 * statistics, one read plus one byte (or less) written per element to quantize, and the
 * reverse to dequantize. Built on first use by torchmesa/quant/cpu.py and called through
 * ctypes; every function is tested against quant/reference.py. Each exported function
 * (tm_*, at the end) takes one tm_call by pointer, whose fields the Python side fills by
 * name (quant/cpu_library.py mirrors the struct and checks its size when it loads).
 *
 * Codes are dense; the input is read either dense in memory order or through a strided
 * view (view_t) in the codes' order, so slices such as q, k, v cut from one projection are
 * served without a copy. Element i belongs to "mid" index
 *     m = (i / inner) % mid
 * and parameter m belongs to range group m / gs (gs > 1 only for channel groups: gs
 * consecutive channels share a range). The caller gives one shift and step per group;
 * the kernels expand them to one per m, so the inner loops see either a constant
 * (inner > 1) or a contiguous array of parameters (inner == 1) and vectorize. Statistics
 * come back per group as well, and the small per-group arithmetic around the kernels (the
 * step of a range, range checks, Mesa's running estimate) is here too: done in torch it
 * is a dozen tiny ops, and their fixed costs outweigh a kernel's on small tensors.
 *
 * Masks (a dropout mask {0, c}, a bool mask) are packed to one bit per element and back
 * (tm_pack_nonzero, tm_unpack_nonzero), bit for bit reference.pack_bits of x != 0.
 *
 * Numerics match the reference bit for bit: fp32 arithmetic, (x - shift) * inv rounded
 * half to even, clamp to [0, levels], zero kept distinct in zero-minimum groups, and
 * code * scale + shift with one rounding (fmaf, as torch.addcmul computes it). Built with
 * -ffp-contract=off so that no other expression is contracted.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Declares this thread's index in its team and the team's size (0 and 1 without OpenMP). */
#ifdef _OPENMP
#define TEAM(t, nt) int t = omp_get_thread_num(), nt = omp_get_num_threads()
#else
#define TEAM(t, nt) int t = 0, nt = 1
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, U8 = 3 }; /* U8: bool, each byte 0 or 1 */
#define BLOCK 4096 /* elements per work unit; a multiple of every codes-per-byte */
#define ROWS_BLOCK (4 * BLOCK) /* per-channel statistics: four whole rows up to BLOCK wide */

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;           /* round to nearest even */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r); /* NaN as torch writes it */
}

/* Load n elements of dtype from x (element offset i0) into fp32 buf. */
static inline void load(const void *x, int dtype, int64_t i0, int64_t n, float *buf) {
    if (dtype == F32) {
        memcpy(buf, (const float *)x + i0, (size_t)n * 4);
    } else if (dtype == BF16) {
        const uint16_t *p = (const uint16_t *)x + i0;
        for (int64_t k = 0; k < n; k++) buf[k] = bf16_to_f32(p[k]);
    } else if (dtype == U8) {
        const uint8_t *p = (const uint8_t *)x + i0;
        for (int64_t k = 0; k < n; k++) buf[k] = (float)p[k];
    } else {
        const _Float16 *p = (const _Float16 *)x + i0;
        int64_t k = 0;
#ifdef __F16C__ /* the compiler does not vectorize _Float16 conversions itself */
        for (; k + 8 <= n; k += 8)
            _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + k))));
#endif
        for (; k < n; k++) buf[k] = (float)p[k];
    }
}

static inline void store(void *out, int dtype, int64_t i0, int64_t n, const float *buf) {
    if (dtype == F32) {
        memcpy((float *)out + i0, buf, (size_t)n * 4);
    } else if (dtype == BF16) {
        uint16_t *p = (uint16_t *)out + i0;
        for (int64_t k = 0; k < n; k++) p[k] = f32_to_bf16(buf[k]);
    } else {
        _Float16 *p = (_Float16 *)out + i0;
        int64_t k = 0;
#ifdef __F16C__
        for (; k + 8 <= n; k += 8)
            _mm_storeu_si128((__m128i *)(p + k),
                             _mm256_cvtps_ph(_mm256_loadu_ps(buf + k), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; k < n; k++) p[k] = (_Float16)buf[k];
    }
}

/* A strided view read in the order of its dims (outermost first): sizes sz, element
 * strides st, nd of them. The caller passes nd == 0 for dense data read in memory order. */
typedef struct {
    int nd;
    const int64_t *sz, *st;
} view_t;

#define MAX_DIMS 8

static inline void load_run(const void *x, int dtype, int64_t off, int64_t s, int64_t n,
                            float *buf) {
    if (s == 1) { /* a contiguous run: the vectorized dense loads */
        load(x, dtype, off, n, buf);
        return;
    }
    if (dtype == F32) {
        const float *p = (const float *)x + off;
        for (int64_t j = 0; j < n; j++) buf[j] = p[j * s];
    } else if (dtype == BF16) {
        const uint16_t *p = (const uint16_t *)x + off;
        for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(p[j * s]);
    } else if (dtype == U8) {
        const uint8_t *p = (const uint8_t *)x + off;
        for (int64_t j = 0; j < n; j++) buf[j] = (float)p[j * s];
    } else {
        const _Float16 *p = (const _Float16 *)x + off;
        for (int64_t j = 0; j < n; j++) buf[j] = (float)p[j * s];
    }
}

/* Elements [i0, i0 + n) of x in the view's order, as fp32. */
static inline void load_view(const void *x, int dtype, view_t v, int64_t i0, int64_t n,
                             float *buf) {
    if (v.nd == 0) {
        load(x, dtype, i0, n, buf);
        return;
    }
    int64_t idx[MAX_DIMS], r = i0;
    for (int d = v.nd - 1; d >= 0; d--) {
        idx[d] = r % v.sz[d];
        r /= v.sz[d];
    }
    int last = v.nd - 1;
    for (int64_t k = 0; k < n;) {
        int64_t off = 0;
        for (int d = 0; d < v.nd; d++) off += idx[d] * v.st[d];
        int64_t run = v.sz[last] - idx[last];
        run = run < n - k ? run : n - k;
        load_run(x, dtype, off, v.st[last], run, buf + k);
        k += run;
        idx[last] += run;
        for (int d = last; d > 0 && idx[d] >= v.sz[d]; d--) {
            idx[d] = 0;
            idx[d - 1]++;
        }
    }
}

/* Elements [i0, i0 + n) of x in the view's order as fp32: the input itself where it is
 * dense fp32 (copying it to buf would be one more pass through the cache), else buf
 * filled from it. */
static inline const float *view_block(const void *x, int dtype, view_t v, int64_t i0,
                                      int64_t n, float *buf) {
    if (v.nd == 0 && dtype == F32) return (const float *)x + i0;
    load_view(x, dtype, v, i0, n, buf);
    return buf;
}

/* min / max of n floats; *nan set if any is NaN (min and max alone would skip it). The
 * flag is a float select so that the loop vectorizes. */
static inline void span(const float *v, int64_t n, float *lo, float *hi, int *nan) {
    float a = *lo, b = *hi, bad = 0.0f;
#pragma omp simd reduction(min : a) reduction(max : b, bad)
    for (int64_t k = 0; k < n; k++) {
        float t = v[k];
        a = t < a ? t : a;
        b = t > b ? t : b;
        bad = t != t ? 1.0f : bad;
    }
    *lo = a;
    *hi = b;
    *nan |= bad != 0.0f;
}

/* Fold nr partial (min, max) pairs, pair r belonging to parameter r % mid, into the min
 * and max of each group of gs parameters: ceil(mid / gs) of them. A NaN partial makes its
 * group NaN, as torch's reductions do (no comparison replaces a NaN once it is there). */
static void fold_groups(const float *lo_r, const float *hi_r, int64_t nr, int64_t mid,
                        int64_t gs, float *lo_g, float *hi_g) {
    if (nr == mid && gs == 1) { /* one pair per group already */
        memcpy(lo_g, lo_r, (size_t)nr * sizeof(float));
        memcpy(hi_g, hi_r, (size_t)nr * sizeof(float));
        return;
    }
    int64_t groups = (mid + gs - 1) / gs;
    for (int64_t g = 0; g < groups; g++) {
        lo_g[g] = INFINITY;
        hi_g[g] = -INFINITY;
    }
    for (int64_t r = 0, m = 0, g = 0, k = 0; r < nr; r++) { /* m = r % mid, g = m / gs */
        float a = lo_r[r], b = hi_r[r];
        if (a != a || b != b) {
            lo_g[g] = NAN;
            hi_g[g] = NAN;
        }
        lo_g[g] = a < lo_g[g] ? a : lo_g[g];
        hi_g[g] = b > hi_g[g] ? b : hi_g[g];
        if (++m == mid) {
            m = g = k = 0;
        } else if (++k == gs) {
            k = 0;
            g++;
        }
    }
}

/* One value per parameter from one per group: v_m[m] = v_g[m / gs], or 1 / v_g[m / gs]
 * with invert set (the reciprocal step a quantizer multiplies by). */
static void expand(const float *v_g, int64_t mid, int64_t gs, int invert, float *v_m) {
    for (int64_t g = 0, m = 0; m < mid; g++) {
        float v = invert ? 1.0f / v_g[g] : v_g[g];
        for (int64_t end = m + gs < mid ? m + gs : mid; m < end; m++) v_m[m] = v;
    }
}

/* Per group: min and max of n elements cut in runs of len, run r belonging to parameter
 * r % mid and group (r % mid) / gs; written to lo_g / hi_g. One parameter spread over
 * several runs (one head over the batch, or a whole tensor cut so that every thread has
 * a share) is folded here too. */
static void k_runs_minmax(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                    int64_t n, int64_t len, int64_t mid, int64_t gs, float *lo_g, float *hi_g,
                    int nthreads) {
    view_t v = {nd, sz, st};
    int64_t runs = (n + len - 1) / len;
    float *lo = malloc((size_t)runs * 2 * sizeof(float)), *hi = lo + runs;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < runs; r++) {
        float buf[BLOCK];
        float a = INFINITY, b = -INFINITY;
        int nan = 0;
        int64_t end = (r + 1) * len < n ? (r + 1) * len : n;
        for (int64_t i = r * len; i < end; i += BLOCK) {
            int64_t m = end - i < BLOCK ? end - i : BLOCK;
            span(view_block(x, dtype, v, i, m, buf), m, &a, &b, &nan);
        }
        lo[r] = nan ? NAN : a;
        hi[r] = nan ? NAN : b;
    }
    fold_groups(lo, hi, runs, mid, gs, lo_g, hi_g);
    free(lo);
}

/* Fold nr rows of cols floats (consecutive in u) into per-column min a, max b and NaN
 * flag c, four rows at a time so that the running state is read and written once per
 * four elements. A NaN may stand in for a row's value inside the four (comparisons with
 * it are false), never in a or b; its column is flagged either way. */
static inline void fold_rows(const float *restrict u, int64_t nr, int64_t cols,
                             float *restrict a, float *restrict b, float *restrict c) {
    int64_t j = 0;
    for (; j + 4 <= nr; j += 4) {
        const float *u0 = u + j * cols, *u1 = u0 + cols, *u2 = u1 + cols, *u3 = u2 + cols;
        for (int64_t k = 0; k < cols; k++) {
            float l01 = u0[k] < u1[k] ? u0[k] : u1[k], l23 = u2[k] < u3[k] ? u2[k] : u3[k];
            float h01 = u0[k] > u1[k] ? u0[k] : u1[k], h23 = u2[k] > u3[k] ? u2[k] : u3[k];
            float l = l01 < l23 ? l01 : l23, h = h01 > h23 ? h01 : h23;
            int bad = (u0[k] != u0[k]) | (u1[k] != u1[k]) | (u2[k] != u2[k]) | (u3[k] != u3[k]);
            a[k] = l < a[k] ? l : a[k];
            b[k] = h > b[k] ? h : b[k];
            c[k] = bad ? 1.0f : c[k];
        }
    }
    for (; j < nr; j++) {
        const float *w = u + j * cols;
        for (int64_t k = 0; k < cols; k++) {
            a[k] = w[k] < a[k] ? w[k] : a[k];
            b[k] = w[k] > b[k] ? w[k] : b[k];
            c[k] = w[k] != w[k] ? 1.0f : c[k];
        }
    }
}

/* One thread's partials: min, max and NaN flag of each of cols indexes (3 * cols floats),
 * set to what folds to nothing. */
static inline void part_init(float *p, int64_t cols) {
    for (int64_t c = 0; c < cols; c++) {
        p[c] = INFINITY;
        p[cols + c] = -INFINITY;
        p[2 * cols + c] = 0.0f;
    }
}

/* Index c of nt threads' partials folded into lo[c] and hi[c], NaN where any saw a NaN. */
static inline void part_fold(const float *part, int nt, int64_t cols, int64_t c, float *lo,
                             float *hi) {
    float lc = INFINITY, hc = -INFINITY, bad = 0.0f;
    for (int s = 0; s < nt; s++) {
        const float *as = part + (int64_t)s * 3 * cols;
        lc = as[c] < lc ? as[c] : lc;
        hc = as[cols + c] > hc ? as[cols + c] : hc;
        bad = as[2 * cols + c] > bad ? as[2 * cols + c] : bad;
    }
    lo[c] = bad != 0.0f ? NAN : lc;
    hi[c] = bad != 0.0f ? NAN : hc;
}

/* Per group of gs columns of a (rows, cols) matrix: min and max, written to lo_g / hi_g.
 * Each thread reduces a band of rows into its own slice of partials (min, max and NaN
 * flag: 3 * cols floats a thread), reading as many whole rows at a time as fit in a block. */
static void k_cols_minmax(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                    int64_t rows, int64_t cols, int64_t gs, float *lo_g, float *hi_g,
                    int nthreads) {
    view_t v = {nd, sz, st};
    if (nthreads > rows) nthreads = rows > 0 ? (int)rows : 1;
    float *part = malloc((size_t)(3 * nthreads + 2) * (size_t)cols * sizeof(float));
    float *lo = part + (int64_t)3 * nthreads * cols, *hi = lo + cols;
#pragma omp parallel num_threads(nthreads)
    {
        TEAM(t, nt);
        float *a = part + (int64_t)t * 3 * cols, *b = a + cols, *nan = b + cols;
        part_init(a, cols);
        int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
        float buf[ROWS_BLOCK];
        if (cols <= BLOCK) {
            int64_t per = BLOCK / cols < 4 ? 4 : BLOCK / cols; /* four or more: full folds */
            for (int64_t r = r0; r < r1; r += per) {
                int64_t nr = r1 - r < per ? r1 - r : per;
                /* copied even when dense fp32: folding four rows read in place from x
                 * measured 25% slower than from the block */
                load_view(x, dtype, v, r * cols, nr * cols, buf);
                fold_rows(buf, nr, cols, a, b, nan);
            }
        } else {
            for (int64_t r = r0; r < r1; r++) {
                for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
                    int64_t m = cols - c0 < BLOCK ? cols - c0 : BLOCK;
                    const float *u = view_block(x, dtype, v, r * cols + c0, m, buf);
                    fold_rows(u, 1, m, a + c0, b + c0, nan + c0);
                }
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < cols; c++) part_fold(part, nt, cols, c, lo, hi);
    }
    fold_groups(lo, hi, cols, cols, gs, lo_g, hi_g);
    free(part);
}

/* A uniform draw in [0, 1) with 24 bits, from a counter: the same (seed, i) gives the same
 * draw whatever the threading. A 32-bit integer hash (lowbias32) so that it vectorizes. */
static inline float uniform(uint32_t seed, uint32_t i) {
    uint32_t h = i * 0x9e3779b1u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

/* Clamp a rounded value to [0, levels] (NaN lands on 0: such groups dequantize to NaN
 * anyway) and keep it off code 0 where y > 0 in a zero-minimum group. Branch-free. */
static inline uint8_t code_of(float r, float y, float levels, float zero_min) {
    float lift = y > 0.0f ? zero_min : 0.0f; /* 0 or 1, below levels: one max serves both */
    r = r > lift ? r : lift;
    r = r < levels ? r : levels;
    return (uint8_t)(int)r;
}

/* Codes of n elements starting at element i0, all with one shift / inv, into q. */
static inline void codes_const(const float *restrict v, int64_t n, float sh, float inv,
                               float levels, int stochastic, uint32_t seed, int64_t i0,
                               uint8_t *restrict q) {
    float zero_min = sh == 0.0f ? 1.0f : 0.0f;
    if (stochastic) {
        for (int64_t k = 0; k < n; k++) {
            float y = (v[k] - sh) * inv;
            q[k] = code_of(floorf(y + uniform(seed, (uint32_t)(i0 + k))), y, levels, zero_min);
        }
    } else {
        for (int64_t k = 0; k < n; k++) {
            float y = (v[k] - sh) * inv;
            q[k] = code_of(rintf(y), y, levels, zero_min);
        }
    }
}

/* The same, with one shift / inv per element (the "mid" index is the innermost one) and
 * its zero-minimum flag zm (1 where the shift is 0, else 0). */
static inline void codes_vec(const float *restrict v, int64_t n, const float *restrict sh,
                             const float *restrict inv, const float *restrict zm, float levels,
                             int stochastic, uint32_t seed, int64_t i0, uint8_t *restrict q) {
    if (stochastic) {
        for (int64_t k = 0; k < n; k++) {
            float y = (v[k] - sh[k]) * inv[k];
            float r = floorf(y + uniform(seed, (uint32_t)(i0 + k)));
            q[k] = code_of(r, y, levels, zm[k]);
        }
    } else {
        for (int64_t k = 0; k < n; k++) {
            float y = (v[k] - sh[k]) * inv[k];
            q[k] = code_of(rintf(y), y, levels, zm[k]);
        }
    }
}

/* Pack n codes (n a multiple of 8 / bits, or the tail) into out, first code lowest. */
static inline void pack(const uint8_t *q, int64_t n, int bits, uint8_t *out) {
    int per = 8 / bits;
    int64_t full = n / per;
    for (int64_t j = 0; j < full; j++) {
        uint8_t b = 0;
        for (int s = 0; s < per; s++) b |= (uint8_t)(q[j * per + s] << (s * bits));
        out[j] = b;
    }
    if (n % per) {
        uint8_t b = 0;
        for (int s = 0; s < n % per; s++) b |= (uint8_t)(q[full * per + s] << (s * bits));
        out[full] = b;
    }
}

/* The piece of the block that starts at element e and shares one parameter index
 * (inner > 1: a stretch of one head, row or tensor), or one row of the parameter array
 * (inner == 1: a channel per element). Sets *mi to its first parameter index. */
static inline int64_t piece(int64_t e, int64_t left, int64_t mid, int64_t inner, int64_t *mi) {
    int64_t len;
    if (inner > 1) {
        *mi = (e / inner) % mid;
        len = inner - e % inner;
    } else {
        *mi = e % mid;
        len = mid - *mi;
    }
    return len < left ? len : left;
}

static inline void dequant_const(const uint8_t *restrict q, int64_t n, float s, float h,
                                 float *restrict out) {
    for (int64_t k = 0; k < n; k++) out[k] = fmaf((float)q[k], s, h);
}

static inline void dequant_vec(const uint8_t *restrict q, int64_t n, const float *restrict s,
                               const float *restrict h, float *restrict out) {
    for (int64_t k = 0; k < n; k++) out[k] = fmaf((float)q[k], s[k], h[k]);
}

/* Quantize n elements of x (dtype, read through view v) to codes of `bits` bits, packed,
 * with per-group shift_g and step scale_g. With lo_g set (delayed scaling: the ranges were
 * known before the batch), the same pass also reduces each group's min and max into
 * lo_g / hi_g (NaN where the group saw a NaN), through per-thread partials (min, max, NaN
 * flag of each parameter) filled and folded here. */
static void k_quantize(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                 int64_t n, int64_t mid, int64_t inner, int64_t gs, const float *shift_g,
                 const float *scale_g, int bits, int stochastic, uint32_t seed, uint8_t *out,
                 float *lo_g, float *hi_g, int nthreads) {
    float *shift = malloc((size_t)mid * 3 * sizeof(float)), *inv = shift + mid, *zm = inv + mid;
    expand(shift_g, mid, gs, 0, shift);
    expand(scale_g, mid, gs, 1, inv);
    for (int64_t m = 0; m < mid; m++) zm[m] = shift[m] == 0.0f ? 1.0f : 0.0f;
    float *part = NULL, *lo_out = NULL, *hi_out = NULL;
    if (lo_g) {
        part = malloc((size_t)(3 * nthreads + 2) * (size_t)mid * sizeof(float));
        lo_out = part + (int64_t)3 * nthreads * mid;
        hi_out = lo_out + mid;
    }
    view_t v = {nd, sz, st};
    float levels = (float)((1 << bits) - 1);
    /* statistics per channel fold whole rows at a time, so blocks then hold whole rows
     * (and whole bytes of packed codes) */
    int64_t bsz = BLOCK;
    int row_blocks = part && inner == 1 && mid <= BLOCK && ((BLOCK / mid) * mid) % (8 / bits) == 0;
    if (row_blocks) bsz = (BLOCK / mid) * mid;
    if (row_blocks && bsz < 4 * mid) bsz = 4 * mid; /* a full fold; mid <= BLOCK: fits ROWS_BLOCK */
    int64_t blocks = (n + bsz - 1) / bsz;
#pragma omp parallel num_threads(nthreads)
    {
        TEAM(t, nt);
        float *lo = NULL, *hi = NULL, *nan = NULL;
        if (part) {
            lo = part + (int64_t)t * 3 * mid;
            hi = lo + mid;
            nan = hi + mid;
            part_init(lo, mid);
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            float block[ROWS_BLOCK];
            uint8_t tmp[ROWS_BLOCK];
            int64_t i = blk * bsz;
            int64_t m = n - i < bsz ? n - i : bsz;
            const float *buf = view_block(x, dtype, v, i, m, block);
            uint8_t *q = bits == 8 ? out + i : tmp;
            for (int64_t k = 0, mi, len; k < m; k += len) {
                len = piece(i + k, m - k, mid, inner, &mi);
                if (inner > 1) {
                    codes_const(buf + k, len, shift[mi], inv[mi], levels, stochastic, seed,
                                i + k, q + k);
                    if (part) {
                        int bad = 0;
                        span(buf + k, len, lo + mi, hi + mi, &bad);
                        nan[mi] = bad ? 1.0f : nan[mi];
                    }
                } else {
                    codes_vec(buf + k, len, shift + mi, inv + mi, zm + mi, levels, stochastic, seed,
                              i + k, q + k);
                    if (part && !row_blocks)
                        fold_rows(buf + k, 1, len, lo + mi, hi + mi, nan + mi);
                }
            }
            if (row_blocks) fold_rows(buf, m / mid, mid, lo, hi, nan);
            if (bits != 8) pack(tmp, m, bits, out + i / (8 / bits));
        }
        if (part) { /* the omp for above ended on a barrier: every slice is final */
#pragma omp for schedule(static)
            for (int64_t c = 0; c < mid; c++) part_fold(part, nt, mid, c, lo_out, hi_out);
        }
    }
    if (part) fold_groups(lo_out, hi_out, mid, mid, gs, lo_g, hi_g);
    free(part);
    free(shift);
}

/* The quantization step of a range: range / levels, at least fp32's smallest normal
 * number, 1 where the range is 0 and NaN where it is NaN (reference.scale_of). */
static inline float step_of(float r, float levels) {
    float s = r / levels;
    s = s < FLT_MIN ? FLT_MIN : s;
    return r == 0.0f ? 1.0f : s;
}

/* The step of a batch's own range [lo, hi]: NaN where hi - lo is not finite (a NaN or
 * Inf in the group), so that the group dequantizes to NaN. */
static inline float own_step(float lo, float hi, float levels) {
    float r = hi - lo;
    return isfinite(r) ? step_of(r, levels) : NAN;
}

/* Per-token quantization in one pass, each row with its own range (reference.scale_of of
 * max - min, NaN where that is not finite): k rows at a time are read into a block, each
 * row's min and max taken there and its codes written from them. k * cols fits a block
 * and is a whole number of bytes of packed codes. Row r's range goes to lo[r] and hi[r]
 * (NaN where the row holds a NaN), its step to scale[r]. */
static void k_quantize_rows(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                      int64_t rows, int64_t cols, int64_t k, int bits, int stochastic,
                      uint32_t seed, uint8_t *out, float *lo, float *hi, float *scale,
                      int nthreads) {
    view_t v = {nd, sz, st};
    float levels = (float)((1 << bits) - 1);
    int64_t blocks = (rows + k - 1) / k;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float block[ROWS_BLOCK];
        uint8_t tmp[ROWS_BLOCK];
        int64_t r0 = b * k, nr = rows - r0 < k ? rows - r0 : k, i = r0 * cols;
        const float *buf = view_block(x, dtype, v, i, nr * cols, block);
        uint8_t *q = bits == 8 ? out + i : tmp;
        for (int64_t j = 0; j < nr; j++) {
            const float *row = buf + j * cols;
            float a = INFINITY, h = -INFINITY;
            int nan = 0;
            span(row, cols, &a, &h, &nan);
            a = nan ? NAN : a;
            h = nan ? NAN : h;
            float s = own_step(a, h, levels);
            lo[r0 + j] = a;
            hi[r0 + j] = h;
            scale[r0 + j] = s;
            codes_const(row, cols, a, 1.0f / s, levels, stochastic, seed, i + j * cols,
                        q + j * cols);
        }
        if (bits != 8) pack(tmp, nr * cols, bits, out + i / (8 / bits));
    }
}

/* Per group min and max: one parameter per element of a row reduces columns, runs
 * otherwise; a single group is cut so that every thread reduces a share. */
static void k_minmax(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
               int64_t n, int64_t mid, int64_t inner, int64_t gs, float *lo_g, float *hi_g,
               int nthreads) {
    if (inner == 1) {
        k_cols_minmax(x, dtype, nd, sz, st, n / mid, mid, gs, lo_g, hi_g, nthreads);
        return;
    }
    int64_t len = inner;
    if (mid == 1) {
        int64_t share = (n + 8 * (int64_t)nthreads - 1) / (8 * (int64_t)nthreads);
        len = share > BLOCK ? share : BLOCK;
    }
    k_runs_minmax(x, dtype, nd, sz, st, n, len, mid, gs, lo_g, hi_g, nthreads);
}

/* Quantization with each group's own range in this batch, in one call (two passes): the
 * groups' min and max (lo_g, hi_g; NaN where a group holds NaN), their steps (scale_g:
 * reference.scale_of of max - min, NaN where that is not finite), then the codes. */
static void k_quantize_own(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                     int64_t n, int64_t mid, int64_t inner, int64_t gs, int64_t groups,
                     int bits, int stochastic, uint32_t seed, uint8_t *out, float *lo_g,
                     float *hi_g, float *scale_g, int nthreads) {
    k_minmax(x, dtype, nd, sz, st, n, mid, inner, gs, lo_g, hi_g, nthreads);
    float levels = (float)((1 << bits) - 1);
    for (int64_t g = 0; g < groups; g++) scale_g[g] = own_step(lo_g[g], hi_g[g], levels);
    k_quantize(x, dtype, nd, sz, st, n, mid, inner, gs, lo_g, scale_g, bits, stochastic, seed,
                out, NULL, NULL, nthreads);
}

/* Dequantize n codes (packed at `bits`) to dtype: code * scale + shift, in memory order,
 * with per-group shift_g and scale_g. */
static void k_dequantize(const uint8_t *codes, int bits, int64_t n, int64_t mid, int64_t inner,
                   int64_t gs, const float *shift_g, const float *scale_g, int dtype, void *out,
                   int nthreads) {
    const float *shift = shift_g, *scale = scale_g;
    float *params = NULL;
    if (gs > 1) {
        params = malloc((size_t)mid * 2 * sizeof(float));
        expand(shift_g, mid, gs, 0, params);
        expand(scale_g, mid, gs, 0, params + mid);
        shift = params;
        scale = params + mid;
    }
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    int per = 8 / bits, mask = (1 << bits) - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        float block[BLOCK];
        uint8_t tmp[BLOCK];
        int64_t i = blk * BLOCK;
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        float *buf = dtype == F32 ? (float *)out + i : block; /* fp32: no second pass */
        const uint8_t *q = codes + i;
        if (bits != 8) {
            const uint8_t *p = codes + i / per;
            for (int64_t k = 0; k < m; k++) tmp[k] = (p[k / per] >> ((k % per) * bits)) & mask;
            q = tmp;
        }
        for (int64_t k = 0, mi, len; k < m; k += len) {
            len = piece(i + k, m - k, mid, inner, &mi);
            if (inner > 1)
                dequant_const(q + k, len, scale[mi], shift[mi], buf + k);
            else
                dequant_vec(q + k, len, scale + mi, shift + mi, buf + k);
        }
        if (dtype != F32) store(out, dtype, i, m, buf);
    }
    free(params);
}

/* Per-group arithmetic around the kernels: what quant/reference.py computes with torch
 * ops, on arrays of one value per group. */

/* Step per group (reference.scale_of). */
static void k_scale(const float *width, int64_t groups, int bits, float *scale) {
    float levels = (float)((1 << bits) - 1);
    for (int64_t g = 0; g < groups; g++) scale[g] = step_of(width[g], levels);
}

/* Bit 0: some group's range hi - lo is not finite; bit 1: some group's range overflows
 * fp32 although both its ends are finite (reference.span_flags). */
static int k_span_flags(const float *lo, const float *hi, int64_t groups) {
    int flags = 0;
    for (int64_t g = 0; g < groups; g++) {
        float r = hi[g] - lo[g];
        if (!isfinite(r)) flags |= isfinite(lo[g]) && isfinite(hi[g]) ? 3 : 1;
    }
    return flags;
}

/* Mesa's running estimate moved by one batch (reference.ema_step): per group, with w = decay
 * once the group was seen finite and 0 before,
 *     shift' = lo + w * (shift - lo),   range' = r + w * (range - r),   r = hi - lo,
 * where the batch's range r is finite; elsewhere the estimate stays and marked is NaN.
 * used_shift / used_range (NULL: the new estimate) are the ranges the batch was quantized
 * with; groups with values outside them are counted in the return value, and *seen_count
 * gets the groups seen finite so far. */
static int64_t k_ema(const float *lo, const float *hi, const float *shift, const float *range,
               const uint8_t *seen, int64_t groups, float decay, const float *used_shift,
               const float *used_range, float *shift_out, float *range_out, uint8_t *seen_out,
               float *marked, int64_t *seen_count) {
    int64_t clipped = 0, count = 0;
    for (int64_t g = 0; g < groups; g++) {
        float r = hi[g] - lo[g];
        int finite = isfinite(r);
        float w = seen[g] ? decay : 0.0f;
        float s = finite ? lo[g] + w * (shift[g] - lo[g]) : shift[g];
        float q = finite ? r + w * (range[g] - r) : range[g];
        shift_out[g] = s;
        range_out[g] = q;
        marked[g] = finite ? q : NAN;
        float us = used_shift ? used_shift[g] : s, ur = used_range ? used_range[g] : q;
        clipped += finite && (lo[g] < us || r + (lo[g] - us) > ur);
        seen_out[g] = seen[g] || finite;
        count += seen_out[g];
    }
    *seen_count = count;
    return clipped;
}

/* One delayed-scaling step in one call: codes under the running estimate (shift, range)
 * from before the batch, the batch's own min and max in the same pass, the span flags
 * (k_span_flags, into info[1]) and the estimate moved by the batch (k_ema, counted
 * against the ranges used; groups seen into info[0]). A group this batch made non-finite
 * gets a NaN step, so it dequantizes to NaN. Returns the groups clipped. */
static int64_t k_quantize_delayed(const void *x, int dtype, int nd, const int64_t *sz,
                            const int64_t *st, int64_t n, int64_t mid, int64_t inner,
                            int64_t gs, int64_t groups, int bits, int stochastic, uint32_t seed,
                            uint8_t *out, const float *shift, const float *range,
                            const uint8_t *seen, float decay, float *scale, float *lo, float *hi,
                            float *shift_out, float *range_out, uint8_t *seen_out, float *marked,
                            int64_t *info, int nthreads) {
    k_scale(range, groups, bits, scale);
    k_quantize(x, dtype, nd, sz, st, n, mid, inner, gs, shift, scale, bits, stochastic, seed,
                out, lo, hi, nthreads);
    info[1] = k_span_flags(lo, hi, groups);
    int64_t clipped = k_ema(lo, hi, shift, range, seen, groups, decay, shift, range, shift_out,
                             range_out, seen_out, marked, info);
    if (info[1])
        for (int64_t g = 0; g < groups; g++) scale[g] = isnan(marked[g]) ? NAN : scale[g];
    return clipped;
}

/* One step of Mesa's running estimate in one call (two passes): the batch's min and max,
 * the span flags (info[1]), the estimate moved by the batch (k_ema, clipping counted
 * against the new estimate; groups seen into info[0]), its steps (NaN for groups the
 * batch made non-finite) and the codes under it. Returns the groups clipped. */
static int64_t k_quantize_ema(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                        int64_t n, int64_t mid, int64_t inner, int64_t gs, int64_t groups,
                        int bits, int stochastic, uint32_t seed, uint8_t *out, const float *shift,
                        const float *range, const uint8_t *seen, float decay, float *scale,
                        float *lo, float *hi, float *shift_out, float *range_out,
                        uint8_t *seen_out, float *marked, int64_t *info, int nthreads) {
    k_minmax(x, dtype, nd, sz, st, n, mid, inner, gs, lo, hi, nthreads);
    info[1] = k_span_flags(lo, hi, groups);
    int64_t clipped = k_ema(lo, hi, shift, range, seen, groups, decay, NULL, NULL, shift_out,
                             range_out, seen_out, marked, info);
    k_scale(marked, groups, bits, scale);
    k_quantize(x, dtype, nd, sz, st, n, mid, inner, gs, shift_out, scale, bits, stochastic,
                seed, out, NULL, NULL, nthreads);
    return clipped;
}

/* The value c when every element is 0 or one other value c and both occur (a dropout mask
 * {0, 1/(1-p)}, an additive attention mask {0, -inf}), else NaN; NaN rules it out. The first nonzero element sets c, so a
 * tensor that is no such mask is usually ruled out at once. */
static float k_two_level(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                   int64_t n) {
    view_t v = {nd, sz, st};
    float c = 0.0f, buf[BLOCK];
    int zero = 0;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK, k = 0;
        load_view(x, dtype, v, i, m, buf);
        for (; c == 0.0f && k < m; k++) {
            if (buf[k] == 0.0f) {
                zero = 1;
            } else {
                if (buf[k] != buf[k]) return NAN;
                c = buf[k];
            }
        }
        int bad = 0, z = 0;
        for (; k < m; k++) {
            bad |= (buf[k] != 0.0f) & (buf[k] != c);
            z |= buf[k] == 0.0f;
        }
        if (bad) return NAN;
        zero |= z;
    }
    return zero && c != 0.0f ? c : NAN;
}

/* One bit per element of x (read through its view), set where the element is not 0, the
 * first element in the lowest bit of the first byte; the last byte's spare bits are 0
 * (reference.pack_bits of x != 0). Blocks hold whole bytes, so threads never share one. */
static void k_pack_nonzero(const void *x, int dtype, int nd, const int64_t *sz, const int64_t *st,
                     int64_t n, uint8_t *out, int nthreads) {
    view_t v = {nd, sz, st};
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        float block[BLOCK];
        int64_t i = blk * BLOCK, m = n - i < BLOCK ? n - i : BLOCK;
        uint8_t *o = out + i / 8;
        int64_t full = m / 8;
        if (v.nd == 0 && dtype == U8) {
            /* dense bools (each byte 0 or 1): eight at a time, the multiply moving byte k's
             * bit to bit 56 + k without carries (no two partial products share a bit) */
            const uint8_t *p = (const uint8_t *)x + i;
            for (int64_t j = 0; j < full; j++) {
                uint64_t w;
                memcpy(&w, p + 8 * j, 8);
                o[j] = (uint8_t)((w * 0x0102040810204080ull) >> 56);
            }
            if (m % 8) {
                uint8_t b = 0;
                for (int k = 0; k < m % 8; k++) b |= (uint8_t)((p[8 * full + k] != 0) << k);
                o[full] = b;
            }
            continue;
        }
        const float *buf = view_block(x, dtype, v, i, m, block);
        for (int64_t j = 0; j < full; j++) {
            const float *e = buf + 8 * j;
            uint8_t b = 0;
            for (int k = 0; k < 8; k++) b |= (uint8_t)((e[k] != 0.0f) << k);
            o[j] = b;
        }
        if (m % 8) {
            uint8_t b = 0;
            for (int k = 0; k < m % 8; k++) b |= (uint8_t)((buf[8 * full + k] != 0.0f) << k);
            o[full] = b;
        }
    }
}

/* The inverse: n elements of dtype, `value` where the bit is set and 0 where not (U8: 1
 * and 0, a bool tensor), dense. Each byte expands to eight elements through a table. */
static void k_unpack_nonzero(const uint8_t *bits, int64_t n, int dtype, float value, void *out,
                       int nthreads) {
    size_t es = dtype == F32 ? 4 : dtype == U8 ? 1 : 2;
    uint8_t one[4], zero[4] = {0, 0, 0, 0};
    if (dtype == F32) {
        memcpy(one, &value, 4);
    } else if (dtype == BF16) {
        uint16_t h = f32_to_bf16(value);
        memcpy(one, &h, 2);
    } else if (dtype == F16) {
        _Float16 h = (_Float16)value;
        memcpy(one, &h, 2);
    } else {
        one[0] = 1;
    }
    uint8_t *table = malloc(256 * 8 * es); /* byte b -> its eight elements */
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++)
            memcpy(table + ((size_t)b * 8 + (size_t)k) * es, (b >> k) & 1 ? one : zero, es);
    int64_t full = n / 8;
    uint8_t *o = out;
    /* a constant size for each width, so that every copy is a single move */
#define EXPAND(W)                                                                          \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                     \
    for (int64_t j = 0; j < full; j++) memcpy(o + j * 8 * (W), table + bits[j] * 8 * (W), 8 * (W))
    if (es == 4)
        EXPAND(4);
    else if (es == 2)
        EXPAND(2);
    else
        EXPAND(1);
#undef EXPAND
    if (n % 8) memcpy(o + full * 8 * es, table + bits[full] * 8 * es, (size_t)(n % 8) * es);
    free(table);
}


/* ---- block-scaled codes (PerBlock; quant/blocks.py is the reference) ---------------- */

/* Work units are whole rows, k at a time with k * channels a multiple of 8, so that every
 * unit's packed codes start on a byte boundary for every width (3 bits: 8 codes in 3
 * bytes) and threads never share a byte. */
static int64_t block_unit_rows(int64_t channels) {
    int64_t k0 = 8;
    while (k0 > 1 && (k0 / 2) * channels % 8 == 0) k0 /= 2;
    int64_t k = (BLOCK + channels - 1) / channels;
    return (k + k0 - 1) / k0 * k0;
}

/* Pack n codes (n a multiple of 8, or the tensor's tail) of `bits` bits; 3 bits: eight
 * codes in a 24-bit little-endian word, as reference.pack_bits. */
static void pack_any(const uint8_t *q, int64_t n, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, q, (size_t)n);
        return;
    }
    if (bits == 4) { /* the common widths with their codes per byte a constant: vectorized */
        int64_t j = 0;
        for (; j < n / 2; j++) out[j] = (uint8_t)(q[2 * j] | q[2 * j + 1] << 4);
        if (n % 2) out[j] = q[2 * j];
        return;
    }
    if (bits == 2) {
        int64_t j = 0;
        for (; j < n / 4; j++)
            out[j] = (uint8_t)(q[4 * j] | q[4 * j + 1] << 2 | q[4 * j + 2] << 4 | q[4 * j + 3] << 6);
        if (n % 4) pack(q + 4 * j, n % 4, bits, out + j);
        return;
    }
    if (bits != 3) {
        pack(q, n, bits, out);
        return;
    }
    for (int64_t j = 0; j < n; j += 8) {
        uint32_t w = 0;
        for (int s = 0; s < 8 && j + s < n; s++) w |= (uint32_t)q[j + s] << (3 * s);
        int64_t b = j / 8 * 3; /* the tail's word is padded with zeros, as the reference */
        out[b] = (uint8_t)w;
        out[b + 1] = (uint8_t)(w >> 8);
        out[b + 2] = (uint8_t)(w >> 16);
    }
}

static inline uint8_t unpack_one(const uint8_t *p, int64_t i, int bits) {
    if (bits == 8) return p[i];
    if (bits == 3) {
        int64_t b = i / 8 * 3;
        uint32_t w = (uint32_t)p[b] | (uint32_t)p[b + 1] << 8 | (uint32_t)p[b + 2] << 16;
        return (uint8_t)((w >> (3 * (i % 8))) & 7u);
    }
    int per = 8 / bits;
    return (uint8_t)((p[i / per] >> ((i % per) * bits)) & ((1 << bits) - 1));
}

/* Codes [i0, i0 + n) unpacked into q: whole bytes at a time once i0 is aligned. */
static void unpack_run(const uint8_t *p, int64_t i0, int64_t n, int bits, uint8_t *q) {
    if (bits == 8) {
        memcpy(q, p + i0, (size_t)n);
        return;
    }
    int per = bits == 3 ? 8 : 8 / bits;
    int64_t k = 0;
    for (; k < n && (i0 + k) % per; k++) q[k] = unpack_one(p, i0 + k, bits);
    if (bits == 4) {
        const uint8_t *b = p + (i0 + k) / 2;
        for (; k + 2 <= n; k += 2, b++) {
            q[k] = *b & 15u;
            q[k + 1] = *b >> 4;
        }
    } else if (bits == 2) {
        const uint8_t *b = p + (i0 + k) / 4;
        for (; k + 4 <= n; k += 4, b++)
            for (int s = 0; s < 4; s++) q[k + s] = (*b >> (2 * s)) & 3u;
    } else {
        const uint8_t *b = p + (i0 + k) / 8 * 3;
        for (; k + 8 <= n; k += 8, b += 3) {
            uint32_t w = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
            for (int s = 0; s < 8; s++) q[k + s] = (uint8_t)((w >> (3 * s)) & 7u);
        }
    }
    for (; k < n; k++) q[k] = unpack_one(p, i0 + k, bits);
}

/* The butterflies of an unnormalized Walsh-Hadamard transform, in the reference's order:
 * stage h (1, 2, 4, ...) maps each pair (i, i + h) in a run of 2h to (a + b, a - b). The
 * stages inside 8 floats take each lane's partner p and add s * v, s = +1 on a pair's
 * first lane (b + a) and -1 on its second (a + -b): the reference's sums, exactly. The
 * wider stages add and subtract whole 8-float vectors. */
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8f butterfly8(v8f v, v8i partner, v8f sign) {
    return __builtin_shuffle(v, partner) + sign * v;
}

static inline __attribute__((always_inline)) void fwht_vectors(v8f *w, int64_t nv) {
    const v8i p1 = {1, 0, 3, 2, 5, 4, 7, 6}, p2 = {2, 3, 0, 1, 6, 7, 4, 5};
    const v8i p4 = {4, 5, 6, 7, 0, 1, 2, 3};
    const v8f s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
    const v8f s4 = {1, 1, 1, 1, -1, -1, -1, -1};
    for (int64_t k = 0; k < nv; k++) {
        w[k] = butterfly8(w[k], p1, s1);
        w[k] = butterfly8(w[k], p2, s2);
        w[k] = butterfly8(w[k], p4, s4);
    }
    for (int64_t h = 1; h < nv; h *= 2)
        for (int64_t i = 0; i < nv; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                v8f a = w[j], b = w[j + h];
                w[j] = a + b;
                w[j + h] = a - b;
            }
}

/* fwht_vectors on size floats (size <= 128, a multiple of 8) anywhere in memory */
static inline void fwht(float *v, int64_t size) {
    v8f w[16];
    memcpy(w, v, (size_t)size * sizeof(float));
    fwht_vectors(w, size / 8);
    memcpy(v, w, (size_t)size * sizeof(float));
}

/* Quantize one block of n values v (n <= size; rotated in place when asked): codes into
 * q, the fp32 step (e8m0: the power of two) into *step; returns bit 0 unsigned, bit 1
 * finite, bit 2 overflow, and the e8m0 exponent through *exponent. */
static inline int encode_block(float *restrict v, int64_t n, int64_t size, int bits, int rotate, int e8m0,
                        const float *signs, float norm, int stochastic, uint32_t seed,
                        int64_t i0, uint8_t *restrict q, float *step_out, int *exponent) {
    float lo = v[0], hi = v[0];
    int nan = 0;
    span(v, n, &lo, &hi, &nan);
    int finite = !nan && isfinite(lo) && isfinite(hi);
    int unsig = !nan && lo >= 0.0f; /* as torch's min, which a NaN makes NaN */
    if (rotate && finite && !unsig && n == size) {
        for (int64_t k = 0; k < n; k++) v[k] = v[k] * signs[k];
        fwht(v, size);
        for (int64_t k = 0; k < n; k++) v[k] = v[k] * norm;
    }
    float top = (float)((1 << bits) - 1), stop = (float)((1 << (bits - 1)) - 1);
    float a = hi;
    if (!unsig) {
        a = 0.0f;
#pragma omp simd reduction(max : a)
        for (int64_t k = 0; k < n; k++) {
            float t = fabsf(v[k]);
            a = t > a ? t : a;
        }
    }
    float step = a / (unsig ? top : stop);
    step = a > 0.0f ? (step < FLT_MIN ? FLT_MIN : step) : 0.0f;
    int over = finite && !isfinite(step);
    int k2 = 0;
    if (e8m0 && step > 0.0f && isfinite(step)) {
        int e;
        float m = frexpf(step, &e);
        k2 = e - (m == 0.5f);
        over |= finite && k2 > 62;
        k2 = k2 < -63 ? -63 : (k2 > 62 ? 62 : k2);
        step = ldexpf(1.0f, k2);
    }
    if (!finite || over) step = 0.0f;
    float inv = step > 0.0f ? 1.0f / step : 0.0f;
    /* one branch-free loop per case, so that each vectorizes: signed codes are clamped
     * to [-stop, stop] and offset by stop; unsigned ones to [lift, top] */
    float lo_c = unsig ? 0.0f : -stop, hi_c = unsig ? top : stop, off = unsig ? 0.0f : stop;
    float lift0 = unsig ? (lo == 0.0f ? 1.0f : 0.0f) : lo_c; /* the floor where v > 0 */
    if (!finite) {
        memset(q, 0, (size_t)n);
    } else if (stochastic) {
        for (int64_t k = 0; k < n; k++) {
            float r = floorf(v[k] * inv + uniform(seed, (uint32_t)(i0 + k)));
            r = r < lo_c ? lo_c : (r > hi_c ? hi_c : r);
            float lift = v[k] > 0.0f ? lift0 : lo_c;
            r = r > lift ? r : lift;
            q[k] = (uint8_t)(int)(r + off);
        }
    } else {
#pragma omp simd
        for (int64_t k = 0; k < n; k++) {
            float r = rintf(v[k] * inv);
            r = r < lo_c ? lo_c : (r > hi_c ? hi_c : r);
            float lift = v[k] > 0.0f ? lift0 : lo_c;
            r = r > lift ? r : lift;
            q[k] = (uint8_t)(int)(r + off);
        }
    }
    *step_out = step;
    *exponent = k2;
    return unsig | finite << 1 | over << 2;
}

/* Eight whole blocks at once, nearest rounding: encode_block's arithmetic, bit for bit,
 * with each block's statistics in one lane, so that the scalar chain from a block's
 * extremes to its step (two reductions and two divisions) is paid once per eight blocks.
 * The largest magnitude is an integer max over the bits of |v|: for non-negative floats
 * it orders as the values do, and a NaN lands above +inf, so that one pass finds the
 * step and whether the block is finite. */
typedef uint8_t v8u8 __attribute__((vector_size(8)));

#ifdef __AVX2__ /* one instruction each; the lane loops below are not always vectorized */
static inline v8f vmin(v8f a, v8f b) { return (v8f)_mm256_min_ps((__m256)a, (__m256)b); }
static inline v8f vmax(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
static inline v8i imax(v8i a, v8i b) { return (v8i)_mm256_max_epi32((__m256i)a, (__m256i)b); }
static inline v8f vrint(v8f a) {
    return (v8f)_mm256_round_ps((__m256)a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline v8f codes8(const uint8_t *p) { /* eight codes as floats */
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else /* a < b ? a : b lane by lane: what _mm256_min_ps computes, NaNs included */
static inline v8f vmin(v8f a, v8f b) {
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = a[j] < b[j] ? a[j] : b[j];
    return r;
}

static inline v8f vmax(v8f a, v8f b) {
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = a[j] > b[j] ? a[j] : b[j];
    return r;
}

static inline v8i imax(v8i a, v8i b) {
    v8i r;
    for (int j = 0; j < 8; j++) r[j] = a[j] > b[j] ? a[j] : b[j];
    return r;
}

static inline v8f vrint(v8f a) {
    for (int j = 0; j < 8; j++) a[j] = rintf(a[j]);
    return a;
}

static inline v8f codes8(const uint8_t *p) {
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = (float)p[j];
    return r;
}
#endif

static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }

/* Lane b of the result: the min (max) over the lanes of m[b], in three rounds of pairs. */
static const v8i FOLD_E1 = {0, 8, 2, 10, 4, 12, 6, 14}, FOLD_O1 = {1, 9, 3, 11, 5, 13, 7, 15};
static const v8i FOLD_E2 = {0, 1, 8, 9, 4, 5, 12, 13}, FOLD_O2 = {2, 3, 10, 11, 6, 7, 14, 15};
static const v8i FOLD_E4 = {0, 1, 2, 3, 8, 9, 10, 11}, FOLD_O4 = {4, 5, 6, 7, 12, 13, 14, 15};

#define FOLD(NAME, T, OP)                                                                    \
    static inline T NAME(const T *m) {                                                       \
        T c[4], d[2];                                                                        \
        for (int i = 0; i < 4; i++)                                                          \
            c[i] = OP(__builtin_shuffle(m[2 * i], m[2 * i + 1], FOLD_E1),                    \
                      __builtin_shuffle(m[2 * i], m[2 * i + 1], FOLD_O1));                   \
        for (int i = 0; i < 2; i++)                                                          \
            d[i] = OP(__builtin_shuffle(c[2 * i], c[2 * i + 1], FOLD_E2),                    \
                      __builtin_shuffle(c[2 * i], c[2 * i + 1], FOLD_O2));                   \
        return OP(__builtin_shuffle(d[0], d[1], FOLD_E4), __builtin_shuffle(d[0], d[1], FOLD_O4)); \
    }
FOLD(fold_min, v8f, vmin)
FOLD(fold_max, v8i, imax)
#undef FOLD

/* The bits of the largest |v| over a block's nv vectors, per lane */
static inline v8i magnitudes(const v8f *w, int64_t nv) {
    const v8i clear = (v8i){0} + 0x7fffffff;
    v8i m = (v8i)w[0] & clear;
    for (int64_t k = 1; k < nv; k++) m = imax(m, (v8i)w[k] & clear);
    return m;
}

/* Encode the blocks src[0..8) of nv vectors each (codes into q[b], step, e8m0 exponent
 * and encode_block's flags into the arrays); the caller repeats its last block to fill 8,
 * and pads a ragged block with its own first value (which moves none of its statistics)
 * and leaves it out of whole, the lanes that rotate. */
static inline __attribute__((always_inline)) void encode8(
    const float *const *src, int64_t nv, int bits, int rotate, int whole, int e8m0,
    const float *signs, float norm, uint8_t *const *q, float *step_out, int *exponent,
    int *flags) {
    v8f w[8][16]; /* size <= 128 */
    v8f mn[8];
    v8i mg[8];
    for (int b = 0; b < 8; b++) {
        memcpy(w[b], src[b], (size_t)nv * sizeof(v8f));
        mn[b] = w[b][0];
        for (int64_t k = 1; k < nv; k++) mn[b] = vmin(mn[b], w[b][k]);
        mg[b] = magnitudes(w[b], nv);
    }
    const v8i inf = (v8i){0} + 0x7f800000, mantissa = (v8i){0} + 0x7fffff;
    const v8f zero = {0};
    v8f lo = fold_min(mn);
    v8i top = fold_max(mg);
    v8i finite = top < inf, nan = top > inf;
    v8i unsig = ~nan & (lo >= zero);
    if (rotate) {
        v8i turn = finite & ~unsig;
        int any = 0;
        for (int b = 0; b < 8; b++) {
            if (!turn[b] || !(whole >> b & 1)) continue;
            v8f s[16];
            memcpy(s, signs, (size_t)nv * sizeof(v8f));
            for (int64_t k = 0; k < nv; k++) w[b][k] = w[b][k] * s[k];
            fwht_vectors(w[b], nv);
            for (int64_t k = 0; k < nv; k++) w[b][k] = w[b][k] * norm;
            mg[b] = magnitudes(w[b], nv);
            any = 1;
        }
        if (any) top = fold_max(mg);
    }
    float topc = (float)((1 << bits) - 1), stopc = (float)((1 << (bits - 1)) - 1);
    v8f a = (v8f)top;
    v8f step = a / vsel(unsig, zero + topc, zero + stopc);
    step = vsel(a > zero, vsel(step < zero + FLT_MIN, zero + FLT_MIN, step), zero);
    v8i bits_s = (v8i)step;
    v8i over = finite & ((bits_s & ((v8i){0} + 0x7fffffff)) >= inf);
    v8i k2 = (v8i){0};
    if (e8m0) { /* frexp's exponent, less one where the mantissa is 0.5, as encode_block */
        v8i ok = (step > zero) & ((bits_s & ((v8i){0} + 0x7fffffff)) < inf);
        v8i k = (bits_s >> 23) - 126 + ((bits_s & mantissa) == 0);
        over |= finite & ok & (k > 62);
        k = imax(k, (v8i){0} - 63);
        k = -imax(-k, (v8i){0} - 62);
        k2 = ok & k;
        step = vsel(ok, (v8f)((k + 127) << 23), step);
    }
    step = vsel(finite & ~over, step, zero);
    v8f inv = vsel(step > zero, (zero + 1.0f) / step, zero);
    for (int b = 0; b < 8; b++) {
        step_out[b] = step[b];
        exponent[b] = k2[b];
        flags[b] = (unsig[b] & 1) | (finite[b] & 1) << 1 | (over[b] & 1) << 2;
        uint8_t *qb = q[b];
        const v8f *wb = w[b];
        const v8f vi = zero + inv[b];
        if (!finite[b]) {
            memset(qb, 0, (size_t)nv * 8);
        } else if (!unsig[b]) { /* codes in [-stop, stop], offset by stop */
            const v8f vlo = zero - stopc, vhi = zero + stopc;
            for (int64_t k = 0; k < nv; k++) {
                v8f r = vrint(wb[k] * vi);
                r = vmax(vmin(r, vhi), vlo) + vhi;
                v8u8 c = __builtin_convertvector(__builtin_convertvector(r, v8i), v8u8);
                memcpy(qb + 8 * k, &c, 8);
            }
        } else { /* codes in [0, top], off 0 where v > 0 in a block whose minimum is 0 */
            const v8f vhi = zero + topc, lift = zero + (lo[b] == 0.0f ? 1.0f : 0.0f);
            for (int64_t k = 0; k < nv; k++) {
                v8f r = vrint(wb[k] * vi);
                r = vmax(vmin(r, vhi), zero);
                r = vmax(r, vsel(wb[k] > zero, lift, zero));
                v8u8 c = __builtin_convertvector(__builtin_convertvector(r, v8i), v8u8);
                memcpy(qb + 8 * k, &c, 8);
            }
        }
    }
}

/* encode8 with the blocks' size a constant, so that its loops unroll */
static void encode8_sized(const float *const *src, int64_t size, int bits, int rotate,
                          int whole, int e8m0, const float *signs, float norm,
                          uint8_t *const *q, float *step, int *exponent, int *flags) {
#define SIZED(NV) encode8(src, NV, bits, rotate, whole, e8m0, signs, norm, q, step, exponent, flags)
    switch (size) {
    case 16:
        SIZED(2);
        break;
    case 32:
        SIZED(4);
        break;
    case 64:
        SIZED(8);
        break;
    default:
        SIZED(16);
    }
#undef SIZED
}

/* Where one block's step and flags go: its e8m0 byte, or the step and flags that the fp16
 * ratios are made from once every block's step is known. */
static inline void keep_block(int64_t blk, int f, float step, int k2, int e8m0, void *scales,
                              float *steps, uint8_t *flags) {
    if (e8m0) {
        int finite = (f >> 1) & 1;
        int e = !finite ? 127 : (step > 0.0f ? k2 + 64 : 0);
        ((uint8_t *)scales)[blk] = (uint8_t)(e | (f & 1) << 7);
    } else {
        steps[blk] = step;
        flags[blk] = (uint8_t)f;
    }
}

/* Block-scaled codes of x (rows x channels, read in logical order through v): codes
 * packed into out, one scale per block into scales (e8m0 bytes, or fp16 step / *ref with
 * the sign bit set on unsigned blocks), info[0] = some block not finite, info[1] = some
 * finite block's step overflowed its format. Whole blocks go eight at a time (encode8);
 * ragged last blocks and stochastic rounding one at a time (encode_block). */
static void k_quantize_blocks(const void *x, int dtype, int nd, const int64_t *sz,
                              const int64_t *st, int64_t rows, int64_t channels, int64_t size,
                              int bits, int rotate, int e8m0, const float *signs,
                              int stochastic, uint32_t seed, uint8_t *out, void *scales,
                              float *ref, int64_t *info, int nthreads) {
    view_t v = {nd, sz, st};
    int64_t per_row = (channels + size - 1) / size, nblocks = rows * per_row;
    int64_t unit = block_unit_rows(channels), units = (rows + unit - 1) / unit;
    float norm = (float)(1.0 / sqrt((double)size));
    float *steps = e8m0 ? NULL : malloc((size_t)(nblocks > 0 ? nblocks : 1) * sizeof(float));
    uint8_t *flags = e8m0 ? NULL : malloc((size_t)(nblocks > 0 ? nblocks : 1));
    int64_t nonfinite = 0, overflow = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : nonfinite, overflow)
    {
        float *in = malloc((size_t)(unit * channels) * sizeof(float)), buf[128];
        float pad[8][128];
        uint8_t *q = malloc((size_t)(unit * channels)), spare[8][128];
        const float *src[8];
        uint8_t *dst[8];
        int64_t which[8], ragged[8], at8[8];
        float step8[8];
        int k8[8], f8[8], pending = 0, whole = 0;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            int64_t r0 = u * unit, r1 = r0 + unit < rows ? r0 + unit : rows;
            int64_t e0 = r0 * channels, e1 = r1 * channels;
            const float *part = view_block(x, dtype, v, e0, e1 - e0, in);
            for (int64_t r = r0; r < r1; r++) {
                for (int64_t b = 0; b < per_row; b++) {
                    int64_t c0 = b * size, n = channels - c0 < size ? channels - c0 : size;
                    int64_t blk = r * per_row + b, at = (r - r0) * channels + c0;
                    if (stochastic) {
                        float step;
                        int k2;
                        int f = encode_block(memcpy(buf, part + at, (size_t)n * 4), n, size,
                                             bits, rotate, e8m0, signs, norm, stochastic,
                                             seed, e0 + at, q + at, &step, &k2);
                        nonfinite |= !((f >> 1) & 1);
                        overflow |= (f >> 2) & 1;
                        keep_block(blk, f, step, k2, e8m0, scales, steps, flags);
                        continue;
                    }
                    int g = pending++;
                    which[g] = blk;
                    at8[g] = at;
                    ragged[g] = n < size ? n : 0;
                    if (n == size) {
                        src[g] = part + at;
                        dst[g] = q + at;
                        whole |= 1 << g;
                    } else {
                        for (int64_t k = 0; k < size; k++) pad[g][k] = part[at + (k < n ? k : 0)];
                        src[g] = pad[g];
                        dst[g] = spare[g];
                    }
                    int last = r == r1 - 1 && b == per_row - 1;
                    if (pending < 8 && !last) continue;
                    for (int h = pending; h < 8; h++) { /* fill with the last again */
                        src[h] = src[pending - 1];
                        dst[h] = spare[h];
                    }
                    encode8_sized(src, size, bits, rotate, whole, e8m0, signs, norm, dst, step8,
                                  k8, f8);
                    for (int h = 0; h < pending; h++) {
                        nonfinite |= !((f8[h] >> 1) & 1);
                        overflow |= (f8[h] >> 2) & 1;
                        keep_block(which[h], f8[h], step8[h], k8[h], e8m0, scales, steps, flags);
                        if (ragged[h]) memcpy(q + at8[h], spare[h], (size_t)ragged[h]);
                    }
                    pending = whole = 0;
                }
            }
            pack_any(q, e1 - e0, bits, out + e0 * bits / 8);
        }
        free(q);
        free(in);
    }
    if (!e8m0) {
        float largest = 0.0f;
        for (int64_t g = 0; g < nblocks; g++) largest = steps[g] > largest ? steps[g] : largest;
        float r = largest > 0.0f ? largest : 1.0f;
        *ref = r;
        _Float16 *h = (_Float16 *)scales;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < nblocks; g++) {
            int f = flags[g];
            if (!((f >> 1) & 1)) {
                uint16_t nanbits = 0x7e00u;
                memcpy(h + g, &nanbits, 2);
            } else {
                _Float16 ratio = (_Float16)(steps[g] / r);
                h[g] = (f & 1) ? -ratio : ratio;
            }
        }
        free(steps);
        free(flags);
    }
    info[0] = nonfinite;
    info[1] = overflow;
}

/* One whole block's values from its codes, in vector registers (the loop below, bit for
 * bit): (code - shift) * step, then the inverse rotation where the block was rotated. */
static inline __attribute__((always_inline)) void decode_whole(
    const uint8_t *restrict qc, int64_t nv, float step, float shift, int turn, float norm,
    const float *signs, float *restrict w_out) {
    v8f w[16];
    const v8f zero = {0}, vs = zero + step, vh = zero + shift;
    for (int64_t k = 0; k < nv; k++) {
        w[k] = (codes8(qc + 8 * k) - vh) * vs;
    }
    if (turn) {
        v8f sg[16];
        memcpy(sg, signs, (size_t)nv * sizeof(v8f));
        fwht_vectors(w, nv);
        for (int64_t k = 0; k < nv; k++) w[k] = (w[k] * norm) * sg[k];
    }
    memcpy(w_out, w, (size_t)nv * sizeof(v8f));
}

static void decode_sized(const uint8_t *qc, int64_t size, float step, float shift, int turn,
                         float norm, const float *signs, float *w_out) {
    switch (size) {
    case 16:
        decode_whole(qc, 2, step, shift, turn, norm, signs, w_out);
        break;
    case 32:
        decode_whole(qc, 4, step, shift, turn, norm, signs, w_out);
        break;
    case 64:
        decode_whole(qc, 8, step, shift, turn, norm, signs, w_out);
        break;
    default:
        decode_whole(qc, 16, step, shift, turn, norm, signs, w_out);
    }
}

/* The inverse: values (rows x channels, contiguous) of dtype into out (fp32 rows straight
 * into out, others through a row of fp32). */
static void k_dequantize_blocks(const uint8_t *codes, int bits, int64_t rows, int64_t channels,
                                int64_t size, int rotate, int e8m0, const float *signs,
                                const void *scales, float ref, int dtype, void *out,
                                int nthreads) {
    int64_t per_row = (channels + size - 1) / size;
    float norm = (float)(1.0 / sqrt((double)size));
    float stop = (float)((1 << (bits - 1)) - 1);
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = malloc((size_t)channels * sizeof(float));
        uint8_t *row = malloc((size_t)channels + 8);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *vals = dtype == F32 ? (float *)out + r * channels : buf;
            unpack_run(codes, r * channels, channels, bits, row);
            for (int64_t b = 0; b < per_row; b++) {
                int64_t c0 = b * size, n = channels - c0 < size ? channels - c0 : size;
                int64_t blk = r * per_row + b;
                float step;
                int unsig;
                if (e8m0) {
                    uint8_t byte = ((const uint8_t *)scales)[blk];
                    int e = byte & 127;
                    unsig = byte >> 7;
                    step = e == 127 ? NAN : (e == 0 ? 0.0f : ldexpf(1.0f, e - 64));
                } else {
                    _Float16 hv = ((const _Float16 *)scales)[blk];
                    float f = (float)hv;
                    unsig = signbit(f) ? 1 : 0;
                    step = fabsf(f) * ref;
                }
                float shift = unsig ? 0.0f : stop;
                float *w = vals + c0;
                const uint8_t *qc = row + c0;
                if (n == size) {
                    decode_sized(qc, size, step, shift, rotate && !unsig, norm, signs, w);
                    continue;
                }
                for (int64_t k = 0; k < n; k++) w[k] = ((float)qc[k] - shift) * step;
            }
            if (dtype != F32) store(out, dtype, r * channels, channels, buf);
        }
        free(row);
        free(buf);
    }
}

/* ---- the interface: one struct, filled by name ------------------------------------- */

typedef struct {
    /* the input, read through a strided view in the codes' order (nd = 0: dense) */
    const void *x;
    int64_t dtype, nd;
    const int64_t *sizes, *strides;
    int64_t n;
    /* the layout: element i has parameter (i / inner) % mid, parameter m group m / gs */
    int64_t mid, inner, gs, groups, channels, rows_per_block;
    /* the codes: written by quantize, read by dequantize; mask bits likewise */
    int64_t bits, stochastic;
    uint32_t seed;
    uint8_t *codes;
    /* per-group values read */
    const float *shift, *range, *scale_in, *used_shift, *used_range;
    const uint8_t *seen;
    float decay, value;
    /* per-group values written */
    float *lo, *hi, *scale, *shift_out, *range_out, *marked;
    uint8_t *seen_out;
    int64_t *info;
    /* a restored tensor or mask */
    void *out;
    int64_t threads;
    /* block-scaled codes: rows x channels in blocks of `block`, their scales and ref */
    int64_t rows, block, rotate, e8m0;
    const float *signs;
    void *block_scales;
    float *ref;
    float ref_in;
} tm_call;

int64_t tm_call_size(void) { return (int64_t)sizeof(tm_call); }

void tm_minmax(const tm_call *c) {
    k_minmax(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n, c->mid, c->inner,
             c->gs, c->lo, c->hi, (int)c->threads);
}

void tm_quantize(const tm_call *c) {
    k_quantize(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n, c->mid, c->inner,
               c->gs, c->shift, c->scale_in, (int)c->bits, (int)c->stochastic, c->seed,
               c->codes, c->lo, c->hi, (int)c->threads);
}

/* Dynamic ranges return the span flags of the ranges they measured (tm_span_flags). */
int64_t tm_quantize_own(const tm_call *c) {
    k_quantize_own(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n, c->mid,
                   c->inner, c->gs, c->groups, (int)c->bits, (int)c->stochastic, c->seed,
                   c->codes, c->lo, c->hi, c->scale, (int)c->threads);
    return k_span_flags(c->lo, c->hi, c->groups);
}

int64_t tm_quantize_rows(const tm_call *c) {
    k_quantize_rows(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->groups,
                    c->channels, c->rows_per_block, (int)c->bits, (int)c->stochastic, c->seed,
                    c->codes, c->lo, c->hi, c->scale, (int)c->threads);
    return k_span_flags(c->lo, c->hi, c->groups);
}

int64_t tm_quantize_delayed(const tm_call *c) {
    return k_quantize_delayed(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n,
                              c->mid, c->inner, c->gs, c->groups, (int)c->bits,
                              (int)c->stochastic, c->seed, c->codes, c->shift, c->range,
                              c->seen, c->decay, c->scale, c->lo, c->hi, c->shift_out,
                              c->range_out, c->seen_out, c->marked, c->info, (int)c->threads);
}

int64_t tm_quantize_ema(const tm_call *c) {
    return k_quantize_ema(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n, c->mid,
                          c->inner, c->gs, c->groups, (int)c->bits, (int)c->stochastic,
                          c->seed, c->codes, c->shift, c->range, c->seen, c->decay, c->scale,
                          c->lo, c->hi, c->shift_out, c->range_out, c->seen_out, c->marked,
                          c->info, (int)c->threads);
}

void tm_dequantize(const tm_call *c) {
    k_dequantize(c->codes, (int)c->bits, c->n, c->mid, c->inner, c->gs, c->shift, c->scale_in,
                 (int)c->dtype, c->out, (int)c->threads);
}

void tm_scale(const tm_call *c) { k_scale(c->range, c->groups, (int)c->bits, c->scale); }

int64_t tm_span_flags(const tm_call *c) { return k_span_flags(c->lo, c->hi, c->groups); }

int64_t tm_ema(const tm_call *c) {
    return k_ema(c->lo, c->hi, c->shift, c->range, c->seen, c->groups, c->decay, c->used_shift,
                 c->used_range, c->shift_out, c->range_out, c->seen_out, c->marked, c->info);
}

float tm_two_level(const tm_call *c) {
    return k_two_level(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n);
}

void tm_pack_nonzero(const tm_call *c) {
    k_pack_nonzero(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->n, c->codes,
                   (int)c->threads);
}

void tm_unpack_nonzero(const tm_call *c) {
    k_unpack_nonzero(c->codes, c->n, (int)c->dtype, c->value, c->out, (int)c->threads);
}

void tm_quantize_blocks(const tm_call *c) {
    k_quantize_blocks(c->x, (int)c->dtype, (int)c->nd, c->sizes, c->strides, c->rows,
                      c->channels, c->block, (int)c->bits, (int)c->rotate, (int)c->e8m0,
                      c->signs, (int)c->stochastic, c->seed, c->codes, c->block_scales, c->ref,
                      c->info, (int)c->threads);
}

void tm_dequantize_blocks(const tm_call *c) {
    k_dequantize_blocks(c->codes, (int)c->bits, c->rows, c->channels, c->block, (int)c->rotate,
                        (int)c->e8m0, c->signs, c->block_scales, c->ref_in, (int)c->dtype,
                        c->out, (int)c->threads);
}
