/*
 * cpu.c - reference CPU kernels (fp32) and their thread pool.
 */
#define _POSIX_C_SOURCE 200809L
#include "kernels/cpu/cpu.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define HX_CPU_X86 1
#include <immintrin.h>
#endif

/* ---- thread pool ------------------------------------------------------------------- */

/*
 * A job is n_chunks chunks that the caller and the workers claim one at a
 * time from a shared ticket (generation << 32 | next chunk), so a worker that
 * is slow to wake (descheduled, or sleeping) never holds a job up: the others
 * take its chunks. The caller returns once every chunk has run.
 *
 * A worker that wakes so late that its job is over finds the ticket's
 * generation changed and claims nothing. Job descriptors alternate between
 * two slots, so the caller never rewrites the slot a late worker may still be
 * reading (and the fields are atomics, so such a read is not a data race).
 *
 * Waiting: a worker spins for the next job for SPIN_NS (decode runs a job
 * every few microseconds), then sleeps on a condition variable. The caller,
 * waiting for chunks that workers are running, spins and, after
 * PURE_SPIN_NS, yields between pauses in case a worker lost its CPU.
 */
#define PURE_SPIN_NS 20000
#define SPIN_NS 200000
#define CHECK_EVERY 64

static inline void cpu_relax(void)
{
#ifdef HX_CPU_X86
    __builtin_ia32_pause();
#endif
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

typedef struct pool_job {
    _Atomic(hx_cpu_task_fn) fn;
    _Atomic(void *) ctx;
    atomic_int n_chunks;
} pool_job;

struct hx_cpu_pool {
    int n_threads;             /* the caller's included */
    pthread_t *workers;        /* owned, [n_threads - 1] */
    int n_started;             /* workers actually running */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint generation;    /* bumped (under mu) to publish a job */
    int sleepers;              /* workers waiting on cv (under mu) */
    atomic_int stop;
    pool_job jobs[2];          /* job g lives in jobs[g & 1] */
    _Atomic uint64_t ticket;   /* (generation << 32) | next chunk to claim */
    atomic_int done;           /* chunks of the current job finished */
};

typedef struct worker_arg {
    hx_cpu_pool *pool;
    int thread;
} worker_arg;

/* Claims and runs chunks of job `gen` until none is left. */
static void run_chunks(hx_cpu_pool *pool, unsigned gen, int thread)
{
    /*
     * Acquire: should a field already hold a later job's value (this worker
     * woke very late), the ticket read below is at least that job's
     * predecessor's, so its generation differs and nothing is claimed.
     */
    pool_job *j = &pool->jobs[gen & 1];
    hx_cpu_task_fn fn = atomic_load_explicit(&j->fn, memory_order_acquire);
    void *ctx = atomic_load_explicit(&j->ctx, memory_order_acquire);
    int n = atomic_load_explicit(&j->n_chunks, memory_order_acquire);
    uint64_t t = atomic_load_explicit(&pool->ticket, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(t >> 32) != (uint32_t)gen || (int)(uint32_t)t >= n)
            return;
        if (!atomic_compare_exchange_weak_explicit(&pool->ticket, &t, t + 1,
                                                   memory_order_acq_rel, memory_order_acquire))
            continue; /* t now holds the current ticket */
        fn(ctx, (int)(uint32_t)t, n, thread);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        t = atomic_load_explicit(&pool->ticket, memory_order_acquire);
    }
}

static void *worker_main(void *p)
{
    worker_arg a = *(worker_arg *)p;
    free(p);
    hx_cpu_pool *pool = a.pool;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        unsigned spins = 0;
        long long start = 0;
        while ((g = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen) {
            if (++spins % CHECK_EVERY != 0) {
                cpu_relax();
                continue;
            }
            long long t = now_ns();
            if (start == 0)
                start = t;
            if (t - start < SPIN_NS)
                continue;
            pthread_mutex_lock(&pool->mu);
            pool->sleepers++;
            while ((g = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool->cv, &pool->mu);
            pool->sleepers--;
            pthread_mutex_unlock(&pool->mu);
            break;
        }
        seen = g;
        if (atomic_load_explicit(&pool->stop, memory_order_acquire))
            return NULL;
        run_chunks(pool, g, a.thread);
    }
}

int hx_cpu_default_threads(void)
{
    const char *s = getenv(HX_CPU_THREADS_ENV);
    if (s && *s) {
        char *end = NULL;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (!errno && end != s && *end == '\0' && v >= 1 && v <= HX_CPU_MAX_THREADS)
            return (int)v;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        return 1;
    return n > HX_CPU_MAX_THREADS ? HX_CPU_MAX_THREADS : (int)n;
}

hx_status hx_cpu_pool_new(int threads, hx_cpu_pool **out, hx_err *err)
{
    if (threads <= 0)
        threads = hx_cpu_default_threads();
    if (threads > HX_CPU_MAX_THREADS)
        return hx_err_set(err, HX_EINVAL, "thread pool: %d threads (at most %d)", threads,
                          HX_CPU_MAX_THREADS);
    hx_cpu_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return hx_err_set(err, HX_ENOMEM, "thread pool: out of memory");
    pool->n_threads = threads;
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->done, 0);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->ticket, 0);
    for (int i = 0; i < 2; i++) {
        atomic_init(&pool->jobs[i].fn, NULL);
        atomic_init(&pool->jobs[i].ctx, NULL);
        atomic_init(&pool->jobs[i].n_chunks, 0);
    }
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    if (threads > 1) {
        pool->workers = calloc((size_t)threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            hx_cpu_pool_free(pool);
            return hx_err_set(err, HX_ENOMEM, "thread pool: out of memory");
        }
    }
    for (int i = 1; i < threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) {
            hx_cpu_pool_free(pool);
            return hx_err_set(err, HX_ENOMEM, "thread pool: out of memory");
        }
        *a = (worker_arg){pool, i};
        int rc = pthread_create(&pool->workers[i - 1], NULL, worker_main, a);
        if (rc != 0) {
            free(a);
            hx_cpu_pool_free(pool);
            return hx_err_set(err, HX_EIO, "thread pool: cannot start thread %d of %d: %s", i,
                              threads, strerror(rc));
        }
        pool->n_started++;
    }
    *out = pool;
    return HX_OK;
}

void hx_cpu_pool_free(hx_cpu_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    atomic_store_explicit(&pool->stop, 1, memory_order_release);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->workers[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->workers);
    free(pool);
}

int hx_cpu_pool_threads(const hx_cpu_pool *pool)
{
    return pool ? pool->n_threads : 1;
}

void hx_cpu_pool_run(hx_cpu_pool *pool, hx_cpu_task_fn fn, void *ctx, int n_chunks)
{
    if (n_chunks <= 0)
        return;
    if (!pool || pool->n_threads == 1 || n_chunks == 1) {
        for (int c = 0; c < n_chunks; c++)
            fn(ctx, c, n_chunks, 0);
        return;
    }
    unsigned gen = atomic_load_explicit(&pool->generation, memory_order_relaxed) + 1;
    pool_job *j = &pool->jobs[gen & 1];
    atomic_store_explicit(&j->fn, fn, memory_order_release);
    atomic_store_explicit(&j->ctx, ctx, memory_order_release);
    atomic_store_explicit(&j->n_chunks, n_chunks, memory_order_release);
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->ticket, (uint64_t)(uint32_t)gen << 32, memory_order_release);
    pthread_mutex_lock(&pool->mu);
    atomic_store_explicit(&pool->generation, gen, memory_order_release);
    if (pool->sleepers > 0)
        pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);

    run_chunks(pool, gen, 0);

    unsigned spins = 0;
    long long start = 0;
    while (atomic_load_explicit(&pool->done, memory_order_acquire) < n_chunks) {
        if (++spins % CHECK_EVERY != 0) {
            cpu_relax();
            continue;
        }
        long long t = now_ns();
        if (start == 0)
            start = t;
        if (t - start >= PURE_SPIN_NS)
            sched_yield(); /* a worker running a chunk may be waiting for this CPU */
    }
}

/* ---- instruction-set path ---------------------------------------------------------- */

static int path_selected = -1; /* hx_cpu_path, or -1 before the first use */
static pthread_once_t path_once = PTHREAD_ONCE_INIT;
static int have_avx2;

static void detect(void)
{
#ifdef HX_CPU_X86
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    have_avx2 = 0;
#endif
    if (path_selected < 0)
        path_selected = have_avx2 ? HX_CPU_PATH_AVX2 : HX_CPU_PATH_PORTABLE;
}

int hx_cpu_has_avx2(void)
{
    pthread_once(&path_once, detect);
    return have_avx2;
}

hx_status hx_cpu_set_path(hx_cpu_path path)
{
    pthread_once(&path_once, detect);
    if (path == HX_CPU_PATH_AVX2 && !have_avx2)
        return HX_ENOTSUP;
    if (path != HX_CPU_PATH_AVX2 && path != HX_CPU_PATH_PORTABLE)
        return HX_EINVAL;
    path_selected = (int)path;
    return HX_OK;
}

hx_cpu_path hx_cpu_get_path(void)
{
    pthread_once(&path_once, detect);
    return (hx_cpu_path)path_selected;
}

const char *hx_cpu_path_name(hx_cpu_path path)
{
    return path == HX_CPU_PATH_AVX2 ? "avx2" : "portable";
}

static inline int use_avx2(void)
{
    return hx_cpu_get_path() == HX_CPU_PATH_AVX2;
}

/* ---- portable dot products ---------------------------------------------------------- */

/*
 * LANES independent partial sums: gcc -O3 turns the lane loop into vector
 * multiplies and adds of the widest width -march allows (8 SSE registers,
 * 4 AVX or 2 AVX-512 ones: several independent chains) without needing
 * -ffast-math, since the order of additions is written out. Then 8 lanes,
 * then a scalar tail.
 */
#define LANES 32

static inline float hsum8(const float *h)
{
    return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

static float dot_portable(const float *restrict a, const float *restrict b, int n)
{
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += a[i + l] * b[i + l];
    float acc8[8];
    for (int l = 0; l < 8; l++)
        acc8[l] = (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc8[l] += a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; i++)
        tail += a[i] * b[i];
    return hsum8(acc8) + tail;
}

/* ---- AVX2 + FMA dot products ------------------------------------------------------------ */

#ifdef HX_CPU_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum256(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

AVX2 static float dot_avx2(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float tail = 0.0f;
    for (; i < n; i++)
        tail += a[i] * b[i];
    return hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))) + tail;
}

/* Four rows of W against one x. */
AVX2 static void dot4_avx2(const float *w0, const float *w1, const float *w2, const float *w3,
                           const float *x, int n, float *out)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), x0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), x0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), x0, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i + 8), x1, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i + 8), x1, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i + 8), x1, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i + 8), x1, b3);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 x0 = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), x0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), x0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), x0, a3);
    }
    float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (; i < n; i++) {
        t0 += w0[i] * x[i];
        t1 += w1[i] * x[i];
        t2 += w2[i] * x[i];
        t3 += w3[i] * x[i];
    }
    out[0] = hsum256(_mm256_add_ps(a0, b0)) + t0;
    out[1] = hsum256(_mm256_add_ps(a1, b1)) + t1;
    out[2] = hsum256(_mm256_add_ps(a2, b2)) + t2;
    out[3] = hsum256(_mm256_add_ps(a3, b3)) + t3;
}

/* Four rows of W against two x: out0[r] = w_r . x0, out1[r] = w_r . x1 */
AVX2 static void dot4x2_avx2(const float *w0, const float *w1, const float *w2,
                             const float *w3, const float *x0, const float *x1, int n,
                             float *out0, float *out1)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i);
        __m256 r0 = _mm256_loadu_ps(w0 + i), r1 = _mm256_loadu_ps(w1 + i);
        __m256 r2 = _mm256_loadu_ps(w2 + i), r3 = _mm256_loadu_ps(w3 + i);
        a0 = _mm256_fmadd_ps(r0, u, a0);
        a1 = _mm256_fmadd_ps(r1, u, a1);
        a2 = _mm256_fmadd_ps(r2, u, a2);
        a3 = _mm256_fmadd_ps(r3, u, a3);
        b0 = _mm256_fmadd_ps(r0, v, b0);
        b1 = _mm256_fmadd_ps(r1, v, b1);
        b2 = _mm256_fmadd_ps(r2, v, b2);
        b3 = _mm256_fmadd_ps(r3, v, b3);
    }
    float t[8] = {0};
    for (; i < n; i++) {
        t[0] += w0[i] * x0[i];
        t[1] += w1[i] * x0[i];
        t[2] += w2[i] * x0[i];
        t[3] += w3[i] * x0[i];
        t[4] += w0[i] * x1[i];
        t[5] += w1[i] * x1[i];
        t[6] += w2[i] * x1[i];
        t[7] += w3[i] * x1[i];
    }
    out0[0] = hsum256(a0) + t[0];
    out0[1] = hsum256(a1) + t[1];
    out0[2] = hsum256(a2) + t[2];
    out0[3] = hsum256(a3) + t[3];
    out1[0] = hsum256(b0) + t[4];
    out1[1] = hsum256(b1) + t[5];
    out1[2] = hsum256(b2) + t[6];
    out1[3] = hsum256(b3) + t[7];
}
#endif /* HX_CPU_X86 */

float hx_cpu_dot(const float *a, const float *b, int n)
{
#ifdef HX_CPU_X86
    if (use_avx2())
        return dot_avx2(a, b, n);
#endif
    return dot_portable(a, b, n);
}

/* ---- matmul --------------------------------------------------------------------------- */

/*
 * Rows [r0, r1) of y = x W^T: one row of W at a time against every token,
 * so the row stays in L1 while the tokens pass.
 */
static void matmul_rows_portable(float *y, const float *x, const float *w, int n, int in,
                                 int out, int r0, int r1)
{
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < n; t++)
            y[(size_t)t * out + r] = dot_portable(x + (size_t)t * in, w + (size_t)r * in, in);
}

#ifdef HX_CPU_X86
AVX2 static void matmul_rows_avx2(float *y, const float *x, const float *w, int n, int in,
                                  int out, int r0, int r1)
{
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = w + (size_t)r * in;
        const float *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        int t = 0;
        for (; t + 2 <= n; t += 2) {
            float o0[4], o1[4];
            dot4x2_avx2(w0, w1, w2, w3, x + (size_t)t * in, x + (size_t)(t + 1) * in, in, o0,
                        o1);
            memcpy(y + (size_t)t * out + r, o0, sizeof o0);
            memcpy(y + (size_t)(t + 1) * out + r, o1, sizeof o1);
        }
        for (; t < n; t++) {
            float o[4];
            dot4_avx2(w0, w1, w2, w3, x + (size_t)t * in, in, o);
            memcpy(y + (size_t)t * out + r, o, sizeof o);
        }
    }
    for (; r < r1; r++)
        for (int t = 0; t < n; t++)
            y[(size_t)t * out + r] = dot_avx2(x + (size_t)t * in, w + (size_t)r * in, in);
}
#endif

typedef struct matmul_job {
    const float *x;
    int n, in;
    const hx_cpu_linear *mats;
    int n_mats;
    int total_rows;
    int avx2;
} matmul_job;

static void matmul_rows(const matmul_job *j, const hx_cpu_linear *m, int r0, int r1)
{
#ifdef HX_CPU_X86
    if (j->avx2) {
        matmul_rows_avx2(m->y, j->x, m->w, j->n, j->in, m->out, r0, r1);
        return;
    }
#endif
    matmul_rows_portable(m->y, j->x, m->w, j->n, j->in, m->out, r0, r1);
}

/* Chunk `chunk` of n takes rows [g0, g1) of the matrices stacked on top of each other. */
static void matmul_task(void *p, int chunk, int n_chunks, int thread)
{
    (void)thread;
    const matmul_job *j = p;
    /* split on multiples of 4 rows so that the 4-row kernels do the work */
    int blocks = (j->total_rows + 3) / 4;
    int g0 = (int)((long long)blocks * chunk / n_chunks) * 4;
    int g1 = (int)((long long)blocks * (chunk + 1) / n_chunks) * 4;
    if (g1 > j->total_rows)
        g1 = j->total_rows;
    int base = 0;
    for (int i = 0; i < j->n_mats && base < g1; i++) {
        const hx_cpu_linear *m = &j->mats[i];
        int r0 = g0 - base, r1 = g1 - base;
        if (r0 < 0)
            r0 = 0;
        if (r1 > m->out)
            r1 = m->out;
        if (r0 < r1)
            matmul_rows(j, m, r0, r1);
        base += m->out;
    }
}

/* Chunks per thread: a few, so that a slow thread's share is taken by others. */
#define CHUNKS_PER_THREAD 4

/* Below this many multiply-adds a job is not worth waking the workers for. */
#define MATMUL_SERIAL_MACS 16384

void hx_cpu_matmul_many(hx_cpu_pool *pool, const float *x, int n, int in,
                        const hx_cpu_linear *mats, int n_mats)
{
    matmul_job j = {x, n, in, mats, n_mats, 0, use_avx2()};
    for (int i = 0; i < n_mats; i++)
        j.total_rows += mats[i].out;
    int blocks = (j.total_rows + 3) / 4;
    int chunks = hx_cpu_pool_threads(pool) * CHUNKS_PER_THREAD;
    if (chunks > blocks)
        chunks = blocks;
    if ((double)n * in * j.total_rows < MATMUL_SERIAL_MACS)
        chunks = 1;
    hx_cpu_pool_run(pool, matmul_task, &j, chunks);
}

void hx_cpu_matmul(hx_cpu_pool *pool, float *y, const float *x, const float *w, int n, int in,
                   int out)
{
    hx_cpu_linear m = {y, w, out};
    hx_cpu_matmul_many(pool, x, n, in, &m, 1);
}

/* ---- elementwise ----------------------------------------------------------------------- */

void hx_cpu_rmsnorm(float *y, const float *x, const float *w, int dim, float eps)
{
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= dim; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += x[i + l] * x[i + l];
    float ss = 0.0f;
    for (; i < dim; i++)
        ss += x[i] * x[i];
    for (int l = 0; l < LANES; l++)
        ss += acc[l];
    float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (i = 0; i < dim; i++)
        y[i] = x[i] * scale * w[i];
}

void hx_cpu_rope_angles(float *cos_out, float *sin_out, int head_dim, int pos, double theta)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        double inv_freq = pow(theta, -(double)(2 * i) / (double)head_dim);
        double a = (double)pos * inv_freq;
        cos_out[i] = (float)cos(a);
        sin_out[i] = (float)sin(a);
    }
}

void hx_cpu_rope(float *x, int n_heads, int head_dim, const float *cos_in, const float *sin_in)
{
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *restrict a = x + (size_t)h * head_dim;
        float *restrict b = a + half;
        for (int i = 0; i < half; i++) {
            float ai = a[i], bi = b[i];
            a[i] = ai * cos_in[i] - bi * sin_in[i];
            b[i] = bi * cos_in[i] + ai * sin_in[i];
        }
    }
}

void hx_cpu_swiglu(float *out, const float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void hx_cpu_softmax(float *x, int n)
{
    float mx = x[0];
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void hx_cpu_add(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i++)
        y[i] += x[i];
}

/* ---- attention ---------------------------------------------------------------------------- */

typedef struct attn_job {
    float *out;
    const float *q, *k, *v;
    int n_tokens, pos0, n_heads, kv_heads, head_dim, max_tokens;
    float *scratch;
    int avx2;
} attn_job;

static void attn_task(void *p, int chunk, int n_chunks, int thread)
{
    const attn_job *j = p;
    int pairs = j->n_tokens * j->n_heads;
    int p0 = (int)((long long)pairs * chunk / n_chunks);
    int p1 = (int)((long long)pairs * (chunk + 1) / n_chunks);
    float *att = j->scratch + (size_t)thread * j->max_tokens; /* [max_tokens] */
    const int d = j->head_dim;
    const int group = j->n_heads / j->kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    for (int pi = p0; pi < p1; pi++) {
        int t = pi / j->n_heads, h = pi % j->n_heads;
        int n_keys = j->pos0 + t + 1;
        const float *q = j->q + ((size_t)t * j->n_heads + h) * d;
        const float *kh = j->k + (size_t)(h / group) * j->max_tokens * d; /* [max_tokens][d] */
        const float *vh = j->v + (size_t)(h / group) * j->max_tokens * d;
        for (int s = 0; s < n_keys; s++) {
#ifdef HX_CPU_X86
            if (j->avx2) {
                att[s] = dot_avx2(q, kh + (size_t)s * d, d) * scale;
                continue;
            }
#endif
            att[s] = dot_portable(q, kh + (size_t)s * d, d) * scale;
        }
        hx_cpu_softmax(att, n_keys);
        float *restrict o = j->out + ((size_t)t * j->n_heads + h) * d;
        memset(o, 0, (size_t)d * sizeof *o);
        for (int s = 0; s < n_keys; s++) {
            const float *restrict vs = vh + (size_t)s * d;
            float a = att[s];
            for (int i = 0; i < d; i++)
                o[i] += a * vs[i];
        }
    }
}

void hx_cpu_attention(hx_cpu_pool *pool, float *out, const float *q, const float *k_cache,
                      const float *v_cache, int n_tokens, int pos0, int n_heads, int kv_heads,
                      int head_dim, int max_tokens, float *scratch)
{
    attn_job j = {out,      q,        k_cache,  v_cache,    n_tokens, pos0,
                  n_heads,  kv_heads, head_dim, max_tokens, scratch,  use_avx2()};
    int pairs = n_tokens * n_heads;
    int chunks = hx_cpu_pool_threads(pool) * CHUNKS_PER_THREAD;
    if (chunks > pairs)
        chunks = pairs;
    if ((double)n_tokens * n_heads * (pos0 + n_tokens) * head_dim < MATMUL_SERIAL_MACS)
        chunks = 1;
    hx_cpu_pool_run(pool, attn_task, &j, chunks);
}
