/*
 * test_search.c - the cost model and the plan search: plan invariants,
 * baselines, the exact search, determinism and errors.
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
#include <unistd.h>

#include "planner/cost.h"
#include "planner/search.h"
#include "planner/workload.h"

static hx_inventory *load_inv(const char *text)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    if (hx_inventory_load_string(text, strlen(text), "t.yaml", &inv, &d) != HX_OK) {
        hx_diags_print(&d, stderr, "  ");
        fail_msg("inventory does not load");
    }
    hx_diags_release(&d);
    return inv;
}

static hx_inventory *load_inv_file(const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/inventories/%s", HX_SOURCE_DIR, name);
    hx_diags d;
    hx_diags_init(&d);
    hx_inventory *inv = NULL;
    assert_int_equal(hx_inventory_load(path, &inv, &d), HX_OK);
    hx_diags_release(&d);
    return inv;
}

static void load_model(const char *name, hx_model *m)
{
    hx_err err = {0};
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/%s", HX_SOURCE_DIR, name);
    if (hx_model_load(dir, m, &err) != HX_OK)
        fail_msg("%s", err.msg);
}

/* Every invariant a plan must satisfy, checked against the inventory and model. */
static void check_plan(const hx_plan *p, const hx_inventory *inv, const hx_model *m)
{
    hx_diags d;
    hx_diags_init(&d);
    if (hx_plan_validate(p, "plan", &d) != 0) {
        hx_diags_print(&d, stderr, "  ");
        fail_msg("the plan does not validate");
    }
    hx_diags_release(&d);
    char *used = calloc(inv->ndevices, 1);
    assert_non_null(used);
    double both = 0;
    for (int i = 0; i < p->ngroups; i++) {
        const hx_plan_group *g = &p->groups[i];
        int next = 0;
        assert_true(g->capacity_rps > 0);
        for (int k = 0; k < g->nstages; k++) {
            const hx_plan_stage *s = &g->stages[k];
            assert_int_equal(s->first_layer, next);
            assert_true(s->num_layers >= 1);
            next += s->num_layers;
            /* TP degree divides the attention heads */
            assert_int_equal(m->num_heads % s->ndevices, 0);
            for (int t = 0; t < s->ndevices; t++) {
                /* "host:index" of the inventory, used once */
                char host[128];
                int idx = -1;
                const char *colon = strrchr(s->devices[t], ':');
                assert_non_null(colon);
                snprintf(host, sizeof host, "%.*s", (int)(colon - s->devices[t]), s->devices[t]);
                idx = atoi(colon + 1);
                int h = hx_inventory_find_host(inv, host);
                assert_true(h >= 0);
                assert_true(idx >= 0 && idx < inv->hosts[h].gpu_count);
                int dev = inv->hosts[h].first_device + idx;
                assert_false(used[dev]);
                used[dev] = 1;
            }
        }
        assert_int_equal(next, m->num_layers); /* stages cover all layers in order */
        /* memory fits */
        for (int k = 0; k < g->nmemory; k++) {
            const hx_plan_memory *pm = &g->memory[k];
            assert_true(pm->total_bytes > 0);
            assert_true(pm->total_bytes <= pm->capacity_bytes * 1.0000001);
        }
        if (g->role == HX_ROLE_BOTH)
            both += g->capacity_rps;
    }
    /* flow conservation: routes within capacities; throughput = routes + colocated */
    double routed = 0;
    for (int i = 0; i < p->ngroups; i++) {
        double out = 0, in = 0;
        for (int r = 0; r < p->nroutes; r++) {
            if (p->routes[r].prefill == i)
                out += p->routes[r].rps;
            if (p->routes[r].decode == i)
                in += p->routes[r].rps;
        }
        if (p->groups[i].role == HX_ROLE_PREFILL)
            assert_true(out <= p->groups[i].capacity_rps * (1 + 1e-6) + 1e-9);
        if (p->groups[i].role == HX_ROLE_DECODE)
            assert_true(in <= p->groups[i].capacity_rps * (1 + 1e-6) + 1e-9);
        if (p->groups[i].role == HX_ROLE_BOTH)
            assert_true(in == 0 && out == 0);
    }
    for (int r = 0; r < p->nroutes; r++) {
        assert_true(p->routes[r].rps > 0);
        assert_int_equal(p->groups[p->routes[r].prefill].role, HX_ROLE_PREFILL);
        assert_int_equal(p->groups[p->routes[r].decode].role, HX_ROLE_DECODE);
        routed += p->routes[r].rps;
    }
    double total = routed + both;
    if (p->rate_rps > 0 && total > p->rate_rps)
        total = p->rate_rps;
    assert_true(fabs(p->throughput_rps - total) <= 1e-6 * fmax(1, total));
    /* every device is either used or listed as unused, with a reason */
    int nused = 0;
    for (size_t i = 0; i < inv->ndevices; i++)
        nused += used[i];
    assert_int_equal(nused + p->nunused, (int)inv->ndevices);
    for (int i = 0; i < p->nunused; i++)
        assert_true(strlen(p->unused[i].reason) > 0);
    free(used);
}

static hx_plan *plan_or_fail(const hx_inventory *inv, const hx_model *m, const hx_workload *wl,
                             hx_strategy strategy, hx_search_stats *stats)
{
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_search_opts o;
    hx_search_opts_default(&o);
    o.strategy = strategy;
    o.time_limit_s = 20;
    hx_plan *p = NULL;
    hx_err err = {0};
    if (hx_search_plan(inv, m, wl, &cp, &o, &p, stats, &err) != HX_OK)
        fail_msg("plan failed: %s", err.msg);
    hx_cost_params_release(&cp);
    return p;
}

/* --- cost model ------------------------------------------------------------ */

static void cost_model_shapes(void **state)
{
    (void)state;
    hx_inventory *inv = load_inv(
        "hosts:\n"
        "  - {name: h, address: x, gpus: {type: H100-SXM, count: 8}, intra: {kind: nvlink, "
        "bandwidth: 450GB/s}}\n"
        "  - {name: a, address: y, gpus: {type: A100-80G, count: 8}, intra: {kind: nvlink, "
        "bandwidth: 300GB/s}}\n");
    hx_graph *g = NULL;
    assert_int_equal(hx_graph_new(inv, &g), HX_OK);
    hx_model m;
    load_model("llama-2-70b", &m);
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_cost_ctx c;
    hx_cost_ctx_init(&c, &m, g, &cp, &wl);
    assert_true(fabs(c.kv_bytes_per_request - 327680.0 * 512) < 1);

    int h4[4] = {0, 1, 2, 3}, a4[4] = {8, 9, 10, 11}, h1[1] = {0};
    hx_layout l;
    hx_perf ph, pa, pd_h, pd_a, p1;
    assert_true(hx_cost_best_layout(&c, h4, 4, HX_ROLE_PREFILL, &l, &ph));
    hx_err err = {0};
    assert_int_equal(hx_layout_check(&c, &l, &err), HX_OK);
    assert_true(hx_cost_best_layout(&c, a4, 4, HX_ROLE_PREFILL, &l, &pa));
    /* H100s prefill faster than A100s (about their compute ratio) */
    assert_true(ph.capacity_rps > 2.0 * pa.capacity_rps);
    assert_true(ph.ttft_s > 0 && ph.ttft_s < wl.slo_ttft_s);
    assert_true(hx_cost_best_layout(&c, h4, 4, HX_ROLE_DECODE, &l, &pd_h));
    assert_true(hx_cost_best_layout(&c, a4, 4, HX_ROLE_DECODE, &l, &pd_a));
    /* decode follows memory bandwidth: H100 3.35 vs A100 2.04 TB/s */
    assert_true(pd_h.capacity_rps > pd_a.capacity_rps);
    /*
     * at a fixed TPOT the batch is (TPOT x bandwidth - weights) / KV, superlinear
     * in bandwidth; at large batches decode turns compute-bound, so the ratio
     * stays below the compute ratio (989/312) with some margin
     */
    assert_true(pd_h.capacity_rps < 3.5 * pd_a.capacity_rps);
    assert_true(pd_h.tpot_s > 0 && pd_h.tpot_s <= wl.slo_tpot_s);
    assert_true(pd_h.batch > 1);
    /* one 80 GB device cannot hold 129 GiB of weights */
    assert_false(hx_cost_best_layout(&c, h1, 1, HX_ROLE_DECODE, &l, &p1));
    assert_non_null(strstr(p1.limit, "memory"));

    /* a tighter TPOT SLO lowers the decode batch and capacity */
    hx_workload tight = wl;
    tight.slo_tpot_s = 0.03;
    hx_cost_ctx c2;
    hx_cost_ctx_init(&c2, &m, g, &cp, &tight);
    hx_perf pt;
    assert_true(hx_cost_best_layout(&c2, h4, 4, HX_ROLE_DECODE, &l, &pt));
    assert_true(pt.batch < pd_h.batch);
    assert_true(pt.capacity_rps < pd_h.capacity_rps);
    /* an impossible TTFT makes prefill infeasible */
    hx_workload fast = wl;
    fast.slo_ttft_s = 1e-4;
    hx_cost_ctx_init(&c2, &m, g, &cp, &fast);
    assert_false(hx_cost_best_layout(&c2, h4, 4, HX_ROLE_PREFILL, &l, &pt));
    assert_non_null(strstr(pt.limit, "TTFT"));

    /* layout checks */
    l.nstages = 1;
    l.first_layer[0] = 0;
    l.num_layers[0] = 80;
    l.tp[0] = 3;
    l.ndevices = 3;
    l.devices[0] = 0;
    l.devices[1] = 1;
    l.devices[2] = 2;
    assert_int_equal(hx_layout_check(&c, &l, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "does not divide"));
    l.tp[0] = 2;
    l.ndevices = 2;
    l.num_layers[0] = 79;
    assert_int_equal(hx_layout_check(&c, &l, &err), HX_EINVAL);
    l.num_layers[0] = 80;
    l.devices[1] = 0;
    assert_int_equal(hx_layout_check(&c, &l, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "twice"));

    /* KV links: same host uses the intra link, different hosts the NICs */
    hx_layout lp = {0}, ld = {0};
    lp.nstages = ld.nstages = 1;
    lp.tp[0] = ld.tp[0] = 2;
    lp.ndevices = ld.ndevices = 2;
    lp.devices[0] = 0;
    lp.devices[1] = 1;
    ld.devices[0] = 2;
    ld.devices[1] = 3;
    double same = hx_cost_kv_link_bytes_per_s(&c, &lp, &ld);
    ld.devices[0] = 8;
    ld.devices[1] = 9;
    double across = hx_cost_kv_link_bytes_per_s(&c, &lp, &ld);
    assert_true(same > 10 * across);
    assert_true(fabs(across - HX_DEFAULT_NIC_BYTES_PER_S * cp.net_eff) < 1);
    hx_graph_free(g);
    hx_inventory_free(inv);
}

static void calibration_file(void **state)
{
    (void)state;
    char path[] = "/tmp/hx-calib-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *good = "{\"defaults\": {\"compute_efficiency\": 0.5, \"max_prefill_batch\": 4},"
                       " \"types\": {\"h100\": {\"hbm_efficiency\": 0.9}}}";
    assert_true(write(fd, good, strlen(good)) == (ssize_t)strlen(good));
    close(fd);
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_err err = {0};
    assert_int_equal(hx_cost_params_load(&cp, path, &err), HX_OK);
    assert_true(cp.compute_eff == 0.5);
    assert_int_equal(cp.max_prefill_batch, 4);
    assert_true(hx_cost_hbm_eff(&cp, hx_catalog_find("H100-SXM")) == 0.9);
    assert_true(hx_cost_hbm_eff(&cp, hx_catalog_find("A100-80G")) == cp.hbm_eff);
    hx_cost_params_release(&cp);

    const char *bad[] = {"{\"defaults\": {\"compute_efficiency\": 1.5}}",
                         "{\"defaults\": {\"frobs\": 1}}", "[1]",
                         "{\"types\": {\"L4\": {\"compute_efficiency\": \"high\"}}}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        FILE *fp = fopen(path, "w");
        fputs(bad[i], fp);
        fclose(fp);
        hx_cost_params_default(&cp);
        assert_int_not_equal(hx_cost_params_load(&cp, path, &err), HX_OK);
        assert_non_null(strstr(err.msg, "calibration"));
        hx_cost_params_release(&cp);
    }
    unlink(path);
}

/* --- search ---------------------------------------------------------------- */

static void mixed_cluster_plan(void **state)
{
    (void)state;
    hx_inventory *inv = load_inv_file("mixed.yaml");
    hx_model m;
    load_model("llama-2-70b", &m);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_search_stats st;
    hx_plan *p = plan_or_fail(inv, &m, &wl, HX_STRATEGY_HEXFLOW, &st);
    check_plan(p, inv, &m);
    assert_true(p->throughput_rps > 0);
    assert_true(p->nroutes > 0);
    assert_true(p->usd_per_hour > 0);
    assert_non_null(p->bottleneck);
    /* never worse than the baselines it computed */
    assert_true(p->throughput_rps >= st.colocated_rps * (1 - 1e-9));
    assert_true(p->throughput_rps >= st.homogeneous_rps * (1 - 1e-9));
    /* the JSON round trip validates */
    json_t *j = hx_plan_to_json(p);
    hx_plan *back = NULL;
    hx_diags d;
    hx_diags_init(&d);
    assert_int_equal(hx_plan_from_json(j, "plan.json", &back, &d), HX_OK);
    assert_int_equal(back->ngroups, p->ngroups);
    hx_plan_free(back);
    hx_diags_release(&d);
    json_decref(j);
    hx_plan_free(p);

    /* the baselines on their own are valid plans too */
    p = plan_or_fail(inv, &m, &wl, HX_STRATEGY_COLOCATED, NULL);
    check_plan(p, inv, &m);
    for (int i = 0; i < p->ngroups; i++)
        assert_int_equal(p->groups[i].role, HX_ROLE_BOTH);
    assert_int_equal(p->nroutes, 0);
    hx_plan_free(p);
    p = plan_or_fail(inv, &m, &wl, HX_STRATEGY_HOMOGENEOUS, NULL);
    check_plan(p, inv, &m);
    /* one device type only */
    const char *type = NULL;
    for (int i = 0; i < p->ngroups; i++)
        for (int k = 0; k < p->groups[i].nstages; k++)
            for (int t = 0; t < p->groups[i].stages[k].ndevices; t++) {
                char host[64];
                const char *dn = p->groups[i].stages[k].devices[t];
                snprintf(host, sizeof host, "%.*s", (int)(strchr(dn, ':') - dn), dn);
                const hx_host *h = &inv->hosts[hx_inventory_find_host(inv, host)];
                const char *tn = hx_inventory_host_spec(inv, h)->name;
                if (!type)
                    type = tn;
                assert_string_equal(type, tn);
            }
    hx_plan_free(p);
    hx_inventory_free(inv);
}

static void rate_and_determinism(void **state)
{
    (void)state;
    hx_inventory *inv = load_inv_file("mixed.yaml");
    hx_model m;
    load_model("llama-2-13b", &m);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_plan *a = plan_or_fail(inv, &m, &wl, HX_STRATEGY_HEXFLOW, NULL);
    hx_plan *b = plan_or_fail(inv, &m, &wl, HX_STRATEGY_HEXFLOW, NULL);
    check_plan(a, inv, &m);
    /* same seed, same plan (apart from the time taken) */
    a->search_seconds = b->search_seconds = 0;
    json_t *ja = hx_plan_to_json(a), *jb = hx_plan_to_json(b);
    char *sa = json_dumps(ja, JSON_SORT_KEYS), *sb = json_dumps(jb, JSON_SORT_KEYS);
    assert_string_equal(sa, sb);
    free(sa);
    free(sb);
    json_decref(ja);
    json_decref(jb);
    /* a modest rate is met at lower cost than the full cluster */
    hx_workload low = wl;
    low.rate_rps = a->throughput_rps * 0.25;
    hx_plan *c = plan_or_fail(inv, &m, &low, HX_STRATEGY_HEXFLOW, NULL);
    check_plan(c, inv, &m);
    assert_true(fabs(c->throughput_rps - low.rate_rps) < 1e-6 * low.rate_rps);
    assert_true(c->usd_per_hour < a->usd_per_hour);
    assert_true(c->nunused > 0);
    hx_plan_free(a);
    hx_plan_free(b);
    hx_plan_free(c);
    hx_inventory_free(inv);
}

/* A small random cluster of 4-16 devices; the model is chosen to fit it. */
static hx_inventory *random_cluster(unsigned seed, int max_devices)
{
    static const char *types[] = {"H100-SXM", "A100-80G", "L40S", "A6000", "L4", "A10"};
    char text[4096];
    size_t len = 0;
    srand(seed);
    int left = 4 + rand() % (max_devices - 3);
    int h = 0;
    len += (size_t)snprintf(text + len, sizeof text - len, "hosts:\n");
    while (left > 0) {
        int n = 1 + rand() % 4;
        if (n > left)
            n = left;
        const char *t = types[rand() % 6];
        len += (size_t)snprintf(text + len, sizeof text - len,
                                "  - {name: h%d, address: 10.0.0.%d, gpus: {type: %s, count: %d}, "
                                "intra: {kind: %s}, nic: {bandwidth: %dGb/s}, switch: s%d}\n",
                                h, h + 1, t, n, rand() % 2 ? "nvlink" : "pcie",
                                (rand() % 2 ? 100 : 25), h % 2);
        left -= n;
        h++;
    }
    len += (size_t)snprintf(text + len, sizeof text - len,
                            "network:\n  switches:\n    - {name: s0, uplink: 200Gb/s}\n    - "
                            "{name: s1, uplink: 100Gb/s}\n");
    return load_inv(text);
}

static void exact_beats_or_matches_heuristic(void **state)
{
    (void)state;
    hx_model m;
    load_model("llama-2-7b", &m);
    hx_workload wl;
    hx_workload_default(&wl);
    int compared = 0;
    for (unsigned seed = 1; seed <= 6; seed++) {
        hx_inventory *inv = random_cluster(seed, 8);
        hx_plan *h = plan_or_fail(inv, &m, &wl, HX_STRATEGY_HEXFLOW, NULL);
        hx_plan *e = plan_or_fail(inv, &m, &wl, HX_STRATEGY_EXACT, NULL);
        check_plan(h, inv, &m);
        check_plan(e, inv, &m);
        if (e->throughput_rps < h->throughput_rps * (1 - 1e-6))
            fail_msg("seed %u: exact %.6g < heuristic %.6g", seed, e->throughput_rps,
                     h->throughput_rps);
        compared++;
        hx_plan_free(h);
        hx_plan_free(e);
        hx_inventory_free(inv);
    }
    assert_int_equal(compared, 6);
}

static void errors(void **state)
{
    (void)state;
    hx_model m70, m7;
    load_model("llama-2-70b", &m70);
    load_model("llama-2-7b", &m7);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_cost_params cp;
    hx_cost_params_default(&cp);
    hx_search_opts o;
    hx_search_opts_default(&o);
    hx_plan *p = NULL;
    hx_err err = {0};

    /* model too big for the cluster */
    hx_inventory *small = load_inv("hosts:\n  - {name: a, address: x, gpus: {type: L4, count: 2}}\n");
    assert_int_equal(hx_search_plan(small, &m70, &wl, &cp, &o, &p, NULL, &err), HX_EINVAL);
    assert_null(p);
    assert_non_null(strstr(err.msg, "needs"));
    assert_non_null(strstr(err.msg, "usable device memory"));

    /* SLOs nobody can meet */
    hx_workload impossible = wl;
    impossible.slo_tpot_s = 1e-6;
    assert_int_equal(hx_search_plan(small, &m7, &impossible, &cp, &o, &p, NULL, &err),
                     HX_EINVAL);
    assert_non_null(strstr(err.msg, "SLO"));

    /* exact is for small clusters only */
    hx_inventory *big = load_inv_file("h100-32.yaml");
    o.strategy = HX_STRATEGY_EXACT;
    assert_int_equal(hx_search_plan(big, &m7, &wl, &cp, &o, &p, NULL, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "at most 16"));

    /* no devices */
    hx_inventory empty;
    memset(&empty, 0, sizeof empty);
    o.strategy = HX_STRATEGY_HEXFLOW;
    assert_int_equal(hx_search_plan(&empty, &m7, &wl, &cp, &o, &p, NULL, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "no devices"));

    hx_inventory_free(small);
    hx_inventory_free(big);
    hx_cost_params_release(&cp);
}

static void workload_file(void **state)
{
    (void)state;
    char path[] = "/tmp/hx-wl-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "input_tokens: 1024\noutput_tokens: 256\nrate: 3.5\n"
                       "slo: {ttft: 1500ms, tpot: 0.05, attainment: 0.99}\n";
    assert_true(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    hx_workload wl;
    hx_workload_default(&wl);
    hx_diags d;
    hx_diags_init(&d);
    assert_int_equal(hx_workload_load(path, &wl, &d), HX_OK);
    assert_true(wl.input_tokens == 1024 && wl.output_tokens == 256 && wl.rate_rps == 3.5);
    assert_true(fabs(wl.slo_ttft_s - 1.5) < 1e-12 && wl.slo_tpot_s == 0.05);
    assert_true(wl.slo_attainment == 0.99);
    FILE *fp = fopen(path, "w");
    fputs("input_tokens: lots\nslo: {ttft: soon}\nextra: 1\n", fp);
    fclose(fp);
    assert_int_equal(hx_workload_load(path, &wl, &d), HX_EPARSE);
    assert_true(hx_diags_contains(&d, ":1:15: input_tokens: 'lots' is not a token count"));
    assert_true(hx_diags_contains(&d, "ttft: 'soon' is not a duration"));
    assert_true(hx_diags_contains(&d, "extra: unknown field"));
    hx_diags_release(&d);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(cost_model_shapes),
        cmocka_unit_test(calibration_file),
        cmocka_unit_test(mixed_cluster_plan),
        cmocka_unit_test(rate_and_determinism),
        cmocka_unit_test(exact_beats_or_matches_heuristic),
        cmocka_unit_test(errors),
        cmocka_unit_test(workload_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
