/*
 * partition.h - k-way partitioning of a weighted undirected graph.
 *
 * The planner partitions its units (hosts, or slices of hosts) into model
 * replicas so that fast links stay inside replicas: vertex weights are the
 * units' memory (each part must hold a replica), edge weights the bandwidth
 * between them, and a good partition has a small cut (little bandwidth
 * between parts) and parts whose weights are close to their targets.
 *
 * Two methods, both followed by Fiduccia-Mattheyses refinement:
 *
 *   spectral  recursive bisection on the Fiedler vector (second eigenvector
 *             of the weighted Laplacian L = D - W, LAPACKE_dsyevr); each split
 *             at the weighted quantile that gives the two halves their
 *             target weights. Graphs above HX_PARTITION_COARSE_MAX vertices
 *             are first coarsened by heavy-edge matching (multilevel), the
 *             coarse partition projected back and refined level by level.
 *   metis     METIS_PartGraphKway (multilevel k-way) with integer-scaled
 *             weights and the targets as tpwgts.
 *
 * Details that callers may notice:
 *   - A bisection cuts where both halves are within their targets x
 *     (1 + imbalance / levels) with the smallest cut, and puts disconnected
 *     components on sides whole where it can (no eigenproblem across them).
 *     With at most 12 parts left, any k/2 of them may form a side, so that
 *     unequal targets can follow the graph's clusters.
 *   - Components too large for a dense Laplacian (only when coarsening
 *     stalls, e.g. stars, or k is large) are ordered breadth-first instead.
 *   - METIS sees vertex weights clipped to the smallest part's target (it
 *     cannot place heavier ones); refinement uses the true weights. On graphs
 *     up to HX_PARTITION_COARSE_MAX vertices METIS runs 8 times on seeded
 *     renumberings and the best refined result is kept. METIS itself may print
 *     a diagnostic on degenerate inputs (k near n with very uneven weights);
 *     its empty parts are repaired.
 *   - Part limits are met whenever repair by moves and swaps can reach
 *     them; they can be missed when the weights make them unreachable (a
 *     vertex heavier than a part's limit) or, rarely, with bin-packing-like
 *     weights. Every part is non-empty regardless.
 *
 * Deterministic for a given seed.
 */
#ifndef HX_PARTITION_H
#define HX_PARTITION_H

#include "common/status.h"

#define HX_PARTITION_COARSE_MAX 256

/* A weighted undirected graph in compressed sparse row form (caller-owned). */
typedef struct hx_wgraph {
    int n;            /* vertices */
    const int *xadj;  /* [n+1]: neighbours of v are adj[xadj[v] .. xadj[v+1]) */
    const int *adj;   /* [xadj[n]]: each undirected edge appears in both directions */
    const double *ew; /* [xadj[n]]: edge weights > 0 (same value both directions) */
    const double *vw; /* [n]: vertex weights >= 0 */
} hx_wgraph;

typedef enum hx_partition_method {
    HX_PARTITION_SPECTRAL = 0,
    HX_PARTITION_METIS = 1
} hx_partition_method;

typedef struct hx_partition_opts {
    hx_partition_method method;
    int k;                    /* parts, 1 <= k <= n */
    const double *target;     /* [k] target fraction of total vertex weight per part
                                 (sums to 1), or NULL for equal parts */
    double imbalance;         /* allowed relative excess over a part's target, e.g. 0.1 */
    unsigned long seed;
} hx_partition_opts;

/*
 * Partitions `g` into opts->k parts; part[v] in [0, k) for every vertex
 * (caller-owned, [n]). Every part is non-empty when k <= n. HX_EINVAL for
 * bad arguments; HX_EINTERNAL when LAPACK or METIS fails.
 */
hx_status hx_partition(const hx_wgraph *g, const hx_partition_opts *opts, int *part,
                       hx_err *err);

/*
 * Fiduccia-Mattheyses / Kernighan-Lin refinement in place: moves single
 * vertices (and swaps pairs) between parts while the cut decreases and every
 * part stays within its target weight x (1 + imbalance); never empties a part.
 * Parts above their limit on entry are relieved first (balance repair), even at
 * some cost in cut; otherwise the cut never increases. A part empty on entry
 * stays empty. opts->method is not used. Returns the number of vertex moves
 * kept (a swap counts two), or -1 when an argument is invalid (as hx_partition
 * would report, or a part[] label outside [0, k)) or memory runs out; part is
 * then unchanged.
 */
int hx_partition_refine(const hx_wgraph *g, const hx_partition_opts *opts, int *part);

/* Total weight of edges whose ends are in different parts (each edge once). */
double hx_partition_cut(const hx_wgraph *g, const int *part);

/* Sum of vertex weights per part into weights[k]. */
void hx_partition_weights(const hx_wgraph *g, const int *part, int k, double *weights);

#endif /* HX_PARTITION_H */
