/*
 * cuda_engine.h - the cuda backend of the runtime: a model (or one stage and
 * TP slice of it) on one GPU with continuous batching, the GPU twin of
 * runtime/batch.h, built on the launch functions of kernels/cuda.h. Built only with the CUDA toolkit
 * (HX_HAVE_CUDA); no CUDA type appears here.
 */
#ifndef HX_CUDA_ENGINE_H
#define HX_CUDA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "kernels/cuda.h"
#include "planner/model.h"
#include "runtime/batch.h"
#include "runtime/kvcache.h"

/*
 * A model on one GPU with continuous batching, the GPU twin of
 * runtime/batch.h's hx_batch: the same requests (hx_batch_request), the
 * same events (hx_batch_event), the same scheduling (each step: one row per
 * decoding sequence, then prompt chunks in the room left under
 * max_step_tokens, oldest first; events of decoding sequences, then those
 * whose prompt finished, each in the order added), the same admission
 * control (blocks for n_prompt + max_new_tokens - 1 positions are taken at
 * add, so nothing is ever preempted) and the same KV segments in and out.
 *
 * Weights: from a HF safetensors directory (F32, BF16, F16 -> bf16 on the
 * device; norms stay fp32) or made up on the GPU (hx_cuda_engine_new_random).
 * q/k/v and gate/up are stored fused ([q; k; v] and [gate; up] rows).
 *
 * Steps: a step that only decodes replays a CUDA graph captured for its
 * batch-size bucket (1, 2, 4, ... max_seqs, rows padded with a scratch
 * sequence), captured the second time the bucket is used; other steps run
 * their kernels directly. A step synchronises once, to read the tokens.
 *
 * Memory: weights, the cache (max_blocks + 1 scratch blocks), every
 * workspace (for max_step_tokens rows) and the staging buffers are
 * allocated by hx_cuda_engine_new*; steps allocate nothing.
 *
 * Stages and ranks: like hx_batch, an engine may hold one (stage, TP rank)
 * of a group (options first_layer, num_layers, tp_rank, tp_size): the
 * stage's layers and the rank's slice of each (runtime/llama.h's Megatron
 * split: the query and KV heads of hx_kv_rank_heads with their rows of Wq,
 * Wk, Wv and columns of Wo; intermediate rows [r f / tp, (r + 1) f / tp) of
 * Wgate and Wup and those columns of Wdown), the embedding on the first
 * stage, the final norm and lm_head on the last. Its cache holds the
 * stage's layers and the rank's KV heads; KV segments in and out use
 * model-wide indices inside that slice. Such an engine needs an
 * hx_batch_comm (hx_cuda_engine_set_comm) and makes exactly the calls of
 * runtime/batch.h's contract, with host (page-locked) fp32 buffers, so its
 * group's ranks interoperate with the worker's TCP transport; a TP stage
 * may instead sum its partial results on the device over NCCL
 * (hx_cuda_engine_set_nccl), which the comm's allreduce then never sees.
 * Every rank of a group must be a cuda engine with the same options: the
 * schedules (rows per step) must agree. A step of a sliced engine waits
 * for the device at each comm call, and never replays a graph, except a
 * whole model's TP slice summing over NCCL: its decode steps replay graphs
 * with the all-reduces in them (NCCL kernels captured like the others; every
 * rank captures and replays in the same steps, as they step in lockstep).
 *
 * Limits: llama-family models as runtime/llama.h supports, head_dim 64 or
 * 128, at most 8 query heads per KV head, hidden / intermediate sizes (and
 * a TP slice's intermediate rows) multiples of 8 (HX_ENOTSUP otherwise).
 *
 * Threads: one thread at a time per engine.
 * Pointers: requests and segments are borrowed for the call; events (and
 * their logits) are the engine's, valid until the next step.
 */
#ifdef __cplusplus
extern "C" {
#endif

typedef struct hx_cuda_engine hx_cuda_engine; /* opaque */

/* Sizes. Plain value; hx_cuda_options_init fills the defaults. */
typedef struct hx_cuda_options {
    int device;          /* CUDA device ordinal; default 0 */
    int max_seqs;        /* sequences at once; default 16 */
    int max_step_tokens; /* rows per step; default 512, at least max_seqs */
    int block_tokens;    /* KV block size in positions; default 16 */
    int max_seq_tokens;  /* positions per sequence; default min(max_position_embeddings, 4096) */
    int max_blocks;      /* KV blocks; default enough for max_seqs sequences of max_seq_tokens */
    int graphs;          /* 1 (default; 0 when $HX_CUDA_GRAPHS is "0"): CUDA graphs for
                            decode-only steps; 0: never */
    int gemv_max_rows;   /* GEMMs of at most this many rows use the GEMV kernel; default 8 */
    int logits;          /* 1: events carry their logits (copied to the host each step);
                            default 0 (events' logits are NULL; always NULL before the last
                            stage) */
    int first_layer;     /* the stage: layers [first_layer, first_layer + num_layers); default 0 */
    int num_layers;      /* default 0: to the model's last layer */
    int tp_rank;         /* the TP slice: rank tp_rank of tp_size; default 0 of 1 */
    int tp_size;
    int l2_prefetch_mb;  /* decode steps of at most gemv_max_rows rows: while RoPE, attention
                            and the o projection run, and again while the down projection
                            does, up to this many MiB of the weights the next projections
                            read are asked into the L2 cache, from a second stream
                            (hx_cuda_prefetch_l2); 0 (default, or $HX_CUDA_PREFETCH): never */
    int decode1;         /* 1: a decode step of one row runs this engine's layers in one
                            persistent kernel (hx_cuda_decode1) where its shapes and the
                            device allow, at TP 1; 0 (default; 1 when $HX_CUDA_DECODE1 is "1"):
                            a kernel per operation */
} hx_cuda_options;

void hx_cuda_options_init(hx_cuda_options *opt);

/*
 * Loads the model in `dir` (config.json + safetensors, single or sharded)
 * onto opt->device. HX_ENOTSUP for an unsupported model, HX_ENOMEM when
 * device memory does not suffice, the loader's errors otherwise. *out is
 * freed with hx_cuda_engine_free.
 */
hx_status hx_cuda_engine_new(const char *dir, const hx_cuda_options *opt, hx_cuda_engine **out,
                             hx_err *err);

/*
 * The same with random weights made on the device from `seed` (uniform,
 * std 1/sqrt(fan_in); norms 1 +- 0.1; embedding std about 0.58), for
 * benchmarks: `cfg` (copied) needs only the architecture fields.
 */
hx_status hx_cuda_engine_new_random(const hx_model *cfg, uint64_t seed,
                                    const hx_cuda_options *opt, hx_cuda_engine **out,
                                    hx_err *err);

/* Frees everything on the device and the host; NULL is a no-op. */
void hx_cuda_engine_free(hx_cuda_engine *e);

/*
 * The callbacks a stage or TP slice steps through (copied; ctx and the
 * functions borrowed), as hx_batch_new takes them: HX_EINVAL naming the
 * first one this engine needs that is NULL. A whole model at TP 1 needs
 * none; a sliced engine refuses to step without one.
 */
hx_status hx_cuda_engine_set_comm(hx_cuda_engine *e, const hx_batch_comm *comm, hx_err *err);

/*
 * Sums the TP partial sums over NCCL on the device instead of through the
 * comm's allreduce: tp_comm (borrowed; must outlive the engine or be unset
 * with NULL) joins this stage's ranks, rank tp_rank of tp_size (HX_EINVAL
 * otherwise). The step then waits for the device through
 * hx_cuda_nccl_wait, giving up after timeout_s (default 60 s when <= 0)
 * when a peer stops: the communicator is aborted and the step fails.
 */
hx_status hx_cuda_engine_set_nccl(hx_cuda_engine *e, hx_cuda_nccl *tp_comm, double timeout_s,
                                  hx_err *err);

/* The model-wide layers and KV heads this engine holds (any pointer may be NULL). */
void hx_cuda_engine_slice(const hx_cuda_engine *e, int *layer_first, int *num_layers,
                          int *kv_head_first, int *kv_heads);

const hx_model *hx_cuda_engine_config(const hx_cuda_engine *e); /* borrowed */
int hx_cuda_engine_seq_count(const hx_cuda_engine *e);
int hx_cuda_engine_free_blocks(const hx_cuda_engine *e);
int hx_cuda_engine_can_admit(const hx_cuda_engine *e, int n_prompt, int max_new_tokens);
int64_t hx_cuda_engine_weight_bytes(const hx_cuda_engine *e); /* bf16 weights on the device */
int64_t hx_cuda_engine_kv_bytes_per_token(const hx_cuda_engine *e); /* all layers, K and V */

/* As hx_batch_add (same checks and codes). */
hx_status hx_cuda_engine_add(hx_cuda_engine *e, const hx_batch_request *req, hx_err *err);

/*
 * As hx_batch_add_prefilled: segs[0..n_segs) (payloads borrowed, in host
 * memory or this engine's device memory) hold positions 0 .. n_prompt-1 of
 * layer and KV-head ranges (model-wide indices) covering this engine's
 * slice; bf16 ones are copied into the cache as they are, fp32 ones rounded
 * to bf16. first_token is generated token 0 (already delivered): the first
 * event has index 1.
 */
hx_status hx_cuda_engine_add_prefilled(hx_cuda_engine *e, const hx_batch_request *req,
                                       int first_token, const hx_kv_segment *segs, int n_segs,
                                       hx_err *err);

/* KV positions request `id` holds (n_prompt once a held request is done); -1 when unknown. */
int hx_cuda_engine_seq_tokens(const hx_cuda_engine *e, uint64_t id);

/*
 * Packs request id's KV (positions 0 .. seq_tokens-1) of the model-wide
 * layers [layer_first, +num_layers) and KV heads [head_first, +num_heads)
 * into out[0..out_size) as a bf16 segment (runtime/kvcache.h; the cache's
 * values bit for bit, checksummed). out is caller-owned and 2-byte aligned;
 * page-locked memory (hx_cuda_host_alloc) makes the transfer direct.
 * *out_bytes (may be NULL) gets the segment's size. HX_ENOENT for an
 * unknown id, HX_EINVAL for an empty sequence or ranges outside the model,
 * HX_ERANGE for a buffer too small (hx_kv_segment_bytes with
 * HX_KV_DTYPE_BF16 says how much).
 */
hx_status hx_cuda_engine_pack_kv(hx_cuda_engine *e, uint64_t id, int layer_first,
                                 int num_layers, int head_first, int num_heads, void *out,
                                 size_t out_size, size_t *out_bytes, hx_err *err);

/*
 * The payload alone (no header, no checksum) of the segment
 * hx_cuda_engine_pack_kv would make, into device memory d_out on this
 * engine's device (16-byte aligned, out_size bytes; HX_ERANGE when too
 * small), waiting until it is there: for KV sent straight from the GPU
 * (over NCCL). *out_bytes (may be NULL) gets its size.
 */
hx_status hx_cuda_engine_pack_kv_device(hx_cuda_engine *e, uint64_t id, int layer_first,
                                        int num_layers, int head_first, int num_heads,
                                        void *d_out, size_t out_size, size_t *out_bytes,
                                        hx_err *err);

/* Removes (cancels) request id, returning its blocks. HX_ENOENT when unknown. */
hx_status hx_cuda_engine_remove(hx_cuda_engine *e, uint64_t id, hx_err *err);

/* As hx_batch_step. */
hx_status hx_cuda_engine_step(hx_cuda_engine *e, const hx_batch_event **events, int *n_events,
                              hx_err *err);

/* Steps run so far, and how many of them replayed a CUDA graph. */
void hx_cuda_engine_stats(const hx_cuda_engine *e, int64_t *steps, int64_t *graph_steps);

/* Steps whose layers ran in the one-row decode kernel (hx_cuda_options.decode1). */
int64_t hx_cuda_engine_decode1_steps(const hx_cuda_engine *e);

/*
 * CRC-32C of A||B from crc1 = CRC of A, crc2 = CRC of B (each started from
 * 0, hx_kv_crc32c's convention) and B's length: zlib's crc32_combine for
 * the Castagnoli polynomial. Implemented in cuda_engine.c, which checksums a
 * packed segment in pieces on several threads.
 */
uint32_t hx_cuda_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

#ifdef __cplusplus
}
#endif

#endif /* HX_CUDA_ENGINE_H */
