#include "workload.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/units.h"
#include "common/yaml.h"

static int scalar_at(struct fy_node *map, const char *key, const char **out)
{
    struct fy_node *n = fy_node_mapping_lookup_by_string(map, key, FY_NT);
    if (!n)
        return 0;
    *out = hx_yaml_scalar(n);
    return 1;
}

static void field_error(hx_diags *d, const char *path, struct fy_node *map, const char *key,
                        const char *fmt, const char *value)
{
    struct fy_node *n = fy_node_mapping_lookup_by_string(map, key, FY_NT);
    int line, col;
    hx_yaml_node_pos(n ? n : map, &line, &col);
    hx_diags_add(d, path, line, col, key, fmt, value ? value : "");
}

/* A plain non-negative number ("512", "12.5"). */
static int parse_number(const char *s, double *out)
{
    if (!s || !*s)
        return 0;
    char *end;
    double v = strtod(s, &end);
    if (*end || !isfinite(v) || v < 0 || strchr(s, 'x') || strchr(s, 'X'))
        return 0;
    *out = v;
    return 1;
}

hx_status hx_workload_load(const char *path, hx_workload *wl, hx_diags *diags)
{
    static const char *const keys[] = {"input_tokens", "output_tokens", "rate", "slo", NULL};
    static const char *const slo_keys[] = {"ttft", "tpot", "attainment", NULL};
    struct fy_document *doc = NULL;
    hx_status st = hx_yaml_load_file(path, "workload", &doc, diags);
    if (st != HX_OK)
        return st;
    size_t before = diags->count;
    hx_workload w = *wl;
    struct fy_node *root = fy_document_root(doc);
    if (!root || fy_node_get_type(root) != FYNT_MAPPING) {
        int line = 1, col = 1;
        if (root)
            hx_yaml_node_pos(root, &line, &col);
        hx_diags_add(diags, path, line, col, NULL,
                     "the workload is %s; expected a mapping with input_tokens, output_tokens, "
                     "rate and slo",
                     root ? hx_yaml_kind(root) : "empty");
        goto out;
    }
    void *it = NULL;
    struct fy_node_pair *p;
    while ((p = fy_node_mapping_iterate(root, &it)) != NULL) {
        const char *k = hx_yaml_scalar(fy_node_pair_key(p));
        int known = 0;
        for (const char *const *a = keys; *a; a++)
            if (k && !strcmp(k, *a))
                known = 1;
        if (!known) {
            int line, col;
            hx_yaml_node_pos(fy_node_pair_key(p), &line, &col);
            hx_diags_add(diags, path, line, col, k ? k : "?",
                         "unknown field; expected input_tokens, output_tokens, rate or slo");
        }
    }
    const char *s;
    if (scalar_at(root, "input_tokens", &s) && !(parse_number(s, &w.input_tokens)))
        field_error(diags, path, root, "input_tokens", "'%s' is not a token count", s);
    if (scalar_at(root, "output_tokens", &s) && !(parse_number(s, &w.output_tokens)))
        field_error(diags, path, root, "output_tokens", "'%s' is not a token count", s);
    if (scalar_at(root, "rate", &s) && !(parse_number(s, &w.rate_rps)))
        field_error(diags, path, root, "rate", "'%s' is not a rate in requests/s", s);
    struct fy_node *slo = fy_node_mapping_lookup_by_string(root, "slo", FY_NT);
    if (slo) {
        if (fy_node_get_type(slo) != FYNT_MAPPING) {
            field_error(diags, path, root, "slo", "is not a mapping%s; expected ttft, tpot, attainment",
                        "");
        } else {
            it = NULL;
            while ((p = fy_node_mapping_iterate(slo, &it)) != NULL) {
                const char *k = hx_yaml_scalar(fy_node_pair_key(p));
                int known = 0;
                for (const char *const *a = slo_keys; *a; a++)
                    if (k && !strcmp(k, *a))
                        known = 1;
                if (!known) {
                    int line, col;
                    hx_yaml_node_pos(fy_node_pair_key(p), &line, &col);
                    hx_diags_add(diags, path, line, col, "slo",
                                 "unknown field '%s'; expected ttft, tpot or attainment",
                                 k ? k : "?");
                }
            }
            hx_err e = {0};
            if (scalar_at(slo, "ttft", &s) && hx_units_parse_time(s, &w.slo_ttft_s, &e) != HX_OK)
                field_error(diags, path, slo, "ttft", "%s", e.msg);
            if (scalar_at(slo, "tpot", &s) && hx_units_parse_time(s, &w.slo_tpot_s, &e) != HX_OK)
                field_error(diags, path, slo, "tpot", "%s", e.msg);
            if (scalar_at(slo, "attainment", &s) && !parse_number(s, &w.slo_attainment))
                field_error(diags, path, slo, "attainment", "'%s' is not a fraction", s);
        }
    }
    if (diags->count == before) {
        hx_err e = {0};
        if (hx_workload_check(&w, &e) != HX_OK)
            hx_diags_add(diags, path, 0, 0, NULL, "%s", e.msg);
    }
out:
    fy_document_destroy(doc);
    if (diags->count > before)
        return HX_EPARSE;
    *wl = w;
    return HX_OK;
}

hx_status hx_workload_check(const hx_workload *wl, hx_err *err)
{
    if (!(wl->input_tokens >= 1 && wl->input_tokens <= 1e7))
        return hx_err_set(err, HX_EINVAL, "input tokens: %g; expected 1 to 10000000",
                          wl->input_tokens);
    if (!(wl->output_tokens >= 1 && wl->output_tokens <= 1e7))
        return hx_err_set(err, HX_EINVAL, "output tokens: %g; expected 1 to 10000000",
                          wl->output_tokens);
    if (!(wl->rate_rps >= 0 && isfinite(wl->rate_rps)))
        return hx_err_set(err, HX_EINVAL, "rate: %g; expected requests/s >= 0", wl->rate_rps);
    if (!(wl->slo_ttft_s > 0 && isfinite(wl->slo_ttft_s)))
        return hx_err_set(err, HX_EINVAL, "TTFT SLO: %g s; expected a positive duration",
                          wl->slo_ttft_s);
    if (!(wl->slo_tpot_s > 0 && isfinite(wl->slo_tpot_s)))
        return hx_err_set(err, HX_EINVAL, "TPOT SLO: %g s; expected a positive duration",
                          wl->slo_tpot_s);
    if (!(wl->slo_attainment > 0 && wl->slo_attainment <= 1))
        return hx_err_set(err, HX_EINVAL, "SLO attainment: %g; expected a fraction in (0, 1]",
                          wl->slo_attainment);
    return HX_OK;
}
