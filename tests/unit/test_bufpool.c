/*
 * test_bufpool.c - the pool of reusable buffers: smallest fit, the entry and
 * byte caps, buffers apart, a failed allocation, many threads at once.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/bufpool.h"

/* The callbacks count what they did; fail_next makes the next allocation fail. */
typedef struct counts {
    atomic_int allocs, frees;
    int fail_next;
    _Atomic size_t last_alloc_bytes; /* written by the callbacks of several threads at once */
} counts;

static hx_status t_alloc(void *ctx, size_t bytes, void **out, hx_err *err)
{
    counts *c = ctx;
    if (c->fail_next) {
        c->fail_next = 0;
        return hx_err_set(err, HX_ENOMEM, "test: no memory for %zu bytes", bytes);
    }
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    c->last_alloc_bytes = bytes;
    atomic_fetch_add(&c->allocs, 1);
    return HX_OK;
}

static void t_free(void *ctx, void *buf)
{
    counts *c = ctx;
    atomic_fetch_add(&c->frees, 1);
    free(buf);
}

static void *get(hx_bufpool *pool, size_t bytes)
{
    void *p = NULL;
    hx_err e = {0};
    assert_int_equal(hx_bufpool_get(pool, bytes, &p, &e), HX_OK);
    assert_non_null(p);
    return p;
}

static void smallest_fit(void **state)
{
    (void)state;
    counts c = {0};
    hx_bufpool pool;
    hx_bufpool_init(&pool, 1 << 20, t_alloc, t_free, &c);
    void *a = get(&pool, 100), *b = get(&pool, 300), *d = get(&pool, 200);
    assert_int_equal(c.allocs, 3);
    assert_int_equal(atomic_load(&c.last_alloc_bytes), 200); /* sizes are taken as asked */
    hx_bufpool_put(&pool, a);
    hx_bufpool_put(&pool, b);
    hx_bufpool_put(&pool, d);
    assert_int_equal(c.frees, 0); /* entries stay */
    assert_ptr_equal(get(&pool, 150), d);
    assert_ptr_equal(get(&pool, 150), b);
    assert_ptr_equal(get(&pool, 0), a);
    assert_int_equal(c.allocs, 3);
    void *e = get(&pool, 10); /* none free: a new entry */
    assert_int_equal(c.allocs, 4);
    assert_true(e != a && e != b && e != d);
    hx_bufpool_put(&pool, NULL); /* a no-op */
    hx_bufpool_put(&pool, a);
    hx_bufpool_put(&pool, b);
    hx_bufpool_put(&pool, d);
    hx_bufpool_put(&pool, e);
    hx_bufpool_release(&pool);
    assert_int_equal(c.frees, 4);
}

static void byte_cap(void **state)
{
    (void)state;
    counts c = {0};
    hx_bufpool pool;
    hx_bufpool_init(&pool, 1000, t_alloc, t_free, &c);
    void *a = get(&pool, 600); /* an entry */
    void *b = get(&pool, 600); /* 1200 > 1000: apart */
    void *d = get(&pool, 400); /* 1000: an entry */
    void *e = get(&pool, 1);   /* 1001: apart */
    assert_int_equal(c.allocs, 4);
    hx_bufpool_put(&pool, b);
    assert_int_equal(c.frees, 1); /* apart: freed at once */
    hx_bufpool_put(&pool, e);
    assert_int_equal(c.frees, 2);
    hx_bufpool_put(&pool, a);
    hx_bufpool_put(&pool, d);
    assert_int_equal(c.frees, 2);
    /* both entries are free again; one that fits is reused, a bigger one goes apart */
    assert_ptr_equal(get(&pool, 500), a);
    void *big = get(&pool, 2000);
    assert_int_equal(c.allocs, 5);
    hx_bufpool_put(&pool, big);
    assert_int_equal(c.frees, 3);
    hx_bufpool_put(&pool, a);
    hx_bufpool_release(&pool);
    assert_int_equal(c.frees, 5);
    assert_int_equal(c.allocs, c.frees);
}

static void entry_cap(void **state)
{
    (void)state;
    counts c = {0};
    hx_bufpool pool;
    hx_bufpool_init(&pool, 1 << 20, t_alloc, t_free, &c);
    void *p[HX_BUFPOOL_ENTRIES + 2];
    for (int i = 0; i < HX_BUFPOOL_ENTRIES + 2; i++)
        p[i] = get(&pool, 64);
    for (int i = 0; i < HX_BUFPOOL_ENTRIES + 2; i++)
        hx_bufpool_put(&pool, p[i]);
    assert_int_equal(c.frees, 2); /* the two beyond the entries */
    for (int i = 0; i < HX_BUFPOOL_ENTRIES; i++) /* the entries, all reused */
        (void)get(&pool, 64);
    assert_int_equal(c.allocs, HX_BUFPOOL_ENTRIES + 2);
    hx_bufpool_release(&pool); /* frees entries still handed out too */
    assert_int_equal(c.frees, HX_BUFPOOL_ENTRIES + 2);
}

static void failed_alloc(void **state)
{
    (void)state;
    counts c = {0};
    hx_bufpool pool;
    hx_bufpool_init(&pool, 100, t_alloc, t_free, &c);
    void *p = (void *)&c;
    hx_err e = {0};
    c.fail_next = 1;
    assert_int_equal(hx_bufpool_get(&pool, 100, &p, &e), HX_ENOMEM);
    assert_null(p);
    assert_string_equal(e.msg, "test: no memory for 100 bytes");
    /* the room it had reserved is back: the next one of 100 bytes is an entry */
    void *a = get(&pool, 100);
    hx_bufpool_put(&pool, a);
    assert_int_equal(c.frees, 0);
    assert_ptr_equal(get(&pool, 100), a);
    hx_bufpool_put(&pool, a);
    hx_bufpool_release(&pool);
    assert_int_equal(c.allocs, 1);
    assert_int_equal(c.frees, 1);
}

/* Threads get and put at once; no buffer is handed to two of them. */
#define THREADS 8
#define ROUNDS 3000

typedef struct thread_arg {
    hx_bufpool *pool;
    int id;
    int bad;
} thread_arg;

static void *hammer(void *arg)
{
    thread_arg *t = arg;
    unsigned seed = (unsigned)t->id * 2654435761u + 1;
    for (int i = 0; i < ROUNDS; i++) {
        seed = seed * 1103515245u + 12345u;
        const size_t bytes = 64 + (seed >> 16) % 4096;
        void *p = NULL;
        hx_err e = {0};
        if (hx_bufpool_get(t->pool, bytes, &p, &e) != HX_OK) {
            t->bad++;
            continue;
        }
        memset(p, t->id, bytes);
        for (size_t k = 0; k < bytes; k += 61)
            if (((unsigned char *)p)[k] != (unsigned char)t->id)
                t->bad++;
        if (((unsigned char *)p)[bytes - 1] != (unsigned char)t->id)
            t->bad++;
        hx_bufpool_put(t->pool, p);
    }
    return NULL;
}

static void threads(void **state)
{
    (void)state;
    counts c = {0};
    hx_bufpool pool;
    hx_bufpool_init(&pool, 16 * 1024, t_alloc, t_free, &c);
    pthread_t th[THREADS];
    thread_arg ta[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ta[i] = (thread_arg){&pool, i + 1, 0};
        assert_int_equal(pthread_create(&th[i], NULL, hammer, &ta[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(ta[i].bad, 0);
    }
    /* what is still allocated is the entries */
    const int held = c.allocs - c.frees;
    assert_true(held >= 1 && held <= HX_BUFPOOL_ENTRIES);
    hx_bufpool_release(&pool);
    assert_int_equal(c.allocs, c.frees);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(smallest_fit), cmocka_unit_test(byte_cap),
        cmocka_unit_test(entry_cap),    cmocka_unit_test(failed_alloc),
        cmocka_unit_test(threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
