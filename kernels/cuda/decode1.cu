// decode1.cu - a decode step of one row through every layer of a stage in
// one persistent kernel (hx_cuda_decode1; the contract is in kernels/cuda.h).
//
// At batch 1 a step is bound by reading each weight once (~122 MB a layer
// of a 1B-class model against ~60 KB of activations), and one launch per
// kernel costs the step its ramp-up and tail ~100 times. Here:
//
// - one block of 512 threads per SM, launched cooperatively (all resident),
//   runs each layer's five phases with a grid barrier after each:
//     A  RMSNorm of the fp32 residual (every block, into shared memory) and
//        the q/k/v GEMV: a warp task is outputs i and i + D/2 of one head,
//        rotated and written as q or into the cache (gemvn_rope_put, the
//        fused-RoPE GEMV's epilogue)
//     B  attention over the paged cache: (KV head, chunk) items over the
//        blocks, each a chunk's partial softmax (K rows into registers, a
//        thread a key, and V rows into shared memory by cp.async meanwhile);
//        the last chunk of a KV head to finish merges them
//        (decode_attn_kernel's scheme and workspace)
//     C  the o GEMV, added into the residual
//     D  RMSNorm and the gate/up GEMV + SwiGLU: a warp task is feature f's
//        gate and up rows
//     E  the down GEMV, added into the residual
// - a GEMV task streams its weight rows in 16-byte loads, 16 a lane in
//   flight (8 KB a warp: a q/k/v pair or a gate/up pair of 2048-wide rows at
//   once, half a down row; o's 4 KB rows take 8), 128 KB an SM, against the
//   input vector in shared memory; all issued before the first FMA (SASS).
//   Tasks are dealt round-robin over the blocks first (task t: block t %
//   grid, warp t / grid), so that every SM streams in every phase.
// - weights do not depend on the activations: before each barrier every
//   warp copies the first batch of its next task (8 KB) into its own region
//   of shared memory by cp.async (d1_preload: no registers held across the
//   barrier, where they would spill), so that the phase's first FMAs wait
//   neither for the barrier nor for its norm or vector load; and it asks L2
//   for the first rows of its tasks in the next GEMV phase (up to
//   hx_cuda_set_decode1_prefetch's budget), so the barrier's wait and the
//   attention phase, where HBM would idle, stream weights. The regions take
//   128 KB (160 KB of shared memory at the 1B shape: H100, H200, A100); a
//   device with less runs without them (Ada's 99 KB at head_dim 64; at 128
//   the attention alone needs 109 KB there: HX_ENOTSUP).
// - what other blocks wrote in this kernel is read with ld.global.cg (L2:
//   an SM's L1 is not coherent); the barrier orders it (a releasing add
//   to arrive, an acquiring load to leave).
// The barrier traps after 20 s without the other blocks (a fault, never a
// hang), which only a broken co-residency or a bug can cause.
#include <stdlib.h>

#include "common.cuh"
#include "kernels/cuda_rules.h"

#define D1_THREADS 512
#define D1_WARPS (D1_THREADS / 32)
#define D1_CHUNK HX_CUDA_DECODE_CHUNK_MAX // keys of an attention item, at most
#define D1_MAX_G 8                        // query heads per KV head, at most
#define D1_PV_THREADS 256                 // threads of the P V product
#define D1_LOG2E 1.4426950408889634f
#define D1_PRE_BYTES 8192 // a warp's preloaded first batch (16 chunks of 16 bytes a lane)

static int d1_pf_wanted = -1; // -1: not decided yet ($HX_CUDA_DECODE1_PF, default 8 KiB)

extern "C" void hx_cuda_set_decode1_prefetch(int kib)
{
    __atomic_store_n(&d1_pf_wanted, kib < 0 ? 0 : kib > 1024 ? 1024 : kib, __ATOMIC_RELAXED);
}

static int d1_pf_kib(void)
{
    if (__atomic_load_n(&d1_pf_wanted, __ATOMIC_RELAXED) < 0) {
        const char *env = getenv("HX_CUDA_DECODE1_PF");
        hx_cuda_set_decode1_prefetch(env ? atoi(env) : 8);
    }
    return __atomic_load_n(&d1_pf_wanted, __ATOMIC_RELAXED);
}

/* ---- the grid barrier ---- */

__device__ __forceinline__ unsigned d1_ld_acquire(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int d1_add_acq_rel(int *p, int v)
{
    int old;
    asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ unsigned long long d1_clock_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Every block of the grid arrives before any leaves. One word counts the
// arrivals: each block adds 1, block 0 adds 2^31 - (grid - 1), so that the
// barrier as a whole adds 2^31 and flips the word's top bit exactly when the
// last block arrives (the word, zeroed once, keeps its low 31 bits at 0 between
// barriers: no reset, across launches too). The add releases the block's
// writes (ordered before it by __syncthreads); the polling load acquires the
// others'.
__device__ void d1_grid_sync(unsigned *sync)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        unsigned old, now;
        asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;"
                     : "=r"(old)
                     : "l"(sync), "r"(add)
                     : "memory");
        const unsigned long long t0 = d1_clock_ns();
        for (;;) {
            now = d1_ld_acquire(sync);
            if ((now ^ old) & 0x80000000u)
                break;
            if (d1_clock_ns() - t0 > 20000000000ull)
                __trap();
        }
    }
    __syncthreads();
}

/* ---- GEMV phases ---- */

// A GEMV phase: `tasks` warp tasks of NW weight rows each, rows of `in`
// bf16: row k of task t is (t / per) stride + t % per + k kstep.
struct d1_gemv {
    const __nv_bfloat16 *w;
    int in, tasks, per, stride, kstep;
};

__device__ __forceinline__ size_t d1_row(const d1_gemv &g, int t, int k)
{
    return (size_t)(t / g.per) * g.stride + t % g.per + (size_t)k * g.kstep;
}

// Task t's weight rows, as 16-byte chunks.
template <int NW>
__device__ __forceinline__ void d1_rows(const uint4 *(&wr)[NW], const d1_gemv &g, int t)
{
#pragma unroll
    for (int k = 0; k < NW; k++)
        wr[k] = reinterpret_cast<const uint4 *>(g.w + d1_row(g, t, k) * g.in);
}

// Issues the loads of one batch: chunks c0 + 32 u (u < U) of each row, 0 past the row.
template <int NW, int U>
__device__ __forceinline__ void d1_issue(uint4 (&wv)[NW][U], const uint4 *const (&wr)[NW],
                                         int c0, int chunks)
{
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int k = 0; k < NW; k++) {
            const int c = c0 + 32 * u;
            wv[k][u] = c < chunks ? __ldcs(wr[k] + c) : make_uint4(0, 0, 0, 0);
        }
}

// acc[k] = the dot product of weight row wr[k] and the vector vs (shared
// memory, `chunks` chunks of 8 bf16), summed over the warp (every lane gets
// it). wv holds the lane's first batch (chunks lane + 32 u), loaded already.
template <int NW, int U>
__device__ __forceinline__ void d1_dots(float (&acc)[NW], const uint4 *const (&wr)[NW],
                                        const uint4 *vs, int chunks, int lane,
                                        uint4 (&wv)[NW][U])
{
#pragma unroll
    for (int k = 0; k < NW; k++)
        acc[k] = 0.0f;
    for (int c0 = lane;;) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float xf[8];
                hx_unpack8(vs[c], xf);
#pragma unroll
                for (int k = 0; k < NW; k++) {
                    float wf[8];
                    hx_unpack8(wv[k][u], wf);
                    float s = acc[k];
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        s = fmaf(wf[e], xf[e], s);
                    acc[k] = s;
                }
            }
        }
        c0 += 32 * U;
        if (c0 >= chunks)
            break;
        d1_issue<NW, U>(wv, wr, c0, chunks);
    }
#pragma unroll
    for (int k = 0; k < NW; k++)
        acc[k] = hx_warp_sum(acc[k]);
}

// The first batch of this warp's first task of g, copied (cp.async, no
// registers held) into pre, the warp's D1_PRE_BYTES of shared memory (none when
// pre is NULL: a device with too little shared memory for them): issued
// before the barrier and the norm or vector load that the phase waits for
// (the weights do not depend on them), so that its first FMAs wait for
// neither. Lane l's chunk u of row k goes to pre[(u NW + k) 32 + l].
template <int NW, int U>
__device__ __forceinline__ void d1_preload(uint4 *pre, const d1_gemv &g, int gw, int lane)
{
    static_assert(NW * U * 32 * 16 <= D1_PRE_BYTES, "a batch fits a warp's region");
    // hx_cp_async16 declares no memory effects: no read of the region (the last
    // phase's batch) may sink below these copies
    asm volatile("" ::: "memory");
    if (!pre || gw >= g.tasks)
        return;
    const int chunks = g.in >> 3;
    const uint4 *wr[NW];
    d1_rows<NW>(wr, g, gw);
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int k = 0; k < NW; k++) {
            const int c = lane + 32 * u;
            hx_cp_async16(pre + (u * NW + k) * 32 + lane, wr[k] + (c < chunks ? c : 0),
                          c < chunks);
        }
    hx_cp_commit();
}

// This warp's tasks gw, gw + nw, ... of g against vs, the first task's first
// batch from pre (d1_preload) unless pre is NULL. Lane 0 hands each task's
// sums to epi(t, acc, v), v = before(t): what the epilogue reads from memory,
// read by lane 0 while the weights stream rather than after the sums.
template <int NW, int U, typename Before, typename Epi>
__device__ __forceinline__ void d1_gemv_phase(const d1_gemv &g, const uint4 *vs, int gw, int nw,
                                              int lane, const uint4 *pre, Before before,
                                              Epi epi)
{
    const int chunks = g.in >> 3;
    for (int t = gw; t < g.tasks; t += nw) {
        const uint4 *wr[NW];
        d1_rows<NW>(wr, g, t);
        uint4 wv[NW][U];
        if (t == gw && pre) { // the lane's own copies: its wait makes them visible to it
            hx_cp_wait<0>();
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int k = 0; k < NW; k++)
                    wv[k][u] = pre[(u * NW + k) * 32 + lane];
        } else {
            d1_issue<NW, U>(wv, wr, lane, chunks);
        }
        const float2 v = lane == 0 ? before(t) : make_float2(0.0f, 0.0f);
        float acc[NW];
        d1_dots<NW, U>(acc, wr, vs, chunks, lane, wv);
        if (lane == 0)
            epi(t, acc, v);
    }
}

// Asks L2 for up to `budget` bytes of the rows this warp's tasks of g read,
// in the order it reads them, past the first `skip` bytes of each row of its
// first task (what d1_preload copies at the same time): a request a lane per
// 128-byte line touched.
template <int NW>
__device__ __forceinline__ void d1_prefetch(const d1_gemv &g, int gw, int nw, int lane,
                                            size_t budget, size_t skip)
{
    const size_t row_bytes = (size_t)g.in * 2;
    for (int t = gw; t < g.tasks && budget > 0; t += nw)
        for (int k = 0; k < NW && budget > 0; k++) {
            const size_t from = t == gw ? (skip < row_bytes ? skip : row_bytes) : 0;
            const size_t n = row_bytes - from < budget ? row_bytes - from : budget;
            const size_t p = __cvta_generic_to_global(g.w + d1_row(g, t, k) * g.in) + from;
            for (size_t a = (p & ~(size_t)127) + (size_t)lane * 128; a < p + n; a += 32 * 128)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
            budget -= n;
        }
}

// The bytes of each row of a warp's first task that d1_preload<NW, U> copies.
template <int U> __device__ __forceinline__ size_t d1_pre_row_bytes(const uint4 *pre)
{
    return pre ? (size_t)U * 32 * 16 : 0;
}

// hs = bf16(x * scale * nw), scale = 1 / sqrt(mean(x^2) + eps): add_rmsnorm_kernel's
// rounding points (its sum in another order). xf, wf: n floats of scratch each. With
// erow not NULL: x is that embedding row instead (embed_kernel's values), which block 0
// writes into x too.
__device__ __forceinline__ void d1_rmsnorm(__nv_bfloat16 *hs, float *xf, float *wf, float *x,
                                           const __nv_bfloat16 *erow, const float *nw, int n,
                                           float eps, float *red)
{
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += D1_THREADS) {
        float v;
        if (erow) {
            v = __bfloat162float(erow[i]);
            if (blockIdx.x == 0)
                x[i] = v;
        } else {
            v = __ldcg(x + i);
        }
        xf[i] = v;
        wf[i] = __ldg(nw + i);
        ss += v * v;
    }
    ss = hx_block_sum(ss, red);
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += D1_THREADS) // the thread's own xf[i], wf[i]
        hs[i] = __float2bfloat16_rn(xf[i] * scale * wf[i]);
    __syncthreads();
}

// vs = src[0..n) (bf16, n a multiple of 8), written in this kernel by other blocks.
__device__ __forceinline__ void d1_load(uint4 *vs, const hx_bf16 *src, int n)
{
    const uint4 *s = reinterpret_cast<const uint4 *>(src);
    for (int i = threadIdx.x; i < n / 8; i += D1_THREADS)
        vs[i] = __ldcg(s + i);
    __syncthreads();
}

/* ---- attention ---- */

// Shared memory of an attention item, in floats: q (scaled), the scores, the
// keys' blocks, the P V sums of the key groups, then the chunk's V rows (bf16).
template <int D> struct D1Attn {
    static constexpr int TPK = D / 4, NG = D1_PV_THREADS / TPK; // P V: 4 dimensions a thread
    static constexpr size_t v_off =
        (size_t)D1_MAX_G * D + (size_t)D1_MAX_G * D1_CHUNK + D1_CHUNK + (size_t)NG * D1_MAX_G * D;
    static constexpr size_t floats = v_off + (size_t)D1_CHUNK * D / 2;
    static_assert(v_off % 4 == 0, "V rows 16-byte aligned");
};

// The token's attention at layer `layer`, for every query head, into d_att.
template <int D>
__device__ void d1_attention(const hx_cuda_decode1_args &a, int layer, float *sm, int *flag)
{
    using A = D1Attn<D>;
    const hx_cuda_kv_layout &kv = a.kv;
    const int K = kv.kv_heads, G = a.heads / K, H = a.heads;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __nv_bfloat16 *att = reinterpret_cast<__nv_bfloat16 *>(a.d_att);
    const int len = *a.d_len;
    if (len <= 0) { // nothing to attend: zeros, as the merge writes for an empty sum
        if (blockIdx.x == 0)
            for (int i = tid; i < H * D; i += D1_THREADS)
                att[i] = __float2bfloat16_rn(0.0f);
        return;
    }
    // chunks: about one item per block, as long as the workspace holds them
    const int parts = max(1, min((int)gridDim.x / K, a.max_parts));
    const int chunk = hx_cuda_decode_chunk(len, parts, 32);
    const int np = (len + chunk - 1) / chunk;
    if (np > a.max_parts) // past the contract: *d_len > max_parts * HX_CUDA_DECODE_CHUNK_MAX
        __trap();
    const int *bt = a.d_block_tables + (size_t)*a.d_seq * kv.max_blocks_per_seq;
    int *counters = reinterpret_cast<int *>(a.d_part); // one per KV head
    float *o_part = a.d_part + ((H + 3) & ~3);          // [H][max_parts][D]
    float *ml_part = o_part + (size_t)H * a.max_parts * D; // [H][max_parts][2]
    const float scale_log2 = D1_LOG2E / sqrtf((float)D);
    const __nv_bfloat16 *cache = reinterpret_cast<const __nv_bfloat16 *>(a.d_cache);
    const __nv_bfloat16 *q = reinterpret_cast<const __nv_bfloat16 *>(a.d_q);
    float *qs = sm;                                // [G][D]
    float *sc = qs + D1_MAX_G * D;                 // [G][D1_CHUNK]
    int *kblk = reinterpret_cast<int *>(sc + D1_MAX_G * D1_CHUNK); // [D1_CHUNK]
    float *pv = reinterpret_cast<float *>(kblk + D1_CHUNK);        // [NG][G][D]
    __nv_bfloat16 *vs = reinterpret_cast<__nv_bfloat16 *>(sm + A::v_off); // [D1_CHUNK][D]

    for (int item = blockIdx.x; item < K * np; item += gridDim.x) {
        const int kh = item % K, p = item / K;
        const int start = p * chunk, nk = min(chunk, len - start);
        __syncthreads(); // the previous item is done with shared memory
        for (int i = tid; i < G * D; i += D1_THREADS)
            qs[i] = __bfloat162float(__ldcg(q + (size_t)kh * G * D + i)) * scale_log2;
        for (int jj = tid; jj < nk; jj += D1_THREADS)
            kblk[jj] = bt[(start + jj) / kv.block_tokens];
        __syncthreads();
        // the chunk's V rows, into shared memory (cp.async: L2, not L1) while the scores
        // are computed, so that P V waits for no memory
        for (int i = tid; i < nk * (D / 8); i += D1_THREADS) {
            const int jj = i / (D / 8), c = i % (D / 8);
            hx_cp_async16(vs + (size_t)jj * D + c * 8,
                          cache + hx_kv_offset(kv, kblk[jj], layer, 1, kh) +
                              (size_t)((start + jj) % kv.block_tokens) * D + c * 8,
                          true);
        }
        hx_cp_commit();

        // scores: a thread per key (nk <= D1_CHUNK < D1_THREADS), its K row at once
        if (tid < nk) {
            const int j = start + tid;
            const uint4 *kr = reinterpret_cast<const uint4 *>(
                cache + hx_kv_offset(kv, kblk[tid], layer, 0, kh) +
                (size_t)(j % kv.block_tokens) * D);
            uint4 kraw[D / 8];
#pragma unroll
            for (int c = 0; c < D / 8; c++)
                kraw[c] = __ldcg(kr + c);
            float acc[D1_MAX_G];
#pragma unroll
            for (int g = 0; g < D1_MAX_G; g++)
                acc[g] = 0.0f;
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                float kf[8];
                hx_unpack8(kraw[c], kf);
#pragma unroll
                for (int g = 0; g < D1_MAX_G; g++)
                    if (g < G)
#pragma unroll
                        for (int e = 0; e < 8; e++)
                            acc[g] = fmaf(kf[e], qs[g * D + c * 8 + e], acc[g]);
            }
#pragma unroll
            for (int g = 0; g < D1_MAX_G; g++)
                if (g < G)
                    sc[g * D1_CHUNK + tid] = acc[g];
        }
        __syncthreads();

        // per query head (a warp each): the chunk's max and exp2 sums
        if (warp < G) {
            float *s = sc + warp * D1_CHUNK;
            float mx = -INFINITY;
            for (int jj = lane; jj < nk; jj += 32)
                mx = fmaxf(mx, s[jj]);
            mx = hx_warp_max(mx);
            float sum = 0.0f;
            for (int jj = lane; jj < nk; jj += 32) {
                const float e = exp2f(s[jj] - mx);
                s[jj] = e;
                sum += e;
            }
            sum = hx_warp_sum(sum);
            if (lane == 0) {
                const size_t pi = (size_t)(kh * G + warp) * a.max_parts + p;
                ml_part[pi * 2] = mx;
                ml_part[pi * 2 + 1] = sum;
            }
        }
        hx_cp_wait<0>(); // this thread's V copies; the barrier makes them everyone's
        __syncthreads();

        // P V: a thread per (4 dimensions, key group)
        if (tid < D1_PV_THREADS) {
            const int c4 = tid % A::TPK, kg = tid / A::TPK;
            float acc[D1_MAX_G][4];
#pragma unroll
            for (int g = 0; g < D1_MAX_G; g++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[g][e] = 0.0f;
#pragma unroll 4
            for (int jj = kg; jj < nk; jj += A::NG) {
                const uint2 vv = *reinterpret_cast<const uint2 *>(vs + (size_t)jj * D + c4 * 4);
                const float v[4] = {hx_bf16_lo(vv.x), hx_bf16_hi(vv.x), hx_bf16_lo(vv.y),
                                    hx_bf16_hi(vv.y)};
#pragma unroll
                for (int g = 0; g < D1_MAX_G; g++)
                    if (g < G) {
                        const float pr = sc[g * D1_CHUNK + jj];
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            acc[g][e] = fmaf(pr, v[e], acc[g][e]);
                    }
            }
#pragma unroll
            for (int g = 0; g < D1_MAX_G; g++)
                if (g < G)
                    *reinterpret_cast<float4 *>(pv + ((size_t)kg * G + g) * D + 4 * c4) =
                        make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        }
        __syncthreads();
        for (int i = tid; i < G * D; i += D1_THREADS) {
            const int g = i / D, d = i % D;
            float v = 0.0f;
            for (int k = 0; k < A::NG; k++)
                v += pv[((size_t)k * G + g) * D + d];
            o_part[((size_t)(kh * G + g) * a.max_parts + p) * D + d] = v;
        }

        // the last chunk of this KV head to arrive merges them all: the count's add
        // releases this block's partials (ordered before it by the barrier) and
        // acquires the others' (as the grid barrier does, without a fence)
        __syncthreads();
        if (tid == 0)
            *flag = d1_add_acq_rel(counters + kh, 1) == np - 1;
        __syncthreads();
        if (*flag) {
            for (int i = tid; i < G * D; i += D1_THREADS) {
                const int g = i / D, d = i % D;
                att[(size_t)(kh * G + g) * D + d] = __float2bfloat16_rn(
                    hx_decode_merge(o_part, ml_part, (size_t)(kh * G + g) * a.max_parts, np, D, d));
            }
            if (tid == 0)
                atomicExch(counters + kh, 0); // ready for the next layer's (and call's) items
        }
    }
}

/* ---- the kernel ---- */

// Bytes of shared memory before the preload regions: the GEMV's input vector (bf16,
// vmax of them) and the norm's x and weights (fp32, hidden each), 16-byte aligned.
__host__ __device__ __forceinline__ size_t d1_pre_off(int vmax, int hidden)
{
    return ((size_t)vmax * 2 + (size_t)hidden * 8 + 15) & ~(size_t)15;
}

template <int D>
__global__ void __launch_bounds__(D1_THREADS, 1)
    decode1_kernel(const hx_cuda_decode1_args a, unsigned pf_bytes, int preload)
{
    extern __shared__ uint4 d1_smem[];
    __shared__ float red[32];
    __shared__ int flag;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gw = warp * (int)gridDim.x + (int)blockIdx.x, nw = (int)gridDim.x * D1_WARPS;
    const int hid = a.hidden, hd = a.heads * D, F = a.ff, half = D / 2;
    const int nqkv = a.heads + 2 * a.kv.kv_heads;
    // shared memory: the GEMV's input vector (bf16), then the norm's x and weights
    // (fp32); the attention's over the same bytes
    const int vmax = max(hid, max(hd, F));
    uint4 *vs = d1_smem;
    __nv_bfloat16 *hs = reinterpret_cast<__nv_bfloat16 *>(d1_smem);
    float *xf = reinterpret_cast<float *>(d1_smem) + vmax / 2;
    float *wf = xf + hid;
    float *x = a.d_x;
    __nv_bfloat16 *act = reinterpret_cast<__nv_bfloat16 *>(a.d_act);

    gemvn_rope rp;
    rp.q = reinterpret_cast<__nv_bfloat16 *>(a.d_q);
    rp.cache = reinterpret_cast<__nv_bfloat16 *>(a.d_cache);
    rp.kv = a.kv;
    rp.heads = a.heads;
    rp.pos = rp.slot = nullptr; // gemvn_rope_put is given them (below)
    rp.cos_t = rp.sin_t = nullptr;

    // each warp's region for its preloaded first batches, past the GEMV's bytes (the
    // attention's overlap it: a barrier comes between)
    uint4 *pre =
        preload ? d1_smem + d1_pre_off(vmax, hid) / 16 + warp * (D1_PRE_BYTES / 16) : nullptr;

    // the step's token: its position and cache slot, and its embedding when embedded here
    const int pos = *a.d_pos, kv_slot = *a.d_kv_slot;
    const __nv_bfloat16 *erow = nullptr;
    if (a.d_embed) { // as embed_kernel: the host validates; never read outside
        const int tok = *a.d_token;
        erow = reinterpret_cast<const __nv_bfloat16 *>(a.d_embed) +
               (size_t)(tok < 0 ? 0 : tok >= a.vocab ? a.vocab - 1 : tok) * hid;
    }
    const auto residual = [&](int t) { return make_float2(__ldcg(x + t), 0.0f); };
    const auto nothing = [](int) { return make_float2(0.0f, 0.0f); };

    hx_cuda_layer w = a.d_layers[0];
    d1_preload<2, 8>(pre,
                     {reinterpret_cast<const __nv_bfloat16 *>(w.wqkv), hid, nqkv * half, half, D,
                      half},
                     gw, lane);
    for (int l = 0; l < a.n_layers; l++) {
        const d1_gemv qkv = {reinterpret_cast<const __nv_bfloat16 *>(w.wqkv), hid, nqkv * half,
                             half, D, half};
        const d1_gemv o = {reinterpret_cast<const __nv_bfloat16 *>(w.wo), hd, hid, hid, 0, 0};
        const d1_gemv gu = {reinterpret_cast<const __nv_bfloat16 *>(w.wgu), hid, F, F, 0, F};
        const d1_gemv dn = {reinterpret_cast<const __nv_bfloat16 *>(w.wdown), F, hid, hid, 0, 0};

        // A: norm, q/k/v, RoPE, the KV write
        // (the first layer's input: the token's embedding, when embedded here)
        d1_rmsnorm(hs, xf, wf, x, l == 0 ? erow : nullptr, w.attn_norm, hid, a.eps, red);
        rp.layer = l;
        d1_gemv_phase<2, 8>(
            qkv, vs, gw, nw, lane, pre,
            [&](int t) { // the angle of pair t % half at the token's position
                const size_t i = (size_t)pos * half + t % half;
                return make_float2(a.d_cos[i], a.d_sin[i]);
            },
            [&](int t, const float *acc, float2 cs) {
                gemvn_rope_put(rp, 0, t / half, t % half, half, acc[0], acc[1], kv_slot, cs.x,
                               cs.y);
            });
        // (their copies to shared memory come later: they will find these in L2)
        d1_prefetch<1>(o, gw, nw, lane, pf_bytes, 0);
        d1_prefetch<2>(gu, gw, nw, lane, pf_bytes, 0);
        d1_grid_sync(a.d_sync);

        // B: attention
        d1_attention<D>(a, l, reinterpret_cast<float *>(d1_smem), &flag);
        __syncthreads(); // its shared memory is the preload regions'
        d1_preload<1, 8>(pre, o, gw, lane);
        d1_grid_sync(a.d_sync);

        // C: o, into the residual
        d1_load(vs, a.d_att, hd);
        d1_gemv_phase<1, 8>(o, vs, gw, nw, lane, pre, residual,
                            [&](int t, const float *acc, float2 r) { x[t] = acc[0] + r.x; });
        d1_preload<2, 8>(pre, gu, gw, lane);
        d1_grid_sync(a.d_sync);

        // D: norm, gate/up, SwiGLU
        d1_rmsnorm(hs, xf, wf, x, nullptr, w.ffn_norm, hid, a.eps, red);
        d1_gemv_phase<2, 8>(gu, vs, gw, nw, lane, pre, nothing,
                            [&](int t, const float *acc, float2) {
                                const float g = __bfloat162float(__float2bfloat16_rn(acc[0]));
                                const float u = __bfloat162float(__float2bfloat16_rn(acc[1]));
                                act[t] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
                            });
        d1_prefetch<1>(dn, gw, nw, lane, pf_bytes, d1_pre_row_bytes<16>(pre));
        d1_preload<1, 16>(pre, dn, gw, lane);
        d1_grid_sync(a.d_sync);

        // E: down, into the residual
        d1_load(vs, a.d_act, F);
        d1_gemv_phase<1, 16>(dn, vs, gw, nw, lane, pre, residual,
                             [&](int t, const float *acc, float2 r) { x[t] = acc[0] + r.x; });
        if (l + 1 == a.n_layers) {
            if (!a.d_final_norm)
                break; // the kernel's end orders the rest
            // F: the final norm and the LM head (x stays as it is); a task is rows t and
            // t + vocab / 2 (8 KB in flight a warp, as the other phases), or one row for an
            // odd vocabulary
            const __nv_bfloat16 *lm = reinterpret_cast<const __nv_bfloat16 *>(a.d_lm_head);
            const int hv = a.vocab / 2;
            const d1_gemv head2 = {lm, hid, hv, hv, 0, hv};
            const d1_gemv head1 = {lm, hid, a.vocab, a.vocab, 0, 0};
            const bool two = a.vocab % 2 == 0;
            if (two) {
                d1_prefetch<2>(head2, gw, nw, lane, pf_bytes, d1_pre_row_bytes<8>(pre));
                d1_preload<2, 8>(pre, head2, gw, lane);
            } else {
                d1_prefetch<1>(head1, gw, nw, lane, pf_bytes, d1_pre_row_bytes<8>(pre));
                d1_preload<1, 8>(pre, head1, gw, lane);
            }
            d1_grid_sync(a.d_sync);
            d1_rmsnorm(hs, xf, wf, x, nullptr, a.d_final_norm, hid, a.eps, red);
            if (two)
                d1_gemv_phase<2, 8>(head2, vs, gw, nw, lane, pre, nothing,
                                    [&](int t, const float *acc, float2) {
                                        a.d_logits[t] = acc[0];
                                        a.d_logits[t + hv] = acc[1];
                                    });
            else
                d1_gemv_phase<1, 8>(head1, vs, gw, nw, lane, pre, nothing,
                                    [&](int t, const float *acc, float2) {
                                        a.d_logits[t] = acc[0];
                                    });
            break;
        }
        w = a.d_layers[l + 1];
        const d1_gemv next = {reinterpret_cast<const __nv_bfloat16 *>(w.wqkv), hid, nqkv * half,
                              half, D, half};
        d1_prefetch<2>(next, gw, nw, lane, pf_bytes, d1_pre_row_bytes<8>(pre));
        d1_preload<2, 8>(pre, next, gw, lane);
        d1_grid_sync(a.d_sync);
    }
}

// What the launch needs of the current device: its SMs, its shared-memory allowance a
// block, whether it launches cooperatively (the driver answers from its own cache).
struct d1_device {
    int sms, max_smem, coop;
};

static hx_status d1_device_of(int dev, d1_device *d, hx_err *err)
{
    const cudaDeviceAttr what[3] = {cudaDevAttrMultiProcessorCount,
                                    cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                    cudaDevAttrCooperativeLaunch};
    int *into[3] = {&d->sms, &d->max_smem, &d->coop};
    hx_status st = HX_OK;
    for (int i = 0; i < 3 && st == HX_OK; i++)
        st = hx_cuda_err(cudaDeviceGetAttribute(into[i], what[i], dev), err, "decode1");
    return st;
}

// Launched with the cooperative attribute and WITHOUT programmatic dependent launch
// (hx_launch's): the kernel reads x at once, so it must not start before the kernel
// that wrote it has finished.
template <int D>
static hx_status d1_launch(const hx_cuda_decode1_args *a, cudaStream_t s, hx_err *err)
{
    const int hd = a->heads * D;
    const int vmax = a->hidden > hd ? (a->hidden > a->ff ? a->hidden : a->ff)
                                    : (hd > a->ff ? hd : a->ff);
    const size_t gemv_bytes = d1_pre_off(vmax, a->hidden);
    const size_t pre_bytes = gemv_bytes + (size_t)D1_WARPS * D1_PRE_BYTES;
    const size_t attn_bytes = D1Attn<D>::floats * 4;
    int dev = 0;
    d1_device d;
    hx_status st = hx_cuda_err(cudaGetDevice(&dev), err, "decode1");
    if (st == HX_OK)
        st = d1_device_of(dev, &d, err);
    if (st != HX_OK)
        return st;
    const int sms = d.sms, max_smem = d.max_smem;
    if (!d.coop)
        return hx_err_set(err, HX_ENOTSUP, "cuda decode1: device %d has no cooperative launch",
                          dev);
    // the preload regions where they fit (160 KB at the 1B shape: H100, H200, A100), else
    // none (Ada's 99 KB, at head_dim 64)
    const int preload = pre_bytes > attn_bytes ? pre_bytes + 1024 <= (size_t)max_smem : 1;
    const size_t gemv_need = preload ? pre_bytes : gemv_bytes;
    const size_t smem = gemv_need > attn_bytes ? gemv_need : attn_bytes;
    if (smem + 1024 > (size_t)max_smem)
        return hx_err_set(err, HX_ENOTSUP,
                          "cuda decode1: %zu bytes of shared memory a block, device %d has %d",
                          smem, dev, max_smem);
    // the device's whole allowance, the same whatever the shape: threads launching other
    // shapes at once never lower it under each other
    st = hx_cuda_err(cudaFuncSetAttribute(decode1_kernel<D>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          max_smem - 1024),
                     err, "decode1");
    if (st != HX_OK)
        return st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)sms); // one block an SM: all resident
    cfg.blockDim = dim3(D1_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const unsigned pf = (unsigned)d1_pf_kib() * 1024u;
    const cudaError_t e = cudaLaunchKernelEx(&cfg, decode1_kernel<D>, *a, pf, preload);
    // a block that does not fit an SM, or fewer SMs usable here (MPS, green contexts)
    if (e == cudaErrorCooperativeLaunchTooLarge) {
        (void)cudaGetLastError();
        return hx_err_set(err, HX_ENOTSUP, "cuda decode1: %d blocks cannot all be resident",
                          sms);
    }
    return hx_cuda_err(e, err, "decode1");
}

extern "C" hx_status hx_cuda_decode1(const hx_cuda_decode1_args *a, hx_cuda_stream *stream,
                                     hx_err *err)
{
    hx_status st = hx_cuda_decode1_check(a, err);
    if (st != HX_OK)
        return st;
    if (a->kv.head_dim == 64)
        return d1_launch<64>(a, HX_STREAM(stream), err);
    return d1_launch<128>(a, HX_STREAM(stream), err);
}
