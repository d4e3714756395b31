/*
 * graph.h - the device graph the planner partitions.
 *
 * One vertex per device (GPU or CPU device) of an inventory, in inventory
 * order (host by host). Edges are not stored: the bandwidth and latency of
 * the path between two devices are derived on demand from
 *
 *   - the intra-host link (same host),
 *   - each host's NIC (shared by all of that host's devices),
 *   - the uplinks of the switches the hosts hang off (when they differ),
 *   - explicit host-to-host links (measured or overriding),
 *
 * and a path is as fast as its narrowest hop. Queries are O(1) (O(log L) with
 * L explicit links), so the graph stays cheap at thousands of devices; callers
 * that need aggregate structure work by host or by switch.
 *
 * Latency model (defaults when a link gives none): NVLink 2 us, PCIe 5 us,
 * through host memory 10 us; hosts on one switch 10 us (RDMA on both NICs:
 * 5 us); hosts on different switches one more switch hop, +5 us.
 */
#ifndef HX_GRAPH_H
#define HX_GRAPH_H

#include <stddef.h>

#include "common/status.h"
#include "topo/inventory.h"

typedef struct hx_graph hx_graph;

/* Which hop limits a path. */
typedef enum hx_hop_kind {
    HX_HOP_SELF = 0,   /* a device to itself: its memory bandwidth */
    HX_HOP_INTRA,      /* the intra-host link */
    HX_HOP_NIC,        /* a host's NIC */
    HX_HOP_UPLINK,     /* a switch uplink */
    HX_HOP_LINK        /* an explicit host-to-host link */
} hx_hop_kind;

typedef struct hx_path {
    double bytes_per_s;     /* bandwidth of the narrowest hop */
    double latency_s;       /* one-way latency */
    hx_hop_kind bottleneck; /* kind of the narrowest hop */
    int bottleneck_index;   /* host index (INTRA, NIC), switch index (UPLINK), link index */
} hx_path;

/*
 * Builds the graph over `inv`, which must outlive it (the graph borrows it).
 * Returns HX_ENOMEM or HX_OK.
 */
hx_status hx_graph_new(const hx_inventory *inv, hx_graph **out);
void hx_graph_free(hx_graph *g);

const hx_inventory *hx_graph_inventory(const hx_graph *g);
size_t hx_graph_num_devices(const hx_graph *g);

/* Host index of a device; its spec. */
int hx_graph_device_host(const hx_graph *g, int device);
const hx_gpu_spec *hx_graph_device_spec(const hx_graph *g, int device);

/* Switch index of a host, -1 when it hangs off no declared switch. */
int hx_graph_host_switch(const hx_graph *g, int host);

/* Path between two devices / two hosts (a host to itself: its intra link). */
hx_path hx_graph_path(const hx_graph *g, int dev_a, int dev_b);
hx_path hx_graph_host_path(const hx_graph *g, int host_a, int host_b);

/* Shorthands for hx_graph_path(...).bytes_per_s and .latency_s. */
double hx_graph_bandwidth(const hx_graph *g, int dev_a, int dev_b);
double hx_graph_latency(const hx_graph *g, int dev_a, int dev_b);

/*
 * Bandwidth between two switches for traffic between their hosts, ignoring
 * NICs: the smaller uplink (0 when either is unconstrained -> returns the
 * other; both unconstrained -> INFINITY). sw = -1 stands for "no switch".
 */
double hx_graph_switch_bandwidth(const hx_graph *g, int sw_a, int sw_b);

/* Text for a hop kind: "intra-host link", "NIC", "switch uplink", "link". */
const char *hx_hop_kind_name(hx_hop_kind k);

#endif /* HX_GRAPH_H */
