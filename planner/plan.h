/*
 * plan.h - a deployment plan: which devices form which model replica
 * ("group"), each group's role and pipeline/tensor layout, and the routes
 * requests take from prefill groups to decode groups.
 *
 * The JSON form ("schema": "hexflow.plan/1") is documented field by field in
 * docs/plan-format.md. The planner fills an hx_plan and writes it; the
 * simulator, the launcher and the runtime read it back with hx_plan_load,
 * which validates everything a hand-written plan can get wrong and reports
 * each problem as "FILE: FIELD: what is wrong; what is expected".
 *
 * Ownership: an hx_plan owns every string and array it points to; free the
 * whole with hx_plan_free. Plain value structs inside are public.
 */
#ifndef HX_PLAN_H
#define HX_PLAN_H

#include <stddef.h>

#include <jansson.h>

#include "common/diag.h"
#include "common/status.h"

#define HX_PLAN_SCHEMA "hexflow.plan/1"
#define HX_PLAN_DEFAULT_ROUTER_PORT 8000

typedef enum hx_role {
    HX_ROLE_PREFILL = 0,
    HX_ROLE_DECODE = 1,
    HX_ROLE_BOTH = 2 /* colocated: prefill and decode in one replica, no routes */
} hx_role;

/* "prefill", "decode", "both". */
const char *hx_role_name(hx_role r);
/* Parses a role name; HX_EINVAL when unknown. */
hx_status hx_role_parse(const char *s, hx_role *out);

typedef struct hx_plan_stage {
    int first_layer;  /* first decoder layer held by the stage */
    int num_layers;   /* >= 1 */
    char **devices;   /* owned [ndevices] "host:index"; TP degree = ndevices */
    int ndevices;
} hx_plan_stage;

/* Per-device memory budget; each byte count < 0 = not given. */
typedef struct hx_plan_memory {
    char *device;        /* owned, "host:index", a device of the group */
    double weights_bytes; /* weight shard */
    double kv_bytes;      /* KV cache reserved */
    double workspace_bytes; /* activations and buffers */
    double total_bytes;   /* weights + kv + workspace */
    double capacity_bytes; /* the device's memory */
} hx_plan_memory;

typedef struct hx_plan_group {
    char *id;              /* owned, unique ("g0") */
    hx_role role;
    hx_plan_stage *stages; /* owned [nstages], in pipeline order */
    int nstages;
    double capacity_rps;   /* requests/s the group sustains in its role under the SLOs;
                              < 0 = not given */
    hx_plan_memory *memory; /* owned [nmemory], one per device; may be empty in hand-written plans */
    int nmemory;
    /* predictions; < 0 when not given (hand-written plans) */
    double ttft_s;         /* prefill (and both): time to first token at capacity */
    double tpot_s;         /* decode (and both): time per output token at capacity */
    int max_batch;         /* decode: concurrent requests; prefill: prompts per batch; 0 = not given */
} hx_plan_group;

typedef struct hx_plan_route {
    int prefill;            /* index into groups (role prefill) */
    int decode;             /* index into groups (role decode) */
    double rps;             /* request rate sent along this route */
    double kv_bytes_per_s;  /* KV traffic: rps x KV bytes per request */
    double link_bytes_per_s; /* bandwidth available between the two groups; 0 = not given */
} hx_plan_route;

typedef struct hx_plan_host {
    char *name;         /* owned */
    char *address;      /* owned; "local" = this machine without SSH */
    char *ssh_user;     /* owned; may be NULL */
    int ssh_port;       /* 0 = default (22) */
    char *ssh_identity; /* owned; path, may be NULL */
    char *ssh_known_hosts; /* owned; path, may be NULL */
    char *workdir;      /* owned; may be NULL */
} hx_plan_host;

typedef struct hx_plan_unused {
    char *device; /* owned, "host:index" */
    char *reason; /* owned, for people */
} hx_plan_unused;

typedef struct hx_plan {
    /* model: name and shape as planned (num_layers checks stage coverage) */
    char *model_name;       /* owned; may be NULL in hand-written plans */
    int model_num_layers;   /* 0 = not given */
    json_t *model;          /* owned reference; the whole "model" object as written, or NULL */

    /* workload the plan was made for; < 0 = not given */
    double input_tokens;
    double output_tokens;
    double rate_rps;        /* offered rate asked for; 0 = as much as possible */
    double slo_ttft_s;
    double slo_tpot_s;
    double slo_attainment;  /* fraction, e.g. 0.9 */

    hx_plan_host *hosts;    /* owned [nhosts] */
    int nhosts;
    char *router_host;      /* owned; a host name of `hosts` */
    int router_port;

    hx_plan_group *groups;  /* owned [ngroups] */
    int ngroups;
    hx_plan_route *routes;  /* owned [nroutes] */
    int nroutes;

    /* results; < 0 when not given */
    double throughput_rps;          /* sum of routes + capacity of `both` groups */
    double input_tokens_per_s;
    double output_tokens_per_s;
    char *bottleneck;               /* owned; for people; may be NULL */
    double usd_per_hour;
    double usd_per_million_output_tokens;

    hx_plan_unused *unused;         /* owned [nunused] */
    int nunused;

    json_t *cluster;                /* owned reference: an inventory document (docs/inventory-
                                       format.md, as JSON) of the plan's hosts with their
                                       devices and links, or NULL; the simulator times the
                                       plan with it */

    char *search_strategy;          /* owned; "hexflow", "colocated", "homogeneous", "exact", or NULL */
    double search_seconds;          /* < 0 = not given */
    int search_iterations;          /* < 0 = not given */
    unsigned long search_seed;      /* written whenever the "search" object is */
} hx_plan;

/* An empty plan (every "not given" field set as documented above), or NULL. */
hx_plan *hx_plan_new(void);
void hx_plan_free(hx_plan *p);

/*
 * Appends to the arrays of `p`; each returns the new element (zeroed, with
 * "not given" defaults) or NULL on allocation failure. Strings passed in are
 * copied. A returned pointer stays valid until the next add to the same array
 * (the array may move).
 */
hx_plan_group *hx_plan_add_group(hx_plan *p, const char *id, hx_role role);
hx_plan_stage *hx_plan_group_add_stage(hx_plan_group *g, int first_layer, int num_layers);
hx_status hx_plan_stage_add_device(hx_plan_stage *s, const char *device);
hx_plan_memory *hx_plan_group_add_memory(hx_plan_group *g, const char *device);
hx_plan_route *hx_plan_add_route(hx_plan *p, int prefill, int decode, double rps);
hx_plan_host *hx_plan_add_host(hx_plan *p, const char *name, const char *address);
hx_status hx_plan_add_unused(hx_plan *p, const char *device, const char *reason);

/* Replaces an owned string field: hx_plan_set_str(&p->bottleneck, "..."). */
hx_status hx_plan_set_str(char **field, const char *value);

/* Index of the group with id `id`, or -1. */
int hx_plan_find_group(const hx_plan *p, const char *id);
/* Index of the host named `name`, or -1. */
int hx_plan_find_host(const hx_plan *p, const char *name);

/* The JSON form (a new reference), in the field order of docs/plan-format.md. */
json_t *hx_plan_to_json(const hx_plan *p);

/* Writes the JSON form to `path` atomically (nothing half-written on failure). */
hx_status hx_plan_write(const hx_plan *p, const char *path, hx_err *err);

/*
 * Reads and validates a plan. `name` names the source in messages. On failure
 * every problem is in `diags` and the result is HX_EPARSE (malformed) or
 * HX_ENOENT/HX_EIO (unreadable); *out is untouched. Field problems (types,
 * ranges, unknown fields, unknown route group ids) are all reported first;
 * the invariants of hx_plan_validate are checked once the fields read
 * cleanly. `diags` may be NULL (problems are then only counted away).
 */
hx_status hx_plan_load(const char *path, hx_plan **out, hx_diags *diags);
/* hx_plan_load for processes that report one line: err gets the first problem. */
hx_status hx_plan_load_err(const char *path, hx_plan **out, hx_err *err);
hx_status hx_plan_from_json(const json_t *root, const char *name, hx_plan **out,
                            hx_diags *diags);

/*
 * Checks the invariants every plan must satisfy (also run by hx_plan_load;
 * the schema string, which the struct does not hold, is checked by the
 * reader): at least one host; unique host names, plain names (letters,
 * digits, '-', '_', '.'); ssh port 0-65535; router host among hosts, port
 * 1-65535; unique group ids (plain names); at least one group; each stage
 * with >= 1 layer and >= 1 device; devices named "host:index" with a known
 * host; no device used twice; stages of a group contiguous from layer 0,
 * covering model_num_layers when given (otherwise all groups cover the same
 * layers); memory entries for devices of their group, one each; routes from
 * a prefill group to a decode group with rps, kv and link rates >= 0 and no
 * pair twice; prefill groups need at least one decode group and the
 * reverse, and then at least one route; unused devices well named and not
 * used by a group. Appends problems to `diags` (with `name` as file; may be
 * NULL) and returns the number found.
 */
int hx_plan_validate(const hx_plan *p, const char *name, hx_diags *diags);

#endif /* HX_PLAN_H */
