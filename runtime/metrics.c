/*
 * metrics.c - the Prometheus metrics registry of metrics.h.
 *
 * Families live in an array guarded by the registry mutex; a family's series
 * form a singly linked list that only grows (under the mutex), so a handle
 * is a stable pointer. Values are doubles kept as their bit patterns in
 * _Atomic uint64_t (compare-and-swap to add); histogram buckets are
 * non-cumulative atomic counts, summed into the cumulative form when
 * rendered. Nothing on the update path locks or allocates.
 */
#include "runtime/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"

const double hx_metrics_default_buckets[HX_METRICS_DEFAULT_BUCKETS_N] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

typedef struct family family;

struct hx_metric {
    family *fam;
    hx_metric *next;
    hx_metric_type type;
    int n_bounds;                /* histogram: finite bounds; buckets has n_bounds + 1 */
    const double *bounds;        /* the family's, immutable */
    char *values[HX_METRICS_MAX_LABELS];
    _Atomic uint64_t value;      /* double bits: counter/gauge value, histogram sum */
    _Atomic uint64_t buckets[];  /* histogram: [n_bounds + 1] counts, last is +Inf */
};

struct family {
    char *name;
    char *help;
    hx_metric_type type;
    int n_labels;
    char *labels[HX_METRICS_MAX_LABELS];
    double *bounds; /* [n_bounds] */
    int n_bounds;
    hx_metric *first, *last;
};

struct hx_metrics {
    pthread_mutex_t mu;
    family **fams; /* [n_fams] in registration order */
    size_t n_fams, cap_fams;
};

/* ---- doubles in atomics --------------------------------------------------- */

static uint64_t d2u(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static double u2d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static void atomic_add_double(_Atomic uint64_t *p, double v)
{
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    uint64_t nw;
    do {
        nw = d2u(u2d(old) + v);
    } while (!atomic_compare_exchange_weak_explicit(p, &old, nw, memory_order_relaxed,
                                                    memory_order_relaxed));
}

/* text is built in hx_buf (common/buf.h) */
typedef hx_buf sbuf;

static void sb_escaped(sbuf *b, const char *s, int quote)
{
    for (; *s; s++) {
        if (*s == '\\')
            hx_buf_puts(b, "\\\\");
        else if (*s == '\n')
            hx_buf_puts(b, "\\n");
        else if (quote && *s == '"')
            hx_buf_puts(b, "\\\"");
        else
            hx_buf_putc(b, *s);
    }
}

/* ---- names ---------------------------------------------------------------- */

static int is_alpha_(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int is_digit(int c) { return c >= '0' && c <= '9'; }

static int valid_metric_name(const char *s)
{
    if (!s || !*s || strlen(s) > HX_METRICS_NAME_MAX || !(is_alpha_(*s) || *s == ':'))
        return 0;
    for (s++; *s; s++)
        if (!(is_alpha_(*s) || is_digit(*s) || *s == ':'))
            return 0;
    return 1;
}

static int valid_label_name(const char *s)
{
    if (!s || !*s || strlen(s) > HX_METRICS_NAME_MAX || !is_alpha_(*s))
        return 0;
    if (s[0] == '_' && s[1] == '_')
        return 0;
    for (s++; *s; s++)
        if (!(is_alpha_(*s) || is_digit(*s)))
            return 0;
    return 1;
}

static const char *type_name(hx_metric_type t)
{
    switch (t) {
    case HX_METRIC_COUNTER: return "counter";
    case HX_METRIC_GAUGE: return "gauge";
    case HX_METRIC_HISTOGRAM: return "histogram";
    }
    return "untyped";
}

/* ---- registry ------------------------------------------------------------- */

hx_metrics *hx_metrics_new(void)
{
    hx_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    if (pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return NULL;
    }
    return m;
}

static void series_free(hx_metric *s)
{
    for (int i = 0; i < HX_METRICS_MAX_LABELS; i++)
        free(s->values[i]);
    free(s);
}

static void family_free(family *f)
{
    if (!f)
        return;
    hx_metric *s = f->first;
    while (s) {
        hx_metric *next = s->next;
        series_free(s);
        s = next;
    }
    for (int i = 0; i < HX_METRICS_MAX_LABELS; i++)
        free(f->labels[i]);
    free(f->bounds);
    free(f->help);
    free(f->name);
    free(f);
}

void hx_metrics_free(hx_metrics *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n_fams; i++)
        family_free(m->fams[i]);
    free(m->fams);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

/* Checks the arguments that do not depend on the registry's state. */
static hx_status check_args(hx_metric_type type, const char *name, const char *const *labels,
                            const double *bounds, int n_bounds, int *n_labels, hx_err *err)
{
    if (type != HX_METRIC_COUNTER && type != HX_METRIC_GAUGE && type != HX_METRIC_HISTOGRAM)
        return hx_err_set(err, HX_EINVAL, "metric '%s': unknown type %d", name ? name : "?",
                          (int)type);
    if (!valid_metric_name(name))
        return hx_err_set(err, HX_EINVAL,
                          "metric name '%s' is not valid: expected [a-zA-Z_:][a-zA-Z0-9_:]*",
                          name ? name : "(null)");
    int n = 0;
    for (; labels && labels[2 * n]; n++) {
        if (n == HX_METRICS_MAX_LABELS)
            return hx_err_set(err, HX_EINVAL, "metric '%s': more than %d labels", name,
                              HX_METRICS_MAX_LABELS);
        const char *ln = labels[2 * n];
        if (!valid_label_name(ln))
            return hx_err_set(err, HX_EINVAL,
                              "metric '%s': label name '%s' is not valid: expected "
                              "[a-zA-Z_][a-zA-Z0-9_]* not starting with __",
                              name, ln);
        if (!labels[2 * n + 1])
            return hx_err_set(err, HX_EINVAL, "metric '%s': label '%s' has no value", name, ln);
        if (type == HX_METRIC_HISTOGRAM && strcmp(ln, "le") == 0)
            return hx_err_set(err, HX_EINVAL, "histogram '%s': label name 'le' is reserved",
                              name);
        for (int j = 0; j < n; j++)
            if (strcmp(labels[2 * j], ln) == 0)
                return hx_err_set(err, HX_EINVAL, "metric '%s': label '%s' given twice", name,
                                  ln);
    }
    *n_labels = n;
    if (type == HX_METRIC_HISTOGRAM && bounds) {
        if (n_bounds < 1 || n_bounds > HX_METRICS_MAX_BUCKETS)
            return hx_err_set(err, HX_EINVAL, "histogram '%s': %d bucket bounds; expected 1 to %d",
                              name, n_bounds, HX_METRICS_MAX_BUCKETS);
        for (int i = 0; i < n_bounds; i++) {
            if (!isfinite(bounds[i]))
                return hx_err_set(err, HX_EINVAL,
                                  "histogram '%s': bucket bound %d is not finite (+Inf is implied)",
                                  name, i);
            if (i > 0 && !(bounds[i] > bounds[i - 1]))
                return hx_err_set(err, HX_EINVAL,
                                  "histogram '%s': bucket bounds are not strictly increasing at %d",
                                  name, i);
        }
    }
    return HX_OK;
}

static family *find_family(const hx_metrics *m, const char *name)
{
    for (size_t i = 0; i < m->n_fams; i++)
        if (strcmp(m->fams[i]->name, name) == 0)
            return m->fams[i];
    return NULL;
}

static family *family_new(hx_metric_type type, const char *name, const char *help,
                          const char *const *labels, int n_labels, const double *bounds,
                          int n_bounds)
{
    family *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->type = type;
    f->n_labels = n_labels;
    f->name = strdup(name);
    f->help = strdup(help ? help : "");
    if (!f->name || !f->help)
        goto out_free;
    for (int i = 0; i < n_labels; i++)
        if (!(f->labels[i] = strdup(labels[2 * i])))
            goto out_free;
    if (type == HX_METRIC_HISTOGRAM) {
        f->n_bounds = n_bounds;
        f->bounds = malloc(sizeof *f->bounds * (size_t)n_bounds);
        if (!f->bounds)
            goto out_free;
        memcpy(f->bounds, bounds, sizeof *f->bounds * (size_t)n_bounds);
    }
    return f;
out_free:
    family_free(f);
    return NULL;
}

hx_status hx_metrics_register(hx_metrics *m, hx_metric_type type, const char *name,
                              const char *help, const char *const *labels,
                              const double *bounds, int n_bounds, hx_metric **out,
                              hx_err *err)
{
    if (!m || !out)
        return hx_err_set(err, HX_EINVAL, "hx_metrics_register: NULL registry or output");
    *out = NULL;
    if (type == HX_METRIC_HISTOGRAM && !bounds) {
        bounds = hx_metrics_default_buckets;
        n_bounds = HX_METRICS_DEFAULT_BUCKETS_N;
    }
    int n_labels = 0;
    hx_status st = check_args(type, name, labels, bounds, n_bounds, &n_labels, err);
    if (st != HX_OK)
        return st;

    pthread_mutex_lock(&m->mu);
    family *f = find_family(m, name);
    if (f) {
        if (f->type != type) {
            st = hx_err_set(err, HX_EINVAL, "metric '%s' is a %s, not a %s", name,
                            type_name(f->type), type_name(type));
            goto out_unlock;
        }
        int same = f->n_labels == n_labels;
        for (int i = 0; same && i < n_labels; i++)
            same = strcmp(f->labels[i], labels[2 * i]) == 0;
        if (!same) {
            st = hx_err_set(err, HX_EINVAL,
                            "metric '%s': label names differ from its first registration "
                            "(%d label(s)%s%s)",
                            name, f->n_labels, f->n_labels ? ", first " : "",
                            f->n_labels ? f->labels[0] : "");
            goto out_unlock;
        }
        if (type == HX_METRIC_HISTOGRAM &&
            (f->n_bounds != n_bounds ||
             memcmp(f->bounds, bounds, sizeof *bounds * (size_t)n_bounds) != 0)) {
            st = hx_err_set(err, HX_EINVAL,
                            "histogram '%s': bucket bounds differ from its first registration",
                            name);
            goto out_unlock;
        }
        for (hx_metric *s = f->first; s; s = s->next) {
            int eq = 1;
            for (int i = 0; eq && i < n_labels; i++)
                eq = strcmp(s->values[i], labels[2 * i + 1]) == 0;
            if (eq) {
                *out = s;
                goto out_unlock;
            }
        }
    } else {
        if (m->n_fams == m->cap_fams) {
            size_t cap = m->cap_fams ? 2 * m->cap_fams : 16;
            family **fams = realloc(m->fams, cap * sizeof *fams);
            if (!fams) {
                st = hx_err_set(err, HX_ENOMEM, "metric '%s': out of memory", name);
                goto out_unlock;
            }
            m->fams = fams;
            m->cap_fams = cap;
        }
        f = family_new(type, name, help, labels, n_labels, bounds, n_bounds);
        if (!f) {
            st = hx_err_set(err, HX_ENOMEM, "metric '%s': out of memory", name);
            goto out_unlock;
        }
        m->fams[m->n_fams++] = f;
    }

    size_t nb = type == HX_METRIC_HISTOGRAM ? (size_t)f->n_bounds + 1 : 0;
    hx_metric *s = calloc(1, sizeof *s + nb * sizeof s->buckets[0]);
    if (!s) {
        st = hx_err_set(err, HX_ENOMEM, "metric '%s': out of memory", name);
        goto out_unlock;
    }
    s->fam = f;
    s->type = type;
    s->n_bounds = type == HX_METRIC_HISTOGRAM ? f->n_bounds : 0;
    s->bounds = f->bounds;
    atomic_init(&s->value, d2u(0.0));
    for (size_t i = 0; i < nb; i++)
        atomic_init(&s->buckets[i], 0);
    for (int i = 0; i < n_labels; i++) {
        if (!(s->values[i] = strdup(labels[2 * i + 1]))) {
            series_free(s);
            st = hx_err_set(err, HX_ENOMEM, "metric '%s': out of memory", name);
            goto out_unlock;
        }
    }
    if (f->last)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    *out = s;
out_unlock:
    pthread_mutex_unlock(&m->mu);
    return st;
}

/* Collects the NULL-terminated label arguments and registers. */
static hx_metric *register_va(hx_metrics *m, hx_metric_type type, const char *name,
                              const char *help, const double *bounds, int n_bounds, va_list ap)
{
    const char *labels[2 * HX_METRICS_MAX_LABELS + 3];
    int n = 0;
    const char *s;
    hx_err err = {0};
    while ((s = va_arg(ap, const char *)) != NULL) {
        if (n == 2 * HX_METRICS_MAX_LABELS + 1) {
            HX_WARN("metric '%s': more than %d labels", name ? name : "?",
                    HX_METRICS_MAX_LABELS);
            return NULL;
        }
        labels[n++] = s;
    }
    labels[n] = NULL;
    labels[n + 1] = NULL;
    if (n % 2) {
        HX_WARN("metric '%s': label '%s' has no value", name ? name : "?", labels[n - 1]);
        return NULL;
    }
    hx_metric *out = NULL;
    if (hx_metrics_register(m, type, name, help, labels, bounds, n_bounds, &out, &err) != HX_OK) {
        HX_WARN("%s", err.msg);
        return NULL;
    }
    return out;
}

hx_metric *hx_metrics_counter(hx_metrics *m, const char *name, const char *help, ...)
{
    va_list ap;
    va_start(ap, help);
    hx_metric *x = register_va(m, HX_METRIC_COUNTER, name, help, NULL, 0, ap);
    va_end(ap);
    return x;
}

hx_metric *hx_metrics_gauge(hx_metrics *m, const char *name, const char *help, ...)
{
    va_list ap;
    va_start(ap, help);
    hx_metric *x = register_va(m, HX_METRIC_GAUGE, name, help, NULL, 0, ap);
    va_end(ap);
    return x;
}

hx_metric *hx_metrics_histogram(hx_metrics *m, const char *name, const char *help,
                                const double *bounds, int n_bounds, ...)
{
    va_list ap;
    va_start(ap, n_bounds);
    hx_metric *x = register_va(m, HX_METRIC_HISTOGRAM, name, help, bounds, n_bounds, ap);
    va_end(ap);
    return x;
}

/* ---- updates -------------------------------------------------------------- */

void hx_metrics_counter_add(hx_metric *c, double v)
{
    if (!c || c->type == HX_METRIC_HISTOGRAM)
        return;
    if (c->type == HX_METRIC_COUNTER && !(v >= 0))
        return;
    atomic_add_double(&c->value, v);
}

void hx_metrics_counter_inc(hx_metric *c) { hx_metrics_counter_add(c, 1.0); }

void hx_metrics_gauge_set(hx_metric *g, double v)
{
    if (!g || g->type != HX_METRIC_GAUGE)
        return;
    atomic_store_explicit(&g->value, d2u(v), memory_order_relaxed);
}

void hx_metrics_gauge_add(hx_metric *g, double v)
{
    if (!g || g->type != HX_METRIC_GAUGE)
        return;
    atomic_add_double(&g->value, v);
}

void hx_metrics_histogram_observe(hx_metric *h, double v)
{
    if (!h || h->type != HX_METRIC_HISTOGRAM)
        return;
    /* First bound >= v; NaN compares false everywhere and lands in +Inf. */
    int lo = 0, hi = h->n_bounds;
    if (v == v) {
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (h->bounds[mid] >= v)
                hi = mid;
            else
                lo = mid + 1;
        }
    } else {
        lo = h->n_bounds;
    }
    atomic_fetch_add_explicit(&h->buckets[lo], 1, memory_order_relaxed);
    atomic_add_double(&h->value, v);
}

double hx_metrics_value(const hx_metric *x)
{
    if (!x)
        return 0;
    return u2d(atomic_load_explicit(&((hx_metric *)x)->value, memory_order_relaxed));
}

uint64_t hx_metrics_count(const hx_metric *h)
{
    if (!h || h->type != HX_METRIC_HISTOGRAM)
        return 0;
    uint64_t n = 0;
    for (int i = 0; i <= h->n_bounds; i++)
        n += atomic_load_explicit(&((hx_metric *)h)->buckets[i], memory_order_relaxed);
    return n;
}

/* ---- rendering ------------------------------------------------------------ */

char *hx_metrics_format_value(double v, char buf[32])
{
    if (isnan(v)) {
        strcpy(buf, "NaN");
    } else if (isinf(v)) {
        strcpy(buf, v > 0 ? "+Inf" : "-Inf");
    } else if (v == 0) {
        strcpy(buf, "0");
    } else {
        for (int prec = 15; prec <= 17; prec++) {
            snprintf(buf, 32, "%.*g", prec, v);
            if (strtod(buf, NULL) == v)
                break;
        }
    }
    return buf;
}

/* {a="x",b="y"} with an optional le="..." last; nothing when there are no labels. */
static void render_labels(sbuf *b, const family *f, const hx_metric *s, const char *le)
{
    if (f->n_labels == 0 && !le)
        return;
    hx_buf_putc(b, '{');
    for (int i = 0; i < f->n_labels; i++) {
        if (i)
            hx_buf_putc(b, ',');
        hx_buf_puts(b, f->labels[i]);
        hx_buf_puts(b, "=\"");
        sb_escaped(b, s->values[i], 1);
        hx_buf_putc(b, '"');
    }
    if (le) {
        if (f->n_labels)
            hx_buf_putc(b, ',');
        hx_buf_puts(b, "le=\"");
        hx_buf_puts(b, le);
        hx_buf_putc(b, '"');
    }
    hx_buf_putc(b, '}');
}

static void render_sample(sbuf *b, const family *f, const hx_metric *s, const char *suffix,
                          const char *le, double v)
{
    char num[32];
    hx_buf_puts(b, f->name);
    hx_buf_puts(b, suffix);
    render_labels(b, f, s, le);
    hx_buf_putc(b, ' ');
    hx_buf_puts(b, hx_metrics_format_value(v, num));
    hx_buf_putc(b, '\n');
}

char *hx_metrics_render(const hx_metrics *m)
{
    sbuf b = {0};
    hx_buf_reserve(&b, 0);
    if (b.oom)
        return NULL;
    b.p[0] = '\0';
    if (!m)
        return b.p;
    hx_metrics *mm = (hx_metrics *)m;
    pthread_mutex_lock(&mm->mu);
    for (size_t i = 0; i < m->n_fams; i++) {
        const family *f = m->fams[i];
        hx_buf_puts(&b, "# HELP ");
        hx_buf_puts(&b, f->name);
        hx_buf_putc(&b, ' ');
        sb_escaped(&b, f->help, 0);
        hx_buf_puts(&b, "\n# TYPE ");
        hx_buf_puts(&b, f->name);
        hx_buf_putc(&b, ' ');
        hx_buf_puts(&b, type_name(f->type));
        hx_buf_putc(&b, '\n');
        for (hx_metric *s = f->first; s; s = s->next) {
            double v = u2d(atomic_load_explicit(&s->value, memory_order_relaxed));
            if (f->type != HX_METRIC_HISTOGRAM) {
                render_sample(&b, f, s, "", NULL, v);
                continue;
            }
            uint64_t cum = 0;
            char le[32];
            for (int k = 0; k <= f->n_bounds; k++) {
                cum += atomic_load_explicit(&s->buckets[k], memory_order_relaxed);
                if (k < f->n_bounds)
                    hx_metrics_format_value(f->bounds[k], le);
                else
                    strcpy(le, "+Inf");
                render_sample(&b, f, s, "_bucket", le, (double)cum);
            }
            render_sample(&b, f, s, "_sum", NULL, v);
            render_sample(&b, f, s, "_count", NULL, (double)cum);
        }
    }
    pthread_mutex_unlock(&mm->mu);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
