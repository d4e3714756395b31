/* deploy.c - see deploy.h. */
#include "runtime/deploy.h"

#include <stdlib.h>
#include <string.h>

const char *hx_deploy_host_address(const hx_plan *p, int host)
{
    const char *a = p->hosts[host].address;
    return (!a || strcmp(a, "local") == 0) ? "127.0.0.1" : a;
}

/* Splits "host:N" into the host's index and N; -1 on failure. */
static int parse_device(const hx_plan *p, const char *dev, int *index)
{
    const char *colon = strrchr(dev, ':');
    if (!colon || colon == dev || !colon[1])
        return -1;
    char *end;
    long n = strtol(colon + 1, &end, 10);
    if (*end || n < 0 || n > 1 << 20)
        return -1;
    for (int h = 0; h < p->nhosts; h++)
        if (strlen(p->hosts[h].name) == (size_t)(colon - dev) &&
            memcmp(p->hosts[h].name, dev, (size_t)(colon - dev)) == 0) {
            *index = (int)n;
            return h;
        }
    return -1;
}

hx_status hx_deploy_init(hx_deploy *d, const hx_plan *p, hx_err *err)
{
    memset(d, 0, sizeof *d);
    d->plan = p;
    int n = 0;
    for (int g = 0; g < p->ngroups; g++)
        for (int s = 0; s < p->groups[g].nstages; s++)
            n += p->groups[g].stages[s].ndevices;
    d->workers = calloc(n ? (size_t)n : 1, sizeof *d->workers);
    d->group_first = calloc(p->ngroups ? (size_t)p->ngroups : 1, sizeof *d->group_first);
    if (!d->workers || !d->group_first) {
        hx_deploy_release(d);
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    }
    int rh = p->router_host ? hx_plan_find_host(p, p->router_host) : 0;
    if (rh < 0 || p->nhosts < 1) {
        hx_deploy_release(d);
        return hx_err_set(err, HX_EINVAL, "plan: router host '%s' is not a host of the plan",
                          p->router_host ? p->router_host : "");
    }
    d->router_address = hx_deploy_host_address(p, rh);
    d->router_port = p->router_port > 0 ? p->router_port : HX_PLAN_DEFAULT_ROUTER_PORT;
    int i = 0;
    for (int g = 0; g < p->ngroups; g++) {
        d->group_first[g] = i;
        for (int s = 0; s < p->groups[g].nstages; s++) {
            const hx_plan_stage *st = &p->groups[g].stages[s];
            for (int r = 0; r < st->ndevices; r++, i++) {
                hx_deploy_worker *w = &d->workers[i];
                w->index = i;
                w->group = g;
                w->stage = s;
                w->rank = r;
                w->tp = st->ndevices;
                w->device = st->devices[r];
                w->host = parse_device(p, st->devices[r], &w->device_index);
                if (w->host < 0) {
                    hx_deploy_release(d);
                    return hx_err_set(err, HX_EINVAL,
                                      "plan: group '%s' stage %d: device '%s' is not HOST:N "
                                      "with a host of the plan",
                                      p->groups[g].id, s, st->devices[r]);
                }
                w->address = hx_deploy_host_address(p, w->host);
                w->port = d->router_port + 1 + i;
                if (w->port > 65535) {
                    hx_deploy_release(d);
                    return hx_err_set(err, HX_EINVAL,
                                      "plan: router port %d leaves no room for %d worker ports "
                                      "(workers listen on router port + 1 ...)",
                                      d->router_port, n);
                }
            }
        }
    }
    d->nworkers = n;
    return HX_OK;
}

void hx_deploy_release(hx_deploy *d)
{
    if (!d)
        return;
    free(d->workers);
    free(d->group_first);
    memset(d, 0, sizeof *d);
}

int hx_deploy_find_device(const hx_deploy *d, const char *device)
{
    for (int i = 0; i < d->nworkers; i++)
        if (strcmp(d->workers[i].device, device) == 0)
            return i;
    return -1;
}

int hx_deploy_worker_at(const hx_deploy *d, int group, int stage, int rank)
{
    if (group < 0 || group >= d->plan->ngroups)
        return -1;
    const hx_plan_group *g = &d->plan->groups[group];
    if (stage < 0 || stage >= g->nstages || rank < 0 || rank >= g->stages[stage].ndevices)
        return -1;
    int i = d->group_first[group];
    for (int s = 0; s < stage; s++)
        i += g->stages[s].ndevices;
    return i + rank;
}

int hx_deploy_leader(const hx_deploy *d, int g)
{
    return d->group_first[g];
}

int hx_deploy_group_size(const hx_deploy *d, int g)
{
    int n = 0;
    for (int s = 0; s < d->plan->groups[g].nstages; s++)
        n += d->plan->groups[g].stages[s].ndevices;
    return n;
}

int hx_deploy_kv_layout(const hx_deploy *d, int g, hx_kv_stage *out, int cap)
{
    const hx_plan_group *pg = &d->plan->groups[g];
    for (int s = 0; s < pg->nstages && s < cap; s++)
        out[s] = (hx_kv_stage){pg->stages[s].first_layer, pg->stages[s].num_layers,
                               pg->stages[s].ndevices};
    return pg->nstages;
}
