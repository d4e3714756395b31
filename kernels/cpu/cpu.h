/*
 * cpu.h - reference CPU kernels in fp32, and the thread pool they run on.
 *
 * These kernels are the oracle the CUDA kernels are tested against, and the
 * compute of the `cpu` backend. Everything is fp32, row-major, and follows
 * Hugging Face's Llama conventions:
 *
 *   - a Linear weight is stored [out][in] (row-major), so y = x W^T;
 *   - RoPE rotates pairs (i, i + head_dim/2) ("rotate half"), with
 *     inv_freq[i] = theta^(-2i / head_dim);
 *   - grouped-query attention: query head h reads KV head h / (heads / kv_heads).
 *
 * Threads: kernels that take an hx_cpu_pool split their work over its
 * threads (the caller's thread is one of them); a NULL pool runs on the
 * caller's thread alone. A pool runs one job at a time: do not call kernels
 * on the same pool from two threads at once.
 *
 * Instruction sets: the matmul and dot product have a portable path (plain C
 * written so that gcc -O3 vectorises it for whatever -march it is given) and,
 * on x86-64, an AVX2+FMA path compiled with a target attribute and chosen at
 * run time when the CPU has AVX2 and FMA. The two agree to rounding (the FMA
 * path rounds once per multiply-add, the portable path twice).
 *
 * Pointers: every array is borrowed (caller-owned) and must not alias unless
 * the function says so; shapes are given in comments, e.g. [n][in].
 */
#ifndef HX_CPU_H
#define HX_CPU_H

#include "common/status.h"

/* Environment variable that sets the default thread count. */
#define HX_CPU_THREADS_ENV "HEXFLOW_THREADS"
#define HX_CPU_MAX_THREADS 256

/* ---- thread pool ----------------------------------------------------------------- */

typedef struct hx_cpu_pool hx_cpu_pool; /* opaque */

/*
 * The default thread count: $HEXFLOW_THREADS when it is an integer in
 * [1, HX_CPU_MAX_THREADS], else the number of online CPUs (at least 1).
 */
int hx_cpu_default_threads(void);

/*
 * Starts a pool of `threads` threads in all, the caller's included (so
 * threads - 1 workers are created, once). threads <= 0 means
 * hx_cpu_default_threads(). Workers spin briefly after a job, then sleep.
 * *out is freed with hx_cpu_pool_free.
 */
hx_status hx_cpu_pool_new(int threads, hx_cpu_pool **out, hx_err *err);

/* Stops and joins the workers; NULL is a no-op. */
void hx_cpu_pool_free(hx_cpu_pool *pool);

/* Threads in the pool, the caller's included; 1 for NULL. */
int hx_cpu_pool_threads(const hx_cpu_pool *pool);

/*
 * A job's chunk: fn(ctx, chunk, n_chunks, thread) does chunk `chunk` of
 * n_chunks; `thread` in [0, threads) names the thread running it (0 is the
 * caller's), for per-thread scratch space.
 */
typedef void (*hx_cpu_task_fn)(void *ctx, int chunk, int n_chunks, int thread);

/*
 * Runs every chunk in [0, n_chunks) once, spread over the pool's threads:
 * threads claim chunks one at a time, so a thread that is slow to start
 * (descheduled, waking up) leaves its share to the others. Returns when all
 * chunks are done. NULL pool (or n_chunks == 1): all chunks on the caller's
 * thread, in order. Chunks of one job may run concurrently; a pool runs one
 * job at a time (do not call it from two threads at once).
 */
void hx_cpu_pool_run(hx_cpu_pool *pool, hx_cpu_task_fn fn, void *ctx, int n_chunks);

/* ---- instruction-set path ---------------------------------------------------------- */

typedef enum hx_cpu_path {
    HX_CPU_PATH_PORTABLE = 0,
    HX_CPU_PATH_AVX2 = 1 /* AVX2 + FMA */
} hx_cpu_path;

/* 1 when the AVX2+FMA path is compiled in and this CPU runs it. */
int hx_cpu_has_avx2(void);

/*
 * Selects the path every later kernel call uses (the default is AVX2 when
 * available). HX_ENOTSUP for AVX2 on a CPU or build without it. Not to be
 * called while kernels run on other threads.
 */
hx_status hx_cpu_set_path(hx_cpu_path path);
hx_cpu_path hx_cpu_get_path(void);
const char *hx_cpu_path_name(hx_cpu_path path); /* "portable", "avx2" */

/* ---- kernels ------------------------------------------------------------------------ */

/* sum_i a[i] * b[i];  a, b: [n] */
float hx_cpu_dot(const float *a, const float *b, int n);

/*
 * y = x W^T, split over the output rows:
 *   y: [n][out]   x: [n][in]   w: [out][in]
 * y must not alias x or w.
 */
void hx_cpu_matmul(hx_cpu_pool *pool, float *y, const float *x, const float *w, int n, int in,
                   int out);

/* One matrix of a fused matmul: y = x W^T with y: [n][out], w: [out][in]. */
typedef struct hx_cpu_linear {
    float *y;       /* [n][out] */
    const float *w; /* [out][in] */
    int out;
} hx_cpu_linear;

/*
 * Several matmuls of the same x in one parallel region (q/k/v, gate/up):
 * the rows of all the matrices are split over the threads together.
 *   x: [n][in]   mats[i].y: [n][mats[i].out]   mats[i].w: [mats[i].out][in]
 */
void hx_cpu_matmul_many(hx_cpu_pool *pool, const float *x, int n, int in,
                        const hx_cpu_linear *mats, int n_mats);

/*
 * RMSNorm: y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i].
 *   y, x, w: [dim]; y may equal x.
 */
void hx_cpu_rmsnorm(float *y, const float *x, const float *w, int dim, float eps);

/*
 * The rotary angles of position `pos`:
 *   cos[i] = cos(pos * theta^(-2i/head_dim)), sin likewise;  cos, sin: [head_dim/2]
 * computed in double and rounded once.
 */
void hx_cpu_rope_angles(float *cos_out, float *sin_out, int head_dim, int pos, double theta);

/*
 * Rotates every head of x in place, rotate-half layout (HF Llama): for
 * i < half = head_dim/2, with a = x[i], b = x[i + half]:
 *   x[i] = a cos[i] - b sin[i],   x[i + half] = b cos[i] + a sin[i]
 *   x: [n_heads][head_dim]   cos, sin: [head_dim/2]
 */
void hx_cpu_rope(float *x, int n_heads, int head_dim, const float *cos_in, const float *sin_in);

/*
 * SwiGLU: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g).
 *   out, gate, up: [n]; out may equal gate or up.
 */
void hx_cpu_swiglu(float *out, const float *gate, const float *up, int n);

/* Softmax in place, max-subtracted;  x: [n], n >= 1. */
void hx_cpu_softmax(float *x, int n);

/* y[i] += x[i];  y, x: [n] */
void hx_cpu_add(float *y, const float *x, int n);

/*
 * Causal attention of n_tokens queries at positions pos0 .. pos0+n_tokens-1
 * over one layer's KV cache, which must already hold keys and values for
 * positions 0 .. pos0+n_tokens-1. Query t sees keys 0 .. pos0+t.
 *
 *   out:     [n_tokens][n_heads][head_dim]
 *   q:       [n_tokens][n_heads][head_dim]   (already rotated)
 *   k_cache: [kv_heads][max_tokens][head_dim]
 *   v_cache: [kv_heads][max_tokens][head_dim]
 *   scratch: [hx_cpu_pool_threads(pool)][max_tokens] floats
 *
 * Scores are scaled by 1/sqrt(head_dim). n_heads must be a multiple of
 * kv_heads; query head h uses KV head h / (n_heads / kv_heads). Work is split
 * over (token, head) pairs.
 */
void hx_cpu_attention(hx_cpu_pool *pool, float *out, const float *q, const float *k_cache,
                      const float *v_cache, int n_tokens, int pos0, int n_heads, int kv_heads,
                      int head_dim, int max_tokens, float *scratch);

#endif /* HX_CPU_H */
