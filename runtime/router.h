/*
 * router.h - the router process: the OpenAI-compatible HTTP front
 * (runtime/http.h) over the plan's groups.
 *
 * The router keeps one authenticated connection (runtime/proto.h) to the
 * leader of every group (runtime/deploy.h), reconnecting when one drops.
 * A request goes to a prefill group chosen by the plan's route weights and
 * the live load (outstanding requests ÷ the group's share of the routed
 * rate), and to one of that group's decode groups the same way; a `both`
 * group takes it whole. The prefill leader answers FIRST_TOKEN (streamed at
 * once) after its ranks have sent the KV to the decode group; the router
 * then asks the decode group's leader to continue (GROUP_OP
 * ADD_PREFILLED), whose TOKENS and DONE it streams on.
 *
 * Early rejection (HTTP 503 with the reason): no group able to take the
 * request is connected; or, with a TTFT SLO (the plan's workload.slo.ttft_s,
 * or --ttft-slo), the prompt tokens already queued at the best prefill
 * group, at the prefill speed measured so far, would take longer than the
 * SLO. A prompt that does not fit the model's context is a 400.
 *
 * Faults: when a group's connection drops, every request it held fails
 * (the client gets an error; a stream gets an error chunk), the group
 * leaves routing until it is back, and the router keeps serving through the
 * others. /health is 200 only while every group is connected.
 *
 * /metrics: hexflow_requests_total{status}, hexflow_ttft_seconds and
 * hexflow_tpot_seconds histograms, hexflow_queue_depth{group},
 * hexflow_running_requests{group}, hexflow_group_up{group},
 * hexflow_kv_bytes_moved_total, hexflow_prompt_tokens_total,
 * hexflow_generated_tokens_total, and per worker (from the leaders'
 * HEALTH_OK, polled every 2 s) hexflow_worker_* gauges.
 */
#ifndef HX_ROUTER_H
#define HX_ROUTER_H

#include <signal.h>

#include "common/status.h"
#include "runtime/proto.h"

typedef struct hx_router_options {
    const char *plan_path;         /* borrowed */
    const char *model_dir;         /* borrowed: config.json and tokenizer.json */
    const hx_proto_secret *secret; /* borrowed */
    const char *bind_address;      /* NULL: the router host's address in the plan */
    int port;                      /* 0: the plan's router port */
    const char *bearer_token;      /* NULL: none required */
    double ttft_slo_s;             /* 0: the plan's; < 0: no SLO rejection */
    const char *model_name;        /* NULL: the plan's model name, else the directory name */
} hx_router_options;

void hx_router_options_init(hx_router_options *opt);

/* Serves until *stop becomes non-zero. HX_OK on a clean stop. Logs to stderr. */
hx_status hx_router_run(const hx_router_options *opt, volatile sig_atomic_t *stop, hx_err *err);

#endif /* HX_ROUTER_H */
