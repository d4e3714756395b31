/*
 * inventory.h - the cluster inventory: hosts, their devices and the network.
 *
 * Loaded from YAML (format in docs/inventory-format.md) and validated in one
 * pass: every problem becomes a located diagnostic
 * "FILE:LINE:COL: field: what is wrong; what is expected" and the load fails
 * with HX_EPARSE (exit status 2 at the command line). A loaded inventory is
 * immutable and self-contained (GPU specs are copied in), plain data the
 * planner and launcher read directly.
 */
#ifndef HX_INVENTORY_H
#define HX_INVENTORY_H

#include <stddef.h>

#include <jansson.h>

#include "common/diag.h"
#include "common/status.h"
#include "topo/catalog.h"

/*
 * Defaults for what an inventory leaves out (docs/inventory-format.md):
 * intra-host bandwidth by kind, the NIC, and the SSH port.
 */
#define HX_DEFAULT_NVLINK_BYTES_PER_S 300e9 /* NVLink, per direction, conservative */
#define HX_DEFAULT_PCIE_BYTES_PER_S 32e9    /* PCIe Gen4 x16 */
#define HX_DEFAULT_NONE_BYTES_PER_S 10e9    /* through host memory (CPU devices) */
#define HX_DEFAULT_NIC_BYTES_PER_S 12.5e9   /* 100 Gb/s */
#define HX_DEFAULT_SSH_PORT 22

typedef enum hx_intra_kind {
    HX_INTRA_NONE = 0, /* devices of the host talk through host memory only */
    HX_INTRA_PCIE = 1,
    HX_INTRA_NVLINK = 2
} hx_intra_kind;

typedef struct hx_ssh_settings {
    char *user;        /* owned; NULL = the launching user */
    int port;          /* 0 = 22 */
    char *identity;    /* owned; path of the private key, NULL = agent/default */
    char *known_hosts; /* owned; path, NULL = ~/.ssh/known_hosts */
} hx_ssh_settings;

typedef struct hx_host {
    char *name;             /* owned; unique in the inventory */
    char *address;          /* owned; "local" = this machine, no SSH */
    int is_local;           /* address == "local" */
    hx_ssh_settings ssh;    /* host settings over `defaults.ssh` */
    char *workdir;          /* owned; over `defaults.workdir`; NULL = none given */
    int gpu_type;           /* index into hx_inventory.types */
    int gpu_count;          /* > 0 */
    hx_intra_kind intra_kind;
    double intra_bytes_per_s; /* device-to-device bandwidth inside the host */
    double nic_bytes_per_s;   /* the host's network interface, shared by its devices */
    int nic_rdma;             /* 1 when the NIC does RDMA (GPUDirect) */
    int switch_index;         /* index into hx_inventory.switches, -1 = none */
    int first_device;         /* index of the host's first device in device order */
    int line;                 /* where the host is defined in the file (1-based) */
} hx_host;

typedef struct hx_switch {
    char *name;                  /* owned */
    double uplink_bytes_per_s;   /* to the spine / other switches; 0 = not given */
} hx_switch;

typedef struct hx_link {
    int host_a, host_b;          /* host indices, host_a < host_b */
    double bytes_per_s;          /* measured or overriding host-to-host bandwidth */
    double latency_s;            /* 0 = not given */
} hx_link;

typedef struct hx_inventory {
    char *name;          /* owned; the inventory's `name` (or the file's base name) */
    char *path;          /* owned; the file it came from (or the name given) */
    hx_ssh_settings default_ssh;
    char *default_workdir; /* owned; may be NULL */
    hx_gpu_spec *types;  /* owned [ntypes]: every GPU type used or declared */
    size_t ntypes;
    hx_host *hosts;      /* owned [nhosts] */
    size_t nhosts;
    hx_switch *switches; /* owned [nswitches] */
    size_t nswitches;
    hx_link *links;      /* owned [nlinks], sorted by (host_a, host_b) */
    size_t nlinks;
    size_t ndevices;     /* sum of gpu_count over hosts */
} hx_inventory;

/*
 * Loads and validates the inventory in `path`. On success *out is a new
 * inventory (free with hx_inventory_free). On failure every problem found is
 * in `diags` and the result is HX_ENOENT/HX_EIO (unreadable) or HX_EPARSE
 * (malformed: syntax, types, units, unknown names, duplicates).
 */
hx_status hx_inventory_load(const char *path, hx_inventory **out, hx_diags *diags);

/* Same from text in memory; `name` stands for the file name in messages. */
hx_status hx_inventory_load_string(const char *text, size_t len, const char *name,
                                   hx_inventory **out, hx_diags *diags);

void hx_inventory_free(hx_inventory *inv);

/* The host named `name`, or -1. */
int hx_inventory_find_host(const hx_inventory *inv, const char *name);

/* The explicit link between two hosts (either order), or NULL. */
const hx_link *hx_inventory_find_link(const hx_inventory *inv, int host_a, int host_b);

/* The GPU spec of a host's devices. */
const hx_gpu_spec *hx_inventory_host_spec(const hx_inventory *inv, const hx_host *h);

/* Device index -> host index and the device's index inside its host. */
int hx_inventory_device_host(const hx_inventory *inv, int device, int *local_index);

/*
 * The inventory as a document of the inventory format, in JSON (which the
 * YAML loader reads back: hx_inventory_load_string(json_dumps(...)) gives an
 * equal inventory). Quantities carry units ("450000000000B/s"). With
 * `hosts` (a bitmap of nhosts flags, or NULL for all) only those hosts, and
 * the links between them, are written. A new reference, or NULL.
 */
json_t *hx_inventory_to_json(const hx_inventory *inv, const unsigned char *hosts);

/* Writes "host:index" for a device into buf; returns buf. */
const char *hx_inventory_device_name(const hx_inventory *inv, int device, char *buf,
                                     size_t size);

#endif /* HX_INVENTORY_H */
