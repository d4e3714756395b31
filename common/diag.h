/*
 * diag.h - located diagnostics: a list of "FILE:LINE:COL: field: message" records.
 *
 * Validators (the inventory checker, config readers) report every problem
 * they find rather than stopping at the first, so a user fixes a file in one
 * pass. Each record names the file, 1-based line and column (0 when unknown),
 * the dotted field path (`hosts[2].gpus.count`) and a message that says what
 * is wrong and what is expected.
 */
#ifndef HX_DIAG_H
#define HX_DIAG_H

#include <stddef.h>
#include <stdio.h>

typedef struct hx_diag_item {
    char *file;    /* owned; may be NULL */
    int line;      /* 1-based, 0 = unknown */
    int col;       /* 1-based, 0 = unknown */
    char *field;   /* owned; may be NULL */
    char *message; /* owned */
} hx_diag_item;

typedef struct hx_diags {
    hx_diag_item *items; /* owned array of `count` items */
    size_t count;
    size_t cap;
} hx_diags;

void hx_diags_init(hx_diags *d);
void hx_diags_release(hx_diags *d);

/* Appends one diagnostic; strings are copied. Allocation failure drops it silently. */
void hx_diags_add(hx_diags *d, const char *file, int line, int col, const char *field,
                  const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* Formats item i as "FILE:LINE:COL: field: message" into buf (always NUL-terminated). */
void hx_diags_format(const hx_diags *d, size_t i, char *buf, size_t size);

/* Prints every item, one per line, each prefixed by `prefix` (may be NULL). */
void hx_diags_print(const hx_diags *d, FILE *fp, const char *prefix);

/* Whether any message or field of the list contains `needle` (for tests and callers). */
int hx_diags_contains(const hx_diags *d, const char *needle);

#endif /* HX_DIAG_H */
