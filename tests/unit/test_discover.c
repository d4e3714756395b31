/*
 * test_discover.c - local discovery: runs on this machine, and the inventory
 * fragment it writes (for this machine and for made-up GPU machines) loads
 * without diagnostics.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "topo/discover.h"
#include "topo/inventory.h"

#define GiB (1024.0 * 1024.0 * 1024.0)

/* ---- helpers ----------------------------------------------------------- */

/* The YAML fragment of `d` as a malloc'ed string (caller frees). */
static char *yaml_of(const hx_discovery *d, size_t *len)
{
    char *buf = NULL;
    size_t size = 0;
    FILE *fp = open_memstream(&buf, &size);
    assert_non_null(fp);
    assert_int_equal(hx_discover_write_yaml(d, fp), HX_OK);
    assert_int_equal(fclose(fp), 0);
    *len = size;
    return buf;
}

/* Loads the fragment of `d` as an inventory; fails the test on any diagnostic. */
static hx_inventory *load_fragment(const hx_discovery *d)
{
    size_t len;
    char *text = yaml_of(d, &len);
    hx_diags diags;
    hx_diags_init(&diags);
    hx_inventory *inv = NULL;
    hx_status st = hx_inventory_load_string(text, len, "discovered.yaml", &inv, &diags);
    if (st != HX_OK || diags.count > 0) {
        print_error("fragment:\n%s\n", text);
        hx_diags_print(&diags, stderr, "  ");
        fail_msg("the discovered fragment does not load (%s)", hx_strerror(st));
    }
    hx_diags_release(&diags);
    free(text);
    assert_non_null(inv);
    return inv;
}

/* A made-up machine with `nnuma` NUMA nodes of `cores` cores and `mem` bytes each. */
static hx_discovery *fake_machine(size_t nnuma, int cores, double mem)
{
    hx_discovery *d = calloc(1, sizeof *d);
    assert_non_null(d);
    d->hostname = strdup("fake-host");
    d->gpu_source = "none";
    d->numa = calloc(nnuma, sizeof *d->numa);
    assert_non_null(d->numa);
    d->nnuma = nnuma;
    for (size_t i = 0; i < nnuma; i++) {
        d->numa[i].os_index = (unsigned)i;
        d->numa[i].memory_bytes = mem;
        d->numa[i].cores = cores;
        d->numa[i].pus = 2 * cores;
    }
    d->cores = (int)nnuma * cores;
    d->pus = 2 * d->cores;
    d->memory_bytes = mem * (double)nnuma;
    d->cpu_max_hz = 3.0e9;
    return d;
}

/* Adds `n` GPUs named `name` to `d` (bus ids 0000:<first+i>:00.0). */
static void add_gpus(hx_discovery *d, size_t n, const char *name, double mem, int links)
{
    hx_discover_gpu *g = realloc(d->gpus, (d->ngpus + n) * sizeof *g);
    assert_non_null(g);
    d->gpus = g;
    for (size_t i = 0; i < n; i++) {
        hx_discover_gpu *x = &d->gpus[d->ngpus];
        memset(x, 0, sizeof *x);
        x->index = (int)d->ngpus;
        x->name = strdup(name);
        x->memory_bytes = mem;
        snprintf(x->bus_id, sizeof x->bus_id, "0000:%02x:00.0", (unsigned)(0x10 + d->ngpus));
        x->catalog_type = hx_catalog_match_device_name(name, mem);
        x->nvlink_active_links = links;
        d->ngpus++;
    }
    d->gpu_source = "cuda";
}

static void add_nic(hx_discovery *d, const char *name, double bytes_per_s, int is_virtual)
{
    hx_discover_nic *n = realloc(d->nics, (d->nnics + 1) * sizeof *n);
    assert_non_null(n);
    d->nics = n;
    memset(&d->nics[d->nnics], 0, sizeof *n);
    d->nics[d->nnics].name = strdup(name);
    d->nics[d->nnics].bytes_per_s = bytes_per_s;
    d->nics[d->nnics].is_virtual = is_virtual;
    d->nics[d->nnics].is_up = 1;
    d->nnics++;
}

static int near(double a, double b, double rel)
{
    return fabs(a - b) <= rel * fabs(b);
}

/* ---- this machine ------------------------------------------------------ */

static void test_run_here(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_discovery *d = NULL;
    hx_status st = hx_discover_run(&d, &err);
    if (st != HX_OK)
        fail_msg("hx_discover_run: %s", err.msg);
    assert_non_null(d);
    assert_non_null(d->hostname);
    assert_true(d->hostname[0] != '\0');
    assert_true(d->cores >= 1);
    assert_true(d->pus >= d->cores);
    assert_true(d->nnuma >= 1);
    assert_true(d->memory_bytes > 0);
    int node_cores = 0;
    for (size_t i = 0; i < d->nnuma; i++)
        node_cores += d->numa[i].cores;
    assert_true(node_cores >= 1);
    assert_non_null(d->gpu_source);
    for (size_t i = 0; i < d->nnics; i++)
        assert_string_not_equal(d->nics[i].name, "lo");
    if (d->ngpus == 0)
        print_message("no CUDA GPU here: the devices are cpu\n");
    else
        print_message("%zu CUDA GPU(s) here, first: %s\n", d->ngpus, d->gpus[0].name);
    hx_discovery_free(d);
}

static void test_yaml_here_loads(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_discovery *d = NULL;
    assert_int_equal(hx_discover_run(&d, &err), HX_OK);
    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_true(s.count >= 1);

    size_t len;
    char *text = yaml_of(d, &len);
    assert_true(len > 0);
    assert_non_null(strstr(text, "address: local"));
    assert_true(text[0] == '#'); /* the comment header */
    free(text);

    hx_inventory *inv = load_fragment(d);
    assert_int_equal(inv->nhosts, 1);
    assert_true(inv->hosts[0].is_local);
    assert_string_equal(inv->hosts[0].name, d->hostname);
    assert_int_equal(inv->hosts[0].gpu_count, s.count);
    const hx_gpu_spec *spec = hx_inventory_host_spec(inv, &inv->hosts[0]);
    assert_string_equal(spec->name, s.type.name);
    if (d->ngpus == 0) {
        assert_string_equal(spec->name, "cpu");
        assert_int_equal(spec->is_cpu, 1);
        assert_int_equal(inv->hosts[0].intra_kind, HX_INTRA_NONE);
        /* the estimates survive the trip through text */
        assert_true(near(spec->memory_bytes, s.type.memory_bytes, 0.01));
        assert_true(near(spec->bf16_flops, s.type.bf16_flops, 0.01));
        assert_true(near(spec->hbm_bytes_per_s, s.type.hbm_bytes_per_s, 0.01));
        /* memory leaves room for the OS */
        assert_true(spec->memory_bytes < d->memory_bytes / (double)s.count);
        assert_true(spec->memory_bytes > 0);
    }
    assert_true(inv->hosts[0].nic_bytes_per_s > 0);
    hx_inventory_free(inv);
    hx_discovery_free(d);
}

static void test_json_here(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_discovery *d = NULL;
    assert_int_equal(hx_discover_run(&d, &err), HX_OK);
    json_t *j = hx_discover_to_json(d);
    assert_non_null(j);
    static const char *const keys[] = {"hostname", "cores",    "pus",      "memory_bytes",
                                       "cpu_max_hz", "numa_nodes", "pci_gpus", "nics",
                                       "rdma_devices", "gpus",   "gpu_source", "inventory"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (!json_object_get(j, keys[i]))
            fail_msg("JSON has no '%s'", keys[i]);
    assert_string_equal(json_string_value(json_object_get(j, "hostname")), d->hostname);
    assert_int_equal(json_integer_value(json_object_get(j, "cores")), d->cores);
    json_t *numa = json_object_get(j, "numa_nodes");
    assert_true(json_is_array(numa));
    assert_int_equal(json_array_size(numa), d->nnuma);
    assert_non_null(json_object_get(json_array_get(numa, 0), "memory_bytes"));
    json_t *invj = json_object_get(j, "inventory");
    static const char *const inv_keys[] = {"type", "count", "intra_kind", "intra_bytes_per_s",
                                           "nic_bytes_per_s", "nic_rdma"};
    for (size_t i = 0; i < sizeof inv_keys / sizeof inv_keys[0]; i++)
        if (!json_object_get(invj, inv_keys[i]))
            fail_msg("JSON inventory has no '%s'", inv_keys[i]);
    assert_non_null(json_object_get(json_object_get(invj, "type"), "name"));
    assert_int_equal(json_array_size(json_object_get(j, "gpus")), d->ngpus);
    json_decref(j);
    hx_discovery_free(d);
}

/* ---- made-up machines -------------------------------------------------- */

static void test_cpu_estimates(void **state)
{
    (void)state;
    hx_discovery *d = fake_machine(2, 16, 64 * GiB);
    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_int_equal(s.count, 2);
    assert_int_equal(s.type_is_custom, 1);
    assert_int_equal(s.type.is_cpu, 1);
    assert_string_equal(s.type.name, "cpu");
    assert_true(s.type.memory_bytes < 64 * GiB && s.type.memory_bytes >= 50 * GiB);
    assert_true(s.type.bf16_flops == 16 * 3.0e9 * 32); /* cores x clock x 32 */
    assert_true(s.type.hbm_bytes_per_s == 160e9);       /* 10 GB/s per core */
    assert_int_equal(s.intra_kind, HX_INTRA_NONE);
    assert_true(s.intra_bytes_per_s > 0);
    assert_int_equal(s.nic_speed_known, 0);
    assert_true(s.nic_bytes_per_s == 10e9 / 8);

    /* a cgroup limit lowers the memory per device */
    d->memory_limit_bytes = 16 * GiB;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_true(s.type.memory_bytes < 8 * GiB);

    /* unknown clock: 2.5 GHz; the bandwidth estimate is capped */
    d->cpu_max_hz = 0;
    d->numa[0].cores = d->numa[1].cores = 64;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_true(s.type.bf16_flops == 64 * 2.5e9 * 32);
    assert_true(s.type.hbm_bytes_per_s <= 200e9);

    hx_inventory *inv = load_fragment(d);
    assert_int_equal(inv->hosts[0].gpu_count, 2);
    hx_inventory_free(inv);
    hx_discovery_free(d);
}

static void test_memory_only_numa_node(void **state)
{
    (void)state;
    hx_discovery *d = fake_machine(2, 8, 32 * GiB);
    d->numa[1].cores = d->numa[1].pus = 0; /* e.g. CXL memory */
    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_int_equal(s.count, 1);
    hx_discovery_free(d);
}

static void test_nvlink_gpus(void **state)
{
    (void)state;
    hx_discovery *d = fake_machine(2, 48, 1024 * GiB);
    add_gpus(d, 8, "NVIDIA H100 80GB HBM3", 79.6 * GiB, 18);
    add_nic(d, "eth0", 25e9 / 8, 0);
    add_nic(d, "ib0", 400e9 / 8, 0);
    add_nic(d, "veth1", 1000e9 / 8, 1); /* virtual: ignored while physical ones are known */
    d->rdma_devices = calloc(1, sizeof *d->rdma_devices);
    d->rdma_devices[0] = strdup("mlx5_0");
    d->nrdma = 1;

    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_string_equal(s.type.name, "H100-SXM");
    assert_int_equal(s.type_is_custom, 0);
    assert_int_equal(s.count, 8);
    assert_int_equal(s.intra_kind, HX_INTRA_NVLINK);
    assert_true(s.intra_bytes_per_s == 450e9);
    assert_true(s.nic_bytes_per_s == 400e9 / 8);
    assert_int_equal(s.nic_rdma, 1);

    size_t len;
    char *text = yaml_of(d, &len);
    assert_null(strstr(text, "gpu_types")); /* a catalog type needs no declaration */
    free(text);

    hx_inventory *inv = load_fragment(d);
    const hx_host *h = &inv->hosts[0];
    assert_int_equal(h->gpu_count, 8);
    assert_string_equal(hx_inventory_host_spec(inv, h)->name, "H100-SXM");
    assert_int_equal(h->intra_kind, HX_INTRA_NVLINK);
    assert_true(near(h->intra_bytes_per_s, 450e9, 1e-6));
    assert_true(near(h->nic_bytes_per_s, 400e9 / 8, 1e-6));
    assert_int_equal(h->nic_rdma, 1);
    hx_inventory_free(inv);
    hx_discovery_free(d);
}

static void test_pcie_gpus_mixed(void **state)
{
    (void)state;
    hx_discovery *d = fake_machine(1, 32, 256 * GiB);
    add_gpus(d, 1, "Tesla T4", 15 * GiB, 0);
    add_gpus(d, 2, "NVIDIA L40S", 44.5 * GiB, 0);
    /* one L40S sits on a PCIe 4.0 x16 link */
    d->pci_gpus = calloc(1, sizeof *d->pci_gpus);
    snprintf(d->pci_gpus[0].bus_id, sizeof d->pci_gpus[0].bus_id, "%s", d->gpus[1].bus_id);
    d->pci_gpus[0].link_bytes_per_s = 31.5e9;
    d->pci_gpus[0].numa_node = 0;
    d->npci_gpus = 1;

    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_string_equal(s.type.name, "L40S");
    assert_int_equal(s.count, 2);
    assert_int_equal(s.other_gpus, 1);
    assert_int_equal(s.intra_kind, HX_INTRA_PCIE);
    assert_true(s.intra_bytes_per_s == 31.5e9);

    size_t len;
    char *text = yaml_of(d, &len);
    assert_non_null(strstr(text, "other models left out"));
    free(text);
    hx_inventory *inv = load_fragment(d);
    assert_int_equal(inv->hosts[0].intra_kind, HX_INTRA_PCIE);
    hx_inventory_free(inv);
    hx_discovery_free(d);
}

static void test_unknown_gpu_model(void **state)
{
    (void)state;
    hx_discovery *d = fake_machine(1, 72, 480 * GiB);
    add_gpus(d, 1, "NVIDIA GH200 480GB", 95.0 * GiB, 0);
    d->gpus[0].cc_major = 9;
    d->gpus[0].sm_count = 132;
    d->gpus[0].clock_hz = 1.98e9;
    d->gpus[0].mem_clock_hz = 2.619e9;
    d->gpus[0].mem_bus_width_bits = 5120;
    assert_null(d->gpus[0].catalog_type);

    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_OK);
    assert_int_equal(s.type_is_custom, 1);
    assert_int_equal(s.type.is_cpu, 0);
    assert_string_equal(s.type.name, "GH200-480GB");
    assert_true(s.type.memory_bytes == 95.0 * GiB);
    assert_true(near(s.type.bf16_flops, 132 * 1.98e9 * 4096, 1e-9));
    assert_true(near(s.type.hbm_bytes_per_s, 2 * 2.619e9 * 640, 1e-9));

    hx_inventory *inv = load_fragment(d);
    const hx_gpu_spec *spec = hx_inventory_host_spec(inv, &inv->hosts[0]);
    assert_string_equal(spec->name, "GH200-480GB");
    assert_true(near(spec->memory_bytes, 95.0 * GiB, 0.001));
    assert_true(near(spec->bf16_flops, s.type.bf16_flops, 0.01));
    hx_inventory_free(inv);
    hx_discovery_free(d);
}

static void test_bad_input(void **state)
{
    (void)state;
    hx_discovery_free(NULL);
    hx_discovery *d = fake_machine(1, 4, 8 * GiB);
    free(d->numa);
    d->numa = NULL;
    d->nnuma = 0;
    hx_discover_summary s;
    assert_int_equal(hx_discover_summarize(d, &s), HX_EINVAL);
    assert_null(hx_discover_to_json(d));
    assert_int_equal(hx_discover_write_yaml(d, stdout), HX_EINVAL);
    hx_discovery_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_run_here),
        cmocka_unit_test(test_yaml_here_loads),
        cmocka_unit_test(test_json_here),
        cmocka_unit_test(test_cpu_estimates),
        cmocka_unit_test(test_memory_only_numa_node),
        cmocka_unit_test(test_nvlink_gpus),
        cmocka_unit_test(test_pcie_gpus_mixed),
        cmocka_unit_test(test_unknown_gpu_model),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
