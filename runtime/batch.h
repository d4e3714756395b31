/*
 * batch.h - continuous batching over a paged KV cache: many requests
 * decoded together on one model (the CPU backend's decode engine).
 *
 * An engine holds up to max_seqs sequences. Each step runs one forward pass
 * over a batch of rows: one row per decoding sequence (its last token) plus,
 * in the room left under max_step_tokens, chunks of the prompts still being
 * prefilled, oldest request first. Every weight is applied to all the rows
 * at once (one hx_cpu_matmul_many per q/k/v and gate/up, one hx_cpu_matmul
 * per o, down and lm_head); attention runs per sequence over its own blocks
 * (hx_cpu_paged_attention). Sequences join (hx_batch_add, or
 * hx_batch_add_prefilled with KV from a prefill group) and leave (finished,
 * or hx_batch_remove) between any two steps.
 *
 * A step emits one event per sequence that produced a token: those that
 * decoded, and those whose prompt finished prefilling (their first token).
 * A sequence that emits its last token (max_new_tokens reached, or eos_id)
 * leaves the batch in the same step and its blocks return to the cache.
 *
 * Results: per sequence, the arithmetic is that of hx_llama_layers /
 * hx_llama_head run on that sequence alone (same kernels, same order of
 * operations), so greedy decoding gives the same tokens as hx_llama_generate.
 * On the portable kernel path the logits are bit-identical; on the AVX2 path
 * the matmul pairs batch rows differently from a lone sequence, so logits
 * agree to rounding only (the tests allow 1e-4) and a near-tie could, in
 * principle, resolve differently.
 *
 * Admission control: a request needs ceil((n_prompt + max_new_tokens - 1) /
 * block_tokens) blocks (its last token is never fed back) and a free slot;
 * hx_batch_add reserves them up front and refuses with HX_ENOMEM (nothing
 * changed) when the unreserved blocks or the slots do not suffice, so a
 * running sequence never runs out of blocks mid-step and nothing is ever
 * preempted. hx_batch_can_admit asks beforehand.
 *
 * Memory: the KV cache and every workspace (for max_step_tokens rows and
 * max_seqs sequences) are allocated by hx_batch_new; a step allocates
 * nothing. Adding a request allocates its prompt copy (and a sampler when
 * temperature > 0).
 *
 * Scope: the model must be whole (embedding and head: one stage, TP 1);
 * the engine's cache holds all its layers and KV heads (origin (0, 0)).
 *
 * Threads: an engine runs its kernels on the model's pool and must be used
 * from one thread at a time; the model must not run other work meanwhile.
 *
 * Pointers: the model is borrowed and must outlive the engine; request
 * arrays and segments are borrowed for the call; events and their logits
 * are the engine's, valid until the next step.
 */
#ifndef HX_BATCH_H
#define HX_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "runtime/kvcache.h"
#include "runtime/llama.h"

typedef struct hx_batch hx_batch; /* opaque */

/* Sizes. Plain value; hx_batch_options_init fills the defaults. */
typedef struct hx_batch_options {
    int max_seqs;        /* sequences at once; default 16 */
    int max_step_tokens; /* rows per step (decode rows + prompt chunks); default 64, and at
                            least max_seqs */
    int block_tokens;    /* KV block size in positions; default 16 */
    int max_seq_tokens;  /* positions one sequence may use; default: the model's
                            max_position_embeddings, at most 4096 */
    int max_blocks;      /* KV blocks; default: enough for max_seqs sequences of
                            max_seq_tokens */
} hx_batch_options;

void hx_batch_options_init(hx_batch_options *opt);

/* A request. Plain value; prompt is borrowed for the call (the engine copies it). */
typedef struct hx_batch_request {
    uint64_t id;        /* the caller's; unique among the engine's sequences */
    const int *prompt;  /* [n_prompt] token ids (may be NULL for hx_batch_add_prefilled) */
    int n_prompt;       /* >= 1 */
    int max_new_tokens; /* >= 1: tokens to generate, the first included */
    int eos_id;         /* stop after generating this token (kept); < 0: none */
    float temperature;  /* 0: greedy (argmax, lowest id on ties) */
    float top_p;        /* as hx_llama_sampler_new */
    uint64_t seed;      /* sampler seed (unused when greedy) */
} hx_batch_request;

/* A generated token. Plain value; logits borrowed from the engine until the next step. */
typedef struct hx_batch_event {
    uint64_t id;          /* the request's */
    int token;
    int index;            /* 0 for a request's first generated token, then 1, 2 ... */
    int finished;         /* 1: the request ended with this token and left the engine */
    const float *logits;  /* [vocab]: the logits the token was sampled from */
} hx_batch_event;

/*
 * An engine for model m (borrowed; it must hold the whole model, HX_EINVAL
 * otherwise). opt may be NULL for the defaults. HX_EINVAL for sizes below 1,
 * max_step_tokens < max_seqs or max_seq_tokens above the model's
 * max_position_embeddings; HX_ENOMEM when the cache or the workspaces cannot
 * be had. *out is freed with hx_batch_free.
 */
hx_status hx_batch_new(const hx_llama *m, const hx_batch_options *opt, hx_batch **out,
                       hx_err *err);

/* Frees the engine and every sequence in it; NULL is a no-op. */
void hx_batch_free(hx_batch *b);

/* The engine's KV cache (borrowed; for inspection and admission figures). */
const hx_kvcache *hx_batch_kvcache(const hx_batch *b);

int hx_batch_seq_count(const hx_batch *b);      /* sequences in the engine */
int hx_batch_free_blocks(const hx_batch *b);    /* blocks neither held nor reserved */

/* 1 when a request of n_prompt prompt tokens and max_new tokens would be admitted now. */
int hx_batch_can_admit(const hx_batch *b, int n_prompt, int max_new_tokens);

/*
 * Adds a request whose prompt the engine prefills (in chunks, mixed with
 * other sequences' decode steps). HX_EINVAL for a bad request (empty prompt,
 * token outside the vocabulary, max_new_tokens < 1, a duplicate id, bad
 * sampling parameters), HX_ERANGE when n_prompt + max_new_tokens - 1 exceeds
 * max_seq_tokens, HX_ENOMEM when it cannot be admitted now (no free slot or
 * not enough unreserved blocks: try again after sequences finish).
 */
hx_status hx_batch_add(hx_batch *b, const hx_batch_request *req, hx_err *err);

/*
 * Adds a request prefilled elsewhere: its KV for positions 0 .. n_prompt-1
 * arrives as the decoded segments segs[0..n_segs) (borrowed, payloads too:
 * from hx_kv_segment_parse, or filled from a transport's KV message; see
 * hx_kvcache_unpack_parsed), each holding positions 0 .. n_prompt-1 of a
 * layer and head range, which together must cover every layer and KV head
 * of the model; first_token is the token the prefill sampled (generated
 * token 0, already delivered: the engine's first event for this request has
 * index 1). req->prompt is not read. Besides hx_batch_add's errors: the
 * segments' (hx_kvcache_unpack_parsed), and HX_EINVAL when a segment does
 * not hold exactly positions 0 .. n_prompt-1, when the segments leave a
 * (layer, head) uncovered, when first_token is outside the vocabulary, or
 * when nothing is left to decode (max_new_tokens < 2 or first_token ==
 * eos_id). On any error nothing is added and no block is kept.
 */
hx_status hx_batch_add_prefilled(hx_batch *b, const hx_batch_request *req, int first_token,
                                 const hx_kv_segment *segs, int n_segs, hx_err *err);

/* Removes (cancels) request `id`, returning its blocks. HX_ENOENT when unknown. */
hx_status hx_batch_remove(hx_batch *b, uint64_t id, hx_err *err);

/*
 * Runs one step over every sequence in the engine (a no-op, with no events,
 * when there is none). *events (the engine's, [*n_events]) lists the tokens
 * produced: those of decoding sequences, then those of sequences whose
 * prompt finished prefilling in this step, each group in the order added.
 */
hx_status hx_batch_step(hx_batch *b, const hx_batch_event **events, int *n_events,
                        hx_err *err);

#endif /* HX_BATCH_H */
