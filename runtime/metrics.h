/*
 * metrics.h - a small thread-safe registry of Prometheus metrics: counters,
 * gauges and histograms with fixed buckets, each with up to
 * HX_METRICS_MAX_LABELS label pairs, rendered in the Prometheus text
 * exposition format 0.0.4.
 *
 * A metric *family* is a name with its help text, type, label names and (for
 * histograms) bucket bounds; a *series* is one family with one set of label
 * values, and is what a handle (hx_metric *) stands for:
 *
 *     hx_metrics *reg = hx_metrics_new();
 *     hx_metric *ok = hx_metrics_counter(reg, "hexflow_requests_total",
 *                                        "Requests by outcome.", "status", "ok", NULL);
 *     hx_metric *ttft = hx_metrics_histogram(reg, "hexflow_ttft_seconds",
 *                                            "Time to first token.", NULL, 0, NULL);
 *     hx_metric *q = hx_metrics_gauge(reg, "hexflow_queue_depth", "Queued requests.",
 *                                     "group", "g0", NULL);
 *     hx_metrics_counter_inc(ok);
 *     hx_metrics_histogram_observe(ttft, 0.42);
 *     hx_metrics_gauge_set(q, 3);
 *     char *text = hx_metrics_render(reg);   // malloc'ed; free()
 *
 * Registering is get-or-create: the same name and label values give the same
 * handle, so a caller may register lazily from any thread. Registering takes
 * the registry's mutex; updating a handle (add, set, observe) takes no lock
 * (C11 atomics: one compare-and-swap for a double, one fetch-add per
 * histogram bucket), so handles are meant to be looked up once and kept.
 *
 * Rules a registration must follow (else NULL, or HX_EINVAL from
 * hx_metrics_register naming the metric):
 *   - name matches [a-zA-Z_:][a-zA-Z0-9_:]*; label names [a-zA-Z_][a-zA-Z0-9_]*,
 *     not starting with "__", and not "le" on a histogram; label values are
 *     any NUL-terminated bytes (escaped when rendered);
 *   - all series of one family have the same type, the same label names in
 *     the same order and (histograms) the same bucket bounds; the help text
 *     of the first registration is kept;
 *   - bucket bounds are finite and strictly increasing, at most
 *     HX_METRICS_MAX_BUCKETS of them; "+Inf" is implied.
 *
 * Rendering lists families in registration order, series in registration
 * order within a family:
 *
 *     # HELP hexflow_ttft_seconds Time to first token.
 *     # TYPE hexflow_ttft_seconds histogram
 *     hexflow_ttft_seconds_bucket{le="0.005"} 0
 *     ...
 *     hexflow_ttft_seconds_bucket{le="+Inf"} 1
 *     hexflow_ttft_seconds_sum 0.42
 *     hexflow_ttft_seconds_count 1
 *
 * Histogram buckets are rendered cumulative; _count is the +Inf bucket. A
 * render taken while other threads observe is not an atomic snapshot: _sum
 * may lag or lead the buckets by the observations in flight (Prometheus
 * accepts that), but buckets are always cumulative and _count always equals
 * the +Inf bucket.
 *
 * Lifetime: handles belong to the registry and stay valid until
 * hx_metrics_free; there is no unregistering (a series that goes away, e.g.
 * a worker that left, should be set to 0 or left as it is). Every update
 * function accepts NULL and does nothing, so a failed registration never
 * crashes the observe path. Thread safety: every function may be called from
 * any number of threads at once, except hx_metrics_free.
 */
#ifndef HX_METRICS_H
#define HX_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#define HX_METRICS_MAX_LABELS 4   /* label pairs per series */
#define HX_METRICS_MAX_BUCKETS 64 /* finite bucket bounds per histogram */
#define HX_METRICS_NAME_MAX 200   /* bytes of a metric or label name */

typedef enum hx_metric_type {
    HX_METRIC_COUNTER = 0, /* monotonic; add() ignores negative and NaN amounts */
    HX_METRIC_GAUGE = 1,   /* set() and add() of any sign */
    HX_METRIC_HISTOGRAM = 2
} hx_metric_type;

typedef struct hx_metrics hx_metrics; /* the registry; opaque */
typedef struct hx_metric hx_metric;   /* one series; opaque, owned by its registry */

/*
 * Prometheus' default buckets, in seconds: 0.005, 0.01, 0.025, 0.05, 0.1,
 * 0.25, 0.5, 1, 2.5, 5, 10. What a histogram gets when bounds is NULL.
 */
extern const double hx_metrics_default_buckets[];
#define HX_METRICS_DEFAULT_BUCKETS_N 11

/* A new, empty registry, or NULL when out of memory. Free with hx_metrics_free. */
hx_metrics *hx_metrics_new(void);
/* Frees the registry and all its handles; NULL is a no-op. No other thread may use it then. */
void hx_metrics_free(hx_metrics *m);

/*
 * Gets or creates the series `name`{labels} of type `type`. `labels` is NULL
 * (no labels) or a NULL-terminated array of name, value, name, value, ...
 * (at most HX_METRICS_MAX_LABELS pairs). `help` may be NULL (empty). For a
 * histogram, `bounds` holds n_bounds finite, strictly increasing upper
 * bounds (copied), or is NULL for hx_metrics_default_buckets; ignored for
 * other types. All strings are copied. On success *out is the handle (owned
 * by m). HX_EINVAL naming the metric for a rule broken (see the top of this
 * file), HX_ENOMEM.
 */
hx_status hx_metrics_register(hx_metrics *m, hx_metric_type type, const char *name,
                              const char *help, const char *const *labels,
                              const double *bounds, int n_bounds, hx_metric **out,
                              hx_err *err);

/*
 * Convenience forms of hx_metrics_register: the label pairs follow as
 * arguments, ended by NULL (which the compiler checks). They return the
 * handle, or NULL after logging the reason (a warning) when registration
 * fails; a NULL handle is accepted and ignored by every update function.
 */
hx_metric *hx_metrics_counter(hx_metrics *m, const char *name, const char *help, ...)
    __attribute__((sentinel));
hx_metric *hx_metrics_gauge(hx_metrics *m, const char *name, const char *help, ...)
    __attribute__((sentinel));
hx_metric *hx_metrics_histogram(hx_metrics *m, const char *name, const char *help,
                                const double *bounds, int n_bounds, ...)
    __attribute__((sentinel));

/* Counter (or gauge): adds v; a counter ignores v < 0 and NaN. Lock-free. */
void hx_metrics_counter_add(hx_metric *c, double v);
/* Counter (or gauge): adds 1. */
void hx_metrics_counter_inc(hx_metric *c);
/* Gauge: sets / adds (any sign). Ignored on a counter or histogram handle. */
void hx_metrics_gauge_set(hx_metric *g, double v);
void hx_metrics_gauge_add(hx_metric *g, double v);
/* Histogram: counts v in the first bucket whose bound is >= v (NaN: +Inf only). */
void hx_metrics_histogram_observe(hx_metric *h, double v);

/* Reads, for tests and for callers that derive values: a counter's or gauge's
 * value, a histogram's sum; 0 for NULL. */
double hx_metrics_value(const hx_metric *x);
/* A histogram's observation count; 0 for other types and NULL. */
uint64_t hx_metrics_count(const hx_metric *h);

/*
 * Renders every family in the text exposition format 0.0.4 (content type
 * "text/plain; version=0.0.4"): a malloc'ed, NUL-terminated string the
 * caller frees with free(), "" for an empty registry; NULL when out of
 * memory. Takes the registry mutex (registrations wait; updates do not).
 */
char *hx_metrics_render(const hx_metrics *m);

/*
 * Formats v the way the exposition format writes values: the shortest
 * decimal that reads back as v ("3", "0.25", "1e-06"), "+Inf", "-Inf",
 * "NaN". buf needs 32 bytes; returns buf.
 */
char *hx_metrics_format_value(double v, char buf[32]);

#endif /* HX_METRICS_H */
