/*
 * buf.h - a growable, always NUL-terminated byte buffer for building text
 * (HTTP bodies, JSON, Prometheus exposition).
 *
 * A zeroed hx_buf is empty and ready. Appending never fails loudly: when
 * memory runs out the buffer sets `oom`, ignores further appends, and the
 * caller checks `oom` once at the end. Plain value; p is owned (release it
 * with hx_buf_release).
 */
#ifndef HX_BUF_H
#define HX_BUF_H

#include <stddef.h>

typedef struct hx_buf {
    char *p;    /* owned; NUL-terminated once anything was appended; NULL before */
    size_t len; /* bytes, without the NUL */
    size_t cap;
    int oom;    /* 1 after an allocation failed */
} hx_buf;

/* Makes room for `more` bytes (and the NUL). */
void hx_buf_reserve(hx_buf *b, size_t more);
void hx_buf_put(hx_buf *b, const void *p, size_t n);
void hx_buf_puts(hx_buf *b, const char *s);
void hx_buf_putc(hx_buf *b, char c);
void hx_buf_printf(hx_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the first n bytes. */
void hx_buf_consume(hx_buf *b, size_t n);
/* Frees p and empties the buffer. */
void hx_buf_release(hx_buf *b);

#endif /* HX_BUF_H */
