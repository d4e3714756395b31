#define _POSIX_C_SOURCE 200809L
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

hx_status hx_file_read_all(const char *path, const char *what, size_t max_bytes, char **out,
                           size_t *out_len, hx_err *err)
{
    hx_status st = HX_OK;
    char *buf = NULL;
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return hx_err_set(err, hx_status_from_errno(e) == HX_ENOENT ? HX_ENOENT : HX_EIO,
                          "cannot open %s '%s': %s", what, path, hx_errno_text(e));
    }
    if (fstat(fd, &sb) != 0) {
        st = hx_err_set(err, HX_EIO, "cannot read %s '%s': %s", what, path, strerror(errno));
        goto out_close;
    }
    if (S_ISDIR(sb.st_mode)) {
        st = hx_err_set(err, HX_EINVAL, "cannot open %s '%s': is a directory", what, path);
        goto out_close;
    }
    size_t cap = S_ISREG(sb.st_mode) ? (size_t)sb.st_size + 1 : 65536;
    if (S_ISREG(sb.st_mode) && (size_t)sb.st_size > max_bytes) {
        st = hx_err_set(err, HX_EINVAL, "%s '%s' is too large (%lld bytes; at most %zu)", what,
                        path, (long long)sb.st_size, max_bytes);
        goto out_close;
    }
    buf = malloc(cap);
    if (!buf) {
        st = hx_err_set(err, HX_ENOMEM, "cannot read %s '%s': out of memory", what, path);
        goto out_close;
    }
    size_t len = 0;
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > max_bytes) {
                st = hx_err_set(err, HX_EINVAL, "%s '%s' is too large (at most %zu bytes)",
                                what, path, max_bytes);
                goto out_free;
            }
            char *n = realloc(buf, cap * 2);
            if (!n) {
                st = hx_err_set(err, HX_ENOMEM, "cannot read %s '%s': out of memory", what,
                                path);
                goto out_free;
            }
            buf = n;
            cap *= 2;
        }
        ssize_t k = read(fd, buf + len, cap - 1 - len);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            st = hx_err_set(err, HX_EIO, "cannot read %s '%s': %s", what, path,
                            strerror(errno));
            goto out_free;
        }
        if (k == 0)
            break;
        len += (size_t)k;
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len)
        *out_len = len;
    buf = NULL;
out_free:
    free(buf);
out_close:
    close(fd);
    return st;
}

hx_status hx_file_write_atomic(const char *path, const void *data, size_t len, hx_err *err)
{
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    if (!tmp)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    snprintf(tmp, plen + 16, "%s.tmp.XXXXXX", path);
    hx_status st = HX_OK;
    int fd = mkstemp(tmp);
    if (fd < 0) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, hx_errno_text(errno));
        goto out_free;
    }
    (void)fchmod(fd, 0644);
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t k = write(fd, p, left);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
            goto out_unlink;
        }
        p += k;
        left -= (size_t)k;
    }
    if (fsync(fd) != 0 && errno != EINVAL) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
        goto out_unlink;
    }
    if (close(fd) != 0) {
        fd = -1;
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
        goto out_unlink;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, hx_errno_text(errno));
        goto out_unlink;
    }
    goto out_free;
out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
out_free:
    free(tmp);
    return st;
}

int hx_file_is_text(const char *data, size_t len, int *bad_line, int *bad_col,
                    size_t *bad_offset)
{
    int line = 1, col = 1;
    size_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)data[i];
        size_t n = 0;
        if (c == 0)
            goto bad;
        if (c < 0x80)
            n = 1;
        else if ((c & 0xE0) == 0xC0 && c >= 0xC2)
            n = 2;
        else if ((c & 0xF0) == 0xE0)
            n = 3;
        else if ((c & 0xF8) == 0xF0 && c <= 0xF4)
            n = 4;
        else
            goto bad;
        if (i + n > len)
            goto bad;
        for (size_t k = 1; k < n; k++)
            if (((unsigned char)data[i + k] & 0xC0) != 0x80)
                goto bad;
        if (c < 0x20 && c != '\n' && c != '\r' && c != '\t')
            goto bad;
        if (c == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
        i += n;
    }
    return 1;
bad:
    if (bad_line)
        *bad_line = line;
    if (bad_col)
        *bad_col = col;
    if (bad_offset)
        *bad_offset = i;
    return 0;
}

int hx_file_is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int hx_file_is_regular(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}
