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
 * leaves the batch in the same step and its blocks return to the cache
 * (unless it was added with hold_kv: see "Prefill groups").
 *
 * Results: per sequence, the arithmetic is that of hx_llama_layers /
 * hx_llama_head run on that sequence alone (same kernels, same order of
 * operations), so greedy decoding gives the same tokens as hx_llama_generate.
 * On the portable kernel path the logits are bit-identical; on the AVX2 path
 * the matmul pairs batch rows differently from a lone sequence, so logits
 * agree to rounding only (the tests allow 1e-4) and a near-tie could, in
 * principle, resolve differently. A group of stages gives a lone engine's
 * results; TP ranks add the o and down projections in pieces, so TP logits
 * agree to rounding as well.
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
 * Stages and ranks: an engine may run one (stage, TP rank) of a group: a
 * model loaded for a layer range and a TP slice (llama.h). Its cache holds
 * the stage's layers and the rank's KV heads (origin (first_layer,
 * kv_head_first)). Every engine of a group is driven in lockstep: the same
 * hx_batch_add / add_prefilled / remove / step calls in the same order, so
 * their schedules (rows of each step) and block tables agree without being
 * exchanged (hx_batch_add needs the prompt on every stage: its length
 * schedules the rows). What the ranks do exchange goes through an
 * hx_batch_comm: partial sums after the o and down projections (TP), the
 * residual rows between stages (PP), and the tokens the last stage samples.
 * An engine of a whole model at TP 1 needs no comm (NULL).
 *
 * The comm calls of one step, on every engine, in this order (a step with
 * no rows, because the engine is empty or holds only done requests, calls
 * nothing; `rows` is the step's row count, the same on every engine):
 *
 *   1. stage > 0:            recv_rows(x, rows, hidden), instead of the embedding
 *   2. TP > 1, each layer l of the stage in order:
 *                            allreduce(o-proj partial sums, rows * hidden), then
 *                            allreduce(down-proj partial sums, rows * hidden)
 *   3. not the last stage:   send_rows(x, rows, hidden), instead of the head
 *   4. more than one stage, or TP > 1:
 *                            tokens(tokens, n, is_source): n is the step's event
 *                            count (0 is possible: the call still comes, once per
 *                            step with rows); is_source 1 on the last stage's
 *                            rank 0 only
 *
 * Every rank of a stage makes the same calls with the same arguments (the
 * rows a stage sends are identical on its ranks, so the comm may send one
 * rank's copy; every rank of the next stage needs them in recv_rows). Every
 * rank of the last stage computes the logits and samples, but the tokens
 * its rank 0 sampled are the group's: the hook hands them to every other
 * engine (earlier stages, and the last stage's other ranks, whose own
 * samples they replace), so ranks whose logits differ in the last bits
 * (another GPU model, another CPU kernel path) still agree on every token.
 * On stages without the head, events carry the tokens the hook gave and
 * logits NULL; on the last stage's other ranks, rank 0's tokens with their
 * own logits.
 *
 * A step that fails (a callback's error, wrapped in a message naming the
 * engine's layers, rank and the call, with the callback's code) changes no
 * request (except that a sampling request's generator may have advanced):
 * the next step recomputes the same positions. The other engines
 * of the group may have got further, though, so a worker treats the group
 * as broken (removes the requests everywhere, or frees the engines).
 *
 * Prefill groups: a request added with hold_kv keeps its blocks after it
 * emits its last token (the event has finished 1; it stays in the engine,
 * done, taking no rows and emitting nothing more, counted by
 * hx_batch_seq_count) until hx_batch_remove, so the worker can pack its KV
 * into segments (hx_batch_seq_kv + hx_kvcache_pack on hx_batch_kvcache(b),
 * model-wide layer and head indices, one per hx_kv_plan_segments piece
 * whose source is this engine's (stage, rank)) for the decode group.
 *
 * Threads: an engine runs its kernels on the model's pool and must be used
 * from one thread at a time; the model must not run other work meanwhile.
 * The comm callbacks run on that thread, inside hx_batch_step; the engines
 * of a group block on each other there, so each must step on its own thread
 * (or process), and engines that step at the same time must not share a
 * model or a pool.
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
    int hold_kv;        /* 1: keep the KV after the last token, until hx_batch_remove */
} hx_batch_request;

/*
 * How the engines of one group talk (all callbacks borrowed; ctx is passed
 * back). Each returns HX_OK or an error (with err set) that fails the step.
 *
 *  allreduce  TP > 1: replaces x[0..n) with the sum over the stage's ranks;
 *             every rank must end with bit-identical sums (add in rank
 *             order on one rank and share the result, for instance). Called
 *             twice per layer per step with n = rows * hidden.
 *  recv_rows  stage > 0: fills x ([rows][hidden]) with the previous stage's
 *             output rows of this step.
 *  send_rows  not the last stage: hands x ([rows][hidden]) to the next stage.
 *  tokens     groups of more than one stage: the step's n sampled tokens (in
 *             event order). On the last stage tokens[] holds them and
 *             is_source is 1 (publish them to the other stages); elsewhere
 *             is_source is 0 and tokens[] must be filled.
 *
 * A callback may be NULL where it is never needed (allreduce at TP 1,
 * recv_rows on stage 0, send_rows on the last stage, tokens in one stage).
 */
typedef struct hx_batch_comm {
    void *ctx;
    hx_status (*allreduce)(void *ctx, float *x, size_t n, hx_err *err);
    hx_status (*recv_rows)(void *ctx, float *x, int rows, int hidden, hx_err *err);
    hx_status (*send_rows)(void *ctx, const float *x, int rows, int hidden, hx_err *err);
    hx_status (*tokens)(void *ctx, int *tokens, int n, int is_source, hx_err *err);
} hx_batch_comm;

/* A generated token. Plain value; logits borrowed from the engine until the next step. */
typedef struct hx_batch_event {
    uint64_t id;          /* the request's */
    int token;
    int index;            /* 0 for a request's first generated token, then 1, 2 ... */
    int finished;         /* 1: the request ended with this token and left the engine
                             (or, with hold_kv, stays done until hx_batch_remove) */
    const float *logits;  /* [vocab]: the logits the token was sampled from; NULL on a
                             stage without the head */
} hx_batch_event;

/*
 * An engine for model m (borrowed: a whole model, or a stage and TP slice;
 * then comm must provide the callbacks it needs, HX_EINVAL naming the
 * missing one otherwise; comm is copied, its ctx and functions borrowed,
 * and may be NULL for a whole model at TP 1). The cache holds the stage's
 * layers and the rank's KV heads, with the origin (first_layer,
 * kv_head_first). opt may be NULL for the defaults. HX_EINVAL for sizes below 1,
 * max_step_tokens < max_seqs or max_seq_tokens above the model's
 * max_position_embeddings; HX_ENOMEM when the cache or the workspaces cannot
 * be had. *out is freed with hx_batch_free.
 */
hx_status hx_batch_new(const hx_llama *m, const hx_batch_options *opt,
                       const hx_batch_comm *comm, hx_batch **out, hx_err *err);

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
 * index 1). req->prompt is not read; on a stage other than the first,
 * first_token is still needed (the first stage embeds it). On a stage or
 * TP slice the segments must cover the engine's layers and KV heads only
 * (model-wide indices; hx_kv_plan_segments' pieces for this destination
 * (stage, rank)). Besides hx_batch_add's errors: the
 * segments' (hx_kvcache_unpack_parsed), and HX_EINVAL when a segment does
 * not hold exactly positions 0 .. n_prompt-1, when the segments leave a
 * (layer, head) uncovered, when first_token is outside the vocabulary, or
 * when nothing is left to decode (max_new_tokens < 2 or first_token ==
 * eos_id). On any error nothing is added and no block is kept.
 */
hx_status hx_batch_add_prefilled(hx_batch *b, const hx_batch_request *req, int first_token,
                                 const hx_kv_segment *segs, int n_segs, hx_err *err);

/*
 * The kvcache sequence holding request id's KV (for hx_kvcache_pack on
 * hx_batch_kvcache(b)); -1 when id is unknown. Its length is the positions
 * computed so far: n_prompt once a held request of max_new_tokens 1 is done
 * (n_prompt + generated tokens - 1 otherwise).
 */
int hx_batch_seq_kv(const hx_batch *b, uint64_t id);

/* Removes (cancels) request `id`, returning its blocks. HX_ENOENT when unknown. */
hx_status hx_batch_remove(hx_batch *b, uint64_t id, hx_err *err);

/*
 * Runs one step over every sequence in the engine (a no-op, with no events
 * and no comm calls, when none takes rows). *events (the engine's, [*n_events]) lists the tokens
 * produced: those of decoding sequences, then those of sequences whose
 * prompt finished prefilling in this step, each group in the order added.
 */
hx_status hx_batch_step(hx_batch *b, const hx_batch_event **events, int *n_events,
                        hx_err *err);

/*
 * The rules every engine of this contract applies (this one, and
 * runtime/cuda_engine.h's hx_cuda_engine), in one place. Messages start
 * with the engine's name (`engine`, or the site's: "batch", "cuda engine").
 */

/* Where an engine sits in its group, for the checks below. Plain value; engine borrowed. */
typedef struct hx_batch_site {
    const char *engine; /* message prefix, without the colon: "batch", "cuda engine" */
    int layer_first;    /* model-wide index of the engine's first layer */
    int num_layers;     /* >= 1 */
    int tp_rank;        /* its TP rank, of tp_size (1: no TP) */
    int tp_size;
    int first_stage;    /* 1: holds the embedding */
    int last_stage;     /* 1: holds the final norm and lm_head */
} hx_batch_site;

/* 1 when the engine at `at` is a whole model at TP 1: it needs no comm and calls none. */
int hx_batch_site_alone(const hx_batch_site *at);

/*
 * The name of the first callback ("allreduce", "recv_rows", "send_rows",
 * "tokens", in that order) that the engine at `at` needs and comm lacks
 * (a static string), or NULL when it has them all. comm may be NULL (every
 * callback missing). device_allreduce 1: the engine sums its TP partial
 * sums itself (NCCL), so it needs no allreduce.
 */
const char *hx_batch_comm_missing(const hx_batch_site *at, const hx_batch_comm *comm,
                                  int device_allreduce);

/*
 * hx_batch_add's checks of a request's sizes, in this order: HX_EINVAL for
 * n_prompt or max_new_tokens below 1, HX_ERANGE when n_prompt +
 * max_new_tokens - 1 positions exceed max_seq_tokens, HX_EINVAL for a
 * prompt token outside [0, vocab) (req->prompt, when not NULL, has
 * n_prompt tokens). Sampling parameters, ids and room are the engine's to
 * check.
 */
hx_status hx_batch_check_request(const char *engine, const hx_batch_request *req, int vocab,
                                 int max_seq_tokens, hx_err *err);

/*
 * hx_batch_add_prefilled's checks before the segments' own, in this order:
 * HX_EINVAL when first_token is outside [0, vocab), when nothing is left to
 * decode (max_new_tokens < 2 or first_token == eos_id), or when n_segs < 1.
 */
hx_status hx_batch_check_prefilled(const char *engine, const hx_batch_request *req,
                                   int first_token, int n_segs, int vocab, hx_err *err);

/*
 * A comm callback's failure (st, with inner's message, or hx_strerror(st)
 * when inner's is empty) wrapped as "<engine>: stage of layers A-B, TP rank
 * r of n: <what> failed: ..." into err; returns st.
 */
hx_status hx_batch_comm_failed(const hx_batch_site *at, hx_status st, const char *what,
                               const hx_err *inner, hx_err *err);

/*
 * The same for the all-reduce after the `projection` ("o", "down") of the
 * engine's layer `layer` (0-based within the engine; the message names the
 * model-wide one): "<engine>: layer l, TP rank r of n: all-reduce after the
 * <projection> projection failed: ...".
 */
hx_status hx_batch_allreduce_failed(const hx_batch_site *at, int layer, const char *projection,
                                    hx_status st, const hx_err *inner, hx_err *err);

/*
 * Step part 4 of the contract (see the top of this file): unless the engine
 * at `at` is alone, calls comm->tokens (which must be set) on the step's n
 * tokens (the engine's, [n]), as the source on the last stage's rank 0;
 * then every token must lie in [0, vocab). A failing hook's error comes
 * back as hx_batch_comm_failed's ("tokens"), a token outside as HX_EINVAL.
 */
hx_status hx_batch_comm_tokens(const hx_batch_comm *comm, const hx_batch_site *at, int *tokens,
                               int n, int vocab, hx_err *err);

#endif /* HX_BATCH_H */
