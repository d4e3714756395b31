/*
 * tiny.c - small random-weight Llama models in Hugging Face layout.
 */
#define _POSIX_C_SOURCE 200809L
#include "runtime/tiny.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/file.h"
#include "common/json.h"
#include "runtime/safetensors.h"

/* ---- configuration ------------------------------------------------------------------ */

void hx_tiny_config_init(hx_tiny_config *c)
{
    *c = (hx_tiny_config){
        .num_layers = 2,
        .hidden_size = 64,
        .num_heads = 4,
        .num_kv_heads = 2,
        .intermediate_size = 128,
        .vocab_size = 512,
        .seed = 1,
        .dtype = HX_MODEL_DTYPE_FP32,
        .rope_theta = 10000.0,
        .norm_eps = 1e-5,
        .max_position_tokens = 2048,
        .shards = 1,
    };
}

int64_t hx_tiny_param_count(const hx_tiny_config *c)
{
    int64_t h = c->hidden_size, f = c->intermediate_size, v = c->vocab_size;
    int64_t d = c->num_heads > 0 ? h / c->num_heads : 0;
    int64_t q = c->num_heads * d, kv = c->num_kv_heads * d;
    int64_t layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * f;
    return c->num_layers * layer + 2 * v * h + h;
}

hx_status hx_tiny_config_check(const hx_tiny_config *c, hx_err *err)
{
    const char *w = "tiny model";
    if (c->num_layers < 1 || c->num_layers > 256)
        return hx_err_set(err, HX_EINVAL, "%s: layers: %d is not in [1, 256]", w, c->num_layers);
    if (c->hidden_size < 2 || c->hidden_size > 16384)
        return hx_err_set(err, HX_EINVAL, "%s: hidden: %d is not in [2, 16384]", w,
                          c->hidden_size);
    if (c->num_heads < 1 || c->num_heads > c->hidden_size)
        return hx_err_set(err, HX_EINVAL, "%s: heads: %d is not in [1, hidden %d]", w,
                          c->num_heads, c->hidden_size);
    if (c->hidden_size % c->num_heads != 0)
        return hx_err_set(err, HX_EINVAL, "%s: heads: %d does not divide hidden %d", w,
                          c->num_heads, c->hidden_size);
    if ((c->hidden_size / c->num_heads) % 2 != 0)
        return hx_err_set(err, HX_EINVAL,
                          "%s: head_dim %d (hidden %d / heads %d) is odd; rotary positions "
                          "need an even head_dim",
                          w, c->hidden_size / c->num_heads, c->hidden_size, c->num_heads);
    if (c->num_kv_heads < 1 || c->num_heads % c->num_kv_heads != 0)
        return hx_err_set(err, HX_EINVAL, "%s: kv-heads: %d does not divide heads %d", w,
                          c->num_kv_heads, c->num_heads);
    if (c->intermediate_size < 1 || c->intermediate_size > 65536)
        return hx_err_set(err, HX_EINVAL, "%s: intermediate: %d is not in [1, 65536]", w,
                          c->intermediate_size);
    if (c->vocab_size < 258 || c->vocab_size > 262144)
        return hx_err_set(err, HX_EINVAL,
                          "%s: vocab: %d is not in [258, 262144] (256 byte tokens + <s> + "
                          "</s> at least)",
                          w, c->vocab_size);
    if (c->max_position_tokens < 1 || c->max_position_tokens > 1048576)
        return hx_err_set(err, HX_EINVAL, "%s: max positions: %d is not in [1, 1048576]", w,
                          c->max_position_tokens);
    if (c->shards < 1 || c->shards > c->num_layers)
        return hx_err_set(err, HX_EINVAL, "%s: shards: %d is not in [1, layers %d]", w,
                          c->shards, c->num_layers);
    if (!(c->rope_theta > 0) || !(c->norm_eps > 0))
        return hx_err_set(err, HX_EINVAL, "%s: rope_theta and norm_eps must be positive", w);
    int64_t bytes = hx_tiny_param_count(c) * hx_model_dtype_bytes(c->dtype);
    if (bytes > HX_TINY_MAX_WEIGHT_BYTES)
        return hx_err_set(err, HX_EINVAL, "%s: %lld bytes of weights (at most %lld)", w,
                          (long long)bytes, (long long)HX_TINY_MAX_WEIGHT_BYTES);
    return HX_OK;
}

/* ---- random weights -------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

/* Fills out[n] with center + uniform(-half_width, half_width), seeded by (seed, name). */
static void fill_uniform(float *out, size_t n, uint64_t seed, const char *name, double center,
                         double half_width)
{
    uint64_t s = seed ^ fnv1a(name);
    splitmix64(&s);
    for (size_t i = 0; i < n; i++) {
        double u = (double)(splitmix64(&s) >> 11) * (1.0 / 9007199254740992.0); /* [0, 1) */
        out[i] = (float)(center + (2.0 * u - 1.0) * half_width);
    }
}

/* One tensor to make. */
typedef struct tspec {
    char name[96];
    int64_t rows, cols; /* cols 0: a vector of rows */
    double center, half_width;
} tspec;

static size_t build_specs(const hx_tiny_config *c, tspec *specs)
{
    const int64_t h = c->hidden_size, f = c->intermediate_size, v = c->vocab_size;
    const int64_t d = h / c->num_heads;
    const int64_t q = c->num_heads * d, kv = c->num_kv_heads * d;
    const double sq3 = sqrt(3.0); /* uniform(-a, a) has std a / sqrt(3) */
    size_t n = 0;
#define SPEC(r, cl, cen, hw, ...)                                                            \
    do {                                                                                     \
        snprintf(specs[n].name, sizeof specs[n].name, __VA_ARGS__);                          \
        specs[n].rows = (r);                                                                 \
        specs[n].cols = (cl);                                                                \
        specs[n].center = (cen);                                                             \
        specs[n].half_width = (hw);                                                          \
        n++;                                                                                 \
    } while (0)
    SPEC(v, h, 0.0, 1.0, "model.embed_tokens.weight");
    for (int i = 0; i < c->num_layers; i++) {
        SPEC(h, 0, 1.0, 0.1, "model.layers.%d.input_layernorm.weight", i);
        SPEC(q, h, 0.0, sq3 / sqrt((double)h), "model.layers.%d.self_attn.q_proj.weight", i);
        SPEC(kv, h, 0.0, sq3 / sqrt((double)h), "model.layers.%d.self_attn.k_proj.weight", i);
        SPEC(kv, h, 0.0, sq3 / sqrt((double)h), "model.layers.%d.self_attn.v_proj.weight", i);
        SPEC(h, q, 0.0, sq3 / sqrt((double)q), "model.layers.%d.self_attn.o_proj.weight", i);
        SPEC(h, 0, 1.0, 0.1, "model.layers.%d.post_attention_layernorm.weight", i);
        SPEC(f, h, 0.0, sq3 / sqrt((double)h), "model.layers.%d.mlp.gate_proj.weight", i);
        SPEC(f, h, 0.0, sq3 / sqrt((double)h), "model.layers.%d.mlp.up_proj.weight", i);
        SPEC(h, f, 0.0, sq3 / sqrt((double)f), "model.layers.%d.mlp.down_proj.weight", i);
    }
    SPEC(h, 0, 1.0, 0.1, "model.norm.weight");
    SPEC(v, h, 0.0, sq3 / sqrt((double)h), "lm_head.weight");
#undef SPEC
    return n;
}

static hx_safetensors_dtype st_dtype(hx_model_dtype d)
{
    switch (d) {
    case HX_MODEL_DTYPE_BF16: return HX_SAFETENSORS_BF16;
    case HX_MODEL_DTYPE_FP16: return HX_SAFETENSORS_F16;
    default: return HX_SAFETENSORS_F32;
    }
}

/* The shard (0-based) of spec i of n: by layer, the embedding first, the head last. */
static int shard_of(const hx_tiny_config *c, const tspec *s, size_t i, size_t n)
{
    int layer = -1;
    if (sscanf(s->name, "model.layers.%d.", &layer) == 1)
        return (int)((int64_t)layer * c->shards / c->num_layers);
    return i == 0 ? 0 : (i + 2 >= n ? c->shards - 1 : 0);
}

/* The shards' file name: model.safetensors alone, else HF's model-0000k-of-0000N. */
static void shard_name(const hx_tiny_config *c, int k, char *out, size_t cap)
{
    if (c->shards == 1)
        snprintf(out, cap, "model.safetensors");
    else
        snprintf(out, cap, "model-%05d-of-%05d.safetensors", k + 1, c->shards);
}

/* The index of a sharded model: total_size and every tensor's file. */
static hx_status write_index(const char *dir, const hx_tiny_config *c, const tspec *specs,
                             size_t n, int64_t total, hx_err *err)
{
    json_t *map = json_object(), *meta = json_object(), *root = json_object();
    hx_status st = HX_OK;
    if (!map || !meta || !root)
        st = hx_err_set(err, HX_ENOMEM, "tiny model: out of memory");
    for (size_t i = 0; st == HX_OK && i < n; i++) {
        char file[64];
        shard_name(c, shard_of(c, &specs[i], i, n), file, sizeof file);
        if (json_object_set_new(map, specs[i].name, json_string(file)) != 0)
            st = hx_err_set(err, HX_ENOMEM, "tiny model: out of memory");
    }
    if (st == HX_OK && (json_object_set_new(meta, "total_size", json_integer(total)) != 0 ||
                        json_object_set(root, "metadata", meta) != 0 ||
                        json_object_set(root, "weight_map", map) != 0))
        st = hx_err_set(err, HX_ENOMEM, "tiny model: out of memory");
    if (st == HX_OK) {
        char *text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
        size_t len = strlen(dir) + 64;
        char *path = malloc(len);
        if (!text || !path)
            st = hx_err_set(err, HX_ENOMEM, "tiny model: out of memory");
        else {
            snprintf(path, len, "%s/model.safetensors.index.json", dir);
            st = hx_file_write_atomic(path, text, strlen(text), err);
        }
        free(path);
        free(text);
    }
    json_decref(map);
    json_decref(meta);
    json_decref(root);
    return st;
}

static hx_status write_weights(const char *dir, const hx_tiny_config *c, hx_err *err)
{
    hx_status st = HX_OK;
    size_t max_specs = 2 + 9 * (size_t)c->num_layers + 1;
    tspec *specs = calloc(max_specs, sizeof *specs);
    hx_safetensors_entry *entries = calloc(max_specs, sizeof *entries);
    hx_safetensors_entry *part = calloc(max_specs, sizeof *part);
    unsigned char **bufs = calloc(max_specs, sizeof *bufs);
    float *tmp = NULL;
    size_t n = 0;
    const size_t plen = strlen(dir) + 64;
    char *path = malloc(plen);
    if (!specs || !entries || !part || !bufs || !path)
        goto out_nomem;
    n = build_specs(c, specs);
    size_t max_elems = 0;
    for (size_t i = 0; i < n; i++) {
        size_t e = (size_t)specs[i].rows * (size_t)(specs[i].cols ? specs[i].cols : 1);
        if (e > max_elems)
            max_elems = e;
    }
    tmp = malloc(max_elems * sizeof *tmp);
    if (!tmp)
        goto out_nomem;
    hx_safetensors_dtype dt = st_dtype(c->dtype);
    size_t esize = hx_safetensors_dtype_bytes(dt);
    int64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const tspec *s = &specs[i];
        size_t elems = (size_t)s->rows * (size_t)(s->cols ? s->cols : 1);
        fill_uniform(tmp, elems, c->seed, s->name, s->center, s->half_width);
        bufs[i] = malloc(elems > 0 ? elems * esize : 1);
        if (!bufs[i])
            goto out_nomem;
        unsigned char *b = bufs[i];
        for (size_t k = 0; k < elems; k++) { /* little-endian, whatever the host */
            uint32_t u;
            if (dt == HX_SAFETENSORS_F32) {
                memcpy(&u, &tmp[k], 4);
                b[4 * k] = (unsigned char)u;
                b[4 * k + 1] = (unsigned char)(u >> 8);
                b[4 * k + 2] = (unsigned char)(u >> 16);
                b[4 * k + 3] = (unsigned char)(u >> 24);
            } else {
                u = dt == HX_SAFETENSORS_BF16 ? hx_safetensors_f32_to_bf16(tmp[k])
                                              : hx_safetensors_f32_to_f16(tmp[k]);
                b[2 * k] = (unsigned char)u;
                b[2 * k + 1] = (unsigned char)(u >> 8);
            }
        }
        entries[i].name = s->name;
        entries[i].dtype = dt;
        entries[i].ndim = s->cols ? 2 : 1;
        entries[i].shape[0] = s->rows;
        entries[i].shape[1] = s->cols;
        entries[i].data = bufs[i];
        total += (int64_t)(elems * esize);
    }
    static const char *const meta[] = {"format", "pt", "generator", "hexflow model make-tiny"};
    for (int k = 0; k < c->shards && st == HX_OK; k++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (shard_of(c, &specs[i], i, n) == k)
                part[m++] = entries[i];
        char file[64];
        shard_name(c, k, file, sizeof file);
        snprintf(path, plen, "%s/%s", dir, file);
        st = hx_safetensors_write(path, part, m, meta, 2, err);
    }
    if (st == HX_OK && c->shards > 1)
        st = write_index(dir, c, specs, n, total, err);
    goto out;
out_nomem:
    st = hx_err_set(err, HX_ENOMEM, "cannot write the weights into '%s': out of memory", dir);
out:
    if (bufs)
        for (size_t i = 0; i < max_specs; i++)
            free(bufs[i]);
    free(bufs);
    free(tmp);
    free(entries);
    free(part);
    free(specs);
    free(path);
    return st;
}

/* ---- config.json ---------------------------------------------------------------------------- */

static const char *torch_dtype(hx_model_dtype d)
{
    switch (d) {
    case HX_MODEL_DTYPE_BF16: return "bfloat16";
    case HX_MODEL_DTYPE_FP16: return "float16";
    default: return "float32";
    }
}

static hx_status write_config(const char *path, const hx_tiny_config *c, hx_err *err)
{
    json_t *root = json_pack(
        "{s:[s],s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:f,s:b,s:s,s:I,s:I,s:s,s:b,s:b,s:f}",
        "architectures", "LlamaForCausalLM", "model_type", "llama", "hidden_size",
        (json_int_t)c->hidden_size, "intermediate_size", (json_int_t)c->intermediate_size,
        "num_attention_heads", (json_int_t)c->num_heads, "num_hidden_layers",
        (json_int_t)c->num_layers, "num_key_value_heads", (json_int_t)c->num_kv_heads,
        "head_dim", (json_int_t)(c->hidden_size / c->num_heads), "vocab_size",
        (json_int_t)c->vocab_size, "max_position_embeddings",
        (json_int_t)c->max_position_tokens, "rms_norm_eps", c->norm_eps, "rope_theta",
        c->rope_theta, "tie_word_embeddings", 0, "torch_dtype", torch_dtype(c->dtype),
        "bos_token_id", (json_int_t)HX_TINY_BOS_ID, "eos_token_id", (json_int_t)HX_TINY_EOS_ID,
        "hidden_act", "silu", "attention_bias", 0, "mlp_bias", 0, "initializer_range", 0.02);
    if (!root)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    hx_status st = hx_json_write_file(path, root, err);
    json_decref(root);
    return st;
}

/* ---- tokenizer ---------------------------------------------------------------------------- */

/* The text the merges are learnt from. */
static const char corpus[] =
    "Once upon a time, there was a little girl who lived in a small house near the forest. "
    "She liked to play in the garden with her dog, and every morning she would walk to the "
    "river to look at the water. One day she saw a bird that could not fly. The bird was "
    "sad because it had hurt its wing. The girl picked up the bird and took it home. She "
    "gave it some water and some bread, and she made a warm bed for it in a box. Her mother "
    "said that the bird would get better if they were kind and patient. Every day the girl "
    "talked to the bird and told it stories about the things she had seen. After a few "
    "weeks the wing was strong again, and the bird began to sing. The girl was happy, but "
    "she was also a little sad, because she knew that the bird wanted to go back to the "
    "trees. In the evening she opened the window and the bird flew out into the sky. It "
    "came back the next morning and sat on the window, singing, and it came back every "
    "morning after that.\n"
    "The model reads the text one token at a time. Each token is a piece of a word, and "
    "the most common pieces of the language become single tokens: the, and, ing, tion, "
    "that, with, for, this, there, which, their, would, about, could, other, people. "
    "When a word is not in the vocabulary it is written with smaller pieces, and in the "
    "end with single bytes, so that every text can be encoded and decoded again without "
    "loss. This is what a byte-level tokenizer does: it first maps the bytes of the text "
    "to printable characters, then it joins the pairs that were learnt from a large text, "
    "in the order in which they were learnt.\n"
    "We are going to test the server with many requests at the same time. The first "
    "request has a long prompt and the second one has a short prompt, and both of them "
    "should finish within the time that we promised. If the queue is too long, the "
    "router should reject the request early and say why, instead of making the user wait "
    "for an answer that will never come. It is important that the numbers we report are "
    "measured and not guessed, and that every number says what it was measured on.\n"
    "The weather was cold and the wind was strong, but the children went outside anyway. "
    "They played in the snow until the sun went down, and then they came inside for a hot "
    "drink. Their father was reading a book by the fire, and their mother was writing a "
    "letter to her sister, who lived in another country. It was a quiet and peaceful "
    "evening, and everyone was happy to be together. \"Can we play again tomorrow?\" asked "
    "the youngest one. \"Of course,\" said their father, \"if the weather is good.\" "
    "Numbers like 1, 2, 10, 100, 2024 and 3.14 appear in text too, and so do names like "
    "London, Paris, Python, Linux and Llama.\n";

/* GPT-2's byte-to-unicode: the code point standing for byte b. */
static unsigned byte_to_codepoint(unsigned b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))
        return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF)))
            n++;
    return 256 + n;
}

/* Appends the byte-level (mapped, UTF-8) form of bytes[0..n) to out (room for 2n + 1). */
static void map_bytes(const unsigned char *bytes, size_t n, char *out)
{
    size_t o = strlen(out);
    for (size_t i = 0; i < n; i++) {
        unsigned cp = byte_to_codepoint(bytes[i]);
        if (cp < 0x80) {
            out[o++] = (char)cp;
        } else {
            out[o++] = (char)(0xC0 | (cp >> 6));
            out[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[o] = '\0';
}

typedef struct tok {
    unsigned char *bytes; /* owned */
    size_t len;
} tok;

typedef struct word {
    int *ids; /* owned */
    int n;
    int count;
} word;

static int is_alpha(int ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static int is_digit(int ch)
{
    return ch >= '0' && ch <= '9';
}

static int is_space(int ch)
{
    return ch == ' ' || ch == '\n' || ch == '\t' || ch == '\r';
}

/*
 * The GPT-2 pre-tokenizer pattern restricted to ASCII:
 * 's|'t|'re|'ve|'m|'ll|'d| ?letters| ?digits| ?other+|\s+(?!\S)|\s+
 * Returns the length of the chunk starting at s[i].
 */
static size_t next_chunk(const char *s, size_t i, size_t n)
{
    static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    for (size_t k = 0; k < sizeof contractions / sizeof *contractions; k++) {
        size_t l = strlen(contractions[k]);
        if (i + l <= n && strncmp(s + i, contractions[k], l) == 0)
            return l;
    }
    size_t j = i + (s[i] == ' ' && i + 1 < n && !is_space(s[i + 1]) ? 1 : 0);
    if (is_alpha(s[j])) {
        while (j < n && is_alpha(s[j]))
            j++;
        return j - i;
    }
    if (is_digit(s[j])) {
        while (j < n && is_digit(s[j]))
            j++;
        return j - i;
    }
    if (!is_space(s[j])) {
        while (j < n && !is_space(s[j]) && !is_alpha(s[j]) && !is_digit(s[j]))
            j++;
        return j - i;
    }
    /* whitespace: all of it but the last when a non-space follows */
    while (j < n && is_space(s[j]))
        j++;
    if (j < n && j - i > 1)
        j--;
    return j - i;
}

typedef struct pair {
    int a, b, count;
} pair;

static int cmp_pair(const void *x, const void *y)
{
    const pair *p = x, *q = y;
    if (p->a != q->a)
        return p->a < q->a ? -1 : 1;
    return (p->b > q->b) - (p->b < q->b);
}

/* Learns up to max_merges merges; fills toks[258..] and merges. Returns the merge count. */
static int learn_merges(tok *toks, int (*merges)[2], int max_merges, int *n_toks)
{
    size_t n = sizeof corpus - 1;
    word *words = calloc(n, sizeof *words);
    pair *pairs = calloc(n, sizeof *pairs);
    int n_words = 0, made = 0;
    if (!words || !pairs) {
        free(words);
        free(pairs);
        return -1;
    }
    for (size_t i = 0; i < n;) {
        size_t l = next_chunk(corpus, i, n);
        int k = 0;
        for (; k < n_words; k++) {
            if ((size_t)words[k].n != l)
                continue;
            int same = 1;
            for (size_t m = 0; m < l && same; m++)
                same = words[k].ids[m] == (unsigned char)corpus[i + m];
            if (same)
                break;
        }
        if (k == n_words) {
            words[k].ids = malloc(l * sizeof(int));
            if (!words[k].ids) {
                made = -1;
                goto out;
            }
            for (size_t m = 0; m < l; m++)
                words[k].ids[m] = (unsigned char)corpus[i + m];
            words[k].n = (int)l;
            n_words++;
        }
        words[k].count++;
        i += l;
    }
    for (made = 0; made < max_merges; made++) {
        /* count adjacent pairs; keep the most frequent (ties: smallest ids) */
        size_t n_pairs = 0;
        for (int w = 0; w < n_words; w++)
            for (int m = 0; m + 1 < words[w].n; m++)
                pairs[n_pairs++] = (pair){words[w].ids[m], words[w].ids[m + 1], words[w].count};
        qsort(pairs, n_pairs, sizeof *pairs, cmp_pair);
        int best_a = -1, best_b = -1, best = 1;
        for (size_t i = 0; i < n_pairs;) {
            size_t j = i;
            int total = 0;
            while (j < n_pairs && pairs[j].a == pairs[i].a && pairs[j].b == pairs[i].b)
                total += pairs[j++].count;
            if (total > best) {
                best = total;
                best_a = pairs[i].a;
                best_b = pairs[i].b;
            }
            i = j;
        }
        if (best_a < 0)
            break; /* no pair occurs twice */
        int id = (*n_toks)++;
        toks[id].len = toks[best_a].len + toks[best_b].len;
        toks[id].bytes = malloc(toks[id].len);
        if (!toks[id].bytes) {
            made = -1;
            goto out;
        }
        memcpy(toks[id].bytes, toks[best_a].bytes, toks[best_a].len);
        memcpy(toks[id].bytes + toks[best_a].len, toks[best_b].bytes, toks[best_b].len);
        merges[made][0] = best_a;
        merges[made][1] = best_b;
        for (int w = 0; w < n_words; w++) {
            int o = 0;
            for (int m = 0; m < words[w].n; m++) {
                if (m + 1 < words[w].n && words[w].ids[m] == best_a &&
                    words[w].ids[m + 1] == best_b) {
                    words[w].ids[o++] = id;
                    m++;
                } else {
                    words[w].ids[o++] = words[w].ids[m];
                }
            }
            words[w].n = o;
        }
    }
out:
    free(pairs);
    for (int w = 0; w < n_words; w++)
        free(words[w].ids);
    free(words);
    return made;
}

static json_t *added_token(int id, const char *content)
{
    return json_pack("{s:I,s:s,s:b,s:b,s:b,s:b,s:b}", "id", (json_int_t)id, "content", content,
                     "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1);
}

static json_t *byte_level(int add_prefix_space)
{
    return json_pack("{s:s,s:b,s:b,s:b}", "type", "ByteLevel", "add_prefix_space",
                     add_prefix_space, "trim_offsets", 1, "use_regex", 1);
}

/* Llama's post-processor: <s> before the text (and before each text of a pair). */
static json_t *bos_template(void)
{
    return json_pack("{s:s,s:[{s:{s:s,s:i}},{s:{s:s,s:i}}],"
                     "s:[{s:{s:s,s:i}},{s:{s:s,s:i}},{s:{s:s,s:i}},{s:{s:s,s:i}}],"
                     "s:{s:{s:s,s:[i],s:[s]}}}",
                     "type", "TemplateProcessing", "single", "SpecialToken", "id", "<s>",
                     "type_id", 0, "Sequence", "id", "A", "type_id", 0, "pair", "SpecialToken",
                     "id", "<s>", "type_id", 0, "Sequence", "id", "A", "type_id", 0,
                     "SpecialToken", "id", "<s>", "type_id", 1, "Sequence", "id", "B",
                     "type_id", 1, "special_tokens", "<s>", "id", "<s>", "ids", HX_TINY_BOS_ID,
                     "tokens", "<s>");
}

hx_status hx_tiny_write_tokenizer(const char *path, int vocab_size, hx_err *err)
{
    hx_status st = HX_OK;
    json_t *root = NULL;
    int max_merges = vocab_size - 258;
    if (vocab_size < 258)
        return hx_err_set(err, HX_EINVAL, "tokenizer: vocab %d is below 258", vocab_size);
    tok *toks = calloc((size_t)vocab_size, sizeof *toks);
    int(*merges)[2] = calloc(max_merges > 0 ? (size_t)max_merges : 1, sizeof *merges);
    int n_toks = 258, n_merges = 0;
    if (!toks || !merges)
        goto out_nomem;
    for (int b = 0; b < 256; b++) {
        toks[b].bytes = malloc(1);
        if (!toks[b].bytes)
            goto out_nomem;
        toks[b].bytes[0] = (unsigned char)b;
        toks[b].len = 1;
    }
    n_merges = learn_merges(toks, merges, max_merges, &n_toks);
    if (n_merges < 0)
        goto out_nomem;

    json_t *vocab = json_object(), *mlist = json_array();
    root = json_pack("{s:s,s:n,s:n,s:[o,o],s:n,s:o,s:o,s:o,s:{s:s,s:n,s:n,s:n,s:n,s:b,s:b,"
                     "s:b,s:o,s:o}}",
                     "version", "1.0", "truncation", "padding", "added_tokens",
                     added_token(HX_TINY_BOS_ID, "<s>"), added_token(HX_TINY_EOS_ID, "</s>"),
                     "normalizer", "pre_tokenizer", byte_level(0), "post_processor",
                     bos_template(), "decoder", byte_level(1), "model", "type", "BPE", "dropout",
                     "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                     "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab,
                     "merges", mlist);
    if (!root)
        goto out_nomem;
    char *s = malloc(4 * sizeof corpus + 16); /* a merge: two tokens of the corpus, mapped */
    if (!s)
        goto out_nomem;
    for (int id = 0; id < n_toks; id++) {
        int rc;
        if (id == HX_TINY_BOS_ID) {
            rc = json_object_set_new(vocab, "<s>", json_integer(id));
        } else if (id == HX_TINY_EOS_ID) {
            rc = json_object_set_new(vocab, "</s>", json_integer(id));
        } else {
            s[0] = '\0';
            map_bytes(toks[id].bytes, toks[id].len, s);
            rc = json_object_set_new(vocab, s, json_integer(id));
        }
        if (rc != 0) {
            free(s);
            goto out_nomem;
        }
    }
    /* ids the merges did not reach: plain filler tokens, so that every id decodes */
    for (int id = n_toks; id < vocab_size; id++) {
        char filler[32];
        snprintf(filler, sizeof filler, "<unused_%d>", id - n_toks);
        if (json_object_set_new(vocab, filler, json_integer(id)) != 0) {
            free(s);
            goto out_nomem;
        }
    }
    for (int m = 0; m < n_merges; m++) {
        s[0] = '\0';
        map_bytes(toks[merges[m][0]].bytes, toks[merges[m][0]].len, s);
        strcat(s, " ");
        map_bytes(toks[merges[m][1]].bytes, toks[merges[m][1]].len, s);
        if (json_array_append_new(mlist, json_string(s)) != 0) {
            free(s);
            goto out_nomem;
        }
    }
    free(s);
    st = hx_json_write_file(path, root, err);
    goto out;
out_nomem:
    st = hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
out:
    json_decref(root);
    if (toks)
        for (int i = 0; i < vocab_size; i++)
            free(toks[i].bytes);
    free(toks);
    free(merges);
    return st;
}

/* ---- the model directory -------------------------------------------------------------------- */

/* mkdir -p */
static hx_status make_dirs(const char *dir, hx_err *err)
{
    char *p = strdup(dir);
    if (!p)
        return hx_err_set(err, HX_ENOMEM, "cannot create '%s': out of memory", dir);
    hx_status st = HX_OK;
    for (char *q = p + 1;; q++) {
        char was = *q;
        if (was != '/' && was != '\0')
            continue;
        *q = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            st = hx_err_set(err, HX_EIO, "cannot create directory '%s': %s", p,
                            hx_errno_text(errno));
            break;
        }
        *q = was;
        if (was == '\0')
            break;
    }
    if (st == HX_OK && !hx_file_is_dir(dir))
        st = hx_err_set(err, HX_EINVAL, "cannot create directory '%s': a file is in the way",
                        dir);
    free(p);
    return st;
}

hx_status hx_tiny_write(const char *dir, const hx_tiny_config *c, hx_err *err)
{
    hx_status st = hx_tiny_config_check(c, err);
    if (st != HX_OK)
        return st;
    if (!dir || !dir[0])
        return hx_err_set(err, HX_EINVAL, "tiny model: no output directory");
    size_t n = strlen(dir) + 64;
    char *path = malloc(n);
    if (!path)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", dir);
    snprintf(path, n, "%s/config.json", dir);
    if (hx_file_is_regular(path) || hx_file_is_dir(path)) {
        st = hx_err_set(err, HX_EEXIST,
                        "model directory '%s' already holds a model (config.json); choose "
                        "another directory or remove it first",
                        dir);
        goto out;
    }
    if ((st = make_dirs(dir, err)) != HX_OK)
        goto out;
    snprintf(path, n, "%s/tokenizer.json", dir);
    if ((st = hx_tiny_write_tokenizer(path, c->vocab_size, err)) != HX_OK)
        goto out;
    if ((st = write_weights(dir, c, err)) != HX_OK)
        goto out;
    snprintf(path, n, "%s/config.json", dir);
    st = write_config(path, c, err);
out:
    free(path);
    return st;
}
