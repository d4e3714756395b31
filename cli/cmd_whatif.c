/*
 * cmd_whatif.c - `hexflow whatif`: what adding or removing hardware buys.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/json.h"
#include "common/svg.h"
#include "common/table.h"
#include "common/units.h"
#include "planner/whatif.h"

#define MAX_CHANGES 32
#define MAX_OPTIONS 3

static const char usage_text[] =
    "usage: hexflow whatif --inventory FILE --model NAME|DIR [options]\n"
    "\n"
    "Plans and simulates the current cluster and each scenario, and shows them\n"
    "side by side: planned throughput, simulated goodput, p90 TTFT and TPOT,\n"
    "$/hour and $ per million output tokens.\n"
    "\n"
    "scenarios:\n"
    "  --add NAME:TYPE:COUNT[@SWITCH]   a host to add (each --add is a scenario;\n"
    "                                   several changes are also tried together)\n"
    "  --remove HOST|TYPE               a host, or every host of a device type, to remove\n"
    "  --budget USD_PER_HOUR            purchase advisor: the best devices to add for\n"
    "                                   at most this much more per hour\n"
    "\n"
    "workload (as for plan): --input-tokens N --output-tokens N --workload FILE\n"
    "  --rate RPS --slo-ttft SECONDS --slo-tpot SECONDS\n"
    "\n"
    "search and simulation:\n"
    "  --time-limit SECONDS  per plan (default 20)\n"
    "  --seed N              (default 1)\n"
    "  --duration SECONDS    traffic per simulation (default 120)\n"
    "  --calibration FILE    efficiencies per device type\n"
    "\n"
    "output:\n"
    "  --json                machine-readable results\n"
    "  --svg FILE            goodput and cost per scenario as charts\n"
    "  -h, --help            this text\n";

enum {
    OPT_INVENTORY = 256,
    OPT_MODEL,
    OPT_ADD,
    OPT_REMOVE,
    OPT_BUDGET,
    OPT_TIME_LIMIT,
    OPT_SEED,
    OPT_DURATION,
    OPT_CALIBRATION,
    OPT_JSON,
    OPT_SVG
};

static json_t *result_json(const hx_whatif_result *r, const hx_whatif_result *base)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(r->name));
    json_object_set_new(o, "ok", json_boolean(r->ok));
    if (!r->ok) {
        json_object_set_new(o, "error", json_string(r->error));
        return o;
    }
    json_object_set_new(o, "devices", json_integer(r->devices));
    json_object_set_new(o, "plan_rps", json_real(r->plan_rps));
    json_object_set_new(o, "goodput_rps", json_real(r->goodput_rps));
    json_object_set_new(o, "usd_per_hour", json_real(r->usd_per_hour));
    json_object_set_new(o, "usd_per_million_output_tokens",
                        json_real(r->usd_per_million_output_tokens));
    json_object_set_new(o, "ttft_p90_s", json_real(r->ttft_p90_s));
    json_object_set_new(o, "tpot_p90_s", json_real(r->tpot_p90_s));
    if (base && base->ok && r != base) {
        json_object_set_new(o, "goodput_change",
                            json_real(base->goodput_rps > 0
                                          ? r->goodput_rps / base->goodput_rps - 1
                                          : 0));
        json_object_set_new(o, "usd_per_hour_change",
                            json_real(r->usd_per_hour - base->usd_per_hour));
    }
    return o;
}

static void add_row(hx_table *t, const hx_whatif_result *r, const hx_whatif_result *base)
{
    char a[32], b[32];
    if (!r->ok) {
        hx_table_row(t, r->name, "-", "-", "-", "-", "-", "-", "-", r->error);
        return;
    }
    char change[64] = "";
    if (base && base->ok && r != base && base->goodput_rps > 0)
        snprintf(change, sizeof change, "%+.0f%% goodput, %+.2f $/h",
                 100 * (r->goodput_rps / base->goodput_rps - 1),
                 r->usd_per_hour - base->usd_per_hour);
    char dev[16], plan[32], good[32], usd[32], mt[32];
    snprintf(dev, sizeof dev, "%d", r->devices);
    snprintf(plan, sizeof plan, "%.3g", r->plan_rps);
    snprintf(good, sizeof good, "%.3g", r->goodput_rps);
    snprintf(usd, sizeof usd, "%.2f", r->usd_per_hour);
    snprintf(mt, sizeof mt, "%.3f", r->usd_per_million_output_tokens);
    hx_table_row(t, r->name, dev, plan, good, hx_units_fmt_time(r->ttft_p90_s, a, sizeof a),
                 hx_units_fmt_time(r->tpot_p90_s, b, sizeof b), usd, mt, change);
}

static hx_table *new_table(void)
{
    return hx_table_new(9, "SCENARIO", ">DEVICES", ">PLAN REQ/S", ">GOODPUT", ">TTFT P90",
                        ">TPOT P90", ">$/H", ">$/M TOK", "CHANGE");
}

static hx_status write_svg(const char *path, const hx_whatif_result *r, int n, hx_err *err)
{
    const char **names = calloc((size_t)n, sizeof *names);
    double *x = calloc((size_t)n, sizeof *x), *good = calloc((size_t)n, sizeof *good),
           *plan = calloc((size_t)n, sizeof *plan), *mtok = calloc((size_t)n, sizeof *mtok);
    hx_svg_chart *c[2] = {NULL, NULL};
    hx_status st = HX_OK;
    if (!names || !x || !good || !plan || !mtok) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        names[i] = r[i].name;
        x[i] = i;
        good[i] = r[i].ok ? r[i].goodput_rps : NAN;
        plan[i] = r[i].ok ? r[i].plan_rps : NAN;
        mtok[i] = r[i].ok ? r[i].usd_per_million_output_tokens : NAN;
    }
    c[0] = hx_svg_chart_new(HX_SVG_BARS, "Throughput per scenario", NULL, "requests/s");
    c[1] = hx_svg_chart_new(HX_SVG_BARS, "Cost per scenario", NULL,
                            "$ per million output tokens");
    if (!c[0] || !c[1]) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    hx_svg_chart_set_categories(c[0], names, (size_t)n);
    hx_svg_chart_add_series(c[0], "goodput (simulated)", x, good, (size_t)n);
    hx_svg_chart_add_series(c[0], "plan (max-flow)", x, plan, (size_t)n);
    hx_svg_chart_set_categories(c[1], names, (size_t)n);
    hx_svg_chart_add_series(c[1], "at goodput", x, mtok, (size_t)n);
    st = hx_svg_write(path, c, 2, err);
out:
    hx_svg_chart_free(c[0]);
    hx_svg_chart_free(c[1]);
    free(names);
    free(x);
    free(good);
    free(plan);
    free(mtok);
    return st;
}

int hx_cmd_whatif(int argc, char **argv)
{
    static const struct option opts[] = {
        {"inventory", required_argument, NULL, OPT_INVENTORY},
        {"model", required_argument, NULL, OPT_MODEL},
        {"add", required_argument, NULL, OPT_ADD},
        {"remove", required_argument, NULL, OPT_REMOVE},
        {"budget", required_argument, NULL, OPT_BUDGET},
        {"time-limit", required_argument, NULL, OPT_TIME_LIMIT},
        {"seed", required_argument, NULL, OPT_SEED},
        {"duration", required_argument, NULL, OPT_DURATION},
        {"calibration", required_argument, NULL, OPT_CALIBRATION},
        {"json", no_argument, NULL, OPT_JSON},
        {"svg", required_argument, NULL, OPT_SVG},
        HX_CLI_WORKLOAD_OPTIONS,
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *inv_path = NULL, *model_name = NULL, *calib = NULL, *svg = NULL;
    hx_cli_workload cw;
    hx_cli_workload_init(&cw);
    hx_whatif_change changes[MAX_CHANGES];
    int nchanges = 0, as_json = 0;
    double budget = 0, v;
    hx_whatif_opts wo;
    memset(&wo, 0, sizeof wo);
    hx_search_opts_default(&wo.search);
    wo.search.time_limit_s = 20;
    hx_err err = {0};
    int c;
    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_INVENTORY: inv_path = optarg; break;
        case OPT_MODEL: model_name = optarg; break;
        case OPT_CALIBRATION: calib = optarg; break;
        case OPT_SVG: svg = optarg; break;
        case OPT_JSON: as_json = 1; break;
        case OPT_ADD:
        case OPT_REMOVE:
            if (nchanges == MAX_CHANGES)
                return hx_cli_usage_error("whatif", "at most %d --add/--remove", MAX_CHANGES);
            if (c == OPT_ADD) {
                if (hx_whatif_parse_add(optarg, &changes[nchanges], &err) != HX_OK)
                    return hx_cli_usage_error("whatif", "%s", err.msg);
            } else {
                memset(&changes[nchanges], 0, sizeof changes[nchanges]);
                changes[nchanges].remove = 1;
                snprintf(changes[nchanges].name, sizeof changes[nchanges].name, "%s", optarg);
            }
            nchanges++;
            break;
        case OPT_BUDGET:
            if (!hx_cli_number("whatif", "--budget", optarg, 1e-6, 1e9, &budget))
                return 2;
            break;
        case OPT_TIME_LIMIT:
            if (!hx_cli_duration("whatif", "--time-limit", optarg, &wo.search.time_limit_s))
                return 2;
            break;
        case OPT_SEED:
            if (!hx_cli_number("whatif", "--seed", optarg, 0, 4294967295.0, &v))
                return 2;
            wo.search.seed = (unsigned long)v;
            break;
        case OPT_DURATION:
            if (!hx_cli_number("whatif", "--duration", optarg, 1, 1e6, &wo.sim_seconds))
                return 2;
            break;
        case HX_CLI_OPT_WORKLOAD:
        case HX_CLI_OPT_INPUT:
        case HX_CLI_OPT_OUTPUT:
        case HX_CLI_OPT_RATE:
        case HX_CLI_OPT_TTFT:
        case HX_CLI_OPT_TPOT:
            if (!hx_cli_workload_opt("whatif", c, optarg, &cw))
                return 2;
            break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': return hx_cli_usage_error("whatif", "%s needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("whatif", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("whatif", "unexpected argument '%s'", argv[optind]);
    if (!inv_path)
        return hx_cli_usage_error("whatif", "missing --inventory FILE");
    if (!model_name)
        return hx_cli_usage_error("whatif", "missing --model NAME|DIR");
    if (nchanges == 0 && budget <= 0)
        return hx_cli_usage_error("whatif", "nothing to compare: give --add, --remove or --budget");

    int rc = 0;
    hx_inventory *inv = NULL;
    hx_cost_params params;
    hx_cost_params_default(&params);
    hx_whatif_result res[MAX_CHANGES + 2], opt_res[MAX_OPTIONS];
    int nres = 0, nopt = 0;
    memset(res, 0, sizeof res);
    memset(opt_res, 0, sizeof opt_res);
    hx_diags d;
    hx_diags_init(&d);
    hx_model model;
    hx_workload wl;
    if (hx_model_load(model_name, &model, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if ((rc = hx_cli_workload_build(&cw, &wl)) != 0)
        goto out;
    if (calib && hx_cost_params_load(&params, calib, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    hx_status st = hx_inventory_load(inv_path, &inv, &d);
    if (st != HX_OK) {
        hx_diags_print(&d, stderr, "");
        rc = hx_status_exit_code(st);
        goto out;
    }
    /* check every change before the long work */
    for (int i = 0; i < nchanges; i++) {
        hx_inventory *tmp = NULL;
        if (hx_whatif_apply(inv, &changes[i], 1, &tmp, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        hx_inventory_free(tmp);
    }

    if (hx_whatif_evaluate("current", inv, &model, &wl, &params, &wo, NULL, &res[nres++]) !=
        HX_OK) {
        hx_cli_error("out of memory");
        rc = 1;
        goto out;
    }
    if (!res[0].ok) {
        hx_cli_error("cannot plan the current cluster: %s", res[0].error);
        rc = 2;
        goto out;
    }
    int ngroups_of_changes = nchanges > 1 ? nchanges + 1 : nchanges;
    for (int k = 0; k < ngroups_of_changes; k++) {
        const hx_whatif_change *set = k < nchanges ? &changes[k] : changes;
        int nset = k < nchanges ? 1 : nchanges;
        char name[HX_WHATIF_NAME_MAX];
        if (k < nchanges) {
            if (set->remove)
                snprintf(name, sizeof name, "- %s", set->name);
            else
                snprintf(name, sizeof name, "+ %d x %s (%s)", set->count, set->type, set->name);
        } else {
            snprintf(name, sizeof name, "all %d changes", nchanges);
        }
        int only_adds = 1;
        for (int i = 0; i < nset; i++)
            only_adds &= !set[i].remove;
        hx_inventory *scen = NULL;
        if (hx_whatif_apply(inv, set, nset, &scen, &err) != HX_OK) {
            hx_whatif_result *r = &res[nres++];
            memset(r, 0, sizeof *r);
            snprintf(r->name, sizeof r->name, "%s", name);
            snprintf(r->error, sizeof r->error, "%s", err.msg);
            continue;
        }
        hx_whatif_evaluate(name, scen, &model, &wl, &params, &wo,
                           only_adds ? res[0].plan : NULL, &res[nres++]);
        hx_inventory_free(scen);
    }
    if (budget > 0 &&
        hx_whatif_budget(inv, &model, &wl, &params, &wo, &res[0], budget, opt_res, MAX_OPTIONS,
                         &nopt, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }

    if (as_json) {
        json_t *root = json_object(), *sc = json_array(), *bo = json_array();
        for (int i = 0; i < nres; i++)
            json_array_append_new(sc, result_json(&res[i], &res[0]));
        for (int i = 0; i < nopt; i++)
            json_array_append_new(bo, result_json(&opt_res[i], &res[0]));
        json_object_set_new(root, "model", json_string(model.name));
        json_object_set_new(root, "scenarios", sc);
        if (budget > 0) {
            json_object_set_new(root, "budget_usd_per_hour", json_real(budget));
            json_object_set_new(root, "budget_options", bo);
        } else {
            json_decref(bo);
        }
        hx_json_print(root);
        json_decref(root);
    } else {
        printf("what-if for %s on %s (%.0f in / %.0f out tokens, SLO TTFT %g s, TPOT %g s, "
               "goodput at %.0f%% attainment)\n\n",
               model.name, inv_path, wl.input_tokens, wl.output_tokens, wl.slo_ttft_s,
               wl.slo_tpot_s, 100 * wl.slo_attainment);
        hx_table *t = new_table();
        for (int i = 0; i < nres; i++)
            add_row(t, &res[i], &res[0]);
        hx_table_print(t, stdout);
        hx_table_free(t);
        if (budget > 0) {
            printf("\npurchase options within $%.2f/hour more (best goodput per dollar first):\n",
                   budget);
            if (nopt == 0) {
                printf("  none: no catalog device fits the budget or adds throughput\n");
            } else {
                t = new_table();
                for (int i = 0; i < nopt; i++)
                    add_row(t, &opt_res[i], &res[0]);
                hx_table_print(t, stdout);
                hx_table_free(t);
            }
        }
    }
    if (svg) {
        hx_whatif_result all[MAX_CHANGES + 2 + MAX_OPTIONS];
        int n = 0;
        for (int i = 0; i < nres; i++)
            all[n++] = res[i];
        for (int i = 0; i < nopt; i++)
            all[n++] = opt_res[i];
        if (write_svg(svg, all, n, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        if (!as_json)
            printf("\ncharts written to %s\n", svg);
    }
out:
    for (int i = 0; i < nres; i++)
        hx_whatif_result_release(&res[i]);
    for (int i = 0; i < nopt; i++)
        hx_whatif_result_release(&opt_res[i]);
    hx_inventory_free(inv);
    hx_cost_params_release(&params);
    hx_diags_release(&d);
    return rc;
}
