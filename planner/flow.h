/*
 * flow.h - maximum flow on a small directed network, solved with GLPK.
 *
 * The planner's network is source -> prefill groups -> decode groups ->
 * sink with real-valued capacities in requests/s; the flow value is the
 * plan's throughput and each edge's flow a route's rate. After solving, the
 * source side of a minimum cut tells which capacities are saturated (the
 * bottleneck the refinement works on).
 *
 *     hx_flow *f = hx_flow_new(4);
 *     int e = hx_flow_add_edge(f, 0, 1, 2.5);
 *     ...
 *     double v;
 *     hx_flow_solve(f, 0, 3, &v, &err);
 *     double x = hx_flow_edge_flow(f, e);
 *     hx_flow_free(f);
 */
#ifndef HX_FLOW_H
#define HX_FLOW_H

#include "common/status.h"

typedef struct hx_flow hx_flow;

/* A network of `nnodes` nodes (0 .. nnodes-1) and no edges; NULL on allocation failure. */
hx_flow *hx_flow_new(int nnodes);
void hx_flow_free(hx_flow *f);

/*
 * Adds a directed edge with capacity `cap` >= 0 (INFINITY allowed) and returns
 * its id (0, 1, ...), or -1 on bad nodes, a negative/NaN capacity or
 * allocation failure. Parallel edges are allowed.
 */
int hx_flow_add_edge(hx_flow *f, int from, int to, double cap);

int hx_flow_num_nodes(const hx_flow *f);
int hx_flow_num_edges(const hx_flow *f);

/*
 * Computes a maximum s-t flow (GLPK, simplex on the max-flow LP) and its
 * value. Flows are exact up to 1e-9 relative; conservation holds at every
 * node but s and t. HX_EINVAL for bad s/t (or s == t); HX_EINTERNAL if GLPK
 * fails. Edges out of t or into s carry no flow. A network whose value
 * would be infinite (an all-INFINITY s-t path) gets HX_ERANGE.
 */
hx_status hx_flow_solve(hx_flow *f, int s, int t, double *value, hx_err *err);

/* Flow on edge `edge` after hx_flow_solve. */
double hx_flow_edge_flow(const hx_flow *f, int edge);
double hx_flow_edge_cap(const hx_flow *f, int edge);

/*
 * After hx_flow_solve: 1 when `node` is reachable from s in the residual
 * network (the source side of a minimum cut), 0 otherwise. An edge from the
 * source side to the other side is saturated and belongs to a minimum cut.
 */
int hx_flow_source_side(const hx_flow *f, int node);

/* Whether edge `edge` crosses the minimum cut found (source side -> sink side). */
int hx_flow_edge_in_cut(const hx_flow *f, int edge);

#endif /* HX_FLOW_H */
