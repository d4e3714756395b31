/*
 * cmd_simulate.c - `hexflow simulate`: discrete-event simulation of a plan.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/file.h"
#include "common/json.h"
#include "common/svg.h"
#include "common/table.h"
#include "common/units.h"
#include "planner/sim.h"

static const char usage_text[] =
    "usage: hexflow simulate --plan FILE [options]\n"
    "\n"
    "Simulates the deployment a plan describes, request by request, with the\n"
    "planner's cost model: prefill batching, KV transfers sharing links,\n"
    "continuous batching bounded by KV memory.\n"
    "\n"
    "traffic:\n"
    "  --rate RPS            Poisson arrivals (default: 80% of the plan's throughput);\n"
    "                        with --trace, rescales the trace to this mean rate\n"
    "  --trace FILE          arrivals and lengths from a Mooncake JSONL or Azure CSV trace\n"
    "  --input-tokens N      mean prompt length (default: the plan's)\n"
    "  --output-tokens N     mean output length (default: the plan's)\n"
    "  --lengths DIST        fixed (default), exponential, uniform or lognormal\n"
    "  --requests N          requests to simulate (default: 5 minutes of arrivals,\n"
    "                        2000 at least)\n"
    "  --duration SECONDS    or: the arrivals of this long a time\n"
    "  --seed N              random seed (default 1)\n"
    "  --slo-ttft SECONDS    SLOs (default: the plan's)\n"
    "  --slo-tpot SECONDS\n"
    "  --model NAME|DIR      the model, when the plan's cannot be found\n"
    "\n"
    "goodput:\n"
    "  --find-goodput        the highest rate at which --attainment of the requests\n"
    "                        meet both SLOs, by bisection (each probe simulates\n"
    "                        --duration seconds of traffic, 120 by default)\n"
    "  --attainment F        fraction for --find-goodput (default: the plan's, or 0.9)\n"
    "\n"
    "output:\n"
    "  --json                machine-readable results\n"
    "  --csv FILE            one row per request\n"
    "  --svg FILE            latency CDFs (and attainment against rate with --find-goodput)\n"
    "  -h, --help            this text\n";

enum {
    OPT_PLAN = 256,
    OPT_RATE,
    OPT_TRACE,
    OPT_INPUT,
    OPT_OUTPUT,
    OPT_LENGTHS,
    OPT_REQUESTS,
    OPT_DURATION,
    OPT_SEED,
    OPT_JSON,
    OPT_CSV,
    OPT_SVG,
    OPT_GOODPUT,
    OPT_ATTAINMENT,
    OPT_TTFT,
    OPT_TPOT,
    OPT_MODEL
};

static json_t *lat_json(const hx_latency_stats *s)
{
    return json_pack("{s:f, s:f, s:f, s:f, s:f}", "mean", s->mean, "p50", s->p50, "p90", s->p90,
                     "p99", s->p99, "max", s->max);
}

static json_t *result_json(const hx_plan *plan, const hx_sim_result *r, int have_goodput,
                           double goodput, double target, const hx_goodput_point *pts, int npts)
{
    json_t *o = json_object();
    json_object_set_new(o, "requests", json_integer(r->arrived));
    json_object_set_new(o, "completed", json_integer(r->completed));
    json_object_set_new(o, "offered_rps", json_real(r->offered_rps));
    json_object_set_new(o, "throughput_rps", json_real(r->throughput_rps));
    json_object_set_new(o, "plan_rps", json_real(plan->throughput_rps > 0 ? plan->throughput_rps
                                                                          : 0));
    json_object_set_new(o, "slo_attainment", json_real(r->slo_attainment));
    json_object_set_new(o, "ttft_s", lat_json(&r->ttft_s));
    json_object_set_new(o, "tpot_s", lat_json(&r->tpot_s));
    json_object_set_new(o, "e2e_s", lat_json(&r->e2e_s));
    json_object_set_new(o, "makespan_s", json_real(r->makespan_s));
    json_object_set_new(o, "mean_in_system", json_real(r->mean_in_system));
    json_object_set_new(o, "events", json_integer(r->events));
    json_object_set_new(o, "wall_s", json_real(r->wall_s));
    json_t *groups = json_array();
    for (int i = 0; i < r->ngroups; i++) {
        const hx_sim_group_stats *g = &r->groups[i];
        json_array_append_new(
            groups, json_pack("{s:s, s:s, s:f, s:I, s:I, s:f, s:f}", "id", g->id, "role",
                              hx_role_name((hx_role)g->role), "utilisation", g->utilisation,
                              "prefills", (json_int_t)g->prefills, "completions",
                              (json_int_t)g->completions, "mean_batch", g->mean_batch,
                              "max_waiting", g->max_waiting));
    }
    json_object_set_new(o, "groups", groups);
    json_t *links = json_array();
    for (int i = 0; i < r->nlinks; i++) {
        const hx_sim_link_stats *l = &r->links[i];
        json_array_append_new(
            links, json_pack("{s:s, s:s, s:f, s:f, s:f}", "prefill", plan->groups[l->prefill].id,
                             "decode", plan->groups[l->decode].id, "utilisation", l->utilisation,
                             "bytes", l->bytes, "mean_transfer_s", l->mean_transfer_s));
    }
    json_object_set_new(o, "links", links);
    if (have_goodput) {
        json_object_set_new(o, "goodput_rps", json_real(goodput));
        json_object_set_new(o, "goodput_attainment", json_real(target));
        json_t *p = json_array();
        for (int i = 0; i < npts; i++)
            json_array_append_new(p, json_pack("{s:f, s:f, s:f}", "rate_rps", pts[i].rate_rps,
                                               "attainment", pts[i].attainment,
                                               "throughput_rps", pts[i].throughput_rps));
        json_object_set_new(o, "goodput_search", p);
    }
    return o;
}

static void print_result(const hx_plan *plan, const hx_sim_opts *o, const hx_sim_result *r)
{
    char a[32], b[32], c[32], d[32];
    printf("simulated %ld requests (%s lengths", r->arrived,
           o->trace ? "trace" : hx_len_dist_name(o->lengths));
    if (!o->trace)
        printf(", %.0f in / %.0f out", o->input_tokens, o->output_tokens);
    printf(") in %.2f s, %ld events\n\n", r->wall_s, r->events);
    printf("offered      %.3g req/s\n", r->offered_rps);
    printf("throughput   %.3g req/s (plan: %.3g req/s)\n", r->throughput_rps,
           plan->throughput_rps > 0 ? plan->throughput_rps : 0);
    printf("SLO met      %.1f%% of requests (TTFT <= %s, TPOT <= %s)\n\n",
           100 * r->slo_attainment, hx_units_fmt_time(o->slo_ttft_s, a, sizeof a),
           hx_units_fmt_time(o->slo_tpot_s, b, sizeof b));
    hx_table *t = hx_table_new(5, "LATENCY", ">MEAN", ">P50", ">P90", ">P99");
    const hx_latency_stats *s[3] = {&r->ttft_s, &r->tpot_s, &r->e2e_s};
    const char *names[3] = {"TTFT", "TPOT", "end-to-end"};
    for (int i = 0; i < 3; i++) {
        char m[32];
        hx_table_row(t, names[i], hx_units_fmt_time(s[i]->mean, m, sizeof m),
                     hx_units_fmt_time(s[i]->p50, a, sizeof a),
                     hx_units_fmt_time(s[i]->p90, b, sizeof b),
                     hx_units_fmt_time(s[i]->p99, c, sizeof c));
    }
    hx_table_print(t, stdout);
    hx_table_free(t);
    putchar('\n');
    t = hx_table_new(6, "GROUP", "ROLE", ">BUSY", ">PREFILLED", ">FINISHED", ">MEAN BATCH");
    for (int i = 0; i < r->ngroups; i++) {
        const hx_sim_group_stats *g = &r->groups[i];
        hx_table_rowf(t, "%s|%s|%.0f%%|%ld|%ld|%.1f", g->id, hx_role_name((hx_role)g->role),
                      100 * g->utilisation, g->prefills, g->completions, g->mean_batch);
    }
    hx_table_print(t, stdout);
    hx_table_free(t);
    if (r->nlinks > 0) {
        putchar('\n');
        t = hx_table_new(5, "PREFILL", "DECODE", ">BUSY", ">KV MOVED", ">MEAN TRANSFER");
        for (int i = 0; i < r->nlinks; i++) {
            const hx_sim_link_stats *l = &r->links[i];
            hx_table_rowf(t, "%s|%s|%.0f%%|%s|%s", plan->groups[l->prefill].id,
                          plan->groups[l->decode].id, 100 * l->utilisation,
                          hx_units_fmt_bytes(l->bytes, c, sizeof c),
                          hx_units_fmt_time(l->mean_transfer_s, d, sizeof d));
        }
        hx_table_print(t, stdout);
        hx_table_free(t);
    }
}

static hx_status write_csv(const char *path, const hx_plan *plan, const hx_sim_result *r,
                           hx_err *err)
{
    size_t cap = 128 + (size_t)r->arrived * 128, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    len += (size_t)snprintf(buf + len, cap - len,
                            "arrival_s,input_tokens,output_tokens,ttft_s,tpot_s,e2e_s,"
                            "prefill_group,decode_group,met_slo\n");
    for (long i = 0; i < r->arrived && len < cap; i++) {
        const hx_sim_record *x = &r->records[i];
        len += (size_t)snprintf(buf + len, cap - len, "%.6f,%d,%d,%.6f,%.6f,%.6f,%s,%s,%d\n",
                                x->arrival_s, x->input_tokens, x->output_tokens, x->ttft_s,
                                x->tpot_s, x->e2e_s, plan->groups[x->prefill_group].id,
                                plan->groups[x->decode_group].id, x->met_slo);
    }
    hx_status st = hx_file_write_atomic(path, buf, len < cap ? len : cap, err);
    free(buf);
    return st;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* CDF points of TTFT (which = 0) or TPOT (1) over the recorded requests. */
static int cdf(const hx_sim_result *r, int which, double **xs, double **ys, size_t *n)
{
    size_t m = (size_t)r->arrived;
    *xs = malloc((m ? m : 1) * sizeof **xs);
    *ys = malloc((m ? m : 1) * sizeof **ys);
    if (!*xs || !*ys)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < m; i++) {
        double v = which == 0 ? r->records[i].ttft_s : r->records[i].tpot_s;
        if (isfinite(v))
            (*xs)[k++] = v;
    }
    qsort(*xs, k, sizeof **xs, cmp_double);
    for (size_t i = 0; i < k; i++)
        (*ys)[i] = (double)(i + 1) / k;
    *n = k;
    return 0;
}

static hx_status write_svg(const char *path, const hx_sim_opts *o, const hx_sim_result *r,
                           const hx_goodput_point *pts, int npts, double target, hx_err *err)
{
    hx_svg_chart *charts[3] = {NULL, NULL, NULL};
    size_t nc = 0;
    hx_status st = HX_OK;
    const char *titles[2] = {"Time to first token (CDF)", "Time per output token (CDF)"};
    const char *xl[2] = {"TTFT (s)", "TPOT (s)"};
    double slo[2] = {o->slo_ttft_s, o->slo_tpot_s};
    for (int w = 0; w < 2; w++) {
        double *x = NULL, *y = NULL;
        size_t n = 0;
        if (cdf(r, w, &x, &y, &n) != 0) {
            free(x);
            free(y);
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
            goto out;
        }
        hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, titles[w], xl[w], "fraction of requests");
        if (!c) {
            free(x);
            free(y);
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
            goto out;
        }
        charts[nc++] = c;
        hx_svg_chart_add_series(c, "simulated", x, y, n);
        hx_svg_chart_add_vline(c, slo[w], "SLO");
        hx_svg_chart_set_y_range(c, 0, 1);
        free(x);
        free(y);
    }
    if (npts > 0) {
        double *x = malloc((size_t)npts * sizeof *x), *y = malloc((size_t)npts * sizeof *y);
        hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "SLO attainment against request rate",
                                           "request rate (req/s)", "attainment");
        if (!x || !y || !c) {
            free(x);
            free(y);
            hx_svg_chart_free(c);
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
            goto out;
        }
        for (int i = 0; i < npts; i++) {
            x[i] = pts[i].rate_rps;
            y[i] = pts[i].attainment;
        }
        charts[nc++] = c;
        hx_svg_chart_add_series(c, "attainment", x, y, (size_t)npts);
        hx_svg_chart_add_hline(c, target, "target");
        hx_svg_chart_set_y_range(c, 0, 1);
        free(x);
        free(y);
    }
    st = hx_svg_write(path, charts, nc, err);
out:
    for (size_t i = 0; i < nc; i++)
        hx_svg_chart_free(charts[i]);
    return st;
}

int hx_cmd_simulate(int argc, char **argv)
{
    static const struct option opts[] = {
        {"plan", required_argument, NULL, OPT_PLAN},
        {"rate", required_argument, NULL, OPT_RATE},
        {"trace", required_argument, NULL, OPT_TRACE},
        {"input-tokens", required_argument, NULL, OPT_INPUT},
        {"output-tokens", required_argument, NULL, OPT_OUTPUT},
        {"lengths", required_argument, NULL, OPT_LENGTHS},
        {"requests", required_argument, NULL, OPT_REQUESTS},
        {"duration", required_argument, NULL, OPT_DURATION},
        {"seed", required_argument, NULL, OPT_SEED},
        {"json", no_argument, NULL, OPT_JSON},
        {"csv", required_argument, NULL, OPT_CSV},
        {"svg", required_argument, NULL, OPT_SVG},
        {"find-goodput", no_argument, NULL, OPT_GOODPUT},
        {"attainment", required_argument, NULL, OPT_ATTAINMENT},
        {"slo-ttft", required_argument, NULL, OPT_TTFT},
        {"slo-tpot", required_argument, NULL, OPT_TPOT},
        {"model", required_argument, NULL, OPT_MODEL},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *plan_path = NULL, *trace_path = NULL, *csv_path = NULL, *svg_path = NULL,
               *model_name = NULL;
    double rate = -1, input = -1, output = -1, requests = -1, duration = -1, seed = -1,
           target = -1, ttft = -1, tpot = -1;
    int as_json = 0, goodput = 0;
    hx_len_dist lengths = HX_LEN_FIXED;
    int c;
    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_PLAN: plan_path = optarg; break;
        case OPT_TRACE: trace_path = optarg; break;
        case OPT_CSV: csv_path = optarg; break;
        case OPT_SVG: svg_path = optarg; break;
        case OPT_MODEL: model_name = optarg; break;
        case OPT_JSON: as_json = 1; break;
        case OPT_GOODPUT: goodput = 1; break;
        case OPT_RATE:
            if (!hx_cli_number("simulate", "--rate", optarg, 1e-9, 1e9, &rate))
                return 2;
            break;
        case OPT_INPUT:
            if (!hx_cli_number("simulate", "--input-tokens", optarg, 1, 1e7, &input))
                return 2;
            break;
        case OPT_OUTPUT:
            if (!hx_cli_number("simulate", "--output-tokens", optarg, 1, 1e7, &output))
                return 2;
            break;
        case OPT_REQUESTS:
            if (!hx_cli_number("simulate", "--requests", optarg, 1, 5e7, &requests))
                return 2;
            break;
        case OPT_DURATION:
            if (!hx_cli_number("simulate", "--duration", optarg, 1e-6, 1e8, &duration))
                return 2;
            break;
        case OPT_SEED:
            if (!hx_cli_number("simulate", "--seed", optarg, 0, 4294967295.0, &seed))
                return 2;
            break;
        case OPT_ATTAINMENT:
            if (!hx_cli_number("simulate", "--attainment", optarg, 1e-6, 1, &target))
                return 2;
            break;
        case OPT_TTFT:
            if (!hx_cli_number("simulate", "--slo-ttft", optarg, 1e-9, 1e6, &ttft))
                return 2;
            break;
        case OPT_TPOT:
            if (!hx_cli_number("simulate", "--slo-tpot", optarg, 1e-9, 1e6, &tpot))
                return 2;
            break;
        case OPT_LENGTHS:
            if (hx_len_dist_parse(optarg, &lengths) != HX_OK)
                return hx_cli_usage_error("simulate",
                                          "--lengths: unknown distribution '%s'; expected "
                                          "fixed, exponential, uniform or lognormal",
                                          optarg);
            break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': return hx_cli_usage_error("simulate", "%s needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("simulate", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("simulate", "unexpected argument '%s'", argv[optind]);
    if (!plan_path)
        return hx_cli_usage_error("simulate", "missing --plan FILE");
    if (requests > 0 && duration > 0)
        return hx_cli_usage_error("simulate", "give --requests or --duration, not both");

    int rc = 0;
    hx_plan *plan = NULL;
    hx_trace *trace = NULL;
    hx_sim *sim = NULL;
    hx_sim_result res;
    memset(&res, 0, sizeof res);
    hx_err err = {0};
    hx_diags d;
    hx_diags_init(&d);
    hx_status st = hx_plan_load(plan_path, &plan, &d);
    if (st != HX_OK) {
        hx_diags_print(&d, stderr, "");
        rc = hx_status_exit_code(st);
        goto out;
    }
    if (trace_path) {
        st = hx_trace_load(trace_path, &trace, &d);
        if (st != HX_OK) {
            hx_diags_print(&d, stderr, "");
            rc = hx_status_exit_code(st);
            goto out;
        }
    }
    hx_model model, *mp = NULL;
    if (model_name) {
        if (hx_model_load(model_name, &model, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        mp = &model;
    }
    if (hx_sim_new(plan, mp, &sim, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, plan);
    o.trace = trace;
    if (trace)
        o.rate_rps = 0; /* as recorded, unless --rate */
    if (rate > 0)
        o.rate_rps = rate;
    if (input > 0)
        o.input_tokens = input;
    if (output > 0)
        o.output_tokens = output;
    o.lengths = lengths;
    if (requests > 0)
        o.requests = (long)requests;
    if (duration > 0) {
        o.duration_s = duration;
        o.requests = 0;
    }
    if (trace && requests <= 0 && duration <= 0)
        o.requests = (long)trace->n;
    if (seed >= 0)
        o.seed = (unsigned long)seed;
    if (ttft > 0)
        o.slo_ttft_s = ttft;
    if (tpot > 0)
        o.slo_tpot_s = tpot;
    o.record = csv_path || svg_path;
    if (target < 0)
        target = plan->slo_attainment > 0 ? plan->slo_attainment : 0.9;

    double gp = 0;
    hx_goodput_point pts[64];
    int npts = 0;
    if (goodput) {
        if (hx_sim_find_goodput(sim, &o, target, &gp, pts, 64, &npts, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        if (rate <= 0)
            o.rate_rps = gp > 0 ? gp : o.rate_rps; /* report the run at the goodput */
    }
    if (hx_sim_run(sim, &o, &res, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (csv_path && write_csv(csv_path, plan, &res, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (svg_path && write_svg(svg_path, &o, &res, pts, npts, target, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (as_json) {
        json_t *j = result_json(plan, &res, goodput, gp, target, pts, npts);
        if (!j || hx_json_print(j) != HX_OK)
            rc = 1;
        json_decref(j);
    } else {
        print_result(plan, &o, &res);
        if (goodput)
            printf("\ngoodput      %.3g req/s with %.0f%% of requests meeting both SLOs "
                   "(%d simulations)\n",
                   gp, 100 * target, npts);
        if (csv_path)
            printf("requests written to %s\n", csv_path);
        if (svg_path)
            printf("charts written to %s\n", svg_path);
    }
out:
    hx_sim_result_release(&res);
    hx_sim_free(sim);
    hx_trace_free(trace);
    hx_plan_free(plan);
    hx_diags_release(&d);
    return rc;
}
