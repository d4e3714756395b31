/*
 * batch.c - continuous batching over a paged KV cache.
 */
#define _POSIX_C_SOURCE 200809L
#include "runtime/batch.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/paged.h"
#include "runtime/llama_weights.h"

/* One request in the engine. */
typedef struct batch_seq {
    uint64_t id;
    int kv;                     /* its sequence in the cache */
    int *prompt;                /* owned, [n_prompt]; NULL when prefilled elsewhere */
    int n_prompt;
    int fed;                    /* positions whose KV is in the cache */
    int last;                   /* the last generated token: the next one fed */
    int n_generated;
    int max_new, eos_id;
    int reserved_blocks;        /* blocks it may hold at most */
    int hold_kv;                /* keep the blocks after the last token */
    int done;                   /* held after its last token: takes no rows */
    hx_llama_sampler *sampler;  /* owned; NULL when greedy */
} batch_seq;

/* A sequence's share of a step. */
typedef struct step_seq {
    int slot;
    int row0, n;                /* rows row0 .. row0 + n - 1, positions pos0 .. pos0 + n - 1 */
    int pos0;
    int emits;                  /* its last row's logits give a token */
    const int *blocks;          /* its block table, inside tables */
} step_seq;

struct hx_batch {
    const hx_llama *m;                  /* borrowed */
    const hx_model *cfg;                /* borrowed from m: the whole model's */
    hx_cpu_pool *pool;                  /* borrowed from m */
    hx_llama_slice slice;               /* the TP slice m holds */
    int has_embedding, has_head;        /* first stage, last stage */
    hx_batch_comm comm;                 /* callbacks (borrowed); all NULL without a comm */
    hx_batch_site site;                 /* "batch", the layers, the rank and the stages */
    hx_llama_layer_weights *layers;     /* owned, [layers] (the pointers are m's) */
    const float *embed;                 /* [vocab][hidden], m's */
    const float *final_norm;            /* [hidden], m's */
    const float *lm_head;               /* [vocab][hidden], m's */
    hx_batch_options opt;
    hx_kvcache *kv;                     /* owned */

    batch_seq *seqs;                    /* owned, [max_seqs] slots */
    int *used;                          /* owned, [max_seqs]: slot in use */
    int *order;                         /* owned, [max_seqs]: live slots, oldest first */
    int n_live;
    int reserved_total;                 /* sum of reserved_blocks of live sequences */

    /* workspaces for R = max_step_tokens rows, S = max_seqs sequences */
    int *row_token;                     /* [R] */
    int *row_pos;                       /* [R] */
    hx_llama_rows w;                    /* [R] rows of per-token workspaces */
    float *scores;                      /* [pool threads][max_seq_tokens] */
    float *head_x;                      /* [S][hidden]: normed rows that give logits */
    float *logits;                      /* [S][vocab] */
    int *tables;                        /* [max_blocks]: this step's block tables */
    step_seq *sel;                      /* [S] */
    hx_cpu_paged_seq *pseqs;            /* [S] */
    hx_batch_event *events;             /* [S] */
    int *step_tokens;                   /* [S]: the tokens of this step, in event order */
    unsigned char *covered;             /* [layers][kv_heads]: import coverage */
};

void hx_batch_options_init(hx_batch_options *opt)
{
    *opt = (hx_batch_options){16, 64, 16, 0, 0};
}

const hx_kvcache *hx_batch_kvcache(const hx_batch *b)
{
    return b->kv;
}

int hx_batch_seq_count(const hx_batch *b)
{
    return b->n_live;
}

int hx_batch_free_blocks(const hx_batch *b)
{
    return hx_kvcache_max_blocks(b->kv) - b->reserved_total;
}

hx_status hx_batch_new(const hx_llama *m, const hx_batch_options *opt_in,
                       const hx_batch_comm *comm, hx_batch **out, hx_err *err)
{
    const hx_model *c = hx_llama_config(m);
    hx_batch_options opt;
    if (opt_in)
        opt = *opt_in;
    else
        hx_batch_options_init(&opt);
    hx_llama_slice slice;
    hx_llama_slice_of(m, &slice);
    const int first = hx_llama_has_embedding(m), last = hx_llama_has_head(m);
    const hx_batch_site site = {.engine = "batch",
                                .layer_first = hx_llama_first_layer(m),
                                .num_layers = hx_llama_num_layers(m),
                                .tp_rank = slice.tp_rank,
                                .tp_size = slice.tp_size,
                                .first_stage = first,
                                .last_stage = last};
    const char *missing = hx_batch_comm_missing(&site, comm, 0);
    if (missing)
        return hx_err_set(err, HX_EINVAL,
                          "batch engine: the model holds layers %d-%d of %d at TP rank %d of %d "
                          "(not the whole model at TP 1): the engine needs a comm with %s",
                          hx_llama_first_layer(m),
                          hx_llama_first_layer(m) + hx_llama_num_layers(m) - 1, c->num_layers,
                          slice.tp_rank, slice.tp_size, missing);
    if (opt.max_seq_tokens <= 0)
        opt.max_seq_tokens = c->max_position_tokens < 4096 ? c->max_position_tokens : 4096;
    if (opt.max_seqs < 1 || opt.max_step_tokens < 1 || opt.block_tokens < 1 ||
        opt.max_blocks < 0)
        return hx_err_set(err, HX_EINVAL,
                          "batch engine: max_seqs %d, max_step_tokens %d, block_tokens %d, "
                          "max_blocks %d (each must be at least 1)",
                          opt.max_seqs, opt.max_step_tokens, opt.block_tokens, opt.max_blocks);
    if (opt.max_step_tokens < opt.max_seqs)
        return hx_err_set(err, HX_EINVAL,
                          "batch engine: max_step_tokens %d is below max_seqs %d (every "
                          "decoding sequence takes a row each step)",
                          opt.max_step_tokens, opt.max_seqs);
    if (opt.max_seq_tokens > c->max_position_tokens)
        return hx_err_set(err, HX_EINVAL,
                          "batch engine: max_seq_tokens %d exceeds the model's "
                          "max_position_embeddings %d",
                          opt.max_seq_tokens, c->max_position_tokens);
    const int64_t per_seq = ((int64_t)opt.max_seq_tokens + opt.block_tokens - 1) /
                            opt.block_tokens;
    if (opt.max_blocks == 0) {
        int64_t nb = per_seq * opt.max_seqs;
        if (nb > 1 << 30)
            return hx_err_set(err, HX_ERANGE,
                              "batch engine: %d sequences of %d tokens need %lld blocks; set "
                              "max_blocks",
                              opt.max_seqs, opt.max_seq_tokens, (long long)nb);
        opt.max_blocks = (int)nb;
    }

    hx_status st;
    hx_batch *b = calloc(1, sizeof *b);
    if (!b)
        return hx_err_set(err, HX_ENOMEM, "batch engine: out of memory");
    b->m = m;
    b->cfg = c;
    b->pool = hx_llama_pool(m);
    b->slice = slice;
    b->has_embedding = first;
    b->has_head = last;
    if (comm)
        b->comm = *comm;
    b->site = site;
    b->opt = opt;
    b->embed = hx_llama_weights_embed(m);
    b->final_norm = hx_llama_weights_final_norm(m);
    b->lm_head = hx_llama_weights_lm_head(m);
    const int L = hx_llama_num_layers(m);
    b->layers = calloc((size_t)L, sizeof *b->layers);
    if (!b->layers) {
        st = hx_err_set(err, HX_ENOMEM, "batch engine: out of memory");
        goto out_free;
    }
    for (int l = 0; l < L; l++)
        if ((st = hx_llama_weights_layer(m, l, &b->layers[l], err)) != HX_OK)
            goto out_free;
    if ((st = hx_kvcache_new(L, slice.kv_heads, c->head_dim, opt.block_tokens, opt.max_blocks,
                             &b->kv, err)) != HX_OK ||
        (st = hx_kvcache_set_origin(b->kv, hx_llama_first_layer(m), slice.kv_head_first,
                                    err)) != HX_OK)
        goto out_free;
    /* the workspaces of the slice: its heads and intermediate rows */
    hx_model shape = *c;
    shape.num_heads = slice.q_heads;
    shape.num_kv_heads = slice.kv_heads;
    shape.intermediate_size = slice.ff_size;

    const size_t R = (size_t)opt.max_step_tokens, S = (size_t)opt.max_seqs;
    const size_t h = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    const size_t threads = (size_t)hx_cpu_pool_threads(b->pool);
    b->seqs = calloc(S, sizeof *b->seqs);
    b->used = calloc(S, sizeof *b->used);
    b->order = calloc(S, sizeof *b->order);
    b->row_token = malloc(R * sizeof *b->row_token);
    b->row_pos = malloc(R * sizeof *b->row_pos);
    b->scores = malloc(threads * (size_t)opt.max_seq_tokens * sizeof(float));
    if (last) { /* only the last stage computes logits */
        b->head_x = malloc(S * h * sizeof(float));
        b->logits = malloc(S * V * sizeof(float));
    }
    b->tables = malloc((size_t)opt.max_blocks * sizeof *b->tables);
    b->sel = malloc(S * sizeof *b->sel);
    b->pseqs = malloc(S * sizeof *b->pseqs);
    b->events = malloc(S * sizeof *b->events);
    b->step_tokens = malloc(S * sizeof *b->step_tokens);
    b->covered = malloc((size_t)L * (size_t)slice.kv_heads);
    if (!b->seqs || !b->used || !b->order || !b->row_token || !b->row_pos ||
        hx_llama_rows_init(&b->w, &shape, opt.max_step_tokens) != HX_OK || !b->scores ||
        (last && (!b->head_x || !b->logits)) || !b->tables || !b->sel ||
        !b->pseqs || !b->events || !b->step_tokens || !b->covered) {
        st = hx_err_set(err, HX_ENOMEM,
                        "batch engine: out of memory for workspaces of %d rows, %d sequences",
                        opt.max_step_tokens, opt.max_seqs);
        goto out_free;
    }
    *out = b;
    return HX_OK;
out_free:
    hx_batch_free(b);
    return st;
}

static void release_seq(hx_batch *b, int slot)
{
    batch_seq *s = &b->seqs[slot];
    hx_kvcache_free_seq(b->kv, s->kv);
    free(s->prompt);
    hx_llama_sampler_free(s->sampler);
    b->reserved_total -= s->reserved_blocks;
    memset(s, 0, sizeof *s);
    b->used[slot] = 0;
    for (int i = 0; i < b->n_live; i++)
        if (b->order[i] == slot) {
            memmove(b->order + i, b->order + i + 1, (size_t)(b->n_live - i - 1) * sizeof(int));
            break;
        }
    b->n_live--;
}

void hx_batch_free(hx_batch *b)
{
    if (!b)
        return;
    if (b->seqs && b->used)
        for (int i = 0; i < b->opt.max_seqs; i++)
            if (b->used[i]) {
                free(b->seqs[i].prompt);
                hx_llama_sampler_free(b->seqs[i].sampler);
            }
    hx_kvcache_free(b->kv);
    free(b->layers);
    free(b->seqs);
    free(b->used);
    free(b->order);
    free(b->row_token);
    free(b->row_pos);
    hx_llama_rows_release(&b->w);
    free(b->scores);
    free(b->head_x);
    free(b->logits);
    free(b->tables);
    free(b->sel);
    free(b->pseqs);
    free(b->events);
    free(b->step_tokens);
    free(b->covered);
    free(b);
}

/* ---- admission ------------------------------------------------------------------------------- */

/* Blocks a request reserves: its positions are n_prompt + max_new - 1. */
static int64_t blocks_for_request(const hx_batch *b, int n_prompt, int max_new)
{
    int64_t positions = (int64_t)n_prompt + max_new - 1;
    return (positions + b->opt.block_tokens - 1) / b->opt.block_tokens;
}

int hx_batch_can_admit(const hx_batch *b, int n_prompt, int max_new_tokens)
{
    if (n_prompt < 1 || max_new_tokens < 1 ||
        (int64_t)n_prompt + max_new_tokens - 1 > b->opt.max_seq_tokens)
        return 0;
    return b->n_live < b->opt.max_seqs &&
           blocks_for_request(b, n_prompt, max_new_tokens) <= hx_batch_free_blocks(b);
}

/* Checks a request and takes a slot and a cache sequence for it; *slot_out on success. */
static hx_status admit(hx_batch *b, const hx_batch_request *r, int *slot_out, hx_err *err)
{
    const int vocab = b->cfg->vocab_size;
    hx_status st = hx_batch_check_request("batch", r, vocab, b->opt.max_seq_tokens, err);
    if (st != HX_OK)
        return st;
    for (int i = 0; i < b->n_live; i++)
        if (b->seqs[b->order[i]].id == r->id)
            return hx_err_set(err, HX_EINVAL, "batch: request %llu is already in the engine",
                              (unsigned long long)r->id);
    if (b->n_live == b->opt.max_seqs)
        return hx_err_set(err, HX_ENOMEM,
                          "batch: request %llu: all %d sequence slots are taken",
                          (unsigned long long)r->id, b->opt.max_seqs);
    const int64_t need = blocks_for_request(b, r->n_prompt, r->max_new_tokens);
    if (need > hx_batch_free_blocks(b))
        return hx_err_set(err, HX_ENOMEM,
                          "batch: request %llu: %lld KV blocks needed, %d unreserved of %d",
                          (unsigned long long)r->id, (long long)need, hx_batch_free_blocks(b),
                          hx_kvcache_max_blocks(b->kv));

    hx_llama_sampler *sampler = NULL;
    if (r->temperature != 0.0f &&
        (st = hx_llama_sampler_new(vocab, r->temperature, r->top_p, r->seed, &sampler, err)) !=
            HX_OK)
        return st;
    int slot = 0;
    while (b->used[slot])
        slot++;
    int kv = -1;
    if ((st = hx_kvcache_alloc_seq(b->kv, &kv, err)) != HX_OK) {
        hx_llama_sampler_free(sampler);
        return st;
    }
    b->seqs[slot] = (batch_seq){.id = r->id,
                                .kv = kv,
                                .n_prompt = r->n_prompt,
                                .max_new = r->max_new_tokens,
                                .eos_id = r->eos_id,
                                .reserved_blocks = (int)need,
                                .hold_kv = r->hold_kv != 0,
                                .sampler = sampler};
    b->used[slot] = 1;
    b->order[b->n_live++] = slot;
    b->reserved_total += (int)need;
    *slot_out = slot;
    return HX_OK;
}

hx_status hx_batch_add(hx_batch *b, const hx_batch_request *req, hx_err *err)
{
    if (!req->prompt)
        return hx_err_set(err, HX_EINVAL, "batch: request %llu has no prompt",
                          (unsigned long long)req->id);
    int slot = -1;
    hx_status st = admit(b, req, &slot, err);
    if (st != HX_OK)
        return st;
    batch_seq *s = &b->seqs[slot];
    s->prompt = malloc((size_t)req->n_prompt * sizeof *s->prompt);
    if (!s->prompt) {
        release_seq(b, slot);
        return hx_err_set(err, HX_ENOMEM, "batch: request %llu: out of memory",
                          (unsigned long long)req->id);
    }
    memcpy(s->prompt, req->prompt, (size_t)req->n_prompt * sizeof *s->prompt);
    return HX_OK;
}

hx_status hx_batch_add_prefilled(hx_batch *b, const hx_batch_request *req, int first_token,
                                 const hx_kv_segment *segs, int n_segs, hx_err *err)
{
    const int L = hx_kvcache_layers(b->kv), K = hx_kvcache_kv_heads(b->kv);
    const int l0 = hx_kvcache_layer_first(b->kv), k0 = hx_kvcache_head_first(b->kv);
    hx_status st = hx_batch_check_prefilled("batch", req, first_token, n_segs,
                                            b->cfg->vocab_size, err);
    if (st != HX_OK)
        return st;
    hx_batch_request r = *req;
    r.prompt = NULL;
    int slot = -1;
    if ((st = admit(b, &r, &slot, err)) != HX_OK)
        return st;
    batch_seq *s = &b->seqs[slot];
    memset(b->covered, 0, (size_t)L * (size_t)K);
    for (int i = 0; i < n_segs; i++) {
        const hx_kv_segment *g = &segs[i];
        if (g->token_first != 0 || g->tokens != req->n_prompt) {
            st = hx_err_set(err, HX_EINVAL,
                            "batch: request %llu: segment %d holds positions %d-%lld; the "
                            "prompt's are 0-%d",
                            (unsigned long long)req->id, i, g->token_first,
                            (long long)g->token_first + g->tokens - 1, req->n_prompt - 1);
            goto out_release;
        }
        if ((st = hx_kvcache_unpack_parsed(b->kv, s->kv, g, err)) != HX_OK)
            goto out_release;
        /* within the cache (unpack checked): cache-local indices */
        for (int l = 0; l < g->num_layers; l++)
            memset(b->covered + (size_t)(g->layer_first - l0 + l) * K + (g->head_first - k0), 1,
                   (size_t)g->num_heads);
    }
    for (int i = 0; i < L * K; i++)
        if (!b->covered[i]) {
            st = hx_err_set(err, HX_EINVAL,
                            "batch: request %llu: the segments leave layer %d, KV head %d "
                            "uncovered",
                            (unsigned long long)req->id, l0 + i / K, k0 + i % K);
            goto out_release;
        }
    s->fed = req->n_prompt;
    s->last = first_token;
    s->n_generated = 1;
    return HX_OK;
out_release:
    release_seq(b, slot);
    return st;
}

int hx_batch_seq_kv(const hx_batch *b, uint64_t id)
{
    for (int i = 0; i < b->n_live; i++)
        if (b->seqs[b->order[i]].id == id)
            return b->seqs[b->order[i]].kv;
    return -1;
}

hx_status hx_batch_remove(hx_batch *b, uint64_t id, hx_err *err)
{
    for (int i = 0; i < b->n_live; i++)
        if (b->seqs[b->order[i]].id == id) {
            release_seq(b, b->order[i]);
            return HX_OK;
        }
    return hx_err_set(err, HX_ENOENT, "batch: no request %llu in the engine",
                      (unsigned long long)id);
}

/*
 * hx_llama_argmax's answer (the lowest index of the largest value; NaNs
 * never win, and index 0 when x[0] is NaN) without its loop-carried
 * dependence on x[best], which costs about 10 cycles per element: the
 * maximum first, over 8 independent lanes, then the first index holding it.
 * x: [n], n >= 1.
 */
static int argmax(const float *x, int n)
{
    float lane[8];
    for (int l = 0; l < 8; l++)
        lane[l] = x[0];
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            lane[l] = x[i + l] > lane[l] ? x[i + l] : lane[l];
    float mx = lane[0];
    for (int l = 1; l < 8; l++)
        mx = lane[l] > mx ? lane[l] : mx;
    for (; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (i = 0; i < n; i++)
        if (x[i] == mx)
            return i;
    return 0; /* x[0] is NaN */
}

/* ---- the step -------------------------------------------------------------------------------- */

/* Picks this step's rows: every decoding sequence, then prompt chunks, oldest first. */
static hx_status plan_step(hx_batch *b, int *n_sel_out, int *n_rows_out, hx_err *err)
{
    const int R = b->opt.max_step_tokens;
    int n_sel = 0, rows = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < b->n_live && rows < R; i++) {
            const int slot = b->order[i];
            const batch_seq *s = &b->seqs[slot];
            const int decoding = s->fed >= s->n_prompt;
            if (s->done || decoding != (pass == 0))
                continue;
            int n = decoding ? 1 : s->n_prompt - s->fed;
            if (n > R - rows)
                n = R - rows;
            const int emits = decoding || s->fed + n == s->n_prompt; /* prompt done */
            b->sel[n_sel++] = (step_seq){slot, rows, n, s->fed, emits, NULL};
            for (int t = 0; t < n; t++) {
                b->row_token[rows + t] = decoding ? s->last : s->prompt[s->fed + t];
                b->row_pos[rows + t] = s->fed + t;
            }
            rows += n;
        }
    /* the step's positions: within each reservation, so the blocks are there */
    int used = 0;
    for (int i = 0; i < n_sel; i++) {
        step_seq *q = &b->sel[i];
        const batch_seq *s = &b->seqs[q->slot];
        hx_err inner = {0};
        /* a step that failed may have appended these positions already */
        const int more = q->pos0 + q->n - hx_kvcache_seq_tokens(b->kv, s->kv);
        if (more > 0 && hx_kvcache_append(b->kv, s->kv, more, &inner) != HX_OK)
            return hx_err_set(err, HX_EINTERNAL,
                              "batch: request %llu ran out of reserved KV blocks: %s",
                              (unsigned long long)s->id, inner.msg);
        int nb = hx_kvcache_seq_blocks(b->kv, s->kv, b->tables + used,
                                       hx_kvcache_max_blocks(b->kv) - used);
        q->blocks = b->tables + used;
        b->pseqs[i] = (hx_cpu_paged_seq){q->blocks, q->pos0, q->n, q->row0};
        used += nb;
    }
    *n_sel_out = n_sel;
    *n_rows_out = rows;
    return HX_OK;
}

/*
 * comm->allreduce on partial sums x[0..n), in place; the failure names the
 * layer and the projection.
 */
static hx_status allreduce(hx_batch *b, float *x, size_t n, int layer, const char *what,
                           hx_err *err)
{
    hx_err inner;
    inner.msg[0] = '\0';
    hx_status st = b->comm.allreduce(b->comm.ctx, x, n, &inner);
    if (st == HX_OK)
        return HX_OK;
    return hx_batch_allreduce_failed(&b->site, layer, what, st, &inner, err);
}

/*
 * Runs every layer over the step's rows, in place on b->w.x: [rows][hidden].
 * On a TP slice the o and down projections give partial sums, all-reduced
 * (b->w.xb2) before the residual add.
 */
static hx_status run_layers(hx_batch *b, int n_sel, int rows, hx_err *err)
{
    const hx_model *c = b->cfg;
    const int h = c->hidden_size, d = c->head_dim, half = d / 2;
    const int H = b->slice.q_heads, K = b->slice.kv_heads, f = b->slice.ff_size;
    const int tp = b->slice.tp_size > 1;
    const int bt = b->opt.block_tokens;
    const float eps = (float)c->norm_eps;
    hx_cpu_pool *pool = b->pool;
    float *x = b->w.x;
    hx_status st;

    for (int r = 0; r < rows; r++)
        hx_cpu_rope_angles(b->w.rope_cos + (size_t)r * half, b->w.rope_sin + (size_t)r * half, d,
                           b->row_pos[r], c->rope_theta);

    for (int l = 0; l < hx_kvcache_layers(b->kv); l++) {
        const hx_llama_layer_weights *W = &b->layers[l];

        /* attention block: x += Wo attention(rope(Wq h), rope(Wk h), Wv h), h = norm(x) */
        for (int r = 0; r < rows; r++)
            hx_cpu_rmsnorm(b->w.xb + (size_t)r * h, x + (size_t)r * h, W->attn_norm, h, eps);
        const hx_cpu_linear qkv[3] = {{b->w.q, W->wq, H * d}, {b->w.k, W->wk, K * d},
                                      {b->w.v, W->wv, K * d}};
        hx_cpu_matmul_many(pool, b->w.xb, rows, h, qkv, 3);
        for (int i = 0; i < n_sel; i++) {
            const step_seq *q = &b->sel[i];
            for (int t = 0; t < q->n; t++) {
                const int r = q->row0 + t, pos = q->pos0 + t;
                const float *cs = b->w.rope_cos + (size_t)r * half;
                const float *sn = b->w.rope_sin + (size_t)r * half;
                hx_cpu_rope(b->w.q + (size_t)r * H * d, H, d, cs, sn);
                hx_cpu_rope(b->w.k + (size_t)r * K * d, K, d, cs, sn);
                const int block = q->blocks[pos / bt];
                const size_t at = (size_t)(pos % bt) * d;
                for (int kh = 0; kh < K; kh++) {
                    memcpy(hx_kvcache_block_data(b->kv, block, l, 0, kh) + at,
                           b->w.k + ((size_t)r * K + kh) * d, (size_t)d * sizeof(float));
                    memcpy(hx_kvcache_block_data(b->kv, block, l, 1, kh) + at,
                           b->w.v + ((size_t)r * K + kh) * d, (size_t)d * sizeof(float));
                }
            }
        }
        hx_cpu_paged_kv view;
        hx_kvcache_layer_view(b->kv, l, &view);
        hx_cpu_paged_attention(pool, b->w.att, b->w.q, &view, b->pseqs, n_sel, rows, H, K, d,
                               b->opt.max_seq_tokens, b->scores);
        hx_cpu_matmul(pool, b->w.xb2, b->w.att, W->wo, rows, H * d, h);
        if (tp && (st = allreduce(b, b->w.xb2, (size_t)rows * h, l, "o", err)) != HX_OK)
            return st;
        hx_cpu_add(x, b->w.xb2, rows * h);

        if (!tp) {
            hx_llama_mlp(pool, W, x, rows, h, f, eps, b->w.xb, b->w.xb2, b->w.gate, b->w.up);
            continue;
        }
        hx_llama_mlp_out(pool, W, x, rows, h, f, eps, b->w.xb, b->w.xb2, b->w.gate, b->w.up);
        if ((st = allreduce(b, b->w.xb2, (size_t)rows * h, l, "down", err)) != HX_OK)
            return st;
        hx_cpu_add(x, b->w.xb2, rows * h);
    }
    return HX_OK;
}

hx_status hx_batch_step(hx_batch *b, const hx_batch_event **events, int *n_events,
                        hx_err *err)
{
    *events = b->events;
    *n_events = 0;
    if (b->n_live == 0)
        return HX_OK;
    const hx_model *c = b->cfg;
    const int h = c->hidden_size, V = c->vocab_size;
    int n_sel = 0, rows = 0;
    hx_status st = plan_step(b, &n_sel, &rows, err);
    if (st != HX_OK)
        return st;
    if (rows == 0) /* only held sequences */
        return HX_OK;
    hx_err inner;
    inner.msg[0] = '\0';

    if (b->has_embedding) {
        for (int r = 0; r < rows; r++)
            memcpy(b->w.x + (size_t)r * h, b->embed + (size_t)b->row_token[r] * h,
                   (size_t)h * sizeof(float));
    } else if ((st = b->comm.recv_rows(b->comm.ctx, b->w.x, rows, h, &inner)) != HX_OK) {
        return hx_batch_comm_failed(&b->site, st, "recv_rows", &inner, err);
    }
    if ((st = run_layers(b, n_sel, rows, err)) != HX_OK)
        return st;

    int n_out = 0;
    for (int i = 0; i < n_sel; i++)
        n_out += b->sel[i].emits;
    if (b->has_head) {
        /* logits of every sequence's last row that gives a token, and its token */
        int e = 0;
        for (int i = 0; i < n_sel; i++) {
            const step_seq *q = &b->sel[i];
            if (q->emits)
                hx_cpu_rmsnorm(b->head_x + (size_t)e++ * h,
                               b->w.x + (size_t)(q->row0 + q->n - 1) * h, b->final_norm, h,
                               (float)c->norm_eps);
        }
        if (n_out > 0)
            hx_cpu_matmul(b->pool, b->logits, b->head_x, b->lm_head, n_out, h, V);
        e = 0;
        for (int i = 0; i < n_sel; i++) {
            const batch_seq *s = &b->seqs[b->sel[i].slot];
            if (!b->sel[i].emits)
                continue;
            const float *lg = b->logits + (size_t)e * V;
            b->step_tokens[e++] = s->sampler ? hx_llama_sample(s->sampler, lg) : argmax(lg, V);
        }
    } else if ((st = b->comm.send_rows(b->comm.ctx, b->w.x, rows, h, &inner)) != HX_OK) {
        return hx_batch_comm_failed(&b->site, st, "send_rows", &inner, err);
    }
    /* the last stage's rank 0 publishes the tokens; every other engine takes them */
    if ((st = hx_batch_comm_tokens(&b->comm, &b->site, b->step_tokens, n_out, V, err)) != HX_OK)
        return st;

    /* emit, and let finished sequences go (or hold them) */
    int e = 0;
    for (int i = 0; i < n_sel; i++) {
        const step_seq *q = &b->sel[i];
        batch_seq *s = &b->seqs[q->slot];
        s->fed += q->n;
        if (!q->emits)
            continue;
        const int token = b->step_tokens[e];
        const int finished = token == s->eos_id || s->n_generated + 1 == s->max_new;
        const float *lg = b->has_head ? b->logits + (size_t)e * V : NULL;
        b->events[e++] = (hx_batch_event){s->id, token, s->n_generated, finished, lg};
        s->last = token;
        s->n_generated++;
        if (finished && s->hold_kv)
            s->done = 1;
    }
    for (int i = 0; i < e; i++)
        if (b->events[i].finished)
            for (int j = 0; j < b->n_live; j++) {
                const batch_seq *s = &b->seqs[b->order[j]];
                if (s->id == b->events[i].id) {
                    if (!s->hold_kv)
                        release_seq(b, b->order[j]);
                    break;
                }
            }
    *n_events = e;
    return HX_OK;
}

/* ---- the rules shared with the cuda engine --------------------------------------------------- */

int hx_batch_site_alone(const hx_batch_site *at)
{
    return at->first_stage && at->last_stage && at->tp_size <= 1;
}

const char *hx_batch_comm_missing(const hx_batch_site *at, const hx_batch_comm *comm,
                                  int device_allreduce)
{
    if (at->tp_size > 1 && !device_allreduce && (!comm || !comm->allreduce))
        return "allreduce";
    if (!at->first_stage && (!comm || !comm->recv_rows))
        return "recv_rows";
    if (!at->last_stage && (!comm || !comm->send_rows))
        return "send_rows";
    if (!hx_batch_site_alone(at) && (!comm || !comm->tokens))
        return "tokens";
    return NULL;
}

hx_status hx_batch_check_request(const char *engine, const hx_batch_request *r, int vocab,
                                 int max_seq_tokens, hx_err *err)
{
    const unsigned long long id = (unsigned long long)r->id;
    if (r->n_prompt < 1 || r->max_new_tokens < 1)
        return hx_err_set(err, HX_EINVAL,
                          "%s: request %llu: %d prompt tokens, %d new (at least 1 each)", engine,
                          id, r->n_prompt, r->max_new_tokens);
    if ((int64_t)r->n_prompt + r->max_new_tokens - 1 > max_seq_tokens)
        return hx_err_set(err, HX_ERANGE,
                          "%s: request %llu: %d prompt tokens + %d new need %lld positions; a "
                          "sequence may use %d",
                          engine, id, r->n_prompt, r->max_new_tokens,
                          (long long)r->n_prompt + r->max_new_tokens - 1, max_seq_tokens);
    if (r->prompt)
        for (int i = 0; i < r->n_prompt; i++)
            if (r->prompt[i] < 0 || r->prompt[i] >= vocab)
                return hx_err_set(err, HX_EINVAL,
                                  "%s: request %llu: prompt token %d at index %d is outside the "
                                  "vocabulary of %d",
                                  engine, id, r->prompt[i], i, vocab);
    return HX_OK;
}

hx_status hx_batch_check_prefilled(const char *engine, const hx_batch_request *req,
                                   int first_token, int n_segs, int vocab, hx_err *err)
{
    const unsigned long long id = (unsigned long long)req->id;
    if (first_token < 0 || first_token >= vocab)
        return hx_err_set(err, HX_EINVAL,
                          "%s: request %llu: first token %d is outside the vocabulary of %d",
                          engine, id, first_token, vocab);
    if (req->max_new_tokens < 2 || first_token == req->eos_id)
        return hx_err_set(err, HX_EINVAL,
                          "%s: request %llu: nothing is left to decode after its first token",
                          engine, id);
    if (n_segs < 1)
        return hx_err_set(err, HX_EINVAL, "%s: request %llu: no KV segments", engine, id);
    return HX_OK;
}

hx_status hx_batch_comm_failed(const hx_batch_site *at, hx_status st, const char *what,
                               const hx_err *inner, hx_err *err)
{
    return hx_err_set(err, st, "%s: stage of layers %d-%d, TP rank %d of %d: %s failed: %s",
                      at->engine, at->layer_first, at->layer_first + at->num_layers - 1,
                      at->tp_rank, at->tp_size, what,
                      inner->msg[0] ? inner->msg : hx_strerror(st));
}

hx_status hx_batch_allreduce_failed(const hx_batch_site *at, int layer, const char *projection,
                                    hx_status st, const hx_err *inner, hx_err *err)
{
    return hx_err_set(err, st,
                      "%s: layer %d, TP rank %d of %d: all-reduce after the %s projection "
                      "failed: %s",
                      at->engine, at->layer_first + layer, at->tp_rank, at->tp_size, projection,
                      inner->msg[0] ? inner->msg : hx_strerror(st));
}

hx_status hx_batch_comm_tokens(const hx_batch_comm *comm, const hx_batch_site *at, int *tokens,
                               int n, int vocab, hx_err *err)
{
    if (hx_batch_site_alone(at))
        return HX_OK;
    /* the last stage's rank 0 publishes its tokens; every other engine takes them */
    const int source = at->last_stage && at->tp_rank == 0;
    hx_err inner;
    inner.msg[0] = '\0';
    hx_status st = comm->tokens(comm->ctx, tokens, n, source, &inner);
    if (st != HX_OK)
        return hx_batch_comm_failed(at, st, "tokens", &inner, err);
    for (int e = 0; e < n; e++)
        if (tokens[e] < 0 || tokens[e] >= vocab)
            return hx_err_set(err, HX_EINVAL,
                              "%s: the tokens hook gave token %d (event %d of %d), outside the "
                              "vocabulary of %d",
                              at->engine, tokens[e], e, n, vocab);
    return HX_OK;
}
