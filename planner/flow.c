/*
 * flow.c - maximum s-t flow as a linear program solved by GLPK's simplex.
 *
 * The LP has one column x_e per edge that can carry flow, bounded by
 * 0 <= x_e <= cap_e (no upper bound for an infinite capacity), one equality
 * row per internal node (inflow - outflow = 0), and maximises the flow out of
 * s. Each solve goes through these steps, all O(nodes + edges) outside GLPK:
 *
 *  1. Pruning. An edge is "live" when it has a positive capacity, is not a
 *     loop, does not enter s or leave t, its tail is reachable from s and its
 *     head reaches t over such edges. Only live edges can lie on an s-t path,
 *     and some maximum flow uses nothing else, so the others get 0 and stay
 *     out of the LP (a disconnected sink never calls GLPK).
 *  2. Unboundedness. t reachable from s over INFINITY live edges means an
 *     infinite flow: HX_ERANGE.
 *  3. Scaling. Capacities are divided by sigma, the power of two at or above
 *     the largest finite live capacity: exact in binary floating point, and
 *     it brings every bound into (0, 1], where GLPK's absolute tolerances
 *     are meant to work.
 *  4. Simplex. GLPK's primal simplex with presolve and a tight feasibility
 *     tolerance (retried without presolve from the all-slack basis, zero
 *     flow, should that fail); messages and terminal output off.
 *  5. Exact polish. glp_exact, warm-started from the simplex basis, checks
 *     that basis in rational arithmetic and, should the floating-point
 *     simplex have accepted a basis that is infeasible within its tolerance
 *     (possible when capacities span many orders of magnitude), finishes the
 *     job with exact pivots. The max-flow matrix is totally unimodular, so
 *     every basic flow is an exact signed sum of capacities: the result is
 *     the exact optimum up to one rounding per edge flow.
 *  6. Cleaning and the cut. Flows are clamped into [0, cap], the value is
 *     the flow out of s, and a breadth-first search of the residual network
 *     from s (arcs with flow < cap forward, flow > 0 backward) marks the
 *     source side of a minimum cut. After the exact pass these comparisons
 *     need no tolerance: a saturated edge's flow is its capacity exactly.
 *
 * GLPK calls abort() on invalid arguments (and when out of memory); every
 * value passed to it is checked here first (no NaN or inverted bounds, no
 * duplicate matrix entries). GLPK keeps its state per thread, so separate
 * networks may be solved on separate threads.
 */
#include "flow.h"

#include <float.h>
#include <glpk.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Initial edge storage; doubled when full. */
#define FLOW_EDGES_INIT 16

/*
 * The exact pass needs every capacity as an integer (times a power of two)
 * below 2^FLOW_EXACT_MAX_BITS, i.e. finite capacities within a ratio of
 * 2^(FLOW_EXACT_MAX_BITS - 53) ~ 1e271 of each other. Networks beyond that
 * keep the floating-point simplex result: flows within FLOW_SNAP_REL times
 * the largest capacity of a bound are moved onto it, and residual capacities
 * below that do not count in the cut.
 */
#define FLOW_EXACT_MAX_BITS 960
#define FLOW_SNAP_REL 1e-12

/* GLPK's primal feasibility tolerance on the scaled problem (default 1e-7). */
#define FLOW_TOL_BND 1e-12

typedef struct flow_edge {
    int from;
    int to;
    double cap;  /* requests/s, >= 0, may be INFINITY */
    double flow; /* after a solve: in [0, cap] */
} flow_edge;

struct hx_flow {
    int nnodes;
    int nedges;
    int edges_alloc;
    flow_edge *edges; /* [edges_alloc], owned */
    unsigned char *side; /* [nnodes], owned: 1 = source side of the cut */
    int solved; /* flows and side hold the last successful solve */
};

/* ---- lifecycle and building --------------------------------------------- */

hx_flow *hx_flow_new(int nnodes)
{
    if (nnodes < 0)
        return NULL;
    hx_flow *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->nnodes = nnodes;
    f->side = calloc((size_t)nnodes + 1, 1);
    if (!f->side) {
        free(f);
        return NULL;
    }
    return f;
}

void hx_flow_free(hx_flow *f)
{
    if (!f)
        return;
    free(f->edges);
    free(f->side);
    free(f);
}

int hx_flow_add_edge(hx_flow *f, int from, int to, double cap)
{
    if (!f || from < 0 || from >= f->nnodes || to < 0 || to >= f->nnodes)
        return -1;
    if (isnan(cap) || cap < 0)
        return -1;
    /* Columns and matrix entries of the LP are int-indexed: 2 per edge. */
    if (f->nedges >= INT_MAX / 2 - 1)
        return -1;
    if (f->nedges == f->edges_alloc) {
        int grow = f->edges_alloc ? f->edges_alloc : FLOW_EDGES_INIT;
        if (grow > INT_MAX / 2 - f->edges_alloc)
            grow = INT_MAX / 2 - f->edges_alloc;
        int n = f->edges_alloc + grow;
        flow_edge *e = realloc(f->edges, (size_t)n * sizeof *e);
        if (!e)
            return -1;
        f->edges = e;
        f->edges_alloc = n;
    }
    flow_edge *e = &f->edges[f->nedges];
    e->from = from;
    e->to = to;
    e->cap = cap == 0 ? 0.0 : cap; /* -0 becomes +0 */
    e->flow = 0.0;
    f->solved = 0; /* the network changed: previous results no longer apply */
    return f->nedges++;
}

int hx_flow_num_nodes(const hx_flow *f)
{
    return f ? f->nnodes : 0;
}

int hx_flow_num_edges(const hx_flow *f)
{
    return f ? f->nedges : 0;
}

/* ---- solving ------------------------------------------------------------- */

/*
 * Adjacency of the network in compressed form, and the scratch arrays of one
 * solve. All arrays are owned by the workspace and freed by ws_release().
 */
typedef struct flow_ws {
    int *out_start; /* [nnodes+1]: edges leaving v are out_edge[out_start[v] ..) */
    int *out_edge;  /* [nedges] */
    int *in_start;  /* [nnodes+1] */
    int *in_edge;   /* [nedges] */
    int *queue;     /* [nnodes]: BFS queue */
    unsigned char *from_s; /* [nnodes]: reachable from s */
    unsigned char *to_t;   /* [nnodes]: reaches t */
    int *row;       /* [nnodes]: LP row of an internal node, 0 if none */
    int *col_edge;  /* [nedges+1]: edge of LP column j (1-based) */
    int *ia, *ja;   /* [2*nedges+1]: matrix entries, 1-based */
    double *ar;     /* [2*nedges+1] */
} flow_ws;

static void ws_release(flow_ws *w)
{
    free(w->out_start);
    free(w->out_edge);
    free(w->in_start);
    free(w->in_edge);
    free(w->queue);
    free(w->from_s);
    free(w->to_t);
    free(w->row);
    free(w->col_edge);
    free(w->ia);
    free(w->ja);
    free(w->ar);
    memset(w, 0, sizeof *w);
}

static hx_status ws_init(flow_ws *w, const hx_flow *f)
{
    size_t n = (size_t)f->nnodes, m = (size_t)f->nedges;
    memset(w, 0, sizeof *w);
    w->out_start = calloc(n + 1, sizeof *w->out_start);
    w->out_edge = malloc((m + 1) * sizeof *w->out_edge);
    w->in_start = calloc(n + 1, sizeof *w->in_start);
    w->in_edge = malloc((m + 1) * sizeof *w->in_edge);
    w->queue = malloc((n + 1) * sizeof *w->queue);
    w->from_s = calloc(n + 1, 1);
    w->to_t = calloc(n + 1, 1);
    w->row = calloc(n + 1, sizeof *w->row);
    w->col_edge = malloc((m + 1) * sizeof *w->col_edge);
    w->ia = malloc((2 * m + 1) * sizeof *w->ia);
    w->ja = malloc((2 * m + 1) * sizeof *w->ja);
    w->ar = malloc((2 * m + 1) * sizeof *w->ar);
    if (!w->out_start || !w->out_edge || !w->in_start || !w->in_edge || !w->queue ||
        !w->from_s || !w->to_t || !w->row || !w->col_edge || !w->ia || !w->ja || !w->ar) {
        ws_release(w);
        return HX_ENOMEM;
    }
    /* Counting sort of the edges by tail and by head. */
    for (int e = 0; e < f->nedges; e++) {
        w->out_start[f->edges[e].from + 1]++;
        w->in_start[f->edges[e].to + 1]++;
    }
    for (int v = 0; v < f->nnodes; v++) {
        w->out_start[v + 1] += w->out_start[v];
        w->in_start[v + 1] += w->in_start[v];
    }
    /* Fill using queue/row as running positions, then restore them. */
    int *opos = w->queue, *ipos = w->row;
    memcpy(opos, w->out_start, n * sizeof *opos);
    memcpy(ipos, w->in_start, n * sizeof *ipos);
    for (int e = 0; e < f->nedges; e++) {
        w->out_edge[opos[f->edges[e].from]++] = e;
        w->in_edge[ipos[f->edges[e].to]++] = e;
    }
    memset(w->row, 0, (n + 1) * sizeof *w->row);
    return HX_OK;
}

/*
 * Whether edge e may carry flow at all: positive capacity, no loop, not into
 * s, not out of t. (With `inf_only`, also an infinite capacity.)
 */
static int usable(const flow_edge *e, int s, int t, int inf_only)
{
    if (!(e->cap > 0) || e->from == e->to || e->to == s || e->from == t)
        return 0;
    return !inf_only || isinf(e->cap);
}

/*
 * Marks in `mark` the nodes reachable from `root` over usable edges, forward
 * (out-edges) or backward (in-edges, towards root).
 */
static void reach(const hx_flow *f, flow_ws *w, int root, int s, int t, int backward,
                  int inf_only, unsigned char *mark)
{
    const int *start = backward ? w->in_start : w->out_start;
    const int *list = backward ? w->in_edge : w->out_edge;
    int head = 0, tail = 0;
    memset(mark, 0, (size_t)f->nnodes);
    mark[root] = 1;
    w->queue[tail++] = root;
    while (head < tail) {
        int v = w->queue[head++];
        for (int k = start[v]; k < start[v + 1]; k++) {
            const flow_edge *e = &f->edges[list[k]];
            if (!usable(e, s, t, inf_only))
                continue;
            int u = backward ? e->from : e->to;
            if (!mark[u]) {
                mark[u] = 1;
                w->queue[tail++] = u;
            }
        }
    }
}

/*
 * Source side of the cut: BFS from s in the residual network of the flows,
 * where an arc needs a residual capacity above `eps` (0 after the exact pass).
 */
static void residual_side(hx_flow *f, flow_ws *w, int s, double eps)
{
    int head = 0, tail = 0;
    memset(f->side, 0, (size_t)f->nnodes);
    f->side[s] = 1;
    w->queue[tail++] = s;
    while (head < tail) {
        int v = w->queue[head++];
        /* Forward residual arcs: v->u with flow < cap. */
        for (int k = w->out_start[v]; k < w->out_start[v + 1]; k++) {
            const flow_edge *e = &f->edges[w->out_edge[k]];
            if (e->cap - e->flow > eps && !f->side[e->to]) {
                f->side[e->to] = 1;
                w->queue[tail++] = e->to;
            }
        }
        /* Backward residual arcs: v->u for an edge u->v with flow > 0. */
        for (int k = w->in_start[v]; k < w->in_start[v + 1]; k++) {
            const flow_edge *e = &f->edges[w->in_edge[k]];
            if (e->flow > eps && !f->side[e->from]) {
                f->side[e->from] = 1;
                w->queue[tail++] = e->from;
            }
        }
    }
}

static const char *glpk_ret_text(int ret)
{
    switch (ret) {
    case GLP_EBADB: return "invalid initial basis";
    case GLP_ESING: return "singular basis matrix";
    case GLP_ECOND: return "ill-conditioned basis matrix";
    case GLP_EBOUND: return "incorrect bounds";
    case GLP_EFAIL: return "solver failure";
    case GLP_EITLIM: return "iteration limit reached";
    case GLP_ETMLIM: return "time limit reached";
    case GLP_ENOPFS: return "no primal feasible solution";
    case GLP_ENODFS: return "no dual feasible solution";
    default: return "unknown failure";
    }
}

/*
 * Builds and solves the LP over the live edges (the columns w->col_edge[1..
 * ncols]) and the internal nodes (rows 1..nrows, w->row[] set), storing the
 * cleaned flows into the edges. Finite live capacities lie in [2^emin / 2,
 * 2^emax). Sets *eps to the tolerance the flows are good to (0 when exact).
 */
static hx_status solve_lp(hx_flow *f, flow_ws *w, int s, int t, int ncols, int nrows,
                          int emin, int emax, double *eps, hx_err *err)
{
    hx_status st = HX_OK;
    int term = glp_term_out(GLP_OFF);
    glp_prob *lp = glp_create_prob();
    /* The simplex sees capacities / sigma, all in (0, 1]. */
    double sigma = ldexp(1.0, emax);
    /* The exact pass sees capacities * 2^shift, all integers. */
    int exact = nrows > 0 && emax - emin <= FLOW_EXACT_MAX_BITS - DBL_MANT_DIG;
    int shift = DBL_MANT_DIG - emin;

    glp_set_obj_dir(lp, GLP_MAX);
    if (nrows > 0)
        glp_add_rows(lp, nrows);
    for (int i = 1; i <= nrows; i++)
        glp_set_row_bnds(lp, i, GLP_FX, 0.0, 0.0);
    glp_add_cols(lp, ncols);

    int ne = 0;
    for (int j = 1; j <= ncols; j++) {
        const flow_edge *e = &f->edges[w->col_edge[j]];
        if (isinf(e->cap)) {
            glp_set_col_bnds(lp, j, GLP_LO, 0.0, 0.0);
        } else {
            double ub = e->cap / sigma;
            if (ub > 0)
                glp_set_col_bnds(lp, j, GLP_DB, 0.0, ub);
            else /* underflow; only without the exact pass (see FLOW_EXACT_MAX_BITS) */
                glp_set_col_bnds(lp, j, GLP_FX, 0.0, 0.0);
        }
        if (e->from == s)
            glp_set_obj_coef(lp, j, 1.0);
        /* Row of a node: inflow - outflow = 0. */
        if (e->from != s) {
            ne++;
            w->ia[ne] = w->row[e->from];
            w->ja[ne] = j;
            w->ar[ne] = -1.0;
        }
        if (e->to != t) {
            ne++;
            w->ia[ne] = w->row[e->to];
            w->ja[ne] = j;
            w->ar[ne] = 1.0;
        }
    }
    glp_load_matrix(lp, ne, w->ia, w->ja, w->ar);

    /*
     * Two tries. First, presolve (it halves the iterations on large
     * networks) and a tight feasibility tolerance (scaled capacities go down
     * to the 1e-12 the planner's range implies, and GLPK's default 1e-7 would
     * leave the exact pass many pivots to do). Should that fail numerically,
     * the plain primal simplex with default tolerances from the all-slack
     * basis (zero flow, feasible).
     */
    glp_smcp parm;
    int ret = 0, status = GLP_UNDEF;
    for (int attempt = 0; attempt < 2; attempt++) {
        glp_init_smcp(&parm);
        parm.msg_lev = GLP_MSG_OFF;
        parm.meth = GLP_PRIMAL;
        if (attempt == 0) {
            parm.presolve = GLP_ON;
            parm.tol_bnd = FLOW_TOL_BND;
        } else {
            parm.presolve = GLP_OFF;
            glp_std_basis(lp);
        }
        ret = glp_simplex(lp, &parm);
        /* With presolve, unboundedness comes back as "no dual feasible
         * solution" rather than as a status. */
        if (ret == GLP_ENODFS || (ret == 0 && glp_get_status(lp) == GLP_UNBND)) {
            st = hx_err_set(err, HX_ERANGE, "max flow from %d to %d is unbounded", s, t);
            goto out_lp;
        }
        status = ret == 0 ? glp_get_status(lp) : GLP_UNDEF;
        if (status == GLP_OPT)
            break;
    }
    if (ret != 0) {
        st = hx_err_set(err, HX_EINTERNAL, "max-flow LP (%d nodes, %d edges): GLPK simplex: %s",
                        f->nnodes, f->nedges, glpk_ret_text(ret));
        goto out_lp;
    }
    if (status != GLP_OPT) {
        st = hx_err_set(err, HX_EINTERNAL,
                        "max-flow LP (%d nodes, %d edges): GLPK simplex ended with status %d",
                        f->nnodes, f->nedges, status);
        goto out_lp;
    }

    double unscale = sigma;
    if (exact) {
        /*
         * glp_exact reads a non-integral double through a continued
         * fraction good to 1e-9 only, but an integral one exactly: so hand
         * it the capacities times 2^shift, integers below 2^FLOW_EXACT_MAX_BITS.
         * The basis found above stays valid; scaling does not change which
         * basis is optimal.
         */
        for (int j = 1; j <= ncols; j++) {
            const flow_edge *e = &f->edges[w->col_edge[j]];
            if (!isinf(e->cap))
                glp_set_col_bnds(lp, j, GLP_DB, 0.0, ldexp(e->cap, shift));
        }
        glp_init_smcp(&parm);
        parm.msg_lev = GLP_MSG_OFF;
        ret = glp_exact(lp, &parm);
        if (ret != 0 || glp_get_status(lp) != GLP_OPT) {
            st = hx_err_set(err, HX_EINTERNAL,
                            "max-flow LP (%d nodes, %d edges): GLPK exact simplex: %s",
                            f->nnodes, f->nedges,
                            ret != 0 ? glpk_ret_text(ret) : "not optimal");
            goto out_lp;
        }
        unscale = ldexp(1.0, -shift);
    }

    /*
     * With the exact pass, every flow is an exact rational rounded once, so a
     * flow at a bound is that bound exactly and the clamp only guards the
     * invariant 0 <= flow <= cap. Without it, flows within FLOW_SNAP_REL *
     * sigma of a bound are moved onto it.
     */
    double snap = exact ? 0.0 : FLOW_SNAP_REL * sigma;
    *eps = snap;
    for (int j = 1; j <= ncols; j++) {
        flow_edge *e = &f->edges[w->col_edge[j]];
        double x = glp_get_col_prim(lp, j) * unscale;
        if (!(x > snap)) /* also catches a NaN, which would be a GLPK bug */
            x = 0.0;
        else if (x >= e->cap - snap)
            x = e->cap; /* never for an infinite capacity */
        e->flow = x;
    }

out_lp:
    glp_delete_prob(lp);
    glp_term_out(term);
    return st;
}

hx_status hx_flow_solve(hx_flow *f, int s, int t, double *value, hx_err *err)
{
    if (!f)
        return hx_err_set(err, HX_EINVAL, "max flow: no network");
    if (s < 0 || s >= f->nnodes || t < 0 || t >= f->nnodes)
        return hx_err_set(err, HX_EINVAL,
                          "max flow: source %d or sink %d out of range (%d nodes)", s, t,
                          f->nnodes);
    if (s == t)
        return hx_err_set(err, HX_EINVAL, "max flow: source and sink are the same node %d", s);

    f->solved = 0;
    for (int e = 0; e < f->nedges; e++)
        f->edges[e].flow = 0.0;

    flow_ws w;
    hx_status st = ws_init(&w, f);
    if (st != HX_OK)
        return hx_err_set(err, st, "max flow: out of memory for %d nodes, %d edges", f->nnodes,
                          f->nedges);

    /* 1. Which edges can lie on an s-t path. */
    reach(f, &w, s, s, t, 0, 0, w.from_s);
    reach(f, &w, t, s, t, 1, 0, w.to_t);

    /* 2. An s-t path of infinite capacities makes the value infinite. */
    if (w.from_s[t]) {
        unsigned char *inf_reach = w.to_t; /* to_t is rebuilt below */
        reach(f, &w, s, s, t, 0, 1, inf_reach);
        if (inf_reach[t]) {
            st = hx_err_set(err, HX_ERANGE,
                            "max flow from %d to %d is unbounded: a path of infinite "
                            "capacities joins them",
                            s, t);
            goto out_ws;
        }
        reach(f, &w, t, s, t, 1, 0, w.to_t);
    }

    /* 3. Columns, rows and the scale. */
    int ncols = 0, nrows = 0;
    double eps = 0.0;
    double maxcap = 0.0, mincap = INFINITY;
    for (int e = 0; e < f->nedges; e++) {
        const flow_edge *ed = &f->edges[e];
        if (!usable(ed, s, t, 0) || !w.from_s[ed->from] || !w.to_t[ed->to])
            continue;
        w.col_edge[++ncols] = e;
        if (!isinf(ed->cap)) {
            maxcap = ed->cap > maxcap ? ed->cap : maxcap;
            mincap = ed->cap < mincap ? ed->cap : mincap;
        }
        if (ed->from != s && !w.row[ed->from])
            w.row[ed->from] = ++nrows;
        if (ed->to != t && !w.row[ed->to])
            w.row[ed->to] = ++nrows;
    }

    if (ncols > 0) {
        /* Every live edge is on an s-t path and no path is all-infinite. */
        if (!(maxcap > 0)) {
            st = hx_err_set(err, HX_EINTERNAL, "max flow: live edges without a finite capacity");
            goto out_ws;
        }
        int emax, emin;
        frexp(maxcap, &emax); /* maxcap = m * 2^emax, 0.5 <= m < 1 */
        frexp(mincap, &emin);
        st = solve_lp(f, &w, s, t, ncols, nrows, emin, emax, &eps, err);
        if (st != HX_OK) {
            for (int e = 0; e < f->nedges; e++)
                f->edges[e].flow = 0.0;
            goto out_ws;
        }
    }

    /* 6. Value and cut. Edges into s carry nothing, so the value is a sum of
     * non-negative terms. */
    double v = 0.0;
    for (int k = w.out_start[s]; k < w.out_start[s + 1]; k++)
        v += f->edges[w.out_edge[k]].flow;
    residual_side(f, &w, s, eps);
    if (f->side[t]) {
        st = hx_err_set(err, HX_EINTERNAL,
                        "max flow: sink %d still reachable in the residual network", t);
        for (int e = 0; e < f->nedges; e++)
            f->edges[e].flow = 0.0;
        memset(f->side, 0, (size_t)f->nnodes);
        goto out_ws;
    }
    f->solved = 1;
    if (value)
        *value = v;

out_ws:
    ws_release(&w);
    return st;
}

/* ---- results ------------------------------------------------------------- */

double hx_flow_edge_flow(const hx_flow *f, int edge)
{
    if (!f || edge < 0 || edge >= f->nedges)
        return NAN;
    return f->solved ? f->edges[edge].flow : 0.0;
}

double hx_flow_edge_cap(const hx_flow *f, int edge)
{
    if (!f || edge < 0 || edge >= f->nedges)
        return NAN;
    return f->edges[edge].cap;
}

int hx_flow_source_side(const hx_flow *f, int node)
{
    if (!f || !f->solved || node < 0 || node >= f->nnodes)
        return 0;
    return f->side[node];
}

int hx_flow_edge_in_cut(const hx_flow *f, int edge)
{
    if (!f || !f->solved || edge < 0 || edge >= f->nedges)
        return 0;
    const flow_edge *e = &f->edges[edge];
    return f->side[e->from] && !f->side[e->to];
}
