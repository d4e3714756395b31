/*
 * whatif.c - scenarios and the purchase advisor (see whatif.h).
 */
#include "whatif.h"

#include <ctype.h>
#include <glpk.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "planner/sim.h"

#define MAX_BUY_HOSTS_PER_TYPE 8

static const int shapes[] = {1, 2, 4, 8};
#define NSHAPES 4

hx_status hx_whatif_parse_add(const char *spec, hx_whatif_change *out, hx_err *err)
{
    memset(out, 0, sizeof *out);
    char buf[512];
    if (strlen(spec) >= sizeof buf)
        return hx_err_set(err, HX_EINVAL, "--add '%.40s...': too long", spec);
    snprintf(buf, sizeof buf, "%s", spec);
    char *at = strchr(buf, '@');
    if (at) {
        *at = '\0';
        if (!at[1] || strlen(at + 1) >= sizeof out->switch_name)
            return hx_err_set(err, HX_EINVAL, "--add '%s': empty or long switch name after '@'",
                              spec);
        snprintf(out->switch_name, sizeof out->switch_name, "%s", at + 1);
    }
    char *c1 = strchr(buf, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c1 || !c2 || strchr(c2 + 1, ':'))
        return hx_err_set(err, HX_EINVAL,
                          "--add '%s': expected NAME:TYPE:COUNT[@SWITCH], e.g. h100-new:H100-SXM:8",
                          spec);
    *c1 = *c2 = '\0';
    if (!buf[0] || strlen(buf) >= sizeof out->name)
        return hx_err_set(err, HX_EINVAL, "--add '%s': empty or long host name", spec);
    for (const char *p = buf; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
            return hx_err_set(err, HX_EINVAL,
                              "--add '%s': host name '%s' may use letters, digits, '-', '_', '.'",
                              spec, buf);
    snprintf(out->name, sizeof out->name, "%s", buf);
    if (!c1[1] || strlen(c1 + 1) >= sizeof out->type)
        return hx_err_set(err, HX_EINVAL, "--add '%s': empty or long device type", spec);
    snprintf(out->type, sizeof out->type, "%s", c1 + 1);
    char *end;
    long n = strtol(c2 + 1, &end, 10);
    if (!c2[1] || *end || n < 1 || n > 1024)
        return hx_err_set(err, HX_EINVAL, "--add '%s': count '%s' is not a whole number 1-1024",
                          spec, c2 + 1);
    out->count = (int)n;
    return HX_OK;
}

/* Whether host JSON object h has device type `type` (catalog names compared canonically). */
static int host_has_type(json_t *h, const char *type)
{
    const char *t = json_string_value(json_object_get(json_object_get(h, "gpus"), "type"));
    if (!t)
        return 0;
    if (!strcasecmp(t, type))
        return 1;
    const hx_gpu_spec *a = hx_catalog_find(t), *b = hx_catalog_find(type);
    return a && b && a == b;
}

static int name_in(json_t *arr, const char *name)
{
    size_t i;
    json_t *x;
    json_array_foreach(arr, i, x) {
        const char *n = json_string_value(json_object_get(x, "name"));
        if (n && !strcmp(n, name))
            return 1;
    }
    return 0;
}

static int sxm_class(const char *type)
{
    const hx_gpu_spec *s = hx_catalog_find(type);
    const char *n = s ? s->name : type;
    return !strcasecmp(n, "H100-SXM") || !strcasecmp(n, "H200") || !strncasecmp(n, "A100", 4) ||
           !strcasecmp(n, "V100") || !strcasecmp(n, "MI300X");
}

hx_status hx_whatif_apply(const hx_inventory *base, const hx_whatif_change *changes, int n,
                          hx_inventory **out, hx_err *err)
{
    hx_status st = HX_OK;
    json_t *doc = hx_inventory_to_json(base, NULL);
    if (!doc)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    json_t *hosts = json_object_get(doc, "hosts");
    json_t *net = json_object_get(doc, "network");
    json_t *links = json_object_get(net, "links"), *switches = json_object_get(net, "switches");
    json_t *types = json_object_get(doc, "gpu_types");
    for (int c = 0; c < n && st == HX_OK; c++) {
        const hx_whatif_change *ch = &changes[c];
        if (ch->remove) {
            int removed = 0;
            for (size_t i = 0; i < json_array_size(hosts);) {
                json_t *h = json_array_get(hosts, i);
                const char *hn = json_string_value(json_object_get(h, "name"));
                if ((hn && !strcmp(hn, ch->name)) || host_has_type(h, ch->name)) {
                    /* and the measured links that name it */
                    for (size_t k = 0; k < json_array_size(links);) {
                        json_t *l = json_array_get(links, k);
                        const char *a = json_string_value(json_object_get(l, "a"));
                        const char *b = json_string_value(json_object_get(l, "b"));
                        if ((a && !strcmp(a, hn)) || (b && !strcmp(b, hn)))
                            json_array_remove(links, k);
                        else
                            k++;
                    }
                    json_array_remove(hosts, i);
                    removed++;
                } else {
                    i++;
                }
            }
            if (!removed)
                st = hx_err_set(err, HX_EINVAL,
                                "--remove %s: no host or device type of that name in the "
                                "inventory",
                                ch->name);
            else if (json_array_size(hosts) == 0)
                st = hx_err_set(err, HX_EINVAL, "--remove %s: no hosts would be left", ch->name);
            continue;
        }
        if (name_in(hosts, ch->name)) {
            st = hx_err_set(err, HX_EINVAL, "--add %s: a host of that name exists already",
                            ch->name);
            break;
        }
        if (ch->switch_name[0] && !name_in(switches, ch->switch_name)) {
            st = hx_err_set(err, HX_EINVAL,
                            "--add %s: unknown switch '%s'; expected one of the inventory's "
                            "network.switches",
                            ch->name, ch->switch_name);
            break;
        }
        const hx_gpu_spec *spec = hx_catalog_find(ch->type);
        if (!spec && !name_in(types, ch->type)) {
            char sug[256];
            hx_catalog_suggest(ch->type, sug, sizeof sug);
            st = hx_err_set(err, HX_EINVAL, "--add %s: unknown device type '%s'%s%s", ch->name,
                            ch->type, sug[0] ? "; did you mean " : "", sug);
            break;
        }
        json_t *tmpl = NULL;
        size_t i;
        json_t *h;
        json_array_foreach(hosts, i, h) {
            if (host_has_type(h, ch->type)) {
                tmpl = h;
                break;
            }
        }
        json_t *nh = json_object();
        json_object_set_new(nh, "name", json_string(ch->name));
        json_object_set_new(nh, "address", json_string("planned"));
        if (tmpl && json_object_get(tmpl, "ssh"))
            json_object_set(nh, "ssh", json_object_get(tmpl, "ssh"));
        json_object_set_new(nh, "gpus", json_pack("{s:s, s:i}", "type",
                                                  spec ? spec->name : ch->type, "count",
                                                  ch->count));
        if (tmpl) {
            json_object_set(nh, "intra", json_object_get(tmpl, "intra"));
            json_object_set(nh, "nic", json_object_get(tmpl, "nic"));
        } else {
            json_object_set_new(nh, "intra",
                                json_pack("{s:s}", "kind",
                                          sxm_class(ch->type) ? "nvlink" : "pcie"));
            json_object_set_new(nh, "nic", json_pack("{s:s}", "bandwidth", "100Gb/s"));
        }
        if (ch->switch_name[0])
            json_object_set_new(nh, "switch", json_string(ch->switch_name));
        json_array_append_new(hosts, nh);
    }
    if (st == HX_OK) {
        char *text = json_dumps(doc, 0);
        hx_diags d;
        hx_diags_init(&d);
        if (!text) {
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
        } else if ((st = hx_inventory_load_string(text, strlen(text), "scenario", out, &d)) !=
                   HX_OK) {
            char first[512] = "";
            if (d.count)
                hx_diags_format(&d, 0, first, sizeof first);
            st = hx_err_set(err, HX_EINVAL, "the changed inventory is not valid: %s", first);
        }
        free(text);
        hx_diags_release(&d);
    }
    json_decref(doc);
    return st;
}

void hx_whatif_result_release(hx_whatif_result *r)
{
    if (!r)
        return;
    hx_plan_free(r->plan);
    r->plan = NULL;
}

static hx_plan *plan_copy(const hx_plan *p)
{
    json_t *j = hx_plan_to_json(p);
    hx_plan *c = NULL;
    hx_diags d;
    hx_diags_init(&d);
    if (j)
        hx_plan_from_json(j, "plan", &c, &d);
    hx_diags_release(&d);
    json_decref(j);
    return c;
}

hx_status hx_whatif_evaluate(const char *name, const hx_inventory *inv, const hx_model *model,
                             const hx_workload *wl, const hx_cost_params *params,
                             const hx_whatif_opts *opts, const hx_plan *base,
                             hx_whatif_result *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", name);
    out->devices = (int)inv->ndevices;
    hx_err err = {0};
    hx_plan *plan = NULL;
    if (hx_search_plan(inv, model, wl, params, &opts->search, &plan, NULL, &err) != HX_OK) {
        if (!base) {
            snprintf(out->error, sizeof out->error, "%s", err.msg);
            return HX_OK;
        }
    }
    if (base && (!plan || plan->throughput_rps < base->throughput_rps)) {
        /* the current plan still runs on a cluster that only grew */
        hx_plan_free(plan);
        plan = plan_copy(base);
        if (!plan)
            return HX_ENOMEM;
    }
    out->plan = plan;
    out->plan_rps = plan->throughput_rps;
    out->usd_per_hour = plan->usd_per_hour;

    hx_sim *sim = NULL;
    if (hx_sim_new(plan, model, &sim, &err) != HX_OK) {
        snprintf(out->error, sizeof out->error, "cannot simulate: %s", err.msg);
        return HX_OK;
    }
    hx_sim_opts so;
    hx_sim_opts_from_plan(&so, plan);
    so.requests = 0;
    so.duration_s = opts->sim_seconds > 0 ? opts->sim_seconds : HX_GOODPUT_SECONDS;
    double target = opts->attainment > 0 ? opts->attainment : wl->slo_attainment;
    double gp = 0;
    if (hx_sim_find_goodput(sim, &so, target, &gp, NULL, 0, NULL, &err) != HX_OK) {
        snprintf(out->error, sizeof out->error, "cannot simulate: %s", err.msg);
        hx_sim_free(sim);
        return HX_OK;
    }
    out->goodput_rps = gp;
    if (gp > 0) {
        hx_sim_result r;
        so.rate_rps = gp;
        if (hx_sim_run(sim, &so, &r, &err) == HX_OK) {
            out->ttft_p90_s = r.ttft_s.p90;
            out->tpot_p90_s = r.tpot_s.p90;
            hx_sim_result_release(&r);
        }
        out->usd_per_million_output_tokens =
            out->usd_per_hour / (gp * wl->output_tokens * 3600) * 1e6;
    }
    hx_sim_free(sim);
    out->ok = 1;
    return HX_OK;
}

/* ------------------------------------------------------------------------- */
/* Purchase advisor                                                           */

typedef struct candidate {
    const hx_gpu_spec *type;
    double gain_per_device; /* planned req/s per device added (one host's worth) */
} candidate;

/*
 * The integer program: n[t][s] hosts of type t and shape s, maximising the
 * planned gain within the budget; types in `banned` are left out. Returns
 * the number of hosts chosen (0 when nothing fits).
 */
static int solve_purchase(const candidate *c, int nc, const int *banned, double budget,
                          int (*hosts)[NSHAPES])
{
    glp_prob *lp = glp_create_prob();
    glp_set_obj_dir(lp, GLP_MAX);
    glp_add_rows(lp, 1);
    glp_set_row_bnds(lp, 1, GLP_UP, 0, budget);
    int ncols = nc * NSHAPES;
    glp_add_cols(lp, ncols);
    int *ia = malloc((size_t)(ncols + 1) * sizeof *ia), *ja = malloc((size_t)(ncols + 1) * sizeof *ja);
    double *ar = malloc((size_t)(ncols + 1) * sizeof *ar);
    int total = 0;
    if (!ia || !ja || !ar)
        goto out;
    for (int t = 0; t < nc; t++)
        for (int s = 0; s < NSHAPES; s++) {
            int col = t * NSHAPES + s + 1;
            glp_set_col_kind(lp, col, GLP_IV);
            int cap = banned[t] || c[t].gain_per_device <= 0 ? 0 : MAX_BUY_HOSTS_PER_TYPE;
            if (cap == 0)
                glp_set_col_bnds(lp, col, GLP_FX, 0, 0);
            else
                glp_set_col_bnds(lp, col, GLP_DB, 0, cap);
            double cost = c[t].type->usd_per_hour * shapes[s];
            /* gain, then fewer and larger hosts at equal gain */
            glp_set_obj_coef(lp, col, c[t].gain_per_device * shapes[s] - 1e-6 * cost - 1e-9);
            ia[col] = 1;
            ja[col] = col;
            ar[col] = cost;
        }
    glp_load_matrix(lp, ncols, ia, ja, ar);
    glp_iocp parm;
    glp_init_iocp(&parm);
    parm.presolve = GLP_ON;
    parm.msg_lev = GLP_MSG_OFF;
    int term = glp_term_out(GLP_OFF);
    int rc = glp_intopt(lp, &parm);
    glp_term_out(term);
    if (rc == 0 && (glp_mip_status(lp) == GLP_OPT || glp_mip_status(lp) == GLP_FEAS)) {
        for (int t = 0; t < nc; t++)
            for (int s = 0; s < NSHAPES; s++) {
                hosts[t][s] = (int)lround(glp_mip_col_val(lp, t * NSHAPES + s + 1));
                total += hosts[t][s];
            }
    }
out:
    free(ia);
    free(ja);
    free(ar);
    glp_delete_prob(lp);
    return total;
}

hx_status hx_whatif_budget(const hx_inventory *inv, const hx_model *model,
                           const hx_workload *wl, const hx_cost_params *params,
                           const hx_whatif_opts *opts, const hx_whatif_result *current,
                           double budget, hx_whatif_result *out, int max, int *n, hx_err *err)
{
    *n = 0;
    if (!(budget > 0))
        return hx_err_set(err, HX_EINVAL, "--budget: expected a positive $/hour");
    int ncat = (int)hx_catalog_count();
    candidate *cand = calloc((size_t)ncat, sizeof *cand);
    int (*hosts)[NSHAPES] = calloc((size_t)ncat, sizeof *hosts);
    int *banned = calloc((size_t)ncat, sizeof *banned);
    hx_status st = HX_OK;
    if (!cand || !hosts || !banned) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    /* 1. what one host of each type adds, by the planner */
    int nc = 0;
    hx_whatif_opts quick = *opts;
    for (int i = 0; i < ncat; i++) {
        const hx_gpu_spec *t = hx_catalog_at((size_t)i);
        /* the runtime's GPU backend is CUDA: propose NVIDIA parts only */
        if (t->is_cpu || t->usd_per_hour <= 0 || !strncasecmp(t->name, "MI", 2))
            continue;
        int shape = 0;
        for (int s = NSHAPES - 1; s >= 0 && !shape; s--)
            if (shapes[s] * t->usd_per_hour <= budget)
                shape = shapes[s];
        if (!shape)
            continue;
        hx_whatif_change ch;
        memset(&ch, 0, sizeof ch);
        snprintf(ch.name, sizeof ch.name, "probe-%d", i);
        snprintf(ch.type, sizeof ch.type, "%s", t->name);
        ch.count = shape;
        hx_inventory *grown = NULL;
        hx_err e = {0};
        if (hx_whatif_apply(inv, &ch, 1, &grown, &e) != HX_OK)
            continue;
        hx_plan *p = NULL;
        if (hx_search_plan(grown, model, wl, params, &quick.search, &p, NULL, &e) == HX_OK) {
            double gain = p->throughput_rps - current->plan_rps;
            cand[nc].type = t;
            cand[nc].gain_per_device = gain / shape;
            nc++;
        }
        hx_plan_free(p);
        hx_inventory_free(grown);
    }
    /* 2. the integer program, then again without the types already proposed */
    for (int option = 0; option < max && st == HX_OK; option++) {
        memset(hosts, 0, (size_t)ncat * sizeof *hosts);
        if (solve_purchase(cand, nc, banned, budget, hosts) == 0)
            break;
        hx_whatif_change ch[64];
        int nch = 0, main_type = -1, main_devices = 0;
        char label[HX_WHATIF_NAME_MAX] = "buy";
        size_t len = strlen(label);
        for (int t = 0; t < nc; t++) {
            int devices = 0;
            for (int s = 0; s < NSHAPES; s++) {
                for (int k = 0; k < hosts[t][s] && nch < 64; k++) {
                    memset(&ch[nch], 0, sizeof ch[nch]);
                    snprintf(ch[nch].name, sizeof ch[nch].name, "buy%d-%d", option + 1, nch + 1);
                    snprintf(ch[nch].type, sizeof ch[nch].type, "%s", cand[t].type->name);
                    ch[nch].count = shapes[s];
                    nch++;
                }
                devices += hosts[t][s] * shapes[s];
            }
            if (devices > 0) {
                int k = snprintf(label + len, sizeof label - len, " %d x %s", devices,
                                 cand[t].type->name);
                if (k > 0 && (size_t)k < sizeof label - len)
                    len += (size_t)k;
                if (devices > main_devices) {
                    main_devices = devices;
                    main_type = t;
                }
            }
        }
        if (main_type >= 0)
            banned[main_type] = 1;
        hx_inventory *grown = NULL;
        hx_err e = {0};
        if (hx_whatif_apply(inv, ch, nch, &grown, &e) != HX_OK)
            continue;
        st = hx_whatif_evaluate(label, grown, model, wl, params, opts, current->plan,
                                &out[*n]);
        hx_inventory_free(grown);
        if (st == HX_OK)
            (*n)++;
    }
    /* best goodput per dollar first */
    for (int i = 1; i < *n; i++)
        for (int k = i; k > 0; k--) {
            double a = out[k].usd_per_hour > 0 ? out[k].goodput_rps / out[k].usd_per_hour : 0;
            double b = out[k - 1].usd_per_hour > 0
                           ? out[k - 1].goodput_rps / out[k - 1].usd_per_hour
                           : 0;
            if (a <= b)
                break;
            hx_whatif_result tmp = out[k];
            out[k] = out[k - 1];
            out[k - 1] = tmp;
        }
out:
    free(cand);
    free(hosts);
    free(banned);
    return st;
}
