/*
 * json.h - JSON files over jansson: load with located errors, write atomically.
 *
 * Output (files and stdout) prints reals with 15 significant digits, so numbers
 * read back as written ("0.1", not "0.10000000000000001").
 */
#ifndef HX_JSON_H
#define HX_JSON_H

#include <jansson.h>

#include "status.h"

/*
 * Loads a JSON file. `what` names it in messages ("model config"):
 *   cannot open model config 'x/config.json': no such file
 *   model config 'x/config.json':3:14: unexpected token
 * On success *out holds a new reference.
 */
hx_status hx_json_load_file(const char *path, const char *what, json_t **out, hx_err *err);

/* Writes `root` to `path` (indented, trailing newline) atomically. */
hx_status hx_json_write_file(const char *path, const json_t *root, hx_err *err);

/* Prints `root` to stdout, indented, with a trailing newline. */
hx_status hx_json_print(const json_t *root);

/*
 * Typed field reads for readers of untrusted JSON. Each returns HX_OK and the
 * value, HX_ENOENT when the key is absent (out untouched), or HX_EINVAL when
 * the value has the wrong type.
 */
hx_status hx_json_get_int(const json_t *obj, const char *key, long long *out);
hx_status hx_json_get_number(const json_t *obj, const char *key, double *out);
hx_status hx_json_get_string(const json_t *obj, const char *key, const char **out);
hx_status hx_json_get_bool(const json_t *obj, const char *key, int *out);

#endif /* HX_JSON_H */
