/*
 * plan_bench.c - numbers for the planner (not a test: prints, asserts nothing).
 *
 *   plan_bench scale   plan time for 64, 320, 1024 and 4096 GPUs of 4 types in racks
 *   plan_bench gap     heuristic vs exact over 20 random clusters of 4-16 GPUs
 *   plan_bench compare hexflow vs colocated vs homogeneous at equal $/hour on the
 *                      mixed 48-GPU cluster, Llama-2-70B, four length mixes
 *   plan_bench sim     simulator speed (one hour at 100 req/s) and simulated against
 *                      planned throughput on the example clusters
 *   plan_bench all     all four (default)
 *
 * Run from the build directory: ./plan_bench [scale|gap|compare|all] [SOURCE_DIR]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "planner/search.h"
#include "planner/sim.h"

static const char *src_dir = ".";

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static hx_inventory *inv_from_text(const char *text)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    if (hx_inventory_load_string(text, strlen(text), "bench.yaml", &inv, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "bench: ");
        exit(1);
    }
    hx_diags_release(&d);
    return inv;
}

static void load_model(const char *name, hx_model *m)
{
    char path[1024];
    hx_err err = {0};
    snprintf(path, sizeof path, "%s/models/%s", src_dir, name);
    if (hx_model_load(path, m, &err) != HX_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
}

static double plan_rps(const hx_inventory *inv, const hx_model *m, const hx_workload *wl,
                       hx_strategy strategy, double limit_s, double *seconds, double *usd)
{
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_search_opts o;
    hx_search_opts_default(&o);
    o.strategy = strategy;
    o.time_limit_s = limit_s;
    hx_plan *p = NULL;
    hx_err err = {0};
    double t0 = now_s();
    hx_status st = hx_search_plan(inv, m, wl, &cp, &o, &p, NULL, &err);
    if (seconds)
        *seconds = now_s() - t0;
    hx_cost_params_release(&cp);
    if (st != HX_OK) {
        fprintf(stderr, "bench: %s: %s\n", hx_strategy_name(strategy), err.msg);
        return -1;
    }
    double rps = p->throughput_rps;
    if (usd)
        *usd = p->usd_per_hour;
    hx_plan_free(p);
    return rps;
}

/* Racks of 4 hosts x 8 GPUs; the rack's type cycles through four. */
static char *rack_cluster(int gpus)
{
    static const char *types[] = {"H100-SXM", "A100-80G", "L40S", "A6000"};
    static const char *intra[] = {"nvlink, bandwidth: 450GB/s", "nvlink, bandwidth: 300GB/s",
                                  "pcie, bandwidth: 32GB/s", "pcie, bandwidth: 32GB/s"};
    static const char *nic[] = {"400Gb/s", "200Gb/s", "100Gb/s", "100Gb/s"};
    size_t cap = 256 + (size_t)gpus * 40, len = 0;
    char *t = malloc(cap);
    int hosts = gpus / 8, racks = (hosts + 3) / 4;
    len += (size_t)snprintf(t + len, cap - len, "hosts:\n");
    for (int h = 0; h < hosts; h++) {
        int rack = h / 4, ty = rack % 4;
        len += (size_t)snprintf(t + len, cap - len,
                                "  - {name: n%d, address: 10.%d.%d.%d, gpus: {type: %s, count: 8}, "
                                "intra: {kind: %s}, nic: {bandwidth: %s}, switch: r%d}\n",
                                h, h / 65536, (h / 256) % 256, h % 256, types[ty], intra[ty],
                                nic[ty], rack);
    }
    len += (size_t)snprintf(t + len, cap - len, "network:\n  switches:\n");
    for (int r = 0; r < racks; r++)
        len += (size_t)snprintf(t + len, cap - len, "    - {name: r%d, uplink: 800Gb/s}\n", r);
    return t;
}

static void bench_scale(void)
{
    hx_model m;
    load_model("llama-2-70b", &m);
    hx_workload wl;
    hx_workload_default(&wl);
    printf("== plan time: racks of 4 x 8 GPUs, 4 types, llama-2-70b, 512/128 ==\n");
    printf("%6s  %9s  %12s\n", "GPUs", "seconds", "req/s");
    int sizes[] = {64, 320, 1024, 4096};
    for (int i = 0; i < 4; i++) {
        char *text = rack_cluster(sizes[i]);
        hx_inventory *inv = inv_from_text(text);
        free(text);
        double sec = 0;
        double rps = plan_rps(inv, &m, &wl, HX_STRATEGY_HEXFLOW, 60, &sec, NULL);
        printf("%6d  %9.3f  %12.1f\n", sizes[i], sec, rps);
        fflush(stdout);
        hx_inventory_free(inv);
    }
}

/* The bench's own generator: METIS reseeds the C library's rand(). */
static unsigned long long rng_state = 2026;

static int rnd(int n)
{
    unsigned long long z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (int)(z % (unsigned long long)n);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bench_gap(void)
{
    static const char *types[] = {"H100-SXM", "A100-80G", "L40S", "A6000", "L4", "A10"};
    hx_model m;
    load_model("llama-2-13b", &m);
    hx_workload wl;
    hx_workload_default(&wl);
    printf("\n== heuristic vs exact: 20 random clusters of 4-16 GPUs, llama-2-13b, 512/128 ==\n");
    printf("%4s  %5s  %12s  %12s  %8s  %9s  %9s\n", "case", "GPUs", "hexflow", "exact", "gap",
           "t_hexflow", "t_exact");
    double gaps[20];
    int n = 0;
    for (int c = 0; c < 20; c++) {
        char text[4096];
        size_t len = 0;
        int total = 4 + rnd(13), left = total, h = 0;
        len += (size_t)snprintf(text + len, sizeof text - len, "hosts:\n");
        while (left > 0) {
            int k = 1 + rnd(8);
            if (k > left)
                k = left;
            int ty = rnd(6);
            len += (size_t)snprintf(
                text + len, sizeof text - len,
                "  - {name: h%d, address: 10.0.0.%d, gpus: {type: %s, count: %d}, intra: {kind: "
                "%s}, nic: {bandwidth: %s}, switch: s%d}\n",
                h, h + 1, types[ty], k, ty < 2 ? "nvlink" : "pcie",
                rnd(2) ? "100Gb/s" : "25Gb/s", rnd(2));
            left -= k;
            h++;
        }
        len += (size_t)snprintf(text + len, sizeof text - len,
                                "network:\n  switches:\n    - {name: s0, uplink: 200Gb/s}\n    - "
                                "{name: s1, uplink: 100Gb/s}\n");
        if (getenv("HEXFLOW_BENCH_DUMP")) {
            char path[256];
            snprintf(path, sizeof path, "%s/gap-%02d.yaml", getenv("HEXFLOW_BENCH_DUMP"), c);
            FILE *fp = fopen(path, "w");
            if (fp) {
                fputs(text, fp);
                fclose(fp);
            }
        }
        hx_inventory *inv = inv_from_text(text);
        double th = 0, te = 0;
        double rh = plan_rps(inv, &m, &wl, HX_STRATEGY_HEXFLOW, 30, &th, NULL);
        double re = plan_rps(inv, &m, &wl, HX_STRATEGY_EXACT, 600, &te, NULL);
        if (rh > 0 && re > 0) {
            double gap = (re - rh) / re;
            gaps[n++] = gap;
            printf("%4d  %5d  %12.3f  %12.3f  %7.2f%%  %9.3f  %9.3f\n", c, total, rh, re,
                   100 * gap, th, te);
        } else {
            printf("%4d  %5d  %12.3f  %12.3f  %8s\n", c, total, rh, re, "n/a");
        }
        fflush(stdout);
        hx_inventory_free(inv);
    }
    if (n > 0) {
        qsort(gaps, (size_t)n, sizeof *gaps, cmp_double);
        double median = n % 2 ? gaps[n / 2] : 0.5 * (gaps[n / 2 - 1] + gaps[n / 2]);
        printf("gap over %d cases: median %.2f%%, worst %.2f%%\n", n, 100 * median,
               100 * gaps[n - 1]);
    }
}

/* A single-type cluster costing about `budget` $/hour, in hosts of 8. */
static char *single_type_cluster(const char *type, double price, double budget,
                                 const char *intra, const char *nic)
{
    int gpus = (int)floor(budget / price);
    size_t cap = 4096, len = 0;
    char *t = malloc(cap);
    len += (size_t)snprintf(t + len, cap - len, "hosts:\n");
    for (int h = 0; gpus > 0; h++) {
        int k = gpus < 8 ? gpus : 8;
        len += (size_t)snprintf(t + len, cap - len,
                                "  - {name: n%d, address: 10.1.0.%d, gpus: {type: %s, count: %d}, "
                                "intra: {kind: %s}, nic: {bandwidth: %s}, switch: s0}\n",
                                h, h + 1, type, k, intra, nic);
        gpus -= k;
    }
    len += (size_t)snprintf(t + len, cap - len,
                            "network:\n  switches:\n    - {name: s0, uplink: 1600Gb/s}\n");
    return t;
}

static void bench_compare(void)
{
    hx_model m;
    load_model("llama-2-70b", &m);
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/mixed.yaml", src_dir);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *mixed = NULL;
    if (hx_inventory_load(path, &mixed, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "bench: ");
        exit(1);
    }
    hx_diags_release(&d);
    struct {
        int in, out;
    } mixes[] = {{512, 128}, {1024, 128}, {1024, 512}, {2048, 256}};
    printf("\n== hexflow vs baselines at equal $/hour: mixed-48 (16 H100, 16 A100, 16 L40S), "
           "llama-2-70b ==\n");
    printf("%9s  %10s  %10s  %12s  %12s  %8s  %8s\n", "in/out", "hexflow", "colocated",
           "homog(best)", "type", "vs coloc", "vs homog");
    double sum_c = 0, sum_h = 0, max_c = 0, max_h = 0, budget = 0;
    for (size_t k = 0; k < mixed->nhosts; k++)
        budget += mixed->hosts[k].gpu_count *
                  hx_inventory_host_spec(mixed, &mixed->hosts[k])->usd_per_hour;
    for (int i = 0; i < 4; i++) {
        hx_workload wl;
        hx_workload_default(&wl);
        wl.input_tokens = mixes[i].in;
        wl.output_tokens = mixes[i].out;
        double rh = plan_rps(mixed, &m, &wl, HX_STRATEGY_HEXFLOW, 30, NULL, NULL);
        double rc = plan_rps(mixed, &m, &wl, HX_STRATEGY_COLOCATED, 30, NULL, NULL);
        /* homogeneous: the same budget spent on one type, best type wins */
        struct {
            const char *type, *intra, *nic;
        } homo[] = {{"H100-SXM", "nvlink, bandwidth: 450GB/s", "400Gb/s"},
                    {"A100-80G", "nvlink, bandwidth: 300GB/s", "200Gb/s"},
                    {"L40S", "pcie, bandwidth: 32GB/s", "100Gb/s"}};
        double best_h = 0;
        const char *best_t = "-";
        for (int k = 0; k < 3; k++) {
            char *text = single_type_cluster(homo[k].type, hx_catalog_find(homo[k].type)->usd_per_hour,
                                             budget, homo[k].intra, homo[k].nic);
            hx_inventory *inv = inv_from_text(text);
            free(text);
            double r = plan_rps(inv, &m, &wl, HX_STRATEGY_HOMOGENEOUS, 30, NULL, NULL);
            if (r > best_h) {
                best_h = r;
                best_t = homo[k].type;
            }
            hx_inventory_free(inv);
        }
        double vc = rc > 0 ? rh / rc : 0, vh = best_h > 0 ? rh / best_h : 0;
        sum_c += vc;
        sum_h += vh;
        max_c = fmax(max_c, vc);
        max_h = fmax(max_h, vh);
        printf("%4d/%-4d  %10.2f  %10.2f  %12.2f  %12s  %7.2fx  %7.2fx\n", mixes[i].in,
               mixes[i].out, rh, rc, best_h, best_t, vc, vh);
        fflush(stdout);
    }
    printf("speed-up: vs colocated mean %.2fx max %.2fx; vs homogeneous mean %.2fx max %.2fx "
           "(throughput in req/s, budget $%.2f/hour)\n",
           sum_c / 4, max_c, sum_h / 4, max_h, budget);
    hx_inventory_free(mixed);
}

/* Plans `inventory` for `model` and returns the plan (exits on failure). */
static hx_plan *plan_for(const char *inventory, const char *model, const hx_workload *wl)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/%s", src_dir, inventory);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    if (hx_inventory_load(path, &inv, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "bench: ");
        exit(1);
    }
    hx_diags_release(&d);
    hx_model m;
    if (!strcmp(model, "tiny")) {
        hx_err err = {0};
        snprintf(path, sizeof path, "%s/tests/data/tiny-config.json", src_dir);
        if (hx_model_load(path, &m, &err) != HX_OK) {
            fprintf(stderr, "bench: %s\n", err.msg);
            exit(1);
        }
    } else {
        load_model(model, &m);
    }
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_search_opts o;
    hx_search_opts_default(&o);
    hx_plan *p = NULL;
    hx_err err = {0};
    if (hx_search_plan(inv, &m, wl, &cp, &o, &p, NULL, &err) != HX_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
    hx_cost_params_release(&cp);
    hx_inventory_free(inv);
    return p;
}

static void bench_sim(void)
{
    hx_workload wl;
    hx_workload_default(&wl);
    printf("\n== simulator: one hour at 100 req/s (mixed-48, llama-2-70b, 512/128) ==\n");
    hx_plan *p = plan_for("mixed.yaml", "llama-2-70b", &wl);
    hx_sim *sim = NULL;
    hx_err err = {0};
    if (hx_sim_new(p, NULL, &sim, &err) != HX_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.rate_rps = 100;
    o.requests = 0;
    o.duration_s = 3600;
    hx_sim_result r;
    if (hx_sim_run(sim, &o, &r, &err) != HX_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
    printf("requests %ld, events %ld, wall %.3f s, %.2f M events/s, SLO met %.1f%%\n",
           r.arrived, r.events, r.wall_s, r.events / r.wall_s / 1e6, 100 * r.slo_attainment);
    hx_sim_result_release(&r);
    hx_sim_free(sim);
    hx_plan_free(p);

    printf("\n== simulated against planned (max-flow) throughput ==\n");
    printf("%-16s %-12s %10s %12s %10s %12s %8s\n", "inventory", "model", "plan", "sim@2x", "ratio",
           "goodput", "ratio");
    struct {
        const char *inv, *model;
        double ttft, tpot;
    } cases[] = {{"mixed.yaml", "llama-2-70b", 2, 0.1},
                 {"mixed.yaml", "llama-2-13b", 2, 0.1},
                 {"h100-32.yaml", "llama-2-70b", 2, 0.1},
                 {"localhost.yaml", "tiny", 10, 1}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hx_workload w;
        hx_workload_default(&w);
        w.slo_ttft_s = cases[i].ttft;
        w.slo_tpot_s = cases[i].tpot;
        hx_plan *pl = plan_for(cases[i].inv, cases[i].model, &w);
        if (hx_sim_new(pl, NULL, &sim, &err) != HX_OK) {
            fprintf(stderr, "bench: %s\n", err.msg);
            exit(1);
        }
        hx_sim_opts_from_plan(&o, pl);
        o.rate_rps = 2 * pl->throughput_rps;
        o.requests = 20000;
        if (hx_sim_run(sim, &o, &r, &err) != HX_OK) {
            fprintf(stderr, "bench: %s\n", err.msg);
            exit(1);
        }
        double gp = 0;
        o.requests = 4000;
        hx_sim_find_goodput(sim, &o, 0.9, &gp, NULL, 0, NULL, &err);
        printf("%-16s %-12s %10.2f %12.2f %10.2f %12.2f %8.2f\n", cases[i].inv, cases[i].model,
               pl->throughput_rps, r.throughput_rps, r.throughput_rps / pl->throughput_rps, gp,
               gp / pl->throughput_rps);
        fflush(stdout);
        hx_sim_result_release(&r);
        hx_sim_free(sim);
        hx_plan_free(pl);
    }
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "all";
    if (argc > 2)
        src_dir = argv[2];
    else if (getenv("HEXFLOW_SOURCE_DIR"))
        src_dir = getenv("HEXFLOW_SOURCE_DIR");
#ifdef HX_SOURCE_DIR
    else
        src_dir = HX_SOURCE_DIR;
#endif
    int all = !strcmp(what, "all");
    if (all || !strcmp(what, "scale"))
        bench_scale();
    if (all || !strcmp(what, "gap"))
        bench_gap();
    if (all || !strcmp(what, "compare"))
        bench_compare();
    if (all || !strcmp(what, "sim"))
        bench_sim();
    return 0;
}
