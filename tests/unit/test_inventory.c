/*
 * test_inventory.c - inventory loading and every validation rule.
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

#include "topo/inventory.h"

/* Loads `text`; asserts failure and that every needle appears in the diagnostics. */
static void expect_errors(const char *text, size_t len, const char *const *needles)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    hx_status st = hx_inventory_load_string(text, len, "inv.yaml", &inv, &d);
    if (st == HX_OK || inv) {
        print_error("expected the inventory to be rejected:\n%s\n", text);
        hx_inventory_free(inv);
        fail();
    }
    assert_int_equal(st, HX_EPARSE);
    assert_true(d.count > 0);
    for (const char *const *n = needles; *n; n++) {
        if (!hx_diags_contains(&d, *n)) {
            print_error("missing '%s' in diagnostics:\n", *n);
            hx_diags_print(&d, stderr, "  ");
            fail();
        }
    }
    hx_diags_release(&d);
}

#define EXPECT(text, ...)                                                                  \
    do {                                                                                   \
        static const char *const needles_[] = {__VA_ARGS__, NULL};                         \
        expect_errors(text, strlen(text), needles_);                                       \
    } while (0)

static hx_inventory *load_ok(const char *text)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    hx_status st = hx_inventory_load_string(text, strlen(text), "ok.yaml", &inv, &d);
    if (st != HX_OK) {
        hx_diags_print(&d, stderr, "  ");
        fail_msg("expected the inventory to load");
    }
    assert_int_equal(d.count, 0);
    hx_diags_release(&d);
    return inv;
}

#define HOST1 "hosts:\n  - name: a\n    address: 10.0.0.1\n    gpus: {type: H100-SXM, count: 8}\n"

/* --- rules -------------------------------------------------------------- */

static void yaml_syntax_error(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - name: a\n    address: [10.0.0.1\n", "inv.yaml:", "yaml: ");
    /* the position is that of the problem, not line 0 */
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    const char *t = "name: x\nhosts:\n  - name: a\n   bad: indentation\n";
    assert_int_equal(hx_inventory_load_string(t, strlen(t), "inv.yaml", &inv, &d), HX_EPARSE);
    assert_true(d.count >= 1);
    assert_true(d.items[0].line >= 3);
    hx_diags_release(&d);
}

static void not_a_mapping(void **state)
{
    (void)state;
    EXPECT("- a\n- b\n", "inv.yaml:1:3:", "the document is a list; expected a mapping");
    EXPECT("just a string\n", "the document is a scalar; expected a mapping");
    EXPECT("", "the inventory is empty");
    EXPECT("# only a comment\n", "the inventory is empty");
}

static void binary_garbage(void **state)
{
    (void)state;
    static const char nul[] = "name: x\nhosts:\n  - na\0me: a\n";
    static const char *const n1[] = {"inv.yaml:3:7:", "not a text file", "NUL", NULL};
    expect_errors(nul, sizeof nul - 1, n1);
    static const char bad[] = "name: \xff\xfe\x01\x02\n";
    static const char *const n2[] = {"inv.yaml:1:7:", "not valid UTF-8", NULL};
    expect_errors(bad, sizeof bad - 1, n2);
}

static void unknown_fields(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - name: a\n    adress: 10.0.0.1\n    gpus: {type: L4, count: 1}\n",
           "inv.yaml:3:5: hosts[0].adress: unknown field; did you mean 'address'?");
    EXPECT("hostz: []\n", "hostz: unknown field; did you mean 'hosts'?");
    EXPECT(HOST1 "frobnicate: 1\n", "frobnicate: unknown field; expected one of name");
}

static void missing_or_empty_hosts(void **state)
{
    (void)state;
    EXPECT("name: x\n", "hosts: missing");
    EXPECT("hosts: []\n", "hosts: is empty; expected at least one host");
    EXPECT("hosts: {a: 1}\n", "hosts: is a mapping; expected a list of hosts");
    EXPECT("hosts:\n  - just-a-name\n", "hosts[0]: is a scalar; expected a mapping");
}

static void unknown_gpu_type(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - name: a\n    address: x\n    gpus: {type: H10, count: 8}\n",
           "inv.yaml:4:18: hosts[0].gpus.type: unknown GPU type 'H10'; did you mean",
           "H100-SXM");
    EXPECT("hosts:\n  - name: a\n    address: x\n    gpus: {type: zzzzzzzz, count: 8}\n",
           "unknown GPU type 'zzzzzzzz'; expected a catalog type");
    /* a type declared in gpu_types is suggested too */
    EXPECT("gpu_types:\n  - {name: myaccel, memory: 16GiB, bf16_tflops: 10, hbm_bandwidth: "
           "100GB/s}\nhosts:\n  - {name: a, address: x, gpus: {type: myacel, count: 1}}\n",
           "did you mean", "myaccel");
}

static void gpu_types_rules(void **state)
{
    (void)state;
    EXPECT("gpu_types:\n  - {name: newgpu, memory: 16GiB}\n" HOST1,
           "gpu_types[0].bf16_tflops: missing", "gpu_types[0].hbm_bandwidth: missing");
    EXPECT("gpu_types:\n  - {name: g, memory: 1GiB, bf16_tflops: 1, hbm_bandwidth: 1GB/s}\n"
           "  - {name: g, memory: 1GiB, bf16_tflops: 1, hbm_bandwidth: 1GB/s}\n" HOST1,
           "gpu_types[1].name: GPU type 'g' is declared twice");
    EXPECT("gpu_types:\n  - {memory: 1GiB}\n" HOST1, "gpu_types[0].name: missing");
    EXPECT("gpu_types:\n  - {name: g, memory: 0GiB, bf16_tflops: 1, hbm_bandwidth: 1GB/s}\n"
           HOST1, "gpu_types[0].memory: '0GiB' must be greater than zero");
    EXPECT("gpu_types: {name: g}\n" HOST1, "gpu_types: is a mapping; expected a list");
}

static void duplicate_hosts(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - {name: a, address: x, gpus: {type: L4, count: 1}}\n"
           "  - {name: b, address: y, gpus: {type: L4, count: 1}}\n"
           "  - {name: a, address: z, gpus: {type: L4, count: 1}}\n",
           "inv.yaml:4:12: hosts[2].name: duplicate host name 'a' (first defined on line 2)");
}

static void counts(void **state)
{
    (void)state;
    const char *bad[] = {"0", "-1", "2.5", "eight", "1e3", "99999", "''"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[256];
        snprintf(text, sizeof text,
                 "hosts:\n  - name: a\n    address: x\n    gpus: {type: L4, count: %s}\n",
                 bad[i]);
        EXPECT(text, "hosts[0].gpus.count:", "is not a positive whole number of devices");
    }
    EXPECT("hosts:\n  - name: a\n    address: x\n    gpus: {type: L4}\n",
           "hosts[0].gpus.count: missing");
    EXPECT("hosts:\n  - name: a\n    address: x\n    gpus: {type: L4, count: [8]}\n",
           "hosts[0].gpus.count: is a list");
    EXPECT("hosts:\n  - name: a\n    address: x\n", "hosts[0].gpus: missing");
}

static void malformed_units(void **state)
{
    (void)state;
    EXPECT(HOST1 "    nic: {bandwidth: 100Gbx}\n",
           "inv.yaml:5:22: hosts[0].nic.bandwidth: '100Gbx' is not a bandwidth; expected");
    EXPECT(HOST1 "    nic: {bandwidth: 100}\n", "'100' is not a bandwidth");
    EXPECT(HOST1 "    intra: {kind: nvlink, bandwidth: fast}\n",
           "hosts[0].intra.bandwidth: 'fast' is not a bandwidth");
    EXPECT("gpu_types:\n  - {name: g, memory: 80 gigs, bf16_tflops: 1, hbm_bandwidth: 1GB/s}\n"
           HOST1, "gpu_types[0].memory: '80 gigs' is not a size");
    EXPECT("gpu_types:\n  - {name: g, memory: 8GiB, bf16_tflops: lots, hbm_bandwidth: 1GB/s}\n"
           HOST1, "gpu_types[0].bf16_tflops: 'lots' is not a compute rate");
    EXPECT("gpu_types:\n  - {name: L4, price_per_hour: $abc}\n" HOST1,
           "gpu_types[0].price_per_hour: '$abc' is not a price");
    EXPECT(HOST1 "  - {name: b, address: y, gpus: {type: L4, count: 1}}\n"
                 "network:\n  links:\n    - {a: a, b: b, bandwidth: 10Gb/s, latency: 3 parsecs}\n",
           "network.links[0].latency: '3 parsecs' is not a duration");
    EXPECT(HOST1 "    nic: {bandwidth: -5Gb/s}\n", "'-5Gb/s' is not a bandwidth");
}

static void missing_address(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - name: a\n    gpus: {type: L4, count: 1}\n",
           "inv.yaml:2:5: hosts[0].address: missing; expected the host's IP address");
    EXPECT("hosts:\n  - name: a\n    address: ''\n    gpus: {type: L4, count: 1}\n",
           "hosts[0].address: is empty");
}

static void host_names(void **state)
{
    (void)state;
    EXPECT("hosts:\n  - {name: 'a:b', address: x, gpus: {type: L4, count: 1}}\n",
           "hosts[0].name: 'a:b' is not a valid host name");
    EXPECT("hosts:\n  - {address: x, gpus: {type: L4, count: 1}}\n", "hosts[0].name: missing");
}

static void links_and_switches(void **state)
{
    (void)state;
    const char *two = "hosts:\n  - {name: alpha, address: x, gpus: {type: L4, count: 1}}\n"
                      "  - {name: beta, address: y, gpus: {type: L4, count: 1}, switch: s1}\n";
    char text[1024];

    snprintf(text, sizeof text, "%snetwork:\n  links:\n    - {a: alpha, b: gamma, bandwidth: "
                                "10Gb/s}\n",
             two);
    EXPECT(text, "network.links[0].b: unknown host 'gamma'");
    snprintf(text, sizeof text,
             "%snetwork:\n  links:\n    - {a: alpah, b: beta, bandwidth: 10Gb/s}\n", two);
    EXPECT(text, "unknown host 'alpah'; did you mean 'alpha'?");
    snprintf(text, sizeof text,
             "%snetwork:\n  links:\n    - {a: alpha, b: alpha, bandwidth: 10Gb/s}\n", two);
    EXPECT(text, "link joins host 'alpha' to itself");
    snprintf(text, sizeof text,
             "%snetwork:\n  links:\n    - {a: alpha, b: beta, bandwidth: 10Gb/s}\n"
             "    - {a: beta, b: alpha, bandwidth: 20Gb/s}\n",
             two);
    EXPECT(text, "network.links[1]: a link between 'alpha' and 'beta' is already given");
    snprintf(text, sizeof text, "%snetwork:\n  links:\n    - {a: alpha, b: beta}\n", two);
    EXPECT(text, "network.links[0].bandwidth: missing");

    /* host names an undeclared switch */
    EXPECT(two, "hosts[1].switch: unknown switch 's1'");
    snprintf(text, sizeof text, "%snetwork:\n  switches:\n    - {name: s2}\n", two);
    EXPECT(text, "unknown switch 's1'; did you mean 's2'?");
    /* switch lists an unknown host */
    snprintf(text, sizeof text,
             "%snetwork:\n  switches:\n    - {name: s1, hosts: [beta, delta]}\n", two);
    EXPECT(text, "network.switches[0].hosts[1]: unknown host 'delta'");
    /* host on two switches */
    snprintf(text, sizeof text,
             "%snetwork:\n  switches:\n    - {name: s1}\n    - {name: s2, hosts: [beta]}\n",
             two);
    EXPECT(text, "host 'beta' is on switch 's1' in 'hosts'");
    snprintf(text, sizeof text,
             "%snetwork:\n  switches:\n    - {name: s1}\n    - {name: s1}\n", two);
    EXPECT(text, "switch 's1' is declared twice");
    snprintf(text, sizeof text, "%snetwork:\n  switches: {name: s1}\n", two);
    EXPECT(text, "network.switches: is a mapping; expected a list");
}

static void field_values(void **state)
{
    (void)state;
    EXPECT(HOST1 "    intra: {kind: infiniband}\n",
           "hosts[0].intra.kind: 'infiniband' is not a link kind; expected nvlink, pcie or none");
    EXPECT(HOST1 "    nic: {rdma: maybe}\n", "hosts[0].nic.rdma: 'maybe' is not a boolean");
    EXPECT("defaults:\n  ssh: {port: 70000}\n" HOST1,
           "defaults.ssh.port: '70000' is not a TCP port number");
    EXPECT(HOST1 "    ssh: {user: [a]}\n", "hosts[0].ssh.user: is a list; expected a string");
}

static void all_errors_in_one_pass(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    const char *t = "hosts:\n  - {name: a, gpus: {type: L4, count: 0}}\n"
                    "  - {name: a, address: y, gpus: {type: H1OO, count: 2}}\n";
    assert_int_equal(hx_inventory_load_string(t, strlen(t), "inv.yaml", &inv, &d), HX_EPARSE);
    assert_null(inv);
    assert_true(d.count >= 4); /* address, count, duplicate, type */
    hx_diags_release(&d);
}

static void missing_file(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    assert_int_equal(hx_inventory_load("/nonexistent/x.yaml", &inv, &d), HX_ENOENT);
    assert_true(hx_diags_contains(&d, "cannot open inventory '/nonexistent/x.yaml': no such file"));
    hx_diags_release(&d);
    hx_diags_init(&d);
    assert_int_equal(hx_inventory_load("/", &inv, &d), HX_EINVAL);
    assert_true(hx_diags_contains(&d, "is a directory"));
    hx_diags_release(&d);
}

/* --- valid inventories -------------------------------------------------- */

static void defaults_and_overrides(void **state)
{
    (void)state;
    hx_inventory *inv = load_ok(
        "name: test\n"
        "defaults:\n  ssh: {user: ops, port: 2222, identity: /k}\n  workdir: /w\n"
        "gpu_types:\n  - {name: L40S, price_per_hour: $0.99/h}\n"
        "  - {name: acc, memory: 16GiB, bf16_tflops: 50, hbm_bandwidth: 400GB/s}\n"
        "hosts:\n"
        "  - {name: a, address: 10.0.0.1, gpus: {type: l40s, count: 4}}\n"
        "  - name: b\n    address: local\n    ssh: {port: 22}\n    workdir: /other\n"
        "    gpus: {type: acc, count: 2}\n    intra: {kind: nvlink}\n"
        "    nic: {bandwidth: 25GB/s, rdma: yes}\n");
    assert_string_equal(inv->name, "test");
    assert_int_equal(inv->nhosts, 2);
    assert_int_equal(inv->ndevices, 6);
    const hx_host *a = &inv->hosts[0], *b = &inv->hosts[1];
    assert_string_equal(a->ssh.user, "ops");
    assert_int_equal(a->ssh.port, 2222);
    assert_string_equal(a->workdir, "/w");
    assert_int_equal(b->ssh.port, 22);
    assert_string_equal(b->ssh.user, "ops");
    assert_string_equal(b->workdir, "/other");
    assert_true(b->is_local);
    assert_false(a->is_local);
    /* L40S keeps catalog figures with the overridden price */
    const hx_gpu_spec *s = hx_inventory_host_spec(inv, a);
    assert_string_equal(s->name, "L40S");
    assert_true(s->usd_per_hour > 0.98 && s->usd_per_hour < 1.0);
    assert_true(s->memory_bytes > 40e9);
    const hx_gpu_spec *acc = hx_inventory_host_spec(inv, b);
    assert_string_equal(acc->name, "acc");
    assert_true(acc->bf16_flops == 50e12);
    assert_true(acc->hbm_bytes_per_s == 400e9);
    assert_int_equal(acc->usd_per_hour, 0);
    /* defaults for unstated links */
    assert_int_equal(a->intra_kind, HX_INTRA_PCIE);
    assert_true(a->intra_bytes_per_s == HX_DEFAULT_PCIE_BYTES_PER_S);
    assert_true(a->nic_bytes_per_s == HX_DEFAULT_NIC_BYTES_PER_S);
    assert_int_equal(b->intra_kind, HX_INTRA_NVLINK);
    assert_true(b->intra_bytes_per_s == HX_DEFAULT_NVLINK_BYTES_PER_S);
    assert_true(b->nic_bytes_per_s == 25e9);
    assert_true(b->nic_rdma);
    hx_inventory_free(inv);
}

static void devices_and_links(void **state)
{
    (void)state;
    hx_inventory *inv = load_ok(
        "hosts:\n"
        "  - {name: a, address: x, gpus: {type: H100, count: 8}, switch: s1}\n"
        "  - {name: b, address: y, gpus: {type: A6000, count: 2}}\n"
        "  - {name: c, address: z, gpus: {type: L4, count: 1}}\n"
        "network:\n  switches:\n    - {name: s1, uplink: 800Gb/s}\n"
        "    - {name: s2, hosts: [b, c]}\n"
        "  links:\n    - {a: c, b: a, bandwidth: 10Gb/s, latency: 15us}\n"
        "    - {a: b, b: a, bandwidth: 20Gb/s}\n");
    assert_int_equal(inv->ndevices, 11);
    char buf[64];
    assert_string_equal(hx_inventory_device_name(inv, 0, buf, sizeof buf), "a:0");
    assert_string_equal(hx_inventory_device_name(inv, 7, buf, sizeof buf), "a:7");
    assert_string_equal(hx_inventory_device_name(inv, 8, buf, sizeof buf), "b:0");
    assert_string_equal(hx_inventory_device_name(inv, 10, buf, sizeof buf), "c:0");
    int local = -1;
    assert_int_equal(hx_inventory_device_host(inv, 9, &local), 1);
    assert_int_equal(local, 1);
    assert_int_equal(hx_inventory_device_host(inv, 11, NULL), -1);
    assert_int_equal(inv->hosts[0].switch_index, 0);
    assert_int_equal(inv->hosts[1].switch_index, 1);
    assert_int_equal(inv->hosts[2].switch_index, 1);
    assert_true(inv->switches[0].uplink_bytes_per_s == 100e9);
    const hx_link *l = hx_inventory_find_link(inv, 2, 0);
    assert_non_null(l);
    assert_int_equal(l->host_a, 0);
    assert_int_equal(l->host_b, 2);
    assert_true(l->bytes_per_s == 1.25e9);
    assert_true(l->latency_s > 14e-6 && l->latency_s < 16e-6);
    assert_non_null(hx_inventory_find_link(inv, 0, 1));
    assert_null(hx_inventory_find_link(inv, 1, 2));
    assert_string_equal(hx_inventory_host_spec(inv, &inv->hosts[0])->name, "H100-SXM");
    assert_int_equal(hx_inventory_find_host(inv, "c"), 2);
    assert_int_equal(hx_inventory_find_host(inv, "d"), -1);
    hx_inventory_free(inv);
}

static void shipped_examples_load(void **state)
{
    (void)state;
    const char *files[] = {"mixed.yaml", "h100-32.yaml", "localhost.yaml"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/inventories/%s", HX_SOURCE_DIR, files[i]);
        hx_diags d;
        hx_diags_init(&d);
        hx_inventory *inv = NULL;
        if (hx_inventory_load(path, &inv, &d) != HX_OK) {
            hx_diags_print(&d, stderr, "  ");
            fail_msg("%s does not load", path);
        }
        assert_true(inv->ndevices > 0);
        hx_inventory_free(inv);
        hx_diags_release(&d);
    }
}

/* The JSON form reads back as the same inventory. */
static void json_round_trip(void **state)
{
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/mixed.yaml", HX_SOURCE_DIR);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *a = NULL, *b = NULL;
    assert_int_equal(hx_inventory_load(path, &a, &d), HX_OK);
    json_t *j = hx_inventory_to_json(a, NULL);
    assert_non_null(j);
    char *text = json_dumps(j, 0);
    if (hx_inventory_load_string(text, strlen(text), "rt.json", &b, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "  ");
        fail_msg("the JSON form does not load");
    }
    assert_int_equal(a->nhosts, b->nhosts);
    assert_int_equal(a->ndevices, b->ndevices);
    assert_int_equal(a->nswitches, b->nswitches);
    assert_int_equal(a->nlinks, b->nlinks);
    for (size_t h = 0; h < a->nhosts; h++) {
        const hx_host *x = &a->hosts[h], *y = &b->hosts[h];
        assert_string_equal(x->name, y->name);
        assert_string_equal(x->address, y->address);
        assert_int_equal(x->gpu_count, y->gpu_count);
        assert_int_equal(x->intra_kind, y->intra_kind);
        assert_true(x->intra_bytes_per_s == y->intra_bytes_per_s);
        assert_true(x->nic_bytes_per_s == y->nic_bytes_per_s);
        assert_int_equal(x->nic_rdma, y->nic_rdma);
        assert_int_equal(x->switch_index, y->switch_index);
        const hx_gpu_spec *sx = hx_inventory_host_spec(a, x), *sy = hx_inventory_host_spec(b, y);
        assert_string_equal(sx->name, sy->name);
        assert_true(fabs(sx->bf16_flops - sy->bf16_flops) <= 1e-6 * sx->bf16_flops);
        assert_true(sx->memory_bytes == sy->memory_bytes);
        assert_true(sx->usd_per_hour == sy->usd_per_hour);
    }
    assert_true(a->links[0].latency_s == b->links[0].latency_s);
    free(text);
    json_decref(j);
    /* a subset of hosts, and only the links between them */
    unsigned char keep[8] = {0, 0, 1, 0, 0, 0, 0, 1};
    j = hx_inventory_to_json(a, keep);
    assert_int_equal(json_array_size(json_object_get(j, "hosts")), 2);
    assert_int_equal(json_array_size(json_object_get(json_object_get(j, "network"), "links")),
                     0);
    json_decref(j);
    hx_inventory_free(a);
    hx_inventory_free(b);
    hx_diags_release(&d);
}

static void free_null(void **state)
{
    (void)state;
    hx_inventory_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(yaml_syntax_error),
        cmocka_unit_test(not_a_mapping),
        cmocka_unit_test(binary_garbage),
        cmocka_unit_test(unknown_fields),
        cmocka_unit_test(missing_or_empty_hosts),
        cmocka_unit_test(unknown_gpu_type),
        cmocka_unit_test(gpu_types_rules),
        cmocka_unit_test(duplicate_hosts),
        cmocka_unit_test(counts),
        cmocka_unit_test(malformed_units),
        cmocka_unit_test(missing_address),
        cmocka_unit_test(host_names),
        cmocka_unit_test(links_and_switches),
        cmocka_unit_test(field_values),
        cmocka_unit_test(all_errors_in_one_pass),
        cmocka_unit_test(missing_file),
        cmocka_unit_test(defaults_and_overrides),
        cmocka_unit_test(devices_and_links),
        cmocka_unit_test(shipped_examples_load),
        cmocka_unit_test(json_round_trip),
        cmocka_unit_test(free_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
