/*
 * sim.c - discrete-event simulation of a plan (see sim.h).
 */
#include "sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "planner/cost.h"
#include "topo/graph.h"
#include "topo/inventory.h"

#define DEFAULT_REQUESTS 2000
#define MAX_REQUESTS 50000000L

/* ------------------------------------------------------------------------- */
/* Small containers                                                           */

/* A growable FIFO of ints. */
typedef struct ififo {
    int *v;
    size_t head, tail, cap; /* items are v[head .. tail) modulo cap; tail - head = count */
} ififo;

static size_t fifo_len(const ififo *q)
{
    return q->tail - q->head;
}

static int fifo_push(ififo *q, int x)
{
    if (q->tail - q->head == q->cap) {
        size_t ncap = q->cap ? q->cap * 2 : 64;
        int *n = malloc(ncap * sizeof *n);
        if (!n)
            return -1;
        for (size_t i = 0; i < q->cap; i++)
            n[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = n;
        q->tail = q->tail - q->head;
        q->head = 0;
        q->cap = ncap;
    }
    q->v[q->tail++ % q->cap] = x;
    return 0;
}

static int fifo_peek(const ififo *q)
{
    return q->v[q->head % q->cap];
}

static int fifo_pop(ififo *q)
{
    return q->v[q->head++ % q->cap];
}

/* A min-heap of (key, id). */
typedef struct kheap {
    double *key;
    int *id;
    size_t n, cap;
} kheap;

static int heap_push(kheap *h, double key, int id)
{
    if (h->n == h->cap) {
        size_t ncap = h->cap ? h->cap * 2 : 64;
        double *k = realloc(h->key, ncap * sizeof *k);
        if (!k)
            return -1;
        h->key = k;
        int *i = realloc(h->id, ncap * sizeof *i);
        if (!i)
            return -1;
        h->id = i;
        h->cap = ncap;
    }
    size_t at = h->n++;
    while (at > 0) {
        size_t up = (at - 1) / 2;
        if (h->key[up] <= key)
            break;
        h->key[at] = h->key[up];
        h->id[at] = h->id[up];
        at = up;
    }
    h->key[at] = key;
    h->id[at] = id;
    return 0;
}

static void heap_pop(kheap *h)
{
    double key = h->key[--h->n];
    int id = h->id[h->n];
    size_t at = 0;
    for (;;) {
        size_t c = 2 * at + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && h->key[c + 1] < h->key[c])
            c++;
        if (h->key[c] >= key)
            break;
        h->key[at] = h->key[c];
        h->id[at] = h->id[c];
        at = c;
    }
    if (h->n > 0) {
        h->key[at] = key;
        h->id[at] = id;
    }
}

static void heap_free(kheap *h)
{
    free(h->key);
    free(h->id);
    memset(h, 0, sizeof *h);
}

/* ------------------------------------------------------------------------- */
/* Model of the deployment                                                    */

typedef struct sgroup {
    int plan_index;
    int role;
    hx_group_model gm;
    double kv_capacity_tokens;
    double weight;          /* planned requests/s through the group (routing share) */
    int *links;             /* owned: link indices of a prefill group's routes */
    int nlinks;
} sgroup;

typedef struct slink {
    int p, d;               /* sim group indices */
    double bytes_per_s;
    double weight;          /* planned route rate */
} slink;

struct hx_sim {
    const hx_plan *plan;
    hx_model model;
    hx_inventory *inv;
    hx_graph *graph;
    hx_cost_params params;
    hx_cost_ctx cost;
    sgroup *groups;
    int ngroups;
    slink *links;
    int nlinks;
    double kv_bytes_per_token;
    int max_prefill_batch;
};

hx_status hx_len_dist_parse(const char *s, hx_len_dist *out)
{
    static const char *const names[] = {"fixed", "exponential", "uniform", "lognormal"};
    for (int i = 0; i < 4; i++)
        if (!strcasecmp(s, names[i])) {
            *out = (hx_len_dist)i;
            return HX_OK;
        }
    return HX_EINVAL;
}

const char *hx_len_dist_name(hx_len_dist d)
{
    static const char *const names[] = {"fixed", "exponential", "uniform", "lognormal"};
    return (int)d >= 0 && d <= HX_LEN_LOGNORMAL ? names[d] : "?";
}

void hx_sim_opts_from_plan(hx_sim_opts *o, const hx_plan *plan)
{
    memset(o, 0, sizeof *o);
    o->rate_rps = plan->rate_rps > 0 ? plan->rate_rps
                                     : (plan->throughput_rps > 0 ? plan->throughput_rps * 0.8 : 1);
    o->input_tokens = plan->input_tokens > 0 ? plan->input_tokens : 512;
    o->output_tokens = plan->output_tokens > 0 ? plan->output_tokens : 128;
    o->lengths = HX_LEN_FIXED;
    /* five minutes of traffic, so that ramp-up and drain are small beside steady state */
    double n = o->rate_rps * 300;
    o->requests = n < DEFAULT_REQUESTS ? DEFAULT_REQUESTS : n > 1e6 ? 1000000 : (long)n;
    o->seed = 1;
    o->slo_ttft_s = plan->slo_ttft_s > 0 ? plan->slo_ttft_s : 2.0;
    o->slo_tpot_s = plan->slo_tpot_s > 0 ? plan->slo_tpot_s : 0.1;
}

/* "host:index" -> device id of the inventory, or -1. */
static int device_id(const hx_inventory *inv, const char *name)
{
    const char *colon = strrchr(name, ':');
    if (!colon)
        return -1;
    char host[256];
    size_t hl = (size_t)(colon - name);
    if (hl >= sizeof host)
        return -1;
    memcpy(host, name, hl);
    host[hl] = '\0';
    int h = hx_inventory_find_host(inv, host);
    char *end;
    long idx = strtol(colon + 1, &end, 10);
    if (h < 0 || *end || idx < 0 || idx >= inv->hosts[h].gpu_count)
        return -1;
    return inv->hosts[h].first_device + (int)idx;
}

void hx_sim_free(hx_sim *sim)
{
    if (!sim)
        return;
    for (int i = 0; i < sim->ngroups; i++)
        free(sim->groups[i].links);
    free(sim->groups);
    free(sim->links);
    hx_graph_free(sim->graph);
    hx_inventory_free(sim->inv);
    hx_cost_params_release(&sim->params);
    free(sim);
}

hx_status hx_sim_new(const hx_plan *plan, const hx_model *model, hx_sim **out, hx_err *err)
{
    hx_status st = HX_OK;
    hx_sim *sim = calloc(1, sizeof *sim);
    if (!sim)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    sim->plan = plan;
    hx_cost_params_default(&sim->params);
    sim->max_prefill_batch = sim->params.max_prefill_batch;

    /* the model */
    if (model) {
        sim->model = *model;
    } else {
        const char *cfg = NULL;
        if (plan->model)
            cfg = json_string_value(json_object_get(plan->model, "config"));
        hx_err e = {0};
        if (!(cfg && hx_model_load(cfg, &sim->model, &e) == HX_OK) &&
            !(plan->model_name && hx_model_load(plan->model_name, &sim->model, &e) == HX_OK)) {
            st = hx_err_set(err, HX_EINVAL,
                            "cannot find the plan's model%s%s%s; give it with --model",
                            plan->model_name ? " '" : "",
                            plan->model_name ? plan->model_name : "",
                            plan->model_name ? "'" : "");
            goto fail;
        }
        if (plan->model) {
            const char *dt = json_string_value(json_object_get(plan->model, "dtype"));
            hx_model_dtype d;
            if (dt && hx_model_dtype_parse(dt, &d, NULL) == HX_OK)
                hx_model_set_dtype(&sim->model, d);
        }
    }
    if (plan->model_num_layers > 0 && plan->model_num_layers != sim->model.num_layers) {
        st = hx_err_set(err, HX_EINVAL, "the plan is for %d layers; model '%s' has %d",
                        plan->model_num_layers, sim->model.name, sim->model.num_layers);
        goto fail;
    }

    /* the cluster */
    if (!plan->cluster) {
        st = hx_err_set(err, HX_EINVAL,
                        "the plan has no 'cluster' (device figures and links); plans written "
                        "by 'hexflow plan' have it: re-plan, or add it");
        goto fail;
    }
    char *text = json_dumps(plan->cluster, 0);
    if (!text) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    hx_diags d;
    hx_diags_init(&d);
    st = hx_inventory_load_string(text, strlen(text), "plan cluster", &sim->inv, &d);
    free(text);
    if (st != HX_OK) {
        char first[512] = "";
        if (d.count)
            hx_diags_format(&d, 0, first, sizeof first);
        hx_diags_release(&d);
        st = hx_err_set(err, HX_EINVAL, "the plan's cluster is not a valid inventory: %s",
                        first);
        goto fail;
    }
    hx_diags_release(&d);
    if (hx_graph_new(sim->inv, &sim->graph) != HX_OK) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    hx_workload wl;
    hx_workload_default(&wl);
    if (plan->input_tokens > 0)
        wl.input_tokens = plan->input_tokens;
    if (plan->output_tokens > 0)
        wl.output_tokens = plan->output_tokens;
    hx_cost_ctx_init(&sim->cost, &sim->model, sim->graph, &sim->params, &wl);
    sim->kv_bytes_per_token = (double)hx_model_kv_bytes_per_token(&sim->model);

    /* groups */
    sim->groups = calloc((size_t)(plan->ngroups ? plan->ngroups : 1), sizeof *sim->groups);
    sim->links = calloc((size_t)(plan->nroutes ? plan->nroutes : 1), sizeof *sim->links);
    if (!sim->groups || !sim->links) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < plan->ngroups; i++) {
        const hx_plan_group *pg = &plan->groups[i];
        sgroup *g = &sim->groups[sim->ngroups++];
        g->plan_index = i;
        g->role = pg->role;
        hx_layout l;
        memset(&l, 0, sizeof l);
        if (pg->nstages > HX_MAX_STAGES) {
            st = hx_err_set(err, HX_EINVAL, "group %s has %d stages; at most %d", pg->id,
                            pg->nstages, HX_MAX_STAGES);
            goto fail;
        }
        l.nstages = pg->nstages;
        for (int k = 0; k < pg->nstages; k++) {
            const hx_plan_stage *ps = &pg->stages[k];
            l.first_layer[k] = ps->first_layer;
            l.num_layers[k] = ps->num_layers;
            l.tp[k] = ps->ndevices;
            for (int t = 0; t < ps->ndevices; t++) {
                int dev = device_id(sim->inv, ps->devices[t]);
                if (dev < 0 || l.ndevices >= HX_MAX_GROUP_DEVICES) {
                    st = hx_err_set(err, HX_EINVAL,
                                    "group %s: device '%s' is not in the plan's cluster", pg->id,
                                    ps->devices[t]);
                    goto fail;
                }
                l.devices[l.ndevices++] = dev;
            }
        }
        hx_err e = {0};
        if (hx_layout_check(&sim->cost, &l, &e) != HX_OK) {
            st = hx_err_set(err, HX_EINVAL, "group %s: %s", pg->id, e.msg);
            goto fail;
        }
        hx_group_model_init(&sim->cost, &l, &g->gm);
        g->kv_capacity_tokens = hx_group_kv_tokens(&g->gm, 256);
        g->weight = pg->capacity_rps > 0 ? pg->capacity_rps : 1;
    }
    for (int r = 0; r < plan->nroutes; r++) {
        const hx_plan_route *pr = &plan->routes[r];
        slink *lk = &sim->links[sim->nlinks++];
        lk->p = pr->prefill;
        lk->d = pr->decode;
        lk->weight = pr->rps > 0 ? pr->rps : 1e-9;
        lk->bytes_per_s = pr->link_bytes_per_s > 0 ? pr->link_bytes_per_s : 0;
        if (lk->bytes_per_s <= 0) {
            hx_layout a, b;
            memset(&a, 0, sizeof a);
            memset(&b, 0, sizeof b);
            /* device lists suffice for the link estimate */
            for (int k = 0; k < plan->groups[lk->p].nstages; k++)
                for (int t = 0; t < plan->groups[lk->p].stages[k].ndevices; t++)
                    a.devices[a.ndevices++] =
                        device_id(sim->inv, plan->groups[lk->p].stages[k].devices[t]);
            for (int k = 0; k < plan->groups[lk->d].nstages; k++)
                for (int t = 0; t < plan->groups[lk->d].stages[k].ndevices; t++)
                    b.devices[b.ndevices++] =
                        device_id(sim->inv, plan->groups[lk->d].stages[k].devices[t]);
            lk->bytes_per_s = hx_cost_kv_link_bytes_per_s(&sim->cost, &a, &b);
        }
        sgroup *pg = &sim->groups[lk->p];
        int *nl = realloc(pg->links, (size_t)(pg->nlinks + 1) * sizeof *nl);
        if (!nl) {
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
            goto fail;
        }
        pg->links = nl;
        pg->links[pg->nlinks++] = r;
    }
    /* a prefill group's routing share is what its routes carry */
    for (int i = 0; i < sim->ngroups; i++) {
        sgroup *g = &sim->groups[i];
        if (g->role != HX_ROLE_PREFILL)
            continue;
        double w = 0;
        for (int k = 0; k < g->nlinks; k++)
            w += sim->links[g->links[k]].weight;
        g->weight = w > 0 ? w : 1e-9;
    }
    int entry = 0;
    for (int i = 0; i < sim->ngroups; i++)
        if ((sim->groups[i].role == HX_ROLE_PREFILL && sim->groups[i].nlinks > 0) ||
            sim->groups[i].role == HX_ROLE_BOTH)
            entry = 1;
    if (!entry) {
        st = hx_err_set(err, HX_EINVAL,
                        "the plan has no way in: no colocated group and no prefill group with "
                        "a route");
        goto fail;
    }
    *out = sim;
    return HX_OK;
fail:
    hx_sim_free(sim);
    return st;
}

/* ------------------------------------------------------------------------- */
/* The run                                                                    */

typedef struct sreq {
    double arrival, first_token, done;
    int in, out;
    int pg, dg;
    double remaining_bytes;
    double xfer_start;
    int link;
} sreq;

enum ev_type { EV_ARRIVAL, EV_PREFILL_FREE, EV_PREFILL_DONE, EV_LINK, EV_STEP };

typedef struct event {
    double t;
    long seq;
    int type;
    int a;
    long b;
} event;

typedef struct batch {
    int n;
    int reqs[64];
    int group;
} batch;

typedef struct gstate {
    ififo prefill_q;       /* requests waiting for prefill */
    int prefill_busy;      /* pipeline entry occupied */
    int prefill_inflight;  /* prompts being prefilled */
    ififo decode_q;        /* requests waiting for KV room */
    kheap active;          /* decode: requests by the step they finish at */
    double ctx_sum;        /* context tokens of the active requests */
    double kv_used;        /* KV tokens reserved */
    long step;
    int stepping;          /* a decode step (or, colocated, a prefill batch) is running */
    int assigned;          /* decode requests routed here and not finished */
    double busy_time, busy_since;
    long prefills, completions, batches;
    double batch_sum;
    double max_waiting;
} gstate;

typedef struct lstate {
    int *act;              /* requests in flight */
    int nact, cap;
    double last_t;
    long version;
    int target;            /* the transfer the pending event completes */
    double busy_time, busy_since;
    double bytes, xfer_time;
    long xfers;
} lstate;

typedef struct run {
    hx_sim *sim;
    const hx_sim_opts *o;
    sreq *reqs;
    long nreqs, cap;
    long target;           /* arrivals to generate (or -1: by duration) */
    double horizon;        /* duration limit */
    event *ev;
    size_t nev, evcap;
    long seq;
    double now;
    gstate *g;
    lstate *l;
    batch *batches;
    int nbatches, batchcap;
    int *free_batches;
    int nfree_batches;
    unsigned long long rng;
    long events;
    long in_system;
    double area, area_t;   /* integral of requests in system */
    double first_arrival, last_done;
    long completed;
    double trace_scale;
    int oom;
} run;

static double rng_uniform(run *r)
{
    unsigned long long z = (r->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double rng_normal(run *r)
{
    double u = rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

static int draw_length(run *r, double mean)
{
    double x = mean;
    switch (r->o->lengths) {
    case HX_LEN_FIXED: x = mean; break;
    case HX_LEN_EXPONENTIAL: x = -mean * log(rng_uniform(r)); break;
    case HX_LEN_UNIFORM: x = 1 + rng_uniform(r) * (2 * mean - 2); break;
    case HX_LEN_LOGNORMAL: {
        double sigma = 0.8, mu = log(mean) - sigma * sigma / 2;
        x = exp(mu + sigma * rng_normal(r));
        break;
    }
    }
    if (x < 1)
        x = 1;
    if (x > 1e7)
        x = 1e7;
    return (int)llround(x);
}

static void push_event(run *r, double t, int type, int a, long b)
{
    if (r->nev == r->evcap) {
        size_t ncap = r->evcap ? r->evcap * 2 : 1024;
        event *n = realloc(r->ev, ncap * sizeof *n);
        if (!n) {
            r->oom = 1;
            return;
        }
        r->ev = n;
        r->evcap = ncap;
    }
    event e = {t, r->seq++, type, a, b};
    size_t at = r->nev++;
    while (at > 0) {
        size_t up = (at - 1) / 2;
        if (r->ev[up].t < t || (r->ev[up].t == t && r->ev[up].seq < e.seq))
            break;
        r->ev[at] = r->ev[up];
        at = up;
    }
    r->ev[at] = e;
}

static event pop_event(run *r)
{
    event top = r->ev[0], last = r->ev[--r->nev];
    size_t at = 0;
    for (;;) {
        size_t c = 2 * at + 1;
        if (c >= r->nev)
            break;
        if (c + 1 < r->nev && (r->ev[c + 1].t < r->ev[c].t ||
                               (r->ev[c + 1].t == r->ev[c].t && r->ev[c + 1].seq < r->ev[c].seq)))
            c++;
        if (r->ev[c].t > last.t || (r->ev[c].t == last.t && r->ev[c].seq > last.seq))
            break;
        r->ev[at] = r->ev[c];
        at = c;
    }
    if (r->nev > 0)
        r->ev[at] = last;
    return top;
}

static void account_system(run *r, long delta)
{
    r->area += r->in_system * (r->now - r->area_t);
    r->area_t = r->now;
    r->in_system += delta;
}

static void busy_on(gstate *g, double now)
{
    g->busy_since = now;
}

static void busy_off(gstate *g, double now)
{
    g->busy_time += now - g->busy_since;
}

static void complete(run *r, int id)
{
    sreq *q = &r->reqs[id];
    q->done = r->now;
    r->completed++;
    r->last_done = r->now;
    account_system(r, -1);
}

static int new_batch(run *r)
{
    if (r->nfree_batches > 0)
        return r->free_batches[--r->nfree_batches];
    if (r->nbatches == r->batchcap) {
        int ncap = r->batchcap ? r->batchcap * 2 : 64;
        batch *n = realloc(r->batches, (size_t)ncap * sizeof *n);
        if (!n) {
            r->oom = 1;
            return -1;
        }
        r->batches = n;
        int *f = realloc(r->free_batches, (size_t)ncap * sizeof *f);
        if (!f) {
            r->oom = 1;
            return -1;
        }
        r->free_batches = f;
        r->batchcap = ncap;
    }
    return r->nbatches++;
}

static void kick_group(run *r, int gi);

/* Takes a prefill batch from group gi's queue and schedules it. */
static void start_prefill(run *r, int gi)
{
    hx_sim *sim = r->sim;
    gstate *g = &r->g[gi];
    int bi = new_batch(r);
    if (bi < 0)
        return;
    batch *b = &r->batches[bi];
    b->n = 0;
    b->group = gi;
    double tokens = 0, pairs = 0;
    int window = sim->groups[gi].gm.window_tokens;
    int maxb = sim->max_prefill_batch < 64 ? sim->max_prefill_batch : 64;
    while (fifo_len(&g->prefill_q) > 0 && b->n < maxb) {
        int id = fifo_pop(&g->prefill_q);
        b->reqs[b->n++] = id;
        double s = r->reqs[id].in;
        tokens += s;
        pairs += window > 0 && s > window ? (double)window * (window + 1) / 2 + (s - window) * window
                                          : s * (s + 1) / 2;
    }
    double occupancy;
    double lat = hx_group_prefill_s(&sim->groups[gi].gm, b->n, tokens, pairs, &occupancy);
    g->prefill_inflight += b->n;
    g->batches++;
    g->batch_sum += b->n;
    if (sim->groups[gi].role == HX_ROLE_BOTH) {
        /* colocated: the whole group is busy until the batch is done */
        g->stepping = 1;
        busy_on(g, r->now);
        push_event(r, r->now + lat, EV_PREFILL_DONE, bi, 0);
    } else {
        g->prefill_busy = 1;
        busy_on(g, r->now);
        push_event(r, r->now + occupancy, EV_PREFILL_FREE, gi, 0);
        push_event(r, r->now + lat, EV_PREFILL_DONE, bi, 0);
    }
}

/* Admits waiting requests of decode (or colocated) group gi while their KV fits. */
static void admit(run *r, int gi)
{
    hx_sim *sim = r->sim;
    gstate *g = &r->g[gi];
    double cap = sim->groups[gi].kv_capacity_tokens;
    while (fifo_len(&g->decode_q) > 0) {
        int id = fifo_peek(&g->decode_q);
        sreq *q = &r->reqs[id];
        double need = (double)q->in + q->out;
        if (g->kv_used + need > cap) {
            if (g->kv_used == 0) {
                /* can never fit: fail it rather than block the queue forever */
                fifo_pop(&g->decode_q);
                q->first_token = q->first_token > 0 ? q->first_token : r->now;
                q->out = -q->out; /* marks the failure */
                g->assigned--;
                complete(r, id);
                continue;
            }
            break;
        }
        fifo_pop(&g->decode_q);
        g->kv_used += need;
        g->ctx_sum += q->in + 1;
        if (heap_push(&g->active, (double)(g->step + (q->out - 1)), id) != 0) {
            r->oom = 1;
            return;
        }
    }
}

static void start_step(run *r, int gi)
{
    hx_sim *sim = r->sim;
    gstate *g = &r->g[gi];
    double B = (double)g->active.n;
    int w = sim->groups[gi].gm.window_tokens;
    double keys = w > 0 ? fmin(g->ctx_sum, B * w) : g->ctx_sum;
    double dt = hx_group_decode_step_s(&sim->groups[gi].gm, B, keys);
    g->stepping = 1;
    g->batches++;
    g->batch_sum += B;
    busy_on(g, r->now);
    push_event(r, r->now + dt, EV_STEP, gi, 0);
}

static void kick_group(run *r, int gi)
{
    hx_sim *sim = r->sim;
    gstate *g = &r->g[gi];
    int role = sim->groups[gi].role;
    double waiting = (double)fifo_len(&g->prefill_q) + (double)fifo_len(&g->decode_q);
    if (waiting > g->max_waiting)
        g->max_waiting = waiting;
    if (role == HX_ROLE_PREFILL) {
        if (!g->prefill_busy && fifo_len(&g->prefill_q) > 0)
            start_prefill(r, gi);
        return;
    }
    if (g->stepping)
        return;
    if (role == HX_ROLE_BOTH && fifo_len(&g->prefill_q) > 0) {
        start_prefill(r, gi);
        return;
    }
    admit(r, gi);
    if (g->active.n > 0)
        start_step(r, gi);
}

/* Processor sharing on a link: bring every transfer up to now. */
static void link_advance(run *r, int li)
{
    lstate *l = &r->l[li];
    if (l->nact > 0) {
        double share = r->sim->links[li].bytes_per_s / l->nact * (r->now - l->last_t);
        for (int k = 0; k < l->nact; k++)
            r->reqs[l->act[k]].remaining_bytes -= share;
    }
    l->last_t = r->now;
}

static void link_schedule(run *r, int li)
{
    lstate *l = &r->l[li];
    l->version++;
    if (l->nact == 0)
        return;
    double least = INFINITY;
    for (int k = 0; k < l->nact; k++)
        if (r->reqs[l->act[k]].remaining_bytes < least) {
            least = r->reqs[l->act[k]].remaining_bytes;
            l->target = l->act[k];
        }
    if (least < 0)
        least = 0;
    double dt = least * l->nact / r->sim->links[li].bytes_per_s;
    push_event(r, r->now + dt, EV_LINK, li, l->version);
}

/* Picks the decode group for a request prefilled by sim group gi. */
static int pick_route(run *r, int gi)
{
    hx_sim *sim = r->sim;
    const sgroup *g = &sim->groups[gi];
    int best = -1;
    double best_score = INFINITY;
    for (int k = 0; k < g->nlinks; k++) {
        const slink *lk = &sim->links[g->links[k]];
        double load = r->g[lk->d].assigned + r->l[g->links[k]].nact;
        double score = (load + 1) / lk->weight;
        if (score < best_score) {
            best_score = score;
            best = g->links[k];
        }
    }
    return best;
}

static void prefill_done(run *r, int bi)
{
    hx_sim *sim = r->sim;
    batch *b = &r->batches[bi];
    int gi = b->group;
    gstate *g = &r->g[gi];
    g->prefill_inflight -= b->n;
    g->prefills += b->n;
    int colocated = sim->groups[gi].role == HX_ROLE_BOTH;
    for (int k = 0; k < b->n; k++) {
        int id = b->reqs[k];
        sreq *q = &r->reqs[id];
        q->first_token = r->now;
        if (q->out <= 1) {
            q->dg = gi;
            g->completions++;
            complete(r, id);
            continue;
        }
        if (colocated) {
            q->dg = gi;
            g->assigned++;
            if (fifo_push(&g->decode_q, id) != 0)
                r->oom = 1;
            continue;
        }
        int li = pick_route(r, gi);
        q->link = li;
        q->dg = sim->links[li].d;
        r->g[q->dg].assigned++;
        q->remaining_bytes = sim->kv_bytes_per_token * q->in;
        q->xfer_start = r->now;
        lstate *l = &r->l[li];
        link_advance(r, li);
        if (l->nact == l->cap) {
            int ncap = l->cap ? l->cap * 2 : 16;
            int *n = realloc(l->act, (size_t)ncap * sizeof *n);
            if (!n) {
                r->oom = 1;
                return;
            }
            l->act = n;
            l->cap = ncap;
        }
        if (l->nact == 0)
            l->busy_since = r->now;
        l->act[l->nact++] = id;
        l->bytes += q->remaining_bytes;
        link_schedule(r, li);
    }
    r->free_batches[r->nfree_batches++] = bi;
    if (colocated) {
        g->stepping = 0;
        busy_off(g, r->now);
    }
    kick_group(r, gi);
}

static void link_event(run *r, int li, long version)
{
    lstate *l = &r->l[li];
    if (version != l->version)
        return; /* superseded by a later change on the link */
    link_advance(r, li);
    /* the transfer this event was for is done, whatever rounding left over */
    r->reqs[l->target].remaining_bytes = 0;
    double eps = 1e-3; /* bytes */
    for (int k = 0; k < l->nact;) {
        int id = l->act[k];
        sreq *q = &r->reqs[id];
        if (q->remaining_bytes <= eps) {
            l->act[k] = l->act[--l->nact];
            l->xfers++;
            l->xfer_time += r->now - q->xfer_start;
            if (fifo_push(&r->g[q->dg].decode_q, id) != 0)
                r->oom = 1;
            kick_group(r, q->dg);
        } else {
            k++;
        }
    }
    if (l->nact == 0)
        l->busy_time += r->now - l->busy_since;
    link_schedule(r, li);
}

static void step_done(run *r, int gi)
{
    gstate *g = &r->g[gi];
    g->stepping = 0;
    busy_off(g, r->now);
    g->ctx_sum += (double)g->active.n;
    g->step++;
    while (g->active.n > 0 && g->active.key[0] <= (double)g->step) {
        int id = g->active.id[0];
        heap_pop(&g->active);
        sreq *q = &r->reqs[id];
        g->kv_used -= (double)q->in + q->out;
        g->ctx_sum -= (double)q->in + q->out;
        g->assigned--;
        g->completions++;
        complete(r, id);
    }
    if (g->active.n == 0) {
        g->ctx_sum = 0; /* no drift from rounding */
        g->kv_used = 0;
    }
    kick_group(r, gi);
}

/* Chooses the entry group (prefill or colocated) for a new request. */
static int pick_entry(run *r)
{
    hx_sim *sim = r->sim;
    int best = -1;
    double best_score = INFINITY;
    for (int i = 0; i < sim->ngroups; i++) {
        const sgroup *g = &sim->groups[i];
        if (!((g->role == HX_ROLE_PREFILL && g->nlinks > 0) || g->role == HX_ROLE_BOTH))
            continue;
        const gstate *s = &r->g[i];
        double load = (double)fifo_len(&s->prefill_q) + s->prefill_inflight;
        double score = (load + 1) / g->weight;
        if (score < best_score) {
            best_score = score;
            best = i;
        }
    }
    return best;
}

/* Creates request `index` with its arrival time; 0 when arrivals are over. */
static int make_request(run *r, long index, double *t)
{
    const hx_sim_opts *o = r->o;
    if (o->trace) {
        if ((size_t)index >= o->trace->n || (r->target >= 0 && index >= r->target))
            return 0;
        *t = o->trace->reqs[index].arrival_s * r->trace_scale;
    } else {
        if (r->target >= 0 && index >= r->target)
            return 0;
        double prev = index > 0 ? r->reqs[index - 1].arrival : 0;
        *t = (index > 0 ? prev : 0) - log(rng_uniform(r)) / o->rate_rps;
    }
    if (r->horizon > 0 && *t > r->horizon)
        return 0;
    if (index >= r->cap) {
        long ncap = r->cap ? r->cap * 2 : 4096;
        sreq *n = realloc(r->reqs, (size_t)ncap * sizeof *n);
        if (!n) {
            r->oom = 1;
            return 0;
        }
        r->reqs = n;
        r->cap = ncap;
    }
    sreq *q = &r->reqs[index];
    memset(q, 0, sizeof *q);
    q->arrival = *t;
    q->link = -1;
    if (o->trace) {
        q->in = o->trace->reqs[index].input_tokens;
        q->out = o->trace->reqs[index].output_tokens;
    } else {
        q->in = draw_length(r, o->input_tokens);
        q->out = draw_length(r, o->output_tokens);
    }
    r->nreqs = index + 1;
    return 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void latency_stats(double *v, long n, hx_latency_stats *s)
{
    memset(s, 0, sizeof *s);
    if (n <= 0)
        return;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += v[i];
    s->mean = sum / n;
    s->p50 = v[(long)floor(0.50 * (n - 1))];
    s->p90 = v[(long)floor(0.90 * (n - 1))];
    s->p99 = v[(long)floor(0.99 * (n - 1))];
    s->max = v[n - 1];
}

void hx_sim_result_release(hx_sim_result *r)
{
    if (!r)
        return;
    free(r->groups);
    free(r->links);
    free(r->records);
    memset(r, 0, sizeof *r);
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

hx_status hx_sim_run(hx_sim *sim, const hx_sim_opts *o, hx_sim_result *res, hx_err *err)
{
    double wall0 = wall_now();
    memset(res, 0, sizeof *res);
    if (!o->trace && !(o->rate_rps > 0 && isfinite(o->rate_rps)))
        return hx_err_set(err, HX_EINVAL, "rate: %g requests/s; expected a positive rate",
                          o->rate_rps);
    if (o->requests < 0 || o->requests > MAX_REQUESTS || o->duration_s < 0)
        return hx_err_set(err, HX_EINVAL, "requests: expected 1 to %ld", MAX_REQUESTS);
    if (!o->trace && !(o->input_tokens >= 1 && o->output_tokens >= 1))
        return hx_err_set(err, HX_EINVAL, "lengths: expected at least 1 input and output token");
    run r;
    memset(&r, 0, sizeof r);
    r.sim = sim;
    r.o = o;
    r.rng = o->seed * 0x2545F4914F6CDD1DULL + 1;
    r.target = o->requests > 0 ? o->requests : (o->duration_s > 0 ? -1 : DEFAULT_REQUESTS);
    r.horizon = o->requests > 0 ? 0 : o->duration_s;
    r.trace_scale = 1;
    if (o->trace && o->rate_rps > 0) {
        double mi, mo, rate;
        hx_trace_stats(o->trace, &mi, &mo, &rate);
        if (rate > 0)
            r.trace_scale = rate / o->rate_rps;
    }
    r.g = calloc((size_t)sim->ngroups, sizeof *r.g);
    r.l = calloc((size_t)(sim->nlinks ? sim->nlinks : 1), sizeof *r.l);
    hx_status st = HX_OK;
    if (!r.g || !r.l) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    double t0;
    long next = 0;
    if (make_request(&r, next, &t0)) {
        push_event(&r, t0, EV_ARRIVAL, 0, next);
        next++;
    }
    r.first_arrival = r.nreqs > 0 ? r.reqs[0].arrival : 0;
    r.area_t = r.first_arrival;
    while (r.nev > 0 && !r.oom) {
        event e = pop_event(&r);
        r.now = e.t;
        r.events++;
        switch (e.type) {
        case EV_ARRIVAL: {
            long id = e.b;
            account_system(&r, +1);
            int gi = pick_entry(&r);
            r.reqs[id].pg = gi;
            if (fifo_push(&r.g[gi].prefill_q, (int)id) != 0)
                r.oom = 1;
            kick_group(&r, gi);
            double t;
            if (make_request(&r, next, &t)) {
                push_event(&r, t, EV_ARRIVAL, 0, next);
                next++;
            }
            break;
        }
        case EV_PREFILL_FREE:
            r.g[e.a].prefill_busy = 0;
            busy_off(&r.g[e.a], r.now);
            kick_group(&r, e.a);
            break;
        case EV_PREFILL_DONE: prefill_done(&r, e.a); break;
        case EV_LINK: link_event(&r, e.a, e.b); break;
        case EV_STEP: step_done(&r, e.a); break;
        }
    }
    if (r.oom) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory during the simulation");
        goto out;
    }

    /* results */
    res->arrived = r.nreqs;
    res->completed = r.completed;
    res->events = r.events;
    double last_arrival = r.nreqs > 0 ? r.reqs[r.nreqs - 1].arrival : 0;
    res->makespan_s = r.last_done - r.first_arrival;
    res->offered_rps = r.nreqs > 1 && last_arrival > r.first_arrival
                           ? (r.nreqs - 1) / (last_arrival - r.first_arrival)
                           : 0;
    res->completion_rps = res->makespan_s > 0 ? r.completed / res->makespan_s : 0;
    /*
     * Throughput: the rate of the middle 80% of the completions. Under light
     * load completions follow arrivals; under overload the queue drains at
     * capacity; either way ramp-up and the last stragglers are left out.
     */
    res->throughput_rps = res->completion_rps;
    if (r.completed >= 50) {
        double *done = malloc((size_t)r.nreqs * sizeof *done);
        if (done) {
            long k = 0;
            for (long i = 0; i < r.nreqs; i++)
                if (r.reqs[i].out > 0)
                    done[k++] = r.reqs[i].done;
            qsort(done, (size_t)k, sizeof *done, cmp_double);
            long i1 = k / 10, i2 = k - 1 - k / 10;
            if (i2 > i1 && done[i2] > done[i1])
                res->throughput_rps = (i2 - i1) / (done[i2] - done[i1]);
            free(done);
        }
    }
    res->mean_in_system = res->makespan_s > 0 ? r.area / res->makespan_s : 0;
    double *ttft = malloc((size_t)(r.nreqs ? r.nreqs : 1) * sizeof *ttft);
    double *tpot = malloc((size_t)(r.nreqs ? r.nreqs : 1) * sizeof *tpot);
    double *e2e = malloc((size_t)(r.nreqs ? r.nreqs : 1) * sizeof *e2e);
    if (o->record)
        res->records = calloc((size_t)(r.nreqs ? r.nreqs : 1), sizeof *res->records);
    res->groups = calloc((size_t)sim->ngroups, sizeof *res->groups);
    res->links = calloc((size_t)(sim->nlinks ? sim->nlinks : 1), sizeof *res->links);
    if (!ttft || !tpot || !e2e || (o->record && !res->records) || !res->groups || !res->links) {
        free(ttft);
        free(tpot);
        free(e2e);
        hx_sim_result_release(res);
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    long met = 0;
    for (long i = 0; i < r.nreqs; i++) {
        sreq *q = &r.reqs[i];
        int failed = q->out < 0;
        int out_tokens = failed ? -q->out : q->out;
        ttft[i] = q->first_token - q->arrival;
        tpot[i] = out_tokens > 1 ? (q->done - q->first_token) / (out_tokens - 1) : 0;
        e2e[i] = q->done - q->arrival;
        if (failed) {
            ttft[i] = tpot[i] = e2e[i] = INFINITY;
        }
        int ok = !failed && ttft[i] <= o->slo_ttft_s && tpot[i] <= o->slo_tpot_s;
        met += ok;
        if (res->records) {
            hx_sim_record *rec = &res->records[i];
            rec->arrival_s = q->arrival - r.first_arrival;
            rec->ttft_s = ttft[i];
            rec->tpot_s = tpot[i];
            rec->e2e_s = e2e[i];
            rec->input_tokens = q->in;
            rec->output_tokens = out_tokens;
            rec->prefill_group = sim->groups[q->pg].plan_index;
            rec->decode_group = sim->groups[q->dg].plan_index;
            rec->met_slo = ok;
        }
    }
    res->slo_attainment = r.nreqs > 0 ? (double)met / r.nreqs : 0;
    latency_stats(ttft, r.nreqs, &res->ttft_s);
    latency_stats(tpot, r.nreqs, &res->tpot_s);
    latency_stats(e2e, r.nreqs, &res->e2e_s);
    free(ttft);
    free(tpot);
    free(e2e);
    res->ngroups = sim->ngroups;
    for (int i = 0; i < sim->ngroups; i++) {
        hx_sim_group_stats *gs = &res->groups[i];
        const hx_plan_group *pg = &sim->plan->groups[sim->groups[i].plan_index];
        snprintf(gs->id, sizeof gs->id, "%s", pg->id);
        gs->role = sim->groups[i].role;
        gs->utilisation = res->makespan_s > 0 ? r.g[i].busy_time / res->makespan_s : 0;
        gs->prefills = r.g[i].prefills;
        gs->completions = r.g[i].completions;
        gs->mean_batch = r.g[i].batches > 0 ? r.g[i].batch_sum / r.g[i].batches : 0;
        gs->max_waiting = r.g[i].max_waiting;
    }
    res->nlinks = sim->nlinks;
    for (int i = 0; i < sim->nlinks; i++) {
        hx_sim_link_stats *ls = &res->links[i];
        ls->prefill = sim->groups[sim->links[i].p].plan_index;
        ls->decode = sim->groups[sim->links[i].d].plan_index;
        ls->utilisation = res->makespan_s > 0 ? r.l[i].busy_time / res->makespan_s : 0;
        ls->bytes = r.l[i].bytes;
        ls->mean_transfer_s = r.l[i].xfers > 0 ? r.l[i].xfer_time / r.l[i].xfers : 0;
    }
    res->wall_s = wall_now() - wall0;
out:
    for (int i = 0; r.g && i < sim->ngroups; i++) {
        free(r.g[i].prefill_q.v);
        free(r.g[i].decode_q.v);
        heap_free(&r.g[i].active);
    }
    for (int i = 0; r.l && i < sim->nlinks; i++)
        free(r.l[i].act);
    free(r.g);
    free(r.l);
    free(r.reqs);
    free(r.ev);
    free(r.batches);
    free(r.free_batches);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Goodput                                                                    */

static int cmp_point(const void *a, const void *b)
{
    const hx_goodput_point *x = a, *y = b;
    return (x->rate_rps > y->rate_rps) - (x->rate_rps < y->rate_rps);
}

hx_status hx_sim_find_goodput(hx_sim *sim, const hx_sim_opts *opts, double target,
                              double *goodput_rps, hx_goodput_point *points, int max_points,
                              int *npoints, hx_err *err)
{
    if (!(target > 0 && target <= 1))
        return hx_err_set(err, HX_EINVAL, "attainment target %g; expected a fraction in (0, 1]",
                          target);
    hx_sim_opts o = *opts;
    /*
     * Every probe covers the same stretch of time, so that a high rate is not
     * judged on a burst the queues absorb before they reach steady state.
     */
    if (!o.trace) {
        o.requests = 0;
        if (!(o.duration_s > 0))
            o.duration_s = HX_GOODPUT_SECONDS;
    }
    int np = 0;
    double lo = 0, hi = sim->plan->throughput_rps > 0 ? sim->plan->throughput_rps : 1;
    hx_status st = HX_OK;
#define PROBE(rate, att_out)                                                            \
    do {                                                                                \
        hx_sim_result res_;                                                             \
        o.rate_rps = (rate);                                                            \
        o.record = 0;                                                                   \
        st = hx_sim_run(sim, &o, &res_, err);                                           \
        if (st != HX_OK)                                                                \
            return st;                                                                  \
        (att_out) = res_.slo_attainment;                                                \
        if (points && np < max_points)                                                  \
            points[np++] = (hx_goodput_point){(rate), res_.slo_attainment,              \
                                              res_.throughput_rps};                     \
        hx_sim_result_release(&res_);                                                   \
    } while (0)
    /* bracket: grow hi until attainment falls below the target */
    double att;
    for (int i = 0; i < 20; i++) {
        PROBE(hi, att);
        if (att < target)
            break;
        lo = hi;
        hi *= 2;
    }
    for (int i = 0; i < 14 && hi - lo > 1e-3 * hi; i++) {
        double mid = 0.5 * (lo + hi);
        PROBE(mid, att);
        if (att >= target)
            lo = mid;
        else
            hi = mid;
    }
#undef PROBE
    if (points)
        qsort(points, (size_t)np, sizeof *points, cmp_point);
    if (npoints)
        *npoints = np;
    *goodput_rps = lo;
    return st;
}
