/*
 * test_sim.c - the discrete-event simulator on planned deployments.
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

#include "planner/search.h"
#include "planner/sim.h"

static hx_plan *make_plan(const char *inventory, const char *model, hx_strategy strategy)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/%s", HX_SOURCE_DIR, inventory);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    assert_int_equal(hx_inventory_load(path, &inv, &d), HX_OK);
    hx_diags_release(&d);
    hx_model m;
    hx_err err = {0};
    snprintf(path, sizeof path, "%s/models/%s", HX_SOURCE_DIR, model);
    assert_int_equal(hx_model_load(path, &m, &err), HX_OK);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_search_opts o;
    hx_search_opts_default(&o);
    o.strategy = strategy;
    hx_plan *p = NULL;
    if (hx_search_plan(inv, &m, &wl, &cp, &o, &p, NULL, &err) != HX_OK)
        fail_msg("%s", err.msg);
    hx_cost_params_release(&cp);
    hx_inventory_free(inv);
    /* the plan as a reader sees it: through JSON */
    json_t *j = hx_plan_to_json(p);
    hx_plan *back = NULL;
    hx_diags_init(&d);
    assert_int_equal(hx_plan_from_json(j, "plan.json", &back, &d), HX_OK);
    hx_diags_release(&d);
    json_decref(j);
    hx_plan_free(p);
    return back;
}

static hx_sim *make_sim(const hx_plan *p)
{
    hx_sim *sim = NULL;
    hx_err err = {0};
    if (hx_sim_new(p, NULL, &sim, &err) != HX_OK)
        fail_msg("%s", err.msg);
    return sim;
}

static void run_at(hx_sim *sim, const hx_plan *p, double rate, long n, hx_sim_result *r)
{
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.rate_rps = rate;
    o.requests = n;
    hx_err err = {0};
    if (hx_sim_run(sim, &o, r, &err) != HX_OK)
        fail_msg("%s", err.msg);
}

static void light_and_heavy_load(void **state)
{
    (void)state;
    hx_plan *p = make_plan("mixed.yaml", "llama-2-13b", HX_STRATEGY_HEXFLOW);
    hx_sim *sim = make_sim(p);
    double cap = p->throughput_rps;
    assert_true(cap > 0);

    /* well below capacity: everyone meets the SLOs, throughput follows the offer */
    hx_sim_result lo;
    run_at(sim, p, 0.3 * cap, 3000, &lo);
    assert_int_equal(lo.completed, 3000);
    assert_true(lo.slo_attainment >= 0.99);
    assert_true(fabs(lo.throughput_rps - lo.offered_rps) <= 0.05 * lo.offered_rps);
    assert_true(lo.ttft_s.p50 > 0 && lo.ttft_s.p50 < p->slo_ttft_s);
    assert_true(lo.tpot_s.p90 > 0 && lo.tpot_s.p90 <= p->slo_tpot_s);
    assert_true(lo.events > 3000);

    /* well above: queues grow, attainment falls, throughput saturates */
    hx_sim_result hi;
    run_at(sim, p, 3.0 * cap, 3000, &hi);
    assert_true(hi.slo_attainment < 0.5);
    assert_true(hi.ttft_s.p90 > 5 * lo.ttft_s.p90);
    assert_true(hi.throughput_rps < 0.8 * hi.offered_rps);
    assert_true(hi.throughput_rps > lo.throughput_rps);

    /* Little's law on the simulated system: L = lambda W */
    hx_sim_result *rs[2] = {&lo, &hi};
    for (int i = 0; i < 2; i++) {
        double L = rs[i]->mean_in_system, lw = rs[i]->completion_rps * rs[i]->e2e_s.mean;
        if (fabs(L - lw) > 1e-6 * lw)
            fail_msg("Little's law: L = %.6g, lambda W = %.6g", L, lw);
    }
    /* utilisations are fractions; decode batches grow with load */
    double batch_lo = 0, batch_hi = 0;
    for (int g = 0; g < lo.ngroups; g++) {
        assert_true(lo.groups[g].utilisation >= 0 && lo.groups[g].utilisation <= 1.0 + 1e-9);
        assert_true(hi.groups[g].utilisation >= 0 && hi.groups[g].utilisation <= 1.0 + 1e-9);
        if (lo.groups[g].role == HX_ROLE_DECODE) {
            batch_lo += lo.groups[g].mean_batch;
            batch_hi += hi.groups[g].mean_batch;
        }
    }
    assert_true(batch_hi > batch_lo);
    for (int l = 0; l < lo.nlinks; l++)
        assert_true(lo.links[l].utilisation >= 0 && lo.links[l].utilisation <= 1.0 + 1e-9);
    hx_sim_result_release(&lo);
    hx_sim_result_release(&hi);
    hx_sim_free(sim);
    hx_plan_free(p);
}

static void same_seed_same_result(void **state)
{
    (void)state;
    hx_plan *p = make_plan("mixed.yaml", "llama-2-13b", HX_STRATEGY_HEXFLOW);
    hx_sim *sim = make_sim(p);
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.requests = 1500;
    o.lengths = HX_LEN_EXPONENTIAL;
    o.record = 1;
    hx_sim_result a, b, c;
    hx_err err = {0};
    assert_int_equal(hx_sim_run(sim, &o, &a, &err), HX_OK);
    assert_int_equal(hx_sim_run(sim, &o, &b, &err), HX_OK);
    o.seed = 2;
    assert_int_equal(hx_sim_run(sim, &o, &c, &err), HX_OK);
    assert_int_equal(a.events, b.events);
    assert_true(a.throughput_rps == b.throughput_rps);
    assert_true(a.ttft_s.p99 == b.ttft_s.p99);
    assert_memory_equal(a.records, b.records, sizeof *a.records * (size_t)a.completed);
    assert_true(a.ttft_s.p99 != c.ttft_s.p99 || a.events != c.events);
    /* variable lengths really vary */
    int differ = 0;
    for (long i = 1; i < a.completed; i++)
        differ |= a.records[i].input_tokens != a.records[0].input_tokens;
    assert_true(differ);
    hx_sim_result_release(&a);
    hx_sim_result_release(&b);
    hx_sim_result_release(&c);
    hx_sim_free(sim);
    hx_plan_free(p);
}

static void colocated_and_trace(void **state)
{
    (void)state;
    hx_plan *p = make_plan("mixed.yaml", "llama-2-13b", HX_STRATEGY_COLOCATED);
    hx_sim *sim = make_sim(p);
    hx_sim_result r;
    run_at(sim, p, 0.3 * p->throughput_rps, 2000, &r);
    assert_int_equal(r.completed, 2000);
    assert_true(r.slo_attainment > 0.9);
    assert_int_equal(r.nlinks, 0);
    hx_sim_result_release(&r);

    /* a trace, rescaled to a rate */
    char path[1024];
    snprintf(path, sizeof path, "%s/sample-mooncake.jsonl", HX_TEST_DATA);
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    assert_int_equal(hx_trace_load(path, &t, &d), HX_OK);
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.trace = t;
    o.rate_rps = 0.2 * p->throughput_rps;
    o.requests = (long)t->n;
    o.record = 1;
    hx_err err = {0};
    assert_int_equal(hx_sim_run(sim, &o, &r, &err), HX_OK);
    assert_int_equal(r.completed, (long)t->n);
    assert_int_equal(r.records[0].input_tokens, t->reqs[0].input_tokens);
    assert_true(fabs(r.offered_rps - o.rate_rps) < 0.5 * o.rate_rps);
    hx_sim_result_release(&r);
    hx_trace_free(t);
    hx_diags_release(&d);
    hx_sim_free(sim);
    hx_plan_free(p);
}

static void goodput_search(void **state)
{
    (void)state;
    hx_plan *p = make_plan("mixed.yaml", "llama-2-13b", HX_STRATEGY_HEXFLOW);
    hx_sim *sim = make_sim(p);
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.requests = 1500;
    double gp = 0;
    hx_goodput_point pts[64];
    int n = 0;
    hx_err err = {0};
    assert_int_equal(hx_sim_find_goodput(sim, &o, 0.9, &gp, pts, 64, &n, &err), HX_OK);
    assert_true(gp > 0);
    assert_true(n >= 3);
    /* probes are sorted; the attainment at the goodput meets the target */
    for (int i = 1; i < n; i++)
        assert_true(pts[i].rate_rps >= pts[i - 1].rate_rps);
    hx_sim_result r;
    run_at(sim, p, gp, 1500, &r);
    assert_true(r.slo_attainment >= 0.9);
    hx_sim_result_release(&r);
    assert_int_equal(hx_sim_find_goodput(sim, &o, 1.5, &gp, NULL, 0, NULL, &err), HX_EINVAL);
    hx_sim_free(sim);
    hx_plan_free(p);
}

static void errors(void **state)
{
    (void)state;
    hx_plan *p = make_plan("mixed.yaml", "llama-2-13b", HX_STRATEGY_HEXFLOW);
    hx_sim *sim = NULL;
    hx_err err = {0};
    /* no cluster: cannot time the plan */
    json_t *cl = p->cluster;
    p->cluster = NULL;
    assert_int_equal(hx_sim_new(p, NULL, &sim, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "cluster"));
    p->cluster = cl;
    /* a device the cluster does not have */
    char *saved = p->groups[0].stages[0].devices[0];
    p->groups[0].stages[0].devices[0] = "nowhere:0";
    assert_int_equal(hx_sim_new(p, NULL, &sim, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "nowhere:0"));
    p->groups[0].stages[0].devices[0] = saved;
    /* bad options */
    sim = make_sim(p);
    hx_sim_opts o;
    hx_sim_opts_from_plan(&o, p);
    o.rate_rps = 0;
    hx_sim_result r;
    assert_int_equal(hx_sim_run(sim, &o, &r, &err), HX_EINVAL);
    hx_sim_free(sim);
    hx_sim_free(NULL);
    hx_len_dist dist;
    assert_int_equal(hx_len_dist_parse("lognormal", &dist), HX_OK);
    assert_int_equal(dist, HX_LEN_LOGNORMAL);
    assert_int_equal(hx_len_dist_parse("gaussian", &dist), HX_EINVAL);
    hx_plan_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(light_and_heavy_load),
        cmocka_unit_test(same_seed_same_result),
        cmocka_unit_test(colocated_and_trace),
        cmocka_unit_test(goodput_search),
        cmocka_unit_test(errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
