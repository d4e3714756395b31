/*
 * sim.h - discrete-event simulation of a plan's deployment.
 *
 * The simulator times every batch with the planner's cost model (cost.h:
 * the same stage coefficients the planner used), so its numbers and the
 * plan's agree where they should and differ where queueing, batching and
 * link contention matter:
 *
 *   arrivals     Poisson at a rate, or a trace (Mooncake JSONL, Azure CSV),
 *                time-scaled to a rate when one is given; lengths fixed, drawn
 *                from a distribution, or from the trace
 *   router       sends a request to the prefill (or colocated) group with the
 *                least queued work per unit of its planned share, and after
 *                prefill to the decode group of that group's routes with the
 *                least load per unit of route weight
 *   prefill      FIFO; a free group takes up to max_prefill_batch waiting
 *                prompts; a batch occupies the pipeline for its slowest stage
 *                and finishes after the sum of its stages (first token)
 *   KV transfer  per route link, shared equally by the transfers in flight
 *                (processor sharing)
 *   decode       continuous batching: a request is admitted when the KV of
 *                its full context fits, every step gives each active request
 *                a token and takes hx_group_decode_step_s(batch, context)
 *   colocated    one loop per group: waiting prompts first (a prefill batch
 *                stalls decoding), then decode steps
 *
 * Deterministic for a given seed.
 */
#ifndef HX_SIM_H
#define HX_SIM_H

#include <stddef.h>

#include "common/status.h"
#include "planner/model.h"
#include "planner/plan.h"
#include "planner/trace.h"

typedef enum hx_len_dist {
    HX_LEN_FIXED = 0,       /* every request has the mean lengths */
    HX_LEN_EXPONENTIAL = 1, /* exponential with the means (at least 1 token) */
    HX_LEN_UNIFORM = 2,     /* uniform on [1, 2 x mean - 1] */
    HX_LEN_LOGNORMAL = 3    /* lognormal with the means and sigma 0.8 */
} hx_len_dist;

/* Parses fixed, exponential, uniform, lognormal; HX_EINVAL otherwise. */
hx_status hx_len_dist_parse(const char *s, hx_len_dist *out);
const char *hx_len_dist_name(hx_len_dist d);

typedef struct hx_sim_opts {
    double rate_rps;          /* Poisson rate; with a trace, rescales its timestamps (0 = as is) */
    const hx_trace *trace;    /* borrowed; NULL for Poisson arrivals */
    double input_tokens;      /* mean lengths (ignored with a trace) */
    double output_tokens;
    hx_len_dist lengths;
    long requests;            /* arrivals to simulate (0: use duration_s) */
    double duration_s;        /* or: arrivals within this many seconds */
    unsigned long seed;
    double slo_ttft_s;
    double slo_tpot_s;
    int record;               /* keep one record per request (for --csv) */
} hx_sim_opts;

/*
 * Defaults: the plan's workload and SLOs, 80% of its throughput (or its
 * rate), five minutes of arrivals (2000 to 1000000 requests), seed 1.
 */
void hx_sim_opts_from_plan(hx_sim_opts *o, const hx_plan *plan);

typedef struct hx_latency_stats {
    double mean, p50, p90, p99, max;
} hx_latency_stats;

typedef struct hx_sim_group_stats {
    char id[32];
    int role;                 /* hx_role */
    double utilisation;       /* busy time / makespan */
    long prefills;            /* prompts prefilled */
    long completions;         /* requests finished here (decode, both) */
    double mean_batch;        /* decode: mean requests per step; prefill: per batch */
    double max_waiting;       /* most requests waiting at once */
} hx_sim_group_stats;

typedef struct hx_sim_link_stats {
    int prefill, decode;      /* plan group indices */
    double utilisation;       /* fraction of time with a transfer in flight */
    double bytes;             /* KV bytes moved */
    double mean_transfer_s;
} hx_sim_link_stats;

typedef struct hx_sim_record {
    double arrival_s, ttft_s, tpot_s, e2e_s;
    int input_tokens, output_tokens;
    int prefill_group, decode_group; /* plan indices; decode = prefill for colocated */
    int met_slo;
} hx_sim_record;

typedef struct hx_sim_result {
    long arrived, completed;
    double makespan_s;        /* first arrival to last completion */
    double offered_rps;       /* arrivals / arrival window */
    double throughput_rps;    /* rate of the middle 80% of the completions (no ramp-up, no
                                 stragglers): the offered rate under light load, the
                                 capacity under overload */
    double completion_rps;    /* completed / makespan (the lambda of Little's law) */
    double slo_attainment;    /* fraction meeting both SLOs */
    hx_latency_stats ttft_s, tpot_s, e2e_s;
    double mean_in_system;    /* time average of requests in the system (Little's L) */
    long events;
    double wall_s;            /* real time the simulation took */
    hx_sim_group_stats *groups; /* owned [ngroups] */
    int ngroups;
    hx_sim_link_stats *links; /* owned [nlinks] */
    int nlinks;
    hx_sim_record *records;   /* owned [completed] when opts.record */
} hx_sim_result;

void hx_sim_result_release(hx_sim_result *r);

typedef struct hx_sim hx_sim;

/*
 * Prepares the simulation of `plan` (borrowed; must outlive the simulator).
 * The plan needs its `cluster` (plans written by `hexflow plan` have it) and
 * a model: `model` when given (borrowed, copied), else the plan's model
 * config or preset name. HX_EINVAL with a message when the plan lacks them or
 * names devices its cluster does not have.
 */
hx_status hx_sim_new(const hx_plan *plan, const hx_model *model, hx_sim **out, hx_err *err);
void hx_sim_free(hx_sim *sim);

/* Runs one simulation; `res` is caller-owned storage, released with hx_sim_result_release. */
hx_status hx_sim_run(hx_sim *sim, const hx_sim_opts *opts, hx_sim_result *res, hx_err *err);

/* One point of the goodput search. */
typedef struct hx_goodput_point {
    double rate_rps, attainment, throughput_rps;
} hx_goodput_point;

#define HX_GOODPUT_SECONDS 120.0

/*
 * The highest rate at which at least `target` of the requests meet both SLOs
 * (DistServe's goodput), by bisection over rates (opts->rate_rps ignored).
 * Without a trace every probe simulates opts->duration_s seconds of
 * arrivals (HX_GOODPUT_SECONDS when 0); opts->requests is ignored.
 * points (may be NULL) receives up to max_points probes, sorted by rate.
 */
hx_status hx_sim_find_goodput(hx_sim *sim, const hx_sim_opts *opts, double target,
                              double *goodput_rps, hx_goodput_point *points, int max_points,
                              int *npoints, hx_err *err);

#endif /* HX_SIM_H */
