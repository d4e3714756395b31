/*
 * trace.h - request traces for the simulator: Mooncake JSONL and the Azure
 * LLM inference CSV.
 *
 * The format is told by content: when the first non-blank line starts with
 * '{' the trace is Mooncake JSONL, otherwise an Azure-style CSV with a header.
 *
 * Mooncake JSONL, one JSON object per line (blank lines are skipped, other
 * keys such as hash_ids are ignored):
 *
 *     {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}
 *     {"timestamp": 3052, "input_length": 1281, "output_length": 45, "hash_ids": [48]}
 *
 *   timestamp      milliseconds, a number >= 0
 *   input_length   prompt tokens, a whole number 1..10^7
 *   output_length  generated tokens, a whole number 1..10^7
 *
 * Azure LLM inference CSV, a header naming at least these columns (any order,
 * names case-sensitive, other columns ignored, fields may be "quoted", LF or
 * CRLF line endings):
 *
 *     TIMESTAMP,ContextTokens,GeneratedTokens
 *     2023-11-16 18:15:46.6805900,374,44
 *
 *   TIMESTAMP        a UTC date-time YYYY-MM-DD HH:MM:SS[.fffffff] (a 'T' may
 *                    stand for the space; a trailing 'Z' or +HH:MM offset is
 *                    accepted), or a plain number of seconds >= 0; one kind
 *                    throughout a file
 *   ContextTokens    prompt tokens, a whole number 1..10^7
 *   GeneratedTokens  generated tokens, a whole number 1..10^7
 *
 * Arrival times come out relative to the earliest request (which gets 0) and
 * requests are sorted by arrival; requests with equal times keep file order.
 *
 * Every problem of a file is reported, up to HX_TRACE_MAX_DIAGS of them
 * followed by "... and N more problems", as "FILE:LINE[:COL]: field: message".
 */
#ifndef HX_TRACE_H
#define HX_TRACE_H

#include <stddef.h>
#include <stdint.h>

#include "common/diag.h"
#include "common/status.h"

#define HX_TRACE_MAX_REQUESTS 50000000 /* requests per trace */
#define HX_TRACE_MAX_TOKENS 10000000   /* input or output tokens per request */
#define HX_TRACE_MAX_DIAGS 20          /* problems listed before "... and N more" */
/* Largest trace file read (8 GiB; less where size_t is 32-bit). */
#define HX_TRACE_MAX_BYTES ((size_t)(SIZE_MAX > 0xFFFFFFFFu ? 8ull << 30 : 1ull << 30))

typedef struct hx_trace_req {
    double arrival_s;  /* seconds from the trace's first request (first = 0) */
    int input_tokens;  /* >= 1 */
    int output_tokens; /* >= 1 */
} hx_trace_req;

typedef struct hx_trace {
    hx_trace_req *reqs; /* owned [n], sorted by arrival (stable) */
    size_t n;           /* >= 1 */
    const char *format; /* static: "mooncake" or "azure" */
} hx_trace;

/*
 * Reads the trace at `path` (not owned) into a new hx_trace that the caller
 * frees with hx_trace_free. On failure *out is NULL and the problems are
 * appended to `diags` (caller-owned, initialised; may be NULL to discard
 * them). Returns HX_ENOENT/HX_EIO/HX_EINVAL when the file cannot be read
 * ("cannot open trace 'x': no such file"), HX_EPARSE for bad contents,
 * HX_ENOMEM when out of memory.
 */
hx_status hx_trace_load(const char *path, hx_trace **out, hx_diags *diags);

/*
 * As hx_trace_load, from `len` bytes of `text` (not owned; need not be
 * NUL-terminated). `name` (not owned; NULL = "trace") is the file name used
 * in diagnostics.
 */
hx_status hx_trace_load_string(const char *text, size_t len, const char *name, hx_trace **out,
                               hx_diags *diags);

/* Frees a trace and its requests; NULL is a no-op. */
void hx_trace_free(hx_trace *t);

/*
 * Mean input and output tokens per request, and the mean arrival rate in
 * requests/s: (n - 1) / span, the inverse of the mean gap between
 * arrivals (0 when n < 2 or all requests arrive at once). Any output pointer
 * may be NULL; a NULL or empty trace gives zeros.
 */
void hx_trace_stats(const hx_trace *t, double *mean_input, double *mean_output, double *rate_rps);

#endif /* HX_TRACE_H */
