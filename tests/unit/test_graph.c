/*
 * test_graph.c - bandwidth and latency of paths in the device graph.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "topo/graph.h"

static hx_inventory *load(const char *text)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    if (hx_inventory_load_string(text, strlen(text), "g.yaml", &inv, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "  ");
        fail_msg("inventory does not load");
    }
    hx_diags_release(&d);
    return inv;
}

static const char *cluster =
    "hosts:\n"
    "  - {name: h0, address: a, gpus: {type: H100, count: 8}, intra: {kind: nvlink, bandwidth: "
    "450GB/s}, nic: {bandwidth: 400Gb/s, rdma: true}, switch: s1}\n"
    "  - {name: h1, address: b, gpus: {type: H100, count: 8}, intra: {kind: nvlink, bandwidth: "
    "450GB/s}, nic: {bandwidth: 400Gb/s, rdma: true}, switch: s1}\n"
    "  - {name: l0, address: c, gpus: {type: L40S, count: 4}, intra: {kind: pcie, bandwidth: "
    "32GB/s}, nic: {bandwidth: 100Gb/s}, switch: s2}\n"
    "  - {name: l1, address: d, gpus: {type: L40S, count: 4}, nic: {bandwidth: 100Gb/s}, "
    "switch: s2}\n"
    "  - {name: x, address: e, gpus: {type: A6000, count: 1}, nic: {bandwidth: 200Gb/s}}\n"
    "network:\n"
    "  switches:\n    - {name: s1, uplink: 800Gb/s}\n    - {name: s2, uplink: 40Gb/s}\n"
    "  links:\n    - {a: l1, b: l0, bandwidth: 25Gb/s, latency: 30us}\n";

static void paths(void **state)
{
    (void)state;
    hx_inventory *inv = load(cluster);
    hx_graph *g = NULL;
    assert_int_equal(hx_graph_new(inv, &g), HX_OK);
    assert_int_equal(hx_graph_num_devices(g), 25);
    assert_int_equal(hx_graph_device_host(g, 0), 0);
    assert_int_equal(hx_graph_device_host(g, 15), 1);
    assert_int_equal(hx_graph_device_host(g, 16), 2);
    assert_int_equal(hx_graph_device_host(g, 24), 4);
    assert_string_equal(hx_graph_device_spec(g, 20)->name, "L40S");

    /* a device to itself: its memory */
    hx_path p = hx_graph_path(g, 3, 3);
    assert_int_equal(p.bottleneck, HX_HOP_SELF);
    assert_true(p.bytes_per_s == hx_graph_device_spec(g, 3)->hbm_bytes_per_s);

    /* same host: the intra link */
    p = hx_graph_path(g, 0, 7);
    assert_true(p.bytes_per_s == 450e9);
    assert_int_equal(p.bottleneck, HX_HOP_INTRA);
    assert_true(p.latency_s > 0 && p.latency_s < 5e-6);
    assert_true(hx_graph_bandwidth(g, 16, 17) == 32e9);
    assert_true(hx_graph_latency(g, 16, 17) > hx_graph_latency(g, 0, 1));

    /* same switch: the NICs; RDMA lowers latency */
    p = hx_graph_path(g, 0, 8);
    assert_true(p.bytes_per_s == 50e9);
    assert_int_equal(p.bottleneck, HX_HOP_NIC);
    double rdma_lat = p.latency_s;

    /* different switches: the narrowest of NICs and uplinks */
    p = hx_graph_path(g, 0, 16);
    assert_true(p.bytes_per_s == 5e9); /* s2's 40 Gb/s uplink */
    assert_int_equal(p.bottleneck, HX_HOP_UPLINK);
    assert_int_equal(p.bottleneck_index, 1);
    assert_true(p.latency_s > rdma_lat);

    /* no switch vs a switch: that switch's uplink */
    p = hx_graph_path(g, 24, 0);
    assert_true(p.bytes_per_s == 25e9); /* x's 200 Gb/s NIC is narrower than s1's 800 */
    assert_int_equal(p.bottleneck, HX_HOP_NIC);
    assert_int_equal(p.bottleneck_index, 4);

    /* an explicit link overrides the switch path */
    p = hx_graph_path(g, 16, 20);
    assert_true(p.bytes_per_s == 25e9 / 8);
    assert_int_equal(p.bottleneck, HX_HOP_LINK);
    assert_true(fabs(p.latency_s - 30e-6) < 1e-9);

    /* symmetric */
    for (int a = 0; a < 25; a += 3)
        for (int b = 0; b < 25; b += 2) {
            hx_path x = hx_graph_path(g, a, b), y = hx_graph_path(g, b, a);
            assert_true(x.bytes_per_s == y.bytes_per_s);
            assert_true(x.latency_s == y.latency_s);
        }

    assert_true(isinf(hx_graph_switch_bandwidth(g, 0, 0)));
    assert_true(hx_graph_switch_bandwidth(g, 0, 1) == 5e9);
    assert_true(hx_graph_switch_bandwidth(g, 0, -1) == 100e9);
    assert_string_equal(hx_hop_kind_name(HX_HOP_UPLINK), "switch uplink");
    hx_graph_free(g);
    hx_inventory_free(inv);
}

/* 4096 devices in 512 hosts on 16 switches: builds and answers without dense state. */
static void large_cluster(void **state)
{
    (void)state;
    size_t cap = 1 << 20, len = 0;
    char *t = malloc(cap);
    assert_non_null(t);
    const char *types[] = {"H100-SXM", "A100-80G", "L40S", "A6000"};
    len += (size_t)snprintf(t + len, cap - len, "hosts:\n");
    for (int h = 0; h < 512; h++)
        len += (size_t)snprintf(t + len, cap - len,
                                "  - {name: n%d, address: 10.0.%d.%d, gpus: {type: %s, count: 8}, "
                                "switch: s%d}\n",
                                h, h / 256, h % 256, types[(h / 32) % 4], h / 32);
    len += (size_t)snprintf(t + len, cap - len, "network:\n  switches:\n");
    for (int s = 0; s < 16; s++)
        len += (size_t)snprintf(t + len, cap - len, "    - {name: s%d, uplink: 1600Gb/s}\n", s);
    hx_inventory *inv = load(t);
    free(t);
    hx_graph *g = NULL;
    assert_int_equal(hx_graph_new(inv, &g), HX_OK);
    assert_int_equal(hx_graph_num_devices(g), 4096);
    double sum = 0;
    for (int a = 0; a < 4096; a += 7)
        for (int b = 0; b < 4096; b += 13)
            sum += hx_graph_bandwidth(g, a, b);
    assert_true(sum > 0);
    assert_int_equal(hx_graph_device_host(g, 4095), 511);
    hx_graph_free(g);
    hx_inventory_free(inv);
}

static void free_null(void **state)
{
    (void)state;
    hx_graph_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(paths),
        cmocka_unit_test(large_cluster),
        cmocka_unit_test(free_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
