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

/* ------------------------------------------------------------------------- */
/* Azure CSV                                                                  */

static const char *const azure_cols[3] = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"};

static int is_blank_char(char ch)
{
    return ch == ' ' || ch == '\t';
}

static hx_status push_field(ctx *c, const char *s, size_t off)
{
    if (c->nfields == c->fields_cap) {
        size_t ncap = c->fields_cap ? c->fields_cap * 2 : 8;
        csv_field *f = realloc(c->fields, ncap * sizeof *f);
        if (!f)
            return HX_ENOMEM;
        c->fields = f;
        c->fields_cap = ncap;
    }
    c->fields[c->nfields].s = s;
    c->fields[c->nfields].off = off;
    c->nfields++;
    return HX_OK;
}

/*
 * Splits the line s[0..n) into c->fields: separated by ',', optionally
 * "quoted" with "" for a quote inside, blanks around each value trimmed.
 * Returns HX_EPARSE after reporting a malformed line, HX_ENOMEM.
 */
static hx_status csv_split(ctx *c, long line, const char *s, size_t n)
{
    /* The fields with their NULs never take more than the line plus one byte. */
    if (c->fbuf_cap < n + 1) {
        char *b = realloc(c->fbuf, n + 1);
        if (!b)
            return HX_ENOMEM;
        c->fbuf = b;
        c->fbuf_cap = n + 1;
    }
    c->nfields = 0;
    char *o = c->fbuf;
    size_t i = 0;
    for (;;) {
        while (i < n && is_blank_char(s[i]))
            i++;
        size_t start = i;
        char *fs = o;
        if (i < n && s[i] == '"') {
            for (i++;; i++) {
                if (i >= n) {
                    problem(c, line, char_col(s, start), NULL,
                            "unterminated quoted field; expected a closing '\"' on the same "
                            "line");
                    return HX_EPARSE;
                }
                if (s[i] == '"') {
                    if (i + 1 < n && s[i + 1] == '"') {
                        *o++ = '"';
                        i++;
                        continue;
                    }
                    i++;
                    break;
                }
                *o++ = s[i];
            }
            while (i < n && is_blank_char(s[i]))
                i++;
            if (i < n && s[i] != ',') {
                char eb[64];
                problem(c, line, char_col(s, i), NULL,
                        "unexpected '%s' after a quoted field; expected ',' or the end of the "
                        "line",
                        echo(s + i, n - i, eb, sizeof eb));
                return HX_EPARSE;
            }
        } else {
            while (i < n && s[i] != ',')
                *o++ = s[i++];
        }
        while (o > fs && is_blank_char(o[-1]))
            o--;
        *o++ = '\0';
        while (is_blank_char(*fs))
            fs++;
        hx_status st = push_field(c, fs, start);
        if (st != HX_OK)
            return st;
        if (i < n && s[i] == ',') {
            i++;
            continue;
        }
        return HX_OK;
    }
}

/* Finds the three columns in the header line; reports what is missing. */
static hx_status azure_header(ctx *c, long line, const char *s, size_t n, size_t idx[3],
                              size_t *ncols)
{
    hx_status st = csv_split(c, line, s, n);
    if (st == HX_EPARSE) {
        c->stop = 1;
        return HX_OK;
    }
    if (st != HX_OK)
        return st;
    *ncols = c->nfields;
    for (int k = 0; k < 3; k++) {
        const char *want = azure_cols[k];
        size_t found = SIZE_MAX, fold = SIZE_MAX;
        for (size_t j = 0; j < c->nfields; j++) {
            const char *have = c->fields[j].s;
            if (!strcmp(have, want)) {
                if (found == SIZE_MAX) {
                    found = j;
                } else {
                    problem(c, line, char_col(s, c->fields[j].off), NULL,
                            "column '%s' appears twice (columns %zu and %zu); expected it once",
                            want, found + 1, j + 1);
                    c->stop = 1;
                }
                continue;
            }
            size_t a = 0;
            while (have[a] && want[a] &&
                   tolower((unsigned char)have[a]) == tolower((unsigned char)want[a]))
                a++;
            if (!have[a] && !want[a] && fold == SIZE_MAX)
                fold = j;
        }
        if (found != SIZE_MAX) {
            idx[k] = found;
        } else if (fold != SIZE_MAX) {
            problem(c, line, 0, NULL,
                    "missing column '%s'; expected " AZURE_HEADER
                    " (column %zu is '%s'; names are case-sensitive)",
                    want, fold + 1, c->fields[fold].s);
            c->stop = 1;
        } else {
            problem(c, line, 0, NULL, "missing column '%s'; expected " AZURE_HEADER, want);
            c->stop = 1;
        }
    }
    return HX_OK;
}

static const char *kind_name(enum ts_kind k)
{
    return k == TS_DATE ? "a date-time" : "a number of seconds";
}

/* The TIMESTAMP of a CSV row; reports and returns 0 when it is bad. */
static int csv_timestamp(ctx *c, long line, int col, const char *s, int64_t *sec, double *frac)
{
    const char *F = azure_cols[0];
    char eb[64], why[128];
    enum ts_kind kind;
    if (!*s) {
        problem(c, line, col, F,
                "is empty; expected a date-time like 2023-11-16 18:15:46.6805900 or a number "
                "of seconds");
        return 0;
    }
    echo(s, strlen(s), eb, sizeof eb);
    if (looks_like_date(s)) {
        if (!parse_datetime(s, sec, frac, why, sizeof why)) {
            problem(c, line, col, F,
                    "malformed date '%s': %s; expected YYYY-MM-DD HH:MM:SS[.fffffff]", eb, why);
            return 0;
        }
        kind = TS_DATE;
    } else {
        if (names_non_finite(s)) {
            problem(c, line, col, F, "'%s' is not finite; expected seconds >= 0", eb);
            return 0;
        }
        char *end;
        double v = strtod(s, &end);
        if (end == s || *end || strpbrk(s, "xX")) {
            problem(c, line, col, F,
                    "'%s' is neither a date-time (YYYY-MM-DD HH:MM:SS[.fffffff]) nor a number "
                    "of seconds",
                    eb);
            return 0;
        }
        if (v < 0) {
            problem(c, line, col, F, "'%s' is negative; expected seconds >= 0", eb);
            return 0;
        }
        if (!isfinite(v) || v > MAX_TIMESTAMP_S) {
            problem(c, line, col, F, "'%s' is too large; expected at most %.0f seconds", eb,
                    MAX_TIMESTAMP_S);
            return 0;
        }
        double w = floor(v);
        *sec = (int64_t)w;
        *frac = v - w;
        kind = TS_SECONDS;
    }
    if (c->ts_kind == TS_NONE) {
        c->ts_kind = kind;
        c->ts_kind_line = line;
    } else if (kind != c->ts_kind) {
        problem(c, line, col, F, "'%s' is %s but line %ld has %s; use one kind throughout", eb,
                kind_name(kind), c->ts_kind_line, kind_name(c->ts_kind));
        return 0;
    }
    return 1;
}

/* A token count of a CSV row; reports and returns 0 when it is bad. */
static int csv_count(ctx *c, long line, int col, const char *field, const char *s, int *out)
{
    char eb[64];
    if (!*s) {
        problem(c, line, col, field, "is empty; expected a positive whole number");
        return 0;
    }
    switch (parse_count_str(s, out)) {
    case COUNT_OK:
        return 1;
    case COUNT_BIG:
        problem(c, line, col, field, "'%s' is too large; at most %d tokens",
                echo(s, strlen(s), eb, sizeof eb), HX_TRACE_MAX_TOKENS);
        return 0;
    case COUNT_BAD:
    default:
        problem(c, line, col, field, "'%s' is not a positive whole number",
                echo(s, strlen(s), eb, sizeof eb));
        return 0;
    }
}

static hx_status azure_row(ctx *c, long line, const char *s, size_t n, const size_t idx[3],
                           size_t ncols)
{
    hx_status st = csv_split(c, line, s, n);
    if (st == HX_EPARSE)
        return HX_OK;
    if (st != HX_OK)
        return st;
    if (c->nfields != ncols) {
        problem(c, line, 0, NULL, "found %zu field%s; the header has %zu", c->nfields,
                c->nfields == 1 ? "" : "s", ncols);
        return HX_OK;
    }
    const csv_field *ts = &c->fields[idx[0]], *in = &c->fields[idx[1]], *out = &c->fields[idx[2]];
    int64_t sec = 0;
    double frac = 0;
    int input = 0, output = 0;
    int ok = csv_timestamp(c, line, char_col(s, ts->off), ts->s, &sec, &frac);
    ok &= csv_count(c, line, char_col(s, in->off), azure_cols[1], in->s, &input);
    ok &= csv_count(c, line, char_col(s, out->off), azure_cols[2], out->s, &output);
    return ok ? add_req(c, line, sec, frac, input, output) : HX_OK;
}

/* ------------------------------------------------------------------------- */
/* Mooncake JSONL                                                             */

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
    default:
        return "null";
    }
}

/* A JSON value written back compactly for a message (cut when long). */
static const char *json_echo(const json_t *v, char *buf, size_t size)
{
    char *d = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(15));
    if (!d) {
        snprintf(buf, size, "%s", json_kind(v));
        return buf;
    }
    echo(d, strlen(d), buf, size);
    free(d);
    return buf;
}

static int json_timestamp(ctx *c, long line, json_t *obj, int64_t *sec, double *frac)
{
    const char *F = "timestamp";
    char eb[64];
    json_t *v = json_object_get(obj, F);
    if (!v) {
        problem(c, line, 0, NULL, "missing key '%s'; each line needs " MOONCAKE_KEYS, F);
        return 0;
    }
    if (!json_is_number(v)) {
        problem(c, line, 0, F, "'%s' is %s; expected milliseconds (a number >= 0)",
                json_echo(v, eb, sizeof eb), json_kind(v));
        return 0;
    }
    double ms = json_number_value(v);
    if (!isfinite(ms)) {
        problem(c, line, 0, F, "'%s' is not finite; expected milliseconds >= 0",
                json_echo(v, eb, sizeof eb));
        return 0;
    }
    if (ms < 0) {
        problem(c, line, 0, F, "'%s' is negative; expected milliseconds >= 0",
                json_echo(v, eb, sizeof eb));
        return 0;
    }
    if (ms > MAX_TIMESTAMP_S * 1000) {
        problem(c, line, 0, F, "'%s' is too large; expected at most %.0f milliseconds",
                json_echo(v, eb, sizeof eb), MAX_TIMESTAMP_S * 1000);
        return 0;
    }
    if (json_is_integer(v)) {
        json_int_t k = json_integer_value(v);
        *sec = (int64_t)(k / 1000);
        *frac = (double)(k % 1000) / 1000.0;
    } else {
        double w = floor(ms / 1000.0);
        *sec = (int64_t)w;
        *frac = (ms - w * 1000.0) / 1000.0;
        if (*frac < 0)
            *frac = 0;
        if (*frac >= 1) /* rounding at the edge of a second */
            *frac = nextafter(1.0, 0.0);
    }
    return 1;
}

static int json_count(ctx *c, long line, json_t *obj, const char *key, int *out)
{
    char eb[64];
    json_t *v = json_object_get(obj, key);
    if (!v) {
        problem(c, line, 0, NULL, "missing key '%s'; each line needs " MOONCAKE_KEYS, key);
        return 0;
    }
    if (!json_is_number(v)) {
        problem(c, line, 0, key, "'%s' is %s; expected a positive whole number",
                json_echo(v, eb, sizeof eb), json_kind(v));
        return 0;
    }
    double x = json_number_value(v);
    int whole = json_is_integer(v) || (isfinite(x) && x == floor(x));
    if (!whole || x < 1) {
        problem(c, line, 0, key, "'%s' is not a positive whole number",
                json_echo(v, eb, sizeof eb));
        return 0;
    }
    if (json_is_integer(v) ? json_integer_value(v) > HX_TRACE_MAX_TOKENS
                           : x > HX_TRACE_MAX_TOKENS) {
        problem(c, line, 0, key, "'%s' is too large; at most %d tokens",
                json_echo(v, eb, sizeof eb), HX_TRACE_MAX_TOKENS);
        return 0;
    }
    *out = json_is_integer(v) ? (int)json_integer_value(v) : (int)x;
    return 1;
}

/* jansson's message with "end of file" read as "end of line": each line is its own text. */
static void json_error_text(const char *in, char *buf, size_t size)
{
    static const char eof[] = "end of file";
    size_t o = 0;
    while (*in && o + 1 < size) {
        if (!strncmp(in, eof, sizeof eof - 1)) {
            o += (size_t)snprintf(buf + o, size - o, "end of line");
            in += sizeof eof - 1;
            if (o >= size)
                o = size - 1;
            continue;
        }
        buf[o++] = *in++;
    }
    buf[o] = '\0';
}

static hx_status mooncake_row(ctx *c, long line, const char *s, size_t n)
{
    json_error_t je;
    json_t *v = json_loadb(s, n, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!v) {
        char text[256];
        json_error_text(je.text, text, sizeof text);
        problem(c, line, je.column > 0 ? je.column : 0, NULL, "invalid JSON: %s", text);
        return HX_OK;
    }
    hx_status st = HX_OK;
    if (!json_is_object(v)) {
        problem(c, line, 0, NULL, "the line is %s; expected a JSON object with " MOONCAKE_KEYS,
                json_kind(v));
        goto out_decref;
    }
    int64_t sec = 0;
    double frac = 0;
    int input = 0, output = 0;
    int ok = json_timestamp(c, line, v, &sec, &frac);
    ok &= json_count(c, line, v, "input_length", &input);
    ok &= json_count(c, line, v, "output_length", &output);
    if (ok)
        st = add_req(c, line, sec, frac, input, output);
out_decref:
    json_decref(v);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Loading                                                                    */

static int is_blank_line(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!is_blank_char(s[i]) && s[i] != '\r')
            return 0;
    return 1;
}

/* Stable sort by arrival: bottom-up merge sort, a no-op for sorted input. */
static hx_status sort_by_arrival(hx_trace_req *a, size_t n)
{
    size_t i;
    for (i = 1; i < n; i++)
        if (a[i].arrival_s < a[i - 1].arrival_s)
            break;
    if (i >= n)
        return HX_OK;
    hx_trace_req *tmp = malloc(n * sizeof *tmp);
    if (!tmp)
        return HX_ENOMEM;
    hx_trace_req *src = a, *dst = tmp;
    for (size_t w = 1; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n;
            size_t hi = lo + 2 * w < n ? lo + 2 * w : n;
            size_t l = lo, r = mid, o = lo;
            while (l < mid && r < hi)
                dst[o++] = src[r].arrival_s < src[l].arrival_s ? src[r++] : src[l++];
            while (l < mid)
                dst[o++] = src[l++];
            while (r < hi)
                dst[o++] = src[r++];
        }
        hx_trace_req *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof *a);
    free(tmp);
    return HX_OK;
}

hx_status hx_trace_load_string(const char *text, size_t len, const char *name, hx_trace **out,
                               hx_diags *diags)
{
    if (!out || (!text && len))
        return HX_EINVAL;
    *out = NULL;
    if (!text)
        text = "";
    hx_diags local;
    hx_diags_init(&local);
    ctx c;
    memset(&c, 0, sizeof c);
    c.file = name ? name : "trace";
    c.diags = diags ? diags : &local;
    hx_status st = HX_OK;
    hx_trace *t = NULL;

    int bad_line = 0, bad_col = 0;
    size_t bad_off = 0;
    if (!hx_file_is_text(text, len, &bad_line, &bad_col, &bad_off)) {
        problem(&c, bad_line, bad_col, NULL,
                "not a text file: byte 0x%02x at offset %zu is %s; expected a Mooncake JSONL "
                "or Azure CSV trace",
                (unsigned char)text[bad_off], bad_off,
                text[bad_off] == 0 ? "a NUL" : "not valid UTF-8");
        goto out_report;
    }

    const char *p = text, *end = text + len;
    if (len >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) /* a UTF-8 byte order mark */
        p += 3;

    /* The format, from the first non-blank line. */
    int mooncake = 0;
    for (const char *q = p; q < end;) {
        const char *nl = memchr(q, '\n', (size_t)(end - q));
        size_t n = nl ? (size_t)(nl - q) : (size_t)(end - q);
        if (!is_blank_line(q, n)) {
            size_t k = 0;
            while (k < n && is_blank_char(q[k]))
                k++;
            mooncake = q[k] == '{';
            break;
        }
        q += n + (nl != NULL);
    }

    /* Room for one request per line up front (at most the limit); grows if short. */
    size_t lines = 1;
    for (const char *q = p; q < end && (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++)
        lines++;
    c.cap = lines < HX_TRACE_MAX_REQUESTS ? lines : HX_TRACE_MAX_REQUESTS;
    c.reqs = malloc(c.cap * sizeof *c.reqs);
    if (!c.reqs) {
        st = HX_ENOMEM;
        goto out_free;
    }

    long line = 0, header_line = 0;
    size_t idx[3] = {0, 0, 0}, ncols = 0;
    while (p < end && !c.stop) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        const char *s = p;
        p += n + (nl != NULL);
        line++;
        if (n > 0 && s[n - 1] == '\r')
            n--;
        if (is_blank_line(s, n))
            continue;
        if (mooncake) {
            st = mooncake_row(&c, line, s, n);
        } else if (!header_line) {
            header_line = line;
            st = azure_header(&c, line, s, n, idx, &ncols);
        } else {
            st = azure_row(&c, line, s, n, idx, ncols);
        }
        if (st != HX_OK)
            goto out_free;
    }
    if (c.problems == 0 && c.n == 0) {
        if (header_line)
            problem(&c, header_line, 0, NULL,
                    "no requests: the header is not followed by any rows");
        else
            problem(&c, 1, 0, NULL,
                    "no requests: the trace is empty; expected Mooncake JSONL lines or an "
                    "Azure CSV with the header " AZURE_HEADER);
    }
    if (c.problems > 0)
        goto out_report;

    st = sort_by_arrival(c.reqs, c.n);
    if (st != HX_OK)
        goto out_free;
    double first = c.reqs[0].arrival_s;
    for (size_t i = 0; i < c.n; i++)
        c.reqs[i].arrival_s -= first;
    if (c.n < c.cap) {
        hx_trace_req *r = realloc(c.reqs, c.n * sizeof *r);
        if (r)
            c.reqs = r;
    }
    t = malloc(sizeof *t);
    if (!t) {
        st = HX_ENOMEM;
        goto out_free;
    }
    t->reqs = c.reqs;
    t->n = c.n;
    t->format = mooncake ? "mooncake" : "azure";
    c.reqs = NULL;
    *out = t;
    goto out_free;

out_report:
    if (c.problems > HX_TRACE_MAX_DIAGS)
        hx_diags_add(c.diags, c.file, 0, 0, NULL, "... and %zu more problem%s",
                     c.problems - HX_TRACE_MAX_DIAGS,
                     c.problems - HX_TRACE_MAX_DIAGS == 1 ? "" : "s");
    st = HX_EPARSE;
out_free:
    if (st == HX_ENOMEM)
        hx_diags_add(c.diags, c.file, 0, 0, NULL, "out of memory reading the trace");
    free(c.reqs);
    free(c.fbuf);
    free(c.fields);
    hx_diags_release(&local);
    return st;
}

hx_status hx_trace_load(const char *path, hx_trace **out, hx_diags *diags)
{
    if (!path || !out)
        return HX_EINVAL;
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    hx_err err = {0};
    hx_status st = hx_file_read_all(path, "trace", HX_TRACE_MAX_BYTES, &text, &len, &err);
    if (st != HX_OK) {
        if (diags)
            hx_diags_add(diags, NULL, 0, 0, NULL, "%s", err.msg);
        return st;
    }
    st = hx_trace_load_string(text, len, path, out, diags);
    free(text);
    return st;
}

void hx_trace_free(hx_trace *t)
{
    if (!t)
        return;
    free(t->reqs);
    free(t);
}

void hx_trace_stats(const hx_trace *t, double *mean_input, double *mean_output, double *rate_rps)
{
    double in = 0, outp = 0, rate = 0;
    if (t && t->n > 0 && t->reqs) {
        for (size_t i = 0; i < t->n; i++) {
            in += t->reqs[i].input_tokens;
            outp += t->reqs[i].output_tokens;
        }
        in /= (double)t->n;
        outp /= (double)t->n;
        if (t->n >= 2) {
            double span = t->reqs[t->n - 1].arrival_s - t->reqs[0].arrival_s;
            if (span > 0)
                rate = (double)(t->n - 1) / span;
        }
    }
    if (mean_input)
        *mean_input = in;
    if (mean_output)
        *mean_output = outp;
    if (rate_rps)
        *rate_rps = rate;
}
