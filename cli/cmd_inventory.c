/*
 * cmd_inventory.c - `hexflow inventory check|show FILE [--json]`.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/json.h"
#include "common/table.h"
#include "common/units.h"
#include "topo/graph.h"
#include "topo/inventory.h"

/* Host-to-host bandwidth is printed as a matrix up to this many hosts, by switch above. */
#define MATRIX_MAX_HOSTS 12
#define JSON_MATRIX_MAX_HOSTS 64

static const char usage_text[] =
    "usage: hexflow inventory check FILE\n"
    "       hexflow inventory show FILE [--json]\n"
    "\n"
    "  check   validate FILE; print every problem as FILE:LINE:COL: field: message\n"
    "  show    hosts, devices per type, total memory, peak compute, $/hour and the\n"
    "          bandwidth between hosts (or switches, for large clusters)\n"
    "\n"
    "options:\n"
    "  --json      machine-readable output (show)\n"
    "  -h, --help  this text\n"
    "\n"
    "The format is described in docs/inventory-format.md. Known GPU types:\n";

static void print_usage(FILE *fp)
{
    fputs(usage_text, fp);
    fputs("  ", fp);
    for (size_t i = 0; i < hx_catalog_count(); i++)
        fprintf(fp, "%s%s", hx_catalog_at(i)->name, i + 1 < hx_catalog_count() ? ", " : "\n");
}

/* Loads FILE, printing all diagnostics on failure. Returns the exit status. */
static int load(const char *path, hx_inventory **out)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_status st = hx_inventory_load(path, out, &d);
    if (st != HX_OK) {
        hx_diags_print(&d, stderr, "");
        if (st == HX_EPARSE)
            hx_cli_error("inventory '%s' has %zu error%s", path, d.count,
                         d.count == 1 ? "" : "s");
        else if (d.count == 0)
            hx_cli_error("cannot load inventory '%s': %s", path, hx_strerror(st));
    }
    hx_diags_release(&d);
    return st == HX_OK ? 0 : hx_status_exit_code(st) ? hx_status_exit_code(st) : 1;
}

typedef struct totals {
    double memory_bytes;
    double flops;
    double usd_per_hour;
} totals;

static totals host_totals(const hx_inventory *inv, const hx_host *h)
{
    const hx_gpu_spec *s = hx_inventory_host_spec(inv, h);
    totals t = {s->memory_bytes * h->gpu_count, s->bf16_flops * h->gpu_count,
                s->usd_per_hour * h->gpu_count};
    return t;
}

static totals all_totals(const hx_inventory *inv)
{
    totals t = {0, 0, 0};
    for (size_t i = 0; i < inv->nhosts; i++) {
        totals h = host_totals(inv, &inv->hosts[i]);
        t.memory_bytes += h.memory_bytes;
        t.flops += h.flops;
        t.usd_per_hour += h.usd_per_hour;
    }
    return t;
}

/* Devices of each type, in type order; caller frees. */
static int *type_counts(const hx_inventory *inv)
{
    int *n = calloc(inv->ntypes ? inv->ntypes : 1, sizeof *n);
    if (!n)
        return NULL;
    for (size_t i = 0; i < inv->nhosts; i++)
        n[inv->hosts[i].gpu_type] += inv->hosts[i].gpu_count;
    return n;
}

static const char *intra_name(hx_intra_kind k)
{
    return k == HX_INTRA_NVLINK ? "nvlink" : k == HX_INTRA_PCIE ? "pcie" : "none";
}

static void describe_devices(const hx_inventory *inv, char *buf, size_t size)
{
    int *n = type_counts(inv);
    size_t len = 0;
    buf[0] = '\0';
    for (size_t t = 0; n && t < inv->ntypes && len < size; t++) {
        if (!n[t])
            continue;
        int k = snprintf(buf + len, size - len, "%s%d x %s", len ? ", " : "", n[t],
                         inv->types[t].name);
        if (k > 0)
            len += (size_t)k;
    }
    free(n);
}

static int cmd_check(const char *path)
{
    hx_inventory *inv = NULL;
    int rc = load(path, &inv);
    if (rc)
        return rc;
    char devs[1024];
    describe_devices(inv, devs, sizeof devs);
    printf("%s: ok: %zu host%s, %zu device%s (%s)\n", path, inv->nhosts,
           inv->nhosts == 1 ? "" : "s", inv->ndevices, inv->ndevices == 1 ? "" : "s", devs);
    hx_inventory_free(inv);
    return 0;
}

static const char *fmt_bw(double bw, char *buf, size_t size)
{
    if (isinf(bw)) {
        snprintf(buf, size, "-");
        return buf;
    }
    return hx_units_fmt_bandwidth(bw, buf, size);
}

static void show_text(const hx_inventory *inv, const hx_graph *g)
{
    char a[64], b[64], c[64], d[64];
    totals t = all_totals(inv);
    char devs[1024];
    describe_devices(inv, devs, sizeof devs);
    printf("inventory %s: %zu host%s, %zu device%s (%s)\n", inv->name, inv->nhosts,
           inv->nhosts == 1 ? "" : "s", inv->ndevices, inv->ndevices == 1 ? "" : "s", devs);
    printf("memory %s, peak %s (dense BF16), $%.2f/hour\n\n",
           hx_units_fmt_bytes(t.memory_bytes, a, sizeof a),
           hx_units_fmt_flops(t.flops, b, sizeof b), t.usd_per_hour);

    hx_table *tt = hx_table_new(7, "TYPE", ">COUNT", ">MEMORY", ">BF16 TFLOP/s", ">HBM",
                                ">$/H EACH", ">$/H");
    int *n = type_counts(inv);
    for (size_t i = 0; n && i < inv->ntypes; i++) {
        const hx_gpu_spec *s = &inv->types[i];
        if (!n[i])
            continue;
        hx_table_rowf(tt, "%s|%d|%s|%s|%s|%.2f|%.2f", s->name, n[i],
                      hx_units_fmt_bytes(s->memory_bytes, a, sizeof a),
                      hx_units_fmt_number(s->bf16_flops / 1e12, c, sizeof c),
                      hx_units_fmt_byte_rate(s->hbm_bytes_per_s, b, sizeof b), s->usd_per_hour,
                      s->usd_per_hour * n[i]);
    }
    free(n);
    hx_table_print(tt, stdout);
    hx_table_free(tt);
    putchar('\n');

    hx_table *ht = hx_table_new(9, "HOST", "ADDRESS", "SWITCH", "DEVICES", "INTRA", "NIC",
                                ">MEMORY", ">TFLOP/s", ">$/H");
    for (size_t i = 0; i < inv->nhosts; i++) {
        const hx_host *h = &inv->hosts[i];
        totals ht_ = host_totals(inv, h);
        char f[32];
        hx_table_rowf(ht, "%s|%s|%s|%d x %s|%s %s|%s%s|%s|%s|%.2f", h->name, h->address,
                      h->switch_index >= 0 ? inv->switches[h->switch_index].name : "-",
                      h->gpu_count, hx_inventory_host_spec(inv, h)->name,
                      intra_name(h->intra_kind),
                      hx_units_fmt_byte_rate(h->intra_bytes_per_s, b, sizeof b),
                      hx_units_fmt_bandwidth(h->nic_bytes_per_s, c, sizeof c),
                      h->nic_rdma ? " rdma" : "",
                      hx_units_fmt_bytes(ht_.memory_bytes, d, sizeof d),
                      hx_units_fmt_number(ht_.flops / 1e12, f, sizeof f),
                      ht_.usd_per_hour);
    }
    hx_table_print(ht, stdout);
    hx_table_free(ht);

    if (inv->nhosts >= 2 && inv->nhosts <= MATRIX_MAX_HOSTS) {
        printf("\nbandwidth between hosts (narrowest hop; diagonal: inside the host)\n");
        int width = 9;
        for (size_t k = 0; k < inv->nhosts; k++)
            if ((int)strlen(inv->hosts[k].name) > width)
                width = (int)strlen(inv->hosts[k].name);
        printf("%-*s", width, "");
        for (size_t k = 0; k < inv->nhosts; k++)
            printf("  %*s", width, inv->hosts[k].name);
        putchar('\n');
        for (size_t i = 0; i < inv->nhosts; i++) {
            printf("%-*s", width, inv->hosts[i].name);
            for (size_t k = 0; k < inv->nhosts; k++)
                printf("  %*s", width,
                       fmt_bw(hx_graph_host_path(g, (int)i, (int)k).bytes_per_s, a, sizeof a));
            putchar('\n');
        }
    } else if (inv->nhosts > MATRIX_MAX_HOSTS) {
        printf("\n%zu hosts: bandwidth by switch (a host's NIC also limits its traffic)\n",
               inv->nhosts);
        hx_table *st = hx_table_new(4, "SWITCH", ">HOSTS", ">DEVICES", ">UPLINK");
        for (int s = -1; s < (int)inv->nswitches; s++) {
            int nh = 0, nd = 0;
            for (size_t i = 0; i < inv->nhosts; i++)
                if (inv->hosts[i].switch_index == s) {
                    nh++;
                    nd += inv->hosts[i].gpu_count;
                }
            if (s < 0 && nh == 0)
                continue;
            double up = s >= 0 ? inv->switches[s].uplink_bytes_per_s : 0;
            hx_table_rowf(st, "%s|%d|%d|%s", s >= 0 ? inv->switches[s].name : "(none)", nh, nd,
                          up > 0 ? hx_units_fmt_bandwidth(up, a, sizeof a) : "-");
        }
        hx_table_print(st, stdout);
        hx_table_free(st);
    }
}

static json_t *ssh_json(const hx_ssh_settings *s)
{
    json_t *o = json_object();
    if (s->user)
        json_object_set_new(o, "user", json_string(s->user));
    json_object_set_new(o, "port", json_integer(s->port));
    if (s->identity)
        json_object_set_new(o, "identity", json_string(s->identity));
    if (s->known_hosts)
        json_object_set_new(o, "known_hosts", json_string(s->known_hosts));
    return o;
}

static json_t *bw_json(double bw)
{
    return isinf(bw) ? json_null() : json_real(bw);
}

static json_t *show_json(const hx_inventory *inv, const hx_graph *g)
{
    json_t *root = json_object();
    totals t = all_totals(inv);
    json_object_set_new(root, "name", json_string(inv->name));
    json_object_set_new(root, "path", json_string(inv->path));
    json_t *tot = json_object();
    json_object_set_new(tot, "hosts", json_integer((json_int_t)inv->nhosts));
    json_object_set_new(tot, "devices", json_integer((json_int_t)inv->ndevices));
    json_object_set_new(tot, "memory_bytes", json_real(t.memory_bytes));
    json_object_set_new(tot, "bf16_flops", json_real(t.flops));
    json_object_set_new(tot, "usd_per_hour", json_real(t.usd_per_hour));
    json_object_set_new(root, "totals", tot);

    json_t *types = json_array();
    int *n = type_counts(inv);
    for (size_t i = 0; n && i < inv->ntypes; i++) {
        const hx_gpu_spec *s = &inv->types[i];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(s->name));
        json_object_set_new(o, "count", json_integer(n[i]));
        json_object_set_new(o, "memory_bytes", json_real(s->memory_bytes));
        json_object_set_new(o, "bf16_flops", json_real(s->bf16_flops));
        json_object_set_new(o, "hbm_bytes_per_s", json_real(s->hbm_bytes_per_s));
        json_object_set_new(o, "usd_per_hour", json_real(s->usd_per_hour));
        json_array_append_new(types, o);
    }
    free(n);
    json_object_set_new(root, "types", types);

    json_t *hosts = json_array();
    for (size_t i = 0; i < inv->nhosts; i++) {
        const hx_host *h = &inv->hosts[i];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(h->name));
        json_object_set_new(o, "address", json_string(h->address));
        json_object_set_new(o, "ssh", ssh_json(&h->ssh));
        if (h->workdir)
            json_object_set_new(o, "workdir", json_string(h->workdir));
        json_object_set_new(o, "gpu_type", json_string(hx_inventory_host_spec(inv, h)->name));
        json_object_set_new(o, "gpu_count", json_integer(h->gpu_count));
        json_object_set_new(o, "first_device", json_integer(h->first_device));
        json_object_set_new(o, "intra_kind", json_string(intra_name(h->intra_kind)));
        json_object_set_new(o, "intra_bytes_per_s", json_real(h->intra_bytes_per_s));
        json_object_set_new(o, "nic_bytes_per_s", json_real(h->nic_bytes_per_s));
        json_object_set_new(o, "nic_rdma", json_boolean(h->nic_rdma));
        json_object_set_new(o, "switch", h->switch_index >= 0
                                             ? json_string(inv->switches[h->switch_index].name)
                                             : json_null());
        json_array_append_new(hosts, o);
    }
    json_object_set_new(root, "hosts", hosts);

    json_t *sws = json_array();
    for (size_t i = 0; i < inv->nswitches; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(inv->switches[i].name));
        json_object_set_new(o, "uplink_bytes_per_s",
                            inv->switches[i].uplink_bytes_per_s > 0
                                ? json_real(inv->switches[i].uplink_bytes_per_s)
                                : json_null());
        json_array_append_new(sws, o);
    }
    json_object_set_new(root, "switches", sws);

    json_t *links = json_array();
    for (size_t i = 0; i < inv->nlinks; i++) {
        const hx_link *l = &inv->links[i];
        json_t *o = json_object();
        json_object_set_new(o, "a", json_string(inv->hosts[l->host_a].name));
        json_object_set_new(o, "b", json_string(inv->hosts[l->host_b].name));
        json_object_set_new(o, "bytes_per_s", json_real(l->bytes_per_s));
        json_object_set_new(o, "latency_s", l->latency_s > 0 ? json_real(l->latency_s)
                                                             : json_null());
        json_array_append_new(links, o);
    }
    json_object_set_new(root, "links", links);

    /* Host-to-host paths for small clusters; switch-to-switch otherwise. */
    json_t *bw = json_object();
    if (inv->nhosts <= JSON_MATRIX_MAX_HOSTS) {
        json_t *names = json_array(), *m = json_array(), *lat = json_array();
        for (size_t i = 0; i < inv->nhosts; i++) {
            json_array_append_new(names, json_string(inv->hosts[i].name));
            json_t *row = json_array(), *lrow = json_array();
            for (size_t k = 0; k < inv->nhosts; k++) {
                hx_path p = hx_graph_host_path(g, (int)i, (int)k);
                json_array_append_new(row, bw_json(p.bytes_per_s));
                json_array_append_new(lrow, json_real(p.latency_s));
            }
            json_array_append_new(m, row);
            json_array_append_new(lat, lrow);
        }
        json_object_set_new(bw, "hosts", names);
        json_object_set_new(bw, "bytes_per_s", m);
        json_object_set_new(bw, "latency_s", lat);
    } else {
        json_t *names = json_array(), *m = json_array();
        for (size_t i = 0; i < inv->nswitches; i++) {
            json_array_append_new(names, json_string(inv->switches[i].name));
            json_t *row = json_array();
            for (size_t k = 0; k < inv->nswitches; k++)
                json_array_append_new(row, bw_json(hx_graph_switch_bandwidth(g, (int)i, (int)k)));
            json_array_append_new(m, row);
        }
        json_object_set_new(bw, "switches", names);
        json_object_set_new(bw, "bytes_per_s", m);
    }
    json_object_set_new(root, "bandwidth", bw);
    return root;
}

static int cmd_show(const char *path, int as_json)
{
    hx_inventory *inv = NULL;
    int rc = load(path, &inv);
    if (rc)
        return rc;
    hx_graph *g = NULL;
    if (hx_graph_new(inv, &g) != HX_OK) {
        hx_inventory_free(inv);
        hx_cli_error("out of memory");
        return 1;
    }
    if (as_json) {
        json_t *j = show_json(inv, g);
        hx_json_print(j);
        json_decref(j);
    } else {
        show_text(inv, g);
    }
    hx_graph_free(g);
    hx_inventory_free(inv);
    return 0;
}

int hx_cmd_inventory(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int as_json = 0, c;
    opterr = 0;
    optind = 1;
    /* GNU getopt_long permutes argv: options may come before or after the operands. */
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'j': as_json = 1; break;
        case 'h': print_usage(stdout); return 0;
        default:
            return hx_cli_usage_error("inventory", "unknown option '%s'", argv[optind - 1]);
        }
    }
    int nargs = argc - optind;
    char **args = argv + optind;
    if (nargs < 1)
        return hx_cli_usage_error("inventory", "missing action; expected 'check' or 'show'");
    const char *action = args[0];
    if (strcmp(action, "check") && strcmp(action, "show"))
        return hx_cli_usage_error("inventory", "unknown action '%s'; expected 'check' or 'show'",
                                  action);
    if (nargs < 2)
        return hx_cli_usage_error("inventory", "%s: missing FILE", action);
    if (nargs > 2)
        return hx_cli_usage_error("inventory", "%s: unexpected argument '%s'", action, args[2]);
    if (!strcmp(action, "check")) {
        if (as_json)
            return hx_cli_usage_error("inventory", "check: --json applies to 'show'");
        return cmd_check(args[1]);
    }
    return cmd_show(args[1], as_json);
}
