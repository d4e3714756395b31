/*
 * cmd_launch.c - `hexflow launch`, `status`, `stop`, `restart` and `logs`: deploying a
 * plan and looking after it (launcher/launch.h does the work).
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "launcher/launch.h"

static void launch_usage(FILE *fp)
{
    fprintf(fp,
            "usage: hexflow launch --plan FILE --model DIR [--binary PATH]\n"
            "                      [--accept-new-host-keys] [--dry-run] [--timeout SECONDS]\n"
            "                      [--worker-args ARGS]\n"
            "\n"
            "Starts one worker per device of the plan and the router, on every host at\n"
            "once (SSH, or this machine for hosts with 'address: local'), waits until\n"
            "every group is connected, and prints the router's URL on the last line.\n"
            "On any failure everything started is stopped again (exit status 1).\n"
            "\n"
            "  --plan FILE               the plan (hexflow.plan/1)\n"
            "  --model DIR               the model directory (config.json, safetensors,\n"
            "                            tokenizer.json), pushed to SSH hosts\n"
            "  --binary PATH             the hexflow binary to push (default: this one)\n"
            "  --accept-new-host-keys    add unknown SSH host keys to known_hosts (a\n"
            "                            changed key is always refused)\n"
            "  --dry-run                 print the commands each host would run\n"
            "  --timeout SECONDS         how long to wait for health (default 180)\n"
            "  --worker-args ARGS        extra options for every worker, e.g. '--threads 1'\n"
            "  -h, --help                show this help\n");
}

int hx_cmd_launch(int argc, char **argv)
{
    static const struct option opts[] = {{"plan", required_argument, NULL, 'p'},
                                         {"model", required_argument, NULL, 'm'},
                                         {"binary", required_argument, NULL, 'b'},
                                         {"accept-new-host-keys", no_argument, NULL, 'a'},
                                         {"dry-run", no_argument, NULL, 'n'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"worker-args", required_argument, NULL, 'w'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    hx_launch_options o;
    hx_launch_options_init(&o);
    o.progress = stderr;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'p': o.plan_path = optarg; break;
        case 'm': o.model_dir = optarg; break;
        case 'b': o.binary = optarg; break;
        case 'a': o.accept_new_host_keys = 1; break;
        case 'n': o.dry_run = 1; break;
        case 'w':
            if (strpbrk(optarg, ";&|`$<>\\\"'\n")) {
                hx_cli_error("--worker-args: only plain options are allowed");
                return 2;
            }
            o.worker_args = optarg;
            break;
        case 't':
            if (!hx_cli_duration("launch", "--timeout", optarg, &o.health_timeout_s))
                return 2;
            break;
        case 'h': launch_usage(stdout); return 0;
        case ':': return hx_cli_usage_error("launch", "option '%s' needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("launch", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("launch", "unexpected argument '%s'", argv[optind]);
    if (!o.plan_path || !o.model_dir)
        return hx_cli_usage_error("launch", "--plan and --model are required");
    signal(SIGPIPE, SIG_IGN);
    char url[512];
    hx_err err = {0};
    hx_status st = hx_launch_start(&o, url, sizeof url, &err);
    if (st != HX_OK) {
        hx_cli_fail(&err);
        /* bad input (found before any host was contacted) is 2; the rest is 1 */
        return st == HX_EINVAL || st == HX_EPARSE || st == HX_ENOENT || st == HX_EEXIST ? 2 : 1;
    }
    if (!o.dry_run)
        printf("%s\n", url);
    return 0;
}

/* --plan FILE (and --help) for stop, status and logs. */
typedef struct small_args {
    const char *plan;
    const char *host;
    int json, follow, lines;
    double grace_s;
} small_args;

static int parse_small(const char *cmd, int argc, char **argv, small_args *a, const char *usage)
{
    static const struct option opts[] = {{"plan", required_argument, NULL, 'p'},
                                         {"host", required_argument, NULL, 'H'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"follow", no_argument, NULL, 'f'},
                                         {"lines", required_argument, NULL, 'n'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    memset(a, 0, sizeof *a);
    a->lines = 50;
    a->grace_s = 10;
    int c;
    double v;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":hf", opts, NULL)) != -1) {
        switch (c) {
        case 'p': a->plan = optarg; break;
        case 'H': a->host = optarg; break;
        case 'j': a->json = 1; break;
        case 'f': a->follow = 1; break;
        case 'n':
            if (!hx_cli_number(cmd, "--lines", optarg, 1, 1e7, &v))
                return 2;
            a->lines = (int)v;
            break;
        case 't':
            if (!hx_cli_duration(cmd, "--timeout", optarg, &a->grace_s))
                return 2;
            break;
        case 'h': fputs(usage, stdout); return 0;
        case ':': return hx_cli_usage_error(cmd, "option '%s' needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!a->plan)
        return hx_cli_usage_error(cmd, "--plan is required");
    return -1;
}

int hx_cmd_stop(int argc, char **argv)
{
    small_args a;
    int rc = parse_small("stop", argc, argv, &a,
                         "usage: hexflow stop --plan FILE [--timeout SECONDS]\n"
                         "\n"
                         "Stops every process `hexflow launch` started for the plan: SIGTERM,\n"
                         "then SIGKILL after --timeout (default 10 s). Stopping a plan that\n"
                         "is not running does nothing.\n");
    if (rc >= 0)
        return rc;
    int stopped = 0;
    hx_err err = {0};
    hx_status st = hx_launch_stop(a.plan, NULL, a.grace_s, stderr, &stopped, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err) == 2 && st != HX_ECONN ? 2 : 1;
    printf("stopped %d process%s\n", stopped, stopped == 1 ? "" : "es");
    return 0;
}

int hx_cmd_status(int argc, char **argv)
{
    small_args a;
    int rc = parse_small("status", argc, argv, &a,
                         "usage: hexflow status --plan FILE [--json]\n"
                         "\n"
                         "Shows each process of a launched plan: host, kind, device, group,\n"
                         "role, up or down, and the requests each worker has served.\n");
    if (rc >= 0)
        return rc;
    hx_err err = {0};
    hx_status st = hx_launch_status(a.plan, NULL, a.json, stdout, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err) == 2 ? 2 : 1;
    return 0;
}

int hx_cmd_logs(int argc, char **argv)
{
    small_args a;
    int rc = parse_small("logs", argc, argv, &a,
                         "usage: hexflow logs --plan FILE [--host H] [--lines N] [--follow]\n"
                         "\n"
                         "Prints the last --lines lines (default 50) of every process's log,\n"
                         "per host; --follow keeps printing what they append.\n");
    if (rc >= 0)
        return rc;
    hx_err err = {0};
    hx_status st = hx_launch_logs(a.plan, NULL, a.host, a.lines, a.follow, stdout, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err) == 2 ? 2 : 1;
    return 0;
}

int hx_cmd_restart(int argc, char **argv)
{
    static const struct option opts[] = {{"plan", required_argument, NULL, 'p'},
                                         {"group", required_argument, NULL, 'g'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"accept-new-host-keys", no_argument, NULL, 'a'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    hx_launch_options o;
    hx_launch_options_init(&o);
    o.progress = stderr;
    const char *groups[64];
    int n_groups = 0, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'p': o.plan_path = optarg; break;
        case 'g':
            if (n_groups == 64)
                return hx_cli_usage_error("restart", "at most 64 --group options");
            groups[n_groups++] = optarg;
            break;
        case 't':
            if (!hx_cli_duration("restart", "--timeout", optarg, &o.health_timeout_s))
                return 2;
            break;
        case 'a': o.accept_new_host_keys = 1; break;
        case 'h':
            fputs("usage: hexflow restart --plan FILE [--group ID]... [--timeout SECONDS]\n"
                  "                       [--accept-new-host-keys]\n"
                  "\n"
                  "Starts again what is down of a launched plan: every group with a process\n"
                  "that exited (the whole group: its ranks run in lockstep, so what is left\n"
                  "of it is stopped first) and the router if it exited; with --group, those\n"
                  "groups whatever their state. They start as the launch started them, and\n"
                  "it waits until the router is healthy again (--timeout, default 180 s).\n"
                  "Nothing down: it says so and does nothing.\n",
                  stdout);
            return 0;
        case ':':
            return hx_cli_usage_error("restart", "option '%s' needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("restart", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("restart", "unexpected argument '%s'", argv[optind]);
    if (!o.plan_path)
        return hx_cli_usage_error("restart", "--plan is required");
    int restarted = 0;
    hx_err err = {0};
    hx_status st = hx_launch_restart(&o, groups, n_groups, &restarted, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err) == 2 ? 2 : 1;
    printf("restarted %d process%s\n", restarted, restarted == 1 ? "" : "es");
    return 0;
}
