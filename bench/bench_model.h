/*
 * bench_model.h - what the CPU benchmarks share: a clock, and the
 * stories15M-shaped random-weight model (dim 288, 6 layers, 6 heads,
 * MLP 768, vocab 32000) written once and reused.
 */
#ifndef HX_BENCH_MODEL_H
#define HX_BENCH_MODEL_H

/* Monotonic seconds. */
double hx_bench_now_s(void);

/*
 * Makes sure `dir` holds the stories15M-shaped model (writes it when
 * dir/config.json is missing). `who` names the benchmark in messages.
 * Returns 0, or -1 after printing why.
 */
int hx_bench_ensure_model(const char *dir, const char *who);

#endif /* HX_BENCH_MODEL_H */
