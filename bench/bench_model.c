#define _POSIX_C_SOURCE 200809L
#include "bench/bench_model.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "runtime/tiny.h"

double hx_bench_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int hx_bench_ensure_model(const char *dir, const char *who)
{
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    if (access(cfg, F_OK) == 0)
        return 0;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 6;
    c.hidden_size = 288;
    c.num_heads = 6;
    c.num_kv_heads = 6;
    c.intermediate_size = 768;
    c.vocab_size = 32000;
    c.seed = 15;
    hx_err err = {0};
    printf("writing the stories15M-shaped model to %s ...\n", dir);
    if (hx_tiny_write(dir, &c, &err) != HX_OK) {
        fprintf(stderr, "%s: %s\n", who, err.msg);
        return -1;
    }
    return 0;
}
