/*
 * test_svg.c - SVG charts: structure, escaping, ranges and ticks, files.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ctype.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/file.h"
#include "common/status.h"
#include "common/svg.h"

/* ---- helpers ------------------------------------------------------------ */

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0, k = strlen(needle);
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += k)
        n++;
    return n;
}

static int is_name_char(char c)
{
    return isalnum((unsigned char)c) || c == '-' || c == '_' || c == ':' || c == '.';
}

/*
 * A tiny well-formedness check: every start tag is closed by the matching end
 * tag or is self-closing, there is exactly one root element and it is <svg>,
 * attribute values are quoted and hold no '<', and every '&' starts one of the
 * five predefined entities. On failure `why` says where.
 */
static int check_xml(const char *s, char *why, size_t cap)
{
    enum { MAX_DEPTH = 64, MAX_NAME = 32 };
    char stack[MAX_DEPTH][MAX_NAME];
    int depth = 0, roots = 0;
    const char *p = s;
    for (const char *a = s; (a = strchr(a, '&')) != NULL; a++) {
        if (strncmp(a, "&amp;", 5) && strncmp(a, "&lt;", 4) && strncmp(a, "&gt;", 4) &&
            strncmp(a, "&quot;", 6) && strncmp(a, "&apos;", 6)) {
            snprintf(why, cap, "bare '&' at offset %td", a - s);
            return 0;
        }
    }
    while ((p = strchr(p, '<')) != NULL) {
        if (strncmp(p, "<?", 2) == 0) {
            const char *e = strstr(p, "?>");
            if (!e || p != s) {
                snprintf(why, cap, "bad processing instruction at offset %td", p - s);
                return 0;
            }
            p = e + 2;
            continue;
        }
        if (strncmp(p, "<!--", 4) == 0) {
            const char *e = strstr(p, "-->");
            if (!e) {
                snprintf(why, cap, "unterminated comment");
                return 0;
            }
            p = e + 3;
            continue;
        }
        int closing = p[1] == '/';
        const char *n = p + 1 + closing;
        size_t len = 0;
        while (is_name_char(n[len]))
            len++;
        if (len == 0 || len >= MAX_NAME) {
            snprintf(why, cap, "bad tag name at offset %td", p - s);
            return 0;
        }
        /* Scan to the closing '>', skipping quoted attribute values. */
        const char *q = n + len;
        char quote = 0;
        for (; *q && (quote || *q != '>'); q++) {
            if (quote) {
                if (*q == quote)
                    quote = 0;
                else if (*q == '<') {
                    snprintf(why, cap, "'<' inside an attribute at offset %td", q - s);
                    return 0;
                }
            } else if (*q == '"' || *q == '\'') {
                quote = *q;
            } else if (*q == '=' && q[1] != '"' && q[1] != '\'') {
                snprintf(why, cap, "unquoted attribute at offset %td", q - s);
                return 0;
            } else if (*q == '<') {
                snprintf(why, cap, "'<' inside a tag at offset %td", q - s);
                return 0;
            }
        }
        if (*q != '>') {
            snprintf(why, cap, "unterminated tag at offset %td", p - s);
            return 0;
        }
        if (closing) {
            if (depth == 0 || strlen(stack[depth - 1]) != len ||
                strncmp(stack[depth - 1], n, len) != 0) {
                snprintf(why, cap, "unbalanced </%.*s> at offset %td", (int)len, n, p - s);
                return 0;
            }
            depth--;
        } else {
            if (depth == 0) {
                roots++;
                if (roots > 1 || len != 3 || strncmp(n, "svg", 3) != 0) {
                    snprintf(why, cap, "root element is not a single <svg>");
                    return 0;
                }
            }
            if (q[-1] != '/') {
                if (depth == MAX_DEPTH) {
                    snprintf(why, cap, "nesting too deep");
                    return 0;
                }
                memcpy(stack[depth], n, len);
                stack[depth][len] = '\0';
                depth++;
            }
        }
        p = q + 1;
    }
    if (depth != 0) {
        snprintf(why, cap, "<%s> not closed", stack[depth - 1]);
        return 0;
    }
    if (roots != 1) {
        snprintf(why, cap, "no root element");
        return 0;
    }
    return 1;
}

/* Renders, checks it is a well-formed standalone SVG document, returns it. */
static char *render_checked(hx_svg_chart *const *charts, size_t n)
{
    char *doc = hx_svg_render(charts, n);
    assert_non_null(doc);
    assert_true(strncmp(doc, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg ", 44) == 0);
    assert_non_null(strstr(doc, "xmlns=\"http://www.w3.org/2000/svg\""));
    assert_non_null(strstr(doc, "version=\"1.1\""));
    assert_non_null(strstr(doc, " viewBox=\"0 0 "));
    assert_non_null(strstr(doc, " width=\""));
    assert_non_null(strstr(doc, " height=\""));
    char why[256] = "";
    if (!check_xml(doc, why, sizeof why)) {
        print_error("not well-formed: %s\n", why);
        fail();
    }
    /* No number went out as nan or inf. */
    for (const char *p = doc; *p; p++) {
        if (strncmp(p, "nan", 3) == 0 || strncmp(p, "NaN", 3) == 0 || strncmp(p, "inf", 3) == 0) {
            print_error("non-finite number near offset %td: %.40s\n", p - doc, p);
            fail();
        }
    }
    return doc;
}

/* A CDF of n latencies lo, lo + step, ... */
static void cdf(double *x, double *y, size_t n, double lo, double step)
{
    for (size_t i = 0; i < n; i++) {
        x[i] = lo + step * (double)i;
        y[i] = (double)(i + 1) / (double)n;
    }
}

/* ---- tests -------------------------------------------------------------- */

/* The checker itself must reject broken documents, or the other tests prove nothing. */
static void checker_rejects_broken(void **state)
{
    (void)state;
    char why[256];
    assert_true(check_xml("<?xml version=\"1.0\"?>\n<svg a=\"1\"><g><line/></g></svg>", why,
                          sizeof why));
    const char *bad[] = {
        "<svg><g></svg>",             /* unclosed */
        "<svg><g></line></g></svg>",  /* mismatched */
        "<svg></svg><svg></svg>",     /* two roots */
        "<g></g>",                    /* root not svg */
        "<svg a=1></svg>",            /* unquoted attribute */
        "<svg a=\"<\"></svg>",        /* '<' in an attribute */
        "<svg>a & b</svg>",           /* bare '&' */
        "<svg><text>x</text>",        /* root not closed */
        "<svg><g</svg>",              /* broken tag */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (check_xml(bad[i], why, sizeof why)) {
            print_error("accepted: %s\n", bad[i]);
            fail();
        }
}

static void line_chart(void **state)
{
    (void)state;
    double x1[100], y1[100], x2[100], y2[100];
    cdf(x1, y1, 100, 0.1, 0.02);
    cdf(x2, y2, 100, 0.3, 0.03);
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "TTFT CDF", "TTFT (s)", "fraction");
    assert_non_null(c);
    assert_int_equal(hx_svg_chart_add_series(c, "hexflow", x1, y1, 100), HX_OK);
    assert_int_equal(hx_svg_chart_add_series(c, "baseline", x2, y2, 100), HX_OK);
    assert_int_equal(hx_svg_chart_add_vline(c, 2.0, "SLO 2 s"), HX_OK);
    assert_int_equal(hx_svg_chart_add_hline(c, 0.99, "p99"), HX_OK);
    char *doc = render_checked(&c, 1);

    assert_non_null(strstr(doc, "<title>TTFT CDF</title>"));
    assert_non_null(strstr(doc, ">TTFT CDF</text>"));
    assert_non_null(strstr(doc, ">TTFT (s)</text>"));
    assert_non_null(strstr(doc, ">fraction</text>"));
    assert_non_null(strstr(doc, ">hexflow</text>"));
    assert_non_null(strstr(doc, ">baseline</text>"));
    /* One polyline per series, each in its own palette colour. */
    assert_int_equal(count(doc, "<polyline "), 2);
    assert_non_null(strstr(doc, "stroke=\"#1f77b4\""));
    assert_non_null(strstr(doc, "stroke=\"#ff7f0e\""));
    /* Dashed reference lines with their labels; the x axis grew to show x = 2. */
    assert_int_equal(count(doc, "stroke-dasharray=\"6 4\""), 2);
    assert_non_null(strstr(doc, ">SLO 2 s</text>"));
    assert_non_null(strstr(doc, ">p99</text>"));
    /* Nice ticks: y 0, 0.2, ..., 1; x in steps of 0.5 up to 3.5 (data ends at 3.27). */
    const char *yt[] = {">0<", ">0.2<", ">0.4<", ">0.6<", ">0.8<", ">1<"};
    for (size_t i = 0; i < sizeof yt / sizeof yt[0]; i++)
        assert_non_null(strstr(doc, yt[i]));
    assert_non_null(strstr(doc, ">0.5<"));
    assert_non_null(strstr(doc, ">2.5<"));
    assert_non_null(strstr(doc, ">3.5<"));
    assert_null(strstr(doc, ">0.30000"));
    /* 100-point series are drawn without per-point markers. */
    assert_int_equal(count(doc, "<circle "), 0);
    free(doc);
    hx_svg_chart_free(c);
}

static void bar_chart(void **state)
{
    (void)state;
    const char *cats[] = {"baseline", "+8 H100", "-A6000"};
    double goodput[] = {3.1, 5.4, 2.2};
    double cost[] = {1.2, 1.5, 0.9};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_BARS, "Goodput per scenario", NULL, "req/s");
    assert_non_null(c);
    assert_int_equal(hx_svg_chart_set_categories(c, cats, 3), HX_OK);
    assert_int_equal(hx_svg_chart_add_series(c, "goodput", NULL, goodput, 3), HX_OK);
    assert_int_equal(hx_svg_chart_add_series(c, "cost", NULL, cost, 3), HX_OK);
    assert_int_equal(hx_svg_chart_add_hline(c, 4, "target"), HX_OK);
    char *doc = render_checked(&c, 1);
    assert_non_null(strstr(doc, ">Goodput per scenario</text>"));
    assert_non_null(strstr(doc, ">goodput</text>"));
    assert_non_null(strstr(doc, ">cost</text>"));
    assert_non_null(strstr(doc, ">baseline</text>"));
    assert_non_null(strstr(doc, ">+8 H100</text>"));
    /* Six bars, each with a tooltip; two legend swatches. */
    assert_int_equal(count(doc, "</title></rect>"), 6);
    assert_non_null(strstr(doc, "<title>goodput, +8 H100: 5.4</title>"));
    assert_non_null(strstr(doc, "fill=\"#1f77b4\""));
    assert_non_null(strstr(doc, "fill=\"#ff7f0e\""));
    /* Bars start at 0 and the y axis is 0-based with nice steps. */
    assert_non_null(strstr(doc, ">0<"));
    assert_non_null(strstr(doc, ">6<"));
    assert_non_null(strstr(doc, ">target</text>"));
    /* Value labels on the bars. */
    assert_non_null(strstr(doc, ">5.4</text>"));
    free(doc);
    hx_svg_chart_free(c);
}

static void bars_long_labels_and_many_series(void **state)
{
    (void)state;
    enum { NS = 10, NC = 7 };
    const char *cats[NC] = {"a very long scenario name that goes on", "b", "c", "d", "e", "f",
                            "g"};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_BARS, "many", "scenario", "$/Mtok");
    for (int s = 0; s < NS; s++) {
        double v[NC];
        for (int j = 0; j < NC; j++)
            v[j] = (s + 1) * 0.1 * (j + 1) - 1.0; /* some negative */
        char name[16];
        snprintf(name, sizeof name, "s%d", s);
        assert_int_equal(hx_svg_chart_add_series(c, name, NULL, v, NC), HX_OK);
    }
    assert_int_equal(hx_svg_chart_set_categories(c, cats, NC), HX_OK);
    assert_int_equal(hx_svg_chart_add_vline(c, 1.5, "cut"), HX_OK);
    char *doc = render_checked(&c, 1);
    assert_non_null(strstr(doc, "rotate(-35 "));
    assert_non_null(strstr(doc, ">a very long scenario name th...</text>"));
    assert_non_null(strstr(doc, ">s9</text>"));
    assert_non_null(strstr(doc, "fill-opacity=\"0.6\"")); /* series past the palette */
    assert_non_null(strstr(doc, ">cut</text>"));
    free(doc);
    hx_svg_chart_free(c);
}

static void escaping(void **state)
{
    (void)state;
    const char *nasty = "a<b & \"c\" 'd'>";
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, nasty, nasty, nasty);
    double x[] = {1, 2}, y[] = {3, 4};
    assert_int_equal(hx_svg_chart_add_series(c, nasty, x, y, 2), HX_OK);
    assert_int_equal(hx_svg_chart_add_hline(c, 3.5, nasty), HX_OK);
    /* Control characters and invalid UTF-8 cannot reach the document. */
    assert_int_equal(hx_svg_chart_add_series(c, "bad\x01\xff\xc3(ok)\xc3\xa9", x, y, 2), HX_OK);
    char *doc = render_checked(&c, 1);
    const char *esc = "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;";
    assert_true(count(doc, esc) >= 6); /* doc title, title, 2 labels, legend, line, tooltips */
    assert_null(strstr(doc, "a<b"));
    assert_non_null(strstr(doc, ">bad??\?(ok)\xc3\xa9</text>"));
    free(doc);
    hx_svg_chart_free(c);
}

static void nan_skipping(void **state)
{
    (void)state;
    double x[] = {1, 2, NAN, 4, 5, INFINITY, 7};
    double y[] = {0.1, 0.2, 0.3, 0.4, NAN, 0.6, 0.7};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "gaps", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "s", x, y, 7), HX_OK);
    assert_int_equal(hx_svg_chart_add_hline(c, NAN, "ignored"), HX_OK);
    assert_int_equal(hx_svg_chart_add_vline(c, -INFINITY, "ignored too"), HX_OK);
    char *doc = render_checked(&c, 1);
    /* Runs {1,2} and {4}, {7}: one polyline, four markers (3 drawable + lone ones). */
    assert_int_equal(count(doc, "<polyline "), 1);
    assert_int_equal(count(doc, "<circle "), 4);
    assert_null(strstr(doc, "ignored"));
    /* x range from finite points only: 1..7 -> ticks 1..7. */
    assert_non_null(strstr(doc, ">7<"));
    free(doc);
    hx_svg_chart_free(c);

    double b[] = {1, NAN, 3};
    c = hx_svg_chart_new(HX_SVG_BARS, "bar gaps", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "b", NULL, b, 3), HX_OK);
    doc = render_checked(&c, 1);
    assert_int_equal(count(doc, "</title></rect>"), 2);
    /* Without categories the groups are numbered. */
    assert_non_null(strstr(doc, ">1</text>"));
    assert_non_null(strstr(doc, ">3</text>"));
    free(doc);
    hx_svg_chart_free(c);
}

static void empty_and_degenerate(void **state)
{
    (void)state;
    /* No charts at all. */
    char *doc = render_checked(NULL, 0);
    assert_non_null(strstr(doc, "no charts"));
    free(doc);

    /* A chart with no series, one with an empty series, NULL entries skipped. */
    hx_svg_chart *charts[4] = {0};
    charts[0] = hx_svg_chart_new(HX_SVG_LINES, NULL, NULL, NULL);
    charts[1] = NULL;
    charts[2] = hx_svg_chart_new(HX_SVG_BARS, "empty bars", "x", "y");
    assert_int_equal(hx_svg_chart_add_series(charts[2], "nothing", NULL, NULL, 0), HX_OK);
    charts[3] = hx_svg_chart_new(HX_SVG_LINES, "one point", NULL, NULL);
    double x1 = 5, y1 = 5;
    assert_int_equal(hx_svg_chart_add_series(charts[3], NULL, &x1, &y1, 1), HX_OK);
    doc = render_checked(charts, 4);
    assert_int_equal(count(doc, ">no data</text>"), 2);
    assert_non_null(strstr(doc, ">nothing (no data)</text>"));
    assert_non_null(strstr(doc, ">series 1</text>"));
    assert_int_equal(count(doc, "<circle "), 1); /* the single point */
    /* All-equal values are padded around the value: 5 -> 4.4 .. 5.6. */
    assert_non_null(strstr(doc, ">5<"));
    assert_non_null(strstr(doc, ">4.6<"));
    assert_non_null(strstr(doc, ">5.4<"));
    free(doc);
    for (int i = 0; i < 4; i++)
        hx_svg_chart_free(charts[i]);

    /* All-zero bars and a flat zero line. */
    double z[] = {0, 0, 0};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_BARS, "zeros", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "z", NULL, z, 3), HX_OK);
    doc = render_checked(&c, 1);
    assert_non_null(strstr(doc, ">1<")); /* y axis 0 .. 1 */
    free(doc);
    hx_svg_chart_free(c);

    /* Huge and tiny values stay finite. */
    double hx[] = {1e-300, 1e300}, hy[] = {-1e308, 1e308};
    c = hx_svg_chart_new(HX_SVG_LINES, "extremes", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "e", hx, hy, 2), HX_OK);
    doc = render_checked(&c, 1);
    free(doc);
    hx_svg_chart_set_log_x(c, 1);
    doc = render_checked(&c, 1);
    free(doc);
    hx_svg_chart_free(c);
}

static void fixed_y_range_clips(void **state)
{
    (void)state;
    double x[] = {10, 20, 30}, y[] = {0.5, 2.0, 0.9};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "attainment", "rate (req/s)", "SLO met");
    assert_int_equal(hx_svg_chart_add_series(c, "p", x, y, 3), HX_OK);
    hx_svg_chart_set_y_range(c, 0, 1);
    assert_int_equal(hx_svg_chart_add_hline(c, 5, "off the chart"), HX_OK);
    char *doc = render_checked(&c, 1);
    assert_non_null(strstr(doc, "clip-path=\"url(#hx-clip-0)\""));
    assert_non_null(strstr(doc, ">1<"));
    assert_null(strstr(doc, ">2<"));
    assert_null(strstr(doc, "off the chart"));
    free(doc);
    /* An invalid range restores the automatic one. */
    hx_svg_chart_set_y_range(c, 1, 1);
    doc = render_checked(&c, 1);
    assert_non_null(strstr(doc, "off the chart"));
    free(doc);
    hx_svg_chart_free(c);
}

static void log_axis(void **state)
{
    (void)state;
    double x[] = {0.5, 3, 40, 700, 2000, -1, 0};
    double y[] = {0.1, 0.3, 0.5, 0.7, 0.9, 1, 1};
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "log", "tokens", NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "s", x, y, 7), HX_OK);
    hx_svg_chart_set_log_x(c, 1);
    char *doc = render_checked(&c, 1);
    const char *ticks[] = {">0.1<", ">1<", ">10<", ">100<", ">1000<", ">10000<"};
    for (size_t i = 0; i < sizeof ticks / sizeof ticks[0]; i++)
        if (!strstr(doc, ticks[i])) {
            print_error("missing log tick %s\n", ticks[i]);
            fail();
        }
    assert_null(strstr(doc, ">500<"));
    assert_null(strstr(doc, ">0.01<"));
    /* x <= 0 is skipped on a log axis: five drawable points. */
    assert_int_equal(count(doc, "<circle "), 5);
    free(doc);

    /* Many decades: labelled every few decades, compact exponents. */
    double wx[] = {1e-6, 1e12}, wy[] = {0, 1};
    hx_svg_chart *w = hx_svg_chart_new(HX_SVG_LINES, "wide", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(w, "w", wx, wy, 2), HX_OK);
    hx_svg_chart_set_log_x(w, 1);
    doc = render_checked(&w, 1);
    assert_non_null(strstr(doc, ">1e-6<"));
    assert_non_null(strstr(doc, ">1e12<"));
    assert_null(strstr(doc, "e+"));
    free(doc);
    hx_svg_chart_free(w);
    hx_svg_chart_free(c);
}

static void bad_arguments(void **state)
{
    (void)state;
    double v[] = {1};
    hx_svg_chart_free(NULL);
    assert_int_equal(hx_svg_chart_add_series(NULL, "x", v, v, 1), HX_EINVAL);
    assert_int_equal(hx_svg_chart_add_hline(NULL, 1, "x"), HX_EINVAL);
    assert_int_equal(hx_svg_chart_add_vline(NULL, 1, "x"), HX_EINVAL);
    assert_int_equal(hx_svg_chart_set_categories(NULL, NULL, 0), HX_EINVAL);
    hx_svg_chart_set_log_x(NULL, 1);
    hx_svg_chart_set_y_range(NULL, 0, 1);
    hx_svg_chart *c = hx_svg_chart_new(HX_SVG_LINES, "t", NULL, NULL);
    assert_int_equal(hx_svg_chart_add_series(c, "x", NULL, v, 1), HX_EINVAL);
    assert_int_equal(hx_svg_chart_add_series(c, "x", v, NULL, 1), HX_EINVAL);
    assert_int_equal(hx_svg_chart_set_categories(c, NULL, 2), HX_EINVAL);
    assert_null(hx_svg_render(NULL, 1));
    hx_err err = {0};
    assert_int_equal(hx_svg_write(NULL, &c, 1, &err), HX_EINVAL);
    assert_true(err.msg[0] != '\0');
    /* Categories can be replaced, NULL entries draw no label. */
    const char *cats[] = {"one", NULL};
    assert_int_equal(hx_svg_chart_set_categories(c, cats, 2), HX_OK);
    assert_int_equal(hx_svg_chart_set_categories(c, cats, 1), HX_OK);
    hx_svg_chart_free(c);
}

/* A directory for the file tests; removed by the teardown. */
static char tmpdir[64];

static int make_tmpdir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/hx-test-svg-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int remove_tmpdir(void **state)
{
    (void)state;
    DIR *d = opendir(tmpdir);
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", tmpdir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(tmpdir);
    return 0;
}

static size_t dir_entries(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

/* A page with a line chart, a log chart and a bar chart. */
static hx_svg_chart **sample_page(size_t *n)
{
    static hx_svg_chart *charts[3];
    double x1[200], y1[200], x2[200], y2[200];
    cdf(x1, y1, 200, 0.12, 0.009);
    cdf(x2, y2, 200, 0.35, 0.014);
    charts[0] = hx_svg_chart_new(HX_SVG_LINES, "TTFT CDF", "TTFT (s)", "fraction of requests");
    hx_svg_chart_add_series(charts[0], "hexflow plan", x1, y1, 200);
    hx_svg_chart_add_series(charts[0], "uniform baseline", x2, y2, 200);
    hx_svg_chart_add_vline(charts[0], 2.0, "TTFT SLO 2 s");
    hx_svg_chart_add_hline(charts[0], 0.99, "p99");

    double rate[] = {0.5, 1, 2, 4, 8, 16};
    double a1[] = {1, 1, 0.995, 0.97, 0.82, 0.41}, a2[] = {1, 0.99, 0.96, 0.85, 0.5, 0.2};
    charts[1] = hx_svg_chart_new(HX_SVG_LINES, "SLO attainment vs request rate",
                                 "request rate (req/s)", "SLO attainment");
    hx_svg_chart_add_series(charts[1], "hexflow plan", rate, a1, 6);
    hx_svg_chart_add_series(charts[1], "uniform baseline", rate, a2, 6);
    hx_svg_chart_set_log_x(charts[1], 1);
    hx_svg_chart_set_y_range(charts[1], 0, 1.05);
    hx_svg_chart_add_hline(charts[1], 0.9, "90% target");

    const char *cats[] = {"current", "+8 H100", "-A6000", "budget $60/h & <2s"};
    double g[] = {3.1, 5.4, 2.2, 4.0}, cost[] = {4.2, 3.9, 4.8, 3.5};
    charts[2] = hx_svg_chart_new(HX_SVG_BARS, "What-if: goodput and cost", "scenario", NULL);
    hx_svg_chart_set_categories(charts[2], cats, 4);
    hx_svg_chart_add_series(charts[2], "goodput (req/s)", NULL, g, 4);
    hx_svg_chart_add_series(charts[2], "$ per M output tokens", NULL, cost, 4);
    *n = 3;
    return charts;
}

static void write_file(void **state)
{
    (void)state;
    size_t n;
    hx_svg_chart **charts = sample_page(&n);
    char path[128];
    snprintf(path, sizeof path, "%s/charts.svg", tmpdir);
    hx_err err = {0};
    assert_int_equal(hx_svg_write(path, charts, n, &err), HX_OK);
    assert_true(hx_file_is_regular(path));
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(hx_file_read_all(path, "chart", 1 << 24, &data, &len, &err), HX_OK);
    char *doc = render_checked(charts, n);
    assert_int_equal(len, strlen(doc));
    assert_memory_equal(data, doc, len);
    free(doc);
    free(data);

    /* Writing into a missing directory fails, says so, and leaves nothing. */
    char bad[160];
    snprintf(bad, sizeof bad, "%s/missing/charts.svg", tmpdir);
    hx_err_clear(&err);
    assert_int_not_equal(hx_svg_write(bad, charts, n, &err), HX_OK);
    assert_non_null(strstr(err.msg, bad));
    assert_non_null(strstr(err.msg, "no such file"));
    assert_false(hx_file_is_regular(bad));
    assert_int_equal(dir_entries(tmpdir), 1);

    for (size_t i = 0; i < n; i++)
        hx_svg_chart_free(charts[i]);
}

/* The written file parses as XML with Python's minidom, when python3 is here. */
static void python_parses(void **state)
{
    (void)state;
    if (system("command -v python3 >/dev/null 2>&1") != 0) {
        print_message("python3 not found: skipping the XML parser check\n");
        skip();
    }
    size_t n;
    hx_svg_chart **charts = sample_page(&n);
    char path[128];
    snprintf(path, sizeof path, "%s/parse.svg", tmpdir);
    hx_err err = {0};
    assert_int_equal(hx_svg_write(path, charts, n, &err), HX_OK);
    for (size_t i = 0; i < n; i++)
        hx_svg_chart_free(charts[i]);
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "python3 -c \"import sys,xml.dom.minidom; "
             "d = xml.dom.minidom.parse(sys.argv[1]).documentElement; "
             "assert d.tagName == 'svg' and "
             "d.getAttribute('xmlns') == 'http://www.w3.org/2000/svg'\" '%s'",
             path);
    int rc = system(cmd);
    assert_true(rc != -1 && WIFEXITED(rc));
    assert_int_equal(WEXITSTATUS(rc), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(checker_rejects_broken),
        cmocka_unit_test(line_chart),
        cmocka_unit_test(bar_chart),
        cmocka_unit_test(bars_long_labels_and_many_series),
        cmocka_unit_test(escaping),
        cmocka_unit_test(nan_skipping),
        cmocka_unit_test(empty_and_degenerate),
        cmocka_unit_test(fixed_y_range_clips),
        cmocka_unit_test(log_axis),
        cmocka_unit_test(bad_arguments),
        cmocka_unit_test(write_file),
        cmocka_unit_test(python_parses),
    };
    return cmocka_run_group_tests(tests, make_tmpdir, remove_tmpdir);
}
