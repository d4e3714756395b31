/*
 * backend.h - the engines a worker can run, behind one function table:
 *
 *   cpu   runtime/batch.h over runtime/llama.h (fp32, every core): any stage
 *         and TP slice, driven in lockstep with the group's other ranks
 *         through an hx_batch_comm.
 *   cuda  runtime/cuda_engine.h (bf16 on one GPU): any stage and TP slice
 *         too, through the same hx_batch_comm (host buffers), or with the
 *         TP all-reduce over NCCL (hx_backend_nccl_join); built when the
 *         CUDA toolkit was found.
 *
 * Both take the same requests, emit the same events, hold requests' KV the
 * same way (hold_kv) and export it in the same segments (hx_kvcache_pack's
 * format), so a prefill group of one backend can feed a decode group of
 * the other.
 *
 * Threads: one thread at a time per engine (the worker's engine thread).
 */
#ifndef HX_BACKEND_H
#define HX_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "planner/model.h"
#include "runtime/batch.h"
#include "runtime/kvcache.h"

typedef enum hx_backend_kind {
    HX_BACKEND_AUTO = 0, /* cuda when built and a GPU is there, else cpu */
    HX_BACKEND_CPU = 1,
    HX_BACKEND_CUDA = 2
} hx_backend_kind;

/* "auto", "cpu", "cuda"; HX_EINVAL naming the choices otherwise. */
hx_status hx_backend_parse(const char *s, hx_backend_kind *out, hx_err *err);
const char *hx_backend_name(hx_backend_kind k);

/* What to load and how big. Plain value; strings borrowed for the call. */
typedef struct hx_backend_options {
    hx_backend_kind kind;
    const char *model_dir;
    int first_layer, num_layers; /* the stage (num_layers 0: to the last layer) */
    int tp_rank, tp_size;        /* the TP slice */
    int device;                  /* cuda: device ordinal (taken modulo the device count) */
    int threads;                 /* cpu: threads of the model's pool (0: all) */
    int max_seqs, block_tokens, max_seq_tokens;
    double kv_budget_bytes;      /* KV cache memory; the blocks it holds, at most what
                                    max_seqs x max_seq_tokens need */
} hx_backend_options;

typedef struct hx_backend hx_backend; /* opaque */

/*
 * Loads the model and makes the engine. comm (copied; may be NULL for a
 * whole model at TP 1) is what an engine of a stage or slice needs, of
 * either kind. cuda: HX_ENOTSUP when this build has no CUDA or no GPU is
 * there, or the model does not suit the GPU kernels.
 */
hx_status hx_backend_open(const hx_backend_options *o, const hx_batch_comm *comm,
                          hx_backend **out, hx_err *err);
void hx_backend_close(hx_backend *b); /* NULL is a no-op */

hx_backend_kind hx_backend_kind_of(const hx_backend *b); /* cpu or cuda */
const hx_model *hx_backend_config(const hx_backend *b);  /* the whole model's; borrowed */
int hx_backend_kv_heads(const hx_backend *b);  /* KV heads this engine holds */
int hx_backend_max_seq_tokens(const hx_backend *b);
int hx_backend_max_tokens(const hx_backend *b); /* KV positions in all */
/* Rows a step may take: every engine of a group must agree (and be of one kind). */
int hx_backend_step_rows(const hx_backend *b);
int hx_backend_max_seqs(const hx_backend *b);     /* requests at once */
int hx_backend_block_tokens(const hx_backend *b); /* KV block size in positions */
/* KV positions in blocks neither held nor reserved (whole blocks). */
int hx_backend_free_tokens(const hx_backend *b);
int hx_backend_seq_count(const hx_backend *b);
int hx_backend_can_admit(const hx_backend *b, int n_prompt, int max_new_tokens);
/* Positions of request id's KV; -1 when unknown. */
int hx_backend_seq_tokens(const hx_backend *b, uint64_t id);

/* As hx_batch_add, hx_batch_add_prefilled, hx_batch_remove, hx_batch_step. */
hx_status hx_backend_add(hx_backend *b, const hx_batch_request *req, hx_err *err);
hx_status hx_backend_add_prefilled(hx_backend *b, const hx_batch_request *req, int first_token,
                                   const hx_kv_segment *segs, int n_segs, hx_err *err);
hx_status hx_backend_remove(hx_backend *b, uint64_t id, hx_err *err);
hx_status hx_backend_step(hx_backend *b, const hx_batch_event **events, int *n_events,
                          hx_err *err);

/*
 * Packs request id's KV of model-wide layers [layer_first, +num_layers) and
 * KV heads [head_first, +num_heads) as a segment (runtime/kvcache.h) into
 * out[0..out_size) (caller-owned, 4-byte aligned), in the dtype of the
 * engine's cache, hx_backend_kv_dtype: HX_KV_DTYPE_F32 for cpu,
 * HX_KV_DTYPE_BF16 for cuda (so nothing is lost, and a GPU's KV travels in
 * half the bytes). hx_kv_segment_bytes with that dtype gives the size.
 */
int hx_backend_kv_dtype(const hx_backend *b);
hx_status hx_backend_pack_kv(hx_backend *b, uint64_t id, int layer_first, int num_layers,
                             int head_first, int num_heads, void *out, size_t out_size,
                             size_t *out_bytes, hx_err *err);

/*
 * NCCL for the TP all-reduce of a stage whose ranks are cuda engines on
 * distinct GPUs. Rank 0 of the stage makes an id (hx_backend_nccl_unique_id)
 * and hands it to the others over the group's authenticated connections;
 * every rank then joins (collective: it returns when all have joined, or
 * fails after timeout_s, HX_ETIMEDOUT). From then on the engine sums on the
 * device and the comm's allreduce is no longer called; a step whose peers
 * stop fails after step_timeout_s instead of hanging. hx_backend_nccl_capable:
 * a cuda engine of a TP slice in a build with NCCL. device_uuid: the GPU's
 * identity ("GPU-..."; "" for cpu), so a stage can see two ranks on one GPU,
 * which NCCL refuses.
 */
#define HX_BACKEND_NCCL_ID_BYTES 128
int hx_backend_nccl_capable(const hx_backend *b);
hx_status hx_backend_device_uuid(const hx_backend *b, char *out, size_t size, hx_err *err);
hx_status hx_backend_nccl_unique_id(uint8_t id[HX_BACKEND_NCCL_ID_BYTES], hx_err *err);
hx_status hx_backend_nccl_join(hx_backend *b, const uint8_t id[HX_BACKEND_NCCL_ID_BYTES],
                               double timeout_s, double step_timeout_s, hx_err *err);
/* Leaves the communicator (back to the comm's allreduce); no-op when not joined. */
void hx_backend_nccl_leave(hx_backend *b);
/*
 * This host as NCCL tells hosts apart (a hash of NCCL_HOSTID when set, else
 * of the host name): NCCL refuses two ranks of one communicator with the
 * same host and GPU, and ranks of one host with distinct NCCL_HOSTIDs talk
 * over its network transport (which is how one GPU can hold two ranks).
 */
uint32_t hx_backend_nccl_host(void);

/*
 * Host memory for KV segments (64-byte aligned): page-locked for a cuda
 * engine, so its copies to and from the device are direct; plain memory for
 * cpu, for b NULL, or when page-locked memory runs out. NULL when out of
 * memory. hx_backend_host_free frees either kind, also after the backend
 * is closed (NULL is a no-op).
 */
void *hx_backend_host_alloc(const hx_backend *b, size_t bytes);
void hx_backend_host_free(void *p);

/*
 * KV over NCCL: a link is a communicator of two ranks, a prefill rank's
 * engine (rank 0) and a decode rank's (rank 1), both cuda engines on GPUs
 * NCCL can join (hx_backend_link_capable: a cuda engine in a build with
 * NCCL). Its id travels over their KV connection; opening is collective
 * (HX_ETIMEDOUT when the join and a first transfer take more than
 * timeout_s; handing that transfer to NCCL is bounded apart, by 20 s,
 * see kernels/cuda.h); a send or receive gives up after
 * op_timeout_s, aborting the link (which is then only good for closing).
 *
 * Opening ends with a first transfer of a few bytes, so the ranks have
 * connected before any request waits on them.
 *
 * pack (rank 0, the engine's thread): packs request id's KV of model-wide
 * layers [layer_first, +num_layers) and KV heads [head_first, +num_heads)
 * on the device (the payload of hx_backend_pack_kv's segment, bytes long:
 * no header, no checksum); send then sends it (so a failure to pack is
 * known before the peer is told a payload follows). recv (rank 1, any one
 * thread per link): receives bytes into device memory (*out) of b, the
 * backend the link was opened on, given back with hx_backend_device_free
 * once the payload was taken (hx_backend_add_prefilled takes it as a
 * segment's payload: the copy into the cache stays on the GPU, done when it
 * returns) or dropped, before hx_backend_close, from any thread. The
 * buffers are kept for reuse (up to 16 and 1 GiB): a free would wait for the
 * whole GPU, transfers on other threads included. Beyond that they are
 * freed by the next hx_backend_step, on the engine's thread.
 */
typedef struct hx_backend_link hx_backend_link; /* opaque */
int hx_backend_link_capable(const hx_backend *b);
hx_status hx_backend_link_open(const hx_backend *b, const uint8_t id[HX_BACKEND_NCCL_ID_BYTES],
                               int rank, double timeout_s, double op_timeout_s,
                               hx_backend_link **out, hx_err *err);
void hx_backend_link_close(hx_backend_link *l); /* NULL is a no-op */
hx_status hx_backend_link_pack(hx_backend *b, hx_backend_link *l, uint64_t id, int layer_first,
                               int num_layers, int head_first, int num_heads, size_t bytes,
                               hx_err *err);
hx_status hx_backend_link_send(hx_backend_link *l, hx_err *err);
hx_status hx_backend_link_recv(hx_backend *b, hx_backend_link *l, size_t bytes, void **out,
                               hx_err *err);
void hx_backend_device_free(hx_backend *b, void *p); /* any thread; p NULL is a no-op */

#endif /* HX_BACKEND_H */
