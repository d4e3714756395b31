/*
 * search.c - the plan search (see search.h): units, partitioning, roles and
 * routes by max-flow, refinement guided by the minimum cut, baselines.
 */
#include "search_int.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/units.h"
#include "planner/partition.h"

#define EPS_RPS 1e-9
#define HX_SEARCH_FINE_DEVICES 32 /* clusters up to this size use one device per unit */
#define FULL_NEIGHBOURHOOD_MAX 600 /* below this many candidate moves, try them all */
#define DEFAULT_TIME_LIMIT_S 60.0
#define MAX_REFINE_ITERATIONS 100000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Deterministic pseudo-random numbers (splitmix64). */
static unsigned long long rng_next(unsigned long long *state)
{
    unsigned long long z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

const char *hx_strategy_name(hx_strategy s)
{
    switch (s) {
    case HX_STRATEGY_HEXFLOW: return "hexflow";
    case HX_STRATEGY_COLOCATED: return "colocated";
    case HX_STRATEGY_HOMOGENEOUS: return "homogeneous";
    case HX_STRATEGY_EXACT: return "exact";
    }
    return "?";
}

hx_status hx_strategy_parse(const char *s, hx_strategy *out)
{
    for (int i = 0; i <= HX_STRATEGY_EXACT; i++)
        if (!strcmp(s, hx_strategy_name((hx_strategy)i))) {
            *out = (hx_strategy)i;
            return HX_OK;
        }
    return HX_EINVAL;
}

void hx_search_opts_default(hx_search_opts *o)
{
    o->strategy = HX_STRATEGY_HEXFLOW;
    o->time_limit_s = DEFAULT_TIME_LIMIT_S;
    o->seed = 1;
    o->router_port = HX_PLAN_DEFAULT_ROUTER_PORT;
}

/* ------------------------------------------------------------------------- */
/* Groups and solutions                                                       */

void hx_sgroup_init(hx_sgroup *g)
{
    g->nunits = 0;
    g->ndevices = 0;
    g->role = HX_ROLE_NONE;
    for (int r = 0; r < 3; r++) {
        g->have[r] = 0;
        g->ok[r] = 0;
    }
}

static void sgroup_invalidate(hx_sgroup *g)
{
    for (int r = 0; r < 3; r++)
        g->have[r] = 0;
}

int hx_sgroup_add_unit(const hx_search_ctx *s, hx_sgroup *g, int u)
{
    const hx_unit *un = &s->units[u];
    if (g->ndevices + un->ndevices > HX_MAX_GROUP_DEVICES || g->nunits >= HX_MAX_GROUP_DEVICES)
        return 0;
    g->units[g->nunits++] = u;
    for (int k = 0; k < un->ndevices; k++)
        g->devices[g->ndevices++] = un->first_device + k;
    sgroup_invalidate(g);
    return 1;
}

/* Rebuilds the device list from the units (after removing units). */
static void sgroup_rebuild(const hx_search_ctx *s, hx_sgroup *g)
{
    g->ndevices = 0;
    for (int i = 0; i < g->nunits; i++) {
        const hx_unit *un = &s->units[g->units[i]];
        for (int k = 0; k < un->ndevices; k++)
            g->devices[g->ndevices++] = un->first_device + k;
    }
    sgroup_invalidate(g);
}

static void sgroup_remove_unit(const hx_search_ctx *s, hx_sgroup *g, int idx)
{
    g->units[idx] = g->units[--g->nunits];
    sgroup_rebuild(s, g);
}

static int cmp_int_asc(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/*
 * Two independent hashes of (role, sorted device ids): FNV-1a over whole
 * words, and a multiplicative one; an entry matches only when both do.
 */
static void group_key(const hx_sgroup *g, int role, unsigned long long *key,
                      unsigned long long *check)
{
    int sorted[HX_MAX_GROUP_DEVICES];
    memcpy(sorted, g->devices, (size_t)g->ndevices * sizeof *sorted);
    qsort(sorted, (size_t)g->ndevices, sizeof *sorted, cmp_int_asc);
    unsigned long long h = 1469598103934665603ULL, c = (unsigned long long)role + 1;
    h = (h ^ (unsigned long long)(role + 1)) * 1099511628211ULL;
    for (int i = 0; i < g->ndevices; i++) {
        unsigned long long d = (unsigned long long)(unsigned)sorted[i] + 1;
        h = (h ^ d) * 1099511628211ULL;
        h ^= h >> 29;
        c = c * 0x9E3779B97F4A7C15ULL + d * 0xBF58476D1CE4E5B9ULL;
    }
    *key = h ? h : 1;
    *check = c ^ ((unsigned long long)g->ndevices << 48);
}

int hx_sgroup_eval(hx_search_ctx *s, hx_sgroup *g, int role)
{
    if (role < 0 || role > 2)
        return 0;
    if (!g->have[role]) {
        hx_layout_cache_entry *ce = NULL;
        unsigned long long key = 0, check = 0;
        if (s->cache && g->ndevices > 0) {
            group_key(g, role, &key, &check);
            ce = &s->cache[key % HX_LAYOUT_CACHE_SIZE];
            if (ce->key == key && ce->check == check && ce->ndevices == g->ndevices) {
                g->ok[role] = ce->ok;
                g->layout[role] = ce->layout;
                g->perf[role] = ce->perf;
                g->have[role] = 1;
                return g->ok[role];
            }
        }
        g->ok[role] = g->ndevices > 0 &&
                      hx_cost_best_layout(&s->cost, g->devices, g->ndevices, (hx_role)role,
                                          &g->layout[role], &g->perf[role]);
        g->have[role] = 1;
        if (ce) {
            ce->key = key;
            ce->check = check;
            ce->ndevices = g->ndevices;
            ce->ok = g->ok[role];
            ce->layout = g->layout[role];
            ce->perf = g->perf[role];
        }
    }
    return g->ok[role];
}

double hx_sgroup_capacity(hx_search_ctx *s, hx_sgroup *g)
{
    if (g->role == HX_ROLE_NONE || !hx_sgroup_eval(s, g, g->role))
        return 0;
    return g->perf[g->role].capacity_rps;
}

double hx_sgroup_usd_per_hour(const hx_search_ctx *s, const hx_sgroup *g)
{
    double usd = 0;
    for (int i = 0; i < g->ndevices; i++)
        usd += hx_graph_device_spec(s->graph, g->devices[i])->usd_per_hour;
    return usd;
}

hx_status hx_solution_init(hx_solution *sol, int cap)
{
    sol->n = 0;
    sol->cap = cap > 0 ? cap : 4;
    sol->value_rps = 0;
    sol->usd_per_hour = 0;
    sol->groups = malloc((size_t)sol->cap * sizeof *sol->groups);
    return sol->groups ? HX_OK : HX_ENOMEM;
}

void hx_solution_release(hx_solution *sol)
{
    if (!sol)
        return;
    free(sol->groups);
    sol->groups = NULL;
    sol->n = sol->cap = 0;
}

hx_status hx_solution_copy(hx_solution *dst, const hx_solution *src)
{
    hx_sgroup *g = malloc((size_t)(src->cap > 0 ? src->cap : 1) * sizeof *g);
    if (!g)
        return HX_ENOMEM;
    memcpy(g, src->groups, (size_t)src->n * sizeof *g);
    free(dst->groups);
    *dst = *src;
    dst->groups = g;
    return HX_OK;
}

hx_sgroup *hx_solution_add(hx_solution *sol)
{
    if (sol->n == sol->cap) {
        int ncap = sol->cap * 2;
        hx_sgroup *g = realloc(sol->groups, (size_t)ncap * sizeof *g);
        if (!g)
            return NULL;
        sol->groups = g;
        sol->cap = ncap;
    }
    hx_sgroup *g = &sol->groups[sol->n++];
    hx_sgroup_init(g);
    return g;
}

int hx_solution_better(const hx_solution *a, const hx_solution *b)
{
    double tol = 1e-7 * fmax(1.0, fmax(a->value_rps, b->value_rps));
    if (a->value_rps > b->value_rps + tol)
        return 1;
    if (a->value_rps < b->value_rps - tol)
        return 0;
    if (a->usd_per_hour < b->usd_per_hour - 1e-9)
        return 1;
    if (a->usd_per_hour > b->usd_per_hour + 1e-9)
        return 0;
    /* equal throughput and cost: more capacity in reserve (a step towards more) */
    return a->potential_rps > b->potential_rps * 1.001 + 1e-12;
}

/*
 * An upper bound on a solution's throughput that ignores the network:
 * colocated capacity + min(prefill, decode), capped by the offered rate.
 * Cheap (no max-flow), used to skip candidates that cannot win.
 */
static double solution_bound(hx_search_ctx *s, hx_solution *sol)
{
    double P = 0, D = 0, B = 0;
    for (int i = 0; i < sol->n; i++) {
        hx_sgroup *g = &sol->groups[i];
        if (g->role == HX_ROLE_NONE || !hx_sgroup_eval(s, g, g->role))
            continue;
        double c = g->perf[g->role].capacity_rps;
        if (g->role == HX_ROLE_PREFILL)
            P += c;
        else if (g->role == HX_ROLE_DECODE)
            D += c;
        else
            B += c;
    }
    double v = B + fmin(P, D);
    if (s->cost.wl.rate_rps > 0 && v > s->cost.wl.rate_rps)
        v = s->cost.wl.rate_rps;
    return v;
}

/* ------------------------------------------------------------------------- */
/* The evaluation network                                                     */

static int add_edge_aux(hx_search_ctx *s, int from, int to, double cap, int kind, int ref,
                        int aux)
{
    int e = hx_flow_add_edge(s->flow, from, to, cap);
    if (e < 0)
        return -1;
    if (e >= s->edge_cap) {
        int ncap = s->edge_cap ? s->edge_cap * 2 : 256;
        while (ncap <= e)
            ncap *= 2;
        int *k = realloc(s->edge_kind, (size_t)ncap * sizeof *k);
        if (!k)
            return -1;
        s->edge_kind = k;
        int *r = realloc(s->edge_ref, (size_t)ncap * sizeof *r);
        if (!r)
            return -1;
        s->edge_ref = r;
        int *x = realloc(s->edge_aux, (size_t)ncap * sizeof *x);
        if (!x)
            return -1;
        s->edge_aux = x;
        s->edge_cap = ncap;
    }
    s->edge_kind[e] = kind;
    s->edge_ref[e] = ref;
    s->edge_aux[e] = aux;
    return e;
}

static int add_edge(hx_search_ctx *s, int from, int to, double cap, int kind, int ref)
{
    return add_edge_aux(s, from, to, cap, kind, ref, -1);
}

/* (host, group, devices) triples, for groups sharing hosts and links. */
typedef struct host_use {
    int host, group, count;
} host_use;

static int cmp_host_use(const void *a, const void *b)
{
    const host_use *x = a, *y = b;
    if (x->host != y->host)
        return (x->host > y->host) - (x->host < y->host);
    return (x->group > y->group) - (x->group < y->group);
}

/* Node layout of the network. */
enum { N_SRC = 0, N_SNK = 1, N_RATE = 2, N_SPINE = 3, N_FIXED = 4 };

double hx_solution_evaluate(hx_search_ctx *s, hx_solution *sol)
{
    const hx_inventory *inv = s->inv;
    const hx_cost_params *cp = s->cost.params;
    double kvreq = s->cost.kv_bytes_per_request;
    double eff = cp->net_eff;
    int nsw = (int)inv->nswitches + 1; /* the last one stands for "no switch" */
    s->evaluations++;

    double both = 0, usd = 0, potential = 0;
    int nflow = 0;
    for (int i = 0; i < sol->n; i++) {
        hx_sgroup *g = &sol->groups[i];
        if (g->role == HX_ROLE_NONE)
            continue;
        if (!hx_sgroup_eval(s, g, g->role)) {
            g->role = HX_ROLE_NONE;
            continue;
        }
        potential += g->perf[g->role].capacity_rps;
        usd += hx_sgroup_usd_per_hour(s, g);
        if (g->role == HX_ROLE_BOTH)
            both += g->perf[HX_ROLE_BOTH].capacity_rps;
        else
            nflow++;
    }
    sol->usd_per_hour = usd;
    sol->potential_rps = potential;

    hx_flow_free(s->flow);
    s->flow = NULL;
    if (s->group_node_cap < sol->n) {
        int *gn = realloc(s->group_node, (size_t)sol->n * sizeof *gn);
        if (!gn) {
            sol->value_rps = 0;
            return 0;
        }
        s->group_node = gn;
        s->group_node_cap = sol->n;
    }
    double flow = 0;
    if (nflow > 0) {
        /* nodes: fixed, 2 per group (X and E/I), 3 per switch (hub, up, down) */
        int nodes = N_FIXED + 2 * sol->n + 3 * nsw;
        s->flow = hx_flow_new(nodes);
        if (!s->flow) {
            sol->value_rps = 0;
            return 0;
        }
        int hub0 = N_FIXED + 2 * sol->n, up0 = hub0 + nsw, down0 = up0 + nsw;
        double rate_cap = s->cost.wl.rate_rps > 0 ? fmax(s->cost.wl.rate_rps - both, 0)
                                                  : INFINITY;
        add_edge(s, N_SRC, N_RATE, rate_cap, HX_EK_RATE, -1);
        for (int sw = 0; sw < nsw; sw++) {
            double up = sw < (int)inv->nswitches ? inv->switches[sw].uplink_bytes_per_s : 0;
            double cap = up > 0 ? up * eff / kvreq : INFINITY;
            add_edge(s, hub0 + sw, up0 + sw, INFINITY, HX_EK_HUB, sw);
            add_edge(s, up0 + sw, N_SPINE, cap, HX_EK_UPLINK_UP, sw);
            add_edge(s, N_SPINE, down0 + sw, cap, HX_EK_UPLINK_DOWN, sw);
        }
        for (int i = 0; i < sol->n; i++) {
            hx_sgroup *g = &sol->groups[i];
            s->group_node[i] = -1;
            if (g->role != HX_ROLE_PREFILL && g->role != HX_ROLE_DECODE)
                continue;
            int x = N_FIXED + 2 * i, y = x + 1;
            s->group_node[i] = x;
            /* NIC share: each device carries its share of its host's NIC */
            double nic = 0;
            int sws[HX_MAX_GROUP_DEVICES], nsws = 0;
            for (int k = 0; k < g->ndevices; k++) {
                int h = hx_graph_device_host(s->graph, g->devices[k]);
                nic += inv->hosts[h].nic_bytes_per_s / inv->hosts[h].gpu_count;
                int sw = inv->hosts[h].switch_index >= 0 ? inv->hosts[h].switch_index : nsw - 1;
                int j;
                for (j = 0; j < nsws && sws[j] != sw; j++)
                    ;
                if (j == nsws)
                    sws[nsws++] = sw;
            }
            double niccap = nic * eff / kvreq;
            double cap = g->perf[g->role].capacity_rps;
            if (g->role == HX_ROLE_PREFILL) {
                add_edge(s, N_RATE, x, cap, HX_EK_PREFILL, i);
                add_edge(s, x, y, niccap, HX_EK_EGRESS, i);
                for (int j = 0; j < nsws; j++)
                    add_edge(s, y, hub0 + sws[j], INFINITY, HX_EK_HUB, sws[j]);
            } else {
                add_edge(s, x, N_SNK, cap, HX_EK_DECODE, i);
                add_edge(s, y, x, niccap, HX_EK_INGRESS, i);
                for (int j = 0; j < nsws; j++) {
                    add_edge(s, hub0 + sws[j], y, INFINITY, HX_EK_HUB, sws[j]);
                    add_edge(s, down0 + sws[j], y, INFINITY, HX_EK_HUB, sws[j]);
                }
            }
        }
        /* groups sharing a host: KV over the intra-host link, not the NIC */
        size_t nuse = 0, cap_use = 0;
        for (int i = 0; i < sol->n; i++)
            if (s->group_node[i] >= 0)
                cap_use += (size_t)sol->groups[i].ndevices;
        host_use *use = malloc((cap_use ? cap_use : 1) * sizeof *use);
        if (use) {
            for (int i = 0; i < sol->n; i++) {
                if (s->group_node[i] < 0)
                    continue;
                hx_sgroup *g = &sol->groups[i];
                for (int k = 0; k < g->ndevices; k++) {
                    int h = hx_graph_device_host(s->graph, g->devices[k]);
                    if (nuse > 0 && use[nuse - 1].host == h && use[nuse - 1].group == i)
                        use[nuse - 1].count++;
                    else
                        use[nuse++] = (host_use){h, i, 1};
                }
            }
            qsort(use, nuse, sizeof *use, cmp_host_use);
            for (size_t a = 0; a < nuse; a++) {
                for (size_t b = a + 1; b < nuse && use[b].host == use[a].host; b++) {
                    int ga = use[a].group, gb = use[b].group;
                    int ra = sol->groups[ga].role, rb = sol->groups[gb].role;
                    if (ra == rb)
                        continue;
                    int p = ra == HX_ROLE_PREFILL ? ga : gb, d = ra == HX_ROLE_PREFILL ? gb : ga;
                    int pairs = use[a].count < use[b].count ? use[a].count : use[b].count;
                    double bw = pairs * inv->hosts[use[a].host].intra_bytes_per_s * eff;
                    add_edge_aux(s, s->group_node[p], s->group_node[d], bw / kvreq,
                                 HX_EK_LOCAL, p, p * sol->n + d);
                }
            }
            /* explicit links between hosts of a prefill and a decode group */
            for (size_t li = 0; li < inv->nlinks; li++) {
                const hx_link *l = &inv->links[li];
                for (size_t a = 0; a < nuse; a++) {
                    if (use[a].host != l->host_a && use[a].host != l->host_b)
                        continue;
                    int other = use[a].host == l->host_a ? l->host_b : l->host_a;
                    for (size_t b = 0; b < nuse; b++) {
                        if (use[b].host != other)
                            continue;
                        int ga = use[a].group, gb = use[b].group;
                        if (sol->groups[ga].role != HX_ROLE_PREFILL ||
                            sol->groups[gb].role != HX_ROLE_DECODE)
                            continue;
                        add_edge_aux(s, s->group_node[ga] + 1, s->group_node[gb] + 1,
                                     l->bytes_per_s * eff / kvreq, HX_EK_LINK, (int)li,
                                     ga * sol->n + gb);
                    }
                }
            }
            free(use);
        }
        hx_err err;
        if (hx_flow_solve(s->flow, N_SRC, N_SNK, &flow, &err) != HX_OK)
            flow = 0;
    }
    double total = flow + both;
    if (s->cost.wl.rate_rps > 0 && total > s->cost.wl.rate_rps)
        total = s->cost.wl.rate_rps;
    sol->value_rps = total;
    return total;
}

/* ------------------------------------------------------------------------- */
/* Roles                                                                      */

typedef struct ratio_item {
    int group;
    double ratio;
} ratio_item;

static int cmp_ratio_desc(const void *a, const void *b)
{
    const ratio_item *x = a, *y = b;
    if (x->ratio != y->ratio)
        return x->ratio < y->ratio ? 1 : -1;
    return x->group - y->group;
}

/* Evaluates the split "first j of `order` prefill, the rest decode". */
static double eval_split(hx_search_ctx *s, hx_solution *sol, const ratio_item *order, int m,
                         int j)
{
    for (int i = 0; i < m; i++)
        sol->groups[order[i].group].role = i < j ? HX_ROLE_PREFILL : HX_ROLE_DECODE;
    return hx_solution_evaluate(s, sol);
}

void hx_solution_assign_roles(hx_search_ctx *s, hx_solution *sol, int allow_both)
{
    ratio_item *order = malloc((size_t)(sol->n > 0 ? sol->n : 1) * sizeof *order);
    if (!order)
        return;
    int m = 0;
    for (int i = 0; i < sol->n; i++) {
        hx_sgroup *g = &sol->groups[i];
        int p = hx_sgroup_eval(s, g, HX_ROLE_PREFILL);
        int d = hx_sgroup_eval(s, g, HX_ROLE_DECODE);
        if (!p && !d) {
            g->role = allow_both && hx_sgroup_eval(s, g, HX_ROLE_BOTH) ? HX_ROLE_BOTH
                                                                        : HX_ROLE_NONE;
            continue;
        }
        double rp = p ? g->perf[HX_ROLE_PREFILL].capacity_rps : 0;
        double rd = d ? g->perf[HX_ROLE_DECODE].capacity_rps : 0;
        order[m].group = i;
        order[m].ratio = !d ? INFINITY : rp / rd;
        m++;
    }
    qsort(order, (size_t)m, sizeof *order, cmp_ratio_desc);
    int best_j = 0;
    double best = -1;
    if (m >= 2) {
        /*
         * The network-free bound min(prefix prefill, suffix decode) picks the
         * split; the max-flow then checks it and its neighbours, which is
         * where the network can move the optimum.
         */
        double *pre = malloc((size_t)(m + 1) * sizeof *pre);
        double *suf = malloc((size_t)(m + 1) * sizeof *suf);
        int jb = 1;
        if (pre && suf) {
            pre[0] = 0;
            for (int i = 0; i < m; i++) {
                hx_sgroup *g = &sol->groups[order[i].group];
                pre[i + 1] = pre[i] + (g->ok[HX_ROLE_PREFILL]
                                           ? g->perf[HX_ROLE_PREFILL].capacity_rps
                                           : 0);
            }
            suf[m] = 0;
            for (int i = m - 1; i >= 0; i--) {
                hx_sgroup *g = &sol->groups[order[i].group];
                suf[i] = suf[i + 1] + (g->ok[HX_ROLE_DECODE]
                                           ? g->perf[HX_ROLE_DECODE].capacity_rps
                                           : 0);
            }
            double bb = -1;
            for (int j = 1; j < m; j++) {
                double v = fmin(pre[j], suf[j]);
                if (v > bb) {
                    bb = v;
                    jb = j;
                }
            }
        }
        free(pre);
        free(suf);
        int span = m <= 16 ? m : 3;
        for (int j = jb - span; j <= jb + span; j++) {
            if (j < 1 || j >= m)
                continue;
            double v = eval_split(s, sol, order, m, j);
            if (v > best + EPS_RPS) {
                best = v;
                best_j = j;
            }
        }
    }
    if (m >= 1) {
        if (best_j > 0)
            eval_split(s, sol, order, m, best_j);
        else
            for (int i = 0; i < m; i++)
                sol->groups[order[i].group].role = HX_ROLE_NONE;
    }
    /* a lone group (or groups no split serves) may still serve colocated */
    if (allow_both) {
        double v = hx_solution_evaluate(s, sol);
        for (int i = 0; i < m; i++) {
            hx_sgroup *g = &sol->groups[order[i].group];
            if (g->role != HX_ROLE_NONE || !hx_sgroup_eval(s, g, HX_ROLE_BOTH))
                continue;
            g->role = HX_ROLE_BOTH;
            double w = hx_solution_evaluate(s, sol);
            if (w <= v + EPS_RPS)
                g->role = HX_ROLE_NONE;
            else
                v = w;
        }
    }
    free(order);
    hx_solution_evaluate(s, sol);
}

/* ------------------------------------------------------------------------- */
/* Units and the initial partition                                            */

static int valid_tp(const hx_model *m, int t)
{
    return t >= 1 && m->num_heads % t == 0 &&
           (m->num_kv_heads % t == 0 || t % m->num_kv_heads == 0);
}

/*
 * Cuts hosts into units: the smallest slice (a power of two that is a valid
 * TP degree) whose memory holds a replica with some KV room; whole hosts when
 * even the host cannot. `type` (or -1 for all) keeps only hosts of that type.
 */
static hx_status make_units(hx_search_ctx *s, int type)
{
    const hx_inventory *inv = s->inv;
    double need = (double)hx_model_weight_bytes(s->model) * 1.25;
    free(s->units);
    s->units = malloc((inv->ndevices ? inv->ndevices : 1) * sizeof *s->units);
    if (!s->units)
        return HX_ENOMEM;
    s->nunits = 0;
    for (size_t h = 0; h < inv->nhosts; h++) {
        const hx_host *host = &inv->hosts[h];
        if (type >= 0 && host->gpu_type != type)
            continue;
        double mem = inv->types[host->gpu_type].memory_bytes * s->cost.params->mem_util;
        int u = 1;
        /* small clusters: every device is a unit, so any grouping is reachable */
        if (inv->ndevices > HX_SEARCH_FINE_DEVICES) {
            while (u < host->gpu_count && (u * mem < need || !valid_tp(s->model, u)))
                u *= 2;
            if (u > host->gpu_count || u * mem < need)
                u = host->gpu_count;
        }
        if (u > HX_MAX_GROUP_DEVICES)
            u = HX_MAX_GROUP_DEVICES;
        for (int first = 0; first < host->gpu_count; first += u) {
            int n = host->gpu_count - first < u ? host->gpu_count - first : u;
            hx_unit *un = &s->units[s->nunits++];
            un->host = (int)h;
            un->first_device = host->first_device + first;
            un->ndevices = n;
            un->mem_bytes = n * mem;
        }
    }
    return HX_OK;
}

/* Bandwidth between two units. */
static double unit_bw(const hx_search_ctx *s, int a, int b)
{
    const hx_unit *x = &s->units[a], *y = &s->units[b];
    return hx_graph_host_path(s->graph, x->host, y->host).bytes_per_s;
}

typedef struct ugraph {
    int *xadj, *adj;
    double *ew, *vw;
} ugraph;

static void ugraph_free(ugraph *g)
{
    free(g->xadj);
    free(g->adj);
    free(g->ew);
    free(g->vw);
}

/*
 * The unit graph: units of a host or a switch are joined (a band of
 * neighbours in very large switches, where all pairs look alike), and
 * consecutive switches by one edge each so the graph stays connected.
 */
static hx_status build_unit_graph(const hx_search_ctx *s, ugraph *g)
{
    const hx_inventory *inv = s->inv;
    int n = s->nunits;
    const int band = 24;
    /* neighbour lists as (a, b) pairs, then CSR */
    size_t cap = (size_t)n * (band + 4) + 16, m = 0;
    int *ea = malloc(cap * sizeof *ea), *eb = malloc(cap * sizeof *eb);
    memset(g, 0, sizeof *g);
    g->xadj = calloc((size_t)n + 1, sizeof *g->xadj);
    g->vw = malloc((size_t)n * sizeof *g->vw);
    if (!ea || !eb || !g->xadj || !g->vw) {
        free(ea);
        free(eb);
        ugraph_free(g);
        return HX_ENOMEM;
    }
    int prev_switch_first = -1, prev_switch = -2;
    for (int a = 0; a < n; a++) {
        g->vw[a] = s->units[a].mem_bytes / 1e9;
        int swa = inv->hosts[s->units[a].host].switch_index;
        if (swa != prev_switch) {
            if (prev_switch_first >= 0 && m < cap) {
                ea[m] = prev_switch_first;
                eb[m++] = a;
            }
            prev_switch_first = a;
            prev_switch = swa;
        }
        for (int b = a + 1; b < n && b <= a + band && m < cap; b++) {
            int swb = inv->hosts[s->units[b].host].switch_index;
            if (swb != swa && s->units[b].host != s->units[a].host)
                break;
            ea[m] = a;
            eb[m++] = b;
        }
    }
    /* close the ring of switches */
    if (prev_switch_first > 0 && m < cap) {
        ea[m] = 0;
        eb[m++] = prev_switch_first;
    }
    for (size_t e = 0; e < m; e++) {
        g->xadj[ea[e] + 1]++;
        g->xadj[eb[e] + 1]++;
    }
    for (int v = 0; v < n; v++)
        g->xadj[v + 1] += g->xadj[v];
    g->adj = malloc((2 * m + 1) * sizeof *g->adj);
    g->ew = malloc((2 * m + 1) * sizeof *g->ew);
    int *fill = calloc((size_t)n, sizeof *fill);
    if (!g->adj || !g->ew || !fill) {
        free(ea);
        free(eb);
        free(fill);
        ugraph_free(g);
        return HX_ENOMEM;
    }
    for (size_t e = 0; e < m; e++) {
        double w = unit_bw(s, ea[e], eb[e]) / 1e9;
        if (!(w > 0) || isinf(w))
            w = 1e3;
        int a = ea[e], b = eb[e];
        g->adj[g->xadj[a] + fill[a]] = b;
        g->ew[g->xadj[a] + fill[a]++] = w;
        g->adj[g->xadj[b] + fill[b]] = a;
        g->ew[g->xadj[b] + fill[b]++] = w;
    }
    free(ea);
    free(eb);
    free(fill);
    return HX_OK;
}

/* Groups from a partition of the units. */
static hx_status solution_from_parts(hx_search_ctx *s, const int *part, int k, hx_solution *sol)
{
    hx_status st = hx_solution_init(sol, k);
    if (st != HX_OK)
        return st;
    for (int p = 0; p < k; p++)
        if (!hx_solution_add(sol))
            return HX_ENOMEM;
    for (int u = 0; u < s->nunits; u++) {
        hx_sgroup *g = &sol->groups[part[u]];
        if (!hx_sgroup_add_unit(s, g, u)) {
            /* too many devices for one group: start another */
            hx_sgroup *ng = hx_solution_add(sol);
            if (!ng)
                return HX_ENOMEM;
            hx_sgroup_add_unit(s, ng, u);
        }
    }
    /* drop empty groups */
    int w = 0;
    for (int i = 0; i < sol->n; i++)
        if (sol->groups[i].nunits > 0)
            sol->groups[w++] = sol->groups[i];
    sol->n = w;
    return HX_OK;
}

/* Sets roles for colocated solutions: both where feasible. */
static void assign_colocated(hx_search_ctx *s, hx_solution *sol)
{
    for (int i = 0; i < sol->n; i++)
        sol->groups[i].role =
            hx_sgroup_eval(s, &sol->groups[i], HX_ROLE_BOTH) ? HX_ROLE_BOTH : HX_ROLE_NONE;
    hx_solution_evaluate(s, sol);
}

/* The initial solution: the best over k and partitioning methods. */
#define MAX_STARTS 8

/*
 * Keeps the `max` best solutions in starts[0..*n), best first; takes
 * ownership of sol (released when it does not make the list).
 */
static void keep_start(hx_solution *starts, int *n, int max, hx_solution *sol)
{
    /* the same partition found twice (spectral and METIS often agree) */
    for (int i = 0; i < *n; i++)
        if (starts[i].n == sol->n &&
            fabs(starts[i].value_rps - sol->value_rps) <= 1e-9 * fmax(1, sol->value_rps) &&
            fabs(starts[i].usd_per_hour - sol->usd_per_hour) <= 1e-9) {
            hx_solution_release(sol);
            return;
        }
    int pos = *n;
    while (pos > 0 && hx_solution_better(sol, &starts[pos - 1]))
        pos--;
    if (pos >= max) {
        hx_solution_release(sol);
        return;
    }
    if (*n == max)
        hx_solution_release(&starts[--*n]);
    memmove(&starts[pos + 1], &starts[pos], (size_t)(*n - pos) * sizeof *starts);
    starts[pos] = *sol;
    (*n)++;
}

/* The starting solutions: the best few over k and partitioning methods. */
static hx_status initial_solutions(hx_search_ctx *s, int colocated, unsigned long seed,
                                   hx_solution *starts, int max_starts, int *nstarts)
{
    double total_mem = 0;
    for (int u = 0; u < s->nunits; u++)
        total_mem += s->units[u].mem_bytes;
    double replica = (double)hx_model_weight_bytes(s->model) * 1.3;
    int kmax = (int)floor(total_mem / replica);
    if (kmax > s->nunits)
        kmax = s->nunits;
    if (kmax < 1)
        kmax = 1;
    ugraph ug;
    hx_status st = build_unit_graph(s, &ug);
    if (st != HX_OK)
        return st;
    int *part = malloc((size_t)s->nunits * sizeof *part);
    if (!part) {
        ugraph_free(&ug);
        return HX_ENOMEM;
    }
    hx_wgraph wg = {s->nunits, ug.xadj, ug.adj, ug.ew, ug.vw};
    static const double fractions[] = {1.0, 0.75, 0.5, 0.34, 0.25, 0.17, 0.125};
    int tried[16], ntried = 0;
    *nstarts = 0;
    for (size_t fi = 0; fi < sizeof fractions / sizeof fractions[0]; fi++) {
        int k = (int)lround(kmax * fractions[fi]);
        if (k < 1)
            k = 1;
        int dup = 0;
        for (int t = 0; t < ntried; t++)
            if (tried[t] == k)
                dup = 1;
        if (dup)
            continue;
        tried[ntried++] = k;
        for (int method = 0; method < 2; method++) {
            hx_partition_opts po = {method == 0 ? HX_PARTITION_SPECTRAL : HX_PARTITION_METIS,
                                    k, NULL, 0.15, seed};
            hx_err err;
            if (k == s->nunits) {
                for (int u = 0; u < s->nunits; u++)
                    part[u] = u;
                if (method == 1)
                    continue;
            } else if (k == 1) {
                memset(part, 0, (size_t)s->nunits * sizeof *part);
                if (method == 1)
                    continue;
            } else if (hx_partition(&wg, &po, part, &err) != HX_OK) {
                continue;
            }
            hx_solution sol = {0};
            if (solution_from_parts(s, part, k, &sol) != HX_OK) {
                hx_solution_release(&sol);
                continue;
            }
            if (colocated)
                assign_colocated(s, &sol);
            else
                hx_solution_assign_roles(s, &sol, 1);
            HX_DEBUG("search: k=%d %s: %d groups, %.4g req/s", k, method ? "metis" : "spectral",
                     sol.n, sol.value_rps);
            keep_start(starts, nstarts, max_starts, &sol);
        }
    }
    free(part);
    ugraph_free(&ug);
    return *nstarts > 0 ? HX_OK : HX_EINVAL;
}

/* ------------------------------------------------------------------------- */
/* Refinement                                                                 */

typedef struct cut_info {
    int prefill_bound, decode_bound, net_bound, rate_bound;
} cut_info;

static cut_info read_cut(const hx_search_ctx *s)
{
    cut_info ci = {0, 0, 0, 0};
    if (!s->flow)
        return ci;
    for (int e = 0; e < hx_flow_num_edges(s->flow); e++) {
        if (!hx_flow_edge_in_cut(s->flow, e))
            continue;
        switch (s->edge_kind[e]) {
        case HX_EK_RATE: ci.rate_bound = 1; break;
        case HX_EK_PREFILL: ci.prefill_bound = 1; break;
        case HX_EK_DECODE: ci.decode_bound = 1; break;
        default: ci.net_bound = 1; break;
        }
    }
    return ci;
}

/* A move changes at most two groups (or adds one); undo restores them. */
typedef struct undo {
    int idx[2];
    hx_sgroup saved[2];
    int nsaved;
    int old_n;
} undo;

static void undo_begin(undo *u, const hx_solution *sol)
{
    u->nsaved = 0;
    u->old_n = sol->n;
}

static void undo_save(undo *u, const hx_solution *sol, int i)
{
    for (int k = 0; k < u->nsaved; k++)
        if (u->idx[k] == i)
            return;
    u->idx[u->nsaved] = i;
    u->saved[u->nsaved++] = sol->groups[i];
}

static void undo_apply(const undo *u, hx_solution *sol)
{
    for (int k = u->nsaved - 1; k >= 0; k--)
        sol->groups[u->idx[k]] = u->saved[k];
    sol->n = u->old_n;
}

typedef enum move_kind {
    MV_ROLE,      /* group a takes `role` */
    MV_MOVE_UNIT, /* unit ua of group a joins group b */
    MV_SWAP,      /* unit ua of a and unit ub of b trade places */
    MV_MERGE,     /* group b joins group a */
    MV_SPLIT,     /* the second half of a's units forms a new group with `role` */
    MV_EXTRACT    /* unit ua of a forms a new group with `role` */
} move_kind;

typedef struct move {
    move_kind kind;
    int a, b;   /* groups */
    int ua, ub; /* unit indices within the groups */
    int role;
} move;

/* Applies a move (recording undo). Returns 0 when it does not apply. */
static int apply_move(hx_search_ctx *s, hx_solution *sol, const move *mv, undo *u)
{
    hx_sgroup *a = &sol->groups[mv->a];
    switch (mv->kind) {
    case MV_ROLE:
        undo_save(u, sol, mv->a);
        a->role = mv->role;
        return 1;
    case MV_MOVE_UNIT: {
        hx_sgroup *b = &sol->groups[mv->b];
        if (a->nunits < 2)
            return 0;
        undo_save(u, sol, mv->a);
        undo_save(u, sol, mv->b);
        int unit = a->units[mv->ua];
        if (!hx_sgroup_add_unit(s, b, unit))
            return 0;
        sgroup_remove_unit(s, a, mv->ua);
        return 1;
    }
    case MV_SWAP: {
        hx_sgroup *b = &sol->groups[mv->b];
        undo_save(u, sol, mv->a);
        undo_save(u, sol, mv->b);
        int x = a->units[mv->ua], y = b->units[mv->ub];
        int dx = s->units[x].ndevices, dy = s->units[y].ndevices;
        if (a->ndevices - dx + dy > HX_MAX_GROUP_DEVICES ||
            b->ndevices - dy + dx > HX_MAX_GROUP_DEVICES)
            return 0;
        a->units[mv->ua] = y;
        b->units[mv->ub] = x;
        sgroup_rebuild(s, a);
        sgroup_rebuild(s, b);
        return 1;
    }
    case MV_MERGE: {
        hx_sgroup *b = &sol->groups[mv->b];
        if (a->ndevices + b->ndevices > HX_MAX_GROUP_DEVICES)
            return 0;
        undo_save(u, sol, mv->a);
        undo_save(u, sol, mv->b);
        for (int i = 0; i < b->nunits; i++)
            hx_sgroup_add_unit(s, a, b->units[i]);
        b->nunits = 0;
        b->ndevices = 0;
        b->role = HX_ROLE_NONE;
        sgroup_invalidate(b);
        return 1;
    }
    case MV_EXTRACT: {
        if (a->nunits < 2)
            return 0;
        undo_save(u, sol, mv->a);
        hx_sgroup *ng = hx_solution_add(sol);
        if (!ng)
            return 0;
        a = &sol->groups[mv->a]; /* the array may have moved */
        hx_sgroup_add_unit(s, ng, a->units[mv->ua]);
        sgroup_remove_unit(s, a, mv->ua);
        ng->role = mv->role;
        return 1;
    }
    case MV_SPLIT: {
        if (a->nunits < 2)
            return 0;
        undo_save(u, sol, mv->a);
        hx_sgroup *ng = hx_solution_add(sol);
        if (!ng)
            return 0;
        a = &sol->groups[mv->a]; /* the array may have moved */
        int half = a->nunits / 2;
        for (int i = half; i < a->nunits; i++)
            hx_sgroup_add_unit(s, ng, a->units[i]);
        a->nunits = half;
        sgroup_rebuild(s, a);
        ng->role = mv->role;
        return 1;
    }
    }
    return 0;
}

/* Slack of a group in the last flow: capacity minus what flows through it. */
static double group_slack(hx_search_ctx *s, const hx_solution *sol, int i)
{
    (void)sol;
    if (!s->flow || s->group_node[i] < 0)
        return 0;
    for (int e = 0; e < hx_flow_num_edges(s->flow); e++) {
        int k = s->edge_kind[e];
        if ((k == HX_EK_PREFILL || k == HX_EK_DECODE) && s->edge_ref[e] == i)
            return hx_flow_edge_cap(s->flow, e) - hx_flow_edge_flow(s->flow, e);
    }
    return 0;
}

typedef struct scored {
    int group;
    double score;
} scored;

static int cmp_scored_desc(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? 1 : -1;
    return x->group - y->group;
}

/* Compute-to-bandwidth ratio of a unit: high = better at prefill. */
static double unit_prefill_affinity(const hx_search_ctx *s, int u)
{
    const hx_gpu_spec *sp = hx_graph_device_spec(s->graph, s->units[u].first_device);
    return sp->bf16_flops / sp->hbm_bytes_per_s;
}

/* Every move of the neighbourhood, for small solutions; returns -1 when too many. */
static int gen_all_moves(const hx_solution *sol, int colocated, move *mv, int max)
{
    int n = 0, nunits = 0, ng = 0;
    for (int i = 0; i < sol->n; i++)
        if (sol->groups[i].nunits > 0) {
            nunits += sol->groups[i].nunits;
            ng++;
        }
    long estimate = (long)ng * 4 + (long)nunits * (ng + 3) + (long)ng * ng +
                    (nunits <= 16 ? (long)nunits * nunits : 0);
    if (estimate > max)
        return -1;
#define PUSH(...)                                                                       \
    do {                                                                                \
        if (n < max)                                                                    \
            mv[n++] = (move){__VA_ARGS__};                                              \
    } while (0)
    const int roles[] = {HX_ROLE_PREFILL, HX_ROLE_DECODE, HX_ROLE_BOTH, HX_ROLE_NONE};
    for (int i = 0; i < sol->n; i++) {
        const hx_sgroup *a = &sol->groups[i];
        if (a->nunits == 0)
            continue;
        for (int r = 0; r < 4; r++)
            if (roles[r] != a->role && (!colocated || roles[r] == HX_ROLE_BOTH ||
                                        roles[r] == HX_ROLE_NONE))
                PUSH(MV_ROLE, i, -1, -1, -1, roles[r]);
        for (int x = 0; x < a->nunits && a->nunits > 1; x++) {
            for (int j = 0; j < sol->n; j++)
                if (j != i && sol->groups[j].nunits > 0)
                    PUSH(MV_MOVE_UNIT, i, j, x, -1, -1);
            for (int r = 0; r < 3; r++)
                if (!colocated || roles[r] == HX_ROLE_BOTH)
                    PUSH(MV_EXTRACT, i, -1, x, -1, roles[r]);
        }
        for (int j = i + 1; j < sol->n; j++)
            if (sol->groups[j].nunits > 0)
                PUSH(MV_MERGE, i, j, -1, -1, -1);
        if (nunits <= 16)
            for (int j = i + 1; j < sol->n; j++)
                for (int x = 0; x < a->nunits; x++)
                    for (int y = 0; y < sol->groups[j].nunits; y++)
                        PUSH(MV_SWAP, i, j, x, y, -1);
    }
#undef PUSH
    return n;
}

/* Candidate moves for one refinement step, most promising first. */
static int gen_moves(hx_search_ctx *s, const hx_solution *sol, int colocated, move *mv,
                     int max, unsigned long long *rng)
{
    int n = 0;
    cut_info ci = read_cut(s);
    scored *byslack = malloc((size_t)(sol->n > 0 ? sol->n : 1) * sizeof *byslack);
    if (!byslack)
        return 0;
    int ns = 0;
    for (int i = 0; i < sol->n; i++) {
        if (sol->groups[i].nunits == 0)
            continue;
        byslack[ns].group = i;
        byslack[ns].score = group_slack(s, sol, i);
        ns++;
    }
    qsort(byslack, (size_t)ns, sizeof *byslack, cmp_scored_desc);

    if (!colocated) {
        /* flip roles towards the saturated side */
        int want_from = ci.decode_bound && !ci.prefill_bound ? HX_ROLE_PREFILL
                        : ci.prefill_bound && !ci.decode_bound ? HX_ROLE_DECODE
                                                               : -2;
        int flips = 0;
        for (int k = 0; k < ns && n < max && flips < 6; k++) {
            int i = byslack[k].group;
            const hx_sgroup *g = &sol->groups[i];
            if (want_from != -2 && g->role != want_from)
                continue;
            if (g->role == HX_ROLE_PREFILL || g->role == HX_ROLE_DECODE) {
                mv[n++] = (move){MV_ROLE, i, -1, -1, -1,
                                 g->role == HX_ROLE_PREFILL ? HX_ROLE_DECODE : HX_ROLE_PREFILL};
                flips++;
            }
        }
        /* a group that carries no flow costs money for nothing */
        for (int i = 0; i < sol->n && n < max; i++) {
            const hx_sgroup *g = &sol->groups[i];
            if ((g->role == HX_ROLE_PREFILL || g->role == HX_ROLE_DECODE) && g->nunits > 0 &&
                hx_sgroup_eval(s, (hx_sgroup *)g, g->role) &&
                group_slack(s, sol, i) >= g->perf[g->role].capacity_rps * (1 - 1e-9))
                mv[n++] = (move){MV_ROLE, i, -1, -1, -1, HX_ROLE_NONE};
        }
        /* unused or colocated groups may take a side; any group may go colocated */
        for (int i = 0; i < sol->n && n < max; i++) {
            const hx_sgroup *g = &sol->groups[i];
            if (g->nunits == 0)
                continue;
            if (g->role == HX_ROLE_NONE || g->role == HX_ROLE_BOTH) {
                if (n < max)
                    mv[n++] = (move){MV_ROLE, i, -1, -1, -1, HX_ROLE_PREFILL};
                if (n < max)
                    mv[n++] = (move){MV_ROLE, i, -1, -1, -1, HX_ROLE_DECODE};
            }
        }
        if (ns > 0 && n < max) {
            int i = byslack[(size_t)(rng_next(rng) % (unsigned long long)ns)].group;
            if (sol->groups[i].role != HX_ROLE_BOTH)
                mv[n++] = (move){MV_ROLE, i, -1, -1, -1, HX_ROLE_BOTH};
        }
    }
    /* move a unit from a group with slack to one on the saturated side */
    for (int k = 0; k < ns && n < max; k++) {
        int i = byslack[k].group;
        const hx_sgroup *src = &sol->groups[i];
        if (src->nunits < 2)
            continue;
        int tries = 0;
        for (int k2 = ns - 1; k2 >= 0 && n < max && tries < 2; k2--) {
            int j = byslack[k2].group;
            if (j == i || sol->groups[j].role == HX_ROLE_NONE)
                continue;
            int ua = (int)(rng_next(rng) % (unsigned long long)src->nunits);
            mv[n++] = (move){MV_MOVE_UNIT, i, j, ua, -1, -1};
            tries++;
        }
        if (k > 4)
            break;
    }
    /* swap units so that compute-rich units prefill and bandwidth-rich ones decode */
    if (!colocated) {
        int swaps = 0;
        for (int i = 0; i < sol->n && n < max && swaps < 4; i++) {
            const hx_sgroup *p = &sol->groups[i];
            if (p->role != HX_ROLE_DECODE)
                continue;
            for (int j = 0; j < sol->n && n < max && swaps < 4; j++) {
                const hx_sgroup *q = &sol->groups[j];
                if (q->role != HX_ROLE_PREFILL)
                    continue;
                /* decode group's most compute-rich unit vs prefill group's least */
                int ua = 0, ub = 0;
                for (int x = 1; x < p->nunits; x++)
                    if (unit_prefill_affinity(s, p->units[x]) >
                        unit_prefill_affinity(s, p->units[ua]))
                        ua = x;
                for (int x = 1; x < q->nunits; x++)
                    if (unit_prefill_affinity(s, q->units[x]) <
                        unit_prefill_affinity(s, q->units[ub]))
                        ub = x;
                if (unit_prefill_affinity(s, p->units[ua]) >
                    unit_prefill_affinity(s, q->units[ub]) * 1.05) {
                    mv[n++] = (move){MV_SWAP, i, j, ua, ub, -1};
                    swaps++;
                }
            }
        }
    }
    /* merge two small groups of one role on one switch; split large ones */
    int merges = 0;
    for (int k = ns - 1; k >= 0 && n < max && merges < 3; k--) {
        int i = byslack[k].group;
        const hx_sgroup *a = &sol->groups[i];
        int swa = s->inv->hosts[s->units[a->units[0]].host].switch_index;
        for (int j = 0; j < sol->n && n < max; j++) {
            const hx_sgroup *b = &sol->groups[j];
            if (j == i || b->nunits == 0 || b->role != a->role ||
                s->inv->hosts[s->units[b->units[0]].host].switch_index != swa)
                continue;
            mv[n++] = (move){MV_MERGE, i, j, -1, -1, -1};
            merges++;
            break;
        }
    }
    int splits = 0;
    for (int k = 0; k < ns && n < max && splits < 3; k++) {
        int i = byslack[k].group;
        const hx_sgroup *a = &sol->groups[i];
        if (a->nunits < 2)
            continue;
        int role = colocated ? HX_ROLE_BOTH
                   : a->role == HX_ROLE_PREFILL ? HX_ROLE_DECODE
                                                : HX_ROLE_PREFILL;
        mv[n++] = (move){MV_SPLIT, i, -1, -1, -1, role};
        if (!colocated && n < max)
            mv[n++] = (move){MV_SPLIT, i, -1, -1, -1, a->role};
        splits++;
    }
    free(byslack);
    return n;
}

/* Refines `sol` in place until no move helps or the deadline passes. */
static int refine(hx_search_ctx *s, hx_solution *sol, int colocated, double deadline,
                  unsigned long seed)
{
    enum { MAX_MOVES = 48 };
    move *mv = malloc(FULL_NEIGHBOURHOOD_MAX * sizeof *mv);
    if (!mv)
        return 0;
    unsigned long long rng = seed * 0x9E3779B97F4A7C15ULL + 7;
    int accepted = 0, stale = 0;
    hx_solution_evaluate(s, sol);
    for (int it = 0; it < MAX_REFINE_ITERATIONS && now_s() < deadline; it++) {
        int nm = gen_all_moves(sol, colocated, mv, FULL_NEIGHBOURHOOD_MAX);
        int full = nm >= 0;
        if (!full)
            nm = gen_moves(s, sol, colocated, mv, MAX_MOVES, &rng);
        int best = -1;
        double best_v = sol->value_rps, best_usd = sol->usd_per_hour,
               best_pot = sol->potential_rps;
        for (int k = 0; k < nm && now_s() < deadline; k++) {
            undo u;
            undo_begin(&u, sol);
            double old_v = sol->value_rps, old_usd = sol->usd_per_hour,
                   old_pot = sol->potential_rps;
            if (apply_move(s, sol, &mv[k], &u)) {
                if (colocated)
                    for (int i = 0; i < sol->n; i++)
                        if (sol->groups[i].nunits > 0)
                            sol->groups[i].role = hx_sgroup_eval(s, &sol->groups[i],
                                                                 HX_ROLE_BOTH)
                                                      ? HX_ROLE_BOTH
                                                      : HX_ROLE_NONE;
                hx_solution trial = *sol;
                double tol = 1e-7 * fmax(1.0, best_v);
                if (solution_bound(s, &trial) < best_v - tol) {
                    undo_apply(&u, sol);
                    sol->value_rps = old_v;
                    sol->usd_per_hour = old_usd;
                    sol->potential_rps = old_pot;
                    continue;
                }
                hx_solution_evaluate(s, &trial);
                hx_solution ref = *sol;
                ref.value_rps = best_v;
                ref.usd_per_hour = best_usd;
                ref.potential_rps = best_pot;
                if (hx_solution_better(&trial, &ref)) {
                    best = k;
                    best_v = trial.value_rps;
                    best_usd = trial.usd_per_hour;
                    best_pot = trial.potential_rps;
                }
            }
            undo_apply(&u, sol);
            sol->value_rps = old_v;
            sol->usd_per_hour = old_usd;
            sol->potential_rps = old_pot;
        }
        if (best < 0) {
            /* the random parts of the candidates may find something next time */
            if (full || ++stale >= 3)
                break;
            hx_solution_evaluate(s, sol);
            continue;
        }
        stale = 0;
        undo u;
        undo_begin(&u, sol);
        apply_move(s, sol, &mv[best], &u);
        if (colocated)
            assign_colocated(s, sol);
        /* keep the group list compact: drop emptied groups */
        int w = 0;
        for (int i = 0; i < sol->n; i++)
            if (sol->groups[i].nunits > 0)
                sol->groups[w++] = sol->groups[i];
        sol->n = w;
        hx_solution_evaluate(s, sol);
        accepted++;
    }
    hx_solution_evaluate(s, sol);
    free(mv);
    return accepted;
}

/* ------------------------------------------------------------------------- */
/* Plans                                                                      */

static hx_status fill_hosts(const hx_search_ctx *s, const hx_solution *sol, hx_plan *p,
                            int *router_host)
{
    const hx_inventory *inv = s->inv;
    char *used = calloc(inv->nhosts ? inv->nhosts : 1, 1);
    if (!used)
        return HX_ENOMEM;
    *router_host = -1;
    for (int pass = 0; pass < 3; pass++) /* the router lives with the first prefill group */
        for (int i = 0; i < sol->n && *router_host < 0; i++) {
            const hx_sgroup *g = &sol->groups[i];
            int want = pass == 0 ? HX_ROLE_PREFILL : pass == 1 ? HX_ROLE_BOTH : HX_ROLE_DECODE;
            if (g->role == want && g->ndevices > 0)
                *router_host = hx_graph_device_host(s->graph, g->devices[0]);
        }
    for (int i = 0; i < sol->n; i++) {
        const hx_sgroup *g = &sol->groups[i];
        if (g->role == HX_ROLE_NONE)
            continue;
        for (int k = 0; k < g->ndevices; k++)
            used[hx_graph_device_host(s->graph, g->devices[k])] = 1;
    }
    hx_status st = HX_OK;
    /* the cluster the plan runs on, for the simulator and for people */
    p->cluster = hx_inventory_to_json(inv, (const unsigned char *)used);
    if (!p->cluster)
        st = HX_ENOMEM;
    for (size_t h = 0; h < inv->nhosts && st == HX_OK; h++) {
        if (!used[h])
            continue;
        const hx_host *host = &inv->hosts[h];
        hx_plan_host *ph = hx_plan_add_host(p, host->name, host->address);
        if (!ph) {
            st = HX_ENOMEM;
            break;
        }
        ph->ssh_port = host->ssh.port;
        if (hx_plan_set_str(&ph->ssh_user, host->ssh.user) != HX_OK ||
            hx_plan_set_str(&ph->ssh_identity, host->ssh.identity) != HX_OK ||
            hx_plan_set_str(&ph->ssh_known_hosts, host->ssh.known_hosts) != HX_OK ||
            hx_plan_set_str(&ph->workdir, host->workdir) != HX_OK)
            st = HX_ENOMEM;
    }
    free(used);
    return st;
}

/* Decomposes the flow into routes between prefill and decode groups. */
typedef struct route_acc {
    int p, d;
    double rps;
} route_acc;

typedef struct route_list {
    route_acc *v;
    int n, cap;
} route_list;

static int route_add(route_list *r, int p, int d, double rps)
{
    if (rps <= EPS_RPS)
        return 1;
    for (int k = 0; k < r->n; k++)
        if (r->v[k].p == p && r->v[k].d == d) {
            r->v[k].rps += rps;
            return 1;
        }
    if (r->n == r->cap) {
        int ncap = r->cap ? r->cap * 2 : 16;
        route_acc *nv = realloc(r->v, (size_t)ncap * sizeof *nv);
        if (!nv)
            return 0;
        r->v = nv;
        r->cap = ncap;
    }
    r->v[r->n++] = (route_acc){p, d, rps};
    return 1;
}

/*
 * Routes from the flow: pairwise edges (same host, explicit links) are routes
 * already; the rest went through switches, and is matched greedily, within a
 * switch first (which never needs more uplink than the flow used), then
 * across the spine.
 */
static hx_status collect_routes(hx_search_ctx *s, const hx_solution *sol, route_list *r)
{
    memset(r, 0, sizeof *r);
    if (!s->flow)
        return HX_OK;
    const hx_inventory *inv = s->inv;
    int nsw = (int)inv->nswitches + 1, n = sol->n;
    double *out_p = calloc((size_t)(n ? n : 1), sizeof *out_p);
    double *in_d = calloc((size_t)(n ? n : 1), sizeof *in_d);
    int *sw_of = malloc((size_t)(n ? n : 1) * sizeof *sw_of);
    hx_status st = HX_OK;
    if (!out_p || !in_d || !sw_of) {
        st = HX_ENOMEM;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        const hx_sgroup *g = &sol->groups[i];
        sw_of[i] = -1;
        if (g->ndevices > 0) {
            int h = hx_graph_device_host(s->graph, g->devices[0]);
            sw_of[i] = inv->hosts[h].switch_index >= 0 ? inv->hosts[h].switch_index : nsw - 1;
        }
    }
    for (int e = 0; e < hx_flow_num_edges(s->flow); e++) {
        double f = hx_flow_edge_flow(s->flow, e);
        int k = s->edge_kind[e];
        if (k == HX_EK_PREFILL)
            out_p[s->edge_ref[e]] += f;
        else if (k == HX_EK_DECODE)
            in_d[s->edge_ref[e]] += f;
    }
    for (int e = 0; e < hx_flow_num_edges(s->flow); e++) {
        int k = s->edge_kind[e];
        if (k != HX_EK_LOCAL && k != HX_EK_LINK)
            continue;
        int p = s->edge_aux[e] / n, d = s->edge_aux[e] % n;
        double x = fmin(hx_flow_edge_flow(s->flow, e), fmin(out_p[p], in_d[d]));
        if (x <= EPS_RPS)
            continue;
        if (!route_add(r, p, d, x)) {
            st = HX_ENOMEM;
            goto out;
        }
        out_p[p] -= x;
        in_d[d] -= x;
    }
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n; i++) {
            if (sol->groups[i].role != HX_ROLE_PREFILL)
                continue;
            for (int j = 0; j < n && out_p[i] > EPS_RPS; j++) {
                if (sol->groups[j].role != HX_ROLE_DECODE || in_d[j] <= EPS_RPS ||
                    (pass == 0 && sw_of[i] != sw_of[j]))
                    continue;
                double x = fmin(out_p[i], in_d[j]);
                if (!route_add(r, i, j, x)) {
                    st = HX_ENOMEM;
                    goto out;
                }
                out_p[i] -= x;
                in_d[j] -= x;
            }
        }
out:
    free(out_p);
    free(in_d);
    free(sw_of);
    return st;
}

static void describe_bottleneck(hx_search_ctx *s, const hx_solution *sol, const int *gid,
                                char *buf, size_t size)
{
    buf[0] = '\0';
    size_t len = 0;
#define APPEND(...)                                                                     \
    do {                                                                                \
        if (len < size) {                                                               \
            int k_ = snprintf(buf + len, size - len, __VA_ARGS__);                      \
            if (k_ > 0)                                                                 \
                len += (size_t)k_;                                                      \
        }                                                                               \
    } while (0)
    if (!s->flow) {
        int nb = 0;
        for (int i = 0; i < sol->n; i++)
            if (sol->groups[i].role == HX_ROLE_BOTH)
                nb++;
        if (nb)
            APPEND("capacity of the colocated groups");
        return;
    }
    static const char *const what[] = {"offered rate", "prefill compute", "NIC (KV out)",
                                       "intra-host KV link", "KV link", "switch fabric",
                                       "switch uplink (KV out)", "switch uplink (KV in)",
                                       "NIC (KV in)", "decode"};
    for (int kind = 0; kind <= HX_EK_DECODE; kind++) {
        int count = 0;
        const char *limit = NULL;
        for (int e = 0; e < hx_flow_num_edges(s->flow); e++) {
            if (s->edge_kind[e] != kind || !hx_flow_edge_in_cut(s->flow, e))
                continue;
            int ref = s->edge_ref[e];
            if (kind == HX_EK_RATE) {
                APPEND("%sthe offered rate (--rate)", len ? "; " : "");
                break;
            }
            if (count == 0) {
                APPEND("%s%s", len ? "; " : "", what[kind]);
                if (kind == HX_EK_DECODE)
                    limit = sol->groups[ref].perf[HX_ROLE_DECODE].limit;
                if (limit)
                    APPEND(" (%s)", limit);
                APPEND(" of ");
            }
            if (count < 6) {
                if (kind == HX_EK_UPLINK_UP || kind == HX_EK_UPLINK_DOWN || kind == HX_EK_HUB)
                    APPEND("%s%s", count ? ", " : "",
                           ref < (int)s->inv->nswitches ? s->inv->switches[ref].name
                                                        : "(no switch)");
                else if (kind == HX_EK_LINK)
                    APPEND("%s%s-%s", count ? ", " : "",
                           s->inv->hosts[s->inv->links[ref].host_a].name,
                           s->inv->hosts[s->inv->links[ref].host_b].name);
                else
                    APPEND("%sg%d", count ? ", " : "", gid[ref]);
            }
            count++;
        }
        if (count > 6)
            APPEND(" and %d more", count - 6);
    }
#undef APPEND
}

static const int role_order[] = {HX_ROLE_PREFILL, HX_ROLE_DECODE, HX_ROLE_BOTH};

hx_status hx_solution_to_plan(hx_search_ctx *s, hx_solution *sol, const char *strategy,
                              int router_port, hx_plan **out, hx_err *err)
{
    hx_solution_evaluate(s, sol);
    hx_plan *p = hx_plan_new();
    if (!p)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    hx_status st = HX_OK;
    int *gid = malloc((size_t)(sol->n ? sol->n : 1) * sizeof *gid);
    route_list routes = {NULL, 0, 0};
    char *used_dev = calloc(s->inv->ndevices ? s->inv->ndevices : 1, 1);
    if (!gid || !used_dev) {
        st = HX_ENOMEM;
        goto fail;
    }
    const hx_workload *wl = &s->cost.wl;
    if (hx_plan_set_str(&p->model_name, s->model->name) != HX_OK) {
        st = HX_ENOMEM;
        goto fail;
    }
    p->model_num_layers = s->model->num_layers;
    p->model = hx_model_to_json(s->model);
    p->input_tokens = wl->input_tokens;
    p->output_tokens = wl->output_tokens;
    p->rate_rps = wl->rate_rps;
    p->slo_ttft_s = wl->slo_ttft_s;
    p->slo_tpot_s = wl->slo_tpot_s;
    p->slo_attainment = wl->slo_attainment;

    int router_host;
    if ((st = fill_hosts(s, sol, p, &router_host)) != HX_OK)
        goto fail;
    p->router_port = router_port > 0 ? router_port : HX_PLAN_DEFAULT_ROUTER_PORT;
    if (router_host >= 0 &&
        hx_plan_set_str(&p->router_host, s->inv->hosts[router_host].name) != HX_OK) {
        st = HX_ENOMEM;
        goto fail;
    }

    /* groups, prefill first, then decode, then colocated */
    int next_id = 0;
    for (int r = 0; r < 3; r++) {
        for (int i = 0; i < sol->n; i++) {
            hx_sgroup *g = &sol->groups[i];
            gid[i] = g->role == HX_ROLE_NONE ? -1 : gid[i];
            if (g->role != role_order[r])
                continue;
            char id[32];
            snprintf(id, sizeof id, "g%d", next_id);
            gid[i] = next_id++;
            hx_plan_group *pg = hx_plan_add_group(p, id, (hx_role)g->role);
            if (!pg) {
                st = HX_ENOMEM;
                goto fail;
            }
            const hx_layout *l = &g->layout[g->role];
            const hx_perf *perf = &g->perf[g->role];
            pg->capacity_rps = perf->capacity_rps;
            pg->ttft_s = perf->ttft_s;
            pg->tpot_s = perf->tpot_s;
            pg->max_batch = perf->batch;
            int off = 0;
            for (int k = 0; k < l->nstages; k++) {
                hx_plan_stage *ps = hx_plan_group_add_stage(pg, l->first_layer[k],
                                                            l->num_layers[k]);
                if (!ps) {
                    st = HX_ENOMEM;
                    goto fail;
                }
                for (int t = 0; t < l->tp[k]; t++) {
                    char dn[192];
                    int d = l->devices[off + t];
                    used_dev[d] = 1;
                    hx_inventory_device_name(s->inv, d, dn, sizeof dn);
                    if (hx_plan_stage_add_device(ps, dn) != HX_OK) {
                        st = HX_ENOMEM;
                        goto fail;
                    }
                    hx_plan_memory *pm = hx_plan_group_add_memory(pg, dn);
                    if (!pm) {
                        st = HX_ENOMEM;
                        goto fail;
                    }
                    pm->weights_bytes = perf->mem[k].weights_bytes;
                    pm->kv_bytes = perf->mem[k].kv_bytes;
                    pm->workspace_bytes = perf->mem[k].workspace_bytes;
                    pm->total_bytes = pm->weights_bytes + pm->kv_bytes + pm->workspace_bytes;
                    pm->capacity_bytes = perf->mem[k].capacity_bytes;
                }
                off += l->tp[k];
            }
        }
    }

    /* routes */
    double routed = 0, both = 0;
    if ((st = collect_routes(s, sol, &routes)) != HX_OK)
        goto fail;
    for (int k = 0; k < routes.n; k++) {
        route_acc *rt = &routes.v[k];
        hx_plan_route *pr = hx_plan_add_route(p, gid[rt->p], gid[rt->d], rt->rps);
        if (!pr) {
            st = HX_ENOMEM;
            goto fail;
        }
        pr->kv_bytes_per_s = rt->rps * s->cost.kv_bytes_per_request;
        pr->link_bytes_per_s = hx_cost_kv_link_bytes_per_s(
            &s->cost, &sol->groups[rt->p].layout[HX_ROLE_PREFILL],
            &sol->groups[rt->d].layout[HX_ROLE_DECODE]);
        routed += rt->rps;
    }
    for (int i = 0; i < sol->n; i++)
        if (sol->groups[i].role == HX_ROLE_BOTH)
            both += sol->groups[i].perf[HX_ROLE_BOTH].capacity_rps;
    double total = routed + both;
    if (wl->rate_rps > 0 && total > wl->rate_rps)
        total = wl->rate_rps;
    p->throughput_rps = total;
    p->input_tokens_per_s = total * wl->input_tokens;
    p->output_tokens_per_s = total * wl->output_tokens;
    p->usd_per_hour = sol->usd_per_hour;
    p->usd_per_million_output_tokens =
        p->output_tokens_per_s > 0 ? sol->usd_per_hour / (p->output_tokens_per_s * 3600) * 1e6
                                   : 0;
    char bott[1024];
    describe_bottleneck(s, sol, gid, bott, sizeof bott);
    if (bott[0] && hx_plan_set_str(&p->bottleneck, bott) != HX_OK) {
        st = HX_ENOMEM;
        goto fail;
    }

    /* unused devices, with the reason */
    for (size_t d = 0; d < s->inv->ndevices; d++) {
        if (used_dev[d])
            continue;
        const char *reason = "not in any replica: too little memory for the model";
        char why[256];
        for (int i = 0; i < sol->n; i++) {
            const hx_sgroup *g = &sol->groups[i];
            int in = 0;
            for (int k = 0; k < g->ndevices && !in; k++)
                in = g->devices[k] == (int)d;
            if (!in)
                continue;
            if (g->role == HX_ROLE_NONE) {
                /* why its replica serves nothing: feasible but not worth it, or not feasible */
                const char *limit = NULL;
                int feasible = 0;
                for (int r = 0; r < 3; r++) {
                    if (!g->have[r])
                        continue;
                    feasible |= g->ok[r];
                    if (!limit && g->perf[r].limit)
                        limit = g->perf[r].limit;
                }
                if (feasible) {
                    reason = wl->rate_rps > 0 ? "not needed for the requested rate"
                                              : "adds no throughput";
                } else {
                    snprintf(why, sizeof why, "its replica cannot serve: %s",
                             limit ? limit : "no feasible layout");
                    reason = why;
                }
            } else {
                reason = "left out of its replica's layout (TP degree does not divide the "
                         "attention heads)";
            }
        }
        int in_units = 0;
        for (int u = 0; u < s->nunits && !in_units; u++)
            in_units = (int)d >= s->units[u].first_device &&
                       (int)d < s->units[u].first_device + s->units[u].ndevices;
        if (!in_units)
            reason = s->excluded_reason ? s->excluded_reason
                                        : "excluded by the strategy (another device type)";
        char dn[192];
        hx_inventory_device_name(s->inv, (int)d, dn, sizeof dn);
        if (hx_plan_add_unused(p, dn, reason) != HX_OK) {
            st = HX_ENOMEM;
            goto fail;
        }
    }
    if (hx_plan_set_str(&p->search_strategy, strategy) != HX_OK) {
        st = HX_ENOMEM;
        goto fail;
    }
    free(gid);
    free(routes.v);
    free(used_dev);
    *out = p;
    return HX_OK;
fail:
    free(gid);
    free(routes.v);
    free(used_dev);
    hx_plan_free(p);
    return hx_err_set(err, st, "cannot build the plan: %s", hx_strerror(st));
}

/* ------------------------------------------------------------------------- */
/* Driver                                                                     */

static hx_status ctx_init(hx_search_ctx *s, const hx_inventory *inv, const hx_graph *graph,
                          const hx_model *model, const hx_workload *wl,
                          const hx_cost_params *params)
{
    memset(s, 0, sizeof *s);
    s->inv = inv;
    s->graph = graph;
    s->model = model;
    hx_cost_ctx_init(&s->cost, model, graph, params, wl);
    s->cache = calloc(HX_LAYOUT_CACHE_SIZE, sizeof *s->cache); /* optional: NULL works */
    return HX_OK;
}

static void ctx_release(hx_search_ctx *s)
{
    free(s->units);
    hx_flow_free(s->flow);
    free(s->edge_kind);
    free(s->edge_ref);
    free(s->edge_aux);
    free(s->group_node);
    free(s->cache);
    memset(s, 0, sizeof *s);
}

/* One search over the units of `type` (-1 = all). */
static hx_status search_once(hx_search_ctx *s, int type, int colocated, double deadline,
                             unsigned long seed, hx_solution *best, hx_search_stats *stats)
{
    hx_status st = make_units(s, type);
    if (st != HX_OK)
        return st;
    if (s->nunits == 0)
        return HX_EINVAL;
    /* small clusters: refine several starts (cheap, and local optima differ) */
    hx_solution starts[MAX_STARTS];
    int nstarts = 0,
        max_starts = s->inv->ndevices <= HX_SEARCH_FINE_DEVICES ? MAX_STARTS : 2;
    st = initial_solutions(s, colocated, seed, starts, max_starts, &nstarts);
    if (st != HX_OK)
        return st;
    if (stats)
        stats->initial_rps = starts[0].value_rps;
    double t0 = now_s();
    int have = 0;
    for (int i = 0; i < nstarts; i++) {
        hx_solution *sol = &starts[i];
        double before = sol->value_rps;
        /* each start gets an equal share of the time left */
        double dl = t0 + (deadline - t0) * (i + 1) / nstarts;
        int acc = refine(s, sol, colocated, dl, seed + (unsigned long)i);
        HX_DEBUG("search%s%s: start %d: refinement %.4g -> %.4g req/s in %d moves, %d "
                 "evaluations",
                 colocated ? " (colocated)" : "", type >= 0 ? " (one type)" : "", i, before,
                 sol->value_rps, acc, s->evaluations);
        if (stats)
            stats->iterations += acc;
        if (!have || hx_solution_better(sol, best)) {
            hx_solution_release(best);
            *best = *sol;
            sol->groups = NULL;
            have = 1;
        }
        hx_solution_release(sol);
    }
    return HX_OK;
}

hx_status hx_search_plan(const hx_inventory *inv, const hx_model *model, const hx_workload *wl,
                         const hx_cost_params *params, const hx_search_opts *opts,
                         hx_plan **out, hx_search_stats *stats, hx_err *err)
{
    double t0 = now_s();
    hx_search_stats local_stats;
    if (!stats)
        stats = &local_stats;
    memset(stats, 0, sizeof *stats);
    stats->colocated_rps = -1;
    stats->homogeneous_rps = -1;
    if (inv->ndevices == 0)
        return hx_err_set(err, HX_EINVAL, "the inventory has no devices");
    double mem = 0;
    for (size_t h = 0; h < inv->nhosts; h++)
        mem += inv->hosts[h].gpu_count * inv->types[inv->hosts[h].gpu_type].memory_bytes *
               params->mem_util;
    double weights = (double)hx_model_weight_bytes(model);
    if (weights > mem) {
        char a[32], b[32];
        return hx_err_set(err, HX_EINVAL,
                          "model '%s' needs %s for its weights; the cluster has %s of usable "
                          "device memory",
                          model->name, hx_units_fmt_bytes(weights, a, sizeof a),
                          hx_units_fmt_bytes(mem, b, sizeof b));
    }
    if (opts->strategy == HX_STRATEGY_EXACT && inv->ndevices > HX_EXACT_MAX_DEVICES)
        return hx_err_set(err, HX_EINVAL,
                          "strategy 'exact' handles at most %d devices; the inventory has %zu",
                          HX_EXACT_MAX_DEVICES, inv->ndevices);

    hx_graph *graph = NULL;
    if (hx_graph_new(inv, &graph) != HX_OK)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    hx_search_ctx s;
    ctx_init(&s, inv, graph, model, wl, params);
    double limit = opts->time_limit_s > 0 ? opts->time_limit_s : DEFAULT_TIME_LIMIT_S;
    double deadline = t0 + limit;
    hx_solution best = {0};
    const char *chosen = hx_strategy_name(opts->strategy);
    hx_status st = HX_OK;
    int have = 0;

    if (opts->strategy == HX_STRATEGY_EXACT) {
        st = make_units(&s, -1);
        if (st == HX_OK)
            st = hx_search_exact(&s, &best, err);
        have = st == HX_OK;
    } else if (opts->strategy == HX_STRATEGY_HOMOGENEOUS) {
        for (size_t t = 0; t < inv->ntypes; t++) {
            hx_solution sol = {0};
            double dl = t0 + limit * (t + 1) / inv->ntypes;
            if (search_once(&s, (int)t, 0, dl, opts->seed, &sol, stats) == HX_OK &&
                (!have || hx_solution_better(&sol, &best))) {
                hx_solution_release(&best);
                best = sol;
                have = 1;
            } else {
                hx_solution_release(&sol);
            }
        }
    } else {
        int colocated = opts->strategy == HX_STRATEGY_COLOCATED;
        double main_deadline = colocated ? deadline : t0 + limit * 0.6;
        if (search_once(&s, -1, colocated, main_deadline, opts->seed, &best, stats) == HX_OK)
            have = 1;
        if (opts->strategy == HX_STRATEGY_HEXFLOW) {
            /* the baselines, with the same cost model; keep the best plan */
            hx_solution base = {0};
            if (search_once(&s, -1, 1, t0 + limit * 0.8, opts->seed, &base, NULL) == HX_OK) {
                stats->colocated_rps = base.value_rps;
                if (!have || hx_solution_better(&base, &best)) {
                    hx_solution_release(&best);
                    best = base;
                    base.groups = NULL;
                    chosen = "colocated";
                    have = 1;
                }
            }
            hx_solution_release(&base);
            if (inv->ntypes > 1) {
                double hbest = -1;
                for (size_t t = 0; t < inv->ntypes; t++) {
                    hx_solution sol = {0};
                    double dl = t0 + limit * (0.8 + 0.2 * (t + 1) / inv->ntypes);
                    if (search_once(&s, (int)t, 0, dl, opts->seed, &sol, NULL) == HX_OK) {
                        hbest = fmax(hbest, sol.value_rps);
                        if (!have || hx_solution_better(&sol, &best)) {
                            hx_solution_release(&best);
                            best = sol;
                            sol.groups = NULL;
                            chosen = "homogeneous";
                            have = 1;
                        }
                    }
                    hx_solution_release(&sol);
                }
                stats->homogeneous_rps = hbest;
            }
        }
        /* the plan's units must be those of the winning search */
        if (have && strcmp(chosen, "homogeneous") != 0)
            make_units(&s, -1);
    }

    if (!have || best.value_rps <= 0) {
        if (st == HX_OK)
            st = hx_err_set(err, HX_EINVAL,
                            "no replica of '%s' can meet the SLOs on this cluster (TTFT %.3g s, "
                            "TPOT %.3g s at %.0f/%.0f tokens); relax the SLOs or add devices",
                            model->name, wl->slo_ttft_s, wl->slo_tpot_s, wl->input_tokens,
                            wl->output_tokens);
        goto out;
    }
    if (!strcmp(chosen, "homogeneous") && opts->strategy == HX_STRATEGY_HEXFLOW) {
        s.excluded_reason = wl->rate_rps > 0
                                ? "not needed: the best plan for the rate uses one device type"
                                : "not needed: the best plan uses one device type";
        /* units were rebuilt for the winning type: find it again from the groups */
        int d0 = best.groups[0].ndevices ? best.groups[0].devices[0] : 0;
        make_units(&s, inv->hosts[hx_graph_device_host(graph, d0)].gpu_type);
    }
    st = hx_solution_to_plan(&s, &best, hx_strategy_name(opts->strategy), opts->router_port,
                             out, err);
    if (st == HX_OK) {
        stats->seconds = now_s() - t0;
        stats->evaluations = s.evaluations;
        stats->chosen = chosen;
        (*out)->search_seconds = stats->seconds;
        (*out)->search_iterations = stats->iterations;
        (*out)->search_seed = opts->seed;
    }
out:
    hx_solution_release(&best);
    ctx_release(&s);
    hx_graph_free(graph);
    return st;
}
