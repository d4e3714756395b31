#define _XOPEN_SOURCE 700
#include "model.h"

#include <ctype.h>
#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/file.h"
#include "common/text.h"

#ifndef HX_MODELS_DIR
#define HX_MODELS_DIR ""
#endif

/* Bounds on config values (see model.h). */
#define MAX_LAYERS 1024
#define MAX_HIDDEN 131072
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 1024
#define MAX_INTERMEDIATE 1048576
#define MAX_VOCAB 4194304
#define MAX_POSITIONS 16777216
#define MAX_PRESETS 256

/* ---- dtype ---------------------------------------------------------------- */

hx_status hx_model_dtype_parse(const char *s, hx_model_dtype *out, hx_err *err)
{
    static const struct {
        const char *name;
        hx_model_dtype dtype;
    } names[] = {
        {"bf16", HX_MODEL_DTYPE_BF16},    {"bfloat16", HX_MODEL_DTYPE_BF16},
        {"fp16", HX_MODEL_DTYPE_FP16},    {"float16", HX_MODEL_DTYPE_FP16},
        {"half", HX_MODEL_DTYPE_FP16},    {"f16", HX_MODEL_DTYPE_FP16},
        {"fp32", HX_MODEL_DTYPE_FP32},    {"float32", HX_MODEL_DTYPE_FP32},
        {"float", HX_MODEL_DTYPE_FP32},   {"f32", HX_MODEL_DTYPE_FP32},
    };
    if (s) {
        const char *t = s;
        if (strncmp(t, "torch.", 6) == 0)
            t += 6;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            if (strcasecmp(t, names[i].name) == 0) {
                *out = names[i].dtype;
                return HX_OK;
            }
        }
    }
    return hx_err_set(err, HX_EINVAL, "unknown dtype '%s'; expected bf16, fp16 or fp32",
                      s ? s : "");
}

const char *hx_model_dtype_name(hx_model_dtype dtype)
{
    switch (dtype) {
    case HX_MODEL_DTYPE_BF16: return "bf16";
    case HX_MODEL_DTYPE_FP16: return "fp16";
    case HX_MODEL_DTYPE_FP32: return "fp32";
    }
    return "?";
}

int hx_model_dtype_bytes(hx_model_dtype dtype)
{
    return dtype == HX_MODEL_DTYPE_FP32 ? 4 : 2;
}

void hx_model_set_dtype(hx_model *m, hx_model_dtype dtype)
{
    m->dtype = dtype;
    m->dtype_bytes = hx_model_dtype_bytes(dtype);
}

const char *hx_model_arch_name(hx_model_arch arch)
{
    switch (arch) {
    case HX_MODEL_ARCH_LLAMA: return "llama";
    case HX_MODEL_ARCH_MISTRAL: return "mistral";
    case HX_MODEL_ARCH_QWEN2: return "qwen2";
    case HX_MODEL_ARCH_OPT: return "opt";
    }
    return "?";
}

/* ---- config reading --------------------------------------------------------- */

/* Where a config came from, for messages: "model config 'x/config.json'". */
typedef struct cfg {
    const json_t *root;
    char where[HX_MODEL_PATH_MAX + 32];
    hx_err *err;
} cfg;

/* Describes a JSON value for "got ..." in messages. */
static void describe(const json_t *v, char *buf, size_t size)
{
    switch (json_typeof(v)) {
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t n = strlen(s);
        snprintf(buf, size, "the string \"%.40s%s\"", s, n > 40 ? "..." : "");
        break;
    }
    case JSON_INTEGER: snprintf(buf, size, "%lld", (long long)json_integer_value(v)); break;
    case JSON_REAL: snprintf(buf, size, "%g", json_real_value(v)); break;
    case JSON_TRUE: snprintf(buf, size, "true"); break;
    case JSON_FALSE: snprintf(buf, size, "false"); break;
    case JSON_NULL: snprintf(buf, size, "null"); break;
    case JSON_ARRAY: snprintf(buf, size, "an array"); break;
    case JSON_OBJECT: snprintf(buf, size, "an object"); break;
    }
}

static hx_status cfg_fail(const cfg *c, hx_status code, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static hx_status cfg_fail(const cfg *c, hx_status code, const char *field, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return hx_err_set(c->err, code, "%s: %s: %s", c->where, field, what);
}

/* Value of `key`, or NULL when absent or null (HF writes null for "use the default"). */
static const json_t *cfg_get(const cfg *c, const char *key)
{
    const json_t *v = json_object_get(c->root, key);
    return (v && !json_is_null(v)) ? v : NULL;
}

/*
 * Reads an integer field within [lo, hi]. Absent: HX_EPARSE when `required`,
 * else *out = dflt. Integral reals ("4096.0") are accepted.
 */
static hx_status cfg_int(const cfg *c, const char *key, int required, long long dflt,
                         long long lo, long long hi, int *out)
{
    const json_t *v = cfg_get(c, key);
    if (!v) {
        if (required)
            return cfg_fail(c, HX_EPARSE, key, "missing (expected an integer from %lld to %lld)",
                            lo, hi);
        *out = (int)dflt;
        return HX_OK;
    }
    long long x;
    if (json_is_integer(v)) {
        x = (long long)json_integer_value(v);
    } else if (json_is_real(v) && isfinite(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9.0e15 &&
               json_real_value(v) == floor(json_real_value(v))) {
        x = (long long)json_real_value(v);
    } else {
        char got[80];
        describe(v, got, sizeof got);
        return cfg_fail(c, HX_EPARSE, key, "expected an integer, got %s", got);
    }
    if (x < lo || x > hi) {
        if (x <= 0 && lo >= 1)
            return cfg_fail(c, HX_EINVAL, key, "%lld is not positive", x);
        return cfg_fail(c, HX_EINVAL, key, "%lld is out of range (expected %lld to %lld)", x, lo,
                        hi);
    }
    *out = (int)x;
    return HX_OK;
}

static hx_status cfg_bool(const cfg *c, const char *key, int dflt, int *out)
{
    const json_t *v = cfg_get(c, key);
    if (!v) {
        *out = dflt;
        return HX_OK;
    }
    if (!json_is_boolean(v)) {
        char got[80];
        describe(v, got, sizeof got);
        return cfg_fail(c, HX_EPARSE, key, "expected true or false, got %s", got);
    }
    *out = json_is_true(v);
    return HX_OK;
}

/* A positive finite number below `hi`, or dflt when absent. */
static hx_status cfg_positive(const cfg *c, const char *key, double dflt, double hi, double *out)
{
    const json_t *v = cfg_get(c, key);
    if (!v) {
        *out = dflt;
        return HX_OK;
    }
    if (!json_is_number(v)) {
        char got[80];
        describe(v, got, sizeof got);
        return cfg_fail(c, HX_EPARSE, key, "expected a number, got %s", got);
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x <= 0 || x >= hi)
        return cfg_fail(c, HX_EINVAL, key, "%g is out of range (expected above 0 and below %g)",
                        x, hi);
    *out = x;
    return HX_OK;
}

static hx_status cfg_string(const cfg *c, const char *key, const char **out)
{
    const json_t *v = cfg_get(c, key);
    if (!v) {
        *out = NULL;
        return HX_OK;
    }
    if (!json_is_string(v)) {
        char got[80];
        describe(v, got, sizeof got);
        return cfg_fail(c, HX_EPARSE, key, "expected a string, got %s", got);
    }
    *out = json_string_value(v);
    return HX_OK;
}

static const struct {
    const char *model_type;
    const char *architecture;
    hx_model_arch arch;
} known_archs[] = {
    {"llama", "LlamaForCausalLM", HX_MODEL_ARCH_LLAMA},
    {"mistral", "MistralForCausalLM", HX_MODEL_ARCH_MISTRAL},
    {"qwen2", "Qwen2ForCausalLM", HX_MODEL_ARCH_QWEN2},
    {"opt", "OPTForCausalLM", HX_MODEL_ARCH_OPT},
};
#define N_KNOWN_ARCHS (sizeof known_archs / sizeof known_archs[0])

/* model_type, else architectures[0]; fills m->arch and m->architecture. */
static hx_status read_arch(const cfg *c, hx_model *m)
{
    hx_status st;
    const char *arch0 = NULL;
    const json_t *archs = cfg_get(c, "architectures");
    if (archs) {
        if (!json_is_array(archs))
            return cfg_fail(c, HX_EPARSE, "architectures", "expected an array of strings");
        if (json_array_size(archs) > 0) {
            const json_t *a = json_array_get(archs, 0);
            if (!json_is_string(a))
                return cfg_fail(c, HX_EPARSE, "architectures[0]", "expected a string");
            arch0 = json_string_value(a);
            snprintf(m->architecture, sizeof m->architecture, "%s", arch0);
        }
    }
    const char *type = NULL;
    if ((st = cfg_string(c, "model_type", &type)) != HX_OK)
        return st;
    if (type) {
        for (size_t i = 0; i < N_KNOWN_ARCHS; i++) {
            if (strcmp(type, known_archs[i].model_type) == 0) {
                m->arch = known_archs[i].arch;
                return HX_OK;
            }
        }
        return cfg_fail(c, HX_EINVAL, "model_type",
                        "'%.64s' is not supported; expected llama, mistral, qwen2 or opt", type);
    }
    if (!arch0)
        return cfg_fail(c, HX_EPARSE, "model_type",
                        "missing (expected llama, mistral, qwen2 or opt)");
    for (size_t i = 0; i < N_KNOWN_ARCHS; i++) {
        if (strcmp(arch0, known_archs[i].architecture) == 0) {
            m->arch = known_archs[i].arch;
            return HX_OK;
        }
    }
    return cfg_fail(c, HX_EINVAL, "architectures",
                    "'%.64s' is not supported and model_type is missing; expected "
                    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or OPTForCausalLM",
                    arch0);
}

static hx_status read_dtype(const cfg *c, hx_model *m)
{
    hx_status st;
    const char *key = "torch_dtype";
    const char *s = NULL;
    if ((st = cfg_string(c, key, &s)) != HX_OK)
        return st;
    if (!s) {
        key = "dtype"; /* transformers >= 4.56 writes "dtype" */
        if ((st = cfg_string(c, key, &s)) != HX_OK)
            return st;
    }
    hx_model_dtype d = HX_MODEL_DTYPE_BF16;
    if (s && hx_model_dtype_parse(s, &d, NULL) != HX_OK)
        return cfg_fail(c, HX_EINVAL, key,
                        "'%.64s' is not supported; expected bfloat16, float16 or float32", s);
    hx_model_set_dtype(m, d);
    return HX_OK;
}

/* Fields of the llama family (llama, mistral, qwen2). */
static hx_status read_llama(const cfg *c, hx_model *m)
{
    hx_status st;
    int attention_bias = 0;
    int has_head_dim = cfg_get(c, "head_dim") != NULL;
    long long default_positions = 2048; /* LlamaConfig */
    if (m->arch == HX_MODEL_ARCH_MISTRAL)
        default_positions = 4096 * 32; /* MistralConfig */
    else if (m->arch == HX_MODEL_ARCH_QWEN2)
        default_positions = 32768; /* Qwen2Config */

    if ((st = cfg_int(c, "hidden_size", 1, 0, 1, MAX_HIDDEN, &m->hidden_size)) != HX_OK ||
        (st = cfg_int(c, "num_hidden_layers", 1, 0, 1, MAX_LAYERS, &m->num_layers)) != HX_OK ||
        (st = cfg_int(c, "num_attention_heads", 1, 0, 1, MAX_HEADS, &m->num_heads)) != HX_OK ||
        (st = cfg_int(c, "num_key_value_heads", 0, m->num_heads, 1, MAX_HEADS,
                      &m->num_kv_heads)) != HX_OK ||
        (st = cfg_int(c, "head_dim", 0, 0, 1, MAX_HEAD_DIM, &m->head_dim)) != HX_OK ||
        (st = cfg_int(c, "intermediate_size", 1, 0, 1, MAX_INTERMEDIATE,
                      &m->intermediate_size)) != HX_OK ||
        (st = cfg_int(c, "vocab_size", 1, 0, 1, MAX_VOCAB, &m->vocab_size)) != HX_OK ||
        (st = cfg_int(c, "max_position_embeddings", 0, default_positions, 1, MAX_POSITIONS,
                      &m->max_position_tokens)) != HX_OK ||
        (st = cfg_bool(c, "tie_word_embeddings", 0, &m->tied_embeddings)) != HX_OK ||
        (st = cfg_positive(c, "rope_theta", 10000.0, 1e12, &m->rope_theta)) != HX_OK ||
        (st = cfg_positive(c, "rms_norm_eps", 1e-6, 1.0, &m->norm_eps)) != HX_OK)
        return st;
    if (m->arch == HX_MODEL_ARCH_LLAMA) {
        if ((st = cfg_bool(c, "attention_bias", 0, &attention_bias)) != HX_OK ||
            (st = cfg_bool(c, "mlp_bias", 0, &m->has_mlp_bias)) != HX_OK)
            return st;
    }
    if (m->arch == HX_MODEL_ARCH_MISTRAL &&
        (st = cfg_int(c, "sliding_window", 0, 0, 1, MAX_POSITIONS,
                      &m->sliding_window_tokens)) != HX_OK)
        return st;

    if (m->num_kv_heads > m->num_heads || m->num_heads % m->num_kv_heads != 0)
        return cfg_fail(c, HX_EINVAL, "num_key_value_heads",
                        "%d does not divide num_attention_heads %d", m->num_kv_heads,
                        m->num_heads);
    if (!has_head_dim) {
        if (m->hidden_size % m->num_heads != 0)
            return cfg_fail(c, HX_EINVAL, "num_attention_heads",
                            "%d does not divide hidden_size %d", m->num_heads, m->hidden_size);
        m->head_dim = m->hidden_size / m->num_heads;
        if (m->head_dim > MAX_HEAD_DIM)
            return cfg_fail(c, HX_EINVAL, "num_attention_heads",
                            "%d gives a head dimension of %d (at most %d)", m->num_heads,
                            m->head_dim, MAX_HEAD_DIM);
    }
    if ((long long)m->num_heads * m->head_dim > MAX_HIDDEN)
        return cfg_fail(c, HX_EINVAL, "head_dim",
                        "num_attention_heads %d x head_dim %d exceeds %d", m->num_heads,
                        m->head_dim, MAX_HIDDEN);

    m->word_embed_dim = m->hidden_size;
    m->has_qkv_bias = attention_bias || m->arch == HX_MODEL_ARCH_QWEN2;
    m->has_o_bias = attention_bias;
    m->gated_mlp = 1;
    m->layer_norm = 0;
    m->norm_params_per_dim = 1;
    m->has_final_norm = 1;
    m->learned_positions = 0;
    return HX_OK;
}

/* Fields of OPT (OPTConfig keys and defaults). */
static hx_status read_opt(const cfg *c, hx_model *m)
{
    hx_status st;
    int enable_bias = 1, affine = 1, norm_before = 1, remove_final = 0;
    if ((st = cfg_int(c, "hidden_size", 1, 0, 1, MAX_HIDDEN, &m->hidden_size)) != HX_OK ||
        (st = cfg_int(c, "num_hidden_layers", 1, 0, 1, MAX_LAYERS, &m->num_layers)) != HX_OK ||
        (st = cfg_int(c, "num_attention_heads", 1, 0, 1, MAX_HEADS, &m->num_heads)) != HX_OK ||
        (st = cfg_int(c, "ffn_dim", 1, 0, 1, MAX_INTERMEDIATE, &m->intermediate_size)) !=
            HX_OK ||
        (st = cfg_int(c, "vocab_size", 1, 0, 1, MAX_VOCAB, &m->vocab_size)) != HX_OK ||
        (st = cfg_int(c, "max_position_embeddings", 0, 2048, 1, MAX_POSITIONS,
                      &m->max_position_tokens)) != HX_OK ||
        (st = cfg_int(c, "word_embed_proj_dim", 0, m->hidden_size, 1, MAX_HIDDEN,
                      &m->word_embed_dim)) != HX_OK ||
        (st = cfg_bool(c, "tie_word_embeddings", 1, &m->tied_embeddings)) != HX_OK ||
        (st = cfg_bool(c, "do_layer_norm_before", 1, &norm_before)) != HX_OK ||
        (st = cfg_bool(c, "_remove_final_layer_norm", 0, &remove_final)) != HX_OK ||
        (st = cfg_bool(c, "enable_bias", 1, &enable_bias)) != HX_OK ||
        (st = cfg_bool(c, "layer_norm_elementwise_affine", 1, &affine)) != HX_OK)
        return st;
    if (cfg_get(c, "num_key_value_heads")) {
        if ((st = cfg_int(c, "num_key_value_heads", 1, 0, 1, MAX_HEADS, &m->num_kv_heads)) !=
            HX_OK)
            return st;
        if (m->num_kv_heads != m->num_heads)
            return cfg_fail(c, HX_EINVAL, "num_key_value_heads",
                            "%d differs from num_attention_heads %d (OPT has no grouped-query "
                            "attention)",
                            m->num_kv_heads, m->num_heads);
    }
    m->num_kv_heads = m->num_heads;
    if (m->hidden_size % m->num_heads != 0)
        return cfg_fail(c, HX_EINVAL, "num_attention_heads", "%d does not divide hidden_size %d",
                        m->num_heads, m->hidden_size);
    m->head_dim = m->hidden_size / m->num_heads;
    if (m->head_dim > MAX_HEAD_DIM)
        return cfg_fail(c, HX_EINVAL, "num_attention_heads",
                        "%d gives a head dimension of %d (at most %d)", m->num_heads,
                        m->head_dim, MAX_HEAD_DIM);
    m->has_qkv_bias = enable_bias;
    m->has_o_bias = enable_bias;
    m->has_mlp_bias = enable_bias;
    m->gated_mlp = 0;
    m->layer_norm = 1;
    m->norm_params_per_dim = affine ? 2 : 0;
    m->has_final_norm = norm_before && !remove_final;
    m->learned_positions = 1;
    m->rope_theta = 0;
    m->norm_eps = 1e-5;
    m->sliding_window_tokens = 0;
    return HX_OK;
}

hx_status hx_model_from_json(const json_t *root, const char *config_path, const char *name,
                             hx_model *out, hx_err *err)
{
    hx_status st;
    cfg c;
    c.root = root;
    c.err = err;
    if (config_path)
        snprintf(c.where, sizeof c.where, "model config '%s'", config_path);
    else
        snprintf(c.where, sizeof c.where, "model config");
    if (!root || !json_is_object(root)) {
        const char *got = !root                 ? "nothing"
                          : json_is_array(root) ? "an array"
                                                : "a scalar value";
        return hx_err_set(err, HX_EPARSE, "%s: expected a JSON object, got %s", c.where, got);
    }
    if (config_path && strlen(config_path) >= HX_MODEL_PATH_MAX)
        return hx_err_set(err, HX_EINVAL, "%s: path too long", c.where);

    hx_model *m = calloc(1, sizeof *m); /* ~4 KiB: keep it off the stack */
    if (!m)
        return hx_err_set(err, HX_ENOMEM, "%s: out of memory", c.where);
    snprintf(m->name, sizeof m->name, "%s", name ? name : "");
    snprintf(m->config_path, sizeof m->config_path, "%s", config_path ? config_path : "");

    if ((st = read_arch(&c, m)) != HX_OK)
        goto out_free;
    st = m->arch == HX_MODEL_ARCH_OPT ? read_opt(&c, m) : read_llama(&c, m);
    if (st != HX_OK)
        goto out_free;
    if ((st = read_dtype(&c, m)) != HX_OK)
        goto out_free;
    *out = *m;
out_free:
    free(m);
    return st;
}

/* ---- paths and presets ---------------------------------------------------------- */

/* Last path component of `path` without trailing slashes, into buf. */
static void base_name(const char *path, char *buf, size_t size)
{
    size_t end = strlen(path);
    while (end > 1 && path[end - 1] == '/')
        end--;
    size_t start = end;
    while (start > 0 && path[start - 1] != '/')
        start--;
    size_t n = end - start;
    if (n >= size)
        n = size - 1;
    memcpy(buf, path + start, n);
    buf[n] = '\0';
}

/* The model's name for a directory: its real base name ("." -> "llama-2-7b"). */
static void dir_model_name(const char *dir, char *buf, size_t size)
{
    char *real = realpath(dir, NULL);
    base_name(real ? real : dir, buf, size);
    free(real);
    if (buf[0] == '\0' || strcmp(buf, "/") == 0)
        snprintf(buf, size, "model");
}

/* The model's name for a config file: its directory's for config.json, else its stem. */
static void file_model_name(const char *path, char *buf, size_t size)
{
    char base[HX_MODEL_NAME_MAX];
    base_name(path, base, sizeof base);
    if (strcmp(base, "config.json") == 0) {
        char *real = realpath(path, NULL);
        char *dir = real ? real : strdup(path);
        if (dir) {
            char *slash = strrchr(dir, '/');
            if (slash && slash != dir) {
                *slash = '\0';
                base_name(dir, buf, size);
                free(dir);
                return;
            }
            free(dir);
        }
        snprintf(buf, size, "model");
        return;
    }
    size_t n = strlen(base);
    if (n > 5 && strcmp(base + n - 5, ".json") == 0)
        base[n - 5] = '\0';
    snprintf(buf, size, "%s", base);
}

/* A preset name is one path component of [A-Za-z0-9._-], not starting with '.'. */
static int is_preset_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= HX_MODEL_NAME_MAX || s[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!isalnum(ch) && ch != '.' && ch != '_' && ch != '-')
            return 0;
    }
    return 1;
}

/* Directory of the running executable, into buf; 0 when unknown. */
static int exe_dir(char *buf, size_t size)
{
    ssize_t n = readlink("/proc/self/exe", buf, size - 1);
    if (n <= 0 || (size_t)n >= size - 1)
        return 0;
    buf[n] = '\0';
    char *slash = strrchr(buf, '/');
    if (!slash || slash == buf)
        return 0;
    *slash = '\0';
    return 1;
}

hx_status hx_model_models_dir(char *buf, size_t size, hx_err *err)
{
    const char *env = getenv(HX_MODEL_DIR_ENV);
    if (env && env[0]) {
        if (!hx_file_is_dir(env))
            return hx_err_set(err, HX_ENOENT, "%s '%s' is not a directory", HX_MODEL_DIR_ENV,
                              env);
        if ((size_t)snprintf(buf, size, "%s", env) >= size)
            return hx_err_set(err, HX_EINVAL, "%s '%s' is too long", HX_MODEL_DIR_ENV, env);
        return HX_OK;
    }
    char exe[HX_MODEL_PATH_MAX];
    if (exe_dir(exe, sizeof exe)) {
        static const char *const rel[] = {"../models", "../../models", "../share/hexflow/models"};
        for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
            char cand[HX_MODEL_PATH_MAX + 32];
            snprintf(cand, sizeof cand, "%s/%s", exe, rel[i]);
            if (hx_file_is_dir(cand) && (size_t)snprintf(buf, size, "%s", cand) < size)
                return HX_OK;
        }
    }
    if (HX_MODELS_DIR[0] && hx_file_is_dir(HX_MODELS_DIR) &&
        (size_t)snprintf(buf, size, "%s", HX_MODELS_DIR) < size)
        return HX_OK;
    return hx_err_set(err, HX_ENOENT,
                      "no directory of model presets found; set %s to the models directory",
                      HX_MODEL_DIR_ENV);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/*
 * The presets in `dir`: sorted names (each malloc'ed, in a malloc'ed array the
 * caller frees with free_names). Subdirectories with a config.json only.
 */
static size_t scan_presets(const char *dir, char ***out)
{
    *out = NULL;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    char **names = calloc(MAX_PRESETS, sizeof *names);
    size_t n = 0;
    struct dirent *de;
    while (names && n < MAX_PRESETS && (de = readdir(d)) != NULL) {
        if (!is_preset_name(de->d_name))
            continue;
        char path[HX_MODEL_PATH_MAX + HX_MODEL_NAME_MAX + 16];
        if ((size_t)snprintf(path, sizeof path, "%s/%s/config.json", dir, de->d_name) >=
            sizeof path)
            continue;
        if (!hx_file_is_regular(path))
            continue;
        names[n] = strdup(de->d_name);
        if (names[n])
            n++;
    }
    closedir(d);
    if (names)
        qsort(names, n, sizeof *names, cmp_names);
    *out = names;
    return n;
}

static void free_names(char **names, size_t n)
{
    if (!names)
        return;
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* Joins names with ", " into buf, ending in ", ..." when they do not fit. */
static void join_names(char **names, size_t n, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        size_t need = strlen(names[i]) + (i ? 2 : 0);
        if (len + need + 6 >= size) {
            if (len + 6 < size)
                snprintf(buf + len, size - len, "%s...", i ? ", " : "");
            return;
        }
        len += (size_t)snprintf(buf + len, size - len, "%s%s", i ? ", " : "", names[i]);
    }
}

size_t hx_model_preset_list(char *buf, size_t size)
{
    char dir[HX_MODEL_PATH_MAX];
    char **names = NULL;
    size_t n = 0;
    if (size > 0)
        buf[0] = '\0';
    if (hx_model_models_dir(dir, sizeof dir, NULL) != HX_OK)
        return 0;
    n = scan_presets(dir, &names);
    if (size > 0)
        join_names(names, n, buf, size);
    free_names(names, n);
    return n;
}


static int contains_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return 1;
    return 0;
}

/* The closest preset to `name`, or NULL: small edit distance, else a substring match. */
static const char *suggest(const char *name, char **names, size_t n)
{
    size_t len = strlen(name);
    if (len == 0 || len >= HX_MODEL_NAME_MAX)
        return NULL;
    size_t limit = len / 3 < 1 ? 1 : (len / 3 > 4 ? 4 : len / 3);
    const char *best = NULL;
    size_t best_d = (size_t)-1;
    for (size_t i = 0; i < n; i++) {
        size_t d = hx_text_edit_distance(name, names[i]);
        if (d <= limit && d < best_d) {
            best = names[i];
            best_d = d;
        }
    }
    if (best || len < 3)
        return best;
    for (size_t i = 0; i < n; i++)
        if (contains_ci(names[i], name) || contains_ci(name, names[i]))
            return names[i];
    return NULL;
}

static hx_status load_preset(const char *name, hx_model *out, hx_err *err)
{
    hx_status st;
    char dir[HX_MODEL_PATH_MAX];
    char **names = NULL;
    size_t n = 0;
    hx_err dir_err = {0};
    if (hx_model_models_dir(dir, sizeof dir, &dir_err) != HX_OK)
        return hx_err_set(err, HX_ENOENT,
                          "unknown model '%.200s'; expected a preset or a directory with "
                          "config.json (%s)",
                          name, dir_err.msg);
    n = scan_presets(dir, &names);
    if (is_preset_name(name)) {
        for (size_t i = 0; i < n; i++) {
            if (strcasecmp(names[i], name) == 0) {
                char path[HX_MODEL_PATH_MAX + HX_MODEL_NAME_MAX + 16];
                snprintf(path, sizeof path, "%s/%s/config.json", dir, names[i]);
                st = hx_model_load_file(path, names[i], out, err);
                goto out_names;
            }
        }
    }
    char list[640];
    join_names(names, n, list, sizeof list);
    const char *close = suggest(name, names, n);
    char hint[HX_MODEL_NAME_MAX + 32] = "";
    if (close)
        snprintf(hint, sizeof hint, "; did you mean '%s'?", close);
    if (n > 0)
        st = hx_err_set(err, HX_ENOENT,
                        "unknown model '%.200s'; expected a preset (%s) or a directory with "
                        "config.json%s",
                        name, list, hint);
    else
        st = hx_err_set(err, HX_ENOENT,
                        "unknown model '%.200s'; expected a preset or a directory with "
                        "config.json (no presets in '%.300s')",
                        name, dir);
out_names:
    free_names(names, n);
    return st;
}

hx_status hx_model_load_file(const char *config_path, const char *name, hx_model *out,
                             hx_err *err)
{
    json_t *root = NULL;
    char derived[HX_MODEL_NAME_MAX];
    hx_status st = hx_json_load_file(config_path, "model config", &root, err);
    if (st != HX_OK)
        return st;
    if (!name) {
        file_model_name(config_path, derived, sizeof derived);
        name = derived;
    }
    st = hx_model_from_json(root, config_path, name, out, err);
    json_decref(root);
    return st;
}

hx_status hx_model_load(const char *name_or_path, hx_model *out, hx_err *err)
{
    const char *arg = name_or_path;
    if (!arg || !arg[0])
        return hx_err_set(err, HX_EINVAL,
                          "empty model name; expected a preset or a directory with config.json");
    if (strlen(arg) >= HX_MODEL_PATH_MAX - 16)
        return hx_err_set(err, HX_EINVAL, "model path '%.100s...' is too long", arg);
    int is_path = strchr(arg, '/') != NULL;
    if (hx_file_is_dir(arg)) {
        char path[HX_MODEL_PATH_MAX];
        snprintf(path, sizeof path, "%s%sconfig.json", arg,
                 arg[strlen(arg) - 1] == '/' ? "" : "/");
        if (hx_file_is_regular(path)) {
            char name[HX_MODEL_NAME_MAX];
            dir_model_name(arg, name, sizeof name);
            return hx_model_load_file(path, name, out, err);
        }
        if (is_path || !is_preset_name(arg))
            return hx_err_set(err, HX_ENOENT, "model directory '%s' has no config.json", arg);
        /* a directory in the way of a preset name: fall through to the presets */
    } else if (hx_file_is_regular(arg)) {
        return hx_model_load_file(arg, NULL, out, err);
    } else if (is_path) {
        return hx_err_set(err, HX_ENOENT, "cannot open model '%s': no such file or directory",
                          arg);
    }
    return load_preset(arg, out, err);
}

/* ---- arithmetic ------------------------------------------------------------- */

void hx_model_param_counts(const hx_model *m, hx_model_params *out)
{
    const int64_t h = m->hidden_size, H = m->num_heads, K = m->num_kv_heads, d = m->head_dim;
    const int64_t f = m->intermediate_size, V = m->vocab_size, P = m->max_position_tokens;
    const int64_t e = m->word_embed_dim, a = m->norm_params_per_dim, L = m->num_layers;
    hx_model_layer_params *l = &out->layer;

    l->attn_params = h * H * d + 2 * h * K * d + H * d * h;
    if (m->has_qkv_bias)
        l->attn_params += H * d + 2 * K * d;
    if (m->has_o_bias)
        l->attn_params += h;
    if (m->gated_mlp)
        l->mlp_params = 3 * h * f + (m->has_mlp_bias ? 2 * f + h : 0);
    else
        l->mlp_params = 2 * h * f + (m->has_mlp_bias ? f + h : 0);
    l->norm_params = 2 * a * h;
    l->total_params = l->attn_params + l->mlp_params + l->norm_params;

    out->embed_params = V * e;
    if (m->learned_positions)
        out->embed_params += (P + 2) * h;
    if (e != h)
        out->embed_params += e * h; /* project_in, no bias */
    out->lm_head_params = e * V;
    out->head_params = m->has_final_norm ? a * h : 0;
    if (e != h)
        out->head_params += h * e; /* project_out, no bias */
    if (!m->tied_embeddings)
        out->head_params += out->lm_head_params;
    out->total_params = L * l->total_params + out->embed_params + out->head_params;
}

int64_t hx_model_param_count(const hx_model *m)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    return p.total_params;
}

int64_t hx_model_weight_bytes(const hx_model *m)
{
    return hx_model_param_count(m) * m->dtype_bytes;
}

int64_t hx_model_layer_weight_bytes(const hx_model *m)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    return p.layer.total_params * m->dtype_bytes;
}

int64_t hx_model_embed_weight_bytes(const hx_model *m)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    return p.embed_params * m->dtype_bytes;
}

int64_t hx_model_head_weight_bytes(const hx_model *m)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    int64_t params = p.head_params + (m->tied_embeddings ? p.lm_head_params : 0);
    return params * m->dtype_bytes;
}

hx_status hx_model_stage_weight_bytes(const hx_model *m, int first_layer, int num_layers,
                                      int64_t *out_bytes, hx_err *err)
{
    if (first_layer < 0 || num_layers < 1 || first_layer >= m->num_layers ||
        num_layers > m->num_layers - first_layer)
        return hx_err_set(err, HX_EINVAL,
                          "model '%s': layers %d..%d are not within its %d layers", m->name,
                          first_layer, first_layer + num_layers - 1, m->num_layers);
    hx_model_params p;
    hx_model_param_counts(m, &p);
    int has_first = first_layer == 0;
    int has_last = first_layer + num_layers == m->num_layers;
    int64_t params = (int64_t)num_layers * p.layer.total_params;
    if (has_first)
        params += p.embed_params;
    if (has_last) {
        params += p.head_params;
        if (m->tied_embeddings && !has_first)
            params += p.lm_head_params;
    }
    *out_bytes = params * m->dtype_bytes;
    return HX_OK;
}

int64_t hx_model_kv_bytes_per_token(const hx_model *m)
{
    return 2 * (int64_t)m->num_layers * m->num_kv_heads * m->head_dim * m->dtype_bytes;
}

/* Per-token FLOPs that do not depend on the context: projections, MLP, norms, embed, head. */
static void token_flops(const hx_model *m, hx_model_flops *f)
{
    const double h = m->hidden_size, H = m->num_heads, K = m->num_kv_heads, d = m->head_dim;
    const double ff = m->intermediate_size, V = m->vocab_size, e = m->word_embed_dim;
    const double norm = (m->layer_norm ? 7.0 : 4.0) * h;

    f->layer.attn_proj_flops = 2 * (h * H * d + 2 * h * K * d + H * d * h);
    if (m->has_qkv_bias)
        f->layer.attn_proj_flops += H * d + 2 * K * d;
    if (m->has_o_bias)
        f->layer.attn_proj_flops += h;
    if (m->gated_mlp)
        f->layer.mlp_flops = 2 * 3 * h * ff + (m->has_mlp_bias ? 2 * ff + h : 0);
    else
        f->layer.mlp_flops = 2 * 2 * h * ff + (m->has_mlp_bias ? ff + h : 0);
    f->layer.norm_flops = 2 * norm;
    f->layer.attn_score_flops = 0;

    f->embed_flops = e != h ? 2 * e * h : 0;
    f->head_flops = (m->has_final_norm ? norm : 0) + (e != h ? 2 * h * e : 0) + 2 * e * V;
}

static void sum_flops(const hx_model *m, hx_model_flops *f)
{
    hx_model_layer_flops *l = &f->layer;
    l->total_flops = l->attn_proj_flops + l->attn_score_flops + l->mlp_flops + l->norm_flops;
    f->total_flops = m->num_layers * l->total_flops + f->embed_flops + f->head_flops;
}

double hx_model_prefill_flops(const hx_model *m, int64_t n_tokens, hx_model_flops *out)
{
    hx_model_flops f;
    memset(&f, 0, sizeof f);
    if (n_tokens > 0) {
        const double n = (double)n_tokens;
        const double per_key = 4.0 * m->num_heads * m->head_dim;
        token_flops(m, &f);
        f.layer.attn_proj_flops *= n;
        f.layer.mlp_flops *= n;
        f.layer.norm_flops *= n;
        f.embed_flops *= n;
        /* head: last token only */
        /* sum_{i=1..n} min(i, W) */
        double keys;
        const double w = m->sliding_window_tokens;
        if (w <= 0 || n <= w)
            keys = n * (n + 1) / 2;
        else
            keys = w * (w + 1) / 2 + w * (n - w);
        f.layer.attn_score_flops = per_key * keys;
        sum_flops(m, &f);
    }
    if (out)
        *out = f;
    return f.total_flops;
}

double hx_model_decode_flops(const hx_model *m, int64_t context_tokens, hx_model_flops *out)
{
    hx_model_flops f;
    double c = context_tokens > 0 ? (double)context_tokens : 0;
    if (m->sliding_window_tokens > 0 && c > m->sliding_window_tokens)
        c = m->sliding_window_tokens;
    token_flops(m, &f);
    f.layer.attn_score_flops = 4.0 * m->num_heads * m->head_dim * c;
    sum_flops(m, &f);
    if (out)
        *out = f;
    return f.total_flops;
}

/* ---- JSON ------------------------------------------------------------------- */

static int set_new(json_t *obj, const char *key, json_t *v)
{
    return v ? json_object_set_new(obj, key, v) : -1;
}

static json_t *params_bytes(int64_t params, int64_t bytes)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    if (set_new(o, "params", json_integer(params)) ||
        set_new(o, "weight_bytes", json_integer(bytes))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

json_t *hx_model_to_json(const hx_model *m)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    const int64_t b = m->dtype_bytes;
    const int64_t head_params = p.head_params + (m->tied_embeddings ? p.lm_head_params : 0);
    json_t *o = json_object();
    if (!o)
        return NULL;
    if (set_new(o, "name", json_string(m->name)) ||
        set_new(o, "config", json_string(m->config_path)) ||
        set_new(o, "model_type", json_string(hx_model_arch_name(m->arch))) ||
        set_new(o, "architecture", json_string(m->architecture)) ||
        set_new(o, "num_layers", json_integer(m->num_layers)) ||
        set_new(o, "hidden_size", json_integer(m->hidden_size)) ||
        set_new(o, "num_heads", json_integer(m->num_heads)) ||
        set_new(o, "num_kv_heads", json_integer(m->num_kv_heads)) ||
        set_new(o, "head_dim", json_integer(m->head_dim)) ||
        set_new(o, "intermediate_size", json_integer(m->intermediate_size)) ||
        set_new(o, "vocab_size", json_integer(m->vocab_size)) ||
        set_new(o, "max_position_tokens", json_integer(m->max_position_tokens)) ||
        set_new(o, "sliding_window_tokens", json_integer(m->sliding_window_tokens)) ||
        set_new(o, "tied_embeddings", json_boolean(m->tied_embeddings)) ||
        set_new(o, "qkv_bias", json_boolean(m->has_qkv_bias)) ||
        set_new(o, "dtype", json_string(hx_model_dtype_name(m->dtype))) ||
        set_new(o, "dtype_bytes", json_integer(m->dtype_bytes)) ||
        set_new(o, "params", json_integer(p.total_params)) ||
        set_new(o, "weight_bytes", json_integer(p.total_params * b)) ||
        set_new(o, "kv_bytes_per_token", json_integer(hx_model_kv_bytes_per_token(m))))
        goto out_fail;
    /* set_new hands the value to o (jansson drops it on failure), so nothing leaks */
    json_t *layer = params_bytes(p.layer.total_params, p.layer.total_params * b);
    if (set_new(o, "layer", layer) ||
        set_new(layer, "attn_params", json_integer(p.layer.attn_params)) ||
        set_new(layer, "mlp_params", json_integer(p.layer.mlp_params)) ||
        set_new(layer, "norm_params", json_integer(p.layer.norm_params)) ||
        set_new(o, "embed", params_bytes(p.embed_params, p.embed_params * b)) ||
        set_new(o, "head", params_bytes(head_params, head_params * b)))
        goto out_fail;
    return o;
out_fail:
    json_decref(o);
    return NULL;
}
