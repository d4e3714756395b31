/*
 * test_catalog.c - the built-in GPU catalog: entries, lookup, aliases,
 * suggestions and driver model strings.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "topo/catalog.h"

#define GiB (1024.0 * 1024.0 * 1024.0)

static const char *const required[] = {
    "H100-SXM", "H100-PCIe", "H200",    "A100-80G", "A100-40G", "L40S",
    "L40",      "A6000",     "A40",     "A10",      "L4",       "RTX4090",
    "RTX3090",  "V100",      "T4",      "MI300X",   "cpu",
};

static void test_required_entries(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        const hx_gpu_spec *s = hx_catalog_find(required[i]);
        if (!s)
            fail_msg("catalog has no '%s'", required[i]);
        assert_string_equal(s->name, required[i]);
        assert_true(s->memory_bytes > 0);
        assert_true(s->bf16_flops > 0);
        assert_true(s->hbm_bytes_per_s > 0);
        assert_true(s->usd_per_hour > 0);
        assert_int_equal(s->is_cpu, !strcmp(required[i], "cpu"));
    }
}

static void test_enumeration(void **state)
{
    (void)state;
    size_t n = hx_catalog_count();
    assert_true(n >= sizeof required / sizeof required[0]);
    for (size_t i = 0; i < n; i++) {
        const hx_gpu_spec *s = hx_catalog_at(i);
        assert_non_null(s);
        assert_true(strlen(s->name) > 0 && strlen(s->name) < HX_GPU_NAME_MAX);
        assert_ptr_equal(hx_catalog_find(s->name), s);
        for (size_t j = 0; j < i; j++) /* names are unique */
            assert_true(strcasecmp(hx_catalog_at(j)->name, s->name) != 0);
    }
    assert_null(hx_catalog_at(n));
}

static void test_public_figures(void **state)
{
    (void)state;
    const hx_gpu_spec *h100 = hx_catalog_find("H100-SXM");
    assert_true(h100->memory_bytes == 80 * GiB);
    assert_true(h100->bf16_flops == 989e12);
    assert_true(h100->hbm_bytes_per_s == 3.35e12);
    const hx_gpu_spec *a100 = hx_catalog_find("A100-80G");
    assert_true(a100->bf16_flops == 312e12);
    assert_true(a100->hbm_bytes_per_s == 2.039e12);
    const hx_gpu_spec *mi = hx_catalog_find("MI300X");
    assert_true(mi->memory_bytes == 192 * GiB);
    assert_true(mi->hbm_bytes_per_s == 5.3e12);
    /* the H200 has more memory and bandwidth than the H100, same compute */
    const hx_gpu_spec *h200 = hx_catalog_find("H200");
    assert_true(h200->memory_bytes > h100->memory_bytes);
    assert_true(h200->hbm_bytes_per_s == 4.8e12);
    assert_true(h200->bf16_flops == h100->bf16_flops);
    const hx_gpu_spec *cpu = hx_catalog_find("cpu");
    assert_int_equal(cpu->is_cpu, 1);
    assert_true(cpu->memory_bytes == 64 * GiB);
}

static void test_find_case_insensitive(void **state)
{
    (void)state;
    assert_string_equal(hx_catalog_find("h100-sxm")->name, "H100-SXM");
    assert_string_equal(hx_catalog_find("H100-PCIE")->name, "H100-PCIe");
    assert_string_equal(hx_catalog_find("l40s")->name, "L40S");
    assert_string_equal(hx_catalog_find("CPU")->name, "cpu");
    assert_string_equal(hx_catalog_find("mi300x")->name, "MI300X");
    assert_null(hx_catalog_find("H100-SXM "));
    assert_null(hx_catalog_find(""));
    assert_null(hx_catalog_find(NULL));
    assert_null(hx_catalog_find("B200"));
}

static void test_aliases(void **state)
{
    (void)state;
    static const struct {
        const char *alias, *name;
    } cases[] = {
        {"H100", "H100-SXM"},          {"h100-sxm5", "H100-SXM"},   {"A100", "A100-80G"},
        {"A100-SXM-80GB", "A100-80G"}, {"a100-40gb", "A100-40G"},   {"RTX-A6000", "A6000"},
        {"RTX-4090", "RTX4090"},       {"4090", "RTX4090"},         {"rtx-3090", "RTX3090"},
        {"Tesla-T4", "T4"},            {"V100-SXM2-32GB", "V100"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const hx_gpu_spec *s = hx_catalog_find(cases[i].alias);
        if (!s)
            fail_msg("alias '%s' not found", cases[i].alias);
        assert_string_equal(s->name, cases[i].name);
    }
}

/* Whether `name` is one of the comma-separated suggestions in `list`. */
static int suggested(const char *list, const char *name)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *tok = strtok(buf, ", "); tok; tok = strtok(NULL, ", "))
        if (!strcmp(tok, name))
            return 1;
    return 0;
}

static int count_names(const char *list)
{
    if (!list[0])
        return 0;
    int n = 1;
    for (const char *p = list; *p; p++)
        n += *p == ',';
    return n;
}

static void test_suggestions(void **state)
{
    (void)state;
    char buf[128];

    hx_catalog_suggest("H10", buf, sizeof buf);
    assert_true(strncmp(buf, "H100-SXM", 8) == 0);
    assert_true(suggested(buf, "H100-PCIe"));
    assert_true(count_names(buf) <= 3);

    hx_catalog_suggest("h100sxm", buf, sizeof buf);
    assert_true(strncmp(buf, "H100-SXM", 8) == 0);

    hx_catalog_suggest("L40s", buf, sizeof buf);
    assert_true(strncmp(buf, "L40S", 4) == 0);
    assert_true(suggested(buf, "L40"));

    hx_catalog_suggest("L40-S", buf, sizeof buf);
    assert_true(strncmp(buf, "L40S", 4) == 0);

    hx_catalog_suggest("A600", buf, sizeof buf);
    assert_true(strncmp(buf, "A6000", 5) == 0);
    assert_true(count_names(buf) <= 3);

    hx_catalog_suggest("MI300", buf, sizeof buf);
    assert_true(strncmp(buf, "MI300X", 6) == 0);

    /* the format: names separated by ", " */
    hx_catalog_suggest("H100-SXN", buf, sizeof buf);
    assert_true(strncmp(buf, "H100-SXM", 8) == 0);
    if (count_names(buf) > 1)
        assert_non_null(strstr(buf, ", "));
}

static void test_no_suggestion_for_garbage(void **state)
{
    (void)state;
    char buf[128];
    static const char *const garbage[] = {"qwertyuiop", "zzzz", "xyz", "!!!", "", "banana"};
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; i++) {
        strcpy(buf, "untouched");
        assert_ptr_equal(hx_catalog_suggest(garbage[i], buf, sizeof buf), buf);
        if (buf[0])
            fail_msg("'%s' got suggestions '%s'", garbage[i], buf);
    }
    assert_string_equal(hx_catalog_suggest(NULL, buf, sizeof buf), "");
}

static void test_suggestion_buffer_bounds(void **state)
{
    (void)state;
    char small[12];
    memset(small, 'x', sizeof small);
    hx_catalog_suggest("H10", small, sizeof small);
    assert_true(memchr(small, '\0', sizeof small) != NULL);
    /* only whole names: "H100-SXM" fits, ", H100-PCIe" does not */
    assert_string_equal(small, "H100-SXM");
    char one[1] = {'x'};
    hx_catalog_suggest("H10", one, sizeof one);
    assert_int_equal(one[0], '\0');
}

static void test_suggest_among_extra(void **state)
{
    (void)state;
    char buf[128];
    const char *const extra[] = {"my-gpu", "B200"};
    hx_catalog_suggest_among("my-gpv", extra, 2, buf, sizeof buf);
    assert_true(strncmp(buf, "my-gpu", 6) == 0);
    hx_catalog_suggest_among("B20", extra, 2, buf, sizeof buf);
    assert_true(suggested(buf, "B200"));
    hx_catalog_suggest_among("A600", NULL, 0, buf, sizeof buf);
    assert_true(strncmp(buf, "A6000", 5) == 0);
}

static void test_match_device_names(void **state)
{
    (void)state;
    static const struct {
        const char *device;
        double memory_bytes;
        const char *expected; /* NULL = unknown */
    } cases[] = {
        {"NVIDIA H100 80GB HBM3", 0, "H100-SXM"},
        {"NVIDIA H100 PCIe", 0, "H100-PCIe"},
        {"NVIDIA H100 NVL", 0, NULL},
        {"NVIDIA H200", 0, "H200"},
        {"NVIDIA GH200 480GB", 0, NULL},
        {"NVIDIA A100-SXM4-80GB", 0, "A100-80G"},
        {"NVIDIA A100 80GB PCIe", 0, "A100-80G"},
        {"NVIDIA A100-SXM4-40GB", 0, "A100-40G"},
        {"NVIDIA A100-PCIE-40GB", 0, "A100-40G"},
        {"NVIDIA L40S", 0, "L40S"},
        {"NVIDIA L40", 0, "L40"},
        {"NVIDIA L4", 0, "L4"},
        {"NVIDIA RTX A6000", 0, "A6000"},
        {"NVIDIA RTX 6000 Ada Generation", 0, NULL},
        {"NVIDIA A40", 0, "A40"},
        {"NVIDIA A10", 0, "A10"},
        {"NVIDIA A10G", 0, NULL},
        {"NVIDIA GeForce RTX 4090", 0, "RTX4090"},
        {"NVIDIA GeForce RTX 3090", 0, "RTX3090"},
        {"NVIDIA GeForce RTX 3090 Ti", 0, NULL},
        {"Tesla V100-SXM2-32GB", 0, "V100"},
        {"Tesla V100-SXM2-16GB", 0, NULL},
        {"Tesla T4", 0, "T4"},
        {"AMD Instinct MI300X", 0, "MI300X"},
        {"GH100 [H100 SXM5 80GB]", 0, "H100-SXM"}, /* PCI database names */
        {"AD102GL [L40S]", 0, "L40S"},
        {"Aqua Vanjaram [Instinct MI300X]", 0, "MI300X"},
        {"H100-SXM", 0, "H100-SXM"}, /* catalog names themselves */
        {"cpu", 0, "cpu"},
        {"Matrox G200eR2", 0, NULL},
        {"", 0, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *got = hx_catalog_match_device_name(cases[i].device, cases[i].memory_bytes);
        if (!cases[i].expected && got)
            fail_msg("'%s' matched '%s'; expected no match", cases[i].device, got);
        if (cases[i].expected && (!got || strcmp(got, cases[i].expected)))
            fail_msg("'%s' matched '%s'; expected '%s'", cases[i].device, got ? got : "(none)",
                     cases[i].expected);
        if (got) /* always a catalog name */
            assert_non_null(hx_catalog_find(got));
    }
    assert_null(hx_catalog_match_device_name(NULL, 0));
}

static void test_a100_memory_disambiguation(void **state)
{
    (void)state;
    /* the name says nothing about capacity: memory decides */
    assert_string_equal(hx_catalog_match_device_name("NVIDIA A100", 79.2 * GiB), "A100-80G");
    assert_string_equal(hx_catalog_match_device_name("NVIDIA A100", 39.4 * GiB), "A100-40G");
    assert_string_equal(hx_catalog_match_device_name("NVIDIA A100-SXM4", 40 * GiB), "A100-40G");
    /* unknown memory: the default A100 (as the alias) */
    assert_string_equal(hx_catalog_match_device_name("NVIDIA A100", 0), "A100-80G");
    /* a capacity in the name wins over a (MIG-reduced) memory figure */
    assert_string_equal(hx_catalog_match_device_name("NVIDIA A100-SXM4-80GB", 20 * GiB),
                        "A100-80G");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_required_entries),
        cmocka_unit_test(test_enumeration),
        cmocka_unit_test(test_public_figures),
        cmocka_unit_test(test_find_case_insensitive),
        cmocka_unit_test(test_aliases),
        cmocka_unit_test(test_suggestions),
        cmocka_unit_test(test_no_suggestion_for_garbage),
        cmocka_unit_test(test_suggestion_buffer_bounds),
        cmocka_unit_test(test_suggest_among_extra),
        cmocka_unit_test(test_match_device_names),
        cmocka_unit_test(test_a100_memory_disambiguation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
