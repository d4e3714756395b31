/* buf.c - see buf.h. */
#include "common/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void hx_buf_reserve(hx_buf *b, size_t more)
{
    if (b->oom || b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

void hx_buf_put(hx_buf *b, const void *p, size_t n)
{
    hx_buf_reserve(b, n);
    if (b->oom)
        return;
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void hx_buf_puts(hx_buf *b, const char *s)
{
    hx_buf_put(b, s, strlen(s));
}

void hx_buf_putc(hx_buf *b, char c)
{
    hx_buf_put(b, &c, 1);
}

void hx_buf_printf(hx_buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        hx_buf_put(b, tmp, (size_t)n);
        return;
    }
    hx_buf_reserve(b, (size_t)n);
    if (b->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void hx_buf_consume(hx_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->p, b->p + n, b->len - n);
        b->len -= n;
    }
    if (b->p)
        b->p[b->len] = '\0';
}

void hx_buf_release(hx_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}
