/*
 * svg.h - small, dependency-free SVG charts meant to be opened in a browser.
 *
 * Used by `hexflow simulate --svg` (latency CDFs, SLO attainment against
 * request rate) and `hexflow whatif --svg` (goodput and cost per scenario).
 *
 *     hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "TTFT CDF", "TTFT (s)", "fraction");
 *     hx_svg_chart_add_series(c, "hexflow", xs, ys, n);
 *     hx_svg_chart_add_vline(c, 2.0, "SLO 2 s");
 *     hx_err err = {0};
 *     if (hx_svg_write("ttft.svg", &c, 1, &err) != HX_OK)
 *         fprintf(stderr, "error: %s\n", err.msg);
 *     hx_svg_chart_free(c);
 *
 * Two kinds of chart:
 *
 *   HX_SVG_LINES  each series is a list of (x, y) points drawn as a polyline in
 *                 the order given (small series also get a marker per point).
 *                 Points with a NaN or infinite coordinate, or with x <= 0 on a
 *                 log x axis, are skipped and break the line there.
 *   HX_SVG_BARS   each series holds one value per category (series i, value j
 *                 belongs to category j); several series give grouped bars.
 *                 Non-finite values leave a gap.
 *
 * Axes get "nice" ticks (steps of 1, 2 or 5 times a power of ten; a log axis
 * ticks at powers of ten). Without hx_svg_chart_set_y_range the y range comes
 * from the data (and the reference lines), padded when all values are equal;
 * bar charts always include 0. Each series gets a colour from a fixed palette
 * of eight; beyond eight, lines are dashed and bars lighter so that they stay
 * distinct. Every text is escaped for XML; invalid UTF-8 and control bytes are
 * replaced by '?'.
 *
 * Ownership: a chart owns copies of everything handed to it (names, labels,
 * points); callers keep ownership of their arguments. hx_svg_render returns a
 * string the caller frees with free().
 */
#ifndef HX_SVG_H
#define HX_SVG_H

#include <stddef.h>

#include "status.h"

typedef struct hx_svg_chart hx_svg_chart; /* opaque */

typedef enum hx_svg_kind {
    HX_SVG_LINES, /* (x, y) series drawn as lines */
    HX_SVG_BARS   /* one value per category, grouped by category */
} hx_svg_kind;

/*
 * Creates an empty chart. `title`, `x_label` and `y_label` are copied and may
 * be NULL (nothing drawn). Returns NULL when out of memory. Free with
 * hx_svg_chart_free.
 */
hx_svg_chart *hx_svg_chart_new(hx_svg_kind kind, const char *title, const char *x_label,
                               const char *y_label);

/* Frees the chart and everything it copied. NULL is a no-op. */
void hx_svg_chart_free(hx_svg_chart *c);

/*
 * Adds a series named `name` (copied; NULL gives "series N").
 * Lines: `x` and `y` hold `n` coordinates each (both copied).
 * Bars:  `y` holds one value per category (copied); `x` is ignored and may be
 *        NULL.
 * `n` may be 0 (x and y may then be NULL): the series shows in the legend as
 * "(no data)". Returns HX_EINVAL for a NULL chart or missing arrays,
 * HX_ENOMEM when out of memory (the chart is left unchanged).
 */
hx_status hx_svg_chart_add_series(hx_svg_chart *c, const char *name, const double *x,
                                  const double *y, size_t n);

/*
 * Bars: the x-axis labels, one per category (copied; a NULL entry draws no
 * label). Replaces earlier categories. Without categories, or for values past
 * the last category, the categories are labelled 1, 2, 3, ... Ignored when
 * drawing line charts.
 */
hx_status hx_svg_chart_set_categories(hx_svg_chart *c, const char *const *names, size_t n);

/* Lines: a logarithmic x axis (on != 0) with ticks at powers of ten. */
void hx_svg_chart_set_log_x(hx_svg_chart *c, int on);

/*
 * Fixes the y range to [lo, hi]; data outside it is clipped. A range that is
 * not finite or has lo >= hi restores the automatic range.
 */
void hx_svg_chart_set_y_range(hx_svg_chart *c, double lo, double hi);

/*
 * A dashed horizontal / vertical reference line with a label (copied, may be
 * NULL), e.g. an SLO. With automatic ranges the axes grow to show the line.
 * On bar charts a vertical line's x is in category units: 0 is the centre of
 * the first category, 1 of the second, and so on. Non-finite values are
 * ignored (HX_OK). Returns HX_EINVAL for a NULL chart, HX_ENOMEM when out of
 * memory.
 */
hx_status hx_svg_chart_add_hline(hx_svg_chart *c, double y, const char *label);
hx_status hx_svg_chart_add_vline(hx_svg_chart *c, double x, const char *label);

/*
 * Renders a page of `n` charts stacked vertically as one standalone SVG 1.1
 * document (XML declaration, xmlns, width, height, viewBox). NULL entries are
 * skipped; n == 0 gives a valid, empty page. Returns a NUL-terminated string
 * the caller frees, or NULL when out of memory (or charts == NULL with n > 0).
 * The charts are not modified.
 */
char *hx_svg_render(hx_svg_chart *const *charts, size_t n);

/*
 * Renders as hx_svg_render and writes the document to `path` atomically
 * (hx_file_write_atomic): on failure nothing new is left at `path` and `err`
 * (may be NULL) says why, e.g. "cannot write 'x/y.svg': no such file".
 */
hx_status hx_svg_write(const char *path, hx_svg_chart *const *charts, size_t n, hx_err *err);

#endif /* HX_SVG_H */
