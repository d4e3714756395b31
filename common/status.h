/*
 * status.h - the one status enum of hexflow, and error values that carry a message.
 *
 * Every fallible function returns hx_status: HX_OK (0) on success, a negative
 * code on failure. Functions that can say more about a failure take an
 * `hx_err *` (caller-owned storage, may be NULL) and fill in a one-line
 * message that names what and where, git style:
 *
 *     cannot open inventory 'x.yaml': no such file
 *
 * Library code never prints errors itself and never calls exit().
 */
#ifndef HX_STATUS_H
#define HX_STATUS_H

#include <stdarg.h>

typedef enum hx_status {
    HX_OK = 0,
    HX_ENOMEM = -1,    /* out of memory */
    HX_EINVAL = -2,    /* bad input or bad argument */
    HX_ENOENT = -3,    /* no such file, name or item */
    HX_EIO = -4,       /* read/write failure */
    HX_EPARSE = -5,    /* malformed file contents */
    HX_ERANGE = -6,    /* value out of range */
    HX_ENOTSUP = -7,   /* not supported by this build or platform */
    HX_ETIMEDOUT = -8, /* an operation did not finish in time */
    HX_ECONN = -9,     /* a connection failed or was dropped */
    HX_EEXIST = -10,   /* already exists */
    HX_EINTERNAL = -11 /* a bug: an invariant did not hold */
} hx_status;

/* Static, human-readable text for a status ("out of memory"). Never NULL. */
const char *hx_strerror(hx_status st);

/* A failure with its message. Caller-owned; zero-initialise or hx_err_clear(). */
typedef struct hx_err {
    hx_status code;
    char msg[1024];
} hx_err;

void hx_err_clear(hx_err *err);

/*
 * Records `code` and a printf-formatted message into `err` (when err is not
 * NULL) and returns `code`, so that `return hx_err_set(err, HX_EINVAL, ...);`
 * reads naturally.
 */
hx_status hx_err_set(hx_err *err, hx_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
hx_status hx_err_vset(hx_err *err, hx_status code, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

/* Maps an errno value to a status and to a short text ("no such file"). */
hx_status hx_status_from_errno(int errnum);
const char *hx_errno_text(int errnum);

/*
 * Process exit status for a failure, per the command-line convention:
 * 2 for bad usage or bad input (HX_EINVAL, HX_ENOENT, HX_EPARSE, HX_ERANGE),
 * 1 for failures at run time, 0 for HX_OK.
 */
int hx_status_exit_code(hx_status st);

#endif /* HX_STATUS_H */
