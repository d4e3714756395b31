/*
 * paged.c - attention over a paged KV cache (fp32, CPU).
 */
#define _POSIX_C_SOURCE 200809L
#include "kernels/cpu/paged.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

typedef struct paged_job {
    float *out;                   /* [n_rows][n_heads][head_dim] */
    const float *q;               /* [n_rows][n_heads][head_dim] */
    const hx_cpu_paged_kv *kv;
    const hx_cpu_paged_seq *seqs; /* [n_seqs] */
    int n_seqs, n_rows, n_heads, kv_heads, head_dim, max_keys;
    float *scratch;               /* [threads][max_keys] */
} paged_job;

/*
 * o[i] += a * v[i] for i < d, in 8-wide groups that gcc vectorises at -O2.
 * Each element is one multiply and one add, rounded as the plain loop in
 * hx_cpu_attention rounds them (no contraction in ISO C mode), so the result
 * is the same bits.
 */
static void axpy(float *restrict o, float a, const float *restrict v, int d)
{
    int i = 0;
    for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; l++)
            o[i + l] += a * v[i + l];
    for (; i < d; i++)
        o[i] += a * v[i];
}

/* The sequence holding `row` (rows ascend through seqs). */
static int seq_of_row(const paged_job *j, int row)
{
    int lo = 0, hi = j->n_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (j->seqs[mid].row0 <= row)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void paged_task(void *p, int chunk, int n_chunks, int thread)
{
    const paged_job *j = p;
    const hx_cpu_paged_kv *kv = j->kv;
    const int pairs = j->n_rows * j->n_heads;
    const int p0 = (int)((long long)pairs * chunk / n_chunks);
    const int p1 = (int)((long long)pairs * (chunk + 1) / n_chunks);
    float *att = j->scratch + (size_t)thread * (size_t)j->max_keys; /* [max_keys] */
    const int d = j->head_dim, bt = kv->block_tokens;
    const int group = j->n_heads / j->kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    for (int pi = p0; pi < p1; pi++) {
        const int row = pi / j->n_heads, h = pi % j->n_heads;
        const hx_cpu_paged_seq *s = &j->seqs[seq_of_row(j, row)];
        const int n_keys = s->pos0 + (row - s->row0) + 1;
        const size_t head_off = (size_t)(h / group) * kv->head_stride;
        const float *q = j->q + ((size_t)row * j->n_heads + h) * d; /* [d] */

        /* scores, block by block: keys [b * bt, b * bt + n) of block blocks[b] */
        for (int b = 0, s0 = 0; s0 < n_keys; b++, s0 += bt) {
            const float *kb = kv->k + (size_t)s->blocks[b] * kv->block_stride + head_off;
            const int n = n_keys - s0 < bt ? n_keys - s0 : bt;
            for (int t = 0; t < n; t++)
                att[s0 + t] = hx_cpu_dot(q, kb + (size_t)t * d, d) * scale;
        }
        hx_cpu_softmax(att, n_keys);

        float *o = j->out + ((size_t)row * j->n_heads + h) * d; /* [d] */
        memset(o, 0, (size_t)d * sizeof *o);
        for (int b = 0, s0 = 0; s0 < n_keys; b++, s0 += bt) {
            const float *vb = kv->v + (size_t)s->blocks[b] * kv->block_stride + head_off;
            const int n = n_keys - s0 < bt ? n_keys - s0 : bt;
            for (int t = 0; t < n; t++)
                axpy(o, att[s0 + t], vb + (size_t)t * d, d);
        }
    }
}

/* As hx_cpu_attention: a few chunks per thread; tiny jobs stay on the caller's thread. */
#define CHUNKS_PER_THREAD 4
#define SERIAL_MACS 16384

void hx_cpu_paged_attention(hx_cpu_pool *pool, float *out, const float *q,
                            const hx_cpu_paged_kv *kv, const hx_cpu_paged_seq *seqs, int n_seqs,
                            int n_rows, int n_heads, int kv_heads, int head_dim, int max_keys,
                            float *scratch)
{
    if (n_seqs < 1 || n_rows < 1)
        return;
    paged_job j = {out,     q,       kv,       seqs,     n_seqs,  n_rows,
                   n_heads, kv_heads, head_dim, max_keys, scratch};
    double macs = 0;
    for (int i = 0; i < n_seqs; i++)
        macs += (double)seqs[i].n_tokens * (seqs[i].pos0 + seqs[i].n_tokens) * head_dim;
    macs *= n_heads;
    const int pairs = n_rows * n_heads;
    int chunks = hx_cpu_pool_threads(pool) * CHUNKS_PER_THREAD;
    if (chunks > pairs)
        chunks = pairs;
    if (macs < SERIAL_MACS)
        chunks = 1;
    hx_cpu_pool_run(pool, paged_task, &j, chunks);
}
