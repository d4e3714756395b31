#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "file.h"

#define HX_JSON_MAX_BYTES (256u << 20)

hx_status hx_json_load_file(const char *path, const char *what, json_t **out, hx_err *err)
{
    char *text = NULL;
    size_t len = 0;
    hx_status st = hx_file_read_all(path, what, HX_JSON_MAX_BYTES, &text, &len, err);
    if (st != HX_OK)
        return st;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!root)
        return hx_err_set(err, HX_EPARSE, "%s '%s':%d:%d: %s", what, path, je.line, je.column,
                          je.text);
    *out = root;
    return HX_OK;
}

hx_status hx_json_write_file(const char *path, const json_t *root, hx_err *err)
{
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15));
    if (!text)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    size_t len = strlen(text);
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    }
    withnl[len] = '\n';
    withnl[len + 1] = '\0';
    hx_status st = hx_file_write_atomic(path, withnl, len + 1, err);
    free(withnl);
    return st;
}

hx_status hx_json_print(const json_t *root)
{
    if (json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15)) != 0)
        return HX_EIO;
    fputc('\n', stdout);
    return HX_OK;
}

hx_status hx_json_get_int(const json_t *obj, const char *key, long long *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return HX_ENOENT;
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return HX_OK;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == (double)(long long)d) {
            *out = (long long)d;
            return HX_OK;
        }
    }
    return HX_EINVAL;
}

hx_status hx_json_get_number(const json_t *obj, const char *key, double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return HX_ENOENT;
    if (!json_is_number(v))
        return HX_EINVAL;
    *out = json_number_value(v);
    return HX_OK;
}

hx_status hx_json_get_string(const json_t *obj, const char *key, const char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return HX_ENOENT;
    if (!json_is_string(v))
        return HX_EINVAL;
    *out = json_string_value(v);
    return HX_OK;
}

hx_status hx_json_get_bool(const json_t *obj, const char *key, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return HX_ENOENT;
    if (!json_is_boolean(v))
        return HX_EINVAL;
    *out = json_is_true(v);
    return HX_OK;
}
