/* worker.c - one worker process of a deployment; see worker.h. */
#include "runtime/worker.h"

#include <errno.h>
#include <stdatomic.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/bufpool.h"
#include "common/log.h"
#include "runtime/backend.h"
#include "runtime/batch.h"
#include "runtime/deploy.h"
#include "runtime/kvcache.h"
#include "planner/plan.h"

#define SOFTWARE_VERSION "0.1.0"
#define SEND_TIMEOUT_S 30.0
#define KV_WAIT_S 30.0       /* a decode rank waits this long for a request's segments */
#define KV_EXPIRE_S 120.0    /* segments nobody asked for are dropped after this */
#define MAX_AUX_CONNS 256
#define ROUTER_SILENCE_S 10.0 /* no frame from the router for this long: it is gone */
#define KV_CHECK_S 10.0      /* a decode rank waits this long for its segments when asked */
#define NCCL_JOIN_S 20.0     /* a stage's ranks join their NCCL communicator within this */
#define LINK_SETUP_S 10.0    /* each message of a KV link's handshake, join time apart */
#define LINK_JOIN_S 10.0     /* a KV link's join and first transfer: the prefill side's engine
                                thread waits for the whole handshake, which must end well
                                inside its group's peer timeout (10 s for the PLAN, then
                                20 s, or 30 s when NCCL is slow to take the first transfer) */
#define LINK_RETRY_S 60.0    /* after a KV link failed, its decode worker gets TCP this long */
#define LINK_DECLINED_S 5.0  /* after a decline (e.g. still joining its group's NCCL), at first;
                                doubling up to LINK_RETRY_MAX_S */
#define LINK_RETRY_MAX_S 300.0
#define KV_BUF_BYTES ((size_t)1 << 30) /* received-segment buffers kept hold at most this */

/* A KV segment received for a request, waiting for its ADD_PREFILLED. */
typedef struct kv_in {
    struct kv_in *next;
    uint64_t id;
    int64_t t_ns;
    hx_kv_segment seg; /* payload points to data */
    float *data;       /* owned: from kv_buf_get, or device memory when on_device */
    int on_device;     /* received over NCCL: hx_backend_device_free */
} kv_in;

/* A decision the router asked of the leader, not yet applied. */
typedef struct op_item {
    struct op_item *next;
    uint64_t id;
    hx_proto_group_op op;
    int32_t *tokens; /* owned copy of op.token_ids */
    int64_t t_ns;
    int kv_want;     /* ADD_PREFILLED: segments the leader gets; -1 until counted */
} op_item;

/* What every rank remembers of a request in its engine. */
typedef struct req_info {
    uint64_t id;
    int dst_group;
    int max_tokens;
    int eos;
    int generated;
    int64_t t0_ns;
} req_info;

typedef struct worker {
    hx_worker_options opt;
    volatile sig_atomic_t *stop;
    hx_plan *plan;
    hx_deploy dep;
    const hx_deploy_worker *me;
    const hx_plan_group *grp;
    int gfirst, gsize, li; /* group's first worker, size, my local index */
    int last_stage;
    int is_leader;
    int max_seq_tokens; /* positions one request may use in the engine */
    atomic_int group_kv_tokens; /* leader: KV positions of the group's smallest cache */
    hx_backend *eng;
    const hx_model *cfg;
    int eos_default;

    hx_proto_listener *lis;
    pthread_t accept_thread;
    int accept_started;
    atomic_int quitting;
    atomic_int router_lost; /* the router went away: the leader cancels what it held */
    atomic_int ready;       /* the engine is loaded (eng, cfg set) */
    atomic_int set_up;      /* and the group's GROUP_SETUP is done (its NCCL joined) */
    _Atomic int64_t step_since_ns; /* when the engine's step in progress began; 0: none */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    hx_proto_conn **peers; /* [gsize] by local index; NULL for me */
    int n_peers;
    hx_proto_conn *aux[MAX_AUX_CONNS]; /* connections owned by connection threads */
    int n_aux_threads;

    /* leader */
    pthread_mutex_t router_send;
    hx_proto_conn *router;
    op_item *q_head, *q_tail;
    op_item *wait_head; /* admitted later: no room yet, or KV not here yet */

    /* decode ranks */
    kv_in *kv;
    hx_bufpool kv_bufs; /* buffers for received segments, kept for reuse */

    /* prefill ranks: connections to decode workers, by worker index */
    hx_proto_conn **kv_out;
    hx_backend_link **kv_link; /* [nworkers]: KV over NCCL to that decode worker, when agreed */
    struct link_try {          /* [nworkers]: offering that decode worker a link */
        int64_t next_ns;       /* not before (a link failed, or was declined) */
        double backoff_s;      /* the wait after the last try without a link */
        int logged;            /* the transport last logged: 0 none, 1 TCP, 2 NCCL */
    } *link_try;
    unsigned char *pack;
    size_t pack_cap;

    req_info *reqs;
    int n_reqs, cap_reqs;
    atomic_int n_active; /* n_reqs, for health reports from other threads */

    float *red;
    size_t red_cap;

    /* counters (mu) */
    int64_t t_start_ns;
    uint64_t done, failed, tokens, kv_sent, kv_received;
} worker;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Waits on w->cv (w->mu held) for at most ms milliseconds. */
static void wait_ms(worker *w, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (long)ms * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&w->cv, &w->mu, &ts);
}

static int64_t deadline_peer(const worker *w)
{
    return hx_proto_deadline_in(w->opt.peer_timeout_s);
}

hx_status hx_transport_parse(const char *s, hx_transport *out, hx_err *err)
{
    if (strcmp(s, "auto") == 0)
        *out = HX_TRANSPORT_AUTO;
    else if (strcmp(s, "nccl") == 0)
        *out = HX_TRANSPORT_NCCL;
    else if (strcmp(s, "tcp") == 0)
        *out = HX_TRANSPORT_TCP;
    else
        return hx_err_set(err, HX_EINVAL, "unknown transport '%s' (auto, nccl or tcp)", s);
    return HX_OK;
}

void hx_worker_options_init(hx_worker_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->max_seqs = 32;
    opt->block_tokens = 16;
    opt->peer_timeout_s = 60.0;
}

/* ---- request bookkeeping (engine thread only) ----------------------------------- */

static req_info *req_find(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_reqs; i++)
        if (w->reqs[i].id == id)
            return &w->reqs[i];
    return NULL;
}

static hx_status req_add(worker *w, const req_info *r, hx_err *err)
{
    if (w->n_reqs == w->cap_reqs) {
        int cap = w->cap_reqs ? 2 * w->cap_reqs : 64;
        req_info *g = realloc(w->reqs, (size_t)cap * sizeof *g);
        if (!g)
            return hx_err_set(err, HX_ENOMEM, "out of memory");
        w->reqs = g;
        w->cap_reqs = cap;
    }
    w->reqs[w->n_reqs++] = *r;
    w->n_active = w->n_reqs;
    return HX_OK;
}

static void req_drop(worker *w, uint64_t id)
{
    for (int i = 0; i < w->n_reqs; i++)
        if (w->reqs[i].id == id) {
            w->reqs[i] = w->reqs[--w->n_reqs];
            w->n_active = w->n_reqs;
            return;
        }
}

/* ---- the router link (leader) ------------------------------------------------- */

/* Sends to the router if it is there; a failure is logged and drops the link. */
static void router_send_tokens(worker *w, uint64_t id, int token, int index)
{
    pthread_mutex_lock(&w->router_send);
    if (w->router) {
        hx_err err = {0};
        int32_t t = token;
        hx_proto_tokens m = {(uint64_t)index, 1, &t};
        if (hx_proto_send_tokens(w->router, id, &m, hx_proto_deadline_in(SEND_TIMEOUT_S), &err) !=
            HX_OK)
            HX_WARN("worker %s: to the router: %s", w->me->device, err.msg);
    }
    pthread_mutex_unlock(&w->router_send);
}

static void router_send_first(worker *w, uint64_t id, int token, int n_prompt, int64_t ns,
                              uint64_t kv_bytes)
{
    pthread_mutex_lock(&w->router_send);
    if (w->router) {
        hx_err err = {0};
        hx_proto_first_token m = {token, (uint32_t)n_prompt, (uint64_t)ns, kv_bytes};
        if (hx_proto_send_first_token(w->router, id, &m, hx_proto_deadline_in(SEND_TIMEOUT_S),
                                      &err) != HX_OK)
            HX_WARN("worker %s: to the router: %s", w->me->device, err.msg);
    }
    pthread_mutex_unlock(&w->router_send);
}

static void router_send_done(worker *w, uint64_t id, hx_proto_finish finish, int generated,
                             int64_t elapsed_ns)
{
    pthread_mutex_lock(&w->router_send);
    if (w->router) {
        hx_err err = {0};
        hx_proto_done m = {finish, (uint32_t)generated, (uint64_t)elapsed_ns};
        if (hx_proto_send_done(w->router, id, &m, hx_proto_deadline_in(SEND_TIMEOUT_S), &err) !=
            HX_OK)
            HX_WARN("worker %s: to the router: %s", w->me->device, err.msg);
    }
    pthread_mutex_unlock(&w->router_send);
}

static void router_send_error(worker *w, uint64_t id, hx_status code, const char *msg)
{
    pthread_mutex_lock(&w->router_send);
    if (w->router) {
        hx_err err = {0};
        hx_proto_send_error(w->router, id, code, msg, hx_proto_deadline_in(5.0), &err);
    }
    pthread_mutex_unlock(&w->router_send);
    pthread_mutex_lock(&w->mu);
    w->failed++;
    pthread_mutex_unlock(&w->mu);
}

/* ---- group communication (engine thread) --------------------------------------- */

static hx_proto_conn *peer_at(worker *w, int stage, int rank)
{
    int i = hx_deploy_worker_at(&w->dep, w->me->group, stage, rank);
    return i < 0 ? NULL : w->peers[i - w->gfirst];
}

static hx_status comm_allreduce(void *ctx, float *x, size_t n, hx_err *err)
{
    worker *w = ctx;
    const int tp = w->me->tp, s = w->me->stage;
    if (tp == 1)
        return HX_OK;
    if (w->me->rank != 0) {
        hx_proto_conn *hub = peer_at(w, s, 0);
        hx_status st = hx_proto_send_floats(hub, x, n, deadline_peer(w), err);
        if (st == HX_OK)
            st = hx_proto_recv_floats(hub, x, n, deadline_peer(w), err);
        return st;
    }
    if (w->red_cap < n) {
        float *g = realloc(w->red, n * sizeof *g);
        if (!g)
            return hx_err_set(err, HX_ENOMEM, "out of memory");
        w->red = g;
        w->red_cap = n;
    }
    for (int r = 1; r < tp; r++) { /* in rank order: every rank gets these bits */
        hx_status st = hx_proto_recv_floats(peer_at(w, s, r), w->red, n, deadline_peer(w), err);
        if (st != HX_OK)
            return st;
        for (size_t i = 0; i < n; i++)
            x[i] += w->red[i];
    }
    for (int r = 1; r < tp; r++) {
        hx_status st = hx_proto_send_floats(peer_at(w, s, r), x, n, deadline_peer(w), err);
        if (st != HX_OK)
            return st;
    }
    return HX_OK;
}

static hx_status comm_recv_rows(void *ctx, float *x, int rows, int hidden, hx_err *err)
{
    worker *w = ctx;
    return hx_proto_recv_floats(peer_at(w, w->me->stage - 1, 0), x, (size_t)rows * hidden,
                                deadline_peer(w), err);
}

static hx_status comm_send_rows(void *ctx, const float *x, int rows, int hidden, hx_err *err)
{
    worker *w = ctx;
    if (w->me->rank != 0)
        return HX_OK; /* every rank of a stage holds the same rows: rank 0 sends them */
    const int next = w->me->stage + 1;
    for (int r = 0; r < w->grp->stages[next].ndevices; r++) {
        hx_status st = hx_proto_send_floats(peer_at(w, next, r), x, (size_t)rows * hidden,
                                            deadline_peer(w), err);
        if (st != HX_OK)
            return st;
    }
    return HX_OK;
}

static hx_status comm_tokens(void *ctx, int *tokens, int n, int is_source, hx_err *err)
{
    worker *w = ctx;
    if (!is_source)
        return hx_proto_recv_step_tokens(peer_at(w, w->last_stage, 0), tokens, n,
                                         deadline_peer(w), err);
    for (int s = 0; s <= w->last_stage; s++)
        for (int r = s == w->last_stage ? 1 : 0; r < w->grp->stages[s].ndevices; r++) {
            hx_status st =
                hx_proto_send_step_tokens(peer_at(w, s, r), tokens, n, deadline_peer(w), err);
            if (st != HX_OK)
                return st;
        }
    return HX_OK;
}

/* ---- KV segments in (decode ranks) ----------------------------------------------- */

/*
 * Buffers for received segments come from the backend (page-locked for a
 * GPU engine, so its import copies straight from them) through a small
 * pool (w->kv_bufs): making page-locked memory costs more than the copy it
 * speeds up, so it is made once and reused.
 */
static hx_status kv_buf_alloc(void *ctx, size_t bytes, void **out, hx_err *err)
{
    worker *w = ctx;
    *out = hx_backend_host_alloc(w->ready ? w->eng : NULL, bytes);
    return *out ? HX_OK : hx_err_set(err, HX_ENOMEM, "out of memory");
}

static void kv_buf_free(void *ctx, void *p)
{
    (void)ctx;
    hx_backend_host_free(p);
}

/* A buffer of at least `bytes`; NULL when out of memory. */
static float *kv_buf_get(worker *w, size_t bytes)
{
    void *p = NULL;
    hx_err e = {0};
    (void)hx_bufpool_get(&w->kv_bufs, bytes ? bytes : 1, &p, &e);
    return p;
}

/* Frees a received segment (w->mu held; device memory goes back to the backend). */
static void kv_in_free(worker *w, kv_in *k)
{
    if (k->on_device)
        hx_backend_device_free(w->eng, k->data);
    else
        hx_bufpool_put(&w->kv_bufs, k->data);
    free(k);
}

/*
 * Keeps a segment until its ADD_PREFILLED: the frame's payload copied into
 * a buffer, or (device non-NULL, taken over) the device memory it arrived
 * in over NCCL.
 */
static void kv_store(worker *w, uint64_t id, const hx_proto_kv_segment *m, void *device)
{
    kv_in *k = calloc(1, sizeof *k);
    float *data = device ? device : k ? kv_buf_get(w, m->data_bytes) : NULL;
    if (!k || !data) {
        free(k);
        if (device)
            hx_backend_device_free(w->eng, device);
        else
            hx_bufpool_put(&w->kv_bufs, data);
        HX_ERROR("worker %s: out of memory for a KV segment", w->me->device);
        return;
    }
    if (!device)
        memcpy(data, m->data, m->data_bytes);
    k->id = id;
    k->t_ns = hx_proto_now_ns();
    k->data = data;
    k->on_device = device != NULL;
    k->seg = (hx_kv_segment){HX_KV_SEGMENT_VERSION, (int)m->dtype, (int)m->first_layer,
                             (int)m->num_layers, (int)m->first_kv_head, (int)m->num_kv_heads,
                             (int)m->first_token, (int)m->num_tokens, (int)m->head_dim,
                             m->data_bytes, 0, data};
    pthread_mutex_lock(&w->mu);
    /* drop what nobody asked for in time */
    for (kv_in **pp = &w->kv; *pp;) {
        if ((k->t_ns - (*pp)->t_ns) / 1e9 > KV_EXPIRE_S) {
            kv_in *dead = *pp;
            *pp = dead->next;
            kv_in_free(w, dead);
        } else {
            pp = &(*pp)->next;
        }
    }
    for (kv_in *e = w->kv; e; e = e->next)
        if (e->id == id && e->seg.layer_first == k->seg.layer_first &&
            e->seg.head_first == k->seg.head_first) { /* sent twice: keep the first */
            kv_in_free(w, k);
            pthread_mutex_unlock(&w->mu);
            return;
        }
    k->next = w->kv;
    w->kv = k;
    w->kv_received += m->data_bytes;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int kv_count(worker *w, uint64_t id)
{
    int n = 0;
    for (kv_in *k = w->kv; k; k = k->next)
        n += k->id == id;
    return n;
}

/* Waits (w->mu held) until `want` segments of id are here, up to seconds; how many are. */
static int kv_wait(worker *w, uint64_t id, int want, double seconds)
{
    int64_t deadline = hx_proto_deadline_in(seconds);
    while (kv_count(w, id) < want && hx_proto_now_ns() < deadline && !*w->stop) {
        wait_ms(w, 100);
    }
    return kv_count(w, id);
}

static void kv_forget(worker *w, uint64_t id)
{
    pthread_mutex_lock(&w->mu);
    for (kv_in **pp = &w->kv; *pp;) {
        if ((*pp)->id == id) {
            kv_in *dead = *pp;
            *pp = dead->next;
            kv_in_free(w, dead);
        } else {
            pp = &(*pp)->next;
        }
    }
    pthread_mutex_unlock(&w->mu);
}

/* The pieces moving a request's KV from group src's layout to group dst's (*out malloc'ed). */
static hx_status kv_pieces(worker *w, int src, int dst, hx_kv_piece **out, int *n_out,
                           hx_err *err)
{
    hx_kv_stage a[64], b[64];
    int na = hx_deploy_kv_layout(&w->dep, src, a, 64);
    int nb = hx_deploy_kv_layout(&w->dep, dst, b, 64);
    if (na > 64 || nb > 64)
        return hx_err_set(err, HX_ERANGE, "more than 64 pipeline stages");
    int n = 0;
    hx_status st = hx_kv_plan_segments(w->cfg->num_layers, w->cfg->num_kv_heads, a, na, b, nb,
                                       NULL, 0, &n, err);
    if (st != HX_OK && st != HX_ERANGE)
        return st;
    hx_kv_piece *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    if (!p)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    st = hx_kv_plan_segments(w->cfg->num_layers, w->cfg->num_kv_heads, a, na, b, nb, p, n, &n,
                             err);
    if (st != HX_OK) {
        free(p);
        return st;
    }
    *out = p;
    *n_out = n;
    return HX_OK;
}

/* Segments this rank receives for a request from prefill group src. */
static hx_status kv_expected(worker *w, int src, int *n_out, hx_err *err)
{
    hx_kv_piece *p = NULL;
    int n = 0;
    hx_status st = kv_pieces(w, src, w->me->group, &p, &n, err);
    if (st != HX_OK)
        return st;
    int mine = 0;
    for (int i = 0; i < n; i++)
        mine += p[i].dst_stage == w->me->stage && p[i].dst_rank == w->me->rank;
    free(p);
    *n_out = mine;
    return HX_OK;
}

/* ---- KV segments out (prefill ranks) --------------------------------------------- */

/* ---- KV over NCCL: a link per (prefill rank, decode rank) ------------------------------ */

/*
 * How long one transfer over a link may take: well inside the peer timeout,
 * as the prefill side waits on its engine thread, which its group's other
 * ranks wait for.
 */
static double link_op_s(const worker *w)
{
    double t = w->opt.peer_timeout_s / 2;
    return t < SEND_TIMEOUT_S ? t : SEND_TIMEOUT_S;
}

/* The next link offer to decode worker wi: backoff_s from now (0: at once). */
static void link_retry_after(worker *w, int wi, double backoff_s)
{
    w->link_try[wi].backoff_s = backoff_s;
    w->link_try[wi].next_ns = hx_proto_now_ns() + (int64_t)(backoff_s * 1e9);
}

/*
 * The deadline for the peer's answer after a link's join, which began at
 * start_ns (both sides begin about together): the peer may still be joining
 * when our join failed at once, so it has its whole join time and a
 * message's; at least half a message's from now, if ours overran.
 */
static int64_t link_answer_by(int64_t start_ns)
{
    const int64_t by = start_ns + (int64_t)((LINK_JOIN_S + LINK_SETUP_S) * 1e9);
    const int64_t least = hx_proto_deadline_in(LINK_SETUP_S / 2);
    return by > least ? by : least;
}

/*
 * This worker's OFFER (GROUP_SETUP, proto.h): its engine, and nccl as given
 * (TP all-reduce for a group's setup, a KV link on a KV connection).
 */
static hx_status offer_of(worker *w, int nccl, hx_proto_group_setup *m, hx_err *err)
{
    memset(m, 0, sizeof *m);
    m->phase = HX_PROTO_SETUP_OFFER;
    m->backend = (uint32_t)hx_backend_kind_of(w->eng);
    m->step_rows = (uint32_t)hx_backend_step_rows(w->eng);
    m->nccl = (uint32_t)(nccl != 0);
    m->max_seqs = (uint32_t)hx_backend_max_seqs(w->eng);
    m->block_tokens = (uint32_t)hx_backend_block_tokens(w->eng);
    m->kv_tokens = (uint32_t)hx_backend_max_tokens(w->eng);
    m->nccl_host = hx_backend_nccl_host();
    return hx_backend_device_uuid(w->eng, m->device_uuid, sizeof m->device_uuid, err);
}

/*
 * The prefill side, right after the KV connection's HELLO: OFFER, the
 * decode worker's PLAN (nccl 1: it can join and is another GPU), NCCL_ID,
 * both join (rank 0 here, 1 there), JOINED back, FINAL. The link is kept
 * only when both joined; otherwise KV goes inline over the connection.
 * Errors are the connection's (a link that cannot be made is no error,
 * unless --kv-transport nccl).
 */
static hx_status kv_link_offer(worker *w, int wi, hx_proto_conn *c, hx_err *err)
{
    hx_proto_group_setup m;
    const int able = hx_backend_link_capable(w->eng);
    hx_status st = offer_of(w, able, &m, err);
    if (st == HX_OK)
        st = hx_proto_send_group_setup(c, &m, hx_proto_deadline_in(LINK_SETUP_S), err);
    if (st == HX_OK)
        st = hx_proto_recv_group_setup(c, HX_PROTO_SETUP_PLAN, &m,
                                       hx_proto_deadline_in(LINK_SETUP_S), err);
    if (st != HX_OK)
        return st;
    hx_backend_link *link = NULL;
    const char *device = w->dep.workers[wi].device;
    const char *why = !able ? "this worker's engine cannot (cpu backend, or no NCCL)"
                            : "the decode worker cannot or will not join (cpu backend, no "
                              "NCCL, --kv-transport tcp, or the same GPU)";
    if (m.nccl) {
        hx_err e = {0};
        hx_proto_group_setup idm = {.phase = HX_PROTO_SETUP_NCCL_ID};
        idm.nccl = hx_backend_nccl_unique_id(idm.nccl_id, &e) == HX_OK;
        why = idm.nccl ? "joining failed (see both workers' logs)" : "no NCCL id could be made";
        if ((st = hx_proto_send_group_setup(c, &idm, hx_proto_deadline_in(LINK_SETUP_S),
                                            err)) != HX_OK)
            return st;
        const int64_t start_ns = hx_proto_now_ns();
        if (idm.nccl && hx_backend_link_open(w->eng, idm.nccl_id, 0, LINK_JOIN_S,
                                             link_op_s(w), &link, &e) != HX_OK)
            HX_WARN("worker %s: KV link to %s: %s", w->me->device, device, e.msg);
        else if (!idm.nccl)
            HX_WARN("worker %s: KV link to %s: no NCCL id: %s", w->me->device, device, e.msg);
        /* the whole handshake stays well within the peer timeout */
        if ((st = hx_proto_recv_group_setup(c, HX_PROTO_SETUP_JOINED, &m,
                                            link_answer_by(start_ns), err)) ==
            HX_OK) {
            hx_proto_group_setup fin = {.phase = HX_PROTO_SETUP_FINAL,
                                        .nccl = (uint32_t)(link && m.nccl)};
            st = hx_proto_send_group_setup(c, &fin, hx_proto_deadline_in(LINK_SETUP_S), err);
            if (!fin.nccl) {
                hx_backend_link_close(link);
                link = NULL;
            }
        }
    }
    if (st != HX_OK) {
        hx_backend_link_close(link);
        return st;
    }
    /* no link: offered again on this connection later; after a failed join (which
       costs both sides time) a minute later, after a decline sooner (the decode rank may
       only have been busy joining its own group's NCCL), backing off */
    struct link_try *t = &w->link_try[wi];
    const double declined = t->backoff_s <= 0 ? LINK_DECLINED_S : 2 * t->backoff_s;
    link_retry_after(w, wi,
                     link     ? 0
                     : m.nccl ? LINK_RETRY_S
                              : (declined < LINK_RETRY_MAX_S ? declined : LINK_RETRY_MAX_S));
    if (!link && w->opt.kv_transport == HX_TRANSPORT_NCCL)
        return hx_err_set(err, HX_ENOTSUP,
                          "KV to %s cannot go over NCCL (--kv-transport nccl): %s", device, why);
    w->kv_link[wi] = link;
    if (t->logged != (link ? 2 : 1))
        HX_INFO("worker %s: KV to %s goes over %s", w->me->device, device,
                link ? "NCCL" : "TCP (page-locked staging)");
    t->logged = link ? 2 : 1;
    return HX_OK;
}

/*
 * The decode side of kv_link_offer, on the KV connection's thread, given
 * the prefill worker's OFFER: *out is the link when both joined (NULL:
 * inline KV). An error is the connection's.
 */
static hx_status kv_link_accept(worker *w, hx_proto_conn *c, const hx_proto_group_setup *offer,
                                hx_backend_link **out, hx_err *err)
{
    *out = NULL;
    hx_proto_group_setup mine;
    int able = 0;
    hx_err ignored = {0};
    /* not while the group's own NCCL joins (two communicators made at once on one GPU):
       declined then, the prefill rank offers again a few seconds later */
    if (w->set_up && w->opt.kv_transport != HX_TRANSPORT_TCP &&
        offer_of(w, hx_backend_link_capable(w->eng), &mine, &ignored) == HX_OK) {
        able = offer->nccl && mine.nccl &&
               !(strcmp(offer->device_uuid, mine.device_uuid) == 0 &&
                 offer->nccl_host == mine.nccl_host);
    }
    hx_proto_group_setup plan = {.phase = HX_PROTO_SETUP_PLAN, .nccl = (uint32_t)able};
    hx_status st = hx_proto_send_group_setup(c, &plan, hx_proto_deadline_in(LINK_SETUP_S), err);
    if (st != HX_OK || !able)
        return st;
    hx_proto_group_setup m;
    if ((st = hx_proto_recv_group_setup(c, HX_PROTO_SETUP_NCCL_ID, &m,
                                        hx_proto_deadline_in(LINK_SETUP_S), err)) != HX_OK)
        return st;
    hx_backend_link *link = NULL;
    hx_err e = {0};
    const int64_t start_ns = hx_proto_now_ns();
    if (m.nccl && hx_backend_link_open(w->eng, m.nccl_id, 1, LINK_JOIN_S, link_op_s(w), &link,
                                       &e) != HX_OK)
        HX_WARN("worker %s: KV link from %s: %s", w->me->device, hx_proto_peer(c), e.msg);
    hx_proto_group_setup joined = {.phase = HX_PROTO_SETUP_JOINED, .nccl = link != NULL};
    st = hx_proto_send_group_setup(c, &joined, hx_proto_deadline_in(LINK_SETUP_S), err);
    if (st == HX_OK)
        st = hx_proto_recv_group_setup(c, HX_PROTO_SETUP_FINAL, &m, link_answer_by(start_ns),
                                       err);
    if (st != HX_OK || !m.nccl) {
        hx_backend_link_close(link);
        return st;
    }
    *out = link;
    return HX_OK;
}

/* Whether to offer decode worker wi a link now (--kv-transport auto; nccl always does). */
static int link_due(const worker *w, int wi)
{
    return w->opt.kv_transport == HX_TRANSPORT_AUTO && hx_backend_link_capable(w->eng) &&
           hx_proto_now_ns() >= w->link_try[wi].next_ns;
}

static hx_status kv_conn(worker *w, int wi, hx_proto_conn **out, hx_err *err)
{
    if (w->kv_out[wi]) {
        /* the decode side never writes on this connection once it is set up: anything
           readable is its end of file (it exited, or was restarted): connect again */
        struct pollfd pf = {hx_proto_fd(w->kv_out[wi]), POLLIN, 0};
        hx_status st = HX_OK;
        if (poll(&pf, 1, 0) == 0 &&
            (w->kv_link[wi] || !link_due(w, wi) ||
             (st = kv_link_offer(w, wi, w->kv_out[wi], err)) == HX_OK)) {
            *out = w->kv_out[wi];
            return HX_OK;
        }
        if (st != HX_OK)
            HX_INFO("worker %s: offering %s a KV link again: %s: connecting again",
                    w->me->device, w->dep.workers[wi].device, err->msg);
        else
            HX_INFO("worker %s: the KV connection to %s was closed: connecting again",
                    w->me->device, w->dep.workers[wi].device);
        hx_backend_link_close(w->kv_link[wi]);
        w->kv_link[wi] = NULL;
        hx_proto_close(w->kv_out[wi]);
        w->kv_out[wi] = NULL;
    }
    const hx_deploy_worker *d = &w->dep.workers[wi];
    hx_proto_conn *c = NULL;
    hx_status st = hx_proto_connect(d->address, d->port, w->opt.secret, "kv",
                                    hx_proto_deadline_in(10.0), &c, err);
    if (st != HX_OK)
        return st;
    hx_proto_hello h = {HX_PROTO_ROLE_PREFILL, (uint16_t)w->me->stage, (uint32_t)w->me->rank,
                        "", SOFTWARE_VERSION};
    snprintf(h.group_id, sizeof h.group_id, "%s", w->grp->id);
    st = hx_proto_send_hello(c, &h, hx_proto_deadline_in(10.0), err);
    if (st == HX_OK && (w->opt.kv_transport == HX_TRANSPORT_NCCL || link_due(w, wi)))
        st = kv_link_offer(w, wi, c, err);
    if (st != HX_OK) {
        hx_proto_close(c);
        return st;
    }
    w->kv_out[wi] = c;
    *out = c;
    return HX_OK;
}

/* a KV segment's dtype goes into the KV_SEGMENT message as it is */
_Static_assert(HX_KV_DTYPE_F32 == (int)HX_PROTO_DTYPE_F32 &&
                   HX_KV_DTYPE_BF16 == (int)HX_PROTO_DTYPE_BF16,
               "KV segment and protocol dtypes are numbered alike");

/*
 * Packs and sends this rank's pieces of request id's KV to decode group dst;
 * *group_bytes gets the payload bytes of every rank's pieces (the group's
 * ranks share the backend, so the dtype).
 */
static hx_status kv_send(worker *w, uint64_t id, int dst, uint64_t *group_bytes, hx_err *err)
{
    hx_kv_piece *p = NULL;
    int n = 0;
    hx_status st = kv_pieces(w, w->me->group, dst, &p, &n, err);
    if (st != HX_OK)
        return st;
    int tokens = hx_backend_seq_tokens(w->eng, id);
    const int dtype = hx_backend_kv_dtype(w->eng); /* the cache's own: bf16 from a GPU */
    *group_bytes = 0;
    for (int i = 0; i < n; i++)
        *group_bytes += hx_kv_segment_bytes(dtype, p[i].num_layers, p[i].num_heads, tokens,
                                            w->cfg->head_dim) -
                        HX_KV_SEGMENT_HEADER_BYTES;
    for (int i = 0; st == HX_OK && i < n; i++) {
        if (p[i].src_stage != w->me->stage || p[i].src_rank != w->me->rank)
            continue;
        const size_t bytes = hx_kv_segment_bytes(dtype, p[i].num_layers, p[i].num_heads, tokens,
                                                 w->cfg->head_dim);
        const int wi = hx_deploy_worker_at(&w->dep, dst, p[i].dst_stage, p[i].dst_rank);
        hx_proto_conn *c = NULL;
        if ((st = kv_conn(w, wi, &c, err)) != HX_OK)
            break;
        hx_backend_link *link = w->kv_link[wi];
        if (!link && bytes > w->pack_cap) { /* page-locked for a GPU engine: direct copies */
            hx_backend_host_free(w->pack);
            w->pack = hx_backend_host_alloc(w->eng, bytes);
            w->pack_cap = w->pack ? bytes : 0;
            if (!w->pack) {
                st = hx_err_set(err, HX_ENOMEM, "out of memory for a KV segment");
                break;
            }
        }
        if (!link && (st = hx_backend_pack_kv(w->eng, id, p[i].layer_first, p[i].num_layers,
                                              p[i].head_first, p[i].num_heads, w->pack,
                                              w->pack_cap, NULL, err)) != HX_OK)
            break;
        /* pieces come ordered by destination: number this one among its destination's */
        int first = i, count = 0;
        while (first > 0 && p[first - 1].dst_stage == p[i].dst_stage &&
               p[first - 1].dst_rank == p[i].dst_rank)
            first--;
        for (int j = first; j < n && p[j].dst_stage == p[i].dst_stage &&
                            p[j].dst_rank == p[i].dst_rank; j++)
            count++;
        /* over a link the frame is the header alone, the payload goes GPU to GPU after it */
        hx_proto_kv_segment m = {(uint16_t)w->me->stage, (uint16_t)w->me->rank,
                                 (uint16_t)p[i].dst_stage, (uint16_t)p[i].dst_rank,
                                 (uint32_t)(i - first), (uint32_t)count,
                                 (uint32_t)p[i].layer_first, (uint32_t)p[i].num_layers,
                                 (uint32_t)p[i].head_first, (uint32_t)p[i].num_heads,
                                 0, (uint32_t)tokens, (uint32_t)w->cfg->head_dim,
                                 (hx_proto_dtype)dtype, bytes - HX_KV_SEGMENT_HEADER_BYTES,
                                 link ? NULL : w->pack + HX_KV_SEGMENT_HEADER_BYTES,
                                 link != NULL};
        /* over a link: packed on the GPU before the header says a payload follows */
        if (link)
            st = hx_backend_link_pack(w->eng, link, id, p[i].layer_first, p[i].num_layers,
                                      p[i].head_first, p[i].num_heads, m.data_bytes, err);
        if (st == HX_OK)
            st = hx_proto_send_kv_segment(c, id, &m, hx_proto_deadline_in(SEND_TIMEOUT_S), err);
        if (st == HX_OK && link)
            st = hx_backend_link_send(link, err);
        if (st != HX_OK) { /* the next request reconnects (and offers a link, later) */
            if (link)
                link_retry_after(w, wi, LINK_RETRY_S);
            hx_backend_link_close(link);
            w->kv_link[wi] = NULL;
            hx_proto_close(c);
            w->kv_out[wi] = NULL;
            break;
        }
        pthread_mutex_lock(&w->mu);
        w->kv_sent += m.data_bytes;
        pthread_mutex_unlock(&w->mu);
    }
    free(p);
    return st;
}

/* ---- applying decisions (every rank, in the leader's order) ---------------------- */

static hx_status apply_op(worker *w, uint64_t id, const hx_proto_group_op *op, hx_err *err)
{
    switch (op->op) {
    case HX_PROTO_OP_ADD: {
        /* a prefill group makes the first token only; the rest is the decode group's */
        hx_batch_request r = {id, (const int *)op->token_ids, (int)op->num_tokens,
                              op->hold_kv ? 1 : (int)op->max_tokens, op->eos_id,
                              op->temperature, op->top_p, op->seed, op->hold_kv ? 1 : 0};
        hx_status st = hx_backend_add(w->eng, &r, err);
        if (st != HX_OK)
            return st;
        req_info ri = {id, op->dst_group, (int)op->max_tokens, op->eos_id, 0,
                       hx_proto_now_ns()};
        return req_add(w, &ri, err);
    }
    case HX_PROTO_OP_ADD_PREFILLED: {
        int want = 0;
        hx_status st = kv_expected(w, op->src_group, &want, err);
        if (st != HX_OK)
            return st;
        /* the leader checked that every rank has them (CHECK_KV): take them off the shared
         * list, so that nothing frees them while the engine reads them */
        pthread_mutex_lock(&w->mu);
        int have = kv_wait(w, id, want, KV_CHECK_S);
        kv_in *mine = NULL;
        for (kv_in **pp = &w->kv; *pp;) {
            if ((*pp)->id == id) {
                kv_in *e = *pp;
                *pp = e->next;
                e->next = mine;
                mine = e;
            } else {
                pp = &(*pp)->next;
            }
        }
        pthread_mutex_unlock(&w->mu);
        hx_kv_segment *segs = malloc((size_t)(have ? have : 1) * sizeof *segs);
        int k = 0;
        for (kv_in *e = mine; segs && e; e = e->next)
            segs[k++] = e->seg;
        if (!segs)
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
        else if (have < want)
            st = hx_err_set(err, HX_ETIMEDOUT,
                            "request %llu: %d of %d KV segments arrived from group '%s'",
                            (unsigned long long)id, have, want,
                            w->plan->groups[op->src_group].id);
        else {
            hx_batch_request r = {id, NULL, (int)op->n_prompt, (int)op->max_tokens, op->eos_id,
                                  op->temperature, op->top_p, op->seed, 0};
            st = hx_backend_add_prefilled(w->eng, &r, op->first_token, segs, k, err);
        }
        free(segs);
        pthread_mutex_lock(&w->mu);
        while (mine) {
            kv_in *n = mine->next;
            kv_in_free(w, mine);
            mine = n;
        }
        pthread_mutex_unlock(&w->mu);
        if (st != HX_OK)
            return st;
        req_info ri = {id, -1, (int)op->max_tokens, op->eos_id, 1, hx_proto_now_ns()};
        return req_add(w, &ri, err);
    }
    case HX_PROTO_OP_REMOVE:
        req_drop(w, id);
        kv_forget(w, id);
        if (hx_backend_seq_tokens(w->eng, id) >= 0)
            return hx_backend_remove(w->eng, id, err);
        return HX_OK;
    default:
        return hx_err_set(err, HX_EINVAL, "unexpected group operation %d", (int)op->op);
    }
}

/* Sends op to every other rank of the group (leader). */
static hx_status broadcast(worker *w, uint64_t id, const hx_proto_group_op *op, hx_err *err)
{
    for (int j = 0; j < w->gsize; j++) {
        if (j == w->li)
            continue;
        hx_status st = hx_proto_send_group_op(w->peers[j], id, op, deadline_peer(w), err);
        if (st != HX_OK)
            return st;
    }
    return HX_OK;
}

/* One engine step on this rank, then what its events mean for this rank. */
static hx_status do_step(worker *w, hx_err *err)
{
    const hx_batch_event *ev;
    int n_ev = 0;
    w->step_since_ns = hx_proto_now_ns(); /* watched by step_watchdog */
    hx_status st = hx_backend_step(w->eng, &ev, &n_ev, err);
    w->step_since_ns = 0;
    if (st != HX_OK)
        return st;
    for (int i = 0; i < n_ev; i++) {
        req_info *r = req_find(w, ev[i].id);
        if (!r)
            continue;
        r->generated++;
        if (w->grp->role == HX_ROLE_PREFILL) {
            /* first token: KV on to the decode group, the token to the router */
            int cont = r->max_tokens > 1 && ev[i].token != r->eos && r->dst_group >= 0;
            int64_t ns = hx_proto_now_ns() - r->t0_ns;
            int n_prompt = hx_backend_seq_tokens(w->eng, ev[i].id);
            hx_err kerr = {0};
            uint64_t kv_bytes = 0;
            hx_status kst = cont ? kv_send(w, ev[i].id, r->dst_group, &kv_bytes, &kerr) : HX_OK;
            uint64_t id = ev[i].id;
            if (w->is_leader) {
                if (kst == HX_OK)
                    router_send_first(w, id, ev[i].token, n_prompt, ns, kv_bytes);
                else
                    router_send_error(w, id, kst, kerr.msg);
            } else if (kst != HX_OK) {
                HX_ERROR("worker %s: %s", w->me->device, kerr.msg);
            }
            req_drop(w, id);
            if ((st = hx_backend_remove(w->eng, id, err)) != HX_OK)
                return st;
            pthread_mutex_lock(&w->mu);
            w->done++;
            pthread_mutex_unlock(&w->mu);
            continue;
        }
        if (w->is_leader) {
            int stop_tok = ev[i].token == r->eos;
            if (!stop_tok)
                router_send_tokens(w, ev[i].id, ev[i].token, ev[i].index);
            if (ev[i].finished)
                router_send_done(w, ev[i].id,
                                 stop_tok ? HX_PROTO_FINISH_STOP : HX_PROTO_FINISH_LENGTH,
                                 r->generated, hx_proto_now_ns() - r->t0_ns);
            pthread_mutex_lock(&w->mu);
            w->tokens++;
            w->done += ev[i].finished != 0;
            pthread_mutex_unlock(&w->mu);
        }
        if (ev[i].finished)
            req_drop(w, ev[i].id);
    }
    return HX_OK;
}

/* ---- the leader's loop ----------------------------------------------------------- */

static void op_free(op_item *o)
{
    if (o) {
        free(o->tokens);
        free(o);
    }
}

/* Whether a waiting op can be applied now: 1 yes, 0 not yet, -1 never (err set). */
static int op_ready(worker *w, op_item *o, hx_err *err)
{
    const hx_proto_group_op *op = &o->op;
    int n_prompt = op->op == HX_PROTO_OP_ADD ? (int)op->num_tokens : (int)op->n_prompt;
    int max_new = op->hold_kv ? 1 : (int)op->max_tokens; /* as apply_op adds it */
    if (op->op == HX_PROTO_OP_ADD_PREFILLED) {
        if (o->kv_want < 0 && kv_expected(w, op->src_group, &o->kv_want, err) != HX_OK)
            return -1;
        pthread_mutex_lock(&w->mu);
        int have = kv_count(w, o->id);
        pthread_mutex_unlock(&w->mu);
        if (have < o->kv_want) {
            if ((hx_proto_now_ns() - o->t_ns) / 1e9 > KV_WAIT_S) {
                hx_err_set(err, HX_ETIMEDOUT,
                           "request %llu: %d of %d KV segments reached group '%s' in %.0f s",
                           (unsigned long long)o->id, have, o->kv_want, w->grp->id, KV_WAIT_S);
                return -1;
            }
            return 0;
        }
    }
    int64_t need = (int64_t)n_prompt + max_new - 1;
    if (need > w->max_seq_tokens || need > w->group_kv_tokens) {
        hx_err_set(err, HX_ERANGE,
                   "request %llu needs %lld positions of KV cache; group '%s' holds at most %d "
                   "per request and %d in all",
                   (unsigned long long)o->id, (long long)need, w->grp->id, w->max_seq_tokens,
                   w->group_kv_tokens);
        return -1;
    }
    /* every rank holds the same blocks for the same requests: room in the smallest cache */
    const int bt = hx_backend_block_tokens(w->eng);
    const int64_t used = hx_backend_max_tokens(w->eng) - hx_backend_free_tokens(w->eng);
    if (used + (need + bt - 1) / bt * bt > w->group_kv_tokens)
        return 0;
    return hx_backend_can_admit(w->eng, n_prompt, max_new) ? 1 : 0;
}

/* Removes request id on every rank (a no-op where it is unknown) and drops its KV segments. */
static hx_status remove_everywhere(worker *w, uint64_t id, hx_err *err)
{
    hx_proto_group_op rm = {.op = HX_PROTO_OP_REMOVE, .src_group = -1, .dst_group = -1};
    hx_status st = broadcast(w, id, &rm, err);
    if (st == HX_OK)
        st = apply_op(w, id, &rm, err);
    return st;
}

/*
 * ADD_PREFILLED in a group of several ranks: asks each rank whether the
 * request's segments reached it. 1: all have them; 0: one has not (err
 * says which); < 0: a group connection failed (the status).
 */
static int check_kv(worker *w, op_item *o, hx_err *err)
{
    hx_proto_group_op q = o->op;
    q.op = HX_PROTO_OP_CHECK_KV;
    q.num_tokens = 0;
    q.token_ids = NULL;
    hx_status st = broadcast(w, o->id, &q, err);
    if (st != HX_OK)
        return st;
    int all = 1;
    for (int j = 1; j < w->gsize; j++) {
        int flag = 0;
        st = hx_proto_recv_step_tokens(w->peers[j], &flag, 1,
                                       hx_proto_deadline_in(KV_CHECK_S + w->opt.peer_timeout_s),
                                       err);
        if (st != HX_OK)
            return st;
        if (!flag && all) {
            const hx_deploy_worker *d = &w->dep.workers[w->gfirst + j];
            hx_err_set(err, HX_ECONN,
                       "request %llu: its KV segments from group '%s' did not reach %s "
                       "(stage %d rank %d of group '%s')",
                       (unsigned long long)o->id, w->plan->groups[o->op.src_group].id,
                       d->device, d->stage, d->rank, w->grp->id);
            all = 0;
        }
    }
    return all;
}

static hx_status leader_loop(worker *w, hx_err *err)
{
    op_item *wait_tail = NULL;
    while (!*w->stop) {
        /* take what the router sent; sleep while there is nothing to step */
        pthread_mutex_lock(&w->mu);
        if (!w->q_head && !w->router_lost && hx_backend_seq_count(w->eng) == 0)
            wait_ms(w, w->wait_head ? 20 : 200);
        op_item *got = w->q_head;
        w->q_head = w->q_tail = NULL;
        int lost = w->router_lost;
        w->router_lost = 0;
        pthread_mutex_unlock(&w->mu);

        if (lost) { /* nobody waits for these any more */
            while (w->n_reqs > 0)
                if (remove_everywhere(w, w->reqs[w->n_reqs - 1].id, err) != HX_OK)
                    return err->code;
            while (w->wait_head) {
                op_item *o = w->wait_head;
                w->wait_head = o->next;
                if (remove_everywhere(w, o->id, err) != HX_OK) {
                    op_free(o);
                    return err->code;
                }
                op_free(o);
            }
            wait_tail = NULL;
        }

        while (got) {
            op_item *o = got;
            got = got->next;
            o->next = NULL;
            if (o->op.op == HX_PROTO_OP_REMOVE) {
                /* cancel: a waiting one just goes; a running one leaves every rank, and
                 * every rank forgets KV segments that came for it */
                for (op_item **pp = &w->wait_head; *pp; pp = &(*pp)->next)
                    if ((*pp)->id == o->id) {
                        op_item *dead = *pp;
                        *pp = dead->next;
                        op_free(dead);
                        break;
                    }
                wait_tail = NULL;
                for (op_item *t = w->wait_head; t; t = t->next)
                    wait_tail = t;
                hx_status st = remove_everywhere(w, o->id, err);
                op_free(o);
                if (st != HX_OK)
                    return st;
                continue;
            }
            if (wait_tail)
                wait_tail->next = o;
            else
                w->wait_head = o;
            wait_tail = o;
        }

        /* admit, oldest first, while there is room */
        while (w->wait_head) {
            op_item *o = w->wait_head;
            hx_err e = {0};
            int ready = op_ready(w, o, &e);
            if (ready == 0)
                break;
            w->wait_head = o->next;
            if (!w->wait_head)
                wait_tail = NULL;
            if (ready > 0 && o->op.op == HX_PROTO_OP_ADD_PREFILLED && w->gsize > 1) {
                int all = check_kv(w, o, &e);
                if (all < 0) {
                    *err = e;
                    op_free(o);
                    return (hx_status)all;
                }
                ready = all ? 1 : -1;
            }
            if (ready < 0) {
                router_send_error(w, o->id, e.code ? e.code : HX_EINVAL, e.msg);
                hx_status st = remove_everywhere(w, o->id, err);
                op_free(o);
                if (st != HX_OK)
                    return st;
                continue;
            }
            hx_status st = broadcast(w, o->id, &o->op, err);
            if (st != HX_OK) {
                op_free(o);
                return st;
            }
            st = apply_op(w, o->id, &o->op, &e);
            if (st != HX_OK) {
                /* ranks where it went in take it out again, so they all agree */
                router_send_error(w, o->id, st, e.msg);
                hx_status rst = remove_everywhere(w, o->id, err);
                if (rst != HX_OK) {
                    op_free(o);
                    return rst;
                }
            }
            op_free(o);
        }

        if (hx_backend_seq_count(w->eng) > 0) {
            hx_proto_group_op step = {.op = HX_PROTO_OP_STEP, .dst_group = -1, .src_group = -1};
            hx_status st = broadcast(w, 0, &step, err);
            if (st == HX_OK)
                st = do_step(w, err);
            if (st != HX_OK)
                return st;
        }
    }
    /* tell the ranks to go */
    hx_proto_group_op stop = {.op = HX_PROTO_OP_STOP, .dst_group = -1, .src_group = -1};
    hx_err ignore = {0};
    broadcast(w, 0, &stop, &ignore);
    return HX_OK;
}

/* ---- the other ranks' loop -------------------------------------------------------- */

static hx_status rank_loop(worker *w, hx_err *err)
{
    hx_proto_conn *leader = w->peers[0];
    while (!*w->stop) {
        if (hx_proto_buffered(leader) == 0) {
            struct pollfd p = {hx_proto_fd(leader), POLLIN, 0};
            int r = poll(&p, 1, 200);
            if (r == 0 || (r < 0 && errno == EINTR))
                continue;
        }
        hx_proto_frame f;
        hx_status st = hx_proto_recv(leader, &f, deadline_peer(w), err);
        if (st != HX_OK)
            return st;
        hx_proto_group_op op;
        if ((st = hx_proto_decode_group_op(&f, &op, err)) != HX_OK)
            return st;
        uint64_t id = f.req_id;
        if (op.op == HX_PROTO_OP_STOP)
            return HX_OK;
        if (op.op == HX_PROTO_OP_STEP) {
            if ((st = do_step(w, err)) != HX_OK)
                return st;
            continue;
        }
        if (op.op == HX_PROTO_OP_CHECK_KV) { /* answer whether this request's KV is here */
            int want = 0, flag = 0;
            if (kv_expected(w, op.src_group, &want, err) != HX_OK)
                return err->code;
            pthread_mutex_lock(&w->mu);
            flag = kv_wait(w, id, want, KV_CHECK_S) >= want;
            pthread_mutex_unlock(&w->mu);
            if ((st = hx_proto_send_step_tokens(leader, &flag, 1, deadline_peer(w), err)) != HX_OK)
                return st;
            continue;
        }
        /* the prompt lives in the connection's buffer until the next recv: add copies it.
         * A failure here the leader has too (the same engine state), or it removes the
         * request everywhere after its own failure; a missing KV segment after CHECK_KV
         * said it was here is a broken group. */
        hx_err e = {0};
        st = apply_op(w, id, &op, &e);
        if (st == HX_ETIMEDOUT || st == HX_ENOMEM) {
            *err = e;
            return st;
        }
        if (st != HX_OK)
            HX_WARN("worker %s: %s", w->me->device, e.msg);
    }
    return HX_OK;
}

/* ---- connections ------------------------------------------------------------------ */

static void hello_of(const worker *w, hx_proto_hello *h)
{
    memset(h, 0, sizeof *h);
    h->role = w->grp->role == HX_ROLE_PREFILL  ? HX_PROTO_ROLE_PREFILL
              : w->grp->role == HX_ROLE_DECODE ? HX_PROTO_ROLE_DECODE
                                               : HX_PROTO_ROLE_BOTH;
    h->stage = (uint16_t)w->me->stage;
    h->rank = (uint32_t)w->me->rank;
    snprintf(h->group_id, sizeof h->group_id, "%s", w->grp->id);
    snprintf(h->version, sizeof h->version, "%s", SOFTWARE_VERSION);
}

static void fill_health(worker *w, hx_proto_health *h)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_lock(&w->mu);
    h->uptime_ns = (uint64_t)(hx_proto_now_ns() - w->t_start_ns);
    h->requests_done = w->done;
    h->requests_failed = w->failed;
    h->tokens_generated = w->tokens;
    h->kv_bytes_sent = w->kv_sent;
    h->kv_bytes_received = w->kv_received;
    int q = 0;
    for (op_item *o = w->q_head; o; o = o->next)
        q++;
    h->requests_queued = (uint64_t)q;
    pthread_mutex_unlock(&w->mu);
    /* gauges of the engine thread, a step old at most */
    if (w->ready) {
        const int bt = hx_backend_block_tokens(w->eng);
        h->kv_blocks_total = (uint64_t)(hx_backend_max_tokens(w->eng) / bt);
        h->requests_active = (uint64_t)w->n_active;
    }
    if (w->set_up) { /* the group's smallest cache is known */
        const int kv = w->group_kv_tokens;
        h->max_request_tokens = (uint64_t)(w->max_seq_tokens < kv ? w->max_seq_tokens : kv);
    }
}

static int aux_add(worker *w, hx_proto_conn *c)
{
    for (int i = 0; i < MAX_AUX_CONNS; i++)
        if (!w->aux[i]) {
            w->aux[i] = c;
            return i;
        }
    return -1;
}

typedef struct conn_arg {
    worker *w;
    hx_proto_conn *c;
} conn_arg;

static void enqueue(worker *w, uint64_t id, const hx_proto_group_op *op)
{
    op_item *o = calloc(1, sizeof *o);
    int32_t *t = op->num_tokens ? malloc(op->num_tokens * sizeof *t) : NULL;
    if (!o || (op->num_tokens && !t)) {
        free(o);
        free(t);
        router_send_error(w, id, HX_ENOMEM, "out of memory");
        return;
    }
    if (t)
        memcpy(t, op->token_ids, op->num_tokens * sizeof *t);
    o->id = id;
    o->op = *op;
    o->op.token_ids = t;
    o->tokens = t;
    o->t_ns = hx_proto_now_ns();
    o->kv_want = -1;
    if (o->op.op == HX_PROTO_OP_ADD)
        o->op.hold_kv = w->grp->role == HX_ROLE_PREFILL;
    pthread_mutex_lock(&w->mu);
    if (w->q_tail)
        w->q_tail->next = o;
    else
        w->q_head = o;
    w->q_tail = o;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* The router's connection (leader): requests in, health answered. */
static void serve_router(worker *w, hx_proto_conn *c)
{
    pthread_mutex_lock(&w->router_send);
    if (w->router) {
        pthread_mutex_unlock(&w->router_send);
        HX_WARN("worker %s: a second router connection; refused",
                    w->me->device);
        return;
    }
    w->router = c;
    pthread_mutex_unlock(&w->router_send);
    HX_INFO("worker %s: router connected", w->me->device);
    int64_t last_ns = hx_proto_now_ns();
    while (!w->quitting) {
        hx_proto_frame f;
        hx_err err = {0};
        hx_status st = hx_proto_recv(c, &f, hx_proto_deadline_in(1.0), &err);
        if (st == HX_ETIMEDOUT && hx_proto_buffered(c) == 0) {
            /* the router asks for health every 2 s: silence means it is gone */
            if ((hx_proto_now_ns() - last_ns) / 1e9 > ROUTER_SILENCE_S) {
                HX_WARN("worker %s: nothing from the router for %.0f s", w->me->device,
                        ROUTER_SILENCE_S);
                break;
            }
            continue;
        }
        if (st != HX_OK)
            break;
        last_ns = hx_proto_now_ns();
        if (f.type == HX_PROTO_GROUP_OP) {
            hx_proto_group_op op;
            if (hx_proto_decode_group_op(&f, &op, &err) != HX_OK) {
                router_send_error(w, f.req_id, HX_EPARSE, err.msg);
                continue;
            }
            if (op.op == HX_PROTO_OP_ADD || op.op == HX_PROTO_OP_ADD_PREFILLED ||
                op.op == HX_PROTO_OP_REMOVE)
                enqueue(w, f.req_id, &op);
        } else if (f.type == HX_PROTO_HEALTH) {
            hx_proto_health h;
            fill_health(w, &h);
            /* never wait on the engine's sends here: a reply skipped is a reply late */
            if (pthread_mutex_trylock(&w->router_send) == 0) {
                hx_proto_send_health_ok(c, f.req_id, &h, hx_proto_deadline_in(5.0), &err);
                pthread_mutex_unlock(&w->router_send);
            }
        }
    }
    pthread_mutex_lock(&w->router_send);
    w->router = NULL;
    pthread_mutex_unlock(&w->router_send);
    HX_WARN("worker %s: the router went away; cancelling its requests",
                w->me->device);
    /* cancel everything the router had here: queued ops now, the rest in the engine thread */
    pthread_mutex_lock(&w->mu);
    for (op_item *o = w->q_head; o; o = o->next)
        o->op.op = HX_PROTO_OP_REMOVE;
    w->router_lost = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void *conn_main(void *arg)
{
    conn_arg a = *(conn_arg *)arg;
    free(arg);
    worker *w = a.w;
    hx_proto_conn *c = a.c;
    int keep = 0; /* 1: the connection became a group peer's (the engine owns it) */
    hx_proto_frame f;
    hx_err err = {0};
    hx_proto_hello h;
    if (hx_proto_recv(c, &f, hx_proto_deadline_in(10.0), &err) != HX_OK)
        goto out;
    if (f.type == HX_PROTO_HEALTH) { /* a probe (launcher, status) */
        hx_proto_health hh;
        fill_health(w, &hh);
        hx_proto_send_health_ok(c, f.req_id, &hh, hx_proto_deadline_in(5.0), &err);
        goto out;
    }
    if (hx_proto_decode_hello(&f, &h, &err) != HX_OK)
        goto out;
    if (strcmp(h.group_id, w->grp->id) == 0 && h.role != HX_PROTO_ROLE_ROUTER) {
        int j = hx_deploy_worker_at(&w->dep, w->me->group, h.stage, (int)h.rank);
        hx_proto_hello mine;
        hello_of(w, &mine);
        if (j < 0 || j - w->gfirst <= w->li ||
            hx_proto_send_hello(c, &mine, hx_proto_deadline_in(10.0), &err) != HX_OK)
            goto out;
        pthread_mutex_lock(&w->mu);
        if (!w->peers[j - w->gfirst]) {
            w->peers[j - w->gfirst] = c;
            w->n_peers++;
            keep = 1;
        }
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        goto out;
    }
    if (h.role == HX_PROTO_ROLE_ROUTER) {
        if (!w->is_leader)
            goto out;
        /* answer once the engine is loaded and the group connected */
        pthread_mutex_lock(&w->mu);
        while ((w->n_peers < w->gsize - 1 || !w->ready) && !w->quitting) {
            wait_ms(w, 100);
        }
        pthread_mutex_unlock(&w->mu);
        if (w->quitting)
            goto out;
        hx_proto_hello mine;
        hello_of(w, &mine);
        if (hx_proto_send_hello(c, &mine, hx_proto_deadline_in(10.0), &err) != HX_OK)
            goto out;
        serve_router(w, c);
        goto out;
    }
    /* a prefill rank of another group: KV segments (inline, or over an NCCL link) */
    hx_backend_link *link = NULL;
    while (!w->quitting) {
        hx_status st = hx_proto_recv(c, &f, hx_proto_deadline_in(1.0), &err);
        if (st == HX_ETIMEDOUT && hx_proto_buffered(c) == 0)
            continue;
        if (st != HX_OK)
            break;
        if (f.type == HX_PROTO_GROUP_SETUP && !link) { /* the prefill rank offers a link */
            hx_proto_group_setup offer;
            if (hx_proto_decode_group_setup(&f, &offer, &err) != HX_OK ||
                offer.phase != HX_PROTO_SETUP_OFFER ||
                kv_link_accept(w, c, &offer, &link, &err) != HX_OK) {
                HX_WARN("worker %s: KV link from %s: %s", w->me->device, hx_proto_peer(c),
                        err.msg[0] ? err.msg : "not an OFFER");
                break;
            }
            continue;
        }
        if (f.type != HX_PROTO_KV_SEGMENT)
            continue;
        hx_proto_kv_segment m;
        memset(&m, 0, sizeof m);
        hx_status mst = hx_proto_decode_kv_segment(&f, &m, &err);
        if (mst == HX_OK && hx_kv_dtype_bytes((int)m.dtype) == 0)
            mst = hx_err_set(&err, HX_EPARSE, "dtype %d: only f32 and bf16 KV are taken",
                             (int)m.dtype);
        if (mst != HX_OK) {
            HX_WARN("worker %s: bad KV segment: %s", w->me->device, err.msg);
            if (link || m.remote)
                break; /* a payload may follow over the link: out of step now */
            continue;
        }
        if (!m.remote) {
            kv_store(w, f.req_id, &m, NULL);
            continue;
        }
        void *dev = NULL;
        if (!link || hx_backend_link_recv(w->eng, link, (size_t)m.data_bytes, &dev, &err) != HX_OK) {
            HX_WARN("worker %s: KV over NCCL from %s: %s", w->me->device, hx_proto_peer(c),
                    link ? err.msg : "no link was agreed");
            break; /* the link is aborted: the prefill side reconnects */
        }
        kv_store(w, f.req_id, &m, dev);
    }
    hx_backend_link_close(link);
out:
    pthread_mutex_lock(&w->mu);
    if (!keep) {
        for (int i = 0; i < MAX_AUX_CONNS; i++)
            if (w->aux[i] == c)
                w->aux[i] = NULL;
        hx_proto_close(c);
    } else {
        for (int i = 0; i < MAX_AUX_CONNS; i++)
            if (w->aux[i] == c)
                w->aux[i] = NULL;
    }
    w->n_aux_threads--;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/*
 * A GPU step that outlives every bound inside it (a kernel or an NCCL
 * operation that no abort stops: a dead peer on some transports, a wedged
 * device) would hold the group's requests for ever: past 1.5 times the peer
 * timeout (at least 10 s more), the worker exits, which stops the device's
 * work with it; the router then fails the group's requests ("group ... was
 * lost") and the other ranks fail their next step. A CPU step is left
 * alone: it cannot hang on a peer without its comm's timeout.
 */
static void step_watchdog(worker *w)
{
    const int64_t since = w->step_since_ns;
    if (!since || !w->ready || hx_backend_kind_of(w->eng) != HX_BACKEND_CUDA)
        return;
    const double extra = w->opt.peer_timeout_s / 2 > 10 ? w->opt.peer_timeout_s / 2 : 10;
    const double s = (double)(hx_proto_now_ns() - since) / 1e9;
    if (s > w->opt.peer_timeout_s + extra) {
        HX_ERROR("worker %s: a step has not ended after %.0f s (the GPU or an NCCL peer hangs): "
                 "exiting, so that its requests fail instead of waiting for ever",
                 w->me->device, s);
        _exit(1);
    }
}

static void *accept_main(void *arg)
{
    worker *w = arg;
    while (!w->quitting) {
        step_watchdog(w);
        hx_proto_conn *c = NULL;
        hx_err err = {0};
        struct pollfd pl = {hx_proto_listener_fd(w->lis), POLLIN, 0};
        if (poll(&pl, 1, 300) <= 0)
            continue;
        hx_status st = hx_proto_accept(w->lis, w->opt.secret,
                                       hx_proto_deadline_in(HX_PROTO_HANDSHAKE_TIMEOUT_S), &c,
                                       &err);
        if (st == HX_ETIMEDOUT)
            continue;
        if (st != HX_OK) {
            HX_WARN("worker %s: %s", w->me->device, err.msg);
            continue;
        }
        conn_arg *a = malloc(sizeof *a);
        pthread_t t;
        pthread_mutex_lock(&w->mu);
        int slot = aux_add(w, c);
        if (!a || slot < 0) {
            pthread_mutex_unlock(&w->mu);
            free(a);
            hx_proto_close(c);
            continue;
        }
        a->w = w;
        a->c = c;
        w->n_aux_threads++;
        if (pthread_create(&t, NULL, conn_main, a) != 0) {
            w->aux[slot] = NULL;
            w->n_aux_threads--;
            pthread_mutex_unlock(&w->mu);
            free(a);
            hx_proto_close(c);
            continue;
        }
        pthread_detach(t);
        pthread_mutex_unlock(&w->mu);
    }
    return NULL;
}

/* Connects to the group peers before me (they accept the ones after them). */
static hx_status connect_peers(worker *w, hx_err *err)
{
    int64_t deadline = deadline_peer(w);
    for (int j = 0; j < w->li; j++) {
        const hx_deploy_worker *d = &w->dep.workers[w->gfirst + j];
        hx_proto_conn *c = NULL;
        hx_status st;
        for (;;) {
            st = hx_proto_connect(d->address, d->port, w->opt.secret, "worker",
                                  hx_proto_deadline_in(5.0), &c, err);
            if ((st != HX_ECONN && st != HX_ETIMEDOUT) || hx_proto_now_ns() > deadline ||
                *w->stop)
                break;
            sleep_ms(100);
        }
        if (st != HX_OK)
            return st;
        hx_proto_hello h;
        hello_of(w, &h);
        hx_proto_frame f;
        hx_proto_hello back;
        st = hx_proto_send_hello(c, &h, deadline, err);
        if (st == HX_OK)
            st = hx_proto_recv(c, &f, deadline, err);
        if (st == HX_OK)
            st = hx_proto_decode_hello(&f, &back, err);
        if (st == HX_OK && (strcmp(back.group_id, w->grp->id) != 0 || back.stage != d->stage ||
                            (int)back.rank != d->rank))
            st = hx_err_set(err, HX_EINVAL,
                            "worker at %s:%d is '%s' stage %u rank %u, expected '%s' stage %d "
                            "rank %d (a stale process of another deployment?)",
                            d->address, d->port, back.group_id, back.stage, back.rank,
                            w->grp->id, d->stage, d->rank);
        if (st != HX_OK) {
            hx_proto_close(c);
            return st;
        }
        pthread_mutex_lock(&w->mu);
        w->peers[j] = c;
        w->n_peers++;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    /* and wait for the ones after me */
    pthread_mutex_lock(&w->mu);
    while (w->n_peers < w->gsize - 1 && hx_proto_now_ns() < deadline && !*w->stop) {
        pthread_mutex_unlock(&w->mu);
        sleep_ms(50);
        pthread_mutex_lock(&w->mu);
    }
    int have = w->n_peers;
    pthread_mutex_unlock(&w->mu);
    if (have == w->gsize - 1 || *w->stop) /* a stop while waiting is a clean stop */
        return HX_OK;
    return hx_err_set(err, HX_ETIMEDOUT, "worker %s: group '%s': %d of %d peers connected in %.0f s",
                      w->me->device, w->grp->id, have, w->gsize - 1, w->opt.peer_timeout_s);
}

/* ---- group setup: one kind of engine per group, and each TP stage's transport ------- */

static const char *device_of(const worker *w, int li)
{
    return w->dep.workers[w->gfirst + li].device;
}

/*
 * The leader's checks of the offers (offers[li], by local index): every
 * engine of a group must be of one kind with one step size, or their
 * lockstep schedules would differ.
 */
static hx_status check_offers(worker *w, const hx_proto_group_setup *offers, hx_err *err)
{
    const hx_proto_group_setup *a = &offers[0];
    for (int j = 1; j < w->gsize; j++) {
        const hx_proto_group_setup *b = &offers[j];
        if (b->backend != a->backend || b->step_rows != a->step_rows ||
            b->max_seqs != a->max_seqs || b->block_tokens != a->block_tokens)
            return hx_err_set(err, HX_EINVAL,
                              "group '%s' mixes engines: %s runs %s with %u rows per step, %u "
                              "requests, KV blocks of %u; %s runs %s with %u, %u, %u (give every "
                              "worker of a group the same --backend, --max-seqs and "
                              "--block-tokens; a group spanning hosts with and without GPUs "
                              "needs --backend cpu)",
                              w->grp->id, device_of(w, 0),
                              hx_backend_name((hx_backend_kind)a->backend), a->step_rows,
                              a->max_seqs, a->block_tokens, device_of(w, j),
                              hx_backend_name((hx_backend_kind)b->backend), b->step_rows,
                              b->max_seqs, b->block_tokens);
    }
    /* the leader admits no more than the smallest cache of the group holds */
    w->group_kv_tokens = (int)a->kv_tokens;
    for (int j = 1; j < w->gsize; j++)
        if ((int)offers[j].kv_tokens < w->group_kv_tokens)
            w->group_kv_tokens = (int)offers[j].kv_tokens;
    return HX_OK;
}

/*
 * Whether stage s may sum over NCCL: more than one rank, every one able, on
 * distinct GPUs (NCCL refuses two ranks on one), and the leader's
 * --tp-transport allowing it. *why (for a forced nccl) says what stops it.
 */
static int stage_nccl(worker *w, const hx_proto_group_setup *offers, int s, const char **why)
{
    *why = NULL;
    const hx_plan_stage *ps = &w->grp->stages[s];
    if (ps->ndevices < 2 || w->opt.tp_transport == HX_TRANSPORT_TCP)
        return 0;
    for (int r = 0; r < ps->ndevices; r++) {
        int j = hx_deploy_worker_at(&w->dep, w->me->group, s, r) - w->gfirst;
        if (!offers[j].nccl) {
            *why = "a rank's engine cannot use NCCL (cpu backend, or a build without NCCL)";
            return 0;
        }
        for (int q = 0; q < r; q++) {
            int i = hx_deploy_worker_at(&w->dep, w->me->group, s, q) - w->gfirst;
            if (strcmp(offers[i].device_uuid, offers[j].device_uuid) == 0 &&
                offers[i].nccl_host == offers[j].nccl_host) {
                *why = "two ranks share one GPU";
                return 0;
            }
        }
    }
    return 1;
}

/* The leader: collects the offers, decides, and tells every rank its stage's plan. */
/* The leader tells every other rank of the group why the group cannot run (best effort). */
static void setup_fail_all(worker *w, hx_status st, const hx_err *err)
{
    for (int j = 1; j < w->gsize; j++) {
        hx_err ignored = {0};
        hx_proto_send_error(w->peers[j], 0, st, err->msg, hx_proto_deadline_in(5.0), &ignored);
    }
}

/* The leader sends every other rank `phase` with nccl = stage_plan[that rank's stage]. */
static hx_status setup_send_plan(worker *w, uint32_t phase, const int *stage_plan, hx_err *err)
{
    hx_status st = HX_OK;
    for (int j = 1; j < w->gsize && st == HX_OK; j++) {
        hx_proto_group_setup m = {.phase = phase,
                                  .nccl = (uint32_t)stage_plan[w->dep.workers[w->gfirst + j].stage]};
        st = hx_proto_send_group_setup(w->peers[j], &m, deadline_peer(w), err);
    }
    return st;
}

static hx_status setup_plan(worker *w, const hx_proto_group_setup *mine, int *stage_plan,
                            hx_err *err)
{
    hx_proto_group_setup *offers = calloc((size_t)w->gsize, sizeof *offers);
    if (!offers)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    offers[0] = *mine;
    hx_status st = HX_OK;
    for (int j = 1; j < w->gsize && st == HX_OK; j++)
        st = hx_proto_recv_group_setup(w->peers[j], HX_PROTO_SETUP_OFFER, &offers[j],
                                       deadline_peer(w), err);
    if (st == HX_OK)
        st = check_offers(w, offers, err);
    for (int s = 0; s < w->grp->nstages && st == HX_OK; s++) {
        const char *why = NULL;
        stage_plan[s] = stage_nccl(w, offers, s, &why);
        if (!stage_plan[s] && w->opt.tp_transport == HX_TRANSPORT_NCCL &&
            w->grp->stages[s].ndevices > 1)
            st = hx_err_set(err, HX_ENOTSUP,
                            "group '%s' stage %d cannot sum over NCCL (--tp-transport nccl): %s",
                            w->grp->id, s, why);
    }
    free(offers);
    if (st != HX_OK) { /* every rank learns why the group cannot run */
        setup_fail_all(w, st, err);
        return st;
    }
    return setup_send_plan(w, HX_PROTO_SETUP_PLAN, stage_plan, err);
}

/* A stage planned for NCCL: rank 0 makes the id and hands it on; every rank joins. */
static int setup_join(worker *w)
{
    const int s = w->me->stage;
    hx_proto_group_setup m = {.phase = HX_PROTO_SETUP_NCCL_ID};
    hx_err e = {0};
    hx_status st = HX_OK;
    if (w->me->rank == 0) {
        m.nccl = hx_backend_nccl_unique_id(m.nccl_id, &e) == HX_OK;
        if (!m.nccl)
            HX_WARN("worker %s: no NCCL id: %s", w->me->device, e.msg);
        for (int r = 1; r < w->me->tp && st == HX_OK; r++)
            st = hx_proto_send_group_setup(peer_at(w, s, r), &m, deadline_peer(w), &e);
    } else {
        st = hx_proto_recv_group_setup(peer_at(w, s, 0), HX_PROTO_SETUP_NCCL_ID, &m,
                                       deadline_peer(w), &e);
    }
    if (st != HX_OK || !m.nccl) {
        if (st != HX_OK)
            HX_WARN("worker %s: NCCL id: %s", w->me->device, e.msg);
        return 0;
    }
    if (hx_backend_nccl_join(w->eng, m.nccl_id, NCCL_JOIN_S, w->opt.peer_timeout_s, &e) !=
        HX_OK) {
        HX_WARN("worker %s: group '%s' stage %d: NCCL: %s", w->me->device, w->grp->id, s, e.msg);
        return 0;
    }
    return 1;
}

/*
 * Runs GROUP_SETUP (proto.h) once the group is connected: the leader checks
 * that the group's engines agree and picks each TP stage's transport; the
 * stages planned for NCCL try to join, and keep it only if all their ranks
 * did (otherwise they sum over TCP through host buffers).
 */
static hx_status group_setup(worker *w, hx_err *err)
{
    if (w->gsize == 1)
        return HX_OK;
    hx_proto_group_setup mine;
    hx_status st = offer_of(w, hx_backend_nccl_capable(w->eng), &mine, err);
    if (st != HX_OK)
        return st;
    int *plan = calloc((size_t)w->grp->nstages, sizeof *plan);
    int *joined = calloc((size_t)w->gsize, sizeof *joined);
    if (!plan || !joined) {
        free(plan);
        free(joined);
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    }
    int my_plan = 0, final = 0;
    if (w->is_leader) {
        st = setup_plan(w, &mine, plan, err);
        my_plan = st == HX_OK && plan[w->me->stage];
    } else {
        hx_proto_group_setup m;
        memset(&m, 0, sizeof m);
        st = hx_proto_send_group_setup(w->peers[0], &mine, deadline_peer(w), err);
        if (st == HX_OK)
            st = hx_proto_recv_group_setup(w->peers[0], HX_PROTO_SETUP_PLAN, &m,
                                           deadline_peer(w), err);
        my_plan = st == HX_OK && m.nccl;
    }
    const int me_joined = st == HX_OK && my_plan ? setup_join(w) : 0;
    /* the slowest stage may take the whole join time before anyone reports */
    const int64_t join_deadline = hx_proto_deadline_in(NCCL_JOIN_S + w->opt.peer_timeout_s);
    if (st == HX_OK && w->is_leader) {
        /* a stage keeps NCCL only if every rank of it joined */
        joined[0] = me_joined;
        for (int j = 1; j < w->gsize && st == HX_OK; j++) {
            hx_proto_group_setup m;
            st = hx_proto_recv_group_setup(w->peers[j], HX_PROTO_SETUP_JOINED, &m,
                                           join_deadline, err);
            joined[j] = st == HX_OK && m.nccl;
        }
        int lost = -1; /* a stage planned for NCCL that a rank failed to join */
        for (int j = 0; j < w->gsize && st == HX_OK; j++) {
            const int s = w->dep.workers[w->gfirst + j].stage;
            if (!joined[j] && plan[s]) {
                plan[s] = 0;
                lost = s;
            }
        }
        if (st == HX_OK && lost >= 0 && w->opt.tp_transport == HX_TRANSPORT_NCCL) {
            st = hx_err_set(err, HX_ECONN,
                            "group '%s' stage %d: a rank failed to join NCCL "
                            "(--tp-transport nccl; its log says why)",
                            w->grp->id, lost);
            setup_fail_all(w, st, err);
        }
        if (st == HX_OK)
            st = setup_send_plan(w, HX_PROTO_SETUP_FINAL, plan, err);
        final = plan[w->me->stage];
    } else if (st == HX_OK) {
        hx_proto_group_setup m = {.phase = HX_PROTO_SETUP_JOINED, .nccl = (uint32_t)me_joined};
        st = hx_proto_send_group_setup(w->peers[0], &m, deadline_peer(w), err);
        if (st == HX_OK)
            st = hx_proto_recv_group_setup(w->peers[0], HX_PROTO_SETUP_FINAL, &m,
                                           join_deadline, err);
        final = st == HX_OK && m.nccl;
    }
    if (me_joined && !final)
        hx_backend_nccl_leave(w->eng);
    if (st == HX_OK && w->me->tp > 1)
        HX_INFO("worker %s: group '%s' stage %d sums its TP partial results over %s",
                w->me->device, w->grp->id, w->me->stage,
                final ? "NCCL" : "TCP (through the stage's rank 0)");
    free(plan);
    free(joined);
    return st;
}

/* Threads for this worker's model: the host's cores shared by its workers. */
static int pick_threads(const worker *w)
{
    if (w->opt.threads > 0)
        return w->opt.threads;
    int on_host = 0;
    for (int i = 0; i < w->dep.nworkers; i++)
        on_host += w->dep.workers[i].host == w->me->host;
    int t = hx_cpu_default_threads() / (on_host ? on_host : 1);
    return t < 1 ? 1 : t;
}

hx_status hx_worker_run(const hx_worker_options *opt, volatile sig_atomic_t *stop, hx_err *err)
{
    worker W;
    worker *w = &W;
    memset(w, 0, sizeof *w);
    w->opt = *opt;
    w->stop = stop;
    w->t_start_ns = hx_proto_now_ns();
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    pthread_mutex_init(&w->router_send, NULL);
    hx_bufpool_init(&w->kv_bufs, KV_BUF_BYTES, kv_buf_alloc, kv_buf_free, w);
    hx_status st;
    if ((st = hx_plan_load_err(opt->plan_path, &w->plan, err)) != HX_OK)
        goto out;
    if ((st = hx_deploy_init(&w->dep, w->plan, err)) != HX_OK)
        goto out;
    int self = hx_deploy_find_device(&w->dep, opt->device);
    if (self < 0) {
        st = hx_err_set(err, HX_EINVAL, "device '%s' is in no group of plan '%s'", opt->device,
                        opt->plan_path);
        goto out;
    }
    w->me = &w->dep.workers[self];
    w->grp = &w->plan->groups[w->me->group];
    w->gfirst = w->dep.group_first[w->me->group];
    w->gsize = hx_deploy_group_size(&w->dep, w->me->group);
    w->li = self - w->gfirst;
    w->last_stage = w->grp->nstages - 1;
    w->is_leader = w->li == 0;
    w->peers = calloc((size_t)w->gsize, sizeof *w->peers);
    w->kv_out = calloc((size_t)w->dep.nworkers, sizeof *w->kv_out);
    w->kv_link = calloc((size_t)w->dep.nworkers, sizeof *w->kv_link);
    w->link_try = calloc((size_t)w->dep.nworkers, sizeof *w->link_try);
    if (!w->peers || !w->kv_out || !w->kv_link || !w->link_try) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }

    /* listen first, so peers that start sooner find us while the model loads */
    const char *bind = opt->bind_address ? opt->bind_address : w->me->address;
    if ((st = hx_proto_listen(bind, w->me->port, &w->lis, err)) != HX_OK)
        goto out;
    if (pthread_create(&w->accept_thread, NULL, accept_main, w) != 0) {
        st = hx_err_set(err, HX_ENOMEM, "cannot start a thread");
        goto out;
    }
    w->accept_started = 1;

    const hx_plan_stage *ps = &w->grp->stages[w->me->stage];
    hx_backend_options bo = {opt->backend,
                             opt->model_dir,
                             ps->first_layer,
                             ps->num_layers,
                             w->me->rank,
                             w->me->tp,
                             w->me->device_index,
                             pick_threads(w),
                             opt->max_seqs > 0 ? opt->max_seqs : 32,
                             opt->block_tokens > 0 ? opt->block_tokens : 16,
                             0,
                             0};
    for (int i = 0; i < w->grp->nmemory; i++) /* the plan's KV budget for this device */
        if (strcmp(w->grp->memory[i].device, w->me->device) == 0 &&
            w->grp->memory[i].kv_bytes > 0)
            bo.kv_budget_bytes = w->grp->memory[i].kv_bytes;
    hx_batch_comm comm = {w, comm_allreduce, comm_recv_rows, comm_send_rows, comm_tokens};
    if ((st = hx_backend_open(&bo, &comm, &w->eng, err)) != HX_OK)
        goto out;
    w->cfg = hx_backend_config(w->eng);
    w->max_seq_tokens = hx_backend_max_seq_tokens(w->eng);
    w->group_kv_tokens = hx_backend_max_tokens(w->eng); /* GROUP_SETUP lowers it */
    if (w->plan->model_num_layers > 0 && w->plan->model_num_layers != w->cfg->num_layers) {
        st = hx_err_set(err, HX_EINVAL, "plan '%s' is for a model of %d layers; '%s' has %d",
                        opt->plan_path, w->plan->model_num_layers, opt->model_dir,
                        w->cfg->num_layers);
        goto out;
    }
    w->ready = 1;
    if ((st = connect_peers(w, err)) != HX_OK || *w->stop)
        goto out;
    if ((st = group_setup(w, err)) != HX_OK)
        goto out;
    w->set_up = 1;
    HX_INFO("worker %s: group '%s' (%s) stage %d rank %d of %d: layers %d-%d on %s, "
                "listening on %s:%d, ready",
                w->me->device, w->grp->id, hx_role_name(w->grp->role), w->me->stage,
                w->me->rank, w->me->tp, ps->first_layer, ps->first_layer + ps->num_layers - 1,
                hx_backend_name(hx_backend_kind_of(w->eng)), bind, w->me->port);
    st = w->is_leader ? leader_loop(w, err) : rank_loop(w, err);
    if (st != HX_OK && w->is_leader) {
        /* fail what this group held, so the router answers those clients */
        for (int i = 0; i < w->n_reqs; i++)
            router_send_error(w, w->reqs[i].id, st, err->msg);
        for (op_item *o = w->wait_head; o; o = o->next)
            router_send_error(w, o->id, st, err->msg);
    }

out:
    w->quitting = 1;
    if (w->accept_started)
        pthread_join(w->accept_thread, NULL);
    /* unblock and wait for connection threads */
    pthread_mutex_lock(&w->mu);
    for (int i = 0; i < MAX_AUX_CONNS; i++)
        if (w->aux[i])
            shutdown(hx_proto_fd(w->aux[i]), SHUT_RDWR);
    pthread_cond_broadcast(&w->cv);
    while (w->n_aux_threads > 0) {
        pthread_mutex_unlock(&w->mu);
        sleep_ms(10);
        pthread_mutex_lock(&w->mu);
        for (int i = 0; i < MAX_AUX_CONNS; i++)
            if (w->aux[i])
                shutdown(hx_proto_fd(w->aux[i]), SHUT_RDWR);
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    if (w->peers)
        for (int j = 0; j < w->gsize; j++)
            hx_proto_close(w->peers[j]);
    if (w->kv_link)
        for (int j = 0; j < w->dep.nworkers; j++)
            hx_backend_link_close(w->kv_link[j]);
    if (w->kv_out)
        for (int j = 0; j < w->dep.nworkers; j++)
            hx_proto_close(w->kv_out[j]);
    free(w->peers);
    free(w->kv_out);
    free(w->kv_link);
    free(w->link_try);
    for (op_item *o = w->q_head; o;) {
        op_item *n = o->next;
        op_free(o);
        o = n;
    }
    for (op_item *o = w->wait_head; o;) {
        op_item *n = o->next;
        op_free(o);
        o = n;
    }
    for (kv_in *k = w->kv; k;) {
        kv_in *n = k->next;
        kv_in_free(w, k);
        k = n;
    }
    hx_bufpool_release(&w->kv_bufs);
    hx_backend_host_free(w->pack);
    hx_backend_close(w->eng);
    hx_proto_listener_free(w->lis);
    hx_deploy_release(&w->dep);
    hx_plan_free(w->plan);
    free(w->reqs);
    free(w->red);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->router_send);
    return st;
}
