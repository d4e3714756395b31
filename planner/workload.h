/*
 * workload.h - reading a workload description for the planner.
 *
 * A workload file is YAML (or JSON, which is YAML):
 *
 *     input_tokens: 1024        # mean prompt length
 *     output_tokens: 128        # mean generated length
 *     rate: 12.5                # requests/s offered (optional; 0 = as much as possible)
 *     slo:
 *       ttft: 2s                # time to first token (durations as in inventories)
 *       tpot: 100ms             # time per output token
 *       attainment: 0.9         # fraction of requests that must meet both
 *
 * Fields left out keep the values already in the hx_workload.
 */
#ifndef HX_WORKLOAD_H
#define HX_WORKLOAD_H

#include "common/diag.h"
#include "common/status.h"
#include "planner/cost.h"

/*
 * Reads `path` over *wl. Problems go to diags as "FILE:LINE:COL: field:
 * message"; returns HX_EPARSE (malformed), HX_ENOENT/HX_EIO (unreadable).
 */
hx_status hx_workload_load(const char *path, hx_workload *wl, hx_diags *diags);

/*
 * Checks a workload's values: lengths >= 1 and at most 10^7 tokens, SLOs > 0,
 * attainment in (0, 1], rate >= 0. HX_EINVAL with the field named.
 */
hx_status hx_workload_check(const hx_workload *wl, hx_err *err);

#endif /* HX_WORKLOAD_H */
