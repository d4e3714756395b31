/*
 * test_safetensors.c - the safetensors reader and writer: round trips, exact
 * bf16/fp16 conversions, every malformed-file rule, and sharded indexes.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/safetensors.h"

static char tmp_dir[256];

/* ---- helpers ---------------------------------------------------------------- */

static void tmp_path(const char *name, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%s", tmp_dir, name);
}

static void write_bytes(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len > 0)
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* A safetensors file from a header text (not padded) and raw data bytes. */
static void write_raw(const char *name, const char *header, const void *data, size_t data_len,
                      char *path, size_t size)
{
    tmp_path(name, path, size);
    size_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + data_len + 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (data_len)
        memcpy(buf + 8 + hl, data, data_len);
    write_bytes(path, buf, 8 + hl + data_len);
    free(buf);
}

/* Opens a file that must fail with `code` and a message containing `needle`. */
static void expect_open_error(const char *path, hx_status code, const char *needle)
{
    hx_safetensors *f = NULL;
    hx_err err = {0};
    hx_status st = hx_safetensors_open(path, "model file", &f, &err);
    if (st != code || !strstr(err.msg, needle))
        fail_msg("opening '%s': got %d '%s'; expected %d with '%s'", path, st, err.msg, code,
                 needle);
    assert_null(f);
}

static void expect_header_error(const char *header, size_t data_len, const char *needle)
{
    char path[512];
    unsigned char data[64] = {0};
    assert_true(data_len <= sizeof data);
    write_raw("bad.safetensors", header, data, data_len, path, sizeof path);
    expect_open_error(path, HX_EPARSE, needle);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx_test_st_XXXXXX");
    return mkdtemp(tmp_dir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- round trip -------------------------------------------------------------- */

static void test_round_trip(void **state)
{
    (void)state;
    char path[512];
    tmp_path("rt.safetensors", path, sizeof path);
    float a[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
    uint16_t b[4] = {hx_safetensors_f32_to_bf16(1.0f), hx_safetensors_f32_to_bf16(-0.5f),
                     hx_safetensors_f32_to_bf16(3.0f), hx_safetensors_f32_to_bf16(1e10f)};
    uint16_t c[3] = {hx_safetensors_f32_to_f16(0.25f), hx_safetensors_f32_to_f16(-65504.0f),
                     hx_safetensors_f32_to_f16(6e-8f)};
    int32_t scalar = 42;
    hx_safetensors_entry e[5] = {
        {"w.f32", HX_SAFETENSORS_F32, 2, {2, 3}, a},
        {"w.bf16", HX_SAFETENSORS_BF16, 2, {2, 2}, b},
        {"a.f16", HX_SAFETENSORS_F16, 1, {3}, c},
        {"scalar", HX_SAFETENSORS_I32, 0, {0}, &scalar},
        {"empty", HX_SAFETENSORS_F32, 2, {0, 5}, NULL},
    };
    const char *meta[] = {"format", "pt", "note", "round trip"};
    hx_err err = {0};
    hx_status st = hx_safetensors_write(path, e, 5, meta, 2, &err);
    if (st != HX_OK)
        fail_msg("%s", err.msg);

    /* header length padded to 8, data 8-byte aligned */
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    unsigned char len8[8];
    assert_int_equal(fread(len8, 1, 8, fp), 8);
    fclose(fp);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | len8[i];
    assert_int_equal(hl % 8, 0);

    hx_safetensors *f = NULL;
    st = hx_safetensors_open(path, NULL, &f, &err);
    if (st != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_safetensors_count(f), 5);
    assert_string_equal(hx_safetensors_at(f, 0)->name, "w.f32"); /* header order */
    assert_null(hx_safetensors_at(f, 5));
    assert_string_equal(hx_safetensors_metadata(f, "format"), "pt");
    assert_string_equal(hx_safetensors_metadata(f, "note"), "round trip");
    assert_null(hx_safetensors_metadata(f, "nope"));
    assert_null(hx_safetensors_find(f, "nope"));
    assert_string_equal(hx_safetensors_path(f), path);

    const hx_safetensors_tensor *t = hx_safetensors_find(f, "w.f32");
    assert_non_null(t);
    assert_int_equal(t->dtype, HX_SAFETENSORS_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->numel, 6);
    assert_int_equal(t->nbytes, 24);
    assert_memory_equal(t->data, a, sizeof a);
    float out[6];
    assert_int_equal(hx_safetensors_rows_to_f32(t, 1, 1, out, &err), HX_OK);
    assert_true(out[0] == 3.25f && out[1] == 1e-3f && out[2] == -7.0f);
    assert_int_equal(hx_safetensors_rows_to_f32(t, 1, 2, out, &err), HX_ERANGE);
    assert_int_equal(hx_safetensors_to_f32(t, 5, 2, out, &err), HX_ERANGE);

    t = hx_safetensors_find(f, "w.bf16");
    assert_non_null(t);
    assert_int_equal(hx_safetensors_to_f32(t, 0, 4, out, &err), HX_OK);
    assert_true(out[0] == 1.0f && out[1] == -0.5f && out[2] == 3.0f);
    assert_true(out[3] == hx_safetensors_bf16_to_f32(b[3]));

    t = hx_safetensors_find(f, "a.f16");
    assert_non_null(t);
    assert_int_equal(hx_safetensors_to_f32(t, 0, 3, out, &err), HX_OK);
    assert_true(out[0] == 0.25f && out[1] == -65504.0f);
    assert_true(out[2] == ldexpf(1.0f, -24)); /* 6e-8 rounds to the smallest subnormal */

    t = hx_safetensors_find(f, "scalar");
    assert_non_null(t);
    assert_int_equal(t->ndim, 0);
    assert_int_equal(t->numel, 1);
    assert_int_equal(t->nbytes, 4);
    int32_t sv;
    memcpy(&sv, t->data, 4);
    assert_int_equal(sv, 42);
    assert_int_equal(hx_safetensors_to_f32(t, 0, 1, out, &err), HX_ENOTSUP);
    assert_non_null(strstr(err.msg, "cannot convert I32"));

    t = hx_safetensors_find(f, "empty");
    assert_non_null(t);
    assert_int_equal(t->numel, 0);
    assert_int_equal(t->nbytes, 0);
    hx_safetensors_free(f);
    hx_safetensors_free(NULL);
}

static void test_write_errors(void **state)
{
    (void)state;
    char path[512];
    tmp_path("werr.safetensors", path, sizeof path);
    float a[2] = {1, 2};
    hx_err err = {0};
    hx_safetensors_entry dup[2] = {{"x", HX_SAFETENSORS_F32, 1, {2}, a},
                                   {"x", HX_SAFETENSORS_F32, 1, {2}, a}};
    assert_int_equal(hx_safetensors_write(path, dup, 2, NULL, 0, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "duplicate name"));
    hx_safetensors_entry meta[1] = {{"__metadata__", HX_SAFETENSORS_F32, 1, {2}, a}};
    assert_int_equal(hx_safetensors_write(path, meta, 1, NULL, 0, &err), HX_EINVAL);
    hx_safetensors_entry neg[1] = {{"n", HX_SAFETENSORS_F32, 1, {-1}, a}};
    assert_int_equal(hx_safetensors_write(path, neg, 1, NULL, 0, &err), HX_EINVAL);
    assert_int_equal(access(path, F_OK), -1); /* nothing left behind */
    assert_int_equal(hx_safetensors_write("/nonexistent-dir/x.safetensors", dup, 1, NULL, 0,
                                          &err),
                     HX_EIO);
}

/* ---- conversions -------------------------------------------------------------------- */

static void test_f16_exact(void **state)
{
    (void)state;
    assert_true(hx_safetensors_f16_to_f32(0x3C00) == 1.0f);
    assert_true(hx_safetensors_f16_to_f32(0xC000) == -2.0f);
    assert_true(hx_safetensors_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(hx_safetensors_f16_to_f32(0x0400) == ldexpf(1.0f, -14));
    assert_true(hx_safetensors_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_true(hx_safetensors_f16_to_f32(0x03FF) == ldexpf(1023.0f, -24));
    assert_true(hx_safetensors_f16_to_f32(0x8000) == 0.0f &&
                signbit(hx_safetensors_f16_to_f32(0x8000)));
    assert_true(isinf(hx_safetensors_f16_to_f32(0x7C00)) &&
                hx_safetensors_f16_to_f32(0x7C00) > 0);
    assert_true(isinf(hx_safetensors_f16_to_f32(0xFC00)) &&
                hx_safetensors_f16_to_f32(0xFC00) < 0);
    assert_true(isnan(hx_safetensors_f16_to_f32(0x7E00)));
    assert_true(isnan(hx_safetensors_f16_to_f32(0x7C01)));

    /* every half round-trips through float exactly (NaNs stay NaNs) */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = hx_safetensors_f16_to_f32((uint16_t)h);
        uint16_t back = hx_safetensors_f32_to_f16(f);
        if (isnan(f))
            assert_true(isnan(hx_safetensors_f16_to_f32(back)));
        else if (back != h)
            fail_msg("f16 0x%04x -> %g -> 0x%04x", h, (double)f, back);
    }
    /* rounding: to nearest, ties to even */
    assert_int_equal(hx_safetensors_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3C00);
    assert_int_equal(hx_safetensors_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3C02);
    assert_int_equal(hx_safetensors_f32_to_f16(65519.0f), 0x7BFF);
    assert_int_equal(hx_safetensors_f32_to_f16(65520.0f), 0x7C00);
    assert_int_equal(hx_safetensors_f32_to_f16(1e-9f), 0x0000);
    assert_int_equal(hx_safetensors_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); /* tie to 0 */
    assert_int_equal(hx_safetensors_f32_to_f16(ldexpf(3.0f, -26)), 0x0001);
    assert_int_equal(hx_safetensors_f32_to_f16(ldexpf(3.0f, -25)), 0x0002); /* tie to even */
    assert_int_equal(hx_safetensors_f32_to_f16(-INFINITY), 0xFC00);
}

static void test_bf16_exact(void **state)
{
    (void)state;
    assert_true(hx_safetensors_bf16_to_f32(0x3F80) == 1.0f);
    assert_true(hx_safetensors_bf16_to_f32(0xC040) == -3.0f);
    assert_true(hx_safetensors_bf16_to_f32(0x0001) == ldexpf(1.0f, -133));
    for (uint32_t h = 0; h < 65536; h++) {
        float f = hx_safetensors_bf16_to_f32((uint16_t)h);
        uint16_t back = hx_safetensors_f32_to_bf16(f);
        if (isnan(f))
            assert_true(isnan(hx_safetensors_bf16_to_f32(back)));
        else if (back != h)
            fail_msg("bf16 0x%04x -> %g -> 0x%04x", h, (double)f, back);
    }
    assert_int_equal(hx_safetensors_f32_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3F80); /* tie */
    assert_int_equal(hx_safetensors_f32_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3F82);
    assert_true(isnan(hx_safetensors_bf16_to_f32(hx_safetensors_f32_to_bf16(NAN))));
}

static void test_dtype_names(void **state)
{
    (void)state;
    hx_safetensors_dtype d;
    assert_int_equal(hx_safetensors_dtype_parse("BF16", &d), HX_OK);
    assert_int_equal(d, HX_SAFETENSORS_BF16);
    assert_int_equal(hx_safetensors_dtype_parse("bf16", &d), HX_EINVAL);
    assert_int_equal(hx_safetensors_dtype_parse("F8_E4M3", &d), HX_OK);
    assert_int_equal(hx_safetensors_dtype_bytes(d), 1);
    assert_string_equal(hx_safetensors_dtype_name(HX_SAFETENSORS_F16), "F16");
    assert_string_equal(hx_safetensors_dtype_name(HX_SAFETENSORS_DTYPE_COUNT), "?");
    assert_int_equal(hx_safetensors_dtype_bytes(HX_SAFETENSORS_I64), 8);
}

/* ---- malformed files ------------------------------------------------------------------ */

static void test_truncated(void **state)
{
    (void)state;
    char path[512];
    tmp_path("short.safetensors", path, sizeof path);
    write_bytes(path, "\x10\x00\x00", 3);
    expect_open_error(path, HX_EPARSE, "truncated: 3 bytes");
    tmp_path("zero.safetensors", path, sizeof path);
    write_bytes(path, "", 0);
    expect_open_error(path, HX_EPARSE, "truncated: 0 bytes");
    /* the header runs past the end of the file */
    unsigned char b[12] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' '};
    tmp_path("past.safetensors", path, sizeof path);
    write_bytes(path, b, sizeof b);
    expect_open_error(path, HX_EPARSE, "header length 100 runs past the end of the file");
}

static void test_huge_header(void **state)
{
    (void)state;
    char path[512];
    unsigned char b[16] = {0, 0, 0, 0, 0, 1, 0, 0, '{', '}'}; /* 2^40 */
    tmp_path("huge.safetensors", path, sizeof path);
    write_bytes(path, b, sizeof b);
    expect_open_error(path, HX_EPARSE, "over the limit of 100000000 bytes");
    unsigned char c[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
    write_bytes(path, c, sizeof c);
    expect_open_error(path, HX_EPARSE, "over the limit");
}

static void test_missing_file(void **state)
{
    (void)state;
    char path[512];
    tmp_path("none.safetensors", path, sizeof path);
    expect_open_error(path, HX_ENOENT, "cannot open model file");
    expect_open_error(tmp_dir, HX_EINVAL, "not a regular file");
}

static void test_bad_json(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {", 0, "header is not valid JSON");
    expect_header_error("[1, 2]", 0, "header is not a JSON object");
    expect_header_error("", 0, "header is not valid JSON");
    expect_header_error("{\"a\": 3}", 0, "tensor 'a': not a JSON object");
    expect_header_error("{\"__metadata__\": [1]}", 0, "__metadata__ is not a JSON object");
    expect_header_error("{\"__metadata__\": {\"k\": 1}}", 0, "__metadata__: 'k' is not a string");
    expect_header_error("{} x", 0, "header is not valid JSON");
}

static void test_bad_dtype(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {\"dtype\": \"F31\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
                        4, "tensor 'a': dtype: unknown type 'F31'");
    expect_header_error("{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        "tensor 'a': dtype: missing");
    expect_header_error("{\"a\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        "dtype: not a string");
}

static void test_bad_shape(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
                        4, "shape: dimension 0 is not a non-negative integer");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}",
                        4, "shape: dimension 0 is not a non-negative integer");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": 4, \"data_offsets\": [0, 4]}}", 4,
                        "shape: not an array");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4,
                        "shape: missing");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], "
                        "\"data_offsets\": [0, 4]}}",
                        4, "9 dimensions");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 16], "
                        "\"data_offsets\": [0, 4]}}",
                        4, "element count overflows");
}

static void test_offsets_out_of_range(void **state)
{
    (void)state;
    expect_header_error("{\"model.norm.weight\": {\"dtype\": \"F32\", \"shape\": [3], "
                        "\"data_offsets\": [0, 12]}}",
                        8,
                        "model file '"); /* the file is named */
    expect_header_error("{\"model.norm.weight\": {\"dtype\": \"F32\", \"shape\": [3], "
                        "\"data_offsets\": [0, 12]}}",
                        8,
                        "tensor 'model.norm.weight': data_offsets [0, 12] outside the 8 bytes "
                        "of data");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}",
                        8, "data_offsets [8, 4]: begin after end");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 8,
                        "data_offsets: not an array of two non-negative integers");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}",
                        8, "data_offsets: not an array of two non-negative integers");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 8,
                        "data_offsets: missing");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": "
                        "[9223372036854775803, 9223372036854775807]}}",
                        8, "outside the 8 bytes of data");
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": "
                        "[18446744073709551612, 18446744073709551616]}}",
                        8, "header is not valid JSON: too big integer");
}

static void test_overlap(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
                        "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
                        16, "tensor 'b': data_offsets [4, 12] overlap those of tensor 'a' [0, 8]");
    /* same range twice */
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
                        "\"b\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
                        16, "overlap");
    /* touching is fine, and so is an empty tensor anywhere */
    char path[512];
    unsigned char data[16] = {0};
    write_raw("touch.safetensors",
              "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
              "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}, "
              "\"e\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}}",
              data, sizeof data, path, sizeof path);
    hx_safetensors *f = NULL;
    hx_err err = {0};
    if (hx_safetensors_open(path, NULL, &f, &err) != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_safetensors_count(f), 3);
    hx_safetensors_free(f);
}

static void test_size_mismatch(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}",
                        8, "tensor 'a': data_offsets [0, 8] hold 8 bytes but F32 [3] needs 12");
    expect_header_error("{\"a\": {\"dtype\": \"BF16\", \"shape\": [2, 2], \"data_offsets\": "
                        "[0, 16]}}",
                        16, "BF16 [2, 2] needs 8");
}

static void test_duplicate_names(void **state)
{
    (void)state;
    expect_header_error("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
                        "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
                        8, "duplicate tensor name");
}

static void test_unaligned_data(void **state)
{
    (void)state;
    /* a header of odd length: data starts unaligned; reading must still work */
    char path[512];
    float v[2] = {1.25f, -3.5f};
    write_raw("odd.safetensors",
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", v, sizeof v,
              path, sizeof path);
    hx_safetensors *f = NULL;
    hx_err err = {0};
    if (hx_safetensors_open(path, NULL, &f, &err) != HX_OK)
        fail_msg("%s", err.msg);
    float out[2];
    assert_int_equal(hx_safetensors_to_f32(hx_safetensors_find(f, "a"), 0, 2, out, &err), HX_OK);
    assert_true(out[0] == 1.25f && out[1] == -3.5f);
    hx_safetensors_free(f);
}

/* ---- sets of files ------------------------------------------------------------------------ */

static void write_shard(const char *dir, const char *file, const char *name1, const char *name2,
                        float base)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    float a[2] = {base, base + 1}, b[3] = {base + 2, base + 3, base + 4};
    hx_safetensors_entry e[2] = {{name1, HX_SAFETENSORS_F32, 1, {2}, a},
                                 {name2, HX_SAFETENSORS_F32, 1, {3}, b}};
    hx_err err = {0};
    if (hx_safetensors_write(path, e, 2, NULL, 0, &err) != HX_OK)
        fail_msg("%s", err.msg);
}

static void make_dir(const char *name, char *dir, size_t size)
{
    snprintf(dir, size, "%s/%s", tmp_dir, name);
    mkdir(dir, 0755);
}

static void write_text(const char *dir, const char *file, const char *text)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    write_bytes(path, text, strlen(text));
}

static void expect_index_error(const char *path, hx_status code, const char *needle)
{
    hx_safetensors_index *ix = NULL;
    hx_err err = {0};
    hx_status st = hx_safetensors_index_open(path, &ix, &err);
    if (st == HX_OK) {
        st = hx_safetensors_index_open_all(ix, &err);
        hx_safetensors_index_free(ix);
    }
    if (st != code || !strstr(err.msg, needle))
        fail_msg("index '%s': got %d '%s'; expected %d with '%s'", path, st, err.msg, code,
                 needle);
}

static void test_sharded(void **state)
{
    (void)state;
    char dir[512];
    make_dir("sharded", dir, sizeof dir);
    write_shard(dir, "model-00001-of-00002.safetensors", "a.weight", "b.weight", 10);
    write_shard(dir, "model-00002-of-00002.safetensors", "c.weight", "d.weight", 20);
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\": {\"total_size\": 40}, \"weight_map\": {"
               "\"a.weight\": \"model-00001-of-00002.safetensors\","
               "\"b.weight\": \"model-00001-of-00002.safetensors\","
               "\"d.weight\": \"model-00002-of-00002.safetensors\","
               "\"c.weight\": \"model-00002-of-00002.safetensors\"}}");
    hx_safetensors_index *ix = NULL;
    hx_err err = {0};
    if (hx_safetensors_index_open(dir, &ix, &err) != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_safetensors_index_count(ix), 4);
    assert_string_equal(hx_safetensors_index_name(ix, 0), "a.weight"); /* sorted */
    assert_string_equal(hx_safetensors_index_name(ix, 3), "d.weight");
    assert_null(hx_safetensors_index_name(ix, 4));
    hx_safetensors_tensor t;
    float out[3];
    assert_int_equal(hx_safetensors_index_find(ix, "d.weight", &t, &err), HX_OK);
    assert_int_equal(t.numel, 3);
    assert_int_equal(hx_safetensors_to_f32(&t, 0, 3, out, &err), HX_OK);
    assert_true(out[0] == 22.0f && out[2] == 24.0f);
    assert_int_equal(hx_safetensors_index_find(ix, "a.weight", &t, &err), HX_OK);
    assert_int_equal(hx_safetensors_to_f32(&t, 0, 2, out, &err), HX_OK);
    assert_true(out[0] == 10.0f && out[1] == 11.0f);
    assert_int_equal(hx_safetensors_index_find(ix, "zz", &t, &err), HX_ENOENT);
    assert_non_null(strstr(err.msg, "no tensor 'zz'"));
    assert_int_equal(hx_safetensors_index_open_all(ix, &err), HX_OK);
    hx_safetensors_index_free(ix);

    /* the index file itself may be named */
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    assert_int_equal(hx_safetensors_index_open(path, &ix, &err), HX_OK);
    assert_int_equal(hx_safetensors_index_find(ix, "c.weight", &t, &err), HX_OK);
    hx_safetensors_index_free(ix);
    hx_safetensors_index_free(NULL);
}

static void test_sharded_errors(void **state)
{
    (void)state;
    char dir[512];
    make_dir("sh_wrong", dir, sizeof dir);
    write_shard(dir, "s1.safetensors", "a", "b", 0);
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"s1.safetensors\", \"x\": \"s1.safetensors\"}}");
    hx_safetensors_index *ix = NULL;
    hx_err err = {0};
    hx_safetensors_tensor t;
    assert_int_equal(hx_safetensors_index_open(dir, &ix, &err), HX_OK);
    assert_int_equal(hx_safetensors_index_find(ix, "x", &t, &err), HX_EPARSE);
    assert_non_null(strstr(err.msg, "the index puts tensor 'x' in 's1.safetensors'"));
    hx_safetensors_index_free(ix);

    make_dir("sh_missing", dir, sizeof dir);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"gone.safetensors\"}}");
    expect_index_error(dir, HX_ENOENT, "shard");

    make_dir("sh_escape", dir, sizeof dir);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"../x.safetensors\"}}");
    expect_index_error(dir, HX_EPARSE, "is not a file name in the index's directory");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"/etc/passwd\"}}");
    expect_index_error(dir, HX_EPARSE, "is not a file name");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
    expect_index_error(dir, HX_EPARSE, "weight_map: 'a': not a string");
    write_text(dir, "model.safetensors.index.json", "{\"metadata\": {}}");
    expect_index_error(dir, HX_EPARSE, "weight_map: missing");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": [1]}");
    expect_index_error(dir, HX_EPARSE, "weight_map: not a JSON object");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {");
    expect_index_error(dir, HX_EPARSE, "model index");
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"s.safetensors\", \"a\": \"t.safetensors\"}}");
    expect_index_error(dir, HX_EPARSE, "duplicate");

    /* a malformed shard is reported when it is opened */
    make_dir("sh_bad", dir, sizeof dir);
    write_text(dir, "bad.safetensors", "xx");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"bad.safetensors\"}}");
    expect_index_error(dir, HX_EPARSE, "truncated");

    make_dir("empty", dir, sizeof dir);
    expect_index_error(dir, HX_ENOENT, "no model.safetensors or model.safetensors.index.json");
}

static void test_single_file_set(void **state)
{
    (void)state;
    char dir[512];
    make_dir("single", dir, sizeof dir);
    write_shard(dir, "model.safetensors", "w1", "w2", 5);
    hx_safetensors_index *ix = NULL;
    hx_err err = {0};
    hx_safetensors_tensor t;
    if (hx_safetensors_index_open(dir, &ix, &err) != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_safetensors_index_count(ix), 2);
    assert_int_equal(hx_safetensors_index_find(ix, "w2", &t, &err), HX_OK);
    assert_int_equal(t.numel, 3);
    assert_int_equal(hx_safetensors_index_find(ix, "w3", &t, &err), HX_ENOENT);
    hx_safetensors_index_free(ix);
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(hx_safetensors_index_open(path, &ix, &err), HX_OK);
    assert_string_equal(hx_safetensors_index_path(ix), path);
    hx_safetensors_index_free(ix);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_f16_exact),
        cmocka_unit_test(test_bf16_exact),
        cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_huge_header),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_bad_dtype),
        cmocka_unit_test(test_bad_shape),
        cmocka_unit_test(test_offsets_out_of_range),
        cmocka_unit_test(test_overlap),
        cmocka_unit_test(test_size_mismatch),
        cmocka_unit_test(test_duplicate_names),
        cmocka_unit_test(test_unaligned_data),
        cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_sharded_errors),
        cmocka_unit_test(test_single_file_set),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
