/*
 * batch_bench.c - decode throughput of the continuous-batching engine
 * (runtime/batch.h) on the stories15M shape (dim 288, 6 layers, 6 heads,
 * MLP 768, vocab 32000, fp32; random weights from the tiny writer), at
 * batch sizes 1, 8 and 16 on 1 and 2 threads, next to the single-sequence
 * path (hx_llama_forward) as the baseline.
 *
 *   batch_bench [--dir DIR] [--tokens N] [--threads 1,2] [--batch 1,8,16] [--repeat R]
 *
 * The model is written to DIR (default /tmp/hexflow-bench-stories15m, the
 * one cpu_bench uses) unless it is already there. Each of B sequences starts
 * from a one-token prompt (different ones) and decodes until it has used
 * positions 0 .. N-1 (default 256, as cpu_bench); all B run together, so
 * every step is B decode rows. Tokens/s counts the tokens of every step but
 * the first (the prompts' prefill), over the time those steps took; it is
 * the engine's aggregate throughput (per-sequence speed is that / B). Each
 * number is the best of R runs (default 3). Prints numbers; never run as a
 * test.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_model.h"
#include "kernels/cpu/cpu.h"
#include "runtime/batch.h"
#include "runtime/llama.h"
#include "runtime/tiny.h"


static void die(const hx_err *err)
{
    fprintf(stderr, "batch_bench: %s\n", err->msg);
    exit(1);
}

/* Single-sequence decode tokens/s: positions 0 .. n-1, timed from position 1. */
static double bench_single(const hx_llama *m, int n)
{
    hx_err err = {0};
    hx_llama_state *s = NULL;
    if (hx_llama_state_new(m, n, 64, &s, &err) != HX_OK)
        die(&err);
    const float *logits;
    int token = HX_TINY_BOS_ID;
    const int vocab = hx_llama_config(m)->vocab_size;
    double start = 0;
    for (int pos = 0; pos < n; pos++) {
        if (pos == 1)
            start = hx_bench_now_s();
        if (hx_llama_forward(m, s, token, pos, &logits, &err) != HX_OK)
            die(&err);
        token = hx_llama_argmax(logits, vocab);
    }
    double t = hx_bench_now_s() - start;
    hx_llama_state_free(s);
    return (n - 1) / t;
}

/* Engine decode tokens/s with `batch` sequences over positions 0 .. n-1. */
static double bench_engine(hx_batch *b, int batch, int n, double *step_ms)
{
    hx_err err = {0};
    for (int i = 0; i < batch; i++) {
        int prompt = (int)((i * 7919u + 11) % 32000u);
        hx_batch_request r = {(uint64_t)i, &prompt, 1, n, -1, 0, 1, 0, 0};
        if (hx_batch_add(b, &r, &err) != HX_OK)
            die(&err);
    }
    const hx_batch_event *ev;
    int n_ev, steps = 0;
    long tokens = 0;
    if (hx_batch_step(b, &ev, &n_ev, &err) != HX_OK) /* the prompts: not timed */
        die(&err);
    double t0 = hx_bench_now_s();
    while (hx_batch_seq_count(b) > 0) {
        if (hx_batch_step(b, &ev, &n_ev, &err) != HX_OK)
            die(&err);
        tokens += n_ev;
        steps++;
    }
    double t = hx_bench_now_s() - t0;
    *step_ms = 1e3 * t / steps;
    return tokens / t;
}

static int parse_list(char *s, int *out, int cap)
{
    int n = 0;
    for (char *p = strtok(s, ","); p && n < cap; p = strtok(NULL, ","))
        out[n++] = atoi(p);
    return n;
}

int main(int argc, char **argv)
{
    const char *dir = "/tmp/hexflow-bench-stories15m";
    int n = 256, repeat = 3;
    int threads[8] = {1, 2}, n_threads = 2;
    int batches[8] = {1, 8, 16}, n_batches = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            n = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) {
            repeat = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = parse_list(argv[++i], threads, 8);
        } else if (!strcmp(argv[i], "--batch") && i + 1 < argc) {
            n_batches = parse_list(argv[++i], batches, 8);
        } else {
            fprintf(stderr, "usage: batch_bench [--dir DIR] [--tokens N] [--threads 1,2] "
                            "[--batch 1,8,16] [--repeat R]\n");
            return 2;
        }
    }
    if (n < 3 || n > 2048 || repeat < 1 || n_threads < 1 || n_batches < 1) {
        fprintf(stderr, "batch_bench: --tokens must be in [3, 2048], --repeat >= 1\n");
        return 2;
    }
    for (int i = 0; i < n_batches; i++)
        if (batches[i] < 1 || batches[i] > 1024) {
            fprintf(stderr, "batch_bench: batch %d is not in [1, 1024]\n", batches[i]);
            return 2;
        }
    if (hx_bench_ensure_model(dir, "batch_bench") != 0)
        return 1;

    printf("stories15M shape (dim 288, 6 layers, 6 heads, MLP 768, vocab 32000), fp32; "
           "positions 0-%d; %s kernels; best of %d; %ld online CPUs\n",
           n - 1, hx_cpu_path_name(hx_cpu_get_path()), repeat, sysconf(_SC_NPROCESSORS_ONLN));
    printf("%-8s %-18s %6s %14s %10s\n", "threads", "path", "batch", "decode tok/s", "ms/step");
    for (int t = 0; t < n_threads; t++) {
        hx_llama_options opt;
        hx_llama_options_init(&opt);
        opt.threads = threads[t];
        hx_llama *m = NULL;
        hx_err err = {0};
        if (hx_llama_load(dir, &opt, &m, &err) != HX_OK)
            die(&err);
        double best = 0;
        for (int r = 0; r < repeat; r++) {
            double x = bench_single(m, n);
            best = x > best ? x : best;
        }
        printf("%-8d %-18s %6d %14.1f %10.2f\n", threads[t], "single (forward)", 1, best,
               1e3 / best);
        fflush(stdout);
        for (int i = 0; i < n_batches; i++) {
            hx_batch_options o;
            hx_batch_options_init(&o);
            o.max_seqs = batches[i];
            o.max_step_tokens = batches[i] > 64 ? batches[i] : 64;
            o.max_seq_tokens = n;
            hx_batch *b = NULL;
            if (hx_batch_new(m, &o, NULL, &b, &err) != HX_OK)
                die(&err);
            double best_tps = 0, best_ms = 0;
            for (int r = 0; r < repeat; r++) {
                double ms, x = bench_engine(b, batches[i], n, &ms);
                if (x > best_tps) {
                    best_tps = x;
                    best_ms = ms;
                }
            }
            printf("%-8d %-18s %6d %14.1f %10.2f\n", threads[t], "batch engine", batches[i],
                   best_tps, best_ms);
            fflush(stdout);
            hx_batch_free(b);
        }
        hx_llama_free(m);
    }
    return 0;
}
