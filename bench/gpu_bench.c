/*
 * gpu_bench.c - numbers for the CUDA engine on a 1B-class random-weight
 * Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
 * vocab 32000; weights made on the GPU, no files):
 *
 *   decode    tokens/s at batch 1, 8 and 64 (prompts of 512 tokens), and the
 *             achieved memory bandwidth: (weight + KV bytes read per step) /
 *             step time, against the device's peak (read from its name);
 *             with the defaults, then with each GEMV kernel for every shape and
 *             with the other decode attention kernel; batch 1 also without
 *             CUDA graphs, with cuBLAS instead of the GEMV kernels, and with
 *             programmatic dependent launch, and with the q/k/v GEMV fused with
 *             RoPE and the KV write, and batches 1 and 8 with L2 prefetches of
 *             16 and 32 MiB a window, to show what each is worth
 *   prefill   TFLOP/s of one 2048-token prompt (one step), against the dense
 *             BF16 peak, with each prefill attention kernel (mma.sync, the
 *             pipelined mma.sync, WMMA)
 *   KV pack   GB/s of hx_cuda_engine_pack_kv of that prompt (2048 positions,
 *             all layers, bf16 segment, checksummed): into pinned memory, into
 *             pageable memory; and for scale a CRC-32C on one thread and a raw
 *             device-to-pinned copy
 *   KV transfer  the same request's KV over the TCP transport as the workers
 *             move it (pack, KV_SEGMENT frame over an authenticated loopback
 *             connection, copy out of the frame, into a second sequence's paged
 *             cache): each step's time and the whole's GB/s
 *
 *   micro     (--micro) each kernel alone at the model's shapes: time, GB/s, TFLOP/s
 *   decode1   (--decode1, INSTEAD of the above) batch-1 decode with the defaults and
 *             with every layer in one persistent kernel (hx_cuda_decode1) at several L2
 *             request budgets, apart from the rest: a fault there ends the process
 *   prefill-fa (--prefill-fa, INSTEAD of the above) the prefill row with attention
 *             kernels 2 and 3 (pipelined, not yet run on a GPU), apart for the same reason
 *
 * Usage: gpu_bench [--json FILE] [--calibration FILE] [--quick] [--micro] [--tiny]
 *                  [--decode1]
 * (--tiny: a 2-layer model of hidden 256 instead, to check this program itself, e.g. on
 * the emulation of the kernels, where the real shape would take hours). Prints a
 * table; --json writes the same numbers as JSON; --calibration writes a calibration
 * file for `hexflow plan --calibration` (docs/cost-model.md): this device type's
 * compute efficiency (prefill at 2048 tokens, default kernels) and memory-bandwidth
 * efficiency (decode at batch 1, default kernels), as fractions of its catalog
 * figures. Exit status 1 when something fails (a device not in the catalog, with
 * --calibration, too), 0 otherwise (also when there is no GPU: it says so and
 * measures nothing).
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cuda.h"
#include "runtime/cuda_engine.h"
#include "runtime/proto.h"
#include "runtime/kvcache.h"
#include "topo/catalog.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what, const hx_err *err)
{
    fprintf(stderr, "gpu_bench: %s: %s\n", what, err->msg);
    exit(1);
}

#define TRY(what, call)                                                                        \
    do {                                                                                       \
        if ((call) != HX_OK)                                                                   \
            die(what, &err);                                                                   \
    } while (0)

/* The 1B-class shape; tiny: a 2-layer one for checking this program on the emulation. */
static hx_model bench_model(int tiny)
{
    hx_model c;
    memset(&c, 0, sizeof c);
    snprintf(c.name, sizeof c.name, "llama-1b-random");
    c.arch = HX_MODEL_ARCH_LLAMA;
    c.num_layers = 16;
    c.hidden_size = 2048;
    c.num_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 64;
    c.intermediate_size = 8192;
    c.vocab_size = 32000;
    c.max_position_tokens = 4096;
    c.word_embed_dim = 2048;
    c.gated_mlp = 1;
    c.norm_params_per_dim = 1;
    c.has_final_norm = 1;
    c.rope_theta = 10000.0;
    c.norm_eps = 1e-5;
    c.dtype = HX_MODEL_DTYPE_BF16;
    c.dtype_bytes = 2;
    if (tiny) {
        c.num_layers = 2;
        c.hidden_size = c.word_embed_dim = 256;
        c.num_heads = 4;
        c.num_kv_heads = 2;
        c.intermediate_size = 512;
        c.vocab_size = 512;
    }
    return c;
}

/* JSON out, kept as text while we go */
static char json[65536];
static size_t json_len;
static int json_full; /* something did not fit: no JSON is written */
static void jadd(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void jadd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(json + json_len, sizeof json - json_len, fmt, ap);
    va_end(ap);
    if (n > 0 && json_len + (size_t)n < sizeof json)
        json_len += (size_t)n;
    else if (n > 0)
        json_full = 1;
}

static uint64_t tok_state = 88172645463325252ull;
static int rand_token(int vocab)
{
    tok_state ^= tok_state << 13;
    tok_state ^= tok_state >> 7;
    tok_state ^= tok_state << 17;
    return (int)(tok_state % (uint64_t)vocab);
}

static int prefetch_mb; /* make_engine's l2_prefetch_mb */
static int decode1_on;  /* make_engine's decode1 */

static hx_cuda_engine *make_engine(const hx_model *cfg, int max_seqs, int max_step, int graphs,
                                   int gemv_rows)
{
    hx_cuda_options o;
    hx_cuda_options_init(&o);
    o.l2_prefetch_mb = prefetch_mb;
    o.decode1 = decode1_on;
    o.max_seqs = max_seqs;
    o.max_step_tokens = max_step;
    o.max_seq_tokens = 4096;
    o.graphs = graphs;
    o.gemv_max_rows = gemv_rows;
    hx_err err = {0};
    hx_cuda_engine *e = NULL;
    TRY("engine", hx_cuda_engine_new_random(cfg, 1, &o, &e, &err));
    return e;
}

static void step(hx_cuda_engine *e, int *n_events)
{
    hx_err err = {0};
    const hx_batch_event *ev = NULL;
    int n = 0;
    TRY("step", hx_cuda_engine_step(e, &ev, &n, &err));
    if (n_events)
        *n_events = n;
}

typedef struct decode_result {
    double step_s, tokens_per_s, bytes_per_step, bytes_per_s, frac_peak;
} decode_result;

/*
 * Decode at batch B: B prompts of `prompt` tokens, prefilled, then `warm`
 * untimed and `timed` timed steps.
 */
static decode_result bench_decode(hx_cuda_engine *e, int B, int prompt, int warm, int timed,
                                  double peak_bw)
{
    hx_err err = {0};
    const hx_model *cfg = hx_cuda_engine_config(e);
    int *p = malloc((size_t)prompt * sizeof *p);
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < prompt; i++)
            p[i] = rand_token(cfg->vocab_size);
        hx_batch_request r;
        memset(&r, 0, sizeof r);
        r.id = (uint64_t)b;
        r.prompt = p;
        r.n_prompt = prompt;
        r.max_new_tokens = 1 + warm + timed + 1;
        r.eos_id = -1;
        r.top_p = 1.0f;
        TRY("add", hx_cuda_engine_add(e, &r, &err));
    }
    free(p);
    /* prefill until every sequence has its first token */
    int firsts = 0;
    while (firsts < B) {
        int n = 0;
        step(e, &n);
        firsts += n;
    }
    for (int i = 0; i < warm; i++)
        step(e, NULL);
    const double t0 = now_s();
    for (int i = 0; i < timed; i++)
        step(e, NULL);
    const double dt = (now_s() - t0) / timed;
    /* bytes read per step: every weight but the embedding table (B rows of it), and each
       sequence's KV at the window's mean context */
    const double weights = (double)hx_cuda_engine_weight_bytes(e) -
                           (double)cfg->vocab_size * cfg->hidden_size * 2 +
                           (double)B * cfg->hidden_size * 2;
    const double ctx = prompt + warm + timed / 2.0;
    const double kv = (double)B * ctx * (double)hx_cuda_engine_kv_bytes_per_token(e);
    decode_result d = {.step_s = dt,
                       .tokens_per_s = B / dt,
                       .bytes_per_step = weights + kv,
                       .bytes_per_s = (weights + kv) / dt,
                       .frac_peak = peak_bw > 0 ? (weights + kv) / dt / peak_bw : 0};
    for (int b = 0; b < B; b++)
        (void)hx_cuda_engine_remove(e, (uint64_t)b, NULL);
    return d;
}

static void report_decode(const char *label, int B, const decode_result *d, double peak_bw)
{
    printf("decode  %-28s batch %3d: %8.3f ms/step %9.0f tok/s  %7.1f GB/s  %5.1f%% of peak "
           "%.2f TB/s\n",
           label, B, d->step_s * 1e3, d->tokens_per_s, d->bytes_per_s / 1e9, d->frac_peak * 100,
           peak_bw / 1e12);
    jadd("%s{\"label\": \"%s\", \"batch\": %d, \"step_ms\": %.4f, \"tokens_per_s\": %.1f, "
         "\"bytes_per_step\": %.0f, \"bandwidth_gb_s\": %.1f, \"fraction_of_peak\": %.4f}",
         json_len && json[json_len - 1] == '}' ? ", " : "", label, B, d->step_s * 1e3,
         d->tokens_per_s, d->bytes_per_step, d->bytes_per_s / 1e9, d->frac_peak);
}

/* ---- per-kernel timings (--micro): where a step's time goes ---- */

static double kernel_us(void)
{
    static double t0;
    hx_err err = {0};
    TRY("sync", hx_cuda_sync(&err));
    const double t = now_s();
    const double dt = t - t0;
    t0 = t;
    return dt * 1e6;
}

#define MICRO_ITERS 200
/* times CALL (a launch function returning hx_status, using `err`) */
#define TIME(label, bytes, flops, CALL)                                                        \
    do {                                                                                       \
        for (int w_ = 0; w_ < 3; w_++)                                                         \
            TRY(label, CALL);                                                                  \
        (void)kernel_us();                                                                     \
        for (int it_ = 0; it_ < MICRO_ITERS; it_++)                                            \
            TRY(label, CALL);                                                                  \
        const double us_ = kernel_us() / MICRO_ITERS;                                          \
        printf("micro %-40s %9.2f us  %8.1f GB/s  %7.1f TFLOP/s\n", label, us_,               \
               (double)(bytes) / us_ / 1e3, (double)(flops) / us_ / 1e6);                      \
        jadd("%s{\"kernel\": \"%s\", \"us\": %.3f, \"gb_s\": %.2f, \"tflops\": %.2f}",          \
             n_micro++ ? ", " : "", label, us_, (double)(bytes) / us_ / 1e3,                   \
             (double)(flops) / us_ / 1e6);                                                     \
    } while (0)

/* the prefill attention kernels by variant (hx_cuda_set_prefill_attention_variant) */
static const char *const prefill_kernel[4] = {"", "wmma", "mma.sync", "mma.sync pipelined"};

static void bench_micro(const hx_model *c)
{
    hx_err err = {0};
    int n_micro = 0;
    const int hid = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    const int H = c->num_heads, K = c->num_kv_heads, D = c->head_dim;
    const int qkv_n = (H + 2 * K) * D, T = 2048;
    hx_cuda_blas *gemv = NULL, *blas = NULL;
    TRY("blas", hx_cuda_blas_new(8, &gemv, &err));
    TRY("blas", hx_cuda_blas_new(0, &blas, &err));
    void *w = NULL, *x = NULL, *y = NULL, *gu = NULL, *act = NULL;
    size_t w_elems = (size_t)V * hid; /* the largest matrix (--tiny: gate/up) */
    if ((size_t)2 * F * hid > w_elems)
        w_elems = (size_t)2 * F * hid;
    if ((size_t)qkv_n * hid > w_elems)
        w_elems = (size_t)qkv_n * hid;
    TRY("malloc", hx_cuda_malloc(&w, w_elems * 2, &err));
    TRY("malloc", hx_cuda_malloc(&x, (size_t)T * F * 2, &err));
    TRY("malloc", hx_cuda_malloc(&y, (size_t)T * 2 * F * 4, &err));
    TRY("malloc", hx_cuda_malloc(&gu, (size_t)T * 2 * F * 2, &err));
    TRY("malloc", hx_cuda_malloc(&act, (size_t)T * F * 2, &err));
    TRY("fill", hx_cuda_fill_uniform_bf16(w, (int64_t)w_elems, 1, -0.02f, 0.02f, NULL, &err));
    TRY("fill", hx_cuda_fill_uniform_bf16(x, (int64_t)T * F, 2, -1, 1, NULL, &err));
    TRY("fill", hx_cuda_fill_uniform_bf16(gu, (int64_t)T * 2 * F, 3, -1, 1, NULL, &err));
    jadd("\"micro\": [");
    hx_cuda_set_gemv_variant(1); /* "gemv": variant 1; "gemv2" below */
    struct {
        const char *name;
        int in, out;
    } mats[5] = {{"qkv", hid, qkv_n}, {"o", H * D, hid}, {"gate_up", hid, 2 * F},
                 {"lm_head", hid, V}, {"down", F, hid}};
    const int rows_list[4] = {1, 8, 64, T};
    char label[96];
    for (int m = 0; m < 5; m++)
        for (int ri = 0; ri < 4; ri++) {
            const int rows = rows_list[ri];
            const double bytes = (double)mats[m].in * mats[m].out * 2;
            const double flops = 2.0 * rows * mats[m].in * mats[m].out;
            hx_cuda_blas *b = rows <= 8 ? gemv : blas;
            snprintf(label, sizeof label, "gemm %s rows %d (%s)", mats[m].name, rows,
                     rows <= 8 ? "gemv" : "cublas");
            TIME(label, bytes, flops,
                 hx_cuda_gemm(b, y, 0, x, w, rows, mats[m].in, mats[m].out, 0.0f, NULL, &err));
            if (rows <= 8) { /* where the GEMV kernels take over from cuBLAS (use_gemv) */
                snprintf(label, sizeof label, "gemm %s rows %d (cublas)", mats[m].name, rows);
                TIME(label, bytes, flops,
                     hx_cuda_gemm(blas, y, 0, x, w, rows, mats[m].in, mats[m].out, 0.0f, NULL,
                                  &err));
            }
        }
    for (int ri = 0; ri < 4; ri++) {
        const int rows = rows_list[ri];
        snprintf(label, sizeof label, "down+swiglu rows %d (%s)", rows,
                 rows <= 8 ? "gemv" : "cublas");
        TIME(label, (double)F * hid * 2, 2.0 * rows * F * hid,
             hx_cuda_gemm_swiglu(rows <= 8 ? gemv : blas, y, gu, w, act, rows, F, hid, NULL,
                                 &err));
    }
    /* per-row kernels */
    float *xf = y, *delta = (float *)y + (size_t)T * hid, *nw = (float *)y + (size_t)2 * T * hid;
    TRY("fill", hx_cuda_fill_uniform_f32(xf, (int64_t)3 * T * hid, 4, -1, 1, NULL, &err));
    for (int ri = 0; ri < 4; ri += 2) {
        const int rows = rows_list[ri];
        snprintf(label, sizeof label, "add_rmsnorm rows %d", rows);
        TIME(label, (double)rows * hid * 14, 0,
             hx_cuda_add_rmsnorm(xf, delta, nw, x, NULL, rows, hid, 1e-5f, NULL, &err));
    }
    /* the norm inside the following GEMV (and SwiGLU after gate/up): a decode step's pair;
       then the same and the plain GEMVs with the second GEMV kernels (hx_cuda_set_gemv_variant) */
    for (int v = 1; v <= 2; v++) {
        hx_cuda_set_gemv_variant(v);
        const char *k = v == 1 ? "gemv" : "gemv2";
        for (int ri = 0; ri < 2; ri++) {
            const int rows = rows_list[ri];
            for (int m = 0; v == 2 && m < 5; m++) { /* variant 1's are above */
                snprintf(label, sizeof label, "gemm %s rows %d (%s)", mats[m].name, rows, k);
                TIME(label, (double)mats[m].in * mats[m].out * 2,
                     2.0 * rows * mats[m].in * mats[m].out,
                     hx_cuda_gemm(gemv, y, 0, x, w, rows, mats[m].in, mats[m].out, 0.0f, NULL,
                                  &err));
            }
            if (v == 2) {
                snprintf(label, sizeof label, "down+swiglu rows %d (%s)", rows, k);
                TIME(label, (double)F * hid * 2, 2.0 * rows * F * hid,
                     hx_cuda_gemm_swiglu(gemv, y, gu, w, act, rows, F, hid, NULL, &err));
            }
            snprintf(label, sizeof label, "rmsnorm+gemm qkv rows %d (%s)", rows, k);
            TIME(label, (double)hid * qkv_n * 2, 2.0 * rows * hid * qkv_n,
                 hx_cuda_gemm_rmsnorm(gemv, delta, xf, nw, 1e-5f, x, w, rows, hid, qkv_n, NULL,
                                      &err));
            snprintf(label, sizeof label, "rmsnorm+gemm gate_up+swiglu rows %d (%s)", rows, k);
            TIME(label, (double)hid * 2 * F * 2, 4.0 * rows * hid * F,
                 hx_cuda_gemm_rmsnorm_swiglu(gemv, act, gu, xf, nw, 1e-5f, x, w, rows, hid, F,
                                             NULL, &err));
        }
    }
    hx_cuda_set_gemv_variant(0);
    /* attention on a paged cache: 64 sequences of 2048 positions, 16-token blocks */
    const int bt = 16, seqs = 64, ctx = 2048, mb = ctx / bt;
    hx_cuda_kv_layout kv = {1, K, D, bt, mb};
    void *cache = NULL, *tables = NULL, *q = NULL, *out = NULL, *part = NULL, *meta = NULL;
    const size_t cache_elems = (size_t)seqs * mb * 2 * K * bt * D;
    TRY("malloc", hx_cuda_malloc(&cache, cache_elems * 2, &err));
    TRY("fill", hx_cuda_fill_uniform_bf16(cache, (int64_t)cache_elems, 5, -1, 1, NULL, &err));
    int *ht = malloc((size_t)seqs * mb * sizeof *ht);
    for (int i = 0; i < seqs * mb; i++)
        ht[i] = i;
    TRY("malloc", hx_cuda_malloc(&tables, (size_t)seqs * mb * 4, &err));
    TRY("copy", hx_cuda_memcpy(tables, ht, (size_t)seqs * mb * 4, &err));
    free(ht);
    TRY("malloc", hx_cuda_malloc(&q, (size_t)T * H * D * 2, &err));
    TRY("fill", hx_cuda_fill_uniform_bf16(q, (int64_t)T * H * D, 6, -1, 1, NULL, &err));
    TRY("malloc", hx_cuda_malloc(&out, (size_t)T * H * D * 2, &err));
    const int parts = 16;
    TRY("malloc", hx_cuda_malloc(&part, hx_cuda_decode_attention_workspace(seqs, H, D, parts),
                                 &err));
    TRY("memset", hx_cuda_memset(part, 0, hx_cuda_decode_attention_workspace(seqs, H, D, parts),
                                 &err));
    int hm[5 * 64];
    for (int i = 0; i < seqs; i++) {
        hm[i] = i;              /* slot */
        hm[64 + i] = i;         /* row */
        hm[128 + i] = 512;      /* len */
        hm[192 + i] = 0;        /* pos0 */
        hm[256 + i] = ctx;      /* n */
    }
    TRY("malloc", hx_cuda_malloc(&meta, sizeof hm, &err));
    TRY("copy", hx_cuda_memcpy(meta, hm, sizeof hm, &err));
    const int *m_slot = meta, *m_row = (int *)meta + 64, *m_len = (int *)meta + 128,
              *m_pos0 = (int *)meta + 192, *m_n = (int *)meta + 256;
    for (int v = 1; v <= 2; v++) { /* hx_cuda_set_decode_attention_variant */
        hx_cuda_set_decode_attention_variant(v);
        for (int bi = 0; bi < 2; bi++) {
            const int B = bi ? 64 : 1;
            snprintf(label, sizeof label, "decode attention (v%d) batch %d ctx 512", v, B);
            TIME(label, (double)B * 512 * 2 * K * D * 2, 4.0 * B * H * D * 512,
                 hx_cuda_decode_attention(out, q, cache, &kv, 0, tables, m_slot, m_row, m_len,
                                          B, parts, H, part, NULL, &err));
        }
    }
    hx_cuda_set_decode_attention_variant(2); /* the default */
    /* RoPE and the KV write alone, then the q/k/v GEMV with the norm in front and them behind
       in one kernel (hx_cuda_set_fused_rope); the tables' values do not matter here */
    const float *cos_t = delta, *sin_t = nw;
    for (int ri = 0; ri < 2; ri++) {
        const int rows = ri + 1;
        snprintf(label, sizeof label, "rope_kv rows %d", rows);
        TIME(label, (double)rows * qkv_n * 4, 0,
             hx_cuda_rope_kv(q, cache, xf, m_pos0, m_slot, cos_t, sin_t, rows, H, &kv, 0, NULL,
                             &err));
        hx_cuda_set_fused_rope(1);
        snprintf(label, sizeof label, "rmsnorm+gemm qkv+rope_kv rows %d (fused)", rows);
        TIME(label, (double)hid * qkv_n * 2, 2.0 * rows * hid * qkv_n,
             hx_cuda_gemm_rmsnorm_rope_kv(gemv, q, cache, delta, xf, nw, 1e-5f, x, w, rows, hid,
                                          H, &kv, 0, m_pos0, m_slot, cos_t, sin_t, NULL, &err));
        hx_cuda_set_fused_rope(0);
    }
    /* kernels 1 and 2 (3 runs in --prefill-fa's process: it has not run on a GPU yet) */
    for (int v = 1; v <= 2; v++) { /* hx_cuda_set_prefill_attention_variant */
        hx_cuda_set_prefill_attention_variant(v);
        snprintf(label, sizeof label, "prefill attention %d tokens (%s)", ctx, prefill_kernel[v]);
        TIME(label, 0, 4.0 * H * D * ((double)ctx * (ctx + 1) / 2),
             hx_cuda_prefill_attention(out, q, cache, &kv, 0, tables, m_slot, m_pos0, m_pos0, m_n,
                                       1, ctx, H, NULL, &err));
    }
    hx_cuda_set_prefill_attention_variant(2); /* the default */
    int *toks = NULL;
    TRY("malloc", hx_cuda_malloc((void **)&toks, 64 * 4, &err));
    TIME("argmax 64 rows x 32000", 64.0 * V * 4, 0,
         hx_cuda_sample(toks, xf, 64, V, NULL, NULL, NULL, NULL, NULL, &err));
    jadd("], ");
    hx_cuda_free(toks);
    hx_cuda_free(meta);
    hx_cuda_free(part);
    hx_cuda_free(out);
    hx_cuda_free(q);
    hx_cuda_free(tables);
    hx_cuda_free(cache);
    hx_cuda_free(w);
    hx_cuda_free(x);
    hx_cuda_free(y);
    hx_cuda_free(gu);
    hx_cuda_free(act);
    hx_cuda_blas_free(gemv);
    hx_cuda_blas_free(blas);
}

/* Writes `text` to path whole or not at all (a temporary file renamed over it). */
static int write_whole(const char *path, const char *text, size_t len)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return 0;
    FILE *f = fopen(tmp, "w");
    const int ok = f && fwrite(text, 1, len, f) == len;
    if ((f && fclose(f) != 0) || !ok || rename(tmp, path) != 0) {
        remove(tmp);
        return 0;
    }
    return 1;
}

/*
 * The calibration file of this device: its catalog type's efficiencies, measured
 * FLOP/s and bytes/s over the catalog's peaks (which the planner's roofline divides
 * by), each within (0, 1]. 0 when the device is not in the catalog or writing fails.
 */
static int write_calibration(const char *path, const char *device, double flops_s,
                             double bytes_s)
{
    const char *type = hx_catalog_match_device_name(device, 0);
    const hx_gpu_spec *spec = type ? hx_catalog_find(type) : NULL;
    if (!spec) {
        fprintf(stderr,
                "gpu_bench: cannot write calibration '%s': device '%s' is not in the GPU "
                "catalog (add it to the inventory's gpu_types and calibrate by hand)\n",
                path, device);
        return 0;
    }
    double ec = flops_s / spec->bf16_flops, em = bytes_s / spec->hbm_bytes_per_s;
    ec = ec > 1.0 ? 1.0 : ec;
    em = em > 1.0 ? 1.0 : em;
    if (!(ec > 0.0) || !(em > 0.0)) {
        fprintf(stderr, "gpu_bench: cannot write calibration '%s': nothing measured\n", path);
        return 0;
    }
    char text[512];
    const int n = snprintf(text, sizeof text,
                           "{\"types\": {\"%s\": {\"compute_efficiency\": %.3f, "
                           "\"hbm_efficiency\": %.3f}}}\n",
                           spec->name, ec, em);
    if (!write_whole(path, text, (size_t)n)) {
        fprintf(stderr, "gpu_bench: cannot write calibration '%s'\n", path);
        return 0;
    }
    printf("calibration for %s: compute_efficiency %.3f, hbm_efficiency %.3f -> %s\n",
           spec->name, ec, em, path);
    return 1;
}

/* ---- KV pack and transfer ----------------------------------------------------------- */

/* The sending side of a KV transfer: a prefill worker's KV connection. */
typedef struct kv_sender {
    const char *host;
    int port;
    const hx_proto_secret *secret;
    hx_proto_conn *conn;
    const unsigned char *seg; /* the packed segment (header and payload) */
    size_t bytes;
    int tokens, layers, heads, head_dim;
    hx_err err;
} kv_sender;

static void *kv_send_one(void *arg)
{
    kv_sender *k = arg;
    /* as runtime/worker.c's kv_send: the header's fields in the message, the payload after */
    hx_proto_kv_segment m = {.num_segments = 1, .num_layers = (uint32_t)k->layers,
                             .num_kv_heads = (uint32_t)k->heads,
                             .num_tokens = (uint32_t)k->tokens,
                             .head_dim = (uint32_t)k->head_dim, .dtype = HX_PROTO_DTYPE_BF16,
                             .data_bytes = k->bytes - HX_KV_SEGMENT_HEADER_BYTES,
                             .data = k->seg + HX_KV_SEGMENT_HEADER_BYTES};
    (void)hx_proto_send_kv_segment(k->conn, 8, &m, hx_proto_deadline_in(60), &k->err);
    return NULL;
}

static void *kv_connect(void *arg)
{
    kv_sender *k = arg;
    (void)hx_proto_connect(k->host, k->port, k->secret, "kv", hx_proto_deadline_in(10), &k->conn,
                           &k->err);
    return NULL;
}

/*
 * One request's KV from a prefill GPU to a decode GPU over the TCP transport,
 * step by step as the workers do it (both ends on this GPU and host, the
 * wire loopback): the prefill side packs it into page-locked memory (bf16,
 * checksummed) and sends it as a KV_SEGMENT frame (AES-GMAC tagged) over an
 * authenticated connection; the decode side receives it, copies it out of
 * the frame into page-locked memory (runtime/worker.c's kv_store) and adds
 * the request from it (hx_cuda_engine_add_prefilled: into its paged cache).
 * Reports each step's time and the whole's GB/s of payload.
 */
static void bench_kv_transfer(hx_cuda_engine *e, const hx_model *cfg, const hx_batch_request *held,
                              size_t bytes, void *pinned, int reps)
{
    hx_err err = {0};
    hx_proto_secret secret;
    hx_proto_listener *l = NULL;
    TRY("secret", hx_proto_secret_generate(&secret, &err));
    TRY("listen", hx_proto_listen("127.0.0.1", 0, &l, &err));
    kv_sender k = {.host = "127.0.0.1", .port = hx_proto_listener_port(l), .secret = &secret,
                   .seg = pinned, .bytes = bytes, .tokens = held->n_prompt,
                   .layers = cfg->num_layers, .heads = cfg->num_kv_heads,
                   .head_dim = cfg->head_dim};
    pthread_t t;
    pthread_create(&t, NULL, kv_connect, &k);
    hx_proto_conn *c = NULL;
    TRY("accept", hx_proto_accept(l, &secret, hx_proto_deadline_in(10), &c, &err));
    pthread_join(t, NULL);
    if (k.err.msg[0])
        die("connect", &k.err);
    void *store = NULL;
    TRY("pinned", hx_cuda_host_alloc(&store, bytes, &err));
    const int K = cfg->num_kv_heads, Ln = cfg->num_layers;
    double best[5] = {1e30, 1e30, 1e30, 1e30, 1e30}; /* pack, wire, copy, add, whole */
    for (int i = 0; i < reps + 1; i++) {              /* the first grows the frame buffer */
        const double t0 = now_s();
        TRY("pack", hx_cuda_engine_pack_kv(e, held->id, 0, Ln, 0, K, pinned, bytes, NULL, &err));
        const double t1 = now_s();
        k.err.msg[0] = '\0';
        pthread_create(&t, NULL, kv_send_one, &k);
        hx_proto_frame f;
        hx_proto_kv_segment m;
        TRY("recv", hx_proto_recv(c, &f, hx_proto_deadline_in(60), &err));
        TRY("decode", hx_proto_decode_kv_segment(&f, &m, &err));
        pthread_join(t, NULL);
        if (k.err.msg[0])
            die("send", &k.err);
        const double t2 = now_s();
        memcpy(store, m.data, m.data_bytes);
        const double t3 = now_s();
        hx_kv_segment g = {HX_KV_SEGMENT_VERSION, (int)m.dtype, (int)m.first_layer,
                           (int)m.num_layers, (int)m.first_kv_head, (int)m.num_kv_heads,
                           (int)m.first_token, (int)m.num_tokens, (int)m.head_dim,
                           m.data_bytes, 0, store};
        hx_batch_request d = *held;
        d.id = 9;
        d.prompt = NULL;
        d.hold_kv = 0;
        d.max_new_tokens = 2;
        TRY("add_prefilled", hx_cuda_engine_add_prefilled(e, &d, 0, &g, 1, &err));
        const double t4 = now_s();
        TRY("remove", hx_cuda_engine_remove(e, 9, &err));
        const double dt[5] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0};
        for (int j = 0; i && j < 5; j++)
            best[j] = dt[j] < best[j] ? dt[j] : best[j];
    }
    const double payload = (double)(bytes - HX_KV_SEGMENT_HEADER_BYTES);
    printf("kv transfer over TCP (loopback, one request, %.1f MB bf16): %.2f GB/s end to end "
           "(%.2f ms: pack %.2f, wire %.2f at %.2f GB/s, copy out %.2f, into the cache %.2f at "
           "%.2f GB/s)\n",
           payload / 1e6, payload / best[4] / 1e9, best[4] * 1e3, best[0] * 1e3, best[1] * 1e3,
           payload / best[1] / 1e9, best[2] * 1e3, best[3] * 1e3, payload / best[3] / 1e9);
    jadd("\"kv_transfer_tcp\": {\"bytes\": %.0f, \"gb_s\": %.3f, \"pack_ms\": %.4f, "
         "\"wire_ms\": %.4f, \"copy_ms\": %.4f, \"add_ms\": %.4f, \"total_ms\": %.4f}",
         payload, payload / best[4] / 1e9, best[0] * 1e3, best[1] * 1e3, best[2] * 1e3,
         best[3] * 1e3, best[4] * 1e3);
    hx_cuda_host_free(store);
    hx_proto_close(k.conn);
    hx_proto_close(c);
    hx_proto_listener_free(l);
    hx_proto_secret_release(&secret);
}

/*
 * KV pack of the held request (a whole prompt, all layers) and its transfer.
 * Pack: hx_cuda_engine_pack_kv into page-locked and into pageable memory,
 * with a CRC-32C on one thread and a raw device-to-pinned copy for scale.
 */
static void bench_kv(hx_cuda_engine *e, const hx_model *cfg, const hx_batch_request *held,
                     int quick)
{
    hx_err err = {0};
    const int K = cfg->num_kv_heads, D = cfg->head_dim, Ln = cfg->num_layers, T = held->n_prompt;
    const size_t bytes = hx_kv_segment_bytes(HX_KV_DTYPE_BF16, Ln, K, T, D);
    void *pinned = NULL, *dev = NULL;
    TRY("pinned", hx_cuda_host_alloc(&pinned, bytes, &err));
    void *pageable = malloc(bytes);
    memset(pageable, 0, bytes);
    const int reps = quick ? 2 : 5;
    double t_pin = 1e30, t_page = 1e30, t_crc = 1e30, t_raw = 1e30;
    size_t wrote = 0;
    for (int i = 0; i < reps + 1; i++) {
        double t0 = now_s();
        TRY("pack", hx_cuda_engine_pack_kv(e, held->id, 0, Ln, 0, K, pinned, bytes, &wrote, &err));
        double dt = now_s() - t0;
        if (i)
            t_pin = dt < t_pin ? dt : t_pin;
        t0 = now_s();
        TRY("pack", hx_cuda_engine_pack_kv(e, held->id, 0, Ln, 0, K, pageable, bytes, &wrote,
                                           &err));
        dt = now_s() - t0;
        if (i)
            t_page = dt < t_page ? dt : t_page;
        t0 = now_s();
        volatile uint32_t crc = hx_kv_crc32c(0, pinned, bytes);
        (void)crc;
        dt = now_s() - t0;
        if (i)
            t_crc = dt < t_crc ? dt : t_crc;
    }
    TRY("malloc", hx_cuda_malloc(&dev, bytes, &err));
    for (int i = 0; i < reps + 1; i++) {
        double t0 = now_s();
        TRY("copy", hx_cuda_memcpy(pinned, dev, bytes, &err));
        double dt = now_s() - t0;
        if (i)
            t_raw = dt < t_raw ? dt : t_raw;
    }
    hx_kv_segment seg;
    TRY("parse", hx_kv_segment_parse(pageable, wrote, &seg, &err));
    printf("kv pack %d positions (%.1f MB bf16 segment): pinned %.2f GB/s (%.2f ms), pageable "
           "%.2f GB/s; CRC-32C on one thread %.2f GB/s (pack uses up to 16); raw "
           "device->pinned copy %.2f GB/s\n",
           T, bytes / 1e6, bytes / t_pin / 1e9, t_pin * 1e3, bytes / t_page / 1e9,
           bytes / t_crc / 1e9, bytes / t_raw / 1e9);
    jadd("\"kv_pack\": {\"tokens\": %d, \"bytes\": %zu, \"dtype\": \"bf16\", "
         "\"pinned_gb_s\": %.3f, \"pageable_gb_s\": %.3f, \"crc_gb_s\": %.3f, "
         "\"raw_d2h_pinned_gb_s\": %.3f}, ",
         T, bytes, bytes / t_pin / 1e9, bytes / t_page / 1e9, bytes / t_crc / 1e9,
         bytes / t_raw / 1e9);
    hx_cuda_free(dev);
    free(pageable);
    bench_kv_transfer(e, cfg, held, bytes, pinned, reps);
    hx_cuda_host_free(pinned);
}

/* A fresh engine's decode at batch 1 (and 8 when max_batch is 8), reported under label. */
static void decode_alone(const hx_model *cfg, const char *label, int max_batch, int graphs,
                         int gemv_rows, int timed, double peak_bw)
{
    hx_cuda_engine *e = make_engine(cfg, 8, 512, graphs, gemv_rows);
    for (int B = 1; B <= max_batch; B *= 8) {
        decode_result d = bench_decode(e, B, 512, 5, timed, peak_bw);
        report_decode(label, B, &d, peak_bw);
    }
    if (decode1_on) {
        int64_t steps = 0;
        hx_cuda_engine_stats(e, &steps, NULL);
        printf("        (%lld of %lld steps in the one-row kernel)\n",
               (long long)hx_cuda_engine_decode1_steps(e), (long long)steps);
    }
    hx_cuda_engine_free(e);
}

/* The JSON (--json), unless it outgrew its buffer: 1 when written or not asked for. */
static int write_json(const char *path)
{
    if (path && json_full) {
        fprintf(stderr, "gpu_bench: the JSON outgrew its %zu-byte buffer: '%s' not written\n",
                sizeof json, path);
        return 0;
    }
    if (path && !write_whole(path, json, json_len)) {
        fprintf(stderr, "gpu_bench: cannot write '%s'\n", path);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *json_path = NULL, *cal_path = NULL;
    int quick = 0, micro = 0, tiny = 0, only_decode1 = 0, only_prefill_fa = 0;
    double cal_bytes_s = 0, cal_flops_s = 0; /* the defaults: decode batch 1, prefill 2048 */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json_path = argv[++i];
        else if (!strcmp(argv[i], "--calibration") && i + 1 < argc)
            cal_path = argv[++i];
        else if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--micro"))
            micro = 1;
        else if (!strcmp(argv[i], "--tiny"))
            tiny = 1;
        else if (!strcmp(argv[i], "--decode1"))
            only_decode1 = 1;
        else if (!strcmp(argv[i], "--prefill-fa"))
            only_prefill_fa = 1;
        else {
            fprintf(stderr,
                    "usage: gpu_bench [--json FILE] [--calibration FILE] [--quick] [--micro] "
                    "[--tiny] [--decode1 | --prefill-fa]\n");
            return 2;
        }
    }
    if (!hx_cuda_available()) {
        printf("gpu_bench: no CUDA device (cudaGetDeviceCount reports %d): nothing measured\n",
               hx_cuda_device_count());
        return 0;
    }
    hx_err err = {0};
    char name[256];
    double peak_bw = 0, peak_flops = 0;
    TRY("device", hx_cuda_device_info(0, name, sizeof name, &peak_bw, &peak_flops, &err));
    printf("device: %s (peak %.2f TB/s, %.0f dense BF16 TFLOP/s)\n", name, peak_bw / 1e12,
           peak_flops / 1e12);
    const hx_model cfg = bench_model(tiny);
    jadd("{\"device\": \"%s\", \"peak_bytes_per_s\": %.4g, \"peak_bf16_flops\": %.4g, "
         "\"model\": {\"hidden\": %d, \"layers\": %d, \"heads\": %d, \"kv_heads\": %d, "
         "\"intermediate\": %d, \"vocab\": %d}, \"decode\": [",
         name, peak_bw, peak_flops, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
         cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size);

    const int timed = quick ? 20 : 100;
    if (only_decode1) {
        /* batch 1: the defaults, then every layer in one persistent kernel, once without
           CUDA graphs, then with them and L2 requests of 8 (the default), 0, 16 and 32 KiB
           a warp before each barrier */
        decode_alone(&cfg, "graphs (defaults)", 1, 1, 8, timed, peak_bw);
        decode1_on = 1;
        /* without graphs first: a capture that refused the cooperative launch would end the
           process before any number */
        decode_alone(&cfg, "no-graphs+decode1-pf8", 1, 0, 8, timed, peak_bw);
        static const int kibs[4] = {8, 0, 16, 32};
        for (int i = 0; i < 4; i++) {
            char label[40];
            snprintf(label, sizeof label, "graphs+decode1-pf%d", kibs[i]);
            hx_cuda_set_decode1_prefetch(kibs[i]);
            decode_alone(&cfg, label, 1, 1, 8, timed, peak_bw);
        }
        hx_cuda_set_decode1_prefetch(8);
        decode1_on = 0;
        jadd("]}\n");
        return write_json(json_path) ? 0 : 1;
    }
    /* ---- decode ---- */
    if (!only_prefill_fa) {
        hx_cuda_engine *e = make_engine(&cfg, 64, 2048, 1, 8);
        printf("weights: %.3f GB bf16; KV: %lld bytes per position\n",
               (double)hx_cuda_engine_weight_bytes(e) / 1e9,
               (long long)hx_cuda_engine_kv_bytes_per_token(e));
        const int batches[3] = {1, 8, 64};
        for (int i = 0; i < 3; i++) {
            decode_result d = bench_decode(e, batches[i], 512, 5, timed, peak_bw);
            report_decode("graphs (defaults)", batches[i], &d, peak_bw);
            if (batches[i] == 1)
                cal_bytes_s = d.bytes_per_s;
        }
        int64_t steps = 0, gsteps = 0;
        hx_cuda_engine_stats(e, &steps, &gsteps);
        printf("        (%lld steps, %lld replayed from CUDA graphs)\n", (long long)steps,
               (long long)gsteps);
        hx_cuda_engine_free(e);
        /* the defaults: GEMV kernel by shape (0), decode attention 2; then each GEMV kernel
           for every shape, and the other attention kernel */
        static const struct {
            const char *label;
            int gemv, attn;
        } alt[3] = {{"graphs+gemv1", 1, 2}, {"graphs+gemv2", 2, 2}, {"graphs+attn1", 0, 1}};
        for (int v = 0; v < 3; v++) {
            hx_cuda_set_gemv_variant(alt[v].gemv);
            hx_cuda_set_decode_attention_variant(alt[v].attn);
            e = make_engine(&cfg, 64, 2048, 1, 8);
            for (int i = 0; i < 3; i++) {
                decode_result d = bench_decode(e, batches[i], 512, 5, timed, peak_bw);
                report_decode(alt[v].label, batches[i], &d, peak_bw);
            }
            hx_cuda_engine_free(e);
        }
        hx_cuda_set_gemv_variant(0);
        hx_cuda_set_decode_attention_variant(2);
    }
    if (!quick && !only_prefill_fa) {
        decode_alone(&cfg, "graphs+cublas", 1, 1, 0, timed, peak_bw);
        decode_alone(&cfg, "no-graphs+gemv", 1, 0, 8, timed, peak_bw);
        hx_cuda_set_pdl(1);
        decode_alone(&cfg, "graphs+gemv+PDL", 1, 1, 8, timed, peak_bw);
        hx_cuda_set_pdl(0);
        /* q/k/v GEMV, RoPE and the KV write in one kernel at 1-2 rows */
        hx_cuda_set_fused_rope(1);
        decode_alone(&cfg, "graphs+fused-rope", 1, 1, 8, timed, peak_bw);
        hx_cuda_set_fused_rope(0);
        /* L2 prefetches of the next projections' weights from a second stream */
        static const int mbs[2] = {16, 32};
        for (int i = 0; i < 2; i++) {
            char label[32];
            snprintf(label, sizeof label, "graphs+prefetch%d", mbs[i]);
            prefetch_mb = mbs[i];
            decode_alone(&cfg, label, 8, 1, 8, timed, peak_bw);
            prefetch_mb = 0;
        }
        /* both */
        hx_cuda_set_fused_rope(1);
        prefetch_mb = 16;
        decode_alone(&cfg, "graphs+fused-rope+prefetch16", 8, 1, 8, timed, peak_bw);
        prefetch_mb = 0;
        hx_cuda_set_fused_rope(0);
    }
    jadd("], ");
    if (micro && !only_prefill_fa)
        bench_micro(&cfg);

    /* ---- prefill ---- */
    const int T = 2048;
    hx_cuda_engine *e = make_engine(&cfg, 4, T, 1, 8);
    int *prompt = malloc(T * sizeof *prompt);
    for (int i = 0; i < T; i++)
        prompt[i] = rand_token(cfg.vocab_size);
    hx_batch_request r;
    memset(&r, 0, sizeof r);
    r.prompt = prompt;
    r.n_prompt = T;
    r.max_new_tokens = 1;
    r.eos_id = -1;
    r.top_p = 1.0f;
    const int runs = quick ? 3 : 10;
    const double L = cfg.num_layers, h = cfg.hidden_size, f = cfg.intermediate_size,
                 qd = (double)cfg.num_heads * cfg.head_dim,
                 kd = (double)cfg.num_kv_heads * cfg.head_dim;
    const double mm_params = L * (h * (qd + 2 * kd) + qd * h + 3 * h * f);
    const double attn_flops = L * 4.0 * cfg.num_heads * cfg.head_dim * ((double)T * (T + 1) / 2);
    const double flops = 2.0 * mm_params * T + attn_flops + 2.0 * h * cfg.vocab_size;
    /* the default attention kernel (2), then WMMA; or (--prefill-fa) 2, then the pipelined
       one, which has not run on a GPU yet, apart */
    const int variants[2] = {2, only_prefill_fa ? 3 : 1};
    static const char *const key[4] = {"", "prefill_wmma", "prefill", "prefill_fa"};
    for (int vi = 0; vi < 2; vi++) {
        const int v = variants[vi];
        hx_cuda_set_prefill_attention_variant(v);
        double best = 1e30, total = 0;
        for (int i = 0; i < 2 + runs; i++) {
            r.id = (uint64_t)(1000 + i);
            TRY("add", hx_cuda_engine_add(e, &r, &err));
            const double t0 = now_s();
            int n = 0;
            step(e, &n);
            const double dt = now_s() - t0;
            if (n != 1) {
                fprintf(stderr, "gpu_bench: prefill step gave %d events\n", n);
                return 1;
            }
            if (i >= 2) {
                total += dt;
                best = dt < best ? dt : best;
            }
        }
        const double mean = total / runs;
        if (v == 2)
            cal_flops_s = flops / mean;
        printf("prefill %d tokens (%s attention): %.3f ms mean, %.3f ms best: %.1f TFLOP/s mean, "
               "%.1f best (%.1f%% of %.0f peak; %.2f TFLOP per prompt, %.1f%% attention)\n",
               T, prefill_kernel[v], mean * 1e3, best * 1e3, flops / mean / 1e12,
               flops / best / 1e12, peak_flops > 0 ? flops / mean / peak_flops * 100 : 0,
               peak_flops / 1e12, flops / 1e12, attn_flops / flops * 100);
        jadd("\"%s\": {\"tokens\": %d, \"mean_ms\": %.4f, \"best_ms\": %.4f, \"flops\": %.6g, "
             "\"tflops_mean\": %.2f, \"tflops_best\": %.2f, \"fraction_of_peak\": %.4f}, ",
             key[v], T, mean * 1e3, best * 1e3, flops,
             flops / mean / 1e12, flops / best / 1e12,
             peak_flops > 0 ? flops / mean / peak_flops : 0);
    }
    hx_cuda_set_prefill_attention_variant(2);
    if (only_prefill_fa) {
        jadd("\"only\": \"prefill-fa\"}\n");
        free(prompt);
        hx_cuda_engine_free(e);
        return write_json(json_path) ? 0 : 1;
    }

    /* ---- KV pack + transfer ---- */
    r.id = 7;
    r.hold_kv = 1;
    TRY("add", hx_cuda_engine_add(e, &r, &err));
    step(e, NULL);
    bench_kv(e, &cfg, &r, quick);
    jadd("}\n");
    free(prompt);
    hx_cuda_engine_free(e);

    if (!write_json(json_path))
        return 1;
    if (cal_path && !write_calibration(cal_path, name, cal_flops_s, cal_bytes_s))
        return 1;
    return 0;
}
