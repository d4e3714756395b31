/*
 * cmd_plan.c - `hexflow plan`: choose groups, roles, layouts and routes.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/json.h"
#include "common/table.h"
#include "common/units.h"
#include "planner/model.h"
#include "planner/search.h"
#include "planner/workload.h"
#include "topo/inventory.h"

static const char usage_text[] =
    "usage: hexflow plan --inventory FILE --model NAME|DIR [options]\n"
    "\n"
    "Chooses which devices form which model replica, whether each replica does\n"
    "prefill or decode, its pipeline/tensor layout, and how requests flow from\n"
    "prefill to decode replicas (HexGen-2 style: graph partitioning, max-flow,\n"
    "refinement guided by the bottleneck).\n"
    "\n"
    "workload:\n"
    "  --input-tokens N      mean prompt length (default 512)\n"
    "  --output-tokens N     mean generated length (default 128)\n"
    "  --workload FILE       lengths, rate and SLOs from a YAML file (flags override it)\n"
    "  --rate RPS            offered requests/s (default: as many as the cluster serves)\n"
    "  --slo-ttft SECONDS    time-to-first-token SLO (default 2)\n"
    "  --slo-tpot SECONDS    time-per-output-token SLO (default 0.1)\n"
    "\n"
    "search:\n"
    "  --strategy S          hexflow (default), colocated, homogeneous or exact\n"
    "  --time-limit SECONDS  stop refining after this long (default 60)\n"
    "  --seed N              seed of the search (default 1)\n"
    "  --calibration FILE    efficiencies per device type (docs/cost-model.md)\n"
    "  --dtype T             weights and KV in bf16, fp16 or fp32 (default: the model's)\n"
    "  --router-port N       the router's port in the plan (default 8000)\n"
    "\n"
    "output:\n"
    "  --out FILE            write the plan (JSON, docs/plan-format.md) to FILE\n"
    "  --json                print the plan as JSON instead of tables\n"
    "  -h, --help            this text\n";

enum {
    OPT_INVENTORY = 256,
    OPT_MODEL,
    OPT_STRATEGY,
    OPT_TIME_LIMIT,
    OPT_SEED,
    OPT_OUT,
    OPT_JSON,
    OPT_CALIBRATION,
    OPT_DTYPE,
    OPT_ROUTER_PORT
};

static const char *devices_text(const hx_plan_stage *st, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    /* compress "h:0 h:1 h:2 h:3" to "h:0-3" */
    int i = 0;
    while (i < st->ndevices && len < size) {
        const char *d = st->devices[i];
        const char *colon = strrchr(d, ':');
        int j = i;
        if (colon) {
            size_t hl = (size_t)(colon - d);
            long first = strtol(colon + 1, NULL, 10), last = first;
            while (j + 1 < st->ndevices && !strncmp(st->devices[j + 1], d, hl + 1) &&
                   strtol(st->devices[j + 1] + hl + 1, NULL, 10) == last + 1) {
                j++;
                last++;
            }
            int k = last > first
                        ? snprintf(buf + len, size - len, "%s%.*s:%ld-%ld", len ? " " : "",
                                   (int)hl, d, first, last)
                        : snprintf(buf + len, size - len, "%s%s", len ? " " : "", d);
            if (k > 0)
                len += (size_t)k;
        } else {
            int k = snprintf(buf + len, size - len, "%s%s", len ? " " : "", d);
            if (k > 0)
                len += (size_t)k;
        }
        i = j + 1;
    }
    return buf;
}

static void print_plan(const hx_plan *p, const hx_search_stats *stats)
{
    char a[64], b[64], c[64];
    printf("plan for %s: %d replica%s on %d host%s, strategy %s%s%s (%.2f s)\n",
           p->model_name ? p->model_name : "?", p->ngroups, p->ngroups == 1 ? "" : "s",
           p->nhosts, p->nhosts == 1 ? "" : "s", p->search_strategy,
           stats->chosen && strcmp(stats->chosen, p->search_strategy) ? ", best plan from "
                                                                       : "",
           stats->chosen && strcmp(stats->chosen, p->search_strategy) ? stats->chosen : "",
           p->search_seconds);
    printf("workload: %.0f input / %.0f output tokens", p->input_tokens, p->output_tokens);
    if (p->rate_rps > 0)
        printf(", %g req/s offered", p->rate_rps);
    printf(", SLO TTFT %s, TPOT %s\n\n", hx_units_fmt_time(p->slo_ttft_s, a, sizeof a),
           hx_units_fmt_time(p->slo_tpot_s, b, sizeof b));

    hx_table *t = hx_table_new(8, "GROUP", "ROLE", "STAGE", "LAYERS", ">TP", "DEVICES",
                               ">MEMORY/DEV", "");
    for (int i = 0; i < p->ngroups; i++) {
        const hx_plan_group *g = &p->groups[i];
        for (int k = 0; k < g->nstages; k++) {
            const hx_plan_stage *st = &g->stages[k];
            char devs[512], layers[32], mem[64] = "";
            snprintf(layers, sizeof layers, "%d-%d", st->first_layer,
                     st->first_layer + st->num_layers - 1);
            /* memory of the stage's first device */
            for (int m = 0; m < g->nmemory; m++)
                if (st->ndevices > 0 && !strcmp(g->memory[m].device, st->devices[0])) {
                    char x[32], y[32];
                    snprintf(mem, sizeof mem, "%s / %s",
                             hx_units_fmt_bytes(g->memory[m].total_bytes, x, sizeof x),
                             hx_units_fmt_bytes(g->memory[m].capacity_bytes, y, sizeof y));
                }
            char tp[16];
            snprintf(tp, sizeof tp, "%d", st->ndevices);
            hx_table_row(t, k == 0 ? g->id : "", k == 0 ? hx_role_name(g->role) : "",
                         (snprintf(a, sizeof a, "%d", k), a), layers, tp,
                         devices_text(st, devs, sizeof devs), mem, "");
        }
    }
    hx_table_print(t, stdout);
    hx_table_free(t);
    putchar('\n');

    t = hx_table_new(6, "GROUP", "ROLE", ">CAPACITY", ">TTFT", ">TPOT", ">BATCH");
    for (int i = 0; i < p->ngroups; i++) {
        const hx_plan_group *g = &p->groups[i];
        char cap[32], batch[16];
        snprintf(cap, sizeof cap, "%.3g req/s", g->capacity_rps);
        snprintf(batch, sizeof batch, "%d", g->max_batch);
        hx_table_row(t, g->id, hx_role_name(g->role), cap,
                     g->ttft_s >= 0 ? hx_units_fmt_time(g->ttft_s, a, sizeof a) : "-",
                     g->tpot_s >= 0 ? hx_units_fmt_time(g->tpot_s, b, sizeof b) : "-", batch);
    }
    hx_table_print(t, stdout);
    hx_table_free(t);

    if (p->nroutes > 0) {
        putchar('\n');
        t = hx_table_new(5, "PREFILL", "DECODE", ">RATE", ">KV TRAFFIC", ">LINK");
        for (int i = 0; i < p->nroutes; i++) {
            const hx_plan_route *r = &p->routes[i];
            char rate[32];
            snprintf(rate, sizeof rate, "%.3g req/s", r->rps);
            hx_table_row(t, p->groups[r->prefill].id, p->groups[r->decode].id, rate,
                         hx_units_fmt_bandwidth(r->kv_bytes_per_s, a, sizeof a),
                         r->link_bytes_per_s > 0
                             ? hx_units_fmt_bandwidth(r->link_bytes_per_s, b, sizeof b)
                             : "-");
        }
        hx_table_print(t, stdout);
        hx_table_free(t);
    }

    printf("\nthroughput   %.3g req/s (%.0f input, %.0f output tokens/s)\n", p->throughput_rps,
           p->input_tokens_per_s, p->output_tokens_per_s);
    printf("cost         $%.2f/hour, $%.3f per million output tokens\n", p->usd_per_hour,
           p->usd_per_million_output_tokens);
    if (p->bottleneck)
        printf("bottleneck   %s\n", p->bottleneck);
    if (stats->colocated_rps >= 0 || stats->homogeneous_rps >= 0) {
        printf("baselines    colocated %s req/s", stats->colocated_rps >= 0
                                                      ? (snprintf(c, sizeof c, "%.3g",
                                                                  stats->colocated_rps),
                                                         c)
                                                      : "-");
        if (stats->homogeneous_rps >= 0)
            printf(", best single device type %.3g req/s", stats->homogeneous_rps);
        putchar('\n');
    }
    if (p->nunused > 0) {
        printf("\nunused devices:\n");
        /* one line per reason, with its devices */
        for (int i = 0; i < p->nunused;) {
            int j = i;
            while (j + 1 < p->nunused && !strcmp(p->unused[j + 1].reason, p->unused[i].reason))
                j++;
            int count = j - i + 1, shown = count <= 8 ? count : 6;
            printf("  ");
            for (int k = 0; k < shown; k++)
                printf("%s%s", k ? ", " : "", p->unused[i + k].device);
            if (shown < count)
                printf(" and %d more", count - shown);
            printf(": %s\n", p->unused[i].reason);
            i = j + 1;
        }
    }
}

int hx_cmd_plan(int argc, char **argv)
{
    static const struct option opts[] = {
        {"inventory", required_argument, NULL, OPT_INVENTORY},
        {"model", required_argument, NULL, OPT_MODEL},
        HX_CLI_WORKLOAD_OPTIONS,
        {"strategy", required_argument, NULL, OPT_STRATEGY},
        {"time-limit", required_argument, NULL, OPT_TIME_LIMIT},
        {"seed", required_argument, NULL, OPT_SEED},
        {"out", required_argument, NULL, OPT_OUT},
        {"json", no_argument, NULL, OPT_JSON},
        {"calibration", required_argument, NULL, OPT_CALIBRATION},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"router-port", required_argument, NULL, OPT_ROUTER_PORT},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *inv_path = NULL, *model_name = NULL, *out_path = NULL, *calib_path = NULL,
               *dtype = NULL;
    hx_cli_workload cw;
    hx_cli_workload_init(&cw);
    double v;
    int as_json = 0;
    hx_search_opts so;
    hx_search_opts_default(&so);
    int c;
    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_INVENTORY: inv_path = optarg; break;
        case OPT_MODEL: model_name = optarg; break;
        case OPT_OUT: out_path = optarg; break;
        case OPT_JSON: as_json = 1; break;
        case OPT_CALIBRATION: calib_path = optarg; break;
        case OPT_DTYPE: dtype = optarg; break;
        case HX_CLI_OPT_WORKLOAD:
        case HX_CLI_OPT_INPUT:
        case HX_CLI_OPT_OUTPUT:
        case HX_CLI_OPT_RATE:
        case HX_CLI_OPT_TTFT:
        case HX_CLI_OPT_TPOT:
            if (!hx_cli_workload_opt("plan", c, optarg, &cw))
                return 2;
            break;
        case OPT_TIME_LIMIT:
            if (!hx_cli_duration("plan", "--time-limit", optarg, &so.time_limit_s))
                return 2;
            break;
        case OPT_SEED:
            v = 0;
            if (!hx_cli_number("plan", "--seed", optarg, 0, 4294967295.0, &v) || v != floor(v))
                return v != floor(v) ? hx_cli_usage_error("plan", "--seed: expected an integer")
                                     : 2;
            so.seed = (unsigned long)v;
            break;
        case OPT_ROUTER_PORT:
            if (!hx_cli_number("plan", "--router-port", optarg, 1, 65535, &v))
                return 2;
            so.router_port = (int)v;
            break;
        case OPT_STRATEGY:
            if (hx_strategy_parse(optarg, &so.strategy) != HX_OK)
                return hx_cli_usage_error("plan",
                                          "--strategy: unknown strategy '%s'; expected hexflow, "
                                          "colocated, homogeneous or exact",
                                          optarg);
            break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': return hx_cli_usage_error("plan", "%s needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("plan", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("plan", "unexpected argument '%s'", argv[optind]);
    if (!inv_path)
        return hx_cli_usage_error("plan", "missing --inventory FILE");
    if (!model_name)
        return hx_cli_usage_error("plan", "missing --model NAME|DIR");

    int rc = 0;
    hx_inventory *inv = NULL;
    hx_plan *plan = NULL;
    hx_cost_params params;
    hx_cost_params_default(&params);
    hx_err err = {0};
    hx_diags d;
    hx_diags_init(&d);

    hx_model model;
    if (hx_model_load(model_name, &model, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (dtype) {
        hx_model_dtype dt;
        if (hx_model_dtype_parse(dtype, &dt, &err) != HX_OK) {
            rc = hx_cli_usage_error("plan", "--dtype: %s", err.msg);
            goto out;
        }
        hx_model_set_dtype(&model, dt);
    }
    hx_workload wl;
    if ((rc = hx_cli_workload_build(&cw, &wl)) != 0)
        goto out;
    if (calib_path && hx_cost_params_load(&params, calib_path, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    hx_status st = hx_inventory_load(inv_path, &inv, &d);
    if (st != HX_OK) {
        hx_diags_print(&d, stderr, "");
        if (st == HX_EPARSE)
            hx_cli_error("inventory '%s' has %zu error%s", inv_path, d.count,
                         d.count == 1 ? "" : "s");
        rc = hx_status_exit_code(st);
        goto out;
    }
    hx_search_stats stats;
    st = hx_search_plan(inv, &model, &wl, &params, &so, &plan, &stats, &err);
    if (st != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (out_path && hx_plan_write(plan, out_path, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (as_json) {
        json_t *j = hx_plan_to_json(plan);
        if (!j || hx_json_print(j) != HX_OK)
            rc = 1;
        json_decref(j);
    } else {
        print_plan(plan, &stats);
        if (out_path)
            printf("\nplan written to %s\n", out_path);
    }
out:
    hx_plan_free(plan);
    hx_inventory_free(inv);
    hx_cost_params_release(&params);
    hx_diags_release(&d);
    return rc;
}
