#include "status.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

const char *hx_strerror(hx_status st)
{
    switch (st) {
    case HX_OK: return "success";
    case HX_ENOMEM: return "out of memory";
    case HX_EINVAL: return "invalid argument";
    case HX_ENOENT: return "not found";
    case HX_EIO: return "input/output error";
    case HX_EPARSE: return "malformed input";
    case HX_ERANGE: return "value out of range";
    case HX_ENOTSUP: return "not supported";
    case HX_ETIMEDOUT: return "timed out";
    case HX_ECONN: return "connection failed";
    case HX_EEXIST: return "already exists";
    case HX_EINTERNAL: return "internal error";
    }
    return "unknown error";
}

void hx_err_clear(hx_err *err)
{
    if (err) {
        err->code = HX_OK;
        err->msg[0] = '\0';
    }
}

hx_status hx_err_vset(hx_err *err, hx_status code, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    }
    return code;
}

hx_status hx_err_set(hx_err *err, hx_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    hx_err_vset(err, code, fmt, ap);
    va_end(ap);
    return code;
}

hx_status hx_status_from_errno(int errnum)
{
    switch (errnum) {
    case 0: return HX_OK;
    case ENOMEM: return HX_ENOMEM;
    case ENOENT: case ENOTDIR: return HX_ENOENT;
    case EINVAL: return HX_EINVAL;
    case EEXIST: return HX_EEXIST;
    case ETIMEDOUT: return HX_ETIMEDOUT;
    case ECONNREFUSED: case ECONNRESET: case EPIPE: case EHOSTUNREACH: case ENETUNREACH:
        return HX_ECONN;
    default: return HX_EIO;
    }
}

const char *hx_errno_text(int errnum)
{
    switch (errnum) {
    case ENOENT: return "no such file";
    case EACCES: case EPERM: return "permission denied";
    case EISDIR: return "is a directory";
    case ENOTDIR: return "a path component is not a directory";
    default: return strerror(errnum);
    }
}

int hx_status_exit_code(hx_status st)
{
    switch (st) {
    case HX_OK: return 0;
    case HX_EINVAL: case HX_ENOENT: case HX_EPARSE: case HX_ERANGE: return 2;
    default: return 1;
    }
}
