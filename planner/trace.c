#include "trace.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "common/file.h"

#define MAX_TIMESTAMP_S 1e12 /* ~31,700 years: keeps whole seconds exact in int64 and double */
#define ECHO_CHARS 40        /* longest piece of a bad value quoted back in a message */

#define AZURE_HEADER "TIMESTAMP,ContextTokens,GeneratedTokens"
#define MOONCAKE_KEYS "timestamp (ms), input_length and output_length"

enum ts_kind { TS_NONE = 0, TS_DATE, TS_SECONDS };

/* One CSV field of the current line: text in ctx.fbuf, byte offset in the line. */
typedef struct csv_field {
    const char *s; /* borrowed from ctx.fbuf, NUL-terminated, unquoted and trimmed */
    size_t off;    /* where the field starts in the line */
} csv_field;

typedef struct ctx {
    const char *file; /* borrowed: name for diagnostics */
    hx_diags *diags;  /* borrowed */
    size_t problems;  /* all problems found, listed or not */
    int stop;         /* a problem after which nothing more is read */

    hx_trace_req *reqs; /* owned until handed to the trace */
    size_t n, cap;

    int have_base;    /* arrival_s is measured from base_sec while loading */
    int64_t base_sec;

    enum ts_kind ts_kind; /* CSV: the kind of TIMESTAMP the first good row used */
    long ts_kind_line;

    /* CSV scratch, reused line after line */
    char *fbuf; /* owned */
    size_t fbuf_cap;
    csv_field *fields; /* owned */
    size_t nfields, fields_cap;
} ctx;

/* ------------------------------------------------------------------------- */
/* Reporting                                                                  */

static int line_no(long line)
{
    return line > INT_MAX ? INT_MAX : (int)line;
}

static void problem(ctx *c, long line, int col, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void problem(ctx *c, long line, int col, const char *field, const char *fmt, ...)
{
    c->problems++;
    if (c->problems > HX_TRACE_MAX_DIAGS)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    hx_diags_add(c->diags, c->file, line_no(line), col, field, "%s", msg);
}

/*
 * Quotes at most ECHO_CHARS bytes of s[0..n) back into buf, cut on a UTF-8
 * boundary, with "..." when cut. Returns buf.
 */
static const char *echo(const char *s, size_t n, char *buf, size_t size)
{
    size_t k = n;
    int cut = 0;
    if (k > ECHO_CHARS) {
        k = ECHO_CHARS;
        while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80)
            k--;
        cut = 1;
    }
    snprintf(buf, size, "%.*s%s", (int)k, s, cut ? "..." : "");
    return buf;
}

/* 1-based character column of byte `off` of a UTF-8 line. */
static int char_col(const char *line, size_t off)
{
    long col = 1;
    for (size_t i = 0; i < off; i++)
        if (((unsigned char)line[i] & 0xC0) != 0x80)
            col++;
    return col > INT_MAX ? INT_MAX : (int)col;
}

/* ------------------------------------------------------------------------- */
/* Collecting requests                                                        */

static hx_status add_req(ctx *c, long line, int64_t sec, double frac, int input, int output)
{
    if (c->n >= HX_TRACE_MAX_REQUESTS) {
        problem(c, line, 0, NULL, "more than %d requests; a trace holds at most %d",
                HX_TRACE_MAX_REQUESTS, HX_TRACE_MAX_REQUESTS);
        c->stop = 1;
        return HX_OK;
    }
    if (c->n == c->cap) {
        size_t ncap = c->cap ? c->cap * 2 : 1024;
        if (ncap > HX_TRACE_MAX_REQUESTS)
            ncap = HX_TRACE_MAX_REQUESTS;
        hx_trace_req *r = realloc(c->reqs, ncap * sizeof *r);
        if (!r)
            return HX_ENOMEM;
        c->reqs = r;
        c->cap = ncap;
    }
    if (!c->have_base) {
        c->have_base = 1;
        c->base_sec = sec;
    }
    hx_trace_req *r = &c->reqs[c->n++];
    r->arrival_s = (double)(sec - c->base_sec) + frac;
    r->input_tokens = input;
    r->output_tokens = output;
    return HX_OK;
}

/* ------------------------------------------------------------------------- */
/* Numbers and dates in text                                                  */

enum count_result { COUNT_OK, COUNT_BAD, COUNT_BIG };

/* A positive whole number of tokens: digits, optionally ".0..." ("512", "512.0"). */
static enum count_result parse_count_str(const char *s, int *out)
{
    long long v = 0;
    int big = 0;
    const char *p = s;
    if (!isdigit((unsigned char)*p))
        return COUNT_BAD;
    for (; isdigit((unsigned char)*p); p++) {
        if (v <= HX_TRACE_MAX_TOKENS)
            v = v * 10 + (*p - '0');
        if (v > HX_TRACE_MAX_TOKENS)
            big = 1;
    }
    if (*p == '.') {
        for (p++; *p == '0'; p++)
            ;
    }
    if (*p)
        return COUNT_BAD;
    if (big)
        return COUNT_BIG;
    if (v < 1)
        return COUNT_BAD;
    *out = (int)v;
    return COUNT_OK;
}

/* Exactly `n` digits at *p, advancing it. */
static int digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)(*p)[i]))
            return 0;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *out = v;
    return 1;
}

static int is_leap(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int y, int m)
{
    static const int dm[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : dm[m - 1];
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* Whether s looks like a date rather than a number: four digits and a '-'. */
static int looks_like_date(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return s[4] == '-';
}

/*
 * YYYY-MM-DD[ T]HH:MM:SS[.f...][Z|+HH:MM|-HH:MM|+HHMM] as UTC seconds since
 * 1970 (whole part in *sec, fraction in [0, 1) in *frac). On failure writes
 * the reason into why.
 */
static int parse_datetime(const char *s, int64_t *sec, double *frac, char *why, size_t wsize)
{
    const char *p = s;
    int y, mo, d, h, mi, se;
    if (!digits(&p, 4, &y) || *p++ != '-' || !digits(&p, 2, &mo) || *p++ != '-' ||
        !digits(&p, 2, &d)) {
        snprintf(why, wsize, "expected the date as YYYY-MM-DD");
        return 0;
    }
    if (mo < 1 || mo > 12) {
        snprintf(why, wsize, "month %02d is out of range", mo);
        return 0;
    }
    if (d < 1 || d > days_in_month(y, mo)) {
        snprintf(why, wsize, "day %02d is out of range for %04d-%02d", d, y, mo);
        return 0;
    }
    if (*p != ' ' && *p != 'T' && *p != 't') {
        snprintf(why, wsize, "expected a time HH:MM:SS after the date");
        return 0;
    }
    p++;
    if (!digits(&p, 2, &h) || *p++ != ':' || !digits(&p, 2, &mi) || *p++ != ':' ||
        !digits(&p, 2, &se)) {
        snprintf(why, wsize, "expected a time HH:MM:SS after the date");
        return 0;
    }
    if (h > 23) {
        snprintf(why, wsize, "hour %02d is out of range", h);
        return 0;
    }
    if (mi > 59) {
        snprintf(why, wsize, "minute %02d is out of range", mi);
        return 0;
    }
    if (se > 59) {
        snprintf(why, wsize, "second %02d is out of range", se);
        return 0;
    }
    double f = 0;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p)) {
            snprintf(why, wsize, "expected digits after the '.'");
            return 0;
        }
        int64_t num = 0;
        double scale = 1;
        for (int nd = 0; isdigit((unsigned char)*p); p++, nd++) {
            if (nd < 18) {
                num = num * 10 + (*p - '0');
                scale *= 10;
            }
        }
        f = (double)num / scale;
    }
    int offset_s = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1;
        int oh, om;
        p++;
        int ok = digits(&p, 2, &oh);
        if (ok && *p == ':')
            p++;
        if (!ok || !digits(&p, 2, &om) || oh > 23 || om > 59) {
            snprintf(why, wsize, "expected a UTC offset +HH:MM after the time");
            return 0;
        }
        offset_s = sign * (oh * 3600 + om * 60);
    }
    if (*p) {
        snprintf(why, wsize, "unexpected '%c' after the time", *p);
        return 0;
    }
    *sec = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset_s;
    *frac = f;
    return 1;
}

/* Whether s names an infinity or NaN as strtod reads them ("inf", "-NaN"). */
static int names_non_finite(const char *s)
{
    const char *p = s;
    if (*p == '+' || *p == '-')
        p++;
    char w[4] = {0};
    for (int i = 0; i < 3 && p[i]; i++)
        w[i] = (char)tolower((unsigned char)p[i]);
    return !strcmp(w, "inf") || !strcmp(w, "nan");
}
