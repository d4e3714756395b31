/*
 * yaml.h - loading YAML documents with libfyaml, with located errors.
 *
 * A document is read as text first (refusing binary data with the position
 * of the first bad byte), then parsed; syntax errors become diagnostics
 * "FILE:LINE:COL: yaml: message". Node helpers give a node's position and
 * its scalar text.
 */
#ifndef HX_YAML_H
#define HX_YAML_H

#include <libfyaml.h>

#include "diag.h"
#include "status.h"

/*
 * Loads the single YAML document in `path`. On success *out is a document the
 * caller frees with fy_document_destroy(). On failure returns HX_ENOENT or
 * HX_EIO (file could not be read, message in diags without position) or
 * HX_EPARSE (syntax error or not text, located messages in diags).
 * `what` names the file in messages ("inventory").
 */
hx_status hx_yaml_load_file(const char *path, const char *what, struct fy_document **out,
                            hx_diags *diags);

/* Same, from a string in memory; `name` stands for the file name in messages. */
hx_status hx_yaml_load_string(const char *text, size_t len, const char *name,
                              struct fy_document **out, hx_diags *diags);

/*
 * 1-based line and column where `node` starts (for mappings and sequences, their
 * first entry); 0/0 when unknown.
 */
void hx_yaml_node_pos(struct fy_node *node, int *line, int *col);

/* The NUL-terminated text of a scalar node, or NULL when node is not a scalar. */
const char *hx_yaml_scalar(struct fy_node *node);

/* A short name for the node's kind, for messages: "a mapping", "a list", "a scalar". */
const char *hx_yaml_kind(struct fy_node *node);

#endif /* HX_YAML_H */
