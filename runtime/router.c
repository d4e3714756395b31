/* router.c - the router process; see router.h. */
#include "runtime/router.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "common/log.h"
#include "planner/model.h"
#include "planner/plan.h"
#include "runtime/deploy.h"
#include "runtime/http.h"
#include "runtime/metrics.h"
#include "runtime/tokenizer.h"

#define SOFTWARE_VERSION "0.1.0"
#define SEND_TIMEOUT_S 10.0
#define HELLO_TIMEOUT_S 300.0 /* a leader answers once its whole group is up */
#define MSG_MAX 1400
#define HASH_BUCKETS 1024
#define LEADER_SILENCE_S 10.0 /* no frame from a leader (HEALTH_OK every 2 s): it is gone */

/* One request, shared by its HTTP thread and the link threads (under r->mu). */
struct hx_gen_handle {
    struct hx_gen_handle *next; /* hash chain */
    uint64_t id;
    int prefill, decode;   /* group indices; decode -1 for a `both` group */
    int phase;             /* group now holding it: 0 prefill (or both), 1 decode */
    int n_prompt, max_tokens;
    float temperature, top_p;
    uint64_t seed;
    int32_t *toks;         /* generated, not yet read by next() */
    int n, cap, read;
    int generated;
    int done, failed, finish_stop;
    char msg[MSG_MAX];
    int64_t t_submit_ns, t_last_ns;
    pthread_cond_t cv;
};

typedef struct link {
    int g;
    pthread_t thread;
    int started;
    hx_proto_conn *c;          /* the reader's; senders take `send` */
    pthread_mutex_t send;
    int up;                    /* (r->mu) */
    char down[MSG_MAX];        /* why not up (r->mu) */
    int outstanding;           /* requests held (r->mu) */
    int pending;               /* decode groups: requests routed here, still in prefill (r->mu) */
    int64_t queued_prompt;     /* prompt tokens not yet prefilled (r->mu) */
    double prefill_tok_s;      /* measured (r->mu); 0 until measured */
    int64_t max_request;       /* KV positions one request may take in the group (r->mu);
                                  0 until its leader says */
    int n_measured;
    hx_metric *m_up, *m_queue, *m_running;
    hx_metric *w_active, *w_done, *w_failed, *w_kv_sent, *w_kv_recv, *w_tokens;
} link;

typedef struct router {
    hx_router_options opt;
    volatile sig_atomic_t *stop;
    atomic_int quitting;
    hx_plan *plan;
    hx_deploy dep;
    hx_model cfg;
    hx_tokenizer *tok;
    int eos;
    double ttft_slo_s;
    link *links;               /* [ngroups] */
    pthread_mutex_t mu;
    struct hx_gen_handle *table[HASH_BUCKETS];
    uint64_t next_id;
    hx_metrics *metrics;
    hx_metric *m_ok, *m_failed, *m_rejected, *m_cancelled, *m_ttft, *m_tpot, *m_kv_bytes,
        *m_prompt, *m_generated;
} router;

void hx_router_options_init(hx_router_options *opt)
{
    memset(opt, 0, sizeof *opt);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- the request table (r->mu) ------------------------------------------------- */

static struct hx_gen_handle *req_find(router *r, uint64_t id)
{
    for (struct hx_gen_handle *q = r->table[id % HASH_BUCKETS]; q; q = q->next)
        if (q->id == id)
            return q;
    return NULL;
}

static void req_unlink(router *r, struct hx_gen_handle *q)
{
    for (struct hx_gen_handle **pp = &r->table[q->id % HASH_BUCKETS]; *pp; pp = &(*pp)->next)
        if (*pp == q) {
            *pp = q->next;
            return;
        }
}

static void req_push(struct hx_gen_handle *q, int token)
{
    if (q->n == q->cap) {
        int cap = q->cap ? 2 * q->cap : 32;
        int32_t *g = realloc(q->toks, (size_t)cap * sizeof *g);
        if (!g) {
            q->failed = 1;
            snprintf(q->msg, sizeof q->msg, "router: out of memory");
            return;
        }
        q->toks = g;
        q->cap = cap;
    }
    q->toks[q->n++] = token;
}

/* Ends q (r->mu held): counts it (failed: 0 ok, 1 failed, 2 cancelled), takes it off its
 * group, wakes its reader. */
static void req_finish(router *r, struct hx_gen_handle *q, int failed, const char *msg)
{
    if (q->done || q->failed)
        return;
    link *L = &r->links[q->phase == 0 ? q->prefill : q->decode];
    if (L->outstanding > 0)
        L->outstanding--;
    if (q->phase == 0 && q->decode >= 0 && r->links[q->decode].pending > 0)
        r->links[q->decode].pending--;
    if (q->phase == 0 && q->generated == 0) {
        L->queued_prompt -= q->n_prompt;
        if (L->queued_prompt < 0)
            L->queued_prompt = 0;
    }
    if (failed) {
        q->failed = 1;
        size_t n = strlen(msg);
        if (n >= sizeof q->msg)
            n = sizeof q->msg - 1;
        memcpy(q->msg, msg, n);
        q->msg[n] = '\0';
        hx_metrics_counter_inc(failed == 2 ? r->m_cancelled : r->m_failed);
    } else {
        q->done = 1;
        hx_metrics_counter_inc(r->m_ok);
    }
    pthread_cond_broadcast(&q->cv);
}

/* ---- sending to a leader ---------------------------------------------------------- */

static hx_status link_send_op(router *r, int g, uint64_t id, const hx_proto_group_op *op,
                              hx_err *err)
{
    link *L = &r->links[g];
    pthread_mutex_lock(&L->send);
    hx_status st;
    if (!L->c)
        st = hx_err_set(err, HX_ECONN, "group '%s' is not connected", r->plan->groups[g].id);
    else
        st = hx_proto_send_group_op(L->c, id, op, hx_proto_deadline_in(SEND_TIMEOUT_S), err);
    pthread_mutex_unlock(&L->send);
    return st;
}

/* ---- frames from a leader (link thread) ------------------------------------------- */

static void on_first_token(router *r, int g, uint64_t id, const hx_proto_first_token *m)
{
    pthread_mutex_lock(&r->mu);
    struct hx_gen_handle *q = req_find(r, id);
    link *P = &r->links[g];
    if (q && !q->done && !q->failed && q->phase == 0 && q->generated == 0) {
        P->queued_prompt -= q->n_prompt;
        if (P->queued_prompt < 0)
            P->queued_prompt = 0;
    }
    if (m->prefill_ns > 0) {
        double rate = m->num_prompt_tokens / (m->prefill_ns / 1e9);
        P->prefill_tok_s = P->n_measured ? 0.8 * P->prefill_tok_s + 0.2 * rate : rate;
        P->n_measured++;
    }
    if (!q || q->done || q->failed || q->phase != 0) {
        pthread_mutex_unlock(&r->mu);
        return;
    }
    int64_t now = hx_proto_now_ns();
    hx_metrics_histogram_observe(r->m_ttft, (now - q->t_submit_ns) / 1e9);
    q->t_last_ns = now;
    q->generated = 1;
    int stop_tok = m->token_id == r->eos;
    if (!stop_tok) {
        req_push(q, m->token_id);
        hx_metrics_counter_inc(r->m_generated);
    }
    pthread_cond_broadcast(&q->cv);
    if (stop_tok || q->max_tokens <= 1 || q->decode < 0) {
        q->finish_stop = stop_tok;
        req_finish(r, q, 0, NULL);
        pthread_mutex_unlock(&r->mu);
        return;
    }
    /* on to the decode group */
    P->outstanding--;
    q->phase = 1;
    link *D = &r->links[q->decode];
    D->outstanding++;
    if (D->pending > 0)
        D->pending--;
    hx_metrics_counter_add(r->m_kv_bytes, (double)m->kv_bytes);
    hx_proto_group_op op = {HX_PROTO_OP_ADD_PREFILLED, (uint32_t)q->max_tokens, q->temperature,
                            q->top_p, q->seed, r->eos, 0, m->token_id, m->num_prompt_tokens,
                            g, -1, 0, NULL};
    int d = q->decode;
    pthread_mutex_unlock(&r->mu);
    hx_err err = {0};
    hx_status st = link_send_op(r, d, id, &op, &err);
    pthread_mutex_lock(&r->mu);
    q = req_find(r, id);
    if (st != HX_OK && q)
        req_finish(r, q, 1, err.msg);
    pthread_mutex_unlock(&r->mu);
    if (st == HX_OK && !q) { /* released meanwhile: its REMOVE may have gone first */
        hx_proto_group_op rm = {.op = HX_PROTO_OP_REMOVE, .src_group = -1, .dst_group = -1};
        link_send_op(r, d, id, &rm, &err);
    }
}

static void on_tokens(router *r, uint64_t id, const hx_proto_tokens *m)
{
    pthread_mutex_lock(&r->mu);
    struct hx_gen_handle *q = req_find(r, id);
    if (q && !q->done && !q->failed) {
        int64_t now = hx_proto_now_ns();
        for (uint32_t i = 0; i < m->num_tokens; i++) {
            if (q->generated == 0)
                hx_metrics_histogram_observe(r->m_ttft, (now - q->t_submit_ns) / 1e9);
            else
                hx_metrics_histogram_observe(r->m_tpot, (now - q->t_last_ns) / 1e9);
            if (q->generated == 0 && q->phase == 0) {
                link *P = &r->links[q->prefill];
                P->queued_prompt -= q->n_prompt;
                if (P->queued_prompt < 0)
                    P->queued_prompt = 0;
            }
            q->generated++;
            q->t_last_ns = now;
            req_push(q, m->token_ids[i]);
            hx_metrics_counter_inc(r->m_generated);
        }
        pthread_cond_broadcast(&q->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

static void on_done(router *r, uint64_t id, const hx_proto_done *m)
{
    pthread_mutex_lock(&r->mu);
    struct hx_gen_handle *q = req_find(r, id);
    if (q) {
        q->finish_stop = m->finish == HX_PROTO_FINISH_STOP;
        if (m->finish == HX_PROTO_FINISH_ERROR)
            req_finish(r, q, 1, "the worker failed the request");
        else
            req_finish(r, q, 0, NULL);
    }
    pthread_mutex_unlock(&r->mu);
}

static void on_error(router *r, int g, uint64_t id, const hx_proto_error *m)
{
    if (id == 0) {
        HX_WARN("router: group '%s': %s", r->plan->groups[g].id, m->message);
        return;
    }
    pthread_mutex_lock(&r->mu);
    struct hx_gen_handle *q = req_find(r, id);
    if (q) {
        char msg[MSG_MAX + 200];
        snprintf(msg, sizeof msg, "group '%s': %s", r->plan->groups[g].id, m->message);
        req_finish(r, q, 1, msg);
    }
    pthread_mutex_unlock(&r->mu);
}

static void on_health(router *r, int g, const hx_proto_health *h)
{
    link *L = &r->links[g];
    pthread_mutex_lock(&r->mu);
    L->max_request = (int64_t)h->max_request_tokens;
    pthread_mutex_unlock(&r->mu);
    hx_metrics_gauge_set(L->w_active, (double)h->requests_active);
    hx_metrics_gauge_set(L->w_done, (double)h->requests_done);
    hx_metrics_gauge_set(L->w_failed, (double)h->requests_failed);
    hx_metrics_gauge_set(L->w_kv_sent, (double)h->kv_bytes_sent);
    hx_metrics_gauge_set(L->w_kv_recv, (double)h->kv_bytes_received);
    hx_metrics_gauge_set(L->w_tokens, (double)h->tokens_generated);
}

/* Marks group g down and fails what it held. */
static void link_down(router *r, int g, const char *why)
{
    link *L = &r->links[g];
    pthread_mutex_lock(&r->mu);
    int was_up = L->up;
    L->up = 0;
    snprintf(L->down, sizeof L->down, "%s", why);
    char msg[MSG_MAX + 200];
    snprintf(msg, sizeof msg, "group '%s' (%s) was lost: %s", r->plan->groups[g].id,
             hx_role_name(r->plan->groups[g].role), why);
    for (int b = 0; b < HASH_BUCKETS; b++)
        for (struct hx_gen_handle *q = r->table[b]; q; q = q->next)
            if (!q->done && !q->failed &&
                ((q->phase == 0 && q->prefill == g) || (q->phase == 1 && q->decode == g)))
                req_finish(r, q, 1, msg);
    L->outstanding = 0;
    L->pending = 0;
    L->queued_prompt = 0;
    pthread_mutex_unlock(&r->mu);
    hx_metrics_gauge_set(L->m_up, 0);
    if (was_up)
        HX_WARN("router: %s", msg);
}

typedef struct link_arg {
    router *r;
    int g;
} link_arg;

static hx_status link_connect(router *r, int g, hx_proto_conn **out, hx_err *err)
{
    const hx_deploy_worker *w = &r->dep.workers[hx_deploy_leader(&r->dep, g)];
    hx_proto_conn *c = NULL;
    hx_status st = hx_proto_connect(w->address, w->port, r->opt.secret, "router",
                                    hx_proto_deadline_in(5.0), &c, err);
    if (st != HX_OK)
        return st;
    hx_proto_hello h = {HX_PROTO_ROLE_ROUTER, 0, 0, "", SOFTWARE_VERSION};
    hx_proto_frame f;
    hx_proto_hello back;
    st = hx_proto_send_hello(c, &h, hx_proto_deadline_in(5.0), err);
    /* the leader answers when its group is connected: wait (bounded), but notice a stop */
    int64_t hello_deadline = hx_proto_deadline_in(HELLO_TIMEOUT_S);
    while (st == HX_OK) {
        st = hx_proto_recv(c, &f, hx_proto_deadline_in(0.5), err);
        if (st == HX_ETIMEDOUT && hx_proto_buffered(c) == 0 && !r->quitting &&
            hx_proto_now_ns() < hello_deadline)
            st = HX_OK;
        else
            break;
    }
    if (st == HX_OK)
        st = hx_proto_decode_hello(&f, &back, err);
    if (st == HX_OK && strcmp(back.group_id, r->plan->groups[g].id) != 0)
        st = hx_err_set(err, HX_EINVAL, "%s:%d is group '%s', expected '%s'", w->address,
                        w->port, back.group_id, r->plan->groups[g].id);
    if (st != HX_OK) {
        hx_proto_close(c);
        return st;
    }
    *out = c;
    return HX_OK;
}

static void *link_main(void *arg)
{
    link_arg a = *(link_arg *)arg;
    free(arg);
    router *r = a.r;
    link *L = &r->links[a.g];
    const char *gid = r->plan->groups[a.g].id;
    while (!r->quitting) {
        hx_err err = {0};
        hx_proto_conn *c = NULL;
        if (link_connect(r, a.g, &c, &err) != HX_OK) {
            pthread_mutex_lock(&r->mu);
            snprintf(L->down, sizeof L->down, "%s", err.msg);
            pthread_mutex_unlock(&r->mu);
            for (int i = 0; i < 5 && !r->quitting; i++)
                sleep_ms(100);
            continue;
        }
        pthread_mutex_lock(&L->send);
        L->c = c;
        pthread_mutex_unlock(&L->send);
        pthread_mutex_lock(&r->mu);
        L->up = 1;
        L->down[0] = '\0';
        pthread_mutex_unlock(&r->mu);
        hx_metrics_gauge_set(L->m_up, 1);
        HX_INFO("router: group '%s' connected", gid);
        int64_t next_health = hx_proto_now_ns(), last_rx = hx_proto_now_ns();
        uint64_t health_id = 0;
        for (;;) {
            if (r->quitting) {
                snprintf(err.msg, sizeof err.msg, "the router is stopping");
                break;
            }
            if (hx_proto_now_ns() >= next_health) {
                /* never wait behind a request's send: this thread must keep reading */
                if (pthread_mutex_trylock(&L->send) == 0) {
                    hx_status hs = hx_proto_send_health(c, ++health_id,
                                                        hx_proto_deadline_in(5.0), &err);
                    pthread_mutex_unlock(&L->send);
                    if (hs != HX_OK)
                        break;
                }
                next_health = hx_proto_now_ns() + 2000000000LL;
            }
            hx_proto_frame f;
            hx_status st = hx_proto_recv(c, &f, hx_proto_deadline_in(0.5), &err);
            if (st == HX_ETIMEDOUT && hx_proto_buffered(c) == 0) {
                if ((hx_proto_now_ns() - last_rx) / 1e9 > LEADER_SILENCE_S) {
                    hx_err_set(&err, HX_ETIMEDOUT, "no answer from the group's leader for %.0f s",
                               LEADER_SILENCE_S);
                    break;
                }
                continue;
            }
            if (st != HX_OK)
                break;
            last_rx = hx_proto_now_ns();
            switch (f.type) {
            case HX_PROTO_FIRST_TOKEN: {
                hx_proto_first_token m;
                if (hx_proto_decode_first_token(&f, &m, &err) == HX_OK)
                    on_first_token(r, a.g, f.req_id, &m);
                break;
            }
            case HX_PROTO_TOKENS: {
                hx_proto_tokens m;
                if (hx_proto_decode_tokens(&f, &m, &err) == HX_OK)
                    on_tokens(r, f.req_id, &m);
                break;
            }
            case HX_PROTO_DONE: {
                hx_proto_done m;
                if (hx_proto_decode_done(&f, &m, &err) == HX_OK)
                    on_done(r, f.req_id, &m);
                break;
            }
            case HX_PROTO_ERROR: {
                hx_proto_error m;
                if (hx_proto_decode_error(&f, &m, &err) == HX_OK)
                    on_error(r, a.g, f.req_id, &m);
                break;
            }
            case HX_PROTO_HEALTH_OK: {
                hx_proto_health m;
                if (hx_proto_decode_health_ok(&f, &m, &err) == HX_OK)
                    on_health(r, a.g, &m);
                break;
            }
            default:
                break;
            }
        }
        pthread_mutex_lock(&L->send);
        L->c = NULL;
        pthread_mutex_unlock(&L->send);
        hx_proto_close(c);
        link_down(r, a.g, err.msg[0] ? err.msg : "connection closed");
    }
    return NULL;
}

/* ---- routing ------------------------------------------------------------------------ */

/* The plan's rate through a group's routes (its share), at least a small positive weight. */
static double group_weight(const router *r, int g)
{
    const hx_plan *p = r->plan;
    double w = 0;
    for (int i = 0; i < p->nroutes; i++)
        if (p->routes[i].prefill == g || p->routes[i].decode == g)
            w += p->routes[i].rps > 0 ? p->routes[i].rps : 0;
    if (w <= 0)
        w = p->groups[g].capacity_rps > 0 ? p->groups[g].capacity_rps : 1.0;
    return w;
}

/* Picks (prefill, decode) for a request, or returns 0 with why (r->mu held). */
static int pick_route(router *r, int *pp, int *dd, char *why, size_t cap)
{
    const hx_plan *p = r->plan;
    double best = 0;
    int bp = -1, bd = -1;
    for (int g = 0; g < p->ngroups; g++) {
        if (!r->links[g].up)
            continue;
        int d = -1;
        if (p->groups[g].role == HX_ROLE_PREFILL) {
            double bestd = 0;
            for (int i = 0; i < p->nroutes; i++) {
                const hx_plan_route *rt = &p->routes[i];
                if (rt->prefill != g || !r->links[rt->decode].up)
                    continue;
                const link *D = &r->links[rt->decode];
                double s = (D->outstanding + D->pending + 1) / (rt->rps > 0 ? rt->rps : 1.0);
                if (d < 0 || s < bestd) {
                    d = rt->decode;
                    bestd = s;
                }
            }
            if (d < 0)
                continue;
        } else if (p->groups[g].role != HX_ROLE_BOTH) {
            continue;
        }
        double s = (r->links[g].outstanding + 1) / group_weight(r, g);
        if (bp < 0 || s < best) {
            bp = g;
            bd = d;
            best = s;
        }
    }
    if (bp < 0) {
        int n = snprintf(why, cap, "no connected prefill group with a connected decode group");
        for (int g = 0; g < p->ngroups && n > 0 && (size_t)n < cap; g++)
            if (!r->links[g].up)
                n += snprintf(why + n, cap - (size_t)n, "; group '%s' is down: %s", p->groups[g].id,
                              r->links[g].down[0] ? r->links[g].down : "not connected yet");
        return 0;
    }
    *pp = bp;
    *dd = bd;
    return 1;
}

/* ---- the HTTP backend ------------------------------------------------------------- */

/*
 * A request refused before it was queued (r->mu held, released here): its
 * handle goes, the status is the HTTP answer; 503s count as rejected (the
 * deployment's doing), 4xx do not (the client's).
 */
static hx_status refuse(router *r, struct hx_gen_handle *q, hx_status st, int http,
                        int *http_status)
{
    pthread_mutex_unlock(&r->mu);
    if (http == 503)
        hx_metrics_counter_inc(r->m_rejected);
    pthread_cond_destroy(&q->cv);
    free(q);
    *http_status = http;
    return st;
}

static hx_status be_submit(void *ctx, const hx_gen_request *req, hx_gen_handle **out,
                           int *http_status, hx_err *err)
{
    router *r = ctx;
    const int P = r->cfg.max_position_tokens;
    for (int i = 0; i < req->n_prompt; i++)
        if (req->prompt[i] < 0 || req->prompt[i] >= r->cfg.vocab_size) {
            *http_status = 400;
            return hx_err_set(err, HX_EINVAL, "prompt token %d (at %d) is outside the vocabulary "
                              "of %d", req->prompt[i], i, r->cfg.vocab_size);
        }
    if (req->n_prompt > P) {
        *http_status = 400;
        return hx_err_set(err, HX_EINVAL,
                          "the prompt has %d tokens; the model takes at most %d positions",
                          req->n_prompt, P);
    }
    int max_new = req->max_tokens;
    if (req->n_prompt + max_new - 1 > P)
        max_new = P - req->n_prompt + 1;

    struct hx_gen_handle *q = calloc(1, sizeof *q);
    if (!q) {
        *http_status = 500;
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    }
    pthread_cond_init(&q->cv, NULL);
    q->n_prompt = req->n_prompt;
    q->max_tokens = max_new;
    q->temperature = req->temperature;
    q->top_p = req->top_p;
    q->seed = req->seed;
    q->t_submit_ns = hx_proto_now_ns();

    pthread_mutex_lock(&r->mu);
    char why[1024];
    int p, d;
    if (!pick_route(r, &p, &d, why, sizeof why))
        return refuse(r, q, hx_err_set(err, HX_ECONN, "%s", why), 503, http_status);
    link *L = &r->links[p];
    /* a request no cache of its route can hold is the client's to change (as the context) */
    const int64_t need = (int64_t)req->n_prompt + max_new - 1;
    for (int k = 0; k < 2; k++) {
        const int g = k == 0 ? p : d;
        if (g >= 0 && r->links[g].max_request > 0 && need > r->links[g].max_request)
            return refuse(r, q,
                          hx_err_set(err, HX_ERANGE,
                                     "the prompt's %d tokens and max_tokens %d need %lld "
                                     "positions of KV cache; group '%s' holds at most %lld for "
                                     "one request (lower max_tokens or shorten the prompt)",
                                     req->n_prompt, max_new, (long long)need,
                                     r->plan->groups[g].id,
                                     (long long)r->links[g].max_request),
                          400, http_status);
    }
    if (r->ttft_slo_s > 0 && L->n_measured >= 3 && L->prefill_tok_s > 0) {
        double eta = (double)(L->queued_prompt + req->n_prompt) / L->prefill_tok_s;
        if (eta > r->ttft_slo_s)
            return refuse(r, q,
                          hx_err_set(err, HX_ETIMEDOUT,
                                     "cannot meet the TTFT SLO of %.3g s: prefill group '%s' "
                                     "has %lld prompt tokens ahead of this one (~%.3g s at the "
                                     "measured %.0f tokens/s); retry later",
                                     r->ttft_slo_s, r->plan->groups[p].id,
                                     (long long)L->queued_prompt, eta, L->prefill_tok_s),
                          503, http_status);
    }
    q->id = ++r->next_id;
    q->prefill = p;
    q->decode = d;
    q->next = r->table[q->id % HASH_BUCKETS];
    r->table[q->id % HASH_BUCKETS] = q;
    L->outstanding++;
    L->queued_prompt += req->n_prompt;
    if (d >= 0)
        r->links[d].pending++;
    pthread_mutex_unlock(&r->mu);
    hx_metrics_counter_add(r->m_prompt, req->n_prompt);

    hx_proto_group_op op = {HX_PROTO_OP_ADD, (uint32_t)max_new, req->temperature, req->top_p,
                            req->seed, r->eos, 0, 0, 0, -1, d, (uint32_t)req->n_prompt,
                            req->prompt};
    hx_err serr = {0};
    if (link_send_op(r, p, q->id, &op, &serr) != HX_OK) {
        pthread_mutex_lock(&r->mu);
        req_finish(r, q, 1, serr.msg);
        pthread_mutex_unlock(&r->mu);
    }
    *out = q;
    return HX_OK;
}

static hx_gen_state be_next(void *ctx, hx_gen_handle *q, int32_t *tokens, int cap, int *n_tokens,
                            int *finish_stop, int64_t deadline_ns, char *message,
                            size_t message_cap)
{
    router *r = ctx;
    pthread_mutex_lock(&r->mu);
    while (q->read == q->n && !q->done && !q->failed && hx_proto_now_ns() < deadline_ns) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t left = deadline_ns - hx_proto_now_ns();
        if (left > 200000000LL)
            left = 200000000LL;
        if (left < 0)
            left = 0;
        ts.tv_sec += (time_t)(left / 1000000000LL);
        ts.tv_nsec += (long)(left % 1000000000LL);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&q->cv, &r->mu, &ts);
    }
    int k = 0;
    while (k < cap && q->read < q->n)
        tokens[k++] = q->toks[q->read++];
    *n_tokens = k;
    hx_gen_state s = HX_GEN_MORE;
    if (q->read == q->n && q->failed) {
        snprintf(message, message_cap, "%s", q->msg);
        s = HX_GEN_FAILED;
    } else if (q->read == q->n && q->done) {
        *finish_stop = q->finish_stop;
        s = HX_GEN_DONE;
    }
    pthread_mutex_unlock(&r->mu);
    return s;
}

static void be_release(void *ctx, hx_gen_handle *q)
{
    router *r = ctx;
    pthread_mutex_lock(&r->mu);
    int running = !q->done && !q->failed;
    int g = q->phase == 0 ? q->prefill : q->decode;
    int also = q->phase == 0 ? q->decode : -1; /* KV may be on its way there already */
    if (running)
        req_finish(r, q, 2, "cancelled");
    req_unlink(r, q);
    pthread_mutex_unlock(&r->mu);
    if (running) {
        hx_proto_group_op op = {.op = HX_PROTO_OP_REMOVE, .src_group = -1, .dst_group = -1};
        hx_err err = {0};
        link_send_op(r, g, q->id, &op, &err);
        if (also >= 0)
            link_send_op(r, also, q->id, &op, &err);
    }
    pthread_cond_destroy(&q->cv);
    free(q->toks);
    free(q);
}

static char *be_metrics(void *ctx)
{
    router *r = ctx;
    pthread_mutex_lock(&r->mu);
    for (int g = 0; g < r->plan->ngroups; g++) {
        hx_metrics_gauge_set(r->links[g].m_queue, (double)r->links[g].queued_prompt);
        hx_metrics_gauge_set(r->links[g].m_running, r->links[g].outstanding);
    }
    pthread_mutex_unlock(&r->mu);
    return hx_metrics_render(r->metrics);
}

static int be_health(void *ctx, char *reason, size_t cap)
{
    router *r = ctx;
    int ok = 1;
    size_t n = 0;
    reason[0] = '\0';
    pthread_mutex_lock(&r->mu);
    for (int g = 0; g < r->plan->ngroups; g++)
        if (!r->links[g].up) {
            ok = 0;
            int k = snprintf(reason + n, cap - n, "%sgroup '%s' is not connected%s%s",
                             n ? "; " : "", r->plan->groups[g].id,
                             r->links[g].down[0] ? ": " : "", r->links[g].down);
            if (k > 0 && (size_t)k < cap - n)
                n += (size_t)k;
        }
    pthread_mutex_unlock(&r->mu);
    return ok;
}

/* ---- run ----------------------------------------------------------------------------- */

static void register_metrics(router *r)
{
    static const double tpot_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                         0.1,   0.15,   0.2,   0.3,  0.5,  1.0,  2.0};
    static const double ttft_bounds[] = {0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0,
                                         1.5,  2.0,   3.0,  5.0, 10., 20., 60.};
    hx_metrics *m = r->metrics;
    const char *req = "Requests by outcome.";
    r->m_ok = hx_metrics_counter(m, "hexflow_requests_total", req, "status", "ok", NULL);
    r->m_failed = hx_metrics_counter(m, "hexflow_requests_total", req, "status", "failed", NULL);
    r->m_rejected =
        hx_metrics_counter(m, "hexflow_requests_total", req, "status", "rejected", NULL);
    r->m_cancelled =
        hx_metrics_counter(m, "hexflow_requests_total", req, "status", "cancelled", NULL);
    r->m_ttft = hx_metrics_histogram(m, "hexflow_ttft_seconds",
                                     "Time from request to first generated token.", ttft_bounds,
                                     (int)(sizeof ttft_bounds / sizeof *ttft_bounds), NULL);
    r->m_tpot = hx_metrics_histogram(m, "hexflow_tpot_seconds",
                                     "Time between consecutive generated tokens.", tpot_bounds,
                                     (int)(sizeof tpot_bounds / sizeof *tpot_bounds), NULL);
    r->m_kv_bytes = hx_metrics_counter(m, "hexflow_kv_bytes_moved_total",
                                       "KV cache bytes moved from prefill to decode groups.",
                                       NULL);
    r->m_prompt = hx_metrics_counter(m, "hexflow_prompt_tokens_total", "Prompt tokens taken.",
                                     NULL);
    r->m_generated = hx_metrics_counter(m, "hexflow_generated_tokens_total",
                                        "Tokens generated and sent to clients.", NULL);
    for (int g = 0; g < r->plan->ngroups; g++) {
        link *L = &r->links[g];
        const char *id = r->plan->groups[g].id;
        const hx_deploy_worker *w = &r->dep.workers[hx_deploy_leader(&r->dep, g)];
        L->m_up = hx_metrics_gauge(m, "hexflow_group_up", "1 while the group is connected.",
                                   "group", id, NULL);
        L->m_queue = hx_metrics_gauge(m, "hexflow_queue_depth",
                                      "Prompt tokens routed to the group and not yet prefilled.",
                                      "group", id, NULL);
        L->m_running = hx_metrics_gauge(m, "hexflow_running_requests",
                                        "Requests the group holds.", "group", id, NULL);
        L->w_active = hx_metrics_gauge(m, "hexflow_worker_active_requests",
                                       "Requests in the worker's engine.", "worker", w->device,
                                       "group", id, NULL);
        L->w_done = hx_metrics_gauge(m, "hexflow_worker_requests_done",
                                     "Requests the worker finished.", "worker", w->device, "group",
                                     id, NULL);
        L->w_failed = hx_metrics_gauge(m, "hexflow_worker_requests_failed",
                                       "Requests the worker failed.", "worker", w->device,
                                       "group", id, NULL);
        L->w_kv_sent = hx_metrics_gauge(m, "hexflow_worker_kv_bytes_sent",
                                        "KV bytes the worker sent.", "worker", w->device, "group",
                                        id, NULL);
        L->w_kv_recv = hx_metrics_gauge(m, "hexflow_worker_kv_bytes_received",
                                        "KV bytes the worker received.", "worker", w->device,
                                        "group", id, NULL);
        L->w_tokens = hx_metrics_gauge(m, "hexflow_worker_tokens_generated",
                                       "Tokens the worker generated.", "worker", w->device,
                                       "group", id, NULL);
    }
}

hx_status hx_router_run(const hx_router_options *opt, volatile sig_atomic_t *stop, hx_err *err)
{
    router R;
    router *r = &R;
    memset(r, 0, sizeof *r);
    r->opt = *opt;
    r->stop = stop;
    pthread_mutex_init(&r->mu, NULL);
    hx_http *http = NULL;
    hx_status st;
    if ((st = hx_plan_load_err(opt->plan_path, &r->plan, err)) != HX_OK)
        goto out;
    if ((st = hx_deploy_init(&r->dep, r->plan, err)) != HX_OK)
        goto out;
    if ((st = hx_model_load(opt->model_dir, &r->cfg, err)) != HX_OK)
        goto out;
    char tpath[4096];
    snprintf(tpath, sizeof tpath, "%s/tokenizer.json", opt->model_dir);
    if ((st = hx_tokenizer_load(tpath, &r->tok, err)) != HX_OK)
        goto out;
    r->eos = hx_tokenizer_eos(r->tok);
    /* request ids start at random, so a restarted router never reuses ids that workers
     * may still hold for its predecessor */
    {
        hx_proto_secret rnd;
        if (hx_proto_secret_generate(&rnd, err) != HX_OK) {
            st = err->code;
            goto out;
        }
        memcpy(&r->next_id, rnd.bytes, sizeof r->next_id);
        r->next_id &= 0x7fffffffffffffffULL; /* room to count up */
        hx_proto_secret_release(&rnd);
    }
    r->ttft_slo_s = opt->ttft_slo_s != 0 ? opt->ttft_slo_s
                                          : (r->plan->slo_ttft_s > 0 ? r->plan->slo_ttft_s : 0);
    r->links = calloc((size_t)(r->plan->ngroups ? r->plan->ngroups : 1), sizeof *r->links);
    r->metrics = hx_metrics_new();
    if (!r->links || !r->metrics) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    for (int g = 0; g < r->plan->ngroups; g++) {
        r->links[g].g = g;
        pthread_mutex_init(&r->links[g].send, NULL);
    }
    register_metrics(r);

    hx_http_options ho;
    hx_http_options_init(&ho);
    ho.host = opt->bind_address ? opt->bind_address : r->dep.router_address;
    ho.port = opt->port > 0 ? opt->port : r->dep.router_port;
    ho.bearer_token = opt->bearer_token;
    const char *slash = strrchr(opt->model_dir, '/');
    ho.model_name = opt->model_name ? opt->model_name
                    : r->plan->model_name ? r->plan->model_name
                    : (slash && slash[1] ? slash + 1 : opt->model_dir);
    hx_http_backend be = {r, be_submit, be_next, be_release, be_metrics, be_health};
    if ((st = hx_http_start(&ho, r->tok, &be, &http, err)) != HX_OK)
        goto out;
    for (int g = 0; g < r->plan->ngroups; g++) {
        link_arg *a = malloc(sizeof *a);
        if (a)
            *a = (link_arg){r, g};
        if (!a || pthread_create(&r->links[g].thread, NULL, link_main, a) != 0) {
            free(a);
            st = hx_err_set(err, HX_ENOMEM, "cannot start a thread");
            goto out;
        }
        r->links[g].started = 1;
    }
    HX_INFO("router: serving %s on http://%s:%d", ho.model_name, ho.host, hx_http_port(http));
    while (!*stop)
        sleep_ms(100);

out:
    r->quitting = 1;
    hx_http_free(http); /* no more callbacks after this */
    if (r->links)
        for (int g = 0; g < r->plan->ngroups; g++) {
            if (r->links[g].started)
                pthread_join(r->links[g].thread, NULL);
            pthread_mutex_destroy(&r->links[g].send);
        }
    for (int b = 0; b < HASH_BUCKETS; b++)
        while (r->table[b]) {
            struct hx_gen_handle *q = r->table[b];
            r->table[b] = q->next;
            pthread_cond_destroy(&q->cv);
            free(q->toks);
            free(q);
        }
    free(r->links);
    hx_metrics_free(r->metrics);
    hx_tokenizer_free(r->tok);
    hx_deploy_release(&r->dep);
    hx_plan_free(r->plan);
    pthread_mutex_destroy(&r->mu);
    return st;
}
