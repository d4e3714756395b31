/*
 * cost.c - the cost model (see cost.h and docs/cost-model.md).
 */
#include "cost.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/json.h"

/* ------------------------------------------------------------------------- */
/* Parameters                                                                 */

void hx_workload_default(hx_workload *w)
{
    w->input_tokens = 512;
    w->output_tokens = 128;
    w->rate_rps = 0;
    w->slo_ttft_s = 2.0;
    w->slo_tpot_s = 0.1;
    w->slo_attainment = 0.9;
}

void hx_cost_params_default(hx_cost_params *p)
{
    memset(p, 0, sizeof *p);
    p->compute_eff = 0.6;
    p->hbm_eff = 0.75;
    p->cpu_compute_eff = 0.5;
    p->cpu_hbm_eff = 0.6;
    p->net_eff = 0.8;
    p->mem_util = 0.92;
    p->ttft_budget = 0.5;
    p->tpot_budget = 0.9;
    p->max_prefill_batch = 16;
}

void hx_cost_params_release(hx_cost_params *p)
{
    if (!p)
        return;
    free(p->types);
    p->types = NULL;
    p->ntypes = 0;
}

static const hx_type_eff *type_eff(const hx_cost_params *p, const char *name)
{
    for (size_t i = 0; i < p->ntypes; i++)
        if (!strcasecmp(p->types[i].name, name))
            return &p->types[i];
    return NULL;
}

double hx_cost_compute_eff(const hx_cost_params *p, const hx_gpu_spec *s)
{
    const hx_type_eff *t = type_eff(p, s->name);
    if (t && t->compute > 0)
        return t->compute;
    return s->is_cpu ? p->cpu_compute_eff : p->compute_eff;
}

double hx_cost_hbm_eff(const hx_cost_params *p, const hx_gpu_spec *s)
{
    const hx_type_eff *t = type_eff(p, s->name);
    if (t && t->hbm > 0)
        return t->hbm;
    return s->is_cpu ? p->cpu_hbm_eff : p->hbm_eff;
}

/* Reads an optional fraction field in (0, 1]. */
static hx_status get_fraction(const json_t *obj, const char *key, const char *where,
                              const char *path, double *out, hx_err *err)
{
    double v;
    hx_status st = hx_json_get_number(obj, key, &v);
    if (st == HX_ENOENT)
        return HX_OK;
    if (st != HX_OK || !(v > 0 && v <= 1))
        return hx_err_set(err, HX_EINVAL,
                          "calibration '%s': %s.%s: expected a fraction in (0, 1]", path, where,
                          key);
    *out = v;
    return HX_OK;
}

static hx_status check_keys(const json_t *obj, const char *const *allowed, const char *where,
                            const char *path, hx_err *err)
{
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++)
            if (!strcmp(*a, key))
                ok = 1;
        if (!ok)
            return hx_err_set(err, HX_EINVAL, "calibration '%s': %s.%s: unknown field", path,
                              where, key);
    }
    return HX_OK;
}

hx_status hx_cost_params_load(hx_cost_params *p, const char *path, hx_err *err)
{
    static const char *const top_keys[] = {"defaults", "types", NULL};
    static const char *const def_keys[] = {"compute_efficiency", "hbm_efficiency",
                                           "network_efficiency", "memory_utilization",
                                           "ttft_budget", "tpot_budget", "max_prefill_batch",
                                           "cpu_compute_efficiency", "cpu_hbm_efficiency", NULL};
    static const char *const type_keys[] = {"compute_efficiency", "hbm_efficiency", NULL};
    json_t *root = NULL;
    hx_status st = hx_json_load_file(path, "calibration", &root, err);
    if (st != HX_OK)
        return st;
    if (!json_is_object(root)) {
        st = hx_err_set(err, HX_EPARSE, "calibration '%s': expected a JSON object", path);
        goto out;
    }
    if ((st = check_keys(root, top_keys, "(top)", path, err)) != HX_OK)
        goto out;
    json_t *d = json_object_get(root, "defaults");
    if (d) {
        if (!json_is_object(d)) {
            st = hx_err_set(err, HX_EPARSE, "calibration '%s': defaults: expected an object",
                            path);
            goto out;
        }
        if ((st = check_keys(d, def_keys, "defaults", path, err)) != HX_OK ||
            (st = get_fraction(d, "compute_efficiency", "defaults", path, &p->compute_eff,
                               err)) != HX_OK ||
            (st = get_fraction(d, "hbm_efficiency", "defaults", path, &p->hbm_eff, err)) !=
                HX_OK ||
            (st = get_fraction(d, "cpu_compute_efficiency", "defaults", path,
                               &p->cpu_compute_eff, err)) != HX_OK ||
            (st = get_fraction(d, "cpu_hbm_efficiency", "defaults", path, &p->cpu_hbm_eff,
                               err)) != HX_OK ||
            (st = get_fraction(d, "network_efficiency", "defaults", path, &p->net_eff, err)) !=
                HX_OK ||
            (st = get_fraction(d, "memory_utilization", "defaults", path, &p->mem_util, err)) !=
                HX_OK ||
            (st = get_fraction(d, "ttft_budget", "defaults", path, &p->ttft_budget, err)) !=
                HX_OK ||
            (st = get_fraction(d, "tpot_budget", "defaults", path, &p->tpot_budget, err)) !=
                HX_OK)
            goto out;
        long long b;
        hx_status bs = hx_json_get_int(d, "max_prefill_batch", &b);
        if (bs == HX_OK && b >= 1 && b <= 4096) {
            p->max_prefill_batch = (int)b;
        } else if (bs != HX_ENOENT) {
            st = hx_err_set(err, HX_EINVAL,
                            "calibration '%s': defaults.max_prefill_batch: expected an integer "
                            "from 1 to 4096",
                            path);
            goto out;
        }
    }
    json_t *types = json_object_get(root, "types");
    if (types) {
        if (!json_is_object(types)) {
            st = hx_err_set(err, HX_EPARSE,
                            "calibration '%s': types: expected an object of type names", path);
            goto out;
        }
        const char *name;
        json_t *t;
        json_object_foreach(types, name, t) {
            char where[96];
            snprintf(where, sizeof where, "types.%s", name);
            if (!json_is_object(t)) {
                st = hx_err_set(err, HX_EPARSE, "calibration '%s': %s: expected an object", path,
                                where);
                goto out;
            }
            if (strlen(name) >= HX_GPU_NAME_MAX) {
                st = hx_err_set(err, HX_EINVAL, "calibration '%s': %s: name too long", path,
                                where);
                goto out;
            }
            hx_type_eff e;
            memset(&e, 0, sizeof e);
            snprintf(e.name, sizeof e.name, "%s", name);
            const hx_gpu_spec *cat = hx_catalog_find(name);
            if (cat)
                snprintf(e.name, sizeof e.name, "%s", cat->name);
            if ((st = check_keys(t, type_keys, where, path, err)) != HX_OK ||
                (st = get_fraction(t, "compute_efficiency", where, path, &e.compute, err)) !=
                    HX_OK ||
                (st = get_fraction(t, "hbm_efficiency", where, path, &e.hbm, err)) != HX_OK)
                goto out;
            hx_type_eff *n = realloc(p->types, (p->ntypes + 1) * sizeof *n);
            if (!n) {
                st = hx_err_set(err, HX_ENOMEM, "out of memory");
                goto out;
            }
            p->types = n;
            p->types[p->ntypes++] = e;
        }
    }
out:
    json_decref(root);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Context                                                                    */

void hx_cost_ctx_init(hx_cost_ctx *c, const hx_model *model, const hx_graph *graph,
                      const hx_cost_params *params, const hx_workload *wl)
{
    memset(c, 0, sizeof *c);
    c->model = model;
    c->graph = graph;
    c->params = params;
    c->wl = *wl;
    if (c->wl.output_tokens < 1)
        c->wl.output_tokens = 1;
    if (c->wl.input_tokens < 1)
        c->wl.input_tokens = 1;

    int64_t in = (int64_t)llround(c->wl.input_tokens);
    hx_model_flops f;
    hx_model_prefill_flops(model, in, &f);
    c->prefill_layer_flops = f.layer.total_flops;
    c->prefill_embed_flops = f.embed_flops;
    c->prefill_head_flops = f.head_flops;

    c->ctx_mean_tokens = c->wl.input_tokens + c->wl.output_tokens / 2;
    c->ctx_max_tokens = c->wl.input_tokens + c->wl.output_tokens;
    hx_model_decode_flops(model, (int64_t)llround(c->ctx_mean_tokens), &f);
    c->decode_layer_flops = f.layer.total_flops;
    c->decode_embed_flops = f.embed_flops;
    c->decode_head_flops = f.head_flops;
    c->decode_tokens = c->wl.output_tokens - 1 >= 1 ? c->wl.output_tokens - 1 : 1;

    c->layer_bytes = (double)hx_model_layer_weight_bytes(model);
    c->kv_bytes_per_token_layer =
        (double)hx_model_kv_bytes_per_token(model) / (double)model->num_layers;
    c->kv_bytes_per_request = (double)hx_model_kv_bytes_per_token(model) * c->wl.input_tokens;
}

/* ------------------------------------------------------------------------- */
/* Evaluation                                                                 */

double hx_cost_stage_weight_bytes(const hx_cost_ctx *c, const hx_layout *l, int i)
{
    int64_t b = 0;
    if (hx_model_stage_weight_bytes(c->model, l->first_layer[i], l->num_layers[i], &b, NULL) !=
        HX_OK)
        return INFINITY;
    return (double)b;
}

/* Fraction of the KV heads one device of a TP group holds (heads replicate when tp > K). */
static double kv_shard(const hx_model *m, int tp)
{
    double per_dev = (double)m->num_kv_heads / tp;
    if (per_dev < 1)
        per_dev = 1;
    return per_dev / m->num_kv_heads;
}

void hx_group_model_init(const hx_cost_ctx *c, const hx_layout *l, hx_group_model *gm)
{
    const hx_model *m = c->model;
    const hx_cost_params *p = c->params;
    hx_model_flops f;
    hx_model_decode_flops(m, 0, &f); /* per-token parts, no attention */
    memset(gm, 0, sizeof *gm);
    gm->nstages = l->nstages;
    gm->window_tokens = m->sliding_window_tokens;
    gm->hidden_size = m->hidden_size;
    gm->intermediate_size = m->intermediate_size;
    gm->vocab_size = m->vocab_size;
    gm->mem_util = p->mem_util;
    int off = 0;
    for (int i = 0; i < l->nstages; i++) {
        hx_stage_model *st = &gm->st[i];
        int tp = l->tp[i];
        st->tp = tp;
        st->num_layers = l->num_layers[i];
        st->flops_per_s = INFINITY;
        st->bytes_per_s = INFINITY;
        st->mem_bytes = INFINITY;
        st->tp_bw = INFINITY;
        for (int k = 0; k < tp; k++) {
            int d = l->devices[off + k];
            const hx_gpu_spec *s = hx_graph_device_spec(c->graph, d);
            st->flops_per_s = fmin(st->flops_per_s, s->bf16_flops * hx_cost_compute_eff(p, s));
            st->bytes_per_s = fmin(st->bytes_per_s, s->hbm_bytes_per_s * hx_cost_hbm_eff(p, s));
            st->mem_bytes = fmin(st->mem_bytes, s->memory_bytes * p->mem_util);
            if (tp > 1) {
                hx_path path = hx_graph_path(c->graph, d, l->devices[off + (k + 1) % tp]);
                st->tp_bw = fmin(st->tp_bw, path.bytes_per_s * p->net_eff);
                st->tp_lat = fmax(st->tp_lat, path.latency_s);
            }
        }
        if (i + 1 < l->nstages) {
            hx_path path = hx_graph_path(c->graph, l->devices[off + tp - 1], l->devices[off + tp]);
            st->next_bw = path.bytes_per_s * p->net_eff;
            st->next_lat = path.latency_s;
        } else {
            st->next_bw = INFINITY;
        }
        off += tp;
        st->weights_bytes = hx_cost_stage_weight_bytes(c, l, i) / tp;
        st->tok_flops = st->num_layers * f.layer.total_flops +
                        (l->first_layer[i] == 0 ? f.embed_flops : 0);
        st->head_flops = i == l->nstages - 1 ? f.head_flops : 0;
        st->attn_flops_per_key = 4.0 * m->num_heads * m->head_dim * st->num_layers;
        st->kv_bytes_per_token = c->kv_bytes_per_token_layer * st->num_layers * kv_shard(m, tp);
        st->act_bytes_per_token = (double)m->hidden_size * m->dtype_bytes;
    }
}

/* Ring all-reduce of `bytes` over tp devices. */
static double allreduce_s(double bytes, int tp, double bw, double lat)
{
    if (tp <= 1)
        return 0;
    return 2.0 * (tp - 1) / tp * bytes / bw + 2.0 * (tp - 1) * lat;
}

/* Roofline time of one stage for `tokens` tokens, `seqs` sequences and `keys` attention pairs. */
static double stage_s(const hx_stage_model *st, double tokens, double seqs, double keys,
                      double kv_read_bytes)
{
    double flops = tokens * st->tok_flops + seqs * st->head_flops + keys * st->attn_flops_per_key;
    double t = fmax(flops / st->tp / st->flops_per_s,
                    (st->weights_bytes + kv_read_bytes) / st->bytes_per_s);
    double act = tokens * st->act_bytes_per_token;
    t += 2.0 * st->num_layers * allreduce_s(act, st->tp, st->tp_bw, st->tp_lat);
    if (!isinf(st->next_bw))
        t += act / st->next_bw + st->next_lat;
    return t;
}

double hx_group_prefill_s(const hx_group_model *gm, int prompts, double tokens, double key_pairs,
                          double *occupancy_s)
{
    double lat = 0, slowest = 0;
    for (int i = 0; i < gm->nstages; i++) {
        double t = stage_s(&gm->st[i], tokens, prompts, key_pairs, 0);
        lat += t;
        slowest = fmax(slowest, t);
    }
    if (occupancy_s)
        *occupancy_s = slowest;
    return lat;
}

double hx_group_decode_step_s(const hx_group_model *gm, double batch, double keys)
{
    /* pp micro-batches of batch/pp requests in flight, one stage each */
    int pp = gm->nstages;
    double b = batch / pp, k = keys / pp, slowest = 0, sum = 0;
    for (int i = 0; i < pp; i++) {
        double t = stage_s(&gm->st[i], b, b, k, k * gm->st[i].kv_bytes_per_token);
        slowest = fmax(slowest, t);
        sum += t;
    }
    return pp > 1 ? fmax(sum, pp * slowest) : slowest;
}

/* Activation workspace per device for `tokens` tokens in flight (fp32 scratch). */
static double workspace_bytes(const hx_group_model *gm, double tokens, int tp)
{
    double per_token = 4.0 * gm->hidden_size + 3.0 * gm->intermediate_size / tp +
                       (double)gm->vocab_size / tp;
    return tokens * per_token * 4.0 + 64.0 * 1048576.0; /* + fixed runtime buffers */
}

double hx_group_kv_tokens(const hx_group_model *gm, double workspace_tokens)
{
    double tokens = INFINITY;
    for (int i = 0; i < gm->nstages; i++) {
        const hx_stage_model *st = &gm->st[i];
        double free_b = st->mem_bytes - st->weights_bytes -
                        workspace_bytes(gm, workspace_tokens, st->tp);
        if (free_b <= 0)
            return 0;
        tokens = fmin(tokens, free_b / st->kv_bytes_per_token);
    }
    return isinf(tokens) ? 0 : floor(tokens);
}

/* Mean attention pairs of one causal prompt of s tokens (window-aware). */
static double prompt_key_pairs(double s, int window)
{
    if (window <= 0 || s <= window)
        return s * (s + 1) / 2;
    return (double)window * (window + 1) / 2 + (s - window) * window;
}

static double context_keys(double ctx, int window)
{
    return window > 0 && ctx > window ? window : ctx;
}

typedef struct prefill_res {
    int ok;
    double capacity_rps, ttft_s;
    int batch;
    const char *limit;
} prefill_res;

static void eval_prefill(const hx_cost_ctx *c, const hx_group_model *gm, prefill_res *r)
{
    const hx_cost_params *p = c->params;
    double s = c->wl.input_tokens, budget = p->ttft_budget * c->wl.slo_ttft_s;
    double pairs = prompt_key_pairs(s, gm->window_tokens);
    r->ok = 0;
    r->capacity_rps = 0;
    r->ttft_s = INFINITY;
    r->batch = 0;
    r->limit = "memory (weights)";
    for (int b = 1; b <= p->max_prefill_batch; b++) {
        /* memory: weights + workspace + KV of two batches (one computing, one sending) */
        int fits = 1;
        for (int i = 0; i < gm->nstages; i++) {
            const hx_stage_model *st = &gm->st[i];
            if (st->weights_bytes + workspace_bytes(gm, b * s, st->tp) +
                    2.0 * b * s * st->kv_bytes_per_token >
                st->mem_bytes) {
                fits = 0;
                break;
            }
        }
        if (!fits) {
            if (b == 1)
                r->limit = "memory (weights and one prompt do not fit)";
            break;
        }
        double slowest;
        double lat = hx_group_prefill_s(gm, b, b * s, b * pairs, &slowest);
        if (lat > budget) {
            if (b == 1)
                r->limit = "TTFT SLO (one prompt takes too long)";
            break;
        }
        double cap = b / slowest;
        if (cap > r->capacity_rps * 1.0001) {
            r->ok = 1;
            r->capacity_rps = cap;
            r->ttft_s = lat;
            r->batch = b;
            r->limit = "prefill compute";
        }
    }
}

/* TPOT with `concurrency` requests at the mean context. */
static double decode_tpot(const hx_cost_ctx *c, const hx_group_model *gm, double concurrency)
{
    return hx_group_decode_step_s(gm, concurrency,
                                  concurrency * context_keys(c->ctx_mean_tokens,
                                                             gm->window_tokens));
}

typedef struct decode_res {
    int ok;
    double capacity_rps, tpot_s;
    int concurrency; /* pp x B */
    double kv_tokens;
    const char *limit;
} decode_res;

/* Largest concurrency whose KV at full context fits beside weights and workspace. */
static int decode_max_concurrency(const hx_cost_ctx *c, const hx_group_model *gm,
                                  double extra_tokens, double *kv_tokens)
{
    /* workspace for the decode batch is small; size it for 256 tokens in flight */
    *kv_tokens = hx_group_kv_tokens(gm, 256 + extra_tokens);
    double n = floor(*kv_tokens / c->ctx_max_tokens);
    return n > 1e6 ? 1000000 : (int)n;
}

static void eval_decode(const hx_cost_ctx *c, const hx_group_model *gm, double tpot_limit_s,
                        decode_res *r)
{
    int pp = gm->nstages;
    r->ok = 0;
    r->capacity_rps = 0;
    r->tpot_s = INFINITY;
    r->concurrency = 0;
    int nmax = decode_max_concurrency(c, gm, 0, &r->kv_tokens);
    if (nmax < pp) {
        r->limit = nmax < 1 ? "memory (weights leave no room for KV)"
                            : "memory (too little KV for the pipeline)";
        return;
    }
    int bmax = nmax / pp;
    if (decode_tpot(c, gm, pp) > tpot_limit_s) {
        r->limit = "TPOT SLO (one request steps too slowly)";
        return;
    }
    /* TPOT grows with the micro-batch B: the largest B within the limit */
    int lo = 1, hi = bmax;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (decode_tpot(c, gm, (double)pp * mid) <= tpot_limit_s)
            lo = mid;
        else
            hi = mid - 1;
    }
    r->ok = 1;
    r->concurrency = pp * lo;
    r->tpot_s = decode_tpot(c, gm, r->concurrency);
    r->capacity_rps = r->concurrency / (c->decode_tokens * r->tpot_s);
    r->limit = lo == bmax ? "decode KV memory" : "decode HBM bandwidth (TPOT SLO)";
}

void hx_cost_eval(const hx_cost_ctx *c, const hx_layout *l, hx_role role, hx_perf *out)
{
    memset(out, 0, sizeof *out);
    out->role = role;
    out->ttft_s = -1;
    out->tpot_s = -1;
    hx_group_model gm;
    hx_group_model_init(c, l, &gm);
    for (int i = 0; i < l->nstages; i++) {
        out->mem[i].capacity_bytes = gm.st[i].mem_bytes / c->params->mem_util;
        out->mem[i].weights_bytes = gm.st[i].weights_bytes;
    }
    double s = c->wl.input_tokens;

    if (role == HX_ROLE_PREFILL) {
        prefill_res pr;
        eval_prefill(c, &gm, &pr);
        out->feasible = pr.ok;
        out->capacity_rps = pr.capacity_rps;
        out->ttft_s = pr.ok ? pr.ttft_s : -1;
        out->batch = pr.batch;
        out->limit = pr.limit;
        if (pr.ok)
            for (int i = 0; i < l->nstages; i++) {
                out->mem[i].workspace_bytes = workspace_bytes(&gm, pr.batch * s, l->tp[i]);
                out->mem[i].kv_bytes = 2.0 * pr.batch * s * gm.st[i].kv_bytes_per_token;
            }
        return;
    }

    double tpot_limit = c->params->tpot_budget * c->wl.slo_tpot_s;
    if (role == HX_ROLE_DECODE) {
        decode_res dr;
        eval_decode(c, &gm, tpot_limit, &dr);
        out->feasible = dr.ok;
        out->capacity_rps = dr.capacity_rps;
        out->tpot_s = dr.ok ? dr.tpot_s : -1;
        out->batch = dr.concurrency;
        out->kv_tokens = dr.kv_tokens;
        out->limit = dr.limit;
    } else {
        /*
         * Colocated: a fraction x = R/P of the time goes to prefill, which
         * stretches decode steps to TPOT/(1 - x). Both SLOs must hold:
         * R <= P (1 - TPOT(B)/limit) and R <= (1 - x) D(B) = P D / (P + D).
         */
        prefill_res pr;
        eval_prefill(c, &gm, &pr);
        if (!pr.ok) {
            out->limit = pr.limit;
            return;
        }
        double P = pr.capacity_rps, kv_tokens;
        int pp = l->nstages;
        int nmax = decode_max_concurrency(c, &gm, pr.batch * s, &kv_tokens);
        if (nmax < pp) {
            out->limit = "memory (weights leave no room for KV)";
            return;
        }
        double best = 0, best_tpot = 0;
        int bestB = 0;
        for (int B = 1; B <= nmax / pp; B = B < 8 ? B + 1 : (int)(B * 1.25) + 1) {
            double t = decode_tpot(c, &gm, (double)pp * B);
            if (t > tpot_limit)
                break;
            double D = pp * B / (c->decode_tokens * t);
            double r = fmin(P * (1 - t / tpot_limit), P * D / (P + D));
            if (r > best) {
                best = r;
                bestB = B;
                best_tpot = t / (1 - r / P);
            }
        }
        if (bestB == 0) {
            out->limit = "TPOT SLO (one request steps too slowly)";
            return;
        }
        /* prefill latency also waits for the decode step in progress */
        if (pr.ttft_s + best_tpot > c->params->ttft_budget * c->wl.slo_ttft_s) {
            out->limit = "TTFT SLO (prefill behind decode steps)";
            return;
        }
        out->feasible = 1;
        out->capacity_rps = best;
        out->ttft_s = pr.ttft_s;
        out->tpot_s = best_tpot;
        out->batch = pp * bestB;
        out->kv_tokens = kv_tokens;
        out->limit = "colocated prefill/decode interference";
    }
    if (out->feasible)
        for (int i = 0; i < l->nstages; i++) {
            out->mem[i].kv_bytes = (double)out->batch * c->ctx_max_tokens *
                                   gm.st[i].kv_bytes_per_token;
            out->mem[i].workspace_bytes = workspace_bytes(&gm, 256, l->tp[i]);
        }
}

hx_status hx_layout_check(const hx_cost_ctx *c, const hx_layout *l, hx_err *err)
{
    const hx_model *m = c->model;
    if (l->nstages < 1 || l->nstages > HX_MAX_STAGES)
        return hx_err_set(err, HX_EINVAL, "%d stages; expected 1 to %d", l->nstages,
                          HX_MAX_STAGES);
    int next = 0, ndev = 0;
    for (int i = 0; i < l->nstages; i++) {
        if (l->first_layer[i] != next || l->num_layers[i] < 1)
            return hx_err_set(err, HX_EINVAL,
                              "stage %d holds layers %d..%d; expected to start at layer %d", i,
                              l->first_layer[i], l->first_layer[i] + l->num_layers[i] - 1,
                              next);
        next += l->num_layers[i];
        if (l->tp[i] < 1 || m->num_heads % l->tp[i] != 0)
            return hx_err_set(err, HX_EINVAL,
                              "stage %d has TP degree %d, which does not divide the %d "
                              "attention heads",
                              i, l->tp[i], m->num_heads);
        ndev += l->tp[i];
    }
    if (next != m->num_layers)
        return hx_err_set(err, HX_EINVAL, "stages cover %d layers; the model has %d", next,
                          m->num_layers);
    if (ndev != l->ndevices || ndev > HX_MAX_GROUP_DEVICES)
        return hx_err_set(err, HX_EINVAL, "stages hold %d devices; the layout lists %d", ndev,
                          l->ndevices);
    size_t nd = hx_graph_num_devices(c->graph);
    for (int i = 0; i < l->ndevices; i++) {
        if (l->devices[i] < 0 || (size_t)l->devices[i] >= nd)
            return hx_err_set(err, HX_EINVAL, "device %d does not exist", l->devices[i]);
        for (int k = 0; k < i; k++)
            if (l->devices[k] == l->devices[i])
                return hx_err_set(err, HX_EINVAL, "device %d is used twice", l->devices[i]);
    }
    return HX_OK;
}

/* ------------------------------------------------------------------------- */
/* Layout search                                                              */

/* TP degrees a stage may take: divide the heads; KV heads divide or are divided. */
static int valid_tp(const hx_model *m, int t)
{
    return t >= 1 && m->num_heads % t == 0 &&
           (m->num_kv_heads % t == 0 || t % m->num_kv_heads == 0);
}

static int largest_valid_tp(const hx_model *m, int cap)
{
    for (int t = cap; t >= 1; t--)
        if (valid_tp(m, t))
            return t;
    return 1;
}

typedef struct block {
    int host;
    int first; /* index into the sorted device list */
    int count;
} block;

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/*
 * Splits `L` layers over stages in proportion to weight[i], each stage at least
 * one layer and at most cap[i] layers. Returns 0 when the caps cannot hold L.
 */
static int split_layers(int L, int n, const double *weight, const int *cap, int *out)
{
    long total_cap = 0;
    for (int i = 0; i < n; i++) {
        if (cap[i] < 1)
            return 0;
        total_cap += cap[i];
    }
    if (total_cap < L || n > L)
        return 0;
    double wsum = 0;
    for (int i = 0; i < n; i++)
        wsum += weight[i];
    int assigned = 0;
    double rem[HX_MAX_STAGES];
    for (int i = 0; i < n; i++) {
        double share = L * weight[i] / wsum;
        int k = (int)floor(share);
        if (k < 1)
            k = 1;
        if (k > cap[i])
            k = cap[i];
        out[i] = k;
        rem[i] = share - k;
        assigned += k;
    }
    /* hand out the rest by largest remainder, within caps; take back the excess likewise */
    while (assigned < L) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (out[i] < cap[i] && (best < 0 || rem[i] > rem[best]))
                best = i;
        if (best < 0)
            return 0;
        out[best]++;
        rem[best] -= 1;
        assigned++;
    }
    while (assigned > L) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (out[i] > 1 && (best < 0 || rem[i] < rem[best]))
                best = i;
        if (best < 0)
            return 0;
        out[best]--;
        rem[best] += 1;
        assigned--;
    }
    return 1;
}

/* Builds stage structure from per-block TP choices; returns stages or 0 if too many. */
static int build_stages(const hx_cost_ctx *c, const int *sorted, const block *blocks,
                        int nblocks, const int *tp_of_block, hx_layout *l)
{
    const hx_model *m = c->model;
    l->nstages = 0;
    l->ndevices = 0;
    for (int b = 0; b < nblocks; b++) {
        int left = blocks[b].count, at = blocks[b].first;
        while (left > 0) {
            int t = tp_of_block[b] <= left ? tp_of_block[b] : largest_valid_tp(m, left);
            if (l->nstages >= HX_MAX_STAGES || l->nstages >= m->num_layers)
                return 0;
            l->tp[l->nstages++] = t;
            for (int k = 0; k < t; k++)
                l->devices[l->ndevices++] = sorted[at + k];
            at += t;
            left -= t;
        }
    }
    return l->nstages;
}

/* Tries the layer splits of a stage structure; keeps the best in *best. */
static void try_splits(const hx_cost_ctx *c, hx_layout *l, hx_role role, hx_layout *best,
                       hx_perf *bestp, int *found)
{
    const hx_model *m = c->model;
    const hx_cost_params *p = c->params;
    int n = l->nstages;
    double speed[HX_MAX_STAGES], memw[HX_MAX_STAGES];
    int cap[HX_MAX_STAGES];
    int off = 0;
    for (int i = 0; i < n; i++) {
        double f = INFINITY, h = INFINITY, mem = INFINITY;
        for (int k = 0; k < l->tp[i]; k++) {
            const hx_gpu_spec *s = hx_graph_device_spec(c->graph, l->devices[off + k]);
            f = fmin(f, s->bf16_flops * hx_cost_compute_eff(p, s));
            h = fmin(h, s->hbm_bytes_per_s * hx_cost_hbm_eff(p, s));
            mem = fmin(mem, s->memory_bytes * p->mem_util);
        }
        off += l->tp[i];
        speed[i] = l->tp[i] * (role == HX_ROLE_PREFILL ? f : h);
        memw[i] = l->tp[i] * mem;
        /* layers that fit beside the embedding/head share and some workspace */
        hx_group_model ws = {0};
        ws.hidden_size = m->hidden_size;
        ws.intermediate_size = m->intermediate_size;
        ws.vocab_size = m->vocab_size;
        double fixed = (double)hx_model_embed_weight_bytes(m) / l->tp[i] * (i == 0) +
                       (double)hx_model_head_weight_bytes(m) / l->tp[i] * (i == n - 1) +
                       workspace_bytes(&ws, c->wl.input_tokens, l->tp[i]);
        double room = mem - fixed;
        cap[i] = room > 0 ? (int)floor(room / (c->layer_bytes / l->tp[i])) : 0;
        if (cap[i] > m->num_layers)
            cap[i] = m->num_layers;
    }
    double blend[HX_MAX_STAGES];
    double ssum = 0, msum = 0;
    for (int i = 0; i < n; i++) {
        ssum += speed[i];
        msum += memw[i];
    }
    for (int i = 0; i < n; i++)
        blend[i] = 0.5 * speed[i] / ssum + 0.5 * memw[i] / msum;
    const double *weights[3] = {speed, memw, blend};
    int variants = n == 1 ? 1 : 3;
    for (int v = 0; v < variants; v++) {
        int layers[HX_MAX_STAGES];
        if (!split_layers(m->num_layers, n, weights[v], cap, layers))
            continue;
        int first = 0;
        for (int i = 0; i < n; i++) {
            l->first_layer[i] = first;
            l->num_layers[i] = layers[i];
            first += layers[i];
        }
        hx_perf perf;
        hx_cost_eval(c, l, role, &perf);
        if (!*found || (perf.feasible && !bestp->feasible) ||
            (perf.feasible == bestp->feasible &&
             (perf.capacity_rps > bestp->capacity_rps * (1 + 1e-9) ||
              (perf.capacity_rps >= bestp->capacity_rps * (1 - 1e-9) &&
               l->nstages < best->nstages)))) {
            *best = *l;
            *bestp = perf;
            *found = 1;
        }
    }
}

int hx_cost_best_layout(const hx_cost_ctx *c, const int *devices, int n, hx_role role,
                        hx_layout *best, hx_perf *perf)
{
    memset(perf, 0, sizeof *perf);
    perf->role = role;
    perf->limit = "no devices";
    if (n < 1 || n > HX_MAX_GROUP_DEVICES) {
        perf->limit = n < 1 ? "no devices" : "too many devices in one group";
        return 0;
    }
    const hx_model *m = c->model;
    /* stays when no layer split fits anywhere */
    perf->limit = "memory (the weights do not fit on these devices)";
    int sorted[HX_MAX_GROUP_DEVICES];
    memcpy(sorted, devices, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_int);
    block blocks[HX_MAX_GROUP_DEVICES];
    int nblocks = 0;
    for (int i = 0; i < n; i++) {
        int h = hx_graph_device_host(c->graph, sorted[i]);
        if (nblocks > 0 && blocks[nblocks - 1].host == h) {
            blocks[nblocks - 1].count++;
        } else {
            blocks[nblocks].host = h;
            blocks[nblocks].first = i;
            blocks[nblocks].count = 1;
            nblocks++;
        }
    }
    int found = 0;
    hx_layout l;
    memset(&l, 0, sizeof l);
    int tps[HX_MAX_GROUP_DEVICES];
    /* one TP cap for all blocks: 1, 2, 4, ... */
    for (int cap = 1; cap <= 2 * n; cap *= 2) {
        for (int b = 0; b < nblocks; b++)
            tps[b] = largest_valid_tp(m, cap < blocks[b].count ? cap : blocks[b].count);
        if (build_stages(c, sorted, blocks, nblocks, tps, &l))
            try_splits(c, &l, role, best, perf, &found);
    }
    /* few blocks: every combination of per-block TP degrees */
    if (nblocks >= 2 && nblocks <= 3) {
        int opts[3][8], nopts[3];
        for (int b = 0; b < nblocks; b++) {
            nopts[b] = 0;
            for (int t = 1; t <= blocks[b].count && nopts[b] < 8; t *= 2)
                if (valid_tp(m, t))
                    opts[b][nopts[b]++] = t;
            if (!valid_tp(m, blocks[b].count) || (blocks[b].count & (blocks[b].count - 1))) {
                int t = largest_valid_tp(m, blocks[b].count);
                if (nopts[b] < 8 && t != opts[b][nopts[b] - 1])
                    opts[b][nopts[b]++] = t;
            }
        }
        int idx[3] = {0, 0, 0};
        for (;;) {
            for (int b = 0; b < nblocks; b++)
                tps[b] = opts[b][idx[b]];
            if (build_stages(c, sorted, blocks, nblocks, tps, &l))
                try_splits(c, &l, role, best, perf, &found);
            int b = 0;
            while (b < nblocks && ++idx[b] == nopts[b])
                idx[b++] = 0;
            if (b == nblocks)
                break;
        }
    }
    return found && perf->feasible;
}

/* ------------------------------------------------------------------------- */
/* KV links                                                                   */

double hx_cost_kv_link_bytes_per_s(const hx_cost_ctx *c, const hx_layout *p,
                                   const hx_layout *d)
{
    const hx_graph *g = c->graph;
    const hx_inventory *inv = hx_graph_inventory(g);
    double eff = c->params->net_eff;
    /* devices per host on each side */
    int hp[HX_MAX_GROUP_DEVICES], np[HX_MAX_GROUP_DEVICES], nhp = 0;
    int hd[HX_MAX_GROUP_DEVICES], nd[HX_MAX_GROUP_DEVICES], nhd = 0;
    for (int i = 0; i < p->ndevices; i++) {
        int h = hx_graph_device_host(g, p->devices[i]), k;
        for (k = 0; k < nhp && hp[k] != h; k++)
            ;
        if (k == nhp) {
            hp[nhp] = h;
            np[nhp++] = 0;
        }
        np[k]++;
    }
    for (int i = 0; i < d->ndevices; i++) {
        int h = hx_graph_device_host(g, d->devices[i]), k;
        for (k = 0; k < nhd && hd[k] != h; k++)
            ;
        if (k == nhd) {
            hd[nhd] = h;
            nd[nhd++] = 0;
        }
        nd[k]++;
    }
    double local = 0, egress = 0, ingress = 0, paths = 0;
    for (int a = 0; a < nhp; a++) {
        int shared = 0;
        for (int b = 0; b < nhd; b++) {
            if (hp[a] == hd[b]) {
                /* device pairs on one host copy in parallel over the intra link */
                int pairs = np[a] < nd[b] ? np[a] : nd[b];
                local += pairs * inv->hosts[hp[a]].intra_bytes_per_s;
                shared = 1;
            } else {
                paths += hx_graph_host_path(g, hp[a], hd[b]).bytes_per_s;
            }
        }
        if (!shared || nhd > 1)
            egress += inv->hosts[hp[a]].nic_bytes_per_s;
    }
    for (int b = 0; b < nhd; b++)
        ingress += inv->hosts[hd[b]].nic_bytes_per_s;
    double remote = fmin(paths, fmin(egress, ingress));
    /* uplinks of the switches crossed, shared by every path between them */
    double up_p = 0, up_d = 0;
    int cross = 0, unlimited_p = 0, unlimited_d = 0;
    for (int a = 0; a < nhp; a++)
        for (int b = 0; b < nhd; b++)
            if (inv->hosts[hp[a]].switch_index != inv->hosts[hd[b]].switch_index)
                cross = 1;
    if (cross) {
        int seen[64], ns = 0;
        for (int a = 0; a < nhp; a++) {
            int s = inv->hosts[hp[a]].switch_index, k;
            for (k = 0; k < ns && seen[k] != s; k++)
                ;
            if (k < ns || ns >= 64)
                continue;
            seen[ns++] = s;
            if (s < 0 || inv->switches[s].uplink_bytes_per_s <= 0)
                unlimited_p = 1;
            else
                up_p += inv->switches[s].uplink_bytes_per_s;
        }
        ns = 0;
        for (int b = 0; b < nhd; b++) {
            int s = inv->hosts[hd[b]].switch_index, k;
            for (k = 0; k < ns && seen[k] != s; k++)
                ;
            if (k < ns || ns >= 64)
                continue;
            seen[ns++] = s;
            if (s < 0 || inv->switches[s].uplink_bytes_per_s <= 0)
                unlimited_d = 1;
            else
                up_d += inv->switches[s].uplink_bytes_per_s;
        }
        if (!unlimited_p)
            remote = fmin(remote, up_p);
        if (!unlimited_d)
            remote = fmin(remote, up_d);
    }
    return (local + remote) * eff;
}
