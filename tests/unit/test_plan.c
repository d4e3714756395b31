/*
 * test_plan.c - plans: building, the JSON form and its round trip, reading
 * hand-written plans, and every validation rule.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "planner/plan.h"

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */

/* Parses JSON written with ' for " (readable in C strings). */
static json_t *J(const char *text)
{
    char *t = strdup(text);
    assert_non_null(t);
    for (char *q = t; *q; q++)
        if (*q == '\'')
            *q = '"';
    json_error_t je;
    json_t *v = json_loads(t, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!v)
        fail_msg("bad test JSON at %d:%d: %s\n%s", je.line, je.column, je.text, t);
    free(t);
    return v;
}

/*
 * Sets (or, with val NULL, deletes) the value at a path such as
 * "groups[0].stages[1].num_layers" in `root`. Steals `val`. An index equal to
 * the array size appends.
 */
static void jset(json_t *root, const char *path, json_t *val)
{
    json_t *cur = root;
    const char *p = path;
    for (;;) {
        char key[64];
        long idx = -1;
        size_t n = 0;
        if (*p == '[') {
            idx = strtol(p + 1, (char **)&p, 10);
            assert_true(*p == ']');
            p++;
        } else {
            while (*p && *p != '.' && *p != '[' && n + 1 < sizeof key)
                key[n++] = *p++;
            key[n] = '\0';
        }
        if (*p == '.')
            p++;
        int last = *p == '\0';
        if (idx >= 0) {
            assert_true(json_is_array(cur));
            if (last) {
                if (!val)
                    assert_int_equal(json_array_remove(cur, (size_t)idx), 0);
                else if ((size_t)idx == json_array_size(cur))
                    assert_int_equal(json_array_append_new(cur, val), 0);
                else
                    assert_int_equal(json_array_set_new(cur, (size_t)idx, val), 0);
                return;
            }
            cur = json_array_get(cur, (size_t)idx);
        } else {
            assert_true(json_is_object(cur));
            if (last) {
                if (!val)
                    assert_int_equal(json_object_del(cur, key), 0);
                else
                    assert_int_equal(json_object_set_new(cur, key, val), 0);
                return;
            }
            cur = json_object_get(cur, key);
        }
        assert_non_null(cur);
    }
}

/* A valid plan: a two-stage prefill group on host a, two decode groups on host b. */
static json_t *base_plan(void)
{
    return J("{'schema': 'hexflow.plan/1',"
             " 'model': {'name': 'tiny', 'num_layers': 4},"
             " 'hosts': [{'name': 'a', 'address': '10.0.0.1'},"
             "           {'name': 'b', 'address': '10.0.0.2'}],"
             " 'router': {'host': 'a', 'port': 8000},"
             " 'groups': ["
             "  {'id': 'g0', 'role': 'prefill', 'stages': ["
             "     {'first_layer': 0, 'num_layers': 2, 'devices': ['a:0', 'a:1']},"
             "     {'first_layer': 2, 'num_layers': 2, 'devices': ['a:2']}]},"
             "  {'id': 'g1', 'role': 'decode', 'stages': ["
             "     {'first_layer': 0, 'num_layers': 4, 'devices': ['b:0']}]},"
             "  {'id': 'g2', 'role': 'decode', 'stages': ["
             "     {'first_layer': 0, 'num_layers': 4, 'devices': ['b:1', 'b:2']}]}],"
             " 'routes': [{'prefill': 'g0', 'decode': 'g1', 'rps': 1},"
             "            {'prefill': 'g0', 'decode': 'g2', 'rps': 2}]}");
}

static void dump_diags(const hx_diags *d)
{
    hx_diags_print(d, stderr, "  | ");
}

/* Reads `root` (stolen); asserts success with no diagnostics. */
static hx_plan *read_ok(json_t *root)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    hx_status st = hx_plan_from_json(root, "plan.json", &p, &d);
    if (st != HX_OK) {
        dump_diags(&d);
        fail_msg("expected the plan to read (status %d)", st);
    }
    assert_non_null(p);
    assert_int_equal(d.count, 0);
    hx_diags_release(&d);
    json_decref(root);
    return p;
}

/*
 * Reads `root` (stolen); asserts HX_EPARSE, *out untouched and every needle
 * in the diagnostics. Returns the number of diagnostics.
 */
static size_t expect_bad(json_t *root, const char *const *needles)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *sentinel = (hx_plan *)&d, *p = sentinel;
    hx_status st = hx_plan_from_json(root, "plan.json", &p, &d);
    json_decref(root);
    if (st != HX_EPARSE) {
        dump_diags(&d);
        fail_msg("expected HX_EPARSE, got %d", st);
    }
    assert_ptr_equal(p, sentinel);
    assert_true(d.count > 0);
    for (const char *const *n = needles; *n; n++) {
        if (!hx_diags_contains(&d, *n)) {
            print_error("missing '%s' in diagnostics:\n", *n);
            dump_diags(&d);
            fail();
        }
    }
    size_t count = d.count;
    hx_diags_release(&d);
    return count;
}

#define EXPECT_BAD(root, ...)                                                              \
    do {                                                                                   \
        static const char *const needles_[] = {__VA_ARGS__, NULL};                         \
        expect_bad(root, needles_);                                                        \
    } while (0)

/* The base plan with one change, expected to be rejected with `needle`. */
static void expect_change(const char *path, json_t *val, const char *needle)
{
    json_t *root = base_plan();
    jset(root, path, val);
    const char *const needles[] = {needle, NULL};
    expect_bad(root, needles);
}

/* Canonical text of a JSON value (keys in insertion order). */
static char *dump(const json_t *v)
{
    char *s = json_dumps(v, JSON_PRESERVE_ORDER | JSON_INDENT(1));
    assert_non_null(s);
    return s;
}

static char *tmpdir_new(void)
{
    char tmpl[] = "/tmp/hx-test-plan-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* ------------------------------------------------------------------------- */
/* Building                                                                   */

static void roles(void **state)
{
    (void)state;
    hx_role r;
    assert_string_equal(hx_role_name(HX_ROLE_PREFILL), "prefill");
    assert_string_equal(hx_role_name(HX_ROLE_DECODE), "decode");
    assert_string_equal(hx_role_name(HX_ROLE_BOTH), "both");
    assert_int_equal(hx_role_parse("decode", &r), HX_OK);
    assert_int_equal(r, HX_ROLE_DECODE);
    assert_int_equal(hx_role_parse("both", &r), HX_OK);
    assert_int_equal(r, HX_ROLE_BOTH);
    assert_int_equal(hx_role_parse("Decode", &r), HX_EINVAL);
    assert_int_equal(hx_role_parse(NULL, &r), HX_EINVAL);
}

static void new_and_free(void **state)
{
    (void)state;
    hx_plan_free(NULL);
    hx_plan *p = hx_plan_new();
    assert_non_null(p);
    assert_null(p->model_name);
    assert_int_equal(p->model_num_layers, 0);
    assert_null(p->model);
    assert_true(p->input_tokens < 0 && p->output_tokens < 0 && p->rate_rps < 0);
    assert_true(p->slo_ttft_s < 0 && p->slo_tpot_s < 0 && p->slo_attainment < 0);
    assert_int_equal(p->router_port, HX_PLAN_DEFAULT_ROUTER_PORT);
    assert_true(p->throughput_rps < 0 && p->usd_per_hour < 0);
    assert_true(p->search_seconds < 0 && p->search_iterations < 0);

    hx_plan_group *g = hx_plan_add_group(p, "g0", HX_ROLE_BOTH);
    assert_non_null(g);
    assert_true(g->capacity_rps < 0 && g->ttft_s < 0 && g->tpot_s < 0);
    assert_int_equal(g->max_batch, 0);
    hx_plan_memory *m = hx_plan_group_add_memory(g, "a:0");
    assert_non_null(m);
    assert_true(m->weights_bytes < 0 && m->capacity_bytes < 0);
    assert_int_equal(hx_plan_stage_add_device(hx_plan_group_add_stage(g, 0, 1), NULL),
                     HX_EINVAL);
    assert_int_equal(hx_plan_add_unused(p, NULL, "x"), HX_EINVAL);

    assert_int_equal(hx_plan_set_str(&p->bottleneck, "x"), HX_OK);
    assert_int_equal(hx_plan_set_str(&p->bottleneck, "decode"), HX_OK);
    assert_string_equal(p->bottleneck, "decode");
    assert_int_equal(hx_plan_set_str(&p->bottleneck, NULL), HX_OK);
    assert_null(p->bottleneck);

    assert_non_null(hx_plan_add_host(p, "a", "local"));
    assert_non_null(hx_plan_add_host(p, "b", "10.0.0.2"));
    assert_non_null(hx_plan_add_group(p, "g1", HX_ROLE_DECODE));
    assert_int_equal(hx_plan_find_host(p, "b"), 1);
    assert_int_equal(hx_plan_find_host(p, "c"), -1);
    assert_int_equal(hx_plan_find_group(p, "g1"), 1);
    assert_int_equal(hx_plan_find_group(p, "g9"), -1);
    assert_int_equal(hx_plan_find_group(p, NULL), -1);
    hx_plan_free(p);
}

/* A plan with every field set, built with the add functions. */
static hx_plan *rich_plan(void)
{
    hx_plan *p = hx_plan_new();
    assert_non_null(p);
    assert_int_equal(hx_plan_set_str(&p->model_name, "llama-2-70b"), HX_OK);
    p->model_num_layers = 8;
    p->model = J("{'name': 'llama-2-70b', 'config': 'models/llama-2-70b/config.json',"
                 " 'num_layers': 8, 'hidden_size': 8192, 'dtype': 'bf16',"
                 " 'layer': {'params': 855654400, 'weight_bytes': 1711308800}}");
    p->input_tokens = 512;
    p->output_tokens = 128;
    p->rate_rps = 0;
    p->slo_ttft_s = 2.0;
    p->slo_tpot_s = 0.1;
    p->slo_attainment = 0.9;

    hx_plan_host *h = hx_plan_add_host(p, "h100-a", "10.0.0.11");
    assert_non_null(h);
    assert_int_equal(hx_plan_set_str(&h->ssh_user, "root"), HX_OK);
    h->ssh_port = 2222;
    assert_int_equal(hx_plan_set_str(&h->ssh_identity, "/root/.ssh/id_ed25519"), HX_OK);
    assert_int_equal(hx_plan_set_str(&h->ssh_known_hosts, "/root/.ssh/known_hosts"), HX_OK);
    assert_int_equal(hx_plan_set_str(&h->workdir, "/var/lib/hexflow"), HX_OK);
    assert_non_null(hx_plan_add_host(p, "l40s-b", "l40s-b.example.net"));
    assert_int_equal(hx_plan_set_str(&p->router_host, "h100-a"), HX_OK);
    p->router_port = 8080;

    hx_plan_group *g = hx_plan_add_group(p, "g0", HX_ROLE_PREFILL);
    assert_non_null(g);
    g->capacity_rps = 3.2;
    g->ttft_s = 0.8;
    g->max_batch = 4;
    hx_plan_stage *s = hx_plan_group_add_stage(g, 0, 5);
    assert_non_null(s);
    assert_int_equal(hx_plan_stage_add_device(s, "h100-a:0"), HX_OK);
    assert_int_equal(hx_plan_stage_add_device(s, "h100-a:1"), HX_OK);
    s = hx_plan_group_add_stage(g, 5, 3);
    assert_non_null(s);
    assert_int_equal(hx_plan_stage_add_device(s, "h100-a:2"), HX_OK);
    for (int i = 0; i < 3; i++) {
        char dev[16];
        snprintf(dev, sizeof dev, "h100-a:%d", i);
        hx_plan_memory *m = hx_plan_group_add_memory(g, dev);
        assert_non_null(m);
        m->weights_bytes = 34359738368.0 + i;
        m->kv_bytes = 1.5e10;
        m->workspace_bytes = 2147483648.0;
        m->total_bytes = m->weights_bytes + m->kv_bytes + m->workspace_bytes;
        m->capacity_bytes = 85899345920.0;
    }

    g = hx_plan_add_group(p, "g1", HX_ROLE_DECODE);
    assert_non_null(g);
    g->capacity_rps = 1.7;
    g->tpot_s = 0.045;
    g->max_batch = 64;
    s = hx_plan_group_add_stage(g, 0, 8);
    assert_non_null(s);
    assert_int_equal(hx_plan_stage_add_device(s, "l40s-b:0"), HX_OK);
    assert_int_equal(hx_plan_stage_add_device(s, "l40s-b:1"), HX_OK);

    g = hx_plan_add_group(p, "g2", HX_ROLE_DECODE);
    assert_non_null(g);
    s = hx_plan_group_add_stage(g, 0, 8);
    assert_non_null(s);
    assert_int_equal(hx_plan_stage_add_device(s, "l40s-b:2"), HX_OK);

    hx_plan_route *r = hx_plan_add_route(p, 0, 1, 1.7);
    assert_non_null(r);
    r->kv_bytes_per_s = 2.75e9;
    r->link_bytes_per_s = 12.5e9;
    r = hx_plan_add_route(p, 0, 2, 1.25);
    assert_non_null(r);

    p->throughput_rps = 2.95;
    p->input_tokens_per_s = 1510.4;
    p->output_tokens_per_s = 377.6;
    assert_int_equal(hx_plan_set_str(&p->bottleneck, "decode HBM bandwidth of g1, g2"), HX_OK);
    p->usd_per_hour = 31.5;
    p->usd_per_million_output_tokens = 23.17;
    assert_int_equal(hx_plan_add_unused(p, "l40s-b:3", "no group improves throughput"), HX_OK);
    assert_int_equal(hx_plan_add_unused(p, "a6000-c:0", NULL), HX_OK);
    assert_int_equal(hx_plan_set_str(&p->search_strategy, "hexflow"), HX_OK);
    p->search_seconds = 0.4;
    p->search_iterations = 12;
    p->search_seed = 1;
    return p;
}

/* ------------------------------------------------------------------------- */
/* JSON form and round trip                                                    */

static void to_json_shape(void **state)
{
    (void)state;
    hx_plan *p = rich_plan();
    assert_int_equal(hx_plan_validate(p, "rich", NULL), 0);
    json_t *j = hx_plan_to_json(p);
    assert_non_null(j);

    /* the documented field order */
    static const char *const order[] = {"schema", "model", "workload", "hosts", "router",
                                        "groups", "routes", "throughput", "bottleneck",
                                        "cost", "unused_devices", "search"};
    size_t i = 0;
    const char *key;
    json_t *val;
    json_object_foreach(j, key, val) {
        assert_true(i < sizeof order / sizeof *order);
        assert_string_equal(key, order[i]);
        i++;
    }
    assert_int_equal(i, sizeof order / sizeof *order);

    assert_string_equal(json_string_value(json_object_get(j, "schema")), HX_PLAN_SCHEMA);
    /* the model object is kept whole */
    json_t *m = json_object_get(j, "model");
    assert_int_equal(json_integer_value(json_object_get(m, "hidden_size")), 8192);
    /* routes name groups by id */
    json_t *r1 = json_array_get(json_object_get(j, "routes"), 1);
    assert_string_equal(json_string_value(json_object_get(r1, "prefill")), "g0");
    assert_string_equal(json_string_value(json_object_get(r1, "decode")), "g2");
    /* integral values are integers, others reals; not-given fields are left out */
    json_t *wl = json_object_get(j, "workload");
    assert_true(json_is_integer(json_object_get(wl, "input_tokens")));
    assert_true(json_is_real(json_object_get(json_object_get(wl, "slo"), "tpot_s")));
    json_t *g2 = json_array_get(json_object_get(j, "groups"), 2);
    assert_null(json_object_get(g2, "capacity_rps"));
    assert_null(json_object_get(g2, "predicted"));
    assert_null(json_object_get(g2, "memory"));
    json_t *g1 = json_array_get(json_object_get(j, "groups"), 1);
    json_t *pred = json_object_get(g1, "predicted");
    assert_null(json_object_get(pred, "ttft_s"));
    assert_int_equal(json_integer_value(json_object_get(pred, "max_batch")), 64);
    /* unused devices as objects; the reason only when given */
    json_t *un = json_object_get(j, "unused_devices");
    assert_string_equal(json_string_value(json_object_get(json_array_get(un, 0), "reason")),
                        "no group improves throughput");
    assert_null(json_object_get(json_array_get(un, 1), "reason"));
    json_t *ssh = json_object_get(json_array_get(json_object_get(j, "hosts"), 0), "ssh");
    assert_int_equal(json_integer_value(json_object_get(ssh, "port")), 2222);
    assert_null(json_object_get(json_array_get(json_object_get(j, "hosts"), 1), "ssh"));
    json_decref(j);

    /* an empty plan writes only what is always there */
    hx_plan *e = hx_plan_new();
    j = hx_plan_to_json(e);
    assert_non_null(j);
    assert_int_equal(json_object_size(j), 5); /* schema, hosts, router, groups, routes */
    assert_null(json_object_get(j, "model"));
    assert_null(json_object_get(j, "search"));
    json_decref(j);
    hx_plan_free(e);
    hx_plan_free(p);
}

static void round_trip(void **state)
{
    (void)state;
    hx_plan *p = rich_plan();
    json_t *j1 = hx_plan_to_json(p);
    assert_non_null(j1);
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *q = NULL;
    hx_status st = hx_plan_from_json(j1, "rich.json", &q, &d);
    if (st != HX_OK)
        dump_diags(&d);
    assert_int_equal(st, HX_OK);
    hx_diags_release(&d);

    /* the struct came back */
    assert_string_equal(q->model_name, "llama-2-70b");
    assert_int_equal(q->model_num_layers, 8);
    assert_int_equal(q->nhosts, 2);
    assert_string_equal(q->hosts[0].ssh_known_hosts, "/root/.ssh/known_hosts");
    assert_int_equal(q->ngroups, 3);
    assert_int_equal(q->groups[0].nstages, 2);
    assert_int_equal(q->groups[0].stages[1].first_layer, 5);
    assert_int_equal(q->groups[0].nmemory, 3);
    assert_true(q->groups[0].memory[1].weights_bytes == 34359738369.0);
    assert_int_equal(q->nroutes, 2);
    assert_int_equal(q->routes[1].decode, 2);
    assert_true(q->routes[0].link_bytes_per_s == 12.5e9);
    assert_true(q->slo_tpot_s == 0.1);
    assert_int_equal(q->search_iterations, 12);
    assert_int_equal(q->search_seed, 1);
    assert_null(q->unused[1].reason);

    /* and its JSON form is identical, order included */
    json_t *j2 = hx_plan_to_json(q);
    assert_non_null(j2);
    assert_true(json_equal(j1, j2));
    char *s1 = dump(j1), *s2 = dump(j2);
    assert_string_equal(s1, s2);
    free(s1);
    free(s2);
    json_decref(j1);
    json_decref(j2);
    hx_plan_free(q);
    hx_plan_free(p);
}

static void round_trip_large_seed(void **state)
{
    (void)state;
    hx_plan *p = rich_plan();
    p->search_seed = ULONG_MAX;
    json_t *j1 = hx_plan_to_json(p);
    assert_non_null(j1);
    hx_plan *q = read_ok(json_incref(j1));
    assert_true(q->search_seed == ULONG_MAX);
    json_t *j2 = hx_plan_to_json(q);
    assert_true(json_equal(j1, j2));
    json_decref(j1);
    json_decref(j2);
    hx_plan_free(q);
    hx_plan_free(p);
}

static void write_and_load(void **state)
{
    (void)state;
    char *dir = tmpdir_new();
    char path[512], path2[512];
    snprintf(path, sizeof path, "%s/plan.json", dir);
    snprintf(path2, sizeof path2, "%s/plan2.json", dir);

    hx_plan *p = rich_plan();
    hx_err err = {0};
    assert_int_equal(hx_plan_write(p, path, &err), HX_OK);

    char *text = read_text(path);
    assert_true(text[strlen(text) - 1] == '\n');
    assert_non_null(strstr(text, "\"tpot_s\": 0.1")); /* not 0.10000000000000001 */
    assert_non_null(strstr(text, "\"schema\": \"hexflow.plan/1\""));

    hx_diags d;
    hx_diags_init(&d);
    hx_plan *q = NULL;
    hx_status st = hx_plan_load(path, &q, &d);
    if (st != HX_OK)
        dump_diags(&d);
    assert_int_equal(st, HX_OK);
    json_t *j1 = hx_plan_to_json(p), *j2 = hx_plan_to_json(q);
    assert_true(json_equal(j1, j2));
    json_decref(j1);
    json_decref(j2);

    /* a value with more digits than are written: load + write is stable */
    q->throughput_rps = 1.0 / 3.0;
    assert_int_equal(hx_plan_write(q, path, &err), HX_OK);
    hx_plan *r = NULL;
    assert_int_equal(hx_plan_load(path, &r, &d), HX_OK);
    assert_int_equal(hx_plan_write(r, path2, &err), HX_OK);
    char *t1 = read_text(path), *t2 = read_text(path2);
    assert_string_equal(t1, t2);
    assert_int_equal(d.count, 0);

    /* a failed write names the file */
    snprintf(path2, sizeof path2, "%s/no-such-dir/plan.json", dir);
    assert_int_not_equal(hx_plan_write(p, path2, &err), HX_OK);
    assert_non_null(strstr(err.msg, "no-such-dir"));

    free(t1);
    free(t2);
    free(text);
    hx_diags_release(&d);
    hx_plan_free(r);
    hx_plan_free(q);
    hx_plan_free(p);
    snprintf(path2, sizeof path2, "%s/plan2.json", dir);
    unlink(path);
    unlink(path2);
    rmdir(dir);
    free(dir);
}

/* ------------------------------------------------------------------------- */
/* Hand-written plans                                                          */

static void minimal_hand_written(void **state)
{
    (void)state;
    /* as in ARCHITECTURE.md's runtime section: one local host, two CPU devices */
    hx_plan *p = read_ok(J("{'schema': 'hexflow.plan/1',"
                           " 'hosts': [{'name': 'local', 'address': 'local'}],"
                           " 'router': {'host': 'local', 'port': 18080},"
                           " 'groups': ["
                           "  {'id': 'p0', 'role': 'prefill',"
                           "   'stages': [{'num_layers': 2, 'devices': ['local:0']}]},"
                           "  {'id': 'd0', 'role': 'decode',"
                           "   'stages': [{'num_layers': 2, 'devices': ['local:1']}]}],"
                           " 'routes': [{'prefill': 'p0', 'decode': 'd0'}]}"));
    assert_int_equal(p->nhosts, 1);
    assert_string_equal(p->hosts[0].address, "local");
    assert_null(p->hosts[0].ssh_user);
    assert_int_equal(p->hosts[0].ssh_port, 0);
    assert_null(p->hosts[0].workdir);
    assert_string_equal(p->router_host, "local");
    assert_int_equal(p->router_port, 18080);
    assert_int_equal(p->ngroups, 2);
    assert_int_equal(p->groups[1].role, HX_ROLE_DECODE);
    assert_int_equal(p->groups[0].stages[0].first_layer, 0);
    assert_string_equal(p->groups[1].stages[0].devices[0], "local:1");
    assert_int_equal(p->nroutes, 1);
    assert_int_equal(p->routes[0].prefill, 0);
    assert_int_equal(p->routes[0].decode, 1);
    assert_true(p->routes[0].rps == 0);
    /* everything else is "not given" */
    assert_null(p->model_name);
    assert_null(p->model);
    assert_int_equal(p->model_num_layers, 0);
    assert_true(p->input_tokens < 0 && p->slo_ttft_s < 0 && p->throughput_rps < 0);
    assert_true(p->groups[0].capacity_rps < 0 && p->groups[0].ttft_s < 0);
    assert_int_equal(p->groups[0].nmemory, 0);
    assert_int_equal(p->nunused, 0);
    assert_null(p->search_strategy);
    hx_plan_free(p);
}

static void colocated_defaults(void **state)
{
    (void)state;
    /* all groups "both": no routes; router port defaults; first_layer follows */
    hx_plan *p = read_ok(J("{'schema': 'hexflow.plan/1',"
                           " 'hosts': [{'name': 'local', 'address': 'local'}],"
                           " 'router': {'host': 'local'},"
                           " 'groups': [{'id': 'c0', 'role': 'both', 'stages': ["
                           "   {'num_layers': 3, 'devices': ['local:0']},"
                           "   {'num_layers': 5, 'devices': ['local:1', 'local:2']}]}]}"));
    assert_int_equal(p->router_port, HX_PLAN_DEFAULT_ROUTER_PORT);
    assert_int_equal(p->nroutes, 0);
    assert_int_equal(p->groups[0].stages[1].first_layer, 3);
    assert_int_equal(p->groups[0].stages[1].num_layers, 5);
    assert_int_equal(p->groups[0].stages[1].ndevices, 2);
    hx_plan_free(p);
}

static void unused_as_strings(void **state)
{
    (void)state;
    json_t *root = base_plan();
    /* plain strings and objects; a host outside the plan is fine for an unused device */
    jset(root, "unused_devices", J("['b:3', {'device': 'z:0', 'reason': 'too slow'}]"));
    hx_plan *p = read_ok(root);
    assert_int_equal(p->nunused, 2);
    assert_string_equal(p->unused[0].device, "b:3");
    assert_null(p->unused[0].reason);
    assert_string_equal(p->unused[1].reason, "too slow");
    hx_plan_free(p);
}

/* Every JSON example of docs/plan-format.md is a valid plan. */
static void doc_examples(void **state)
{
    (void)state;
#ifdef HX_SOURCE_DIR
    char *doc = read_text(HX_SOURCE_DIR "/docs/plan-format.md");
    int n = 0;
    for (char *q = strstr(doc, "```json\n"); q; q = strstr(q, "```json\n")) {
        q += strlen("```json\n");
        char *end = strstr(q, "```");
        assert_non_null(end);
        json_error_t je;
        json_t *root = json_loadb(q, (size_t)(end - q), JSON_REJECT_DUPLICATES, &je);
        if (!root)
            fail_msg("example %d: %d:%d: %s", n, je.line, je.column, je.text);
        hx_plan *p = read_ok(root);
        assert_true(p->ngroups >= 2);
        hx_plan_free(p);
        n++;
        q = end + 3;
    }
    assert_int_equal(n, 2); /* the minimal and the complete example */
    free(doc);
#else
    skip();
#endif
}

/* ------------------------------------------------------------------------- */
/* Files                                                                       */

static void missing_file(void **state)
{
    (void)state;
    char *dir = tmpdir_new();
    char path[512], msg[600];
    snprintf(path, sizeof path, "%s/x", dir);
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    assert_int_equal(hx_plan_load(path, &p, &d), HX_ENOENT);
    assert_null(p);
    snprintf(msg, sizeof msg, "cannot open plan '%s': no such file", path);
    assert_true(hx_diags_contains(&d, msg));
    hx_diags_release(&d);

    /* a directory is unreadable */
    hx_diags_init(&d);
    assert_int_equal(hx_plan_load(dir, &p, &d), HX_EIO);
    assert_true(d.count == 1);
    hx_diags_release(&d);
    rmdir(dir);
    free(dir);
}

static void malformed_json(void **state)
{
    (void)state;
    char *dir = tmpdir_new();
    char path[512], prefix[600], buf[1024];
    snprintf(path, sizeof path, "%s/plan.json", dir);
    write_text(path, "{\n  \"schema\": \"hexflow.plan/1\",\n  \"hosts\": [,]\n}\n");
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    assert_int_equal(hx_plan_load(path, &p, &d), HX_EPARSE);
    assert_null(p);
    assert_int_equal(d.count, 1);
    assert_int_equal(d.items[0].line, 3);
    assert_true(d.items[0].col > 0);
    hx_diags_format(&d, 0, buf, sizeof buf);
    snprintf(prefix, sizeof prefix, "%s:3:", path);
    assert_true(strncmp(buf, prefix, strlen(prefix)) == 0);
    hx_diags_release(&d);

    /* a key twice */
    write_text(path, "{\"schema\": \"hexflow.plan/1\", \"schema\": \"hexflow.plan/1\"}");
    hx_diags_init(&d);
    assert_int_equal(hx_plan_load(path, &p, &d), HX_EPARSE);
    assert_true(hx_diags_contains(&d, "duplicate"));
    hx_diags_release(&d);

    /* empty file */
    write_text(path, "");
    hx_diags_init(&d);
    assert_int_equal(hx_plan_load(path, &p, &d), HX_EPARSE);
    hx_diags_release(&d);

    /* a valid file through hx_plan_load, with errors named by file and field */
    write_text(path, "{\"schema\": \"hexflow.plan/1\", \"hosts\": 3, \"router\": {\"host\": "
                     "\"a\"}, \"groups\": []}");
    hx_diags_init(&d);
    assert_int_equal(hx_plan_load(path, &p, &d), HX_EPARSE);
    snprintf(prefix, sizeof prefix, "%s: hosts: is an integer; expected an array of hosts",
             path);
    assert_true(hx_diags_contains(&d, prefix));
    hx_diags_release(&d);
    unlink(path);
    rmdir(dir);
    free(dir);
}

static void non_object_root(void **state)
{
    (void)state;
    EXPECT_BAD(J("[1, 2]"), "the top level is an array; expected an object");
    EXPECT_BAD(J("\"plan\""), "the top level is a string");
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    assert_int_equal(hx_plan_from_json(NULL, "plan.json", &p, &d), HX_EPARSE);
    assert_null(p);
    hx_diags_release(&d);
    /* diags may be NULL */
    json_t *root = J("[]");
    assert_int_equal(hx_plan_from_json(root, "plan.json", &p, NULL), HX_EPARSE);
    json_decref(root);
}

/* ------------------------------------------------------------------------- */
/* Reader rules: fields, types, ranges                                          */

static void base_is_valid(void **state)
{
    (void)state;
    hx_plan *p = read_ok(base_plan());
    assert_int_equal(hx_plan_validate(p, "plan.json", NULL), 0);
    hx_plan_free(p);
}

static void rule_schema(void **state)
{
    (void)state;
    expect_change("schema", NULL, "schema: missing; expected \"hexflow.plan/1\"");
    expect_change("schema", json_string("hexflow.plan/2"),
                  "schema: 'hexflow.plan/2' is not supported; expected \"hexflow.plan/1\"");
    expect_change("schema", json_integer(1), "schema: is an integer");
}

static void rule_unknown_fields(void **state)
{
    (void)state;
    expect_change("grups", json_array(), "plan.json: grups: unknown field; did you mean 'groups'?");
    expect_change("frobnicate", json_true(), "frobnicate: unknown field; expected one of schema");
    expect_change("groups[0].stages[0].num_layer", json_integer(2),
                  "groups[0].stages[0].num_layer: unknown field; did you mean 'num_layers'?");
    expect_change("hosts[0].ssh", J("{'prot': 22}"),
                  "hosts[0].ssh.prot: unknown field; did you mean 'port'?");
    expect_change("router.hots", json_string("a"), "router.hots: unknown field");
    expect_change("routes[0].rsp", json_integer(1), "routes[0].rsp: unknown field");
    expect_change("workload", J("{'slo': {'ttft': 1}}"), "workload.slo.ttft: unknown field");
    expect_change("search", J("{'strategy': 'hexflow', 'sead': 1}"), "search.sead");
    expect_change("groups[0].predicted", J("{'ttft': 1}"), "groups[0].predicted.ttft");
    expect_change("groups[0].memory", J("[{'device': 'a:0', 'weights': 1}]"),
                  "groups[0].memory[0].weights: unknown field");
    expect_change("unused_devices", J("[{'device': 'b:5', 'why': 'x'}]"),
                  "unused_devices[0].why: unknown field");
    /* the model object is free-form: other fields are kept, not rejected */
    json_t *root = base_plan();
    jset(root, "model.hidden_size", json_integer(4096));
    hx_plan *p = read_ok(root);
    assert_int_equal(json_integer_value(json_object_get(p->model, "hidden_size")), 4096);
    assert_string_equal(p->model_name, "tiny");
    hx_plan_free(p);
}

static void rule_types(void **state)
{
    (void)state;
    /* the exact message form */
    json_t *root = base_plan();
    jset(root, "groups[0].stages[1].num_layers", json_string("2"));
    hx_diags d;
    hx_diags_init(&d);
    hx_plan *p = NULL;
    assert_int_equal(hx_plan_from_json(root, "plan.json", &p, &d), HX_EPARSE);
    char buf[512];
    assert_int_equal(d.count, 1);
    hx_diags_format(&d, 0, buf, sizeof buf);
    assert_string_equal(buf,
                        "plan.json: groups[0].stages[1].num_layers: is a string; expected a "
                        "positive integer");
    hx_diags_release(&d);
    json_decref(root);

    expect_change("groups[0].stages[1].num_layers", json_integer(0),
                  "groups[0].stages[1].num_layers: is 0; expected a positive integer");
    expect_change("groups[0].stages[1].num_layers", json_real(1.5),
                  "groups[0].stages[1].num_layers: is 1.5; expected a positive integer");
    expect_change("groups[0].stages[0].first_layer", json_integer(-1),
                  "groups[0].stages[0].first_layer: is -1; expected a non-negative integer");
    expect_change("groups[1].stages[0].devices", json_string("b:0"),
                  "groups[1].stages[0].devices: is a string; expected an array of device names");
    expect_change("groups[1].stages[0].devices[0]", json_integer(0),
                  "groups[1].stages[0].devices[0]: is an integer; expected a device name");
    expect_change("groups[1].stages[0].devices", NULL, "groups[1].stages[0].devices: missing");
    expect_change("groups[1].stages[0].num_layers", NULL,
                  "groups[1].stages[0].num_layers: missing; expected a positive integer");
    expect_change("groups[1].stages", NULL, "groups[1].stages: missing");
    expect_change("groups[1].stages", J("{}"), "groups[1].stages: is an object");
    expect_change("groups[1].stages[0]", json_string("x"),
                  "groups[1].stages[0]: is a string; expected an object");
    expect_change("groups[1].id", NULL, "groups[1].id: missing");
    expect_change("groups[1].id", json_string(""), "groups[1].id: is empty");
    expect_change("groups[1].role", NULL, "groups[1].role: missing; expected prefill, decode");
    expect_change("groups[1].role", json_string("decod"),
                  "groups[1].role: 'decod' is not a role; did you mean 'decode'?");
    expect_change("groups[1].role", json_string("mixed"),
                  "groups[1].role: 'mixed' is not a role; expected prefill, decode or both");
    expect_change("groups[1].capacity_rps", json_real(-0.5),
                  "groups[1].capacity_rps: is -0.5; expected a non-negative number");
    expect_change("groups[1].predicted", J("{'max_batch': -2}"),
                  "groups[1].predicted.max_batch: is -2");
    expect_change("groups[1].memory", J("{}"), "groups[1].memory: is an object");
    expect_change("groups[1].memory", J("[{'kv_bytes': 1}]"),
                  "groups[1].memory[0].device: missing");
    expect_change("groups[1].memory", J("[{'device': 'b:0', 'kv_bytes': 'x'}]"),
                  "groups[1].memory[0].kv_bytes: is a string; expected a non-negative number");
    expect_change("groups", J("{}"), "groups: is an object; expected an array of groups");
    expect_change("groups", NULL, "groups: missing");
    expect_change("hosts", NULL, "hosts: missing");
    expect_change("hosts[0].name", NULL, "hosts[0].name: missing");
    expect_change("hosts[0].address", json_string(""), "hosts[0].address: is empty");
    expect_change("hosts[0].ssh", json_string("root@a"), "hosts[0].ssh: is a string");
    expect_change("hosts[0].ssh", J("{'port': 0}"),
                  "hosts[0].ssh.port: is 0; expected a port number 1-65535");
    expect_change("hosts[0].workdir", json_integer(1), "hosts[0].workdir: is an integer");
    expect_change("router", NULL, "router: missing");
    expect_change("router", json_string("a"), "router: is a string");
    expect_change("router.host", NULL, "router.host: missing");
    expect_change("router.port", json_integer(0),
                  "router.port: is 0; expected a port number 1-65535");
    expect_change("router.port", json_integer(70000), "router.port: is 70000");
    expect_change("router.port", json_string("80"), "router.port: is a string");
    expect_change("routes", J("{}"), "routes: is an object; expected an array of routes");
    expect_change("routes[0].rps", json_integer(-1),
                  "routes[0].rps: is -1; expected a non-negative number");
    expect_change("routes[0].kv_bytes_per_s", json_string("1GB/s"),
                  "routes[0].kv_bytes_per_s: is a string");
    expect_change("routes[0].prefill", NULL, "routes[0].prefill: missing; expected a group id");
    expect_change("routes[0].decode", json_string("g9"), "routes[0].decode: unknown group 'g9'");
    expect_change("routes[0].decode", json_string("decode-group-zzz"),
                  "unknown group 'decode-group-zzz'; expected one of the group ids: g0, g1, g2");
    expect_change("model", json_string("tiny"), "model: is a string; expected an object");
    expect_change("model.num_layers", json_integer(0), "model.num_layers: is 0");
    expect_change("model.name", json_integer(0), "model.name: is an integer");
    expect_change("workload", J("{'input_tokens': -1}"), "workload.input_tokens: is -1");
    expect_change("workload", J("{'slo': {'attainment': 1.5}}"),
                  "workload.slo.attainment: is 1.5; expected a fraction between 0 and 1");
    expect_change("workload", J("[]"), "workload: is an array");
    expect_change("throughput", J("{'rps': 'fast'}"), "throughput.rps: is a string");
    expect_change("cost", J("{'usd_per_hour': -3}"), "cost.usd_per_hour: is -3");
    expect_change("bottleneck", json_integer(3), "bottleneck: is an integer; expected a string");
    expect_change("unused_devices", J("[3]"), "unused_devices[0]: is an integer");
    expect_change("unused_devices", J("['']"), "unused_devices[0]: is not a device name");
    expect_change("search", J("{'iterations': 1.5}"), "search.iterations: is 1.5");
    expect_change("search", J("{'seed': -1}"), "search.seed: is -1");
    expect_change("search", J("{'seed': '12x'}"), "search.seed: is '12x'");
    expect_change("search", J("{'strategy': ''}"), "search.strategy: is empty");
    expect_change("hosts[0].name", json_null(), "hosts[0].name: is null");
}

static void reports_every_read_problem(void **state)
{
    (void)state;
    json_t *root = base_plan();
    jset(root, "router.port", json_string("x"));
    jset(root, "groups[1].role", json_string("decoder"));
    jset(root, "hosts[1].adress", json_string("10.0.0.2"));
    jset(root, "routes[1].rps", json_integer(-3));
    size_t n = expect_bad(root, (const char *const[]){
        "router.port: is a string", "groups[1].role: 'decoder'", "hosts[1].adress",
        "routes[1].rps: is -3", NULL});
    assert_true(n >= 4);
}

/* ------------------------------------------------------------------------- */
/* Validation rules                                                            */

static void rule_hosts(void **state)
{
    (void)state;
    expect_change("hosts", J("[]"), "hosts: is empty; expected at least one host");
    expect_change("hosts[1].name", json_string("a"),
                  "hosts[1].name: 'a' is already the name of hosts[0]");
    expect_change("hosts[1].name", json_string("b 2"), "hosts[1].name: 'b 2' is not a valid name");
    expect_change("hosts[1].name", json_string("b:2"), "hosts[1].name: 'b:2' is not a valid name");
}

static void rule_router(void **state)
{
    (void)state;
    expect_change("router.host", json_string("c"), "router.host: unknown host 'c'; did you mean");
    expect_change("router.host", json_string("router-host"),
                  "router.host: unknown host 'router-host'; expected one of the hosts: a, b");
}

static void rule_groups(void **state)
{
    (void)state;
    expect_change("groups", J("[]"), "groups: is empty; expected at least one group");
    /* a fourth group, so that the routes still name existing groups */
    expect_change("groups[3]",
                  J("{'id': 'g1', 'role': 'decode', 'stages': "
                    "[{'num_layers': 4, 'devices': ['b:3']}]}"),
                  "groups[3].id: 'g1' is already the id of groups[1]; group ids must be unique");
    expect_change("groups[3]",
                  J("{'id': 'g/3', 'role': 'both', 'stages': "
                    "[{'num_layers': 4, 'devices': ['b:3']}]}"),
                  "groups[3].id: 'g/3' is not a valid id");
    expect_change("groups[1].stages", J("[]"),
                  "groups[1].stages: is empty; expected at least one pipeline stage");
    expect_change("groups[1].stages[0].devices", J("[]"),
                  "groups[1].stages[0].devices: is empty; expected at least one device");
}

static void rule_device_names(void **state)
{
    (void)state;
    expect_change("groups[1].stages[0].devices[0]", json_string("b0"),
                  "groups[1].stages[0].devices[0]: 'b0' is not a device name; expected "
                  "host:index");
    expect_change("groups[1].stages[0].devices[0]", json_string(":0"), "':0' is not a device name");
    expect_change("groups[1].stages[0].devices[0]", json_string(""),
                  "groups[1].stages[0].devices[0]: is empty");
    expect_change("groups[1].stages[0].devices[0]", json_string("c:0"),
                  "groups[1].stages[0].devices[0]: 'c:0' names unknown host 'c'; did you mean");
    expect_change("groups[1].stages[0].devices[0]", json_string("host-zzz:0"),
                  "'host-zzz:0' names unknown host 'host-zzz'; expected one of the hosts: a, b");
    expect_change("groups[1].stages[0].devices[0]", json_string("b:x"),
                  "'b:x' has device index 'x'; expected a non-negative integer");
    expect_change("groups[1].stages[0].devices[0]", json_string("b:-1"), "'b:-1' has device index");
    expect_change("groups[1].stages[0].devices[0]", json_string("b:"), "'b:' has device index");
    expect_change("groups[1].stages[0].devices[0]", json_string("b:01"), "'b:01' has device index");
    expect_change("groups[1].stages[0].devices[0]", json_string("b:99999999999"),
                  "'b:99999999999' has device index");
}

static void rule_device_twice(void **state)
{
    (void)state;
    expect_change("groups[1].stages[0].devices[0]", json_string("a:0"),
                  "groups[1].stages[0].devices[0]: 'a:0' is already used by "
                  "groups[0].stages[0].devices[0]");
    /* also inside one stage */
    expect_change("groups[2].stages[0].devices[1]", json_string("b:1"),
                  "groups[2].stages[0].devices[1]: 'b:1' is already used by "
                  "groups[2].stages[0].devices[0]");
}

static void rule_stage_layout(void **state)
{
    (void)state;
    expect_change("groups[0].stages[0].first_layer", json_integer(1),
                  "groups[0].stages[0].first_layer: is 1; expected 0 (the first stage starts");
    expect_change("groups[0].stages[1].first_layer", json_integer(3),
                  "groups[0].stages[1].first_layer: is 3; expected 2, where the previous stage "
                  "ends");
    expect_change("groups[0].stages[1].first_layer", json_integer(1),
                  "groups[0].stages[1].first_layer: is 1; expected 2");
    expect_change("groups[1].stages[0].num_layers", json_integer(3),
                  "groups[1].stages: cover layers 0-2; expected 0-3 (model.num_layers is 4)");
    expect_change("groups[1].stages[0].num_layers", json_integer(5),
                  "groups[1].stages: cover layers 0-4; expected 0-3");

    /* without the model's layer count, groups must agree with each other */
    json_t *root = base_plan();
    jset(root, "model", NULL);
    jset(root, "groups[1].stages[0].num_layers", json_integer(3));
    EXPECT_BAD(root, "groups[1].stages: cover 3 layers but groups[0] covers 4");
    root = base_plan();
    jset(root, "model", J("{'name': 'tiny'}"));
    hx_plan *p = read_ok(root);
    assert_int_equal(p->model_num_layers, 0);
    hx_plan_free(p);
}

static void rule_routes(void **state)
{
    (void)state;
    expect_change("routes[0].decode", json_string("g0"),
                  "routes[0].decode: group 'g0' has role prefill; expected a decode group");
    expect_change("routes[0].prefill", json_string("g2"),
                  "routes[0].prefill: group 'g2' has role decode; expected a prefill group");
    expect_change("routes[1].decode", json_string("g1"),
                  "routes[1]: route g0 -> g1 is already given by routes[0]");
    expect_change("routes", J("[]"),
                  "routes: is empty; expected routes from the prefill groups to the decode "
                  "groups");
    expect_change("routes", NULL, "routes: is empty");
    /* a both group takes no routes */
    json_t *root = base_plan();
    jset(root, "groups[2].role", json_string("both"));
    EXPECT_BAD(root, "routes[1].decode: group 'g2' has role both; expected a decode group");
}

static void rule_prefill_needs_decode(void **state)
{
    (void)state;
    json_t *root = base_plan();
    jset(root, "groups[1].role", json_string("both"));
    jset(root, "groups[2].role", json_string("both"));
    jset(root, "routes", J("[]"));
    EXPECT_BAD(root, "groups: has prefill groups but no decode group");

    root = base_plan();
    jset(root, "groups[0].role", json_string("both"));
    jset(root, "routes", NULL);
    EXPECT_BAD(root, "groups: has decode groups but no prefill group");

    /* mixing both groups with a prefill/decode pair is fine */
    root = base_plan();
    jset(root, "groups[3]", J("{'id': 'c0', 'role': 'both', 'stages': "
                              "[{'num_layers': 4, 'devices': ['a:3']}]}"));
    hx_plan *p = read_ok(root);
    assert_int_equal(p->ngroups, 4);
    hx_plan_free(p);
}

static void rule_memory(void **state)
{
    (void)state;
    expect_change("groups[0].memory", J("[{'device': 'b:0', 'kv_bytes': 1}]"),
                  "groups[0].memory[0].device: 'b:0' is not a device of group 'g0'");
    expect_change("groups[0].memory", J("[{'device': 'a:1'}, {'device': 'a:1'}]"),
                  "groups[0].memory[1].device: 'a:1' already has an entry, groups[0].memory[0]");
    expect_change("groups[0].memory", J("[{'device': 'q:1'}]"),
                  "groups[0].memory[0].device: 'q:1' names unknown host 'q'");
    json_t *root = base_plan();
    jset(root, "groups[0].memory",
         J("[{'device': 'a:2', 'weights_bytes': 1000, 'total_bytes': 2000},"
           " {'device': 'a:0'}]"));
    hx_plan *p = read_ok(root);
    assert_int_equal(p->groups[0].nmemory, 2);
    assert_true(p->groups[0].memory[0].total_bytes == 2000);
    assert_true(p->groups[0].memory[0].kv_bytes < 0);
    hx_plan_free(p);
}

static void rule_unused(void **state)
{
    (void)state;
    expect_change("unused_devices", J("['a:1']"),
                  "unused_devices[0]: 'a:1' is listed as unused but "
                  "groups[0].stages[0].devices[1] uses it");
    expect_change("unused_devices", J("['b-3']"), "unused_devices[0]: 'b-3' is not a device name");
}

static void reports_every_invariant(void **state)
{
    (void)state;
    json_t *root = base_plan();
    jset(root, "router.host", json_string("zz"));
    jset(root, "groups[1].stages[0].devices[0]", json_string("a:0"));
    jset(root, "groups[0].stages[1].first_layer", json_integer(3));
    jset(root, "routes[1].decode", json_string("g1"));
    size_t n = expect_bad(root, (const char *const[]){
        "router.host: unknown host 'zz'", "'a:0' is already used",
        "groups[0].stages[1].first_layer: is 3", "routes[1]: route g0 -> g1", NULL});
    assert_true(n >= 4);
}

/* The same rules on a plan built in code (the planner's side). */
static void validate_built(void **state)
{
    (void)state;
    hx_plan *p = rich_plan();
    hx_diags d;
    hx_diags_init(&d);
    assert_int_equal(hx_plan_validate(p, "built", &d), 0);

    p->router_port = 0;
    p->routes[0].rps = -1;
    p->routes[1].decode = 7;
    p->routes[1].kv_bytes_per_s = -2;
    p->hosts[1].ssh_port = 70000;
    p->groups[2].role = (hx_role)9;
    p->groups[1].stages[0].num_layers = 0;
    p->model_num_layers = -1;
    int n = hx_plan_validate(p, "built", &d);
    assert_int_equal((size_t)n, d.count);
    static const char *const needles[] = {
        "built: router.port: is 0; expected a port number 1-65535",
        "routes[0].rps: is -1; expected a non-negative number",
        "routes[1].decode: is group index 7; expected 0-2",
        "routes[1].kv_bytes_per_s: is -2",
        "hosts[1].ssh.port: is 70000",
        "groups[2].role: is 9; expected prefill, decode or both",
        "groups[1].stages[0].num_layers: is 0; expected a positive integer",
        "model.num_layers: is -1",
        NULL};
    for (const char *const *s = needles; *s; s++) {
        if (!hx_diags_contains(&d, *s)) {
            print_error("missing '%s':\n", *s);
            dump_diags(&d);
            fail();
        }
    }
    hx_diags_release(&d);

    /* NULL names and empty plans do not crash */
    hx_plan *e = hx_plan_new();
    assert_non_null(hx_plan_add_group(e, NULL, HX_ROLE_BOTH));
    assert_non_null(hx_plan_add_host(e, NULL, NULL));
    assert_int_equal(hx_plan_add_unused(e, "x", NULL), HX_OK);
    hx_diags_init(&d);
    n = hx_plan_validate(e, "empty", &d);
    assert_true(n >= 4);
    assert_true(hx_diags_contains(&d, "groups[0].id: missing"));
    assert_true(hx_diags_contains(&d, "hosts[0].name: missing"));
    assert_true(hx_diags_contains(&d, "router.host: missing"));
    assert_true(hx_diags_contains(&d, "groups[0].stages: is empty"));
    hx_diags_release(&d);
    json_t *j = hx_plan_to_json(e);
    assert_non_null(j);
    json_decref(j);
    hx_plan_free(e);
    hx_plan_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(roles),
        cmocka_unit_test(new_and_free),
        cmocka_unit_test(to_json_shape),
        cmocka_unit_test(round_trip),
        cmocka_unit_test(round_trip_large_seed),
        cmocka_unit_test(write_and_load),
        cmocka_unit_test(minimal_hand_written),
        cmocka_unit_test(colocated_defaults),
        cmocka_unit_test(unused_as_strings),
        cmocka_unit_test(doc_examples),
        cmocka_unit_test(missing_file),
        cmocka_unit_test(malformed_json),
        cmocka_unit_test(non_object_root),
        cmocka_unit_test(base_is_valid),
        cmocka_unit_test(rule_schema),
        cmocka_unit_test(rule_unknown_fields),
        cmocka_unit_test(rule_types),
        cmocka_unit_test(reports_every_read_problem),
        cmocka_unit_test(rule_hosts),
        cmocka_unit_test(rule_router),
        cmocka_unit_test(rule_groups),
        cmocka_unit_test(rule_device_names),
        cmocka_unit_test(rule_device_twice),
        cmocka_unit_test(rule_stage_layout),
        cmocka_unit_test(rule_routes),
        cmocka_unit_test(rule_prefill_needs_decode),
        cmocka_unit_test(rule_memory),
        cmocka_unit_test(rule_unused),
        cmocka_unit_test(reports_every_invariant),
        cmocka_unit_test(validate_built),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
