/*
 * cuda_rules.h - the host-side rules of kernels/cuda.h that the CUDA
 * kernels (the .cu files of kernels/cuda) and their host emulation
 * (kernels/cuda_emu) must apply alike: the argument checks whose messages
 * callers and tests see, which path a call takes (a GEMV or cuBLAS, the
 * fused norm or not: each rounds differently), and the decode attention's
 * chunking and workspace layout. Internal to those two; a rule changed here changes in
 * both.
 *
 * Every function is inline in this header, so that each side compiles it
 * with its own compiler (nvcc as C++, with __host__ __device__ where the
 * kernels use it too; the emulation as C11).
 */
#ifndef HX_CUDA_RULES_H
#define HX_CUDA_RULES_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda.h"

#if defined(__CUDACC__)
#define HX_RULE_HD __host__ __device__ __forceinline__
#else
#define HX_RULE_HD static inline
#endif

/* The fused norm + GEMV keeps the normalized rows in shared memory: at most this much. */
#define HX_CUDA_GEMVN_SMEM_MAX (44 * 1024)

/* hx_cuda_gemm and friends: sizes of rows x [in] -> out. */
static inline hx_status hx_cuda_gemm_check(int rows, int in, int out, hx_err *err)
{
    if (rows < 1 || in < 1 || out < 1)
        return hx_err_set(err, HX_EINVAL, "cuda gemm: bad sizes rows %d, in %d, out %d", rows, in,
                          out);
    return HX_OK;
}

/*
 * Whether the weight-streaming GEMV (not cuBLAS) serves rows x [in] -> out
 * for a handle made with gemv_max_rows. The GEMV reads each weight once
 * whatever the rows, but its FMAs grow with them: measured on an H100
 * (bench/gpu_bench --micro), it beats cuBLAS at every shape up to 4 rows,
 * and up to 8 rows on matrices of at most 8M elements (q/k/v, o of a 1B
 * model); cuBLAS's tensor cores win beyond.
 */
static inline int hx_cuda_use_gemv(int gemv_max_rows, int rows, int in, int out)
{
    if (rows < 1 || rows > gemv_max_rows || in % 8 != 0)
        return 0;
    return rows <= 4 || (int64_t)in * out <= ((int64_t)8 << 20);
}

/*
 * Whether the GEMV with the norm in front serves rows x [in] -> out: the
 * GEMV would, the normalized rows fit in shared memory, and there are at
 * most max_rows of them. Each block's prologue costs about 2.3 us a row
 * (H200, bench/gpu_bench --micro: q/k/v of a 1B model at 8 rows 28.7 us
 * fused against 15 us for the norm kernel and the GEMV; at 1 row 9.0 us
 * against 10.9), so it pays at a row or two only.
 */
static inline int hx_cuda_use_gemv_norm(int gemv_max_rows, int rows, int in, int out,
                                        int max_rows)
{
    return rows <= max_rows && hx_cuda_use_gemv(gemv_max_rows, rows, in, out) &&
           (size_t)rows * in * 2 <= HX_CUDA_GEMVN_SMEM_MAX;
}

/* The attention kernels' shapes: head_dim, blocks, heads per KV head, the layer. */
static inline hx_status hx_cuda_attn_check(const hx_cuda_kv_layout *kv, int layer, int heads,
                                           hx_err *err)
{
    if (kv->head_dim != 64 && kv->head_dim != 128)
        return hx_err_set(err, HX_ENOTSUP, "cuda attention: head_dim %d (64 or 128 supported)",
                          kv->head_dim);
    if (kv->block_tokens < 1 || kv->max_blocks_per_seq < 1)
        return hx_err_set(err, HX_EINVAL, "cuda attention: %d-token blocks, %d per sequence",
                          kv->block_tokens, kv->max_blocks_per_seq);
    if (heads < 1 || kv->kv_heads < 1 || heads % kv->kv_heads || heads / kv->kv_heads > 8)
        return hx_err_set(err, HX_ENOTSUP,
                          "cuda attention: %d heads over %d KV heads (at most 8 per KV head)",
                          heads, kv->kv_heads);
    if (layer < 0 || layer >= kv->layers)
        return hx_err_set(err, HX_EINVAL, "cuda attention: layer %d of %d", layer, kv->layers);
    return HX_OK;
}

/* hx_cuda_prefill_attention's arguments: the shapes, then n_seqs sequences of at most max_n
   rows. */
static inline hx_status hx_cuda_prefill_check(const hx_cuda_kv_layout *kv, int layer, int heads,
                                              int n_seqs, int max_n, hx_err *err)
{
    hx_status st = hx_cuda_attn_check(kv, layer, heads, err);
    if (st == HX_OK && (n_seqs < 1 || max_n < 1 || n_seqs > 65535))
        st = hx_err_set(err, HX_EINVAL, "cuda prefill attention: %d sequences, max_n %d", n_seqs,
                        max_n);
    return st;
}

/* hx_cuda_decode_attention's arguments: the shapes, then n_seqs sequences over max_parts. */
static inline hx_status hx_cuda_decode_check(const hx_cuda_kv_layout *kv, int layer, int heads,
                                             int n_seqs, int max_parts, hx_err *err)
{
    hx_status st = hx_cuda_attn_check(kv, layer, heads, err);
    if (st == HX_OK && (n_seqs < 1 || n_seqs > 65535 || max_parts < 1 || max_parts > 65535))
        st = hx_err_set(err, HX_EINVAL, "cuda decode attention: %d sequences, %d parts", n_seqs,
                        max_parts);
    return st;
}

/* hx_cuda_decode1's arguments: the layers, the attention's shapes, the sizes, the buffers. */
static inline hx_status hx_cuda_decode1_check(const hx_cuda_decode1_args *a, hx_err *err)
{
    if (a->n_layers < 1 || a->n_layers > a->kv.layers)
        return hx_err_set(err, HX_EINVAL, "cuda decode1: %d layers of a %d-layer cache",
                          a->n_layers, a->kv.layers);
    hx_status st = hx_cuda_decode_check(&a->kv, a->n_layers - 1, a->heads, 1, a->max_parts, err);
    if (st != HX_OK)
        return st;
    if (a->hidden < 8 || a->hidden % 8 || a->ff < 8 || a->ff % 8 ||
        a->heads * a->kv.head_dim % 8)
        return hx_err_set(err, HX_ENOTSUP,
                          "cuda decode1: hidden %d, ff %d, heads x head_dim %d (multiples of 8)",
                          a->hidden, a->ff, a->heads * a->kv.head_dim);
    if (!a->d_x || !a->d_layers || !a->d_cache || !a->d_block_tables || !a->d_seq || !a->d_pos ||
        !a->d_kv_slot || !a->d_len || !a->d_cos || !a->d_sin || !a->d_q || !a->d_att ||
        !a->d_act || !a->d_part || !a->d_sync || (a->d_embed && !a->d_token) ||
        (a->d_final_norm && (!a->d_lm_head || !a->d_logits)))
        return hx_err_set(err, HX_EINVAL, "cuda decode1: a NULL buffer");
    if ((a->d_embed || a->d_final_norm) && a->vocab < 1)
        return hx_err_set(err, HX_EINVAL, "cuda decode1: a vocabulary of %d", a->vocab);
    return HX_OK;
}

/* hx_cuda_to_bf16's source dtype and count. */
static inline hx_status hx_cuda_to_bf16_check(int src_dtype, int64_t n, hx_err *err)
{
    if (n < 0 || (src_dtype != HX_CUDA_DTYPE_F32 && src_dtype != HX_CUDA_DTYPE_BF16 &&
                  src_dtype != HX_CUDA_DTYPE_F16))
        return hx_err_set(err, HX_EINVAL, "cuda to_bf16: bad dtype %d or count %lld", src_dtype,
                          (long long)n);
    return HX_OK;
}

/* hx_cuda_memcpy_2d_async's rows fit their pitches. */
static inline hx_status hx_cuda_copy_2d_check(size_t dst_pitch, size_t src_pitch,
                                              size_t width_bytes, hx_err *err)
{
    if (width_bytes > dst_pitch || width_bytes > src_pitch)
        return hx_err_set(err, HX_EINVAL,
                          "cuda: 2-d copy: rows of %zu bytes wider than the pitches (dst %zu, "
                          "src %zu)",
                          width_bytes, dst_pitch, src_pitch);
    return HX_OK;
}

/* RoPE and the KV write of `rows` tokens: heads, an even head_dim, the layer, the blocks. */
static inline hx_status hx_cuda_rope_check(int rows, int heads, const hx_cuda_kv_layout *kv,
                                           int layer, hx_err *err)
{
    if (rows < 1 || heads < 1 || kv->kv_heads < 1 || kv->head_dim < 2 || kv->head_dim % 2 ||
        layer < 0 || layer >= kv->layers || kv->block_tokens < 1)
        return hx_err_set(err, HX_EINVAL,
                          "cuda rope_kv: %d rows, %d heads, %d KV heads of head_dim %d (even), "
                          "layer %d of %d, %d-token blocks",
                          rows, heads, kv->kv_heads, kv->head_dim, layer, kv->layers,
                          kv->block_tokens);
    return HX_OK;
}

/* hx_cuda_gemm_rmsnorm_rope_kv: RoPE's shapes and the q/k/v GEMM's ([in] -> all heads). */
static inline hx_status hx_cuda_qkv_rope_check(int rows, int in, int heads,
                                               const hx_cuda_kv_layout *kv, int layer,
                                               hx_err *err)
{
    hx_status st = hx_cuda_rope_check(rows, heads, kv, layer, err);
    return st != HX_OK ? st
                       : hx_cuda_gemm_check(rows, in, (heads + 2 * kv->kv_heads) * kv->head_dim,
                                            err);
}

/* A KV segment (layers, heads, tokens) of a sequence of the paged cache kv. */
static inline hx_status hx_cuda_kv_seg_check(const hx_cuda_kv_layout *kv, int layer_first,
                                             int num_layers, int head_first, int num_heads,
                                             int token_first, int tokens, hx_err *err)
{
    if (kv->head_dim < 8 || kv->head_dim % 8 || kv->block_tokens < 1 || num_layers < 1 ||
        num_heads < 1 || tokens < 1 || layer_first < 0 || head_first < 0 || token_first < 0 ||
        layer_first + num_layers > kv->layers || head_first + num_heads > kv->kv_heads ||
        (token_first + tokens + kv->block_tokens - 1) / kv->block_tokens > kv->max_blocks_per_seq)
        return hx_err_set(err, HX_EINVAL,
                          "cuda kv segment: layers [%d, +%d), heads [%d, +%d), tokens [%d, +%d) "
                          "outside the cache (%d layers, %d heads, head_dim %d)",
                          layer_first, num_layers, head_first, num_heads, token_first, tokens,
                          kv->layers, kv->kv_heads, kv->head_dim);
    return HX_OK;
}

/*
 * Decode attention: keys per chunk for a sequence of len keys over at most
 * parts chunks: a multiple of 32, at least min_chunk (32 or 256), at most
 * HX_CUDA_DECODE_CHUNK_MAX (len <= parts * that). Many sequences give
 * parallelism enough: their blocks then take long chunks (fewer partials);
 * a few take short ones.
 */
HX_RULE_HD int hx_cuda_decode_chunk(int len, int parts, int min_chunk)
{
    int c = (len + parts - 1) / parts;
    c = (c + 31) & ~31;
    return c < min_chunk ? min_chunk
                         : (c > HX_CUDA_DECODE_CHUNK_MAX ? HX_CUDA_DECODE_CHUNK_MAX : c);
}

/*
 * Decode attention's workspace: a record per sequence, so that calls with
 * fewer sequences use a prefix of it (and leave the others' counters alone):
 *   int counter[heads rounded up to 4]  (arrivals per KV head; 0 between calls)
 *   float o[heads][parts][D], then ml[heads][parts][2]
 * Its size in floats.
 */
HX_RULE_HD size_t hx_cuda_decode_rec_floats(int heads, int D, int parts)
{
    return (size_t)((heads + 3) & ~3) + (size_t)heads * parts * (D + 2);
}

#endif /* HX_CUDA_RULES_H */
