/*
 * plan.c - the deployment plan: building, JSON form, reading and validation.
 *
 * Reading is done in two passes so that every problem is reported once:
 *
 *   1. the reader walks the JSON, checks each field's type and range, rejects
 *      fields it does not know (with a suggestion) and resolves route group
 *      ids, collecting every problem it finds;
 *   2. when the file read cleanly, hx_plan_validate checks the invariants that
 *      tie fields together (device names against hosts, a device used twice,
 *      stage contiguity, route roles ...), again collecting every problem.
 *
 * Validation is kept separate from reading so that plans built in code (the
 * planner) are held to the same rules. Every check is O(n log n) or better in
 * the size of the plan: a hostile file cannot make the reader quadratic.
 */
#define _POSIX_C_SOURCE 200809L
#include "plan.h"

#include "common/text.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"

/* Files larger than this are refused before parsing. */
#define HX_PLAN_MAX_BYTES (64u << 20)
/* Host names and group ids: as inventory names (they appear in device names and paths). */
#define HX_PLAN_NAME_MAX 128
/* Doubles with an integral value below this magnitude are written as JSON integers. */
#define HX_PLAN_EXACT_INT 9007199254740992.0 /* 2^53 */

/* ------------------------------------------------------------------------- */
/* Roles                                                                      */

static const char *const role_names[] = {"prefill", "decode", "both"};

const char *hx_role_name(hx_role r)
{
    if ((int)r < 0 || (int)r >= 3)
        return "unknown";
    return role_names[r];
}

hx_status hx_role_parse(const char *s, hx_role *out)
{
    if (!s)
        return HX_EINVAL;
    for (int i = 0; i < 3; i++) {
        if (!strcmp(s, role_names[i])) {
            *out = (hx_role)i;
            return HX_OK;
        }
    }
    return HX_EINVAL;
}

/* ------------------------------------------------------------------------- */
/* Small helpers                                                              */

static char *xstrdup(const char *s)
{
    return s ? strdup(s) : NULL;
}

/*
 * Grows `*arr` (holding `n` elements of `size` bytes) by one zeroed element;
 * returns it, or NULL on allocation failure (the array is left as it was).
 */
static void *grow_one(void **arr, int n, size_t size)
{
    if (n < 0 || n == INT_MAX || (size_t)n + 1 > SIZE_MAX / size)
        return NULL;
    char *a = realloc(*arr, ((size_t)n + 1) * size);
    if (!a)
        return NULL;
    *arr = a;
    memset(a + (size_t)n * size, 0, size);
    return a + (size_t)n * size;
}



/* Host names and group ids: letters, digits, '-', '_', '.'; shorter than HX_PLAN_NAME_MAX. */
static int valid_name(const char *s)
{
    if (!s || !s[0] || strlen(s) >= HX_PLAN_NAME_MAX)
        return 0;
    for (const char *q = s; *q; q++)
        if (!isalnum((unsigned char)*q) && *q != '-' && *q != '_' && *q != '.')
            return 0;
    return 1;
}

/* ------------------------------------------------------------------------- */
/* Building                                                                   */

static void stage_release(hx_plan_stage *s)
{
    for (int i = 0; i < s->ndevices; i++)
        free(s->devices[i]);
    free(s->devices);
}

static void group_release(hx_plan_group *g)
{
    free(g->id);
    for (int i = 0; i < g->nstages; i++)
        stage_release(&g->stages[i]);
    free(g->stages);
    for (int i = 0; i < g->nmemory; i++)
        free(g->memory[i].device);
    free(g->memory);
}

static void host_release(hx_plan_host *h)
{
    free(h->name);
    free(h->address);
    free(h->ssh_user);
    free(h->ssh_identity);
    free(h->ssh_known_hosts);
    free(h->workdir);
}

hx_plan *hx_plan_new(void)
{
    hx_plan *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->input_tokens = -1;
    p->output_tokens = -1;
    p->rate_rps = -1;
    p->slo_ttft_s = -1;
    p->slo_tpot_s = -1;
    p->slo_attainment = -1;
    p->router_port = HX_PLAN_DEFAULT_ROUTER_PORT;
    p->throughput_rps = -1;
    p->input_tokens_per_s = -1;
    p->output_tokens_per_s = -1;
    p->usd_per_hour = -1;
    p->usd_per_million_output_tokens = -1;
    p->search_seconds = -1;
    p->search_iterations = -1;
    return p;
}

void hx_plan_free(hx_plan *p)
{
    if (!p)
        return;
    free(p->model_name);
    json_decref(p->model);
    json_decref(p->cluster);
    for (int i = 0; i < p->nhosts; i++)
        host_release(&p->hosts[i]);
    free(p->hosts);
    free(p->router_host);
    for (int i = 0; i < p->ngroups; i++)
        group_release(&p->groups[i]);
    free(p->groups);
    free(p->routes);
    free(p->bottleneck);
    for (int i = 0; i < p->nunused; i++) {
        free(p->unused[i].device);
        free(p->unused[i].reason);
    }
    free(p->unused);
    free(p->search_strategy);
    free(p);
}

hx_plan_group *hx_plan_add_group(hx_plan *p, const char *id, hx_role role)
{
    char *idc = xstrdup(id);
    if (id && !idc)
        return NULL;
    hx_plan_group *g = grow_one((void **)&p->groups, p->ngroups, sizeof *g);
    if (!g) {
        free(idc);
        return NULL;
    }
    p->ngroups++;
    g->id = idc;
    g->role = role;
    g->capacity_rps = -1;
    g->ttft_s = -1;
    g->tpot_s = -1;
    g->max_batch = 0;
    return g;
}

hx_plan_stage *hx_plan_group_add_stage(hx_plan_group *g, int first_layer, int num_layers)
{
    hx_plan_stage *s = grow_one((void **)&g->stages, g->nstages, sizeof *s);
    if (!s)
        return NULL;
    g->nstages++;
    s->first_layer = first_layer;
    s->num_layers = num_layers;
    return s;
}

hx_status hx_plan_stage_add_device(hx_plan_stage *s, const char *device)
{
    char *d = xstrdup(device);
    if (!d)
        return device ? HX_ENOMEM : HX_EINVAL;
    char **slot = grow_one((void **)&s->devices, s->ndevices, sizeof *slot);
    if (!slot) {
        free(d);
        return HX_ENOMEM;
    }
    s->ndevices++;
    *slot = d;
    return HX_OK;
}

hx_plan_memory *hx_plan_group_add_memory(hx_plan_group *g, const char *device)
{
    char *d = xstrdup(device);
    if (device && !d)
        return NULL;
    hx_plan_memory *m = grow_one((void **)&g->memory, g->nmemory, sizeof *m);
    if (!m) {
        free(d);
        return NULL;
    }
    g->nmemory++;
    m->device = d;
    m->weights_bytes = -1;
    m->kv_bytes = -1;
    m->workspace_bytes = -1;
    m->total_bytes = -1;
    m->capacity_bytes = -1;
    return m;
}

hx_plan_route *hx_plan_add_route(hx_plan *p, int prefill, int decode, double rps)
{
    hx_plan_route *r = grow_one((void **)&p->routes, p->nroutes, sizeof *r);
    if (!r)
        return NULL;
    p->nroutes++;
    r->prefill = prefill;
    r->decode = decode;
    r->rps = rps;
    r->kv_bytes_per_s = 0;
    r->link_bytes_per_s = 0;
    return r;
}

hx_plan_host *hx_plan_add_host(hx_plan *p, const char *name, const char *address)
{
    char *n = xstrdup(name), *a = xstrdup(address);
    if ((name && !n) || (address && !a))
        goto out_free;
    hx_plan_host *h = grow_one((void **)&p->hosts, p->nhosts, sizeof *h);
    if (!h)
        goto out_free;
    p->nhosts++;
    h->name = n;
    h->address = a;
    return h;
out_free:
    free(n);
    free(a);
    return NULL;
}

hx_status hx_plan_add_unused(hx_plan *p, const char *device, const char *reason)
{
    char *d = xstrdup(device), *r = xstrdup(reason);
    hx_plan_unused *u;
    if (!d || (reason && !r))
        goto out_free;
    u = grow_one((void **)&p->unused, p->nunused, sizeof *u);
    if (!u)
        goto out_free;
    p->nunused++;
    u->device = d;
    u->reason = r;
    return HX_OK;
out_free:
    free(d);
    free(r);
    return device ? HX_ENOMEM : HX_EINVAL;
}

hx_status hx_plan_set_str(char **field, const char *value)
{
    char *v = xstrdup(value);
    if (value && !v)
        return HX_ENOMEM;
    free(*field);
    *field = v;
    return HX_OK;
}

int hx_plan_find_group(const hx_plan *p, const char *id)
{
    for (int i = 0; id && i < p->ngroups; i++)
        if (p->groups[i].id && !strcmp(p->groups[i].id, id))
            return i;
    return -1;
}

int hx_plan_find_host(const hx_plan *p, const char *name)
{
    for (int i = 0; name && i < p->nhosts; i++)
        if (p->hosts[i].name && !strcmp(p->hosts[i].name, name))
            return i;
    return -1;
}

/* ------------------------------------------------------------------------- */
/* Writing                                                                    */

/*
 * Builder state: every json_object_set_new / json_array_append_new result is
 * checked through these, and the first failure (out of memory) sticks.
 */
typedef struct wctx {
    int failed;
} wctx;

static void wset(wctx *w, json_t *obj, const char *key, json_t *v)
{
    if (!v || json_object_set_new(obj, key, v) != 0)
        w->failed = 1;
}

static void wappend(wctx *w, json_t *arr, json_t *v)
{
    if (!v || json_array_append_new(arr, v) != 0)
        w->failed = 1;
}

/*
 * A number as JSON: integral values (byte counts, token counts) as integers,
 * others as reals; a value that is not finite as null (which no reader accepts,
 * so a broken plan is noticed rather than silently changed).
 */
static json_t *jnum(double v)
{
    if (!isfinite(v))
        return json_null();
    if (v == floor(v) && fabs(v) < HX_PLAN_EXACT_INT)
        return json_integer((json_int_t)v);
    return json_real(v);
}

/* Sets `key` when `v` is given (finite and >= 0). */
static void wopt(wctx *w, json_t *obj, const char *key, double v)
{
    if (isfinite(v) && v >= 0)
        wset(w, obj, key, jnum(v));
}

static int given(double v)
{
    return isfinite(v) && v >= 0;
}

/* Sets `key` to an object when it has fields, drops it otherwise. */
static void wsub(wctx *w, json_t *obj, const char *key, json_t *sub)
{
    if (!sub) {
        w->failed = 1;
        return;
    }
    if (json_object_size(sub) == 0) {
        json_decref(sub);
        return;
    }
    wset(w, obj, key, sub);
}

static json_t *model_to_json(wctx *w, const hx_plan *p)
{
    /* a model that is not an object (a caller's mistake) is replaced by name and num_layers */
    json_t *m = json_is_object(p->model) ? json_deep_copy(p->model) : json_object();
    if (!m) {
        w->failed = 1;
        return NULL;
    }
    /* The fields are authoritative; an existing key keeps its place. */
    if (p->model_name)
        wset(w, m, "name", json_string(p->model_name));
    if (p->model_num_layers > 0)
        wset(w, m, "num_layers", json_integer(p->model_num_layers));
    return m;
}

static json_t *host_to_json(wctx *w, const hx_plan_host *h)
{
    json_t *o = json_object();
    if (!o) {
        w->failed = 1;
        return NULL;
    }
    if (h->name)
        wset(w, o, "name", json_string(h->name));
    if (h->address)
        wset(w, o, "address", json_string(h->address));
    json_t *ssh = json_object();
    if (ssh) {
        if (h->ssh_user)
            wset(w, ssh, "user", json_string(h->ssh_user));
        if (h->ssh_port != 0)
            wset(w, ssh, "port", json_integer(h->ssh_port));
        if (h->ssh_identity)
            wset(w, ssh, "identity", json_string(h->ssh_identity));
        if (h->ssh_known_hosts)
            wset(w, ssh, "known_hosts", json_string(h->ssh_known_hosts));
    }
    wsub(w, o, "ssh", ssh);
    if (h->workdir)
        wset(w, o, "workdir", json_string(h->workdir));
    return o;
}

static json_t *group_to_json(wctx *w, const hx_plan_group *g)
{
    json_t *o = json_object(), *stages = json_array();
    if (!o || !stages) {
        json_decref(o);
        json_decref(stages);
        w->failed = 1;
        return NULL;
    }
    if (g->id)
        wset(w, o, "id", json_string(g->id));
    wset(w, o, "role", json_string(hx_role_name(g->role)));
    for (int k = 0; k < g->nstages; k++) {
        const hx_plan_stage *s = &g->stages[k];
        json_t *so = json_object(), *devs = json_array();
        if (!so || !devs) {
            json_decref(so);
            json_decref(devs);
            w->failed = 1;
            break;
        }
        wset(w, so, "first_layer", json_integer(s->first_layer));
        wset(w, so, "num_layers", json_integer(s->num_layers));
        for (int d = 0; d < s->ndevices; d++)
            wappend(w, devs, s->devices[d] ? json_string(s->devices[d]) : json_null());
        wset(w, so, "devices", devs);
        wappend(w, stages, so);
    }
    wset(w, o, "stages", stages);
    wopt(w, o, "capacity_rps", g->capacity_rps);
    if (g->nmemory > 0) {
        json_t *mem = json_array();
        for (int i = 0; mem && i < g->nmemory; i++) {
            const hx_plan_memory *m = &g->memory[i];
            json_t *mo = json_object();
            if (!mo) {
                w->failed = 1;
                break;
            }
            wset(w, mo, "device", m->device ? json_string(m->device) : json_null());
            wopt(w, mo, "weights_bytes", m->weights_bytes);
            wopt(w, mo, "kv_bytes", m->kv_bytes);
            wopt(w, mo, "workspace_bytes", m->workspace_bytes);
            wopt(w, mo, "total_bytes", m->total_bytes);
            wopt(w, mo, "capacity_bytes", m->capacity_bytes);
            wappend(w, mem, mo);
        }
        wset(w, o, "memory", mem);
    }
    json_t *pred = json_object();
    if (pred) {
        wopt(w, pred, "ttft_s", g->ttft_s);
        wopt(w, pred, "tpot_s", g->tpot_s);
        if (g->max_batch > 0)
            wset(w, pred, "max_batch", json_integer(g->max_batch));
    }
    wsub(w, o, "predicted", pred);
    return o;
}

/* A route end as its group id; null when the index is out of range (an invalid plan). */
static json_t *group_ref(const hx_plan *p, int gi)
{
    if (gi < 0 || gi >= p->ngroups || !p->groups[gi].id)
        return json_null();
    return json_string(p->groups[gi].id);
}

json_t *hx_plan_to_json(const hx_plan *p)
{
    wctx w = {0};
    json_t *root = json_object();
    if (!root)
        return NULL;
    wset(&w, root, "schema", json_string(HX_PLAN_SCHEMA));

    if (p->model || p->model_name || p->model_num_layers > 0)
        wset(&w, root, "model", model_to_json(&w, p));

    json_t *wl = json_object();
    if (wl) {
        wopt(&w, wl, "input_tokens", p->input_tokens);
        wopt(&w, wl, "output_tokens", p->output_tokens);
        wopt(&w, wl, "rate_rps", p->rate_rps);
        json_t *slo = json_object();
        if (slo) {
            wopt(&w, slo, "ttft_s", p->slo_ttft_s);
            wopt(&w, slo, "tpot_s", p->slo_tpot_s);
            wopt(&w, slo, "attainment", p->slo_attainment);
        }
        wsub(&w, wl, "slo", slo);
    }
    wsub(&w, root, "workload", wl);

    json_t *hosts = json_array();
    for (int i = 0; hosts && i < p->nhosts; i++)
        wappend(&w, hosts, host_to_json(&w, &p->hosts[i]));
    wset(&w, root, "hosts", hosts);

    json_t *router = json_object();
    if (router) {
        if (p->router_host)
            wset(&w, router, "host", json_string(p->router_host));
        wset(&w, router, "port", json_integer(p->router_port));
    }
    wset(&w, root, "router", router);

    json_t *groups = json_array();
    for (int i = 0; groups && i < p->ngroups; i++)
        wappend(&w, groups, group_to_json(&w, &p->groups[i]));
    wset(&w, root, "groups", groups);

    json_t *routes = json_array();
    for (int i = 0; routes && i < p->nroutes; i++) {
        const hx_plan_route *r = &p->routes[i];
        json_t *ro = json_object();
        if (!ro) {
            w.failed = 1;
            break;
        }
        wset(&w, ro, "prefill", group_ref(p, r->prefill));
        wset(&w, ro, "decode", group_ref(p, r->decode));
        wset(&w, ro, "rps", jnum(r->rps));
        wset(&w, ro, "kv_bytes_per_s", jnum(r->kv_bytes_per_s));
        wset(&w, ro, "link_bytes_per_s", jnum(r->link_bytes_per_s));
        wappend(&w, routes, ro);
    }
    wset(&w, root, "routes", routes);

    json_t *tp = json_object();
    if (tp) {
        wopt(&w, tp, "rps", p->throughput_rps);
        wopt(&w, tp, "input_tokens_per_s", p->input_tokens_per_s);
        wopt(&w, tp, "output_tokens_per_s", p->output_tokens_per_s);
    }
    wsub(&w, root, "throughput", tp);

    if (p->bottleneck)
        wset(&w, root, "bottleneck", json_string(p->bottleneck));

    json_t *cost = json_object();
    if (cost) {
        wopt(&w, cost, "usd_per_hour", p->usd_per_hour);
        wopt(&w, cost, "usd_per_million_output_tokens", p->usd_per_million_output_tokens);
    }
    wsub(&w, root, "cost", cost);

    if (p->nunused > 0) {
        json_t *un = json_array();
        for (int i = 0; un && i < p->nunused; i++) {
            json_t *uo = json_object();
            if (!uo) {
                w.failed = 1;
                break;
            }
            wset(&w, uo, "device",
                 p->unused[i].device ? json_string(p->unused[i].device) : json_null());
            if (p->unused[i].reason)
                wset(&w, uo, "reason", json_string(p->unused[i].reason));
            wappend(&w, un, uo);
        }
        wset(&w, root, "unused_devices", un);
    }

    if (p->cluster)
        wset(&w, root, "cluster", json_deep_copy(p->cluster));

    json_t *search = json_object();
    if (search && (p->search_strategy || given(p->search_seconds) ||
                   p->search_iterations >= 0 || p->search_seed != 0)) {
        if (p->search_strategy)
            wset(&w, search, "strategy", json_string(p->search_strategy));
        wopt(&w, search, "seconds", p->search_seconds);
        if (p->search_iterations >= 0)
            wset(&w, search, "iterations", json_integer(p->search_iterations));
        if (p->search_seed <= (unsigned long)LLONG_MAX) {
            wset(&w, search, "seed", json_integer((json_int_t)p->search_seed));
        } else {
            /* beyond a JSON integer: written as a decimal string, which the reader accepts */
            char buf[32];
            snprintf(buf, sizeof buf, "%lu", p->search_seed);
            wset(&w, search, "seed", json_string(buf));
        }
    }
    wsub(&w, root, "search", search);

    if (w.failed) {
        json_decref(root);
        return NULL;
    }
    return root;
}

hx_status hx_plan_write(const hx_plan *p, const char *path, hx_err *err)
{
    json_t *root = hx_plan_to_json(p);
    if (!root)
        return hx_err_set(err, HX_ENOMEM, "cannot write plan '%s': out of memory", path);
    /*
     * As hx_json_write_file, but reals with 15 significant digits so that a
     * planned 0.1 reads "0.1" rather than "0.10000000000000001". Values read
     * back from the file print the same way again (15 digits survive the trip
     * through a double), so load + write of a written plan is stable.
     */
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15));
    json_decref(root);
    if (!text)
        return hx_err_set(err, HX_ENOMEM, "cannot write plan '%s': out of memory", path);
    size_t len = strlen(text);
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return hx_err_set(err, HX_ENOMEM, "cannot write plan '%s': out of memory", path);
    }
    withnl[len] = '\n';
    withnl[len + 1] = '\0';
    hx_status st = hx_file_write_atomic(path, withnl, len + 1, err);
    free(withnl);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Diagnostics shared by reading and validation                               */

typedef struct dctx {
    const char *file;
    hx_diags *diags;
    int n;        /* problems reported */
    int oom;      /* an allocation failed while reading */
    int nsuggest; /* "did you mean" searches done (each is linear in the names) */
} dctx;

/* Searches at most this many suggestions among a plan's names, so that many
 * bad references to many names cannot make reading quadratic. */
#define HX_PLAN_MAX_SUGGESTIONS 64

static void problem(dctx *c, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void problem(dctx *c, const char *field, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    hx_diags_add(c->diags, c->file, 0, 0, field, "%s", msg);
    c->n++;
}

/*
 * Field paths: "parent.key" (or "key" at the top) and "parent[i]", into caller
 * buffers. A path too long for the buffer (only with absurd input) ends in
 * "..." rather than silently losing its tail.
 */
static const char *path_done(char *buf, size_t size, int k)
{
    if (k < 0)
        buf[0] = '\0';
    else if ((size_t)k >= size && size > 4)
        memcpy(buf + size - 4, "...", 4);
    return buf;
}

static const char *pkey(char *buf, size_t size, const char *parent, const char *key)
{
    int k;
    if (parent && parent[0])
        k = snprintf(buf, size, "%s.%s", parent, key);
    else
        k = snprintf(buf, size, "%s", key);
    return path_done(buf, size, k);
}

static const char *pidx(char *buf, size_t size, const char *parent, int i)
{
    return path_done(buf, size, snprintf(buf, size, "%s[%d]", parent, i));
}

#define PATH_MAX_LEN 256

/* "h100-a, h100-b, ..." (at most a handful) for messages. */
static void list_names(char *buf, size_t size, const char *const *names, size_t n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n && len < size; i++) {
        if (!names[i])
            continue;
        if (i == 8) {
            snprintf(buf + len, size - len, ", ...");
            break;
        }
        int k = snprintf(buf + len, size - len, "%s%s", len ? ", " : "", names[i]);
        if (k < 0)
            break;
        len += (size_t)k;
    }
}

/* hx_text_closest within 2 edits, limited to HX_PLAN_MAX_SUGGESTIONS searches per read or check. */
static const char *suggest(dctx *c, const char *s, const char *const *names, size_t n)
{
    if (c->nsuggest >= HX_PLAN_MAX_SUGGESTIONS)
        return NULL;
    c->nsuggest++;
    return hx_text_closest(s, names, n, 2);
}

/* ------------------------------------------------------------------------- */
/* Validation                                                                 */

/* A device named in the plan, resolved: for sorting and duplicate detection. */
typedef struct devref {
    int host;   /* index into hosts */
    int index;  /* device index on the host */
    int group;
    int stage;  /* -1 for a memory entry */
    int slot;   /* position in the stage's devices (or the group's memory) */
} devref;

static int devref_cmp(const void *a, const void *b)
{
    const devref *x = a, *y = b;
    if (x->host != y->host)
        return x->host < y->host ? -1 : 1;
    if (x->index != y->index)
        return x->index < y->index ? -1 : 1;
    if (x->group != y->group)
        return x->group < y->group ? -1 : 1;
    if (x->stage != y->stage)
        return x->stage < y->stage ? -1 : 1;
    return (x->slot > y->slot) - (x->slot < y->slot);
}

/* A name with its position, sorted by name to find duplicates and look names up. */
typedef struct nameref {
    const char *name;
    int i;
} nameref;

static int nameref_cmp(const void *a, const void *b)
{
    const nameref *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c)
        return c;
    return (x->i > y->i) - (x->i < y->i);
}

/* Index of the first entry named `name` in the sorted array, or -1. */
static int nameref_find(const nameref *arr, int n, const char *name)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(arr[mid].name, name) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && !strcmp(arr[lo].name, name) ? arr[lo].i : -1;
}

/* Validation state: the sorted host names, for device lookups. */
typedef struct vstate {
    dctx *c;
    const hx_plan *p;
    nameref *hosts; /* sorted by name; entries with a name only */
    int nhosts;
    const char **host_names; /* [p->nhosts], for suggestions */
} vstate;

/*
 * Splits "host:index" and resolves the host. Returns 1 and fills *host and
 * *index when the name is well formed and (when need_host) the host is known;
 * otherwise reports the problem at `path` and returns 0. Without need_host an
 * unknown host sets *host = -1 without a report.
 */
static int parse_device(vstate *v, const char *dev, const char *path, int need_host, int *host,
                        int *index)
{
    if (!dev || !dev[0]) {
        problem(v->c, path, "is empty; expected a device named host:index, e.g. 'h100-a:0'");
        return 0;
    }
    const char *colon = strrchr(dev, ':');
    if (!colon || colon == dev) {
        problem(v->c, path, "'%s' is not a device name; expected host:index, e.g. 'h100-a:0'",
                dev);
        return 0;
    }
    const char *num = colon + 1;
    int ok = num[0] != '\0' && (num[0] != '0' || num[1] == '\0');
    long long val = 0;
    for (const char *q = num; ok && *q; q++) {
        if (!isdigit((unsigned char)*q)) {
            ok = 0;
            break;
        }
        val = val * 10 + (*q - '0');
        if (val > INT_MAX)
            ok = 0;
    }
    if (!ok) {
        problem(v->c, path,
                "'%s' has device index '%s'; expected a non-negative integer without "
                "leading zeros, e.g. '%.*s:0'",
                dev, num, (int)(colon - dev), dev);
        return 0;
    }
    size_t hlen = (size_t)(colon - dev);
    char hname[HX_PLAN_NAME_MAX + 1];
    int h = -1;
    if (hlen < sizeof hname) {
        memcpy(hname, dev, hlen);
        hname[hlen] = '\0';
        h = nameref_find(v->hosts, v->nhosts, hname);
    } else {
        snprintf(hname, sizeof hname, "%s", dev);
    }
    if (h < 0 && need_host) {
        const char *sug = suggest(v->c, hname, v->host_names, (size_t)v->p->nhosts);
        if (sug) {
            problem(v->c, path, "'%s' names unknown host '%s'; did you mean '%s:%s'?", dev,
                    hname, sug, num);
        } else {
            char names[512];
            list_names(names, sizeof names, v->host_names, (size_t)v->p->nhosts);
            problem(v->c, path, "'%s' names unknown host '%s'; expected one of the hosts: %s",
                    dev, hname, names[0] ? names : "(none)");
        }
        return 0;
    }
    *host = h;
    *index = (int)val;
    return 1;
}

static void validate_hosts(vstate *v)
{
    const hx_plan *p = v->p;
    char fp[PATH_MAX_LEN], fp2[PATH_MAX_LEN];
    if (p->nhosts < 1)
        problem(v->c, "hosts", "is empty; expected at least one host");
    for (int i = 0; i < p->nhosts; i++) {
        const hx_plan_host *h = &p->hosts[i];
        pidx(fp, sizeof fp, "hosts", i);
        if (!h->name || !h->name[0])
            problem(v->c, pkey(fp2, sizeof fp2, fp, "name"), "missing; expected a host name");
        else if (!valid_name(h->name))
            problem(v->c, pkey(fp2, sizeof fp2, fp, "name"),
                    "'%s' is not a valid name; expected letters, digits, '-', '_' and '.' "
                    "(at most %d)",
                    h->name, HX_PLAN_NAME_MAX - 1);
        if (!h->address || !h->address[0])
            problem(v->c, pkey(fp2, sizeof fp2, fp, "address"),
                    "missing; expected an IP address, a DNS name or 'local'");
        if (h->ssh_port < 0 || h->ssh_port > 65535)
            problem(v->c, pkey(fp2, sizeof fp2, fp, "ssh.port"),
                    "is %d; expected a port number 1-65535", h->ssh_port);
    }
    /* duplicates: the sorted array holds equal names next to each other, first one first */
    for (int k = 1; k < v->nhosts; k++) {
        if (!strcmp(v->hosts[k].name, v->hosts[k - 1].name)) {
            int first = nameref_find(v->hosts, v->nhosts, v->hosts[k].name);
            snprintf(fp, sizeof fp, "hosts[%d].name", v->hosts[k].i);
            problem(v->c, fp, "'%s' is already the name of hosts[%d]; host names must be unique",
                    v->hosts[k].name, first);
        }
    }
}

static void validate_router(vstate *v)
{
    const hx_plan *p = v->p;
    if (!p->router_host || !p->router_host[0]) {
        problem(v->c, "router.host", "missing; expected the name of one of the hosts");
    } else if (nameref_find(v->hosts, v->nhosts, p->router_host) < 0) {
        const char *sug = suggest(v->c, p->router_host, v->host_names, (size_t)p->nhosts);
        if (sug) {
            problem(v->c, "router.host", "unknown host '%s'; did you mean '%s'?", p->router_host,
                    sug);
        } else {
            char names[512];
            list_names(names, sizeof names, v->host_names, (size_t)p->nhosts);
            problem(v->c, "router.host", "unknown host '%s'; expected one of the hosts: %s",
                    p->router_host, names[0] ? names : "(none)");
        }
    }
    if (p->router_port < 1 || p->router_port > 65535)
        problem(v->c, "router.port", "is %d; expected a port number 1-65535", p->router_port);
}

/* Group ids, roles and stage layout; collects every resolved device into *refs. */
static void validate_groups(vstate *v, devref **refs, int *nrefs, devref **mrefs, int *nmrefs)
{
    const hx_plan *p = v->p;
    char fp[PATH_MAX_LEN], fp2[PATH_MAX_LEN], fp3[PATH_MAX_LEN];
    if (p->ngroups < 1) {
        problem(v->c, "groups", "is empty; expected at least one group");
        return;
    }

    size_t ndev = 0, nmem = 0;
    for (int i = 0; i < p->ngroups; i++) {
        for (int k = 0; k < p->groups[i].nstages; k++)
            if (p->groups[i].stages[k].ndevices > 0)
                ndev += (size_t)p->groups[i].stages[k].ndevices;
        if (p->groups[i].nmemory > 0)
            nmem += (size_t)p->groups[i].nmemory;
    }
    *refs = calloc(ndev ? ndev : 1, sizeof **refs);
    *mrefs = calloc(nmem ? nmem : 1, sizeof **mrefs);
    if (!*refs || !*mrefs) {
        v->c->oom = 1;
        return;
    }

    /* ids: unique, plain names */
    nameref *ids = calloc((size_t)p->ngroups, sizeof *ids);
    if (!ids) {
        v->c->oom = 1;
        return;
    }
    int nids = 0;
    for (int i = 0; i < p->ngroups; i++) {
        const char *id = p->groups[i].id;
        pidx(fp, sizeof fp, "groups", i);
        if (!id || !id[0]) {
            problem(v->c, pkey(fp2, sizeof fp2, fp, "id"), "missing; expected a group id");
            continue;
        }
        if (!valid_name(id))
            problem(v->c, pkey(fp2, sizeof fp2, fp, "id"),
                    "'%s' is not a valid id; expected letters, digits, '-', '_' and '.' "
                    "(at most %d)",
                    id, HX_PLAN_NAME_MAX - 1);
        ids[nids].name = id;
        ids[nids].i = i;
        nids++;
    }
    qsort(ids, (size_t)nids, sizeof *ids, nameref_cmp);
    for (int k = 1; k < nids; k++) {
        if (!strcmp(ids[k].name, ids[k - 1].name)) {
            int first = nameref_find(ids, nids, ids[k].name);
            snprintf(fp, sizeof fp, "groups[%d].id", ids[k].i);
            problem(v->c, fp, "'%s' is already the id of groups[%d]; group ids must be unique",
                    ids[k].name, first);
        }
    }
    free(ids);

    int ref_group = -1;      /* first group with a complete layout, for coverage */
    long long ref_end = 0;
    for (int i = 0; i < p->ngroups; i++) {
        const hx_plan_group *g = &p->groups[i];
        pidx(fp, sizeof fp, "groups", i);
        if ((int)g->role < 0 || (int)g->role > HX_ROLE_BOTH)
            problem(v->c, pkey(fp2, sizeof fp2, fp, "role"),
                    "is %d; expected prefill, decode or both", (int)g->role);
        if (g->nstages < 1) {
            problem(v->c, pkey(fp2, sizeof fp2, fp, "stages"),
                    "is empty; expected at least one pipeline stage");
            continue;
        }
        long long expect = 0;
        int layout_ok = 1;
        for (int k = 0; k < g->nstages; k++) {
            const hx_plan_stage *s = &g->stages[k];
            char sp[PATH_MAX_LEN];
            pidx(sp, sizeof sp, pkey(fp3, sizeof fp3, fp, "stages"), k);
            if (s->first_layer != expect) {
                layout_ok = 0;
                if (k == 0)
                    problem(v->c, pkey(fp2, sizeof fp2, sp, "first_layer"),
                            "is %d; expected 0 (the first stage starts at layer 0)",
                            s->first_layer);
                else
                    problem(v->c, pkey(fp2, sizeof fp2, sp, "first_layer"),
                            "is %d; expected %lld, where the previous stage ends (stages "
                            "hold contiguous layers)",
                            s->first_layer, expect);
            }
            if (s->num_layers < 1) {
                layout_ok = 0;
                problem(v->c, pkey(fp2, sizeof fp2, sp, "num_layers"),
                        "is %d; expected a positive integer", s->num_layers);
            }
            expect = (long long)s->first_layer + (s->num_layers > 0 ? s->num_layers : 0);
            if (s->ndevices < 1)
                problem(v->c, pkey(fp2, sizeof fp2, sp, "devices"),
                        "is empty; expected at least one device (the stage's TP degree is "
                        "its number of devices)");
            for (int d = 0; d < s->ndevices; d++) {
                int h, idx;
                pidx(fp3, sizeof fp3, pkey(fp2, sizeof fp2, sp, "devices"), d);
                if (!parse_device(v, s->devices[d], fp3, 1, &h, &idx))
                    continue;
                devref *r = &(*refs)[(*nrefs)++];
                r->host = h;
                r->index = idx;
                r->group = i;
                r->stage = k;
                r->slot = d;
            }
        }
        /* coverage, once the stages themselves are right (no echo of a bad stage) */
        if (layout_ok && p->model_num_layers > 0) {
            if (expect != p->model_num_layers)
                problem(v->c, pkey(fp2, sizeof fp2, fp, "stages"),
                        "cover layers 0-%lld; expected 0-%d (model.num_layers is %d)",
                        expect - 1, p->model_num_layers - 1, p->model_num_layers);
        } else if (layout_ok) {
            if (ref_group < 0) {
                ref_group = i;
                ref_end = expect;
            } else if (expect != ref_end) {
                problem(v->c, pkey(fp2, sizeof fp2, fp, "stages"),
                        "cover %lld layers but groups[%d] covers %lld; every group holds the "
                        "whole model",
                        expect, ref_group, ref_end);
            }
        }

        for (int m = 0; m < g->nmemory; m++) {
            int h, idx;
            char mp[PATH_MAX_LEN];
            pidx(mp, sizeof mp, pkey(fp3, sizeof fp3, fp, "memory"), m);
            pkey(fp2, sizeof fp2, mp, "device");
            if (!parse_device(v, g->memory[m].device, fp2, 1, &h, &idx))
                continue;
            devref *r = &(*mrefs)[(*nmrefs)++];
            r->host = h;
            r->index = idx;
            r->group = i;
            r->stage = -1;
            r->slot = m;
        }
    }
}

/*
 * First entry of the sorted `refs` with this host and index (and group, when
 * group >= 0), or NULL.
 */
static const devref *devref_find(const devref *refs, int n, int host, int index, int group)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        const devref *r = &refs[mid];
        int less = r->host != host ? r->host < host
                   : r->index != index ? r->index < index
                   : group >= 0 && r->group < group;
        if (less)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < n && refs[lo].host == host && refs[lo].index == index &&
        (group < 0 || refs[lo].group == group))
        return &refs[lo];
    return NULL;
}

static void validate_devices(vstate *v, devref *refs, int nrefs, devref *mrefs, int nmrefs)
{
    const hx_plan *p = v->p;
    char fp[PATH_MAX_LEN];

    /* a device twice: sorted, the first use of each device starts a run of equal ones */
    qsort(refs, (size_t)nrefs, sizeof *refs, devref_cmp);
    const devref *first = refs;
    for (int k = 1; k < nrefs; k++) {
        const devref *a = &refs[k];
        if (a->host != first->host || a->index != first->index) {
            first = a;
            continue;
        }
        snprintf(fp, sizeof fp, "groups[%d].stages[%d].devices[%d]", a->group, a->stage,
                 a->slot);
        problem(v->c, fp,
                "'%s' is already used by groups[%d].stages[%d].devices[%d]; a device serves "
                "one stage of one group",
                p->groups[a->group].stages[a->stage].devices[a->slot], first->group,
                first->stage, first->slot);
    }

    /* memory entries: for devices of their own group, one entry per device */
    qsort(mrefs, (size_t)nmrefs, sizeof *mrefs, devref_cmp);
    first = mrefs;
    for (int k = 0; k < nmrefs; k++) {
        const devref *m = &mrefs[k];
        const char *name = p->groups[m->group].memory[m->slot].device;
        snprintf(fp, sizeof fp, "groups[%d].memory[%d].device", m->group, m->slot);
        if (k > 0 && m->host == first->host && m->index == first->index &&
            m->group == first->group) {
            problem(v->c, fp, "'%s' already has an entry, groups[%d].memory[%d]", name,
                    m->group, first->slot);
            continue;
        }
        first = m;
        if (!devref_find(refs, nrefs, m->host, m->index, m->group))
            problem(v->c, fp, "'%s' is not a device of group '%s'", name,
                    p->groups[m->group].id ? p->groups[m->group].id : "?");
    }

    /* unused devices: well formed, and not used after all */
    for (int u = 0; u < p->nunused; u++) {
        int h, idx;
        snprintf(fp, sizeof fp, "unused_devices[%d]", u);
        if (!parse_device(v, p->unused[u].device, fp, 0, &h, &idx) || h < 0)
            continue;
        const devref *r = devref_find(refs, nrefs, h, idx, -1);
        if (r)
            problem(v->c, fp,
                    "'%s' is listed as unused but groups[%d].stages[%d].devices[%d] uses it",
                    p->unused[u].device, r->group, r->stage, r->slot);
    }
}

typedef struct pairref {
    int prefill, decode, i;
} pairref;

static int pairref_cmp(const void *a, const void *b)
{
    const pairref *x = a, *y = b;
    if (x->prefill != y->prefill)
        return x->prefill < y->prefill ? -1 : 1;
    if (x->decode != y->decode)
        return x->decode < y->decode ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static const char *gid(const hx_plan *p, int g)
{
    return p->groups[g].id ? p->groups[g].id : "?";
}

/* A route end: in range and of the expected role. Returns 1 when fine. */
static int check_route_end(vstate *v, int r, const char *which, int g, hx_role want)
{
    const hx_plan *p = v->p;
    char fp[PATH_MAX_LEN];
    snprintf(fp, sizeof fp, "routes[%d].%s", r, which);
    if (g < 0 || g >= p->ngroups) {
        problem(v->c, fp, "is group index %d; expected 0-%d", g, p->ngroups - 1);
        return 0;
    }
    if (p->groups[g].role != want) {
        problem(v->c, fp, "group '%s' has role %s; expected a %s group", gid(p, g),
                hx_role_name(p->groups[g].role), hx_role_name(want));
        return 0;
    }
    return 1;
}

static void validate_routes(vstate *v)
{
    const hx_plan *p = v->p;
    char fp[PATH_MAX_LEN];
    int nprefill = 0, ndecode = 0;
    for (int i = 0; i < p->ngroups; i++) {
        nprefill += p->groups[i].role == HX_ROLE_PREFILL;
        ndecode += p->groups[i].role == HX_ROLE_DECODE;
    }
    if (nprefill > 0 && ndecode == 0)
        problem(v->c, "groups",
                "has prefill groups but no decode group; a prefill group hands every "
                "request to a decode group (or make it role both)");
    if (ndecode > 0 && nprefill == 0)
        problem(v->c, "groups",
                "has decode groups but no prefill group; a decode group continues requests "
                "that a prefill group started (or make it role both)");
    if (nprefill > 0 && ndecode > 0 && p->nroutes == 0)
        problem(v->c, "routes",
                "is empty; expected routes from the prefill groups to the decode groups");

    pairref *pairs = calloc(p->nroutes > 0 ? (size_t)p->nroutes : 1, sizeof *pairs);
    if (!pairs) {
        v->c->oom = 1;
        return;
    }
    int npairs = 0;
    for (int r = 0; r < p->nroutes; r++) {
        const hx_plan_route *rt = &p->routes[r];
        int ok = check_route_end(v, r, "prefill", rt->prefill, HX_ROLE_PREFILL);
        ok &= check_route_end(v, r, "decode", rt->decode, HX_ROLE_DECODE);
        snprintf(fp, sizeof fp, "routes[%d].rps", r);
        if (!(rt->rps >= 0) || !isfinite(rt->rps))
            problem(v->c, fp, "is %g; expected a non-negative number of requests/s", rt->rps);
        snprintf(fp, sizeof fp, "routes[%d].kv_bytes_per_s", r);
        if (!(rt->kv_bytes_per_s >= 0) || !isfinite(rt->kv_bytes_per_s))
            problem(v->c, fp, "is %g; expected a non-negative number of bytes/s",
                    rt->kv_bytes_per_s);
        snprintf(fp, sizeof fp, "routes[%d].link_bytes_per_s", r);
        if (!(rt->link_bytes_per_s >= 0) || !isfinite(rt->link_bytes_per_s))
            problem(v->c, fp, "is %g; expected a non-negative number of bytes/s (0 = not given)",
                    rt->link_bytes_per_s);
        if (ok) {
            pairs[npairs].prefill = rt->prefill;
            pairs[npairs].decode = rt->decode;
            pairs[npairs].i = r;
            npairs++;
        }
    }
    qsort(pairs, (size_t)npairs, sizeof *pairs, pairref_cmp);
    int first = 0;
    for (int k = 1; k < npairs; k++) {
        if (pairs[k].prefill != pairs[k - 1].prefill || pairs[k].decode != pairs[k - 1].decode) {
            first = k;
            continue;
        }
        snprintf(fp, sizeof fp, "routes[%d]", pairs[k].i);
        problem(v->c, fp, "route %s -> %s is already given by routes[%d]; merge the two",
                gid(p, pairs[k].prefill), gid(p, pairs[k].decode), pairs[first].i);
    }
    free(pairs);
}

static int validate_into(const hx_plan *p, dctx *c)
{
    vstate v = {.c = c, .p = p};
    devref *refs = NULL, *mrefs = NULL;
    int nrefs = 0, nmrefs = 0;
    int before = c->n;

    if (p->nhosts > 0) {
        v.hosts = calloc((size_t)p->nhosts, sizeof *v.hosts);
        v.host_names = calloc((size_t)p->nhosts, sizeof *v.host_names);
        if (!v.hosts || !v.host_names) {
            c->oom = 1;
            goto out_free;
        }
        for (int i = 0; i < p->nhosts; i++) {
            v.host_names[i] = p->hosts[i].name;
            if (p->hosts[i].name && p->hosts[i].name[0]) {
                v.hosts[v.nhosts].name = p->hosts[i].name;
                v.hosts[v.nhosts].i = i;
                v.nhosts++;
            }
        }
        qsort(v.hosts, (size_t)v.nhosts, sizeof *v.hosts, nameref_cmp);
    }

    if (p->model_num_layers < 0)
        problem(c, "model.num_layers", "is %d; expected a positive integer (0 = not given)",
                p->model_num_layers);
    validate_hosts(&v);
    validate_router(&v);
    validate_groups(&v, &refs, &nrefs, &mrefs, &nmrefs);
    if (c->oom)
        goto out_free;
    if (refs)
        validate_devices(&v, refs, nrefs, mrefs, nmrefs);
    validate_routes(&v);

out_free:
    if (c->oom)
        problem(c, NULL, "out of memory while checking the plan");
    free(refs);
    free(mrefs);
    free(v.hosts);
    free(v.host_names);
    return c->n - before;
}

int hx_plan_validate(const hx_plan *p, const char *name, hx_diags *diags)
{
    hx_diags local;
    hx_diags_init(&local);
    dctx c = {.file = name, .diags = diags ? diags : &local};
    int n = validate_into(p, &c);
    hx_diags_release(&local);
    return n;
}

/* ------------------------------------------------------------------------- */
/* Reading                                                                    */

/* "a string", "an array" ... for "is X; expected Y" messages. */
static const char *kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "a value";
}

/* A number's text for messages ("-3", "1.5"). */
static void num_text(const json_t *v, char *buf, size_t size)
{
    if (json_is_integer(v))
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else
        snprintf(buf, size, "%g", json_number_value(v));
}

/*
 * Checks that `obj` is an object whose keys are all in `allowed` (NULL
 * terminated). Reports "is X; expected an object" and returns 0 when it is
 * not an object; reports each unknown key (with a suggestion) and returns 1
 * otherwise.
 */
static int check_object(dctx *c, const json_t *obj, const char *path, const char *const *allowed)
{
    size_t n = 0;
    while (allowed[n])
        n++;
    char keys[512];
    list_names(keys, sizeof keys, allowed, n);
    if (!json_is_object(obj)) {
        problem(c, path[0] ? path : NULL, "%s%s; expected an object with %s",
                path[0] ? "is " : "the top level is ", kind(obj), keys);
        return 0;
    }
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)obj, key, val) {
        int known = 0;
        for (size_t i = 0; i < n && !known; i++)
            known = !strcmp(allowed[i], key);
        if (known)
            continue;
        char fp[PATH_MAX_LEN];
        const char *sug = hx_text_closest(key, allowed, n, 2);
        if (sug)
            problem(c, pkey(fp, sizeof fp, path, key), "unknown field; did you mean '%s'?", sug);
        else
            problem(c, pkey(fp, sizeof fp, path, key), "unknown field; expected one of %s",
                    keys);
    }
    return 1;
}

/*
 * Field lookups. Each returns 1 when the field is present and valid (setting
 * *out), 0 when it is absent (reporting "missing" when required), -1 when it
 * is present but wrong (reported).
 */
static const json_t *lookup(dctx *c, const json_t *obj, const char *key, const char *path,
                            int required, const char *expected)
{
    const json_t *v = json_object_get(obj, key);
    if (!v && required)
        problem(c, path, "missing; expected %s", expected);
    return v;
}

static int read_string(dctx *c, const json_t *obj, const char *key, const char *parent,
                       int required, int allow_empty, const char *expected, const char **out)
{
    char fp[PATH_MAX_LEN];
    pkey(fp, sizeof fp, parent, key);
    const json_t *v = lookup(c, obj, key, fp, required, expected);
    if (!v)
        return 0;
    if (!json_is_string(v)) {
        problem(c, fp, "is %s; expected %s", kind(v), expected);
        return -1;
    }
    const char *s = json_string_value(v);
    if (!allow_empty && !s[0]) {
        problem(c, fp, "is empty; expected %s", expected);
        return -1;
    }
    if (strlen(s) != json_string_length(v)) {
        problem(c, fp, "holds a NUL character; expected %s", expected);
        return -1;
    }
    *out = s;
    return 1;
}

static int read_int(dctx *c, const json_t *obj, const char *key, const char *parent,
                    int required, long long lo, long long hi, const char *expected,
                    long long *out)
{
    char fp[PATH_MAX_LEN];
    pkey(fp, sizeof fp, parent, key);
    const json_t *v = lookup(c, obj, key, fp, required, expected);
    if (!v)
        return 0;
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < HX_PLAN_EXACT_INT) {
        x = (long long)json_real_value(v);
    } else if (json_is_real(v)) {
        char t[64];
        num_text(v, t, sizeof t);
        problem(c, fp, "is %s; expected %s", t, expected);
        return -1;
    } else {
        problem(c, fp, "is %s; expected %s", kind(v), expected);
        return -1;
    }
    if (x < lo || x > hi) {
        problem(c, fp, "is %lld; expected %s", x, expected);
        return -1;
    }
    *out = x;
    return 1;
}

static int read_number(dctx *c, const json_t *obj, const char *key, const char *parent,
                       int required, double lo, double hi, const char *expected, double *out)
{
    char fp[PATH_MAX_LEN];
    pkey(fp, sizeof fp, parent, key);
    const json_t *v = lookup(c, obj, key, fp, required, expected);
    if (!v)
        return 0;
    if (!json_is_number(v)) {
        problem(c, fp, "is %s; expected %s", kind(v), expected);
        return -1;
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi) {
        char t[64];
        num_text(v, t, sizeof t);
        problem(c, fp, "is %s; expected %s", t, expected);
        return -1;
    }
    *out = x;
    return 1;
}

/* Optional number >= 0 into *out (left as is when absent). */
static void read_nonneg(dctx *c, const json_t *obj, const char *key, const char *parent,
                        const char *expected, double *out)
{
    read_number(c, obj, key, parent, 0, 0, INFINITY, expected, out);
}

/* An owned copy of an optional string field; reports allocation failure. */
static void read_dup(dctx *c, const json_t *obj, const char *key, const char *parent,
                     int allow_empty, const char *expected, char **out)
{
    const char *s;
    if (read_string(c, obj, key, parent, 0, allow_empty, expected, &s) == 1 &&
        hx_plan_set_str(out, s) != HX_OK)
        c->oom = 1;
}

/* An array field (absent: 0 and *arr = NULL; wrong type: reported, -1). */
static int read_array(dctx *c, const json_t *obj, const char *key, int required,
                      const char *expected, const json_t **arr)
{
    *arr = NULL;
    const json_t *v = lookup(c, obj, key, key, required, expected);
    if (!v)
        return 0;
    if (!json_is_array(v)) {
        problem(c, key, "is %s; expected %s", kind(v), expected);
        return -1;
    }
    if (json_array_size(v) > (size_t)INT_MAX / 2) {
        problem(c, key, "has %zu entries; that is too many", json_array_size(v));
        return -1;
    }
    *arr = v;
    return 1;
}

static const char *const top_keys[] = {"schema", "model", "workload", "hosts", "router",
                                       "groups", "routes", "throughput", "bottleneck", "cost",
                                       "unused_devices", "cluster", "search", NULL};

/* The cluster the plan was made for: an inventory document, kept whole. */
static void read_cluster(dctx *c, const json_t *root, hx_plan *p)
{
    const json_t *cl = json_object_get(root, "cluster");
    if (!cl)
        return;
    if (!json_is_object(cl)) {
        problem(c, "cluster", "is %s; expected an inventory document (an object)", kind(cl));
        return;
    }
    p->cluster = json_deep_copy(cl);
    if (!p->cluster)
        c->oom = 1;
}

static void read_model(dctx *c, const json_t *root, hx_plan *p)
{
    const json_t *m = json_object_get(root, "model");
    if (!m)
        return;
    if (!json_is_object(m)) {
        problem(c, "model", "is %s; expected an object with name and num_layers", kind(m));
        return;
    }
    read_dup(c, m, "name", "model", 0, "a model name such as 'llama-2-70b'", &p->model_name);
    long long nl;
    if (read_int(c, m, "num_layers", "model", 0, 1, INT_MAX, "a positive integer", &nl) == 1)
        p->model_num_layers = (int)nl;
    p->model = json_deep_copy(m);
    if (!p->model)
        c->oom = 1;
}

static void read_workload(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"input_tokens", "output_tokens", "rate_rps", "slo", NULL};
    static const char *const slo_keys[] = {"ttft_s", "tpot_s", "attainment", NULL};
    const json_t *w = json_object_get(root, "workload");
    if (!w || !check_object(c, w, "workload", keys))
        return;
    read_nonneg(c, w, "input_tokens", "workload", "a non-negative number of tokens",
                &p->input_tokens);
    read_nonneg(c, w, "output_tokens", "workload", "a non-negative number of tokens",
                &p->output_tokens);
    read_nonneg(c, w, "rate_rps", "workload",
                "a non-negative number of requests/s (0 = as much as possible)", &p->rate_rps);
    const json_t *slo = json_object_get(w, "slo");
    if (!slo || !check_object(c, slo, "workload.slo", slo_keys))
        return;
    read_nonneg(c, slo, "ttft_s", "workload.slo", "a non-negative number of seconds",
                &p->slo_ttft_s);
    read_nonneg(c, slo, "tpot_s", "workload.slo", "a non-negative number of seconds",
                &p->slo_tpot_s);
    double a;
    if (read_number(c, slo, "attainment", "workload.slo", 0, 0, 1,
                    "a fraction between 0 and 1, e.g. 0.9", &a) == 1)
        p->slo_attainment = a;
}

static void read_hosts(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"name", "address", "ssh", "workdir", NULL};
    static const char *const ssh_keys[] = {"user", "port", "identity", "known_hosts", NULL};
    const json_t *arr;
    if (read_array(c, root, "hosts", 1, "an array of hosts", &arr) != 1)
        return;
    if (json_array_size(arr) == 0)
        problem(c, "hosts", "is empty; expected at least one host");
    for (size_t i = 0; i < json_array_size(arr) && !c->oom; i++) {
        const json_t *h = json_array_get(arr, i);
        char fp[PATH_MAX_LEN], sp[PATH_MAX_LEN];
        pidx(fp, sizeof fp, "hosts", (int)i);
        if (!check_object(c, h, fp, keys))
            continue;
        const char *name = NULL, *addr = NULL;
        read_string(c, h, "name", fp, 1, 0, "a host name", &name);
        read_string(c, h, "address", fp, 1, 0, "an IP address, a DNS name or 'local'", &addr);
        hx_plan_host *ph = hx_plan_add_host(p, name, addr);
        if (!ph) {
            c->oom = 1;
            return;
        }
        read_dup(c, h, "workdir", fp, 0, "a directory path", &ph->workdir);
        const json_t *ssh = json_object_get(h, "ssh");
        pkey(sp, sizeof sp, fp, "ssh");
        if (!ssh || !check_object(c, ssh, sp, ssh_keys))
            continue;
        read_dup(c, ssh, "user", sp, 0, "a user name", &ph->ssh_user);
        long long port;
        if (read_int(c, ssh, "port", sp, 0, 1, 65535, "a port number 1-65535", &port) == 1)
            ph->ssh_port = (int)port;
        read_dup(c, ssh, "identity", sp, 0, "the path of a private key", &ph->ssh_identity);
        read_dup(c, ssh, "known_hosts", sp, 0, "the path of a known_hosts file",
                 &ph->ssh_known_hosts);
    }
}

static void read_router(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"host", "port", NULL};
    const json_t *r = lookup(c, root, "router", "router", 1,
                             "an object with host (a host name) and port");
    if (!r || !check_object(c, r, "router", keys))
        return;
    read_dup(c, r, "host", "router", 0, "the name of one of the hosts", &p->router_host);
    if (!json_object_get(r, "host"))
        problem(c, "router.host", "missing; expected the name of one of the hosts");
    long long port;
    if (read_int(c, r, "port", "router", 0, 1, 65535, "a port number 1-65535", &port) == 1)
        p->router_port = (int)port;
}

static void read_stages(dctx *c, const json_t *g, const char *gp, hx_plan_group *pg)
{
    static const char *const keys[] = {"first_layer", "num_layers", "devices", NULL};
    char fp[PATH_MAX_LEN], dp[PATH_MAX_LEN], ep[PATH_MAX_LEN];
    pkey(fp, sizeof fp, gp, "stages");
    const json_t *arr = lookup(c, g, "stages", fp, 1, "an array of pipeline stages");
    if (!arr)
        return;
    if (!json_is_array(arr)) {
        problem(c, fp, "is %s; expected an array of pipeline stages", kind(arr));
        return;
    }
    long long next = 0; /* where the next stage starts when first_layer is not given */
    for (size_t k = 0; k < json_array_size(arr) && !c->oom; k++) {
        const json_t *s = json_array_get(arr, k);
        char sp[PATH_MAX_LEN];
        pidx(sp, sizeof sp, fp, (int)k);
        if (!check_object(c, s, sp, keys))
            continue;
        long long first = next, num = 0;
        read_int(c, s, "first_layer", sp, 0, 0, INT_MAX, "a non-negative integer", &first);
        int ok = read_int(c, s, "num_layers", sp, 1, 1, INT_MAX, "a positive integer", &num);
        if (ok == 1 && first + num > INT_MAX) {
            problem(c, pkey(ep, sizeof ep, sp, "num_layers"),
                    "is %lld; the stage would end past layer %d", num, INT_MAX);
            ok = -1;
        }
        next = ok == 1 ? first + num : first + 1;
        hx_plan_stage *ps = hx_plan_group_add_stage(pg, (int)first, (int)num);
        if (!ps) {
            c->oom = 1;
            return;
        }
        pkey(dp, sizeof dp, sp, "devices");
        const json_t *devs = lookup(c, s, "devices", dp, 1,
                                    "an array of device names such as 'h100-a:0'");
        if (!devs)
            continue;
        if (!json_is_array(devs)) {
            problem(c, dp, "is %s; expected an array of device names such as 'h100-a:0'",
                    kind(devs));
            continue;
        }
        for (size_t d = 0; d < json_array_size(devs); d++) {
            const json_t *dv = json_array_get(devs, d);
            pidx(ep, sizeof ep, dp, (int)d);
            if (!json_is_string(dv) || strlen(json_string_value(dv)) != json_string_length(dv)) {
                problem(c, ep, "is %s; expected a device name such as 'h100-a:0'", kind(dv));
                continue;
            }
            if (hx_plan_stage_add_device(ps, json_string_value(dv)) != HX_OK) {
                c->oom = 1;
                return;
            }
        }
    }
}

static void read_memory(dctx *c, const json_t *g, const char *gp, hx_plan_group *pg)
{
    static const char *const keys[] = {"device",      "weights_bytes", "kv_bytes",
                                       "workspace_bytes", "total_bytes", "capacity_bytes",
                                       NULL};
    static const char *const bytes = "a non-negative number of bytes";
    char fp[PATH_MAX_LEN];
    pkey(fp, sizeof fp, gp, "memory");
    const json_t *arr = json_object_get(g, "memory");
    if (!arr)
        return;
    if (!json_is_array(arr)) {
        problem(c, fp, "is %s; expected an array with one entry per device", kind(arr));
        return;
    }
    for (size_t i = 0; i < json_array_size(arr) && !c->oom; i++) {
        const json_t *m = json_array_get(arr, i);
        char mp[PATH_MAX_LEN];
        pidx(mp, sizeof mp, fp, (int)i);
        if (!check_object(c, m, mp, keys))
            continue;
        const char *dev = NULL;
        read_string(c, m, "device", mp, 1, 0, "a device name such as 'h100-a:0'", &dev);
        hx_plan_memory *pm = hx_plan_group_add_memory(pg, dev ? dev : "");
        if (!pm) {
            c->oom = 1;
            return;
        }
        read_nonneg(c, m, "weights_bytes", mp, bytes, &pm->weights_bytes);
        read_nonneg(c, m, "kv_bytes", mp, bytes, &pm->kv_bytes);
        read_nonneg(c, m, "workspace_bytes", mp, bytes, &pm->workspace_bytes);
        read_nonneg(c, m, "total_bytes", mp, bytes, &pm->total_bytes);
        read_nonneg(c, m, "capacity_bytes", mp, bytes, &pm->capacity_bytes);
    }
}

static void read_groups(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"id",     "role",      "stages", "capacity_rps",
                                       "memory", "predicted", NULL};
    static const char *const pred_keys[] = {"ttft_s", "tpot_s", "max_batch", NULL};
    const json_t *arr;
    if (read_array(c, root, "groups", 1, "an array of groups", &arr) != 1)
        return;
    if (json_array_size(arr) == 0)
        problem(c, "groups", "is empty; expected at least one group");
    for (size_t i = 0; i < json_array_size(arr) && !c->oom; i++) {
        const json_t *g = json_array_get(arr, i);
        char fp[PATH_MAX_LEN], ep[PATH_MAX_LEN];
        pidx(fp, sizeof fp, "groups", (int)i);
        if (!check_object(c, g, fp, keys))
            continue;
        const char *id = NULL, *role_s = NULL;
        hx_role role = HX_ROLE_BOTH;
        read_string(c, g, "id", fp, 1, 0, "a group id such as 'g0'", &id);
        if (read_string(c, g, "role", fp, 1, 0, "prefill, decode or both", &role_s) == 1 &&
            hx_role_parse(role_s, &role) != HX_OK) {
            const char *sug = hx_text_closest(role_s, role_names, 3, 2);
            if (sug)
                problem(c, pkey(ep, sizeof ep, fp, "role"),
                        "'%s' is not a role; did you mean '%s'? (prefill, decode or both)",
                        role_s, sug);
            else
                problem(c, pkey(ep, sizeof ep, fp, "role"),
                        "'%s' is not a role; expected prefill, decode or both", role_s);
        }
        hx_plan_group *pg = hx_plan_add_group(p, id, role);
        if (!pg) {
            c->oom = 1;
            return;
        }
        read_stages(c, g, fp, pg);
        read_nonneg(c, g, "capacity_rps", fp, "a non-negative number of requests/s",
                    &pg->capacity_rps);
        read_memory(c, g, fp, pg);
        const json_t *pred = json_object_get(g, "predicted");
        pkey(ep, sizeof ep, fp, "predicted");
        if (!pred || !check_object(c, pred, ep, pred_keys))
            continue;
        read_nonneg(c, pred, "ttft_s", ep, "a non-negative number of seconds", &pg->ttft_s);
        read_nonneg(c, pred, "tpot_s", ep, "a non-negative number of seconds", &pg->tpot_s);
        long long mb;
        if (read_int(c, pred, "max_batch", ep, 0, 0, INT_MAX,
                     "a non-negative integer (0 = not given)", &mb) == 1)
            pg->max_batch = (int)mb;
    }
}

/* The group ids of a plan being read: in order (for messages) and sorted (for lookups). */
typedef struct group_ids {
    const char **ids; /* [ngroups], entries may be NULL */
    nameref *sorted;  /* [nsorted], by id then index */
    int nsorted;
} group_ids;

/* A route end: a group id, resolved to an index (-1 with a report when unknown). */
static int read_route_end(dctx *c, const json_t *r, const char *key, const char *rp,
                          const hx_plan *p, const group_ids *gi)
{
    const char *id;
    char fp[PATH_MAX_LEN];
    if (read_string(c, r, key, rp, 1, 0, "a group id", &id) != 1)
        return -1;
    /* the first group with this id, as hx_plan_find_group; duplicates are reported later */
    int g = nameref_find(gi->sorted, gi->nsorted, id);
    if (g >= 0 || p->ngroups == 0)
        return g; /* no groups at all is reported once, at "groups" */
    const char *sug = suggest(c, id, gi->ids, (size_t)p->ngroups);
    char names[512];
    list_names(names, sizeof names, gi->ids, (size_t)p->ngroups);
    pkey(fp, sizeof fp, rp, key);
    if (sug)
        problem(c, fp, "unknown group '%s'; did you mean '%s'?", id, sug);
    else
        problem(c, fp, "unknown group '%s'; expected one of the group ids: %s", id,
                names[0] ? names : "(none)");
    return -1;
}

static void read_routes(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"prefill", "decode", "rps", "kv_bytes_per_s",
                                       "link_bytes_per_s", NULL};
    const json_t *arr;
    if (read_array(c, root, "routes", 0, "an array of routes", &arr) != 1)
        return;
    size_t ng = p->ngroups > 0 ? (size_t)p->ngroups : 1;
    group_ids gi = {.ids = calloc(ng, sizeof *gi.ids), .sorted = calloc(ng, sizeof *gi.sorted)};
    if (!gi.ids || !gi.sorted) {
        c->oom = 1;
        goto out_free;
    }
    for (int i = 0; i < p->ngroups; i++) {
        gi.ids[i] = p->groups[i].id;
        if (p->groups[i].id) {
            gi.sorted[gi.nsorted].name = p->groups[i].id;
            gi.sorted[gi.nsorted].i = i;
            gi.nsorted++;
        }
    }
    qsort(gi.sorted, (size_t)gi.nsorted, sizeof *gi.sorted, nameref_cmp);

    for (size_t i = 0; i < json_array_size(arr) && !c->oom; i++) {
        const json_t *r = json_array_get(arr, i);
        char fp[PATH_MAX_LEN];
        pidx(fp, sizeof fp, "routes", (int)i);
        if (!check_object(c, r, fp, keys))
            continue;
        int pre = read_route_end(c, r, "prefill", fp, p, &gi);
        int dec = read_route_end(c, r, "decode", fp, p, &gi);
        double rps = 0, kv = 0, link = 0;
        read_nonneg(c, r, "rps", fp, "a non-negative number of requests/s", &rps);
        read_nonneg(c, r, "kv_bytes_per_s", fp, "a non-negative number of bytes/s", &kv);
        read_nonneg(c, r, "link_bytes_per_s", fp,
                    "a non-negative number of bytes/s (0 = not given)", &link);
        /* routes with an unknown end are reported above; keeping them would only echo that */
        if (pre < 0 || dec < 0)
            continue;
        hx_plan_route *pr = hx_plan_add_route(p, pre, dec, rps);
        if (!pr) {
            c->oom = 1;
            break;
        }
        pr->kv_bytes_per_s = kv;
        pr->link_bytes_per_s = link;
    }
out_free:
    free(gi.ids);
    free(gi.sorted);
}

static void read_results(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const tp_keys[] = {"rps", "input_tokens_per_s", "output_tokens_per_s",
                                          NULL};
    static const char *const cost_keys[] = {"usd_per_hour", "usd_per_million_output_tokens",
                                            NULL};
    const json_t *tp = json_object_get(root, "throughput");
    if (tp && check_object(c, tp, "throughput", tp_keys)) {
        read_nonneg(c, tp, "rps", "throughput", "a non-negative number of requests/s",
                    &p->throughput_rps);
        read_nonneg(c, tp, "input_tokens_per_s", "throughput",
                    "a non-negative number of tokens/s", &p->input_tokens_per_s);
        read_nonneg(c, tp, "output_tokens_per_s", "throughput",
                    "a non-negative number of tokens/s", &p->output_tokens_per_s);
    }
    read_dup(c, root, "bottleneck", "", 1, "a string", &p->bottleneck);
    const json_t *cost = json_object_get(root, "cost");
    if (cost && check_object(c, cost, "cost", cost_keys)) {
        read_nonneg(c, cost, "usd_per_hour", "cost", "a non-negative number of US dollars",
                    &p->usd_per_hour);
        read_nonneg(c, cost, "usd_per_million_output_tokens", "cost",
                    "a non-negative number of US dollars", &p->usd_per_million_output_tokens);
    }
}

static void read_unused(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"device", "reason", NULL};
    const json_t *arr;
    if (read_array(c, root, "unused_devices", 0,
                   "an array of devices ('h100-a:0' or {device, reason})", &arr) != 1)
        return;
    for (size_t i = 0; i < json_array_size(arr) && !c->oom; i++) {
        const json_t *u = json_array_get(arr, i);
        char fp[PATH_MAX_LEN];
        pidx(fp, sizeof fp, "unused_devices", (int)i);
        const char *dev = NULL, *reason = NULL;
        if (json_is_string(u)) {
            dev = json_string_value(u);
            if (!dev[0] || strlen(dev) != json_string_length(u)) {
                problem(c, fp, "is not a device name; expected one such as 'h100-a:0'");
                continue;
            }
        } else if (json_is_object(u)) {
            check_object(c, u, fp, keys);
            if (read_string(c, u, "device", fp, 1, 0, "a device name such as 'h100-a:0'",
                            &dev) != 1)
                continue;
            read_string(c, u, "reason", fp, 0, 1, "a string", &reason);
        } else {
            problem(c, fp, "is %s; expected a device name or an object with device and reason",
                    kind(u));
            continue;
        }
        if (hx_plan_add_unused(p, dev, reason) != HX_OK)
            c->oom = 1;
    }
}

static void read_search(dctx *c, const json_t *root, hx_plan *p)
{
    static const char *const keys[] = {"strategy", "seconds", "iterations", "seed", NULL};
    const json_t *s = json_object_get(root, "search");
    if (!s || !check_object(c, s, "search", keys))
        return;
    read_dup(c, s, "strategy", "search", 0, "a strategy name such as 'hexflow'",
             &p->search_strategy);
    read_nonneg(c, s, "seconds", "search", "a non-negative number of seconds",
                &p->search_seconds);
    long long it;
    if (read_int(c, s, "iterations", "search", 0, 0, INT_MAX, "a non-negative integer", &it) ==
        1)
        p->search_iterations = (int)it;
    const json_t *seed = json_object_get(s, "seed");
    if (json_is_string(seed)) {
        /* seeds beyond a JSON integer are written as decimal strings */
        const char *t = json_string_value(seed);
        char *end = NULL;
        errno = 0;
        unsigned long v = isdigit((unsigned char)t[0]) ? strtoul(t, &end, 10) : 0;
        if (!end || *end || errno)
            problem(c, "search.seed", "is '%s'; expected a non-negative integer", t);
        else
            p->search_seed = v;
    } else {
        long long sd;
        if (read_int(c, s, "seed", "search", 0, 0, LLONG_MAX, "a non-negative integer", &sd) ==
            1)
            p->search_seed = (unsigned long)sd;
    }
}

hx_status hx_plan_from_json(const json_t *root, const char *name, hx_plan **out,
                            hx_diags *diags)
{
    hx_diags local;
    hx_diags_init(&local);
    dctx c = {.file = name, .diags = diags ? diags : &local};
    hx_status st = HX_OK;
    hx_plan *p = NULL;

    if (!root || !check_object(&c, root, "", top_keys)) {
        if (!root)
            problem(&c, NULL, "no JSON document; expected a hexflow plan object");
        st = HX_EPARSE;
        goto out;
    }
    p = hx_plan_new();
    if (!p) {
        st = HX_ENOMEM;
        goto out;
    }

    const char *schema;
    int sr = read_string(&c, root, "schema", "", 1, 1, "\"" HX_PLAN_SCHEMA "\"", &schema);
    if (sr == 1 && strcmp(schema, HX_PLAN_SCHEMA) != 0)
        problem(&c, "schema", "'%s' is not supported; expected \"%s\"", schema, HX_PLAN_SCHEMA);

    read_model(&c, root, p);
    read_cluster(&c, root, p);
    read_workload(&c, root, p);
    read_hosts(&c, root, p);
    read_router(&c, root, p);
    read_groups(&c, root, p);
    read_routes(&c, root, p);
    read_results(&c, root, p);
    read_unused(&c, root, p);
    read_search(&c, root, p);

    /* the invariants are checked once the fields read cleanly (no echoes of a bad field) */
    if (c.n == 0 && !c.oom)
        validate_into(p, &c);
    if (c.oom) {
        if (c.n == 0)
            problem(&c, NULL, "out of memory while reading the plan");
        st = HX_ENOMEM;
    } else if (c.n > 0) {
        st = HX_EPARSE;
    }

out:
    if (st == HX_OK)
        *out = p;
    else
        hx_plan_free(p);
    hx_diags_release(&local);
    return st;
}

hx_status hx_plan_load(const char *path, hx_plan **out, hx_diags *diags)
{
    hx_diags local;
    hx_diags_init(&local);
    hx_diags *d = diags ? diags : &local;
    hx_err err = {0};
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL;
    hx_status st = hx_file_read_all(path, "plan", HX_PLAN_MAX_BYTES, &text, &len, &err);
    if (st != HX_OK) {
        hx_diags_add(d, NULL, 0, 0, NULL, "%s", err.msg);
        if (st != HX_ENOENT && st != HX_ENOMEM)
            st = HX_EIO; /* a directory, a file too large, a read error: unreadable */
        goto out;
    }
    json_error_t je;
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root) {
        /* "plan.json:3:14: unexpected token near ']'" */
        hx_diags_add(d, path, je.line > 0 ? je.line : 0, je.column > 0 ? je.column : 0, NULL,
                     "%s", je.text);
        st = HX_EPARSE;
        goto out_free_text;
    }
    st = hx_plan_from_json(root, path, out, d);
    json_decref(root);
out_free_text:
    free(text);
out:
    hx_diags_release(&local);
    return st;
}

hx_status hx_plan_load_err(const char *path, hx_plan **out, hx_err *err)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_status st = hx_plan_load(path, out, &d);
    if (st != HX_OK) {
        char line[sizeof err->msg] = "cannot load the plan";
        if (d.count)
            hx_diags_format(&d, 0, line, sizeof line);
        hx_err_set(err, st, "%s", line);
    }
    hx_diags_release(&d);
    return st;
}
