/*
 * cuda_engine.c - the whole-model GPU engine (runtime/cuda_engine.h): weights on the
 * device, a paged bf16 KV cache, continuous batching as runtime/batch.c
 * schedules it, and CUDA graphs for decode-only steps. Host C: it drives the
 * kernels and graph helpers of kernels/cuda.h.
 *
 * A step's inputs (tokens, positions, cache slots, the attention's
 * per-sequence tables, the rows to sample and their sampling parameters)
 * are written into one page-locked buffer and uploaded with one copy on the
 * engine's stream, which a captured graph replays as its first node; the
 * sampled tokens come back the same way. So a graph serves every step of
 * its batch-size bucket: only the buffer's contents change.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/cuda.h"
#include "runtime/cuda_engine.h"
#include "runtime/llama_weights.h"
#include "runtime/kvcache.h"
#include "runtime/safetensors.h"

#define MAX_BUCKETS 32
#define STAGING_BYTES ((size_t)64 << 20)
#define CRC_THREADS 16                 /* host threads checksumming a packed segment */
#define CRC_CHUNK_BYTES ((size_t)4 << 20) /* at least this much per thread's piece */
#define CRC_MAX_PIECES 256

typedef struct layer_w {
    float *attn_norm; /* [hidden] */
    float *ffn_norm;  /* [hidden] */
    hx_bf16 *wqkv;    /* [(heads + 2 kv_heads) * head_dim][hidden]: q, k, v rows */
    hx_bf16 *wo;      /* [hidden][heads * head_dim] */
    hx_bf16 *wgu;     /* [2 * intermediate][hidden]: gate rows, then up rows */
    hx_bf16 *wdown;   /* [hidden][intermediate] */
} layer_w;

typedef struct seq {
    int used;
    uint64_t id;
    int *prompt; /* [n_prompt]; NULL when added prefilled */
    int n_prompt;
    int prefilled; /* prompt positions in the cache */
    int kv_len;    /* positions in the cache */
    int max_new, eos, hold, done;
    int n_gen; /* tokens generated so far */
    int last;  /* the last generated token: the next row's input */
    float temperature, top_p;
    int n_blocks; /* blocks held (row `slot` of the block tables) */
} seq;

/* What a step's row of output came from. */
typedef struct out_src {
    int slot;
    int decoding; /* 1: a decode row; 0: the last row of a prompt */
} out_src;

struct hx_cuda_engine {
    hx_model cfg;
    hx_cuda_options opt;
    /* the slice this engine holds: layers [l0, l0 + L), query heads [qh0, qh0 + H), KV heads
       [kh0, kh0 + K), intermediate rows [f0, f0 + F) of the whole model's */
    int L, hid, H, K, D, F, V, qkv_n;
    int l0, qh0, kh0, f0;
    int has_embed, has_head; /* first stage / last stage */
    int tp;                  /* opt.tp_size */
    hx_batch_site site;      /* the above, for runtime/batch.h's shared checks */
    float eps;
    hx_batch_comm comm; /* set by hx_cuda_engine_set_comm; needed unless a whole model at TP 1 */
    int has_comm;
    hx_cuda_nccl *nccl; /* borrowed: the TP all-reduce on the device, when set */
    double nccl_timeout_s;
    hx_cuda_stream *stream;
    hx_cuda_blas *blas;
    hx_cuda_stream *side; /* L2 prefetches (opt.l2_prefetch_mb > 0), forked from stream */
    hx_cuda_event *side_ev;
    /* the one-row decode kernel (opt.decode1 at TP 1): its layer table and grid barrier;
       NULL when not used (or refused by the device: then the kernels one by one) */
    hx_cuda_layer *d_layers; /* [L] */
    unsigned *d_sync;

    /* weights */
    hx_bf16 *embed;   /* [vocab][hidden]; first stage only */
    hx_bf16 *lm_head; /* [vocab][hidden]; last stage only; == embed when tied on a whole model */
    float *final_norm; /* [hidden]; last stage only */
    layer_w *layers;   /* [L] */
    int64_t weight_bytes;

    /* KV cache */
    hx_bf16 *kv; /* [max_blocks + 1][L][2][K][block_tokens][D]; the last block is scratch */
    hx_cuda_kv_layout kvl;
    int mbps;     /* block-table row length */
    int *d_bt;    /* [max_seqs + 1][mbps]; row max_seqs: the padding rows' (all scratch) */
    int *h_bt;    /* host copy */
    float *d_cos; /* [max_seq_tokens][D / 2] */
    float *d_sin;
    uint64_t *d_rng; /* [max_seqs + 1] */

    /* workspaces, for T = max_step_tokens rows and S = max_seqs outputs */
    float *x;      /* [T][hidden] residual stream */
    float *qkv;    /* [T][qkv_n] */
    hx_bf16 *h;    /* [T][hidden] normed */
    hx_bf16 *q;    /* [T][H][D] rotated queries */
    hx_bf16 *att;  /* [T][H][D] attention output */
    hx_bf16 *gu;   /* [T][2F] */
    hx_bf16 *act;  /* [T][F] */
    hx_bf16 *hn;   /* [S][hidden] final-normed rows to sample */
    float *logits; /* [S][vocab] */
    float *part;   /* decode attention partials */
    int max_parts;
    float *y;      /* [T][hidden] TP partial sums of the o and down projections (TP > 1) */
    float *h_rows; /* [T][hidden] pinned: rows to and from other stages, host all-reduce */

    /* step inputs/outputs */
    int T, S;
    size_t io_bytes;
    unsigned char *h_io; /* pinned */
    unsigned char *d_io;
    int *io_tok, *io_pos, *io_slot; /* [T] (host views) */
    int *io_dec_slot, *io_dec_row, *io_dec_len;        /* [S] */
    int *io_pf_slot, *io_pf_row0, *io_pf_pos0, *io_pf_n; /* [S] */
    int *io_out_row, *io_out_slot;                     /* [S] */
    float *io_temp, *io_topp;                          /* [S] */
    int *d_tok_out;  /* [S] */
    int *h_tok_out;  /* [S] pinned */
    float *h_logits; /* [S][vocab] pinned, when opt.logits */
    out_src *out;    /* [S] */

    /* scheduling */
    seq *seqs;   /* [S] */
    int *order;  /* [S]: live slots in the order added */
    int n_live;
    int *free_list; /* [max_blocks]: LIFO */
    int n_free;
    hx_batch_event *events; /* [S] */

    /* graphs */
    int n_buckets;
    int bucket[MAX_BUCKETS];
    int bucket_uses[MAX_BUCKETS];
    hx_cuda_graph *graph[MAX_BUCKETS];

    /* KV segment staging */
    float *d_seg; /* [seg_layers][2][K][max_seq_tokens][D] fp32 (or the same in bf16) */
    int seg_layers;
    hx_cpu_pool *crc_pool; /* checksums packed segments in pieces */

    int64_t steps, graph_steps;
    int fwd_decode1;                   /* this step ran the one-row decode kernel (its forward
                                          or the graph it replayed) */
    int decode1_head;                  /* the kernel does the final norm and LM head too
                                          (the last stage; $HX_CUDA_DECODE1_HEAD not "0") */
    int graph_decode1[MAX_BUCKETS];    /* the bucket's graph holds it */
    int64_t decode1_steps;
};

/* ---- options ---- */

void hx_cuda_options_init(hx_cuda_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->device = 0;
    opt->max_seqs = 16;
    opt->max_step_tokens = 512;
    opt->block_tokens = 16;
    opt->max_seq_tokens = 0;
    opt->max_blocks = 0;
    const char *g = getenv("HX_CUDA_GRAPHS"); /* an operator's way out, "0" */
    opt->graphs = !(g && strcmp(g, "0") == 0);
    opt->gemv_max_rows = 8;
    opt->logits = 0;
    opt->first_layer = 0;
    opt->num_layers = 0;
    opt->tp_rank = 0;
    opt->tp_size = 1;
    const char *pf = getenv("HX_CUDA_PREFETCH"); /* MiB, for measurements */
    opt->l2_prefetch_mb = pf ? atoi(pf) : 0;
    if (opt->l2_prefetch_mb < 0 || opt->l2_prefetch_mb > 4096)
        opt->l2_prefetch_mb = 0;
    const char *d1 = getenv("HX_CUDA_DECODE1"); /* for measurements */
    opt->decode1 = d1 && strcmp(d1, "1") == 0;
}

static hx_status check_model(const hx_model *c, const char *what, hx_err *err)
{
    const char *why = NULL;
    if (c->arch != HX_MODEL_ARCH_LLAMA && c->arch != HX_MODEL_ARCH_MISTRAL)
        why = "only llama-family models (llama, mistral) run on the CUDA backend";
    else if (c->sliding_window_tokens > 0)
        why = "sliding-window attention is not supported";
    else if (c->has_qkv_bias || c->has_o_bias || c->has_mlp_bias)
        why = "attention or MLP biases are not supported";
    else if (c->layer_norm || !c->gated_mlp || c->learned_positions)
        why = "only RMSNorm, SwiGLU and rotary positions are supported";
    else if (c->rope_theta <= 0)
        why = "rotary positions need a positive rope_theta";
    else if (c->word_embed_dim != c->hidden_size)
        why = "embedding projections are not supported";
    else if (c->head_dim != 64 && c->head_dim != 128)
        why = "head_dim must be 64 or 128";
    else if (c->num_kv_heads < 1 || c->num_heads % c->num_kv_heads ||
             c->num_heads / c->num_kv_heads > 8)
        why = "at most 8 query heads per KV head are supported";
    else if (c->hidden_size % 8 || c->intermediate_size % 8)
        why = "hidden_size and intermediate_size must be multiples of 8";
    if (why)
        return hx_err_set(err, HX_ENOTSUP, "cuda engine: model '%s': %s", what, why);
    return HX_OK;
}

/* ---- allocation helpers ---- */

static hx_status dalloc(void *pp, size_t bytes, hx_err *err)
{
    return hx_cuda_malloc((void **)pp, bytes, err);
}

/* Drops the captured graphs (they hold the communicator's all-reduces); later steps capture anew. */
static void drop_graphs(hx_cuda_engine *e)
{
    for (int b = 0; b < MAX_BUCKETS; b++) {
        hx_cuda_graph_free(e->graph[b]);
        e->graph[b] = NULL;
        e->bucket_uses[b] = 0;
    }
}

void hx_cuda_engine_free(hx_cuda_engine *e)
{
    if (!e)
        return;
    (void)hx_cuda_set_device(e->opt.device, NULL);
    /* an all-reduce whose peer died must not hang the free: through NCCL first, which
       aborts it when it does not finish; then its kernels have exited */
    if (e->stream && (!e->nccl || hx_cuda_nccl_wait(e->nccl, e->stream, 10.0, NULL) != HX_OK))
        (void)hx_cuda_stream_sync(e->stream, NULL);
    drop_graphs(e);
    if (e->layers) {
        for (int l = 0; l < e->L; l++) {
            layer_w *w = &e->layers[l];
            hx_cuda_free(w->attn_norm);
            hx_cuda_free(w->ffn_norm);
            hx_cuda_free(w->wqkv);
            hx_cuda_free(w->wo);
            hx_cuda_free(w->wgu);
            hx_cuda_free(w->wdown);
        }
        free(e->layers);
    }
    if (e->lm_head != e->embed)
        hx_cuda_free(e->lm_head);
    hx_cuda_free(e->embed);
    hx_cuda_free(e->final_norm);
    hx_cuda_free(e->kv);
    hx_cuda_free(e->d_bt);
    free(e->h_bt);
    hx_cuda_free(e->d_cos);
    hx_cuda_free(e->d_sin);
    hx_cuda_free(e->d_rng);
    hx_cuda_free(e->x);
    hx_cuda_free(e->qkv);
    hx_cuda_free(e->h);
    hx_cuda_free(e->q);
    hx_cuda_free(e->att);
    hx_cuda_free(e->gu);
    hx_cuda_free(e->act);
    hx_cuda_free(e->hn);
    hx_cuda_free(e->logits);
    hx_cuda_free(e->part);
    hx_cuda_free(e->y);
    hx_cuda_host_free(e->h_rows);
    hx_cuda_host_free(e->h_io);
    hx_cuda_free(e->d_io);
    hx_cuda_free(e->d_tok_out);
    hx_cuda_host_free(e->h_tok_out);
    hx_cuda_host_free(e->h_logits);
    hx_cuda_free(e->d_seg);
    hx_cuda_free(e->d_layers);
    hx_cuda_free(e->d_sync);
    free(e->out);
    if (e->seqs) {
        for (int i = 0; i < e->S; i++)
            free(e->seqs[i].prompt);
        free(e->seqs);
    }
    free(e->order);
    free(e->free_list);
    free(e->events);
    hx_cuda_blas_free(e->blas);
    hx_cuda_stream_free(e->side);
    hx_cuda_event_free(e->side_ev);
    hx_cuda_stream_free(e->stream);
    hx_cpu_pool_free(e->crc_pool);
    free(e);
}

/* Checks options against the model, fills the defaults, sets the sizes. */
static hx_status setup_sizes(hx_cuda_engine *e, const hx_cuda_options *opt, hx_err *err)
{
    if (opt)
        e->opt = *opt;
    else
        hx_cuda_options_init(&e->opt);
    hx_cuda_options *o = &e->opt;
    const hx_model *c = &e->cfg;
    if (o->max_seq_tokens <= 0)
        o->max_seq_tokens = c->max_position_tokens < 4096 ? c->max_position_tokens : 4096;
    if (o->max_seqs < 1 || o->max_step_tokens < o->max_seqs || o->block_tokens < 1 ||
        o->max_seq_tokens < 1 || o->max_seq_tokens > c->max_position_tokens ||
        o->max_blocks < 0 || o->max_step_tokens > 1000000 || o->max_seqs > 65535)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: bad sizes (max_seqs %d, max_step_tokens %d, block_tokens "
                          "%d, max_seq_tokens %d of the model's %d, max_blocks %d)",
                          o->max_seqs, o->max_step_tokens, o->block_tokens, o->max_seq_tokens,
                          c->max_position_tokens, o->max_blocks);
    e->mbps = (o->max_seq_tokens + o->block_tokens - 1) / o->block_tokens;
    if (o->max_blocks == 0) {
        int64_t nb = (int64_t)o->max_seqs * e->mbps;
        o->max_blocks = nb > INT_MAX - 1 ? INT_MAX - 1 : (int)nb;
    }
    /* the stage and the TP slice (runtime/llama.h's: Megatron style, KV heads as
       hx_kv_rank_heads gives them, intermediate rows [r f / tp, (r + 1) f / tp)) */
    const int nl = o->num_layers > 0 ? o->num_layers : c->num_layers - o->first_layer;
    if (o->first_layer < 0 || o->first_layer >= c->num_layers || nl < 1 ||
        o->first_layer + nl > c->num_layers)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: layers %d-%d are outside the model's 0-%d",
                          o->first_layer, o->first_layer + nl - 1, c->num_layers - 1);
    hx_llama_slice sl;
    hx_status st = hx_llama_slice_plan(c, "cuda engine", o->tp_rank, o->tp_size, &sl, err);
    if (st != HX_OK)
        return st;
    e->tp = o->tp_size;
    e->l0 = o->first_layer;
    e->L = nl;
    e->has_embed = e->l0 == 0;
    e->has_head = e->l0 + e->L == c->num_layers;
    e->site = (hx_batch_site){.engine = "cuda engine",
                              .layer_first = e->l0,
                              .num_layers = e->L,
                              .tp_rank = o->tp_rank,
                              .tp_size = e->tp,
                              .first_stage = e->has_embed,
                              .last_stage = e->has_head};
    e->hid = c->hidden_size;
    e->H = sl.q_heads;
    e->qh0 = sl.q_head_first;
    e->K = sl.kv_heads;
    e->kh0 = sl.kv_head_first;
    e->D = c->head_dim;
    e->f0 = sl.ff_first;
    e->F = sl.ff_size;
    if (e->F % 8)
        return hx_err_set(err, HX_ENOTSUP,
                          "cuda engine: TP rank %d of %d holds %d intermediate rows; the GPU "
                          "kernels need a multiple of 8",
                          o->tp_rank, o->tp_size, e->F);
    e->V = c->vocab_size;
    e->qkv_n = (e->H + 2 * e->K) * e->D;
    e->eps = (float)c->norm_eps;
    e->T = o->max_step_tokens;
    e->S = o->max_seqs;
    e->kvl = (hx_cuda_kv_layout){.layers = e->L,
                                 .kv_heads = e->K,
                                 .head_dim = e->D,
                                 .block_tokens = o->block_tokens,
                                 .max_blocks_per_seq = e->mbps};
    int parts = (o->max_seq_tokens + HX_CUDA_DECODE_CHUNK_MAX - 1) / HX_CUDA_DECODE_CHUNK_MAX;
    e->max_parts = parts < 8 ? 8 : parts;
    e->n_buckets = 0;
    for (int b = 1; b < o->max_seqs && e->n_buckets < MAX_BUCKETS - 1; b *= 2)
        e->bucket[e->n_buckets++] = b;
    e->bucket[e->n_buckets++] = o->max_seqs;
    return HX_OK;
}

/* Everything but the weights: cache, tables, workspaces, staging, host state. */
static hx_status setup_buffers(hx_cuda_engine *e, hx_err *err)
{
    hx_status st;
    const hx_cuda_options *o = &e->opt;
    const size_t T = (size_t)e->T, S = (size_t)e->S;
    const size_t block_elems = (size_t)e->L * 2 * e->K * o->block_tokens * e->D;
    if ((st = dalloc(&e->kv, ((size_t)o->max_blocks + 1) * block_elems * sizeof(hx_bf16), err)))
        return st;
    if ((st = hx_cuda_memset(e->kv, 0, ((size_t)o->max_blocks + 1) * block_elems * 2, err)))
        return st;
    const size_t bt_n = (S + 1) * (size_t)e->mbps;
    e->h_bt = malloc(bt_n * sizeof *e->h_bt);
    if (!e->h_bt)
        return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    for (size_t i = 0; i < bt_n; i++)
        e->h_bt[i] = o->max_blocks; /* the scratch block */
    if ((st = dalloc(&e->d_bt, bt_n * sizeof(int), err)) ||
        (st = hx_cuda_memcpy(e->d_bt, e->h_bt, bt_n * sizeof(int), err)))
        return st;

    /* RoPE tables, in double as hx_cpu_rope_angles */
    const int half = e->D / 2;
    const size_t rope_n = (size_t)o->max_seq_tokens * half;
    float *hc = malloc(rope_n * sizeof *hc), *hs = malloc(rope_n * sizeof *hs);
    if (!hc || !hs) {
        free(hc);
        free(hs);
        return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    }
    for (int i = 0; i < half; i++) {
        const double inv_freq = pow(e->cfg.rope_theta, -(double)(2 * i) / (double)e->D);
        for (int p = 0; p < o->max_seq_tokens; p++) {
            const double a = (double)p * inv_freq;
            hc[(size_t)p * half + i] = (float)cos(a);
            hs[(size_t)p * half + i] = (float)sin(a);
        }
    }
    st = dalloc(&e->d_cos, rope_n * sizeof(float), err);
    if (!st)
        st = dalloc(&e->d_sin, rope_n * sizeof(float), err);
    if (!st)
        st = hx_cuda_memcpy(e->d_cos, hc, rope_n * sizeof(float), err);
    if (!st)
        st = hx_cuda_memcpy(e->d_sin, hs, rope_n * sizeof(float), err);
    free(hc);
    free(hs);
    if (st)
        return st;
    if ((st = dalloc(&e->d_rng, (S + 1) * sizeof(uint64_t), err)) ||
        (st = hx_cuda_memset(e->d_rng, 0, (S + 1) * sizeof(uint64_t), err)))
        return st;

    const size_t hid = (size_t)e->hid, hd = (size_t)e->H * e->D;
    if ((st = dalloc(&e->x, T * hid * 4, err)) ||
        (st = dalloc(&e->qkv, T * (size_t)e->qkv_n * 4, err)) ||
        (st = dalloc(&e->h, T * hid * 2, err)) || (st = dalloc(&e->q, T * hd * 2, err)) ||
        (st = dalloc(&e->att, T * hd * 2, err)) ||
        (st = dalloc(&e->gu, T * 2 * (size_t)e->F * 2, err)) ||
        (st = dalloc(&e->act, T * (size_t)e->F * 2, err)) ||
        (st = dalloc(&e->hn, S * hid * 2, err)) ||
        (st = dalloc(&e->logits, S * (size_t)e->V * 4, err)) ||
        (st = dalloc(&e->part, hx_cuda_decode_attention_workspace(e->S, e->H, e->D, e->max_parts),
                     err)) ||
        (st = hx_cuda_memset(e->part, 0,
                             hx_cuda_decode_attention_workspace(e->S, e->H, e->D, e->max_parts),
                             err)))
        return st;

    /* TP partial sums; rows that cross stages or a host all-reduce go through h_rows */
    if (e->tp > 1 && (st = dalloc(&e->y, T * hid * 4, err)))
        return st;
    if ((e->tp > 1 || !e->has_embed || !e->has_head) &&
        (st = hx_cuda_host_alloc((void **)&e->h_rows, T * hid * 4, err)))
        return st;

    /* step io: 3T + 9S ints, then 2S floats */
    const size_t n_int = 3 * T + 9 * S;
    e->io_bytes = (n_int + 2 * S) * 4;
    if ((st = hx_cuda_host_alloc((void **)&e->h_io, e->io_bytes, err)) ||
        (st = dalloc(&e->d_io, e->io_bytes, err)))
        return st;
    memset(e->h_io, 0, e->io_bytes);
    int *ip = (int *)e->h_io;
    e->io_tok = ip;
    e->io_pos = ip + T;
    e->io_slot = ip + 2 * T;
    e->io_dec_slot = ip + 3 * T;
    e->io_dec_row = e->io_dec_slot + S;
    e->io_dec_len = e->io_dec_row + S;
    e->io_pf_slot = e->io_dec_len + S;
    e->io_pf_row0 = e->io_pf_slot + S;
    e->io_pf_pos0 = e->io_pf_row0 + S;
    e->io_pf_n = e->io_pf_pos0 + S;
    e->io_out_row = e->io_pf_n + S;
    e->io_out_slot = e->io_out_row + S;
    e->io_temp = (float *)(e->h_io + n_int * 4);
    e->io_topp = e->io_temp + S;
    if ((st = dalloc(&e->d_tok_out, S * sizeof(int), err)) ||
        (st = hx_cuda_host_alloc((void **)&e->h_tok_out, S * sizeof(int), err)))
        return st;
    if (o->logits &&
        (st = hx_cuda_host_alloc((void **)&e->h_logits, S * (size_t)e->V * 4, err)))
        return st;

    int threads = hx_cpu_default_threads();
    if ((st = hx_cpu_pool_new(threads < CRC_THREADS ? threads : CRC_THREADS, &e->crc_pool, err)))
        return st;

    /* KV segment staging: whole layers, up to 64 MiB (at least one layer) */
    const size_t layer_floats = (size_t)2 * e->K * o->max_seq_tokens * e->D;
    size_t fit = STAGING_BYTES / (layer_floats * 4);
    e->seg_layers = fit < 1 ? 1 : (fit > (size_t)e->L ? e->L : (int)fit);
    if ((st = dalloc(&e->d_seg, (size_t)e->seg_layers * layer_floats * 4, err)))
        return st;

    /* the one-row decode kernel's layer table (the weights are in place) and barrier */
    const char *d1_head = getenv("HX_CUDA_DECODE1_HEAD"); /* "0": not the LM head (a way out) */
    e->decode1_head = e->has_head && !(d1_head && strcmp(d1_head, "0") == 0);
    if (o->decode1 && e->tp == 1) {
        hx_cuda_layer *tab = malloc((size_t)e->L * sizeof *tab);
        if (!tab)
            return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
        for (int l = 0; l < e->L; l++) {
            const layer_w *w = &e->layers[l];
            tab[l] = (hx_cuda_layer){w->attn_norm, w->ffn_norm, w->wqkv, w->wo, w->wgu, w->wdown};
        }
        if ((st = dalloc(&e->d_layers, (size_t)e->L * sizeof *tab, err)) == HX_OK)
            st = hx_cuda_memcpy(e->d_layers, tab, (size_t)e->L * sizeof *tab, err);
        free(tab);
        if (st == HX_OK && (st = dalloc(&e->d_sync, HX_CUDA_DECODE1_SYNC_BYTES, err)) == HX_OK)
            st = hx_cuda_memset(e->d_sync, 0, HX_CUDA_DECODE1_SYNC_BYTES, err);
        if (st != HX_OK)
            return st;
    }

    e->out = calloc(S, sizeof *e->out);
    e->seqs = calloc(S, sizeof *e->seqs);
    e->order = calloc(S, sizeof *e->order);
    e->events = calloc(S, sizeof *e->events);
    e->free_list = malloc((size_t)o->max_blocks * sizeof *e->free_list);
    if (!e->out || !e->seqs || !e->order || !e->events || !e->free_list)
        return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    /* LIFO: block 0 is handed out first */
    for (int i = 0; i < o->max_blocks; i++)
        e->free_list[i] = o->max_blocks - 1 - i;
    e->n_free = o->max_blocks;
    return HX_OK;
}

static hx_status engine_start(const hx_model *cfg, const hx_cuda_options *opt,
                              hx_cuda_engine **out, hx_err *err)
{
    *out = NULL;
    hx_cuda_engine *e = calloc(1, sizeof *e);
    if (!e)
        return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    e->cfg = *cfg;
    hx_status st = setup_sizes(e, opt, err);
    if (st == HX_OK && hx_cuda_device_count() <= 0)
        st = hx_err_set(err, HX_ENOTSUP, "cuda engine: no CUDA device");
    if (st == HX_OK)
        st = hx_cuda_set_device(e->opt.device, err);
    if (st == HX_OK)
        st = hx_cuda_stream_new(&e->stream, err);
    if (st == HX_OK && e->opt.l2_prefetch_mb > 0) {
        st = hx_cuda_stream_new(&e->side, err);
        if (st == HX_OK)
            st = hx_cuda_event_new(&e->side_ev, err);
    }
    if (st == HX_OK)
        st = hx_cuda_blas_new(e->opt.gemv_max_rows, &e->blas, err);
    if (st == HX_OK) {
        e->layers = calloc((size_t)e->L, sizeof *e->layers);
        if (!e->layers)
            st = hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    }
    if (st != HX_OK) {
        hx_cuda_engine_free(e);
        return st;
    }
    *out = e;
    return HX_OK;
}

static hx_status alloc_weights(hx_cuda_engine *e, hx_err *err)
{
    hx_status st;
    const size_t hid = (size_t)e->hid, V = (size_t)e->V, F = (size_t)e->F;
    const size_t hd = (size_t)e->H * e->D;
    e->weight_bytes = 0;
    if (e->has_embed) {
        if ((st = dalloc(&e->embed, V * hid * 2, err)))
            return st;
        e->weight_bytes += (int64_t)(V * hid * 2);
    }
    if (e->has_head) {
        if ((st = dalloc(&e->final_norm, hid * 4, err)))
            return st;
        e->weight_bytes += (int64_t)(hid * 4);
        if (e->cfg.tied_embeddings && e->has_embed) {
            e->lm_head = e->embed;
        } else {
            if ((st = dalloc(&e->lm_head, V * hid * 2, err)))
                return st;
            e->weight_bytes += (int64_t)(V * hid * 2);
        }
    }
    for (int l = 0; l < e->L; l++) {
        layer_w *w = &e->layers[l];
        if ((st = dalloc(&w->attn_norm, hid * 4, err)) ||
            (st = dalloc(&w->ffn_norm, hid * 4, err)) ||
            (st = dalloc(&w->wqkv, (size_t)e->qkv_n * hid * 2, err)) ||
            (st = dalloc(&w->wo, hid * hd * 2, err)) ||
            (st = dalloc(&w->wgu, 2 * F * hid * 2, err)) ||
            (st = dalloc(&w->wdown, hid * F * 2, err)))
            return st;
        e->weight_bytes += (int64_t)(2 * hid * 4 + ((size_t)e->qkv_n * hid + hid * hd +
                                                     3 * F * hid) * 2);
    }
    return HX_OK;
}

/* ---- random weights ---- */

static uint64_t tensor_seed(uint64_t seed, int layer, int which)
{
    return seed * 0x9e3779b97f4a7c15ull + (uint64_t)(layer + 1) * 1000003ull + (uint64_t)which;
}

hx_status hx_cuda_engine_new_random(const hx_model *cfg, uint64_t seed,
                                    const hx_cuda_options *opt, hx_cuda_engine **out,
                                    hx_err *err)
{
    *out = NULL;
    hx_status st = check_model(cfg, cfg->name[0] ? cfg->name : "random", err);
    if (st != HX_OK)
        return st;
    hx_cuda_engine *e = NULL;
    if ((st = engine_start(cfg, opt, &e, err)) != HX_OK)
        return st;
    if ((st = alloc_weights(e, err)) != HX_OK)
        goto out_free;
    hx_cuda_stream *s = e->stream;
    const int64_t hid = e->hid, V = e->V, F = e->F, hd = (int64_t)e->H * e->D;
    /* scaled by the whole model's fan-in, whatever slice this engine holds */
    const float a_h = sqrtf(3.0f / (float)hid),
                a_hd = sqrtf(3.0f / (float)(cfg->num_heads * cfg->head_dim)),
                a_f = sqrtf(3.0f / (float)cfg->intermediate_size);
    if (e->embed && (st = hx_cuda_fill_uniform_bf16(e->embed, V * hid, tensor_seed(seed, -1, 0),
                                                    -1.0f, 1.0f, s, err)))
        goto out_free;
    if (e->final_norm && (st = hx_cuda_fill_uniform_f32(e->final_norm, hid,
                                                        tensor_seed(seed, -1, 1), 0.9f, 1.1f, s,
                                                        err)))
        goto out_free;
    /* tied on a stage without the embedding: the embedding's values, as the whole model's */
    const int tied = cfg->tied_embeddings;
    if (e->lm_head && e->lm_head != e->embed &&
        (st = hx_cuda_fill_uniform_bf16(e->lm_head, V * hid, tensor_seed(seed, -1, tied ? 0 : 2),
                                        tied ? -1.0f : -a_h, tied ? 1.0f : a_h, s, err)))
        goto out_free;
    for (int l = 0; l < e->L; l++) {
        layer_w *w = &e->layers[l];
        const int ml = e->l0 + l; /* model-wide: a stage's layers are the whole model's */
        if ((st = hx_cuda_fill_uniform_f32(w->attn_norm, hid, tensor_seed(seed, ml, 0), 0.9f, 1.1f,
                                           s, err)) ||
            (st = hx_cuda_fill_uniform_f32(w->ffn_norm, hid, tensor_seed(seed, ml, 1), 0.9f, 1.1f,
                                           s, err)) ||
            (st = hx_cuda_fill_uniform_bf16(w->wqkv, (int64_t)e->qkv_n * hid,
                                            tensor_seed(seed, ml, 2), -a_h, a_h, s, err)) ||
            (st = hx_cuda_fill_uniform_bf16(w->wo, hid * hd, tensor_seed(seed, ml, 3), -a_hd, a_hd,
                                            s, err)) ||
            (st = hx_cuda_fill_uniform_bf16(w->wgu, 2 * F * hid, tensor_seed(seed, ml, 4), -a_h,
                                            a_h, s, err)) ||
            (st = hx_cuda_fill_uniform_bf16(w->wdown, hid * F, tensor_seed(seed, ml, 5), -a_f, a_f,
                                            s, err)))
            goto out_free;
    }
    if ((st = hx_cuda_stream_sync(s, err)) != HX_OK)
        goto out_free;
    if ((st = setup_buffers(e, err)) != HX_OK)
        goto out_free;
    *out = e;
    return HX_OK;
out_free:
    hx_cuda_engine_free(e);
    return st;
}

/* ---- weights from safetensors ---- */

typedef struct loader {
    hx_cuda_engine *e;
    hx_safetensors_index *ix;
    const char *dir;
    void *staging; /* [STAGING_BYTES] device */
    float *host;   /* [hidden] fp32 for norms */
} loader;

static hx_status find_checked(loader *ld, const char *name, int64_t rows, int64_t cols,
                              hx_safetensors_tensor *t, hx_err *err)
{
    hx_status st = hx_safetensors_index_find(ld->ix, name, t, err);
    if (st != HX_OK)
        return st;
    if (t->dtype != HX_SAFETENSORS_F32 && t->dtype != HX_SAFETENSORS_BF16 &&
        t->dtype != HX_SAFETENSORS_F16)
        return hx_err_set(err, HX_ENOTSUP,
                          "model '%s': tensor '%s': dtype %s (expected F32, BF16 or F16)",
                          ld->dir, name, hx_safetensors_dtype_name(t->dtype));
    const int want_ndim = cols ? 2 : 1;
    if (t->ndim != want_ndim || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        if (cols)
            return hx_err_set(err, HX_EPARSE,
                              "model '%s': tensor '%s': shape (%d dims) [%lld, %lld], expected "
                              "[%lld, %lld]",
                              ld->dir, name, t->ndim, (long long)t->shape[0],
                              (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)rows,
                              (long long)cols);
        return hx_err_set(err, HX_EPARSE,
                          "model '%s': tensor '%s': shape (%d dims) [%lld], expected [%lld]",
                          ld->dir, name, t->ndim, (long long)t->shape[0], (long long)rows);
    }
    return HX_OK;
}

/*
 * Rows [r0, r0 + nr) and columns [c0, c0 + nc) of the [rows][cols] tensor
 * `name` into dst ([nr][nc] bf16), through the staging buffer: a TP slice
 * takes row blocks of Wq, Wk, Wv, Wgate, Wup and column blocks of Wo, Wdown.
 */
static hx_status load_block(loader *ld, const char *name, int64_t rows, int64_t cols, int64_t r0,
                            int64_t nr, int64_t c0, int64_t nc, hx_bf16 *dst, hx_err *err)
{
    hx_safetensors_tensor t;
    hx_status st = find_checked(ld, name, rows, cols, &t, err);
    if (st != HX_OK)
        return st;
    const size_t es = hx_safetensors_dtype_bytes(t.dtype);
    const int dt = t.dtype == HX_SAFETENSORS_F32    ? HX_CUDA_DTYPE_F32
                   : t.dtype == HX_SAFETENSORS_BF16 ? HX_CUDA_DTYPE_BF16
                                                    : HX_CUDA_DTYPE_F16;
    const int64_t per = (int64_t)(STAGING_BYTES / ((size_t)nc * es)); /* rows per copy */
    if (per < 1)
        return hx_err_set(err, HX_ENOTSUP, "model '%s': tensor '%s': rows of %lld values do not "
                          "fit the loader's staging buffer", ld->dir, name, (long long)nc);
    const unsigned char *base = t.data;
    for (int64_t r = 0; r < nr; r += per) {
        const int64_t m = nr - r < per ? nr - r : per;
        const unsigned char *src = base + (size_t)((r0 + r) * cols + c0) * es;
        if (nc == cols)
            st = hx_cuda_memcpy_async(ld->staging, src, (size_t)(m * nc) * es, ld->e->stream,
                                      err);
        else
            st = hx_cuda_memcpy_2d_async(ld->staging, (size_t)nc * es, src, (size_t)cols * es,
                                         (size_t)nc * es, (size_t)m, ld->e->stream, err);
        if (st == HX_OK)
            st = hx_cuda_to_bf16(dst + r * nc, ld->staging, dt, m * nc, ld->e->stream, err);
        if (st != HX_OK)
            return st;
    }
    return HX_OK;
}

/* A whole [rows][cols] matrix into dst (bf16). */
static hx_status load_matrix(loader *ld, const char *name, int64_t rows, int64_t cols,
                             hx_bf16 *dst, hx_err *err)
{
    return load_block(ld, name, rows, cols, 0, rows, 0, cols, dst, err);
}

static hx_status load_vector(loader *ld, const char *name, float *d_dst, hx_err *err)
{
    const int64_t n = ld->e->hid;
    hx_safetensors_tensor t;
    hx_status st = find_checked(ld, name, n, 0, &t, err);
    if (st == HX_OK)
        st = hx_safetensors_to_f32(&t, 0, n, ld->host, err);
    if (st == HX_OK)
        st = hx_cuda_memcpy_async(d_dst, ld->host, (size_t)n * 4, ld->e->stream, err);
    if (st == HX_OK) /* ld->host is reused next */
        st = hx_cuda_stream_sync(ld->e->stream, err);
    return st;
}

static hx_status load_weights(loader *ld, hx_err *err)
{
    hx_cuda_engine *e = ld->e;
    char name[256];
    hx_status st;
    const int64_t hid = e->hid, V = e->V, D = e->D, F = e->F;
    const int64_t Qm = (int64_t)e->cfg.num_heads * D, Km = (int64_t)e->cfg.num_kv_heads * D,
                  Fm = e->cfg.intermediate_size;
    const int64_t q0 = (int64_t)e->qh0 * D, nq = (int64_t)e->H * D, k0 = (int64_t)e->kh0 * D,
                  nk = (int64_t)e->K * D;
    if (e->has_embed &&
        (st = load_matrix(ld, "model.embed_tokens.weight", V, hid, e->embed, err)))
        return st;
    if (e->has_head) {
        if ((st = load_vector(ld, "model.norm.weight", e->final_norm, err)))
            return st;
        /* tied on a stage without the embedding: the head is the embedding's table */
        const char *head = e->cfg.tied_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
        if (e->lm_head != e->embed && (st = load_matrix(ld, head, V, hid, e->lm_head, err)))
            return st;
    }
    for (int l = 0; l < e->L; l++) {
        layer_w *w = &e->layers[l];
        const int ml = e->l0 + l;
#define NAME(fmt) (snprintf(name, sizeof name, "model.layers.%d." fmt, ml), name)
        if ((st = load_vector(ld, NAME("input_layernorm.weight"), w->attn_norm, err)) ||
            (st = load_vector(ld, NAME("post_attention_layernorm.weight"), w->ffn_norm, err)) ||
            (st = load_block(ld, NAME("self_attn.q_proj.weight"), Qm, hid, q0, nq, 0, hid,
                             w->wqkv, err)) ||
            (st = load_block(ld, NAME("self_attn.k_proj.weight"), Km, hid, k0, nk, 0, hid,
                             w->wqkv + nq * hid, err)) ||
            (st = load_block(ld, NAME("self_attn.v_proj.weight"), Km, hid, k0, nk, 0, hid,
                             w->wqkv + (nq + nk) * hid, err)) ||
            (st = load_block(ld, NAME("self_attn.o_proj.weight"), hid, Qm, 0, hid, q0, nq,
                             w->wo, err)) ||
            (st = load_block(ld, NAME("mlp.gate_proj.weight"), Fm, hid, e->f0, F, 0, hid, w->wgu,
                             err)) ||
            (st = load_block(ld, NAME("mlp.up_proj.weight"), Fm, hid, e->f0, F, 0, hid,
                             w->wgu + F * hid, err)) ||
            (st = load_block(ld, NAME("mlp.down_proj.weight"), hid, Fm, 0, hid, e->f0, F,
                             w->wdown, err)))
            return st;
#undef NAME
    }
    return hx_cuda_stream_sync(e->stream, err);
}

hx_status hx_cuda_engine_new(const char *dir, const hx_cuda_options *opt, hx_cuda_engine **out,
                             hx_err *err)
{
    *out = NULL;
    hx_model cfg;
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    hx_status st = hx_model_load_file(path, NULL, &cfg, err);
    if (st != HX_OK)
        return st;
    if ((st = check_model(&cfg, dir, err)) != HX_OK)
        return st;
    loader ld = {.dir = dir};
    hx_cuda_engine *e = NULL;
    if ((st = engine_start(&cfg, opt, &e, err)) != HX_OK)
        return st;
    ld.e = e;
    /* tied: a file may still hold lm_head (as runtime/llama.c reads it) */
    if ((st = hx_safetensors_index_open(dir, &ld.ix, err)) != HX_OK)
        goto out_free;
    if (e->cfg.tied_embeddings) {
        hx_safetensors_tensor probe;
        if (hx_safetensors_index_find(ld.ix, "lm_head.weight", &probe, NULL) == HX_OK)
            e->cfg.tied_embeddings = 0;
    }
    if ((st = alloc_weights(e, err)) != HX_OK)
        goto out_free;
    if ((st = hx_cuda_malloc(&ld.staging, STAGING_BYTES, err)) != HX_OK)
        goto out_free;
    ld.host = malloc((size_t)e->hid * sizeof *ld.host);
    if (!ld.host) {
        st = hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
        goto out_free;
    }
    if ((st = load_weights(&ld, err)) != HX_OK)
        goto out_free;
    hx_cuda_free(ld.staging);
    ld.staging = NULL;
    free(ld.host);
    ld.host = NULL;
    hx_safetensors_index_free(ld.ix);
    ld.ix = NULL;
    e->cfg.tied_embeddings = cfg.tied_embeddings;
    if ((st = setup_buffers(e, err)) != HX_OK)
        goto out_free;
    *out = e;
    return HX_OK;
out_free:
    if (ld.staging && e && e->stream)
        (void)hx_cuda_stream_sync(e->stream, NULL);
    hx_cuda_free(ld.staging);
    free(ld.host);
    hx_safetensors_index_free(ld.ix);
    hx_cuda_engine_free(e);
    return st;
}

/* ---- the group's other ranks ---- */

hx_status hx_cuda_engine_set_comm(hx_cuda_engine *e, const hx_batch_comm *comm, hx_err *err)
{
    const char *missing =
        !comm ? "the comm" : hx_batch_comm_missing(&e->site, comm, e->nccl != NULL);
    if (missing)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: layers %d-%d at TP rank %d of %d: %s is missing",
                          e->l0, e->l0 + e->L - 1, e->opt.tp_rank, e->tp, missing);
    e->comm = *comm;
    e->has_comm = 1;
    return HX_OK;
}

hx_status hx_cuda_engine_set_nccl(hx_cuda_engine *e, hx_cuda_nccl *tp_comm, double timeout_s,
                                  hx_err *err)
{
    if (tp_comm && (e->tp < 2 || hx_cuda_nccl_size(tp_comm) != e->tp ||
                    hx_cuda_nccl_rank(tp_comm) != e->opt.tp_rank))
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: TP rank %d of %d cannot use an NCCL communicator of "
                          "rank %d of %d",
                          e->opt.tp_rank, e->tp, hx_cuda_nccl_rank(tp_comm),
                          hx_cuda_nccl_size(tp_comm));
    if (e->nccl != tp_comm)
        drop_graphs(e);
    e->nccl = tp_comm;
    e->nccl_timeout_s = timeout_s > 0 ? timeout_s : 60.0;
    if (!tp_comm && e->tp > 1 && e->has_comm && !e->comm.allreduce) {
        e->has_comm = 0; /* steps refuse, rather than call a missing all-reduce */
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: TP rank %d of %d left NCCL, and its comm has no "
                          "allreduce",
                          e->opt.tp_rank, e->tp);
    }
    return HX_OK;
}

void hx_cuda_engine_slice(const hx_cuda_engine *e, int *layer_first, int *num_layers,
                          int *kv_head_first, int *kv_heads)
{
    if (layer_first)
        *layer_first = e->l0;
    if (num_layers)
        *num_layers = e->L;
    if (kv_head_first)
        *kv_head_first = e->kh0;
    if (kv_heads)
        *kv_heads = e->K;
}

/* ---- queries ---- */

const hx_model *hx_cuda_engine_config(const hx_cuda_engine *e)
{
    return &e->cfg;
}

int hx_cuda_engine_seq_count(const hx_cuda_engine *e)
{
    return e->n_live;
}

int hx_cuda_engine_free_blocks(const hx_cuda_engine *e)
{
    return e->n_free;
}

static int blocks_for(const hx_cuda_engine *e, int n_prompt, int max_new)
{
    const int64_t pos = (int64_t)n_prompt + max_new - 1;
    return (int)((pos + e->opt.block_tokens - 1) / e->opt.block_tokens);
}

int hx_cuda_engine_can_admit(const hx_cuda_engine *e, int n_prompt, int max_new_tokens)
{
    if (n_prompt < 1 || max_new_tokens < 1 ||
        (int64_t)n_prompt + max_new_tokens - 1 > e->opt.max_seq_tokens)
        return 0;
    return e->n_live < e->S && blocks_for(e, n_prompt, max_new_tokens) <= e->n_free;
}

int64_t hx_cuda_engine_weight_bytes(const hx_cuda_engine *e)
{
    return e->weight_bytes;
}

int64_t hx_cuda_engine_kv_bytes_per_token(const hx_cuda_engine *e)
{
    return (int64_t)e->L * 2 * e->K * e->D * 2;
}

void hx_cuda_engine_stats(const hx_cuda_engine *e, int64_t *steps, int64_t *graph_steps)
{
    if (steps)
        *steps = e->steps;
    if (graph_steps)
        *graph_steps = e->graph_steps;
}

int64_t hx_cuda_engine_decode1_steps(const hx_cuda_engine *e)
{
    return e->decode1_steps;
}

static int find_slot(const hx_cuda_engine *e, uint64_t id)
{
    for (int i = 0; i < e->n_live; i++)
        if (e->seqs[e->order[i]].id == id)
            return e->order[i];
    return -1;
}

int hx_cuda_engine_seq_tokens(const hx_cuda_engine *e, uint64_t id)
{
    const int slot = find_slot(e, id);
    return slot < 0 ? -1 : e->seqs[slot].kv_len;
}

/* ---- admission ---- */

static void release_slot(hx_cuda_engine *e, int slot)
{
    seq *s = &e->seqs[slot];
    const int *row = e->h_bt + (size_t)slot * e->mbps;
    for (int i = s->n_blocks - 1; i >= 0; i--)
        e->free_list[e->n_free++] = row[i];
    free(s->prompt);
    memset(s, 0, sizeof *s);
    for (int i = 0; i < e->n_live; i++)
        if (e->order[i] == slot) {
            memmove(e->order + i, e->order + i + 1, (size_t)(e->n_live - i - 1) * sizeof(int));
            e->n_live--;
            break;
        }
}

/* Checks a request (as runtime/batch.c's admit) and takes a slot and its blocks. */
static hx_status admit(hx_cuda_engine *e, const hx_batch_request *r, int *slot_out, hx_err *err)
{
    hx_status st = hx_batch_check_request("cuda engine", r, e->V, e->opt.max_seq_tokens, err);
    if (st != HX_OK)
        return st;
    /* the device samples: the checks hx_llama_sampler_new makes on the CPU */
    if (!(r->temperature >= 0.0f) || !isfinite(r->temperature))
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: temperature %g is not a number >= 0",
                          (unsigned long long)r->id, (double)r->temperature);
    if (!(r->top_p >= 0.0f && r->top_p <= 1.0f))
        return hx_err_set(err, HX_EINVAL, "cuda engine: request %llu: top_p %g is not in [0, 1]",
                          (unsigned long long)r->id, (double)r->top_p);
    if (find_slot(e, r->id) >= 0)
        return hx_err_set(err, HX_EINVAL, "cuda engine: request %llu is already in the engine",
                          (unsigned long long)r->id);
    if (e->n_live == e->S)
        return hx_err_set(err, HX_ENOMEM,
                          "cuda engine: request %llu: all %d sequence slots are taken",
                          (unsigned long long)r->id, e->S);
    const int need = blocks_for(e, r->n_prompt, r->max_new_tokens);
    if (need > e->n_free)
        return hx_err_set(err, HX_ENOMEM,
                          "cuda engine: request %llu: %d KV blocks needed, %d free of %d",
                          (unsigned long long)r->id, need, e->n_free, e->opt.max_blocks);
    int slot = 0;
    while (e->seqs[slot].used)
        slot++;
    seq *s = &e->seqs[slot];
    memset(s, 0, sizeof *s);
    s->used = 1;
    s->id = r->id;
    s->n_prompt = r->n_prompt;
    s->max_new = r->max_new_tokens;
    s->eos = r->eos_id;
    s->hold = r->hold_kv != 0;
    s->temperature = r->temperature;
    s->top_p = r->top_p;
    int *row = e->h_bt + (size_t)slot * e->mbps;
    for (int i = 0; i < need; i++)
        row[i] = e->free_list[--e->n_free];
    for (int i = need; i < e->mbps; i++)
        row[i] = e->opt.max_blocks; /* scratch: never read for a valid position */
    s->n_blocks = need;
    e->order[e->n_live++] = slot;
    const uint64_t rng = hx_cuda_rng_init(r->seed);
    st = hx_cuda_memcpy_async(e->d_bt + (size_t)slot * e->mbps, row,
                              (size_t)e->mbps * sizeof(int), e->stream, err);
    if (st == HX_OK)
        st = hx_cuda_memcpy_async(e->d_rng + slot, &rng, sizeof rng, e->stream, err);
    if (st == HX_OK)
        st = hx_cuda_stream_sync(e->stream, err);
    if (st != HX_OK) {
        release_slot(e, slot);
        return st;
    }
    *slot_out = slot;
    return HX_OK;
}

hx_status hx_cuda_engine_add(hx_cuda_engine *e, const hx_batch_request *req, hx_err *err)
{
    if (!req->prompt)
        return hx_err_set(err, HX_EINVAL, "cuda engine: request %llu has no prompt",
                          (unsigned long long)req->id);
    hx_status st = hx_cuda_set_device(e->opt.device, err);
    if (st != HX_OK)
        return st;
    int slot = -1;
    if ((st = admit(e, req, &slot, err)) != HX_OK)
        return st;
    seq *s = &e->seqs[slot];
    s->prompt = malloc((size_t)req->n_prompt * sizeof *s->prompt);
    if (!s->prompt) {
        release_slot(e, slot);
        return hx_err_set(err, HX_ENOMEM, "cuda engine: request %llu: out of memory",
                          (unsigned long long)req->id);
    }
    memcpy(s->prompt, req->prompt, (size_t)req->n_prompt * sizeof *s->prompt);
    return HX_OK;
}

static hx_status check_segment(const hx_cuda_engine *e, const hx_batch_request *req, int i,
                               const hx_kv_segment *g, hx_err *err)
{
    const unsigned long long id = (unsigned long long)req->id;
    if (g->token_first != 0 || g->tokens != req->n_prompt)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: segment %d holds positions %d-%lld; the "
                          "prompt's are 0-%d",
                          id, i, g->token_first, (long long)g->token_first + g->tokens - 1,
                          req->n_prompt - 1);
    const int eb = hx_kv_dtype_bytes(g->dtype);
    if (eb == 0)
        return hx_err_set(err, HX_EINVAL, "cuda engine: request %llu: segment %d: dtype %d", id,
                          i, g->dtype);
    if (g->head_dim != e->D)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: segment %d: head_dim %d, the model's is %d",
                          id, i, g->head_dim, e->D);
    if (g->num_layers < 1 || g->num_heads < 1 || g->layer_first < e->l0 ||
        g->head_first < e->kh0 || g->layer_first - e->l0 > e->L - g->num_layers ||
        g->head_first - e->kh0 > e->K - g->num_heads)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: segment %d: layers [%d, +%d) or KV heads "
                          "[%d, +%d) outside this engine's layers [%d, +%d) and KV heads "
                          "[%d, +%d)",
                          id, i, g->layer_first, g->num_layers, g->head_first, g->num_heads,
                          e->l0, e->L, e->kh0, e->K);
    const size_t seg = hx_kv_segment_bytes(g->dtype, g->num_layers, g->num_heads, g->tokens,
                                           g->head_dim);
    const uint64_t want = seg ? (uint64_t)(seg - HX_KV_SEGMENT_HEADER_BYTES) : 0;
    if (g->payload_bytes != want || !g->payload || ((uintptr_t)g->payload % eb) != 0)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: segment %d: payload of %llu bytes at %p "
                          "(expected %llu, %d-byte aligned)",
                          id, i, (unsigned long long)g->payload_bytes, g->payload,
                          (unsigned long long)want, eb);
    return HX_OK;
}

hx_status hx_cuda_engine_add_prefilled(hx_cuda_engine *e, const hx_batch_request *req,
                                       int first_token, const hx_kv_segment *segs, int n_segs,
                                       hx_err *err)
{
    const unsigned long long id = (unsigned long long)req->id;
    hx_status st = hx_batch_check_prefilled("cuda engine", req, first_token, n_segs, e->V, err);
    if (st != HX_OK)
        return st;
    unsigned char *covered = calloc((size_t)e->L * e->K, 1);
    if (!covered)
        return hx_err_set(err, HX_ENOMEM, "cuda engine: out of memory");
    for (int i = 0; i < n_segs && st == HX_OK; i++) {
        const hx_kv_segment *g = &segs[i];
        if ((st = check_segment(e, req, i, g, err)) != HX_OK)
            break;
        for (int l = 0; l < g->num_layers; l++)
            memset(covered + (size_t)(g->layer_first - e->l0 + l) * e->K +
                       (g->head_first - e->kh0),
                   1, (size_t)g->num_heads);
    }
    for (int i = 0; st == HX_OK && i < e->L * e->K; i++)
        if (!covered[i])
            st = hx_err_set(err, HX_EINVAL,
                            "cuda engine: request %llu: the segments leave layer %d, KV head %d "
                            "uncovered",
                            id, e->l0 + i / e->K, e->kh0 + i % e->K);
    free(covered);
    if (st != HX_OK)
        return st;
    if ((st = hx_cuda_set_device(e->opt.device, err)) != HX_OK)
        return st;
    hx_batch_request r = *req;
    r.prompt = NULL;
    int slot = -1;
    if ((st = admit(e, &r, &slot, err)) != HX_OK)
        return st;
    const int *d_row = e->d_bt + (size_t)slot * e->mbps;
    for (int i = 0; i < n_segs && st == HX_OK; i++) {
        const hx_kv_segment *g = &segs[i];
        const int bf16 = g->dtype == HX_KV_DTYPE_BF16;
        const size_t layer_bytes = (size_t)2 * g->num_heads * g->tokens * g->head_dim *
                                   (size_t)hx_kv_dtype_bytes(g->dtype);
        for (int l0 = 0; l0 < g->num_layers && st == HX_OK; l0 += e->seg_layers) {
            const int nl = g->num_layers - l0 < e->seg_layers ? g->num_layers - l0 : e->seg_layers;
            st = hx_cuda_memcpy_async(e->d_seg,
                                      (const unsigned char *)g->payload + (size_t)l0 * layer_bytes,
                                      (size_t)nl * layer_bytes, e->stream, err);
            if (st == HX_OK)
                st = hx_cuda_kv_unpack(e->kv, e->d_seg, bf16, &e->kvl, d_row,
                                       g->layer_first - e->l0 + l0, nl, g->head_first - e->kh0,
                                       g->num_heads, 0, g->tokens, e->stream, err);
        }
    }
    if (st == HX_OK)
        st = hx_cuda_stream_sync(e->stream, err);
    if (st != HX_OK) {
        release_slot(e, slot);
        return st;
    }
    seq *s = &e->seqs[slot];
    s->prefilled = req->n_prompt;
    s->kv_len = req->n_prompt;
    s->n_gen = 1;
    s->last = first_token;
    return HX_OK;
}

hx_status hx_cuda_engine_remove(hx_cuda_engine *e, uint64_t id, hx_err *err)
{
    const int slot = find_slot(e, id);
    if (slot < 0)
        return hx_err_set(err, HX_ENOENT, "cuda engine: no request %llu",
                          (unsigned long long)id);
    release_slot(e, slot);
    return HX_OK;
}

/* ---- KV segments out ---- */

/* ---- CRC-32C in pieces ---- */

#define CRC32C_POLY 0x82f63b78u /* reflected Castagnoli */

/* a(x) b(x) mod p(x), reflected (zlib's multmodp) */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ CRC32C_POLY : b >> 1;
    }
    return p;
}

/* x^(n 2^k) mod p(x) */
static uint32_t x2nmodp(uint64_t n, unsigned k)
{
    uint32_t p = 1u << 31;  /* x^0 */
    uint32_t sq = 1u << 30; /* x^1, squared k times: x^(2^k) */
    for (unsigned i = 0; i < k; i++)
        sq = multmodp(sq, sq);
    while (n) {
        if (n & 1)
            p = multmodp(sq, p);
        n >>= 1;
        sq = multmodp(sq, sq);
    }
    return p;
}

uint32_t hx_cuda_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    return multmodp(x2nmodp(len2, 3), crc1) ^ crc2;
}

typedef struct crc_job {
    const unsigned char *data;
    size_t n, piece;
    uint32_t crc[CRC_MAX_PIECES];
} crc_job;

static void crc_piece(void *ctx, int chunk, int n_chunks, int thread)
{
    (void)n_chunks;
    (void)thread;
    crc_job *j = ctx;
    const size_t at = (size_t)chunk * j->piece;
    const size_t len = j->n - at < j->piece ? j->n - at : j->piece;
    j->crc[chunk] = hx_kv_crc32c(0, j->data + at, len);
}

/* hx_kv_crc32c(crc, data, n), the data split over the pool's threads. */
static uint32_t crc_parallel(hx_cpu_pool *pool, uint32_t crc, const unsigned char *data, size_t n)
{
    const int threads = hx_cpu_pool_threads(pool);
    if (threads < 2 || n < 2 * CRC_CHUNK_BYTES)
        return hx_kv_crc32c(crc, data, n);
    size_t pieces = n / CRC_CHUNK_BYTES;
    if (pieces > (size_t)threads * 4)
        pieces = (size_t)threads * 4;
    if (pieces > CRC_MAX_PIECES)
        pieces = CRC_MAX_PIECES;
    crc_job job = {.data = data, .n = n, .piece = (n + pieces - 1) / pieces};
    const int n_pieces = (int)((n + job.piece - 1) / job.piece);
    hx_cpu_pool_run(pool, crc_piece, &job, n_pieces);
    for (int i = 0; i < n_pieces; i++) {
        const size_t at = (size_t)i * job.piece;
        const size_t len = n - at < job.piece ? n - at : job.piece;
        crc = hx_cuda_crc32c_combine(crc, job.crc[i], len);
    }
    return crc;
}

/*
 * Waits for the engine's stream. With NCCL in the step, a peer that died
 * would leave the all-reduce waiting for ever: the wait watches the
 * communicator and gives up after nccl_timeout_s, aborting it.
 */
static hx_status sync_stream(hx_cuda_engine *e, hx_err *err)
{
    if (e->nccl)
        return hx_cuda_nccl_wait(e->nccl, e->stream, e->nccl_timeout_s, err);
    return hx_cuda_stream_sync(e->stream, err);
}

/* The slot and positions of request id's KV, checking the ranges to pack. */
static hx_status pack_check(const hx_cuda_engine *e, uint64_t id, int layer_first, int num_layers,
                            int head_first, int num_heads, int *slot_out, int *tokens_out,
                            hx_err *err)
{
    const int slot = find_slot(e, id);
    if (slot < 0)
        return hx_err_set(err, HX_ENOENT, "cuda engine: no request %llu",
                          (unsigned long long)id);
    const int tokens = e->seqs[slot].kv_len;
    if (tokens < 1 || num_layers < 1 || num_heads < 1 || layer_first < e->l0 ||
        head_first < e->kh0 || layer_first - e->l0 > e->L - num_layers ||
        head_first - e->kh0 > e->K - num_heads)
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: request %llu: cannot pack layers [%d, +%d), KV heads "
                          "[%d, +%d) of %d positions (this engine holds layers [%d, +%d), KV "
                          "heads [%d, +%d))",
                          (unsigned long long)id, layer_first, num_layers, head_first, num_heads,
                          tokens, e->l0, e->L, e->kh0, e->K);
    *slot_out = slot;
    *tokens_out = tokens;
    return HX_OK;
}

hx_status hx_cuda_engine_pack_kv_device(hx_cuda_engine *e, uint64_t id, int layer_first,
                                        int num_layers, int head_first, int num_heads,
                                        void *d_out, size_t out_size, size_t *out_bytes,
                                        hx_err *err)
{
    int slot = -1, tokens = 0;
    hx_status st = pack_check(e, id, layer_first, num_layers, head_first, num_heads, &slot,
                              &tokens, err);
    if (st != HX_OK)
        return st;
    /* the payload of hx_cuda_engine_pack_kv's segment (pack_check: counts within the cache) */
    const size_t need =
        hx_kv_segment_bytes(HX_KV_DTYPE_BF16, num_layers, num_heads, tokens, e->D) -
        HX_KV_SEGMENT_HEADER_BYTES;
    if (out_size < need || ((uintptr_t)d_out % 16) != 0)
        return hx_err_set(err, HX_ERANGE,
                          "cuda engine: request %llu: the payload needs %zu bytes (16-byte "
                          "aligned); the buffer holds %zu",
                          (unsigned long long)id, need, out_size);
    if ((st = hx_cuda_set_device(e->opt.device, err)) != HX_OK)
        return st;
    st = hx_cuda_kv_pack(d_out, 1, e->kv, &e->kvl, e->d_bt + (size_t)slot * e->mbps,
                         layer_first - e->l0, num_layers, head_first - e->kh0, num_heads, 0,
                         tokens, e->stream, err);
    if (st == HX_OK)
        st = sync_stream(e, err);
    if (st == HX_OK && out_bytes)
        *out_bytes = need;
    return st;
}

hx_status hx_cuda_engine_pack_kv(hx_cuda_engine *e, uint64_t id, int layer_first,
                                 int num_layers, int head_first, int num_heads, void *out,
                                 size_t out_size, size_t *out_bytes, hx_err *err)
{
    int slot = -1, tokens = 0;
    hx_status pst = pack_check(e, id, layer_first, num_layers, head_first, num_heads, &slot,
                               &tokens, err);
    if (pst != HX_OK)
        return pst;
    const size_t need = hx_kv_segment_bytes(HX_KV_DTYPE_BF16, num_layers, num_heads, tokens, e->D);
    if (need == 0 || out_size < need)
        return hx_err_set(err, HX_ERANGE,
                          "cuda engine: request %llu: the segment needs %zu bytes; the buffer "
                          "holds %zu",
                          (unsigned long long)id, need, out_size);
    if (((uintptr_t)out % 2) != 0)
        return hx_err_set(err, HX_EINVAL, "cuda engine: segment buffer is not 2-byte aligned");
    hx_status st = hx_cuda_set_device(e->opt.device, err);
    if (st != HX_OK)
        return st;
    unsigned char *h = out;
    const uint64_t payload = (uint64_t)(need - HX_KV_SEGMENT_HEADER_BYTES);
    hx_kv_segment_begin(h, HX_KV_DTYPE_BF16, layer_first, num_layers, head_first, num_heads,
                        tokens, e->D);
    const size_t layer_bytes = (size_t)2 * num_heads * tokens * e->D * sizeof(hx_bf16);
    const int *d_row = e->d_bt + (size_t)slot * e->mbps;
    for (int l0 = 0; l0 < num_layers && st == HX_OK; l0 += e->seg_layers) {
        const int nl = num_layers - l0 < e->seg_layers ? num_layers - l0 : e->seg_layers;
        st = hx_cuda_kv_pack(e->d_seg, 1, e->kv, &e->kvl, d_row, layer_first - e->l0 + l0, nl,
                             head_first - e->kh0, num_heads, 0, tokens, e->stream, err);
        if (st == HX_OK)
            st = hx_cuda_memcpy_async(h + HX_KV_SEGMENT_HEADER_BYTES + (size_t)l0 * layer_bytes,
                                      e->d_seg, (size_t)nl * layer_bytes, e->stream, err);
    }
    if (st == HX_OK)
        st = hx_cuda_stream_sync(e->stream, err);
    if (st != HX_OK)
        return st;
    /* the payload's checksum on several threads (one runs at about 5 GB/s) */
    hx_kv_segment_seal(h, crc_parallel(e->crc_pool, hx_kv_segment_header_crc(h),
                                       h + HX_KV_SEGMENT_HEADER_BYTES, (size_t)payload));
    if (out_bytes)
        *out_bytes = need;
    return HX_OK;
}

/* ---- the step ---- */

/* Device address of the io field whose host view is p. */
static void *dio(const hx_cuda_engine *e, const void *p)
{
    return e->d_io + ((const unsigned char *)p - e->h_io);
}

/*
 * x += the sum over the stage's TP ranks of the partial sums in y
 * ([rows][hidden]): NCCL on the device when set, otherwise the comm's host
 * all-reduce on a copy in h_rows (page-locked).
 */
static hx_status reduce_add(hx_cuda_engine *e, int rows, int layer, const char *what, hx_err *err)
{
    const size_t n = (size_t)rows * e->hid;
    hx_status st;
    if (e->nccl) {
        st = hx_cuda_nccl_allreduce(e->nccl, e->y, n, 0, e->stream, err);
    } else {
        st = hx_cuda_memcpy_async(e->h_rows, e->y, n * 4, e->stream, err);
        if (st == HX_OK)
            st = hx_cuda_stream_sync(e->stream, err);
        if (st != HX_OK)
            return st;
        hx_err inner;
        inner.msg[0] = '\0';
        if ((st = e->comm.allreduce(e->comm.ctx, e->h_rows, n, &inner)) != HX_OK)
            return hx_batch_allreduce_failed(&e->site, layer, what, st, &inner, err);
        st = hx_cuda_memcpy_async(e->y, e->h_rows, n * 4, e->stream, err);
    }
    if (st == HX_OK)
        st = hx_cuda_add(e->x, e->y, (int64_t)n, e->stream, err);
    return st;
}

/*
 * y = x W^T added into the residual stream x: in place (beta 1) on a whole
 * layer; through y and the all-reduce on a TP slice.
 */
static hx_status project_add(hx_cuda_engine *e, const hx_bf16 *in, const hx_bf16 *w, int rows,
                             int n_in, int layer, const char *what, hx_err *err)
{
    if (e->tp == 1)
        return hx_cuda_gemm(e->blas, e->x, 0, in, w, rows, n_in, e->hid, 1.0f, e->stream, err);
    hx_status st = hx_cuda_gemm(e->blas, e->y, 0, in, w, rows, n_in, e->hid, 0.0f, e->stream, err);
    return st == HX_OK ? reduce_add(e, rows, layer, what, err) : st;
}

/*
 * On the side stream, once the main stream's work so far is done: asks L2 for
 * the first bytes of a[0..na) then of b[0..nb) (either may be NULL), at most
 * opt.l2_prefetch_mb MiB in all. The kernels issued meanwhile on the main
 * stream leave the memory bandwidth these take mostly idle.
 */
static hx_status prefetch(hx_cuda_engine *e, const void *a, size_t na, const void *b, size_t nb,
                          int *forked, hx_err *err)
{
    size_t left = (size_t)e->opt.l2_prefetch_mb << 20;
    hx_status st = hx_cuda_stream_wait(e->side, e->stream, e->side_ev, err);
    *forked |= st == HX_OK;
    for (int i = 0; i < 2 && st == HX_OK && left > 0; i++) {
        const void *p = i ? b : a;
        size_t n = i ? nb : na;
        n = n < left ? n : left;
        if (p && n)
            st = hx_cuda_prefetch_l2(p, n, e->side, err);
        left -= p ? n : 0;
    }
    return st;
}

/*
 * A one-row decode step's layers in one kernel (hx_cuda_decode1), with the
 * embedding (first stage) and the final norm and LM head (last stage,
 * unless decode1_head is off), when the engine has it: *ran = 1 when
 * enqueued; 0 when this step takes the kernels one by one (not a lone
 * decode row). A call that fails gives the kernel up for good (d_layers
 * NULL): HX_ENOTSUP (the device refuses it; nothing was enqueued) returns
 * HX_OK and the step goes on without; another error (a launch a capture
 * refuses) is the step's, whose caller may run it again without.
 */
static hx_status decode1(hx_cuda_engine *e, int rows, int n_dec, int n_pf, int *ran, hx_err *err)
{
    *ran = 0;
    if (!e->d_layers || rows != 1 || n_dec != 1 || n_pf != 0)
        return HX_OK;
    const hx_cuda_decode1_args a = {.d_x = e->x,
                                    .d_layers = e->d_layers,
                                    .n_layers = e->L,
                                    .hidden = e->hid,
                                    .heads = e->H,
                                    .ff = e->F,
                                    .eps = e->eps,
                                    .d_cache = e->kv,
                                    .kv = e->kvl,
                                    .d_block_tables = e->d_bt,
                                    .d_seq = dio(e, e->io_dec_slot),
                                    .d_pos = dio(e, e->io_pos),
                                    .d_kv_slot = dio(e, e->io_slot),
                                    .d_len = dio(e, e->io_dec_len),
                                    .d_cos = e->d_cos,
                                    .d_sin = e->d_sin,
                                    .d_q = e->q,
                                    .d_att = e->att,
                                    .d_act = e->act,
                                    .d_part = e->part,
                                    .max_parts = e->max_parts,
                                    .d_sync = e->d_sync,
                                    /* the step's ends too: the embedding, the final norm
                                       and the LM head (into row 0 of logits) */
                                    .d_embed = e->has_embed ? e->embed : NULL,
                                    .d_token = dio(e, e->io_tok),
                                    .d_final_norm = e->decode1_head ? e->final_norm : NULL,
                                    .d_lm_head = e->lm_head,
                                    .d_logits = e->logits,
                                    .vocab = e->V};
    hx_err why;
    hx_err_clear(&why);
    const hx_status st = hx_cuda_decode1(&a, e->stream, &why);
    *ran = st == HX_OK;
    if (st == HX_OK)
        return HX_OK;
    hx_cuda_free(e->d_layers);
    e->d_layers = NULL;
    if (st == HX_ENOTSUP)
        return HX_OK;
    if (err)
        *err = why;
    return st;
}

/*
 * Enqueues a step's forward pass and the copies in and out. A stage after
 * the first takes its rows from the comm (recv_rows) instead of the
 * embedding; a stage before the last gives them on (send_rows) instead of
 * sampling. Those and a host all-reduce wait for the stream, so only a whole
 * model at TP 1 (or with NCCL) runs without a host synchronisation.
 */
static hx_status forward(hx_cuda_engine *e, int rows, int n_dec, int n_pf, int max_pf_n,
                         int n_out, hx_err *err)
{
    hx_cuda_stream *s = e->stream;
    hx_cuda_blas *b = e->blas;
    const int hid = e->hid, hd = e->H * e->D;
    const size_t x_bytes = (size_t)rows * hid * 4;
    hx_err inner;
    inner.msg[0] = '\0';
    hx_status st = hx_cuda_memcpy_async(e->d_io, e->h_io, e->io_bytes, s, err);
    if (st == HX_OK && !e->has_embed) {
        /* h_rows is free: the previous step ended with the stream synchronised */
        if ((st = e->comm.recv_rows(e->comm.ctx, e->h_rows, rows, hid, &inner)) != HX_OK)
            return hx_batch_comm_failed(&e->site, st, "recv_rows", &inner, err);
        st = hx_cuda_memcpy_async(e->x, e->h_rows, x_bytes, s, err);
    }
    /* one decode row: every layer in one kernel (the embedding, final norm and LM head
       too), when the engine has it */
    int one = 0;
    if (st == HX_OK)
        st = decode1(e, rows, n_dec, n_pf, &one, err);
    e->fwd_decode1 = one;
    if (st == HX_OK && !one && e->has_embed)
        st = hx_cuda_embed(e->x, e->embed, dio(e, e->io_tok), rows, hid, e->V, s, err);
    /* a decode step that streams the weights: L2 prefetches on the side stream */
    const int pf = !one && e->side && n_pf == 0 && rows <= e->opt.gemv_max_rows;
    int forked = 0; /* the side stream waits on this step's work: join it back, error or not */
    const size_t wo_bytes = (size_t)hid * hd * 2, wgu_bytes = (size_t)2 * e->F * hid * 2,
                 wqkv_bytes = (size_t)e->qkv_n * hid * 2;
    for (int l = 0; !one && l < e->L && st == HX_OK; l++) {
        const layer_w *w = &e->layers[l];
        /* x holds the residual stream: the o and down projections add into it, and the
           norms run inside the GEMVs that follow them (a decode step's few rows) */
        if ((st = hx_cuda_gemm_rmsnorm_rope_kv(b, e->q, e->kv, e->qkv, e->x, w->attn_norm,
                                               e->eps, e->h, w->wqkv, rows, hid, e->H, &e->kvl,
                                               l, dio(e, e->io_pos), dio(e, e->io_slot),
                                               e->d_cos, e->d_sin, s, err)) ||
            (pf && (st = prefetch(e, w->wo, wo_bytes, w->wgu, wgu_bytes, &forked, err))))
            break;
        if (n_dec &&
            (st = hx_cuda_decode_attention(e->att, e->q, e->kv, &e->kvl, l, e->d_bt,
                                           dio(e, e->io_dec_slot), dio(e, e->io_dec_row),
                                           dio(e, e->io_dec_len), n_dec, e->max_parts, e->H,
                                           e->part, s, err)))
            break;
        if (n_pf &&
            (st = hx_cuda_prefill_attention(e->att, e->q, e->kv, &e->kvl, l, e->d_bt,
                                            dio(e, e->io_pf_slot), dio(e, e->io_pf_row0),
                                            dio(e, e->io_pf_pos0), dio(e, e->io_pf_n), n_pf,
                                            max_pf_n, e->H, s, err)))
            break;
        if ((st = project_add(e, e->att, w->wo, rows, hd, l, "o", err)) ||
            (st = hx_cuda_gemm_rmsnorm_swiglu(b, e->act, e->gu, e->x, w->ffn_norm, e->eps, e->h,
                                              w->wgu, rows, hid, e->F, s, err)))
            break;
        if (pf) { /* while down runs: the next q/k/v weights, or the LM head's */
            const int last = l + 1 == e->L;
            const void *next = !last ? (const void *)e->layers[l + 1].wqkv
                                     : e->has_head ? (const void *)e->lm_head : NULL;
            const size_t n = !last ? wqkv_bytes : (size_t)e->V * hid * 2;
            if (next && (st = prefetch(e, next, n, NULL, 0, &forked, err)) != HX_OK)
                break;
        }
        if ((st = project_add(e, e->act, w->wdown, rows, e->F, l, "down", err)))
            break;
    }
    /* the side stream joins back (a capture must end joined; the first error stays) */
    if (forked) {
        hx_err jerr;
        jerr.msg[0] = '\0';
        hx_status j = hx_cuda_stream_wait(e->stream, e->side, e->side_ev, st ? &jerr : err);
        st = st ? st : j;
    }
    if (st != HX_OK)
        return st;
    if (!e->has_head) { /* the next stage goes on from these rows */
        st = hx_cuda_memcpy_async(e->h_rows, e->x, x_bytes, s, err);
        if (st == HX_OK)
            st = sync_stream(e, err);
        if (st == HX_OK &&
            (st = e->comm.send_rows(e->comm.ctx, e->h_rows, rows, hid, &inner)) != HX_OK)
            return hx_batch_comm_failed(&e->site, st, "send_rows", &inner, err);
        return st;
    }
    if (n_out == 0) /* prompt chunks that finish no prompt: nothing to sample */
        return st;
    if (!(one && e->decode1_head)) { /* else the one-row kernel wrote row 0's logits */
        st = hx_cuda_add_rmsnorm(e->x, NULL, e->final_norm, e->hn, dio(e, e->io_out_row), n_out,
                                 hid, e->eps, s, err);
        if (st == HX_OK)
            st = hx_cuda_gemm(b, e->logits, 0, e->hn, e->lm_head, n_out, hid, e->V, 0.0f, s, err);
    }
    if (st == HX_OK)
        st = hx_cuda_sample(e->d_tok_out, e->logits, n_out, e->V, dio(e, e->io_temp),
                            dio(e, e->io_topp), dio(e, e->io_out_slot), e->d_rng, s, err);
    if (st == HX_OK)
        st = hx_cuda_memcpy_async(e->h_tok_out, e->d_tok_out, (size_t)n_out * sizeof(int), s,
                                  err);
    if (st == HX_OK && e->opt.logits)
        st = hx_cuda_memcpy_async(e->h_logits, e->logits, (size_t)n_out * e->V * 4, s, err);
    return st;
}

/* The io entries of row `row` feeding token `tok` at position `pos` of slot's sequence. */
static void put_row(hx_cuda_engine *e, int row, int slot, int tok, int pos)
{
    const int bt = e->opt.block_tokens;
    e->io_tok[row] = tok;
    e->io_pos[row] = pos;
    e->io_slot[row] = e->h_bt[(size_t)slot * e->mbps + pos / bt] * bt + pos % bt;
}

static void put_out(hx_cuda_engine *e, int i, int row, int slot, int decoding)
{
    const seq *s = &e->seqs[slot];
    e->io_out_row[i] = row;
    e->io_out_slot[i] = slot;
    e->io_temp[i] = s->temperature;
    e->io_topp[i] = s->top_p;
    e->out[i] = (out_src){.slot = slot, .decoding = decoding};
}

hx_status hx_cuda_engine_step(hx_cuda_engine *e, const hx_batch_event **events, int *n_events,
                              hx_err *err)
{
    *events = e->events;
    *n_events = 0;
    hx_status st = hx_cuda_set_device(e->opt.device, err);
    if (st != HX_OK)
        return st;
    int rows = 0, n_dec = 0, n_pf = 0, n_out = 0, max_pf_n = 0;
    /* decode rows, in the order added */
    for (int i = 0; i < e->n_live; i++) {
        const int slot = e->order[i];
        const seq *s = &e->seqs[slot];
        if (s->done || s->prefilled < s->n_prompt || s->n_gen < 1)
            continue;
        put_row(e, rows, slot, s->last, s->kv_len);
        e->io_dec_slot[n_dec] = slot;
        e->io_dec_row[n_dec] = rows;
        e->io_dec_len[n_dec] = s->kv_len + 1;
        put_out(e, n_out++, rows, slot, 1);
        n_dec++;
        rows++;
    }
    /* prompt chunks in the room left, oldest first */
    int room = e->T - rows;
    for (int i = 0; i < e->n_live && room > 0; i++) {
        const int slot = e->order[i];
        const seq *s = &e->seqs[slot];
        if (s->done || s->prefilled >= s->n_prompt)
            continue;
        const int n = s->n_prompt - s->prefilled < room ? s->n_prompt - s->prefilled : room;
        for (int t = 0; t < n; t++)
            put_row(e, rows + t, slot, s->prompt[s->prefilled + t], s->prefilled + t);
        e->io_pf_slot[n_pf] = slot;
        e->io_pf_row0[n_pf] = rows;
        e->io_pf_pos0[n_pf] = s->prefilled;
        e->io_pf_n[n_pf] = n;
        if (s->prefilled + n == s->n_prompt)
            put_out(e, n_out++, rows + n - 1, slot, 0);
        if (n > max_pf_n)
            max_pf_n = n;
        n_pf++;
        rows += n;
        room -= n;
    }
    if (rows == 0)
        return HX_OK;

    if (!e->has_comm && !hx_batch_site_alone(&e->site))
        return hx_err_set(err, HX_EINVAL,
                          "cuda engine: layers %d-%d at TP rank %d of %d need a comm "
                          "(hx_cuda_engine_set_comm) to step",
                          e->l0, e->l0 + e->L - 1, e->opt.tp_rank, e->tp);
    /* graphs hold no host work: only a whole model, at TP 1 or summing over NCCL, replays
       them (the tokens reach the other TP ranks after the step, outside the graph) */
    const int graphs =
        e->opt.graphs && e->has_embed && e->has_head && (e->tp == 1 || e->nccl != NULL);
    int used_graph = 0;
    e->fwd_decode1 = 0;
    if (n_pf == 0 && graphs) {
        int bi = 0;
        while (e->bucket[bi] < n_dec)
            bi++;
        const int B = e->bucket[bi];
        /* padding rows: the scratch sequence (row max_seqs of the block tables) */
        const int scratch_slot = e->opt.max_blocks * e->opt.block_tokens;
        for (int r = n_dec; r < B; r++) {
            e->io_tok[r] = 0;
            e->io_pos[r] = 0;
            e->io_slot[r] = scratch_slot;
            e->io_dec_slot[r] = e->S;
            e->io_dec_row[r] = r;
            e->io_dec_len[r] = 1;
            e->io_out_row[r] = r;
            e->io_out_slot[r] = e->S;
            e->io_temp[r] = 0.0f;
            e->io_topp[r] = 1.0f;
        }
        if (e->graph[bi]) {
            st = hx_cuda_graph_launch(e->graph[bi], e->stream, err);
            used_graph = 1;
            e->fwd_decode1 = e->graph_decode1[bi];
        } else if (e->bucket_uses[bi] >= 1) {
            /* second use: capture (the first ran eagerly, loading every kernel) */
            const int had_decode1 = e->d_layers != NULL;
            st = hx_cuda_graph_begin(e->stream, err);
            if (st == HX_OK) {
                st = forward(e, B, B, 0, 0, B, err);
                if (st != HX_OK)
                    hx_cuda_graph_abort(e->stream);
                else
                    st = hx_cuda_graph_end(e->stream, &e->graph[bi], err);
            }
            if (st != HX_OK && had_decode1 && !e->d_layers) {
                /* the capture refused the one-row kernel: without it, now eagerly;
                   captured at the next use */
                hx_err_clear(err);
                st = forward(e, B, B, 0, 0, B, err);
            } else if (st == HX_OK) {
                e->graph_decode1[bi] = e->fwd_decode1;
                st = hx_cuda_graph_launch(e->graph[bi], e->stream, err);
                used_graph = 1;
            }
        } else {
            st = forward(e, B, B, 0, 0, B, err);
        }
        e->bucket_uses[bi]++;
    } else {
        st = forward(e, rows, n_dec, n_pf, max_pf_n, n_out, err);
    }
    if (st == HX_OK)
        st = sync_stream(e, err);
    if (st != HX_OK) {
        /* what was queued before the failure must finish before the host buffers it
           reads (h_io, h_rows) are written again (after an NCCL abort, whose kernels
           then exit, the wait through NCCL returns at once: wait for the stream itself) */
        if (sync_stream(e, NULL) != HX_OK)
            (void)hx_cuda_stream_sync(e->stream, NULL);
        return st;
    }
    /* the last stage's rank 0 publishes its tokens; every other engine takes them */
    if ((st = hx_batch_comm_tokens(&e->comm, &e->site, e->h_tok_out, n_out, e->V, err)) != HX_OK)
        return st;
    e->steps++;
    e->graph_steps += used_graph;
    e->decode1_steps += e->fwd_decode1;

    /* prompt progress */
    for (int i = 0; i < n_pf; i++) {
        seq *s = &e->seqs[e->io_pf_slot[i]];
        s->prefilled += e->io_pf_n[i];
        s->kv_len += e->io_pf_n[i];
    }
    /* events, in row order: decode rows, then finished prompts */
    int n_ev = 0;
    for (int i = 0; i < n_out; i++) {
        seq *s = &e->seqs[e->out[i].slot];
        const int tok = e->h_tok_out[i];
        if (e->out[i].decoding)
            s->kv_len++; /* the fed token is now in the cache */
        const int index = s->n_gen++;
        s->last = tok;
        const int finished = s->n_gen >= s->max_new || tok == s->eos;
        e->events[n_ev++] = (hx_batch_event){
            .id = s->id,
            .token = tok,
            .index = index,
            .finished = finished,
            .logits = e->h_logits && e->has_head ? e->h_logits + (size_t)i * e->V : NULL};
    }
    /* finished sequences leave (or stay, done, holding their KV) */
    for (int i = 0; i < n_out; i++) {
        const int slot = e->out[i].slot;
        if (!e->events[i].finished)
            continue;
        if (e->seqs[slot].hold)
            e->seqs[slot].done = 1;
        else
            release_slot(e, slot);
    }
    *n_events = n_ev;
    return HX_OK;
}
