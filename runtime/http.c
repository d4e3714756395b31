/*
 * http.c - the router's HTTP front (see http.h and docs/http-api.md).
 *
 * libmicrohttpd runs one thread per connection. A request's context (struct
 * req) lives from its first access-handler call to the completion
 * notification; it holds the body as it arrives (at most 1 MiB).
 *
 * A completion goes through four steps in the connection's thread: parse and
 * check the JSON body, turn the prompt into ids, submit to the backend, then
 * pull tokens with backend->next. Every wait on next() is short (POLL_NS), so
 * between two waits the thread looks at the request deadline, at server
 * shutdown and at the client's socket (poll for POLLRDHUP: a client that
 * closed its end cancels the request).
 *
 *   non-streaming: the access handler itself pulls until the end and queues
 *     one JSON response.
 *   streaming: the access handler queues a response whose content reader
 *     (stream_read) pulls and writes server-sent events; the generation state
 *     (struct gen) then belongs to the response and is freed, releasing the
 *     backend handle if still held, by the response's free callback, which
 *     libmicrohttpd calls however the connection ends.
 *
 * Text: each token's bytes (hx_tokenizer_token_bytes) go to `raw`; the
 * complete UTF-8 prefix of raw moves to `text` (invalid bytes become U+FFFD,
 * an incomplete character at the end waits for the next token); `text` is
 * searched for the stop strings, and what cannot be the start of a stop
 * string moves on to `emit`, which is the next chunk's text (stream) or the
 * completion's text (non-stream). BOS and EOS ids count as tokens but add no
 * text.
 *
 * Allocation: a request allocates its buffers once and grows them
 * geometrically; nothing is allocated per token, and stream chunks are
 * written as JSON by hand into a reused buffer.
 */
#define _GNU_SOURCE /* POLLRDHUP, memmem */

#include "runtime/http.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "common/buf.h"
#include "common/log.h"
#include "runtime/metrics.h"
#include "runtime/proto.h"

#ifndef POLLRDHUP
#define POLLRDHUP 0
#endif

#define BODY_MAX_BYTES ((size_t)1 << 20)
#define POLL_NS ((int64_t)100000000) /* 100 ms: the longest wait between looks at the client */
#define IDLE_TIMEOUT_S 60u           /* an idle keep-alive connection is closed after this */
#define TOKENS_CAP 256               /* ids per backend->next call */
#define MAX_STOPS 4
#define STOP_MAX_BYTES 512
#define MSG_CAP 512
#define STREAM_BLOCK_BYTES ((size_t)16 << 10)

/* Routes, also the "path" label of hexflow_http_requests_total. */
enum route { R_COMPLETIONS, R_MODELS, R_MODEL, R_HEALTH, R_METRICS, R_OTHER, R_COUNT };
static const char *const ROUTE_LABEL[R_COUNT] = {"/v1/completions", "/v1/models", "/v1/models",
                                                 "/health", "/metrics", "other"};

/* Status codes with their own series; others count as "other". */
static const int CODES[] = {200, 400, 401, 404, 405, 413, 499, 500, 502, 503, 504};
#define N_CODES ((int)(sizeof CODES / sizeof CODES[0]))

struct hx_http {
    struct MHD_Daemon *daemon;
    const hx_tokenizer *tok;
    hx_http_backend be;
    char *model_name;
    char *bearer;
    int port;
    double request_timeout_s;
    int vocab, bos, eos, adds_bos, strip_lead;
    atomic_int stopping;
    atomic_uint_fast64_t counter; /* request ids and default seeds */
    uint64_t id_key;

    hx_metrics *metrics;
    _Atomic(hx_metric *) m_requests[R_COUNT][N_CODES + 1];
    hx_metric *m_duration, *m_ttft, *m_prompt_tokens, *m_completion_tokens, *m_active,
        *m_cancelled;
};

/* bodies and streams are built in hx_buf (common/buf.h) */
typedef hx_buf buf;

/* ---- UTF-8 ---------------------------------------------------------------- */

/*
 * The sequence at s[0..n): its length (1..4) when it is a whole valid
 * character; 0 when s[0..n) is the valid start of a character that needs
 * more bytes; -k when it is invalid, k >= 1 being the bytes (the maximal
 * subpart, RFC 3629 / Unicode 3.9) that one U+FFFD replaces.
 */
static int utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0], lo = 0x80, hi = 0xBF;
    int len;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c == 0xE0) {
        len = 3;
        lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
        len = 3;
    } else if (c == 0xED) {
        len = 3;
        hi = 0x9F;
    } else if (c == 0xF0) {
        len = 4;
        lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
        len = 4;
    } else if (c == 0xF4) {
        len = 4;
        hi = 0x8F;
    } else {
        return -1;
    }
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n)
            return 0;
        unsigned b = s[i];
        unsigned l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (b < l || b > h)
            return -i;
    }
    return len;
}

/*
 * Appends the valid UTF-8 of p[0..n) to out, invalid bytes replaced by
 * U+FFFD. Unless final, an incomplete character at the end is not taken.
 * Returns the bytes taken.
 */
static size_t utf8_clean(buf *out, const char *p, size_t n, int final)
{
    static const char FFFD[] = "\xEF\xBF\xBD";
    const unsigned char *s = (const unsigned char *)p;
    size_t i = 0, run = 0; /* run: start of the pending valid stretch */
    while (i < n) {
        int k = utf8_seq(s + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        hx_buf_put(out, p + run, i - run);
        if (k == 0) { /* incomplete at the end */
            if (!final)
                return i;
            hx_buf_put(out, FFFD, 3);
            return n;
        }
        hx_buf_put(out, FFFD, 3);
        i += (size_t)-k;
        run = i;
    }
    hx_buf_put(out, p + run, i - run);
    return n;
}

/* Appends p[0..n) (valid UTF-8) as a quoted JSON string. */
static void buf_json_str(buf *b, const char *p, size_t n)
{
    static const char HEX[] = "0123456789abcdef";
    hx_buf_reserve(b, n + 2);
    hx_buf_put(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        hx_buf_put(b, p + run, i - run);
        run = i + 1;
        char e[6] = {'\\', 0, 0, 0, 0, 0};
        size_t el = 2;
        switch (c) {
        case '"': e[1] = '"'; break;
        case '\\': e[1] = '\\'; break;
        case '\n': e[1] = 'n'; break;
        case '\r': e[1] = 'r'; break;
        case '\t': e[1] = 't'; break;
        case '\b': e[1] = 'b'; break;
        case '\f': e[1] = 'f'; break;
        default:
            e[1] = 'u';
            e[2] = '0';
            e[3] = '0';
            e[4] = HEX[c >> 4];
            e[5] = HEX[c & 15];
            el = 6;
        }
        hx_buf_put(b, e, el);
    }
    hx_buf_put(b, p + run, n - run);
    hx_buf_put(b, "\"", 1);
}

/* A JSON string of arbitrary bytes (invalid UTF-8 replaced). */
static void buf_json_bytes(buf *b, const char *p, size_t n)
{
    buf clean = {0};
    utf8_clean(&clean, p, n, 1);
    buf_json_str(b, clean.p ? clean.p : "", clean.len);
    if (clean.oom)
        b->oom = 1;
    hx_buf_release(&clean);
}

/* ---- small helpers -------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t random_key(void)
{
    uint64_t k = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &k, sizeof k) != (ssize_t)sizeof k)
            k = 0;
        close(fd);
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return k ^ splitmix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^
                          ((uint64_t)getpid() << 48));
}

/* Equal strings, in time that depends only on the lengths. */
static int secret_equal(const char *a, size_t na, const char *b, size_t nb)
{
    unsigned char d = na != nb;
    for (size_t i = 0; i < na; i++)
        d |= (unsigned char)(a[i] ^ b[i < nb ? i : 0]);
    return d == 0 && nb > 0;
}

static int client_gone(int fd)
{
    if (fd < 0)
        return 0;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    if (poll(&p, 1, 0) <= 0)
        return 0;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

static int conn_fd(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? (int)ci->connect_fd : -1;
}

static double seconds_since(int64_t t0_ns) { return (double)(hx_proto_now_ns() - t0_ns) * 1e-9; }

/* ---- metrics of the front ------------------------------------------------- */

static void count_request(hx_http *s, int route, int code)
{
    int k = N_CODES;
    for (int i = 0; i < N_CODES; i++)
        if (CODES[i] == code)
            k = i;
    hx_metric *m = atomic_load(&s->m_requests[route][k]);
    if (!m) {
        char cs[16];
        if (k < N_CODES)
            snprintf(cs, sizeof cs, "%d", code);
        else
            strcpy(cs, "other");
        m = hx_metrics_counter(s->metrics, "hexflow_http_requests_total",
                               "HTTP requests answered by the front, by path and status code "
                               "(499: the client went away first).",
                               "path", ROUTE_LABEL[route], "code", cs, NULL);
        atomic_store(&s->m_requests[route][k], m);
    }
    hx_metrics_counter_inc(m);
}

static const double DURATION_BUCKETS[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                          5,    10,    30,   60,  120,  300, 600};
static const double TTFT_BUCKETS[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1,     2,    4,     8,    15,  30,   60};

static hx_status register_metrics(hx_http *s, hx_err *err)
{
    s->metrics = hx_metrics_new();
    if (!s->metrics)
        return hx_err_set(err, HX_ENOMEM, "http: out of memory");
    s->m_duration = hx_metrics_histogram(
        s->metrics, "hexflow_http_completion_duration_seconds",
        "Whole life of a /v1/completions request at the front, from its headers to its last byte.",
        DURATION_BUCKETS, (int)(sizeof DURATION_BUCKETS / sizeof DURATION_BUCKETS[0]), NULL);
    s->m_ttft = hx_metrics_histogram(
        s->metrics, "hexflow_http_ttft_seconds",
        "Time from a completion request's arrival at the front to its first generated token.",
        TTFT_BUCKETS, (int)(sizeof TTFT_BUCKETS / sizeof TTFT_BUCKETS[0]), NULL);
    s->m_prompt_tokens = hx_metrics_counter(s->metrics, "hexflow_http_prompt_tokens_total",
                                            "Prompt tokens of the completions submitted.", NULL);
    s->m_completion_tokens =
        hx_metrics_counter(s->metrics, "hexflow_http_completion_tokens_total",
                           "Tokens generated for the front's completions.", NULL);
    s->m_active = hx_metrics_gauge(s->metrics, "hexflow_http_active_completions",
                                   "Completions submitted to the backend and not yet released.",
                                   NULL);
    s->m_cancelled = hx_metrics_counter(
        s->metrics, "hexflow_http_cancelled_total",
        "Completions released before they finished: client gone, timeout or shutdown.", NULL);
    if (!s->m_duration || !s->m_ttft || !s->m_prompt_tokens || !s->m_completion_tokens ||
        !s->m_active || !s->m_cancelled)
        return hx_err_set(err, HX_ENOMEM, "http: cannot register the front's metrics");
    return HX_OK;
}

/* ---- responses ------------------------------------------------------------ */

/* A request: from the first access-handler call to the completion notice. */
typedef struct req {
    hx_http *s;
    int route;
    int64_t start_ns;
    buf body;
    int too_big;
    int code; /* status queued (0: none), for the metrics */
} req;

/* Queues body (malloc'ed, taken) with code; returns what the handler returns. */
static enum MHD_Result reply(req *r, struct MHD_Connection *c, int code, const char *ctype,
                             char *body, size_t len, const char *hname, const char *hvalue)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, body ? body : (char *)"", body ? MHD_RESPMEM_MUST_FREE
                                                                           : MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (hname)
        MHD_add_response_header(resp, hname, hvalue);
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)code, resp);
    MHD_destroy_response(resp);
    if (ret == MHD_YES)
        r->code = code;
    return ret;
}

static enum MHD_Result reply_json(req *r, struct MHD_Connection *c, int code, json_t *root)
{
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text)
        return MHD_NO;
    size_t n = strlen(text);
    char *body = realloc(text, n + 2);
    if (!body) {
        free(text);
        return MHD_NO;
    }
    body[n] = '\n';
    body[n + 1] = '\0';
    return reply(r, c, code, "application/json", body, n + 1, NULL, NULL);
}

static const char *type_for(int code)
{
    if (code == 503)
        return "unavailable";
    return code >= 500 ? "server_error" : "invalid_request_error";
}

/* A failure to report: status, the field at fault, OpenAI's code, the message. */
typedef struct failure {
    int status;
    const char *param;
    const char *code;
    char msg[sizeof(((hx_err *)0)->msg) + 64];
} failure;

static int fail(failure *f, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(failure *f, int status, const char *param, const char *fmt, ...)
{
    f->status = status;
    f->param = param;
    f->code = NULL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->msg, sizeof f->msg, fmt, ap);
    va_end(ap);
    return -1;
}

static json_t *error_json(const char *msg, const char *type, const char *param, const char *code)
{
    buf clean = {0};
    utf8_clean(&clean, msg, strlen(msg), 1);
    json_t *root = json_pack("{s:{s:s?,s:s,s:s?,s:s?}}", "error", "message",
                             clean.p ? clean.p : "", "type", type, "param", param, "code", code);
    hx_buf_release(&clean);
    return root;
}

static enum MHD_Result reply_failure(req *r, struct MHD_Connection *c, const failure *f,
                                     const char *hname, const char *hvalue)
{
    json_t *root = error_json(f->msg, type_for(f->status), f->param, f->code);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text)
        return MHD_NO;
    return reply(r, c, f->status, "application/json", text, strlen(text), hname, hvalue);
}

static enum MHD_Result reply_error(req *r, struct MHD_Connection *c, int status,
                                   const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static enum MHD_Result reply_error(req *r, struct MHD_Connection *c, int status,
                                   const char *param, const char *fmt, ...)
{
    failure f = {.status = status, .param = param};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f.msg, sizeof f.msg, fmt, ap);
    va_end(ap);
    return reply_failure(r, c, &f, NULL, NULL);
}

/* ---- completion parameters -------------------------------------------------- */

typedef struct params {
    int32_t *prompt; /* [n_prompt], malloc'ed */
    int n_prompt;
    int prompt_special_only; /* every prompt id is BOS: decode strips the leading space */
    int max_tokens;
    double temperature, top_p;
    uint64_t seed;
    int stream, include_usage;
    char *stops[MAX_STOPS];
    size_t stop_len[MAX_STOPS];
    int n_stops;
} params;

static void params_release(params *p)
{
    free(p->prompt);
    for (int i = 0; i < p->n_stops; i++)
        free(p->stops[i]);
    memset(p, 0, sizeof *p);
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "a list";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "a value";
}

static int prompt_from_text(hx_http *s, const char *text, size_t len, params *p, failure *f)
{
    int *ids = NULL;
    size_t n = 0;
    hx_err err = {0};
    if (hx_tokenizer_encode(s->tok, text, len, &ids, &n, &err) != HX_OK)
        return fail(f, 400, "prompt", "prompt: cannot tokenize: %s", err.msg);
    int bos = s->adds_bos && s->bos >= 0 && !(n > 0 && ids[0] == s->bos);
    if (n + (size_t)bos == 0) {
        free(ids);
        return fail(f, 400, "prompt", "prompt is empty");
    }
    if (n + (size_t)bos > (size_t)INT_MAX / 2) {
        free(ids);
        return fail(f, 400, "prompt", "prompt is too long");
    }
    p->n_prompt = (int)(n + (size_t)bos);
    p->prompt = malloc(sizeof *p->prompt * (size_t)p->n_prompt);
    if (!p->prompt) {
        free(ids);
        return fail(f, 500, NULL, "out of memory");
    }
    if (bos)
        p->prompt[0] = s->bos;
    for (size_t i = 0; i < n; i++)
        p->prompt[i + (size_t)bos] = ids[i];
    free(ids);
    return 0;
}

/* A list of token ids; `where` names it in messages ("prompt" or "prompt[0]"). */
static int prompt_from_ids(hx_http *s, const json_t *arr, const char *where, params *p,
                           failure *f)
{
    size_t n = json_array_size(arr);
    if (n == 0)
        return fail(f, 400, "prompt", "%s is an empty list", where);
    if (n > (size_t)INT_MAX / 2)
        return fail(f, 400, "prompt", "%s is too long", where);
    p->prompt = malloc(sizeof *p->prompt * n);
    if (!p->prompt)
        return fail(f, 500, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v))
            return fail(f, 400, "prompt", "%s[%zu]: expected a token id (an integer), got %s",
                        where, i, json_type_name(v));
        json_int_t id = json_integer_value(v);
        const char *bytes;
        size_t bl;
        if (id < 0 || id >= s->vocab || hx_tokenizer_token_bytes(s->tok, (int)id, &bytes, &bl) != HX_OK)
            return fail(f, 400, "prompt",
                        "%s[%zu]: token id %" JSON_INTEGER_FORMAT
                        " is not in the vocabulary (ids 0 to %d)",
                        where, i, id, s->vocab - 1);
        p->prompt[i] = (int32_t)id;
    }
    p->n_prompt = (int)n;
    return 0;
}

static int parse_prompt(hx_http *s, const json_t *v, params *p, failure *f)
{
    if (!v || json_is_null(v))
        return fail(f, 400, "prompt", "prompt is required");
    if (json_is_string(v))
        return prompt_from_text(s, json_string_value(v), json_string_length(v), p, f);
    if (!json_is_array(v))
        return fail(f, 400, "prompt",
                    "prompt must be a string, a list of token ids or a list of one string; got %s",
                    json_type_name(v));
    size_t n = json_array_size(v);
    if (n == 0)
        return fail(f, 400, "prompt", "prompt is an empty list");
    const json_t *first = json_array_get(v, 0);
    if (json_is_string(first) || json_is_array(first)) {
        if (n != 1)
            return fail(f, 400, "prompt",
                        "prompt: a list of %zu prompts; this server takes one prompt per request",
                        n);
        if (json_is_string(first))
            return prompt_from_text(s, json_string_value(first), json_string_length(first), p, f);
        return prompt_from_ids(s, first, "prompt[0]", p, f);
    }
    return prompt_from_ids(s, v, "prompt", p, f);
}

/* Optional integer field: 1 and *out when present, 0 when absent or null, -1 on error. */
static int get_int(const json_t *o, const char *key, json_int_t *out, failure *f)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return fail(f, 400, key, "%s must be an integer, got %s", key, json_type_name(v));
    *out = json_integer_value(v);
    return 1;
}

static int get_number(const json_t *o, const char *key, double *out, failure *f)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return fail(f, 400, key, "%s must be a number, got %s", key, json_type_name(v));
    *out = json_number_value(v);
    return 1;
}

static int get_bool(const json_t *o, const char *key, int *out, failure *f)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return fail(f, 400, key, "%s must be a boolean, got %s", key, json_type_name(v));
    *out = json_is_true(v);
    return 1;
}

static int add_stop(params *p, const json_t *v, const char *where, failure *f)
{
    if (!json_is_string(v))
        return fail(f, 400, "stop", "%s must be a string, got %s", where, json_type_name(v));
    size_t n = json_string_length(v);
    if (n == 0)
        return 0; /* an empty stop string stops nothing */
    if (n > STOP_MAX_BYTES)
        return fail(f, 400, "stop", "%s is longer than %d bytes", where, STOP_MAX_BYTES);
    char *c = malloc(n + 1);
    if (!c)
        return fail(f, 500, NULL, "out of memory");
    memcpy(c, json_string_value(v), n + 1);
    p->stops[p->n_stops] = c;
    p->stop_len[p->n_stops++] = n;
    return 0;
}

/* Parses and checks a completion request body into *p (released by the caller). */
static int parse_completion(hx_http *s, const char *body, size_t len, params *p, failure *f)
{
    json_error_t je;
    json_t *o = json_loadb(body ? body : "", len, 0, &je);
    int rc = -1;
    if (!o)
        return fail(f, 400, NULL, "request body is not valid JSON: %s (line %d, column %d)",
                    je.text, je.line, je.column);
    if (!json_is_object(o)) {
        fail(f, 400, NULL, "request body must be a JSON object, got %s", json_type_name(o));
        goto out;
    }

    const json_t *model = json_object_get(o, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            fail(f, 400, "model", "model must be a string, got %s", json_type_name(model));
            goto out;
        }
        if (strcmp(json_string_value(model), s->model_name) != 0) {
            fail(f, 404, "model", "The model '%s' does not exist; this server serves '%s'",
                 json_string_value(model), s->model_name);
            f->code = "model_not_found";
            goto out;
        }
    }

    json_int_t iv = 0;
    double dv = 0;
    int bv = 0, got;

    p->max_tokens = 16;
    if ((got = get_int(o, "max_tokens", &iv, f)) < 0)
        goto out;
    if (got) {
        if (iv < 1 || iv > INT_MAX) {
            fail(f, 400, "max_tokens", "max_tokens must be between 1 and %d, got %" JSON_INTEGER_FORMAT,
                 INT_MAX, iv);
            goto out;
        }
        p->max_tokens = (int)iv;
    }
    p->temperature = 1.0;
    if ((got = get_number(o, "temperature", &dv, f)) < 0)
        goto out;
    if (got) {
        if (!(dv >= 0 && dv <= 2)) {
            fail(f, 400, "temperature", "temperature must be between 0 and 2, got %g", dv);
            goto out;
        }
        p->temperature = dv;
    }
    p->top_p = 1.0;
    if ((got = get_number(o, "top_p", &dv, f)) < 0)
        goto out;
    if (got) {
        if (!(dv > 0 && dv <= 1)) {
            fail(f, 400, "top_p", "top_p must be greater than 0 and at most 1, got %g", dv);
            goto out;
        }
        p->top_p = dv;
    }
    uint64_t nonce = atomic_fetch_add(&s->counter, 1);
    p->seed = splitmix64(s->id_key ^ (nonce * 0xD1B54A32D192ED03ull));
    if ((got = get_int(o, "seed", &iv, f)) < 0)
        goto out;
    if (got)
        p->seed = (uint64_t)iv;
    if (get_bool(o, "stream", &p->stream, f) < 0)
        goto out;
    const json_t *so = json_object_get(o, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) {
            fail(f, 400, "stream_options", "stream_options must be an object, got %s",
                 json_type_name(so));
            goto out;
        }
        if (get_bool(so, "include_usage", &p->include_usage, f) < 0) {
            f->param = "stream_options";
            goto out;
        }
    }
    const char *ones[] = {"n", "best_of"};
    for (int i = 0; i < 2; i++) {
        if ((got = get_int(o, ones[i], &iv, f)) < 0)
            goto out;
        if (got && iv != 1) {
            fail(f, 400, ones[i], "%s must be 1: one completion per request is supported, got %" JSON_INTEGER_FORMAT,
                 ones[i], iv);
            goto out;
        }
    }
    if (get_bool(o, "echo", &bv, f) < 0)
        goto out;
    if (bv) {
        fail(f, 400, "echo", "echo=true is not supported");
        goto out;
    }
    const json_t *lp = json_object_get(o, "logprobs");
    if (lp && !json_is_null(lp) && !json_is_false(lp) &&
        !(json_is_integer(lp) && json_integer_value(lp) == 0)) {
        fail(f, 400, "logprobs", "logprobs are not supported");
        goto out;
    }
    const json_t *sfx = json_object_get(o, "suffix");
    if (sfx && !json_is_null(sfx) && !(json_is_string(sfx) && json_string_length(sfx) == 0)) {
        fail(f, 400, "suffix", "suffix is not supported");
        goto out;
    }
    const json_t *stop = json_object_get(o, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            if (add_stop(p, stop, "stop", f) < 0)
                goto out;
        } else if (json_is_array(stop)) {
            if (json_array_size(stop) > MAX_STOPS) {
                fail(f, 400, "stop", "stop has %zu strings; at most %d are allowed",
                     json_array_size(stop), MAX_STOPS);
                goto out;
            }
            for (size_t i = 0; i < json_array_size(stop); i++) {
                char where[32];
                snprintf(where, sizeof where, "stop[%zu]", i);
                if (add_stop(p, json_array_get(stop, i), where, f) < 0)
                    goto out;
            }
        } else {
            fail(f, 400, "stop", "stop must be a string or a list of strings, got %s",
                 json_type_name(stop));
            goto out;
        }
    }
    if (parse_prompt(s, json_object_get(o, "prompt"), p, f) < 0)
        goto out;
    p->prompt_special_only = 1;
    for (int i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] != s->bos)
            p->prompt_special_only = 0;
    rc = 0;
out:
    json_decref(o);
    return rc;
}

/* ---- generation ----------------------------------------------------------- */

enum { PH_RUN, PH_END, PH_ABORT };

/* One submitted completion: its backend handle, text state and output. */
typedef struct gen {
    hx_http *s;
    hx_gen_handle *h; /* NULL once released */
    struct MHD_Connection *conn;
    int fd;
    int stream, include_usage, max_tokens, n_prompt;
    char *stops[MAX_STOPS];
    size_t stop_len[MAX_STOPS];
    int n_stops;
    size_t stop_max;
    char id[48];
    long long created;
    buf head;        /* {"id":...,"model":... : the start of every chunk */
    int64_t start_ns, deadline_ns;

    int32_t tokens[TOKENS_CAP];
    int n_gen;       /* tokens taken from the backend */
    int32_t *ids;    /* ids not yet sent (stream) or all (non-stream) */
    size_t n_ids, cap_ids;
    int ids_oom;
    int strip_left;  /* leading spaces still to drop */
    buf raw, text, emit;
    int stopped;     /* a stop string matched: no more text */
    int failed;      /* the backend said FAILED */
    int finished;    /* finish_reason decided */
    const char *finish_reason;
    int first_seen;

    buf out;         /* stream: bytes for the client */
    size_t out_off;
    int phase;
} gen;

static void gen_release(gen *g)
{
    if (!g->h)
        return;
    g->s->be.release(g->s->be.ctx, g->h);
    g->h = NULL;
    if (!g->finished && !g->failed)
        hx_metrics_counter_inc(g->s->m_cancelled);
    hx_metrics_gauge_add(g->s->m_active, -1);
}

static void gen_free(gen *g)
{
    if (!g)
        return;
    gen_release(g);
    for (int i = 0; i < g->n_stops; i++)
        free(g->stops[i]);
    free(g->ids);
    hx_buf_release(&g->raw);
    hx_buf_release(&g->text);
    hx_buf_release(&g->emit);
    hx_buf_release(&g->out);
    hx_buf_release(&g->head);
    free(g);
}

/* Takes the stop strings from p. */
static gen *gen_new(hx_http *s, params *p, hx_gen_handle *h, struct MHD_Connection *c,
                    int64_t start_ns)
{
    gen *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->s = s;
    g->h = h;
    g->conn = c;
    g->fd = conn_fd(c);
    g->stream = p->stream;
    g->include_usage = p->include_usage;
    g->max_tokens = p->max_tokens;
    g->n_prompt = p->n_prompt;
    uint64_t n = atomic_fetch_add(&s->counter, 1);
    snprintf(g->id, sizeof g->id, "cmpl-%016" PRIx64 "%08" PRIx32, splitmix64(s->id_key ^ n),
             (uint32_t)splitmix64(s->id_key + n));
    g->created = (long long)time(NULL);
    hx_buf_printf(&g->head, "{\"id\":\"%s\",\"object\":\"text_completion\",\"created\":%lld,\"model\":",
               g->id, g->created);
    buf_json_bytes(&g->head, s->model_name, strlen(s->model_name));
    if (g->head.oom) { /* (h stays the caller's) */
        hx_buf_release(&g->head);
        free(g);
        return NULL;
    }
    for (int i = 0; i < p->n_stops; i++) {
        g->stops[i] = p->stops[i];
        g->stop_len[i] = p->stop_len[i];
        if (p->stop_len[i] > g->stop_max)
            g->stop_max = p->stop_len[i];
        p->stops[i] = NULL;
    }
    g->n_stops = p->n_stops;
    p->n_stops = 0;
    g->start_ns = start_ns;
    double t = s->request_timeout_s;
    g->deadline_ns = t >= 1e9 ? INT64_MAX : start_ns + (int64_t)(t * 1e9);
    g->strip_left = p->prompt_special_only ? s->strip_lead : 0;
    g->phase = PH_RUN;
    hx_metrics_gauge_add(s->m_active, 1);
    return g;
}

static void push_id(gen *g, int32_t id)
{
    if (g->n_ids == g->cap_ids) {
        size_t cap = g->cap_ids ? 2 * g->cap_ids : 64;
        int32_t *p = realloc(g->ids, cap * sizeof *p);
        if (!p) {
            g->ids_oom = 1;
            return;
        }
        g->ids = p;
        g->cap_ids = cap;
    }
    g->ids[g->n_ids++] = id;
}

/* Takes n ids from the backend into the text pipeline (at most up to max_tokens). */
static void gen_feed(gen *g, const int32_t *t, int n)
{
    hx_http *s = g->s;
    for (int i = 0; i < n && g->n_gen < g->max_tokens; i++) {
        int32_t id = t[i];
        g->n_gen++;
        push_id(g, id);
        if (id == s->bos || id == s->eos)
            continue;
        const char *bytes = NULL;
        size_t bl = 0;
        if (id < 0 || hx_tokenizer_token_bytes(s->tok, id, &bytes, &bl) != HX_OK)
            continue; /* an id with no text adds none */
        while (g->strip_left > 0 && bl > 0 && bytes[0] == ' ') {
            bytes++;
            bl--;
            g->strip_left--;
        }
        if (bl > 0)
            g->strip_left = 0;
        hx_buf_put(&g->raw, bytes, bl);
    }
}

/*
 * Moves text along raw -> text -> emit. final: the generation has ended, so
 * nothing is held back. Returns 1 when a stop string was found (the text is
 * cut before it).
 */
static int gen_text(gen *g, int final)
{
    if (g->stopped)
        return 1;
    size_t took = utf8_clean(&g->text, g->raw.p ? g->raw.p : "", g->raw.len, final);
    hx_buf_consume(&g->raw, took);
    int stopped = 0;
    size_t cut = g->text.len;
    for (int i = 0; i < g->n_stops; i++) {
        const char *m = g->text.len ? memmem(g->text.p, g->text.len, g->stops[i], g->stop_len[i])
                                    : NULL;
        if (m && (size_t)(m - g->text.p) < cut) {
            cut = (size_t)(m - g->text.p);
            stopped = 1;
        }
    }
    size_t hold = 0;
    if (!stopped && !final) {
        /* The longest end of text that begins a stop string waits for more. */
        size_t maxh = g->stop_max ? g->stop_max - 1 : 0;
        if (maxh > g->text.len)
            maxh = g->text.len;
        for (size_t h = maxh; h > 0 && !hold; h--)
            for (int i = 0; i < g->n_stops; i++)
                if (g->stop_len[i] > h &&
                    memcmp(g->text.p + g->text.len - h, g->stops[i], h) == 0) {
                    hold = h;
                    break;
                }
    }
    size_t n = stopped ? cut : g->text.len - hold;
    hx_buf_put(&g->emit, g->text.p ? g->text.p : "", n);
    if (stopped) {
        g->stopped = 1;
        g->text.len = 0;
        g->raw.len = 0;
    } else
        hx_buf_consume(&g->text, n);
    if (g->text.p)
        g->text.p[g->text.len] = '\0';
    return stopped;
}

/* What one pull gave. */
enum pull { P_TOKENS, P_DONE, P_FAILED, P_TIMEOUT, P_GONE, P_SHUTDOWN };

static enum pull gen_pull(gen *g, int *finish_stop, char *msg, size_t msg_cap)
{
    hx_http *s = g->s;
    if (atomic_load(&s->stopping))
        return P_SHUTDOWN;
    if (client_gone(g->fd))
        return P_GONE;
    int64_t now = hx_proto_now_ns();
    if (now >= g->deadline_ns)
        return P_TIMEOUT;
    int64_t dl = g->deadline_ns - now > POLL_NS ? now + POLL_NS : g->deadline_ns;
    int cap = g->max_tokens - g->n_gen;
    if (cap > TOKENS_CAP)
        cap = TOKENS_CAP;
    int n = 0, fs = 0;
    msg[0] = '\0';
    hx_gen_state st = s->be.next(s->be.ctx, g->h, g->tokens, cap, &n, &fs, dl, msg, msg_cap);
    msg[msg_cap - 1] = '\0';
    if (n < 0)
        n = 0;
    if (n > cap)
        n = cap;
    if (n > 0 && !g->first_seen) {
        g->first_seen = 1;
        hx_metrics_histogram_observe(s->m_ttft, seconds_since(g->start_ns));
    }
    int before = g->n_gen;
    gen_feed(g, g->tokens, n);
    hx_metrics_counter_add(s->m_completion_tokens, (double)(g->n_gen - before));
    switch (st) {
    case HX_GEN_MORE:
        return P_TOKENS;
    case HX_GEN_DONE:
        *finish_stop = fs != 0;
        return P_DONE;
    case HX_GEN_FAILED:
        if (!msg[0])
            snprintf(msg, msg_cap, "generation failed");
        return P_FAILED;
    }
    snprintf(msg, msg_cap, "backend returned an unknown state %d", (int)st);
    return P_FAILED;
}

/* Ends the generation normally and releases the backend's handle. */
static void gen_finish(gen *g, const char *reason)
{
    gen_text(g, 1);
    g->finished = 1;
    g->finish_reason = reason;
    gen_release(g);
}

/*
 * One step of a generation: a pull and the text it gives. Returns the pull's
 * outcome with the generation finished where it ended normally (DONE, a stop
 * string, max_tokens); for FAILED/TIMEOUT/SHUTDOWN/GONE msg says why.
 */
static enum pull gen_step(gen *g, char *msg, size_t msg_cap)
{
    int fs = 0;
    enum pull r = gen_pull(g, &fs, msg, msg_cap);
    switch (r) {
    case P_TOKENS:
        if (gen_text(g, 0))
            gen_finish(g, "stop");
        else if (g->n_gen >= g->max_tokens)
            gen_finish(g, "length");
        break;
    case P_DONE:
        if (gen_text(g, 0))
            gen_finish(g, "stop");
        else
            gen_finish(g, fs ? "stop" : "length");
        break;
    case P_TIMEOUT:
        snprintf(msg, msg_cap, "request timed out after %g s", g->s->request_timeout_s);
        break;
    case P_SHUTDOWN:
        snprintf(msg, msg_cap, "server is shutting down");
        break;
    case P_GONE:
        snprintf(msg, msg_cap, "client disconnected");
        break;
    case P_FAILED:
        g->failed = 1;
        break;
    }
    return r;
}

/* ---- JSON written by hand (stream chunks and the completion) --------------- */

static void put_head(gen *g, buf *b) { hx_buf_put(b, g->head.p, g->head.len); }

static void put_choice(gen *g, buf *b, const char *finish)
{
    hx_buf_puts(b, ",\"choices\":[{\"index\":0,\"text\":");
    buf_json_str(b, g->emit.p ? g->emit.p : "", g->emit.len);
    hx_buf_puts(b, ",\"logprobs\":null,\"finish_reason\":");
    if (finish)
        hx_buf_printf(b, "\"%s\"", finish);
    else
        hx_buf_puts(b, "null");
    hx_buf_puts(b, ",\"token_ids\":[");
    for (size_t i = 0; i < g->n_ids; i++)
        hx_buf_printf(b, i ? ",%" PRId32 : "%" PRId32, g->ids[i]);
    hx_buf_puts(b, "]}]");
}

static void put_usage(gen *g, buf *b)
{
    hx_buf_printf(b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%lld}",
               g->n_prompt, g->n_gen, (long long)g->n_prompt + g->n_gen);
}

static void put_error(buf *b, const char *msg, const char *type)
{
    hx_buf_puts(b, "{\"error\":{\"message\":");
    buf_json_bytes(b, msg, strlen(msg));
    hx_buf_printf(b, ",\"type\":\"%s\",\"param\":null,\"code\":null}}", type);
}

/* ---- streaming ------------------------------------------------------------ */

/* Appends a data chunk with the pending text and ids (when there are any or finish is set). */
static void sse_chunk(gen *g, const char *finish)
{
    if (!finish && g->emit.len == 0)
        return; /* ids whose text is held back ride with the next chunk */
    hx_buf_puts(&g->out, "data: ");
    put_head(g, &g->out);
    put_choice(g, &g->out, finish);
    hx_buf_puts(&g->out, "}\n\n");
    hx_buf_consume(&g->emit, g->emit.len);
    g->n_ids = 0;
}

static void sse_end(gen *g)
{
    if (g->include_usage) {
        hx_buf_puts(&g->out, "data: ");
        put_head(g, &g->out);
        hx_buf_puts(&g->out, ",\"choices\":[],");
        put_usage(g, &g->out);
        hx_buf_puts(&g->out, "}\n\n");
    }
    hx_buf_puts(&g->out, "data: [DONE]\n\n");
    g->phase = PH_END;
}

static void stream_step(gen *g)
{
    char msg[MSG_CAP];
    enum pull r = gen_step(g, msg, sizeof msg);
    if (g->finished) {
        sse_chunk(g, g->finish_reason);
        sse_end(g);
        return;
    }
    switch (r) {
    case P_TOKENS:
        sse_chunk(g, NULL);
        return;
    case P_GONE:
        gen_release(g);
        g->phase = PH_ABORT;
        return;
    case P_FAILED:
    case P_TIMEOUT:
    case P_SHUTDOWN:
    case P_DONE: /* (finished above) */
        gen_release(g);
        gen_text(g, 1);
        sse_chunk(g, NULL);
        hx_buf_puts(&g->out, "data: ");
        put_error(&g->out, msg,
                  r == P_SHUTDOWN ? "unavailable" : "server_error");
        hx_buf_puts(&g->out, "\n\n");
        hx_buf_puts(&g->out, "data: [DONE]\n\n");
        g->phase = PH_END;
        return;
    }
}

static ssize_t stream_read(void *cls, uint64_t pos, char *out, size_t max)
{
    gen *g = cls;
    (void)pos;
    for (;;) {
        if (g->out.oom || g->ids_oom || g->raw.oom || g->text.oom || g->emit.oom) {
            gen_release(g);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (g->out_off < g->out.len) {
            size_t n = g->out.len - g->out_off;
            if (n > max)
                n = max;
            memcpy(out, g->out.p + g->out_off, n);
            g->out_off += n;
            if (g->out_off == g->out.len) {
                g->out.len = 0;
                g->out_off = 0;
            }
            return (ssize_t)n;
        }
        if (g->phase == PH_END) {
            /* The connection may idle again (its timeout was off while streaming). */
            MHD_set_connection_option(g->conn, MHD_CONNECTION_OPTION_TIMEOUT, IDLE_TIMEOUT_S);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (g->phase == PH_ABORT)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        stream_step(g);
    }
}

static void stream_free(void *cls) { gen_free(cls); }

/* ---- /v1/completions ------------------------------------------------------ */

static enum MHD_Result reply_completion(req *r, struct MHD_Connection *c, gen *g)
{
    buf b = {0};
    put_head(g, &b);
    put_choice(g, &b, g->finish_reason);
    hx_buf_puts(&b, ",");
    put_usage(g, &b);
    hx_buf_puts(&b, "}\n");
    if (b.oom || g->ids_oom || g->emit.oom || g->raw.oom || g->text.oom) {
        hx_buf_release(&b);
        return reply_error(r, c, 500, NULL, "out of memory");
    }
    size_t len = b.len;
    return reply(r, c, 200, "application/json", b.p, len, NULL, NULL);
}

static enum MHD_Result handle_completion(req *r, struct MHD_Connection *c)
{
    hx_http *s = r->s;
    params p = {0};
    failure f = {0};
    enum MHD_Result ret;
    if (parse_completion(s, r->body.p, r->body.len, &p, &f) < 0) {
        ret = reply_failure(r, c, &f, NULL, NULL);
        goto out_params;
    }

    hx_gen_request gr = {.prompt = p.prompt,
                         .n_prompt = p.n_prompt,
                         .max_tokens = p.max_tokens,
                         .temperature = (float)p.temperature,
                         .top_p = (float)p.top_p,
                         .seed = p.seed,
                         .stream = p.stream};
    hx_gen_handle *h = NULL;
    int http_status = 0;
    hx_err err = {0};
    hx_status st = s->be.submit(s->be.ctx, &gr, &h, &http_status, &err);
    if (st != HX_OK || !h) {
        int code = http_status >= 400 && http_status <= 599 ? http_status : 500;
        if (st == HX_OK) { /* a backend bug: no handle */
            code = 500;
            snprintf(err.msg, sizeof err.msg, "backend accepted the request without a handle");
        }
        failure bf = {.status = code};
        snprintf(bf.msg, sizeof bf.msg, "%s", err.msg[0] ? err.msg : hx_strerror(st));
        ret = reply_failure(r, c, &bf, code == 503 ? MHD_HTTP_HEADER_RETRY_AFTER : NULL, "1");
        goto out_params;
    }
    hx_metrics_counter_add(s->m_prompt_tokens, p.n_prompt);

    gen *g = gen_new(s, &p, h, c, r->start_ns);
    if (!g) {
        s->be.release(s->be.ctx, h);
        ret = reply_error(r, c, 500, NULL, "out of memory");
        goto out_params;
    }
    /* The connection's idle timeout must not fire while the thread is busy here. */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 0u);

    if (p.stream) {
        struct MHD_Response *resp = MHD_create_response_from_callback(
            MHD_SIZE_UNKNOWN, STREAM_BLOCK_BYTES, stream_read, g, stream_free);
        if (!resp) {
            gen_free(g);
            ret = MHD_NO;
            goto out_params;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp); /* g now belongs to resp: stream_free frees it */
        if (ret == MHD_YES)
            r->code = 200;
        goto out_params;
    }

    char msg[MSG_CAP];
    int code = 0;
    while (!g->finished) {
        enum pull pr = gen_step(g, msg, sizeof msg);
        if (g->finished)
            break;
        if (pr == P_TOKENS)
            continue;
        code = pr == P_TIMEOUT ? 504 : pr == P_SHUTDOWN ? 503 : pr == P_GONE ? 499 : 502;
        break;
    }
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, IDLE_TIMEOUT_S);
    if (code == 499) {
        r->code = 499;
        ret = MHD_NO; /* nobody to answer: close the connection */
    } else if (code) {
        ret = reply_error(r, c, code, NULL, "%s", msg);
    } else {
        ret = reply_completion(r, c, g);
    }
    gen_free(g);
out_params:
    params_release(&p);
    return ret;
}

/* ---- the other endpoints -------------------------------------------------- */

static json_t *model_json(const hx_http *s)
{
    return json_pack("{s:s,s:s,s:i,s:s}", "id", s->model_name, "object", "model", "created", 0,
                     "owned_by", "hexflow");
}

static enum MHD_Result handle_health(req *r, struct MHD_Connection *c)
{
    hx_http *s = r->s;
    char reason[256] = "";
    int ok = 1;
    if (atomic_load(&s->stopping)) {
        ok = 0;
        snprintf(reason, sizeof reason, "server is shutting down");
    } else if (s->be.health) {
        ok = s->be.health(s->be.ctx, reason, sizeof reason) != 0;
        reason[sizeof reason - 1] = '\0';
    }
    if (ok)
        return reply_json(r, c, 200,
                          json_pack("{s:s,s:s}", "status", "ok", "model", s->model_name));
    buf clean = {0};
    utf8_clean(&clean, reason, strlen(reason), 1);
    json_t *root = json_pack("{s:s,s:s}", "status", "unavailable", "reason",
                             clean.p && clean.len ? clean.p : "not healthy");
    hx_buf_release(&clean);
    return reply_json(r, c, 503, root);
}

static enum MHD_Result handle_metrics(req *r, struct MHD_Connection *c)
{
    hx_http *s = r->s;
    buf b = {0};
    char *bt = s->be.metrics ? s->be.metrics(s->be.ctx) : NULL;
    if (bt && *bt) {
        hx_buf_puts(&b, bt);
        if (b.len && b.p[b.len - 1] != '\n')
            hx_buf_puts(&b, "\n");
    }
    free(bt);
    char *ft = hx_metrics_render(s->metrics);
    if (ft)
        hx_buf_puts(&b, ft);
    free(ft);
    if (b.oom || !ft) {
        hx_buf_release(&b);
        return reply_error(r, c, 500, NULL, "out of memory");
    }
    size_t len = b.len;
    return reply(r, c, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, len, NULL, NULL);
}

/* ---- libmicrohttpd callbacks ---------------------------------------------- */

static int route_of(const hx_http *s, const char *url)
{
    if (strcmp(url, "/v1/completions") == 0)
        return R_COMPLETIONS;
    if (strcmp(url, "/v1/models") == 0)
        return R_MODELS;
    if (strncmp(url, "/v1/models/", 11) == 0)
        return R_MODEL;
    if (strcmp(url, "/health") == 0)
        return R_HEALTH;
    if (strcmp(url, "/metrics") == 0)
        return R_METRICS;
    (void)s;
    return R_OTHER;
}

static int authorized(const hx_http *s, struct MHD_Connection *c)
{
    if (!s->bearer)
        return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    while (*h == ' ')
        h++;
    size_t n = strlen(h);
    while (n > 0 && (h[n - 1] == ' ' || h[n - 1] == '\t'))
        n--;
    return secret_equal(h, n, s->bearer, strlen(s->bearer));
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    hx_http *s = cls;
    req *r = *con_cls;
    (void)version;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        r->s = s;
        r->start_ns = hx_proto_now_ns();
        r->route = route_of(s, url);
        *con_cls = r;

        if (r->route == R_OTHER)
            return reply_error(r, c, 404, NULL, "no such endpoint: %s %s", method, url);
        int is_v1 = r->route == R_COMPLETIONS || r->route == R_MODELS || r->route == R_MODEL;
        if (is_v1 && !authorized(s, c)) {
            failure f = {.status = 401, .code = "invalid_api_key"};
            snprintf(f.msg, sizeof f.msg,
                     "missing or invalid bearer token: send the header "
                     "'Authorization: Bearer TOKEN'");
            return reply_failure(r, c, &f, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
        }
        int post = r->route == R_COMPLETIONS;
        int ok = post ? strcmp(method, MHD_HTTP_METHOD_POST) == 0
                      : strcmp(method, MHD_HTTP_METHOD_GET) == 0 ||
                            strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
        if (!ok) {
            failure f = {.status = 405};
            snprintf(f.msg, sizeof f.msg, "method %s is not allowed on %s; use %s", method, url,
                     post ? "POST" : "GET");
            return reply_failure(r, c, &f, MHD_HTTP_HEADER_ALLOW, post ? "POST" : "GET, HEAD");
        }
        if (!post) {
            switch (r->route) {
            case R_MODELS:
                return reply_json(r, c, 200,
                                  json_pack("{s:s,s:[o]}", "object", "list", "data",
                                            model_json(s)));
            case R_MODEL: {
                const char *name = url + 11;
                if (strcmp(name, s->model_name) == 0)
                    return reply_json(r, c, 200, model_json(s));
                failure f = {.status = 404, .param = "model", .code = "model_not_found"};
                snprintf(f.msg, sizeof f.msg, "The model '%s' does not exist", name);
                return reply_failure(r, c, &f, NULL, NULL);
            }
            case R_HEALTH:
                return handle_health(r, c);
            default:
                return handle_metrics(r, c);
            }
        }
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end = NULL;
            errno = 0;
            unsigned long long v = strtoull(cl, &end, 10);
            if (errno == 0 && end != cl && v > BODY_MAX_BYTES)
                return reply_error(r, c, 413, NULL,
                                   "request body of %llu bytes is over the limit of %zu bytes", v,
                                   BODY_MAX_BYTES);
        }
        return MHD_YES; /* the body follows */
    }

    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->too_big || r->body.len + n > BODY_MAX_BYTES) {
            r->too_big = 1; /* read and dropped; answered at the end */
            hx_buf_release(&r->body);
            return MHD_YES;
        }
        hx_buf_put(&r->body, upload_data, n);
        return r->body.oom ? MHD_NO : MHD_YES;
    }
    if (r->too_big)
        return reply_error(r, c, 413, NULL, "request body is over the limit of %zu bytes",
                           BODY_MAX_BYTES);
    return handle_completion(r, c);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    hx_http *s = cls;
    req *r = *con_cls;
    (void)c;
    (void)toe;
    if (!r)
        return;
    if (r->code)
        count_request(s, r->route, r->code);
    if (r->route == R_COMPLETIONS && r->code)
        hx_metrics_histogram_observe(s->m_duration, seconds_since(r->start_ns));
    hx_buf_release(&r->body);
    free(r);
    *con_cls = NULL;
}

static void on_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    (void)cls;
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && line[n - 1] == '\n')
        line[--n] = '\0';
    HX_DEBUG("http: %s", line);
}

/* ---- start / stop --------------------------------------------------------- */

void hx_http_options_init(hx_http_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->host = "127.0.0.1";
    opt->port = 0;
    opt->max_connections = 256;
    opt->request_timeout_s = 600;
}

static hx_status open_listener(const char *host, int port, int *fd_out, int *family,
                               int *bound_port, hx_err *err)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0)
        return hx_err_set(err, HX_EIO, "cannot listen on %s:%d: %s", host, port,
                          gai_strerror(rc));
    int fd = -1, e = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 256) == 0) {
            *family = ai->ai_family;
            break;
        }
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return hx_err_set(err, HX_EIO, "cannot listen on %s:%d: %s", host, port, strerror(e));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        e = errno;
        close(fd);
        return hx_err_set(err, HX_EIO, "cannot listen on %s:%d: %s", host, port, strerror(e));
    }
    *bound_port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                           : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    return HX_OK;
}

hx_status hx_http_start(const hx_http_options *opt, const hx_tokenizer *tok,
                        const hx_http_backend *backend, hx_http **out, hx_err *err)
{
    hx_status st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "http: no output");
    *out = NULL;
    if (!opt || !tok || !backend)
        return hx_err_set(err, HX_EINVAL, "http: options, tokenizer and backend are required");
    if (!backend->submit || !backend->next || !backend->release)
        return hx_err_set(err, HX_EINVAL, "http: the backend needs submit, next and release");
    if (!opt->model_name || !*opt->model_name)
        return hx_err_set(err, HX_EINVAL, "http: model_name is required");
    buf chk = {0};
    utf8_clean(&chk, opt->model_name, strlen(opt->model_name), 1);
    int bad_name = chk.oom || chk.len != strlen(opt->model_name) ||
                   memcmp(chk.p, opt->model_name, chk.len) != 0;
    hx_buf_release(&chk);
    if (bad_name)
        return hx_err_set(err, HX_EINVAL, "http: model_name is not valid UTF-8");
    if (opt->port < 0 || opt->port > 65535)
        return hx_err_set(err, HX_EINVAL, "http: port %d is out of range 0..65535", opt->port);
    if (opt->bearer_token && !*opt->bearer_token)
        return hx_err_set(err, HX_EINVAL, "http: bearer_token is empty");
    const char *host = opt->host && *opt->host ? opt->host : "127.0.0.1";
    int max_conn = opt->max_connections > 0 ? opt->max_connections : 256;
    double timeout_s = opt->request_timeout_s > 0 ? opt->request_timeout_s : 600;

    hx_http *s = calloc(1, sizeof *s);
    if (!s)
        return hx_err_set(err, HX_ENOMEM, "http: out of memory");
    s->tok = tok;
    s->be = *backend;
    s->request_timeout_s = timeout_s;
    s->vocab = hx_tokenizer_vocab_size(tok);
    s->bos = hx_tokenizer_bos(tok);
    s->eos = hx_tokenizer_eos(tok);
    s->adds_bos = hx_tokenizer_adds_bos(tok);
    s->strip_lead = hx_tokenizer_strips_leading_space(tok);
    s->id_key = random_key();
    atomic_init(&s->stopping, 0);
    atomic_init(&s->counter, 1);
    for (int i = 0; i < R_COUNT; i++)
        for (int k = 0; k <= N_CODES; k++)
            atomic_init(&s->m_requests[i][k], NULL);
    s->model_name = strdup(opt->model_name);
    s->bearer = opt->bearer_token ? strdup(opt->bearer_token) : NULL;
    if (!s->model_name || (opt->bearer_token && !s->bearer)) {
        st = hx_err_set(err, HX_ENOMEM, "http: out of memory");
        goto out_free;
    }
    if ((st = register_metrics(s, err)) != HX_OK)
        goto out_free;

    int fd = -1, family = AF_INET;
    if ((st = open_listener(host, opt->port, &fd, &family, &s->port, err)) != HX_OK)
        goto out_free;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (family == AF_INET6)
        flags |= MHD_USE_IPv6;
    s->daemon = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, on_log, s,
        MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)max_conn, MHD_OPTION_CONNECTION_TIMEOUT,
        IDLE_TIMEOUT_S, MHD_OPTION_END);
    if (!s->daemon) {
        /* fd is not closed here: whether libmicrohttpd closed it on its failure path
         * depends on its version, and a double close could hit another thread's file. */
        st = hx_err_set(err, HX_EIO, "cannot serve HTTP on %s:%d: libmicrohttpd did not start",
                        host, s->port);
        goto out_free;
    }
    *out = s;
    return HX_OK;
out_free:
    hx_metrics_free(s->metrics);
    free(s->bearer);
    free(s->model_name);
    free(s);
    return st;
}

int hx_http_port(const hx_http *s) { return s ? s->port : 0; }

void hx_http_free(hx_http *s)
{
    if (!s)
        return;
    atomic_store(&s->stopping, 1);
    if (s->daemon)
        MHD_stop_daemon(s->daemon); /* joins the connection threads; streams end within POLL_NS */
    hx_metrics_free(s->metrics);
    free(s->bearer);
    free(s->model_name);
    free(s);
}
