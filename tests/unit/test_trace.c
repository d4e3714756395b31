/*
 * test_trace.c - request traces: Mooncake JSONL and Azure CSV, relative and
 * sorted arrivals, date arithmetic, statistics, and every error with its line.
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

#include "planner/trace.h"

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */

static void print_diags(const hx_diags *d)
{
    hx_diags_print(d, stderr, "  ");
}

/* Loads `len` bytes named `name`; fails the test on any error. */
static hx_trace *load_len(const char *name, const char *text, size_t len)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    hx_status st = hx_trace_load_string(text, len, name, &t, &d);
    if (st != HX_OK) {
        print_diags(&d);
        fail_msg("loading %s: %s", name, hx_strerror(st));
    }
    assert_non_null(t);
    assert_int_equal(d.count, 0);
    hx_diags_release(&d);
    return t;
}

static hx_trace *load(const char *name, const char *text)
{
    return load_len(name, text, strlen(text));
}

/* Loads a bad text; checks HX_EPARSE, no trace, and that a diagnostic holds `needle`. */
static void expect_error_len(const char *name, const char *text, size_t len, const char *needle)
{
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = (hx_trace *)&d; /* must come back NULL */
    hx_status st = hx_trace_load_string(text, len, name, &t, &d);
    assert_int_equal(st, HX_EPARSE);
    assert_null(t);
    if (!hx_diags_contains(&d, needle)) {
        fprintf(stderr, "expected a diagnostic with: %s\ngot:\n", needle);
        print_diags(&d);
        fail();
    }
    hx_diags_release(&d);
}

static void expect_error(const char *name, const char *text, const char *needle)
{
    expect_error_len(name, text, strlen(text), needle);
}

/* Whether item i, formatted, equals `want` exactly. */
static void assert_diag(const hx_diags *d, size_t i, const char *want)
{
    char buf[2048];
    assert_true(i < d->count);
    hx_diags_format(d, i, buf, sizeof buf);
    assert_string_equal(buf, want);
}

#define ASSERT_NEAR(a, b, tol) assert_true(fabs((double)(a) - (double)(b)) <= (tol))

/* ------------------------------------------------------------------------- */
/* Mooncake JSONL                                                             */

static void test_mooncake_basic(void **state)
{
    (void)state;
    hx_trace *t = load("m.jsonl",
                       "{\"timestamp\": 5000, \"input_length\": 6955, \"output_length\": 52, "
                       "\"hash_ids\": [46, 47, 48]}\n"
                       "\n"
                       "   \n"
                       "{\"timestamp\": 5250, \"input_length\": 1281, \"output_length\": 45, "
                       "\"hash_ids\": [], \"session\": \"x\"}\n"
                       "  {\"input_length\": 7, \"output_length\": 1, \"timestamp\": 8000.5}");
    assert_string_equal(t->format, "mooncake");
    assert_int_equal(t->n, 3);
    assert_true(t->reqs[0].arrival_s == 0.0);
    ASSERT_NEAR(t->reqs[1].arrival_s, 0.25, 1e-12);
    ASSERT_NEAR(t->reqs[2].arrival_s, 3.0005, 1e-12);
    assert_int_equal(t->reqs[0].input_tokens, 6955);
    assert_int_equal(t->reqs[0].output_tokens, 52);
    assert_int_equal(t->reqs[1].input_tokens, 1281);
    assert_int_equal(t->reqs[2].input_tokens, 7);
    assert_int_equal(t->reqs[2].output_tokens, 1);
    hx_trace_free(t);
}

static void test_mooncake_whole_reals_and_crlf(void **state)
{
    (void)state;
    hx_trace *t = load("m.jsonl", "{\"timestamp\": 0, \"input_length\": 512.0, "
                                  "\"output_length\": 1e2}\r\n"
                                  "{\"timestamp\": 1, \"input_length\": 3, \"output_length\": 4}\r\n");
    assert_int_equal(t->n, 2);
    assert_int_equal(t->reqs[0].input_tokens, 512);
    assert_int_equal(t->reqs[0].output_tokens, 100);
    ASSERT_NEAR(t->reqs[1].arrival_s, 0.001, 1e-12);
    hx_trace_free(t);
}

/* Out-of-order arrivals are sorted; equal times keep file order. */
static void test_mooncake_sorted_stable(void **state)
{
    (void)state;
    hx_trace *t = load("m.jsonl", "{\"timestamp\": 3000, \"input_length\": 1, \"output_length\": 1}\n"
                                  "{\"timestamp\": 1000, \"input_length\": 2, \"output_length\": 1}\n"
                                  "{\"timestamp\": 2000, \"input_length\": 3, \"output_length\": 1}\n"
                                  "{\"timestamp\": 1000, \"input_length\": 4, \"output_length\": 1}\n"
                                  "{\"timestamp\": 3000, \"input_length\": 5, \"output_length\": 1}\n"
                                  "{\"timestamp\": 1000, \"input_length\": 6, \"output_length\": 1}\n"
                                  "{\"timestamp\": 500, \"input_length\": 7, \"output_length\": 1}\n");
    static const int order[] = {7, 2, 4, 6, 3, 1, 5};
    static const double at[] = {0, 0.5, 0.5, 0.5, 1.5, 2.5, 2.5};
    assert_int_equal(t->n, 7);
    for (size_t i = 0; i < 7; i++) {
        assert_int_equal(t->reqs[i].input_tokens, order[i]);
        ASSERT_NEAR(t->reqs[i].arrival_s, at[i], 1e-12);
    }
    hx_trace_free(t);
}

/* A larger shuffled trace comes out sorted, and ties keep their file order. */
static void test_sort_many(void **state)
{
    (void)state;
    enum { N = 1000 };
    char *text = malloc(N * 80);
    assert_non_null(text);
    size_t o = 0;
    for (int i = 0; i < N; i++) /* times 0..96 s in a scrambled order, many ties */
        o += (size_t)sprintf(text + o,
                             "{\"timestamp\": %d, \"input_length\": %d, \"output_length\": 1}\n",
                             ((i * 37) % 97) * 1000, i + 1);
    hx_trace *t = load_len("m.jsonl", text, o);
    assert_int_equal(t->n, N);
    for (size_t i = 1; i < t->n; i++) {
        assert_true(t->reqs[i - 1].arrival_s <= t->reqs[i].arrival_s);
        if (t->reqs[i - 1].arrival_s == t->reqs[i].arrival_s)
            assert_true(t->reqs[i - 1].input_tokens < t->reqs[i].input_tokens);
    }
    assert_true(t->reqs[0].arrival_s == 0.0);
    ASSERT_NEAR(t->reqs[N - 1].arrival_s, 96.0, 1e-12);
    hx_trace_free(t);
    free(text);
}

/* ------------------------------------------------------------------------- */
/* Azure CSV                                                                  */

static void test_azure_basic(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                "2023-11-16 18:15:46.6805900,374,44\n"
                                "2023-11-16 18:15:50.9481128,396,109\n"
                                "2023-11-16 18:15:51.0018740,879,5\n");
    assert_string_equal(t->format, "azure");
    assert_int_equal(t->n, 3);
    assert_true(t->reqs[0].arrival_s == 0.0);
    ASSERT_NEAR(t->reqs[1].arrival_s, 4.2675228, 1e-9);
    ASSERT_NEAR(t->reqs[2].arrival_s, 4.3212840, 1e-9);
    assert_int_equal(t->reqs[0].input_tokens, 374);
    assert_int_equal(t->reqs[0].output_tokens, 44);
    assert_int_equal(t->reqs[2].input_tokens, 879);
    assert_int_equal(t->reqs[2].output_tokens, 5);
    hx_trace_free(t);
}

/* Columns in any order, extra columns ignored, blank lines skipped. */
static void test_azure_column_order(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "GeneratedTokens,model,TIMESTAMP,ContextTokens\n"
                                "10,llama,2023-11-16 18:00:00,100\n"
                                "\n"
                                "20,,2023-11-16 18:00:02.5,200\n");
    assert_int_equal(t->n, 2);
    assert_int_equal(t->reqs[0].input_tokens, 100);
    assert_int_equal(t->reqs[0].output_tokens, 10);
    assert_int_equal(t->reqs[1].input_tokens, 200);
    assert_int_equal(t->reqs[1].output_tokens, 20);
    ASSERT_NEAR(t->reqs[1].arrival_s, 2.5, 1e-12);
    hx_trace_free(t);
}

static void test_azure_crlf_and_bom(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "\xEF\xBB\xBFTIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                                "2023-11-16 18:15:46.6805900,374,44\r\n"
                                "2023-11-16 18:15:47.6805900,375,45\r\n");
    assert_int_equal(t->n, 2);
    ASSERT_NEAR(t->reqs[1].arrival_s, 1.0, 1e-12);
    assert_int_equal(t->reqs[1].output_tokens, 45);
    hx_trace_free(t);
}

static void test_azure_quoted(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "\"TIMESTAMP\",\"note\",\"ContextTokens\",GeneratedTokens\n"
                                "\"2023-11-16 18:15:46.6805900\",\"a, \"\"quoted\"\" note\",\"374\","
                                "44\n"
                                " \"2023-11-16 18:15:47\" , \"\" , 12 ,\" 7 \"\n");
    assert_int_equal(t->n, 2);
    assert_int_equal(t->reqs[0].input_tokens, 374);
    assert_int_equal(t->reqs[0].output_tokens, 44);
    assert_int_equal(t->reqs[1].input_tokens, 12);
    assert_int_equal(t->reqs[1].output_tokens, 7);
    ASSERT_NEAR(t->reqs[1].arrival_s, 1.0 - 0.68059, 1e-9);
    hx_trace_free(t);
}

/* Arrival of the second row relative to the first, for a pair of dates. */
static double date_gap(const char *a, const char *b)
{
    char text[256];
    snprintf(text, sizeof text, "TIMESTAMP,ContextTokens,GeneratedTokens\n%s,1,1\n%s,1,1\n", a, b);
    hx_trace *t = load("d.csv", text);
    assert_int_equal(t->n, 2);
    assert_true(t->reqs[0].arrival_s == 0.0);
    double gap = t->reqs[1].arrival_s; /* the pairs below are in order */
    hx_trace_free(t);
    return gap;
}

static void test_azure_dates(void **state)
{
    (void)state;
    /* across a midnight and a month boundary, 100 ns apart */
    ASSERT_NEAR(date_gap("2023-11-30 23:59:59.9999999", "2023-12-01 00:00:00.0000001"), 2e-7,
                1e-12);
    /* across a year boundary */
    ASSERT_NEAR(date_gap("2023-12-31 23:59:59.75", "2024-01-01 00:00:00.5"), 0.75, 1e-12);
    /* a leap day exists in 2024 and not in 2023 */
    ASSERT_NEAR(date_gap("2024-02-28 12:00:00", "2024-03-01 12:00:00"), 2 * 86400.0, 1e-9);
    ASSERT_NEAR(date_gap("2023-02-28 12:00:00", "2023-03-01 12:00:00"), 86400.0, 1e-9);
    ASSERT_NEAR(date_gap("2000-02-28 00:00:00", "2000-03-01 00:00:00"), 2 * 86400.0, 1e-9);
    ASSERT_NEAR(date_gap("2100-02-28 00:00:00", "2100-03-01 00:00:00"), 86400.0, 1e-9);
    /* fewer or no fractional digits; ISO 'T' and 'Z'; offsets */
    ASSERT_NEAR(date_gap("2023-11-16 18:15:46", "2023-11-16T18:15:47.5Z"), 1.5, 1e-12);
    ASSERT_NEAR(date_gap("2023-11-16 18:15:46.1", "2023-11-16 18:15:46.123"), 0.023, 1e-12);
    ASSERT_NEAR(date_gap("2023-11-16T18:00:00Z", "2023-11-16T19:30:00+01:00"), 1800.0, 1e-9);
    ASSERT_NEAR(date_gap("2023-11-16T18:00:00Z", "2023-11-16T17:00:00-0130"), 1800.0, 1e-9);
    /* a whole month, and before 1970 */
    ASSERT_NEAR(date_gap("2023-11-16 00:00:00", "2023-12-16 00:00:00"), 30 * 86400.0, 1e-9);
    ASSERT_NEAR(date_gap("1969-12-31 23:59:59.5", "1970-01-01 00:00:00.25"), 0.75, 1e-12);
}

static void test_azure_out_of_order(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                "2023-11-16 18:15:50,3,1\n"
                                "2023-11-16 18:15:46.5,1,1\n"
                                "2023-11-16 18:15:48,2,1\n");
    assert_int_equal(t->n, 3);
    assert_int_equal(t->reqs[0].input_tokens, 1);
    assert_int_equal(t->reqs[1].input_tokens, 2);
    assert_int_equal(t->reqs[2].input_tokens, 3);
    assert_true(t->reqs[0].arrival_s == 0.0);
    ASSERT_NEAR(t->reqs[1].arrival_s, 1.5, 1e-12);
    ASSERT_NEAR(t->reqs[2].arrival_s, 3.5, 1e-12);
    hx_trace_free(t);
}

static void test_azure_plain_seconds(void **state)
{
    (void)state;
    hx_trace *t = load("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                "100.5,10,1\n"
                                "101,20,2\n"
                                "1.025e2,30,3\n"
                                "100.5,40,4\n");
    assert_int_equal(t->n, 4);
    static const int in[] = {10, 40, 20, 30};
    static const double at[] = {0, 0, 0.5, 2.0};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(t->reqs[i].input_tokens, in[i]);
        ASSERT_NEAR(t->reqs[i].arrival_s, at[i], 1e-12);
    }
    hx_trace_free(t);
}

/* ------------------------------------------------------------------------- */
/* Statistics                                                                 */

static void test_stats(void **state)
{
    (void)state;
    hx_trace *t = load("s.jsonl", "{\"timestamp\": 1000, \"input_length\": 100, \"output_length\": 10}\n"
                                  "{\"timestamp\": 1500, \"input_length\": 200, \"output_length\": 20}\n"
                                  "{\"timestamp\": 2000, \"input_length\": 300, \"output_length\": 30}\n"
                                  "{\"timestamp\": 3000, \"input_length\": 400, \"output_length\": 60}\n");
    double in = -1, out = -1, rate = -1;
    hx_trace_stats(t, &in, &out, &rate);
    ASSERT_NEAR(in, 250.0, 1e-12);
    ASSERT_NEAR(out, 30.0, 1e-12);
    ASSERT_NEAR(rate, 3.0 / 2.0, 1e-12); /* 3 gaps over 2 s */
    hx_trace_stats(t, NULL, NULL, &rate); /* NULL outputs are fine */
    ASSERT_NEAR(rate, 1.5, 1e-12);
    hx_trace_free(t);

    /* one request: no rate */
    t = load("s.jsonl", "{\"timestamp\": 7, \"input_length\": 5, \"output_length\": 3}\n");
    hx_trace_stats(t, &in, &out, &rate);
    ASSERT_NEAR(in, 5.0, 0);
    ASSERT_NEAR(out, 3.0, 0);
    assert_true(rate == 0.0);
    hx_trace_free(t);

    /* all at once: no rate */
    t = load("s.jsonl", "{\"timestamp\": 7, \"input_length\": 5, \"output_length\": 3}\n"
                        "{\"timestamp\": 7, \"input_length\": 7, \"output_length\": 5}\n");
    hx_trace_stats(t, &in, &out, &rate);
    ASSERT_NEAR(in, 6.0, 0);
    assert_true(rate == 0.0);
    hx_trace_free(t);

    hx_trace_stats(NULL, &in, &out, &rate);
    assert_true(in == 0 && out == 0 && rate == 0);
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */

static void test_error_not_text(void **state)
{
    (void)state;
    static const char nul[] = "TIMESTAMP,ContextTokens,GeneratedTokens\n12,1\0,1\n";
    expect_error_len("b.csv", nul, sizeof nul - 1,
                     "b.csv:2:5: not a text file: byte 0x00 at offset 44 is a NUL");
    expect_error("b.csv", "{\"timestamp\": 0}\n\n\xff\xfe\n", "b.csv:3:1: not a text file");
}

static void test_error_missing_columns(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    const char *text = "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,1\n";
    assert_int_equal(hx_trace_load_string(text, strlen(text), "a.csv", &t, &d), HX_EPARSE);
    assert_null(t);
    assert_int_equal(d.count, 1);
    assert_diag(&d, 0,
                "a.csv:1: missing column 'GeneratedTokens'; expected "
                "TIMESTAMP,ContextTokens,GeneratedTokens");
    hx_diags_release(&d);

    /* no header at all: each column is reported */
    hx_diags_init(&d);
    text = "2023-11-16 18:15:46,1,1\n";
    assert_int_equal(hx_trace_load_string(text, strlen(text), "a.csv", &t, &d), HX_EPARSE);
    assert_int_equal(d.count, 3);
    assert_true(hx_diags_contains(&d, "a.csv:1: missing column 'TIMESTAMP'"));
    assert_true(hx_diags_contains(&d, "a.csv:1: missing column 'ContextTokens'"));
    hx_diags_release(&d);

    /* the wrong case gets a hint */
    expect_error("a.csv", "timestamp,ContextTokens,GeneratedTokens\n1,1,1\n",
                 "a.csv:1: missing column 'TIMESTAMP'; expected "
                 "TIMESTAMP,ContextTokens,GeneratedTokens (column 1 is 'timestamp'; names are "
                 "case-sensitive)");
    expect_error("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens,TIMESTAMP\n1,1,1,1\n",
                 "a.csv:1:41: column 'TIMESTAMP' appears twice (columns 1 and 4)");
}

static void test_error_field_count(void **state)
{
    (void)state;
    expect_error("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,1,1\n2,2\n3,3,3,3\n",
                 "a.csv:3: found 2 fields; the header has 3");
    expect_error("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,1,1\n2,2\n3,3,3,3\n",
                 "a.csv:4: found 4 fields; the header has 3");
}

static void test_error_tokens(void **state)
{
    (void)state;
    const char *h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    char text[512];
    snprintf(text, sizeof text, "%s1,abc,1\n", h);
    expect_error("a.csv", text, "a.csv:2:3: ContextTokens: 'abc' is not a positive whole number");
    snprintf(text, sizeof text, "%s1,10,-3\n", h);
    expect_error("a.csv", text,
                 "a.csv:2:6: GeneratedTokens: '-3' is not a positive whole number");
    snprintf(text, sizeof text, "%s1,0,1\n", h);
    expect_error("a.csv", text, "a.csv:2:3: ContextTokens: '0' is not a positive whole number");
    snprintf(text, sizeof text, "%s1,2.5,1\n", h);
    expect_error("a.csv", text, "a.csv:2:3: ContextTokens: '2.5' is not a positive whole number");
    snprintf(text, sizeof text, "%s1,,1\n", h);
    expect_error("a.csv", text, "a.csv:2:3: ContextTokens: is empty; expected a positive whole");
    snprintf(text, sizeof text, "%s1,10000001,1\n", h);
    expect_error("a.csv", text, "a.csv:2:3: ContextTokens: '10000001' is too large; at most "
                                "10000000 tokens");
    snprintf(text, sizeof text, "%s1,99999999999999999999999,1\n", h);
    expect_error("a.csv", text, "ContextTokens: '99999999999999999999999' is too large");
    /* the limit itself is fine */
    snprintf(text, sizeof text, "%s1,10000000,10000000\n", h);
    hx_trace *t = load("a.csv", text);
    assert_int_equal(t->reqs[0].input_tokens, 10000000);
    hx_trace_free(t);

    /* JSONL */
    expect_error("m.jsonl", "{\"timestamp\": 0, \"input_length\": \"12\", \"output_length\": 1}\n",
                 "m.jsonl:1: input_length: '\"12\"' is a string; expected a positive whole "
                 "number");
    expect_error("m.jsonl", "{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1}\n",
                 "m.jsonl:1: input_length: '0' is not a positive whole number");
    expect_error("m.jsonl", "{\"timestamp\": 0, \"input_length\": 1.5, \"output_length\": 1}\n",
                 "m.jsonl:1: input_length: '1.5' is not a positive whole number");
    expect_error("m.jsonl",
                 "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 20000000}\n",
                 "m.jsonl:1: output_length: '20000000' is too large; at most 10000000 tokens");
    expect_error("m.jsonl",
                 "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": null}\n",
                 "m.jsonl:1: output_length: 'null' is null; expected a positive whole number");
}

/* The example of the documentation: a bad output_length on line 12. */
static void test_error_line_12(void **state)
{
    (void)state;
    char text[2048];
    size_t o = 0;
    for (int i = 0; i < 11; i++)
        o += (size_t)snprintf(text + o, sizeof text - o,
                              "{\"timestamp\": %d, \"input_length\": 10, \"output_length\": 5}\n",
                              i * 100);
    snprintf(text + o, sizeof text - o,
             "{\"timestamp\": 1200, \"input_length\": 10, \"output_length\": -3}\n");
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    assert_int_equal(hx_trace_load_string(text, strlen(text), "FILE", &t, &d), HX_EPARSE);
    assert_int_equal(d.count, 1);
    assert_diag(&d, 0, "FILE:12: output_length: '-3' is not a positive whole number");
    hx_diags_release(&d);
}

static void test_error_timestamps(void **state)
{
    (void)state;
    const char *h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    static const struct {
        const char *ts, *needle;
    } cases[] = {
        {"-1.5", "a.csv:2:1: TIMESTAMP: '-1.5' is negative; expected seconds >= 0"},
        {"inf", "a.csv:2:1: TIMESTAMP: 'inf' is not finite"},
        {"-Infinity", "a.csv:2:1: TIMESTAMP: '-Infinity' is not finite"},
        {"nan", "a.csv:2:1: TIMESTAMP: 'nan' is not finite"},
        {"1e300", "a.csv:2:1: TIMESTAMP: '1e300' is too large"},
        {"0x10", "'0x10' is neither a date-time (YYYY-MM-DD HH:MM:SS[.fffffff]) nor a number"},
        {"11/16/2023 18:15:46", "'11/16/2023 18:15:46' is neither a date-time"},
        {"", "a.csv:2:1: TIMESTAMP: is empty; expected a date-time"},
        {"2023-13-16 18:15:46", "a.csv:2:1: TIMESTAMP: malformed date '2023-13-16 18:15:46': "
                                "month 13 is out of range; expected YYYY-MM-DD HH:MM:SS"},
        {"2023-11-31 18:15:46", "day 31 is out of range for 2023-11"},
        {"2023-02-29 18:15:46", "day 29 is out of range for 2023-02"},
        {"2023-11-16 24:00:00", "hour 24 is out of range"},
        {"2023-11-16 18:60:00", "minute 60 is out of range"},
        {"2023-11-16 18:15:61", "second 61 is out of range"},
        {"2023-11-16", "malformed date '2023-11-16': expected a time HH:MM:SS after the date"},
        {"2023-11-16 18:15", "expected a time HH:MM:SS after the date"},
        {"2023-1-16 18:15:46", "expected the date as YYYY-MM-DD"},
        {"2023-11-16 18:15:46.", "expected digits after the '.'"},
        {"2023-11-16 18:15:46.5 UTC", "unexpected ' ' after the time"},
        {"2023-11-16 18:15:46+25:00", "expected a UTC offset +HH:MM after the time"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "%s%s,1,1\n", h, cases[i].ts);
        expect_error("a.csv", text, cases[i].needle);
    }
    /* dates and plain seconds do not mix */
    expect_error("a.csv",
                 "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n12.5,1,1\n",
                 "a.csv:3:1: TIMESTAMP: '12.5' is a number of seconds but line 2 has a "
                 "date-time; use one kind throughout");

    /* JSONL */
    expect_error("m.jsonl", "{\"timestamp\": -5, \"input_length\": 1, \"output_length\": 1}\n",
                 "m.jsonl:1: timestamp: '-5' is negative; expected milliseconds >= 0");
    expect_error("m.jsonl",
                 "{\"timestamp\": \"2023-11-16\", \"input_length\": 1, \"output_length\": 1}\n",
                 "m.jsonl:1: timestamp: '\"2023-11-16\"' is a string; expected milliseconds");
    expect_error("m.jsonl", "{\"timestamp\": 1e300, \"input_length\": 1, \"output_length\": 1}\n",
                 "m.jsonl:1: timestamp: '1e300' is too large");
}

static void test_error_jsonl(void **state)
{
    (void)state;
    const char *ok = "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n";
    char text[512];
    snprintf(text, sizeof text, "%s{\"timestamp\": x, \"input_length\": 1}\n", ok);
    expect_error("m.jsonl", text, "m.jsonl:2:15: invalid JSON: invalid token near 'x'");
    snprintf(text, sizeof text, "%s{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1} ,\n",
             ok);
    expect_error("m.jsonl", text, "m.jsonl:2:57: invalid JSON: end of line expected near ','");
    snprintf(text, sizeof text, "%s\n{\"timestamp\": 1,\n", ok);
    expect_error("m.jsonl", text, "m.jsonl:3:16: invalid JSON: string or '}' expected near end of line");
    snprintf(text, sizeof text, "%s{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, "
                                "\"input_length\": 2}\n",
             ok);
    expect_error("m.jsonl", text, "m.jsonl:2:");
    expect_error("m.jsonl", text, "duplicate object key");
    snprintf(text, sizeof text, "%s[1, 2]\n", ok);
    expect_error("m.jsonl", text,
                 "m.jsonl:2: the line is an array; expected a JSON object with timestamp (ms), "
                 "input_length and output_length");
    snprintf(text, sizeof text, "%sTIMESTAMP,ContextTokens,GeneratedTokens\n", ok);
    expect_error("m.jsonl", text, "m.jsonl:2:9: invalid JSON: invalid token near 'TIMESTAMP'");

    /* missing keys: every one is named */
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    snprintf(text, sizeof text, "%s{\"hash_ids\": [1, 2]}\n", ok);
    assert_int_equal(hx_trace_load_string(text, strlen(text), "m.jsonl", &t, &d), HX_EPARSE);
    assert_int_equal(d.count, 3);
    assert_diag(&d, 0,
                "m.jsonl:2: missing key 'timestamp'; each line needs timestamp (ms), "
                "input_length and output_length");
    assert_true(hx_diags_contains(&d, "m.jsonl:2: missing key 'input_length'"));
    assert_true(hx_diags_contains(&d, "m.jsonl:2: missing key 'output_length'"));
    hx_diags_release(&d);
}

static void test_error_csv_quotes(void **state)
{
    (void)state;
    expect_error("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,\"12,1\n",
                 "a.csv:2:3: unterminated quoted field");
    expect_error("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,\"12\"3,1\n",
                 "a.csv:2:7: unexpected '3,1' after a quoted field; expected ',' or the end");
    expect_error("a.csv", "TIMESTAMP,\"ContextTokens,GeneratedTokens\n1,1,1\n",
                 "a.csv:1:11: unterminated quoted field");
}

static void test_error_empty(void **state)
{
    (void)state;
    expect_error("e.csv", "", "e.csv:1: no requests: the trace is empty");
    expect_error("e.csv", "\n  \r\n\n", "e.csv:1: no requests: the trace is empty");
    expect_error_len("e.csv", NULL, 0, "e.csv:1: no requests");
    expect_error("e.csv", "\nTIMESTAMP,ContextTokens,GeneratedTokens\n\n",
                 "e.csv:2: no requests: the header is not followed by any rows");
    hx_trace *t = NULL;
    assert_int_equal(hx_trace_load_string("x", 1, "x", NULL, NULL), HX_EINVAL);
    assert_int_equal(hx_trace_load_string(NULL, 5, "x", &t, NULL), HX_EINVAL);
    /* diags may be NULL */
    assert_int_equal(hx_trace_load_string("", 0, NULL, &t, NULL), HX_EPARSE);
    assert_null(t);
}

/* Every problem is reported with its line, twenty of them, then a count of the rest. */
static void test_error_all_and_capped(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    const char *two = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                      "1,1,1\n"
                      "2,x,-1\n"
                      "3,3,3\n"
                      "-4,4,4\n";
    assert_int_equal(hx_trace_load_string(two, strlen(two), "a.csv", &t, &d), HX_EPARSE);
    assert_int_equal(d.count, 3);
    assert_diag(&d, 0, "a.csv:3:3: ContextTokens: 'x' is not a positive whole number");
    assert_diag(&d, 1, "a.csv:3:5: GeneratedTokens: '-1' is not a positive whole number");
    assert_diag(&d, 2, "a.csv:5:1: TIMESTAMP: '-4' is negative; expected seconds >= 0");
    hx_diags_release(&d);

    char text[4096];
    size_t o = 0;
    for (int i = 1; i <= 35; i++)
        o += (size_t)snprintf(text + o, sizeof text - o,
                              "{\"timestamp\": %d, \"input_length\": %d, \"output_length\": 1}\n",
                              i, i <= 5 ? 1 : -i);
    hx_diags_init(&d);
    assert_int_equal(hx_trace_load_string(text, o, "m.jsonl", &t, &d), HX_EPARSE);
    assert_null(t);
    assert_int_equal(d.count, HX_TRACE_MAX_DIAGS + 1);
    assert_diag(&d, 0, "m.jsonl:6: input_length: '-6' is not a positive whole number");
    assert_diag(&d, 19, "m.jsonl:25: input_length: '-25' is not a positive whole number");
    assert_diag(&d, 20, "m.jsonl: ... and 10 more problems");
    hx_diags_release(&d);

    /* diagnostics already in the list are kept and do not count */
    hx_diags_init(&d);
    hx_diags_add(&d, "other", 1, 1, NULL, "earlier");
    assert_int_equal(hx_trace_load_string(text, o, "m.jsonl", &t, &d), HX_EPARSE);
    assert_int_equal(d.count, 1 + HX_TRACE_MAX_DIAGS + 1);
    hx_diags_release(&d);
}

/* A long bad value is cut in the message. */
static void test_error_long_value(void **state)
{
    (void)state;
    char text[512];
    char big[201];
    memset(big, 'z', 200);
    big[200] = '\0';
    snprintf(text, sizeof text, "TIMESTAMP,ContextTokens,GeneratedTokens\n1,%s,1\n", big);
    expect_error("a.csv", text,
                 "ContextTokens: 'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz...' is not a positive");
}

/* ------------------------------------------------------------------------- */
/* Files                                                                      */

static void test_missing_file(void **state)
{
    (void)state;
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = (hx_trace *)&d;
    assert_int_equal(hx_trace_load("/nonexistent/x.jsonl", &t, &d), HX_ENOENT);
    assert_null(t);
    assert_int_equal(d.count, 1);
    assert_diag(&d, 0, "cannot open trace '/nonexistent/x.jsonl': no such file");
    hx_diags_release(&d);
    assert_int_equal(hx_trace_load("/nonexistent/x.jsonl", &t, NULL), HX_ENOENT);
}

static void test_load_file(void **state)
{
    (void)state;
    char path[] = "/tmp/hx_trace_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    static const char text[] = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                               "2023-11-16 18:15:46.6805900,374,44\n"
                               "2023-11-16 18:15:47.6805900,375,oops\n";
    assert_int_equal(write(fd, text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(fd);
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    assert_int_equal(hx_trace_load(path, &t, &d), HX_EPARSE);
    char want[128];
    snprintf(want, sizeof want, "%s:3:33: GeneratedTokens: 'oops' is not a positive", path);
    assert_true(hx_diags_contains(&d, want));
    hx_diags_release(&d);
    unlink(path);
}

static void check_sample(const char *file, const char *format)
{
#ifdef HX_TEST_DATA
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", HX_TEST_DATA, file);
    hx_diags d;
    hx_diags_init(&d);
    hx_trace *t = NULL;
    hx_status st = hx_trace_load(path, &t, &d);
    if (st != HX_OK) {
        print_diags(&d);
        fail_msg("loading %s: %s", path, hx_strerror(st));
    }
    hx_diags_release(&d);
    assert_string_equal(t->format, format);
    assert_int_equal(t->n, 50);
    assert_true(t->reqs[0].arrival_s == 0.0);
    for (size_t i = 0; i < t->n; i++) {
        if (i > 0)
            assert_true(t->reqs[i - 1].arrival_s <= t->reqs[i].arrival_s);
        assert_in_range(t->reqs[i].input_tokens, 200, 4000);
        assert_in_range(t->reqs[i].output_tokens, 20, 500);
    }
    double span = t->reqs[t->n - 1].arrival_s;
    assert_true(span > 25 && span < 35);
    double in, out, rate;
    hx_trace_stats(t, &in, &out, &rate);
    assert_true(in > 200 && in < 4000 && out > 20 && out < 500);
    ASSERT_NEAR(rate, 49.0 / span, 1e-9);
    hx_trace_free(t);
#else
    (void)file;
    (void)format;
    skip();
#endif
}

static void test_sample_mooncake(void **state)
{
    (void)state;
    check_sample("sample-mooncake.jsonl", "mooncake");
}

static void test_sample_azure(void **state)
{
    (void)state;
    check_sample("sample-azure.csv", "azure");
}

static void test_free_null(void **state)
{
    (void)state;
    hx_trace_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mooncake_basic),
        cmocka_unit_test(test_mooncake_whole_reals_and_crlf),
        cmocka_unit_test(test_mooncake_sorted_stable),
        cmocka_unit_test(test_sort_many),
        cmocka_unit_test(test_azure_basic),
        cmocka_unit_test(test_azure_column_order),
        cmocka_unit_test(test_azure_crlf_and_bom),
        cmocka_unit_test(test_azure_quoted),
        cmocka_unit_test(test_azure_dates),
        cmocka_unit_test(test_azure_out_of_order),
        cmocka_unit_test(test_azure_plain_seconds),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_error_not_text),
        cmocka_unit_test(test_error_missing_columns),
        cmocka_unit_test(test_error_field_count),
        cmocka_unit_test(test_error_tokens),
        cmocka_unit_test(test_error_line_12),
        cmocka_unit_test(test_error_timestamps),
        cmocka_unit_test(test_error_jsonl),
        cmocka_unit_test(test_error_csv_quotes),
        cmocka_unit_test(test_error_empty),
        cmocka_unit_test(test_error_all_and_capped),
        cmocka_unit_test(test_error_long_value),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_sample_mooncake),
        cmocka_unit_test(test_sample_azure),
        cmocka_unit_test(test_free_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
