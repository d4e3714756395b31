/*
 * test_common.c - status, diagnostics, units, files, YAML and JSON helpers, tables.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/diag.h"
#include "common/file.h"
#include "common/json.h"
#include "common/status.h"
#include "common/table.h"
#include "common/units.h"
#include "common/yaml.h"

static void near(double got, double want)
{
    if (fabs(got - want) > 1e-9 * fabs(want)) {
        print_error("got %.17g, want %.17g\n", got, want);
        fail();
    }
}

static void status_and_err(void **state)
{
    (void)state;
    assert_string_equal(hx_strerror(HX_OK), "success");
    assert_string_equal(hx_strerror(HX_ENOMEM), "out of memory");
    assert_string_equal(hx_strerror((hx_status)-999), "unknown error");
    hx_err e = {0};
    assert_int_equal(hx_err_set(&e, HX_EINVAL, "bad %s at %d", "x", 3), HX_EINVAL);
    assert_int_equal(e.code, HX_EINVAL);
    assert_string_equal(e.msg, "bad x at 3");
    assert_int_equal(hx_err_set(NULL, HX_EIO, "ignored"), HX_EIO);
    hx_err_clear(&e);
    assert_int_equal(e.code, HX_OK);
    assert_string_equal(e.msg, "");
    assert_int_equal(hx_status_exit_code(HX_OK), 0);
    assert_int_equal(hx_status_exit_code(HX_EPARSE), 2);
    assert_int_equal(hx_status_exit_code(HX_EINVAL), 2);
    assert_int_equal(hx_status_exit_code(HX_ECONN), 1);
}

static void bytes(void **state)
{
    (void)state;
    double v;
    assert_int_equal(hx_units_parse_bytes("80GiB", &v, NULL), HX_OK);
    near(v, 80.0 * 1073741824.0);
    assert_int_equal(hx_units_parse_bytes("48GB", &v, NULL), HX_OK);
    near(v, 48e9);
    assert_int_equal(hx_units_parse_bytes(" 512 MiB ", &v, NULL), HX_OK);
    near(v, 512.0 * 1048576.0);
    assert_int_equal(hx_units_parse_bytes("4096", &v, NULL), HX_OK);
    near(v, 4096);
    assert_int_equal(hx_units_parse_bytes("1.5TB", &v, NULL), HX_OK);
    near(v, 1.5e12);
    hx_err e = {0};
    const char *bad[] = {"", "GiB", "-1GiB", "80 gigs", "80Gb", "inf", "nan", "0x10", "1e", "12GiB!",
                         "1..2GB"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (hx_units_parse_bytes(bad[i], &v, &e) != HX_EINVAL)
            fail_msg("'%s' parsed as bytes", bad[i]);
        assert_non_null(strstr(e.msg, "is not a size"));
    }
    assert_int_equal(hx_units_parse_bytes(NULL, &v, NULL), HX_EINVAL);
}

static void bandwidth(void **state)
{
    (void)state;
    double v;
    struct {
        const char *s;
        double want;
    } ok[] = {{"400Gb/s", 50e9},   {"25GB/s", 25e9},   {"3.35TB/s", 3.35e12},
              {"100Gbps", 12.5e9}, {"10 Gbit/s", 1.25e9}, {"1Tb/s", 125e9},
              {"800 MB/s", 800e6}, {"1GiB/s", 1073741824.0}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        assert_int_equal(hx_units_parse_bandwidth(ok[i].s, &v, NULL), HX_OK);
        near(v, ok[i].want);
    }
    hx_err e = {0};
    const char *bad[] = {"100", "100G", "fast", "-1Gb/s", "100Gbx", "Gb/s"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (hx_units_parse_bandwidth(bad[i], &v, &e) != HX_EINVAL)
            fail_msg("'%s' parsed as bandwidth", bad[i]);
        assert_non_null(strstr(e.msg, "e.g. 400Gb/s"));
    }
}

static void time_price_flops(void **state)
{
    (void)state;
    double v;
    assert_int_equal(hx_units_parse_time("15us", &v, NULL), HX_OK);
    near(v, 15e-6);
    assert_int_equal(hx_units_parse_time("2ms", &v, NULL), HX_OK);
    near(v, 2e-3);
    assert_int_equal(hx_units_parse_time("1.5", &v, NULL), HX_OK);
    near(v, 1.5);
    assert_int_equal(hx_units_parse_time("800ns", &v, NULL), HX_OK);
    near(v, 800e-9);
    assert_int_equal(hx_units_parse_time("2min", &v, NULL), HX_OK);
    near(v, 120);
    assert_int_equal(hx_units_parse_time("3 parsecs", &v, NULL), HX_EINVAL);

    assert_int_equal(hx_units_parse_price("1.56", &v, NULL), HX_OK);
    near(v, 1.56);
    assert_int_equal(hx_units_parse_price("$1.56/h", &v, NULL), HX_OK);
    near(v, 1.56);
    assert_int_equal(hx_units_parse_price("$2", &v, NULL), HX_OK);
    near(v, 2);
    assert_int_equal(hx_units_parse_price("2.10/hr", &v, NULL), HX_OK);
    near(v, 2.10);
    assert_int_equal(hx_units_parse_price("$abc", &v, NULL), HX_EINVAL);
    assert_int_equal(hx_units_parse_price("1.56/day", &v, NULL), HX_EINVAL);
    assert_int_equal(hx_units_parse_price("-1", &v, NULL), HX_EINVAL);

    assert_int_equal(hx_units_parse_flops("989", &v, NULL), HX_OK);
    near(v, 989e12);
    assert_int_equal(hx_units_parse_flops("989 TFLOP/s", &v, NULL), HX_OK);
    near(v, 989e12);
    assert_int_equal(hx_units_parse_flops("1.2PFLOPS", &v, NULL), HX_OK);
    near(v, 1.2e15);
    assert_int_equal(hx_units_parse_flops("lots", &v, NULL), HX_EINVAL);
}

static void formatting(void **state)
{
    (void)state;
    char b[64];
    assert_string_equal(hx_units_fmt_bytes(80.0 * 1073741824.0, b, sizeof b), "80 GiB");
    assert_string_equal(hx_units_fmt_bytes(1536.0 * 1048576.0, b, sizeof b), "1.5 GiB");
    assert_string_equal(hx_units_fmt_bytes(100, b, sizeof b), "100 B");
    assert_string_equal(hx_units_fmt_bytes(0, b, sizeof b), "0 B");
    assert_string_equal(hx_units_fmt_bandwidth(50e9, b, sizeof b), "400 Gb/s");
    assert_string_equal(hx_units_fmt_bandwidth(12.5e9, b, sizeof b), "100 Gb/s");
    assert_string_equal(hx_units_fmt_bandwidth(3.125e9, b, sizeof b), "25 Gb/s");
    assert_string_equal(hx_units_fmt_byte_rate(3.35e12, b, sizeof b), "3.35 TB/s");
    assert_string_equal(hx_units_fmt_byte_rate(450e9, b, sizeof b), "450 GB/s");
    assert_string_equal(hx_units_fmt_number(7912, b, sizeof b), "7912");
    assert_string_equal(hx_units_fmt_number(0.166, b, sizeof b), "0.166");
    assert_string_equal(hx_units_fmt_number(12.34, b, sizeof b), "12.3");
    assert_string_equal(hx_units_fmt_time(15e-6, b, sizeof b), "15 us");
    assert_string_equal(hx_units_fmt_time(2.5e-3, b, sizeof b), "2.5 ms");
    assert_string_equal(hx_units_fmt_flops(989e12, b, sizeof b), "989 TFLOP/s");
    assert_string_equal(hx_units_fmt_count(6.74e9, b, sizeof b), "6.74 B");
    /* round trip through the parser */
    double v;
    assert_int_equal(hx_units_parse_bytes(hx_units_fmt_bytes(48.0 * 1073741824.0, b, sizeof b),
                                          &v, NULL),
                     HX_OK);
    near(v, 48.0 * 1073741824.0);
}

static void diags(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_diags_add(&d, "x.yaml", 3, 7, "hosts[0].gpus.count", "'%s' is bad", "0");
    hx_diags_add(&d, "x.yaml", 0, 0, NULL, "no position");
    hx_diags_add(&d, NULL, 0, 0, "f", "no file");
    assert_int_equal(d.count, 3);
    char buf[256];
    hx_diags_format(&d, 0, buf, sizeof buf);
    assert_string_equal(buf, "x.yaml:3:7: hosts[0].gpus.count: '0' is bad");
    hx_diags_format(&d, 1, buf, sizeof buf);
    assert_string_equal(buf, "x.yaml: no position");
    hx_diags_format(&d, 2, buf, sizeof buf);
    assert_string_equal(buf, "f: no file");
    assert_true(hx_diags_contains(&d, "'0' is bad"));
    assert_false(hx_diags_contains(&d, "absent"));
    char small[8];
    hx_diags_format(&d, 0, small, sizeof small);
    assert_int_equal(strlen(small), 7);
    for (int i = 0; i < 100; i++)
        hx_diags_add(&d, "f", i, 1, NULL, "m%d", i);
    assert_int_equal(d.count, 103);
    hx_diags_release(&d);
    assert_int_equal(d.count, 0);
    hx_diags_release(&d);
}

static void files(void **state)
{
    (void)state;
    char dir[] = "/tmp/hx-test-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/out.txt", dir);
    hx_err e = {0};
    assert_int_equal(hx_file_write_atomic(path, "hello\n", 6, &e), HX_OK);
    assert_int_equal(hx_file_write_atomic(path, "bye\n", 4, &e), HX_OK);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(hx_file_read_all(path, "test file", 1024, &text, &len, &e), HX_OK);
    assert_int_equal(len, 4);
    assert_string_equal(text, "bye\n");
    free(text);
    assert_int_equal(hx_file_read_all(path, "test file", 2, &text, &len, &e), HX_EINVAL);
    assert_non_null(strstr(e.msg, "too large"));
    char missing[300];
    snprintf(missing, sizeof missing, "%s/none.yaml", dir);
    assert_int_equal(hx_file_read_all(missing, "inventory", 1024, &text, &len, &e), HX_ENOENT);
    char want[400];
    snprintf(want, sizeof want, "cannot open inventory '%s': no such file", missing);
    assert_string_equal(e.msg, want);
    /* writing into a missing directory fails and leaves nothing behind */
    char bad[300];
    snprintf(bad, sizeof bad, "%s/no/such/dir/out.txt", dir);
    assert_int_equal(hx_file_write_atomic(bad, "x", 1, &e), HX_EIO);
    assert_true(hx_file_is_dir(dir));
    assert_true(hx_file_is_regular(path));
    assert_false(hx_file_is_regular(dir));
    unlink(path);
    rmdir(dir);

    int line, col;
    size_t off;
    assert_true(hx_file_is_text("ab\ncd\xc3\xa9\n", 8, &line, &col, &off));
    assert_false(hx_file_is_text("ab\ncd\x00", 6, &line, &col, &off));
    assert_int_equal(line, 2);
    assert_int_equal(col, 3);
    assert_int_equal(off, 5);
    assert_false(hx_file_is_text("\xc3", 1, &line, &col, &off));
    assert_false(hx_file_is_text("a\x01", 2, &line, &col, &off));
}

static void yaml(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    struct fy_document *doc = NULL;
    const char *t = "a: 1\nb:\n  - x\n  - {k: v}\n";
    assert_int_equal(hx_yaml_load_string(t, strlen(t), "t.yaml", &doc, &d), HX_OK);
    struct fy_node *root = fy_document_root(doc);
    assert_string_equal(hx_yaml_kind(root), "a mapping");
    struct fy_node *b = fy_node_mapping_lookup_by_string(root, "b", FY_NT);
    assert_string_equal(hx_yaml_kind(b), "a list");
    int line, col;
    hx_yaml_node_pos(b, &line, &col);
    assert_int_equal(line, 3);
    assert_int_equal(col, 5);
    struct fy_node *a = fy_node_mapping_lookup_by_string(root, "a", FY_NT);
    assert_string_equal(hx_yaml_scalar(a), "1");
    assert_null(hx_yaml_scalar(b));
    fy_document_destroy(doc);

    const char *bad = "a: [1, 2\nb: 3\n";
    assert_int_equal(hx_yaml_load_string(bad, strlen(bad), "bad.yaml", &doc, &d), HX_EPARSE);
    assert_int_equal(d.count, 1);
    assert_string_equal(d.items[0].file, "bad.yaml");
    assert_true(d.items[0].line >= 1);
    hx_diags_release(&d);

    hx_diags_init(&d);
    assert_int_equal(hx_yaml_load_file("/nonexistent.yaml", "inventory", &doc, &d), HX_ENOENT);
    assert_true(hx_diags_contains(&d, "cannot open inventory '/nonexistent.yaml': no such file"));
    hx_diags_release(&d);
}

static void json(void **state)
{
    (void)state;
    char path[] = "/tmp/hx-json-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    json_t *o = json_pack("{s:i, s:f, s:s, s:b}", "n", 42, "x", 1.5, "s", "hi", "t", 1);
    hx_err e = {0};
    assert_int_equal(hx_json_write_file(path, o, &e), HX_OK);
    json_decref(o);
    json_t *r = NULL;
    assert_int_equal(hx_json_load_file(path, "test", &r, &e), HX_OK);
    long long n;
    double x;
    const char *s;
    int t;
    assert_int_equal(hx_json_get_int(r, "n", &n), HX_OK);
    assert_int_equal(n, 42);
    assert_int_equal(hx_json_get_number(r, "x", &x), HX_OK);
    near(x, 1.5);
    assert_int_equal(hx_json_get_int(r, "x", &n), HX_EINVAL);
    assert_int_equal(hx_json_get_string(r, "s", &s), HX_OK);
    assert_string_equal(s, "hi");
    assert_int_equal(hx_json_get_bool(r, "t", &t), HX_OK);
    assert_int_equal(t, 1);
    assert_int_equal(hx_json_get_string(r, "missing", &s), HX_ENOENT);
    assert_int_equal(hx_json_get_string(r, "n", &s), HX_EINVAL);
    json_decref(r);

    FILE *fp = fopen(path, "w");
    fputs("{\n  \"a\": 1,\n  \"b\": oops\n}\n", fp);
    fclose(fp);
    assert_int_equal(hx_json_load_file(path, "model config", &r, &e), HX_EPARSE);
    char want[128];
    snprintf(want, sizeof want, "model config '%s':3:", path);
    assert_non_null(strstr(e.msg, want));
    fp = fopen(path, "w");
    fputs("{\"a\": 1, \"a\": 2}", fp);
    fclose(fp);
    assert_int_equal(hx_json_load_file(path, "model config", &r, &e), HX_EPARSE);
    unlink(path);
}

static void table(void **state)
{
    (void)state;
    hx_table *t = hx_table_new(3, "NAME", ">COUNT", "NOTE");
    hx_table_row(t, "a", "1", "x");
    hx_table_rowf(t, "%s|%d|%s", "longer", 1234, "");
    hx_table_row(t, NULL, "7", "é");
    char *buf = NULL;
    size_t len = 0;
    FILE *fp = open_memstream(&buf, &len);
    hx_table_print(t, fp);
    fclose(fp);
    assert_string_equal(buf, "NAME    COUNT  NOTE\n"
                             "a           1  x\n"
                             "longer   1234  \n"
                             "            7  é\n");
    free(buf);
    hx_table_free(t);
    hx_table_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(status_and_err), cmocka_unit_test(bytes),
        cmocka_unit_test(bandwidth),      cmocka_unit_test(time_price_flops),
        cmocka_unit_test(formatting),     cmocka_unit_test(diags),
        cmocka_unit_test(files),          cmocka_unit_test(yaml),
        cmocka_unit_test(json),           cmocka_unit_test(table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
