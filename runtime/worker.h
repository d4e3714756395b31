/*
 * worker.h - one worker process: one device of a plan's group.
 *
 * A worker finds itself in the plan by its device ("host:N"), loads its
 * stage's layers and its TP slice of the model, listens on its port
 * (runtime/deploy.h) and connects to the other workers of its group. All
 * connections use runtime/proto.h with the deployment's secret.
 *
 * Once connected, the group runs GROUP_SETUP (runtime/proto.h): the leader
 * checks that every engine is of one kind with one step size, and each TP
 * stage whose ranks are GPUs of their own joins an NCCL communicator for
 * its all-reduce (--tp-transport), else sums over TCP as below.
 *
 * Inside a group the engines (runtime/batch.h) run in lockstep. The leader
 * (stage 0, rank 0) takes requests from the router (GROUP_OP ADD /
 * ADD_PREFILLED / REMOVE), decides admission (the engine's block
 * reservations), and sends every decision and every STEP to the other ranks
 * in the order it applies them itself. During a step, TP ranks sum their
 * partial results at the stage's rank 0 (which adds in rank order and sends
 * the sums back, so every rank holds the same bits), stage s's rank 0 sends
 * its output rows to every rank of stage s + 1, and the last stage's rank 0
 * sends the sampled tokens to the ranks of the earlier stages.
 *
 * Prefill groups hold each request's KV after its first token; then every
 * rank packs the pieces hx_kv_plan_segments assigns it (one contiguous
 * segment per request and destination rank) and sends them as KV_SEGMENT
 * frames straight to the decode group's ranks, and drops the request; the
 * leader reports FIRST_TOKEN to the router, which asks the decode group's
 * leader to continue (ADD_PREFILLED). Decode ranks collect the segments
 * that arrive (on their own threads) and import them when the leader's
 * ADD_PREFILLED reaches them. Decode and colocated (`both`) leaders stream
 * TOKENS and DONE to the router.
 *
 * Faults: a group peer that drops or stops answering (60 s) ends the worker
 * with an error: the leader first fails every request it holds with an
 * ERROR frame to the router. A router that drops leaves the group running
 * (requests it held are cancelled). SIGTERM/SIGINT (the stop flag) ends the
 * worker cleanly.
 */
#ifndef HX_WORKER_H
#define HX_WORKER_H

#include <signal.h>

#include "common/status.h"
#include "runtime/backend.h"
#include "runtime/proto.h"

/* How a worker moves TP partial sums and KV between GPUs: over NCCL where it can (auto),
   only over NCCL (nccl: fail otherwise), or never (tcp). */
typedef enum hx_transport {
    HX_TRANSPORT_AUTO = 0,
    HX_TRANSPORT_NCCL = 1,
    HX_TRANSPORT_TCP = 2
} hx_transport;

/* "auto", "nccl", "tcp"; HX_EINVAL naming the choices otherwise. */
hx_status hx_transport_parse(const char *s, hx_transport *out, hx_err *err);

typedef struct hx_worker_options {
    const char *plan_path;        /* borrowed */
    const char *model_dir;        /* borrowed */
    const char *device;           /* borrowed: "host:N" of the plan */
    const hx_proto_secret *secret; /* borrowed */
    int threads;                  /* 0: the host's cores shared among its workers */
    int max_seqs;                 /* engine sequences; default 32 */
    int block_tokens;             /* default 16 */
    double peer_timeout_s;        /* group connections at start and per step; default 60 */
    const char *bind_address;     /* NULL: the host's address in the plan */
    hx_backend_kind backend;      /* default auto: cuda when a GPU is there (device host:N
                                     runs on CUDA device N), else cpu; one kind per group */
    hx_transport kv_transport;    /* KV to decode workers: auto (default) NCCL where both are
                                     GPUs that NCCL can join, else TCP; nccl (or fail); tcp */
    hx_transport tp_transport;    /* the leader's decides for its group: auto (default) NCCL
                                     where a TP stage's ranks are GPUs that NCCL can join, else
                                     TCP; nccl (or fail); tcp */
} hx_worker_options;

void hx_worker_options_init(hx_worker_options *opt);

/*
 * Runs the worker until *stop becomes non-zero (a signal handler sets it),
 * the leader says STOP, or a fault. HX_OK on a clean stop; otherwise the
 * error, with err naming the peer and what happened. Logs to stderr.
 */
hx_status hx_worker_run(const hx_worker_options *opt, volatile sig_atomic_t *stop, hx_err *err);

#endif /* HX_WORKER_H */
