/*
 * cpu_bench.c - CPU backend speed on the stories15M shape (dim 288, 6 layers,
 * 6 heads, MLP 768, vocab 32000, fp32; random weights from the tiny writer):
 * batch-1 decode tokens/s and prefill tokens/s, on 1 and 2 threads, with the
 * AVX2+FMA kernels (when the CPU has them) and the portable ones.
 *
 *   cpu_bench [--dir DIR] [--tokens N] [--threads 1,2] [--repeat R]
 *
 * The model is written to DIR (default /tmp/hexflow-bench-stories15m) unless
 * it is already there. Decode runs positions 0 .. N-1 (default 256, the
 * context llama2.c's stories15M uses) one token at a time with greedy
 * sampling and counts tokens/s from the second token on, as llama2.c's run.c
 * does; prefill runs N tokens in chunks of 64. Each number is the best of R
 * runs (default 3). Prints numbers; never run as a test.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_model.h"
#include "kernels/cpu/cpu.h"
#include "runtime/llama.h"
#include "runtime/tiny.h"


/* Decode tokens/s: positions 0 .. n-1, timed from position 1. */
static double bench_decode(const hx_llama *m, hx_llama_state *s, int n)
{
    hx_err err = {0};
    const float *logits;
    int token = HX_TINY_BOS_ID;
    const int vocab = hx_llama_config(m)->vocab_size;
    double start = 0;
    for (int pos = 0; pos < n; pos++) {
        if (pos == 1)
            start = hx_bench_now_s();
        if (hx_llama_forward(m, s, token, pos, &logits, &err) != HX_OK) {
            fprintf(stderr, "cpu_bench: %s\n", err.msg);
            exit(1);
        }
        token = hx_llama_argmax(logits, vocab);
    }
    return (n - 1) / (hx_bench_now_s() - start);
}

static double bench_prefill(const hx_llama *m, hx_llama_state *s, const int *tokens, int n)
{
    hx_err err = {0};
    const float *logits;
    double t0 = hx_bench_now_s();
    if (hx_llama_prefill(m, s, tokens, n, 0, &logits, &err) != HX_OK) {
        fprintf(stderr, "cpu_bench: %s\n", err.msg);
        exit(1);
    }
    return n / (hx_bench_now_s() - t0);
}

int main(int argc, char **argv)
{
    const char *dir = "/tmp/hexflow-bench-stories15m";
    int n = 256, repeat = 3;
    int threads[8] = {1, 2}, n_threads = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            n = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) {
            repeat = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = 0;
            for (char *p = strtok(argv[++i], ","); p && n_threads < 8; p = strtok(NULL, ","))
                threads[n_threads++] = atoi(p);
        } else {
            fprintf(stderr,
                    "usage: cpu_bench [--dir DIR] [--tokens N] [--threads 1,2] [--repeat R]\n");
            return 2;
        }
    }
    if (n < 2 || n > 2048 || repeat < 1) {
        fprintf(stderr, "cpu_bench: --tokens must be in [2, 2048], --repeat >= 1\n");
        return 2;
    }
    if (hx_bench_ensure_model(dir, "cpu_bench") != 0)
        return 1;
    int *tokens = malloc((size_t)n * sizeof *tokens);
    if (!tokens)
        return 1;
    for (int i = 0; i < n; i++)
        tokens[i] = (int)((i * 7919u + 11) % 32000u);

    hx_cpu_path paths[2] = {HX_CPU_PATH_AVX2, HX_CPU_PATH_PORTABLE};
    int first_path = hx_cpu_has_avx2() ? 0 : 1;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    printf("stories15M shape (dim 288, 6 layers, 6 heads, MLP 768, vocab 32000), fp32; "
           "%d tokens; best of %d; %ld online CPUs\n",
           n, repeat, online);
    printf("%-9s %-8s %14s %16s\n", "kernels", "threads", "decode tok/s", "prefill tok/s");
    for (int p = first_path; p < 2; p++) {
        hx_cpu_set_path(paths[p]);
        for (int t = 0; t < n_threads; t++) {
            hx_llama_options opt;
            hx_llama_options_init(&opt);
            opt.threads = threads[t];
            hx_llama *m = NULL;
            hx_llama_state *s = NULL;
            hx_err err = {0};
            if (hx_llama_load(dir, &opt, &m, &err) != HX_OK ||
                hx_llama_state_new(m, n, 64, &s, &err) != HX_OK) {
                fprintf(stderr, "cpu_bench: %s\n", err.msg);
                return 1;
            }
            double best_decode = 0, best_prefill = 0;
            for (int r = 0; r < repeat; r++) {
                double d = bench_decode(m, s, n);
                double f = bench_prefill(m, s, tokens, n);
                best_decode = d > best_decode ? d : best_decode;
                best_prefill = f > best_prefill ? f : best_prefill;
            }
            printf("%-9s %-8d %14.1f %16.1f\n", hx_cpu_path_name(paths[p]), threads[t],
                   best_decode, best_prefill);
            fflush(stdout);
            hx_llama_state_free(s);
            hx_llama_free(m);
        }
    }
    free(tokens);
    return 0;
}
