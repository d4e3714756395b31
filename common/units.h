/*
 * units.h - quantities as people write them, and back.
 *
 *   bytes:      80GiB  48GB  512 MiB  1.5TB  4096      (bare number = bytes)
 *   bandwidth:  400Gb/s  25GB/s  3.35TB/s  100Gbps  10Gbit/s   (unit required;
 *               lower-case b = bits, upper-case B = bytes; result in bytes/s)
 *   time:       15us  2ms  1.5s  800ns  2min            (bare number = seconds)
 *   price:      1.56  $1.56  $1.56/h  2.10/hr           (US dollars per hour)
 *   flops:      989  989TFLOPS  989 TFLOP/s  1.2PFLOP/s (bare number = TFLOP/s;
 *               result in FLOP/s)
 *
 * Decimal prefixes are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of
 * 1024. Every parser rejects negative, non-finite and trailing-garbage input
 * and, on failure, writes into `err` what was expected.
 */
#ifndef HX_UNITS_H
#define HX_UNITS_H

#include <stddef.h>

#include "status.h"

hx_status hx_units_parse_bytes(const char *s, double *out_bytes, hx_err *err);
hx_status hx_units_parse_bandwidth(const char *s, double *out_bytes_per_s, hx_err *err);
hx_status hx_units_parse_time(const char *s, double *out_s, hx_err *err);
hx_status hx_units_parse_price(const char *s, double *out_usd_per_hour, hx_err *err);
hx_status hx_units_parse_flops(const char *s, double *out_flops_per_s, hx_err *err);

/* Formatting for people; each returns buf. Three significant digits. */
const char *hx_units_fmt_bytes(double bytes, char *buf, size_t size);       /* "80 GiB" */
const char *hx_units_fmt_bandwidth(double bytes_per_s, char *buf, size_t size); /* "400 Gb/s" */
const char *hx_units_fmt_byte_rate(double bytes_per_s, char *buf, size_t size); /* "3.35 TB/s" */
const char *hx_units_fmt_number(double x, char *buf, size_t size);          /* "7910", "0.166" */
const char *hx_units_fmt_time(double s, char *buf, size_t size);            /* "15 us" */
const char *hx_units_fmt_flops(double flops_per_s, char *buf, size_t size); /* "989 TFLOP/s" */
const char *hx_units_fmt_count(double n, char *buf, size_t size);           /* "68.98 B" */

#endif /* HX_UNITS_H */
