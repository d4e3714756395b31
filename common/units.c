#include "units.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/*
 * Splits "  12.5 GiB " into a finite non-negative decimal number and its unit
 * (trimmed). Only plain decimals are numbers: digits, an optional fraction and
 * an optional exponent ("1.5e3"); no sign, hex, "inf" or "nan".
 */
static int split_number(const char *s, double *num, char *unit, size_t unit_size)
{
    if (!s)
        return -1;
    while (isspace((unsigned char)*s))
        s++;
    const char *p = s;
    int digits = 0;
    while (isdigit((unsigned char)*p)) {
        p++;
        digits++;
    }
    if (*p == '.') {
        p++;
        while (isdigit((unsigned char)*p)) {
            p++;
            digits++;
        }
    }
    if (!digits)
        return -1;
    if ((*p == 'e' || *p == 'E') &&
        (isdigit((unsigned char)p[1]) ||
         ((p[1] == '-' || p[1] == '+') && isdigit((unsigned char)p[2])))) {
        p += 2;
        while (isdigit((unsigned char)*p))
            p++;
    }
    char numbuf[64];
    if ((size_t)(p - s) >= sizeof numbuf)
        return -1;
    memcpy(numbuf, s, (size_t)(p - s));
    numbuf[p - s] = '\0';
    double v = strtod(numbuf, NULL);
    if (!isfinite(v) || v < 0)
        return -1;
    while (isspace((unsigned char)*p))
        p++;
    size_t n = strlen(p);
    while (n > 0 && isspace((unsigned char)p[n - 1]))
        n--;
    if (n >= unit_size)
        return -1;
    memcpy(unit, p, n);
    unit[n] = '\0';
    *num = v;
    return 0;
}

struct unit_def {
    const char *name;
    double factor;
};

static int lookup(const struct unit_def *defs, const char *unit, double *factor)
{
    for (const struct unit_def *d = defs; d->name; d++) {
        if (!strcmp(d->name, unit)) {
            *factor = d->factor;
            return 0;
        }
    }
    return -1;
}

hx_status hx_units_parse_bytes(const char *s, double *out, hx_err *err)
{
    static const struct unit_def defs[] = {
        {"", 1},      {"B", 1},        {"kB", 1e3},     {"KB", 1e3},     {"MB", 1e6},
        {"GB", 1e9},  {"TB", 1e12},    {"KiB", 1024.0}, {"MiB", 1048576.0},
        {"GiB", 1073741824.0},         {"TiB", 1099511627776.0},         {NULL, 0}};
    double v, f;
    char unit[32];
    if (split_number(s, &v, unit, sizeof unit) || lookup(defs, unit, &f))
        return hx_err_set(err, HX_EINVAL,
                          "'%s' is not a size; expected a number with B, KB, MB, GB, TB, "
                          "KiB, MiB, GiB or TiB (e.g. 80GiB)",
                          s ? s : "");
    *out = v * f;
    return HX_OK;
}

hx_status hx_units_parse_bandwidth(const char *s, double *out, hx_err *err)
{
    /* factors to bytes per second */
    static const struct unit_def defs[] = {
        {"b/s", 1 / 8.0},   {"bps", 1 / 8.0},    {"Kb/s", 1e3 / 8},  {"kb/s", 1e3 / 8},
        {"Kbps", 1e3 / 8},  {"Mb/s", 1e6 / 8},   {"Mbps", 1e6 / 8},  {"Mbit/s", 1e6 / 8},
        {"Gb/s", 1e9 / 8},  {"Gbps", 1e9 / 8},   {"Gbit/s", 1e9 / 8}, {"Tb/s", 1e12 / 8},
        {"Tbps", 1e12 / 8}, {"Tbit/s", 1e12 / 8}, {"B/s", 1},         {"KB/s", 1e3},
        {"kB/s", 1e3},      {"MB/s", 1e6},       {"GB/s", 1e9},      {"GBps", 1e9},
        {"TB/s", 1e12},     {"TBps", 1e12},      {"KiB/s", 1024.0},  {"MiB/s", 1048576.0},
        {"GiB/s", 1073741824.0},                 {NULL, 0}};
    double v, f;
    char unit[32];
    if (split_number(s, &v, unit, sizeof unit) || lookup(defs, unit, &f))
        return hx_err_set(err, HX_EINVAL,
                          "'%s' is not a bandwidth; expected a number with Gb/s, Mb/s, "
                          "Tb/s (bits) or GB/s, MB/s, TB/s (bytes) (e.g. 400Gb/s, 25GB/s)",
                          s ? s : "");
    *out = v * f;
    return HX_OK;
}

hx_status hx_units_parse_time(const char *s, double *out, hx_err *err)
{
    static const struct unit_def defs[] = {
        {"", 1},       {"s", 1},       {"sec", 1},       {"ms", 1e-3}, {"us", 1e-6},
        {"\xc2\xb5s", 1e-6},           {"ns", 1e-9},     {"min", 60},  {"h", 3600},
        {NULL, 0}};
    double v, f;
    char unit[32];
    if (split_number(s, &v, unit, sizeof unit) || lookup(defs, unit, &f))
        return hx_err_set(err, HX_EINVAL,
                          "'%s' is not a duration; expected a number with ns, us, ms, s or "
                          "min (e.g. 15us, 2ms)",
                          s ? s : "");
    *out = v * f;
    return HX_OK;
}

hx_status hx_units_parse_price(const char *s, double *out, hx_err *err)
{
    char buf[64];
    const char *p = s ? s : "";
    while (isspace((unsigned char)*p))
        p++;
    if (*p == '$')
        p++;
    double v;
    char unit[32];
    if (strlen(p) >= sizeof buf || split_number(p, &v, unit, sizeof unit) ||
        !(unit[0] == '\0' || !strcmp(unit, "/h") || !strcmp(unit, "/hr") ||
          !strcmp(unit, "/hour")))
        return hx_err_set(err, HX_EINVAL,
                          "'%s' is not a price; expected US dollars per hour such as 1.56 or "
                          "$1.56/h",
                          s ? s : "");
    *out = v;
    return HX_OK;
}

hx_status hx_units_parse_flops(const char *s, double *out, hx_err *err)
{
    static const struct unit_def defs[] = {
        {"", 1e12},          {"TFLOPS", 1e12},    {"TFLOP/s", 1e12}, {"PFLOPS", 1e15},
        {"PFLOP/s", 1e15},   {"GFLOPS", 1e9},     {"GFLOP/s", 1e9},  {"FLOP/s", 1},
        {"FLOPS", 1},        {NULL, 0}};
    double v, f;
    char unit[32];
    if (split_number(s, &v, unit, sizeof unit) || lookup(defs, unit, &f))
        return hx_err_set(err, HX_EINVAL,
                          "'%s' is not a compute rate; expected TFLOP/s as a number (e.g. "
                          "989) or with a unit (989TFLOPS, 1.2PFLOP/s)",
                          s ? s : "");
    *out = v * f;
    return HX_OK;
}

static const char *fmt_scaled(double v, const double *steps, const char *const *names, int n,
                              char *buf, size_t size)
{
    int i = 0;
    while (i + 1 < n && fabs(v) >= steps[i + 1])
        i++;
    double x = v / steps[i];
    if (x == 0 || fabs(x) >= 100)
        snprintf(buf, size, "%.0f %s", x, names[i]);
    else if (fabs(x) >= 10)
        snprintf(buf, size, "%.1f %s", x, names[i]);
    else
        snprintf(buf, size, "%.2f %s", x, names[i]);
    /* drop a trailing ".0"/".00" for tidy output: "80.00 GiB" -> "80 GiB" */
    char *dot = strchr(buf, '.');
    if (dot) {
        char *sp = strchr(dot, ' ');
        char *q = sp;
        while (q > dot + 1 && q[-1] == '0')
            q--;
        if (q == dot + 1)
            q = dot;
        if (q != sp)
            memmove(q, sp, strlen(sp) + 1);
    }
    return buf;
}

const char *hx_units_fmt_bytes(double bytes, char *buf, size_t size)
{
    static const double steps[] = {1, 1024.0, 1048576.0, 1073741824.0, 1099511627776.0,
                                   1125899906842624.0};
    static const char *const names[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    return fmt_scaled(bytes, steps, names, 6, buf, size);
}

const char *hx_units_fmt_bandwidth(double bytes_per_s, char *buf, size_t size)
{
    static const double steps[] = {1, 1e3, 1e6, 1e9, 1e12};
    static const char *const names[] = {"b/s", "Kb/s", "Mb/s", "Gb/s", "Tb/s"};
    return fmt_scaled(bytes_per_s * 8, steps, names, 5, buf, size);
}

const char *hx_units_fmt_byte_rate(double bytes_per_s, char *buf, size_t size)
{
    static const double steps[] = {1, 1e3, 1e6, 1e9, 1e12};
    static const char *const names[] = {"B/s", "KB/s", "MB/s", "GB/s", "TB/s"};
    return fmt_scaled(bytes_per_s, steps, names, 5, buf, size);
}

const char *hx_units_fmt_number(double x, char *buf, size_t size)
{
    if (fabs(x) >= 100 || x == 0)
        snprintf(buf, size, "%.0f", x);
    else if (fabs(x) >= 10)
        snprintf(buf, size, "%.1f", x);
    else
        snprintf(buf, size, "%.3g", x);
    return buf;
}

const char *hx_units_fmt_time(double s, char *buf, size_t size)
{
    static const double steps[] = {1e-9, 1e-6, 1e-3, 1};
    static const char *const names[] = {"ns", "us", "ms", "s"};
    return fmt_scaled(s, steps, names, 4, buf, size);
}

const char *hx_units_fmt_flops(double f, char *buf, size_t size)
{
    static const double steps[] = {1, 1e9, 1e12, 1e15, 1e18};
    static const char *const names[] = {"FLOP/s", "GFLOP/s", "TFLOP/s", "PFLOP/s", "EFLOP/s"};
    return fmt_scaled(f, steps, names, 5, buf, size);
}

const char *hx_units_fmt_count(double n, char *buf, size_t size)
{
    static const double steps[] = {1, 1e3, 1e6, 1e9, 1e12};
    static const char *const names[] = {"", "K", "M", "B", "T"};
    fmt_scaled(n, steps, names, 5, buf, size);
    size_t len = strlen(buf);
    if (len > 0 && buf[len - 1] == ' ')
        buf[len - 1] = '\0';
    return buf;
}
