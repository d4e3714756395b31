#include "diag.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

void hx_diags_init(hx_diags *d)
{
    d->items = NULL;
    d->count = 0;
    d->cap = 0;
}

void hx_diags_release(hx_diags *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->count; i++) {
        free(d->items[i].file);
        free(d->items[i].field);
        free(d->items[i].message);
    }
    free(d->items);
    hx_diags_init(d);
}

void hx_diags_add(hx_diags *d, const char *file, int line, int col, const char *field,
                  const char *fmt, ...)
{
    if (d->count == d->cap) {
        size_t ncap = d->cap ? d->cap * 2 : 8;
        hx_diag_item *n = realloc(d->items, ncap * sizeof *n);
        if (!n)
            return;
        d->items = n;
        d->cap = ncap;
    }
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    hx_diag_item *it = &d->items[d->count];
    it->file = dup_or_null(file);
    it->line = line;
    it->col = col;
    it->field = dup_or_null(field && field[0] ? field : NULL);
    it->message = strdup(msg);
    if (!it->message) {
        free(it->file);
        free(it->field);
        return;
    }
    d->count++;
}

void hx_diags_format(const hx_diags *d, size_t i, char *buf, size_t size)
{
    const hx_diag_item *it = &d->items[i];
    size_t n = 0;
    buf[0] = '\0';
#define APPEND(...)                                                                     \
    do {                                                                                \
        if (n < size) {                                                                 \
            int k = snprintf(buf + n, size - n, __VA_ARGS__);                           \
            if (k > 0)                                                                  \
                n += (size_t)k;                                                         \
        }                                                                               \
    } while (0)
    if (it->file) {
        APPEND("%s:", it->file);
        if (it->line > 0) {
            APPEND("%d:", it->line);
            if (it->col > 0)
                APPEND("%d:", it->col);
        }
        APPEND(" ");
    }
    if (it->field)
        APPEND("%s: ", it->field);
    APPEND("%s", it->message);
#undef APPEND
}

void hx_diags_print(const hx_diags *d, FILE *fp, const char *prefix)
{
    char buf[2048];
    for (size_t i = 0; i < d->count; i++) {
        hx_diags_format(d, i, buf, sizeof buf);
        fprintf(fp, "%s%s\n", prefix ? prefix : "", buf);
    }
}

int hx_diags_contains(const hx_diags *d, const char *needle)
{
    char buf[2048];
    for (size_t i = 0; i < d->count; i++) {
        hx_diags_format(d, i, buf, sizeof buf);
        if (strstr(buf, needle))
            return 1;
    }
    return 0;
}
