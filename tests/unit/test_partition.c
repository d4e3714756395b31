/*
 * test_partition.c - k-way graph partitioning: planted clusters recovered by the
 * spectral and METIS methods, balance, non-empty parts, edge cases (k = 1, k = n,
 * disconnected and edgeless graphs), determinism, the multilevel path on 5000
 * vertices (with its timing), FM/KL refinement, and argument checks.
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
#include <time.h>

#include "planner/partition.h"

/* ---- helpers ------------------------------------------------------------ */

/* A test graph: an edge list turned into CSR by tg_build. All arrays owned. */
typedef struct tgraph {
    int n, m, cap;
    int *ea, *eb;  /* [m] edge ends */
    double *w;     /* [m] edge weights */
    double *vw;    /* [n] vertex weights (1 unless set) */
    int *xadj;     /* [n+1] */
    int *adj;      /* [2m] */
    double *ew;    /* [2m] */
    hx_wgraph g;
} tgraph;

static void tg_init(tgraph *t, int n)
{
    memset(t, 0, sizeof *t);
    t->n = n;
    t->vw = malloc((size_t)n * sizeof *t->vw);
    assert_non_null(t->vw);
    for (int v = 0; v < n; v++)
        t->vw[v] = 1;
}

static void tg_edge(tgraph *t, int a, int b, double w)
{
    if (t->m == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->ea = realloc(t->ea, (size_t)t->cap * sizeof *t->ea);
        t->eb = realloc(t->eb, (size_t)t->cap * sizeof *t->eb);
        t->w = realloc(t->w, (size_t)t->cap * sizeof *t->w);
        assert_true(t->ea && t->eb && t->w);
    }
    t->ea[t->m] = a;
    t->eb[t->m] = b;
    t->w[t->m] = w;
    t->m++;
}

static void tg_build(tgraph *t)
{
    int n = t->n;
    t->xadj = calloc((size_t)n + 1, sizeof *t->xadj);
    t->adj = malloc((size_t)(2 * t->m + 1) * sizeof *t->adj);
    t->ew = malloc((size_t)(2 * t->m + 1) * sizeof *t->ew);
    int *fill = calloc((size_t)n, sizeof *fill);
    assert_true(t->xadj && t->adj && t->ew && fill);
    for (int i = 0; i < t->m; i++) {
        t->xadj[t->ea[i] + 1]++;
        t->xadj[t->eb[i] + 1]++;
    }
    for (int v = 0; v < n; v++)
        t->xadj[v + 1] += t->xadj[v];
    for (int i = 0; i < t->m; i++) {
        int a = t->ea[i], b = t->eb[i];
        int pa = t->xadj[a] + fill[a]++, pb = t->xadj[b] + fill[b]++;
        t->adj[pa] = b;
        t->ew[pa] = t->w[i];
        t->adj[pb] = a;
        t->ew[pb] = t->w[i];
    }
    free(fill);
    t->g = (hx_wgraph){.n = n, .xadj = t->xadj, .adj = t->adj, .ew = t->ew, .vw = t->vw};
}

static void tg_free(tgraph *t)
{
    free(t->ea);
    free(t->eb);
    free(t->w);
    free(t->vw);
    free(t->xadj);
    free(t->adj);
    free(t->ew);
    memset(t, 0, sizeof *t);
}

static uint64_t rng_state = 1;

static void rng_seed(uint64_t s)
{
    rng_state = s;
}

static uint64_t rng_u64(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_unit(void)
{
    return (double)(rng_u64() >> 11) / 9007199254740992.0;
}

static int rng_below(int n)
{
    return (int)(rng_u64() % (uint64_t)n);
}

static void shuffle(int *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = rng_below(i + 1), tmp = a[i];
        a[i] = a[j];
        a[j] = tmp;
    }
}

/* A random permutation of 0..n-1 (caller frees). */
static int *random_perm(int n)
{
    int *p = malloc((size_t)n * sizeof *p);
    assert_non_null(p);
    for (int i = 0; i < n; i++)
        p[i] = i;
    shuffle(p, n);
    return p;
}

static hx_partition_opts opts_of(hx_partition_method method, int k, const double *target,
                                 double imbalance, unsigned long seed)
{
    return (hx_partition_opts){
        .method = method, .k = k, .target = target, .imbalance = imbalance, .seed = seed};
}

static const char *method_name(hx_partition_method m)
{
    return m == HX_PARTITION_METIS ? "metis" : "spectral";
}

/* Runs hx_partition and fails the test with its message on error. */
static void partition_ok(const hx_wgraph *g, const hx_partition_opts *o, int *part)
{
    hx_err err = {0};
    hx_status st = hx_partition(g, o, part, &err);
    if (st != HX_OK)
        fail_msg("%s partition (n = %d, k = %d) failed: %s", method_name(o->method), g->n, o->k,
                 err.msg);
}

/* Every label in [0, k) and every part non-empty. */
static void assert_valid_parts(const hx_wgraph *g, const int *part, int k)
{
    int *count = calloc((size_t)k, sizeof *count);
    assert_non_null(count);
    for (int v = 0; v < g->n; v++) {
        assert_in_range(part[v], 0, k - 1);
        count[part[v]]++;
    }
    for (int p = 0; p < k; p++)
        if (count[p] == 0)
            fail_msg("part %d of %d is empty (n = %d)", p, k, g->n);
    free(count);
}

/* Every part's weight within target x total x (1 + imbalance). */
static void assert_balanced(const hx_wgraph *g, const int *part, int k, const double *target,
                            double imbalance)
{
    double *w = malloc((size_t)k * sizeof *w), total = 0;
    assert_non_null(w);
    hx_partition_weights(g, part, k, w);
    for (int p = 0; p < k; p++)
        total += w[p];
    for (int p = 0; p < k; p++) {
        double t = target ? target[p] : 1.0 / k;
        double limit = t * total * (1 + imbalance);
        if (w[p] > limit * (1 + 1e-9))
            fail_msg("part %d weighs %g, over its limit %g (k = %d, n = %d)", p, w[p], limit, k,
                     g->n);
    }
    free(w);
}

/* The partition equals the planted clusters up to a renaming of parts. */
static void assert_planted(const int *part, const int *cluster, int n, int k)
{
    int *label = malloc((size_t)k * sizeof *label);
    int *used = calloc((size_t)k, sizeof *used);
    assert_true(label && used);
    for (int c = 0; c < k; c++)
        label[c] = -1;
    for (int v = 0; v < n; v++) {
        int c = cluster[v];
        if (label[c] < 0) {
            label[c] = part[v];
            if (used[part[v]]++)
                fail_msg("part %d holds two planted clusters", part[v]);
        } else if (label[c] != part[v]) {
            fail_msg("vertex %d of cluster %d is in part %d, its cluster in part %d", v, c,
                     part[v], label[c]);
        }
    }
    free(label);
    free(used);
}

/* The cut of an assignment of vertices, in random order, to parts of equal counts. */
static double random_balanced_cut(const hx_wgraph *g, int k)
{
    int *perm = random_perm(g->n), *part = malloc((size_t)g->n * sizeof *part);
    assert_non_null(part);
    for (int i = 0; i < g->n; i++)
        part[perm[i]] = (int)((long)i * k / g->n);
    double cut = hx_partition_cut(g, part);
    free(perm);
    free(part);
    return cut;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- graph generators ----------------------------------------------------- */

/*
 * `ncl` cliques of `size` vertices (intra weight `intra`), vertex i of clique c
 * joined to vertex i of clique c + 1 (mod ncl) with weight `inter`; vertex ids
 * shuffled. cluster[v]: v's clique (caller-owned [ncl * size]).
 */
static void ring_of_cliques(tgraph *t, int ncl, int size, double intra, double inter,
                            int *cluster)
{
    int n = ncl * size, *id = random_perm(n);
    tg_init(t, n);
    for (int c = 0; c < ncl; c++) {
        for (int i = 0; i < size; i++) {
            cluster[id[c * size + i]] = c;
            for (int j = i + 1; j < size; j++)
                tg_edge(t, id[c * size + i], id[c * size + j], intra);
            tg_edge(t, id[c * size + i], id[((c + 1) % ncl) * size + i], inter);
        }
    }
    tg_build(t);
    free(id);
}

/*
 * A complete graph over groups of the given sizes: weight `intra` inside a group,
 * `inter` between groups; vertex weight `vweight`; ids shuffled. cluster[v]: group.
 */
static void complete_groups(tgraph *t, int ngroups, const int *sizes, double intra,
                            double inter, double vweight, int *cluster)
{
    int n = 0;
    for (int c = 0; c < ngroups; c++)
        n += sizes[c];
    int *id = random_perm(n), at = 0;
    tg_init(t, n);
    for (int c = 0; c < ngroups; c++)
        for (int i = 0; i < sizes[c]; i++)
            cluster[id[at++]] = c;
    for (int v = 0; v < n; v++) {
        t->vw[v] = vweight;
        for (int u = v + 1; u < n; u++)
            tg_edge(t, v, u, cluster[v] == cluster[u] ? intra : inter);
    }
    tg_build(t);
    free(id);
}

/*
 * A connected random graph: a ring plus `extra` random chords per vertex (no
 * duplicates), edge weights in [1, 10), vertex weights in [wlo, whi).
 */
static void random_graph(tgraph *t, int n, int extra, double wlo, double whi)
{
    unsigned char *has = calloc((size_t)n * (size_t)n, 1);
    assert_non_null(has);
    tg_init(t, n);
    for (int v = 0; v < n; v++) {
        t->vw[v] = wlo + (whi - wlo) * rng_unit();
        int u = (v + 1) % n;
        if (n > 1 && !has[(size_t)v * n + u]) {
            has[(size_t)v * n + u] = has[(size_t)u * n + v] = 1;
            tg_edge(t, v, u, 1 + 9 * rng_unit());
        }
    }
    for (int v = 0; v < n; v++) {
        for (int i = 0; i < extra; i++) {
            int u = rng_below(n);
            if (u == v || has[(size_t)v * n + u])
                continue;
            has[(size_t)v * n + u] = has[(size_t)u * n + v] = 1;
            tg_edge(t, v, u, 1 + 9 * rng_unit());
        }
    }
    free(has);
    tg_build(t);
}

/* An r x c grid with unit weights. */
static void grid_graph(tgraph *t, int rows, int cols)
{
    tg_init(t, rows * cols);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            int v = i * cols + j;
            if (j + 1 < cols)
                tg_edge(t, v, v + 1, 1);
            if (i + 1 < rows)
                tg_edge(t, v, v + cols, 1);
        }
    tg_build(t);
}

/*
 * A random geometric graph: n points in the unit square, joined when closer than
 * the radius that gives about `degree` neighbours; weight 1 / (distance + 0.01).
 */
static void geometric_graph(tgraph *t, int n, double degree)
{
    double r = sqrt(degree / (3.14159265358979323846 * n));
    int cells = (int)(1 / r);
    if (cells < 1)
        cells = 1;
    double *x = malloc((size_t)n * sizeof *x), *y = malloc((size_t)n * sizeof *y);
    int *head = malloc((size_t)cells * cells * sizeof *head);
    int *next = malloc((size_t)n * sizeof *next);
    assert_true(x && y && head && next);
    for (int c = 0; c < cells * cells; c++)
        head[c] = -1;
    tg_init(t, n);
    for (int v = 0; v < n; v++) {
        x[v] = rng_unit();
        y[v] = rng_unit();
        int cx = (int)(x[v] * cells), cy = (int)(y[v] * cells);
        cx = cx < cells ? cx : cells - 1;
        cy = cy < cells ? cy : cells - 1;
        next[v] = head[cy * cells + cx];
        head[cy * cells + cx] = v;
    }
    for (int v = 0; v < n; v++) {
        int cx = (int)(x[v] * cells), cy = (int)(y[v] * cells);
        cx = cx < cells ? cx : cells - 1;
        cy = cy < cells ? cy : cells - 1;
        for (int dy = -1; dy <= 1; dy++)
            for (int dx = -1; dx <= 1; dx++) {
                int gx = cx + dx, gy = cy + dy;
                if (gx < 0 || gy < 0 || gx >= cells || gy >= cells)
                    continue;
                for (int u = head[gy * cells + gx]; u >= 0; u = next[u]) {
                    double d = hypot(x[u] - x[v], y[u] - y[v]);
                    if (u > v && d < r)
                        tg_edge(t, v, u, 1 / (d + 0.01));
                }
            }
    }
    free(x);
    free(y);
    free(head);
    free(next);
    tg_build(t);
}

static const hx_partition_method methods[] = {HX_PARTITION_SPECTRAL, HX_PARTITION_METIS};
#define NMETHODS 2

/* ---- cut and weights -------------------------------------------------------- */

static void test_cut_and_weights(void **state)
{
    (void)state;
    tgraph t;
    tg_init(&t, 4); /* path 0 -1- 1 -2- 2 -3- 3 */
    tg_edge(&t, 0, 1, 1);
    tg_edge(&t, 1, 2, 2);
    tg_edge(&t, 2, 3, 3);
    t.vw[0] = 0.5;
    t.vw[3] = 4;
    tg_build(&t);
    int part[4] = {0, 0, 1, 1};
    assert_float_equal(hx_partition_cut(&t.g, part), 2, 1e-12);
    int part2[4] = {0, 1, 0, 1};
    assert_float_equal(hx_partition_cut(&t.g, part2), 6, 1e-12);
    double w[2];
    hx_partition_weights(&t.g, part, 2, w);
    assert_float_equal(w[0], 1.5, 1e-12);
    assert_float_equal(w[1], 5, 1e-12);
    tg_free(&t);
}

/* ---- planted clusters --------------------------------------------------------- */

static void test_planted_ring_of_cliques(void **state)
{
    (void)state;
    for (int m = 0; m < NMETHODS; m++) {
        for (uint64_t seed = 1; seed <= 5; seed++) {
            rng_seed(seed);
            tgraph t;
            int cluster[32], part[32];
            ring_of_cliques(&t, 4, 8, 100, 1, cluster);
            hx_partition_opts o = opts_of(methods[m], 4, NULL, 0.05, seed);
            partition_ok(&t.g, &o, part);
            assert_planted(part, cluster, 32, 4);
            assert_float_equal(hx_partition_cut(&t.g, part), 32, 1e-9);
            tg_free(&t);
        }
    }
}

/* 6 hosts of 8 GPUs: fast links inside a host (450), slower between (50). */
static void test_planted_hosts(void **state)
{
    (void)state;
    int sizes[6] = {8, 8, 8, 8, 8, 8};
    for (int m = 0; m < NMETHODS; m++) {
        for (uint64_t seed = 1; seed <= 5; seed++) {
            rng_seed(100 + seed);
            tgraph t;
            int cluster[48], part[48];
            complete_groups(&t, 6, sizes, 450, 50, 80, cluster);
            hx_partition_opts o = opts_of(methods[m], 6, NULL, 0.02, seed);
            partition_ok(&t.g, &o, part);
            assert_planted(part, cluster, 48, 6);
            assert_balanced(&t.g, part, 6, NULL, 0.02);
            tg_free(&t);
        }
    }
}

/* Groups of 6, 9, 13 and 20 vertices; the targets ask for them in another order. */
static void test_planted_unequal_targets(void **state)
{
    (void)state;
    int sizes[4] = {6, 9, 13, 20};
    int want[4] = {1, 3, 0, 2}; /* group -> part */
    double target[4];
    for (int c = 0; c < 4; c++)
        target[want[c]] = sizes[c] / 48.0;
    for (int m = 0; m < NMETHODS; m++) {
        for (uint64_t seed = 1; seed <= 5; seed++) {
            rng_seed(200 + seed);
            tgraph t;
            int cluster[48], part[48];
            complete_groups(&t, 4, sizes, 100, 1, 1, cluster);
            hx_partition_opts o = opts_of(methods[m], 4, target, 0.02, seed);
            partition_ok(&t.g, &o, part);
            for (int v = 0; v < 48; v++)
                if (part[v] != want[cluster[v]])
                    fail_msg("%s, seed %d: vertex %d of group %d in part %d, want %d",
                             method_name(methods[m]), (int)seed, v, cluster[v], part[v],
                             want[cluster[v]]);
            tg_free(&t);
        }
    }
}

/* ---- balance ------------------------------------------------------------------ */

static void test_balance_random_graphs(void **state)
{
    (void)state;
    static const int ks[] = {2, 3, 5, 8};
    static const int ns[] = {120, 300}; /* 300: through the multilevel path */
    for (int m = 0; m < NMETHODS; m++)
        for (int ni = 0; ni < 2; ni++)
            for (int ki = 0; ki < 4; ki++)
                for (uint64_t seed = 1; seed <= 3; seed++) {
                    rng_seed(seed * 1000 + (uint64_t)ns[ni] + (uint64_t)ks[ki]);
                    tgraph t;
                    random_graph(&t, ns[ni], 3, 1, 3);
                    int *part = malloc((size_t)t.n * sizeof *part);
                    assert_non_null(part);
                    hx_partition_opts o = opts_of(methods[m], ks[ki], NULL, 0.1, seed);
                    partition_ok(&t.g, &o, part);
                    assert_valid_parts(&t.g, part, ks[ki]);
                    assert_balanced(&t.g, part, ks[ki], NULL, 0.1);
                    free(part);
                    tg_free(&t);
                }
}

static void test_balance_unequal_targets(void **state)
{
    (void)state;
    double target[3] = {0.5, 0.3, 0.2};
    for (int m = 0; m < NMETHODS; m++)
        for (uint64_t seed = 1; seed <= 3; seed++) {
            rng_seed(seed + 77);
            tgraph t;
            random_graph(&t, 400, 3, 1, 2);
            int *part = malloc((size_t)t.n * sizeof *part);
            assert_non_null(part);
            hx_partition_opts o = opts_of(methods[m], 3, target, 0.05, seed);
            partition_ok(&t.g, &o, part);
            assert_valid_parts(&t.g, part, 3);
            assert_balanced(&t.g, part, 3, target, 0.05);
            free(part);
            tg_free(&t);
        }
}

/* ---- edge cases ------------------------------------------------------------- */

static void test_k1_and_kn(void **state)
{
    (void)state;
    for (int m = 0; m < NMETHODS; m++) {
        rng_seed(5);
        tgraph t;
        random_graph(&t, 20, 2, 1, 5);
        int part[20];
        hx_partition_opts o = opts_of(methods[m], 1, NULL, 0.1, 1);
        partition_ok(&t.g, &o, part);
        for (int v = 0; v < 20; v++)
            assert_int_equal(part[v], 0);

        o.k = 20;
        partition_ok(&t.g, &o, part);
        assert_valid_parts(&t.g, part, 20); /* one vertex each */

        /* k = n with targets: the heaviest vertex lands in the part with the largest. */
        double target[20];
        int heavy = 0, big = 7;
        for (int p = 0; p < 20; p++)
            target[p] = p == big ? 0.24 : 0.04;
        for (int v = 1; v < 20; v++)
            if (t.vw[v] > t.vw[heavy])
                heavy = v;
        o.target = target;
        partition_ok(&t.g, &o, part);
        assert_valid_parts(&t.g, part, 20);
        assert_int_equal(part[heavy], big);

        /* n = 1 */
        tgraph one;
        tg_init(&one, 1);
        tg_build(&one);
        int p1 = -1;
        hx_partition_opts o1 = opts_of(methods[m], 1, NULL, 0, 1);
        partition_ok(&one.g, &o1, &p1);
        assert_int_equal(p1, 0);
        tg_free(&one);
        tg_free(&t);
    }
}

/* Three separate components: each becomes a part, with nothing cut. */
static void test_disconnected(void **state)
{
    (void)state;
    int sizes[3] = {10, 10, 12};
    for (int m = 0; m < NMETHODS; m++) {
        rng_seed(9);
        tgraph t;
        int comp[32], base = 0;
        int *id = random_perm(32);
        tg_init(&t, 32);
        for (int c = 0; c < 3; c++) {
            for (int i = 0; i < sizes[c]; i++) {
                comp[id[base + i]] = c;
                tg_edge(&t, id[base + i], id[base + (i + 1) % sizes[c]], 1 + rng_unit());
                tg_edge(&t, id[base + i], id[base + (i + 3) % sizes[c]], 1 + rng_unit());
            }
            base += sizes[c];
        }
        tg_build(&t);
        free(id);
        int part[32];
        hx_partition_opts o = opts_of(methods[m], 3, NULL, 0.15, 3);
        partition_ok(&t.g, &o, part);
        assert_planted(part, comp, 32, 3);
        assert_float_equal(hx_partition_cut(&t.g, part), 0, 1e-12);
        tg_free(&t);
    }
}

/* One big component and a small one: the big one must be split for balance. */
static void test_disconnected_uneven(void **state)
{
    (void)state;
    for (int m = 0; m < NMETHODS; m++) {
        rng_seed(11);
        tgraph t;
        tg_init(&t, 32);
        for (int i = 0; i < 30; i++) {
            tg_edge(&t, i, (i + 1) % 30, 1);
            tg_edge(&t, i, (i + 7) % 30, 1);
        }
        tg_edge(&t, 30, 31, 5);
        tg_build(&t);
        int part[32];
        hx_partition_opts o = opts_of(methods[m], 2, NULL, 0.1, 1);
        partition_ok(&t.g, &o, part);
        assert_valid_parts(&t.g, part, 2);
        assert_balanced(&t.g, part, 2, NULL, 0.1);
        assert_int_equal(part[30], part[31]);
        tg_free(&t);
    }
}

static void test_edgeless(void **state)
{
    (void)state;
    for (int m = 0; m < NMETHODS; m++) {
        tgraph t;
        tg_init(&t, 10);
        tg_build(&t);
        int part[10];
        hx_partition_opts o = opts_of(methods[m], 3, NULL, 0.25, 1);
        partition_ok(&t.g, &o, part);
        assert_valid_parts(&t.g, part, 3);
        assert_balanced(&t.g, part, 3, NULL, 0.25); /* 4, 3, 3 */
        tg_free(&t);
    }
}

/* ---- determinism ------------------------------------------------------------ */

static void test_determinism(void **state)
{
    (void)state;
    for (int m = 0; m < NMETHODS; m++) {
        rng_seed(42);
        tgraph t;
        geometric_graph(&t, 700, 8);
        int *a = malloc(700 * sizeof *a), *b = malloc(700 * sizeof *b);
        assert_true(a && b);
        hx_partition_opts o = opts_of(methods[m], 6, NULL, 0.05, 1234);
        partition_ok(&t.g, &o, a);
        partition_ok(&t.g, &o, b);
        assert_memory_equal(a, b, 700 * sizeof *a);
        free(a);
        free(b);
        tg_free(&t);
    }
}

/* ---- large graphs: the multilevel path ------------------------------------------ */

static void check_large(const char *name, tgraph *t, hx_partition_method method)
{
    const int k = 16;
    const double imbalance = 0.05;
    int *part = malloc((size_t)t->n * sizeof *part);
    assert_non_null(part);
    hx_partition_opts o = opts_of(method, k, NULL, imbalance, 7);
    double t0 = now_s();
    partition_ok(&t->g, &o, part);
    double dt = now_s() - t0;
    double cut = hx_partition_cut(&t->g, part), rnd = random_balanced_cut(&t->g, k);
    printf("[ INFO     ] %s, %d vertices, %d edges, k = %d, %s: %.3f s, cut %.1f "
           "(random balanced %.1f)\n",
           name, t->n, t->m, k, method_name(method), dt, cut, rnd);
    assert_valid_parts(&t->g, part, k);
    assert_balanced(&t->g, part, k, NULL, imbalance);
    assert_true(cut < 0.25 * rnd);
    /* Generous bound: the target is well under a second on one core, unsanitised. */
    assert_true(dt < 10.0);
    free(part);
}

static void test_large_grid(void **state)
{
    (void)state;
    tgraph t;
    grid_graph(&t, 71, 71); /* 5041 vertices */
    for (int m = 0; m < NMETHODS; m++)
        check_large("grid 71x71", &t, methods[m]);
    tg_free(&t);
}

static void test_large_geometric(void **state)
{
    (void)state;
    rng_seed(2024);
    tgraph t;
    geometric_graph(&t, 5000, 10);
    for (int m = 0; m < NMETHODS; m++)
        check_large("random geometric", &t, methods[m]);
    tg_free(&t);
}

/* ---- refinement ----------------------------------------------------------------- */

static void test_refine_never_worse(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 10; seed++) {
        rng_seed(500 + seed);
        tgraph t;
        random_graph(&t, 200, 3, 1, 1);
        int part[200], *perm = random_perm(200);
        for (int i = 0; i < 200; i++)
            part[perm[i]] = i % 4; /* balanced: 50 each */
        free(perm);
        double before = hx_partition_cut(&t.g, part);
        hx_partition_opts o = opts_of(HX_PARTITION_SPECTRAL, 4, NULL, 0.05, seed);
        int moves = hx_partition_refine(&t.g, &o, part);
        assert_true(moves > 0);
        double after = hx_partition_cut(&t.g, part);
        assert_true(after <= before);
        assert_true(after < 0.8 * before);
        assert_valid_parts(&t.g, part, 4);
        assert_balanced(&t.g, part, 4, NULL, 0.05);
        /* A refined partition is a fixed point. */
        int again[200];
        memcpy(again, part, sizeof part);
        assert_int_equal(hx_partition_refine(&t.g, &o, again), 0);
        assert_memory_equal(again, part, sizeof part);
        tg_free(&t);
    }
}

/*
 * Two cliques of 4 with one vertex each on the wrong side and no slack: no single
 * move is allowed (it would make a part of 5), only a swap repairs it.
 */
static void test_refine_swap(void **state)
{
    (void)state;
    tgraph t;
    tg_init(&t, 8);
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++) {
            tg_edge(&t, i, j, 10);
            tg_edge(&t, 4 + i, 4 + j, 10);
        }
    tg_edge(&t, 0, 4, 1);
    tg_build(&t);
    int part[8] = {0, 0, 0, 1, 1, 1, 1, 0}; /* 3 and 7 swapped */
    hx_partition_opts o = opts_of(HX_PARTITION_SPECTRAL, 2, NULL, 0, 1);
    int moves = hx_partition_refine(&t.g, &o, part);
    assert_int_equal(moves, 2);
    int want[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    assert_memory_equal(part, want, sizeof want);
    assert_float_equal(hx_partition_cut(&t.g, part), 1, 1e-12);
    tg_free(&t);
}

/* Everything in part 0 but one vertex each: repair brings every part within limits. */
static void test_refine_repairs_balance(void **state)
{
    (void)state;
    rng_seed(3);
    tgraph t;
    random_graph(&t, 100, 3, 1, 2);
    int part[100] = {0};
    part[10] = 1;
    part[20] = 2;
    hx_partition_opts o = opts_of(HX_PARTITION_METIS, 3, NULL, 0.1, 1);
    assert_true(hx_partition_refine(&t.g, &o, part) > 0);
    assert_valid_parts(&t.g, part, 3);
    assert_balanced(&t.g, part, 3, NULL, 0.1);
    tg_free(&t);
}

/* ---- argument checks ------------------------------------------------------------- */

static void expect_einval(const hx_wgraph *g, const hx_partition_opts *o, int *part,
                          const char *words)
{
    hx_err err = {0};
    assert_int_equal(hx_partition(g, o, part, &err), HX_EINVAL);
    if (!strstr(err.msg, words))
        fail_msg("message '%s' does not mention '%s'", err.msg, words);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    /* Triangle 0-1-2 plus 3 joined to 0. */
    int xadj[5] = {0, 3, 5, 7, 8};
    int adj[8] = {1, 2, 3, 0, 2, 0, 1, 0};
    double ew[8] = {1, 1, 2, 1, 1, 1, 1, 2};
    double vw[4] = {1, 1, 1, 1};
    hx_wgraph g = {.n = 4, .xadj = xadj, .adj = adj, .ew = ew, .vw = vw};
    int part[4];
    hx_partition_opts o = opts_of(HX_PARTITION_SPECTRAL, 2, NULL, 0.1, 1);
    hx_err err = {0};
    assert_int_equal(hx_partition(&g, &o, part, &err), HX_OK);

    expect_einval(NULL, &o, part, "graph is NULL");
    expect_einval(&g, NULL, part, "options");
    expect_einval(&g, &o, NULL, "output");

    hx_wgraph bad = g;
    bad.n = 0;
    expect_einval(&bad, &o, part, "vertices");

    hx_partition_opts ob = o;
    ob.k = 0;
    expect_einval(&g, &ob, part, "1 <= k <= n");
    ob.k = 5;
    expect_einval(&g, &ob, part, "1 <= k <= n");
    ob = o;
    ob.imbalance = -0.1;
    expect_einval(&g, &ob, part, "imbalance");
    ob = o;
    ob.method = (hx_partition_method)7;
    expect_einval(&g, &ob, part, "method");
    double t_short[2] = {0.5, 0.4};
    ob = o;
    ob.target = t_short;
    expect_einval(&g, &ob, part, "sum to 1");
    double t_neg[2] = {1.5, -0.5};
    ob.target = t_neg;
    expect_einval(&g, &ob, part, "target[1]");

    int xadj_bad[5] = {1, 3, 5, 7, 8};
    bad = g;
    bad.xadj = xadj_bad;
    expect_einval(&bad, &o, part, "xadj[0]");
    int xadj_dec[5] = {0, 3, 2, 7, 8};
    bad.xadj = xadj_dec;
    expect_einval(&bad, &o, part, "decreases");

    int adj_range[8] = {1, 2, 9, 0, 2, 0, 1, 0};
    bad = g;
    bad.adj = adj_range;
    expect_einval(&bad, &o, part, "outside");
    int adj_loop[8] = {1, 2, 3, 0, 2, 0, 1, 3};
    bad.adj = adj_loop;
    expect_einval(&bad, &o, part, "self-loop");

    double vw_neg[4] = {1, -1, 1, 1};
    bad = g;
    bad.vw = vw_neg;
    expect_einval(&bad, &o, part, "vertex 1");
    double vw_zero[4] = {0, 0, 0, 0};
    bad.vw = vw_zero;
    expect_einval(&bad, &o, part, "total vertex weight");

    double ew_zero[8] = {1, 1, 0, 1, 1, 1, 1, 0};
    bad = g;
    bad.ew = ew_zero;
    expect_einval(&bad, &o, part, "edge 0-3");
    double ew_asym[8] = {1, 1, 2, 1, 1, 1, 1, 3};
    bad.ew = ew_asym;
    expect_einval(&bad, &o, part, "not symmetric");
    /* 0 lists 3, but 3 lists 1 instead of 0. */
    int adj_asym[8] = {1, 2, 3, 0, 2, 0, 1, 1};
    bad = g;
    bad.adj = adj_asym;
    expect_einval(&bad, &o, part, "not symmetric");

    /* Zero-weight vertices are fine as long as the total is positive. */
    double vw_some[4] = {0, 1, 1, 0};
    bad = g;
    bad.vw = vw_some;
    assert_int_equal(hx_partition(&bad, &o, part, &err), HX_OK);
    assert_valid_parts(&bad, part, 2);

    /* refine: -1 for the same problems and for labels out of range; part untouched. */
    int p2[4] = {0, 0, 1, 1};
    assert_int_equal(hx_partition_refine(NULL, &o, p2), -1);
    assert_int_equal(hx_partition_refine(&g, NULL, p2), -1);
    assert_int_equal(hx_partition_refine(&g, &o, NULL), -1);
    int p_bad[4] = {0, 2, 1, 1};
    assert_int_equal(hx_partition_refine(&g, &o, p_bad), -1);
    assert_int_equal(p_bad[1], 2);
    ob = o;
    ob.target = t_short;
    assert_int_equal(hx_partition_refine(&g, &ob, p2), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cut_and_weights),
        cmocka_unit_test(test_planted_ring_of_cliques),
        cmocka_unit_test(test_planted_hosts),
        cmocka_unit_test(test_planted_unequal_targets),
        cmocka_unit_test(test_balance_random_graphs),
        cmocka_unit_test(test_balance_unequal_targets),
        cmocka_unit_test(test_k1_and_kn),
        cmocka_unit_test(test_disconnected),
        cmocka_unit_test(test_disconnected_uneven),
        cmocka_unit_test(test_edgeless),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_large_grid),
        cmocka_unit_test(test_large_geometric),
        cmocka_unit_test(test_refine_never_worse),
        cmocka_unit_test(test_refine_swap),
        cmocka_unit_test(test_refine_repairs_balance),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
