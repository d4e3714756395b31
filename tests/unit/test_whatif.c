/*
 * test_whatif.c - scenarios: parsing, applying changes, and what they do.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "planner/whatif.h"

static hx_inventory *load_mixed(void)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/mixed.yaml", HX_SOURCE_DIR);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    assert_int_equal(hx_inventory_load(path, &inv, &d), HX_OK);
    hx_diags_release(&d);
    return inv;
}

static void parse_add(void **state)
{
    (void)state;
    hx_whatif_change c;
    hx_err e = {0};
    assert_int_equal(hx_whatif_parse_add("h100-c:H100-SXM:8@tor-a", &c, &e), HX_OK);
    assert_string_equal(c.name, "h100-c");
    assert_string_equal(c.type, "H100-SXM");
    assert_int_equal(c.count, 8);
    assert_string_equal(c.switch_name, "tor-a");
    assert_int_equal(c.remove, 0);
    assert_int_equal(hx_whatif_parse_add("x:L4:2", &c, &e), HX_OK);
    assert_string_equal(c.switch_name, "");
    const char *bad[] = {"x:L4", "x:L4:0", "x:L4:two", ":L4:2", "x::2", "x:L4:2@", "a b:L4:2",
                         "x:L4:2:3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (hx_whatif_parse_add(bad[i], &c, &e) != HX_EINVAL)
            fail_msg("'%s' parsed", bad[i]);
        assert_non_null(strstr(e.msg, "--add"));
    }
}

static void apply_changes(void **state)
{
    (void)state;
    hx_inventory *inv = load_mixed(), *out = NULL;
    hx_err e = {0};
    hx_whatif_change ch[2];
    assert_int_equal(hx_whatif_parse_add("h100-c:H100:8@tor-a", &ch[0], &e), HX_OK);
    memset(&ch[1], 0, sizeof ch[1]);
    ch[1].remove = 1;
    snprintf(ch[1].name, sizeof ch[1].name, "l40s"); /* a type: every L40S host */
    assert_int_equal(hx_whatif_apply(inv, ch, 2, &out, &e), HX_OK);
    assert_int_equal(out->ndevices, 48 + 8 - 16);
    int h = hx_inventory_find_host(out, "h100-c");
    assert_true(h >= 0);
    /* copies its siblings' links */
    assert_int_equal(out->hosts[h].intra_kind, HX_INTRA_NVLINK);
    assert_true(out->hosts[h].nic_bytes_per_s == 50e9);
    assert_string_equal(out->switches[out->hosts[h].switch_index].name, "tor-a");
    assert_int_equal(hx_inventory_find_host(out, "l40s-a"), -1);
    hx_inventory_free(out);

    /* removing a host drops the measured links that name it */
    memset(&ch[0], 0, sizeof ch[0]);
    ch[0].remove = 1;
    snprintf(ch[0].name, sizeof ch[0].name, "a100-b");
    assert_int_equal(hx_whatif_apply(inv, ch, 1, &out, &e), HX_OK);
    assert_int_equal(out->nlinks, 0);
    hx_inventory_free(out);

    /* errors */
    snprintf(ch[0].name, sizeof ch[0].name, "nope");
    assert_int_equal(hx_whatif_apply(inv, ch, 1, &out, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "--remove nope"));
    assert_int_equal(hx_whatif_parse_add("h100-a:H100:8", &ch[0], &e), HX_OK);
    assert_int_equal(hx_whatif_apply(inv, ch, 1, &out, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "exists already"));
    assert_int_equal(hx_whatif_parse_add("n:H100:8@tor-z", &ch[0], &e), HX_OK);
    assert_int_equal(hx_whatif_apply(inv, ch, 1, &out, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "unknown switch 'tor-z'"));
    assert_int_equal(hx_whatif_parse_add("n:H10:8", &ch[0], &e), HX_OK);
    assert_int_equal(hx_whatif_apply(inv, ch, 1, &out, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "unknown device type 'H10'"));
    hx_whatif_change all[3];
    const char *types[] = {"H100-SXM", "A100-80G", "L40S"};
    for (int i = 0; i < 3; i++) {
        memset(&all[i], 0, sizeof all[i]);
        all[i].remove = 1;
        snprintf(all[i].name, sizeof all[i].name, "%s", types[i]);
    }
    assert_int_equal(hx_whatif_apply(inv, all, 3, &out, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "no hosts would be left"));
    hx_inventory_free(inv);
}

static void adding_never_lowers_throughput(void **state)
{
    (void)state;
    hx_inventory *inv = load_mixed();
    hx_model m;
    hx_err e = {0};
    char path[1024];
    snprintf(path, sizeof path, "%s/models/llama-2-13b", HX_SOURCE_DIR);
    assert_int_equal(hx_model_load(path, &m, &e), HX_OK);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_whatif_opts wo;
    memset(&wo, 0, sizeof wo);
    hx_search_opts_default(&wo.search);
    wo.sim_seconds = 20;
    hx_whatif_result cur, more;
    assert_int_equal(hx_whatif_evaluate("current", inv, &m, &wl, &cp, &wo, NULL, &cur), HX_OK);
    assert_true(cur.ok);
    assert_true(cur.goodput_rps > 0 && cur.usd_per_hour > 0);
    const char *adds[] = {"x1:L4:1", "x2:A10:2@tor-c", "x3:H100-SXM:8@tor-a", "x4:T4:1"};
    for (size_t i = 0; i < sizeof adds / sizeof adds[0]; i++) {
        hx_whatif_change ch;
        assert_int_equal(hx_whatif_parse_add(adds[i], &ch, &e), HX_OK);
        hx_inventory *grown = NULL;
        assert_int_equal(hx_whatif_apply(inv, &ch, 1, &grown, &e), HX_OK);
        assert_int_equal(hx_whatif_evaluate(adds[i], grown, &m, &wl, &cp, &wo, cur.plan, &more),
                         HX_OK);
        assert_true(more.ok);
        if (more.plan_rps < cur.plan_rps * (1 - 1e-9))
            fail_msg("%s lowered the planned throughput: %.6g < %.6g", adds[i], more.plan_rps,
                     cur.plan_rps);
        hx_whatif_result_release(&more);
        hx_inventory_free(grown);
    }

    /* the advisor stays within the budget and adds throughput */
    hx_whatif_result opts[3];
    int n = 0;
    assert_int_equal(hx_whatif_budget(inv, &m, &wl, &cp, &wo, &cur, 12.0, opts, 3, &n, &e),
                     HX_OK);
    assert_true(n >= 1);
    for (int i = 0; i < n; i++) {
        assert_true(opts[i].ok);
        assert_true(opts[i].usd_per_hour <= cur.usd_per_hour + 12.0 + 1e-6);
        assert_true(opts[i].plan_rps >= cur.plan_rps * (1 - 1e-9));
        assert_null(strstr(opts[i].name, "MI300X"));
        hx_whatif_result_release(&opts[i]);
    }
    assert_int_equal(hx_whatif_budget(inv, &m, &wl, &cp, &wo, &cur, 0, opts, 3, &n, &e),
                     HX_EINVAL);
    hx_whatif_result_release(&cur);
    hx_cost_params_release(&cp);
    hx_inventory_free(inv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parse_add),
        cmocka_unit_test(apply_changes),
        cmocka_unit_test(adding_never_lowers_throughput),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
