/*
 * llama.h - the Llama forward pass on the CPU (fp32), a KV cache, and sampling.
 *
 * The model is Hugging Face's LlamaForCausalLM (llama2.c is the model for the
 * code's shape). For each token at position p, with x the residual stream:
 *
 *   x = embed[token]
 *   for each layer:
 *     h = rmsnorm(x) * attn_norm
 *     q = h Wq^T, k = h Wk^T, v = h Wv^T          (per head, rotate-half RoPE on q, k)
 *     K[layer][:, p] = k, V[layer][:, p] = v       (the KV cache)
 *     a = softmax(q K^T / sqrt(head_dim)) V        (causal, grouped-query)
 *     x = x + a Wo^T
 *     h = rmsnorm(x) * ffn_norm
 *     x = x + (silu(h Wgate^T) * (h Wup^T)) Wdown^T
 *   logits = (rmsnorm(x) * final_norm) Wlm_head^T
 *
 * Weights come from the model directory's safetensors (single or sharded).
 * fp32 tensors are used in place in the read-only mapping (when 4-byte
 * aligned); bf16 and fp16 tensors are widened to fp32 once, at load.
 *
 * Pipeline stages: a model may be loaded for a layer range [first_layer,
 * first_layer + num_layers). The stage holding layer 0 holds the embedding;
 * the stage holding the last layer holds the final norm and lm_head. Stages
 * exchange the residual stream x ([n][hidden] floats) through
 * hx_llama_embed / hx_llama_layers / hx_llama_head; hx_llama_forward and
 * hx_llama_prefill run the whole model and need a stage that holds it all.
 *
 * Threads: a model runs its matmuls and attention on an hx_cpu_pool (its own,
 * or one the caller lends). A model and its states must be used from one
 * thread at a time. Several states (requests) may share one model.
 *
 * Tensor parallelism: with tp_size > 1 a model holds rank tp_rank's slice
 * of each layer (Megatron style): the query and KV heads of
 * hx_kv_rank_heads (runtime/kvcache.h) with the matching rows of Wq, Wk, Wv
 * and columns of Wo; the rows [r*f/tp, (r+1)*f/tp) of Wgate and Wup and
 * those columns of Wdown (f = intermediate_size). Norms, the embedding and
 * lm_head are replicated. The o and down projections then give partial sums
 * that the stage's ranks add (an all-reduce) before the residual add; only
 * runtime/batch.h's engine does that (through its hx_batch_comm), so
 * hx_llama_layers, hx_llama_forward, hx_llama_prefill and hx_llama_generate
 * refuse a sliced model (HX_EINVAL); hx_llama_embed and hx_llama_head (whose
 * weights are replicated) work on any rank. hx_llama_config stays the whole
 * model's architecture; hx_llama_slice_of (llama_weights.h) says which heads
 * and intermediate rows the rank holds, and hx_llama_weights_layer gives the
 * slice's weights. Loading reads (and, for bf16/fp16, widens) only the
 * rank's part: rows of Wq, Wk, Wv, Wgate, Wup stay in the mapping for fp32;
 * the columns of Wo and Wdown are copied into owned memory (counted by
 * hx_llama_owned_weight_bytes). tp_size must divide the attention heads and
 * divide or be a multiple of the KV heads (HX_EINVAL naming the model, tp
 * and the head counts otherwise).
 *
 * Supported: model_type llama (and mistral without a sliding window): no
 * biases, RMSNorm, SwiGLU, rotary positions, tied or untied embeddings.
 * Anything else is refused with HX_ENOTSUP.
 */
#ifndef HX_LLAMA_H
#define HX_LLAMA_H

#include <stdint.h>

#include "common/status.h"
#include "kernels/cpu/cpu.h"
#include "planner/model.h"

typedef struct hx_llama hx_llama;             /* opaque: one stage's weights */
typedef struct hx_llama_state hx_llama_state; /* opaque: KV cache and workspaces */

/* How to load. Plain value. */
typedef struct hx_llama_options {
    int first_layer;   /* default 0 */
    int num_layers;    /* default 0: every layer from first_layer to the last */
    int threads;       /* threads of the model's own pool; 0: hx_cpu_default_threads() */
    hx_cpu_pool *pool; /* borrowed: run on this pool instead (threads ignored); NULL: own */
    int tp_rank;       /* tensor-parallel rank within the stage; default 0 */
    int tp_size;       /* tensor-parallel degree of the stage; default 1 (0 means 1) */
} hx_llama_options;

void hx_llama_options_init(hx_llama_options *opt);

/*
 * Loads the model in `dir` (borrowed): dir/config.json and its safetensors
 * (model.safetensors, or model.safetensors.index.json and shards). `opt` may
 * be NULL for the defaults. Every tensor the stage needs is checked for
 * presence, a float dtype (F32, BF16, F16) and its exact shape:
 *
 *   model '/m': tensor 'model.layers.0.self_attn.q_proj.weight': shape [64, 32],
 *   expected [64, 64]
 *
 * *out is freed with hx_llama_free.
 */
hx_status hx_llama_load(const char *dir, const hx_llama_options *opt, hx_llama **out,
                        hx_err *err);

/* Frees the weights (and the pool when it owns one); NULL is a no-op. */
void hx_llama_free(hx_llama *m);

/* The architecture (borrowed; valid while m lives). */
const hx_model *hx_llama_config(const hx_llama *m);

int hx_llama_first_layer(const hx_llama *m);
int hx_llama_num_layers(const hx_llama *m);   /* layers this stage holds */
int hx_llama_has_embedding(const hx_llama *m); /* holds layer 0 */
int hx_llama_has_head(const hx_llama *m);      /* holds the last layer */
int hx_llama_tp_rank(const hx_llama *m);
int hx_llama_tp_size(const hx_llama *m);
hx_cpu_pool *hx_llama_pool(const hx_llama *m); /* borrowed */

/*
 * Bytes of fp32 weights the model converted or copied and owns (0 for an
 * fp32 file at TP 1; a TP slice's Wo and Wdown columns otherwise).
 */
int64_t hx_llama_owned_weight_bytes(const hx_llama *m);

/* ---- state: KV cache and workspaces --------------------------------------------- */

/*
 * A request's state for model m: a KV cache of max_tokens positions,
 *   k, v: [stage layers][kv_heads][max_tokens][head_dim] floats each,
 * and workspaces for up to max_batch_tokens tokens per call (prefill
 * longer prompts in chunks; 0 means 64). Everything is allocated here, once.
 * m is borrowed and must outlive the state.
 */
hx_status hx_llama_state_new(const hx_llama *m, int max_tokens, int max_batch_tokens,
                             hx_llama_state **out, hx_err *err);
void hx_llama_state_free(hx_llama_state *s);

int hx_llama_state_max_tokens(const hx_llama_state *s);
int hx_llama_state_max_batch_tokens(const hx_llama_state *s);

/* KV cache bytes of a state (both K and V). */
int64_t hx_llama_state_kv_bytes(const hx_llama_state *s);

/* ---- stage pieces ----------------------------------------------------------------- */

/*
 * x[t] = embedding row of tokens[t].   tokens: [n]   x: [n][hidden]
 * HX_EINVAL for a stage without the embedding or a token outside the vocabulary.
 */
hx_status hx_llama_embed(const hx_llama *m, const int *tokens, int n, float *x, hx_err *err);

/*
 * Runs the stage's layers over n tokens at positions pos .. pos+n-1, in
 * place on the residual stream x: [n][hidden]. Fills the KV cache at those
 * positions (earlier positions must be filled already). n is at most
 * max_batch_tokens and pos + n at most max_tokens (HX_ERANGE otherwise).
 */
hx_status hx_llama_layers(const hx_llama *m, hx_llama_state *s, float *x, int n, int pos,
                          hx_err *err);

/*
 * logits = lm_head(final_norm(x)).   x: [hidden] (not modified)   logits: [vocab]
 * HX_EINVAL for a stage without the head.
 */
hx_status hx_llama_head(const hx_llama *m, hx_llama_state *s, const float *x, float *logits,
                        hx_err *err);

/* ---- whole model --------------------------------------------------------------------- */

/*
 * One token at position pos (the KV cache must hold 0 .. pos-1). *logits
 * points to [vocab] floats inside s, valid until the next call on s.
 */
hx_status hx_llama_forward(const hx_llama *m, hx_llama_state *s, int token, int pos,
                           const float **logits, hx_err *err);

/*
 * n tokens at positions pos .. pos+n-1, in chunks of max_batch_tokens;
 * *logits (inside s) are those of the last token.
 */
hx_status hx_llama_prefill(const hx_llama *m, hx_llama_state *s, const int *tokens, int n,
                           int pos, const float **logits, hx_err *err);

/* ---- sampling -------------------------------------------------------------------------- */

typedef struct hx_llama_sampler hx_llama_sampler; /* opaque */

/*
 * A sampler over `vocab` logits. temperature 0 is greedy (argmax, lowest id
 * on ties); otherwise softmax(logits / temperature), restricted to the
 * smallest set of most likely tokens whose probability reaches top_p when
 * 0 < top_p < 1. Draws come from a xorshift64* generator seeded by `seed`,
 * so a (seed, logits) sequence always gives the same tokens.
 * HX_EINVAL for temperature < 0, top_p outside [0, 1] or vocab < 1.
 */
hx_status hx_llama_sampler_new(int vocab, float temperature, float top_p, uint64_t seed,
                               hx_llama_sampler **out, hx_err *err);
void hx_llama_sampler_free(hx_llama_sampler *s);

/* The next token for logits: [vocab] (borrowed, not modified). */
int hx_llama_sample(hx_llama_sampler *s, const float *logits);

/* Index of the largest of x[0..n) (lowest index on ties). */
int hx_llama_argmax(const float *x, int n);

/*
 * Prefills prompt[0..n_prompt) and then decodes up to max_new tokens into
 * out (caller-owned, [max_new]), stopping after eos_id (which is kept in
 * out) unless eos_id < 0. *n_out is the number generated. The state's
 * max_tokens must hold n_prompt + max_new - 1 positions.
 */
hx_status hx_llama_generate(const hx_llama *m, hx_llama_state *s, hx_llama_sampler *sampler,
                            const int *prompt, int n_prompt, int max_new, int eos_id, int *out,
                            int *n_out, hx_err *err);

#endif /* HX_LLAMA_H */
