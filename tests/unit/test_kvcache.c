/*
 * test_kvcache.c - the paged KV cache: the block allocator (exhaustion,
 * reuse, no leaks), appends across block boundaries, KV segments (round
 * trips, header validation), heads across TP ranks, resharding between
 * layouts, and the paged attention kernel against hx_cpu_attention.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/paged.h"
#include "runtime/kvcache.h"
#include "runtime/safetensors.h"

/* ---- helpers --------------------------------------------------------------------------------- */

static hx_kvcache *new_cache(int layers, int heads, int d, int bt, int blocks)
{
    hx_kvcache *c = NULL;
    hx_err err = {0};
    if (hx_kvcache_new(layers, heads, d, bt, blocks, &c, &err) != HX_OK)
        fail_msg("hx_kvcache_new: %s", err.msg);
    return c;
}

static void check_ok(const hx_kvcache *c)
{
    hx_err err = {0};
    if (hx_kvcache_check(c, &err) != HX_OK)
        fail_msg("invariants: %s", err.msg);
}

static int new_seq(hx_kvcache *c)
{
    int s = -1;
    hx_err err = {0};
    if (hx_kvcache_alloc_seq(c, &s, &err) != HX_OK)
        fail_msg("alloc_seq: %s", err.msg);
    return s;
}

static void append(hx_kvcache *c, int seq, int n)
{
    hx_err err = {0};
    if (hx_kvcache_append(c, seq, n, &err) != HX_OK)
        fail_msg("append %d to %d: %s", n, seq, err.msg);
}

/* A value that names (layer, kv, head, pos, i), model-wide, so misplaced copies show. */
static float val(int layer, int kv, int head, int pos, int i)
{
    return (float)(layer * 100000 + kv * 50000 + head * 1000 + pos * 10 + i % 10) +
           (float)i * 0.001f;
}

/* Fills positions [from, to) of seq with val(), using the cache's origin. */
static void fill(hx_kvcache *c, int seq, int from, int to)
{
    const int L = hx_kvcache_layers(c), K = hx_kvcache_kv_heads(c), d = hx_kvcache_head_dim(c);
    const int l0 = hx_kvcache_layer_first(c), h0 = hx_kvcache_head_first(c);
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < K; h++)
                for (int p = from; p < to; p++) {
                    float *row = hx_kvcache_row(c, seq, l, kv, h, p);
                    assert_non_null(row);
                    for (int i = 0; i < d; i++)
                        row[i] = val(l0 + l, kv, h0 + h, p, i);
                }
}

/* Checks every position of seq holds val() (model-wide indices via the origin). */
static void expect_filled(const hx_kvcache *c, int seq)
{
    const int L = hx_kvcache_layers(c), K = hx_kvcache_kv_heads(c), d = hx_kvcache_head_dim(c);
    const int l0 = hx_kvcache_layer_first(c), h0 = hx_kvcache_head_first(c);
    const int T = hx_kvcache_seq_tokens(c, seq);
    float *k = malloc((size_t)T * d * sizeof *k), *v = malloc((size_t)T * d * sizeof *v);
    assert_non_null(k);
    assert_non_null(v);
    hx_err err = {0};
    for (int l = 0; l < L; l++)
        for (int h = 0; h < K; h++) {
            assert_int_equal(hx_kvcache_gather(c, seq, l, h, k, v, &err), HX_OK);
            for (int p = 0; p < T; p++)
                for (int i = 0; i < d; i++) {
                    if (k[(size_t)p * d + i] != val(l0 + l, 0, h0 + h, p, i) ||
                        v[(size_t)p * d + i] != val(l0 + l, 1, h0 + h, p, i))
                        fail_msg("layer %d head %d pos %d [%d]: %g %g, expected %g %g",
                                 l0 + l, h0 + h, p, i, (double)k[(size_t)p * d + i],
                                 (double)v[(size_t)p * d + i],
                                 (double)val(l0 + l, 0, h0 + h, p, i),
                                 (double)val(l0 + l, 1, h0 + h, p, i));
                }
        }
    free(k);
    free(v);
}

/* Packs a range of seq into a fresh malloc'd buffer (caller frees); *size its bytes. */
static void *pack(const hx_kvcache *c, int seq, int l0, int nl, int h0, int nh, size_t *size)
{
    size_t n = hx_kv_segment_bytes(HX_KV_DTYPE_F32, nl, nh, hx_kvcache_seq_tokens(c, seq),
                                   hx_kvcache_head_dim(c));
    assert_true(n > 0);
    void *buf = malloc(n + 4);
    assert_non_null(buf);
    hx_err err = {0};
    if (hx_kvcache_pack(c, seq, l0, nl, h0, nh, buf, n, size, &err) != HX_OK)
        fail_msg("pack: %s", err.msg);
    assert_int_equal(*size, n);
    return buf;
}

/* ---- the allocator --------------------------------------------------------------------------- */

static void test_new_errors(void **state)
{
    (void)state;
    hx_kvcache *c = NULL;
    hx_err err = {0};
    assert_int_equal(hx_kvcache_new(0, 2, 4, 4, 8, &c, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "layers 0"));
    assert_int_equal(hx_kvcache_new(1, 2, 4, 0, 8, &c, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_new(1, 2, 4, 4, -1, &c, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_new(1 << 20, 1 << 10, 1 << 10, 1 << 10, 1 << 20, &c, &err),
                     HX_ERANGE);
    hx_kvcache_free(NULL);

    c = new_cache(2, 3, 4, 5, 7);
    assert_int_equal(hx_kvcache_layers(c), 2);
    assert_int_equal(hx_kvcache_kv_heads(c), 3);
    assert_int_equal(hx_kvcache_head_dim(c), 4);
    assert_int_equal(hx_kvcache_block_tokens(c), 5);
    assert_int_equal(hx_kvcache_max_blocks(c), 7);
    assert_int_equal(hx_kvcache_block_bytes(c), 2 * 2 * 3 * 5 * 4 * 4);
    assert_int_equal(hx_kvcache_tokens_free(c), 35);
    assert_int_equal(hx_kvcache_set_origin(c, -1, 0, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_set_origin(c, 4, 6, &err), HX_OK);
    assert_int_equal(hx_kvcache_layer_first(c), 4);
    assert_int_equal(hx_kvcache_head_first(c), 6);
    hx_kvcache_free(c);
}

static void test_allocator(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_kvcache *c = new_cache(2, 2, 4, 4, 8); /* 8 blocks of 4 tokens */
    assert_int_equal(hx_kvcache_blocks_for(c, 0), 0);
    assert_int_equal(hx_kvcache_blocks_for(c, 1), 1);
    assert_int_equal(hx_kvcache_blocks_for(c, 4), 1);
    assert_int_equal(hx_kvcache_blocks_for(c, 5), 2);

    int a = new_seq(c), b = new_seq(c);
    assert_int_not_equal(a, b);
    assert_int_equal(hx_kvcache_seq_count(c), 2);
    assert_int_equal(hx_kvcache_seq_tokens(c, a), 0);
    assert_int_equal(hx_kvcache_seq_blocks(c, a, NULL, 0), 0);

    /* appends across block boundaries take blocks only when a block fills */
    assert_int_equal(hx_kvcache_blocks_needed(c, a, 3), 1);
    append(c, a, 3);
    assert_int_equal(hx_kvcache_blocks_free(c), 7);
    assert_int_equal(hx_kvcache_blocks_needed(c, a, 1), 0);
    append(c, a, 1); /* fills block 0 exactly */
    assert_int_equal(hx_kvcache_blocks_free(c), 7);
    assert_int_equal(hx_kvcache_blocks_needed(c, a, 1), 1);
    append(c, a, 1);
    assert_int_equal(hx_kvcache_blocks_free(c), 6);
    append(c, b, 9); /* 3 blocks at once */
    assert_int_equal(hx_kvcache_blocks_free(c), 3);
    append(c, a, 0);
    assert_int_equal(hx_kvcache_seq_tokens(c, a), 5);
    assert_int_equal(hx_kvcache_seq_tokens(c, b), 9);
    int tbl[8];
    assert_int_equal(hx_kvcache_seq_blocks(c, a, tbl, 8), 2);
    assert_int_equal(tbl[0], 0); /* first-time blocks come in ascending order */
    assert_int_equal(tbl[1], 1);
    assert_int_equal(hx_kvcache_seq_blocks(c, b, tbl, 1), 3); /* cap 1: one written */
    assert_int_equal(tbl[0], 2);
    check_ok(c);

    /* exhaustion: all or nothing */
    assert_int_equal(hx_kvcache_blocks_needed(c, a, 16), 4);
    assert_int_equal(hx_kvcache_append(c, a, 16, &err), HX_ENOMEM);
    assert_non_null(strstr(err.msg, "need 4 blocks"));
    assert_non_null(strstr(err.msg, "3 of 8 are free"));
    assert_int_equal(hx_kvcache_seq_tokens(c, a), 5);
    assert_int_equal(hx_kvcache_blocks_free(c), 3);
    check_ok(c);
    append(c, a, 15); /* exactly the 3 free blocks (5 + 15 = 20 = 5 blocks) */
    assert_int_equal(hx_kvcache_blocks_free(c), 0);
    assert_int_equal(hx_kvcache_tokens_free(c), 0);
    assert_int_equal(hx_kvcache_append(c, b, 4, &err), HX_ENOMEM);
    assert_int_equal(hx_kvcache_append(c, b, 3, &err), HX_OK); /* room left in b's last block */
    check_ok(c);

    /* bad arguments */
    assert_int_equal(hx_kvcache_append(c, 99, 1, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_append(c, -1, 1, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_append(c, a, -1, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_blocks_needed(c, 99, 1), -1);
    assert_int_equal(hx_kvcache_seq_blocks(c, 99, tbl, 8), -1);
    assert_null(hx_kvcache_row(c, a, 0, 0, 0, 20));
    assert_null(hx_kvcache_row(c, a, 2, 0, 0, 0));
    assert_null(hx_kvcache_row(c, a, 0, 2, 0, 0));
    assert_null(hx_kvcache_row(c, a, 0, 0, 2, 0));

    /* freeing returns the blocks; the last block freed is the first reused (LIFO) */
    int a_blocks[5];
    assert_int_equal(hx_kvcache_seq_blocks(c, a, a_blocks, 5), 5);
    hx_kvcache_free_seq(c, a);
    hx_kvcache_free_seq(c, a); /* no-op */
    hx_kvcache_free_seq(c, 1234);
    assert_int_equal(hx_kvcache_blocks_free(c), 5);
    assert_int_equal(hx_kvcache_seq_count(c), 1);
    check_ok(c);
    int a2 = new_seq(c);
    assert_int_equal(a2, a); /* the id is reused */
    append(c, a2, 1);
    assert_int_equal(hx_kvcache_seq_blocks(c, a2, tbl, 8), 1);
    assert_int_equal(tbl[0], a_blocks[4]);

    /* many sequences (the slot array grows), then no leaks */
    int ids[40];
    hx_kvcache_free_seq(c, a2);
    hx_kvcache_free_seq(c, b);
    for (int i = 0; i < 40; i++) {
        ids[i] = new_seq(c);
        if (i < 8)
            append(c, ids[i], 1 + i % 4);
    }
    assert_int_equal(hx_kvcache_seq_count(c), 40);
    assert_int_equal(hx_kvcache_blocks_free(c), 0);
    assert_int_equal(hx_kvcache_append(c, ids[9], 1, &err), HX_ENOMEM);
    check_ok(c);
    for (int i = 39; i >= 0; i -= 2)
        hx_kvcache_free_seq(c, ids[i]);
    check_ok(c);
    for (int i = 0; i < 40; i += 2)
        hx_kvcache_free_seq(c, ids[i]);
    assert_int_equal(hx_kvcache_seq_count(c), 0);
    assert_int_equal(hx_kvcache_blocks_free(c), 8);
    check_ok(c);
    hx_kvcache_free(c);
}

/* Two sequences growing in turns: their blocks interleave; every row stays where it was put. */
static void test_append_rows(void **state)
{
    (void)state;
    hx_kvcache *c = new_cache(3, 2, 5, 3, 64);
    int a = new_seq(c), b = new_seq(c);
    const int steps[6] = {1, 2, 4, 3, 7, 1};
    int ta = 0, tb = 0;
    for (int i = 0; i < 6; i++) {
        append(c, a, steps[i]);
        fill(c, a, ta, ta + steps[i]);
        ta += steps[i];
        append(c, b, steps[5 - i]);
        fill(c, b, tb, tb + steps[5 - i]);
        tb += steps[5 - i];
        expect_filled(c, a);
        expect_filled(c, b);
    }
    /* the block table and the row pointers agree */
    int tbl[64];
    int nb = hx_kvcache_seq_blocks(c, a, tbl, 64);
    assert_int_equal(nb, (ta + 2) / 3);
    for (int p = 0; p < ta; p++)
        assert_ptr_equal(hx_kvcache_row(c, a, 2, 1, 1, p),
                         hx_kvcache_block_data(c, tbl[p / 3], 2, 1, 1) + (size_t)(p % 3) * 5);
    check_ok(c);
    hx_kvcache_free(c);
}

/* ---- the checksum ---------------------------------------------------------------------------- */

/* CRC-32C bit by bit, from the definition. */
static uint32_t crc_bitwise(const unsigned char *p, size_t n)
{
    uint32_t r = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        r ^= p[i];
        for (int k = 0; k < 8; k++)
            r = (r >> 1) ^ (0x82f63b78u & (0u - (r & 1u)));
    }
    return ~r;
}

static void test_crc32c(void **state)
{
    (void)state;
    assert_int_equal(hx_kv_crc32c(0, "123456789", 9), 0xe3069283u); /* the check value */
    assert_int_equal(hx_kv_crc32c(0, "", 0), 0);
    enum { N = 4099 };
    unsigned char *buf = malloc(N + 8);
    assert_non_null(buf);
    uint64_t rs = 5;
    for (int i = 0; i < N + 8; i++) {
        rs = rs * 6364136223846793005ull + 1442695040888963407ull;
        buf[i] = (unsigned char)(rs >> 56);
    }
    /* every alignment and length class, and pieces chained */
    for (int off = 0; off < 8; off++)
        for (int n = 0; n < 40; n++)
            assert_int_equal(hx_kv_crc32c(0, buf + off, (size_t)n),
                             crc_bitwise(buf + off, (size_t)n));
    assert_int_equal(hx_kv_crc32c(0, buf + 3, N), crc_bitwise(buf + 3, N));
    assert_int_equal(hx_kv_crc32c(hx_kv_crc32c(0, buf + 3, 1001), buf + 1004, N - 1001),
                     crc_bitwise(buf + 3, N));
    free(buf);
}

/* ---- segments -------------------------------------------------------------------------------- */

static void test_pack_roundtrip(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_kvcache *src = new_cache(3, 4, 6, 4, 32);
    int s = new_seq(src);
    append(src, s, 11);
    fill(src, s, 0, 11);

    /* the whole cache into a cache of another block size */
    size_t n;
    void *seg = pack(src, s, 0, 3, 0, 4, &n);
    assert_int_equal(n, 64 + (size_t)3 * 2 * 4 * 11 * 6 * 4);
    hx_kv_segment g;
    assert_int_equal(hx_kv_segment_parse(seg, n, &g, &err), HX_OK);
    assert_int_equal(g.version, 1);
    assert_int_equal(g.dtype, HX_KV_DTYPE_F32);
    assert_int_equal(g.tokens, 11);
    assert_int_equal(g.num_layers, 3);
    assert_int_equal(g.num_heads, 4);
    assert_int_equal(g.head_dim, 6);
    /* payload layout: [layers][2][heads][tokens][head_dim] */
    assert_true(((const float *)g.payload)[(((size_t)(2 * 2 + 1) * 4 + 3) * 11 + 7) * 6 + 5] ==
                val(2, 1, 3, 7, 5));

    hx_kvcache *dst = new_cache(3, 4, 6, 5, 16);
    int t = new_seq(dst);
    assert_int_equal(hx_kvcache_unpack(dst, t, seg, n, &err), HX_OK);
    assert_int_equal(hx_kvcache_seq_tokens(dst, t), 11);
    expect_filled(dst, t);
    /* a second unpack of the same segment into the now-full sequence is fine */
    assert_int_equal(hx_kvcache_unpack(dst, t, seg, n, &err), HX_OK);
    expect_filled(dst, t);
    check_ok(dst);

    /* sub-ranges assemble the same cache, in any order */
    int u = new_seq(dst);
    size_t n1, n2, n3;
    void *s1 = pack(src, s, 1, 2, 2, 2, &n1); /* layers 1-2, heads 2-3 */
    void *s2 = pack(src, s, 0, 1, 0, 4, &n2); /* layer 0 */
    void *s3 = pack(src, s, 1, 2, 0, 2, &n3); /* layers 1-2, heads 0-1 */
    assert_int_equal(hx_kvcache_unpack(dst, u, s1, n1, &err), HX_OK);
    assert_int_equal(hx_kvcache_unpack(dst, u, s2, n2, &err), HX_OK);
    assert_int_equal(hx_kvcache_unpack(dst, u, s3, n3, &err), HX_OK);
    expect_filled(dst, u);

    /* a contiguous cache packs to the very same bytes */
    const int T = 16, L = 3, K = 4, d = 6;
    float *k = calloc((size_t)L * K * T * d, sizeof *k);
    float *v = calloc((size_t)L * K * T * d, sizeof *v);
    assert_non_null(k);
    assert_non_null(v);
    for (int l = 0; l < L; l++)
        for (int h = 0; h < K; h++)
            for (int p = 0; p < 11; p++)
                for (int i = 0; i < d; i++) {
                    k[(((size_t)l * K + h) * T + p) * d + i] = val(l, 0, h, p, i);
                    v[(((size_t)l * K + h) * T + p) * d + i] = val(l, 1, h, p, i);
                }
    hx_kv_contiguous cc = {k, v, 0, L, 0, K, T, d};
    void *cseg = malloc(n1);
    size_t cn = 0;
    assert_int_equal(hx_kv_pack_contiguous(&cc, 11, 1, 2, 2, 2, cseg, n1, &cn, &err), HX_OK);
    assert_int_equal(cn, n1);
    assert_memory_equal(cseg, s1, n1);
    assert_int_equal(hx_kv_pack_contiguous(&cc, 11, 1, 2, 2, 3, cseg, n1, &cn, &err), HX_EINVAL);
    assert_int_equal(hx_kv_pack_contiguous(&cc, 17, 1, 2, 2, 2, cseg, n1, &cn, &err), HX_EINVAL);
    assert_int_equal(hx_kv_pack_contiguous(&cc, 11, 1, 2, 2, 2, cseg, n1 - 1, &cn, &err),
                     HX_ERANGE);

    /* pack errors */
    void *buf = malloc(n + 4);
    assert_int_equal(hx_kvcache_pack(src, s, 0, 3, 0, 4, buf, n - 1, NULL, &err), HX_ERANGE);
    assert_non_null(strstr(err.msg, "holds"));
    assert_int_equal(hx_kvcache_pack(src, s, 0, 4, 0, 4, buf, n, NULL, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "not within"));
    assert_int_equal(hx_kvcache_pack(src, s, 0, 3, -1, 2, buf, n, NULL, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_pack(src, s, 0, 0, 0, 4, buf, n, NULL, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_pack(src, 77, 0, 3, 0, 4, buf, n, NULL, &err), HX_EINVAL);
    int empty = new_seq(src);
    assert_int_equal(hx_kvcache_pack(src, empty, 0, 3, 0, 4, buf, n, NULL, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_pack(src, s, 0, 3, 0, 4, (char *)buf + 1, n, NULL, &err),
                     HX_EINVAL); /* misaligned */

    free(buf);
    free(cseg);
    free(k);
    free(v);
    free(s1);
    free(s2);
    free(s3);
    free(seg);
    hx_kvcache_free(src);
    hx_kvcache_free(dst);
}

static void put32(void *seg, size_t off, uint32_t x)
{
    unsigned char *p = (unsigned char *)seg + off;
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(x >> (8 * i));
}

/* Expects `code` with `needle` in the message, unpacking seg[0..n) into a fresh sequence. */
static void expect_unpack_error(hx_kvcache *c, const void *seg, size_t n, hx_status code,
                                const char *needle)
{
    int s = new_seq(c);
    int free_before = hx_kvcache_blocks_free(c);
    hx_err err = {0};
    hx_status st = hx_kvcache_unpack(c, s, seg, n, &err);
    if (st != code || !strstr(err.msg, needle))
        fail_msg("unpack: got %d '%s', expected %d with '%s'", st, err.msg, code, needle);
    assert_int_equal(hx_kvcache_seq_tokens(c, s), 0); /* nothing changed */
    assert_int_equal(hx_kvcache_blocks_free(c), free_before);
    hx_kvcache_free_seq(c, s);
    check_ok(c);
}

static void test_header_validation(void **state)
{
    (void)state;
    hx_kvcache *src = new_cache(2, 2, 4, 4, 16);
    hx_kvcache_set_origin(src, 2, 2, NULL); /* layers 2-3, heads 2-3 of a bigger model */
    int s = new_seq(src);
    append(src, s, 6);
    fill(src, s, 0, 6);
    size_t n;
    unsigned char *good = pack(src, s, 2, 2, 2, 2, &n);
    unsigned char *bad = malloc(n + 8);
    assert_non_null(bad);
    hx_kvcache *dst = new_cache(2, 2, 4, 4, 16);
    hx_kvcache_set_origin(dst, 2, 2, NULL);
    hx_kv_segment g;
    hx_err err = {0};

#define RESET() memcpy(bad, good, n)
    RESET();
    bad[0] = 'X';
    expect_unpack_error(dst, bad, n, HX_EPARSE, "bad magic 58 58 4b 56");
    RESET();
    put32(bad, 4, 2);
    expect_unpack_error(dst, bad, n, HX_ENOTSUP, "version 2");
    RESET();
    put32(bad, 8, 32);
    expect_unpack_error(dst, bad, n, HX_EPARSE, "header_bytes 32");
    RESET();
    put32(bad, 12, 1); /* f16: not a segment dtype */
    expect_unpack_error(dst, bad, n, HX_EPARSE, "dtype 1");
    RESET();
    put32(bad, 20, 0);
    expect_unpack_error(dst, bad, n, HX_EPARSE, "num_layers 0");
    RESET();
    put32(bad, 32, 0x80000000u);
    expect_unpack_error(dst, bad, n, HX_EPARSE, "tokens 2147483648");
    RESET();
    put32(bad, 32, 5); /* counts disagree with payload_bytes */
    expect_unpack_error(dst, bad, n, HX_EPARSE, "payload_bytes");
    RESET();
    bad[52] = 1;
    expect_unpack_error(dst, bad, n, HX_EPARSE, "reserved field at offset 52");
    RESET();
    put32(bad, 48, 0x80000000u);
    expect_unpack_error(dst, bad, n, HX_EPARSE, "token_first 2147483648 at offset 48");
    RESET();
    put32(bad, 48, 0x7ffffffeu);
    expect_unpack_error(dst, bad, n, HX_EPARSE, "passes INT_MAX");
    /* truncated: in the header, in the payload; trailing bytes */
    RESET();
    expect_unpack_error(dst, bad, 63, HX_EPARSE, "truncated");
    expect_unpack_error(dst, bad, 0, HX_EPARSE, "truncated");
    expect_unpack_error(dst, NULL, n, HX_EPARSE, "truncated");
    expect_unpack_error(dst, bad, n - 1, HX_EPARSE, "truncated");
    expect_unpack_error(dst, bad, n + 8, HX_EPARSE, "8 trailing bytes");
    /* checksum: a payload byte, a header field (in range), the checksum itself */
    RESET();
    bad[64 + 100] ^= 0x01;
    expect_unpack_error(dst, bad, n, HX_EPARSE, "checksum mismatch");
    RESET();
    put32(bad, 24, 3); /* head_first 2 -> 3: still a valid-looking header */
    assert_int_equal(hx_kv_segment_parse(bad, n, &g, &err), HX_EPARSE);
    assert_non_null(strstr(err.msg, "checksum"));
    RESET();
    bad[60] ^= 0x80;
    expect_unpack_error(dst, bad, n, HX_EPARSE, "checksum mismatch");

    /* well-formed segments that do not fit the receiving cache */
    hx_kvcache *wrong = new_cache(2, 2, 4, 4, 16); /* origin (0, 0): layers 0-1, heads 0-1 */
    expect_unpack_error(wrong, good, n, HX_EINVAL, "layers [2, 4), heads [2, 4) are not within");
    hx_kvcache_set_origin(wrong, 2, 1, NULL); /* heads 1-2 */
    expect_unpack_error(wrong, good, n, HX_EINVAL, "not within the cache's layers [2, 4), "
                                                  "heads [1, 3)");
    hx_kvcache_set_origin(wrong, 3, 2, NULL); /* layers 3-4 */
    expect_unpack_error(wrong, good, n, HX_EINVAL, "not within");
    hx_kvcache *wrong_d = new_cache(2, 2, 8, 4, 16);
    hx_kvcache_set_origin(wrong_d, 2, 2, NULL);
    expect_unpack_error(wrong_d, good, n, HX_EINVAL, "head_dim 4, the cache's is 8");
    hx_kvcache *small = new_cache(2, 2, 4, 4, 1); /* 6 tokens need 2 blocks */
    hx_kvcache_set_origin(small, 2, 2, NULL);
    expect_unpack_error(small, good, n, HX_ENOMEM, "need 2 blocks");
    /* a sequence already longer than the segment keeps its length */
    int t = new_seq(dst);
    append(dst, t, 7);
    assert_int_equal(hx_kvcache_unpack(dst, t, good, n, &err), HX_OK);
    assert_int_equal(hx_kvcache_seq_tokens(dst, t), 7);
    assert_true(hx_kvcache_row(dst, t, 1, 1, 1, 5)[3] == val(3, 1, 3, 5, 3));
    assert_int_equal(hx_kvcache_unpack(dst, 99, good, n, &err), HX_EINVAL);

    /* and the good one still goes in */
    int u = new_seq(dst);
    assert_int_equal(hx_kvcache_unpack(dst, u, good, n, &err), HX_OK);
    expect_filled(dst, u);
    assert_int_equal(hx_kv_segment_bytes(HX_KV_DTYPE_F32, 0, 1, 1, 1), 0);
    assert_int_equal(hx_kv_segment_bytes(HX_KV_DTYPE_F32, 1 << 30, 1 << 30, 1 << 30, 1 << 30), 0);
    assert_int_equal(hx_kv_segment_bytes(1, 1, 1, 1, 1), 0); /* f16: not a segment dtype */
    assert_int_equal(hx_kv_segment_bytes(HX_KV_DTYPE_F32, 2, 3, 5, 8), 64 + 2 * 2 * 3 * 5 * 8 * 4);
    assert_int_equal(hx_kv_segment_bytes(HX_KV_DTYPE_BF16, 2, 3, 5, 8), 64 + 2 * 2 * 3 * 5 * 8 * 2);
#undef RESET
    free(good);
    free(bad);
    hx_kvcache_free(src);
    hx_kvcache_free(dst);
    hx_kvcache_free(wrong);
    hx_kvcache_free(wrong_d);
    hx_kvcache_free(small);
}

/*
 * A bf16 segment (what a GPU engine sends: its cache's values, half the
 * bytes of fp32) parses and unpacks into a fp32 cache widened exactly; its
 * size, dtype, alignment and checksum are checked like a fp32 one's.
 */
static void test_bf16_segment(void **state)
{
    (void)state;
    enum { L = 2, K = 3, D = 8, T = 9, L0 = 4, K0 = 1 };
    hx_err err = {0};
    const size_t n = hx_kv_segment_bytes(HX_KV_DTYPE_BF16, L, K, T, D);
    assert_int_equal(n, 64 + (size_t)L * 2 * K * T * D * 2);
    /* +2: room to misalign the whole segment by one bf16 */
    unsigned char *buf = malloc(n + 2);
    assert_non_null(buf);
    hx_kv_segment_begin(buf, HX_KV_DTYPE_BF16, L0, L, K0, K, T, D);
    uint16_t *p = (uint16_t *)(void *)(buf + HX_KV_SEGMENT_HEADER_BYTES);
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < K; h++)
                for (int t = 0; t < T; t++)
                    for (int i = 0; i < D; i++)
                        *p++ = hx_safetensors_f32_to_bf16(val(L0 + l, kv, K0 + h, t, i));
    hx_kv_segment_seal(buf, hx_kv_crc32c(hx_kv_segment_header_crc(buf),
                                         buf + HX_KV_SEGMENT_HEADER_BYTES,
                                         n - HX_KV_SEGMENT_HEADER_BYTES));
    hx_kv_segment g;
    if (hx_kv_segment_parse(buf, n, &g, &err) != HX_OK)
        fail_msg("parse: %s", err.msg);
    assert_int_equal(g.dtype, HX_KV_DTYPE_BF16);
    assert_int_equal(g.payload_bytes, n - 64);

    /* into a cache of this layer and head range: every value is the bf16 one, widened */
    hx_kvcache *dst = new_cache(L, K, D, 4, 8);
    assert_int_equal(hx_kvcache_set_origin(dst, L0, K0, &err), HX_OK);
    int s = new_seq(dst);
    if (hx_kvcache_unpack(dst, s, buf, n, &err) != HX_OK)
        fail_msg("unpack: %s", err.msg);
    assert_int_equal(hx_kvcache_seq_tokens(dst, s), T);
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < K; h++)
                for (int t = 0; t < T; t++) {
                    const float *row = hx_kvcache_row(dst, s, l, kv, h, t);
                    for (int i = 0; i < D; i++) {
                        const float want = hx_safetensors_bf16_to_f32(
                            hx_safetensors_f32_to_bf16(val(L0 + l, kv, K0 + h, t, i)));
                        if (row[i] != want)
                            fail_msg("layer %d kv %d head %d pos %d [%d]: %g, expected %g",
                                     L0 + l, kv, K0 + h, t, i, (double)row[i], (double)want);
                    }
                }

    /* a byte flipped in the payload is caught; so is one byte too few */
    buf[n - 1] ^= 1;
    assert_int_equal(hx_kv_segment_parse(buf, n, &g, &err), HX_EPARSE);
    assert_non_null(strstr(err.msg, "checksum"));
    buf[n - 1] ^= 1;
    assert_int_equal(hx_kv_segment_parse(buf, n - 1, &g, &err), HX_EPARSE);
    /* the fp32 size for these counts is not a bf16 segment's */
    unsigned char *wide = calloc(1, hx_kv_segment_bytes(HX_KV_DTYPE_F32, L, K, T, D));
    assert_non_null(wide);
    memcpy(wide, buf, 64);
    put32(wide, 40, (uint32_t)L * 2 * K * T * D * 4); /* payload_bytes (its high half is 0) */
    assert_int_equal(hx_kv_segment_parse(wide, hx_kv_segment_bytes(HX_KV_DTYPE_F32, L, K, T, D),
                                         &g, &err),
                     HX_EPARSE);
    assert_non_null(strstr(err.msg, "payload_bytes"));
    free(wide);
    /* a payload at an odd address */
    memmove(buf + 1, buf, n);
    assert_int_equal(hx_kv_segment_parse(buf + 1, n, &g, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "2-byte aligned"));
    free(buf);
    hx_kvcache_free(dst);
}

/* Segments filled from a transport's message: token sub-ranges, and the checks. */
static void test_unpack_parsed(void **state)
{
    (void)state;
    enum { L = 2, K = 3, D = 4, T = 11, CUT = 5 };
    hx_err err = {0};
    hx_kvcache *src = new_cache(L, K, D, 4, 16);
    int s = new_seq(src);
    append(src, s, T);
    fill(src, s, 0, T);
    size_t n;
    void *whole = pack(src, s, 0, L, 0, K, &n);
    hx_kv_segment g;
    assert_int_equal(hx_kv_segment_parse(whole, n, &g, &err), HX_OK);
    assert_int_equal(g.token_first, 0);

    /* cut it by positions: [0, CUT) and [CUT, T), payloads [L][2][K][tokens][D] */
    float *lo = malloc((size_t)L * 2 * K * CUT * D * sizeof(float));
    float *hi = malloc((size_t)L * 2 * K * (T - CUT) * D * sizeof(float));
    for (int r = 0; r < L * 2 * K; r++) {
        const float *gp = g.payload;
        memcpy(lo + (size_t)r * CUT * D, gp + (size_t)r * T * D,
               (size_t)CUT * D * sizeof(float));
        memcpy(hi + (size_t)r * (T - CUT) * D, gp + ((size_t)r * T + CUT) * D,
               (size_t)(T - CUT) * D * sizeof(float));
    }
    hx_kv_segment a = g, b = g;
    a.tokens = CUT;
    a.payload = lo;
    a.payload_bytes = (uint64_t)L * 2 * K * CUT * D * 4;
    b.token_first = CUT;
    b.tokens = T - CUT;
    b.payload = hi;
    b.payload_bytes = (uint64_t)L * 2 * K * (T - CUT) * D * 4;

    hx_kvcache *dst = new_cache(L, K, D, 3, 16);
    int t = new_seq(dst);
    assert_int_equal(hx_kvcache_unpack_parsed(dst, t, &b, &err), HX_OK); /* the later half first */
    assert_int_equal(hx_kvcache_seq_tokens(dst, t), T);
    assert_int_equal(hx_kvcache_unpack_parsed(dst, t, &a, &err), HX_OK);
    assert_int_equal(hx_kvcache_seq_tokens(dst, t), T);
    expect_filled(dst, t);

    /* the checks hold whatever filled the struct */
    int u = new_seq(dst);
    hx_kv_segment x = g;
    x.dtype = 1; /* f16: not a segment dtype */
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "dtype 1"));
    x = g;
    x.dtype = HX_KV_DTYPE_BF16; /* a bf16 payload is half the bytes: these counts do not fit */
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "payload_bytes"));
    x = g;
    x.payload = NULL;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    x = g;
    x.payload_bytes -= 4;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "payload_bytes"));
    x = g;
    x.token_first = -1;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    x = g;
    x.token_first = 0x7ffffffa; /* + 11 positions pass INT_MAX */
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    x = g;
    x.tokens = 0;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    x = g;
    x.head_dim = 8;
    x.payload_bytes *= 2;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "head_dim 8"));
    x = g;
    x.head_first = 1;
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "not within"));
    x = g;
    x.token_first = 60; /* 71 positions: more blocks than there are */
    assert_int_equal(hx_kvcache_unpack_parsed(dst, u, &x, &err), HX_ENOMEM);
    assert_int_equal(hx_kvcache_seq_tokens(dst, u), 0);
    check_ok(dst);

    free(lo);
    free(hi);
    free(whole);
    hx_kvcache_free(src);
    hx_kvcache_free(dst);
}

/* ---- heads across ranks, resharding ---------------------------------------------------------- */

static void test_rank_heads(void **state)
{
    (void)state;
    int f, n;
    hx_err err = {0};
    /* tp divides kv_heads: contiguous equal ranges */
    for (int r = 0; r < 4; r++) {
        assert_int_equal(hx_kv_rank_heads(8, 4, r, &f, &n, &err), HX_OK);
        assert_int_equal(f, 2 * r);
        assert_int_equal(n, 2);
    }
    assert_int_equal(hx_kv_rank_heads(8, 1, 0, &f, &n, &err), HX_OK);
    assert_int_equal(f, 0);
    assert_int_equal(n, 8);
    /* tp > kv_heads: head r * kv / tp, replicated on tp / kv ranks */
    const int want[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    for (int r = 0; r < 8; r++) {
        assert_int_equal(hx_kv_rank_heads(2, 8, r, &f, &n, &err), HX_OK);
        assert_int_equal(f, want[r]);
        assert_int_equal(n, 1);
    }
    assert_int_equal(hx_kv_rank_heads(2, 3, 0, &f, &n, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tp 3"));
    assert_int_equal(hx_kv_rank_heads(6, 4, 0, &f, &n, &err), HX_EINVAL);
    assert_int_equal(hx_kv_rank_heads(2, 2, 2, &f, &n, &err), HX_EINVAL);
    assert_int_equal(hx_kv_rank_heads(0, 1, 0, &f, &n, &err), HX_EINVAL);
}

#define RL 4  /* model layers */
#define RK 2  /* model KV heads */
#define RD 8  /* head_dim */
#define RT 13 /* tokens */
#define MAX_RANKS 16

/* One layout's caches, one per (stage, rank), each with one sequence. */
typedef struct layout_caches {
    int n;                       /* (stage, rank) pairs */
    int index[4][8];             /* (stage, rank) -> cache */
    hx_kvcache *c[MAX_RANKS];
    int seq[MAX_RANKS];
} layout_caches;

static void make_layout(const hx_kv_stage *st, int n_st, int bt, layout_caches *lc)
{
    memset(lc, 0, sizeof *lc);
    for (int s = 0; s < n_st; s++)
        for (int r = 0; r < st[s].tp; r++) {
            int f, k;
            assert_int_equal(hx_kv_rank_heads(RK, st[s].tp, r, &f, &k, NULL), HX_OK);
            hx_kvcache *c = new_cache(st[s].num_layers, k, RD, bt, 8);
            assert_int_equal(hx_kvcache_set_origin(c, st[s].layer_first, f, NULL), HX_OK);
            lc->index[s][r] = lc->n;
            lc->c[lc->n] = c;
            lc->seq[lc->n] = new_seq(c);
            lc->n++;
        }
}

static void free_layout(layout_caches *lc)
{
    for (int i = 0; i < lc->n; i++) {
        check_ok(lc->c[i]);
        hx_kvcache_free(lc->c[i]);
    }
}

/*
 * Fills the source layout with the "original contiguous KV" (val()), plans,
 * packs every piece from its source, unpacks it at its destination, and
 * checks every destination equals the original. Returns the piece count.
 */
static int reshard(const hx_kv_stage *src, int n_src, const hx_kv_stage *dst, int n_dst)
{
    layout_caches S, D;
    make_layout(src, n_src, 4, &S);
    make_layout(dst, n_dst, 3, &D); /* another block size on the decode side */
    for (int i = 0; i < S.n; i++) {
        append(S.c[i], S.seq[i], RT);
        fill(S.c[i], S.seq[i], 0, RT);
    }
    hx_err err = {0};
    int n = 0;
    assert_int_equal(hx_kv_plan_segments(RL, RK, src, n_src, dst, n_dst, NULL, 0, &n, &err),
                     HX_ERANGE); /* cap 0 sizes the array */
    assert_true(n > 0);
    hx_kv_piece *pieces = calloc((size_t)n, sizeof *pieces);
    assert_non_null(pieces);
    int n2 = 0;
    assert_int_equal(hx_kv_plan_segments(RL, RK, src, n_src, dst, n_dst, pieces, n, &n2, &err),
                     HX_OK);
    assert_int_equal(n2, n);
    /* every destination (layer, head) is covered exactly once */
    int cover[4][8][RL][RK] = {{{{0}}}};
    for (int i = 0; i < n; i++) {
        const hx_kv_piece *p = &pieces[i];
        for (int l = p->layer_first; l < p->layer_first + p->num_layers; l++)
            for (int h = p->head_first; h < p->head_first + p->num_heads; h++)
                cover[p->dst_stage][p->dst_rank][l][h]++;
        const hx_kvcache *sc = S.c[S.index[p->src_stage][p->src_rank]];
        size_t bytes;
        void *seg = pack(sc, S.seq[S.index[p->src_stage][p->src_rank]], p->layer_first,
                         p->num_layers, p->head_first, p->num_heads, &bytes);
        const int di = D.index[p->dst_stage][p->dst_rank];
        if (hx_kvcache_unpack(D.c[di], D.seq[di], seg, bytes, &err) != HX_OK)
            fail_msg("piece %d: %s", i, err.msg);
        free(seg);
    }
    for (int s = 0; s < n_dst; s++)
        for (int r = 0; r < dst[s].tp; r++) {
            int f, k;
            hx_kv_rank_heads(RK, dst[s].tp, r, &f, &k, NULL);
            for (int l = 0; l < RL; l++)
                for (int h = 0; h < RK; h++) {
                    int mine = l >= dst[s].layer_first &&
                               l < dst[s].layer_first + dst[s].num_layers && h >= f &&
                               h < f + k;
                    if (cover[s][r][l][h] != mine)
                        fail_msg("destination stage %d rank %d: layer %d head %d covered %d "
                                 "times",
                                 s, r, l, h, cover[s][r][l][h]);
                }
            const int di = D.index[s][r];
            assert_int_equal(hx_kvcache_seq_tokens(D.c[di], D.seq[di]), RT);
            expect_filled(D.c[di], D.seq[di]);
        }
    free(pieces);
    free_layout(&S);
    free_layout(&D);
    return n;
}

static void test_reshard(void **state)
{
    (void)state;
    const hx_kv_stage tp2x2[2] = {{0, 2, 2}, {2, 2, 2}};
    const hx_kv_stage tp1[1] = {{0, 4, 1}};
    const hx_kv_stage tp4[1] = {{0, 4, 4}};
    const hx_kv_stage mixed[3] = {{0, 1, 1}, {1, 2, 4}, {3, 1, 2}};
    const hx_kv_stage tp8x2[2] = {{0, 3, 8}, {3, 1, 2}};

    /* TP=2, two stages -> TP=1, one stage: each source rank sends its whole share */
    assert_int_equal(reshard(tp2x2, 2, tp1, 1), 4);
    /* -> TP=4, one stage, heads replicated: every rank gets its head from both stages */
    assert_int_equal(reshard(tp2x2, 2, tp4, 1), 8);
    /* -> a different stage split with mixed degrees */
    assert_int_equal(reshard(tp2x2, 2, mixed, 3), 2 + 4 * 2 + 2);
    /* replicated sources: one replica is read per head */
    assert_int_equal(reshard(tp8x2, 2, tp1, 1), 2 + 2);
    assert_int_equal(reshard(tp4, 1, tp8x2, 2), 8 + 2);
    /* the identity */
    assert_int_equal(reshard(tp2x2, 2, tp2x2, 2), 4);

    /* replicated sources spread over destination ranks */
    hx_kv_piece p[16];
    int n = 0;
    hx_err err = {0};
    assert_int_equal(hx_kv_plan_segments(RL, RK, tp4, 1, tp4, 1, p, 16, &n, &err), HX_OK);
    assert_int_equal(n, 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(p[i].dst_rank, i);
        assert_int_equal(p[i].src_rank, i); /* rank r holds what rank r needs */
    }

    /* plan errors */
    const hx_kv_stage gap[2] = {{0, 1, 1}, {2, 2, 1}};
    const hx_kv_stage short_[1] = {{0, 3, 1}};
    const hx_kv_stage bad_tp[1] = {{0, 4, 3}};
    assert_int_equal(hx_kv_plan_segments(RL, RK, gap, 2, tp1, 1, p, 16, &n, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "source stage 1 holds layers [2, 4)"));
    assert_int_equal(hx_kv_plan_segments(RL, RK, tp1, 1, short_, 1, p, 16, &n, &err),
                     HX_EINVAL);
    assert_non_null(strstr(err.msg, "destination layout's stages cover 3 layers"));
    assert_int_equal(hx_kv_plan_segments(RL, RK, tp1, 1, bad_tp, 1, p, 16, &n, &err),
                     HX_EINVAL);
    assert_non_null(strstr(err.msg, "destination stage 0: tp 3"));
    assert_int_equal(hx_kv_plan_segments(RL, RK, tp2x2, 2, tp4, 1, p, 3, &n, &err), HX_ERANGE);
    assert_int_equal(n, 8);
    assert_int_equal(hx_kv_plan_segments(RL, RK, NULL, 0, tp4, 1, p, 3, &n, &err), HX_EINVAL);
}

/* ---- the paged attention kernel -------------------------------------------------------------- */

static float rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

/* Paged attention of several sequences equals hx_cpu_attention on each alone, bit for bit. */
static void paged_vs_contiguous(int threads, hx_cpu_path path)
{
    if (hx_cpu_set_path(path) != HX_OK) {
        print_message("skipped the %s path: not available on this CPU\n", hx_cpu_path_name(path));
        return;
    }
    hx_cpu_pool *pool = NULL;
    assert_int_equal(hx_cpu_pool_new(threads, &pool, NULL), HX_OK);
    enum { NS = 4, H = 6, K = 2, D = 40, BT = 5, MAXT = 40 };
    const int pos0[NS] = {0, 17, 9, 30};
    const int ntok[NS] = {7, 1, 12, 1};
    hx_kvcache *c = new_cache(1, K, D, BT, 64);
    int seq[NS];
    uint64_t rs = 42;
    float *kc[NS], *vc[NS]; /* contiguous copies: [K][MAXT][D] */
    int rows = 0;
    for (int i = 0; i < NS; i++)
        seq[i] = new_seq(c);
    /* grow the sequences in turns, so their blocks interleave */
    for (int p = 0; p < MAXT; p++)
        for (int i = 0; i < NS; i++)
            if (p < pos0[i] + ntok[i])
                append(c, seq[i], 1);
    for (int i = 0; i < NS; i++) {
        kc[i] = calloc((size_t)K * MAXT * D, sizeof(float));
        vc[i] = calloc((size_t)K * MAXT * D, sizeof(float));
        for (int h = 0; h < K; h++)
            for (int p = 0; p < pos0[i] + ntok[i]; p++) {
                float *kr = hx_kvcache_row(c, seq[i], 0, 0, h, p);
                float *vr = hx_kvcache_row(c, seq[i], 0, 1, h, p);
                for (int e = 0; e < D; e++) {
                    kr[e] = kc[i][((size_t)h * MAXT + p) * D + e] = rnd(&rs);
                    vr[e] = vc[i][((size_t)h * MAXT + p) * D + e] = rnd(&rs);
                }
            }
        rows += ntok[i];
    }
    float *q = malloc((size_t)rows * H * D * sizeof(float));
    float *out = malloc((size_t)rows * H * D * sizeof(float));
    float *want = malloc((size_t)rows * H * D * sizeof(float));
    float *scratch = malloc((size_t)threads * MAXT * sizeof(float));
    for (int i = 0; i < rows * H * D; i++)
        q[i] = rnd(&rs);
    int tables[NS][16];
    hx_cpu_paged_seq ps[NS];
    for (int i = 0, r = 0; i < NS; r += ntok[i], i++) {
        hx_kvcache_seq_blocks(c, seq[i], tables[i], 16);
        ps[i] = (hx_cpu_paged_seq){tables[i], pos0[i], ntok[i], r};
        hx_cpu_attention(pool, want + (size_t)r * H * D, q + (size_t)r * H * D, kc[i], vc[i],
                         ntok[i], pos0[i], H, K, D, MAXT, scratch);
    }
    hx_cpu_paged_kv view;
    hx_kvcache_layer_view(c, 0, &view);
    hx_cpu_paged_attention(pool, out, q, &view, ps, NS, rows, H, K, D, MAXT, scratch);
    assert_memory_equal(out, want, (size_t)rows * H * D * sizeof(float));

    for (int i = 0; i < NS; i++) {
        free(kc[i]);
        free(vc[i]);
    }
    free(q);
    free(out);
    free(want);
    free(scratch);
    hx_kvcache_free(c);
    hx_cpu_pool_free(pool);
    hx_cpu_set_path(hx_cpu_has_avx2() ? HX_CPU_PATH_AVX2 : HX_CPU_PATH_PORTABLE);
}

static void test_paged_attention(void **state)
{
    (void)state;
    paged_vs_contiguous(1, HX_CPU_PATH_PORTABLE);
    paged_vs_contiguous(3, HX_CPU_PATH_PORTABLE);
    paged_vs_contiguous(1, HX_CPU_PATH_AVX2);
    paged_vs_contiguous(3, HX_CPU_PATH_AVX2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_errors),      cmocka_unit_test(test_allocator),
        cmocka_unit_test(test_append_rows),     cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_pack_roundtrip),
        cmocka_unit_test(test_header_validation), cmocka_unit_test(test_unpack_parsed),
        cmocka_unit_test(test_bf16_segment),
        cmocka_unit_test(test_rank_heads),
        cmocka_unit_test(test_reshard),         cmocka_unit_test(test_paged_attention),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
