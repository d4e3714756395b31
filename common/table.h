/*
 * table.h - aligned text tables for output meant for people.
 *
 *     hx_table *t = hx_table_new(3, "HOST", "GPUS", "MEMORY");
 *     hx_table_row(t, "h100-a", "8 x H100-SXM", "640 GiB");
 *     hx_table_print(t, stdout);
 *     hx_table_free(t);
 *
 * Columns whose header starts with '>' are right-aligned (the '>' is not
 * printed). Cells are copied.
 */
#ifndef HX_TABLE_H
#define HX_TABLE_H

#include <stdio.h>

typedef struct hx_table hx_table;

/* Creates a table of `ncols` columns with the given headers (ncols const char *). */
hx_table *hx_table_new(int ncols, ...);
void hx_table_free(hx_table *t);

/* Appends a row of ncols const char * cells (NULL prints as empty). */
void hx_table_row(hx_table *t, ...);

/* Appends a row whose cells are printf-formatted: one format per cell, "|"-separated. */
void hx_table_rowf(hx_table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void hx_table_print(const hx_table *t, FILE *fp);

#endif /* HX_TABLE_H */
