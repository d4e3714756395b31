/*
 * paged.h - attention over a paged KV cache (fp32, CPU), for continuous batching.
 *
 * The keys and values of a sequence live in fixed-size blocks of
 * block_tokens positions scattered through one storage; a sequence's block
 * table lists its blocks in position order, so position p lives in block
 * blocks[p / block_tokens] at offset p % block_tokens. This header knows
 * nothing of who allocates the blocks (runtime/kvcache.h does): it is given
 * base pointers and strides.
 *
 * Several sequences are attended in one call, each with its own queries
 * (one for a decode step, several for a prompt chunk), so a batch of
 * requests at different positions runs as one parallel job.
 *
 * The arithmetic is hx_cpu_attention's, step for step (hx_cpu_dot for the
 * scores, scaled by 1/sqrt(head_dim), hx_cpu_softmax, then the values added
 * in position order), so a query gives bit-identical output whether its KV
 * is paged here or contiguous there.
 *
 * Pointers: everything is borrowed (caller-owned); shapes are in comments.
 */
#ifndef HX_CPU_PAGED_H
#define HX_CPU_PAGED_H

#include <stddef.h>

#include "kernels/cpu/cpu.h"

/*
 * One layer's paged K and V. The keys of block b and KV head h are the
 * [block_tokens][head_dim] floats at k + b * block_stride + h * head_stride;
 * values likewise from v. Strides are in floats. Plain value; the storage is
 * borrowed.
 */
typedef struct hx_cpu_paged_kv {
    const float *k;
    const float *v;
    size_t block_stride; /* floats from one block to the next */
    size_t head_stride;  /* floats from one KV head to the next inside a block */
    int block_tokens;    /* positions per block, >= 1 */
} hx_cpu_paged_kv;

/*
 * One sequence of a call: its queries are rows row0 .. row0 + n_tokens - 1
 * of q and out, at positions pos0 .. pos0 + n_tokens - 1; query t sees keys
 * 0 .. pos0 + t, which must already be in the cache. blocks (borrowed) is
 * its block table, [ceil((pos0 + n_tokens) / block_tokens)] block ids.
 */
typedef struct hx_cpu_paged_seq {
    const int *blocks;
    int pos0;
    int n_tokens; /* >= 1 */
    int row0;
} hx_cpu_paged_seq;

/*
 * Causal grouped-query attention of every sequence's queries over its
 * paged KV:
 *
 *   out:     [n_rows][n_heads][head_dim]
 *   q:       [n_rows][n_heads][head_dim]   (already rotated)
 *   seqs:    [n_seqs], rows ascending and not overlapping (row0 of each is
 *            the previous one's row0 + n_tokens; every row in [0, n_rows)
 *            belongs to one sequence)
 *   scratch: [hx_cpu_pool_threads(pool)][max_keys] floats, where max_keys
 *            is at least pos0 + n_tokens of every sequence
 *
 * n_heads must be a multiple of kv_heads; query head h uses KV head
 * h / (n_heads / kv_heads). Work is split over (row, head) pairs.
 */
void hx_cpu_paged_attention(hx_cpu_pool *pool, float *out, const float *q,
                            const hx_cpu_paged_kv *kv, const hx_cpu_paged_seq *seqs, int n_seqs,
                            int n_rows, int n_heads, int kv_heads, int head_dim, int max_keys,
                            float *scratch);

#endif /* HX_CPU_PAGED_H */
