/*
 * test_cpu_kernels.c - the reference CPU kernels against naive loops in
 * double, on the portable and the AVX2+FMA paths (which must agree within
 * 1e-5 relative), on 1 to 3 threads; and the thread pool itself.
 *
 * "Relative" for a dot product means relative to sum |a_i b_i|, the scale
 * its rounding error is proportional to (a result near zero from
 * cancellation has no meaningful relative error of its own).
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cpu/cpu.h"

#define REL_TOL 1e-5

static uint64_t rng_state = 12345;

static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / 4503599627370496.0 - 1.0);
}

static float *rand_vec(size_t n)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++)
        v[i] = frand();
    return v;
}

/* The paths to test: portable always, AVX2 when this CPU has it. */
static int paths(hx_cpu_path *out)
{
    int n = 0;
    out[n++] = HX_CPU_PATH_PORTABLE;
    if (hx_cpu_has_avx2())
        out[n++] = HX_CPU_PATH_AVX2;
    else
        print_message("AVX2+FMA not available here: testing the portable path only\n");
    return n;
}

static hx_cpu_pool *pool_of(int threads)
{
    hx_cpu_pool *p = NULL;
    hx_err err = {0};
    if (hx_cpu_pool_new(threads, &p, &err) != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_cpu_pool_threads(p), threads);
    return p;
}

/* ---- thread pool ------------------------------------------------------------------ */

#define MAX_CHUNKS 64

typedef struct count_job {
    atomic_int hits[MAX_CHUNKS];
    atomic_int calls;
    atomic_int bad; /* chunk, n_chunks or thread out of range */
    int n_chunks, threads;
} count_job;

static void count_task(void *p, int chunk, int n_chunks, int thread)
{
    count_job *j = p;
    if (chunk < 0 || chunk >= n_chunks || n_chunks != j->n_chunks || thread < 0 ||
        thread >= j->threads)
        atomic_fetch_add(&j->bad, 1);
    else
        atomic_fetch_add(&j->hits[chunk], 1);
    atomic_fetch_add(&j->calls, 1);
}

static void test_pool(void **state)
{
    (void)state;
    for (int threads = 1; threads <= 4; threads++) {
        hx_cpu_pool *p = pool_of(threads);
        static const int chunk_counts[] = {1, 2, 3, 7, 16, MAX_CHUNKS};
        for (size_t c = 0; c < sizeof chunk_counts / sizeof *chunk_counts; c++) {
            count_job j;
            memset(&j, 0, sizeof j);
            j.n_chunks = chunk_counts[c];
            j.threads = threads;
            const int rounds = 5000;
            for (int r = 0; r < rounds; r++)
                hx_cpu_pool_run(p, count_task, &j, j.n_chunks);
            assert_int_equal(atomic_load(&j.bad), 0);
            assert_int_equal(atomic_load(&j.calls), rounds * j.n_chunks);
            for (int k = 0; k < j.n_chunks; k++)
                assert_int_equal(atomic_load(&j.hits[k]), rounds);
        }
        /* let the workers fall asleep, then wake them again */
        struct timespec nap = {0, 20 * 1000 * 1000};
        nanosleep(&nap, NULL);
        count_job j;
        memset(&j, 0, sizeof j);
        j.n_chunks = 8;
        j.threads = threads;
        hx_cpu_pool_run(p, count_task, &j, 8);
        hx_cpu_pool_run(p, count_task, &j, 0); /* nothing */
        assert_int_equal(atomic_load(&j.calls), 8);
        hx_cpu_pool_free(p);
    }
    count_job j;
    memset(&j, 0, sizeof j);
    j.n_chunks = 3;
    j.threads = 1;
    hx_cpu_pool_run(NULL, count_task, &j, 3);
    assert_int_equal(atomic_load(&j.calls), 3);
    assert_int_equal(atomic_load(&j.bad), 0);
    assert_int_equal(hx_cpu_pool_threads(NULL), 1);
    hx_cpu_pool_free(NULL);
}

static void test_default_threads(void **state)
{
    (void)state;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 1)
        online = 1;
    assert_int_equal(setenv(HX_CPU_THREADS_ENV, "3", 1), 0);
    assert_int_equal(hx_cpu_default_threads(), 3);
    hx_cpu_pool *p = NULL;
    hx_err err = {0};
    assert_int_equal(hx_cpu_pool_new(0, &p, &err), HX_OK);
    assert_int_equal(hx_cpu_pool_threads(p), 3);
    hx_cpu_pool_free(p);
    assert_int_equal(setenv(HX_CPU_THREADS_ENV, "many", 1), 0);
    assert_int_equal(hx_cpu_default_threads(), online);
    assert_int_equal(setenv(HX_CPU_THREADS_ENV, "0", 1), 0);
    assert_int_equal(hx_cpu_default_threads(), online);
    assert_int_equal(unsetenv(HX_CPU_THREADS_ENV), 0);
    assert_int_equal(hx_cpu_default_threads(), online);
    assert_int_equal(hx_cpu_pool_new(100000, &p, &err), HX_EINVAL);
}

static void test_path_selection(void **state)
{
    (void)state;
    if (hx_cpu_has_avx2()) {
        assert_int_equal(hx_cpu_set_path(HX_CPU_PATH_AVX2), HX_OK);
        assert_int_equal(hx_cpu_get_path(), HX_CPU_PATH_AVX2);
    } else {
        assert_int_equal(hx_cpu_set_path(HX_CPU_PATH_AVX2), HX_ENOTSUP);
    }
    assert_int_equal(hx_cpu_set_path(HX_CPU_PATH_PORTABLE), HX_OK);
    assert_int_equal(hx_cpu_get_path(), HX_CPU_PATH_PORTABLE);
    assert_string_equal(hx_cpu_path_name(HX_CPU_PATH_AVX2), "avx2");
    assert_string_equal(hx_cpu_path_name(HX_CPU_PATH_PORTABLE), "portable");
}

/* ---- dot and matmul --------------------------------------------------------------------- */

static void test_dot(void **state)
{
    (void)state;
    hx_cpu_path ps[2];
    int np = paths(ps);
    static const int sizes[] = {0, 1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 48, 100, 288, 1000};
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int n = sizes[s];
        float *a = rand_vec((size_t)n), *b = rand_vec((size_t)n);
        double ref = 0, mag = 0;
        for (int i = 0; i < n; i++) {
            ref += (double)a[i] * b[i];
            mag += fabs((double)a[i] * b[i]);
        }
        float got[2];
        for (int p = 0; p < np; p++) {
            assert_int_equal(hx_cpu_set_path(ps[p]), HX_OK);
            got[p] = hx_cpu_dot(a, b, n);
            if (fabs(got[p] - ref) > REL_TOL * mag + 1e-30)
                fail_msg("dot n=%d path %s: %g vs %g", n, hx_cpu_path_name(ps[p]),
                         (double)got[p], ref);
        }
        if (np == 2 && fabs(got[0] - got[1]) > REL_TOL * mag + 1e-30)
            fail_msg("dot n=%d: portable %g vs avx2 %g", n, (double)got[0], (double)got[1]);
        free(a);
        free(b);
    }
}

typedef struct shape {
    int n, in, out;
} shape;

static const shape matmul_shapes[] = {
    {1, 1, 1},    {1, 7, 5},     {1, 8, 4},    {1, 288, 288}, {1, 288, 768}, {1, 768, 288},
    {3, 33, 13},  {2, 64, 130},  {5, 17, 9},   {7, 100, 1},   {4, 288, 64},  {1, 64, 32000},
    {9, 48, 50},  {2, 1000, 3},  {6, 16, 16},
};

/* y_ref[n][out] in double, and the magnitudes sum |x w| per element. */
static void matmul_ref(const float *x, const float *w, int n, int in, int out, double *ref,
                       double *mag)
{
    for (int t = 0; t < n; t++)
        for (int r = 0; r < out; r++) {
            double s = 0, m = 0;
            for (int i = 0; i < in; i++) {
                double p = (double)x[(size_t)t * in + i] * w[(size_t)r * in + i];
                s += p;
                m += fabs(p);
            }
            ref[(size_t)t * out + r] = s;
            mag[(size_t)t * out + r] = m;
        }
}

static void test_matmul(void **state)
{
    (void)state;
    hx_cpu_path ps[2];
    int np = paths(ps);
    hx_cpu_pool *pools[3] = {NULL, pool_of(2), pool_of(3)};
    for (size_t s = 0; s < sizeof matmul_shapes / sizeof *matmul_shapes; s++) {
        const shape sh = matmul_shapes[s];
        size_t ny = (size_t)sh.n * sh.out;
        float *x = rand_vec((size_t)sh.n * sh.in), *w = rand_vec((size_t)sh.out * sh.in);
        double *ref = malloc(ny * sizeof *ref), *mag = malloc(ny * sizeof *mag);
        float *y[2] = {malloc(ny * sizeof(float)), malloc(ny * sizeof(float))};
        assert_true(ref && mag && y[0] && y[1]);
        matmul_ref(x, w, sh.n, sh.in, sh.out, ref, mag);
        for (int pi = 0; pi < 3; pi++) {
            for (int p = 0; p < np; p++) {
                assert_int_equal(hx_cpu_set_path(ps[p]), HX_OK);
                for (size_t k = 0; k < ny; k++)
                    y[p][k] = NAN; /* every element must be written */
                hx_cpu_matmul(pools[pi], y[p], x, w, sh.n, sh.in, sh.out);
                for (size_t k = 0; k < ny; k++)
                    if (!(fabs(y[p][k] - ref[k]) <= REL_TOL * mag[k] + 1e-30))
                        fail_msg("matmul %dx%dx%d %s, %d threads: y[%zu] %g vs %g", sh.n,
                                 sh.in, sh.out, hx_cpu_path_name(ps[p]),
                                 hx_cpu_pool_threads(pools[pi]), k, (double)y[p][k], ref[k]);
            }
            if (np == 2)
                for (size_t k = 0; k < ny; k++)
                    if (!(fabs(y[0][k] - y[1][k]) <= REL_TOL * mag[k] + 1e-30))
                        fail_msg("matmul %dx%dx%d: portable %g vs avx2 %g at %zu", sh.n, sh.in,
                                 sh.out, (double)y[0][k], (double)y[1][k], k);
        }
        free(x);
        free(w);
        free(ref);
        free(mag);
        free(y[0]);
        free(y[1]);
    }
    hx_cpu_pool_free(pools[1]);
    hx_cpu_pool_free(pools[2]);
}

static void test_matmul_many(void **state)
{
    (void)state;
    hx_cpu_path ps[2];
    int np = paths(ps);
    hx_cpu_pool *pool = pool_of(3);
    const int n = 3, in = 40;
    const int outs[3] = {18, 5, 33};
    float *x = rand_vec((size_t)n * in);
    float *w[3], *y[3], *ys[3];
    for (int i = 0; i < 3; i++) {
        w[i] = rand_vec((size_t)outs[i] * in);
        y[i] = malloc((size_t)n * outs[i] * sizeof(float));
        ys[i] = malloc((size_t)n * outs[i] * sizeof(float));
    }
    for (int p = 0; p < np; p++) {
        assert_int_equal(hx_cpu_set_path(ps[p]), HX_OK);
        hx_cpu_linear mats[3] = {{y[0], w[0], outs[0]}, {y[1], w[1], outs[1]},
                                 {y[2], w[2], outs[2]}};
        hx_cpu_matmul_many(pool, x, n, in, mats, 3);
        for (int i = 0; i < 3; i++) {
            hx_cpu_matmul(NULL, ys[i], x, w[i], n, in, outs[i]);
            double *ref = malloc((size_t)n * outs[i] * sizeof *ref);
            double *mag = malloc((size_t)n * outs[i] * sizeof *mag);
            matmul_ref(x, w[i], n, in, outs[i], ref, mag);
            for (int k = 0; k < n * outs[i]; k++) {
                assert_true(fabs(y[i][k] - ref[k]) <= REL_TOL * mag[k] + 1e-30);
                assert_true(fabs(y[i][k] - ys[i][k]) <= REL_TOL * mag[k] + 1e-30);
            }
            free(ref);
            free(mag);
        }
    }
    for (int i = 0; i < 3; i++) {
        free(w[i]);
        free(y[i]);
        free(ys[i]);
    }
    free(x);
    hx_cpu_pool_free(pool);
}

/* ---- elementwise ------------------------------------------------------------------------- */

static void test_rmsnorm(void **state)
{
    (void)state;
    static const int dims[] = {1, 5, 16, 64, 288, 301};
    for (size_t s = 0; s < sizeof dims / sizeof *dims; s++) {
        int d = dims[s];
        float *x = rand_vec((size_t)d), *w = rand_vec((size_t)d), *y = rand_vec((size_t)d);
        double ss = 0;
        for (int i = 0; i < d; i++)
            ss += (double)x[i] * x[i];
        double scale = 1.0 / sqrt(ss / d + 1e-5);
        hx_cpu_rmsnorm(y, x, w, d, 1e-5f);
        for (int i = 0; i < d; i++) {
            double ref = x[i] * scale * w[i];
            assert_true(fabs(y[i] - ref) <= 1e-5 * (1 + fabs(ref)));
        }
        hx_cpu_rmsnorm(x, x, w, d, 1e-5f); /* in place */
        for (int i = 0; i < d; i++)
            assert_true(x[i] == y[i]);
        free(x);
        free(w);
        free(y);
    }
}

static void test_rope(void **state)
{
    (void)state;
    const int heads = 3, d = 16, half = d / 2;
    const double theta = 10000.0;
    float cs[8], sn[8];
    hx_cpu_rope_angles(cs, sn, d, 0, theta);
    for (int i = 0; i < half; i++)
        assert_true(cs[i] == 1.0f && sn[i] == 0.0f);
    for (int pos = 0; pos < 50; pos += 7) {
        float *x = rand_vec((size_t)heads * d);
        float *orig = malloc((size_t)heads * d * sizeof *orig);
        memcpy(orig, x, (size_t)heads * d * sizeof *x);
        hx_cpu_rope_angles(cs, sn, d, pos, theta);
        hx_cpu_rope(x, heads, d, cs, sn);
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++) {
                /* HF: q * cos + rotate_half(q) * sin, rotate_half(q) = [-q2, q1] */
                double f = pos * pow(theta, -2.0 * i / d);
                double a = orig[h * d + i], b = orig[h * d + i + half];
                double ra = a * cos(f) - b * sin(f), rb = b * cos(f) + a * sin(f);
                assert_true(fabs(x[h * d + i] - ra) < 1e-5);
                assert_true(fabs(x[h * d + i + half] - rb) < 1e-5);
            }
        free(x);
        free(orig);
    }
}

static void test_swiglu_softmax_add(void **state)
{
    (void)state;
    const int n = 37;
    float *g = rand_vec(n), *u = rand_vec(n), *o = rand_vec(n);
    for (int i = 0; i < n; i++)
        g[i] *= 8;
    hx_cpu_swiglu(o, g, u, n);
    for (int i = 0; i < n; i++) {
        double ref = g[i] / (1 + exp(-(double)g[i])) * u[i];
        assert_true(fabs(o[i] - ref) <= 1e-6 * (1 + fabs(ref)));
    }
    hx_cpu_swiglu(g, g, u, n); /* in place */
    for (int i = 0; i < n; i++)
        assert_true(g[i] == o[i]);

    float big[4] = {1000.0f, 1001.0f, 999.0f, -1e30f};
    hx_cpu_softmax(big, 4);
    double e0 = exp(-1.0), e2 = exp(-2.0), sum = e0 + 1 + e2;
    assert_true(fabs(big[0] - e0 / sum) < 1e-6);
    assert_true(fabs(big[1] - 1 / sum) < 1e-6);
    assert_true(fabs(big[2] - e2 / sum) < 1e-6);
    assert_true(big[3] == 0.0f);
    float one[1] = {-5};
    hx_cpu_softmax(one, 1);
    assert_true(one[0] == 1.0f);

    float y[3] = {1, 2, 3}, x[3] = {0.5f, -2, 10};
    hx_cpu_add(y, x, 3);
    assert_true(y[0] == 1.5f && y[1] == 0.0f && y[2] == 13.0f);
    free(g);
    free(u);
    free(o);
}

/* ---- attention ---------------------------------------------------------------------------- */

static void attention_case(int n_tokens, int pos0, int H, int K, int d, int T)
{
    hx_cpu_path ps[2];
    int np = paths(ps);
    const int keys = pos0 + n_tokens;
    float *q = rand_vec((size_t)n_tokens * H * d);
    float *kc = rand_vec((size_t)K * T * d), *vc = rand_vec((size_t)K * T * d);
    for (size_t i = 0; i < (size_t)n_tokens * H * d; i++)
        q[i] *= 3; /* peakier softmax */
    float *out = malloc((size_t)n_tokens * H * d * sizeof *out);
    float *scratch = malloc((size_t)3 * T * sizeof *scratch);
    double *ref = calloc((size_t)n_tokens * H * d, sizeof *ref);
    double *att = malloc((size_t)T * sizeof *att);
    assert_true(out && scratch && ref && att);
    for (int t = 0; t < n_tokens; t++)
        for (int h = 0; h < H; h++) {
            int kh = h / (H / K), nk = pos0 + t + 1;
            const float *qv = q + ((size_t)t * H + h) * d;
            double mx = -INFINITY, sum = 0;
            for (int s = 0; s < nk; s++) {
                double dot = 0;
                for (int i = 0; i < d; i++)
                    dot += (double)qv[i] * kc[((size_t)kh * T + s) * d + i];
                att[s] = dot / sqrt((double)d);
                mx = att[s] > mx ? att[s] : mx;
            }
            for (int s = 0; s < nk; s++)
                sum += att[s] = exp(att[s] - mx);
            for (int s = 0; s < nk; s++)
                for (int i = 0; i < d; i++)
                    ref[((size_t)t * H + h) * d + i] +=
                        att[s] / sum * vc[((size_t)kh * T + s) * d + i];
        }
    (void)keys;
    for (int threads = 1; threads <= 3; threads++) {
        hx_cpu_pool *pool = threads > 1 ? pool_of(threads) : NULL;
        for (int p = 0; p < np; p++) {
            assert_int_equal(hx_cpu_set_path(ps[p]), HX_OK);
            hx_cpu_attention(pool, out, q, kc, vc, n_tokens, pos0, H, K, d, T, scratch);
            for (size_t i = 0; i < (size_t)n_tokens * H * d; i++)
                if (!(fabs(out[i] - ref[i]) < 1e-5))
                    fail_msg("attention n=%d pos0=%d H=%d K=%d d=%d %s %d threads: [%zu] %g vs "
                             "%g",
                             n_tokens, pos0, H, K, d, hx_cpu_path_name(ps[p]), threads, i,
                             (double)out[i], ref[i]);
        }
        hx_cpu_pool_free(pool);
    }
    free(q);
    free(kc);
    free(vc);
    free(out);
    free(scratch);
    free(ref);
    free(att);
}

static void test_attention(void **state)
{
    (void)state;
    attention_case(1, 0, 4, 2, 8, 16);   /* first token: attends to itself */
    attention_case(1, 9, 4, 2, 8, 16);   /* decode */
    attention_case(4, 3, 4, 2, 8, 16);   /* causal prefill chunk after 3 cached */
    attention_case(5, 0, 6, 6, 48, 64);  /* no GQA, stories15M head_dim */
    attention_case(3, 60, 8, 1, 16, 64); /* multi-query */
    attention_case(2, 200, 4, 2, 32, 256);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_default_threads),
        cmocka_unit_test(test_path_selection),
        cmocka_unit_test(test_dot),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_many),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_swiglu_softmax_add),
        cmocka_unit_test(test_attention),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
