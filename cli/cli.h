/*
 * cli.h - the subcommands of the `hexflow` command.
 *
 * Each subcommand is `int hx_cmd_<name>(int argc, char **argv)` where argv[0]
 * is the subcommand's own name ("inventory", "model", ...). It parses its
 * options with getopt_long, prints tables for people or JSON with --json, and
 * returns the process exit status: 0 success, 1 failure at run time, 2 bad
 * usage or bad input (after printing one message that says what and where).
 * Subcommands print errors as "hexflow: <message>" through hx_cli_error().
 */
#ifndef HX_CLI_H
#define HX_CLI_H

#include "common/status.h"
#include "planner/workload.h"

int hx_cmd_inventory(int argc, char **argv);
int hx_cmd_discover(int argc, char **argv);
int hx_cmd_model(int argc, char **argv);
int hx_cmd_plan(int argc, char **argv);
int hx_cmd_simulate(int argc, char **argv);
int hx_cmd_whatif(int argc, char **argv);
int hx_cmd_worker(int argc, char **argv);
int hx_cmd_router(int argc, char **argv);
int hx_cmd_launch(int argc, char **argv);
int hx_cmd_stop(int argc, char **argv);
int hx_cmd_restart(int argc, char **argv);
int hx_cmd_status(int argc, char **argv);
int hx_cmd_logs(int argc, char **argv);

/* Prints "hexflow: MESSAGE" to stderr. */
void hx_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Reports an unknown option or a missing argument the way every subcommand
 * does: "hexflow CMD: unknown option '--x' (see 'hexflow CMD --help')", and
 * returns 2.
 */
int hx_cli_usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Prints an hx_err as "hexflow: MESSAGE" and returns the exit status for its code. */
int hx_cli_fail(const hx_err *err);

/*
 * Parses a number option in [lo, hi] into *out; on failure prints the usage
 * error for `cmd` and returns 0 (the caller returns 2).
 */
int hx_cli_number(const char *cmd, const char *opt, const char *s, double lo, double hi,
                  double *out);
/* Parses a positive duration ("2", "150ms"); like hx_cli_number. */
int hx_cli_duration(const char *cmd, const char *opt, const char *s, double *out);

/* The workload flags shared by plan and whatif (getopt_long values). */
enum {
    HX_CLI_OPT_WORKLOAD = 1000,
    HX_CLI_OPT_INPUT,
    HX_CLI_OPT_OUTPUT,
    HX_CLI_OPT_RATE,
    HX_CLI_OPT_TTFT,
    HX_CLI_OPT_TPOT
};
#define HX_CLI_WORKLOAD_OPTIONS                                                         \
    {"workload", required_argument, NULL, HX_CLI_OPT_WORKLOAD},                         \
        {"input-tokens", required_argument, NULL, HX_CLI_OPT_INPUT},                    \
        {"output-tokens", required_argument, NULL, HX_CLI_OPT_OUTPUT},                  \
        {"rate", required_argument, NULL, HX_CLI_OPT_RATE},                             \
        {"slo-ttft", required_argument, NULL, HX_CLI_OPT_TTFT},                         \
        {"slo-tpot", required_argument, NULL, HX_CLI_OPT_TPOT}

typedef struct hx_cli_workload {
    const char *path; /* --workload FILE, or NULL */
    double input, output, rate, ttft, tpot; /* < 0: not given */
} hx_cli_workload;

void hx_cli_workload_init(hx_cli_workload *w);
/* Takes one workload option; returns 0 (after printing why) when its value is bad. */
int hx_cli_workload_opt(const char *cmd, int opt, const char *arg, hx_cli_workload *w);
/*
 * The workload: defaults, then the file, then the flags; checked. Returns 0,
 * or the exit status after printing the problem.
 */
int hx_cli_workload_build(const hx_cli_workload *w, hx_workload *out);

#endif /* HX_CLI_H */
