/*
 * deploy.h - the processes of a plan: one worker per device and the router,
 * with the addresses and ports they listen on.
 *
 * Workers are numbered in plan order (groups, then stages, then the stage's
 * devices: rank 0, 1, ...). Worker i listens on port router.port + 1 + i of
 * its host's address ("local" hosts: 127.0.0.1), so every process of a
 * deployment finds every other from the plan alone. The router listens on
 * router.port (HTTP). A group's leader is its stage 0, rank 0 worker: the
 * router talks only to leaders; the leader drives its group's ranks
 * (runtime/worker.h).
 *
 * Pointers: a deployment borrows its plan (which must outlive it); strings
 * in it are the plan's or the deployment's own, freed by hx_deploy_release.
 */
#ifndef HX_DEPLOY_H
#define HX_DEPLOY_H

#include "common/status.h"
#include "planner/plan.h"
#include "runtime/kvcache.h"

typedef struct hx_deploy_worker {
    int index;           /* plan order */
    int group;           /* index into plan->groups */
    int stage, rank;     /* pipeline stage; TP rank within it */
    int tp;              /* the stage's TP degree */
    const char *device;  /* "host:N", the plan's */
    int host;            /* index into plan->hosts */
    int device_index;    /* N */
    const char *address; /* to listen on and connect to ("127.0.0.1" for local hosts) */
    int port;
} hx_deploy_worker;

typedef struct hx_deploy {
    const hx_plan *plan;       /* borrowed */
    hx_deploy_worker *workers; /* owned [nworkers] */
    int nworkers;
    int *group_first;          /* owned [ngroups]: index of the group's first worker */
    const char *router_address;
    int router_port;
} hx_deploy;

/*
 * Lays out plan p. HX_EINVAL when a device names no host of the plan, a port
 * would pass 65535, or a stage's TP degree does not suit the model
 * (checked later, when the model is known: hx_deploy_kv_layout).
 */
hx_status hx_deploy_init(hx_deploy *d, const hx_plan *p, hx_err *err);
void hx_deploy_release(hx_deploy *d);

/* The worker running `device` ("host:N"); -1 when none. */
int hx_deploy_find_device(const hx_deploy *d, const char *device);

/* The worker of (group, stage, rank); -1 when out of range. */
int hx_deploy_worker_at(const hx_deploy *d, int group, int stage, int rank);

/* The leader (stage 0, rank 0) of group g. */
int hx_deploy_leader(const hx_deploy *d, int g);

/* Workers in group g. */
int hx_deploy_group_size(const hx_deploy *d, int g);

/* Group g's layout for hx_kv_plan_segments: out gets nstages entries (cap >= nstages). */
int hx_deploy_kv_layout(const hx_deploy *d, int g, hx_kv_stage *out, int cap);

/* The connect address of a plan host ("127.0.0.1" for "local"). */
const char *hx_deploy_host_address(const hx_plan *p, int host);

#endif /* HX_DEPLOY_H */
