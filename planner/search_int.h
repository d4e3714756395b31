/*
 * search_int.h - internals shared by the search strategies (search.c,
 * exact.c). Not part of the planner's public interface.
 */
#ifndef HX_SEARCH_INT_H
#define HX_SEARCH_INT_H

#include "planner/cost.h"
#include "planner/flow.h"
#include "planner/search.h"

#define HX_ROLE_NONE (-1) /* a group that serves nothing: its devices are unused */

/* A slice of a host's devices that moves as one. */
typedef struct hx_unit {
    int host;
    int first_device; /* device ids first_device .. first_device + ndevices - 1 */
    int ndevices;
    double mem_bytes; /* usable memory of the slice */
} hx_unit;

/* A candidate model replica: a set of units, a role, and cached evaluations. */
typedef struct hx_sgroup {
    int nunits;
    int units[HX_MAX_GROUP_DEVICES];
    int ndevices;
    int devices[HX_MAX_GROUP_DEVICES];
    int role;               /* hx_role or HX_ROLE_NONE */
    int have[3];            /* evaluation cached for role r */
    int ok[3];              /* feasible in role r */
    hx_layout layout[3];
    hx_perf perf[3];
} hx_sgroup;

typedef struct hx_solution {
    hx_sgroup *groups; /* owned [n] */
    int n;
    int cap;
    double value_rps;  /* evaluated throughput */
    double usd_per_hour;
    double potential_rps; /* sum of the capacities of serving groups (tie-breaker) */
} hx_solution;

#define HX_LAYOUT_CACHE_SIZE 4096

/* A group's best layout for a role, cached by its device set. */
typedef struct hx_layout_cache_entry {
    unsigned long long key; /* 0 = empty */
    unsigned long long check; /* a second hash of the same device set */
    int ndevices;
    int ok;
    hx_layout layout;
    hx_perf perf;
} hx_layout_cache_entry;

/* Per-search state. */
typedef struct hx_search_ctx {
    const hx_inventory *inv;
    const hx_graph *graph;
    const hx_model *model;
    hx_cost_ctx cost;
    hx_unit *units;   /* owned [nunits] */
    int nunits;
    int evaluations;
    /* flow of the last evaluation, for refinement */
    hx_flow *flow;    /* owned; NULL before the first evaluation */
    int *edge_kind;   /* owned [edges]: what each edge of `flow` stands for */
    int *edge_ref;    /* owned [edges]: group or switch index */
    int *edge_aux;    /* owned [edges]: prefill * ngroups + decode for pairwise edges */
    int edge_cap;
    int *group_node;  /* owned [groups]: node of each group in `flow` (-1 if none) */
    hx_layout_cache_entry *cache; /* owned [HX_LAYOUT_CACHE_SIZE], direct-mapped; may be NULL */
    const char *excluded_reason;  /* static: why devices outside the units are unused */
    int group_node_cap;
} hx_search_ctx;

/* Edge kinds of the evaluation network. */
enum {
    HX_EK_RATE = 0,    /* offered rate cap */
    HX_EK_PREFILL,     /* source -> prefill group: its capacity */
    HX_EK_EGRESS,      /* prefill group -> its NIC share */
    HX_EK_LOCAL,       /* prefill -> decode group on the same host */
    HX_EK_LINK,        /* explicit host-to-host link */
    HX_EK_HUB,         /* switch fabric (unlimited) */
    HX_EK_UPLINK_UP,   /* switch -> spine */
    HX_EK_UPLINK_DOWN, /* spine -> switch */
    HX_EK_INGRESS,     /* NIC share -> decode group */
    HX_EK_DECODE       /* decode group -> sink: its capacity */
};

void hx_sgroup_init(hx_sgroup *g);
/* Adds unit u to g (devices too); 0 when the group would exceed HX_MAX_GROUP_DEVICES. */
int hx_sgroup_add_unit(const hx_search_ctx *s, hx_sgroup *g, int u);
/* Makes sure g's evaluation for `role` is cached; returns whether it is feasible. */
int hx_sgroup_eval(hx_search_ctx *s, hx_sgroup *g, int role);
/* The group's capacity in its role (0 for HX_ROLE_NONE or infeasible). */
double hx_sgroup_capacity(hx_search_ctx *s, hx_sgroup *g);
double hx_sgroup_usd_per_hour(const hx_search_ctx *s, const hx_sgroup *g);

hx_status hx_solution_init(hx_solution *sol, int cap);
void hx_solution_release(hx_solution *sol);
hx_status hx_solution_copy(hx_solution *dst, const hx_solution *src);
hx_sgroup *hx_solution_add(hx_solution *sol);

/*
 * Evaluates roles and routes: the max-flow value plus the capacity of `both`
 * groups, capped by the offered rate. Leaves the flow network in s->flow.
 */
double hx_solution_evaluate(hx_search_ctx *s, hx_solution *sol);

/* Best role assignment for groups whose roles are not fixed (sorted split + max-flow). */
void hx_solution_assign_roles(hx_search_ctx *s, hx_solution *sol, int allow_both);

/* Whether a is better than b: more throughput, or as much for less money. */
int hx_solution_better(const hx_solution *a, const hx_solution *b);

/* Builds the plan of an evaluated solution (evaluates it again for routes). */
hx_status hx_solution_to_plan(hx_search_ctx *s, hx_solution *sol, const char *strategy,
                              int router_port, hx_plan **out, hx_err *err);

/* Exhaustive search (exact.c). */
hx_status hx_search_exact(hx_search_ctx *s, hx_solution *best, hx_err *err);

#endif /* HX_SEARCH_INT_H */
