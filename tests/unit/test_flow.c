/*
 * test_flow.c - maximum flow (planner/flow.h): textbook networks with known
 * values, special edges (parallel, loops, zero, into s / out of t,
 * infinite), the minimum cut, argument checks, and agreement with an
 * independent Edmonds-Karp on hundreds of random networks, general and
 * planner-shaped (source -> prefill -> decode -> sink), whose capacities
 * span up to twelve orders of magnitude.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "planner/flow.h"

/* Agreement asked of the value against the reference (flow.h promises 1e-9). */
#define VALUE_REL 1e-9

/* ---- a network mirrored on the test side ---------------------------------- */

/*
 * flow.h does not give an edge's endpoints back, so the tests keep their own
 * copy of every edge they add.
 */
typedef struct tnet {
    hx_flow *f; /* owned */
    int n;
    int m, alloc;
    int *from, *to; /* [alloc], owned */
    double *cap;    /* [alloc], owned */
} tnet;

static tnet tnet_new(int n)
{
    tnet g = {0};
    g.f = hx_flow_new(n);
    assert_non_null(g.f);
    g.n = n;
    return g;
}

static void tnet_free(tnet *g)
{
    hx_flow_free(g->f);
    free(g->from);
    free(g->to);
    free(g->cap);
    memset(g, 0, sizeof *g);
}

static int tnet_add(tnet *g, int from, int to, double cap)
{
    if (g->m == g->alloc) {
        g->alloc = g->alloc ? 2 * g->alloc : 16;
        g->from = realloc(g->from, (size_t)g->alloc * sizeof *g->from);
        g->to = realloc(g->to, (size_t)g->alloc * sizeof *g->to);
        g->cap = realloc(g->cap, (size_t)g->alloc * sizeof *g->cap);
        assert_true(g->from && g->to && g->cap);
    }
    int id = hx_flow_add_edge(g->f, from, to, cap);
    if (id != g->m)
        fail_msg("adding edge %d->%d cap %g: got id %d, expected %d", from, to, cap, id, g->m);
    g->from[id] = from;
    g->to[id] = to;
    g->cap[id] = cap;
    g->m++;
    return id;
}

static double solve_ok(tnet *g, int s, int t)
{
    hx_err err = {0};
    double v = -1;
    hx_status st = hx_flow_solve(g->f, s, t, &v, &err);
    if (st != HX_OK)
        fail_msg("max flow %d -> %d on %d nodes, %d edges: %s (%s)", s, t, g->n, g->m,
                 hx_strerror(st), err.msg);
    return v;
}

static int close_rel(double a, double b, double rel)
{
    return fabs(a - b) <= rel * fmax(fabs(a), fabs(b));
}

/*
 * Everything a solved network must satisfy:
 *   - 0 <= flow <= cap on every edge, no flow into s or out of t;
 *   - conservation at every other node (to rounding: 1e-12 of its throughput);
 *   - value = flow out of s = flow into t;
 *   - the source side is exactly the set reachable from s over residual arcs
 *     (recomputed here), holds s and not t; edges leaving it are saturated
 *     (flow == cap exactly), edges entering it empty (flow == 0 exactly),
 *     hx_flow_edge_in_cut marks exactly the leaving ones, and their
 *     capacities add up to the value.
 */
static void check_solution(const tnet *g, int s, int t, double value)
{
    const hx_flow *f = g->f;
    double *net = calloc((size_t)g->n, sizeof *net);   /* inflow - outflow */
    double *thru = calloc((size_t)g->n, sizeof *thru); /* inflow + outflow */
    int *seen = calloc((size_t)g->n, sizeof *seen);
    int *queue = calloc((size_t)g->n, sizeof *queue);
    assert_true(net && thru && seen && queue);

    double out_s = 0, in_t = 0, cut = 0;
    for (int e = 0; e < g->m; e++) {
        double x = hx_flow_edge_flow(f, e);
        assert_true(hx_flow_edge_cap(f, e) == g->cap[e]);
        if (!(x >= 0 && x <= g->cap[e]))
            fail_msg("edge %d (%d->%d): flow %.17g outside [0, %.17g]", e, g->from[e], g->to[e],
                     x, g->cap[e]);
        if ((g->to[e] == s || g->from[e] == t) && x != 0)
            fail_msg("edge %d (%d->%d) into s or out of t carries %.17g", e, g->from[e],
                     g->to[e], x);
        if (g->from[e] == g->to[e])
            continue;
        net[g->to[e]] += x;
        net[g->from[e]] -= x;
        thru[g->to[e]] += x;
        thru[g->from[e]] += x;
        if (g->from[e] == s)
            out_s += x;
        if (g->to[e] == t)
            in_t += x;
    }
    for (int v = 0; v < g->n; v++) {
        if (v != s && v != t && fabs(net[v]) > 1e-12 * thru[v])
            fail_msg("node %d: inflow - outflow = %.17g (throughput %.17g)", v, net[v], thru[v]);
    }
    if (!close_rel(out_s, value, 1e-12) || !close_rel(in_t, value, 1e-12))
        fail_msg("value %.17g, out of s %.17g, into t %.17g", value, out_s, in_t);

    /* Residual reachability from s, computed independently. */
    int head = 0, tail = 0;
    seen[s] = 1;
    queue[tail++] = s;
    while (head < tail) {
        int v = queue[head++];
        for (int e = 0; e < g->m; e++) {
            double x = hx_flow_edge_flow(f, e);
            int u = -1;
            if (g->from[e] == v && x < g->cap[e])
                u = g->to[e];
            else if (g->to[e] == v && x > 0)
                u = g->from[e];
            if (u >= 0 && !seen[u]) {
                seen[u] = 1;
                queue[tail++] = u;
            }
        }
    }
    for (int v = 0; v < g->n; v++) {
        if (hx_flow_source_side(f, v) != seen[v])
            fail_msg("node %d: source side %d, residual reachability %d", v,
                     hx_flow_source_side(f, v), seen[v]);
    }
    assert_int_equal(hx_flow_source_side(f, s), 1);
    assert_int_equal(hx_flow_source_side(f, t), 0);
    for (int e = 0; e < g->m; e++) {
        int a = seen[g->from[e]], b = seen[g->to[e]];
        double x = hx_flow_edge_flow(f, e);
        assert_int_equal(hx_flow_edge_in_cut(f, e), a && !b);
        if (a && !b) {
            if (x != g->cap[e])
                fail_msg("cut edge %d (%d->%d): flow %.17g below cap %.17g", e, g->from[e],
                         g->to[e], x, g->cap[e]);
            cut += g->cap[e];
        } else if (!a && b && x != 0) {
            fail_msg("edge %d (%d->%d) into the source side carries %.17g", e, g->from[e],
                     g->to[e], x);
        }
    }
    if (!close_rel(cut, value, 1e-12))
        fail_msg("cut capacity %.17g, value %.17g", cut, value);

    free(net);
    free(thru);
    free(seen);
    free(queue);
}

/* ---- reference: Edmonds-Karp over an adjacency matrix ------------------- */

/*
 * Shortest augmenting paths on doubles. Parallel edges are summed, loops,
 * edges into s and out of t dropped (they never carry flow in a maximum
 * flow). An augmenting path whose bottleneck is infinite means an infinite
 * value: returns INFINITY. A residual counts as positive when above 1e-12 of
 * the finite capacity between the pair, which stops rounding noise from
 * creating phantom paths; the flows it sums are bounded by the value, so its
 * error is relative to the value.
 */
static double ref_maxflow(const tnet *g, int s, int t)
{
    int n = g->n;
    double *c = calloc((size_t)n * (size_t)n, sizeof *c);  /* capacity u->v */
    double *fl = calloc((size_t)n * (size_t)n, sizeof *fl); /* net flow u->v */
    int *prev = malloc((size_t)n * sizeof *prev);
    int *queue = malloc((size_t)n * sizeof *queue);
    assert_true(c && fl && prev && queue);
    for (int e = 0; e < g->m; e++) {
        int u = g->from[e], v = g->to[e];
        if (u == v || v == s || u == t)
            continue;
        c[u * n + v] += g->cap[e];
    }
    double value = 0;
    for (;;) {
        for (int v = 0; v < n; v++)
            prev[v] = -1;
        prev[s] = s;
        int head = 0, tail = 0;
        queue[tail++] = s;
        while (head < tail && prev[t] < 0) {
            int u = queue[head++];
            for (int v = 0; v < n; v++) {
                if (prev[v] >= 0)
                    continue;
                double r = c[u * n + v] - fl[u * n + v];
                double scale = (isinf(c[u * n + v]) ? 0 : c[u * n + v]) +
                               (isinf(c[v * n + u]) ? 0 : c[v * n + u]);
                if (r > 1e-12 * scale && r > 0) {
                    prev[v] = u;
                    queue[tail++] = v;
                }
            }
        }
        if (prev[t] < 0)
            break;
        double b = INFINITY;
        for (int v = t; v != s; v = prev[v])
            b = fmin(b, c[prev[v] * n + v] - fl[prev[v] * n + v]);
        if (isinf(b)) {
            value = INFINITY;
            break;
        }
        for (int v = t; v != s; v = prev[v]) {
            fl[prev[v] * n + v] += b;
            fl[v * n + prev[v]] -= b;
        }
        value += b;
    }
    free(c);
    free(fl);
    free(prev);
    free(queue);
    return value;
}

/* ---- random networks ------------------------------------------------------ */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void)
{
    /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(void) /* [0, 1) */
{
    return (double)(rng_next() >> 11) * 0x1p-53;
}

static int rng_int(int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1));
}

/* A capacity drawn from one of several shapes, see random_cap(). */
enum cap_kind { CAP_INT, CAP_UNIFORM, CAP_LOG6, CAP_LOG12 };

static double random_cap(enum cap_kind kind, double p_inf, double p_zero)
{
    double u = rng_unit();
    if (u < p_inf)
        return INFINITY;
    if (u < p_inf + p_zero)
        return 0.0;
    switch (kind) {
    case CAP_INT: return (double)rng_int(1, 10);
    case CAP_UNIFORM: return 0.1 + 100 * rng_unit();
    case CAP_LOG6: return pow(10.0, -3 + 6 * rng_unit());
    case CAP_LOG12: return pow(10.0, -6 + 12 * rng_unit());
    }
    return 1.0;
}

/* Solves g for s -> t and compares with the reference; returns the value. */
static double compare_with_reference(tnet *g, int s, int t, const char *what, int i)
{
    double ref = ref_maxflow(g, s, t);
    hx_err err = {0};
    double v = -1;
    hx_status st = hx_flow_solve(g->f, s, t, &v, &err);
    if (isinf(ref)) {
        if (st != HX_ERANGE)
            fail_msg("%s %d (%d nodes, %d edges): unbounded, but solve gave %s, %.17g", what,
                     i, g->n, g->m, hx_strerror(st), v);
        return ref;
    }
    if (st != HX_OK)
        fail_msg("%s %d (%d nodes, %d edges): %s (%s)", what, i, g->n, g->m, hx_strerror(st),
                 err.msg);
    if (!close_rel(v, ref, VALUE_REL))
        fail_msg("%s %d (%d nodes, %d edges, %d -> %d): value %.17g, reference %.17g (rel %.3g)",
                 what, i, g->n, g->m, s, t, v, ref, fabs(v - ref) / fmax(v, ref));
    check_solution(g, s, t, v);
    return v;
}

/* ---- textbook networks ------------------------------------------------------ */

/* Cormen et al., Introduction to Algorithms (3rd ed.), figure 26.1: value 23. */
static void test_clrs(void **state)
{
    (void)state;
    enum { S, V1, V2, V3, V4, T };
    tnet g = tnet_new(6);
    tnet_add(&g, S, V1, 16);
    tnet_add(&g, S, V2, 13);
    tnet_add(&g, V2, V1, 4);
    tnet_add(&g, V1, V3, 12);
    tnet_add(&g, V3, V2, 9);
    tnet_add(&g, V2, V4, 14);
    tnet_add(&g, V4, V3, 7);
    tnet_add(&g, V3, T, 20);
    tnet_add(&g, V4, T, 4);
    assert_int_equal(hx_flow_num_nodes(g.f), 6);
    assert_int_equal(hx_flow_num_edges(g.f), 9);
    double v = solve_ok(&g, S, T);
    assert_true(v == 23.0);
    check_solution(&g, S, T, v);
    /* The minimum cut {s, v1, v2, v4} | {v3, t}: v1->v3, v4->v3, v4->t. */
    int side[] = {1, 1, 1, 0, 1, 0};
    for (int i = 0; i < 6; i++)
        assert_int_equal(hx_flow_source_side(g.f, i), side[i]);
    assert_int_equal(hx_flow_edge_in_cut(g.f, 3), 1);
    assert_int_equal(hx_flow_edge_in_cut(g.f, 6), 1);
    assert_int_equal(hx_flow_edge_in_cut(g.f, 8), 1);
    assert_int_equal(hx_flow_edge_in_cut(g.f, 7), 0);
    assert_true(hx_flow_edge_flow(g.f, 3) == 12 && hx_flow_edge_flow(g.f, 8) == 4);
    tnet_free(&g);
}

/* Sedgewick and Wayne, Algorithms (4th ed.), tinyFN.txt: value 4. */
static void test_sedgewick(void **state)
{
    (void)state;
    tnet g = tnet_new(6);
    tnet_add(&g, 0, 1, 2.0);
    tnet_add(&g, 0, 2, 3.0);
    tnet_add(&g, 1, 3, 3.0);
    tnet_add(&g, 1, 4, 1.0);
    tnet_add(&g, 2, 3, 1.0);
    tnet_add(&g, 2, 4, 1.0);
    tnet_add(&g, 3, 5, 2.0);
    tnet_add(&g, 4, 5, 3.0);
    double v = solve_ok(&g, 0, 5);
    assert_true(v == 4.0);
    check_solution(&g, 0, 5, v);
    /* Other terminals on the same network: 1 -> 5 is 3, 0 -> 3 is 3. */
    v = solve_ok(&g, 1, 5);
    assert_true(v == 3.0);
    check_solution(&g, 1, 5, v);
    v = solve_ok(&g, 0, 3);
    assert_true(v == 3.0);
    check_solution(&g, 0, 3, v);
    tnet_free(&g);
}

/* A diamond with a cross edge whose flow has to go "backwards" in Ford-Fulkerson. */
static void test_cross_edge(void **state)
{
    (void)state;
    tnet g = tnet_new(4);
    tnet_add(&g, 0, 1, 1e6);
    tnet_add(&g, 0, 2, 1e6);
    tnet_add(&g, 1, 2, 1);
    tnet_add(&g, 1, 3, 1e6);
    tnet_add(&g, 2, 3, 1e6);
    double v = solve_ok(&g, 0, 3);
    assert_true(v == 2e6);
    check_solution(&g, 0, 3, v);
    tnet_free(&g);
}

static void test_parallel_edges(void **state)
{
    (void)state;
    tnet g = tnet_new(3);
    int a = tnet_add(&g, 0, 1, 1.5);
    int b = tnet_add(&g, 0, 1, 2.5);
    tnet_add(&g, 1, 2, 10);
    int c = tnet_add(&g, 1, 2, 0.25);
    double v = solve_ok(&g, 0, 2);
    assert_true(v == 4.0);
    assert_true(hx_flow_edge_flow(g.f, a) == 1.5 && hx_flow_edge_flow(g.f, b) == 2.5);
    assert_true(hx_flow_edge_in_cut(g.f, a) && hx_flow_edge_in_cut(g.f, b));
    assert_false(hx_flow_edge_in_cut(g.f, c));
    check_solution(&g, 0, 2, v);
    tnet_free(&g);
}

static void test_disconnected_sink(void **state)
{
    (void)state;
    tnet g = tnet_new(5);
    tnet_add(&g, 0, 1, 3);
    tnet_add(&g, 1, 2, 3);
    tnet_add(&g, 2, 0, 3);
    tnet_add(&g, 4, 3, 7); /* into the sink, but from an unreachable node */
    double v = solve_ok(&g, 0, 3);
    assert_true(v == 0.0);
    for (int e = 0; e < g.m; e++)
        assert_true(hx_flow_edge_flow(g.f, e) == 0.0);
    int side[] = {1, 1, 1, 0, 0};
    for (int i = 0; i < 5; i++)
        assert_int_equal(hx_flow_source_side(g.f, i), side[i]);
    check_solution(&g, 0, 3, v);
    tnet_free(&g);

    /* No edges at all. */
    g = tnet_new(2);
    assert_true(solve_ok(&g, 0, 1) == 0.0);
    assert_int_equal(hx_flow_source_side(g.f, 0), 1);
    assert_int_equal(hx_flow_source_side(g.f, 1), 0);
    tnet_free(&g);
}

/* Infinite capacities inside, a finite cut at the sink: value 6. */
static void test_infinite_internal(void **state)
{
    (void)state;
    enum { S, A, B, C, T };
    tnet g = tnet_new(5);
    tnet_add(&g, S, A, 3);
    tnet_add(&g, S, B, 4);
    tnet_add(&g, A, B, INFINITY);
    tnet_add(&g, A, C, INFINITY);
    tnet_add(&g, B, C, INFINITY);
    tnet_add(&g, C, B, INFINITY);
    int ct = tnet_add(&g, C, T, 5);
    int bt = tnet_add(&g, B, T, 1);
    double v = solve_ok(&g, S, T);
    assert_true(v == 6.0);
    check_solution(&g, S, T, v);
    assert_true(hx_flow_edge_in_cut(g.f, ct) && hx_flow_edge_in_cut(g.f, bt));
    for (int i = S; i <= C; i++)
        assert_int_equal(hx_flow_source_side(g.f, i), 1);

    /* The planner's shape with unconstrained routes: s -> P -> D -> t, the
     * P -> D edges infinite; the value is min(sum P, sum D) per component. */
    tnet h = tnet_new(6);
    tnet_add(&h, 0, 1, 2.5);      /* prefill 1 */
    tnet_add(&h, 0, 2, 1.25);     /* prefill 2 */
    tnet_add(&h, 1, 3, INFINITY); /* routes */
    tnet_add(&h, 1, 4, INFINITY);
    tnet_add(&h, 2, 4, INFINITY);
    tnet_add(&h, 3, 5, 0.5); /* decode 3 */
    tnet_add(&h, 4, 5, 4.0); /* decode 4 */
    v = solve_ok(&h, 0, 5);
    assert_true(v == 3.75);
    check_solution(&h, 0, 5, v);
    tnet_free(&h);
    tnet_free(&g);
}

/* Loops, zero capacities, and edges into s or out of t carry nothing. */
static void test_special_edges(void **state)
{
    (void)state;
    enum { S, A, B, T };
    tnet g = tnet_new(4);
    tnet_add(&g, S, A, 5);
    int loop = tnet_add(&g, A, A, 100);
    int zero = tnet_add(&g, A, B, 0);
    tnet_add(&g, A, T, 3);
    int into_s = tnet_add(&g, A, S, 10);
    int out_t = tnet_add(&g, T, A, 10);
    int t_to_s = tnet_add(&g, T, S, INFINITY);
    tnet_add(&g, B, T, 1);
    double v = solve_ok(&g, S, T);
    assert_true(v == 3.0);
    check_solution(&g, S, T, v);
    assert_true(hx_flow_edge_flow(g.f, loop) == 0.0);
    assert_true(hx_flow_edge_flow(g.f, zero) == 0.0);
    assert_true(hx_flow_edge_flow(g.f, into_s) == 0.0);
    assert_true(hx_flow_edge_flow(g.f, out_t) == 0.0);
    assert_true(hx_flow_edge_flow(g.f, t_to_s) == 0.0);

    /* Direct s -> t edges, parallel, one of them zero. */
    tnet h = tnet_new(2);
    tnet_add(&h, 0, 1, 0.75);
    tnet_add(&h, 0, 1, 0);
    tnet_add(&h, 0, 1, 2);
    tnet_add(&h, 1, 0, 9);
    v = solve_ok(&h, 0, 1);
    assert_true(v == 2.75);
    check_solution(&h, 0, 1, v);
    /* And the other way round. */
    v = solve_ok(&h, 1, 0);
    assert_true(v == 9.0);
    check_solution(&h, 1, 0, v);
    tnet_free(&h);
    tnet_free(&g);
}

/* Capacities 1e-6 .. 1e6 in one network: the small ones still come out exact. */
static void test_wide_range(void **state)
{
    (void)state;
    enum { S, A, B, C, T };
    tnet g = tnet_new(5);
    tnet_add(&g, S, A, 1e6);
    tnet_add(&g, A, B, 1e6);
    int bt = tnet_add(&g, B, T, 3e-6);
    int at = tnet_add(&g, A, T, 1e-6);
    tnet_add(&g, S, C, 7e-6);
    tnet_add(&g, C, T, 1e6);
    tnet_add(&g, C, B, 1e-6);
    double v = solve_ok(&g, S, T);
    assert_true(close_rel(v, 1.1e-5, 1e-15));
    assert_true(hx_flow_edge_flow(g.f, bt) == 3e-6);
    assert_true(hx_flow_edge_flow(g.f, at) == 1e-6);
    check_solution(&g, S, T, v);

    /* A value of 1e6 + 1e-6 keeps its last digits. */
    tnet h = tnet_new(4);
    tnet_add(&h, 0, 1, 1e6);
    tnet_add(&h, 0, 2, 1e-6);
    tnet_add(&h, 1, 3, 2e6);
    tnet_add(&h, 2, 3, 5e-6);
    tnet_add(&h, 2, 1, 1e6);
    v = solve_ok(&h, 0, 3);
    assert_true(v == 1e6 + 1e-6);
    check_solution(&h, 0, 3, v);
    tnet_free(&h);

    /* Capacities beyond the exact pass's range (ratio 1e300) still solve. */
    tnet k = tnet_new(4);
    tnet_add(&k, 0, 1, 1e150);
    tnet_add(&k, 1, 3, 2e150);
    tnet_add(&k, 0, 2, 1e-150);
    tnet_add(&k, 2, 3, 1e-150);
    v = solve_ok(&k, 0, 3);
    assert_true(close_rel(v, 1e150, 1e-12));
    tnet_free(&k);
    tnet_free(&g);
}

static void test_unbounded(void **state)
{
    (void)state;
    hx_err err = {0};
    double v = 42;

    tnet g = tnet_new(4);
    tnet_add(&g, 0, 1, INFINITY);
    tnet_add(&g, 1, 2, 5);
    tnet_add(&g, 1, 3, INFINITY);
    tnet_add(&g, 2, 3, INFINITY);
    assert_int_equal(hx_flow_solve(g.f, 0, 3, &v, &err), HX_ERANGE);
    assert_int_equal(err.code, HX_ERANGE);
    assert_true(strlen(err.msg) > 0);
    assert_true(v == 42); /* untouched on failure */
    assert_int_equal(hx_flow_source_side(g.f, 0), 0);
    /* Reversed (3 -> 0), every edge leaves t or enters s: value 0. */
    assert_true(solve_ok(&g, 3, 0) == 0.0);
    tnet_free(&g);

    /* A direct infinite s -> t edge. */
    g = tnet_new(2);
    tnet_add(&g, 0, 1, INFINITY);
    assert_int_equal(hx_flow_solve(g.f, 0, 1, &v, NULL), HX_ERANGE);
    tnet_free(&g);

    /* Infinite edges that close a cycle through t and s do not make it
     * unbounded: t -> s carries nothing. */
    g = tnet_new(3);
    tnet_add(&g, 0, 1, INFINITY);
    tnet_add(&g, 1, 2, 2);
    tnet_add(&g, 2, 0, INFINITY);
    tnet_add(&g, 2, 1, INFINITY);
    v = solve_ok(&g, 0, 2);
    assert_true(v == 2.0);
    check_solution(&g, 0, 2, v);
    tnet_free(&g);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    hx_flow_free(NULL);
    assert_null(hx_flow_new(-1));
    assert_int_equal(hx_flow_num_nodes(NULL), 0);
    assert_int_equal(hx_flow_num_edges(NULL), 0);

    hx_flow *f = hx_flow_new(3);
    assert_non_null(f);
    assert_int_equal(hx_flow_add_edge(f, -1, 1, 1), -1);
    assert_int_equal(hx_flow_add_edge(f, 0, 3, 1), -1);
    assert_int_equal(hx_flow_add_edge(f, 3, 0, 1), -1);
    assert_int_equal(hx_flow_add_edge(f, 0, 1, -1), -1);
    assert_int_equal(hx_flow_add_edge(f, 0, 1, -0.0), 0); /* -0 is zero */
    assert_int_equal(hx_flow_add_edge(f, 0, 1, NAN), -1);
    assert_int_equal(hx_flow_add_edge(f, 0, 1, -INFINITY), -1);
    assert_int_equal(hx_flow_add_edge(NULL, 0, 1, 1), -1);
    assert_int_equal(hx_flow_add_edge(f, 1, 2, 1), 1);
    assert_int_equal(hx_flow_num_edges(f), 2);

    hx_err err = {0};
    double v = 7;
    assert_int_equal(hx_flow_solve(f, 1, 1, &v, &err), HX_EINVAL);
    assert_true(strlen(err.msg) > 0);
    hx_err_clear(&err);
    assert_int_equal(hx_flow_solve(f, -1, 2, &v, &err), HX_EINVAL);
    assert_true(strlen(err.msg) > 0);
    assert_int_equal(hx_flow_solve(f, 0, 3, &v, &err), HX_EINVAL);
    assert_int_equal(hx_flow_solve(f, 3, 0, &v, NULL), HX_EINVAL);
    assert_int_equal(hx_flow_solve(NULL, 0, 1, &v, &err), HX_EINVAL);
    assert_true(v == 7);

    /* Accessors: out-of-range ids; nothing reported before a solve. */
    assert_true(isnan(hx_flow_edge_flow(f, 2)));
    assert_true(isnan(hx_flow_edge_flow(f, -1)));
    assert_true(isnan(hx_flow_edge_cap(f, 5)));
    assert_true(isnan(hx_flow_edge_cap(NULL, 0)));
    assert_true(hx_flow_edge_cap(f, 1) == 1.0);
    assert_true(hx_flow_edge_cap(f, 0) == 0.0 && !signbit(hx_flow_edge_cap(f, 0)));
    assert_true(hx_flow_edge_flow(f, 1) == 0.0);
    assert_int_equal(hx_flow_source_side(f, 0), 0);
    assert_int_equal(hx_flow_source_side(f, -1), 0);
    assert_int_equal(hx_flow_edge_in_cut(f, 7), 0);

    /* A solve, then a new edge: the old results are withdrawn. */
    assert_int_equal(hx_flow_solve(f, 0, 2, &v, NULL), HX_OK);
    assert_true(v == 0.0); /* 0 -> 1 has capacity 0 */
    assert_int_equal(hx_flow_source_side(f, 0), 1);
    assert_int_equal(hx_flow_add_edge(f, 0, 1, 2), 2);
    assert_int_equal(hx_flow_source_side(f, 0), 0);
    assert_true(hx_flow_edge_flow(f, 1) == 0.0);
    assert_int_equal(hx_flow_solve(f, 0, 2, &v, NULL), HX_OK);
    assert_true(v == 1.0);
    assert_true(hx_flow_edge_flow(f, 1) == 1.0);
    hx_flow_free(f);

    /* A network without nodes has no valid terminals. */
    f = hx_flow_new(0);
    assert_non_null(f);
    assert_int_equal(hx_flow_add_edge(f, 0, 0, 1), -1);
    assert_int_equal(hx_flow_solve(f, 0, 0, &v, NULL), HX_EINVAL);
    hx_flow_free(f);
}

/* ---- random networks against the reference -------------------------------- */

/* General directed networks: 2-40 nodes, any density, loops and parallel edges. */
static void test_random_general(void **state)
{
    (void)state;
    int unbounded = 0;
    for (int i = 0; i < 300; i++) {
        int n = rng_int(2, 40);
        double density = 0.02 + 0.9 * rng_unit() * rng_unit();
        enum cap_kind kind = (enum cap_kind)rng_int(0, 3);
        double p_inf = i % 3 == 0 ? 0.15 * rng_unit() : 0;
        double p_zero = i % 4 == 0 ? 0.1 : 0;
        tnet g = tnet_new(n);
        for (int u = 0; u < n; u++) {
            for (int v = 0; v < n; v++) {
                if (u == v ? rng_unit() < 0.01 : rng_unit() < density) {
                    tnet_add(&g, u, v, random_cap(kind, p_inf, p_zero));
                    if (rng_unit() < 0.05) /* a parallel edge */
                        tnet_add(&g, u, v, random_cap(kind, p_inf, p_zero));
                }
            }
        }
        int s = rng_int(0, n - 1), t = rng_int(0, n - 2);
        if (t >= s)
            t++;
        if (isinf(compare_with_reference(&g, s, t, "general network", i)))
            unbounded++;
        tnet_free(&g);
    }
    /* The sample does exercise the unbounded case, but not mostly. */
    assert_true(unbounded > 0 && unbounded < 60);
}

/*
 * The planner's shape: source -> P prefill groups -> D decode groups -> sink,
 * group capacities and KV link capacities from a wide range, routes sparse
 * or dense, some unconstrained (infinite).
 */
static void test_random_bipartite(void **state)
{
    (void)state;
    for (int i = 0; i < 200; i++) {
        int np = rng_int(1, 19), nd = rng_int(1, 19);
        int n = np + nd + 2, s = 0, t = n - 1;
        enum cap_kind kind = (enum cap_kind)rng_int(0, 3);
        double density = 0.1 + 0.9 * rng_unit();
        double p_inf = i % 2 ? 0.3 : 0;
        tnet g = tnet_new(n);
        for (int p = 1; p <= np; p++)
            tnet_add(&g, s, p, random_cap(kind, 0, 0));
        for (int p = 1; p <= np; p++) {
            for (int d = np + 1; d <= np + nd; d++) {
                if (rng_unit() < density)
                    tnet_add(&g, p, d, random_cap(kind, p_inf, 0.02));
            }
        }
        for (int d = np + 1; d <= np + nd; d++)
            tnet_add(&g, d, t, random_cap(kind, 0, 0));
        double v = compare_with_reference(&g, s, t, "bipartite network", i);
        assert_false(isinf(v));
        tnet_free(&g);
    }
}

/* Larger networks, capacities over twelve orders of magnitude. */
static void test_random_large(void **state)
{
    (void)state;
    for (int i = 0; i < 4; i++) {
        int n = 150, m = 1500;
        tnet g = tnet_new(n);
        for (int e = 0; e < m; e++)
            tnet_add(&g, rng_int(0, n - 1), rng_int(0, n - 1), random_cap(CAP_LOG12, 0.02, 0));
        compare_with_reference(&g, 0, n - 1, "large network", i);
        tnet_free(&g);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clrs),
        cmocka_unit_test(test_sedgewick),
        cmocka_unit_test(test_cross_edge),
        cmocka_unit_test(test_parallel_edges),
        cmocka_unit_test(test_disconnected_sink),
        cmocka_unit_test(test_infinite_internal),
        cmocka_unit_test(test_special_edges),
        cmocka_unit_test(test_wide_range),
        cmocka_unit_test(test_unbounded),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_random_general),
        cmocka_unit_test(test_random_bipartite),
        cmocka_unit_test(test_random_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
