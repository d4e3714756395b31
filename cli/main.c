/*
 * main.c - the `hexflow` command: global options and subcommand dispatch.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/cmd_generate.h"
#ifdef HX_HAVE_CUDA
#include "kernels/kernels.h"
#ifdef HX_HAVE_CUDA
#include "kernels/cuda.h"
#endif
#endif

#ifndef HX_VERSION
#define HX_VERSION "0.0.0"
#endif

typedef struct cmd {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} cmd;

static const cmd commands[] = {
    {"inventory", hx_cmd_inventory, "check or show a cluster inventory"},
    {"discover", hx_cmd_discover, "describe this machine as an inventory fragment"},
    {"model", hx_cmd_model, "show a model, or write a small random-weight one (make-tiny)"},
    {"generate", hx_cmd_generate, "run a model in one process (CPU, or GPU) and print its output"},
    {"plan", hx_cmd_plan, "plan prefill/decode replicas, layouts and routes for a cluster"},
    {"simulate", hx_cmd_simulate, "simulate a plan's deployment under traffic"},
    {"whatif", hx_cmd_whatif, "compare goodput and cost with hardware added or removed"},
    {"launch", hx_cmd_launch, "start a plan's workers and router, wait until healthy"},
    {"status", hx_cmd_status, "show the processes of a launched plan"},
    {"stop", hx_cmd_stop, "stop everything a launch started"},
    {"restart", hx_cmd_restart, "start again the groups of a launched plan that went down"},
    {"logs", hx_cmd_logs, "show the logs of a launched plan's processes"},
    {"worker", hx_cmd_worker, "run one device's worker of a plan (launch starts these)"},
    {"router", hx_cmd_router, "run a plan's OpenAI-compatible router (launch starts it)"},
};

void hx_cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("hexflow: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int hx_cli_usage_error(const char *cmdname, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hexflow %s: ", cmdname);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'hexflow %s --help')\n", cmdname);
    va_end(ap);
    return 2;
}

int hx_cli_fail(const hx_err *err)
{
    hx_cli_error("%s", err->msg[0] ? err->msg : hx_strerror(err->code));
    int code = hx_status_exit_code(err->code);
    return code ? code : 1;
}

static void usage(FILE *fp)
{
    fputs("usage: hexflow [--version] [--help] <command> [<args>]\n"
          "\n"
          "Plan, deploy and run prefill/decode disaggregated LLM serving on\n"
          "heterogeneous GPU clusters.\n"
          "\n"
          "commands:\n",
          fp);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fputs("\nRun 'hexflow <command> --help' for a command's options.\n", fp);
}

static void version(void)
{
    printf("hexflow %s\n", HX_VERSION);
#if defined HX_HAVE_CUDA && defined HX_CUDA_EMU
    printf("backends: cpu, cuda (host emulation for tests: no GPU code, %s)\n",
           hx_cuda_nccl_available() ? "NCCL emulated over Unix sockets" : "no NCCL");
#elif defined HX_HAVE_CUDA
    int v = hx_cuda_build_version();
    printf("backends: cpu, cuda (CUDA %d.%d, %s)\n", v / 1000, (v % 1000) / 10,
           hx_cuda_nccl_available() ? "NCCL for TP and KV" : "no NCCL: TP and KV over TCP");
#else
    printf("backends: cpu\n");
#endif
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (!strcmp(name, "--help") || !strcmp(name, "-h") || !strcmp(name, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(name, "--version") || !strcmp(name, "-V") || !strcmp(name, "version")) {
        version();
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(name, commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    if (name[0] == '-')
        fprintf(stderr, "hexflow: unknown option '%s' (see 'hexflow --help')\n", name);
    else
        fprintf(stderr, "hexflow: '%s' is not a hexflow command (see 'hexflow --help')\n",
                name);
    return 2;
}
