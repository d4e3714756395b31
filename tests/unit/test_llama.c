/*
 * test_llama.c - the CPU Llama forward pass against an independent NumPy
 * implementation (tests/ref/llama_ref.py) on make-tiny models in fp32, bf16
 * and fp16; token-by-token, batched prefill and pipeline stages agreeing;
 * greedy and seeded sampling being deterministic; the loader's errors; and
 * tensor-parallel slices holding exactly their rows and columns.
 *
 * The NumPy comparisons skip, saying so, where python3 with numpy is missing
 * ($HX_PYTHON, python3 on PATH and /usr/bin/python3 are tried, in order).
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/kvcache.h"
#include "runtime/llama.h"
#include "runtime/llama_weights.h"
#include "runtime/safetensors.h"
#include "runtime/tiny.h"

#ifndef HX_SOURCE_DIR
#define HX_SOURCE_DIR "."
#endif
#define REF_SCRIPT HX_SOURCE_DIR "/tests/ref/llama_ref.py"
#define LOGIT_TOL 1e-4

static char tmp_dir[256];
static char python[512]; /* "" when none with numpy was found */

/* ---- helpers ------------------------------------------------------------------ */

static void find_python(void)
{
    const char *candidates[3] = {getenv("HX_PYTHON"), "python3", "/usr/bin/python3"};
    python[0] = '\0';
    for (int i = 0; i < 3; i++) {
        if (!candidates[i] || !candidates[i][0])
            continue;
        char cmd[700];
        snprintf(cmd, sizeof cmd, "'%s' -c 'import numpy' >/dev/null 2>&1", candidates[i]);
        if (system(cmd) == 0) {
            snprintf(python, sizeof python, "%s", candidates[i]);
            return;
        }
    }
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx_test_llama_XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    find_python();
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void model_dir(const char *name, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%s", tmp_dir, name);
}

/* Writes a tiny model called `name` (once) and returns its directory. */
static void make_tiny(const char *name, const hx_tiny_config *c, char *dir, size_t size)
{
    model_dir(name, dir, size);
    char cfg[700];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    if (access(cfg, F_OK) == 0)
        return;
    hx_err err = {0};
    if (hx_tiny_write(dir, c, &err) != HX_OK)
        fail_msg("make-tiny: %s", err.msg);
}

static hx_llama *load(const char *dir, int first, int num, int threads)
{
    hx_llama_options opt;
    hx_llama_options_init(&opt);
    opt.first_layer = first;
    opt.num_layers = num;
    opt.threads = threads;
    hx_llama *m = NULL;
    hx_err err = {0};
    if (hx_llama_load(dir, &opt, &m, &err) != HX_OK)
        fail_msg("load '%s': %s", dir, err.msg);
    return m;
}

static hx_llama_state *state_for(const hx_llama *m, int max_tokens, int max_batch)
{
    hx_llama_state *s = NULL;
    hx_err err = {0};
    if (hx_llama_state_new(m, max_tokens, max_batch, &s, &err) != HX_OK)
        fail_msg("state: %s", err.msg);
    return s;
}

/*
 * Runs the NumPy reference on tokens[0..n) and returns its logits [n][vocab]
 * (caller frees), or NULL after a skip message when python/numpy is missing.
 */
static double *ref_logits(const char *dir, const int *tokens, int n, int vocab)
{
    if (!python[0])
        return NULL;
    size_t cap = 2048 + (size_t)n * 12;
    char *cmd = malloc(cap);
    assert_non_null(cmd);
    int o = snprintf(cmd, cap, "'%s' '%s' '%s' ", python, REF_SCRIPT, dir);
    for (int i = 0; i < n; i++)
        o += snprintf(cmd + o, cap - (size_t)o, "%s%d", i ? "," : "", tokens[i]);
    FILE *p = popen(cmd, "r");
    free(cmd);
    assert_non_null(p);
    size_t len = 0, bcap = 1 << 20;
    char *buf = malloc(bcap);
    assert_non_null(buf);
    size_t k;
    while ((k = fread(buf + len, 1, bcap - len, p)) > 0) {
        len += k;
        if (len == bcap) {
            bcap *= 2;
            buf = realloc(buf, bcap);
            assert_non_null(buf);
        }
    }
    int rc = pclose(p);
    if (rc != 0)
        fail_msg("the NumPy reference failed (status %d) on '%s'", rc, dir);
    json_error_t jerr;
    json_t *root = json_loadb(buf, len, 0, &jerr);
    free(buf);
    if (!root)
        fail_msg("the NumPy reference printed bad JSON: %s", jerr.text);
    json_t *rows = json_object_get(root, "logits");
    assert_int_equal(json_array_size(rows), (size_t)n);
    double *out = malloc((size_t)n * vocab * sizeof *out);
    assert_non_null(out);
    for (int t = 0; t < n; t++) {
        json_t *row = json_array_get(rows, (size_t)t);
        assert_int_equal(json_array_size(row), (size_t)vocab);
        for (int v = 0; v < vocab; v++)
            out[(size_t)t * vocab + v] = json_number_value(json_array_get(row, (size_t)v));
    }
    json_decref(root);
    return out;
}

static void compare_logits(const char *what, const float *got, const double *want, int vocab,
                           double tol)
{
    double worst = 0;
    int at = 0;
    for (int v = 0; v < vocab; v++) {
        double d = fabs(got[v] - want[v]);
        if (!(d <= worst)) {
            worst = d;
            at = v;
        }
    }
    if (!(worst <= tol))
        fail_msg("%s: logit %d differs by %g (%g vs %g; tolerance %g)", what, at, worst,
                 (double)got[at], want[at], tol);
}

/* A deterministic token sequence inside the vocabulary. */
static void some_tokens(int *t, int n, int vocab)
{
    uint64_t s = 99;
    t[0] = HX_TINY_BOS_ID < vocab ? HX_TINY_BOS_ID : 1;
    for (int i = 1; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int)((s >> 33) % (uint64_t)vocab);
    }
}

/* ---- against NumPy -------------------------------------------------------------- */

/*
 * Every position's logits, computed three ways (token by token, batched
 * through the stage API with max_batch tokens per call, prefill), against the
 * reference.
 */
static void check_against_numpy(const char *name, const hx_tiny_config *c, int n, int max_batch,
                                int threads)
{
    char dir[512];
    make_tiny(name, c, dir, sizeof dir);
    int *tokens = malloc((size_t)n * sizeof *tokens);
    assert_non_null(tokens);
    some_tokens(tokens, n, c->vocab_size);
    double *want = ref_logits(dir, tokens, n, c->vocab_size);
    if (!want) {
        free(tokens);
        print_message("skipped: python3 with numpy not found (set HX_PYTHON or install "
                      "python3-numpy)\n");
        skip();
    }
    hx_llama *m = load(dir, 0, 0, threads);
    const hx_model *cfg = hx_llama_config(m);
    const int V = cfg->vocab_size, h = cfg->hidden_size;
    hx_err err = {0};
    char what[128];

    /* token by token */
    hx_llama_state *s = state_for(m, n, 1);
    for (int t = 0; t < n; t++) {
        const float *logits = NULL;
        if (hx_llama_forward(m, s, tokens[t], t, &logits, &err) != HX_OK)
            fail_msg("forward: %s", err.msg);
        snprintf(what, sizeof what, "%s: forward, position %d", name, t);
        compare_logits(what, logits, want + (size_t)t * V, V, LOGIT_TOL);
    }
    hx_llama_state_free(s);

    /* batched: max_batch tokens per call, every position's logits through the head */
    s = state_for(m, n, max_batch);
    float *x = malloc((size_t)max_batch * h * sizeof *x), *logits = malloc((size_t)V * 4);
    assert_true(x && logits);
    for (int t0 = 0; t0 < n; t0 += max_batch) {
        int k = n - t0 < max_batch ? n - t0 : max_batch;
        assert_int_equal(hx_llama_embed(m, tokens + t0, k, x, &err), HX_OK);
        assert_int_equal(hx_llama_layers(m, s, x, k, t0, &err), HX_OK);
        for (int t = 0; t < k; t++) {
            assert_int_equal(hx_llama_head(m, s, x + (size_t)t * h, logits, &err), HX_OK);
            snprintf(what, sizeof what, "%s: batched by %d, position %d", name, max_batch,
                     t0 + t);
            compare_logits(what, logits, want + (size_t)(t0 + t) * V, V, LOGIT_TOL);
        }
    }
    hx_llama_state_free(s);

    /* prefill (chunks of max_batch) gives the last position's logits */
    s = state_for(m, n, max_batch);
    const float *last = NULL;
    if (hx_llama_prefill(m, s, tokens, n, 0, &last, &err) != HX_OK)
        fail_msg("prefill: %s", err.msg);
    snprintf(what, sizeof what, "%s: prefill", name);
    compare_logits(what, last, want + (size_t)(n - 1) * V, V, LOGIT_TOL);
    hx_llama_state_free(s);

    free(x);
    free(logits);
    free(want);
    free(tokens);
    hx_llama_free(m);
}

static void test_numpy_fp32(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c); /* 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 512 */
    check_against_numpy("fp32", &c, 24, 5, 2);
}

static void test_numpy_bf16(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.dtype = HX_MODEL_DTYPE_BF16;
    c.num_layers = 3;
    c.hidden_size = 48;
    c.num_heads = 6;
    c.num_kv_heads = 3;
    c.intermediate_size = 96;
    c.vocab_size = 300;
    c.seed = 7;
    check_against_numpy("bf16", &c, 17, 4, 3);
}

static void test_numpy_fp16_mha(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.dtype = HX_MODEL_DTYPE_FP16;
    c.num_heads = 2;
    c.num_kv_heads = 2; /* no GQA */
    c.intermediate_size = 80;
    c.rope_theta = 500000.0;
    c.seed = 3;
    check_against_numpy("fp16", &c, 40, 64, 1);
}

static void test_numpy_mqa_one_layer(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 1;
    c.hidden_size = 32;
    c.num_heads = 4;
    c.num_kv_heads = 1; /* multi-query */
    c.intermediate_size = 50;
    c.vocab_size = 258;
    check_against_numpy("mqa", &c, 9, 2, 2);
}

/* ---- internal consistency -------------------------------------------------------------- */

static void test_threads_agree(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    char dir[512];
    make_tiny("fp32", &c, dir, sizeof dir);
    hx_llama *m1 = load(dir, 0, 0, 1), *m3 = load(dir, 0, 0, 3);
    hx_llama_state *s1 = state_for(m1, 16, 0), *s3 = state_for(m3, 16, 0);
    int tokens[16];
    some_tokens(tokens, 16, c.vocab_size);
    const float *l1, *l3;
    hx_err err = {0};
    assert_int_equal(hx_llama_prefill(m1, s1, tokens, 16, 0, &l1, &err), HX_OK);
    assert_int_equal(hx_llama_prefill(m3, s3, tokens, 16, 0, &l3, &err), HX_OK);
    for (int v = 0; v < c.vocab_size; v++)
        assert_true(fabsf(l1[v] - l3[v]) <= 1e-5f * (1 + fabsf(l1[v])));
    assert_int_equal(hx_cpu_pool_threads(hx_llama_pool(m3)), 3);
    assert_int_equal(hx_llama_owned_weight_bytes(m1), 0); /* fp32: used in place */
    hx_llama_state_free(s1);
    hx_llama_state_free(s3);
    hx_llama_free(m1);
    hx_llama_free(m3);
}

static void test_stages(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 3;
    char dir[512];
    make_tiny("three", &c, dir, sizeof dir);
    hx_llama *full = load(dir, 0, 0, 1);
    hx_llama *a = load(dir, 0, 1, 1), *b = load(dir, 1, 2, 1);
    assert_true(hx_llama_has_embedding(a) && !hx_llama_has_head(a));
    assert_true(!hx_llama_has_embedding(b) && hx_llama_has_head(b));
    assert_int_equal(hx_llama_first_layer(b), 1);
    assert_int_equal(hx_llama_num_layers(b), 2);
    hx_llama_state *sf = state_for(full, 8, 8), *sa = state_for(a, 8, 8), *sb = state_for(b, 8, 8);
    int tokens[8];
    some_tokens(tokens, 8, c.vocab_size);
    const int h = c.hidden_size;
    float x[8 * 64], logits[512];
    const float *want;
    hx_err err = {0};
    assert_int_equal(hx_llama_prefill(full, sf, tokens, 8, 0, &want, &err), HX_OK);
    /* stage a: embed + layer 0; stage b: layers 1-2 + head; prompt then one decode step */
    assert_int_equal(hx_llama_embed(a, tokens, 7, x, &err), HX_OK);
    assert_int_equal(hx_llama_layers(a, sa, x, 7, 0, &err), HX_OK);
    assert_int_equal(hx_llama_layers(b, sb, x, 7, 0, &err), HX_OK);
    assert_int_equal(hx_llama_embed(a, tokens + 7, 1, x, &err), HX_OK);
    assert_int_equal(hx_llama_layers(a, sa, x, 1, 7, &err), HX_OK);
    assert_int_equal(hx_llama_layers(b, sb, x, 1, 7, &err), HX_OK);
    assert_int_equal(hx_llama_head(b, sb, x, logits, &err), HX_OK);
    for (int v = 0; v < c.vocab_size; v++)
        assert_true(fabsf(logits[v] - want[v]) <= 1e-5f * (1 + fabsf(want[v])));
    (void)h;
    /* the stage KV caches split the full one */
    assert_int_equal(hx_llama_state_kv_bytes(sa) + hx_llama_state_kv_bytes(sb),
                     hx_llama_state_kv_bytes(sf));

    /* what a partial stage cannot do */
    const float *l;
    assert_int_equal(hx_llama_forward(a, sa, 1, 0, &l, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "needs the whole model"));
    assert_int_equal(hx_llama_head(a, sa, x, logits, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "has no head"));
    assert_int_equal(hx_llama_embed(b, tokens, 1, x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "has no embedding"));

    hx_llama_options opt;
    hx_llama_options_init(&opt);
    opt.first_layer = 2;
    opt.num_layers = 2;
    hx_llama *bad = NULL;
    assert_int_equal(hx_llama_load(dir, &opt, &bad, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "layers [2, 4) are not within the model's 3 layers"));
    assert_null(bad);

    /* a lent pool is used, not owned */
    hx_cpu_pool *pool = NULL;
    assert_int_equal(hx_cpu_pool_new(2, &pool, &err), HX_OK);
    opt.first_layer = 0;
    opt.num_layers = 0;
    opt.pool = pool;
    hx_llama *lent = NULL;
    assert_int_equal(hx_llama_load(dir, &opt, &lent, &err), HX_OK);
    assert_ptr_equal(hx_llama_pool(lent), pool);
    hx_llama_free(lent);
    hx_cpu_pool_free(pool);

    hx_llama_state_free(sf);
    hx_llama_state_free(sa);
    hx_llama_state_free(sb);
    hx_llama_free(full);
    hx_llama_free(a);
    hx_llama_free(b);
}

static void test_bounds(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    char dir[512];
    make_tiny("fp32", &c, dir, sizeof dir);
    hx_llama *m = load(dir, 0, 0, 1);
    hx_llama_state *s = state_for(m, 4, 2);
    assert_int_equal(hx_llama_state_max_tokens(s), 4);
    assert_int_equal(hx_llama_state_max_batch_tokens(s), 2);
    const float *l;
    hx_err err = {0};
    assert_int_equal(hx_llama_forward(m, s, 512, 0, &l, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "token 512 at index 0 is outside the vocabulary of 512"));
    assert_int_equal(hx_llama_forward(m, s, -1, 0, &l, &err), HX_EINVAL);
    assert_int_equal(hx_llama_forward(m, s, 1, 4, &l, &err), HX_ERANGE);
    assert_non_null(strstr(err.msg, "beyond the KV cache of 4 tokens"));
    int tokens[5] = {1, 2, 3, 4, 5};
    assert_int_equal(hx_llama_prefill(m, s, tokens, 5, 0, &l, &err), HX_ERANGE);
    assert_int_equal(hx_llama_prefill(m, s, tokens, 4, 0, &l, &err), HX_OK); /* 2 chunks */
    float x[3 * 64];
    assert_int_equal(hx_llama_layers(m, s, x, 3, 0, &err), HX_ERANGE); /* > max batch */
    hx_llama_state *big = NULL;
    assert_int_equal(hx_llama_state_new(m, 4096, 0, &big, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "max_position_embeddings"));
    hx_llama_state_free(s);
    hx_llama_free(m);
    hx_llama_free(NULL);
    hx_llama_state_free(NULL);
}

/* ---- loader errors ---------------------------------------------------------------------- */

static void write_file(const char *dir, const char *file, const char *text)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void expect_load_error(const char *dir, hx_status code, const char *needle)
{
    hx_llama *m = NULL;
    hx_err err = {0};
    hx_status st = hx_llama_load(dir, NULL, &m, &err);
    if (st != code || !strstr(err.msg, needle))
        fail_msg("load '%s': got %d '%s'; expected %d with '%s'", dir, st, err.msg, code,
                 needle);
    assert_null(m);
}

static const char *tiny_config_text(int hidden, int layers, const char *extra)
{
    static char buf[1024];
    snprintf(buf, sizeof buf,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
             "\"hidden_size\": %d, \"intermediate_size\": 128, \"num_attention_heads\": 4, "
             "\"num_hidden_layers\": %d, \"num_key_value_heads\": 2, \"vocab_size\": 512, "
             "\"rms_norm_eps\": 1e-5%s}",
             hidden, layers, extra);
    return buf;
}

static void copy_weights(const char *from, const char *to)
{
    char cmd[1200];
    mkdir(to, 0755);
    snprintf(cmd, sizeof cmd, "cp '%s/model.safetensors' '%s/'", from, to);
    assert_int_equal(system(cmd), 0);
}

static void test_load_errors(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    char good[512], dir[512];
    make_tiny("fp32", &c, good, sizeof good);

    model_dir("nowhere", dir, sizeof dir);
    expect_load_error(dir, HX_ENOENT, "not a directory");

    model_dir("no_weights", dir, sizeof dir);
    mkdir(dir, 0755);
    write_file(dir, "config.json", tiny_config_text(64, 2, ""));
    expect_load_error(dir, HX_ENOENT, "no model.safetensors");

    model_dir("no_config", dir, sizeof dir);
    mkdir(dir, 0755);
    expect_load_error(dir, HX_ENOENT, "config.json");

    model_dir("wrong_shape", dir, sizeof dir);
    copy_weights(good, dir);
    write_file(dir, "config.json", tiny_config_text(32, 2, ""));
    expect_load_error(dir, HX_EPARSE,
                      "tensor 'model.embed_tokens.weight': shape [512, 64], expected [512, 32]");

    model_dir("missing_layer", dir, sizeof dir);
    copy_weights(good, dir);
    write_file(dir, "config.json", tiny_config_text(64, 3, ""));
    expect_load_error(dir, HX_ENOENT, "no tensor 'model.layers.2.input_layernorm.weight'");

    model_dir("biased", dir, sizeof dir);
    copy_weights(good, dir);
    write_file(dir, "config.json", tiny_config_text(64, 2, ", \"attention_bias\": true"));
    expect_load_error(dir, HX_ENOTSUP, "biases are not supported");

    model_dir("windowed", dir, sizeof dir);
    copy_weights(good, dir);
    write_file(dir, "config.json",
               "{\"model_type\": \"mistral\", \"hidden_size\": 64, \"intermediate_size\": 128, "
               "\"num_attention_heads\": 4, \"num_hidden_layers\": 2, \"num_key_value_heads\": "
               "2, \"vocab_size\": 512, \"sliding_window\": 16}");
    expect_load_error(dir, HX_ENOTSUP, "sliding-window");

    /* tied embeddings without lm_head.weight: the embedding is used */
    model_dir("tied", dir, sizeof dir);
    mkdir(dir, 0755);
    write_file(dir, "config.json", tiny_config_text(64, 2, ", \"tie_word_embeddings\": true"));
    {
        hx_safetensors *f = NULL;
        hx_err err = {0};
        char path[1100];
        snprintf(path, sizeof path, "%s/model.safetensors", good);
        assert_int_equal(hx_safetensors_open(path, NULL, &f, &err), HX_OK);
        size_t n = hx_safetensors_count(f), k = 0;
        hx_safetensors_entry *e = calloc(n, sizeof *e);
        for (size_t i = 0; i < n; i++) {
            const hx_safetensors_tensor *t = hx_safetensors_at(f, i);
            if (strcmp(t->name, "lm_head.weight") == 0)
                continue;
            e[k].name = t->name;
            e[k].dtype = t->dtype;
            e[k].ndim = t->ndim;
            memcpy(e[k].shape, t->shape, sizeof e[k].shape);
            e[k].data = t->data;
            k++;
        }
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        assert_int_equal(hx_safetensors_write(path, e, k, NULL, 0, &err), HX_OK);
        free(e);
        hx_safetensors_free(f);
        hx_llama *m = load(dir, 0, 0, 1);
        hx_llama_state *s = state_for(m, 2, 0);
        const float *l;
        assert_int_equal(hx_llama_forward(m, s, 5, 0, &l, &err), HX_OK);
        assert_true(isfinite(l[0]));
        hx_llama_state_free(s);
        hx_llama_free(m);
    }
}

/* A model split over two shards with an index gives the same logits as the single file. */
static void test_sharded_model(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.dtype = HX_MODEL_DTYPE_BF16;
    char good[512], dir[512];
    make_tiny("bf16_for_shards", &c, good, sizeof good);
    model_dir("sharded", dir, sizeof dir);
    mkdir(dir, 0755);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cp '%s/config.json' '%s/'", good, dir);
    assert_int_equal(system(cmd), 0);

    hx_safetensors *f = NULL;
    hx_err err = {0};
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors", good);
    assert_int_equal(hx_safetensors_open(path, NULL, &f, &err), HX_OK);
    size_t n = hx_safetensors_count(f);
    hx_safetensors_entry *e = calloc(n, sizeof *e);
    assert_non_null(e);
    size_t text_cap = 64 * n + 64, o = 0;
    char *index = malloc(text_cap);
    assert_non_null(index);
    o += (size_t)snprintf(index, text_cap, "{\"weight_map\": {");
    for (size_t i = 0; i < n; i++) {
        const hx_safetensors_tensor *t = hx_safetensors_at(f, i);
        e[i] = (hx_safetensors_entry){t->name, t->dtype, t->ndim, {0}, t->data};
        memcpy(e[i].shape, t->shape, sizeof e[i].shape);
        o += (size_t)snprintf(index + o, text_cap - o, "%s\"%s\": \"part-%d.safetensors\"",
                              i ? ", " : "", t->name, i < n / 2 ? 1 : 2);
    }
    snprintf(index + o, text_cap - o, "}}");
    snprintf(path, sizeof path, "%s/part-1.safetensors", dir);
    assert_int_equal(hx_safetensors_write(path, e, n / 2, NULL, 0, &err), HX_OK);
    snprintf(path, sizeof path, "%s/part-2.safetensors", dir);
    assert_int_equal(hx_safetensors_write(path, e + n / 2, n - n / 2, NULL, 0, &err), HX_OK);
    write_file(dir, "model.safetensors.index.json", index);
    free(index);
    free(e);
    hx_safetensors_free(f);

    hx_llama *one = load(good, 0, 0, 1), *two = load(dir, 0, 0, 1);
    hx_llama_state *s1 = state_for(one, 8, 0), *s2 = state_for(two, 8, 0);
    assert_true(hx_llama_owned_weight_bytes(two) > 0); /* bf16 was widened */
    int tokens[8];
    some_tokens(tokens, 8, c.vocab_size);
    const float *l1, *l2;
    assert_int_equal(hx_llama_prefill(one, s1, tokens, 8, 0, &l1, &err), HX_OK);
    assert_int_equal(hx_llama_prefill(two, s2, tokens, 8, 0, &l2, &err), HX_OK);
    assert_memory_equal(l1, l2, (size_t)c.vocab_size * sizeof *l1);
    hx_llama_state_free(s1);
    hx_llama_state_free(s2);
    hx_llama_free(one);
    hx_llama_free(two);
}

/* ---- sampling and generation ------------------------------------------------------------ */

static hx_llama_sampler *sampler(int vocab, float temp, float top_p, uint64_t seed)
{
    hx_llama_sampler *s = NULL;
    hx_err err = {0};
    if (hx_llama_sampler_new(vocab, temp, top_p, seed, &s, &err) != HX_OK)
        fail_msg("sampler: %s", err.msg);
    return s;
}

static void test_sampler(void **state)
{
    (void)state;
    float ties[4] = {1, 3, 3, 2};
    assert_int_equal(hx_llama_argmax(ties, 4), 1);
    hx_llama_sampler *g = sampler(4, 0, 1, 1);
    assert_int_equal(hx_llama_sample(g, ties), 1);
    hx_llama_sampler_free(g);

    /* temperature 1: p = [0.25, 0.75] */
    float two[2] = {0.0f, logf(3.0f)};
    hx_llama_sampler *s = sampler(2, 1.0f, 1.0f, 42);
    int ones = 0;
    const int draws = 20000;
    for (int i = 0; i < draws; i++)
        ones += hx_llama_sample(s, two);
    assert_true(fabs((double)ones / draws - 0.75) < 0.02);
    hx_llama_sampler_free(s);

    /* top-p over p = [0.6, 0.3, 0.1] */
    float three[3] = {logf(0.6f), logf(0.3f), logf(0.1f)};
    s = sampler(3, 1.0f, 0.5f, 1);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(hx_llama_sample(s, three), 0);
    hx_llama_sampler_free(s);
    s = sampler(3, 1.0f, 0.8f, 1);
    int count[3] = {0};
    for (int i = 0; i < draws; i++)
        count[hx_llama_sample(s, three)]++;
    assert_int_equal(count[2], 0);
    assert_true(fabs((double)count[0] / draws - 2.0 / 3.0) < 0.02);
    hx_llama_sampler_free(s);

    /* a large vocabulary: every draw lies in the nucleus computed naively */
    enum { BIG = 1000 };
    float *logits = malloc(BIG * sizeof *logits);
    double *p = malloc(BIG * sizeof *p);
    int *in_nucleus = calloc(BIG, sizeof *in_nucleus);
    assert_true(logits && p && in_nucleus);
    uint64_t r = 5;
    double zsum = 0;
    for (int i = 0; i < BIG; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        logits[i] = (float)((double)(r >> 11) / 9007199254740992.0 * 6.0);
        zsum += exp(logits[i]);
    }
    for (int i = 0; i < BIG; i++)
        p[i] = exp(logits[i]) / zsum;
    double mass = 0;
    while (mass <= 0.9) { /* take the most likely remaining token */
        int best = -1;
        for (int i = 0; i < BIG; i++)
            if (!in_nucleus[i] && (best < 0 || p[i] > p[best]))
                best = i;
        in_nucleus[best] = 1;
        mass += p[best];
    }
    s = sampler(BIG, 1.0f, 0.9f, 3);
    int distinct = 0;
    int *seen = calloc(BIG, sizeof *seen);
    for (int i = 0; i < 5000; i++) {
        int t = hx_llama_sample(s, logits);
        assert_true(t >= 0 && t < BIG);
        if (!in_nucleus[t])
            fail_msg("top-p drew token %d (p %g) outside the 0.9 nucleus", t, p[t]);
        distinct += !seen[t]++;
    }
    assert_true(distinct > 50);
    hx_llama_sampler_free(s);
    free(seen);
    free(logits);
    free(p);
    free(in_nucleus);

    /* the same seed draws the same sequence; another seed another one */
    hx_llama_sampler *a = sampler(3, 1.0f, 1.0f, 9), *b = sampler(3, 1.0f, 1.0f, 9);
    hx_llama_sampler *d = sampler(3, 1.0f, 1.0f, 10);
    int same = 1, differ = 0;
    for (int i = 0; i < 200; i++) {
        int x = hx_llama_sample(a, three), y = hx_llama_sample(b, three);
        int z = hx_llama_sample(d, three);
        same &= x == y;
        differ |= x != z;
    }
    assert_true(same && differ);
    hx_llama_sampler_free(a);
    hx_llama_sampler_free(b);
    hx_llama_sampler_free(d);

    hx_err err = {0};
    hx_llama_sampler *bad = NULL;
    assert_int_equal(hx_llama_sampler_new(3, -1.0f, 1.0f, 1, &bad, &err), HX_EINVAL);
    assert_int_equal(hx_llama_sampler_new(3, 1.0f, 1.5f, 1, &bad, &err), HX_EINVAL);
    assert_int_equal(hx_llama_sampler_new(0, 1.0f, 1.0f, 1, &bad, &err), HX_EINVAL);
    assert_int_equal(hx_llama_sampler_new(3, NAN, 1.0f, 1, &bad, &err), HX_EINVAL);
    hx_llama_sampler_free(NULL);
}

static void generate(const char *dir, int threads, float temp, float top_p, uint64_t seed,
                     const int *prompt, int n_prompt, int *out, int max_new, int *n_out)
{
    hx_llama *m = load(dir, 0, 0, threads);
    hx_llama_state *s = state_for(m, n_prompt + max_new, 0);
    hx_llama_sampler *smp = sampler(hx_llama_config(m)->vocab_size, temp, top_p, seed);
    hx_err err = {0};
    if (hx_llama_generate(m, s, smp, prompt, n_prompt, max_new, -1, out, n_out, &err) != HX_OK)
        fail_msg("generate: %s", err.msg);
    hx_llama_sampler_free(smp);
    hx_llama_state_free(s);
    hx_llama_free(m);
}

static void test_generation_deterministic(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    char dir[512];
    make_tiny("fp32", &c, dir, sizeof dir);
    int prompt[4] = {256, 423, 99, 101};
    enum { N = 24 };
    int a[N], b[N], t3[N];
    int na, nb, n3;
    generate(dir, 1, 0, 1, 1, prompt, 4, a, N, &na);
    generate(dir, 1, 0, 1, 99, prompt, 4, b, N, &nb); /* greedy ignores the seed */
    generate(dir, 3, 0, 1, 1, prompt, 4, t3, N, &n3);
    assert_int_equal(na, N);
    assert_int_equal(nb, N);
    assert_int_equal(n3, N);
    assert_memory_equal(a, b, sizeof a);
    assert_memory_equal(a, t3, sizeof a);

    int s1[N], s2[N], s3[N];
    int n1, n2, n4;
    generate(dir, 2, 0.8f, 0.9f, 7, prompt, 4, s1, N, &n1);
    generate(dir, 2, 0.8f, 0.9f, 7, prompt, 4, s2, N, &n2);
    generate(dir, 2, 0.8f, 0.9f, 8, prompt, 4, s3, N, &n4);
    assert_int_equal(n1, n2);
    assert_memory_equal(s1, s2, (size_t)n1 * sizeof *s1);
    assert_true(n4 != n1 || memcmp(s1, s3, (size_t)n1 * sizeof *s1) != 0);

    /* the greedy tokens are the reference's argmax at every step (where not a near tie) */
    int all[4 + N];
    memcpy(all, prompt, sizeof prompt);
    memcpy(all + 4, a, sizeof a);
    double *want = ref_logits(dir, all, 4 + N - 1, c.vocab_size);
    if (!want) {
        print_message("skipped the NumPy argmax check: python3 with numpy not found\n");
        return;
    }
    for (int i = 0; i < N; i++) {
        const double *row = want + (size_t)(3 + i) * c.vocab_size;
        int best = 0;
        for (int v = 1; v < c.vocab_size; v++)
            if (row[v] > row[best])
                best = v;
        if (best != a[i] && row[best] - row[a[i]] > 1e-4)
            fail_msg("greedy step %d: generated %d, the reference's argmax is %d", i, a[i],
                     best);
    }
    free(want);

    /* eos stops generation (and is kept) */
    hx_llama *m = load(dir, 0, 0, 1);
    hx_llama_state *s = state_for(m, 4 + N, 0);
    hx_llama_sampler *g = sampler(c.vocab_size, 0, 1, 1);
    int out[N], n = 0;
    hx_err err = {0};
    assert_int_equal(hx_llama_generate(m, s, g, prompt, 4, N, a[5], out, &n, &err), HX_OK);
    int first = 0;
    while (a[first] != a[5])
        first++;
    assert_int_equal(n, first + 1);
    assert_int_equal(hx_llama_generate(m, s, g, prompt, 4, 100, -1, out, &n, &err), HX_ERANGE);
    hx_llama_sampler_free(g);
    hx_llama_state_free(s);
    hx_llama_free(m);
}

/* ---- the tiny writer ---------------------------------------------------------------------- */

static void test_tiny_writer(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    char dir[512];
    make_tiny("fp32", &c, dir, sizeof dir);
    hx_err err = {0};
    assert_int_equal(hx_tiny_write(dir, &c, &err), HX_EEXIST);
    assert_non_null(strstr(err.msg, "already holds a model"));

    /* deterministic: the same seed writes the same bytes */
    char d2[512];
    model_dir("fp32_again", d2, sizeof d2);
    assert_int_equal(hx_tiny_write(d2, &c, &err), HX_OK);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cmp -s '%s/model.safetensors' '%s/model.safetensors'", dir, d2);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "cmp -s '%s/tokenizer.json' '%s/tokenizer.json'", dir, d2);
    assert_int_equal(system(cmd), 0);

    /* the tokenizer: 256 bytes, <s>, </s>, merges up to the vocab */
    char path[1100];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_error_t jerr;
    json_t *tok = json_load_file(path, 0, &jerr);
    assert_non_null(tok);
    json_t *model = json_object_get(tok, "model");
    assert_string_equal(json_string_value(json_object_get(model, "type")), "BPE");
    json_t *vocab = json_object_get(model, "vocab");
    assert_int_equal(json_object_size(vocab), 512);
    assert_int_equal(json_array_size(json_object_get(model, "merges")), 512 - 258);
    assert_int_equal(json_integer_value(json_object_get(vocab, "<s>")), HX_TINY_BOS_ID);
    assert_int_equal(json_integer_value(json_object_get(vocab, "</s>")), HX_TINY_EOS_ID);
    assert_int_equal(json_integer_value(json_object_get(vocab, "\xC4\xA0")), 32); /* "Ġ" */
    assert_int_equal(json_integer_value(json_object_get(vocab, "\xC4\x80")), 0);  /* "Ā" */
    assert_int_equal(json_integer_value(json_object_get(vocab, "a")), 'a');
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(tok, "pre_tokenizer"), "type")),
        "ByteLevel");
    assert_int_equal(json_array_size(json_object_get(tok, "added_tokens")), 2);
    json_decref(tok);

    /* a bf16 model holds BF16 tensors of the HF names and shapes */
    hx_tiny_config b = c;
    b.dtype = HX_MODEL_DTYPE_BF16;
    model_dir("bf16_check", d2, sizeof d2);
    assert_int_equal(hx_tiny_write(d2, &b, &err), HX_OK);
    hx_safetensors_index *ix = NULL;
    assert_int_equal(hx_safetensors_index_open(d2, &ix, &err), HX_OK);
    assert_int_equal(hx_safetensors_index_count(ix), 2 + 9 * 2 + 1);
    hx_safetensors_tensor t;
    assert_int_equal(hx_safetensors_index_find(ix, "model.layers.1.self_attn.k_proj.weight", &t,
                                               &err),
                     HX_OK);
    assert_int_equal(t.dtype, HX_SAFETENSORS_BF16);
    assert_int_equal(t.shape[0], 2 * 16);
    assert_int_equal(t.shape[1], 64);
    assert_int_equal(hx_safetensors_index_find(ix, "model.layers.0.mlp.down_proj.weight", &t,
                                               &err),
                     HX_OK);
    assert_int_equal(t.shape[0], 64);
    assert_int_equal(t.shape[1], 128);
    hx_safetensors_index_free(ix);

    /* checks */
    hx_tiny_config x = c;
    x.num_heads = 3;
    assert_int_equal(hx_tiny_config_check(&x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "heads: 3 does not divide hidden 64"));
    x = c;
    x.num_heads = 64; /* head_dim 1 */
    assert_int_equal(hx_tiny_config_check(&x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "odd"));
    x = c;
    x.num_kv_heads = 3;
    assert_int_equal(hx_tiny_config_check(&x, &err), HX_EINVAL);
    x = c;
    x.vocab_size = 257;
    assert_int_equal(hx_tiny_config_check(&x, &err), HX_EINVAL);
    x = c;
    x.hidden_size = 16384;
    x.intermediate_size = 65536;
    x.num_layers = 256;
    assert_int_equal(hx_tiny_config_check(&x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "bytes of weights"));
    assert_int_equal(hx_tiny_param_count(&c), 139584);
}

/* ---- tensor-parallel slices ------------------------------------------------------------------- */

static hx_llama *load_tp(const char *dir, int rank, int tp)
{
    hx_llama_options opt;
    hx_llama_options_init(&opt);
    opt.threads = 1;
    opt.tp_rank = rank;
    opt.tp_size = tp;
    hx_llama *m = NULL;
    hx_err err = {0};
    if (hx_llama_load(dir, &opt, &m, &err) != HX_OK)
        fail_msg("load '%s' rank %d of %d: %s", dir, rank, tp, err.msg);
    return m;
}

/* rows [r0, r0 + nr) x cols [c0, c0 + nc) of a [..][cols] matrix equal the dense [nr][nc] part */
static void same_part(const char *what, int layer, const float *part, const float *whole, int cols,
                      int r0, int nr, int c0, int nc)
{
    for (int r = 0; r < nr; r++)
        for (int k = 0; k < nc; k++)
            if (part[(size_t)r * nc + k] != whole[(size_t)(r0 + r) * cols + c0 + k])
                fail_msg("layer %d: %s[%d][%d] of the slice is not the model's [%d][%d]", layer,
                         what, r, k, r0 + r, c0 + k);
}

/*
 * Every rank of TP 2 and TP 4 (over 2 KV heads: replicated at 4) holds
 * exactly its rows of Wq, Wk, Wv, Wgate, Wup and columns of Wo, Wdown, and
 * converts or copies nothing else; fp32 and bf16.
 */
static void slices_of(hx_model_dtype dtype, const char *name)
{
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 2;
    c.hidden_size = 64;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.intermediate_size = 90; /* 90 / 4: ranks of 22 and 23 rows */
    c.vocab_size = 300;
    c.dtype = dtype;
    char dir[512];
    make_tiny(name, &c, dir, sizeof dir);
    hx_llama *whole = load(dir, 0, 0, 1);
    const int h = c.hidden_size, d = h / c.num_heads, f = c.intermediate_size;
    const int q = c.num_heads * d, V = c.vocab_size;
    const int64_t whole_owned = hx_llama_owned_weight_bytes(whole);
    for (int tp = 2; tp <= 4; tp *= 2) {
        int ff_total = 0;
        for (int r = 0; r < tp; r++) {
            hx_llama *m = load_tp(dir, r, tp);
            assert_int_equal(hx_llama_tp_rank(m), r);
            assert_int_equal(hx_llama_tp_size(m), tp);
            assert_int_equal(hx_llama_config(m)->num_heads, c.num_heads); /* model-wide */
            hx_llama_slice sl;
            hx_llama_slice_of(m, &sl);
            int kf, kn;
            assert_int_equal(hx_kv_rank_heads(c.num_kv_heads, tp, r, &kf, &kn, NULL), HX_OK);
            assert_int_equal(sl.tp_rank, r);
            assert_int_equal(sl.tp_size, tp);
            assert_int_equal(sl.kv_head_first, kf);
            assert_int_equal(sl.kv_heads, kn);
            assert_int_equal(sl.q_heads, c.num_heads / tp);
            assert_int_equal(sl.q_head_first, r * c.num_heads / tp);
            /* the query heads use the rank's KV heads */
            const int group = c.num_heads / c.num_kv_heads;
            assert_true(sl.q_head_first / group >= kf);
            assert_true((sl.q_head_first + sl.q_heads - 1) / group < kf + kn);
            assert_int_equal(sl.ff_first, r * f / tp);
            assert_int_equal(sl.ff_size, (r + 1) * f / tp - r * f / tp);
            ff_total += sl.ff_size;
            const int q0 = sl.q_head_first * d, nq = sl.q_heads * d;
            const int k0 = kf * d, nk = kn * d;
            for (int l = 0; l < c.num_layers; l++) {
                hx_llama_layer_weights W, S;
                assert_int_equal(hx_llama_weights_layer(whole, l, &W, NULL), HX_OK);
                assert_int_equal(hx_llama_weights_layer(m, l, &S, NULL), HX_OK);
                same_part("attn_norm", l, S.attn_norm, W.attn_norm, h, 0, 1, 0, h);
                same_part("ffn_norm", l, S.ffn_norm, W.ffn_norm, h, 0, 1, 0, h);
                same_part("wq", l, S.wq, W.wq, h, q0, nq, 0, h);
                same_part("wk", l, S.wk, W.wk, h, k0, nk, 0, h);
                same_part("wv", l, S.wv, W.wv, h, k0, nk, 0, h);
                same_part("wo", l, S.wo, W.wo, q, 0, h, q0, nq);
                same_part("w_gate", l, S.w_gate, W.w_gate, h, sl.ff_first, sl.ff_size, 0, h);
                same_part("w_up", l, S.w_up, W.w_up, h, sl.ff_first, sl.ff_size, 0, h);
                same_part("w_down", l, S.w_down, W.w_down, f, 0, h, sl.ff_first, sl.ff_size);
            }
            same_part("embed", -1, hx_llama_weights_embed(m), hx_llama_weights_embed(whole), h, 0,
                      V, 0, h);
            same_part("lm_head", -1, hx_llama_weights_lm_head(m),
                      hx_llama_weights_lm_head(whole), h, 0, V, 0, h);
            /* memory: fp32 copies only the Wo and Wdown columns; bf16 widens only the slice */
            const int64_t L = c.num_layers;
            const int64_t cols = L * ((int64_t)h * nq + (int64_t)h * sl.ff_size);
            const int64_t rows = L * ((int64_t)nq * h + 2 * (int64_t)nk * h +
                                      2 * (int64_t)sl.ff_size * h + 2 * h);
            const int64_t shared = 2 * (int64_t)V * h + h; /* embed, lm_head, final norm */
            if (dtype == HX_MODEL_DTYPE_FP32) {
                assert_int_equal(whole_owned, 0);
                assert_int_equal(hx_llama_owned_weight_bytes(m), 4 * cols);
            } else {
                assert_int_equal(hx_llama_owned_weight_bytes(m), 4 * (cols + rows + shared));
                assert_true(hx_llama_owned_weight_bytes(m) < whole_owned);
            }
            hx_llama_free(m);
        }
        assert_int_equal(ff_total, f);
    }
    hx_llama_free(whole);
}

static void test_tp_slices(void **state)
{
    (void)state;
    slices_of(HX_MODEL_DTYPE_FP32, "tp32");
    slices_of(HX_MODEL_DTYPE_BF16, "tpbf16");
}

static void test_tp_errors(void **state)
{
    (void)state;
    hx_tiny_config c;
    hx_tiny_config_init(&c); /* 4 heads, 2 KV heads */
    c.num_layers = 1;
    char dir[512];
    make_tiny("tperr", &c, dir, sizeof dir);
    hx_llama_options opt;
    hx_llama_options_init(&opt);
    assert_int_equal(opt.tp_rank, 0);
    assert_int_equal(opt.tp_size, 1);
    hx_llama *m = NULL;
    hx_err err = {0};
    opt.tp_size = 3;
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, dir));
    assert_non_null(strstr(err.msg, "tp 3 does not split its 4 attention heads and 2 KV heads"));
    assert_null(m);
    opt.tp_size = 8;
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tp 8"));
    opt.tp_size = 2;
    opt.tp_rank = 2;
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "rank 2 of tp 2"));
    opt.tp_size = -1;
    opt.tp_rank = 0;
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_EINVAL);
    opt.tp_size = 0; /* the default: no TP */
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_OK);
    assert_int_equal(hx_llama_tp_size(m), 1);
    hx_llama_free(m);

    /* a slice loads, but the single-sequence pass refuses it */
    opt.tp_size = 2;
    opt.tp_rank = 1;
    opt.threads = 1;
    assert_int_equal(hx_llama_load(dir, &opt, &m, &err), HX_OK);
    hx_llama_state *s = state_for(m, 8, 8);
    const float *logits;
    int tokens[2] = {1, 2};
    float x[2 * 64];
    assert_int_equal(hx_llama_forward(m, s, 1, 0, &logits, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tensor-parallel rank 1 of 2"));
    assert_int_equal(hx_llama_prefill(m, s, tokens, 2, 0, &logits, &err), HX_EINVAL);
    assert_int_equal(hx_llama_embed(m, tokens, 2, x, &err), HX_OK); /* replicated */
    assert_int_equal(hx_llama_layers(m, s, x, 2, 0, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "hx_llama_layers"));
    hx_llama_sampler *g = NULL;
    assert_int_equal(hx_llama_sampler_new(c.vocab_size, 0, 1, 1, &g, &err), HX_OK);
    int out[4], n_out = -1;
    assert_int_equal(hx_llama_generate(m, s, g, tokens, 2, 4, -1, out, &n_out, &err), HX_EINVAL);
    assert_int_equal(n_out, 0);
    hx_llama_sampler_free(g);
    hx_llama_state_free(s);
    hx_llama_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_numpy_fp32),
        cmocka_unit_test(test_numpy_bf16),
        cmocka_unit_test(test_numpy_fp16_mha),
        cmocka_unit_test(test_numpy_mqa_one_layer),
        cmocka_unit_test(test_threads_agree),
        cmocka_unit_test(test_stages),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_sharded_model),
        cmocka_unit_test(test_sampler),
        cmocka_unit_test(test_generation_deterministic),
        cmocka_unit_test(test_tiny_writer),
        cmocka_unit_test(test_tp_slices),
        cmocka_unit_test(test_tp_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
