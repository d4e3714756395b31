/*
 * inventory.c - loading and validating the YAML cluster inventory.
 *
 * The loader walks the document once, checking every field it knows and
 * rejecting fields it does not (with a suggestion), and collects every problem
 * as a located diagnostic. Only when there are none does it build the
 * hx_inventory. Cross references (a host's GPU type and switch, the hosts a
 * link or switch names) are resolved after all hosts and types are known.
 */
#define _POSIX_C_SOURCE 200809L
#include "inventory.h"

#include <ctype.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/text.h"
#include "common/units.h"
#include "common/yaml.h"

#define HX_MAX_DEVICES_PER_HOST 1024
#define HX_MAX_DEVICES (1 << 20)
#define HX_NAME_MAX 128

/* ------------------------------------------------------------------------- */
/* Validation context                                                         */

typedef struct vctx {
    const char *file;
    hx_diags *diags;
    int nerrors;
} vctx;

static void verr(vctx *c, struct fy_node *at, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void verr(vctx *c, struct fy_node *at, const char *field, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int line = 0, col = 0;
    hx_yaml_node_pos(at, &line, &col);
    hx_diags_add(c->diags, c->file, line, col, field, "%s", msg);
    c->nerrors++;
}

/* Builds "parent.key" or "parent[i]" paths into a caller buffer. */
static const char *path_key(char *buf, size_t size, const char *parent, const char *key)
{
    if (parent && parent[0])
        snprintf(buf, size, "%s.%s", parent, key);
    else
        snprintf(buf, size, "%s", key);
    return buf;
}

static const char *path_index(char *buf, size_t size, const char *parent, int i)
{
    snprintf(buf, size, "%s[%d]", parent, i);
    return buf;
}



static void join_names(char *buf, size_t size, const char *const *names, size_t n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n && len < size; i++) {
        int k = snprintf(buf + len, size - len, "%s%s", i ? ", " : "", names[i]);
        if (k < 0)
            break;
        len += (size_t)k;
    }
}

/*
 * Checks that `map` is a mapping whose keys are all among `allowed` (NULL
 * terminated) and appear once. Returns 0 when `map` is not a mapping.
 */
static int check_mapping(vctx *c, struct fy_node *map, const char *path,
                         const char *const *allowed)
{
    if (!map || fy_node_get_type(map) != FYNT_MAPPING) {
        size_t n = 0;
        while (allowed[n])
            n++;
        char keys[512];
        join_names(keys, sizeof keys, allowed, n);
        verr(c, map, path, "is %s; expected a mapping with %s", hx_yaml_kind(map), keys);
        return 0;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(map, &it)) != NULL) {
        struct fy_node *k = fy_node_pair_key(p);
        const char *key = hx_yaml_scalar(k);
        char fp[256];
        if (!key) {
            verr(c, k, path, "has a key that is %s; expected plain field names",
                 hx_yaml_kind(k));
            continue;
        }
        size_t n = 0;
        int known = 0;
        while (allowed[n]) {
            if (!strcmp(allowed[n], key))
                known = 1;
            n++;
        }
        if (!known) {
            const char *sug = hx_text_closest(key, allowed, n, 2);
            char keys[512];
            join_names(keys, sizeof keys, allowed, n);
            if (sug)
                verr(c, k, path_key(fp, sizeof fp, path, key),
                     "unknown field; did you mean '%s'?", sug);
            else
                verr(c, k, path_key(fp, sizeof fp, path, key),
                     "unknown field; expected one of %s", keys);
        }
    }
    return 1;
}

static struct fy_node *get(struct fy_node *map, const char *key)
{
    if (!map || fy_node_get_type(map) != FYNT_MAPPING)
        return NULL;
    return fy_node_mapping_lookup_by_string(map, key, FY_NT);
}

/* A scalar's text, or an error naming the field when it is not a scalar. */
static const char *scalar_of(vctx *c, struct fy_node *n, const char *path, const char *expected)
{
    const char *s = hx_yaml_scalar(n);
    if (!s)
        verr(c, n, path, "is %s; expected %s", hx_yaml_kind(n), expected);
    return s;
}

/* Optional string field: NULL when absent; error when present but empty or not a scalar. */
static const char *get_string(vctx *c, struct fy_node *map, const char *key, const char *parent,
                              int required)
{
    char fp[256];
    path_key(fp, sizeof fp, parent, key);
    struct fy_node *n = get(map, key);
    if (!n) {
        if (required)
            verr(c, map, fp, "missing; this field is required");
        return NULL;
    }
    const char *s = scalar_of(c, n, fp, "a string");
    if (s && !s[0]) {
        verr(c, n, fp, "is empty; expected a non-empty string");
        return NULL;
    }
    return s;
}

typedef hx_status (*unit_parser)(const char *, double *, hx_err *);

/* Optional quantity: returns 1 and sets *out when present and valid. */
static int get_quantity(vctx *c, struct fy_node *map, const char *key, const char *parent,
                        unit_parser parse, int required, int positive, double *out)
{
    char fp[256];
    path_key(fp, sizeof fp, parent, key);
    struct fy_node *n = get(map, key);
    if (!n) {
        if (required)
            verr(c, map, fp, "missing; this field is required");
        return 0;
    }
    const char *s = scalar_of(c, n, fp, "a quantity with a unit");
    if (!s)
        return 0;
    hx_err e = {0};
    double v;
    if (parse(s, &v, &e) != HX_OK) {
        verr(c, n, fp, "%s", e.msg);
        return 0;
    }
    if (positive && !(v > 0)) {
        verr(c, n, fp, "'%s' must be greater than zero", s);
        return 0;
    }
    *out = v;
    return 1;
}

/* Whole number in [lo, hi]; `what` describes it for the message. */
static int get_int(vctx *c, struct fy_node *map, const char *key, const char *parent, int required,
                   long lo, long hi, const char *what, long *out)
{
    char fp[256];
    path_key(fp, sizeof fp, parent, key);
    struct fy_node *n = get(map, key);
    if (!n) {
        if (required)
            verr(c, map, fp, "missing; expected %s", what);
        return 0;
    }
    const char *s = scalar_of(c, n, fp, what);
    if (!s)
        return 0;
    char *end;
    long v = 0;
    int ok = isdigit((unsigned char)s[0]) || (s[0] == '-' && isdigit((unsigned char)s[1]));
    if (ok) {
        v = strtol(s, &end, 10);
        ok = *end == '\0';
    }
    if (!ok || v < lo || v > hi) {
        verr(c, n, fp, "'%s' is not %s", s, what);
        return 0;
    }
    *out = v;
    return 1;
}

static int get_bool(vctx *c, struct fy_node *map, const char *key, const char *parent, int *out)
{
    char fp[256];
    path_key(fp, sizeof fp, parent, key);
    struct fy_node *n = get(map, key);
    if (!n)
        return 0;
    const char *s = scalar_of(c, n, fp, "true or false");
    if (!s)
        return 0;
    if (!strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcasecmp(s, "on")) {
        *out = 1;
        return 1;
    }
    if (!strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcasecmp(s, "off")) {
        *out = 0;
        return 1;
    }
    verr(c, n, fp, "'%s' is not a boolean; expected true or false", s);
    return 0;
}

/* Names are used in device names ("host:0") and file paths: keep them plain. */
static int valid_name(const char *s)
{
    if (!s[0] || strlen(s) >= HX_NAME_MAX)
        return 0;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
            return 0;
    return 1;
}

static char *xstrdup(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* ------------------------------------------------------------------------- */
/* Sections                                                                   */

static void ssh_release(hx_ssh_settings *s)
{
    free(s->user);
    free(s->identity);
    free(s->known_hosts);
    memset(s, 0, sizeof *s);
}

/* Reads an `ssh:` mapping over `base` (fields not given keep base's values). */
static void read_ssh(vctx *c, struct fy_node *n, const char *path, const hx_ssh_settings *base,
                     hx_ssh_settings *out)
{
    static const char *const keys[] = {"user", "port", "identity", "known_hosts", NULL};
    out->user = xstrdup(base ? base->user : NULL);
    out->identity = xstrdup(base ? base->identity : NULL);
    out->known_hosts = xstrdup(base ? base->known_hosts : NULL);
    out->port = base ? base->port : HX_DEFAULT_SSH_PORT;
    if (!n || !check_mapping(c, n, path, keys))
        return;
    const char *s;
    if ((s = get_string(c, n, "user", path, 0))) {
        free(out->user);
        out->user = xstrdup(s);
    }
    if ((s = get_string(c, n, "identity", path, 0))) {
        free(out->identity);
        out->identity = xstrdup(s);
    }
    if ((s = get_string(c, n, "known_hosts", path, 0))) {
        free(out->known_hosts);
        out->known_hosts = xstrdup(s);
    }
    long port;
    if (get_int(c, n, "port", path, 0, 1, 65535, "a TCP port number from 1 to 65535", &port))
        out->port = (int)port;
}

/* The catalog plus the inventory's gpu_types, as one growable list. */
typedef struct type_list {
    hx_gpu_spec *v;
    size_t n, cap;
} type_list;

static hx_gpu_spec *types_push(type_list *t, const hx_gpu_spec *s)
{
    if (t->n == t->cap) {
        size_t ncap = t->cap ? t->cap * 2 : 8;
        hx_gpu_spec *nv = realloc(t->v, ncap * sizeof *nv);
        if (!nv)
            return NULL;
        t->v = nv;
        t->cap = ncap;
    }
    t->v[t->n] = *s;
    return &t->v[t->n++];
}

static int types_find(const type_list *t, const char *name)
{
    for (size_t i = 0; i < t->n; i++)
        if (!strcasecmp(t->v[i].name, name))
            return (int)i;
    return -1;
}

static void read_gpu_types(vctx *c, struct fy_node *seq, type_list *types)
{
    static const char *const keys[] = {"name", "memory", "bf16_tflops", "hbm_bandwidth",
                                       "price_per_hour", NULL};
    if (fy_node_get_type(seq) != FYNT_SEQUENCE) {
        verr(c, seq, "gpu_types", "is %s; expected a list of GPU types", hx_yaml_kind(seq));
        return;
    }
    void *it = NULL;
    struct fy_node *item;
    int i = 0;
    while ((item = fy_node_sequence_iterate(seq, &it)) != NULL) {
        char path[64];
        path_index(path, sizeof path, "gpu_types", i++);
        if (!check_mapping(c, item, path, keys))
            continue;
        const char *name = get_string(c, item, "name", path, 1);
        if (!name)
            continue;
        char fp[256];
        if (strlen(name) >= HX_GPU_NAME_MAX || !valid_name(name)) {
            verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
                 "'%s' is not a valid type name; expected letters, digits, '-', '_' or '.' "
                 "(at most %d characters)",
                 name, HX_GPU_NAME_MAX - 1);
            continue;
        }
        if (types_find(types, name) >= 0) {
            verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
                 "GPU type '%s' is declared twice; expected each type once", name);
            continue;
        }
        /* Start from the catalog entry when this overrides one. */
        hx_gpu_spec spec;
        memset(&spec, 0, sizeof spec);
        const hx_gpu_spec *base = hx_catalog_find(name);
        if (base)
            spec = *base;
        else
            snprintf(spec.name, sizeof spec.name, "%s", name);
        int need = base == NULL;
        get_quantity(c, item, "memory", path, hx_units_parse_bytes, need, 1, &spec.memory_bytes);
        get_quantity(c, item, "bf16_tflops", path, hx_units_parse_flops, need, 1,
                     &spec.bf16_flops);
        get_quantity(c, item, "hbm_bandwidth", path, hx_units_parse_bandwidth, need, 1,
                     &spec.hbm_bytes_per_s);
        get_quantity(c, item, "price_per_hour", path, hx_units_parse_price, 0, 0,
                     &spec.usd_per_hour);
        if (!strcasecmp(name, "cpu"))
            spec.is_cpu = 1;
        if (!types_push(types, &spec))
            c->nerrors++;
    }
}

typedef struct host_raw {
    struct fy_node *node;
    struct fy_node *type_node;
    struct fy_node *switch_node;
    const char *type_name;
    const char *switch_name;
} host_raw;

static void read_host(vctx *c, struct fy_node *item, const char *path, const hx_inventory *inv,
                      hx_host *h, host_raw *raw)
{
    static const char *const keys[] = {"name", "address", "ssh",  "workdir", "gpus",
                                       "intra", "nic",    "switch", NULL};
    static const char *const gpu_keys[] = {"type", "count", NULL};
    static const char *const intra_keys[] = {"kind", "bandwidth", NULL};
    static const char *const nic_keys[] = {"bandwidth", "rdma", NULL};
    char fp[256];

    raw->node = item;
    h->switch_index = -1;
    h->gpu_type = -1;
    h->ssh.port = HX_DEFAULT_SSH_PORT;
    int line, col;
    hx_yaml_node_pos(item, &line, &col);
    h->line = line;
    if (!check_mapping(c, item, path, keys))
        return;

    const char *name = get_string(c, item, "name", path, 1);
    if (name && !valid_name(name))
        verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
             "'%s' is not a valid host name; expected letters, digits, '-', '_' or '.' "
             "(at most %d characters)",
             name, HX_NAME_MAX - 1);
    else if (name)
        h->name = xstrdup(name);

    const char *address = get_string(c, item, "address", path, 0);
    if (!get(item, "address"))
        verr(c, item, path_key(fp, sizeof fp, path, "address"),
             "missing; expected the host's IP address or DNS name, or 'local' for this "
             "machine");
    if (address) {
        h->address = xstrdup(address);
        h->is_local = !strcmp(address, "local");
    }

    read_ssh(c, get(item, "ssh"), path_key(fp, sizeof fp, path, "ssh"), &inv->default_ssh,
             &h->ssh);
    const char *wd = get_string(c, item, "workdir", path, 0);
    h->workdir = xstrdup(wd ? wd : inv->default_workdir);

    struct fy_node *gpus = get(item, "gpus");
    char gp[128];
    path_key(gp, sizeof gp, path, "gpus");
    if (!gpus) {
        verr(c, item, gp, "missing; expected {type: NAME, count: N}");
    } else if (check_mapping(c, gpus, gp, gpu_keys)) {
        raw->type_name = get_string(c, gpus, "type", gp, 1);
        raw->type_node = get(gpus, "type");
        long count;
        if (get_int(c, gpus, "count", gp, 1, 1, HX_MAX_DEVICES_PER_HOST,
                    "a positive whole number of devices (1 to 1024)", &count))
            h->gpu_count = (int)count;
    }

    struct fy_node *intra = get(item, "intra");
    char ip[128];
    path_key(ip, sizeof ip, path, "intra");
    h->intra_kind = HX_INTRA_PCIE;
    int have_bw = 0;
    if (intra && check_mapping(c, intra, ip, intra_keys)) {
        const char *kind = get_string(c, intra, "kind", ip, 0);
        if (kind) {
            if (!strcmp(kind, "nvlink"))
                h->intra_kind = HX_INTRA_NVLINK;
            else if (!strcmp(kind, "pcie"))
                h->intra_kind = HX_INTRA_PCIE;
            else if (!strcmp(kind, "none"))
                h->intra_kind = HX_INTRA_NONE;
            else
                verr(c, get(intra, "kind"), path_key(fp, sizeof fp, ip, "kind"),
                     "'%s' is not a link kind; expected nvlink, pcie or none", kind);
        }
        have_bw = get_quantity(c, intra, "bandwidth", ip, hx_units_parse_bandwidth, 0, 1,
                               &h->intra_bytes_per_s);
    }
    if (!have_bw)
        h->intra_bytes_per_s = h->intra_kind == HX_INTRA_NVLINK ? HX_DEFAULT_NVLINK_BYTES_PER_S
                               : h->intra_kind == HX_INTRA_PCIE ? HX_DEFAULT_PCIE_BYTES_PER_S
                                                                : HX_DEFAULT_NONE_BYTES_PER_S;

    struct fy_node *nic = get(item, "nic");
    char np[128];
    path_key(np, sizeof np, path, "nic");
    h->nic_bytes_per_s = HX_DEFAULT_NIC_BYTES_PER_S;
    if (nic && check_mapping(c, nic, np, nic_keys)) {
        get_quantity(c, nic, "bandwidth", np, hx_units_parse_bandwidth, 0, 1,
                     &h->nic_bytes_per_s);
        get_bool(c, nic, "rdma", np, &h->nic_rdma);
    }

    raw->switch_name = get_string(c, item, "switch", path, 0);
    raw->switch_node = get(item, "switch");
}

static void read_switches(vctx *c, struct fy_node *seq, hx_inventory *inv,
                          struct fy_node ***member_lists)
{
    static const char *const keys[] = {"name", "uplink", "hosts", NULL};
    const char *path0 = "network.switches";
    if (fy_node_get_type(seq) != FYNT_SEQUENCE) {
        verr(c, seq, path0, "is %s; expected a list of {name, uplink}", hx_yaml_kind(seq));
        return;
    }
    int n = fy_node_sequence_item_count(seq);
    inv->switches = calloc((size_t)(n > 0 ? n : 1), sizeof *inv->switches);
    *member_lists = calloc((size_t)(n > 0 ? n : 1), sizeof **member_lists);
    if (!inv->switches || !*member_lists) {
        c->nerrors++;
        return;
    }
    void *it = NULL;
    struct fy_node *item;
    int i = 0;
    while ((item = fy_node_sequence_iterate(seq, &it)) != NULL) {
        char path[64], fp[256];
        path_index(path, sizeof path, path0, i++);
        if (!check_mapping(c, item, path, keys))
            continue;
        const char *name = get_string(c, item, "name", path, 1);
        if (!name)
            continue;
        if (!valid_name(name)) {
            verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
                 "'%s' is not a valid switch name; expected letters, digits, '-', '_' or '.'",
                 name);
            continue;
        }
        int dup = 0;
        for (size_t k = 0; k < inv->nswitches; k++)
            if (!strcmp(inv->switches[k].name, name))
                dup = 1;
        if (dup) {
            verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
                 "switch '%s' is declared twice; expected unique switch names", name);
            continue;
        }
        hx_switch *sw = &inv->switches[inv->nswitches];
        get_quantity(c, item, "uplink", path, hx_units_parse_bandwidth, 0, 1,
                     &sw->uplink_bytes_per_s);
        struct fy_node *members = get(item, "hosts");
        if (members && fy_node_get_type(members) != FYNT_SEQUENCE) {
            verr(c, members, path_key(fp, sizeof fp, path, "hosts"),
                 "is %s; expected a list of host names", hx_yaml_kind(members));
            members = NULL;
        }
        (*member_lists)[inv->nswitches] = members;
        sw->name = xstrdup(name);
        inv->nswitches++;
    }
}

static int find_switch(const hx_inventory *inv, const char *name)
{
    for (size_t i = 0; i < inv->nswitches; i++)
        if (!strcmp(inv->switches[i].name, name))
            return (int)i;
    return -1;
}

/* A host name given in a link or a switch's host list: known, or an error with suggestion. */
static int resolve_host(vctx *c, const hx_inventory *inv, struct fy_node *n, const char *path)
{
    const char *s = scalar_of(c, n, path, "a host name");
    if (!s)
        return -1;
    int h = hx_inventory_find_host(inv, s);
    if (h >= 0)
        return h;
    const char **names = calloc(inv->nhosts ? inv->nhosts : 1, sizeof *names);
    const char *sug = NULL;
    if (names) {
        size_t k = 0;
        for (size_t i = 0; i < inv->nhosts; i++)
            if (inv->hosts[i].name)
                names[k++] = inv->hosts[i].name;
        sug = hx_text_closest(s, names, k, 2);
    }
    if (sug)
        verr(c, n, path, "unknown host '%s'; did you mean '%s'?", s, sug);
    else
        verr(c, n, path, "unknown host '%s'; expected the name of a host in 'hosts'", s);
    free(names);
    return -1;
}

static int link_cmp(const void *a, const void *b)
{
    const hx_link *x = a, *y = b;
    if (x->host_a != y->host_a)
        return x->host_a < y->host_a ? -1 : 1;
    if (x->host_b != y->host_b)
        return x->host_b < y->host_b ? -1 : 1;
    return 0;
}

static void read_links(vctx *c, struct fy_node *seq, hx_inventory *inv)
{
    static const char *const keys[] = {"a", "b", "bandwidth", "latency", NULL};
    const char *path0 = "network.links";
    if (fy_node_get_type(seq) != FYNT_SEQUENCE) {
        verr(c, seq, path0, "is %s; expected a list of {a, b, bandwidth, latency}",
             hx_yaml_kind(seq));
        return;
    }
    int n = fy_node_sequence_item_count(seq);
    inv->links = calloc((size_t)(n > 0 ? n : 1), sizeof *inv->links);
    if (!inv->links) {
        c->nerrors++;
        return;
    }
    void *it = NULL;
    struct fy_node *item;
    int i = 0;
    while ((item = fy_node_sequence_iterate(seq, &it)) != NULL) {
        char path[64], fp[256];
        path_index(path, sizeof path, path0, i++);
        if (!check_mapping(c, item, path, keys))
            continue;
        int ha = -1, hb = -1;
        if (!get(item, "a") || !get(item, "b")) {
            verr(c, item, path, "missing a or b; expected the two host names the link joins");
            continue;
        }
        ha = resolve_host(c, inv, get(item, "a"), path_key(fp, sizeof fp, path, "a"));
        hb = resolve_host(c, inv, get(item, "b"), path_key(fp, sizeof fp, path, "b"));
        hx_link l = {0};
        int ok = get_quantity(c, item, "bandwidth", path, hx_units_parse_bandwidth, 1, 1,
                              &l.bytes_per_s);
        get_quantity(c, item, "latency", path, hx_units_parse_time, 0, 0, &l.latency_s);
        if (ha < 0 || hb < 0 || !ok)
            continue;
        if (ha == hb) {
            verr(c, get(item, "b"), path_key(fp, sizeof fp, path, "b"),
                 "link joins host '%s' to itself; expected two different hosts (use the "
                 "host's 'intra' for links inside a host)",
                 inv->hosts[ha].name);
            continue;
        }
        l.host_a = ha < hb ? ha : hb;
        l.host_b = ha < hb ? hb : ha;
        if (hx_inventory_find_link(inv, ha, hb)) {
            verr(c, item, path, "a link between '%s' and '%s' is already given; expected one "
                 "link per pair of hosts", inv->hosts[l.host_a].name, inv->hosts[l.host_b].name);
            continue;
        }
        /* keep sorted as we go so that duplicate checks can bsearch */
        inv->links[inv->nlinks++] = l;
        qsort(inv->links, inv->nlinks, sizeof *inv->links, link_cmp);
    }
}

/* ------------------------------------------------------------------------- */
/* The whole document                                                          */

static hx_status build(vctx *c, struct fy_document *doc, const char *name, hx_inventory **out)
{
    static const char *const top_keys[] = {"name", "defaults", "gpu_types", "hosts", "network",
                                           NULL};
    static const char *const defaults_keys[] = {"ssh", "workdir", NULL};
    static const char *const network_keys[] = {"switches", "links", NULL};

    struct fy_node *root = fy_document_root(doc);
    if (!root) {
        hx_diags_add(c->diags, c->file, 1, 1, NULL,
                     "the inventory is empty; expected a mapping with 'hosts'");
        return HX_EPARSE;
    }
    if (fy_node_get_type(root) != FYNT_MAPPING) {
        verr(c, root, NULL,
             "the document is %s; expected a mapping with name, defaults, gpu_types, hosts "
             "and network",
             hx_yaml_kind(root));
        return HX_EPARSE;
    }
    check_mapping(c, root, "", top_keys);

    hx_inventory *inv = calloc(1, sizeof *inv);
    type_list types = {0};
    host_raw *raw = NULL;
    struct fy_node **members = NULL;
    if (!inv)
        return HX_ENOMEM;
    inv->path = xstrdup(name);

    const char *iname = get_string(c, root, "name", "", 0);
    if (iname) {
        inv->name = xstrdup(iname);
    } else {
        const char *base = strrchr(name, '/');
        base = base ? base + 1 : name;
        inv->name = strndup(base, strcspn(base, "."));
    }

    struct fy_node *defaults = get(root, "defaults");
    if (defaults && check_mapping(c, defaults, "defaults", defaults_keys)) {
        read_ssh(c, get(defaults, "ssh"), "defaults.ssh", NULL, &inv->default_ssh);
        inv->default_workdir = xstrdup(get_string(c, defaults, "workdir", "defaults", 0));
    } else {
        inv->default_ssh.port = HX_DEFAULT_SSH_PORT;
    }

    struct fy_node *gt = get(root, "gpu_types");
    if (gt)
        read_gpu_types(c, gt, &types);

    struct fy_node *hosts = get(root, "hosts");
    if (!hosts) {
        verr(c, root, "hosts", "missing; expected a list of hosts with name, address and gpus");
    } else if (fy_node_get_type(hosts) != FYNT_SEQUENCE) {
        verr(c, hosts, "hosts", "is %s; expected a list of hosts", hx_yaml_kind(hosts));
    } else if (fy_node_sequence_item_count(hosts) == 0) {
        verr(c, hosts, "hosts", "is empty; expected at least one host");
    } else {
        int n = fy_node_sequence_item_count(hosts);
        inv->hosts = calloc((size_t)n, sizeof *inv->hosts);
        raw = calloc((size_t)n, sizeof *raw);
        if (!inv->hosts || !raw) {
            c->nerrors++;
            goto out;
        }
        void *it = NULL;
        struct fy_node *item;
        while ((item = fy_node_sequence_iterate(hosts, &it)) != NULL) {
            char path[64], fp[256];
            size_t i = inv->nhosts++;
            path_index(path, sizeof path, "hosts", (int)i);
            read_host(c, item, path, inv, &inv->hosts[i], &raw[i]);
            const char *hn = inv->hosts[i].name;
            for (size_t k = 0; hn && k < i; k++) {
                if (inv->hosts[k].name && !strcmp(inv->hosts[k].name, hn)) {
                    verr(c, get(item, "name"), path_key(fp, sizeof fp, path, "name"),
                         "duplicate host name '%s' (first defined on line %d); expected "
                         "unique host names",
                         hn, inv->hosts[k].line);
                    break;
                }
            }
        }
    }

    struct fy_node *network = get(root, "network");
    if (network && check_mapping(c, network, "network", network_keys)) {
        struct fy_node *sw = get(network, "switches");
        if (sw)
            read_switches(c, sw, inv, &members);
        struct fy_node *links = get(network, "links");
        if (links)
            read_links(c, links, inv);
    }

    /* Switch membership given on the switch side. */
    for (size_t s = 0; members && s < inv->nswitches; s++) {
        if (!members[s])
            continue;
        void *it = NULL;
        struct fy_node *m;
        int i = 0;
        while ((m = fy_node_sequence_iterate(members[s], &it)) != NULL) {
            char path[128];
            snprintf(path, sizeof path, "network.switches[%zu].hosts[%d]", s, i++);
            int h = resolve_host(c, inv, m, path);
            if (h < 0)
                continue;
            if (raw[h].switch_name && strcmp(raw[h].switch_name, inv->switches[s].name)) {
                verr(c, m, path, "host '%s' is on switch '%s' in 'hosts'; expected a host on "
                     "one switch", inv->hosts[h].name, raw[h].switch_name);
                continue;
            }
            if (inv->hosts[h].switch_index >= 0 && inv->hosts[h].switch_index != (int)s) {
                verr(c, m, path, "host '%s' is already on switch '%s'; expected a host on one "
                     "switch", inv->hosts[h].name,
                     inv->switches[inv->hosts[h].switch_index].name);
                continue;
            }
            inv->hosts[h].switch_index = (int)s;
        }
    }

    /* Cross references from hosts: GPU type and switch. */
    for (size_t i = 0; i < inv->nhosts; i++) {
        hx_host *h = &inv->hosts[i];
        char path[64];
        if (raw[i].type_name) {
            path_index(path, sizeof path, "hosts", (int)i);
            char fp[128];
            path_key(fp, sizeof fp, path, "gpus.type");
            int t = types_find(&types, raw[i].type_name);
            if (t < 0) {
                const hx_gpu_spec *spec = hx_catalog_find(raw[i].type_name);
                if (spec) {
                    t = types_find(&types, spec->name);
                    if (t < 0) {
                        types_push(&types, spec);
                        t = (int)types.n - 1;
                    }
                }
            }
            if (t < 0) {
                const char **extra = calloc(types.n ? types.n : 1, sizeof *extra);
                for (size_t k = 0; extra && k < types.n; k++)
                    extra[k] = types.v[k].name;
                char sug[256];
                hx_catalog_suggest_among(raw[i].type_name, extra, extra ? types.n : 0, sug,
                                         sizeof sug);
                free(extra);
                if (sug[0])
                    verr(c, raw[i].type_node, fp,
                         "unknown GPU type '%s'; did you mean %s? (declare new types in "
                         "gpu_types)",
                         raw[i].type_name, sug);
                else
                    verr(c, raw[i].type_node, fp,
                         "unknown GPU type '%s'; expected a catalog type (see 'hexflow "
                         "inventory check --help') or one declared in gpu_types",
                         raw[i].type_name);
            }
            h->gpu_type = t;
        }
        if (raw[i].switch_name) {
            path_index(path, sizeof path, "hosts", (int)i);
            char fp[128];
            path_key(fp, sizeof fp, path, "switch");
            int s = find_switch(inv, raw[i].switch_name);
            if (s < 0) {
                const char **names = calloc(inv->nswitches ? inv->nswitches : 1, sizeof *names);
                for (size_t k = 0; names && k < inv->nswitches; k++)
                    names[k] = inv->switches[k].name;
                const char *sug = names ? hx_text_closest(raw[i].switch_name, names, inv->nswitches, 2)
                                        : NULL;
                free(names);
                if (sug)
                    verr(c, raw[i].switch_node, fp,
                         "unknown switch '%s'; did you mean '%s'?", raw[i].switch_name, sug);
                else
                    verr(c, raw[i].switch_node, fp,
                         "unknown switch '%s'; expected a switch declared in network.switches",
                         raw[i].switch_name);
            }
            h->switch_index = s;
        }
    }

    /* Device numbering and totals. */
    size_t ndev = 0;
    for (size_t i = 0; i < inv->nhosts; i++) {
        inv->hosts[i].first_device = (int)ndev;
        ndev += (size_t)inv->hosts[i].gpu_count;
    }
    if (ndev > HX_MAX_DEVICES)
        verr(c, hosts, "hosts", "%zu devices in all; expected at most %d", ndev, HX_MAX_DEVICES);
    inv->ndevices = ndev;

out:
    free(raw);
    free(members);
    inv->types = types.v;
    inv->ntypes = types.n;
    if (c->nerrors > 0) {
        hx_inventory_free(inv);
        return HX_EPARSE;
    }
    *out = inv;
    return HX_OK;
}

hx_status hx_inventory_load_string(const char *text, size_t len, const char *name,
                                   hx_inventory **out, hx_diags *diags)
{
    struct fy_document *doc = NULL;
    hx_status st = hx_yaml_load_string(text, len, name, &doc, diags);
    if (st != HX_OK)
        return st;
    vctx c = {name, diags, 0};
    st = build(&c, doc, name, out);
    fy_document_destroy(doc);
    return st;
}

hx_status hx_inventory_load(const char *path, hx_inventory **out, hx_diags *diags)
{
    struct fy_document *doc = NULL;
    hx_status st = hx_yaml_load_file(path, "inventory", &doc, diags);
    if (st != HX_OK)
        return st;
    vctx c = {path, diags, 0};
    st = build(&c, doc, path, out);
    fy_document_destroy(doc);
    return st;
}

void hx_inventory_free(hx_inventory *inv)
{
    if (!inv)
        return;
    for (size_t i = 0; i < inv->nhosts; i++) {
        free(inv->hosts[i].name);
        free(inv->hosts[i].address);
        free(inv->hosts[i].workdir);
        ssh_release(&inv->hosts[i].ssh);
    }
    for (size_t i = 0; i < inv->nswitches; i++)
        free(inv->switches[i].name);
    ssh_release(&inv->default_ssh);
    free(inv->default_workdir);
    free(inv->hosts);
    free(inv->switches);
    free(inv->links);
    free(inv->types);
    free(inv->name);
    free(inv->path);
    free(inv);
}

int hx_inventory_find_host(const hx_inventory *inv, const char *name)
{
    for (size_t i = 0; i < inv->nhosts; i++)
        if (inv->hosts[i].name && !strcmp(inv->hosts[i].name, name))
            return (int)i;
    return -1;
}

const hx_link *hx_inventory_find_link(const hx_inventory *inv, int host_a, int host_b)
{
    hx_link key = {0};
    key.host_a = host_a < host_b ? host_a : host_b;
    key.host_b = host_a < host_b ? host_b : host_a;
    if (inv->nlinks == 0)
        return NULL;
    return bsearch(&key, inv->links, inv->nlinks, sizeof *inv->links, link_cmp);
}

const hx_gpu_spec *hx_inventory_host_spec(const hx_inventory *inv, const hx_host *h)
{
    return &inv->types[h->gpu_type];
}

int hx_inventory_device_host(const hx_inventory *inv, int device, int *local_index)
{
    if (device < 0 || (size_t)device >= inv->ndevices)
        return -1;
    /* hosts are in device order: binary search on first_device */
    size_t lo = 0, hi = inv->nhosts;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (inv->hosts[mid].first_device <= device)
            lo = mid;
        else
            hi = mid;
    }
    if (local_index)
        *local_index = device - inv->hosts[lo].first_device;
    return (int)lo;
}

const char *hx_inventory_device_name(const hx_inventory *inv, int device, char *buf,
                                     size_t size)
{
    int local = 0;
    int h = hx_inventory_device_host(inv, device, &local);
    if (h < 0)
        snprintf(buf, size, "?:%d", device);
    else
        snprintf(buf, size, "%s:%d", inv->hosts[h].name, local);
    return buf;
}

/* ------------------------------------------------------------------------- */
/* Writing                                                                    */

static json_t *qty(double v, const char *unit)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%.17g%s", v, unit);
    return json_string(buf);
}

static void ssh_to_json(json_t *o, const hx_ssh_settings *s)
{
    json_t *ssh = json_object();
    if (s->user)
        json_object_set_new(ssh, "user", json_string(s->user));
    json_object_set_new(ssh, "port", json_integer(s->port ? s->port : HX_DEFAULT_SSH_PORT));
    if (s->identity)
        json_object_set_new(ssh, "identity", json_string(s->identity));
    if (s->known_hosts)
        json_object_set_new(ssh, "known_hosts", json_string(s->known_hosts));
    json_object_set_new(o, "ssh", ssh);
}

json_t *hx_inventory_to_json(const hx_inventory *inv, const unsigned char *hosts)
{
    static const char *const intra[] = {"none", "pcie", "nvlink"};
    json_t *root = json_object();
    if (!root)
        return NULL;
    json_object_set_new(root, "name", json_string(inv->name ? inv->name : "inventory"));
    /* every type in use, with its figures, so the document stands alone */
    json_t *types = json_array();
    for (size_t t = 0; t < inv->ntypes; t++) {
        int used = 0;
        for (size_t h = 0; h < inv->nhosts; h++)
            if ((!hosts || hosts[h]) && inv->hosts[h].gpu_type == (int)t)
                used = 1;
        if (!used)
            continue;
        const hx_gpu_spec *s = &inv->types[t];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(s->name));
        json_object_set_new(o, "memory", qty(s->memory_bytes, "B"));
        json_object_set_new(o, "bf16_tflops", json_real(s->bf16_flops / 1e12));
        json_object_set_new(o, "hbm_bandwidth", qty(s->hbm_bytes_per_s, "B/s"));
        json_object_set_new(o, "price_per_hour", json_real(s->usd_per_hour));
        json_array_append_new(types, o);
    }
    json_object_set_new(root, "gpu_types", types);
    json_t *hs = json_array();
    for (size_t h = 0; h < inv->nhosts; h++) {
        if (hosts && !hosts[h])
            continue;
        const hx_host *x = &inv->hosts[h];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(x->name));
        json_object_set_new(o, "address", json_string(x->address));
        ssh_to_json(o, &x->ssh);
        if (x->workdir)
            json_object_set_new(o, "workdir", json_string(x->workdir));
        json_object_set_new(o, "gpus", json_pack("{s:s, s:i}", "type",
                                                 inv->types[x->gpu_type].name, "count",
                                                 x->gpu_count));
        json_object_set_new(o, "intra", json_pack("{s:s, s:o}", "kind", intra[x->intra_kind],
                                                  "bandwidth",
                                                  qty(x->intra_bytes_per_s, "B/s")));
        json_object_set_new(o, "nic", json_pack("{s:o, s:b}", "bandwidth",
                                                qty(x->nic_bytes_per_s, "B/s"), "rdma",
                                                x->nic_rdma));
        if (x->switch_index >= 0)
            json_object_set_new(o, "switch", json_string(inv->switches[x->switch_index].name));
        json_array_append_new(hs, o);
    }
    json_object_set_new(root, "hosts", hs);
    json_t *net = json_object(), *sw = json_array(), *links = json_array();
    for (size_t i = 0; i < inv->nswitches; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(inv->switches[i].name));
        if (inv->switches[i].uplink_bytes_per_s > 0)
            json_object_set_new(o, "uplink", qty(inv->switches[i].uplink_bytes_per_s, "B/s"));
        json_array_append_new(sw, o);
    }
    for (size_t i = 0; i < inv->nlinks; i++) {
        const hx_link *l = &inv->links[i];
        if (hosts && (!hosts[l->host_a] || !hosts[l->host_b]))
            continue;
        json_t *o = json_object();
        json_object_set_new(o, "a", json_string(inv->hosts[l->host_a].name));
        json_object_set_new(o, "b", json_string(inv->hosts[l->host_b].name));
        json_object_set_new(o, "bandwidth", qty(l->bytes_per_s, "B/s"));
        if (l->latency_s > 0)
            json_object_set_new(o, "latency", qty(l->latency_s, "s"));
        json_array_append_new(links, o);
    }
    json_object_set_new(net, "switches", sw);
    json_object_set_new(net, "links", links);
    json_object_set_new(root, "network", net);
    return root;
}
