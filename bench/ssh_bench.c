/*
 * ssh_bench.c - time to open SSH sessions to N hosts in parallel (one thread
 * per host) and run `true` on each, as `hexflow launch` does at its start.
 *
 *   ssh_bench [--key FILE] [--known-hosts FILE] [--user USER] [--repeat R]
 *             [--sequential] ADDRESS...
 *
 * Prints, per round, the wall time of the whole round and the slowest host's
 * open and run times, then the median round. bench/ssh_bench.sh runs it over
 * 3, 8 and 16 network-namespace hosts.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "launcher/host.h"

typedef struct job {
    hx_host_ssh_options o;
    double open_s, run_s;
    hx_status st;
    hx_err err;
} job;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *work(void *p)
{
    job *j = p;
    hx_host *h = NULL;
    double t0 = now_s();
    j->st = hx_host_open_ssh(&j->o, &h, &j->err);
    double t1 = now_s();
    j->open_s = t1 - t0;
    if (j->st == HX_OK) {
        int status = -1;
        j->st = hx_host_run(h, "true", NULL, 0, NULL, NULL, &status, 10, &j->err);
        if (j->st == HX_OK && status != 0)
            j->st = hx_err_set(&j->err, HX_EIO, "`true` exited with %d", status);
    }
    j->run_s = now_s() - t1;
    hx_host_close(h);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const char *key = NULL, *known = NULL, *user = NULL;
    int repeat = 5, sequential = 0, first = 1;
    for (; first < argc && argv[first][0] == '-'; first++) {
        if (!strcmp(argv[first], "--key") && first + 1 < argc)
            key = argv[++first];
        else if (!strcmp(argv[first], "--known-hosts") && first + 1 < argc)
            known = argv[++first];
        else if (!strcmp(argv[first], "--user") && first + 1 < argc)
            user = argv[++first];
        else if (!strcmp(argv[first], "--repeat") && first + 1 < argc)
            repeat = atoi(argv[++first]);
        else if (!strcmp(argv[first], "--sequential"))
            sequential = 1;
        else {
            fprintf(stderr, "usage: ssh_bench [--key FILE] [--known-hosts FILE] [--user USER] "
                            "[--repeat R] [--sequential] ADDRESS...\n");
            return 2;
        }
    }
    int n = argc - first;
    if (n < 1 || repeat < 1) {
        fprintf(stderr, "ssh_bench: no addresses\n");
        return 2;
    }
    job *jobs = calloc((size_t)n, sizeof *jobs);
    pthread_t *threads = calloc((size_t)n, sizeof *threads);
    double *rounds = calloc((size_t)repeat, sizeof *rounds);
    double *opens = calloc((size_t)repeat, sizeof *opens);
    double *runs = calloc((size_t)repeat, sizeof *runs);
    if (!jobs || !threads || !rounds || !opens || !runs)
        return 1;
    int failed = 0;
    for (int r = 0; r < repeat; r++) {
        for (int i = 0; i < n; i++)
            jobs[i] = (job){.o = {.name = argv[first + i], .address = argv[first + i],
                                  .user = user, .identity_file = key, .known_hosts = known,
                                  .connect_timeout_s = 10}};
        double t0 = now_s();
        if (sequential) {
            for (int i = 0; i < n; i++)
                work(&jobs[i]);
        } else {
            for (int i = 0; i < n; i++)
                pthread_create(&threads[i], NULL, work, &jobs[i]);
            for (int i = 0; i < n; i++)
                pthread_join(threads[i], NULL);
        }
        rounds[r] = now_s() - t0;
        double max_open = 0, max_run = 0;
        for (int i = 0; i < n; i++) {
            if (jobs[i].st != HX_OK) {
                fprintf(stderr, "ssh_bench: %s\n", jobs[i].err.msg);
                failed = 1;
            }
            if (jobs[i].open_s > max_open)
                max_open = jobs[i].open_s;
            if (jobs[i].run_s > max_run)
                max_run = jobs[i].run_s;
        }
        opens[r] = max_open;
        runs[r] = max_run;
        printf("hosts=%d %s round=%d wall=%.1f ms slowest open=%.1f ms slowest run=%.1f ms\n", n,
               sequential ? "sequential" : "parallel", r + 1, rounds[r] * 1e3, max_open * 1e3,
               max_run * 1e3);
    }
    qsort(rounds, (size_t)repeat, sizeof *rounds, cmp_double);
    qsort(opens, (size_t)repeat, sizeof *opens, cmp_double);
    qsort(runs, (size_t)repeat, sizeof *runs, cmp_double);
    printf("hosts=%d %s: median %.1f ms (best %.1f, worst %.1f) over %d rounds; "
           "median of the slowest host's open %.1f ms, run `true` %.1f ms\n",
           n, sequential ? "sequential" : "parallel", rounds[repeat / 2] * 1e3, rounds[0] * 1e3,
           rounds[repeat - 1] * 1e3, repeat, opens[repeat / 2] * 1e3, runs[repeat / 2] * 1e3);
    free(jobs);
    free(threads);
    free(rounds);
    free(opens);
    free(runs);
    return failed;
}
