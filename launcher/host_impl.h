/*
 * host_impl.h - internals shared by the hx_host back ends (launcher/host.c,
 * launcher/local.c, launcher/ssh.c). Not part of the launcher's API: include
 * launcher/host.h instead.
 *
 * An hx_host is a name, a place for messages ("10.0.0.2:22" or "local") and a
 * back end that executes one command at a time (hx_host_exec). Everything else
 * (hx_host_run, hx_host_push, ...) is built in host.c on top of exec.
 */
#ifndef HX_LAUNCHER_HOST_IMPL_H
#define HX_LAUNCHER_HOST_IMPL_H

#include <stddef.h>

#include "launcher/host.h"

/* Per stream capture limit of hx_host_run (bytes beyond it are discarded). */
#define HX_HOST_CAPTURE_MAX_BYTES ((size_t)64 << 20)
/* Size of the chunks in which stdin is streamed from a file. */
#define HX_HOST_CHUNK_BYTES ((size_t)64 << 10)

/* A growing, NUL-terminated capture buffer. */
typedef struct hx_host_buf {
    char *data; /* NULL until the first byte; owned */
    size_t len;
    size_t cap;
    int truncated; /* 1 when bytes past HX_HOST_CAPTURE_MAX_BYTES were dropped */
} hx_host_buf;

/* Appends n bytes (drops what exceeds the limit). HX_ENOMEM on failure. */
hx_status hx_host_buf_append(hx_host_buf *b, const void *p, size_t n);
/* Returns the data as a malloc'ed NUL-terminated string (empty string when
 * nothing was captured) and resets b; NULL when out of memory. */
char *hx_host_buf_take(hx_host_buf *b);
void hx_host_buf_release(hx_host_buf *b);

/*
 * The standard input of a command: a memory buffer, or a file descriptor read
 * in HX_HOST_CHUNK_BYTES chunks until EOF. hx_host_input_peek returns the
 * same bytes until they are consumed (libssh2 wants a write that returned
 * EAGAIN repeated with the same buffer).
 */
typedef struct hx_host_input {
    const unsigned char *data; /* memory source (fd < 0) */
    size_t len;
    size_t off;
    int fd; /* >= 0: file source */
    unsigned char *chunk; /* file source: HX_HOST_CHUNK_BYTES, owned */
    size_t chunk_len;
    size_t chunk_off;
    int eof; /* the file source hit EOF */
    int read_errno; /* a read error on the file source (then eof is set) */
} hx_host_input;

/* Pending bytes into *p / *n (n = 0: nothing left). HX_EIO when reading the
 * file source fails (read_errno tells why). */
hx_status hx_host_input_peek(hx_host_input *in, const unsigned char **p, size_t *n);
void hx_host_input_consume(hx_host_input *in, size_t n);

/* One command execution, filled by the caller, completed by the back end. */
typedef struct hx_host_exec {
    const char *command;  /* run with /bin/sh -c */
    hx_host_input *input; /* may be NULL: empty stdin */
    double timeout_s;     /* whole command; <= 0: no limit */
    double stall_s;       /* no byte moved either way for this long; <= 0: no limit */
    double finish_s;      /* > 0: once stdin is closed, the command has this long to
                             finish, and the stall rule no longer applies (a push's
                             check of the copy moves no bytes for a while) */
    hx_host_buf out;      /* captured stdout */
    hx_host_buf errb;     /* captured stderr */
    int exit_status;      /* out: exit status, -1: killed by a signal */
} hx_host_exec;

typedef struct hx_host_ops {
    /* Runs x->command. HX_OK when it ran to an exit (whatever the status);
     * HX_ETIMEDOUT (command killed), HX_ECONN, ... with err set otherwise. */
    hx_status (*exec)(hx_host *h, hx_host_exec *x, hx_err *err);
    void (*close)(hx_host *h); /* frees the back end's state (h->impl) */
} hx_host_ops;

struct hx_host {
    const hx_host_ops *ops;
    char *name;     /* for messages; owned */
    char *where;    /* "10.0.0.2:22" or "local"; owned */
    double stall_s; /* push stall timeout */
    int local;
    void *impl; /* back end state */
};

/* Allocates an hx_host with its name and place. NULL when out of memory. */
hx_host *hx_host_alloc(const hx_host_ops *ops, const char *name, const char *where, int local);

/* Monotonic clock in seconds. */
double hx_host_now(void);

/* Writes into buf a one-line abbreviation of a command for messages. */
const char *hx_host_cmd_abbrev(const char *command, char *buf, size_t size);

/* The last line of a captured stream (trimmed) into buf, "" when empty. */
const char *hx_host_last_line(const hx_host_buf *b, char *buf, size_t size);

/*
 * The deadline of the stall / finish rules (0: none), given the time of the
 * last progress and when stdin was closed (0: not yet). *kind gets
 * HX_HOST_STALLED or HX_HOST_FINISH_LATE.
 */
enum { HX_HOST_TIMED_OUT = 1, HX_HOST_STALLED = 2, HX_HOST_FINISH_LATE = 3 };
double hx_host_idle_deadline(const hx_host_exec *x, double last_progress, double input_done_at,
                             int *kind);

/* Formats the timeout message shared by the back ends; `kind` is one of the
 * HX_HOST_TIMED_OUT / _STALLED / _FINISH_LATE. */
hx_status hx_host_timeout_err(const hx_host *h, const hx_host_exec *x, int kind,
                              double elapsed_s, hx_err *err);

#endif /* HX_LAUNCHER_HOST_IMPL_H */
