/*
 * search.h - finding a plan: the HexGen-2 method and its baselines.
 *
 *   hexflow      1. cut hosts into units that can hold a replica (or whole
 *                   hosts that cannot), 2. partition the unit graph (vertex
 *                   weight memory, edge weight bandwidth) into k groups with
 *                   spectral bisection and with METIS, for several k,
 *                   3. give each group its best layout per role (cost.h),
 *                   4. choose roles and routes by max-flow over source ->
 *                   prefill -> KV links (NICs, switch uplinks) -> decode ->
 *                   sink, 5. refine guided by the minimum cut: flip roles,
 *                   move or swap units between groups, merge and split
 *                   groups; keep what raises throughput (or lowers cost at
 *                   equal throughput); stop at convergence or the time limit.
 *                   The result is never worse than the colocated and
 *                   homogeneous baselines, which are computed too.
 *   colocated    every group does prefill and decode (like HexGen); same
 *                grouping search, throughput = sum of group capacities.
 *   homogeneous  the best disaggregated plan on a single device type (like
 *                DistServe): the hexflow search restricted to each type.
 *   exact        exhaustive search over groupings (device counts per host,
 *                which is exact because a host's devices are alike), roles
 *                and layouts, for clusters of at most HX_EXACT_MAX_DEVICES.
 *
 * Deterministic for a given seed (the time limit can only stop it earlier).
 */
#ifndef HX_SEARCH_H
#define HX_SEARCH_H

#include "common/status.h"
#include "planner/cost.h"
#include "planner/plan.h"
#include "topo/inventory.h"

#define HX_EXACT_MAX_DEVICES 16

typedef enum hx_strategy {
    HX_STRATEGY_HEXFLOW = 0,
    HX_STRATEGY_COLOCATED = 1,
    HX_STRATEGY_HOMOGENEOUS = 2,
    HX_STRATEGY_EXACT = 3
} hx_strategy;

const char *hx_strategy_name(hx_strategy s);
hx_status hx_strategy_parse(const char *s, hx_strategy *out);

typedef struct hx_search_opts {
    hx_strategy strategy;
    double time_limit_s;  /* refinement stops after this long; 0 = default (60 s) */
    unsigned long seed;
    int router_port;      /* 0 = HX_PLAN_DEFAULT_ROUTER_PORT */
} hx_search_opts;

void hx_search_opts_default(hx_search_opts *o);

/* What a search did, for benchmarks and tests. */
typedef struct hx_search_stats {
    double seconds;
    int iterations;       /* refinement moves accepted */
    int evaluations;      /* max-flow evaluations */
    double initial_rps;   /* throughput before refinement */
    double colocated_rps; /* baselines (hexflow strategy only; -1 when not computed) */
    double homogeneous_rps;
    const char *chosen;   /* which strategy produced the returned plan */
} hx_search_stats;

/*
 * Plans `model` on `inv` for `wl`. On success *out is a new plan (free with
 * hx_plan_free). HX_EINVAL with a message when nothing can be planned (no
 * devices, the model does not fit the cluster's memory, no group can meet the
 * SLOs, or `exact` asked of a cluster above HX_EXACT_MAX_DEVICES).
 * `stats` may be NULL.
 */
hx_status hx_search_plan(const hx_inventory *inv, const hx_model *model, const hx_workload *wl,
                         const hx_cost_params *params, const hx_search_opts *opts,
                         hx_plan **out, hx_search_stats *stats, hx_err *err);

#endif /* HX_SEARCH_H */
