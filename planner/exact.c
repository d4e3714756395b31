/*
 * exact.c - exhaustive plan search for small clusters (strategy "exact").
 *
 * The devices of a host are alike (one type, one intra-host link, one NIC),
 * so a replica is characterised by how many devices it takes from each host:
 * a vector v with 0 <= v[h] <= count[h]. The search enumerates every such
 * vector that can hold the model, every multiset of vectors that fits the
 * hosts (devices may stay unused), and for each multiset every assignment of
 * roles (prefill, decode, colocated); each candidate is evaluated with the
 * same cost model and max-flow as the heuristic. Role assignments are tried
 * in decreasing order of an upper bound that ignores the network
 * (colocated + min(prefill, decode)), and abandoned once the bound cannot
 * beat the best plan found, so the result is exact within the layout space of
 * hx_cost_best_layout.
 */
#include "search_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EXACT_MAX_GROUPS 16
#define EXACT_MAX_NODES 5000000L
#define EXACT_MAX_ROLE_GROUPS 10

typedef struct vec_entry {
    int count[HX_EXACT_MAX_DEVICES]; /* devices per host (hosts with devices only) */
    hx_sgroup rep;                   /* representative: the first devices of each host */
    double cap[3];                   /* capacity per role, 0 when infeasible */
    double ub;                       /* what the group can add at most: max(B, P/2, D/2) */
    int ndevices;
} vec_entry;

typedef struct exact_state {
    hx_search_ctx *s;
    int nh;                              /* hosts */
    int host[HX_EXACT_MAX_DEVICES];      /* inventory host index */
    int hcount[HX_EXACT_MAX_DEVICES];    /* devices per host */
    vec_entry *vecs;
    int nvecs;
    int chosen[EXACT_MAX_GROUPS];
    int nchosen;
    int left[HX_EXACT_MAX_DEVICES];
    long nodes;
    int too_big;
    double ub_now;                       /* sum of ub over the chosen groups */
    double ub_rate[HX_EXACT_MAX_DEVICES]; /* per host: max ub / devices over vectors using it */
    hx_solution best;
    hx_solution trial;
    int have;
} exact_state;

/* The representative's layout moved onto concrete devices (offsets per host). */
static void place(const exact_state *e, const vec_entry *v, const int *offset, hx_sgroup *g)
{
    *g = v->rep;
    for (int r = 0; r < 3; r++) {
        hx_layout *l = &g->layout[r];
        for (int k = 0; k < l->ndevices; k++) {
            int d = l->devices[k];
            int h = hx_graph_device_host(e->s->graph, d);
            for (int j = 0; j < e->nh; j++)
                if (e->host[j] == h)
                    l->devices[k] = d + offset[j];
        }
    }
    for (int k = 0; k < g->ndevices; k++) {
        int d = g->devices[k];
        int h = hx_graph_device_host(e->s->graph, d);
        for (int j = 0; j < e->nh; j++)
            if (e->host[j] == h)
                g->devices[k] = d + offset[j];
    }
    g->nunits = 0;
}

typedef struct assign {
    int roles[EXACT_MAX_GROUPS];
    double bound;
} assign;

static int cmp_assign_desc(const void *a, const void *b)
{
    const assign *x = a, *y = b;
    return (x->bound < y->bound) - (x->bound > y->bound);
}

/* Evaluates the current multiset under every promising role assignment. */
static void evaluate_multiset(exact_state *e)
{
    int k = e->nchosen;
    if (k == 0 || k > EXACT_MAX_ROLE_GROUPS)
        return;
    long combos = 1;
    for (int i = 0; i < k; i++)
        combos *= 3;
    assign *as = malloc((size_t)combos * sizeof *as);
    if (!as)
        return;
    long na = 0;
    double best_now = e->have ? e->best.value_rps : 0;
    for (long c = 0; c < combos; c++) {
        long x = c;
        double P = 0, D = 0, B = 0;
        int ok = 1;
        for (int i = 0; i < k; i++) {
            int r = (int)(x % 3);
            x /= 3;
            double cap = e->vecs[e->chosen[i]].cap[r];
            if (cap <= 0) {
                ok = 0;
                break;
            }
            as[na].roles[i] = r;
            if (r == HX_ROLE_PREFILL)
                P += cap;
            else if (r == HX_ROLE_DECODE)
                D += cap;
            else
                B += cap;
        }
        if (!ok)
            continue;
        double bound = B + fmin(P, D);
        if (e->s->cost.wl.rate_rps > 0)
            bound = fmin(bound, e->s->cost.wl.rate_rps);
        if (bound <= best_now * (1 + 1e-12))
            continue;
        as[na++].bound = bound;
    }
    qsort(as, (size_t)na, sizeof *as, cmp_assign_desc);
    for (long a = 0; a < na; a++) {
        if (e->have && as[a].bound <= e->best.value_rps * (1 + 1e-12))
            break;
        int offset[HX_EXACT_MAX_DEVICES] = {0};
        e->trial.n = 0;
        for (int i = 0; i < k; i++) {
            const vec_entry *v = &e->vecs[e->chosen[i]];
            hx_sgroup *g = hx_solution_add(&e->trial);
            if (!g)
                goto out;
            place(e, v, offset, g);
            g->role = as[a].roles[i];
            for (int j = 0; j < e->nh; j++)
                offset[j] += v->count[j];
        }
        hx_solution_evaluate(e->s, &e->trial);
        if (!e->have || hx_solution_better(&e->trial, &e->best)) {
            if (hx_solution_copy(&e->best, &e->trial) != HX_OK)
                goto out;
            e->have = 1;
        }
    }
out:
    free(as);
}

static int cmp_vec_desc(const void *a, const void *b)
{
    const vec_entry *x = a, *y = b;
    double rx = x->ub / x->ndevices, ry = y->ub / y->ndevices;
    if (rx != ry)
        return rx < ry ? 1 : -1;
    return y->ndevices - x->ndevices;
}

/*
 * Depth-first over multisets: vectors in non-decreasing index order.
 * Throughput is colocated + min(prefill, decode) <= sum over groups of
 * max(B, P/2, D/2); a group's bound is at most the sum over its devices of
 * their host's best bound per device (ub_rate), so the devices still free add
 * at most that much: a subtree whose bound cannot beat the best is skipped.
 */
static void dfs(exact_state *e, int from)
{
    if (++e->nodes > EXACT_MAX_NODES) {
        e->too_big = 1;
        return;
    }
    double rest = 0;
    for (int j = 0; j < e->nh; j++)
        rest += e->left[j] * e->ub_rate[j];
    double best = e->have ? e->best.value_rps * (1 + 1e-12) : 0;
    if (e->have && e->ub_now + rest <= best)
        return;
    if (!e->have || e->ub_now > best)
        evaluate_multiset(e);
    if (e->nchosen >= EXACT_MAX_GROUPS || e->nchosen >= EXACT_MAX_ROLE_GROUPS)
        return;
    for (int v = from; v < e->nvecs && !e->too_big; v++) {
        int fits = 1;
        for (int j = 0; j < e->nh; j++)
            if (e->vecs[v].count[j] > e->left[j])
                fits = 0;
        if (!fits)
            continue;
        for (int j = 0; j < e->nh; j++)
            e->left[j] -= e->vecs[v].count[j];
        e->chosen[e->nchosen++] = v;
        e->ub_now += e->vecs[v].ub;
        dfs(e, v);
        e->ub_now -= e->vecs[v].ub;
        e->nchosen--;
        for (int j = 0; j < e->nh; j++)
            e->left[j] += e->vecs[v].count[j];
    }
}

hx_status hx_search_exact(hx_search_ctx *s, hx_solution *best, hx_err *err)
{
    const hx_inventory *inv = s->inv;
    exact_state e;
    memset(&e, 0, sizeof e);
    e.s = s;
    hx_status st = HX_OK;
    for (size_t h = 0; h < inv->nhosts; h++) {
        if (inv->hosts[h].gpu_count <= 0)
            continue;
        if (e.nh >= HX_EXACT_MAX_DEVICES)
            return hx_err_set(err, HX_EINVAL, "too many hosts for the exact search");
        e.host[e.nh] = (int)h;
        e.hcount[e.nh] = inv->hosts[h].gpu_count;
        e.left[e.nh] = inv->hosts[h].gpu_count;
        e.nh++;
    }
    /* every non-zero vector, in mixed radix */
    long total = 1;
    for (int j = 0; j < e.nh; j++)
        total *= e.hcount[j] + 1;
    e.vecs = malloc((size_t)total * sizeof *e.vecs);
    if (!e.vecs)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    for (long c = 1; c < total; c++) {
        vec_entry *v = &e.vecs[e.nvecs];
        long x = c;
        int ndev = 0;
        for (int j = 0; j < e.nh; j++) {
            v->count[j] = (int)(x % (e.hcount[j] + 1));
            x /= e.hcount[j] + 1;
            ndev += v->count[j];
        }
        if (ndev > HX_MAX_GROUP_DEVICES)
            continue;
        hx_sgroup_init(&v->rep);
        for (int j = 0; j < e.nh; j++)
            for (int k = 0; k < v->count[j]; k++)
                v->rep.devices[v->rep.ndevices++] = inv->hosts[e.host[j]].first_device + k;
        int any = 0;
        for (int r = 0; r < 3; r++) {
            v->cap[r] = hx_sgroup_eval(s, &v->rep, r) ? v->rep.perf[r].capacity_rps : 0;
            any |= v->cap[r] > 0;
        }
        v->ndevices = ndev;
        v->ub = fmax(v->cap[HX_ROLE_BOTH],
                     0.5 * fmax(v->cap[HX_ROLE_PREFILL], v->cap[HX_ROLE_DECODE]));
        if (any) {
            for (int j = 0; j < e.nh; j++)
                if (v->count[j] > 0)
                    e.ub_rate[j] = fmax(e.ub_rate[j], v->ub / ndev);
            e.nvecs++;
        }
    }
    /* the most promising groups first, so that strong plans prune early */
    qsort(e.vecs, (size_t)e.nvecs, sizeof *e.vecs, cmp_vec_desc);
    if ((st = hx_solution_init(&e.trial, EXACT_MAX_GROUPS)) != HX_OK ||
        (st = hx_solution_init(&e.best, EXACT_MAX_GROUPS)) != HX_OK) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    dfs(&e, 0);
    if (e.too_big) {
        st = hx_err_set(err, HX_ERANGE,
                        "the exact search has more than %ld groupings to try on this cluster; "
                        "use the default strategy",
                        EXACT_MAX_NODES);
        goto out;
    }
    if (!e.have) {
        st = hx_err_set(err, HX_EINVAL, "no grouping of this cluster can serve the model");
        goto out;
    }
    hx_solution_release(best);
    *best = e.best;
    e.best.groups = NULL;
out:
    hx_solution_release(&e.best);
    hx_solution_release(&e.trial);
    free(e.vecs);
    return st;
}
