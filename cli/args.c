/*
 * args.c - option values shared by the subcommands: numbers, durations and
 * the workload flags of plan and whatif.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli/cli.h"
#include "common/units.h"

int hx_cli_number(const char *cmd, const char *opt, const char *s, double lo, double hi,
                  double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        hx_cli_usage_error(cmd, "%s: '%s' is not a number from %g to %g", opt, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

int hx_cli_duration(const char *cmd, const char *opt, const char *s, double *out)
{
    hx_err e = {0};
    if (hx_units_parse_time(s, out, &e) != HX_OK || !(*out > 0)) {
        hx_cli_usage_error(cmd, "%s: '%s' is not a positive duration (e.g. 2, 0.1, 150ms)", opt,
                           s);
        return 0;
    }
    return 1;
}

void hx_cli_workload_init(hx_cli_workload *w)
{
    w->path = NULL;
    w->input = w->output = w->rate = w->ttft = w->tpot = -1;
}

int hx_cli_workload_opt(const char *cmd, int opt, const char *arg, hx_cli_workload *w)
{
    switch (opt) {
    case HX_CLI_OPT_WORKLOAD: w->path = arg; return 1;
    case HX_CLI_OPT_INPUT: return hx_cli_number(cmd, "--input-tokens", arg, 1, 1e7, &w->input);
    case HX_CLI_OPT_OUTPUT: return hx_cli_number(cmd, "--output-tokens", arg, 1, 1e7, &w->output);
    case HX_CLI_OPT_RATE: return hx_cli_number(cmd, "--rate", arg, 0, 1e9, &w->rate);
    case HX_CLI_OPT_TTFT: return hx_cli_duration(cmd, "--slo-ttft", arg, &w->ttft);
    case HX_CLI_OPT_TPOT: return hx_cli_duration(cmd, "--slo-tpot", arg, &w->tpot);
    }
    return 0;
}

int hx_cli_workload_build(const hx_cli_workload *w, hx_workload *out)
{
    hx_workload_default(out);
    if (w->path) {
        hx_diags d;
        hx_diags_init(&d);
        hx_status st = hx_workload_load(w->path, out, &d);
        if (st != HX_OK) {
            hx_diags_print(&d, stderr, "");
            hx_diags_release(&d);
            return hx_status_exit_code(st);
        }
        hx_diags_release(&d);
    }
    if (w->input > 0)
        out->input_tokens = w->input;
    if (w->output > 0)
        out->output_tokens = w->output;
    if (w->rate >= 0)
        out->rate_rps = w->rate;
    if (w->ttft > 0)
        out->slo_ttft_s = w->ttft;
    if (w->tpot > 0)
        out->slo_tpot_s = w->tpot;
    hx_err err = {0};
    if (hx_workload_check(out, &err) != HX_OK)
        return hx_cli_fail(&err);
    return 0;
}
