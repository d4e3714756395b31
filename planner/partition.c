/*
 * partition.c - k-way partitioning of a weighted undirected graph (see partition.h).
 *
 * Sections, bottom up:
 *
 *   utilities     sorting keys, a seeded generator, owned CSR graphs
 *   validation    argument checks shared by hx_partition and hx_partition_refine
 *   refinement    balance repair, Fiduccia-Mattheyses passes with rollback, and
 *                 Kernighan-Lin pair swaps, all over a [vertex][part] connectivity table
 *   spectral      Fiedler (or BFS) orders, sweep cuts, recursive bisection
 *   multilevel    heavy-edge matching, collapse, projection with refinement per level
 *   metis         integer scaling and METIS_PartGraphKway
 *   public API
 *
 * Every function that allocates frees what it allocated before returning;
 * nothing here keeps state between calls, so the module is reentrant.
 */
#include "partition.h"

#include <lapacke.h>
#include <math.h>
#include <fcntl.h>
#include <metis.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FM_MAX_PASSES 50        /* refinement passes (FM + swaps) per refine call */
#define SWAP_MAX_N 512          /* pair swaps are tried on graphs up to this size */
#define FM_STALL_MIN 64         /* moves without improvement before a pass gives up, */
#define FM_STALL_DIV 20         /* ... at least, or n / FM_STALL_DIV on large graphs */
#define REPAIR_MAX_ROUNDS 32    /* balance-repair rounds */
#define COARSEN_MIN_SHRINK 0.9  /* a level must shrink the graph below 90% */
#define SPLIT_ENUM_MAX_PARTS 12 /* bisections of <= this many parts try every part subset */
#define TARGET_SUM_TOL 1e-6     /* targets must sum to 1 within this */
#define SYM_REL_TOL 1e-9        /* relative mismatch allowed between an edge's two entries */
#define METIS_MAX_WEIGHT 1e6    /* largest integer weight handed to METIS */
#define METIS_MAX_TOTAL 1e9     /* integer weights must sum below this (idx_t is 32-bit) */
#define METIS_SMALL_TRIES 8     /* METIS runs (renumbered) on graphs up to COARSE_MAX */

/* ---- utilities ------------------------------------------------------------------- */

/* A sort record: ascending key, then ascending id. */
typedef struct keyed {
    double key;
    int id;
} keyed;

static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    if (x->key < y->key)
        return -1;
    if (x->key > y->key)
        return 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* splitmix64: small, fast, and the same sequence everywhere for a given seed. */
static uint64_t rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_shuffle(uint64_t *state, int *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(state) % (uint64_t)(i + 1));
        int tmp = a[i];
        a[i] = a[j];
        a[j] = tmp;
    }
}

static double vertex_weight_total(const hx_wgraph *g)
{
    double s = 0;
    for (int v = 0; v < g->n; v++)
        s += g->vw[v];
    return s;
}

/* Sum of edge weights, each undirected edge once. */
static double edge_weight_total(const hx_wgraph *g)
{
    double s = 0;
    for (int e = 0; e < g->xadj[g->n]; e++)
        s += g->ew[e];
    return s / 2;
}

/* A CSR graph allocated here; `g` views the owned arrays (capacity may exceed use). */
typedef struct owned_graph {
    hx_wgraph g;
    int *xadj; /* [n+1] */
    int *adj;  /* [nnz capacity] */
    double *ew; /* [nnz capacity] */
    double *vw; /* [n] */
} owned_graph;

static void owned_graph_release(owned_graph *o)
{
    free(o->xadj);
    free(o->adj);
    free(o->ew);
    free(o->vw);
    memset(o, 0, sizeof *o);
}

static hx_status owned_graph_alloc(owned_graph *o, int n, int nnz)
{
    size_t m = nnz > 0 ? (size_t)nnz : 1;
    memset(o, 0, sizeof *o);
    o->xadj = calloc((size_t)n + 1, sizeof *o->xadj);
    o->adj = malloc(m * sizeof *o->adj);
    o->ew = malloc(m * sizeof *o->ew);
    o->vw = malloc((size_t)(n > 0 ? n : 1) * sizeof *o->vw);
    if (!o->xadj || !o->adj || !o->ew || !o->vw) {
        owned_graph_release(o);
        return HX_ENOMEM;
    }
    o->g = (hx_wgraph){.n = n, .xadj = o->xadj, .adj = o->adj, .ew = o->ew, .vw = o->vw};
    return HX_OK;
}

/*
 * The subgraph induced by verts[nv] (ascending ids of g) into `out` (owned by the
 * caller, release with owned_graph_release). local: [g->n] scratch, all -1 on entry
 * and on return.
 */
static hx_status induced_subgraph(const hx_wgraph *g, const int *verts, int nv, int *local,
                                  owned_graph *out)
{
    int nnz = 0;
    for (int i = 0; i < nv; i++)
        local[verts[i]] = i;
    for (int i = 0; i < nv; i++)
        for (int e = g->xadj[verts[i]]; e < g->xadj[verts[i] + 1]; e++)
            nnz += local[g->adj[e]] >= 0;
    hx_status st = owned_graph_alloc(out, nv, nnz);
    if (st == HX_OK) {
        int pos = 0;
        for (int i = 0; i < nv; i++) {
            int v = verts[i];
            out->vw[i] = g->vw[v];
            for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
                int j = local[g->adj[e]];
                if (j >= 0) {
                    out->adj[pos] = j;
                    out->ew[pos] = g->ew[e];
                    pos++;
                }
            }
            out->xadj[i + 1] = pos;
        }
    }
    for (int i = 0; i < nv; i++)
        local[verts[i]] = -1;
    return st;
}

static hx_status no_memory(hx_err *err)
{
    return hx_err_set(err, HX_ENOMEM, "partition: out of memory");
}

/* ---- validation ------------------------------------------------------------------ */

/*
 * Checks that every edge entry v->u has a reverse entry u->v of the same weight
 * (parallel entries are summed). O(n + nnz) with a transposed copy.
 */
static hx_status check_symmetry(const hx_wgraph *g, hx_err *err)
{
    int n = g->n, nnz = g->xadj[n];
    hx_status st = HX_OK;
    int *txadj = calloc((size_t)n + 1, sizeof *txadj);
    int *tsrc = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *tsrc);
    double *tw = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *tw);
    double *acc = calloc((size_t)n, sizeof *acc);
    double *mag = calloc((size_t)n, sizeof *mag);
    if (!txadj || !tsrc || !tw || !acc || !mag) {
        st = no_memory(err);
        goto out;
    }
    /* Transpose: the entries pointing at u, grouped by u. */
    for (int e = 0; e < nnz; e++)
        txadj[g->adj[e] + 1]++;
    for (int u = 0; u < n; u++)
        txadj[u + 1] += txadj[u];
    for (int v = 0; v < n; v++) {
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
            int slot = txadj[g->adj[e]]++;
            tsrc[slot] = v;
            tw[slot] = g->ew[e];
        }
    }
    for (int u = n; u > 0; u--) /* undo the fill's shift */
        txadj[u] = txadj[u - 1];
    txadj[0] = 0;
    /* Per vertex: out-weights minus in-weights, per neighbour, must vanish. */
    for (int v = 0; v < n && st == HX_OK; v++) {
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
            acc[g->adj[e]] += g->ew[e];
            mag[g->adj[e]] += g->ew[e];
        }
        for (int s = txadj[v]; s < txadj[v + 1]; s++) {
            acc[tsrc[s]] -= tw[s];
            mag[tsrc[s]] += tw[s];
        }
        for (int s = txadj[v]; s < txadj[v + 1] && st == HX_OK; s++) {
            int u = tsrc[s];
            if (fabs(acc[u]) > SYM_REL_TOL * mag[u])
                st = hx_err_set(err, HX_EINVAL,
                                "partition: edge %d-%d is not symmetric (the entries in the "
                                "two directions are missing or differ in weight)",
                                v, u);
        }
        for (int e = g->xadj[v]; e < g->xadj[v + 1] && st == HX_OK; e++) {
            int u = g->adj[e];
            if (fabs(acc[u]) > SYM_REL_TOL * mag[u])
                st = hx_err_set(err, HX_EINVAL,
                                "partition: edge %d-%d is not symmetric (the entries in the "
                                "two directions are missing or differ in weight)",
                                v, u);
        }
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            acc[g->adj[e]] = mag[g->adj[e]] = 0;
        for (int s = txadj[v]; s < txadj[v + 1]; s++)
            acc[tsrc[s]] = mag[tsrc[s]] = 0;
    }
out:
    free(txadj);
    free(tsrc);
    free(tw);
    free(acc);
    free(mag);
    return st;
}

static hx_status check_graph(const hx_wgraph *g, hx_err *err)
{
    if (!g)
        return hx_err_set(err, HX_EINVAL, "partition: graph is NULL");
    if (g->n < 1)
        return hx_err_set(err, HX_EINVAL, "partition: graph has %d vertices; need at least 1",
                          g->n);
    if (!g->xadj || !g->vw)
        return hx_err_set(err, HX_EINVAL, "partition: graph's xadj or vertex weights are NULL");
    if (g->xadj[0] != 0)
        return hx_err_set(err, HX_EINVAL, "partition: xadj[0] is %d; must be 0", g->xadj[0]);
    for (int v = 0; v < g->n; v++)
        if (g->xadj[v + 1] < g->xadj[v])
            return hx_err_set(err, HX_EINVAL,
                              "partition: xadj decreases at vertex %d (%d then %d)", v,
                              g->xadj[v], g->xadj[v + 1]);
    if (g->xadj[g->n] > 0 && (!g->adj || !g->ew))
        return hx_err_set(err, HX_EINVAL, "partition: graph's adj or edge weights are NULL");
    double total = 0;
    for (int v = 0; v < g->n; v++) {
        double w = g->vw[v];
        if (!isfinite(w) || w < 0)
            return hx_err_set(err, HX_EINVAL,
                              "partition: vertex %d has weight %g; vertex weights must be "
                              "finite and >= 0",
                              v, w);
        total += w;
    }
    if (!(total > 0) || !isfinite(total))
        return hx_err_set(err, HX_EINVAL,
                          "partition: total vertex weight is %g; must be positive and finite",
                          total);
    for (int v = 0; v < g->n; v++) {
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
            int u = g->adj[e];
            if (u < 0 || u >= g->n)
                return hx_err_set(err, HX_EINVAL,
                                  "partition: vertex %d has neighbour %d outside [0, %d)", v,
                                  u, g->n);
            if (u == v)
                return hx_err_set(err, HX_EINVAL, "partition: self-loop at vertex %d", v);
            if (!isfinite(g->ew[e]) || !(g->ew[e] > 0))
                return hx_err_set(err, HX_EINVAL,
                                  "partition: edge %d-%d has weight %g; edge weights must be "
                                  "finite and > 0",
                                  v, u, g->ew[e]);
        }
    }
    return check_symmetry(g, err);
}

/* Checks opts against g (already checked); `need_method` when the method is used. */
static hx_status check_opts(const hx_wgraph *g, const hx_partition_opts *o, int need_method,
                            hx_err *err)
{
    if (!o)
        return hx_err_set(err, HX_EINVAL, "partition: options are NULL");
    if (need_method && o->method != HX_PARTITION_SPECTRAL && o->method != HX_PARTITION_METIS)
        return hx_err_set(err, HX_EINVAL, "partition: unknown method %d", (int)o->method);
    if (o->k < 1 || o->k > g->n)
        return hx_err_set(err, HX_EINVAL,
                          "partition: k = %d parts for %d vertices; need 1 <= k <= n", o->k,
                          g->n);
    if (!isfinite(o->imbalance) || o->imbalance < 0)
        return hx_err_set(err, HX_EINVAL,
                          "partition: imbalance is %g; must be finite and >= 0", o->imbalance);
    if (o->target) {
        double sum = 0;
        for (int p = 0; p < o->k; p++) {
            if (!isfinite(o->target[p]) || !(o->target[p] > 0))
                return hx_err_set(err, HX_EINVAL,
                                  "partition: target[%d] is %g; targets must be > 0", p,
                                  o->target[p]);
            sum += o->target[p];
        }
        if (fabs(sum - 1) > TARGET_SUM_TOL)
            return hx_err_set(err, HX_EINVAL, "partition: targets sum to %.9g; must sum to 1",
                              sum);
    }
    return HX_OK;
}

/* Target fractions into t[k], normalised to sum exactly to 1. */
static void fill_targets(const hx_partition_opts *o, double *t)
{
    double sum = 0;
    for (int p = 0; p < o->k; p++)
        sum += (t[p] = o->target ? o->target[p] : 1.0);
    for (int p = 0; p < o->k; p++)
        t[p] /= sum;
}

/* ---- refinement ------------------------------------------------------------------ */

/* A heap entry: vertex v's best move had this gain when the entry was made. */
typedef struct fm_entry {
    double gain;
    int v;
    unsigned stamp; /* valid while it equals the vertex's current stamp */
} fm_entry;

/* A balance-repair candidate. */
typedef struct repair_cand {
    int fits; /* the move lands within the destination's limit */
    double gain;
    int v;
} repair_cand;

/* A pair-swap candidate. */
typedef struct swap_cand {
    double gain;
    int u, v;
} swap_cand;

/* Refinement state over one graph and one partition (all arrays owned but `part`). */
typedef struct refiner {
    const hx_wgraph *g;
    int k;
    const double *maxw;    /* [k] weight limit of each part */
    const int *minc;       /* [k] fewest vertices each part keeps, or NULL for 1 */
    int *part;             /* [n] the partition being refined (caller-owned) */
    double *pw;            /* [k] part weights */
    int *pc;               /* [k] part vertex counts */
    double *conn;          /* [n][k] edge weight from each vertex into each part */
    double cut;            /* current cut, kept up to date by refiner_move */
    double cut_tol;        /* cut changes at or below this are ties */
    double w_tol;          /* slack on the weight limits, for rounding */
    fm_entry *heap;        /* [heap_cap] max-heap of candidate moves */
    int heap_len, heap_cap;
    unsigned *stamp;       /* [n] */
    unsigned char *locked; /* [n] moved in this FM pass */
    int *moved_v;          /* [n] FM move log: vertex ... */
    int *moved_from;       /* [n] ... and the part it left */
    double *row;           /* [n] scratch: edge weights from one vertex, else 0 */
    repair_cand *cand;     /* [n] scratch for balance repair */
    swap_cand *swaps;      /* [n] scratch for pair swaps */
} refiner;

static void refiner_release(refiner *r)
{
    free(r->pw);
    free(r->pc);
    free(r->conn);
    free(r->heap);
    free(r->stamp);
    free(r->locked);
    free(r->moved_v);
    free(r->moved_from);
    free(r->row);
    free(r->cand);
    free(r->swaps);
    memset(r, 0, sizeof *r);
}

static hx_status refiner_init(refiner *r, const hx_wgraph *g, int k, const double *maxw,
                              const int *minc, int *part)
{
    size_t n = (size_t)g->n;
    memset(r, 0, sizeof *r);
    if (n > SIZE_MAX / sizeof(double) / (size_t)k)
        return HX_ENOMEM;
    r->g = g;
    r->k = k;
    r->maxw = maxw;
    r->minc = minc;
    r->part = part;
    r->pw = calloc((size_t)k, sizeof *r->pw);
    r->pc = calloc((size_t)k, sizeof *r->pc);
    r->conn = calloc(n * (size_t)k, sizeof *r->conn);
    r->heap_cap = 2 * g->n + 8;
    r->heap = malloc((size_t)r->heap_cap * sizeof *r->heap);
    r->stamp = calloc(n, sizeof *r->stamp);
    r->locked = calloc(n, sizeof *r->locked);
    r->moved_v = malloc(n * sizeof *r->moved_v);
    r->moved_from = malloc(n * sizeof *r->moved_from);
    r->row = calloc(n, sizeof *r->row);
    r->cand = malloc(n * sizeof *r->cand);
    r->swaps = malloc(n * sizeof *r->swaps);
    if (!r->pw || !r->pc || !r->conn || !r->heap || !r->stamp || !r->locked || !r->moved_v ||
        !r->moved_from || !r->row || !r->cand || !r->swaps) {
        refiner_release(r);
        return HX_ENOMEM;
    }
    for (int v = 0; v < g->n; v++) {
        r->pw[part[v]] += g->vw[v];
        r->pc[part[v]]++;
        double *cv = r->conn + (size_t)v * k;
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            cv[part[g->adj[e]]] += g->ew[e];
    }
    r->cut = hx_partition_cut(g, part);
    r->cut_tol = 1e-12 * edge_weight_total(g);
    r->w_tol = 1e-12 * vertex_weight_total(g);
    return HX_OK;
}

static int min_count(const refiner *r, int p)
{
    return r->minc ? r->minc[p] : 1;
}

/* Moves v to part q, updating weights, counts, connectivity and the cut. */
static void refiner_move(refiner *r, int v, int q)
{
    const hx_wgraph *g = r->g;
    int k = r->k, p = r->part[v];
    const double *cv = r->conn + (size_t)v * k;
    r->cut -= cv[q] - cv[p];
    r->pw[p] -= g->vw[v];
    r->pw[q] += g->vw[v];
    r->pc[p]--;
    r->pc[q]++;
    r->part[v] = q;
    for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
        double *cu = r->conn + (size_t)g->adj[e] * k;
        cu[p] -= g->ew[e];
        cu[q] += g->ew[e];
    }
}

/*
 * v's best move into an adjacent part that stays within its limit, without taking
 * v's part below its vertex minimum. Ties go to the less loaded part, then the lower
 * index. Returns 0 when there is none.
 */
static int best_move(const refiner *r, int v, int *dest, double *gain)
{
    int k = r->k, p = r->part[v], best = -1;
    double w = r->g->vw[v], best_gain = 0, best_load = 0;
    const double *cv = r->conn + (size_t)v * k;
    if (r->pc[p] <= min_count(r, p))
        return 0;
    for (int q = 0; q < k; q++) {
        if (q == p || !(cv[q] > 0) || r->pw[q] + w > r->maxw[q] + r->w_tol)
            continue;
        double gq = cv[q] - cv[p], load = (r->pw[q] + w) / r->maxw[q];
        if (best < 0 || gq > best_gain || (gq == best_gain && load < best_load)) {
            best = q;
            best_gain = gq;
            best_load = load;
        }
    }
    if (best < 0)
        return 0;
    *dest = best;
    *gain = best_gain;
    return 1;
}

/* -- balance repair -- */

/*
 * Where v, in overweight part p, should go: into a part that stays within its limit
 * (best gain first); failing that, into the part whose excess grows least, provided
 * the total excess still falls. Returns 0 when neither exists.
 */
static int repair_dest(const refiner *r, int v, int *dest, double *gain, int *fits)
{
    int k = r->k, p = r->part[v], best = -1, best_fits = 0;
    double w = r->g->vw[v], best_gain = 0, best_net = 0;
    const double *cv = r->conn + (size_t)v * k;
    double relief = fmin(w, r->pw[p] - r->maxw[p]);
    for (int q = 0; q < k; q++) {
        if (q == p)
            continue;
        double gq = cv[q] - cv[p];
        int fq = r->pw[q] + w <= r->maxw[q] + r->w_tol;
        double added = fmax(0, r->pw[q] + w - r->maxw[q]) - fmax(0, r->pw[q] - r->maxw[q]);
        double net = relief - added;
        if (!fq && !(net > r->w_tol))
            continue;
        int better;
        if (best < 0)
            better = 1;
        else if (fq != best_fits)
            better = fq; /* fitting beats overflowing */
        else if (fq)
            better = gq > best_gain;
        else
            better = net > best_net || (net == best_net && gq > best_gain);
        if (better) {
            best = q;
            best_fits = fq;
            best_gain = gq;
            best_net = net;
        }
    }
    if (best < 0)
        return 0;
    *dest = best;
    *gain = best_gain;
    *fits = best_fits;
    return 1;
}

static int repair_cand_cmp(const void *a, const void *b)
{
    const repair_cand *x = a, *y = b;
    if (x->fits != y->fits)
        return y->fits - x->fits;
    if (x->gain > y->gain)
        return -1;
    if (x->gain < y->gain)
        return 1;
    return (x->v > y->v) - (x->v < y->v);
}

/*
 * For overweight part p that no single move relieves (say its one vertex is too
 * heavy): swaps a vertex v of p with a lighter vertex u of a part that can take
 * v, the swap that lowers the cut most (or raises it least). Returns 1 when it swapped.
 */
static int repair_swap(refiner *r, int p)
{
    const hx_wgraph *g = r->g;
    int n = g->n, k = r->k, best_u = -1, best_v = -1;
    double best_gain = 0;
    for (int v = 0; v < n; v++) {
        if (r->part[v] != p)
            continue;
        const double *cv = r->conn + (size_t)v * k;
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            r->row[g->adj[e]] += g->ew[e];
        for (int u = 0; u < n; u++) {
            int q = r->part[u];
            if (q == p || !(g->vw[u] < g->vw[v]) ||
                r->pw[q] - g->vw[u] + g->vw[v] > r->maxw[q] + r->w_tol)
                continue;
            const double *cu = r->conn + (size_t)u * k;
            double gain = cv[q] - cv[p] + cu[p] - cu[q] - 2 * r->row[u];
            if (best_u < 0 || gain > best_gain) {
                best_u = u;
                best_v = v;
                best_gain = gain;
            }
        }
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            r->row[g->adj[e]] = 0;
    }
    if (best_u < 0)
        return 0;
    int q = r->part[best_u];
    refiner_move(r, best_v, q);
    refiner_move(r, best_u, p);
    return 1;
}

/*
 * Moves vertices out of parts above their limit, cheapest cut increase first, until
 * every part is within its limit or nothing more helps; a part that no single move
 * relieves trades a heavy vertex for a lighter one. Returns the moves made.
 */
static int repair_balance(refiner *r)
{
    const hx_wgraph *g = r->g;
    int moves = 0;
    for (int round = 0; round < REPAIR_MAX_ROUNDS; round++) {
        int progressed = 0;
        for (int p = 0; p < r->k; p++) {
            if (r->pw[p] <= r->maxw[p] + r->w_tol)
                continue;
            int nc = 0, q, fits;
            double gain;
            for (int v = 0; v < g->n; v++)
                if (r->part[v] == p && g->vw[v] > 0 && repair_dest(r, v, &q, &gain, &fits))
                    r->cand[nc++] = (repair_cand){.fits = fits, .gain = gain, .v = v};
            qsort(r->cand, (size_t)nc, sizeof *r->cand, repair_cand_cmp);
            for (int i = 0; i < nc; i++) {
                if (r->pw[p] <= r->maxw[p] + r->w_tol || r->pc[p] <= min_count(r, p))
                    break;
                if (repair_dest(r, r->cand[i].v, &q, &gain, &fits)) {
                    refiner_move(r, r->cand[i].v, q);
                    moves++;
                    progressed = 1;
                }
            }
            if (r->pw[p] > r->maxw[p] + r->w_tol && repair_swap(r, p)) {
                moves += 2;
                progressed = 1;
            }
        }
        if (!progressed)
            break;
    }
    return moves;
}

/* -- FM passes -- */

static int heap_before(const fm_entry *a, const fm_entry *b)
{
    return a->gain > b->gain || (a->gain == b->gain && a->v < b->v);
}

static void heap_sift_down(fm_entry *h, int len, int i)
{
    for (;;) {
        int l = 2 * i + 1, rr = l + 1, top = i;
        if (l < len && heap_before(&h[l], &h[top]))
            top = l;
        if (rr < len && heap_before(&h[rr], &h[top]))
            top = rr;
        if (top == i)
            return;
        fm_entry tmp = h[i];
        h[i] = h[top];
        h[top] = tmp;
        i = top;
    }
}

/* Drops stale entries (at most one valid entry per vertex remains) and re-heapifies. */
static void heap_compact(refiner *r)
{
    int len = 0;
    for (int i = 0; i < r->heap_len; i++) {
        const fm_entry *e = &r->heap[i];
        if (!r->locked[e->v] && e->stamp == r->stamp[e->v])
            r->heap[len++] = *e;
    }
    r->heap_len = len;
    for (int i = len / 2 - 1; i >= 0; i--)
        heap_sift_down(r->heap, len, i);
}

static void heap_push(refiner *r, double gain, int v)
{
    if (r->heap_len == r->heap_cap)
        heap_compact(r); /* leaves <= n entries of 2n + 8 */
    fm_entry *h = r->heap;
    int i = r->heap_len++;
    h[i] = (fm_entry){.gain = gain, .v = v, .stamp = r->stamp[v]};
    while (i > 0) {
        int up = (i - 1) / 2;
        if (!heap_before(&h[i], &h[up]))
            break;
        fm_entry tmp = h[i];
        h[i] = h[up];
        h[up] = tmp;
        i = up;
    }
}

static fm_entry heap_pop(refiner *r)
{
    fm_entry top = r->heap[0];
    r->heap[0] = r->heap[--r->heap_len];
    heap_sift_down(r->heap, r->heap_len, 0);
    return top;
}

/* Invalidates v's queued entry and queues its current best move, if any. */
static void fm_update(refiner *r, int v)
{
    int q;
    double gain;
    r->stamp[v]++;
    if (best_move(r, v, &q, &gain))
        heap_push(r, gain, v);
}

/*
 * One Fiduccia-Mattheyses pass: repeatedly makes the best feasible move of an
 * unlocked vertex (even at a loss, to climb out of local minima), locks it, and in
 * the end rolls back to the best cut seen. Returns the moves kept (0: no gain).
 */
static int fm_pass(refiner *r)
{
    const hx_wgraph *g = r->g;
    int n = g->n, len = 0, best_len = 0, since_best = 0;
    int stall = n <= SWAP_MAX_N ? n : (n / FM_STALL_DIV > FM_STALL_MIN ? n / FM_STALL_DIV
                                                                       : FM_STALL_MIN);
    double best_cut = r->cut;
    r->heap_len = 0;
    memset(r->locked, 0, (size_t)n);
    for (int v = 0; v < n; v++)
        fm_update(r, v);
    while (r->heap_len > 0) {
        fm_entry top = heap_pop(r);
        int v = top.v, q;
        double gain;
        if (r->locked[v] || top.stamp != r->stamp[v] || !best_move(r, v, &q, &gain))
            continue;
        if (gain != top.gain) { /* balance changed since it was queued */
            heap_push(r, gain, v);
            continue;
        }
        r->moved_v[len] = v;
        r->moved_from[len] = r->part[v];
        len++;
        refiner_move(r, v, q);
        r->locked[v] = 1;
        if (r->cut < best_cut - r->cut_tol) {
            best_cut = r->cut;
            best_len = len;
            since_best = 0;
        } else if (++since_best > stall) {
            break;
        }
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            if (!r->locked[g->adj[e]])
                fm_update(r, g->adj[e]);
    }
    while (len > best_len) {
        len--;
        refiner_move(r, r->moved_v[len], r->moved_from[len]);
    }
    return best_len;
}

/* -- pair swaps -- */

/* Cut decrease of swapping u and v (different parts); -HUGE_VAL when a part would end
   above its limit (or above its current weight, if already over). */
static double swap_gain(const refiner *r, int u, int v)
{
    const hx_wgraph *g = r->g;
    int k = r->k, p = r->part[u], q = r->part[v];
    const double *cu = r->conn + (size_t)u * k, *cv = r->conn + (size_t)v * k;
    double np = r->pw[p] - g->vw[u] + g->vw[v], nq = r->pw[q] - g->vw[v] + g->vw[u];
    if ((np > r->maxw[p] + r->w_tol && np > r->pw[p]) ||
        (nq > r->maxw[q] + r->w_tol && nq > r->pw[q]))
        return -HUGE_VAL;
    double wuv = 0;
    for (int e = g->xadj[u]; e < g->xadj[u + 1]; e++)
        if (g->adj[e] == v)
            wuv += g->ew[e];
    return cu[q] - cu[p] + cv[p] - cv[q] - 2 * wuv;
}

static int swap_cand_cmp(const void *a, const void *b)
{
    const swap_cand *x = a, *y = b;
    if (x->gain > y->gain)
        return -1;
    if (x->gain < y->gain)
        return 1;
    return (x->u > y->u) - (x->u < y->u);
}

/*
 * Kernighan-Lin flavour: finds, for each boundary vertex u, the swap with a vertex of
 * another part that lowers the cut most within the weight limits, then makes these
 * swaps best first, each vertex at most once, rechecking each gain as it goes. Swaps
 * keep part sizes, so they get through where single moves are blocked by balance.
 * O(n^2) per scan: used on small graphs. Returns the swaps made.
 */
static int swap_scan(refiner *r)
{
    const hx_wgraph *g = r->g;
    int n = g->n, k = r->k, nc = 0, swaps = 0;
    for (int u = 0; u < n; u++) {
        int p = r->part[u], boundary = 0, best_v = -1;
        const double *cu = r->conn + (size_t)u * k;
        for (int q = 0; q < k && !boundary; q++)
            boundary = q != p && cu[q] > 0;
        if (!boundary)
            continue;
        for (int e = g->xadj[u]; e < g->xadj[u + 1]; e++)
            r->row[g->adj[e]] += g->ew[e];
        double best_gain = r->cut_tol;
        for (int v = 0; v < n; v++) {
            int q = r->part[v];
            if (q == p)
                continue;
            const double *cv = r->conn + (size_t)v * k;
            double gain = cu[q] - cu[p] + cv[p] - cv[q] - 2 * r->row[v];
            if (!(gain > best_gain))
                continue;
            double np = r->pw[p] - g->vw[u] + g->vw[v], nq = r->pw[q] - g->vw[v] + g->vw[u];
            if ((np > r->maxw[p] + r->w_tol && np > r->pw[p]) ||
                (nq > r->maxw[q] + r->w_tol && nq > r->pw[q]))
                continue;
            best_gain = gain;
            best_v = v;
        }
        for (int e = g->xadj[u]; e < g->xadj[u + 1]; e++)
            r->row[g->adj[e]] = 0;
        if (best_v >= 0)
            r->swaps[nc++] = (swap_cand){.gain = best_gain, .u = u, .v = best_v};
    }
    qsort(r->swaps, (size_t)nc, sizeof *r->swaps, swap_cand_cmp);
    for (int v = 0; v < n; v++)
        r->locked[v] = 0;
    for (int i = 0; i < nc; i++) {
        int u = r->swaps[i].u, v = r->swaps[i].v;
        if (r->locked[u] || r->locked[v] || !(swap_gain(r, u, v) > r->cut_tol))
            continue;
        int p = r->part[u], q = r->part[v];
        refiner_move(r, u, q);
        refiner_move(r, v, p);
        r->locked[u] = r->locked[v] = 1;
        swaps++;
    }
    return swaps;
}

/*
 * Refines `part` in place: balance repair, then rounds of an FM pass and (on small
 * graphs) a swap scan until neither improves the cut. maxw[k]: weight limits;
 * minc[k]: fewest vertices per part (NULL: 1). *moves (may be NULL) gets the vertex
 * moves kept. HX_ENOMEM is the only failure.
 */
static hx_status refine_core(const hx_wgraph *g, int k, const double *maxw, const int *minc,
                             int *part, int *moves)
{
    refiner r;
    int total = 0;
    if (k >= 2) {
        hx_status st = refiner_init(&r, g, k, maxw, minc, part);
        if (st != HX_OK)
            return st;
        total = repair_balance(&r);
        for (int pass = 0; pass < FM_MAX_PASSES; pass++) {
            int m = fm_pass(&r);
            int s = g->n <= SWAP_MAX_N ? swap_scan(&r) : 0;
            total += m + 2 * s;
            if (m == 0 && s == 0)
                break;
        }
        refiner_release(&r);
    }
    if (moves)
        *moves = total;
    return HX_OK;
}

/*
 * Gives every empty part one vertex: the lightest vertex of a part that has two or
 * more (ties: the one least tied to its own part, then the lowest id).
 */
static hx_status fill_empty_parts(const hx_wgraph *g, int k, int *part, hx_err *err)
{
    int *pc = calloc((size_t)k, sizeof *pc);
    if (!pc)
        return no_memory(err);
    for (int v = 0; v < g->n; v++)
        pc[part[v]]++;
    for (int q = 0; q < k; q++) {
        if (pc[q] > 0)
            continue;
        int best = -1;
        double best_w = 0, best_own = 0;
        for (int v = 0; v < g->n; v++) {
            if (pc[part[v]] < 2)
                continue;
            double own = 0;
            for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
                if (part[g->adj[e]] == part[v])
                    own += g->ew[e];
            if (best < 0 || g->vw[v] < best_w || (g->vw[v] == best_w && own < best_own)) {
                best = v;
                best_w = g->vw[v];
                best_own = own;
            }
        }
        /* k <= n, so some part has two vertices while one is empty. */
        pc[part[best]]--;
        part[best] = q;
        pc[q]++;
    }
    free(pc);
    return HX_OK;
}

/* ---- spectral -------------------------------------------------------------------- */

/*
 * Labels connected components. comp[v]: component of v; members: vertices grouped by
 * component (ascending within each), component c at members[cstart[c] .. cstart[c+1]).
 * queue: [n] scratch. Returns the number of components. Arrays are [n] (cstart [n+1]).
 */
static int components(const hx_wgraph *g, int *comp, int *members, int *cstart, int *queue)
{
    int n = g->n, nc = 0;
    for (int v = 0; v < n; v++)
        comp[v] = -1;
    for (int s = 0; s < n; s++) {
        if (comp[s] >= 0)
            continue;
        int head = 0, tail = 0;
        queue[tail++] = s;
        comp[s] = nc;
        while (head < tail) {
            int v = queue[head++];
            for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
                int u = g->adj[e];
                if (comp[u] < 0) {
                    comp[u] = nc;
                    queue[tail++] = u;
                }
            }
        }
        nc++;
    }
    for (int c = 0; c <= nc; c++)
        cstart[c] = 0;
    for (int v = 0; v < n; v++)
        cstart[comp[v] + 1]++;
    for (int c = 0; c < nc; c++)
        cstart[c + 1] += cstart[c];
    for (int c = 0; c < nc; c++)
        queue[c] = cstart[c];
    for (int v = 0; v < n; v++)
        members[queue[comp[v]]++] = v;
    return nc;
}

/*
 * Orders a connected component verts[nv] by its Fiedler vector: the eigenvector of
 * the second smallest eigenvalue of the weighted Laplacian L = D - W (dense,
 * row-major, weights scaled by the largest), from LAPACKE_dsyevr. Ties by position.
 * local: [g->n] scratch, all -1 on entry and return.
 */
static hx_status fiedler_order(const hx_wgraph *g, const int *verts, int nv, int *local,
                               int *order, hx_err *err)
{
    hx_status st = HX_OK;
    double *lap = calloc((size_t)nv * (size_t)nv, sizeof *lap);
    double *eval = malloc((size_t)nv * sizeof *eval);
    double *evec = malloc((size_t)nv * sizeof *evec);
    keyed *kv = malloc((size_t)nv * sizeof *kv);
    lapack_int isuppz[2], found = 0;
    if (!lap || !eval || !evec || !kv) {
        st = no_memory(err);
        goto out;
    }
    for (int i = 0; i < nv; i++)
        local[verts[i]] = i;
    double wmax = 0;
    for (int i = 0; i < nv; i++)
        for (int e = g->xadj[verts[i]]; e < g->xadj[verts[i] + 1]; e++)
            wmax = fmax(wmax, g->ew[e]);
    for (int i = 0; i < nv; i++) {
        for (int e = g->xadj[verts[i]]; e < g->xadj[verts[i] + 1]; e++) {
            double w = g->ew[e] / wmax;
            lap[(size_t)i * nv + local[g->adj[e]]] -= w;
            lap[(size_t)i * nv + i] += w;
        }
    }
    lapack_int info = LAPACKE_dsyevr(LAPACK_ROW_MAJOR, 'V', 'I', 'U', nv, lap, nv, 0.0, 0.0, 2,
                                     2, LAPACKE_dlamch('S'), &found, eval, evec, 1, isuppz);
    if (info != 0 || found != 1) {
        st = hx_err_set(err, HX_EINTERNAL,
                        "partition: LAPACKE_dsyevr failed on a %d-vertex Laplacian (info %d)",
                        nv, (int)info);
        goto out;
    }
    /* The sign of an eigenvector is arbitrary: fix it so the largest entry is positive. */
    int big = 0;
    for (int i = 1; i < nv; i++)
        if (fabs(evec[i]) > fabs(evec[big]))
            big = i;
    double sign = evec[big] < 0 ? -1 : 1;
    for (int i = 0; i < nv; i++)
        kv[i] = (keyed){.key = sign * evec[i], .id = i};
    qsort(kv, (size_t)nv, sizeof *kv, keyed_cmp);
    for (int i = 0; i < nv; i++)
        order[i] = verts[kv[i].id];
out:
    if (lap) /* local was filled only past the allocation check */
        for (int i = 0; i < nv; i++)
            local[verts[i]] = -1;
    free(lap);
    free(eval);
    free(evec);
    free(kv);
    return st;
}

/*
 * Breadth-first order of a connected component from a pseudo-peripheral vertex (the
 * last one reached from its lowest vertex): the sweep order for components too large
 * for a dense eigenproblem. local as in fiedler_order.
 */
static void bfs_order(const hx_wgraph *g, const int *verts, int *local, int *order)
{
    int start = verts[0];
    for (int round = 0; round < 2; round++) {
        int head = 0, tail = 0;
        order[tail++] = start;
        local[start] = 0;
        while (head < tail) {
            int v = order[head++];
            for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
                if (local[g->adj[e]] < 0) {
                    local[g->adj[e]] = 0;
                    order[tail++] = g->adj[e];
                }
            }
        }
        for (int i = 0; i < tail; i++)
            local[order[i]] = -1;
        start = order[tail - 1];
    }
}

/* The sweep order of one connected component verts[nv] into order[nv]. */
static hx_status component_order(const hx_wgraph *g, const int *verts, int nv, int *local,
                                 int *order, hx_err *err)
{
    if (nv <= 2) {
        memcpy(order, verts, (size_t)nv * sizeof *order);
        return HX_OK;
    }
    if (nv <= HX_PARTITION_COARSE_MAX)
        return fiedler_order(g, verts, nv, local, order, err);
    bfs_order(g, verts, local, order);
    return HX_OK;
}

/* A candidate assignment of parts to the two sides of a bisection. */
typedef struct split_cand {
    unsigned mask;   /* kp <= SPLIT_ENUM_MAX_PARTS: bit i set = parts[i] on the prefix side */
    int flip;        /* otherwise: 0 = the first kp/2 parts on the prefix side, 1 = the rest */
    double frac;     /* target fraction of the prefix side */
    int kpre, kpost; /* parts on the prefix / suffix side */
} split_cand;

/* Whether parts[i] belongs to the prefix side of candidate c. */
static int cand_has(const split_cand *c, int kp, int i)
{
    if (kp <= SPLIT_ENUM_MAX_PARTS)
        return (int)((c->mask >> i) & 1u);
    return c->flip ? i >= kp / 2 : i < kp / 2;
}

/* How good a cut position is; see score_better. */
typedef struct split_score {
    int feasible; /* both sides within target x (1 + e) */
    double cut;
    double dev;   /* largest relative excess over a side's limit */
    double dist;  /* |prefix weight - its target| / total */
} split_score;

static int score_better(const split_score *a, const split_score *b, double cut_tol)
{
    if (a->feasible != b->feasible)
        return a->feasible;
    if (a->feasible) {
        if (a->cut < b->cut - cut_tol)
            return 1;
        if (a->cut > b->cut + cut_tol)
            return 0;
        return a->dist < b->dist - 1e-12;
    }
    if (a->dev < b->dev - 1e-12)
        return 1;
    if (a->dev > b->dev + 1e-12)
        return 0;
    return a->cut < b->cut - cut_tol;
}

static int popcount(unsigned x)
{
    int c = 0;
    for (; x; x &= x - 1)
        c++;
    return c;
}

/*
 * Candidate side assignments for a bisection of parts[kp]: kp/2 parts on one side,
 * the rest on the other, either side first in the order. Up to SPLIT_ENUM_MAX_PARTS
 * parts every subset is tried, so that unequal targets can follow the graph's
 * structure; above, the first kp/2 parts go together. A candidate with the same
 * prefix target and size as an earlier one is dropped (it would score the same).
 * The first candidate is always the first kp/2 parts as the prefix.
 * cands: [2 << kp] up to SPLIT_ENUM_MAX_PARTS parts, else [2]. Returns the count.
 */
static int split_candidates(const int *parts, int kp, const double *t, split_cand *cands)
{
    int kl = kp / 2, nc = 0, enumerate = kp <= SPLIT_ENUM_MAX_PARTS;
    unsigned all = enumerate ? (1u << kp) - 1 : 0, nsets = enumerate ? 1u << kp : 1;
    double tsum = 0;
    for (int i = 0; i < kp; i++)
        tsum += t[parts[i]];
    for (unsigned m = 0; m < nsets; m++) {
        if (enumerate && popcount(m) != kl)
            continue;
        double fa = 0;
        for (int i = 0; i < kp; i++)
            if (enumerate ? (int)((m >> i) & 1u) : i < kl)
                fa += t[parts[i]];
        fa /= tsum;
        for (int flip = 0; flip < 2; flip++) { /* the subset first, then its complement */
            split_cand c = {.mask = flip ? ~m & all : m,
                            .flip = flip,
                            .frac = flip ? 1 - fa : fa,
                            .kpre = flip ? kp - kl : kl,
                            .kpost = flip ? kl : kp - kl};
            int dup = 0;
            for (int j = 0; j < nc && !dup; j++)
                dup = cands[j].kpre == c.kpre && fabs(cands[j].frac - c.frac) <= 1e-12;
            if (!dup)
                cands[nc++] = c;
        }
    }
    return nc;
}

/*
 * Bisects g for the parts parts[kp] (targets t[], indexed by part id): orders the
 * vertices (components placed greedily by target weight, each by its Fiedler vector)
 * and cuts the order, from either end, at the position that keeps both sides within
 * target x (1 + e) with the smallest cut (closest to the targets on ties; when no
 * position is within, the least excess). Each side keeps at least as many vertices
 * as parts it must produce. side[v] = 0 for the vertices of the parts with
 * left[i] = 1, 1 for the others.
 */
static hx_status split(const hx_wgraph *g, const int *parts, int kp, const double *t, double e,
                       int *side, int *left, hx_err *err)
{
    hx_status st = HX_OK;
    int n = g->n;
    int *comp = malloc((size_t)n * sizeof *comp);
    int *members = malloc((size_t)n * sizeof *members);
    int *cstart = malloc(((size_t)n + 1) * sizeof *cstart);
    int *queue = malloc((size_t)n * sizeof *queue);
    int *local = malloc((size_t)n * sizeof *local);
    int *order = malloc((size_t)n * sizeof *order);
    int *pos = malloc((size_t)n * sizeof *pos);
    double *wl = malloc(((size_t)n + 1) * sizeof *wl);
    double *cutv = malloc(((size_t)n + 1) * sizeof *cutv);
    keyed *ck = malloc((size_t)n * sizeof *ck);
    size_t ncand_max = (size_t)2 << (kp <= SPLIT_ENUM_MAX_PARTS ? kp : 0);
    split_cand *cands = malloc(ncand_max * sizeof *cands);
    if (!comp || !members || !cstart || !queue || !local || !order || !pos || !wl || !cutv ||
        !ck || !cands) {
        st = no_memory(err);
        goto out;
    }
    for (int v = 0; v < n; v++)
        local[v] = -1;
    double total = vertex_weight_total(g), cut_tol = 1e-12 * edge_weight_total(g);
    int ncand = split_candidates(parts, kp, t, cands);

    /* The order: one component, or components by weight to the side short of its target. */
    int nc = components(g, comp, members, cstart, queue);
    if (nc == 1) {
        st = component_order(g, members, n, local, order, err);
    } else {
        double tl = cands[0].frac * total, tr = total - tl, wlft = 0, wrgt = 0;
        for (int c = 0; c < nc; c++) {
            double cw = 0;
            for (int i = cstart[c]; i < cstart[c + 1]; i++)
                cw += g->vw[members[i]];
            ck[c] = (keyed){.key = -cw, .id = c};
        }
        qsort(ck, (size_t)nc, sizeof *ck, keyed_cmp);
        for (int i = 0; i < nc; i++) { /* queue[c]: 0 left, 1 right */
            int c = ck[i].id;
            int to_left = tl - wlft >= tr - wrgt;
            queue[c] = !to_left;
            if (to_left)
                wlft -= ck[i].key; /* key = -(component weight) */
            else
                wrgt -= ck[i].key;
        }
        int at = 0;
        for (int pass = 0; pass < 2 && st == HX_OK; pass++) {
            /* Left components heaviest first, then right ones lightest first. */
            for (int i = 0; i < nc && st == HX_OK; i++) {
                int c = ck[pass ? nc - 1 - i : i].id;
                if (queue[c] != pass)
                    continue;
                int sz = cstart[c + 1] - cstart[c];
                st = component_order(g, members + cstart[c], sz, local, order + at, err);
                at += sz;
            }
        }
    }
    if (st != HX_OK)
        goto out;

    /* Sweep both directions; score every candidate at every admissible position. */
    split_score best = {0};
    int best_dir = -1, best_pos = 0, best_cand = 0;
    for (int dir = 0; dir < 2; dir++) {
        if (dir == 1)
            for (int i = 0; i < n / 2; i++) {
                int tmp = order[i];
                order[i] = order[n - 1 - i];
                order[n - 1 - i] = tmp;
            }
        for (int i = 0; i < n; i++)
            pos[order[i]] = i;
        wl[0] = 0;
        cutv[0] = 0;
        for (int i = 0; i < n; i++) {
            int v = order[i];
            double dc = 0;
            for (int x = g->xadj[v]; x < g->xadj[v + 1]; x++)
                dc += pos[g->adj[x]] > i ? g->ew[x] : -g->ew[x];
            cutv[i + 1] = cutv[i] + dc;
            wl[i + 1] = wl[i] + g->vw[v];
        }
        for (int c = 0; c < ncand; c++) {
            double tl = cands[c].frac * total, tr = total - tl;
            for (int i = cands[c].kpre; i <= n - cands[c].kpost; i++) {
                double wr = total - wl[i];
                double dev = fmax(fmax(0, wl[i] - tl * (1 + e)) / tl,
                                  fmax(0, wr - tr * (1 + e)) / tr);
                split_score sc = {.feasible = dev <= 1e-12,
                                  .cut = cutv[i],
                                  .dev = dev,
                                  .dist = fabs(wl[i] - tl) / total};
                if (best_dir < 0 || score_better(&sc, &best, cut_tol)) {
                    best = sc;
                    best_dir = dir;
                    best_pos = i;
                    best_cand = c;
                }
            }
        }
    }
    if (best_dir == 0) /* order is reversed now */
        for (int i = 0; i < n / 2; i++) {
            int tmp = order[i];
            order[i] = order[n - 1 - i];
            order[n - 1 - i] = tmp;
        }

    /* Side 0 is the part set of `left`: the prefix's parts. */
    const split_cand *c = &cands[best_cand];
    for (int i = 0; i < kp; i++)
        left[i] = cand_has(c, kp, i);
    for (int i = 0; i < n; i++)
        side[order[i]] = i < best_pos ? 0 : 1;
out:
    free(comp);
    free(members);
    free(cstart);
    free(queue);
    free(local);
    free(order);
    free(pos);
    free(wl);
    free(cutv);
    free(ck);
    free(cands);
    return st;
}

/*
 * Recursive bisection of g into the parts parts[kp]: split, refine the two sides
 * with FM (side limits target x (1 + e), side vertex minimum = its part count),
 * recurse into the induced subgraphs. part_out[ids[v]] gets the part of g's vertex v
 * (ids NULL: identity).
 */
static hx_status bisect(const hx_wgraph *g, const int *ids, const int *parts, int kp,
                        const double *t, double e, int *part_out, hx_err *err)
{
    hx_status st = HX_OK;
    int n = g->n;
    if (kp == 1) {
        for (int v = 0; v < n; v++)
            part_out[ids ? ids[v] : v] = parts[0];
        return HX_OK;
    }
    owned_graph sub = {0};
    int *side = malloc((size_t)n * sizeof *side);
    int *verts = malloc((size_t)n * sizeof *verts);
    int *sub_ids = malloc((size_t)n * sizeof *sub_ids);
    int *local = malloc((size_t)n * sizeof *local);
    int *left = malloc((size_t)kp * sizeof *left);
    int *sub_parts = malloc((size_t)kp * sizeof *sub_parts);
    if (!side || !verts || !sub_ids || !local || !left || !sub_parts) {
        st = no_memory(err);
        goto out;
    }
    st = split(g, parts, kp, t, e, side, left, err);
    if (st != HX_OK)
        goto out;

    double total = vertex_weight_total(g), tsum = 0, tleft = 0, maxw[2];
    int minc[2] = {0, 0};
    for (int i = 0; i < kp; i++) {
        tsum += t[parts[i]];
        if (left[i])
            tleft += t[parts[i]];
        minc[left[i] ? 0 : 1]++;
    }
    maxw[0] = tleft / tsum * total * (1 + e);
    maxw[1] = (1 - tleft / tsum) * total * (1 + e);
    if (refine_core(g, 2, maxw, minc, side, NULL) != HX_OK) {
        st = no_memory(err);
        goto out;
    }

    for (int v = 0; v < n; v++)
        local[v] = -1;
    for (int s = 0; s < 2 && st == HX_OK; s++) {
        int nv = 0, ks = 0;
        for (int v = 0; v < n; v++)
            if (side[v] == s)
                verts[nv++] = v;
        for (int i = 0; i < kp; i++)
            if (left[i] == (s == 0))
                sub_parts[ks++] = parts[i];
        for (int i = 0; i < nv; i++)
            sub_ids[i] = ids ? ids[verts[i]] : verts[i];
        if (induced_subgraph(g, verts, nv, local, &sub) != HX_OK) {
            st = no_memory(err);
            break;
        }
        st = bisect(&sub.g, sub_ids, sub_parts, ks, t, e, part_out, err);
        owned_graph_release(&sub);
    }
out:
    free(side);
    free(verts);
    free(sub_ids);
    free(local);
    free(left);
    free(sub_parts);
    return st;
}

/* Spectral recursive bisection of g into k parts, then k-way refinement. */
static hx_status spectral_partition(const hx_wgraph *g, int k, const double *t,
                                    double imbalance, const double *maxw, int *part,
                                    hx_err *err)
{
    int *parts = malloc((size_t)k * sizeof *parts);
    if (!parts)
        return no_memory(err);
    for (int p = 0; p < k; p++)
        parts[p] = p;
    /* Excess compounds down the levels: give each level an equal share. */
    int depth = 0;
    while ((1 << depth) < k && depth < 30)
        depth++;
    hx_status st = bisect(g, NULL, parts, k, t, imbalance / (depth > 0 ? depth : 1), part, err);
    free(parts);
    if (st == HX_OK && refine_core(g, k, maxw, NULL, part, NULL) != HX_OK)
        st = no_memory(err);
    return st;
}

/* ---- multilevel ------------------------------------------------------------------ */

/*
 * One coarsening level: heavy-edge matching (vertices in seeded random order, each
 * matched to its unmatched neighbour of heaviest edge, if the pair's weight stays
 * within vcap), then collapse: vertex weights summed, parallel edges merged.
 * cmap[v] gets v's coarse vertex; out is allocated here (caller releases).
 * perm, match, mark: [g->n] scratch.
 */
static hx_status coarsen(const hx_wgraph *g, double vcap, uint64_t *rng, int *perm, int *match,
                         int *mark, int *cmap, owned_graph *out)
{
    int n = g->n, nc = 0;
    for (int v = 0; v < n; v++) {
        perm[v] = v;
        match[v] = -1;
        cmap[v] = -1;
    }
    rng_shuffle(rng, perm, n);
    for (int i = 0; i < n; i++) {
        int v = perm[i], best = -1;
        double best_w = 0;
        if (match[v] >= 0)
            continue;
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++) {
            int u = g->adj[e];
            if (match[u] < 0 && g->ew[e] > best_w && g->vw[v] + g->vw[u] <= vcap) {
                best = u;
                best_w = g->ew[e];
            }
        }
        match[v] = best >= 0 ? best : v;
        if (best >= 0)
            match[best] = v;
    }
    for (int v = 0; v < n; v++)
        if (cmap[v] < 0) {
            cmap[v] = cmap[match[v]] = nc++;
        }
    hx_status st = owned_graph_alloc(out, nc, g->xadj[n]);
    if (st != HX_OK)
        return st;
    for (int c = 0; c < nc; c++)
        mark[c] = -1;
    int at = 0;
    for (int v = 0; v < n; v++) {
        if (match[v] < v) /* the lower vertex of a pair stands for it */
            continue;
        int cv = cmap[v], row = at;
        out->vw[cv] = g->vw[v] + (match[v] != v ? g->vw[match[v]] : 0);
        for (int m = 0; m < (match[v] != v ? 2 : 1); m++) {
            int x = m ? match[v] : v;
            for (int e = g->xadj[x]; e < g->xadj[x + 1]; e++) {
                int cu = cmap[g->adj[e]];
                if (cu == cv)
                    continue;
                if (mark[cu] >= row) {
                    out->ew[mark[cu]] += g->ew[e];
                } else {
                    mark[cu] = at;
                    out->adj[at] = cu;
                    out->ew[at] = g->ew[e];
                    at++;
                }
            }
        }
        out->xadj[cv + 1] = at;
    }
    return HX_OK;
}

/*
 * Multilevel spectral partitioning: coarsen until the graph has at most
 * HX_PARTITION_COARSE_MAX vertices (or a level shrinks it by less than 10%, or would
 * leave fewer than 2k vertices), partition the coarsest graph spectrally, then
 * project back level by level with FM refinement at each.
 */
static hx_status multilevel_partition(const hx_wgraph *g, int k, const double *t,
                                      double imbalance, unsigned long seed, const double *maxw,
                                      int *part, hx_err *err)
{
    hx_status st = HX_OK;
    int n = g->n, nlv = 0, cap = 0;
    owned_graph *lv = NULL; /* lv[l]: the graph of level l + 1 */
    int **cmaps = NULL;     /* cmaps[l]: level l vertex -> level l + 1 vertex */
    int *perm = malloc((size_t)n * sizeof *perm);
    int *match = malloc((size_t)n * sizeof *match);
    int *mark = malloc((size_t)n * sizeof *mark);
    int *pa = malloc((size_t)n * sizeof *pa);
    int *pb = malloc((size_t)n * sizeof *pb);
    int *cmap = NULL;
    owned_graph next = {0};
    if (!perm || !match || !mark || !pa || !pb) {
        st = no_memory(err);
        goto out;
    }
    /* A coarse vertex may not outgrow a fair share of the coarsest graph, nor half of
       the smallest part. */
    double total = vertex_weight_total(g), vmax = 0, tmin = 1;
    for (int v = 0; v < n; v++)
        vmax = fmax(vmax, g->vw[v]);
    for (int p = 0; p < k; p++)
        tmin = fmin(tmin, t[p]);
    double vcap = fmax(vmax, fmin(4 * total / HX_PARTITION_COARSE_MAX, 0.5 * tmin * total));
    uint64_t rng = seed;

    for (;;) {
        const hx_wgraph *cur = nlv ? &lv[nlv - 1].g : g;
        if (cur->n <= HX_PARTITION_COARSE_MAX)
            break;
        if (nlv == cap) {
            int ncap = cap ? 2 * cap : 8;
            owned_graph *nl = realloc(lv, (size_t)ncap * sizeof *lv);
            if (nl)
                lv = nl;
            int **nm = realloc(cmaps, (size_t)ncap * sizeof *cmaps);
            if (nm)
                cmaps = nm;
            if (!nl || !nm) {
                st = no_memory(err);
                goto out;
            }
            cap = ncap;
            cur = nlv ? &lv[nlv - 1].g : g;
        }
        cmap = malloc((size_t)cur->n * sizeof *cmap);
        if (!cmap || coarsen(cur, vcap, &rng, perm, match, mark, cmap, &next) != HX_OK) {
            st = no_memory(err);
            goto out;
        }
        if (next.g.n > COARSEN_MIN_SHRINK * cur->n || next.g.n < 2 * k) {
            owned_graph_release(&next);
            free(cmap);
            cmap = NULL;
            break;
        }
        lv[nlv] = next;
        cmaps[nlv] = cmap;
        memset(&next, 0, sizeof next);
        cmap = NULL;
        nlv++;
    }

    st = spectral_partition(nlv ? &lv[nlv - 1].g : g, k, t, imbalance, maxw, pa, err);
    for (int l = nlv - 1; l >= 0 && st == HX_OK; l--) {
        const hx_wgraph *fine = l ? &lv[l - 1].g : g;
        for (int v = 0; v < fine->n; v++)
            pb[v] = pa[cmaps[l][v]];
        int *tmp = pa;
        pa = pb;
        pb = tmp;
        if (refine_core(fine, k, maxw, NULL, pa, NULL) != HX_OK)
            st = no_memory(err);
    }
    if (st == HX_OK)
        memcpy(part, pa, (size_t)n * sizeof *part);
out:
    for (int l = 0; l < nlv; l++) {
        owned_graph_release(&lv[l]);
        free(cmaps[l]);
    }
    owned_graph_release(&next);
    free(cmap);
    free(lv);
    free(cmaps);
    free(perm);
    free(match);
    free(mark);
    free(pa);
    free(pb);
    return st;
}

/* ---- metis ----------------------------------------------------------------------- */

/*
 * Scale for turning positive weights into integers: the largest becomes
 * METIS_MAX_WEIGHT, unless the sum would then pass METIS_MAX_TOTAL.
 */
static double integer_scale(double wmax, double wsum)
{
    return fmin(METIS_MAX_WEIGHT / wmax, METIS_MAX_TOTAL / wsum);
}

static idx_t to_integer_weight(double w, double scale)
{
    if (!(w > 0))
        return 0;
    double x = round(w * scale);
    return (idx_t)(x < 1 ? 1 : x);
}

/* METIS_PartGraphKway on integer-scaled weights; part[] may have empty parts after. */
static hx_status metis_partition(const hx_wgraph *g, int k, const double *t, double imbalance,
                                 unsigned long seed, int *part, hx_err *err)
{
    hx_status st = HX_OK;
    int n = g->n, nnz = g->xadj[n];
    idx_t *xadj = malloc(((size_t)n + 1) * sizeof *xadj);
    idx_t *adjncy = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *adjncy);
    idx_t *adjwgt = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *adjwgt);
    idx_t *vwgt = malloc((size_t)n * sizeof *vwgt);
    idx_t *mpart = malloc((size_t)n * sizeof *mpart);
    real_t *tpwgts = malloc((size_t)k * sizeof *tpwgts);
    if (!xadj || !adjncy || !adjwgt || !vwgt || !mpart || !tpwgts) {
        st = no_memory(err);
        goto out;
    }
    /* METIS cannot place a vertex heavier than a whole part and then leaves parts
       empty (printing to stdout on the way): it sees weights clipped to the smallest
       part's target. Refinement afterwards uses the true weights. */
    double vclip = vertex_weight_total(g), vmax = 0, vsum = 0, emax = 0, esum = 0;
    for (int p = 0; p < k; p++)
        vclip = fmin(vclip, t[p] * vertex_weight_total(g));
    for (int v = 0; v < n; v++) {
        vmax = fmax(vmax, fmin(g->vw[v], vclip));
        vsum += fmin(g->vw[v], vclip);
    }
    for (int e = 0; e < nnz; e++) {
        emax = fmax(emax, g->ew[e]);
        esum += g->ew[e];
    }
    double vscale = integer_scale(vmax, vsum);
    double escale = nnz > 0 ? integer_scale(emax, esum) : 1;
    for (int v = 0; v <= n; v++)
        xadj[v] = (idx_t)g->xadj[v];
    for (int v = 0; v < n; v++)
        vwgt[v] = to_integer_weight(fmin(g->vw[v], vclip), vscale);
    for (int e = 0; e < nnz; e++) {
        adjncy[e] = (idx_t)g->adj[e];
        adjwgt[e] = to_integer_weight(g->ew[e], escale);
    }
    /* Single precision targets that still sum to 1. */
    real_t rest = 1;
    for (int p = 0; p < k; p++) {
        tpwgts[p] = p + 1 < k ? (real_t)t[p] : rest;
        rest -= tpwgts[p];
    }
    if (!(tpwgts[k - 1] > 0))
        tpwgts[k - 1] = (real_t)t[k - 1];

    idx_t options[METIS_NOPTIONS];
    METIS_SetDefaultOptions(options);
    options[METIS_OPTION_SEED] = (idx_t)(seed & 0x7fffffffUL);
    options[METIS_OPTION_NUMBERING] = 0;
    options[METIS_OPTION_CONTIG] = 0;
    idx_t nvtxs = n, ncon = 1, nparts = k, objval = 0;
    real_t ubvec[1] = {(real_t)(1 + fmax(imbalance, 0.001))};
    /*
     * METIS prints to stdout on some degenerate inputs; our stdout may be a
     * JSON document (plan --json), so its chatter goes to /dev/null.
     */
    fflush(stdout);
    int saved_stdout = dup(STDOUT_FILENO);
    int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (saved_stdout >= 0 && devnull >= 0)
        dup2(devnull, STDOUT_FILENO);
    int rc = METIS_PartGraphKway(&nvtxs, &ncon, xadj, adjncy, vwgt, NULL, adjwgt, &nparts,
                                 tpwgts, ubvec, options, &objval, mpart);
    fflush(stdout);
    if (saved_stdout >= 0 && devnull >= 0)
        dup2(saved_stdout, STDOUT_FILENO);
    if (saved_stdout >= 0)
        close(saved_stdout);
    if (devnull >= 0)
        close(devnull);
    if (rc != METIS_OK) {
        st = hx_err_set(err, rc == METIS_ERROR_MEMORY ? HX_ENOMEM : HX_EINTERNAL,
                        "partition: METIS_PartGraphKway failed (%s) on %d vertices, k = %d",
                        rc == METIS_ERROR_INPUT    ? "bad input"
                        : rc == METIS_ERROR_MEMORY ? "out of memory"
                                                   : "error",
                        n, k);
        goto out;
    }
    for (int v = 0; v < n; v++) {
        if (mpart[v] < 0 || mpart[v] >= k) {
            st = hx_err_set(err, HX_EINTERNAL,
                            "partition: METIS put vertex %d in part %d, outside [0, %d)", v,
                            (int)mpart[v], k);
            goto out;
        }
        part[v] = (int)mpart[v];
    }
out:
    free(xadj);
    free(adjncy);
    free(adjwgt);
    free(vwgt);
    free(mpart);
    free(tpwgts);
    return st;
}

/* One adjacency entry, for renumbering. */
typedef struct adj_entry {
    int row, col;
    double w;
} adj_entry;

static int adj_entry_cmp(const void *a, const void *b)
{
    const adj_entry *x = a, *y = b;
    if (x->row != y->row)
        return (x->row > y->row) - (x->row < y->row);
    return (x->col > y->col) - (x->col < y->col);
}

/* A copy of g with vertex v renamed perm[v] and each adjacency row in new-id order. */
static hx_status renumbered_copy(const hx_wgraph *g, const int *perm, owned_graph *out)
{
    int n = g->n, nnz = g->xadj[n];
    adj_entry *ent = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *ent);
    if (!ent)
        return HX_ENOMEM;
    hx_status st = owned_graph_alloc(out, n, nnz);
    if (st == HX_OK) {
        for (int v = 0; v < n; v++) {
            out->vw[perm[v]] = g->vw[v];
            for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
                ent[e] = (adj_entry){.row = perm[v], .col = perm[g->adj[e]], .w = g->ew[e]};
        }
        qsort(ent, (size_t)nnz, sizeof *ent, adj_entry_cmp);
        for (int e = 0; e < nnz; e++) {
            out->xadj[ent[e].row + 1]++;
            out->adj[e] = ent[e].col;
            out->ew[e] = ent[e].w;
        }
        for (int v = 0; v < n; v++)
            out->xadj[v + 1] += out->xadj[v];
    }
    free(ent);
    return st;
}

/*
 * METIS followed by empty-part repair and FM. METIS's result on small graphs depends
 * strongly on the vertex numbering (its initial bisections grow regions in
 * adjacency order; on dense graphs that is all there is to go on), so graphs up to
 * HX_PARTITION_COARSE_MAX vertices get METIS_SMALL_TRIES runs, the first on g as
 * given and the others on seeded renumberings, and keep the refined result with the
 * least excess weight, then the smallest cut.
 */
static hx_status metis_multistart(const hx_wgraph *g, int k, const double *t,
                                  const hx_partition_opts *o, const double *maxw, int *part,
                                  hx_err *err)
{
    hx_status st = HX_OK;
    int n = g->n, tries = n <= HX_PARTITION_COARSE_MAX ? METIS_SMALL_TRIES : 1, have = 0;
    int *cand = malloc((size_t)n * sizeof *cand);
    int *cpart = malloc((size_t)n * sizeof *cpart);
    int *perm = malloc((size_t)n * sizeof *perm);
    double *pw = malloc((size_t)k * sizeof *pw);
    owned_graph copy = {0};
    if (!cand || !cpart || !perm || !pw) {
        st = no_memory(err);
        goto out;
    }
    double w_tol = 1e-12 * vertex_weight_total(g), cut_tol = 1e-12 * edge_weight_total(g);
    double best_excess = 0, best_cut = 0;
    uint64_t rng = o->seed;
    for (int attempt = 0; attempt < tries; attempt++) {
        const hx_wgraph *h = g;
        for (int v = 0; v < n; v++)
            perm[v] = v;
        if (attempt > 0) {
            rng_shuffle(&rng, perm, n);
            if (renumbered_copy(g, perm, &copy) != HX_OK) {
                st = no_memory(err);
                goto out;
            }
            h = &copy.g;
        }
        st = metis_partition(h, k, t, o->imbalance, o->seed, cpart, err);
        owned_graph_release(&copy);
        if (st != HX_OK)
            goto out;
        for (int v = 0; v < n; v++)
            cand[v] = cpart[perm[v]];
        st = fill_empty_parts(g, k, cand, err);
        if (st != HX_OK)
            goto out;
        if (refine_core(g, k, maxw, NULL, cand, NULL) != HX_OK) {
            st = no_memory(err);
            goto out;
        }
        double excess = 0, cut = hx_partition_cut(g, cand);
        hx_partition_weights(g, cand, k, pw);
        for (int p = 0; p < k; p++)
            excess += fmax(0, pw[p] - maxw[p]);
        if (!have || excess < best_excess - w_tol ||
            (excess <= best_excess + w_tol && cut < best_cut - cut_tol)) {
            memcpy(part, cand, (size_t)n * sizeof *part);
            best_excess = excess;
            best_cut = cut;
            have = 1;
        }
    }
out:
    owned_graph_release(&copy);
    free(cand);
    free(cpart);
    free(perm);
    free(pw);
    return st;
}

/* ---- trivial cases --------------------------------------------------------------- */

/* k == n: one vertex per part, the heaviest vertex to the largest target. */
static hx_status one_per_part(const hx_wgraph *g, const double *t, int *part, hx_err *err)
{
    int n = g->n;
    keyed *vs = malloc((size_t)n * sizeof *vs);
    keyed *ps = malloc((size_t)n * sizeof *ps);
    if (!vs || !ps) {
        free(vs);
        free(ps);
        return no_memory(err);
    }
    for (int i = 0; i < n; i++) {
        vs[i] = (keyed){.key = -g->vw[i], .id = i};
        ps[i] = (keyed){.key = -t[i], .id = i};
    }
    qsort(vs, (size_t)n, sizeof *vs, keyed_cmp);
    qsort(ps, (size_t)n, sizeof *ps, keyed_cmp);
    for (int i = 0; i < n; i++)
        part[vs[i].id] = ps[i].id;
    free(vs);
    free(ps);
    return HX_OK;
}

/* A graph without edges: heaviest vertex first, each to the part furthest below target. */
static hx_status greedy_by_weight(const hx_wgraph *g, int k, const double *t, int *part,
                                  hx_err *err)
{
    int n = g->n;
    keyed *vs = malloc((size_t)n * sizeof *vs);
    double *pw = calloc((size_t)k, sizeof *pw);
    if (!vs || !pw) {
        free(vs);
        free(pw);
        return no_memory(err);
    }
    double total = vertex_weight_total(g);
    for (int i = 0; i < n; i++)
        vs[i] = (keyed){.key = -g->vw[i], .id = i};
    qsort(vs, (size_t)n, sizeof *vs, keyed_cmp);
    for (int i = 0; i < n; i++) {
        int best = 0;
        for (int p = 1; p < k; p++)
            if (t[p] * total - pw[p] > t[best] * total - pw[best])
                best = p;
        part[vs[i].id] = best;
        pw[best] += g->vw[vs[i].id];
    }
    free(vs);
    free(pw);
    return HX_OK;
}

/* ---- public API ------------------------------------------------------------------ */

hx_status hx_partition(const hx_wgraph *g, const hx_partition_opts *opts, int *part,
                       hx_err *err)
{
    hx_status st = check_graph(g, err);
    if (st == HX_OK)
        st = check_opts(g, opts, 1, err);
    if (st != HX_OK)
        return st;
    if (!part)
        return hx_err_set(err, HX_EINVAL, "partition: output array is NULL");

    int n = g->n, k = opts->k;
    double *t = malloc((size_t)k * sizeof *t);
    double *maxw = malloc((size_t)k * sizeof *maxw);
    if (!t || !maxw) {
        st = no_memory(err);
        goto out;
    }
    fill_targets(opts, t);
    double total = vertex_weight_total(g);
    for (int p = 0; p < k; p++)
        maxw[p] = t[p] * total * (1 + opts->imbalance);

    if (k == 1) {
        memset(part, 0, (size_t)n * sizeof *part);
        goto out;
    }
    if (k == n) {
        st = one_per_part(g, t, part, err);
        goto out;
    }
    if (g->xadj[n] == 0)
        st = greedy_by_weight(g, k, t, part, err);
    else if (opts->method == HX_PARTITION_METIS)
        st = metis_multistart(g, k, t, opts, maxw, part, err);
    else if (n <= HX_PARTITION_COARSE_MAX)
        st = spectral_partition(g, k, t, opts->imbalance, maxw, part, err);
    else
        st = multilevel_partition(g, k, t, opts->imbalance, opts->seed, maxw, part, err);
    if (st != HX_OK)
        goto out;
    /* The weight-only greedy may leave parts empty; the other paths never do (METIS's
       are filled above), and then this changes nothing. */
    st = fill_empty_parts(g, k, part, err);
    if (st == HX_OK && g->xadj[n] == 0 && refine_core(g, k, maxw, NULL, part, NULL) != HX_OK)
        st = no_memory(err);
out:
    free(t);
    free(maxw);
    return st;
}

int hx_partition_refine(const hx_wgraph *g, const hx_partition_opts *opts, int *part)
{
    if (check_graph(g, NULL) != HX_OK || check_opts(g, opts, 0, NULL) != HX_OK || !part)
        return -1;
    for (int v = 0; v < g->n; v++)
        if (part[v] < 0 || part[v] >= opts->k)
            return -1;
    int k = opts->k, moves = -1;
    double *t = malloc((size_t)k * sizeof *t);
    double *maxw = malloc((size_t)k * sizeof *maxw);
    if (t && maxw) {
        fill_targets(opts, t);
        double total = vertex_weight_total(g);
        for (int p = 0; p < k; p++)
            maxw[p] = t[p] * total * (1 + opts->imbalance);
        if (refine_core(g, k, maxw, NULL, part, &moves) != HX_OK)
            moves = -1;
    }
    free(t);
    free(maxw);
    return moves;
}

double hx_partition_cut(const hx_wgraph *g, const int *part)
{
    double cut = 0;
    if (!g || !part)
        return 0;
    for (int v = 0; v < g->n; v++)
        for (int e = g->xadj[v]; e < g->xadj[v + 1]; e++)
            if (g->adj[e] > v && part[g->adj[e]] != part[v])
                cut += g->ew[e];
    return cut;
}

void hx_partition_weights(const hx_wgraph *g, const int *part, int k, double *weights)
{
    if (!weights || k < 1)
        return;
    for (int p = 0; p < k; p++)
        weights[p] = 0;
    if (!g || !part)
        return;
    for (int v = 0; v < g->n; v++)
        if (part[v] >= 0 && part[v] < k)
            weights[part[v]] += g->vw[v];
}
