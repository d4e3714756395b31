/*
 * cost.h - the planner's cost model: how fast a model replica ("group") with
 * a given pipeline/tensor layout serves a workload in a given role, and how
 * much memory it needs. Formulas with their derivations are written up in
 * docs/cost-model.md; in short:
 *
 *   stage time   = roofline(FLOPs / (TP x peak x compute_eff),
 *                           bytes read / (HBM x hbm_eff))
 *                + TP all-reduce (2 per layer, ring: 2(t-1)/t x bytes / bw + 2(t-1) x latency)
 *                + activation send to the next stage (bytes / bw + latency)
 *   prefill      batch of b prompts; TTFT = sum of stage times; capacity =
 *                b / slowest stage, for the b that maximises it with TTFT within
 *                ttft_budget x the TTFT SLO and activations in memory
 *   decode       continuous batching over pp micro-batches of B requests;
 *                TPOT = pp x slowest stage (one stage: its time); capacity =
 *                pp B / ((output - 1) x TPOT), for the largest B with TPOT
 *                within tpot_budget x the SLO and KV of pp B requests at full
 *                context in memory
 *   both         colocated prefill and decode: prefill steals time from decode,
 *                R <= P (1 - TPOT/SLO) and R <= P D / (P + D)
 *   KV transfer  KV bytes per request = kv_bytes_per_token x input tokens
 *
 * Efficiencies are parameters with defaults per device kind, overridable by
 * a calibration file (hx_cost_params_load).
 */
#ifndef HX_COST_H
#define HX_COST_H

#include <stddef.h>

#include "common/status.h"
#include "planner/model.h"
#include "planner/plan.h"
#include "topo/graph.h"

#define HX_MAX_STAGES 32
#define HX_MAX_GROUP_DEVICES 128

/* What the plan is made for. */
typedef struct hx_workload {
    double input_tokens;   /* mean prompt length */
    double output_tokens;  /* mean generated length (>= 1) */
    double rate_rps;       /* offered request rate; 0 = as much as the cluster can serve */
    double slo_ttft_s;     /* time to first token */
    double slo_tpot_s;     /* time per output token */
    double slo_attainment; /* fraction of requests that must meet both SLOs (0.9) */
} hx_workload;

/* 512 in, 128 out, no rate, TTFT 2 s, TPOT 0.1 s, attainment 0.9. */
void hx_workload_default(hx_workload *w);

/* Efficiency of one device type (fractions of the catalog peaks reached). */
typedef struct hx_type_eff {
    char name[HX_GPU_NAME_MAX];
    double compute;  /* of dense peak FLOP/s, in large GEMMs */
    double hbm;      /* of memory bandwidth, streaming weights and KV */
} hx_type_eff;

typedef struct hx_cost_params {
    double compute_eff;    /* default for GPUs: 0.6 */
    double hbm_eff;        /* default for GPUs: 0.75 */
    double cpu_compute_eff; /* CPU devices: 0.5 */
    double cpu_hbm_eff;    /* CPU devices: 0.6 */
    double net_eff;        /* of link bandwidth: 0.8 */
    double mem_util;       /* usable fraction of device memory: 0.92 */
    double ttft_budget;    /* fraction of the TTFT SLO for prefill service (rest: queueing): 0.5 */
    double tpot_budget;    /* fraction of the TPOT SLO for a decode step: 0.9 */
    int max_prefill_batch; /* prompts per prefill batch at most: 16 */
    hx_type_eff *types;    /* owned [ntypes]: per-type overrides */
    size_t ntypes;
} hx_cost_params;

void hx_cost_params_default(hx_cost_params *p);
void hx_cost_params_release(hx_cost_params *p);

/*
 * Reads a calibration file (JSON) over the defaults in *p:
 *   {"defaults": {"compute_efficiency": 0.6, "hbm_efficiency": 0.75,
 *                 "network_efficiency": 0.8, "memory_utilization": 0.92,
 *                 "ttft_budget": 0.5, "tpot_budget": 0.9, "max_prefill_batch": 16},
 *    "types": {"H100-SXM": {"compute_efficiency": 0.55, "hbm_efficiency": 0.8}}}
 * Fractions must lie in (0, 1]. HX_EPARSE/HX_EINVAL with the field named.
 */
hx_status hx_cost_params_load(hx_cost_params *p, const char *path, hx_err *err);

/* Efficiencies for a device type. */
double hx_cost_compute_eff(const hx_cost_params *p, const hx_gpu_spec *s);
double hx_cost_hbm_eff(const hx_cost_params *p, const hx_gpu_spec *s);

/*
 * A group's layout: pipeline stages in order, each a TP group of devices.
 * Devices are listed stage by stage: stage i holds devices
 * devices[dev_offset(i) .. dev_offset(i) + tp[i]).
 */
typedef struct hx_layout {
    int nstages;
    int first_layer[HX_MAX_STAGES];
    int num_layers[HX_MAX_STAGES];
    int tp[HX_MAX_STAGES];
    int ndevices;
    int devices[HX_MAX_GROUP_DEVICES]; /* device ids of the graph */
} hx_layout;

/* Memory of one device of a stage (all devices of a stage are alike). */
typedef struct hx_stage_mem {
    double weights_bytes;
    double kv_bytes;
    double workspace_bytes;
    double capacity_bytes;
} hx_stage_mem;

typedef struct hx_perf {
    hx_role role;
    int feasible;          /* the layout fits in memory and can meet the SLOs */
    double capacity_rps;   /* requests/s in this role under the SLOs; 0 when infeasible */
    double ttft_s;         /* prefill service latency at the chosen batch (prefill, both) */
    double tpot_s;         /* decode step time at the chosen batch (decode, both) */
    int batch;             /* prefill: prompts per batch; decode/both: concurrent requests */
    double kv_tokens;      /* decode/both: KV cache capacity in tokens */
    const char *limit;     /* static text: what bounds the capacity */
    hx_stage_mem mem[HX_MAX_STAGES];
} hx_perf;

/*
 * What a layout's stage times are made of, per stage. Built once per group
 * (hx_group_model_init); the planner and the simulator time batches with it.
 */
typedef struct hx_stage_model {
    int tp, num_layers;
    double flops_per_s;          /* per device: peak x efficiency */
    double bytes_per_s;          /* per device: memory bandwidth x efficiency */
    double mem_bytes;            /* per device: usable memory */
    double weights_bytes;        /* per device: weight shard */
    double tok_flops;            /* whole stage: FLOPs per token outside attention scores */
    double head_flops;           /* whole stage: FLOPs per sequence for its logits (last stage) */
    double attn_flops_per_key;   /* whole stage: FLOPs per (query, key) pair: 4 H d layers */
    double kv_bytes_per_token;   /* per device: KV of one token in the stage's layers */
    double act_bytes_per_token;  /* activations passed on / all-reduced: hidden x dtype */
    double tp_bw, tp_lat;        /* TP ring: narrowest link x net_eff, its latency */
    double next_bw, next_lat;    /* to the next stage (INFINITY for the last) */
} hx_stage_model;

typedef struct hx_group_model {
    int nstages;
    hx_stage_model st[HX_MAX_STAGES];
    int window_tokens;           /* sliding attention window, 0 = full */
    int hidden_size, intermediate_size, vocab_size;
    double mem_util;
} hx_group_model;

/* Everything the model needs, precomputed once per plan. Borrowed pointers. */
typedef struct hx_cost_ctx {
    const hx_model *model;
    const hx_graph *graph;
    const hx_cost_params *params;
    hx_workload wl;
    /* derived */
    double prefill_layer_flops;  /* one layer, one prompt of input_tokens */
    double prefill_embed_flops;  /* one prompt */
    double prefill_head_flops;   /* one prompt (last token's logits) */
    double decode_layer_flops;   /* one layer, one token at the mean context */
    double decode_embed_flops;
    double decode_head_flops;
    double layer_bytes;          /* one layer's weights */
    double kv_bytes_per_token_layer; /* K and V of one token in one layer, all KV heads */
    double kv_bytes_per_request; /* KV cache a prefill hands to decode: all layers x input */
    double ctx_mean_tokens;      /* input + output / 2 */
    double ctx_max_tokens;       /* input + output */
    double decode_tokens;        /* tokens generated by decode per request: max(output - 1, 1) */
} hx_cost_ctx;

void hx_cost_ctx_init(hx_cost_ctx *c, const hx_model *model, const hx_graph *graph,
                      const hx_cost_params *params, const hx_workload *wl);

/* The stage coefficients of layout `l` (see hx_group_model). */
void hx_group_model_init(const hx_cost_ctx *c, const hx_layout *l, hx_group_model *gm);

/*
 * One prefill batch of `prompts` prompts holding `tokens` tokens and
 * `key_pairs` causal (query, key) pairs in all (s(s+1)/2 per prompt of s
 * tokens without a window). Returns its latency (the sum of the stage times);
 * *occupancy_s (may be NULL) is the slowest stage: the next batch can start
 * after it.
 */
double hx_group_prefill_s(const hx_group_model *gm, int prompts, double tokens,
                          double key_pairs, double *occupancy_s);

/*
 * One decode step (every request gains a token) for `batch` requests that
 * attend `keys` context tokens in all: pp micro-batches, so
 * max(sum of stage times, pp x slowest stage).
 */
double hx_group_decode_step_s(const hx_group_model *gm, double batch, double keys);

/* KV cache capacity in tokens beside the weights and a workspace for `workspace_tokens`. */
double hx_group_kv_tokens(const hx_group_model *gm, double workspace_tokens);

/* Evaluates `l` in `role`. Layouts must have consistent stages (see hx_layout_check). */
void hx_cost_eval(const hx_cost_ctx *c, const hx_layout *l, hx_role role, hx_perf *out);

/*
 * Checks a layout: 1 <= stages <= HX_MAX_STAGES, layers contiguous from 0
 * covering the model, tp >= 1 dividing the attention heads, devices valid
 * and distinct. Returns HX_EINVAL with a message otherwise.
 */
hx_status hx_layout_check(const hx_cost_ctx *c, const hx_layout *l, hx_err *err);

/*
 * The best layout of the devices `devices[0..n)` for `role`: TP inside a
 * host, pipeline stages across hosts (and across TP groups within a host),
 * layers split in proportion to each stage's speed for the role (and, as
 * alternatives, to its memory), searched over TP degrees. Returns 1 and fills
 * *best and *perf with the highest capacity found, 0 when no layout is
 * feasible (perf->limit then says why).
 */
int hx_cost_best_layout(const hx_cost_ctx *c, const int *devices, int n, hx_role role,
                        hx_layout *best, hx_perf *perf);

/*
 * Bandwidth for KV transfer between two groups, in bytes/s: parallel paths
 * between their devices, bounded by each side's NICs (intra-host links for
 * devices that share a host) and by the uplinks of the switches crossed.
 */
double hx_cost_kv_link_bytes_per_s(const hx_cost_ctx *c, const hx_layout *p,
                                   const hx_layout *d);

/* Weight bytes of stage i of a layout (per device: divide by tp[i]). */
double hx_cost_stage_weight_bytes(const hx_cost_ctx *c, const hx_layout *l, int i);

#endif /* HX_COST_H */
