/* bufpool.c - a small pool of reusable buffers; see bufpool.h. */
#include "common/bufpool.h"

#include <string.h>

enum { SLOT_EMPTY = 0, SLOT_FREE = 1, SLOT_IN_USE = 2 };

void hx_bufpool_init(hx_bufpool *pool, size_t max_bytes, hx_bufpool_alloc_fn alloc,
                     hx_bufpool_free_fn free_fn, void *ctx)
{
    memset(pool, 0, sizeof *pool);
    pthread_mutex_init(&pool->mu, NULL);
    pool->max_bytes = max_bytes;
    pool->alloc = alloc;
    pool->free = free_fn;
    pool->ctx = ctx;
}

void hx_bufpool_release(hx_bufpool *pool)
{
    for (int i = 0; i < HX_BUFPOOL_ENTRIES; i++)
        if (pool->entries[i].state != SLOT_EMPTY && pool->entries[i].p)
            pool->free(pool->ctx, pool->entries[i].p);
    pthread_mutex_destroy(&pool->mu);
    memset(pool, 0, sizeof *pool);
}

hx_status hx_bufpool_get(hx_bufpool *pool, size_t bytes, void **out, hx_err *err)
{
    *out = NULL;
    pthread_mutex_lock(&pool->mu);
    struct hx_bufpool_entry *best = NULL, *empty = NULL;
    for (int i = 0; i < HX_BUFPOOL_ENTRIES; i++) {
        struct hx_bufpool_entry *e = &pool->entries[i];
        if (e->state == SLOT_EMPTY && !empty)
            empty = e;
        if (e->state == SLOT_FREE && e->cap >= bytes && (!best || e->cap < best->cap))
            best = e;
    }
    if (best) {
        best->state = SLOT_IN_USE;
        *out = best->p;
        pthread_mutex_unlock(&pool->mu);
        return HX_OK;
    }
    /* a new entry when there is room: reserve its slot (stays put) and bytes now, allocate
       outside the lock */
    struct hx_bufpool_entry *slot =
        empty && bytes <= pool->max_bytes - pool->bytes ? empty : NULL;
    if (slot) {
        *slot = (struct hx_bufpool_entry){NULL, bytes, SLOT_IN_USE};
        pool->bytes += bytes;
    }
    pthread_mutex_unlock(&pool->mu);
    void *p = NULL;
    hx_status st = pool->alloc(pool->ctx, bytes, &p, err);
    if (slot) {
        pthread_mutex_lock(&pool->mu);
        if (st == HX_OK) {
            slot->p = p;
        } else { /* give the room back */
            pool->bytes -= bytes;
            *slot = (struct hx_bufpool_entry){NULL, 0, SLOT_EMPTY};
        }
        pthread_mutex_unlock(&pool->mu);
    }
    if (st == HX_OK)
        *out = p;
    return st;
}

void hx_bufpool_put(hx_bufpool *pool, void *buf)
{
    if (!buf)
        return;
    pthread_mutex_lock(&pool->mu);
    for (int i = 0; i < HX_BUFPOOL_ENTRIES; i++)
        if (pool->entries[i].state == SLOT_IN_USE && pool->entries[i].p == buf) {
            pool->entries[i].state = SLOT_FREE;
            pthread_mutex_unlock(&pool->mu);
            return;
        }
    pthread_mutex_unlock(&pool->mu);
    pool->free(pool->ctx, buf); /* handed out apart */
}
