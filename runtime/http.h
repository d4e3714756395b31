/*
 * http.h - the router's HTTP front: the OpenAI completions API over
 * libmicrohttpd, server-sent events, /v1/models, /health and /metrics.
 *
 * The front parses and checks requests, tokenizes text prompts, streams
 * tokens back (detokenized incrementally, whole UTF-8 characters only), and
 * renders errors; what generates the tokens is the backend's: a table of
 * callbacks (runtime/router.c's in production, a scripted one in the
 * front's own tests). docs/http-api.md is the user's description.
 *
 * Endpoints:
 *   POST /v1/completions   {"model": "...", "prompt": "text" | [ids] | ["text"] | [[ids]],
 *                           "max_tokens": N (default 16, >= 1), "temperature": T (default 1,
 *                           0..2), "top_p": P (default 1, (0, 1]), "seed": S (integer; default
 *                           a random one per request), "stream": bool,
 *                           "stream_options": {"include_usage": bool},
 *                           "stop": "s" | ["s", ...] (at most 4, each <= 512 bytes; the text
 *                           ends before the first match, finish_reason "stop"),
 *                           "n": 1, "best_of": 1, "echo": false, "logprobs": null|0,
 *                           "suffix": null|""; other fields ("user", penalties, logit_bias,
 *                           anything unknown) are accepted and ignored; n != 1, best_of != 1,
 *                           echo true, logprobs > 0 and a suffix are refused}
 *       A text prompt is encoded with hx_tokenizer_encode, with BOS first when
 *       hx_tokenizer_adds_bos (and the text does not start with it); a list of
 *       ids goes to the backend as it is, each id checked to be in the vocabulary.
 *       -> 200 {"id": "cmpl-<24 hex>", "object": "text_completion", "created": unix_s,
 *               "model": "...", "choices": [{"index": 0, "text": "...",
 *               "finish_reason": "length" | "stop", "logprobs": null,
 *               "token_ids": [...]}],
 *               "usage": {"prompt_tokens": N, "completion_tokens": N, "total_tokens": N}}
 *       -> stream: text/event-stream, one "data: {...}\n\n" chunk per piece of text
 *          (object "text_completion", choices[0].text the new text, token_ids the new ids,
 *          finish_reason null until the last chunk), then, with include_usage, a chunk
 *          with "choices": [] and "usage", then "data: [DONE]\n\n".
 *       Text: the bytes of the generated tokens (hx_tokenizer_token_bytes) as a
 *       continuation of the prompt (so a SentencePiece "▁Hi" gives " Hi"; only
 *       after a prompt made of BOS alone are hx_tokenizer_strips_leading_space
 *       leading spaces dropped, as decode would). A chunk never ends inside a
 *       UTF-8 character: incomplete bytes wait for the next token; invalid
 *       bytes become U+FFFD. BOS and EOS ids count as tokens (token_ids, usage)
 *       but add no text. Text that may begin a stop string is held back until
 *       it cannot. The front stops at max_tokens even if the backend goes on.
 *   GET /v1/models          {"object": "list", "data": [{"id": NAME, "object": "model",
 *                            "created": 0, "owned_by": "hexflow"}]}
 *   GET /v1/models/NAME     the model object, or 404 model_not_found
 *   GET /health             200 {"status": "ok", "model": NAME} or
 *                           503 {"status": "unavailable", "reason": ...}
 *   GET /metrics            text/plain; version=0.0.4: the backend's metrics text, then the
 *                           front's own (hexflow_http_*; see docs/http-api.md)
 *   (GET routes take HEAD too.)
 *
 * Errors are JSON {"error": {"message": "...", "type": "invalid_request_error" |
 * "server_error" | "unavailable", "param": FIELD|null, "code": null|"..."}}: 400 for
 * malformed JSON or fields (the message names the field and what is wrong,
 * param is the field), 401 without the bearer token when one is set (code
 * "invalid_api_key", header WWW-Authenticate: Bearer; only /v1/ routes need
 * it: /health and /metrics stay open for probes and scrapers), 404 for an
 * unknown path, 404 code "model_not_found" for a "model" other than the
 * served one, 405 for a wrong method (with an Allow header), 413 for a body
 * over 1 MiB, the backend's submit status with its message when it refuses
 * (503 adds Retry-After: 1), 502 when the backend fails (next() FAILED) before
 * a non-streaming answer, 504 past request_timeout_s, 503 while shutting
 * down, 500 for failures of the front itself. An error after a stream has
 * started is sent as a final data chunk {"error": {...}} before [DONE].
 *
 * Threads: libmicrohttpd runs a thread per connection; the backend's
 * callbacks are called from those threads, concurrently for different
 * requests. For one handle the calls never overlap: next() calls follow one
 * another, and release() comes after the last of them.
 *
 * Cancellation: every wait on next() is at most 100 ms (deadline_ns), after
 * which the front looks at the client's socket, the request deadline and
 * server shutdown. A client that closes its connection (or half-closes it:
 * a shutdown(SHUT_WR) counts as gone), a request past request_timeout_s,
 * a stop string, max_tokens reached, or hx_http_free all end in release()
 * on a handle that has not said DONE: the backend must then cancel the
 * request and free its resources.
 */
#ifndef HX_HTTP_H
#define HX_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "runtime/tokenizer.h"

/* A generation request as the backend receives it. Plain value; arrays borrowed for the call. */
typedef struct hx_gen_request {
    const int32_t *prompt; /* [n_prompt] token ids, each in the vocabulary */
    int n_prompt;          /* >= 1 */
    int max_tokens;        /* >= 1 */
    float temperature;     /* >= 0; 0 greedy */
    float top_p;           /* (0, 1] */
    uint64_t seed;         /* the request's "seed" (two's complement), else a random one */
    int stream;            /* informational (metrics) */
} hx_gen_request;

/* What hx_http_backend.next returns. */
typedef enum hx_gen_state {
    HX_GEN_MORE = 0,    /* tokens written (maybe 0 on a timeout); call again */
    HX_GEN_DONE = 1,    /* finished normally; tokens (maybe 0) written are the last */
    HX_GEN_FAILED = 2   /* failed: message set; tokens written before stand */
} hx_gen_state;

typedef struct hx_gen_handle hx_gen_handle; /* the backend's, opaque to the front */

/*
 * The backend. All callbacks are required except metrics and health, and are
 * called concurrently from connection threads.
 *
 *  submit   starts a request (req and its prompt are borrowed for the call).
 *           HX_OK with *out set, or an error whose err message the client
 *           gets, with *http_status set by the backend: 503 for a rejection
 *           ("cannot meet the TTFT SLO", "no healthy decode group"), 400 for a
 *           request the model cannot take (a prompt longer than the context),
 *           500 otherwise (a status outside 400..599 is taken as 500).
 *  next     waits up to deadline_ns (hx_proto_now_ns clock; never more than
 *           100 ms ahead) for more tokens and must return by then; writes up
 *           to cap (>= 1) ids to tokens, *n_tokens how many; on DONE
 *           *finish_stop is 1 for an end-of-sequence stop, 0 for length. The
 *           EOS id need not be passed on (if it is, it counts as a token
 *           without text). On FAILED, message (message_cap bytes) says why;
 *           the client gets it.
 *  release  ends the request (cancels it when not done); the handle is gone.
 *           Called exactly once per handle submit gave, from a connection
 *           thread or from hx_http_free.
 *  metrics  returns Prometheus text (a malloc'ed, NUL-terminated string the
 *           front frees with free(), e.g. hx_metrics_render of the router's
 *           registry; its family names must not start with hexflow_http_);
 *           NULL: /metrics renders only the front's.
 *  health   1 when serving, else 0 with reason (NUL-terminated, cap bytes).
 */
typedef struct hx_http_backend {
    void *ctx;
    hx_status (*submit)(void *ctx, const hx_gen_request *req, hx_gen_handle **out,
                        int *http_status, hx_err *err);
    hx_gen_state (*next)(void *ctx, hx_gen_handle *h, int32_t *tokens, int cap, int *n_tokens,
                         int *finish_stop, int64_t deadline_ns, char *message, size_t message_cap);
    void (*release)(void *ctx, hx_gen_handle *h);
    char *(*metrics)(void *ctx);
    int (*health)(void *ctx, char *reason, size_t cap);
} hx_http_backend;

/* Server settings. Plain value; hx_http_start copies the strings. */
typedef struct hx_http_options {
    const char *host;          /* bind address; default "127.0.0.1"; "0.0.0.0" for all */
    int port;                  /* 0: any free port (hx_http_port tells which) */
    const char *model_name;    /* the id /v1/models lists and "model" must match when given */
    const char *bearer_token;  /* non-NULL: require "Authorization: Bearer TOKEN" on /v1/ */
    int max_connections;       /* default 256; more connections are refused */
    double request_timeout_s;  /* a request's whole life; default 600 (504 / error chunk) */
} hx_http_options;

void hx_http_options_init(hx_http_options *opt);

typedef struct hx_http hx_http; /* opaque */

/*
 * Starts serving (returns once listening). tok is borrowed (text prompts and
 * detokenizing) and must outlive the server; backend is copied; opt's
 * strings are copied. HX_EIO naming host:port when it cannot listen (port in
 * use, unknown host), HX_EINVAL for bad options (no model_name, port out of
 * range, an empty bearer token, a backend without submit/next/release).
 * *out is stopped and freed with hx_http_free.
 */
hx_status hx_http_start(const hx_http_options *opt, const hx_tokenizer *tok,
                        const hx_http_backend *backend, hx_http **out, hx_err *err);
int hx_http_port(const hx_http *s);
/*
 * Stops accepting, ends open streams (each gets an error chunk "server is
 * shutting down" and [DONE] when it can still be written) and non-streaming
 * requests (503), releases their handles, joins the threads and frees:
 * returns within about 100 ms plus the slowest backend call. The backend
 * must stay usable until it returns. NULL is a no-op.
 */
void hx_http_free(hx_http *s);

#endif /* HX_HTTP_H */
