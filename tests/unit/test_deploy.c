/* test_deploy.c - the processes of a plan: numbering, ports, leaders, layouts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "planner/plan.h"
#include "runtime/deploy.h"

static hx_plan *plan_of(const char *text)
{
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    assert_non_null(root);
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    hx_status st = hx_plan_from_json(root, "plan.json", &p, &d);
    if (st != HX_OK) {
        char line[512];
        hx_diags_format(&d, 0, line, sizeof line);
        fail_msg("plan: %s", line);
    }
    hx_diags_release(&d);
    json_decref(root);
    return p;
}

static const char TWO_HOSTS[] =
    "{\"schema\": \"hexflow.plan/1\","
    " \"hosts\": [{\"name\": \"a\", \"address\": \"10.0.0.1\"}, {\"name\": \"b\", \"address\": \"local\"}],"
    " \"router\": {\"host\": \"b\", \"port\": %d},"
    " \"groups\": ["
    "  {\"id\": \"p0\", \"role\": \"prefill\", \"stages\": ["
    "     {\"first_layer\": 0, \"num_layers\": 1, \"devices\": [\"a:0\", \"a:1\"]},"
    "     {\"first_layer\": 1, \"num_layers\": 3, \"devices\": [\"a:2\"]}]},"
    "  {\"id\": \"d0\", \"role\": \"decode\", \"stages\": ["
    "     {\"first_layer\": 0, \"num_layers\": 4, \"devices\": [\"b:0\", \"b:1\"]}]}],"
    " \"routes\": [{\"prefill\": \"p0\", \"decode\": \"d0\"}]}";

static hx_plan *plan_with_port(int port)
{
    char text[2048];
    const char *at = strstr(TWO_HOSTS, "%d");
    snprintf(text, sizeof text, "%.*s%d%s", (int)(at - TWO_HOSTS), TWO_HOSTS, port, at + 2);
    return plan_of(text);
}

static void test_workers_in_plan_order(void **state)
{
    (void)state;
    hx_plan *p = plan_with_port(9000);
    hx_deploy d;
    hx_err err = {0};
    assert_int_equal(hx_deploy_init(&d, p, &err), HX_OK);
    assert_int_equal(d.nworkers, 5);
    assert_string_equal(d.router_address, "127.0.0.1");
    assert_int_equal(d.router_port, 9000);
    /* p0: stage 0 ranks 0, 1 on a; stage 1 on a; d0 on b (local) */
    const int group[] = {0, 0, 0, 1, 1}, stage[] = {0, 0, 1, 0, 0}, rank[] = {0, 1, 0, 0, 1};
    const int tp[] = {2, 2, 1, 2, 2};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(d.workers[i].index, i);
        assert_int_equal(d.workers[i].group, group[i]);
        assert_int_equal(d.workers[i].stage, stage[i]);
        assert_int_equal(d.workers[i].rank, rank[i]);
        assert_int_equal(d.workers[i].tp, tp[i]);
        assert_int_equal(d.workers[i].port, 9001 + i);
        assert_int_equal(hx_deploy_worker_at(&d, group[i], stage[i], rank[i]), i);
    }
    assert_string_equal(d.workers[2].address, "10.0.0.1");
    assert_string_equal(d.workers[3].address, "127.0.0.1");
    assert_int_equal(d.workers[4].device_index, 1);
    assert_int_equal(hx_deploy_find_device(&d, "a:2"), 2);
    assert_int_equal(hx_deploy_find_device(&d, "a:9"), -1);
    assert_int_equal(hx_deploy_leader(&d, 1), 3);
    assert_int_equal(hx_deploy_group_size(&d, 0), 3);
    assert_int_equal(hx_deploy_worker_at(&d, 0, 2, 0), -1);
    assert_int_equal(hx_deploy_worker_at(&d, 0, 0, 2), -1);
    assert_int_equal(hx_deploy_worker_at(&d, 5, 0, 0), -1);
    hx_kv_stage st[4];
    assert_int_equal(hx_deploy_kv_layout(&d, 0, st, 4), 2);
    assert_int_equal(st[0].layer_first, 0);
    assert_int_equal(st[0].num_layers, 1);
    assert_int_equal(st[0].tp, 2);
    assert_int_equal(st[1].layer_first, 1);
    assert_int_equal(st[1].num_layers, 3);
    assert_int_equal(st[1].tp, 1);
    hx_deploy_release(&d);
    hx_plan_free(p);
}

static void test_ports_must_fit(void **state)
{
    (void)state;
    /* the router fits; its five workers do not */
    hx_plan *p = plan_with_port(65533);
    hx_deploy d;
    hx_err err = {0};
    assert_int_equal(hx_deploy_init(&d, p, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "leaves no room for 5 worker ports"));
    hx_plan_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_workers_in_plan_order),
        cmocka_unit_test(test_ports_must_fit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
