/*
 * cuda.h - the CUDA backend, callable from C: device memory helpers, the
 * launch functions of the bf16 kernels, a cuBLAS-backed GEMM, NCCL wrappers,
 * and a whole-model engine (continuous batching over a paged bf16 KV cache,
 * CUDA graphs for decode steps) that mirrors runtime/batch.h's hx_batch.
 *
 * No CUDA type appears here: streams, handles and graphs are opaque
 * pointers, bf16 values are their bit patterns (hx_bf16), and device
 * memory is plain `void *` / typed pointers that only the GPU may read.
 * Everything declared here exists only when the build found a CUDA toolkit
 * (HX_HAVE_CUDA); kernels/kernels.h has the build version and device count.
 *
 * Numerics: weights and activations between kernels are bf16; every kernel
 * accumulates in fp32; the residual stream, the o / down projection outputs
 * and the logits are fp32; the KV cache is bf16. Rounding bf16 is to nearest
 * even.
 *
 * Conventions of the launch functions: pointers named d_* (and the tensors
 * in shape comments) are device memory, borrowed for the call; they run
 * asynchronously on `stream` (NULL: the legacy default stream) and return
 * HX_EINVAL for bad sizes, HX_ENOTSUP for a shape the kernels do not cover,
 * HX_EIO naming the kernel when the launch fails. Errors of the kernels
 * themselves surface at the next synchronising call (hx_cuda_sync).
 *
 * Linear weights are HF's [out][in] row-major, so y = x W^T.
 */
#ifndef HX_CUDA_H
#define HX_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* common/status.h has no C++ guard of its own */
#endif

#include "common/status.h"
#include "kernels/kernels.h"

typedef uint16_t hx_bf16;                    /* bf16 bit pattern */
typedef struct hx_cuda_stream hx_cuda_stream; /* opaque: a CUDA stream */
typedef struct hx_cuda_blas hx_cuda_blas;     /* opaque: cuBLAS handle + workspace */

/* ---- devices and memory --------------------------------------------------------------------- */

/* CUDA devices this process can use (0 without a driver or a device). */
int hx_cuda_device_count(void);

/* 1 when a CUDA device can be used (hx_cuda_device_count() > 0), else 0. */
int hx_cuda_available(void);

hx_status hx_cuda_set_device(int device, hx_err *err);

/*
 * The device's name (into name[0..size), caller-owned), its peak HBM
 * bandwidth in bytes/s and dense BF16 tensor peak in FLOP/s, from a table
 * of known parts by name (H100 SXM 3.35e12 / 989e12, H100 PCIe 2.0e12 /
 * 756e12, H200 4.8e12 / 989e12, A100 2.0e12 / 312e12 ...; 0 when unknown).
 * Either out pointer may be NULL.
 */
hx_status hx_cuda_device_info(int device, char *name, size_t size, double *peak_bytes_per_s,
                              double *peak_bf16_flops, hx_err *err);

/*
 * The device's identity as text, "GPU-" and its 16-byte UUID as 8-4-4-4-12
 * lower-case hex digits (as nvidia-smi -L prints it): 40 characters and a
 * NUL into out[0..size), caller-owned, size >= HX_CUDA_UUID_CHARS (else
 * HX_EINVAL). Two processes compare these to tell whether they run on the
 * same physical GPU (NCCL refuses two ranks of one communicator on one GPU);
 * device numbers cannot tell, as CUDA_VISIBLE_DEVICES renumbers. HX_EIO when
 * the device cannot be queried. Any thread.
 */
#define HX_CUDA_UUID_CHARS 41
hx_status hx_cuda_device_uuid(int device, char *out, size_t size, hx_err *err);

/* Device memory (cudaMalloc); *ptr is freed with hx_cuda_free (NULL is a no-op). */
hx_status hx_cuda_malloc(void **ptr, size_t bytes, hx_err *err);
void hx_cuda_free(void *ptr);

/* Page-locked host memory (cudaMallocHost), for fast transfers; hx_cuda_host_free. */
hx_status hx_cuda_host_alloc(void **ptr, size_t bytes, hx_err *err);
void hx_cuda_host_free(void *ptr);

/* Synchronous copies (any direction, by address: unified addressing) and memset. */
hx_status hx_cuda_memcpy(void *dst, const void *src, size_t bytes, hx_err *err);
hx_status hx_cuda_memset(void *d_dst, int value, size_t bytes, hx_err *err);
/* Asynchronous copy on `stream` (truly asynchronous only for pinned host memory). */
hx_status hx_cuda_memcpy_async(void *dst, const void *src, size_t bytes, hx_cuda_stream *stream,
                               hx_err *err);
/*
 * Asynchronous 2-d copy on `stream` (cudaMemcpy2DAsync, any direction by
 * address): `rows` rows of width_bytes each, row r from src + r * src_pitch
 * to dst + r * dst_pitch (pitches in bytes, each >= width_bytes, else
 * HX_EINVAL). Loads a column slice of a row-major host matrix: src = the
 * matrix + first column, src_pitch = its row bytes, width_bytes = the
 * slice's. Nothing to copy (0 rows or width) is HX_OK; HX_EIO when CUDA
 * refuses. As hx_cuda_memcpy_async, truly asynchronous only for pinned host
 * memory: keep src and dst alive until the stream has done it.
 */
hx_status hx_cuda_memcpy_2d_async(void *dst, size_t dst_pitch, const void *src, size_t src_pitch,
                                  size_t width_bytes, size_t rows, hx_cuda_stream *stream,
                                  hx_err *err);

/* Waits for all work on the device and reports any asynchronous error (HX_EIO). */
hx_status hx_cuda_sync(hx_err *err);

/* A non-blocking stream; hx_cuda_stream_free (NULL is a no-op). */
hx_status hx_cuda_stream_new(hx_cuda_stream **out, hx_err *err);
void hx_cuda_stream_free(hx_cuda_stream *s);
hx_status hx_cuda_stream_sync(hx_cuda_stream *s, hx_err *err);

/*
 * Work issued on `waiter` from now on waits, on the device, for the work
 * issued on `on` so far (recorded in ev, an event of this device, which
 * may be reused for the next call at once). In a graph capture this forks
 * `waiter` into the capture open on `on`, or joins it back: a stream forked
 * into a capture must be joined into the capturing stream before the
 * capture ends (hx_cuda_graph_end fails otherwise).
 */
typedef struct hx_cuda_event hx_cuda_event; /* opaque */
hx_status hx_cuda_event_new(hx_cuda_event **out, hx_err *err);
void hx_cuda_event_free(hx_cuda_event *ev); /* NULL is a no-op */
hx_status hx_cuda_stream_wait(hx_cuda_stream *waiter, hx_cuda_stream *on, hx_cuda_event *ev,
                              hx_err *err);

/*
 * Asks the device to bring d[0..bytes) (device memory) into its L2 cache: a
 * hint, with no effect on any result, that nothing waits for (the kernel
 * ends once the requests are out; the bytes arrive meanwhile). A decode
 * step issues it on a second stream for the weights the next projections
 * stream, while small kernels leave memory bandwidth idle. Bulk L2
 * prefetches (one request per 64 KiB) on sm_90, a prefetch per 128-byte
 * line before.
 */
hx_status hx_cuda_prefetch_l2(const void *d, size_t bytes, hx_cuda_stream *stream, hx_err *err);

/*
 * Programmatic dependent launch (Hopper and later): each kernel may start
 * while the previous one on its stream finishes (the GEMV streams its first
 * weights meanwhile). Off by default: on an H100 it made a batch-1 decode
 * step slower (1.86 ms against 1.61 ms). $HX_CUDA_PDL=1 or hx_cuda_set_pdl(1)
 * turns it on (devices of compute capability 9.0+ only) for later launches;
 * hx_cuda_set_pdl(0) off again. Graphs keep what they captured.
 */
void hx_cuda_set_pdl(int on);

/*
 * Which weight-streaming GEMV kernels serve hx_cuda_gemm (and so
 * hx_cuda_gemm_swiglu) and the fused hx_cuda_gemm_rmsnorm /
 * hx_cuda_gemm_rmsnorm_swiglu, for the same shapes and rows either way:
 * 1 the kernels of one warp per output row; 2 persistent blocks (2 an SM)
 * whose 16 warps split each 8-row tile's columns, keep 3 steps of 32 B a
 * thread in flight across rows and tiles (96 KB an SM), multiply on the
 * tensor cores (fp32 accumulation, sums in a fixed order) and, for the fused
 * norm, normalize once per block; 0 (the default; other values mean 0) the
 * faster of the two for each call's shape as measured on an H200: 2 at 2-8
 * rows, for rows of at least twice the outputs (the down projection) and for
 * the norm in front of q/k/v; 1 for the other single rows. Both passed
 * test_cuda (each kernel, and the engine against the CPU) and
 * compute-sanitizer memcheck on an H200. $HX_CUDA_GEMV=1 or 2, read on first
 * use when this was not called, forces one. Later launches only (graphs keep
 * what they captured).
 */
void hx_cuda_set_gemv_variant(int v);

/* ---- element conversion and initialisation ------------------------------------------------ */

#define HX_CUDA_DTYPE_F32 0
#define HX_CUDA_DTYPE_BF16 1
#define HX_CUDA_DTYPE_F16 2

/* d_dst[i] = bf16(d_src[i]) for i < n; d_src holds n elements of src_dtype (4-byte aligned). */
hx_status hx_cuda_to_bf16(hx_bf16 *d_dst, const void *d_src, int src_dtype, int64_t n,
                          hx_cuda_stream *stream, hx_err *err);

/* d_dst[i] = float(d_src[i]);  d_dst, d_src: [n] */
hx_status hx_cuda_bf16_to_f32(float *d_dst, const hx_bf16 *d_src, int64_t n,
                              hx_cuda_stream *stream, hx_err *err);

/*
 * Deterministic uniform values in [lo, hi) from (seed, i): for random-weight
 * models made directly on the GPU (benchmarks).   d_dst: [n]
 */
hx_status hx_cuda_fill_uniform_bf16(hx_bf16 *d_dst, int64_t n, uint64_t seed, float lo, float hi,
                                    hx_cuda_stream *stream, hx_err *err);
hx_status hx_cuda_fill_uniform_f32(float *d_dst, int64_t n, uint64_t seed, float lo, float hi,
                                   hx_cuda_stream *stream, hx_err *err);

/* ---- GEMM ------------------------------------------------------------------------------------- */

/*
 * A cuBLAS handle with a fixed workspace (so that GEMMs can be captured
 * into CUDA graphs). gemv_max_rows (at most 8): GEMMs of at most this many
 * rows (and `in` a multiple of 8) may use hexflow's own bf16 GEMV kernel,
 * which streams the weights at close to full memory bandwidth: always up to
 * 4 rows, and up to 8 for matrices of at most 8M elements, where it beat
 * cuBLAS on an H100; 0 sends everything to cuBLAS. *out is freed with
 * hx_cuda_blas_free (NULL is a no-op).
 */
hx_status hx_cuda_blas_new(int gemv_max_rows, hx_cuda_blas **out, hx_err *err);
void hx_cuda_blas_free(hx_cuda_blas *b);

/*
 * y = x W^T (+ beta * y), bf16 inputs, fp32 accumulation:
 *   d_y: [rows][out] fp32 (y_bf16 0) or bf16 (y_bf16 1)
 *   d_x: [rows][in] bf16    d_w: [out][in] bf16
 * beta is 0 or 1 (1 adds into d_y).
 */
hx_status hx_cuda_gemm(hx_cuda_blas *b, void *d_y, int y_bf16, const hx_bf16 *d_x,
                       const hx_bf16 *d_w, int rows, int in, int out, float beta,
                       hx_cuda_stream *stream, hx_err *err);

/*
 * The MLP's down projection with SwiGLU in front:
 *   act = bf16(silu(gate) * up),  y = act W^T (fp32)
 *   d_y: [rows][out] fp32   d_gate_up: [rows][2 * ff] bf16 (gate then up)
 *   d_w: [out][ff] bf16     d_act: [rows][ff] bf16 workspace
 */
hx_status hx_cuda_gemm_swiglu(hx_cuda_blas *b, float *d_y, const hx_bf16 *d_gate_up,
                              const hx_bf16 *d_w, hx_bf16 *d_act, int rows, int ff, int out,
                              hx_cuda_stream *stream, hx_err *err);

/*
 * RMSNorm in front of a GEMM (the residual add happens elsewhere: the
 * projections before it add into d_x with beta 1):
 *   h = bf16(x / sqrt(mean(x^2) + eps) * d_norm_w)  (as hx_cuda_add_rmsnorm, no delta)
 *   d_y = h W^T (fp32)
 *   d_y: [rows][out] fp32   d_x: [rows][in] fp32 (read only)   d_norm_w: [in] fp32
 *   d_w: [out][in] bf16     d_h: [rows][in] bf16 workspace (written only where the
 *   GEMV path does not apply: then a norm kernel and the GEMM run)
 * At 1 row, where the GEMV applies (gemv_max_rows >= 1, `in` a multiple of
 * 8, rows * in * 2 <= 44 KB), one kernel does both.
 */
hx_status hx_cuda_gemm_rmsnorm(hx_cuda_blas *b, float *d_y, float *d_x, const float *d_norm_w,
                               float eps, hx_bf16 *d_h, const hx_bf16 *d_w, int rows, int in,
                               int out, hx_cuda_stream *stream, hx_err *err);

/*
 * The MLP's gate/up projection with RMSNorm in front and SwiGLU behind:
 *   h as above;  [gate | up] = bf16(h W^T);  d_act = bf16(silu(gate) * up)
 *   d_act: [rows][ff] bf16   d_w: [2 ff][in] bf16 (gate rows then up rows)
 *   d_gu: [rows][2 ff] bf16 workspace, d_h: [rows][in] bf16 workspace (both
 *   used only where the fused GEMV does not apply; it does at 1 or 2 rows)
 */
hx_status hx_cuda_gemm_rmsnorm_swiglu(hx_cuda_blas *b, hx_bf16 *d_act, hx_bf16 *d_gu, float *d_x,
                                      const float *d_norm_w, float eps, hx_bf16 *d_h,
                                      const hx_bf16 *d_w, int rows, int in, int ff,
                                      hx_cuda_stream *stream, hx_err *err);

/* ---- layer kernels ---------------------------------------------------------------------------- */

/* d_x[r] = float(d_table[d_tokens[r]]);  d_x: [rows][hidden] fp32, d_table: [vocab][hidden] */
hx_status hx_cuda_embed(float *d_x, const hx_bf16 *d_table, const int *d_tokens, int rows,
                        int hidden, int vocab, hx_cuda_stream *stream, hx_err *err);

/* d_x[i] += d_y[i] for i in [0, n): fp32 (the residual add of all-reduced TP partial sums) */
hx_status hx_cuda_add(float *d_x, const float *d_y, int64_t n, hx_cuda_stream *stream,
                      hx_err *err);

/*
 * RMSNorm fused with the residual add. For output row r, with s = d_index[r]
 * (or r when d_index is NULL):
 *   v = d_x[s] + d_delta[s]        (d_delta may be NULL: v = d_x[s])
 *   d_x[s] = v                     (only when d_index is NULL)
 *   d_out[r] = bf16(v / sqrt(mean(v^2) + eps) * d_w)
 *   d_x, d_delta: [..][dim] fp32   d_w: [dim] fp32   d_out: [rows][dim] bf16
 */
hx_status hx_cuda_add_rmsnorm(float *d_x, const float *d_delta, const float *d_w, hx_bf16 *d_out,
                              const int *d_index, int rows, int dim, float eps,
                              hx_cuda_stream *stream, hx_err *err);

/*
 * The paged bf16 KV cache, the layout of runtime/kvcache.h:
 *   [blocks][layers][2][kv_heads][block_tokens][head_dim] bf16   ([2]: K then V)
 * A sequence's block table lists its blocks in position order: position p
 * is at offset p % block_tokens of block table[p / block_tokens]. Block
 * tables of all sequences are rows of one [slots][max_blocks_per_seq] int
 * array. Plain value.
 */
typedef struct hx_cuda_kv_layout {
    int layers, kv_heads, head_dim, block_tokens;
    int max_blocks_per_seq; /* row stride of the block tables */
} hx_cuda_kv_layout;

/*
 * RoPE (HF rotate-half; cos/sin tables precomputed) on q and k, and the
 * KV-cache write, for `rows` tokens:
 *   d_qkv:   [rows][(heads + 2 kv_heads) * head_dim] fp32 (q, k, v projections)
 *   d_q:     [rows][heads][head_dim] bf16 (rotated queries)
 *   d_pos:   [rows] positions;  d_slot: [rows] block * block_tokens + offset of each row's KV
 *   d_cos, d_sin: [max_pos][head_dim / 2] fp32, cos/sin(pos * theta^(-2i/head_dim))
 *   d_cache: the paged cache; layer `layer` is written
 */
hx_status hx_cuda_rope_kv(hx_bf16 *d_q, hx_bf16 *d_cache, const float *d_qkv, const int *d_pos,
                          const int *d_slot, const float *d_cos, const float *d_sin, int rows,
                          int heads, const hx_cuda_kv_layout *kv, int layer,
                          hx_cuda_stream *stream, hx_err *err);

/*
 * A decode step's attention input: hx_cuda_gemm_rmsnorm into d_qkv
 * ([rows][(heads + 2 kv_heads) * head_dim] fp32; d_w: that many rows of
 * [in]), then hx_cuda_rope_kv from it, with the same results. With
 * hx_cuda_set_fused_rope(1) ($HX_CUDA_FUSED_ROPE=1; off by default until
 * measured on a GPU), at 1 or 2 rows where the fused GEMV applies, one
 * kernel does it all and d_qkv is left alone: each warp computes the pair of
 * outputs i and i + head_dim/2 of one head, rotates it as rope_kv does and
 * writes q, or k and v into the cache, from registers (one kernel launch and
 * the fp32 round trip less a layer). Its results equal the two calls' bit
 * for bit when they use the first GEMV kernel (hx_cuda_set_gemv_variant(1));
 * the shape rule's choice for norm + q/k/v, the second, sums in another
 * order.
 */
hx_status hx_cuda_gemm_rmsnorm_rope_kv(hx_cuda_blas *b, hx_bf16 *d_q, hx_bf16 *d_cache,
                                       float *d_qkv, float *d_x, const float *d_norm_w, float eps,
                                       hx_bf16 *d_h, const hx_bf16 *d_w, int rows, int in,
                                       int heads, const hx_cuda_kv_layout *kv, int layer,
                                       const int *d_pos, const int *d_slot, const float *d_cos,
                                       const float *d_sin, hx_cuda_stream *stream, hx_err *err);
void hx_cuda_set_fused_rope(int on);

/* d_out[r][i] = bf16(silu(gate) * up);  d_gate_up: [rows][2 * ff] bf16, d_out: [rows][ff] */
hx_status hx_cuda_swiglu(hx_bf16 *d_out, const hx_bf16 *d_gate_up, int rows, int ff,
                         hx_cuda_stream *stream, hx_err *err);

/*
 * Prefill attention (causal, GQA, FlashAttention-2 style: 64x64 tiles on
 * tensor cores, online softmax) of the queries of n_seqs sequences over
 * their paged KV. Sequence s has d_n[s] queries at rows d_row0[s] .. and
 * positions d_pos0[s] .., block-table row d_slot[s]; query t sees keys
 * 0 .. d_pos0[s] + t, which must be in the cache. max_n >= every d_n[s].
 *   d_out, d_q: [rows][heads][head_dim] bf16. head_dim 64 or 128.
 */
hx_status hx_cuda_prefill_attention(hx_bf16 *d_out, const hx_bf16 *d_q, const hx_bf16 *d_cache,
                                    const hx_cuda_kv_layout *kv, int layer,
                                    const int *d_block_tables, const int *d_slot,
                                    const int *d_row0, const int *d_pos0, const int *d_n,
                                    int n_seqs, int max_n, int heads, hx_cuda_stream *stream,
                                    hx_err *err);

/*
 * Which prefill attention kernel runs: 2 (the default; other values mean 2)
 * the FlashAttention-2 kernel on mma.sync with the softmax in registers
 * (checked against the WMMA kernel and the CPU on an H200: 2.3x faster at
 * 2048 tokens); 1 the WMMA kernel, whose softmax goes through shared memory;
 * 3 kernel 2's maths with 128 query rows a block, K/V tiles double-buffered
 * by cp.async and fragments by ldmatrix (NOT yet run on a GPU: checked on
 * the CPU emulation only, whose maths are kernel 2's).
 * $HX_CUDA_PREFILL_ATTN, read on first use when this was not called, selects
 * one too. Later launches only.
 */
void hx_cuda_set_prefill_attention_variant(int v);

/*
 * Decode attention: one query per sequence (row d_row[s], attending keys
 * 0 .. d_len[s]-1 of block-table row d_slot[s]), split along the sequence
 * into up to max_parts chunks (grid-fixed, so that a CUDA graph serves any
 * lengths up to max_parts * 256); the last chunk of a (sequence, KV head)
 * to finish merges the partials, in the same kernel.
 *   d_part: workspace of hx_cuda_decode_attention_workspace(n_seqs, heads,
 *           head_dim, max_parts) bytes, ZEROED ONCE after allocation
 *           (hx_cuda_memset): it holds arrival counters that every call
 *           leaves at zero. It serves calls with the same heads, head_dim and
 *           max_parts and at most its n_seqs sequences, one call at a time.
 */
size_t hx_cuda_decode_attention_workspace(int n_seqs, int heads, int head_dim, int max_parts);
hx_status hx_cuda_decode_attention(hx_bf16 *d_out, const hx_bf16 *d_q, const hx_bf16 *d_cache,
                                   const hx_cuda_kv_layout *kv, int layer,
                                   const int *d_block_tables, const int *d_slot,
                                   const int *d_row, const int *d_len, int n_seqs,
                                   int max_parts, int heads, float *d_part,
                                   hx_cuda_stream *stream, hx_err *err);

/*
 * Which decode attention kernel runs (same contract, results equal up to
 * fp32 summation order): 2 (the default) a kernel that waits on memory
 * fewer times (K and V of a chunk fetched at once by cp.async, 256 threads,
 * 64 KB of shared memory); 1 the first kernel; other values mean 2.
 * $HX_CUDA_DECODE_ATTN=1, read on first use when this was not called,
 * selects 1. On an H200 (context 512) 2 took 7.8 us against 11.8 at batch 1
 * and 56.6 against 60.4 at batch 64, and passed test_cuda (both kernels).
 * Later launches only; graphs keep what they captured.
 */
void hx_cuda_set_decode_attention_variant(int v);

/* Keys that one decode-attention chunk covers at most: max_parts = ceil(max_len / this). */
#define HX_CUDA_DECODE_CHUNK_MAX 256

/* ---- a one-row decode step through every layer in one kernel ---------------------------------- */

/* One layer's weights, as the kernel reads them (an array of these in device memory). */
typedef struct hx_cuda_layer {
    const float *attn_norm, *ffn_norm; /* [hidden] */
    const hx_bf16 *wqkv;               /* [(heads + 2 kv_heads) head_dim][hidden] */
    const hx_bf16 *wo;                 /* [hidden][heads head_dim] */
    const hx_bf16 *wgu;                /* [2 ff][hidden]: the gate rows, then the up rows */
    const hx_bf16 *wdown;              /* [hidden][ff] */
} hx_cuda_layer;

/*
 * hx_cuda_decode1's arguments: one token of one sequence through layers
 * 0 .. n_layers-1 of the cache (and of d_layers). Scalars the step changes
 * are read from device memory when the kernel runs, so that a CUDA graph
 * replays it for every step.
 */
typedef struct hx_cuda_decode1_args {
    float *d_x;                    /* [hidden] fp32 residual stream: in (unless d_embed), and
                                      out after the layers */
    const hx_cuda_layer *d_layers; /* [n_layers] */
    int n_layers, hidden, heads, ff;
    float eps;                     /* RMSNorm's */
    hx_bf16 *d_cache;              /* the paged cache: the token's K and V are written */
    hx_cuda_kv_layout kv;
    const int *d_block_tables;     /* [*][kv.max_blocks_per_seq] */
    const int *d_seq;              /* [1]: the sequence's block-table row */
    const int *d_pos;              /* [1]: the token's position (RoPE) */
    const int *d_kv_slot;          /* [1]: block * block_tokens + offset of its K and V */
    const int *d_len;              /* [1]: keys attended, the token's own included (pos + 1) */
    const float *d_cos, *d_sin;    /* [max_pos][head_dim / 2], as hx_cuda_rope_kv */
    hx_bf16 *d_q;                  /* [heads][head_dim] scratch: rotated queries */
    hx_bf16 *d_att;                /* [heads][head_dim] scratch: attention outputs */
    hx_bf16 *d_act;                /* [ff] scratch: SwiGLU outputs */
    float *d_part;                 /* hx_cuda_decode_attention_workspace(1, heads, head_dim,
                                      max_parts) bytes, zeroed once: shared with that call */
    int max_parts;                 /* *d_len <= max_parts * HX_CUDA_DECODE_CHUNK_MAX */
    unsigned *d_sync;              /* HX_CUDA_DECODE1_SYNC_BYTES, zeroed once: the grid barrier */
    /* the step's ends, in the same kernel (hx_cuda_embed's and the final norm + LM head's
       maths); NULL: not done here */
    const hx_bf16 *d_embed;        /* [vocab][hidden]: first d_x = row *d_token, as hx_cuda_embed */
    const int *d_token;            /* [1] */
    const float *d_final_norm;     /* [hidden]: after the layers, d_logits = the LM head of
                                      RMSNorm(d_x) (d_x is left as it is) */
    const hx_bf16 *d_lm_head;      /* [vocab][hidden] */
    float *d_logits;               /* [vocab] */
    int vocab;
} hx_cuda_decode1_args;

#define HX_CUDA_DECODE1_SYNC_BYTES 256

/*
 * The layers of a decode step of ONE row in one persistent kernel, for the
 * step that is bound by reading the weights once (batch 1): per layer
 * RMSNorm + q/k/v GEMV + RoPE + the KV write, decode attention over the
 * paged cache (split along the sequence, merged by the last chunk), the o
 * GEMV added into d_x, RMSNorm + gate/up GEMV + SwiGLU, the down GEMV added
 * into d_x: the maths and rounding points of hx_cuda_gemm_rmsnorm_rope_kv,
 * hx_cuda_decode_attention, hx_cuda_gemm (beta 1) and
 * hx_cuda_gemm_rmsnorm_swiglu at one row, fp32 sums in another order.
 * With d_embed set, also the embedding lookup before the layers, and with
 * d_final_norm set the final RMSNorm + LM head after them (hx_cuda_embed,
 * hx_cuda_add_rmsnorm, hx_cuda_gemm's maths; each on its own, as a stage
 * holds the one or the other), so that a whole model's step is this kernel
 * and the sampling. Instead of ~7 launches a layer the blocks (one an SM,
 * co-resident by a cooperative launch) pass 5 grid barriers a layer, and before each barrier
 * every warp asks the L2 cache for the weight rows it reads next
 * (hx_cuda_set_decode1_prefetch), so that the wait streams weights.
 * Limits (HX_ENOTSUP): head_dim 64 or 128, at most 8 query heads per KV
 * head, hidden, heads * head_dim and ff multiples of 8; a device without
 * cooperative launch, with too little shared memory a block (head_dim 128
 * needs 110 KB: not Ada's 99) or fewer SMs usable than it has. One call at
 * a time per d_sync and d_part.
 */
hx_status hx_cuda_decode1(const hx_cuda_decode1_args *a, hx_cuda_stream *stream, hx_err *err);

/*
 * hx_cuda_decode1's L2 requests: KiB of next weight rows a warp asks for
 * before each barrier (0: none; default 8, or $HX_CUDA_DECODE1_PF read on
 * first use when this was not called). Later launches only.
 */
void hx_cuda_set_decode1_prefetch(int kib);

/* ---- sampling --------------------------------------------------------------------------------- */

/*
 * The seeded generator's initial state for `seed` (splitmix64, as
 * hx_llama_sampler_new): store it in a d_rng slot.
 */
uint64_t hx_cuda_rng_init(uint64_t seed);

/*
 * One token per logits row, as hx_llama_sample: temperature 0 (or d_temp
 * NULL) is argmax with the lowest index on ties; otherwise softmax(logits /
 * temperature) and a draw u from the row's xorshift64* generator
 * d_rng[d_rng_slot[r]] (advanced), over the whole vocabulary in index order,
 * or, when 0 < top_p < 1, over the nucleus (the most likely tokens, ties by
 * lower index, until their mass exceeds top_p) in that order.
 *   d_tokens: [rows]   d_logits: [rows][vocab] fp32
 *   d_temp, d_top_p: [rows] fp32 (may be NULL: greedy)   d_rng_slot: [rows]
 *   d_rng: [slots] uint64
 */
hx_status hx_cuda_sample(int *d_tokens, const float *d_logits, int rows, int vocab,
                         const float *d_temp, const float *d_top_p, const int *d_rng_slot,
                         uint64_t *d_rng, hx_cuda_stream *stream, hx_err *err);

/* ---- KV segments ------------------------------------------------------------------------------ */

/*
 * Positions token_first .. token_first + tokens - 1 of local layers
 * [layer_first, +num_layers) and KV heads [head_first, +num_heads) of the
 * sequence with block table d_blocks (one row) between the paged bf16 cache
 * and a segment payload (runtime/kvcache.h layout; 16-byte aligned):
 *   d_seg: [num_layers][2][num_heads][tokens][head_dim] fp32, or bf16 when seg_bf16
 * A bf16 payload is the cache's values, bit for bit, either way; with fp32,
 * pack widens exactly and unpack rounds to bf16 (nearest even).
 */
hx_status hx_cuda_kv_pack(void *d_seg, int seg_bf16, const hx_bf16 *d_cache,
                          const hx_cuda_kv_layout *kv, const int *d_blocks, int layer_first,
                          int num_layers, int head_first, int num_heads, int token_first,
                          int tokens, hx_cuda_stream *stream, hx_err *err);
hx_status hx_cuda_kv_unpack(hx_bf16 *d_cache, const void *d_seg, int seg_bf16,
                            const hx_cuda_kv_layout *kv, const int *d_blocks, int layer_first,
                            int num_layers, int head_first, int num_heads, int token_first,
                            int tokens, hx_cuda_stream *stream, hx_err *err);

/* ---- NCCL (tensor-parallel all-reduce, KV send/recv between groups) ----------------------- */

/*
 * Bytes of an ncclUniqueId. Rank 0 makes one (hx_cuda_nccl_unique_id) and
 * hands the bytes to the other ranks over its own authenticated
 * connection; each rank then joins with hx_cuda_nccl_new. HX_ENOTSUP in a
 * build without NCCL (hx_cuda_nccl_available() == 0).
 *
 * A peer process may die at any time, so no call here waits on a peer
 * without a bound: communicators are NCCL's non-blocking kind, each call
 * polls (yielding the CPU for 200 us, then every 20 us, after 10 ms every
 * millisecond) until NCCL has done its part, and a
 * deadline that passes or an asynchronous error (a peer gone, the network
 * down) aborts the communicator (ncclCommAbort, which also stops its
 * kernels on the GPU). HX_ETIMEDOUT and HX_ECONN (HX_EIO for NCCL's internal
 * errors) then name the rank, the size and what happened, and every later
 * call on that communicator fails at once with HX_ECONN ("nccl:
 * communicator aborted after ..."); only hx_cuda_nccl_free remains. The
 * operations only queue work on a stream: hx_cuda_nccl_wait waits for it
 * with a deadline (hx_cuda_stream_sync would hang with a dead peer).
 * A communicator serves one thread at a time; groups are per thread.
 * Different threads may use different communicators of one device at once
 * (a decode worker receives KV while its engine all-reduces): the calls
 * that queue, create or free are serialized process-wide (the waits are not).
 */
/* NCCL 2.19 or later, at build and at run time (else unavailable: HX_ENOTSUP). */
#define HX_CUDA_NCCL_ID_BYTES 128
typedef struct hx_cuda_nccl hx_cuda_nccl; /* opaque: one rank's communicator */

int hx_cuda_nccl_available(void);
hx_status hx_cuda_nccl_unique_id(uint8_t id[HX_CUDA_NCCL_ID_BYTES], hx_err *err);
/*
 * Collective over all n_ranks: every rank calls it with the same id, on its
 * own GPU `device` (made current), and it blocks until all have joined or
 * timeout_s (> 0, else HX_EINVAL) has passed: then HX_ETIMEDOUT ("nccl:
 * rank R of N: the other ranks did not join within T s"), the half-made
 * communicator aborted. Other failures: HX_ECONN / HX_EIO naming NCCL's
 * error, HX_EINVAL for a bad rank, the device's error from
 * hx_cuda_set_device. *out (NULL on failure) is freed with hx_cuda_nccl_free.
 */
hx_status hx_cuda_nccl_new(const uint8_t id[HX_CUDA_NCCL_ID_BYTES], int n_ranks, int rank,
                           int device, double timeout_s, hx_cuda_nccl **out, hx_err *err);
/*
 * Flushes the work already queued (at most 10 s, then aborts) and frees
 * the communicator, aborted or not; NULL is a no-op. Peers should free
 * theirs too: a live communicator's free waits for them, up to that bound.
 */
void hx_cuda_nccl_free(hx_cuda_nccl *c);
int hx_cuda_nccl_rank(const hx_cuda_nccl *c);
int hx_cuda_nccl_size(const hx_cuda_nccl *c);
/*
 * The operations below queue their work on `stream` (NULL: the legacy
 * default stream) and return once NCCL has handed it there, which may take
 * a while the first time a pair of ranks talk (they connect then): bounded
 * by 20 s, after which the communicator is aborted (HX_ETIMEDOUT). Inside a
 * group, hx_cuda_nccl_group_end does that wait for every communicator used.
 * Completion: hx_cuda_nccl_wait.
 */
/* In-place sum over the ranks: d_buf [count] fp32 (is_bf16 0) or bf16 (is_bf16 1). */
hx_status hx_cuda_nccl_allreduce(hx_cuda_nccl *c, void *d_buf, size_t count, int is_bf16,
                                 hx_cuda_stream *stream, hx_err *err);
/* Point to point, bytes of device memory (a KV segment); pair every send with a recv. */
hx_status hx_cuda_nccl_send(hx_cuda_nccl *c, const void *d_buf, size_t bytes, int peer,
                            hx_cuda_stream *stream, hx_err *err);
hx_status hx_cuda_nccl_recv(hx_cuda_nccl *c, void *d_buf, size_t bytes, int peer,
                            hx_cuda_stream *stream, hx_err *err);
/*
 * Brackets several sends/recvs (and all-reduces) so that they progress
 * together (no deadlock). Groups nest; the outermost group_end launches
 * them and waits, bounded as above, on every communicator used in it (at
 * most 16 per group, else HX_EINVAL from the call that adds one more),
 * aborting any that fails or does not get there in time. Call group_end
 * after group_start even when a call in between failed.
 */
hx_status hx_cuda_nccl_group_start(hx_err *err);
hx_status hx_cuda_nccl_group_end(hx_err *err);
/*
 * Waits until all the work queued on stream s (NCCL's and anything else)
 * is done, polling the stream (as above) and the communicator's
 * asynchronous state. An asynchronous NCCL error aborts the communicator
 * and returns HX_ECONN (HX_EIO for NCCL's internal errors); when timeout_s
 * (> 0, else HX_EINVAL) passes first, the communicator is aborted (so that
 * its kernels stop and the stream drains) and HX_ETIMEDOUT is returned;
 * either way the message names rank, size and what happened, and the
 * buffers of the aborted operations hold garbage. A CUDA error on the
 * stream is the device's HX_EIO ("cuda: cudaStreamQuery: ..."), the
 * communicator left as it is. HX_ECONN at once on an aborted communicator.
 */
hx_status hx_cuda_nccl_wait(hx_cuda_nccl *c, hx_cuda_stream *s, double timeout_s, hx_err *err);

/* ---- CUDA graphs and device memory (for engines) ---------------------------------------- */

typedef struct hx_cuda_graph hx_cuda_graph; /* opaque: an instantiated CUDA graph */

/* Starts capturing `s` (thread-local mode). */
hx_status hx_cuda_graph_begin(hx_cuda_stream *s, hx_err *err);
/* Ends the capture and instantiates it into *out. */
hx_status hx_cuda_graph_end(hx_cuda_stream *s, hx_cuda_graph **out, hx_err *err);
/* Ends a capture that failed part-way, dropping what was captured (no error). */
void hx_cuda_graph_abort(hx_cuda_stream *s);
hx_status hx_cuda_graph_launch(hx_cuda_graph *g, hx_cuda_stream *s, hx_err *err);
void hx_cuda_graph_free(hx_cuda_graph *g);



/* Free and total device memory of the current device. */
hx_status hx_cuda_mem_info(size_t *free_bytes, size_t *total_bytes, hx_err *err);

#ifdef __cplusplus
}
#endif

#endif /* HX_CUDA_H */
