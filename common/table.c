#include "table.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct hx_table {
    int ncols;
    char **headers; /* [ncols] */
    int *right;     /* [ncols] */
    char ***rows;   /* [nrows][ncols] */
    int nrows;
    int cap;
};

hx_table *hx_table_new(int ncols, ...)
{
    hx_table *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->ncols = ncols;
    t->headers = calloc((size_t)ncols, sizeof *t->headers);
    t->right = calloc((size_t)ncols, sizeof *t->right);
    if (!t->headers || !t->right) {
        hx_table_free(t);
        return NULL;
    }
    va_list ap;
    va_start(ap, ncols);
    for (int i = 0; i < ncols; i++) {
        const char *h = va_arg(ap, const char *);
        if (h && h[0] == '>') {
            t->right[i] = 1;
            h++;
        }
        t->headers[i] = strdup(h ? h : "");
    }
    va_end(ap);
    return t;
}

void hx_table_free(hx_table *t)
{
    if (!t)
        return;
    for (int r = 0; r < t->nrows; r++) {
        for (int c = 0; c < t->ncols; c++)
            free(t->rows[r][c]);
        free(t->rows[r]);
    }
    free(t->rows);
    if (t->headers)
        for (int c = 0; c < t->ncols; c++)
            free(t->headers[c]);
    free(t->headers);
    free(t->right);
    free(t);
}

static char **add_row(hx_table *t)
{
    if (!t)
        return NULL;
    if (t->nrows == t->cap) {
        int ncap = t->cap ? t->cap * 2 : 16;
        char ***n = realloc(t->rows, (size_t)ncap * sizeof *n);
        if (!n)
            return NULL;
        t->rows = n;
        t->cap = ncap;
    }
    char **row = calloc((size_t)t->ncols, sizeof *row);
    if (!row)
        return NULL;
    t->rows[t->nrows++] = row;
    return row;
}

void hx_table_row(hx_table *t, ...)
{
    char **row = add_row(t);
    if (!row)
        return;
    va_list ap;
    va_start(ap, t);
    for (int c = 0; c < t->ncols; c++) {
        const char *s = va_arg(ap, const char *);
        row[c] = strdup(s ? s : "");
    }
    va_end(ap);
}

void hx_table_rowf(hx_table *t, const char *fmt, ...)
{
    char **row = add_row(t);
    if (!row)
        return;
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    char *p = line;
    for (int c = 0; c < t->ncols; c++) {
        char *bar = p ? strchr(p, '|') : NULL;
        if (bar)
            *bar = '\0';
        row[c] = strdup(p ? p : "");
        p = bar ? bar + 1 : NULL;
    }
}

/* Display width of UTF-8 text: counts code points, not bytes. */
static int text_width(const char *s)
{
    int w = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80)
            w++;
    return w;
}

void hx_table_print(const hx_table *t, FILE *fp)
{
    if (!t)
        return;
    int *w = calloc((size_t)t->ncols, sizeof *w);
    if (!w)
        return;
    for (int c = 0; c < t->ncols; c++) {
        w[c] = text_width(t->headers[c]);
        for (int r = 0; r < t->nrows; r++) {
            int k = text_width(t->rows[r][c]);
            if (k > w[c])
                w[c] = k;
        }
    }
    for (int r = -1; r < t->nrows; r++) {
        char **cells = r < 0 ? t->headers : t->rows[r];
        for (int c = 0; c < t->ncols; c++) {
            int pad = w[c] - text_width(cells[c]);
            int last = c == t->ncols - 1;
            if (t->right[c])
                fprintf(fp, "%*s%s", pad, "", cells[c]);
            else if (last)
                fputs(cells[c], fp);
            else
                fprintf(fp, "%s%*s", cells[c], pad, "");
            if (!last)
                fputs("  ", fp);
        }
        fputc('\n', fp);
    }
    free(w);
}
