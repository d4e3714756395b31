/*
 * svg.c - small, dependency-free SVG charts (see svg.h).
 *
 * Rendering happens in two passes per page: first every chart is laid out
 * (axis ranges, ticks, margins that depend on label lengths), then the page
 * width is the widest chart and each chart is drawn into its own <g>, stacked
 * vertically. All output goes through one growable buffer whose failure flag
 * makes hx_svg_render return NULL when memory runs out.
 *
 * Numbers are printed with printf and so assume the "C" numeric locale (the
 * default unless the program calls setlocale); a ',' decimal separator that
 * slips through is turned back into '.'.
 */
#include "svg.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "file.h"

/* ---- geometry, in SVG user units (px) ---------------------------------- */

#define PLOT_W 600.0        /* width of every plot area */
#define PLOT_H 300.0        /* height of every plot area */
#define TOP_TITLE 50.0      /* space above the plot area with a title */
#define TOP_BARE 20.0       /* ... and without one */
#define RIGHT_PAD 16.0      /* right of the legend (or of the plot) */
#define LEGEND_GAP 20.0     /* between the plot area and the legend */
#define LEGEND_ROW 20.0     /* legend line height */
#define CHART_GAP 12.0      /* between stacked charts */
#define TICK_CHAR_W 6.2     /* average advance of an 11px sans-serif glyph */
#define LEGEND_CHAR_W 6.9   /* ... of a 12px one */
#define ROT_SIN 0.574       /* sin(35 deg): rotated category labels */
#define ROT_COS 0.819       /* cos(35 deg) */
#define MAX_TICKS 64        /* never draw more ticks than this on an axis */
#define MAX_MINOR 64        /* minor ticks of a log axis */
#define MARKER_MAX_POINTS 40 /* series this small get a marker per point */
#define CAT_MAX_CHARS 28    /* category labels are cut after this many characters */
#define LEGEND_MAX_CHARS 40 /* legend names likewise */

/* Eight readable, distinct colours (the Tableau 10 set minus grey and olive). */
static const char *const palette[8] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                       "#9467bd", "#8c564b", "#e377c2", "#17becf"};
/* After the palette runs out, lines change dash pattern and bars opacity. */
static const char *const line_dashes[4] = {NULL, "7 4", "2 3", "9 3 2 3"};
static const char *const bar_opacity[4] = {"1", "0.6", "0.35", "0.8"};

/* ---- the chart object --------------------------------------------------- */

typedef struct svg_series {
    char *name; /* owned */
    double *x;  /* [n], owned; NULL for bars */
    double *y;  /* [n], owned */
    size_t n;
} svg_series;

typedef struct svg_refline {
    double v;
    char *label; /* owned, may be NULL */
} svg_refline;

struct hx_svg_chart {
    hx_svg_kind kind;
    char *title;   /* owned, may be NULL */
    char *x_label; /* owned, may be NULL */
    char *y_label; /* owned, may be NULL */
    svg_series *series; /* [nseries], owned */
    size_t nseries, series_cap;
    char **cats; /* [ncats], owned; entries may be NULL */
    size_t ncats;
    int log_x;
    int y_fixed;
    double y_lo, y_hi;
    svg_refline *hlines; /* [nhlines], owned */
    size_t nhlines, hlines_cap;
    svg_refline *vlines; /* [nvlines], owned */
    size_t nvlines, vlines_cap;
};

/* strdup that tolerates NULL; sets *fail when a non-NULL copy fails. */
static char *dup_opt(const char *s, int *fail)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *fail = 1;
    return d;
}

hx_svg_chart *hx_svg_chart_new(hx_svg_kind kind, const char *title, const char *x_label,
                               const char *y_label)
{
    hx_svg_chart *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    int fail = 0;
    c->kind = kind == HX_SVG_BARS ? HX_SVG_BARS : HX_SVG_LINES;
    c->title = dup_opt(title, &fail);
    c->x_label = dup_opt(x_label, &fail);
    c->y_label = dup_opt(y_label, &fail);
    if (fail) {
        hx_svg_chart_free(c);
        return NULL;
    }
    return c;
}

static void free_cats(char **cats, size_t n)
{
    if (!cats)
        return;
    for (size_t i = 0; i < n; i++)
        free(cats[i]);
    free(cats);
}

void hx_svg_chart_free(hx_svg_chart *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->nseries; i++) {
        free(c->series[i].name);
        free(c->series[i].x);
        free(c->series[i].y);
    }
    free(c->series);
    free_cats(c->cats, c->ncats);
    for (size_t i = 0; i < c->nhlines; i++)
        free(c->hlines[i].label);
    free(c->hlines);
    for (size_t i = 0; i < c->nvlines; i++)
        free(c->vlines[i].label);
    free(c->vlines);
    free(c->title);
    free(c->x_label);
    free(c->y_label);
    free(c);
}

/* Makes room for one more element of `size` bytes in *arr (capacity doubling). */
static int grow(void **arr, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return 1;
    size_t ncap = *cap ? *cap * 2 : 4;
    if (ncap > SIZE_MAX / size)
        return 0;
    void *p = realloc(*arr, ncap * size);
    if (!p)
        return 0;
    *arr = p;
    *cap = ncap;
    return 1;
}

hx_status hx_svg_chart_add_series(hx_svg_chart *c, const char *name, const double *x,
                                  const double *y, size_t n)
{
    if (!c || (n > 0 && (!y || (c->kind == HX_SVG_LINES && !x))))
        return HX_EINVAL;
    if (n > SIZE_MAX / sizeof(double))
        return HX_ENOMEM;
    hx_status st = HX_OK;
    svg_series s = {0};
    char fallback[32];
    if (!name) {
        snprintf(fallback, sizeof fallback, "series %zu", c->nseries + 1);
        name = fallback;
    }
    s.name = strdup(name);
    if (!s.name) {
        st = HX_ENOMEM;
        goto out_free;
    }
    s.n = n;
    if (n > 0) {
        s.y = malloc(n * sizeof *s.y);
        if (!s.y) {
            st = HX_ENOMEM;
            goto out_free;
        }
        memcpy(s.y, y, n * sizeof *s.y);
        if (c->kind == HX_SVG_LINES) {
            s.x = malloc(n * sizeof *s.x);
            if (!s.x) {
                st = HX_ENOMEM;
                goto out_free;
            }
            memcpy(s.x, x, n * sizeof *s.x);
        }
    }
    if (!grow((void **)&c->series, &c->series_cap, c->nseries, sizeof *c->series)) {
        st = HX_ENOMEM;
        goto out_free;
    }
    c->series[c->nseries++] = s;
    return HX_OK;
out_free:
    free(s.name);
    free(s.x);
    free(s.y);
    return st;
}

hx_status hx_svg_chart_set_categories(hx_svg_chart *c, const char *const *names, size_t n)
{
    if (!c || (n > 0 && !names))
        return HX_EINVAL;
    char **cats = NULL;
    if (n > 0) {
        cats = calloc(n, sizeof *cats);
        if (!cats)
            return HX_ENOMEM;
        int fail = 0;
        for (size_t i = 0; i < n; i++)
            cats[i] = dup_opt(names[i], &fail);
        if (fail) {
            free_cats(cats, n);
            return HX_ENOMEM;
        }
    }
    free_cats(c->cats, c->ncats);
    c->cats = cats;
    c->ncats = n;
    return HX_OK;
}

void hx_svg_chart_set_log_x(hx_svg_chart *c, int on)
{
    if (c)
        c->log_x = on != 0;
}

void hx_svg_chart_set_y_range(hx_svg_chart *c, double lo, double hi)
{
    if (!c)
        return;
    c->y_fixed = isfinite(lo) && isfinite(hi) && lo < hi;
    c->y_lo = lo;
    c->y_hi = hi;
}

static hx_status add_refline(svg_refline **arr, size_t *n, size_t *cap, double v,
                             const char *label)
{
    if (!isfinite(v))
        return HX_OK;
    int fail = 0;
    char *copy = dup_opt(label, &fail);
    if (fail)
        return HX_ENOMEM;
    if (!grow((void **)arr, cap, *n, sizeof **arr)) {
        free(copy);
        return HX_ENOMEM;
    }
    (*arr)[(*n)++] = (svg_refline){.v = v, .label = copy};
    return HX_OK;
}

hx_status hx_svg_chart_add_hline(hx_svg_chart *c, double y, const char *label)
{
    if (!c)
        return HX_EINVAL;
    return add_refline(&c->hlines, &c->nhlines, &c->hlines_cap, y, label);
}

hx_status hx_svg_chart_add_vline(hx_svg_chart *c, double x, const char *label)
{
    if (!c)
        return HX_EINVAL;
    return add_refline(&c->vlines, &c->nvlines, &c->vlines_cap, x, label);
}

/* ---- output buffer and formatting --------------------------------------- */

typedef struct render {
    char *p; /* owned until handed to the caller */
    size_t len, cap;
    int failed;        /* out of memory: the result is discarded */
    char ring[12][40]; /* scratch for formatted numbers, reused round-robin */
    unsigned ri;
} render;

static void out_reserve(render *r, size_t more)
{
    if (r->failed)
        return;
    if (r->len + more + 1 <= r->cap)
        return;
    size_t ncap = r->cap ? r->cap : 4096;
    while (ncap < r->len + more + 1) {
        if (ncap > SIZE_MAX / 2) {
            r->failed = 1;
            return;
        }
        ncap *= 2;
    }
    char *p = realloc(r->p, ncap);
    if (!p) {
        r->failed = 1;
        return;
    }
    r->p = p;
    r->cap = ncap;
}

static void out_mem(render *r, const char *s, size_t n)
{
    out_reserve(r, n);
    if (r->failed)
        return;
    memcpy(r->p + r->len, s, n);
    r->len += n;
    r->p[r->len] = '\0';
}

static void out_str(render *r, const char *s)
{
    out_mem(r, s, strlen(s));
}

static void out_fmt(render *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out_fmt(render *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0) {
        r->failed = 1;
        return;
    }
    out_reserve(r, (size_t)k);
    if (r->failed)
        return;
    va_start(ap, fmt);
    vsnprintf(r->p + r->len, (size_t)k + 1, fmt, ap);
    va_end(ap);
    r->len += (size_t)k;
}

static char *ring_slot(render *r)
{
    char *s = r->ring[r->ri];
    r->ri = (r->ri + 1) % (sizeof r->ring / sizeof r->ring[0]);
    return s;
}

static void fix_decimal_comma(char *s)
{
    for (; *s; s++)
        if (*s == ',')
            *s = '.';
}

/* A coordinate: one decimal, without a trailing ".0" or a "-0". */
static const char *num(render *r, double v)
{
    char *s = ring_slot(r);
    if (!isfinite(v) || fabs(v) > 1e9)
        v = isfinite(v) && v < 0 ? -1e9 : isfinite(v) ? 1e9 : 0;
    snprintf(s, sizeof r->ring[0], "%.1f", v);
    fix_decimal_comma(s);
    size_t n = strlen(s);
    if (n >= 2 && strcmp(s + n - 2, ".0") == 0)
        s[n - 2] = '\0';
    if (strcmp(s, "-0") == 0)
        strcpy(s, "0");
    return s;
}

/* %g with `prec` significant digits and a compact exponent (1e+06 -> 1e6). */
static void format_value(char *out, size_t cap, double v, int prec)
{
    char tmp[40];
    if (v == 0)
        v = 0; /* no "-0" */
    snprintf(tmp, sizeof tmp, "%.*g", prec, v);
    fix_decimal_comma(tmp);
    size_t o = 0;
    for (const char *p = tmp; *p && o + 1 < cap; p++) {
        out[o++] = *p;
        if (*p == 'e' || *p == 'E') {
            p++;
            if (*p == '-' && o + 1 < cap)
                out[o++] = '-';
            if (*p == '+' || *p == '-')
                p++;
            while (*p == '0' && p[1] >= '0' && p[1] <= '9')
                p++;
            p--; /* the loop's p++ lands on the first kept digit */
        }
    }
    out[o] = '\0';
}

static const char *val(render *r, double v, int prec)
{
    char *s = ring_slot(r);
    format_value(s, sizeof r->ring[0], v, prec);
    return s;
}

/*
 * Length of the valid UTF-8 sequence at s that is also an XML 1.0 character
 * (1 to 4), or 0 when the byte at s starts no such sequence. Reads no further
 * than the first byte that fails, so a NUL terminator is never passed.
 */
static size_t utf8_seq(const unsigned char *s)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        return (s[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        if (s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80)
            return 0;
        if (c == 0xEF && s[1] == 0xBF && (s[2] == 0xBE || s[2] == 0xBF))
            return 0; /* U+FFFE and U+FFFF are not XML characters */
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        if (s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        return 4;
    }
    return 0;
}

/* Number of characters (code points; bad bytes count one each) in s. */
static size_t text_chars(const char *s)
{
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        size_t k = utf8_seq(p);
        p += k ? k : 1;
        n++;
    }
    return n;
}

/* Characters that text_esc would print for s cut at max_chars (0: no cut). */
static size_t shown_chars(const char *s, size_t max_chars)
{
    size_t n = text_chars(s);
    return max_chars && n > max_chars ? max_chars + 3 : n;
}

/*
 * Appends s escaped for XML text and attribute values. Control characters
 * become spaces (tab, newline) or '?', as do bytes that are not valid UTF-8.
 * With max_chars > 0, text longer than that is cut and ends in "...".
 */
static void text_esc(render *r, const char *s, size_t max_chars)
{
    if (!s)
        return;
    const unsigned char *p = (const unsigned char *)s;
    size_t chars = 0;
    size_t total = max_chars ? text_chars(s) : 0;
    while (*p) {
        if (max_chars && total > max_chars && chars == max_chars) {
            out_str(r, "...");
            return;
        }
        size_t k = utf8_seq(p);
        unsigned c = *p;
        if (k == 0) {
            out_str(r, "?");
            k = 1;
        } else if (c == '&') {
            out_str(r, "&amp;");
        } else if (c == '<') {
            out_str(r, "&lt;");
        } else if (c == '>') {
            out_str(r, "&gt;");
        } else if (c == '"') {
            out_str(r, "&quot;");
        } else if (c == '\'') {
            out_str(r, "&apos;");
        } else if (c == '\t' || c == '\n' || c == '\r') {
            out_str(r, " ");
        } else if (c < 0x20 || c == 0x7F) {
            out_str(r, "?");
        } else {
            out_mem(r, (const char *)p, k);
        }
        p += k;
        chars++;
    }
}

/* <text x y [attrs]>escaped</text>; `attrs` is trusted markup or NULL. */
static void text_el(render *r, double x, double y, const char *attrs, const char *s,
                    size_t max_chars)
{
    out_fmt(r, "<text x=\"%s\" y=\"%s\"%s%s>", num(r, x), num(r, y), attrs ? " " : "",
            attrs ? attrs : "");
    text_esc(r, s, max_chars);
    out_str(r, "</text>\n");
}

/* ---- axes ---------------------------------------------------------------- */

typedef struct svg_axis {
    double lo, hi; /* the domain; on a log axis both > 0 */
    int log;
    double ticks[MAX_TICKS]; /* labelled ticks, ascending */
    size_t nticks;
    double minor[MAX_MINOR]; /* log axis: 2..9 times each power of ten */
    size_t nminor;
} svg_axis;

/* A step of 1, 2 or 5 times a power of ten giving about `target` intervals. */
static double nice_step(double span, int target)
{
    if (!(span > 0) || !isfinite(span))
        return 1;
    double raw = span / target;
    double mag = pow(10, floor(log10(raw)));
    double f = raw / mag;
    double m = f <= 1 + 1e-9 ? 1 : f <= 2 + 1e-9 ? 2 : f <= 5 + 1e-9 ? 5 : 10;
    double step = m * mag;
    return step > 0 && isfinite(step) ? step : 1;
}

/* Ticks at every multiple of `step` inside [lo, hi] (or just the ends). */
static void lin_ticks(svg_axis *a, double step)
{
    a->nticks = 0;
    a->nminor = 0;
    double k0 = ceil(a->lo / step - 1e-9), k1 = floor(a->hi / step + 1e-9);
    if (!isfinite(k0) || !isfinite(k1) || k1 < k0 || k1 - k0 >= MAX_TICKS) {
        a->ticks[a->nticks++] = a->lo;
        a->ticks[a->nticks++] = a->hi;
        return;
    }
    for (double k = k0; k <= k1; k++) {
        double v = k * step;
        if (fabs(v) < step * 1e-9)
            v = 0;
        a->ticks[a->nticks++] = v;
    }
}

/*
 * A linear axis over [lo, hi] (lo <= hi, both finite). Equal ends are padded;
 * with `extend` the ends move out to the nearest ticks.
 */
static void axis_linear(svg_axis *a, double lo, double hi, int target, int extend)
{
    if (lo == hi) {
        double d = lo == 0 ? 1 : fabs(lo) * 0.1;
        lo -= d;
        hi += d;
    }
    double step = nice_step(hi - lo, target);
    if (extend) {
        double l = floor(lo / step + 1e-9) * step, h = ceil(hi / step - 1e-9) * step;
        if (isfinite(l) && isfinite(h) && l < h) {
            lo = l;
            hi = h;
        }
    }
    a->log = 0;
    a->lo = lo;
    a->hi = hi;
    lin_ticks(a, step);
}

/* A log axis over whole decades covering [lo, hi] (0 < lo <= hi). */
static void axis_log(svg_axis *a, double lo, double hi)
{
    double d0 = floor(log10(lo) + 1e-9), d1 = ceil(log10(hi) - 1e-9);
    if (d0 < -300)
        d0 = -300;
    if (d1 > 300)
        d1 = 300;
    if (d1 <= d0)
        d1 = d0 + 1;
    a->log = 1;
    a->lo = pow(10, d0);
    a->hi = pow(10, d1);
    a->nticks = 0;
    a->nminor = 0;
    double every = ceil((d1 - d0) / 8); /* at most about nine labels */
    for (double d = d0; d <= d1 && a->nticks < MAX_TICKS; d += every)
        a->ticks[a->nticks++] = pow(10, d);
    if (d1 - d0 <= 6)
        for (double d = d0; d < d1; d++)
            for (int m = 2; m <= 9 && a->nminor < MAX_MINOR; m++)
                a->minor[a->nminor++] = m * pow(10, d);
}

/* Position of v on the axis as a fraction of its length (0 at lo, 1 at hi). */
static double axis_frac(const svg_axis *a, double v)
{
    double f;
    if (a->log)
        f = v > 0 ? (log10(v) - log10(a->lo)) / (log10(a->hi) - log10(a->lo)) : -1;
    else
        f = (v - a->lo) / (a->hi - a->lo);
    return isfinite(f) ? f : 0.5;
}

/* ---- layout ------------------------------------------------------------- */

typedef struct svg_layout {
    const hx_svg_chart *c;
    svg_axis x, y;  /* x unused for bars */
    size_t ngroups; /* bars: number of categories drawn */
    int rotate;     /* bars: category labels rotated */
    size_t npoints; /* drawable values */
    double left, top, pw, ph; /* the plot area */
    double lab_h;             /* room taken below the axis by tick labels */
    double legend_w;          /* 0 when there is no legend */
    double width, height;     /* the whole chart */
} svg_layout;

static int point_ok(const hx_svg_chart *c, double x, double y)
{
    return isfinite(x) && isfinite(y) && (!c->log_x || x > 0);
}

/* Category label j of a bar chart into buf (caller storage). */
static const char *cat_label(const hx_svg_chart *c, size_t j, char *buf, size_t cap)
{
    if (j < c->ncats)
        return c->cats[j] ? c->cats[j] : "";
    snprintf(buf, cap, "%zu", j + 1);
    return buf;
}

static void layout_chart(svg_layout *L, const hx_svg_chart *c)
{
    memset(L, 0, sizeof *L);
    L->c = c;
    L->pw = PLOT_W;
    L->ph = PLOT_H;
    L->top = c->title ? TOP_TITLE : TOP_BARE;

    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    if (c->kind == HX_SVG_LINES) {
        for (size_t s = 0; s < c->nseries; s++) {
            const svg_series *se = &c->series[s];
            for (size_t i = 0; i < se->n; i++) {
                if (!point_ok(c, se->x[i], se->y[i]))
                    continue;
                L->npoints++;
                xmin = fmin(xmin, se->x[i]);
                xmax = fmax(xmax, se->x[i]);
                ymin = fmin(ymin, se->y[i]);
                ymax = fmax(ymax, se->y[i]);
            }
        }
        for (size_t i = 0; i < c->nvlines; i++) {
            if (c->log_x && !(c->vlines[i].v > 0))
                continue;
            xmin = fmin(xmin, c->vlines[i].v);
            xmax = fmax(xmax, c->vlines[i].v);
        }
        if (c->log_x) {
            if (!(xmin <= xmax)) {
                xmin = 1;
                xmax = 10;
            }
            axis_log(&L->x, xmin, xmax);
        } else {
            if (!(xmin <= xmax)) {
                xmin = 0;
                xmax = 1;
            }
            axis_linear(&L->x, xmin, xmax, 8, 1);
        }
    } else {
        L->ngroups = c->ncats;
        for (size_t s = 0; s < c->nseries; s++) {
            const svg_series *se = &c->series[s];
            if (se->n > L->ngroups)
                L->ngroups = se->n;
            for (size_t i = 0; i < se->n; i++) {
                if (!isfinite(se->y[i]))
                    continue;
                L->npoints++;
                ymin = fmin(ymin, se->y[i]);
                ymax = fmax(ymax, se->y[i]);
            }
        }
    }
    for (size_t i = 0; i < c->nhlines; i++) {
        ymin = fmin(ymin, c->hlines[i].v);
        ymax = fmax(ymax, c->hlines[i].v);
    }
    if (c->kind == HX_SVG_BARS) {
        ymin = fmin(ymin, 0); /* bars grow from 0 */
        ymax = fmax(ymax, 0);
        if (ymin == 0 && ymax == 0)
            ymax = 1;
    }
    if (c->y_fixed) {
        L->y.lo = c->y_lo;
        L->y.hi = c->y_hi;
        lin_ticks(&L->y, nice_step(c->y_hi - c->y_lo, 6));
    } else {
        if (!(ymin <= ymax)) {
            ymin = 0;
            ymax = 1;
        }
        axis_linear(&L->y, ymin, ymax, 6, 1);
    }

    /* Left margin: the longest y tick label, then the rotated y axis label. */
    size_t ylab = 1;
    for (size_t i = 0; i < L->y.nticks; i++) {
        char buf[40];
        format_value(buf, sizeof buf, L->y.ticks[i], 6);
        if (strlen(buf) > ylab)
            ylab = strlen(buf);
    }
    L->left = fmax(64, 44 + TICK_CHAR_W * (double)ylab);

    /* Below the axis: category labels are rotated when they do not fit. */
    L->lab_h = 22;
    if (c->kind == HX_SVG_BARS && L->ngroups > 0) {
        size_t longest = 0;
        for (size_t j = 0; j < L->ngroups; j++) {
            char buf[32];
            size_t n = shown_chars(cat_label(c, j, buf, sizeof buf), CAT_MAX_CHARS);
            if (n > longest)
                longest = n;
        }
        double gw = L->pw / (double)L->ngroups, tw = TICK_CHAR_W * (double)longest;
        if (tw > gw - 6) {
            L->rotate = 1;
            L->lab_h = 12 + tw * ROT_SIN + 8;
            L->left = fmax(L->left, tw * ROT_COS - gw / 2 + 8);
        }
    }

    if (c->nseries > 0) {
        size_t longest = 0;
        for (size_t s = 0; s < c->nseries; s++) {
            size_t n = shown_chars(c->series[s].name, LEGEND_MAX_CHARS);
            if (c->series[s].n == 0)
                n += 10; /* " (no data)" */
            if (n > longest)
                longest = n;
        }
        L->legend_w = 30 + LEGEND_CHAR_W * (double)longest;
    }
    L->width = L->left + L->pw + (L->legend_w > 0 ? LEGEND_GAP + L->legend_w : 0) + RIGHT_PAD;
    L->height = L->top + L->ph + L->lab_h + (c->x_label ? 28 : 8);
    double legend_bottom = L->top + LEGEND_ROW * (double)c->nseries + 10;
    if (legend_bottom > L->height)
        L->height = legend_bottom;
}

/* ---- drawing ------------------------------------------------------------ */

static double px(const svg_layout *L, double x)
{
    return L->left + axis_frac(&L->x, x) * L->pw;
}

static double py(const svg_layout *L, double y)
{
    return L->top + L->ph - axis_frac(&L->y, y) * L->ph;
}

/* x position of the centre of bar category j (may be fractional). */
static double pcat(const svg_layout *L, double j)
{
    size_t g = L->ngroups ? L->ngroups : 1;
    return L->left + (j + 0.5) * L->pw / (double)g;
}

static void draw_grid_and_axes(render *r, const svg_layout *L)
{
    const hx_svg_chart *c = L->c;
    double bottom = L->top + L->ph, right = L->left + L->pw;

    out_str(r, "<g stroke=\"#e6e6e6\" stroke-width=\"1\">\n");
    for (size_t i = 0; i < L->y.nticks; i++) {
        double y = py(L, L->y.ticks[i]);
        out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, L->left),
                num(r, y), num(r, right), num(r, y));
    }
    if (c->kind == HX_SVG_LINES)
        for (size_t i = 0; i < L->x.nticks; i++) {
            double x = px(L, L->x.ticks[i]);
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, x),
                    num(r, L->top), num(r, x), num(r, bottom));
        }
    out_str(r, "</g>\n");
    if (L->x.log && L->x.nminor > 0 && c->kind == HX_SVG_LINES) {
        out_str(r, "<g stroke=\"#f3f3f3\" stroke-width=\"1\">\n");
        for (size_t i = 0; i < L->x.nminor; i++) {
            double x = px(L, L->x.minor[i]);
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, x),
                    num(r, L->top), num(r, x), num(r, bottom));
        }
        out_str(r, "</g>\n");
    }

    /* Axis lines and tick marks. */
    out_str(r, "<g stroke=\"#333\" stroke-width=\"1\">\n");
    out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, L->left),
            num(r, L->top), num(r, L->left), num(r, bottom));
    out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, L->left),
            num(r, bottom), num(r, right), num(r, bottom));
    for (size_t i = 0; i < L->y.nticks; i++) {
        double y = py(L, L->y.ticks[i]);
        out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, L->left - 5),
                num(r, y), num(r, L->left), num(r, y));
    }
    if (c->kind == HX_SVG_LINES) {
        for (size_t i = 0; i < L->x.nticks; i++) {
            double x = px(L, L->x.ticks[i]);
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, x),
                    num(r, bottom), num(r, x), num(r, bottom + 5));
        }
        for (size_t i = 0; i < L->x.nminor; i++) {
            double x = px(L, L->x.minor[i]);
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, x),
                    num(r, bottom), num(r, x), num(r, bottom + 3));
        }
    } else {
        for (size_t j = 0; j < L->ngroups; j++) {
            double x = pcat(L, (double)j);
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n", num(r, x),
                    num(r, bottom), num(r, x), num(r, bottom + 5));
        }
    }
    out_str(r, "</g>\n");

    /* Tick labels. */
    out_str(r, "<g font-size=\"11\" fill=\"#333\">\n");
    for (size_t i = 0; i < L->y.nticks; i++)
        text_el(r, L->left - 8, py(L, L->y.ticks[i]) + 4, "text-anchor=\"end\"",
                val(r, L->y.ticks[i], 6), 0);
    if (c->kind == HX_SVG_LINES) {
        for (size_t i = 0; i < L->x.nticks; i++)
            text_el(r, px(L, L->x.ticks[i]), bottom + 18, "text-anchor=\"middle\"",
                    val(r, L->x.ticks[i], 6), 0);
    } else {
        for (size_t j = 0; j < L->ngroups; j++) {
            char buf[32];
            const char *name = cat_label(c, j, buf, sizeof buf);
            double x = pcat(L, (double)j);
            if (L->rotate) {
                double ty = bottom + 12;
                char attrs[128];
                snprintf(attrs, sizeof attrs,
                         "text-anchor=\"end\" transform=\"rotate(-35 %s %s)\"",
                         num(r, x + 3), num(r, ty));
                text_el(r, x + 3, ty, attrs, name, CAT_MAX_CHARS);
            } else {
                text_el(r, x, bottom + 18, "text-anchor=\"middle\"", name, CAT_MAX_CHARS);
            }
        }
    }
    out_str(r, "</g>\n");

    /* Axis labels. */
    if (c->x_label)
        text_el(r, L->left + L->pw / 2, bottom + L->lab_h + 16,
                "text-anchor=\"middle\" font-size=\"12\" fill=\"#222\"", c->x_label, 0);
    if (c->y_label) {
        double cx = 18, cy = L->top + L->ph / 2;
        char attrs[128];
        snprintf(attrs, sizeof attrs,
                 "text-anchor=\"middle\" font-size=\"12\" fill=\"#222\" "
                 "transform=\"rotate(-90 %s %s)\"",
                 num(r, cx), num(r, cy));
        text_el(r, cx, cy, attrs, c->y_label, 0);
    }
}

/* Stroke attributes of line series s (colour, and a dash after the palette). */
static void series_stroke(render *r, size_t s)
{
    out_fmt(r, "stroke=\"%s\"", palette[s % 8]);
    const char *dash = line_dashes[(s / 8) % 4];
    if (dash)
        out_fmt(r, " stroke-dasharray=\"%s\"", dash);
}

static void draw_lines(render *r, const svg_layout *L)
{
    const hx_svg_chart *c = L->c;
    for (size_t s = 0; s < c->nseries; s++) {
        const svg_series *se = &c->series[s];
        size_t good = 0;
        for (size_t i = 0; i < se->n; i++)
            good += point_ok(c, se->x[i], se->y[i]);
        if (good == 0)
            continue;
        out_str(r, "<g fill=\"none\" stroke-width=\"2\" stroke-linejoin=\"round\" "
                   "stroke-linecap=\"round\" ");
        series_stroke(r, s);
        out_str(r, ">\n");
        /* One polyline per run of drawable points; a skipped point breaks it. */
        size_t i = 0;
        while (i < se->n) {
            while (i < se->n && !point_ok(c, se->x[i], se->y[i]))
                i++;
            size_t start = i;
            while (i < se->n && point_ok(c, se->x[i], se->y[i]))
                i++;
            if (i - start < 2)
                continue; /* lone points get a marker below */
            out_str(r, "<polyline points=\"");
            for (size_t k = start; k < i; k++)
                out_fmt(r, "%s%s,%s", k > start ? " " : "", num(r, px(L, se->x[k])),
                        num(r, py(L, se->y[k])));
            out_str(r, "\"/>\n");
        }
        out_str(r, "</g>\n");

        /* Markers, with the values as a tooltip, for small series and lone points. */
        out_fmt(r, "<g fill=\"%s\">\n", palette[s % 8]);
        for (size_t k = 0; k < se->n; k++) {
            if (!point_ok(c, se->x[k], se->y[k]))
                continue;
            int lone = (k == 0 || !point_ok(c, se->x[k - 1], se->y[k - 1])) &&
                       (k + 1 == se->n || !point_ok(c, se->x[k + 1], se->y[k + 1]));
            if (good > MARKER_MAX_POINTS && !lone)
                continue;
            out_fmt(r, "<circle cx=\"%s\" cy=\"%s\" r=\"3\"><title>", num(r, px(L, se->x[k])),
                    num(r, py(L, se->y[k])));
            text_esc(r, se->name, 0);
            out_fmt(r, ": (%s, %s)</title></circle>\n", val(r, se->x[k], 6),
                    val(r, se->y[k], 6));
        }
        out_str(r, "</g>\n");
    }
}

static double clampd(double v, double lo, double hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static void draw_bars(render *r, const svg_layout *L)
{
    const hx_svg_chart *c = L->c;
    if (L->ngroups == 0 || c->nseries == 0)
        return;
    double gw = L->pw / (double)L->ngroups;
    double bw = gw * 0.8 / (double)c->nseries;
    double base = py(L, clampd(0, L->y.lo, L->y.hi));
    for (size_t s = 0; s < c->nseries; s++) {
        const svg_series *se = &c->series[s];
        out_fmt(r, "<g fill=\"%s\" fill-opacity=\"%s\">\n", palette[s % 8],
                bar_opacity[(s / 8) % 4]);
        for (size_t j = 0; j < se->n; j++) {
            double v = se->y[j];
            if (!isfinite(v))
                continue;
            double x = L->left + gw * (double)j + gw * 0.1 + bw * (double)s;
            double top = py(L, clampd(v, L->y.lo, L->y.hi));
            double y0 = fmin(top, base), h = fabs(top - base);
            char buf[32];
            out_fmt(r, "<rect x=\"%s\" y=\"%s\" width=\"%s\" height=\"%s\"><title>",
                    num(r, x + 0.5), num(r, y0), num(r, fmax(bw - 1, 0.5)), num(r, h));
            text_esc(r, se->name, 0);
            out_str(r, ", ");
            text_esc(r, cat_label(c, j, buf, sizeof buf), 0);
            out_fmt(r, ": %s</title></rect>\n", val(r, v, 6));
        }
        out_str(r, "</g>\n");
    }
}

/* Value labels where they fit above (or below, for negatives) each bar. */
static void draw_bar_values(render *r, const svg_layout *L)
{
    const hx_svg_chart *c = L->c;
    if (L->ngroups == 0 || c->nseries == 0)
        return;
    double gw = L->pw / (double)L->ngroups;
    double bw = gw * 0.8 / (double)c->nseries;
    out_str(r, "<g font-size=\"10\" fill=\"#333\" text-anchor=\"middle\" paint-order=\"stroke\" "
               "stroke=\"#fff\" stroke-width=\"3\" stroke-linejoin=\"round\">\n");
    for (size_t s = 0; s < c->nseries; s++) {
        const svg_series *se = &c->series[s];
        for (size_t j = 0; j < se->n; j++) {
            double v = se->y[j];
            if (!isfinite(v) || v < L->y.lo || v > L->y.hi)
                continue;
            /* Four digits, but whole numbers up to a million stay whole (15500). */
            int big = fabs(v) >= 1e4 && fabs(v) < 1e6;
            const char *label = val(r, big ? round(v) : v, big ? 6 : 4);
            if ((double)strlen(label) * 5.8 > bw + 4)
                continue;
            double x = L->left + gw * (double)j + gw * 0.1 + bw * ((double)s + 0.5);
            double y = py(L, v);
            text_el(r, x, v >= 0 ? y - 4 : y + 12, NULL, label, 0);
        }
    }
    out_str(r, "</g>\n");
}

/* Reference lines: pass 0 draws the dashed lines, pass 1 their labels (on top of all). */
static void draw_reflines(render *r, const svg_layout *L, int pass)
{
    const hx_svg_chart *c = L->c;
    double bottom = L->top + L->ph, right = L->left + L->pw;
    const char *halo = "paint-order=\"stroke\" stroke=\"#fff\" stroke-width=\"3\" "
                       "stroke-linejoin=\"round\"";
    const char *dashed = "stroke=\"#444\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"";
    char attrs[192];
    for (size_t i = 0; i < c->nhlines; i++) {
        const svg_refline *h = &c->hlines[i];
        if (h->v < L->y.lo || h->v > L->y.hi)
            continue;
        double y = py(L, h->v);
        if (pass == 0) {
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" %s/>\n", num(r, L->left),
                    num(r, y), num(r, right), num(r, y), dashed);
        } else if (h->label) {
            snprintf(attrs, sizeof attrs, "text-anchor=\"end\" font-size=\"11\" fill=\"#222\" %s",
                     halo);
            text_el(r, right - 4, y - 5, attrs, h->label, 0);
        }
    }
    for (size_t i = 0; i < c->nvlines; i++) {
        const svg_refline *v = &c->vlines[i];
        double x;
        if (c->kind == HX_SVG_BARS) {
            if (L->ngroups == 0 || v->v < -0.5 || v->v > (double)L->ngroups - 0.5)
                continue;
            x = pcat(L, v->v);
        } else {
            if (v->v < L->x.lo || v->v > L->x.hi || (L->x.log && !(v->v > 0)))
                continue;
            x = px(L, v->v);
        }
        if (pass == 0) {
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" %s/>\n", num(r, x),
                    num(r, L->top), num(r, x), num(r, bottom), dashed);
        } else if (v->label) {
            int at_right = x > L->left + L->pw * 0.75;
            snprintf(attrs, sizeof attrs, "text-anchor=\"%s\" font-size=\"11\" fill=\"#222\" %s",
                     at_right ? "end" : "start", halo);
            /* Just above the plot area, clear of the data and of any hline. */
            text_el(r, at_right ? x - 4 : x + 4, L->top - 5, attrs, v->label, 0);
        }
    }
}

static void draw_legend(render *r, const svg_layout *L)
{
    const hx_svg_chart *c = L->c;
    if (c->nseries == 0)
        return;
    double x = L->left + L->pw + LEGEND_GAP;
    out_str(r, "<g font-size=\"12\" fill=\"#222\">\n");
    for (size_t s = 0; s < c->nseries; s++) {
        double y = L->top + 8 + LEGEND_ROW * (double)s;
        if (c->kind == HX_SVG_LINES) {
            out_fmt(r, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" stroke-width=\"2.5\" ",
                    num(r, x), num(r, y), num(r, x + 20), num(r, y));
            series_stroke(r, s);
            out_str(r, "/>\n");
        } else {
            out_fmt(r, "<rect x=\"%s\" y=\"%s\" width=\"14\" height=\"12\" fill=\"%s\" "
                       "fill-opacity=\"%s\"/>\n",
                    num(r, x + 3), num(r, y - 6), palette[s % 8], bar_opacity[(s / 8) % 4]);
        }
        out_fmt(r, "<text x=\"%s\" y=\"%s\">", num(r, x + 26), num(r, y + 4));
        text_esc(r, c->series[s].name, LEGEND_MAX_CHARS);
        if (c->series[s].n == 0)
            out_str(r, " (no data)");
        out_str(r, "</text>\n");
    }
    out_str(r, "</g>\n");
}

static void draw_chart(render *r, const svg_layout *L, size_t idx, double y_off)
{
    const hx_svg_chart *c = L->c;
    out_fmt(r, "<g transform=\"translate(0 %s)\">\n", num(r, y_off));
    if (c->title)
        text_el(r, L->left + L->pw / 2, 28,
                "text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\" fill=\"#111\"",
                c->title, 0);
    draw_grid_and_axes(r, L);

    /* Data is clipped to the plot area (with a little room for strokes and markers). */
    out_fmt(r, "<clipPath id=\"hx-clip-%zu\"><rect x=\"%s\" y=\"%s\" width=\"%s\" "
               "height=\"%s\"/></clipPath>\n",
            idx, num(r, L->left - 4), num(r, L->top - 4), num(r, L->pw + 8), num(r, L->ph + 8));
    out_fmt(r, "<g clip-path=\"url(#hx-clip-%zu)\">\n", idx);
    if (c->kind == HX_SVG_LINES)
        draw_lines(r, L);
    else
        draw_bars(r, L);
    out_str(r, "</g>\n");
    draw_reflines(r, L, 0);
    if (c->kind == HX_SVG_BARS)
        draw_bar_values(r, L);
    if (L->npoints == 0)
        text_el(r, L->left + L->pw / 2, L->top + L->ph / 2,
                "text-anchor=\"middle\" font-size=\"14\" fill=\"#888\"", "no data", 0);
    draw_reflines(r, L, 1);
    draw_legend(r, L);
    out_str(r, "</g>\n");
}

char *hx_svg_render(hx_svg_chart *const *charts, size_t n)
{
    if (!charts && n > 0)
        return NULL;
    render r = {0};
    svg_layout *layouts = NULL;
    if (n > 0) {
        layouts = calloc(n, sizeof *layouts);
        if (!layouts)
            return NULL;
    }
    size_t nl = 0;
    double width = 0, height = 0;
    const char *doc_title = NULL;
    for (size_t i = 0; i < n; i++) {
        if (!charts[i])
            continue;
        layout_chart(&layouts[nl], charts[i]);
        width = fmax(width, layouts[nl].width);
        height += (nl > 0 ? CHART_GAP : 0) + layouts[nl].height;
        if (!doc_title && charts[i]->title)
            doc_title = charts[i]->title;
        nl++;
    }
    if (nl == 0) {
        width = 400;
        height = 60;
    }
    width = ceil(width);
    height = ceil(height + 8);

    out_str(&r, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out_fmt(&r,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%s\" "
            "height=\"%s\" viewBox=\"0 0 %s %s\" font-family=\"Helvetica, Arial, sans-serif\">\n",
            num(&r, width), num(&r, height), num(&r, width), num(&r, height));
    out_str(&r, "<title>");
    text_esc(&r, doc_title ? doc_title : "hexflow charts", 0);
    out_str(&r, "</title>\n");
    out_str(&r, "<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n");
    if (nl == 0)
        text_el(&r, width / 2, 34, "text-anchor=\"middle\" font-size=\"14\" fill=\"#888\"",
                "no charts", 0);
    double y = 0;
    for (size_t i = 0; i < nl; i++) {
        draw_chart(&r, &layouts[i], i, y);
        y += layouts[i].height + CHART_GAP;
    }
    out_str(&r, "</svg>\n");
    free(layouts);
    if (r.failed) {
        free(r.p);
        return NULL;
    }
    return r.p;
}

hx_status hx_svg_write(const char *path, hx_svg_chart *const *charts, size_t n, hx_err *err)
{
    if (!path || (!charts && n > 0))
        return hx_err_set(err, HX_EINVAL, "cannot write chart: invalid argument");
    char *doc = hx_svg_render(charts, n);
    if (!doc)
        return hx_err_set(err, HX_ENOMEM, "cannot write chart '%s': out of memory", path);
    hx_status st = hx_file_write_atomic(path, doc, strlen(doc), err);
    free(doc);
    return st;
}
