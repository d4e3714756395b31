/*
 * discover.h - local discovery: what this machine has, as an inventory fragment.
 *
 * hx_discover_run() gathers facts about the machine it runs on:
 *
 *   - cores, hardware threads and NUMA nodes (with their memory) from hwloc;
 *   - PCI display/3D/accelerator devices from hwloc (vendor and device ids,
 *     a model name when hwloc knows one);
 *   - network interfaces from /sys/class/net (link speed when readable, the
 *     RDMA device behind an interface) and RDMA devices from
 *     /sys/class/infiniband;
 *   - CUDA GPUs (model name, memory) from the CUDA driver API or NVML,
 *     loaded with dlopen at run time: the binary neither links against nor
 *     needs them, and their absence simply means "no CUDA GPUs".
 *
 * hx_discover_summarize() turns those facts into the one host entry of an
 * inventory (device type and count, intra-host link, NIC), and
 * hx_discover_write_yaml() writes that entry as an inventory fragment that
 * `hexflow inventory check` accepts. A machine without GPUs gets `cpu`
 * devices, one per NUMA node, with figures estimated from the machine.
 *
 * Facts and inference are kept apart on purpose: a caller (or a test) may
 * fill an hx_discovery by hand and still get the summary and the YAML.
 */
#ifndef HX_DISCOVER_H
#define HX_DISCOVER_H

#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

#include "common/status.h"
#include "topo/catalog.h"
#include "topo/inventory.h"

/* One NUMA node. */
typedef struct hx_discover_numa {
    unsigned os_index;   /* the OS's node number (node0 = 0) */
    double memory_bytes; /* local memory of the node; 0 = unknown */
    int cores;           /* physical cores whose hardware threads are in the node */
    int pus;             /* hardware threads (processing units) in the node */
} hx_discover_numa;

/* A PCI device of class display (0x03xx) or processing accelerator (0x12xx). */
typedef struct hx_discover_pci_gpu {
    char bus_id[16];     /* "0000:3b:00.0" */
    unsigned vendor_id;  /* 0x10de NVIDIA, 0x1002 AMD, ... */
    unsigned device_id;
    unsigned class_id;   /* 0x0300 VGA, 0x0302 3D controller, 0x1200 accelerator */
    char *name;          /* owned; model name from hwloc (GPU model of an OS device,
                            else the PCI database), NULL = unknown */
    char *os_devices;    /* owned; OS devices hwloc attached, "card0,renderD128,cuda0";
                            NULL = none */
    double link_bytes_per_s; /* the device's maximum PCIe link bandwidth, one
                                direction; 0 = unknown */
    int numa_node;       /* os_index of the closest NUMA node, -1 = unknown */
} hx_discover_pci_gpu;

/* A network interface (loopback excluded). */
typedef struct hx_discover_nic {
    char *name;          /* owned; "eth0", "ib0" */
    double bytes_per_s;  /* link speed from /sys/class/net/NAME/speed; 0 = unknown */
    int is_virtual;      /* 1 when no physical device is behind it (bridge, veth, ...) */
    int is_up;           /* operstate "up" */
    char *rdma_device;   /* owned; the RDMA device on the same PCI device ("mlx5_0"),
                            NULL = none */
} hx_discover_nic;

/* A CUDA GPU, as the CUDA driver (or NVML) reports it. */
typedef struct hx_discover_gpu {
    int index;            /* CUDA device ordinal (NVML index when from NVML) */
    char *name;           /* owned; driver model string, "NVIDIA H100 80GB HBM3" */
    double memory_bytes;  /* total device memory */
    char bus_id[16];      /* "0000:3b:00.0", "" = unknown */
    const char *catalog_type; /* static catalog name (hx_catalog_match_device_name),
                                 NULL = unknown to the catalog */
    int cc_major, cc_minor;   /* compute capability; 0 = unknown */
    int sm_count;             /* multiprocessors; 0 = unknown */
    double clock_hz;          /* SM clock; 0 = unknown */
    double mem_clock_hz;      /* memory clock; 0 = unknown */
    int mem_bus_width_bits;   /* 0 = unknown */
    int nvlink_active_links;  /* NVLinks NVML reports active; 0 = none or unknown */
} hx_discover_gpu;

/* What hx_discover_run found. Plain data; every array is owned. */
typedef struct hx_discovery {
    char *hostname;       /* owned; never NULL after hx_discover_run */
    int cores;            /* physical cores available to this process (>= 1) */
    int pus;              /* hardware threads available to this process (>= 1) */
    double memory_bytes;  /* total memory of the NUMA nodes */
    double memory_limit_bytes; /* cgroup memory limit of this process; 0 = none */
    double cpu_max_hz;    /* max core clock (cpufreq, else /proc/cpuinfo); 0 = unknown */
    hx_discover_numa *numa;     /* owned [nnuma], nnuma >= 1 after hx_discover_run */
    size_t nnuma;
    hx_discover_pci_gpu *pci_gpus; /* owned [npci_gpus] */
    size_t npci_gpus;
    hx_discover_nic *nics;      /* owned [nnics], sorted by name */
    size_t nnics;
    char **rdma_devices;        /* owned [nrdma] names from /sys/class/infiniband, each owned */
    size_t nrdma;
    hx_discover_gpu *gpus;      /* owned [ngpus] */
    size_t ngpus;
    const char *gpu_source;     /* static: "cuda", "nvml" or "none" */
} hx_discovery;

/*
 * Discovers this machine. On success *out is a new discovery (free with
 * hx_discovery_free). Missing optional sources (no CUDA, unreadable sysfs
 * files) are not errors; only a failing hwloc or memory allocation is.
 */
hx_status hx_discover_run(hx_discovery **out, hx_err *err);

/* Frees a discovery and everything it owns; NULL is a no-op. */
void hx_discovery_free(hx_discovery *d);

/* The inventory host entry inferred from a discovery. Plain value. */
typedef struct hx_discover_summary {
    hx_gpu_spec type;     /* the devices' type: a catalog entry, or estimated figures */
    int type_is_custom;   /* 1 = `type` must be declared under gpu_types (the `cpu`
                             type with this machine's figures, or a GPU model the
                             catalog does not know) */
    int count;            /* number of devices (GPUs of that type, or NUMA nodes) */
    int other_gpus;       /* GPUs of other models, left out (a host has one type) */
    hx_intra_kind intra_kind;
    double intra_bytes_per_s; /* device-to-device, one direction */
    double nic_bytes_per_s;   /* fastest interface; 10 Gb/s when none is known */
    int nic_speed_known;      /* 0 = nic_bytes_per_s is the default */
    int nic_rdma;             /* an RDMA device exists */
} hx_discover_summary;

/*
 * Infers the host entry from `d` (borrowed) into *out (caller-owned):
 *
 *   - GPUs: the most common model among d->gpus; its catalog entry when the
 *     catalog knows the model, else a custom type named after the model
 *     with figures estimated from the compute capability, SM count and
 *     clocks. Intra link: nvlink when every GPU has active NVLinks (25 GB/s
 *     per link and direction), else pcie at the slowest GPU's PCIe link
 *     (32 GB/s, PCIe 4.0 x16, when unknown).
 *   - No GPUs: `cpu` devices, one per NUMA node, with estimated figures
 *     (memory a bit below the node's, leaving room for the OS; fp32 FMA peak
 *     of the node's cores; ~10 GB/s of memory bandwidth per core). Intra
 *     link: none.
 *
 * Returns HX_EINVAL when `d` has no NUMA node.
 */
hx_status hx_discover_summarize(const hx_discovery *d, hx_discover_summary *out);

/*
 * Writes the inventory fragment for `d` (borrowed) to `fp` (borrowed):
 * a comment header, `name`, `gpu_types` when the type is custom, and one
 * host with `address: local`. Returns HX_EIO when writing fails.
 */
hx_status hx_discover_write_yaml(const hx_discovery *d, FILE *fp);

/*
 * The discovery as JSON: every fact above plus "inventory" (the summary).
 * Returns a new reference (caller owns it; json_decref), NULL when out of
 * memory or when `d` has no NUMA node.
 */
json_t *hx_discover_to_json(const hx_discovery *d);

#endif /* HX_DISCOVER_H */
