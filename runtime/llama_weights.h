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

/* One decoder layer's weights (fp32, Linear weights [out][in]). Plain value, borrowed. */
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
 * xb, xb2 [rows][h], gate, up [rows][f]. Shared by the single-sequence pass
 * and the batching engine.
 */
void hx_llama_mlp(hx_cpu_pool *pool, const hx_llama_layer_weights *W, float *x, int rows, int h,
                  int f, float eps, float *xb, float *xb2, float *gate, float *up);

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
