/*
 * llama_weights.h - read access to a loaded model's fp32 weights and to a
 * state's contiguous KV cache, for engines that run the forward pass their
 * own way (runtime/batch.h batches many requests; a prefill worker packs a
 * state's KV into segments, runtime/kvcache.h).
 *
 * These read struct hx_llama and struct hx_llama_state, which are private to
 * runtime/llama.c, so they are implemented there.
 *
 * Pointers: everything returned is borrowed from the model or the state and
 * valid while it lives; nothing may be written through it.
 */
#ifndef HX_LLAMA_WEIGHTS_H
#define HX_LLAMA_WEIGHTS_H

#include "common/status.h"
#include "kernels/cpu/cpu.h"
#include "runtime/llama.h"

/*
 * The tensor-parallel slice a model holds (see llama.h). Plain value. For
 * tp_size 1: every head and the whole intermediate dimension. Query heads:
 * q_heads = heads / tp each, q_head_first = tp_rank * q_heads; local query
 * head j uses local KV head j / (q_heads / kv_heads). The intermediate
 * rows need not split evenly (ff_size may differ by one between ranks).
 */
typedef struct hx_llama_slice {
    int tp_rank, tp_size;
    int q_head_first, q_heads;   /* model-wide query heads held */
    int kv_head_first, kv_heads; /* model-wide KV heads held (hx_kv_rank_heads) */
    int ff_first, ff_size;       /* intermediate rows held: [ff_first, ff_first + ff_size) */
} hx_llama_slice;

void hx_llama_slice_of(const hx_llama *m, hx_llama_slice *out);

/*
 * The slice rank tp_rank of a stage of degree tp_size holds of model c (the
 * rule above, for every engine): HX_EINVAL naming `who` ("model 'dir'"),
 * tp and the head counts when the model does not split that way (tp must
 * divide the heads, and divide or be a multiple of the KV heads).
 */
hx_status hx_llama_slice_plan(const hx_model *c, const char *who, int tp_rank, int tp_size,
                              hx_llama_slice *out, hx_err *err);

/*
 * One decoder layer's weights (fp32, Linear weights [out][in]). Plain value,
 * borrowed. For a TP slice the shapes are the slice's: heads = q_heads,
 * kv_heads = the slice's kv_heads, intermediate = ff_size.
 */
typedef struct hx_llama_layer_weights {
    const float *attn_norm; /* [hidden] */
    const float *wq;        /* [heads * head_dim][hidden] */
    const float *wk;        /* [kv_heads * head_dim][hidden] */
    const float *wv;        /* [kv_heads * head_dim][hidden] */
    const float *wo;        /* [hidden][heads * head_dim] */
    const float *ffn_norm;  /* [hidden] */
    const float *w_gate;    /* [intermediate][hidden] */
    const float *w_up;      /* [intermediate][hidden] */
    const float *w_down;    /* [hidden][intermediate] */
} hx_llama_layer_weights;

/*
 * The weights of the stage's layer `layer` (stage-local: 0 is the stage's
 * first layer) into *out. HX_ERANGE for layer outside [0, hx_llama_num_layers(m)).
 */
hx_status hx_llama_weights_layer(const hx_llama *m, int layer, hx_llama_layer_weights *out,
                                 hx_err *err);

/* [vocab][hidden], or NULL for a stage without the embedding. */
const float *hx_llama_weights_embed(const hx_llama *m);

/* [hidden], or NULL for a stage without the head. */
const float *hx_llama_weights_final_norm(const hx_llama *m);

/* [vocab][hidden] (the embedding when tied), or NULL for a stage without the head. */
const float *hx_llama_weights_lm_head(const hx_llama *m);

/*
 * The state's KV cache:
 *   *k, *v: [stage layers][kv_heads][max_tokens][head_dim]
 * (max_tokens = hx_llama_state_max_tokens(s)); positions hold what the last
 * hx_llama_layers / prefill / forward calls wrote.
 */
void hx_llama_state_kv(const hx_llama_state *s, const float **k, const float **v);

/*
 * The MLP block of one layer for `rows` tokens, in place:
 * x += Wdown (silu(Wgate norm(x)) * Wup norm(x)). Workspaces (caller-owned):
 * xb, xb2 [rows][h], gate, up [rows][f] (f: the slice's ff_size). Shared by
 * the single-sequence pass and the batching engine.
 */
void hx_llama_mlp(hx_cpu_pool *pool, const hx_llama_layer_weights *W, float *x, int rows, int h,
                  int f, float eps, float *xb, float *xb2, float *gate, float *up);

/*
 * The same block without the residual add: out = Wdown (silu(Wgate norm(x))
 * * Wup norm(x)), out: [rows][h] (x is not modified). On a TP slice, out is
 * the rank's partial sum, to be all-reduced before it is added to x.
 * hx_llama_mlp is this followed by x += out.
 */
void hx_llama_mlp_out(hx_cpu_pool *pool, const hx_llama_layer_weights *W, const float *x,
                      int rows, int h, int f, float eps, float *xb, float *out, float *gate,
                      float *up);

/*
 * The per-token workspaces of a forward step over `max_rows` tokens at once,
 * shared by the single-sequence pass and the batching engine. Caller-owned
 * storage; allocated once, never per token.
 */
typedef struct hx_llama_rows {
    int max_rows;
    float *x;        /* [rows][hidden]: residual stream */
    float *xb;       /* [rows][hidden]: normed input of a block */
    float *xb2;      /* [rows][hidden]: a block's output before the residual add */
    float *q;        /* [rows][heads][head_dim] */
    float *k;        /* [rows][kv_heads][head_dim] */
    float *v;        /* [rows][kv_heads][head_dim] */
    float *att;      /* [rows][heads][head_dim]: attention output */
    float *gate;     /* [rows][intermediate] (then silu(gate) * up) */
    float *up;       /* [rows][intermediate] */
    float *rope_cos; /* [rows][head_dim / 2] */
    float *rope_sin; /* [rows][head_dim / 2] */
} hx_llama_rows;

/* Allocates every workspace for `max_rows` rows of model `c`; HX_ENOMEM leaves none. */
hx_status hx_llama_rows_init(hx_llama_rows *w, const hx_model *c, int max_rows);
void hx_llama_rows_release(hx_llama_rows *w);

#endif /* HX_LLAMA_WEIGHTS_H */
