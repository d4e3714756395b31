#include "yaml.h"

#include <stdlib.h>
#include <string.h>

#include "file.h"

#define HX_YAML_MAX_BYTES (64u << 20)

hx_status hx_yaml_load_string(const char *text, size_t len, const char *name,
                              struct fy_document **out, hx_diags *diags)
{
    int bl, bc;
    size_t boff;
    if (!hx_file_is_text(text, len, &bl, &bc, &boff)) {
        hx_diags_add(diags, name, bl, bc, NULL,
                     "not a text file: byte 0x%02x at offset %zu is %s; expected UTF-8 YAML",
                     (unsigned char)text[boff], boff,
                     text[boff] == 0 ? "a NUL" : "not valid UTF-8");
        return HX_EPARSE;
    }

    struct fy_diag_cfg dcfg;
    fy_diag_cfg_default(&dcfg);
    dcfg.fp = NULL;
    dcfg.colorize = false;
    struct fy_diag *diag = fy_diag_create(&dcfg);
    if (!diag)
        return HX_ENOMEM;
    fy_diag_set_collect_errors(diag, true);

    struct fy_parse_cfg pcfg;
    memset(&pcfg, 0, sizeof pcfg);
    pcfg.flags = FYPCF_QUIET | FYPCF_DISABLE_RECYCLING;
    pcfg.diag = diag;

    /* The document refers into its source text: give it its own copy to own. */
    hx_status st = HX_OK;
    char *copy = malloc(len + 1);
    if (!copy) {
        fy_diag_destroy(diag);
        return HX_ENOMEM;
    }
    memcpy(copy, text, len);
    copy[len] = '\0';
    /* libfyaml owns `copy` from here on, on failure too. */
    struct fy_document *doc = fy_document_build_from_malloc_string(&pcfg, copy, len);

    /* The first error, if any: later errors of a parse usually follow from it. */
    struct fy_diag_error *first = NULL;
    void *iter = NULL;
    struct fy_diag_error *e;
    while ((e = fy_diag_errors_iterate(diag, &iter)) != NULL) {
        if (e->type >= FYET_ERROR) {
            first = e;
            break;
        }
    }
    if (!doc && !first)
        doc = fy_document_create(&pcfg); /* no document at all (empty or only comments) */
    if (first || !doc) {
        if (first)
            hx_diags_add(diags, name, first->line, first->column, "yaml", "%s", /* 1-based */
                         first->msg ? first->msg : "syntax error");
        else
            hx_diags_add(diags, name, 0, 0, "yaml", "syntax error");
        if (doc)
            fy_document_destroy(doc);
        st = HX_EPARSE;
    } else {
        *out = doc;
    }
    fy_diag_destroy(diag);
    return st;
}

hx_status hx_yaml_load_file(const char *path, const char *what, struct fy_document **out,
                            hx_diags *diags)
{
    char *text = NULL;
    size_t len = 0;
    hx_err err = {0};
    hx_status st = hx_file_read_all(path, what, HX_YAML_MAX_BYTES, &text, &len, &err);
    if (st != HX_OK) {
        hx_diags_add(diags, NULL, 0, 0, NULL, "%s", err.msg);
        return st;
    }
    st = hx_yaml_load_string(text, len, path, out, diags);
    free(text);
    return st;
}

static struct fy_token *first_token(struct fy_node *node, int depth)
{
    if (!node || depth > 64)
        return NULL;
    switch (fy_node_get_type(node)) {
    case FYNT_SCALAR:
        return fy_node_get_scalar_token(node);
    case FYNT_SEQUENCE: {
        void *it = NULL;
        struct fy_node *c = fy_node_sequence_iterate(node, &it);
        return first_token(c, depth + 1);
    }
    case FYNT_MAPPING: {
        void *it = NULL;
        struct fy_node_pair *p = fy_node_mapping_iterate(node, &it);
        return p ? first_token(fy_node_pair_key(p), depth + 1) : NULL;
    }
    }
    return NULL;
}

void hx_yaml_node_pos(struct fy_node *node, int *line, int *col)
{
    *line = 0;
    *col = 0;
    struct fy_token *t = first_token(node, 0);
    if (!t)
        return;
    const struct fy_mark *m = fy_token_start_mark(t);
    if (!m)
        return;
    *line = m->line + 1;
    *col = m->column + 1;
}

const char *hx_yaml_scalar(struct fy_node *node)
{
    if (!node || fy_node_get_type(node) != FYNT_SCALAR)
        return NULL;
    return fy_node_get_scalar0(node);
}

const char *hx_yaml_kind(struct fy_node *node)
{
    if (!node)
        return "nothing";
    switch (fy_node_get_type(node)) {
    case FYNT_SCALAR: return "a scalar";
    case FYNT_SEQUENCE: return "a list";
    case FYNT_MAPPING: return "a mapping";
    }
    return "unknown";
}
