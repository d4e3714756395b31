/*
 * test_model.c - model descriptors: preset parameter counts against the
 * published Hugging Face figures, KV bytes, FLOPs, name/path resolution and
 * config validation.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "planner/model.h"

#define MODELS_DIR HX_SOURCE_DIR "/models"

static char tmp_dir[256];

/* ---- helpers ------------------------------------------------------------ */

static void use_source_presets(void)
{
    assert_int_equal(setenv(HX_MODEL_DIR_ENV, MODELS_DIR, 1), 0);
}

static hx_model load_ok(const char *name)
{
    hx_model m;
    hx_err err = {0};
    hx_status st = hx_model_load(name, &m, &err);
    if (st != HX_OK)
        fail_msg("loading '%s': %s", name, err.msg);
    return m;
}

/* Writes `text` to <tmp_dir>/<file> (creating <tmp_dir>/<sub> first when given). */
static void write_tmp(const char *sub, const char *file, const char *text, char *path,
                      size_t size)
{
    char dir[512];
    if (sub) {
        snprintf(dir, sizeof dir, "%s/%s", tmp_dir, sub);
        for (char *q = dir + strlen(tmp_dir) + 1;; q++) { /* mkdir -p */
            char was = *q;
            if (was != '/' && was != '\0')
                continue;
            *q = '\0';
            if (mkdir(dir, 0755) != 0 && errno != EEXIST)
                fail_msg("cannot create '%s'", dir);
            *q = was;
            if (was == '\0')
                break;
        }
    } else {
        snprintf(dir, sizeof dir, "%s", tmp_dir);
    }
    snprintf(path, size, "%s/%s", dir, file);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

/* Loads a config text from a temp file; returns the status and fills err. */
static hx_status load_text(const char *file, const char *text, hx_model *m, hx_err *err)
{
    char path[600];
    write_tmp(NULL, file, text, path, sizeof path);
    return hx_model_load(path, m, err);
}

static void assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle))
        fail_msg("expected \"%s\" in \"%s\"", needle, hay);
}

static const char *llama_like =
    "{\"model_type\": \"llama\", \"hidden_size\": 8192, \"intermediate_size\": 28672,"
    " \"num_attention_heads\": 64, \"num_key_value_heads\": 8, \"num_hidden_layers\": 80,"
    " \"vocab_size\": 32000, \"max_position_embeddings\": 4096, \"torch_dtype\": \"bfloat16\"}";

/* ---- parameter counts and bytes ------------------------------------------------ */

static void test_llama2_70b(void **state)
{
    (void)state;
    hx_model m = load_ok("llama-2-70b");
    assert_string_equal(m.name, "llama-2-70b");
    assert_int_equal(m.arch, HX_MODEL_ARCH_LLAMA);
    assert_string_equal(m.architecture, "LlamaForCausalLM");
    assert_int_equal(m.num_layers, 80);
    assert_int_equal(m.hidden_size, 8192);
    assert_int_equal(m.num_heads, 64);
    assert_int_equal(m.num_kv_heads, 8);
    assert_int_equal(m.head_dim, 128);
    assert_int_equal(m.intermediate_size, 28672);
    assert_int_equal(m.vocab_size, 32000);
    assert_false(m.tied_embeddings);
    assert_false(m.has_qkv_bias);
    assert_int_equal(m.dtype, HX_MODEL_DTYPE_FP16); /* torch_dtype float16 */

    int64_t params = hx_model_param_count(&m);
    assert_true(fabs((double)params - 68.98e9) < 0.01e9);
    assert_int_equal(params, 68976648192LL);

    hx_model_set_dtype(&m, HX_MODEL_DTYPE_BF16);
    assert_int_equal(hx_model_kv_bytes_per_token(&m), 327680);
    assert_int_equal(hx_model_weight_bytes(&m), 2 * 68976648192LL);
    hx_model_set_dtype(&m, HX_MODEL_DTYPE_FP32);
    assert_int_equal(hx_model_kv_bytes_per_token(&m), 655360);
    assert_int_equal(hx_model_weight_bytes(&m), 4 * 68976648192LL);

    hx_model_params p;
    hx_model_param_counts(&m, &p);
    assert_int_equal(p.layer.attn_params, 150994944);
    assert_int_equal(p.layer.mlp_params, 704643072);
    assert_int_equal(p.layer.norm_params, 16384);
    assert_int_equal(p.embed_params, 262144000);
    assert_int_equal(p.head_params, 262144000 + 8192);
    assert_int_equal(p.total_params, 80 * p.layer.total_params + p.embed_params + p.head_params);
}

static void test_preset_counts(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        int64_t params;
        int64_t kv_bytes_per_token_bf16;
    } cases[] = {
        {"llama-2-7b", 6738415616LL, 524288},
        {"llama-2-13b", 13015864320LL, 819200},
        {"llama-2-70b", 68976648192LL, 327680},
        {"llama-3-8b", 8030261248LL, 131072},
        {"llama-3-70b", 70553706496LL, 327680},
        {"mistral-7b", 7241732096LL, 131072},
        {"qwen2.5-72b", 72706203648LL, 327680},
        {"opt-30b", 29974540288LL, 1376256},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hx_model m = load_ok(cases[i].name);
        hx_model_set_dtype(&m, HX_MODEL_DTYPE_BF16);
        if (hx_model_param_count(&m) != cases[i].params)
            fail_msg("%s: %lld parameters, expected %lld", cases[i].name,
                     (long long)hx_model_param_count(&m), (long long)cases[i].params);
        assert_int_equal(hx_model_kv_bytes_per_token(&m), cases[i].kv_bytes_per_token_bf16);
        assert_int_equal(hx_model_weight_bytes(&m), 2 * cases[i].params);
    }
    /* rounded figures as people quote them */
    hx_model q = load_ok("qwen2.5-72b");
    assert_true(fabs((double)hx_model_param_count(&q) - 72.7e9) < 0.01e9);
    assert_true(q.has_qkv_bias);
    assert_false(q.has_o_bias);
    hx_model o = load_ok("opt-30b");
    assert_true(fabs((double)hx_model_param_count(&o) - 29.97e9) < 0.01e9);
    assert_int_equal(o.arch, HX_MODEL_ARCH_OPT);
    assert_true(o.tied_embeddings);
    assert_int_equal(o.intermediate_size, 28672);
}

static void test_dtype_from_config(void **state)
{
    (void)state;
    hx_model m = load_ok("llama-3-8b");
    assert_int_equal(m.dtype, HX_MODEL_DTYPE_BF16);
    assert_int_equal(m.dtype_bytes, 2);
    m = load_ok("llama-2-7b");
    assert_int_equal(m.dtype, HX_MODEL_DTYPE_FP16);

    hx_model_dtype d;
    hx_err err = {0};
    assert_int_equal(hx_model_dtype_parse("BF16", &d, &err), HX_OK);
    assert_int_equal(d, HX_MODEL_DTYPE_BF16);
    assert_int_equal(hx_model_dtype_parse("float32", &d, &err), HX_OK);
    assert_int_equal(d, HX_MODEL_DTYPE_FP32);
    assert_int_equal(hx_model_dtype_parse("fp16", &d, &err), HX_OK);
    assert_int_equal(d, HX_MODEL_DTYPE_FP16);
    assert_int_equal(hx_model_dtype_parse("int3", &d, &err), HX_EINVAL);
    assert_contains(err.msg, "int3");
    assert_string_equal(hx_model_dtype_name(HX_MODEL_DTYPE_FP32), "fp32");
}

/* OPT-350m: word_embed_proj_dim 512 != hidden 1024 (project_in/out), no final norm. */
static void test_opt_projections(void **state)
{
    (void)state;
    hx_model m;
    hx_err err = {0};
    hx_status st = load_text(
        "opt-350m.json",
        "{\"model_type\": \"opt\", \"architectures\": [\"OPTForCausalLM\"],"
        " \"hidden_size\": 1024, \"ffn_dim\": 4096, \"num_attention_heads\": 16,"
        " \"num_hidden_layers\": 24, \"vocab_size\": 50272, \"max_position_embeddings\": 2048,"
        " \"word_embed_proj_dim\": 512, \"do_layer_norm_before\": false,"
        " \"torch_dtype\": \"float16\"}",
        &m, &err);
    assert_int_equal(st, HX_OK);
    assert_string_equal(m.name, "opt-350m");
    assert_false(m.has_final_norm);
    assert_int_equal(hx_model_param_count(&m), 331196416LL); /* facebook/opt-350m */
}

static void test_stage_bytes(void **state)
{
    (void)state;
    hx_err err = {0};
    int64_t a, b, c;
    hx_model m = load_ok("llama-2-70b");
    assert_int_equal(hx_model_stage_weight_bytes(&m, 0, 80, &a, &err), HX_OK);
    assert_int_equal(a, hx_model_weight_bytes(&m));
    assert_int_equal(hx_model_stage_weight_bytes(&m, 0, 48, &a, &err), HX_OK);
    assert_int_equal(hx_model_stage_weight_bytes(&m, 48, 32, &b, &err), HX_OK);
    assert_int_equal(a + b, hx_model_weight_bytes(&m));
    assert_int_equal(a, 48 * hx_model_layer_weight_bytes(&m) + hx_model_embed_weight_bytes(&m));
    assert_int_equal(b, 32 * hx_model_layer_weight_bytes(&m) + hx_model_head_weight_bytes(&m));
    assert_int_equal(hx_model_stage_weight_bytes(&m, 79, 2, &c, &err), HX_EINVAL);
    assert_int_equal(hx_model_stage_weight_bytes(&m, -1, 2, &c, &err), HX_EINVAL);
    assert_int_equal(hx_model_stage_weight_bytes(&m, 0, 0, &c, &err), HX_EINVAL);

    /* tied embeddings: the last stage of a split pipeline holds its own copy */
    hx_model o = load_ok("opt-30b");
    hx_model_params p;
    hx_model_param_counts(&o, &p);
    assert_int_equal(hx_model_stage_weight_bytes(&o, 0, 48, &a, &err), HX_OK);
    assert_int_equal(a, hx_model_weight_bytes(&o));
    assert_int_equal(hx_model_stage_weight_bytes(&o, 0, 24, &a, &err), HX_OK);
    assert_int_equal(hx_model_stage_weight_bytes(&o, 24, 24, &b, &err), HX_OK);
    assert_int_equal(a + b, hx_model_weight_bytes(&o) + p.lm_head_params * o.dtype_bytes);
}

/* ---- FLOPs ------------------------------------------------------------------ */

static void test_decode_flops(void **state)
{
    (void)state;
    const char *names[] = {"llama-2-7b", "llama-2-70b", "llama-3-8b", "qwen2.5-72b", "opt-30b"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        hx_model m = load_ok(names[i]);
        double params = (double)hx_model_param_count(&m);
        /* lookup tables do no arithmetic; a tied matrix still multiplies as the lm_head */
        double lookup = (double)m.vocab_size * m.word_embed_dim;
        if (m.learned_positions)
            lookup += (m.max_position_tokens + 2.0) * m.hidden_size;
        double lm_head = m.tied_embeddings ? (double)m.vocab_size * m.word_embed_dim : 0;
        double expect = 2 * (params - lookup + lm_head);
        double d0 = hx_model_decode_flops(&m, 0, NULL);
        if (fabs(d0 - expect) / expect > 1e-3)
            fail_msg("%s: decode flops at context 0 %.6g, expected ~%.6g", names[i], d0, expect);
        /* the attention term is linear in the context: 4*L*H*d per key */
        double d4k = hx_model_decode_flops(&m, 4096, NULL);
        double per_key = 4.0 * m.num_layers * m.num_heads * m.head_dim;
        assert_true(fabs((d4k - d0) - per_key * 4096) < 1.0);
        /* the breakdown adds up */
        hx_model_flops f;
        double t = hx_model_decode_flops(&m, 1000, &f);
        assert_true(fabs(t - f.total_flops) < 1.0);
        assert_true(fabs(f.total_flops - (m.num_layers * f.layer.total_flops + f.embed_flops +
                                          f.head_flops)) < 1.0);
        assert_true(fabs(f.layer.attn_score_flops - 4.0 * m.num_heads * m.head_dim * 1000) <
                    1.0);
        assert_true(hx_model_decode_flops(&m, -5, NULL) == d0);
    }
    /* Llama-2-70B: 2 * (68.98e9 - 0.26e9) ~ 137.4 GFLOP per token */
    hx_model m = load_ok("llama-2-70b");
    assert_true(fabs(hx_model_decode_flops(&m, 0, NULL) - 137.4e9) < 0.1e9);
}

static void test_prefill_flops(void **state)
{
    (void)state;
    hx_model m = load_ok("llama-2-70b");
    hx_model_flops f1, f2, f4;
    assert_true(hx_model_prefill_flops(&m, 0, NULL) == 0);
    assert_true(hx_model_prefill_flops(&m, -3, NULL) == 0);
    /* one token prefilled is one token decoded that attends to itself */
    assert_true(fabs(hx_model_prefill_flops(&m, 1, NULL) - hx_model_decode_flops(&m, 1, NULL)) <
                1.0);

    hx_model_prefill_flops(&m, 1024, &f1);
    hx_model_prefill_flops(&m, 2048, &f2);
    double t4 = hx_model_prefill_flops(&m, 4096, &f4);
    assert_true(fabs(t4 - f4.total_flops) < 1.0);
    /* attention scores: 2*H*d*n*(n+1) per layer, quadratic */
    double hd = (double)m.num_heads * m.head_dim;
    assert_true(fabs(f1.layer.attn_score_flops - 2 * hd * 1024.0 * 1025.0) < 1.0);
    double r = f2.layer.attn_score_flops / f1.layer.attn_score_flops;
    assert_true(fabs(r - (2048.0 * 2049.0) / (1024.0 * 1025.0)) < 1e-9);
    assert_true(fabs(f4.layer.attn_score_flops / f2.layer.attn_score_flops - 4.0) < 0.01);
    /* projections and MLP are linear */
    assert_true(fabs(f2.layer.mlp_flops - 2 * f1.layer.mlp_flops) < 1.0);
    assert_true(fabs(f2.layer.attn_proj_flops - 2 * f1.layer.attn_proj_flops) < 1.0);
    /* logits for the last token only */
    assert_true(fabs(f1.head_flops - f4.head_flops) < 1.0);
    /* per token, prefill costs about as much as decoding at context 0, plus attention */
    double per_token = f2.total_flops / 2048;
    double d0 = hx_model_decode_flops(&m, 0, NULL);
    assert_true(per_token > d0 * 0.99 && per_token < d0 * 1.05);
}

static void test_sliding_window(void **state)
{
    (void)state;
    hx_model m = load_ok("mistral-7b");
    assert_int_equal(m.arch, HX_MODEL_ARCH_MISTRAL);
    assert_int_equal(m.sliding_window_tokens, 4096);
    assert_true(hx_model_decode_flops(&m, 8192, NULL) == hx_model_decode_flops(&m, 4096, NULL));
    assert_true(hx_model_decode_flops(&m, 2048, NULL) < hx_model_decode_flops(&m, 4096, NULL));
    hx_model_flops a, b, c;
    hx_model_prefill_flops(&m, 4096, &a);
    hx_model_prefill_flops(&m, 8192, &b);
    hx_model_prefill_flops(&m, 12288, &c);
    /* beyond the window, each new token sees W keys: linear growth */
    double hd = (double)m.num_heads * m.head_dim;
    assert_true(fabs((b.layer.attn_score_flops - a.layer.attn_score_flops) - 4 * hd * 4096 * 4096) <
                1.0);
    assert_true(fabs((c.layer.attn_score_flops - b.layer.attn_score_flops) -
                     (b.layer.attn_score_flops - a.layer.attn_score_flops)) < 1.0);
}

/* ---- resolution ---------------------------------------------------------------- */

static void test_lookup(void **state)
{
    (void)state;
    hx_model m = load_ok("Llama-2-70B"); /* case-insensitive */
    assert_string_equal(m.name, "llama-2-70b");
    assert_contains(m.config_path, "llama-2-70b/config.json");

    m = load_ok(MODELS_DIR "/llama-2-7b");
    assert_string_equal(m.name, "llama-2-7b");
    assert_int_equal(hx_model_param_count(&m), 6738415616LL);
    m = load_ok(MODELS_DIR "/llama-2-7b/");
    assert_string_equal(m.name, "llama-2-7b");
    m = load_ok(MODELS_DIR "/llama-3-8b/config.json");
    assert_string_equal(m.name, "llama-3-8b");
    assert_int_equal(hx_model_param_count(&m), 8030261248LL);

    hx_err err = {0};
    assert_int_equal(hx_model_load_file(MODELS_DIR "/mistral-7b/config.json", "mine", &m, &err),
                     HX_OK);
    assert_string_equal(m.name, "mine");

    char list[1024];
    size_t n = hx_model_preset_list(list, sizeof list);
    assert_true(n >= 8);
    assert_contains(list, "llama-2-13b, llama-2-70b, llama-2-7b, llama-3-70b, llama-3-8b");
    assert_contains(list, "opt-30b");
    assert_contains(list, "qwen2.5-72b");
}

static void test_unknown_name(void **state)
{
    (void)state;
    hx_model m;
    hx_err err = {0};
    assert_int_equal(hx_model_load("llama-2-7", &m, &err), HX_ENOENT);
    assert_contains(err.msg, "unknown model 'llama-2-7'; expected a preset (");
    assert_contains(err.msg, "llama-2-70b");
    assert_contains(err.msg, "or a directory with config.json");
    assert_contains(err.msg, "did you mean 'llama-2-7b'?");

    assert_int_equal(hx_model_load("mistral", &m, &err), HX_ENOENT);
    assert_contains(err.msg, "did you mean 'mistral-7b'?");

    assert_int_equal(hx_model_load("gpt-5", &m, &err), HX_ENOENT);
    assert_contains(err.msg, "unknown model 'gpt-5'");
    assert_null(strstr(err.msg, "did you mean"));

    assert_int_equal(hx_model_load("../models/llama-2-7b-nope", &m, &err), HX_ENOENT);
    assert_contains(err.msg, "llama-2-7b-nope");
    assert_int_equal(hx_model_load("", &m, &err), HX_EINVAL);
    assert_int_equal(hx_model_load(tmp_dir, &m, &err), HX_ENOENT); /* no config.json */
    assert_contains(err.msg, "has no config.json");
}

static void test_models_dir_env(void **state)
{
    (void)state;
    char path[600], dir[512];
    write_tmp("presets/tiny", "config.json", llama_like, path, sizeof path);
    snprintf(dir, sizeof dir, "%s/presets", tmp_dir);
    assert_int_equal(setenv(HX_MODEL_DIR_ENV, dir, 1), 0);
    hx_model m = load_ok("tiny");
    assert_string_equal(m.name, "tiny");
    hx_err err = {0};
    assert_int_equal(hx_model_load("llama-2-7b", &m, &err), HX_ENOENT);
    assert_contains(err.msg, "expected a preset (tiny)");

    assert_int_equal(setenv(HX_MODEL_DIR_ENV, "/nonexistent/hexflow-models", 1), 0);
    assert_int_equal(hx_model_load("tiny", &m, &err), HX_ENOENT);
    assert_contains(err.msg, HX_MODEL_DIR_ENV);
    use_source_presets();
}

/* ---- malformed configs ------------------------------------------------------------ */

static void test_malformed(void **state)
{
    (void)state;
    static const struct {
        const char *file;
        const char *text;
        hx_status code;
        const char *needle;
    } cases[] = {
        {"no-hidden.json",
         "{\"model_type\": \"llama\", \"intermediate_size\": 11008, \"num_attention_heads\": 32,"
         " \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EPARSE, "hidden_size: missing"},
        {"kv.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 8192, \"intermediate_size\": 28672,"
         " \"num_attention_heads\": 64, \"num_key_value_heads\": 7, \"num_hidden_layers\": 80,"
         " \"vocab_size\": 32000}",
         HX_EINVAL, "num_key_value_heads: 7 does not divide num_attention_heads 64"},
        {"neg.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": -3, \"vocab_size\": 32000}",
         HX_EINVAL, "num_hidden_layers: -3 is not positive"},
        {"notjson.json", "{\"model_type\": \"llama\", hidden_size: }", HX_EPARSE,
         "notjson.json"},
        {"array.json", "[1, 2, 3]", HX_EPARSE, "expected a JSON object, got an array"},
        {"heads.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 48, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EINVAL, "num_attention_heads: 48 does not divide hidden_size 4096"},
        {"type.json",
         "{\"model_type\": \"llama\", \"hidden_size\": \"4096\", \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EPARSE, "hidden_size: expected an integer, got the string \"4096\""},
        {"frac.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096.5, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EPARSE, "hidden_size: expected an integer"},
        {"huge.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 1e300, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EPARSE, "hidden_size"},
        {"big.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 99999999999}",
         HX_EINVAL, "vocab_size: 99999999999 is out of range"},
        {"type2.json",
         "{\"model_type\": \"gemma\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EINVAL, "model_type: 'gemma' is not supported"},
        {"notype.json",
         "{\"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000}",
         HX_EPARSE, "model_type: missing"},
        {"dtype.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000,"
         " \"torch_dtype\": \"int4\"}",
         HX_EINVAL, "torch_dtype: 'int4' is not supported"},
        {"tie.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000,"
         " \"tie_word_embeddings\": \"yes\"}",
         HX_EPARSE, "tie_word_embeddings: expected true or false"},
        {"opt.json",
         "{\"model_type\": \"opt\", \"hidden_size\": 4096, \"num_attention_heads\": 32,"
         " \"num_hidden_layers\": 32, \"vocab_size\": 50272}",
         HX_EPARSE, "ffn_dim: missing"},
        {"eps.json",
         "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 11008,"
         " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"vocab_size\": 32000,"
         " \"rms_norm_eps\": -1}",
         HX_EINVAL, "rms_norm_eps"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hx_model m;
        hx_err err = {0};
        memset(&m, 0xab, sizeof m);
        hx_status st = load_text(cases[i].file, cases[i].text, &m, &err);
        if (st != cases[i].code)
            fail_msg("%s: status %d, expected %d (%s)", cases[i].file, st, cases[i].code,
                     err.msg);
        assert_int_equal(err.code, cases[i].code);
        assert_contains(err.msg, cases[i].needle);
        /* names the file as "model config '<path>'" */
        assert_contains(err.msg, "model config '");
        assert_contains(err.msg, cases[i].file);
        /* *out untouched on failure */
        assert_int_equal((unsigned char)m.name[0], 0xab);
    }
    /* from memory: names no file */
    hx_model m;
    hx_err err = {0};
    json_t *arr = json_array();
    assert_int_equal(hx_model_from_json(arr, NULL, "x", &m, &err), HX_EPARSE);
    assert_contains(err.msg, "model config: expected a JSON object");
    json_decref(arr);
}

static void test_defaults_and_head_dim(void **state)
{
    (void)state;
    hx_model m;
    hx_err err = {0};
    /* kv heads default to heads; no torch_dtype: bf16; explicit head_dim */
    assert_int_equal(load_text("hd.json",
                               "{\"architectures\": [\"MistralForCausalLM\"],"
                               " \"hidden_size\": 5120, \"intermediate_size\": 14336,"
                               " \"num_attention_heads\": 32, \"num_key_value_heads\": 8,"
                               " \"head_dim\": 128, \"num_hidden_layers\": 40,"
                               " \"vocab_size\": 131072, \"sliding_window\": null}",
                               &m, &err),
                     HX_OK);
    assert_int_equal(m.arch, HX_MODEL_ARCH_MISTRAL);
    assert_int_equal(m.head_dim, 128);
    assert_int_equal(m.sliding_window_tokens, 0);
    assert_int_equal(m.dtype, HX_MODEL_DTYPE_BF16);
    /* Mistral-Nemo-Base-2407: 12,247,782,400 parameters */
    assert_int_equal(hx_model_param_count(&m), 12247782400LL);
    assert_int_equal(hx_model_kv_bytes_per_token(&m), 2 * 40 * 8 * 128 * 2);

    assert_int_equal(load_text("mha.json",
                               "{\"model_type\": \"llama\", \"hidden_size\": 4096,"
                               " \"intermediate_size\": 11008, \"num_attention_heads\": 32,"
                               " \"num_hidden_layers\": 32, \"vocab_size\": 32000,"
                               " \"tie_word_embeddings\": true, \"dtype\": \"float32\"}",
                               &m, &err),
                     HX_OK);
    assert_int_equal(m.num_kv_heads, 32);
    assert_true(m.tied_embeddings);
    assert_int_equal(m.dtype_bytes, 4);
    assert_int_equal(hx_model_param_count(&m), 6738415616LL - 131072000LL);
}

static void test_to_json(void **state)
{
    (void)state;
    hx_model m = load_ok("llama-2-70b");
    hx_model_set_dtype(&m, HX_MODEL_DTYPE_BF16);
    json_t *j = hx_model_to_json(&m);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "name")), "llama-2-70b");
    assert_int_equal(json_integer_value(json_object_get(j, "num_layers")), 80);
    assert_int_equal(json_integer_value(json_object_get(j, "params")), 68976648192LL);
    assert_int_equal(json_integer_value(json_object_get(j, "kv_bytes_per_token")), 327680);
    assert_string_equal(json_string_value(json_object_get(j, "dtype")), "bf16");
    json_t *layer = json_object_get(j, "layer");
    assert_non_null(layer);
    assert_int_equal(json_integer_value(json_object_get(layer, "params")), 855654400LL);
    json_decref(j);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "%s/hx-test-model-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmp_dir))
        return -1;
    use_source_presets();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama2_70b),
        cmocka_unit_test(test_preset_counts),
        cmocka_unit_test(test_dtype_from_config),
        cmocka_unit_test(test_opt_projections),
        cmocka_unit_test(test_stage_bytes),
        cmocka_unit_test(test_decode_flops),
        cmocka_unit_test(test_prefill_flops),
        cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_lookup),
        cmocka_unit_test(test_unknown_name),
        cmocka_unit_test(test_models_dir_env),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_defaults_and_head_dim),
        cmocka_unit_test(test_to_json),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
