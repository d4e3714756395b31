/*
 * whatif.h - what adding or removing hardware does to goodput and cost.
 *
 * A scenario is the inventory with hosts added (NAME:TYPE:COUNT[@SWITCH]) or
 * removed (a host name, or a device type for all hosts of it). Each scenario
 * is planned (search.h) and its plan simulated (sim.h) to find its goodput;
 * scenarios that only add hardware keep the current plan when the search
 * finds nothing better, so adding devices never lowers planned throughput.
 *
 * The purchase advisor (hx_whatif_budget) prices candidate purchases of
 * catalog types (NVIDIA parts: the runtime's GPU backend is CUDA) in hosts
 * of 1, 2, 4 or 8 devices: the planner measures what
 * one host of each type adds, a GLPK integer program picks the counts that
 * add the most within the budget, and the best few options are planned and
 * simulated in full.
 */
#ifndef HX_WHATIF_H
#define HX_WHATIF_H

#include "common/status.h"
#include "planner/search.h"
#include "topo/inventory.h"

#define HX_WHATIF_NAME_MAX 160

typedef struct hx_whatif_change {
    int remove;                  /* 0: add a host; 1: remove hosts */
    char name[128];              /* host to add or remove (or device type to remove) */
    char type[HX_GPU_NAME_MAX];  /* add: device type */
    int count;                   /* add: devices */
    char switch_name[128];       /* add: switch ("" = none) */
} hx_whatif_change;

/* Parses NAME:TYPE:COUNT[@SWITCH] (HX_EINVAL with a message naming what is wrong). */
hx_status hx_whatif_parse_add(const char *spec, hx_whatif_change *out, hx_err *err);

/*
 * The inventory with `changes` applied (a new inventory). Added hosts copy
 * the SSH settings, intra-host link and NIC of an existing host of the same
 * type when there is one (else NVLink for SXM-class parts, PCIe otherwise, and
 * a 100 Gb/s NIC); their address is "planned". HX_EINVAL when a host to
 * remove does not exist, a name is taken, a switch is unknown, or nothing
 * would be left.
 */
hx_status hx_whatif_apply(const hx_inventory *base, const hx_whatif_change *changes, int n,
                          hx_inventory **out, hx_err *err);

typedef struct hx_whatif_result {
    char name[HX_WHATIF_NAME_MAX];
    int ok;                      /* planned; else `error` says why */
    char error[1100];
    int devices;
    double plan_rps;             /* the plan's throughput (max-flow) */
    double goodput_rps;          /* simulated: highest rate meeting the SLO attainment */
    double usd_per_hour;         /* of the devices the plan uses */
    double usd_per_million_output_tokens; /* at the goodput */
    double ttft_p90_s;           /* simulated at the goodput */
    double tpot_p90_s;
    hx_plan *plan;               /* owned; NULL when !ok */
} hx_whatif_result;

void hx_whatif_result_release(hx_whatif_result *r);

typedef struct hx_whatif_opts {
    hx_search_opts search;
    double sim_seconds;          /* seconds of traffic per simulation (0 = HX_GOODPUT_SECONDS) */
    double attainment;           /* SLO attainment for goodput (0 = the workload's) */
} hx_whatif_opts;

/*
 * Plans and simulates one inventory. `base` (may be NULL) is the current
 * cluster's plan: kept when `inv` only adds hosts and the search does worse.
 * Failures to plan are reported in out->ok/out->error, not as a status;
 * the status is for out-of-memory only.
 */
hx_status hx_whatif_evaluate(const char *name, const hx_inventory *inv, const hx_model *model,
                             const hx_workload *wl, const hx_cost_params *params,
                             const hx_whatif_opts *opts, const hx_plan *base,
                             hx_whatif_result *out);

/*
 * Purchase options within `budget_usd_per_hour` added to `inv`, best goodput
 * per dollar first; fills up to `max` results (caller releases each) and sets
 * *n. `current` is the evaluated current cluster.
 */
hx_status hx_whatif_budget(const hx_inventory *inv, const hx_model *model,
                           const hx_workload *wl, const hx_cost_params *params,
                           const hx_whatif_opts *opts, const hx_whatif_result *current,
                           double budget_usd_per_hour, hx_whatif_result *out, int max, int *n,
                           hx_err *err);

#endif /* HX_WHATIF_H */
