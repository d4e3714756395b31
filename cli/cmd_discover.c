/*
 * cmd_discover.c - `hexflow discover [--json]`: this machine as an inventory fragment.
 */
#include <getopt.h>
#include <stdio.h>

#include "cli/cli.h"
#include "common/json.h"
#include "topo/discover.h"

static const char usage_text[] =
    "usage: hexflow discover [--json]\n"
    "\n"
    "Describes this machine: cores, NUMA nodes and memory (hwloc), GPUs (CUDA\n"
    "driver or NVML, when installed), network interfaces and RDMA devices.\n"
    "Prints an inventory fragment with `address: local` that 'hexflow inventory\n"
    "check' accepts; paste it into a cluster inventory and edit the address.\n"
    "Without a GPU the devices are `cpu`, one per NUMA node, with figures\n"
    "estimated from this machine.\n"
    "\n"
    "options:\n"
    "  --json      everything found, as JSON (with the inferred host entry)\n"
    "  -h, --help  this text\n";

int hx_cmd_discover(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int as_json = 0, c;
    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'j': as_json = 1; break;
        case 'h': fputs(usage_text, stdout); return 0;
        default: {
            const char *arg = optind > 1 ? argv[optind - 1] : "";
            if (arg[0] == '-' && arg[1] == '-')
                return hx_cli_usage_error("discover", "unknown option '%s'", arg);
            return hx_cli_usage_error("discover", "unknown option '-%c'", optopt);
        }
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("discover", "unexpected argument '%s'", argv[optind]);

    hx_err err = {0};
    hx_discovery *d = NULL;
    hx_status st = hx_discover_run(&d, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err);

    int rc = 0;
    if (as_json) {
        json_t *j = hx_discover_to_json(d);
        if (!j || hx_json_print(j) != HX_OK) {
            hx_cli_error("discover: cannot write the JSON output");
            rc = 1;
        }
        json_decref(j);
    } else if (hx_discover_write_yaml(d, stdout) != HX_OK || fflush(stdout) != 0) {
        hx_cli_error("discover: cannot write the inventory fragment");
        rc = 1;
    }
    hx_discovery_free(d);
    return rc;
}
