/*
 * host.c - the back-end independent part of hx_host: capture buffers, stdin
 * sources, hx_host_run, hx_host_run_checked and hx_host_push (built on the
 * back end's exec), local SHA-256, shell quoting.
 */
#include "launcher/host_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#define HX_HOST_DEFAULT_STALL_S 60.0

/* ---- small helpers -------------------------------------------------------- */

double hx_host_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

const char *hx_host_cmd_abbrev(const char *command, char *buf, size_t size)
{
    size_t n = 0, max = size > 4 ? size - 4 : 0;
    const char *p = command ? command : "";
    while (*p == ' ' || *p == '\t' || *p == '\n')
        p++;
    for (; *p && n < max; p++)
        buf[n++] = (*p == '\n' || *p == '\t' || *p == '\r') ? ' ' : *p;
    if (*p && size >= 4) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    if (size)
        buf[n < size ? n : size - 1] = '\0';
    return buf;
}

const char *hx_host_last_line(const hx_host_buf *b, char *buf, size_t size)
{
    if (!size)
        return buf;
    buf[0] = '\0';
    if (!b->data || !b->len)
        return buf;
    size_t end = b->len;
    while (end > 0 && (b->data[end - 1] == '\n' || b->data[end - 1] == '\r' ||
                       b->data[end - 1] == ' '))
        end--;
    size_t start = end;
    while (start > 0 && b->data[start - 1] != '\n')
        start--;
    size_t n = end - start;
    if (n >= size)
        n = size - 1;
    memcpy(buf, b->data + start, n);
    buf[n] = '\0';
    return buf;
}

hx_host *hx_host_alloc(const hx_host_ops *ops, const char *name, const char *where, int local)
{
    hx_host *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->ops = ops;
    h->local = local;
    h->stall_s = HX_HOST_DEFAULT_STALL_S;
    h->name = strdup(name);
    h->where = strdup(where);
    if (!h->name || !h->where) {
        free(h->name);
        free(h->where);
        free(h);
        return NULL;
    }
    return h;
}

/* ---- capture buffers ------------------------------------------------------ */

hx_status hx_host_buf_append(hx_host_buf *b, const void *p, size_t n)
{
    if (b->len + n > HX_HOST_CAPTURE_MAX_BYTES) {
        b->truncated = 1;
        n = HX_HOST_CAPTURE_MAX_BYTES - b->len;
    }
    if (!n)
        return HX_OK;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return HX_ENOMEM;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return HX_OK;
}

char *hx_host_buf_take(hx_host_buf *b)
{
    char *d = b->data;
    if (!d)
        d = calloc(1, 1);
    b->data = NULL;
    b->len = b->cap = 0;
    b->truncated = 0;
    return d;
}

void hx_host_buf_release(hx_host_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ---- stdin sources -------------------------------------------------------- */

hx_status hx_host_input_peek(hx_host_input *in, const unsigned char **p, size_t *n)
{
    if (in->fd < 0) {
        *p = in->data + in->off;
        *n = in->len - in->off;
        return HX_OK;
    }
    if (in->chunk_off == in->chunk_len && !in->eof) {
        in->chunk_off = in->chunk_len = 0;
        for (;;) {
            ssize_t r = read(in->fd, in->chunk, HX_HOST_CHUNK_BYTES);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                in->read_errno = errno;
                in->eof = 1;
                *p = NULL;
                *n = 0;
                return HX_EIO;
            }
            if (r == 0)
                in->eof = 1;
            in->chunk_len = (size_t)r;
            break;
        }
    }
    *p = in->chunk + in->chunk_off;
    *n = in->chunk_len - in->chunk_off;
    return HX_OK;
}

void hx_host_input_consume(hx_host_input *in, size_t n)
{
    if (in->fd < 0)
        in->off += n;
    else
        in->chunk_off += n;
}

/* ---- public API ----------------------------------------------------------- */

const char *hx_host_name(const hx_host *h)
{
    return h->name;
}

int hx_host_is_local(const hx_host *h)
{
    return h->local;
}

void hx_host_set_stall_timeout(hx_host *h, double stall_s)
{
    h->stall_s = stall_s;
}

void hx_host_close(hx_host *h)
{
    if (!h)
        return;
    if (h->ops && h->ops->close)
        h->ops->close(h);
    free(h->name);
    free(h->where);
    free(h);
}

char *hx_host_shell_quote(const char *s)
{
    size_t n = 2;
    for (const char *p = s; *p; p++)
        n += *p == '\'' ? 4 : 1;
    char *q = malloc(n + 1), *o = q;
    if (!q)
        return NULL;
    *o++ = '\'';
    for (const char *p = s; *p; p++) {
        if (*p == '\'') {
            memcpy(o, "'\\''", 4);
            o += 4;
        } else {
            *o++ = *p;
        }
    }
    *o++ = '\'';
    *o = '\0';
    return q;
}

double hx_host_idle_deadline(const hx_host_exec *x, double last_progress, double input_done_at,
                             int *kind)
{
    if (x->finish_s > 0 && input_done_at > 0) {
        *kind = HX_HOST_FINISH_LATE;
        return input_done_at + x->finish_s;
    }
    *kind = HX_HOST_STALLED;
    return x->stall_s > 0 ? last_progress + x->stall_s : 0;
}

hx_status hx_host_timeout_err(const hx_host *h, const hx_host_exec *x, int kind,
                              double elapsed_s, hx_err *err)
{
    char cmd[160], last[256];
    const char *sep;
    hx_host_cmd_abbrev(x->command, cmd, sizeof cmd);
    hx_host_last_line(&x->errb, last, sizeof last);
    sep = last[0] ? "; its stderr ends: " : "";
    if (kind == HX_HOST_STALLED)
        return hx_err_set(err, HX_ETIMEDOUT,
                          "command '%s' on host '%s' (%s) made no progress for %.1f s and was "
                          "stopped%s%s",
                          cmd, h->name, h->where, x->stall_s, sep, last);
    if (kind == HX_HOST_FINISH_LATE)
        return hx_err_set(err, HX_ETIMEDOUT,
                          "command '%s' on host '%s' (%s) did not finish within %.1f s after its "
                          "input ended and was stopped%s%s",
                          cmd, h->name, h->where, x->finish_s, sep, last);
    return hx_err_set(err, HX_ETIMEDOUT,
                      "command '%s' on host '%s' (%s) timed out after %.1f s and was killed%s%s",
                      cmd, h->name, h->where, elapsed_s > x->timeout_s ? x->timeout_s : elapsed_s,
                      sep, last);
}

hx_status hx_host_run(hx_host *h, const char *command, const void *stdin_data,
                      size_t stdin_len, char **out_stdout, char **out_stderr,
                      int *exit_status, double timeout_s, hx_err *err)
{
    if (out_stdout)
        *out_stdout = NULL;
    if (out_stderr)
        *out_stderr = NULL;
    if (exit_status)
        *exit_status = -1;
    if (!h || !command || (stdin_len && !stdin_data))
        return hx_err_set(err, HX_EINVAL, "hx_host_run: bad arguments");

    hx_host_input in = {.data = stdin_data, .len = stdin_len, .fd = -1};
    hx_host_exec x = {.command = command, .input = &in, .timeout_s = timeout_s};
    hx_status st = h->ops->exec(h, &x, err);
    if (st != HX_OK)
        goto out;
    if (out_stdout && !(*out_stdout = hx_host_buf_take(&x.out))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    if (out_stderr && !(*out_stderr = hx_host_buf_take(&x.errb))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        if (out_stdout) {
            free(*out_stdout);
            *out_stdout = NULL;
        }
        goto out;
    }
    if (exit_status)
        *exit_status = x.exit_status;
out:
    hx_host_buf_release(&x.out);
    hx_host_buf_release(&x.errb);
    return st;
}

hx_status hx_host_run_checked(hx_host *h, const char *command, const void *stdin_data,
                              size_t stdin_len, char **out_stdout, double timeout_s,
                              hx_err *err)
{
    char *out = NULL, *errs = NULL;
    int status = -1;
    if (out_stdout)
        *out_stdout = NULL;
    hx_status st = hx_host_run(h, command, stdin_data, stdin_len, &out, &errs, &status,
                               timeout_s, err);
    if (st != HX_OK)
        return st;
    if (status != 0) {
        char cmd[160], last[256];
        hx_host_buf b = {.data = errs, .len = strlen(errs)};
        hx_host_cmd_abbrev(command, cmd, sizeof cmd);
        hx_host_last_line(&b, last, sizeof last);
        if (status < 0)
            st = hx_err_set(err, HX_EIO, "command '%s' on host '%s' (%s) was killed by a signal%s%s",
                            cmd, h->name, h->where, last[0] ? ": " : "", last);
        else
            st = hx_err_set(err, HX_EIO, "command '%s' failed on host '%s' (%s) (exit status %d)%s%s",
                            cmd, h->name, h->where, status, last[0] ? ": " : "", last);
        free(out);
        free(errs);
        return st;
    }
    free(errs);
    if (out_stdout)
        *out_stdout = out;
    else
        free(out);
    return HX_OK;
}

/* ---- SHA-256 and push ----------------------------------------------------- */

static hx_status sha256_fd(int fd, const char *path, char hex_out[65], hx_err *err)
{
    hx_status st = HX_OK;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    const size_t buf_bytes = (size_t)1 << 20;
    unsigned char *buf = malloc(buf_bytes);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!buf || !ctx) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    if (!EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)) {
        st = hx_err_set(err, HX_EINTERNAL, "cannot hash '%s': OpenSSL SHA-256 unavailable", path);
        goto out;
    }
    for (;;) {
        ssize_t r = read(fd, buf, buf_bytes);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = hx_err_set(err, HX_EIO, "cannot read '%s': %s", path, hx_errno_text(errno));
            goto out;
        }
        if (r == 0)
            break;
        EVP_DigestUpdate(ctx, buf, (size_t)r);
    }
    EVP_DigestFinal_ex(ctx, md, &md_len);
    for (unsigned int i = 0; i < md_len && i < 32; i++)
        snprintf(hex_out + 2 * i, 3, "%02x", md[i]);
    hex_out[64] = '\0';
out:
    EVP_MD_CTX_free(ctx);
    free(buf);
    return st;
}

hx_status hx_host_sha256_file(const char *path, char hex_out[65], hx_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return hx_err_set(err, errno == ENOENT ? HX_ENOENT : HX_EIO, "cannot read '%s': %s", path,
                          hx_errno_text(errno));
    hx_status st = sha256_fd(fd, path, hex_out, err);
    close(fd);
    return st;
}

/* Remote path safe to put after a command: "./-x" for "-x"; the caller frees. */
static char *quote_path(const char *path)
{
    if (path[0] != '-')
        return hx_host_shell_quote(path);
    size_t n = strlen(path);
    char *p = malloc(n + 3);
    if (!p)
        return NULL;
    memcpy(p, "./", 2);
    memcpy(p + 2, path, n + 1);
    char *q = hx_host_shell_quote(p);
    free(p);
    return q;
}

hx_status hx_host_push(hx_host *h, const char *local_path, const char *remote_path, int mode,
                       int *skipped, hx_err *err)
{
    hx_status st = HX_OK;
    char hex[65];
    char *qpath = NULL, *cmd = NULL, *out = NULL;
    int fd = -1;
    hx_host_input in = {.fd = -1};
    hx_host_exec x = {0};
    struct stat sb;

    if (skipped)
        *skipped = 0;
    if (!h || !local_path || !remote_path || !remote_path[0] || mode < 0 || mode > 07777)
        return hx_err_set(err, HX_EINVAL, "hx_host_push: bad arguments");

    fd = open(local_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return hx_err_set(err, errno == ENOENT ? HX_ENOENT : HX_EIO, "cannot push '%s': %s",
                          local_path, hx_errno_text(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = hx_err_set(err, HX_EINVAL, "cannot push '%s': not a regular file", local_path);
        goto out;
    }
    if ((st = sha256_fd(fd, local_path, hex, err)) != HX_OK)
        goto out;
    if (!(qpath = quote_path(remote_path))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }

    /* 1. Same checksum there already? Then only fix the mode. */
    size_t cap = 2 * strlen(qpath) + 256;
    if (!(cmd = malloc(cap))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    snprintf(cmd, cap,
             "h=$(sha256sum < %s 2>/dev/null) && [ \"${h%%%% *}\" = %s ] && chmod %o %s && "
             "echo hx-same",
             qpath, hex, (unsigned)mode, qpath);
    /* sha256sum on the host reads the whole file: allow 50 MB/s for it */
    double hash_s = 60.0 + (double)sb.st_size / 50e6;
    if ((st = hx_host_run(h, cmd, NULL, 0, &out, NULL, NULL, hash_s, err)) != HX_OK)
        goto out_prefix;
    if (strstr(out, "hx-same")) {
        if (skipped)
            *skipped = 1;
        goto out;
    }

    /* 2. Stream into a temporary file beside the target, check, rename. */
    free(cmd);
    cap = 3 * strlen(qpath) + 1024;
    if (!(cmd = malloc(cap))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    snprintf(cmd, cap,
             "set -e; t=; trap '[ -z \"$t\" ] || rm -f \"$t\"' EXIT; "
             "d=$(dirname %s); b=$(basename %s); mkdir -p \"$d\"; "
             "t=$(mktemp \"$d/.$b.hxtmp.XXXXXX\"); cat > \"$t\"; "
             "h=$(sha256sum < \"$t\"); "
             "if [ \"${h%%%% *}\" != %s ]; then "
             "echo \"checksum mismatch after the copy (incomplete transfer)\" >&2; exit 3; fi; "
             "chmod %o \"$t\"; mv -f \"$t\" %s; t=",
             qpath, qpath, hex, (unsigned)mode, qpath);
    if (lseek(fd, 0, SEEK_SET) != 0) {
        st = hx_err_set(err, HX_EIO, "cannot read '%s': %s", local_path, hx_errno_text(errno));
        goto out;
    }
    in.fd = fd;
    if (!(in.chunk = malloc(HX_HOST_CHUNK_BYTES))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    x.command = cmd;
    x.input = &in;
    x.stall_s = h->stall_s;
    x.finish_s = hash_s; /* the check of the copy on the host */
    st = h->ops->exec(h, &x, err);
    if (in.read_errno) {
        st = hx_err_set(err, HX_EIO, "cannot push '%s': read failed: %s", local_path,
                        hx_errno_text(in.read_errno));
        goto out;
    }
    if (st != HX_OK)
        goto out_prefix;
    if (x.exit_status != 0) {
        char last[512];
        hx_host_last_line(&x.errb, last, sizeof last);
        st = hx_err_set(err, HX_EIO, "cannot push '%s' to host '%s' (%s) as '%s': %s", local_path,
                        h->name, h->where, remote_path,
                        last[0] ? last : (x.exit_status < 0 ? "killed by a signal" : "failed"));
        goto out;
    }
    goto out;
out_prefix:
    /* keep the back end's message, but say what was being done */
    if (err) {
        char tmp[sizeof err->msg];
        snprintf(tmp, sizeof tmp, "%s", err->msg);
        hx_err_set(err, st, "cannot push '%s' to host '%s' as '%s': %s", local_path, h->name,
                   remote_path, tmp);
    }
out:
    hx_host_buf_release(&x.out);
    hx_host_buf_release(&x.errb);
    free(in.chunk);
    free(out);
    free(cmd);
    free(qpath);
    if (fd >= 0)
        close(fd);
    return st;
}
