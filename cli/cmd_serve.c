/*
 * cmd_serve.c - `hexflow worker` and `hexflow router`: the processes of a
 * deployment. `hexflow launch` starts them; people rarely do.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/log.h"
#include "runtime/proto.h"
#include "runtime/router.h"
#include "runtime/worker.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
}

/* The deployment secret from --secret-file, or from stdin with --secret-file -. */
static int load_secret(const char *path, hx_proto_secret *s)
{
    hx_err err = {0};
    hx_status st = strcmp(path, "-") == 0
                       ? hx_proto_secret_load_fd(0, hx_proto_deadline_in(10.0), s, &err)
                       : hx_proto_secret_load_file(path, s, &err);
    if (st != HX_OK) {
        hx_cli_fail(&err);
        return 0;
    }
    return 1;
}

typedef hx_status (*serve_fn)(void *opt, const hx_proto_secret *secret, hx_err *err);

static hx_status run_worker(void *opt, const hx_proto_secret *secret, hx_err *err)
{
    hx_worker_options *o = opt;
    o->secret = secret;
    return hx_worker_run(o, &g_stop, err);
}

static hx_status run_router(void *opt, const hx_proto_secret *secret, hx_err *err)
{
    hx_router_options *o = opt;
    o->secret = secret;
    return hx_router_run(o, &g_stop, err);
}

/* Loads the secret, logs at info level (unless HEXFLOW_LOG says otherwise), runs fn until
 * SIGTERM/SIGINT; the exit status. */
static int serve(const char *secret_path, serve_fn fn, void *opt)
{
    hx_proto_secret secret;
    if (!load_secret(secret_path, &secret))
        return 2;
    if (hx_log_get_level() < HX_LOG_INFO && !getenv("HEXFLOW_LOG"))
        hx_log_set_level(HX_LOG_INFO);
    install_signals();
    hx_err err = {0};
    hx_status st = fn(opt, &secret, &err);
    hx_proto_secret_release(&secret);
    if (st != HX_OK)
        return hx_cli_fail(&err) == 2 ? 2 : 1;
    return 0;
}

static void worker_usage(FILE *fp)
{
    fprintf(fp,
            "usage: hexflow worker --plan FILE --model DIR --device HOST:N --secret-file FILE\n"
            "                      [--threads N] [--max-seqs N] [--block-tokens N]\n"
            "                      [--bind ADDRESS] [--backend auto|cpu|cuda]\n"
            "                      [--tp-transport auto|nccl|tcp]\n"
            "                      [--kv-transport auto|nccl|tcp] [--peer-timeout S]\n"
            "\n"
            "Runs the worker of one device of a plan: its stage's layers and its\n"
            "tensor-parallel slice of the model, listening on the router's port + 1 +\n"
            "the worker's index in the plan. `hexflow launch` starts one per device.\n"
            "\n"
            "  --plan FILE         the plan (hexflow.plan/1)\n"
            "  --model DIR         the model directory (config.json, safetensors)\n"
            "  --device HOST:N     which device of the plan this worker is\n"
            "  --secret-file FILE  the deployment secret (mode 0600; '-' reads stdin)\n"
            "  --threads N         CPU threads (default: the host's cores shared by its\n"
            "                      workers)\n"
            "  --max-seqs N        requests in the engine at once (default 32)\n"
            "  --block-tokens N    KV cache block size in positions (default 16)\n"
            "  --bind ADDRESS      listen here instead of the host's plan address\n"
            "  --backend NAME      cpu (fp32), cuda (bf16 on CUDA device N of HOST:N), or\n"
            "                      auto: cuda where a GPU is, else cpu (default); both run\n"
            "                      any stage and TP slice, and a group's workers must agree\n"
            "  --tp-transport NAME how a TP stage sums its partial results, as the group's\n"
            "                      leader decides: auto (default) NCCL where every rank is\n"
            "                      a GPU of its own that NCCL can join, else TCP through\n"
            "                      the stage's rank 0; nccl (or fail); tcp\n"
            "  --kv-transport NAME how a prefill worker sends KV to decode workers: auto\n"
            "                      (default) NCCL from GPU to GPU where both are GPUs NCCL\n"
            "                      can join, else TCP from page-locked memory; nccl (or\n"
            "                      fail the request); tcp\n"
            "  --peer-timeout S    how long the group's ranks wait for each other, at start\n"
            "                      and in each step (default 60); a GPU step that has not\n"
            "                      ended after 1.5 times this (at least 10 s more) ends the\n"
            "                      worker, so that the router fails its requests\n"
            "  -h, --help          show this help\n");
}

int hx_cmd_worker(int argc, char **argv)
{
    static const struct option opts[] = {
        {"plan", required_argument, NULL, 'p'},    {"model", required_argument, NULL, 'm'},
        {"device", required_argument, NULL, 'd'},  {"secret-file", required_argument, NULL, 's'},
        {"threads", required_argument, NULL, 't'}, {"max-seqs", required_argument, NULL, 'q'},
        {"block-tokens", required_argument, NULL, 'b'}, {"bind", required_argument, NULL, 'B'},
        {"backend", required_argument, NULL, 'k'},
        {"tp-transport", required_argument, NULL, 'T'},
        {"kv-transport", required_argument, NULL, 'K'},
        {"peer-timeout", required_argument, NULL, 'P'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0}};
    hx_worker_options o;
    hx_worker_options_init(&o);
    const char *secret_path = NULL;
    double v;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'p': o.plan_path = optarg; break;
        case 'm': o.model_dir = optarg; break;
        case 'd': o.device = optarg; break;
        case 's': secret_path = optarg; break;
        case 'B': o.bind_address = optarg; break;
        case 'k': {
            hx_err e = {0};
            if (hx_backend_parse(optarg, &o.backend, &e) != HX_OK)
                return hx_cli_usage_error("worker", "--backend: %s", e.msg);
            break;
        }
        case 'T':
        case 'K': {
            hx_err e = {0};
            if (hx_transport_parse(optarg, c == 'T' ? &o.tp_transport : &o.kv_transport, &e) !=
                HX_OK)
                return hx_cli_usage_error("worker", "%s: %s",
                                          c == 'T' ? "--tp-transport" : "--kv-transport", e.msg);
            break;
        }
        case 't':
            if (!hx_cli_number("worker", "--threads", optarg, 1, 1024, &v))
                return 2;
            o.threads = (int)v;
            break;
        case 'P':
            if (!hx_cli_number("worker", "--peer-timeout", optarg, 1, 86400, &v))
                return 2;
            o.peer_timeout_s = v;
            break;
        case 'q':
            if (!hx_cli_number("worker", "--max-seqs", optarg, 1, 4096, &v))
                return 2;
            o.max_seqs = (int)v;
            break;
        case 'b':
            if (!hx_cli_number("worker", "--block-tokens", optarg, 1, 4096, &v))
                return 2;
            o.block_tokens = (int)v;
            break;
        case 'h': worker_usage(stdout); return 0;
        case ':': return hx_cli_usage_error("worker", "option '%s' needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("worker", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("worker", "unexpected argument '%s'", argv[optind]);
    if (!o.plan_path || !o.model_dir || !o.device || !secret_path)
        return hx_cli_usage_error("worker", "--plan, --model, --device and --secret-file are "
                                            "required");
    return serve(secret_path, run_worker, &o);
}

static void router_usage(FILE *fp)
{
    fprintf(fp,
            "usage: hexflow router --plan FILE --model DIR --secret-file FILE [--port N]\n"
            "                      [--bind ADDRESS] [--bearer-token-file FILE]\n"
            "                      [--ttft-slo SECONDS] [--served-model-name NAME]\n"
            "\n"
            "Serves the OpenAI completions API (/v1/completions, /v1/models, /health,\n"
            "/metrics) over the plan's groups. `hexflow launch` starts it.\n"
            "\n"
            "  --plan FILE               the plan (hexflow.plan/1)\n"
            "  --model DIR               the model directory (config.json, tokenizer.json)\n"
            "  --secret-file FILE        the deployment secret (mode 0600; '-': stdin)\n"
            "  --port N                  HTTP port (default: the plan's router port)\n"
            "  --bind ADDRESS            listen here (default: the router host's address)\n"
            "  --bearer-token-file FILE  require 'Authorization: Bearer TOKEN' on /v1/\n"
            "  --ttft-slo SECONDS        reject requests that would wait longer for their\n"
            "                            first token (default: the plan's SLO; 0: none)\n"
            "  --served-model-name NAME  the model id of /v1/models\n"
            "  -h, --help                show this help\n");
}

int hx_cmd_router(int argc, char **argv)
{
    static const struct option opts[] = {
        {"plan", required_argument, NULL, 'p'},
        {"model", required_argument, NULL, 'm'},
        {"secret-file", required_argument, NULL, 's'},
        {"port", required_argument, NULL, 'P'},
        {"bind", required_argument, NULL, 'B'},
        {"bearer-token-file", required_argument, NULL, 'T'},
        {"ttft-slo", required_argument, NULL, 'S'},
        {"served-model-name", required_argument, NULL, 'n'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    hx_router_options o;
    hx_router_options_init(&o);
    const char *secret_path = NULL, *token_path = NULL;
    double v;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'p': o.plan_path = optarg; break;
        case 'm': o.model_dir = optarg; break;
        case 's': secret_path = optarg; break;
        case 'B': o.bind_address = optarg; break;
        case 'T': token_path = optarg; break;
        case 'n': o.model_name = optarg; break;
        case 'P':
            if (!hx_cli_number("router", "--port", optarg, 1, 65535, &v))
                return 2;
            o.port = (int)v;
            break;
        case 'S':
            if (!hx_cli_number("router", "--ttft-slo", optarg, 0, 1e6, &v))
                return 2;
            o.ttft_slo_s = v > 0 ? v : -1;
            break;
        case 'h': router_usage(stdout); return 0;
        case ':': return hx_cli_usage_error("router", "option '%s' needs a value", argv[optind - 1]);
        default: return hx_cli_usage_error("router", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("router", "unexpected argument '%s'", argv[optind]);
    if (!o.plan_path || !o.model_dir || !secret_path)
        return hx_cli_usage_error("router", "--plan, --model and --secret-file are required");
    char token[512] = "";
    if (token_path) {
        FILE *fp = fopen(token_path, "r");
        if (!fp || !fgets(token, sizeof token, fp)) {
            if (fp)
                fclose(fp);
            hx_cli_error("cannot read the bearer token file '%s'", token_path);
            return 2;
        }
        fclose(fp);
        token[strcspn(token, "\r\n")] = '\0';
        o.bearer_token = token;
    }
    return serve(secret_path, run_router, &o);
}
