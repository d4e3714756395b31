#include "graph.h"

#include <math.h>
#include <stdlib.h>

#define LAT_NVLINK_S 2e-6
#define LAT_PCIE_S 5e-6
#define LAT_HOSTMEM_S 10e-6
#define LAT_SWITCH_S 10e-6
#define LAT_SWITCH_RDMA_S 5e-6
#define LAT_SPINE_HOP_S 5e-6

struct hx_graph {
    const hx_inventory *inv; /* borrowed */
    int *device_host;        /* [ndevices] host index of each device */
};

hx_status hx_graph_new(const hx_inventory *inv, hx_graph **out)
{
    hx_graph *g = calloc(1, sizeof *g);
    if (!g)
        return HX_ENOMEM;
    g->inv = inv;
    g->device_host = malloc((inv->ndevices ? inv->ndevices : 1) * sizeof *g->device_host);
    if (!g->device_host) {
        free(g);
        return HX_ENOMEM;
    }
    for (size_t h = 0; h < inv->nhosts; h++)
        for (int k = 0; k < inv->hosts[h].gpu_count; k++)
            g->device_host[inv->hosts[h].first_device + k] = (int)h;
    *out = g;
    return HX_OK;
}

void hx_graph_free(hx_graph *g)
{
    if (!g)
        return;
    free(g->device_host);
    free(g);
}

const hx_inventory *hx_graph_inventory(const hx_graph *g)
{
    return g->inv;
}

size_t hx_graph_num_devices(const hx_graph *g)
{
    return g->inv->ndevices;
}

int hx_graph_device_host(const hx_graph *g, int device)
{
    return g->device_host[device];
}

const hx_gpu_spec *hx_graph_device_spec(const hx_graph *g, int device)
{
    return hx_inventory_host_spec(g->inv, &g->inv->hosts[g->device_host[device]]);
}

int hx_graph_host_switch(const hx_graph *g, int host)
{
    return g->inv->hosts[host].switch_index;
}

/* Narrows path `p` to a hop of bandwidth `bw` when that hop is slower. */
static void narrow(hx_path *p, double bw, hx_hop_kind kind, int index)
{
    if (bw > 0 && bw < p->bytes_per_s) {
        p->bytes_per_s = bw;
        p->bottleneck = kind;
        p->bottleneck_index = index;
    }
}

static double intra_latency(hx_intra_kind k)
{
    return k == HX_INTRA_NVLINK ? LAT_NVLINK_S : k == HX_INTRA_PCIE ? LAT_PCIE_S : LAT_HOSTMEM_S;
}

hx_path hx_graph_host_path(const hx_graph *g, int host_a, int host_b)
{
    const hx_inventory *inv = g->inv;
    const hx_host *a = &inv->hosts[host_a], *b = &inv->hosts[host_b];
    hx_path p = {INFINITY, 0, HX_HOP_INTRA, host_a};
    if (host_a == host_b) {
        narrow(&p, a->intra_bytes_per_s, HX_HOP_INTRA, host_a);
        p.latency_s = intra_latency(a->intra_kind);
        return p;
    }
    narrow(&p, a->nic_bytes_per_s, HX_HOP_NIC, host_a);
    narrow(&p, b->nic_bytes_per_s, HX_HOP_NIC, host_b);
    const hx_link *l = hx_inventory_find_link(inv, host_a, host_b);
    if (l) {
        /* A measured host-to-host figure replaces the switch path. */
        narrow(&p, l->bytes_per_s, HX_HOP_LINK, (int)(l - inv->links));
        p.latency_s = l->latency_s > 0 ? l->latency_s
                                       : (a->nic_rdma && b->nic_rdma ? LAT_SWITCH_RDMA_S
                                                                     : LAT_SWITCH_S);
        return p;
    }
    p.latency_s = a->nic_rdma && b->nic_rdma ? LAT_SWITCH_RDMA_S : LAT_SWITCH_S;
    if (a->switch_index != b->switch_index) {
        if (a->switch_index >= 0)
            narrow(&p, inv->switches[a->switch_index].uplink_bytes_per_s, HX_HOP_UPLINK,
                   a->switch_index);
        if (b->switch_index >= 0)
            narrow(&p, inv->switches[b->switch_index].uplink_bytes_per_s, HX_HOP_UPLINK,
                   b->switch_index);
        p.latency_s += LAT_SPINE_HOP_S;
    }
    return p;
}

hx_path hx_graph_path(const hx_graph *g, int dev_a, int dev_b)
{
    if (dev_a == dev_b) {
        const hx_gpu_spec *s = hx_graph_device_spec(g, dev_a);
        hx_path p = {s->hbm_bytes_per_s, 0, HX_HOP_SELF, g->device_host[dev_a]};
        return p;
    }
    return hx_graph_host_path(g, g->device_host[dev_a], g->device_host[dev_b]);
}

double hx_graph_bandwidth(const hx_graph *g, int dev_a, int dev_b)
{
    return hx_graph_path(g, dev_a, dev_b).bytes_per_s;
}

double hx_graph_latency(const hx_graph *g, int dev_a, int dev_b)
{
    return hx_graph_path(g, dev_a, dev_b).latency_s;
}

double hx_graph_switch_bandwidth(const hx_graph *g, int sw_a, int sw_b)
{
    double bw = INFINITY;
    if (sw_a == sw_b)
        return bw;
    if (sw_a >= 0 && g->inv->switches[sw_a].uplink_bytes_per_s > 0)
        bw = fmin(bw, g->inv->switches[sw_a].uplink_bytes_per_s);
    if (sw_b >= 0 && g->inv->switches[sw_b].uplink_bytes_per_s > 0)
        bw = fmin(bw, g->inv->switches[sw_b].uplink_bytes_per_s);
    return bw;
}

const char *hx_hop_kind_name(hx_hop_kind k)
{
    switch (k) {
    case HX_HOP_SELF: return "device memory";
    case HX_HOP_INTRA: return "intra-host link";
    case HX_HOP_NIC: return "NIC";
    case HX_HOP_UPLINK: return "switch uplink";
    case HX_HOP_LINK: return "link";
    }
    return "?";
}
