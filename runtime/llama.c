/*
 * llama.c - the Llama forward pass on the CPU, its KV cache, and sampling.
 */
#define _POSIX_C_SOURCE 200809L
#include "runtime/llama.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"
#include "runtime/kvcache.h"
#include "runtime/llama_weights.h"
#include "runtime/safetensors.h"

/* ---- the model ----------------------------------------------------------------------- */

/* One decoder layer's weights, fp32, borrowed from the mapping or from owned[]. */
typedef hx_llama_layer_weights llama_layer;

struct hx_llama {
    char *dir;                       /* owned */
    hx_model cfg;
    int first_layer, num_layers;     /* the stage: [first_layer, first_layer + num_layers) */
    int has_embedding, has_head;
    hx_llama_slice slice;            /* the TP slice held (everything at TP 1) */
    hx_safetensors_index *weights;   /* owned; fp32 tensors point into its mappings */
    const float *embed;              /* [vocab][hidden], when has_embedding */
    llama_layer *layers;             /* owned, [num_layers] */
    const float *final_norm;         /* [hidden], when has_head */
    const float *lm_head;            /* [vocab][hidden], when has_head */
    float **owned;                   /* owned: converted tensors */
    size_t n_owned, cap_owned;
    int64_t owned_bytes;
    hx_cpu_pool *pool;               /* borrowed or owned (own_pool) */
    int own_pool;
};

void hx_llama_options_init(hx_llama_options *opt)
{
    *opt = (hx_llama_options){0, 0, 0, NULL, 0, 1};
}

const hx_model *hx_llama_config(const hx_llama *m)
{
    return &m->cfg;
}

int hx_llama_first_layer(const hx_llama *m)
{
    return m->first_layer;
}

int hx_llama_num_layers(const hx_llama *m)
{
    return m->num_layers;
}

int hx_llama_has_embedding(const hx_llama *m)
{
    return m->has_embedding;
}

int hx_llama_has_head(const hx_llama *m)
{
    return m->has_head;
}

int hx_llama_tp_rank(const hx_llama *m)
{
    return m->slice.tp_rank;
}

int hx_llama_tp_size(const hx_llama *m)
{
    return m->slice.tp_size;
}

void hx_llama_slice_of(const hx_llama *m, hx_llama_slice *out)
{
    *out = m->slice;
}

hx_cpu_pool *hx_llama_pool(const hx_llama *m)
{
    return m->pool;
}

int64_t hx_llama_owned_weight_bytes(const hx_llama *m)
{
    return m->owned_bytes;
}

static hx_status check_supported(const hx_model *c, const char *dir, hx_err *err)
{
    const char *why = NULL;
    if (c->arch != HX_MODEL_ARCH_LLAMA && c->arch != HX_MODEL_ARCH_MISTRAL)
        why = "only llama-family models (llama, mistral) run on the CPU backend";
    else if (c->sliding_window_tokens > 0)
        why = "sliding-window attention is not supported";
    else if (c->has_qkv_bias || c->has_o_bias || c->has_mlp_bias)
        why = "attention or MLP biases are not supported";
    else if (c->layer_norm || !c->gated_mlp || c->learned_positions)
        why = "only RMSNorm, SwiGLU and rotary positions are supported";
    else if (c->head_dim % 2 != 0 || c->rope_theta <= 0)
        why = "rotary positions need an even head_dim and a positive rope_theta";
    else if (c->word_embed_dim != c->hidden_size)
        why = "embedding projections are not supported";
    if (why)
        return hx_err_set(err, HX_ENOTSUP, "model '%s' (%s): %s", dir,
                          hx_model_arch_name(c->arch), why);
    return HX_OK;
}

static void fmt_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t o = 0;
    buf[0] = '\0';
    o += (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && o < size; i++)
        o += (size_t)snprintf(buf + o, size - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < size)
        snprintf(buf + o, size - o, "]");
}

/* Registers buf (malloc'ed, `floats` long) as owned by the model; frees it on failure. */
static hx_status own(hx_llama *m, float *buf, int64_t floats, const char *name, hx_err *err)
{
    if (!buf)
        return hx_err_set(err, HX_ENOMEM, "model '%s': tensor '%s': out of memory (%lld bytes)",
                          m->dir, name, (long long)floats * 4);
    if (m->n_owned == m->cap_owned) {
        size_t cap = m->cap_owned ? 2 * m->cap_owned : 32;
        float **n = realloc(m->owned, cap * sizeof *n);
        if (!n) {
            free(buf);
            return hx_err_set(err, HX_ENOMEM, "model '%s': out of memory", m->dir);
        }
        m->owned = n;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = buf;
    m->owned_bytes += floats * (int64_t)sizeof *buf;
    return HX_OK;
}

/*
 * Finds `name`, checks its dtype and its full shape (rows, cols; cols 0 for
 * a vector) and returns the fp32 data of the part [row0, row0 + n_rows) x
 * [col0, col0 + n_cols) as a dense [n_rows][n_cols] array (n_cols = 1 and
 * col0 = 0 for a vector): in place for aligned F32 when the part is whole
 * rows, else copied (converted) into a buffer the model owns, for the part
 * only. The caller passes a part within the shape.
 */
static hx_status get_tensor_part(hx_llama *m, const char *name, int64_t rows, int64_t cols,
                                 int64_t row0, int64_t n_rows, int64_t col0, int64_t n_cols,
                                 const float **out, hx_err *err)
{
    hx_safetensors_tensor t;
    hx_status st = hx_safetensors_index_find(m->weights, name, &t, err);
    if (st != HX_OK)
        return st;
    if (t.dtype != HX_SAFETENSORS_F32 && t.dtype != HX_SAFETENSORS_BF16 &&
        t.dtype != HX_SAFETENSORS_F16)
        return hx_err_set(err, HX_ENOTSUP, "model '%s': tensor '%s': dtype %s (expected F32, "
                          "BF16 or F16)",
                          m->dir, name, hx_safetensors_dtype_name(t.dtype));
    int64_t want[2] = {rows, cols};
    int want_ndim = cols ? 2 : 1;
    if (t.ndim != want_ndim || t.shape[0] != rows || (cols && t.shape[1] != cols)) {
        char got_s[128], want_s[128];
        fmt_shape(got_s, sizeof got_s, t.ndim, t.shape);
        fmt_shape(want_s, sizeof want_s, want_ndim, want);
        return hx_err_set(err, HX_EPARSE, "model '%s': tensor '%s': shape %s, expected %s",
                          m->dir, name, got_s, want_s);
    }
    const int64_t row_len = cols ? cols : 1;
    const int whole_rows = col0 == 0 && n_cols == row_len;
    if (whole_rows && t.dtype == HX_SAFETENSORS_F32 && ((uintptr_t)t.data % sizeof(float)) == 0) {
        *out = (const float *)t.data + row0 * row_len;
        return HX_OK;
    }
    const int64_t floats = n_rows * n_cols;
    float *buf = malloc((size_t)floats * sizeof *buf);
    if ((st = own(m, buf, floats, name, err)) != HX_OK)
        return st;
    if (whole_rows) {
        st = hx_safetensors_to_f32(&t, row0 * row_len, floats, buf, err);
    } else {
        for (int64_t r = 0; r < n_rows && st == HX_OK; r++)
            st = hx_safetensors_to_f32(&t, (row0 + r) * row_len + col0, n_cols,
                                       buf + r * n_cols, err);
    }
    if (st != HX_OK)
        return st;
    *out = buf;
    return HX_OK;
}

/* The whole tensor (see get_tensor_part). */
static hx_status get_tensor(hx_llama *m, const char *name, int64_t rows, int64_t cols,
                            const float **out, hx_err *err)
{
    return get_tensor_part(m, name, rows, cols, 0, rows, 0, cols ? cols : 1, out, err);
}

static hx_status load_weights(hx_llama *m, hx_err *err)
{
    const hx_model *c = &m->cfg;
    const hx_llama_slice *sl = &m->slice;
    const int64_t h = c->hidden_size, f = c->intermediate_size, v = c->vocab_size;
    const int64_t d = c->head_dim;
    const int64_t q = (int64_t)c->num_heads * d;
    const int64_t kv = (int64_t)c->num_kv_heads * d;
    /* the slice: rows of Wq, Wk, Wv, Wgate, Wup; columns of Wo, Wdown */
    const int64_t q0 = sl->q_head_first * d, nq = sl->q_heads * d;
    const int64_t kv0 = sl->kv_head_first * d, nkv = sl->kv_heads * d;
    const int64_t f0 = sl->ff_first, nf = sl->ff_size;
    char name[128];
    hx_status st;
#define GET(dst, rows, cols, ...)                                                            \
    do {                                                                                     \
        snprintf(name, sizeof name, __VA_ARGS__);                                            \
        if ((st = get_tensor(m, name, rows, cols, &(dst), err)) != HX_OK)                    \
            return st;                                                                       \
    } while (0)
#define GET_ROWS(dst, rows, cols, r0, nr, ...)                                               \
    do {                                                                                     \
        snprintf(name, sizeof name, __VA_ARGS__);                                            \
        if ((st = get_tensor_part(m, name, rows, cols, r0, nr, 0, cols, &(dst), err)) !=     \
            HX_OK)                                                                           \
            return st;                                                                       \
    } while (0)
#define GET_COLS(dst, rows, cols, c0, nc, ...)                                               \
    do {                                                                                     \
        snprintf(name, sizeof name, __VA_ARGS__);                                            \
        if ((st = get_tensor_part(m, name, rows, cols, 0, rows, c0, nc, &(dst), err)) !=     \
            HX_OK)                                                                           \
            return st;                                                                       \
    } while (0)

    if (m->has_embedding)
        GET(m->embed, v, h, "model.embed_tokens.weight");
    for (int i = 0; i < m->num_layers; i++) {
        llama_layer *L = &m->layers[i];
        int l = m->first_layer + i;
        GET(L->attn_norm, h, 0, "model.layers.%d.input_layernorm.weight", l);
        GET_ROWS(L->wq, q, h, q0, nq, "model.layers.%d.self_attn.q_proj.weight", l);
        GET_ROWS(L->wk, kv, h, kv0, nkv, "model.layers.%d.self_attn.k_proj.weight", l);
        GET_ROWS(L->wv, kv, h, kv0, nkv, "model.layers.%d.self_attn.v_proj.weight", l);
        GET_COLS(L->wo, h, q, q0, nq, "model.layers.%d.self_attn.o_proj.weight", l);
        GET(L->ffn_norm, h, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        GET_ROWS(L->w_gate, f, h, f0, nf, "model.layers.%d.mlp.gate_proj.weight", l);
        GET_ROWS(L->w_up, f, h, f0, nf, "model.layers.%d.mlp.up_proj.weight", l);
        GET_COLS(L->w_down, h, f, f0, nf, "model.layers.%d.mlp.down_proj.weight", l);
    }
    if (m->has_head) {
        GET(m->final_norm, h, 0, "model.norm.weight");
        hx_safetensors_tensor probe;
        int has_lm_head = hx_safetensors_index_find(m->weights, "lm_head.weight", &probe,
                                                    NULL) == HX_OK;
        if (has_lm_head || !c->tied_embeddings)
            GET(m->lm_head, v, h, "lm_head.weight");
        else if (m->has_embedding)
            m->lm_head = m->embed; /* tied: the same matrix */
        else
            GET(m->lm_head, v, h, "model.embed_tokens.weight");
    }
#undef GET
#undef GET_ROWS
#undef GET_COLS
    return HX_OK;
}

hx_status hx_llama_slice_plan(const hx_model *c, const char *who, int tp_rank, int tp_size,
                              hx_llama_slice *out, hx_err *err)
{
    const int H = c->num_heads, K = c->num_kv_heads, f = c->intermediate_size;
    if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size)
        return hx_err_set(err, HX_EINVAL,
                          "%s: tensor-parallel rank %d of tp %d (the rank must be in "
                          "[0, tp), tp >= 1)",
                          who, tp_rank, tp_size);
    int kf = 0, kn = K;
    if (tp_size > 1) {
        if (H % tp_size != 0 || (K % tp_size != 0 && tp_size % K != 0))
            return hx_err_set(err, HX_EINVAL,
                              "%s: tp %d does not split its %d attention heads and %d "
                              "KV heads (tp must divide the heads, and divide or be a multiple "
                              "of the KV heads)",
                              who, tp_size, H, K);
        if (f < tp_size)
            return hx_err_set(err, HX_EINVAL,
                              "%s: tp %d exceeds its intermediate size %d", who,
                              tp_size, f);
        hx_status st = hx_kv_rank_heads(K, tp_size, tp_rank, &kf, &kn, err);
        if (st != HX_OK)
            return st;
    }
    const int qn = H / tp_size, qf = tp_rank * qn;
    const int ff0 = (int)((int64_t)tp_rank * f / tp_size);
    const int ff1 = (int)((int64_t)(tp_rank + 1) * f / tp_size);
    *out = (hx_llama_slice){tp_rank, tp_size, qf, qn, kf, kn, ff0, ff1 - ff0};
    return HX_OK;
}

hx_status hx_llama_load(const char *dir, const hx_llama_options *opt, hx_llama **out,
                        hx_err *err)
{
    hx_llama_options defaults;
    if (!opt) {
        hx_llama_options_init(&defaults);
        opt = &defaults;
    }
    hx_status st = HX_OK;
    char *config = NULL;
    hx_llama *m = calloc(1, sizeof *m);
    if (!m)
        return hx_err_set(err, HX_ENOMEM, "model '%s': out of memory", dir);
    m->dir = strdup(dir);
    size_t n = strlen(dir) + 16;
    config = malloc(n);
    if (!m->dir || !config) {
        st = hx_err_set(err, HX_ENOMEM, "model '%s': out of memory", dir);
        goto out_free;
    }
    if (!hx_file_is_dir(dir)) {
        st = hx_err_set(err, HX_ENOENT, "model '%s': not a directory (expected a Hugging Face "
                        "model directory with config.json and *.safetensors)",
                        dir);
        goto out_free;
    }
    snprintf(config, n, "%s/config.json", dir);
    if ((st = hx_model_load_file(config, NULL, &m->cfg, err)) != HX_OK)
        goto out_free;
    if ((st = check_supported(&m->cfg, dir, err)) != HX_OK)
        goto out_free;

    const int total = m->cfg.num_layers;
    m->first_layer = opt->first_layer;
    m->num_layers = opt->num_layers > 0 ? opt->num_layers : total - opt->first_layer;
    if (m->first_layer < 0 || m->num_layers < 1 || m->first_layer + m->num_layers > total) {
        st = hx_err_set(err, HX_EINVAL,
                        "model '%s': layers [%d, %d) are not within the model's %d layers", dir,
                        opt->first_layer, opt->first_layer + m->num_layers, total);
        goto out_free;
    }
    m->has_embedding = m->first_layer == 0;
    m->has_head = m->first_layer + m->num_layers == total;
    char who[64 + 16];
    snprintf(who, sizeof who, "model '%.64s'", dir);
    if ((st = hx_llama_slice_plan(&m->cfg, who, opt->tp_rank, opt->tp_size ? opt->tp_size : 1,
                                  &m->slice, err)) != HX_OK)
        goto out_free;
    m->layers = calloc((size_t)m->num_layers, sizeof *m->layers);
    if (!m->layers) {
        st = hx_err_set(err, HX_ENOMEM, "model '%s': out of memory", dir);
        goto out_free;
    }
    if ((st = hx_safetensors_index_open(dir, &m->weights, err)) != HX_OK)
        goto out_free;
    if ((st = load_weights(m, err)) != HX_OK)
        goto out_free;

    if (opt->pool) {
        m->pool = opt->pool;
    } else {
        if ((st = hx_cpu_pool_new(opt->threads, &m->pool, err)) != HX_OK)
            goto out_free;
        m->own_pool = 1;
    }
    free(config);
    *out = m;
    return HX_OK;
out_free:
    free(config);
    hx_llama_free(m);
    return st;
}

void hx_llama_free(hx_llama *m)
{
    if (!m)
        return;
    if (m->own_pool)
        hx_cpu_pool_free(m->pool);
    for (size_t i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    hx_safetensors_index_free(m->weights);
    free(m->dir);
    free(m);
}

/* ---- state ------------------------------------------------------------------------------- */

struct hx_llama_state {
    const hx_llama *m;     /* borrowed */
    int max_tokens;        /* positions the KV cache holds */
    int max_batch;         /* tokens per call */
    float *k_cache;        /* [layers][kv_heads][max_tokens][head_dim] */
    float *v_cache;        /* [layers][kv_heads][max_tokens][head_dim] */
    hx_llama_rows w;       /* [max_batch] rows of per-token workspaces */
    float *scores;         /* [pool threads][max_tokens]: attention scores */
    float *head_x;         /* [hidden]: normed input of the lm_head */
    float *logits;         /* [vocab] */
};

#define DEFAULT_MAX_BATCH 64

hx_status hx_llama_state_new(const hx_llama *m, int max_tokens, int max_batch_tokens,
                             hx_llama_state **out, hx_err *err)
{
    const hx_model *c = &m->cfg;
    if (max_batch_tokens <= 0)
        max_batch_tokens = DEFAULT_MAX_BATCH;
    if (max_tokens < 1 || max_tokens > c->max_position_tokens)
        return hx_err_set(err, HX_EINVAL,
                          "model '%s': a KV cache of %d tokens is not in [1, %d] (the model's "
                          "max_position_embeddings)",
                          m->dir, max_tokens, c->max_position_tokens);
    if (max_batch_tokens > max_tokens)
        max_batch_tokens = max_tokens;
    hx_llama_state *s = calloc(1, sizeof *s);
    if (!s)
        return hx_err_set(err, HX_ENOMEM, "model '%s': out of memory", m->dir);
    s->m = m;
    s->max_tokens = max_tokens;
    s->max_batch = max_batch_tokens;
    const size_t h = (size_t)c->hidden_size, kv = (size_t)c->num_kv_heads * c->head_dim;
    const size_t cache = (size_t)m->num_layers * kv * (size_t)max_tokens;
    const size_t threads = (size_t)hx_cpu_pool_threads(m->pool);
    s->k_cache = calloc(cache, sizeof(float));
    s->v_cache = calloc(cache, sizeof(float));
    s->scores = malloc(threads * (size_t)max_tokens * sizeof(float));
    s->head_x = malloc(h * sizeof(float));
    s->logits = malloc((size_t)c->vocab_size * sizeof(float));
    if (!s->k_cache || !s->v_cache || hx_llama_rows_init(&s->w, c, max_batch_tokens) != HX_OK ||
        !s->scores || !s->head_x || !s->logits) {
        hx_llama_state_free(s);
        return hx_err_set(err, HX_ENOMEM,
                          "model '%s': out of memory for a state of %d tokens (KV cache %lld "
                          "bytes)",
                          m->dir, max_tokens, (long long)(2 * cache * sizeof(float)));
    }
    *out = s;
    return HX_OK;
}

void hx_llama_state_free(hx_llama_state *s)
{
    if (!s)
        return;
    free(s->k_cache);
    free(s->v_cache);
    hx_llama_rows_release(&s->w);
    free(s->scores);
    free(s->head_x);
    free(s->logits);
    free(s);
}

int hx_llama_state_max_tokens(const hx_llama_state *s)
{
    return s->max_tokens;
}

int hx_llama_state_max_batch_tokens(const hx_llama_state *s)
{
    return s->max_batch;
}

int64_t hx_llama_state_kv_bytes(const hx_llama_state *s)
{
    const hx_model *c = &s->m->cfg;
    return 2 * (int64_t)s->m->num_layers * c->num_kv_heads * s->max_tokens * c->head_dim *
           (int64_t)sizeof(float);
}

/* HX_EINVAL for a TP slice: its partial sums need the batch engine's all-reduce. */
static hx_status need_unsliced(const hx_llama *m, const char *what, hx_err *err)
{
    if (m->slice.tp_size == 1)
        return HX_OK;
    return hx_err_set(err, HX_EINVAL,
                      "model '%s': %s cannot run tensor-parallel rank %d of %d (its partial "
                      "sums need the other ranks: use runtime/batch.h with a comm)",
                      m->dir, what, m->slice.tp_rank, m->slice.tp_size);
}

/* ---- the forward pass ------------------------------------------------------------------------ */

hx_status hx_llama_embed(const hx_llama *m, const int *tokens, int n, float *x, hx_err *err)
{
    const hx_model *c = &m->cfg;
    if (!m->has_embedding)
        return hx_err_set(err, HX_EINVAL,
                          "model '%s': this stage (layers %d-%d) has no embedding", m->dir,
                          m->first_layer, m->first_layer + m->num_layers - 1);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return hx_err_set(err, HX_EINVAL,
                              "token %d at index %d is outside the vocabulary of %d", tokens[t],
                              t, c->vocab_size);
        memcpy(x + (size_t)t * c->hidden_size,
               m->embed + (size_t)tokens[t] * c->hidden_size,
               (size_t)c->hidden_size * sizeof *x);
    }
    return HX_OK;
}

hx_status hx_llama_layers(const hx_llama *m, hx_llama_state *s, float *x, int n, int pos,
                          hx_err *err)
{
    const hx_model *c = &m->cfg;
    if (m->slice.tp_size > 1)
        return need_unsliced(m, "hx_llama_layers", err);
    if (n < 1 || n > s->max_batch)
        return hx_err_set(err, HX_ERANGE, "model '%s': %d tokens in one call (1 to %d)", m->dir,
                          n, s->max_batch);
    if (pos < 0 || pos + n > s->max_tokens)
        return hx_err_set(err, HX_ERANGE,
                          "model '%s': positions %d-%d are beyond the KV cache of %d tokens",
                          m->dir, pos, pos + n - 1, s->max_tokens);
    const int h = c->hidden_size, d = c->head_dim, half = d / 2;
    const int H = c->num_heads, K = c->num_kv_heads, f = c->intermediate_size;
    const int T = s->max_tokens;
    const float eps = (float)c->norm_eps;
    hx_cpu_pool *pool = m->pool;

    for (int t = 0; t < n; t++)
        hx_cpu_rope_angles(s->w.rope_cos + (size_t)t * half, s->w.rope_sin + (size_t)t * half, d,
                           pos + t, c->rope_theta);

    for (int l = 0; l < m->num_layers; l++) {
        const llama_layer *L = &m->layers[l];
        float *k_cache = s->k_cache + (size_t)l * K * T * d; /* [kv_heads][max_tokens][d] */
        float *v_cache = s->v_cache + (size_t)l * K * T * d;

        /* attention block: x += Wo attention(rope(Wq h), rope(Wk h), Wv h), h = norm(x) */
        for (int t = 0; t < n; t++)
            hx_cpu_rmsnorm(s->w.xb + (size_t)t * h, x + (size_t)t * h, L->attn_norm, h, eps);
        const hx_cpu_linear qkv[3] = {{s->w.q, L->wq, H * d}, {s->w.k, L->wk, K * d},
                                      {s->w.v, L->wv, K * d}};
        hx_cpu_matmul_many(pool, s->w.xb, n, h, qkv, 3);
        for (int t = 0; t < n; t++) {
            const float *cs = s->w.rope_cos + (size_t)t * half, *sn = s->w.rope_sin + (size_t)t * half;
            hx_cpu_rope(s->w.q + (size_t)t * H * d, H, d, cs, sn);
            hx_cpu_rope(s->w.k + (size_t)t * K * d, K, d, cs, sn);
            for (int kh = 0; kh < K; kh++) {
                size_t at = ((size_t)kh * T + (size_t)(pos + t)) * d;
                memcpy(k_cache + at, s->w.k + ((size_t)t * K + kh) * d, (size_t)d * sizeof(float));
                memcpy(v_cache + at, s->w.v + ((size_t)t * K + kh) * d, (size_t)d * sizeof(float));
            }
        }
        hx_cpu_attention(pool, s->w.att, s->w.q, k_cache, v_cache, n, pos, H, K, d, T, s->scores);
        hx_cpu_matmul(pool, s->w.xb2, s->w.att, L->wo, n, H * d, h);
        hx_cpu_add(x, s->w.xb2, n * h);

        hx_llama_mlp(pool, L, x, n, h, f, eps, s->w.xb, s->w.xb2, s->w.gate, s->w.up);
    }
    return HX_OK;
}

hx_status hx_llama_head(const hx_llama *m, hx_llama_state *s, const float *x, float *logits,
                        hx_err *err)
{
    const hx_model *c = &m->cfg;
    if (!m->has_head)
        return hx_err_set(err, HX_EINVAL, "model '%s': this stage (layers %d-%d) has no head",
                          m->dir, m->first_layer, m->first_layer + m->num_layers - 1);
    hx_cpu_rmsnorm(s->head_x, x, m->final_norm, c->hidden_size, (float)c->norm_eps);
    hx_cpu_matmul(m->pool, logits, s->head_x, m->lm_head, 1, c->hidden_size, c->vocab_size);
    return HX_OK;
}

static hx_status need_whole_model(const hx_llama *m, hx_err *err)
{
    if (m->slice.tp_size > 1)
        return need_unsliced(m, "the single-sequence pass", err);
    if (m->has_embedding && m->has_head)
        return HX_OK;
    return hx_err_set(err, HX_EINVAL,
                      "model '%s': this stage holds layers %d-%d of %d; running tokens to "
                      "logits needs the whole model",
                      m->dir, m->first_layer, m->first_layer + m->num_layers - 1,
                      m->cfg.num_layers);
}

hx_status hx_llama_prefill(const hx_llama *m, hx_llama_state *s, const int *tokens, int n,
                           int pos, const float **logits, hx_err *err)
{
    hx_status st = need_whole_model(m, err);
    if (st != HX_OK)
        return st;
    if (n < 1)
        return hx_err_set(err, HX_EINVAL, "model '%s': nothing to prefill", m->dir);
    if (pos < 0 || pos + n > s->max_tokens)
        return hx_err_set(err, HX_ERANGE,
                          "model '%s': positions %d-%d are beyond the KV cache of %d tokens",
                          m->dir, pos, pos + n - 1, s->max_tokens);
    const int h = m->cfg.hidden_size;
    int done = 0, last = 0;
    while (done < n) {
        int chunk = n - done < s->max_batch ? n - done : s->max_batch;
        if ((st = hx_llama_embed(m, tokens + done, chunk, s->w.x, err)) != HX_OK ||
            (st = hx_llama_layers(m, s, s->w.x, chunk, pos + done, err)) != HX_OK)
            return st;
        last = chunk - 1;
        done += chunk;
    }
    if ((st = hx_llama_head(m, s, s->w.x + (size_t)last * h, s->logits, err)) != HX_OK)
        return st;
    *logits = s->logits;
    return HX_OK;
}

hx_status hx_llama_forward(const hx_llama *m, hx_llama_state *s, int token, int pos,
                           const float **logits, hx_err *err)
{
    return hx_llama_prefill(m, s, &token, 1, pos, logits, err);
}

/* ---- sampling ------------------------------------------------------------------------------- */

typedef struct prob_index {
    float prob;
    int index;
} prob_index;

struct hx_llama_sampler {
    int vocab;
    float temperature;
    float top_p;
    uint64_t rng;        /* xorshift64* state, never 0 */
    float *probs;        /* [vocab] */
    prob_index *sorted;  /* [vocab]: top-p candidates */
};

hx_status hx_llama_sampler_new(int vocab, float temperature, float top_p, uint64_t seed,
                               hx_llama_sampler **out, hx_err *err)
{
    if (vocab < 1)
        return hx_err_set(err, HX_EINVAL, "sampler: vocab %d", vocab);
    if (!(temperature >= 0) || !isfinite(temperature))
        return hx_err_set(err, HX_EINVAL, "sampler: temperature %g is not a number >= 0",
                          (double)temperature);
    if (!(top_p >= 0 && top_p <= 1))
        return hx_err_set(err, HX_EINVAL, "sampler: top_p %g is not in [0, 1]", (double)top_p);
    hx_llama_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return hx_err_set(err, HX_ENOMEM, "sampler: out of memory");
    s->vocab = vocab;
    s->temperature = temperature;
    s->top_p = top_p;
    /* splitmix64 of the seed: any seed (0 included) gives a good non-zero state */
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    s->rng = z ? z : 0x2545f4914f6cdd1dull;
    s->probs = malloc((size_t)vocab * sizeof *s->probs);
    s->sorted = malloc((size_t)vocab * sizeof *s->sorted);
    if (!s->probs || !s->sorted) {
        hx_llama_sampler_free(s);
        return hx_err_set(err, HX_ENOMEM, "sampler: out of memory");
    }
    *out = s;
    return HX_OK;
}

void hx_llama_sampler_free(hx_llama_sampler *s)
{
    if (!s)
        return;
    free(s->probs);
    free(s->sorted);
    free(s);
}

/* A uniform float in [0, 1). */
static float next_uniform(hx_llama_sampler *s)
{
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    uint64_t r = s->rng * 0x2545f4914f6cdd1dull;
    return (float)(r >> 40) * (1.0f / 16777216.0f);
}

int hx_llama_argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* a comes before b: higher probability first, then lower index */
static int before(prob_index a, prob_index b)
{
    return a.prob > b.prob || (a.prob == b.prob && a.index < b.index);
}

static void sift_down(prob_index *h, int root, int n)
{
    for (;;) {
        int child = 2 * root + 1;
        if (child >= n)
            return;
        /* a heap with the LAST element in order at the root */
        if (child + 1 < n && before(h[child], h[child + 1]))
            child++;
        if (!before(h[root], h[child]))
            return;
        prob_index t = h[root];
        h[root] = h[child];
        h[child] = t;
        root = child;
    }
}

/* Sorts in place (heapsort: no allocation, unlike qsort, on this per-token path). */
static void sort_by_prob(prob_index *a, int n)
{
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_down(a, i, n);
    for (int end = n - 1; end > 0; end--) {
        prob_index t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

int hx_llama_sample(hx_llama_sampler *s, const float *logits)
{
    const int n = s->vocab;
    if (s->temperature == 0.0f)
        return hx_llama_argmax(logits, n);
    for (int i = 0; i < n; i++)
        s->probs[i] = logits[i] / s->temperature;
    hx_cpu_softmax(s->probs, n);
    float r = next_uniform(s);

    if (s->top_p <= 0.0f || s->top_p >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < n; i++) {
            cdf += s->probs[i];
            if (r < cdf)
                return i;
        }
        return n - 1; /* rounding */
    }

    /* top-p: tokens below (1 - p) / (n - 1) cannot be in the nucleus; sort the rest */
    const float cutoff = (1.0f - s->top_p) / (float)(n > 1 ? n - 1 : 1);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (s->probs[i] >= cutoff)
            s->sorted[m++] = (prob_index){s->probs[i], i};
    sort_by_prob(s->sorted, m);
    float cum = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) {
        cum += s->sorted[i].prob;
        if (cum > s->top_p) {
            last = i;
            break;
        }
    }
    float target = r * cum, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += s->sorted[i].prob;
        if (target < cdf)
            return s->sorted[i].index;
    }
    return s->sorted[last].index;
}

hx_status hx_llama_generate(const hx_llama *m, hx_llama_state *s, hx_llama_sampler *sampler,
                            const int *prompt, int n_prompt, int max_new, int eos_id, int *out,
                            int *n_out, hx_err *err)
{
    *n_out = 0;
    if (m->slice.tp_size > 1)
        return need_unsliced(m, "hx_llama_generate", err);
    if (max_new <= 0)
        return HX_OK;
    if (n_prompt + max_new - 1 > s->max_tokens)
        return hx_err_set(err, HX_ERANGE,
                          "model '%s': %d prompt tokens + %d new need %d positions; the KV "
                          "cache holds %d",
                          m->dir, n_prompt, max_new, n_prompt + max_new - 1, s->max_tokens);
    const float *logits = NULL;
    hx_status st = hx_llama_prefill(m, s, prompt, n_prompt, 0, &logits, err);
    if (st != HX_OK)
        return st;
    for (int i = 0; i < max_new; i++) {
        int token = hx_llama_sample(sampler, logits);
        out[(*n_out)++] = token;
        if (token == eos_id || i + 1 == max_new)
            break;
        if ((st = hx_llama_forward(m, s, token, n_prompt + i, &logits, err)) != HX_OK)
            return st;
    }
    return HX_OK;
}

/* ------------------------------------------------------------------------- */
/* Read access to the weights and the KV cache (llama_weights.h)              */

hx_status hx_llama_weights_layer(const hx_llama *m, int layer, hx_llama_layer_weights *out,
                                 hx_err *err)
{
    if (layer < 0 || layer >= m->num_layers)
        return hx_err_set(err, HX_ERANGE, "model '%s': layer %d is not in this stage's 0-%d",
                          m->dir, layer, m->num_layers - 1);
    *out = m->layers[layer];
    return HX_OK;
}

const float *hx_llama_weights_embed(const hx_llama *m)
{
    return m->has_embedding ? m->embed : NULL;
}

const float *hx_llama_weights_final_norm(const hx_llama *m)
{
    return m->has_head ? m->final_norm : NULL;
}

const float *hx_llama_weights_lm_head(const hx_llama *m)
{
    return m->has_head ? m->lm_head : NULL;
}

void hx_llama_state_kv(const hx_llama_state *s, const float **k, const float **v)
{
    *k = s->k_cache;
    *v = s->v_cache;
}

void hx_llama_mlp_out(hx_cpu_pool *pool, const hx_llama_layer_weights *W, const float *x,
                      int rows, int h, int f, float eps, float *xb, float *out, float *gate,
                      float *up)
{
    /* out = Wdown (silu(Wgate h) * Wup h), h = norm(x) */
    for (int r = 0; r < rows; r++)
        hx_cpu_rmsnorm(xb + (size_t)r * h, x + (size_t)r * h, W->ffn_norm, h, eps);
    const hx_cpu_linear gate_up[2] = {{gate, W->w_gate, f}, {up, W->w_up, f}};
    hx_cpu_matmul_many(pool, xb, rows, h, gate_up, 2);
    hx_cpu_swiglu(gate, gate, up, rows * f);
    hx_cpu_matmul(pool, out, gate, W->w_down, rows, f, h);
}

void hx_llama_mlp(hx_cpu_pool *pool, const hx_llama_layer_weights *W, float *x, int rows, int h,
                  int f, float eps, float *xb, float *xb2, float *gate, float *up)
{
    /* x += Wdown (silu(Wgate h) * Wup h), h = norm(x) */
    hx_llama_mlp_out(pool, W, x, rows, h, f, eps, xb, xb2, gate, up);
    hx_cpu_add(x, xb2, rows * h);
}

hx_status hx_llama_rows_init(hx_llama_rows *w, const hx_model *c, int max_rows)
{
    memset(w, 0, sizeof *w);
    const size_t R = (size_t)max_rows, h = (size_t)c->hidden_size, d = (size_t)c->head_dim;
    const size_t q = (size_t)c->num_heads * d, kv = (size_t)c->num_kv_heads * d;
    const size_t f = (size_t)c->intermediate_size;
    w->max_rows = max_rows;
    w->x = malloc(R * h * sizeof(float));
    w->xb = malloc(R * h * sizeof(float));
    w->xb2 = malloc(R * h * sizeof(float));
    w->q = malloc(R * q * sizeof(float));
    w->k = malloc(R * kv * sizeof(float));
    w->v = malloc(R * kv * sizeof(float));
    w->att = malloc(R * q * sizeof(float));
    w->gate = malloc(R * f * sizeof(float));
    w->up = malloc(R * f * sizeof(float));
    w->rope_cos = malloc(R * (d / 2) * sizeof(float));
    w->rope_sin = malloc(R * (d / 2) * sizeof(float));
    if (!w->x || !w->xb || !w->xb2 || !w->q || !w->k || !w->v || !w->att || !w->gate ||
        !w->up || !w->rope_cos || !w->rope_sin) {
        hx_llama_rows_release(w);
        return HX_ENOMEM;
    }
    return HX_OK;
}

void hx_llama_rows_release(hx_llama_rows *w)
{
    if (!w)
        return;
    free(w->x);
    free(w->xb);
    free(w->xb2);
    free(w->q);
    free(w->k);
    free(w->v);
    free(w->att);
    free(w->gate);
    free(w->up);
    free(w->rope_cos);
    free(w->rope_sin);
    memset(w, 0, sizeof *w);
}
