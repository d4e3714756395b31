/*
 * bufpool.h - a small pool of reusable buffers, for memory that costs more
 * to make or to free than to keep: page-locked host memory (making it takes
 * longer than the copy it speeds up), device memory (a free waits for the
 * whole GPU).
 *
 * The pool has at most HX_BUFPOOL_ENTRIES entries holding at most max_bytes
 * in all, in use or not. hx_bufpool_get hands out the smallest free entry
 * that fits; when none does, it allocates a new buffer with the pool's
 * alloc callback (outside the lock) and keeps it as an entry while the pool
 * has room for it (an entry and its bytes), else hands it out apart.
 * hx_bufpool_put marks an entry free again, and frees a buffer handed out
 * apart with the free callback (outside the lock). Entries live until
 * hx_bufpool_release. Sizes are taken as asked: a caller that wants entries
 * to fit more requests rounds them up first.
 *
 *     hx_bufpool pool;
 *     hx_bufpool_init(&pool, (size_t)1 << 30, my_alloc, my_free, ctx);
 *     void *p;
 *     if (hx_bufpool_get(&pool, bytes, &p, &err) == HX_OK) {
 *         ...
 *         hx_bufpool_put(&pool, p);
 *     }
 *     hx_bufpool_release(&pool);
 *
 * Threads: get and put from any thread; init and release from one, with
 * nothing handed out. The callbacks run without the pool's lock held (the
 * caller's own locks, if it holds any, stay held).
 */
#ifndef HX_BUFPOOL_H
#define HX_BUFPOOL_H

#include <pthread.h>
#include <stddef.h>

#include "common/status.h"

#define HX_BUFPOOL_ENTRIES 16

/* A new buffer of `bytes` into *out (not NULL on HX_OK), or an error in err. */
typedef hx_status (*hx_bufpool_alloc_fn)(void *ctx, size_t bytes, void **out, hx_err *err);
/* Frees a buffer alloc made. */
typedef void (*hx_bufpool_free_fn)(void *ctx, void *buf);

/* Caller-owned storage; the fields are the module's (use the functions). */
typedef struct hx_bufpool {
    pthread_mutex_t mu;
    struct hx_bufpool_entry {
        void *p;    /* owned; NULL while its allocation is in progress */
        size_t cap; /* bytes */
        int state;  /* 0: empty slot, 1: free, 2: handed out (or being allocated) */
    } entries[HX_BUFPOOL_ENTRIES];
    size_t bytes;     /* the entries' caps, in use or not */
    size_t max_bytes;
    hx_bufpool_alloc_fn alloc;
    hx_bufpool_free_fn free;
    void *ctx;        /* borrowed; passed to the callbacks */
} hx_bufpool;

/* An empty pool holding at most max_bytes. ctx is borrowed for the pool's life. */
void hx_bufpool_init(hx_bufpool *pool, size_t max_bytes, hx_bufpool_alloc_fn alloc,
                     hx_bufpool_free_fn free_fn, void *ctx);
/* Frees every entry with the free callback; buffers still handed out are lost. */
void hx_bufpool_release(hx_bufpool *pool);

/*
 * A buffer of at least `bytes` into *out: the smallest free entry that fits,
 * or a new one of exactly `bytes`. On failure (the alloc callback's status
 * and message) *out is NULL.
 */
hx_status hx_bufpool_get(hx_bufpool *pool, size_t bytes, void **out, hx_err *err);
/* Gives buf back (NULL is a no-op); buf must be one hx_bufpool_get handed out. */
void hx_bufpool_put(hx_bufpool *pool, void *buf);

#endif /* HX_BUFPOOL_H */
