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

int hx_cmd_inventory(int argc, char **argv);
int hx_cmd_discover(int argc, char **argv);
int hx_cmd_model(int argc, char **argv);
int hx_cmd_plan(int argc, char **argv);
int hx_cmd_simulate(int argc, char **argv);

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

#endif /* HX_CLI_H */
