// attention.cu - causal grouped-query attention over the paged bf16 KV cache:
// FlashAttention-2 style prefill kernels (64-key tiles, bf16 tensor cores,
// online softmax in fp32: through WMMA, on mma.sync with the softmax in
// registers, and the latter pipelined with cp.async and ldmatrix) and two
// split-sequence decode kernels.
#include <stdlib.h>

#include <mma.h>

#include "common.cuh"
#include "kernels/cuda_rules.h"

using namespace nvcuda;

#define LOG2E 1.4426950408889634f

/* ---- prefill ---- */

#define PF_BQ 64
#define PF_BK 64
#define PF_THREADS 128 // 4 warps x 16 query rows

template <int D> struct PfSmem {
    static constexpr int LDH = D + 8;     // bf16 rows of Q, K, V
    static constexpr int LDS = PF_BK + 4; // fp32 scores
    static constexpr int LDP = PF_BK + 8; // bf16 probabilities
    static constexpr int LDO = D + 4;     // fp32 output accumulator
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + (size_t)PF_BQ * LDH * 2;
    static constexpr size_t v_off = k_off + (size_t)PF_BK * LDH * 2;
    static constexpr size_t s_off = v_off + (size_t)PF_BK * LDH * 2;
    static constexpr size_t p_off = s_off + (size_t)4 * 16 * LDS * 4;
    static constexpr size_t o_off = p_off + (size_t)4 * 16 * LDP * 2;
    static constexpr size_t m_off = o_off + (size_t)4 * 16 * LDO * 4;
    static constexpr size_t bytes = m_off + (size_t)2 * PF_BQ * 4;
};

// The part of the prefill a block takes: sequence blockIdx.z, query head blockIdx.x,
// and bq query rows, tile blockIdx.y from the sequence's end. Blocks start in the order
// x, then y: every head's longest tile (the most keys under the causal mask) first, the
// short ones last, so that they fill the SMs the long ones leave and the tail is short.
struct PfTile {
    int h;               // the query head
    int q_begin, q_rows; // the block's first query row of the sequence, and how many
    int n_keys;          // the keys its last row sees: pos0 + q_begin + q_rows
    int row0, pos0;      // the sequence's first row in q and out, and its first position
    int kvh;             // the KV head of the query head
    const int *bt;       // the sequence's block table
};

// p for this block; false when its tile starts past the sequence's end (no rows).
__device__ __forceinline__ bool pf_tile(PfTile &p, int bq, const hx_cuda_kv_layout &kv,
                                        const int *block_tables, const int *seq_slot,
                                        const int *seq_row0, const int *seq_pos0,
                                        const int *seq_n, int heads)
{
    const int s = blockIdx.z, n = seq_n[s];
    p.h = (int)blockIdx.x;
    p.q_begin = ((int)gridDim.y - 1 - (int)blockIdx.y) * bq;
    if (p.q_begin >= n)
        return false;
    p.q_rows = min(bq, n - p.q_begin);
    p.row0 = seq_row0[s];
    p.pos0 = seq_pos0[s];
    p.n_keys = p.pos0 + p.q_begin + p.q_rows;
    p.kvh = p.h / (heads / kv.kv_heads);
    p.bt = block_tables + (size_t)seq_slot[s] * kv.max_blocks_per_seq;
    return true;
}

template <int D>
__global__ void __launch_bounds__(PF_THREADS)
    prefill_attn_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *q, const __nv_bfloat16 *cache,
                        hx_cuda_kv_layout kv, int layer, const int *block_tables,
                        const int *seq_slot, const int *seq_row0, const int *seq_pos0,
                        const int *seq_n, int heads, float scale_log2)
{
    hx_pdl_begin();
    using S = PfSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(smem + S::q_off);
    __nv_bfloat16 *Ks = reinterpret_cast<__nv_bfloat16 *>(smem + S::k_off);
    __nv_bfloat16 *Vs = reinterpret_cast<__nv_bfloat16 *>(smem + S::v_off);
    float *Ss = reinterpret_cast<float *>(smem + S::s_off);
    __nv_bfloat16 *Ps = reinterpret_cast<__nv_bfloat16 *>(smem + S::p_off);
    float *Os = reinterpret_cast<float *>(smem + S::o_off);
    float *row_m = reinterpret_cast<float *>(smem + S::m_off);
    float *row_l = row_m + PF_BQ;

    PfTile p;
    if (!pf_tile(p, PF_BQ, kv, block_tables, seq_slot, seq_row0, seq_pos0, seq_n, heads))
        return;
    const int h = p.h;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const size_t qstride = (size_t)heads * D;
    constexpr int CH = D / 8; // 16-byte chunks per row

    for (int idx = tid; idx < PF_BQ * CH; idx += PF_THREADS) {
        const int r = idx / CH, c = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < p.q_rows)
            v = *reinterpret_cast<const uint4 *>(q + (size_t)(p.row0 + p.q_begin + r) * qstride +
                                                 (size_t)h * D + c * 8);
        *reinterpret_cast<uint4 *>(Qs + r * S::LDH + c * 8) = v;
    }
    const int wrow0 = warp * 16;
    float *Sw = Ss + warp * 16 * S::LDS;
    __nv_bfloat16 *Pw = Ps + warp * 16 * S::LDP;
    float *Ow = Os + warp * 16 * S::LDO;
    for (int i = lane; i < 16 * S::LDO; i += 32)
        Ow[i] = 0.0f;
    if (lane < 16) {
        row_m[wrow0 + lane] = -INFINITY;
        row_l[wrow0 + lane] = 0.0f;
    }
    __syncthreads();

    const int n_kt = (p.n_keys + PF_BK - 1) / PF_BK;
    const int last_q_of_warp = min(wrow0 + 15, p.q_rows - 1); // <0 when the warp has no rows
    for (int kt = 0; kt < n_kt; kt++) {
        const int k0 = kt * PF_BK;
        for (int idx = tid; idx < PF_BK * CH; idx += PF_THREADS) {
            const int r = idx / CH, c = idx % CH;
            const int j = k0 + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (j < p.n_keys) {
                const int blk = p.bt[j / kv.block_tokens];
                const size_t off = hx_kv_offset(kv, blk, layer, 0, p.kvh) +
                                   (size_t)(j % kv.block_tokens) * D + c * 8;
                const size_t voff = off + (size_t)kv.kv_heads * kv.block_tokens * D;
                kv4 = *reinterpret_cast<const uint4 *>(cache + off);
                vv4 = *reinterpret_cast<const uint4 *>(cache + voff);
            }
            *reinterpret_cast<uint4 *>(Ks + r * S::LDH + c * 8) = kv4;
            *reinterpret_cast<uint4 *>(Vs + r * S::LDH + c * 8) = vv4;
        }
        __syncthreads();
        const bool active = wrow0 < p.q_rows && k0 <= p.pos0 + p.q_begin + last_q_of_warp;
        if (active) {
            // S = Q K^T for the warp's 16 rows and the tile's 64 keys
            for (int nt = 0; nt < PF_BK / 16; nt++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
                wmma::fill_fragment(sf, 0.0f);
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bf;
                    wmma::load_matrix_sync(af, Qs + wrow0 * S::LDH + kk * 16, S::LDH);
                    wmma::load_matrix_sync(bf, Ks + nt * 16 * S::LDH + kk * 16, S::LDH);
                    wmma::mma_sync(sf, af, bf, sf);
                }
                wmma::store_matrix_sync(Sw + nt * 16, sf, S::LDS, wmma::mem_row_major);
            }
            __syncwarp();
            // online softmax: a lane pair per row, 32 columns each
            const int r = lane >> 1, c0 = (lane & 1) * 32;
            const bool row_valid = wrow0 + r < p.q_rows;
            const int qpos = p.pos0 + p.q_begin + wrow0 + r;
            float mx = -INFINITY;
            for (int c = 0; c < 32; c++) {
                const int j = k0 + c0 + c;
                float v = Sw[r * S::LDS + c0 + c] * scale_log2;
                if (!row_valid || j > qpos)
                    v = -INFINITY;
                Sw[r * S::LDS + c0 + c] = v;
                mx = fmaxf(mx, v);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_old = row_m[wrow0 + r];
            const float m_new = fmaxf(m_old, mx);
            float alpha = 1.0f, sum = 0.0f;
            if (m_new != -INFINITY)
                alpha = exp2f(m_old - m_new); // 0 when m_old is -inf
            for (int c = 0; c < 32; c++) {
                const float v = Sw[r * S::LDS + c0 + c];
                float p = 0.0f;
                if (m_new != -INFINITY && v != -INFINITY)
                    p = exp2f(v - m_new);
                const __nv_bfloat16 pb = __float2bfloat16_rn(p);
                Pw[r * S::LDP + c0 + c] = pb;
                sum += __bfloat162float(pb);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            const float l_old = row_l[wrow0 + r];
            for (int c = 0; c < D / 2; c++)
                Ow[r * S::LDO + (lane & 1) * (D / 2) + c] *= alpha;
            __syncwarp();
            if ((lane & 1) == 0) {
                row_m[wrow0 + r] = m_new;
                row_l[wrow0 + r] = l_old * alpha + sum;
            }
            // O += P V
            for (int nt = 0; nt < D / 16; nt++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
                wmma::load_matrix_sync(of, Ow + nt * 16, S::LDO, wmma::mem_row_major);
#pragma unroll
                for (int kk = 0; kk < PF_BK / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pf;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
                    wmma::load_matrix_sync(pf, Pw + kk * 16, S::LDP);
                    wmma::load_matrix_sync(vf, Vs + kk * 16 * S::LDH + nt * 16, S::LDH);
                    wmma::mma_sync(of, pf, vf, of);
                }
                wmma::store_matrix_sync(Ow + nt * 16, of, S::LDO, wmma::mem_row_major);
            }
            __syncwarp();
        }
        __syncthreads();
    }
    // out = O / l
    {
        const int r = lane >> 1;
        if (wrow0 + r < p.q_rows) {
            const float l = row_l[wrow0 + r];
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            __nv_bfloat16 *o =
                out + (size_t)(p.row0 + p.q_begin + wrow0 + r) * qstride + (size_t)h * D;
            for (int c = 0; c < D / 2; c++) {
                const int col = (lane & 1) * (D / 2) + c;
                o[col] = __float2bfloat16_rn(Ow[r * S::LDO + col] * inv);
            }
        }
    }
}

// Raises kernel's dynamic shared-memory limit to `bytes` (and, with max_shared, prefers
// shared memory over L1) on the current device, once a device: the opt-in is per
// device, so *configured has a bit per device (devices past 31 set it every launch).
// The attribute holds for graphs captured after.
template <typename Kernel>
static hx_status smem_opt_in(Kernel kernel, size_t bytes, bool max_shared, unsigned *configured,
                             const char *what, hx_err *err)
{
    int dev = 0;
    hx_status st = hx_cuda_err(cudaGetDevice(&dev), err, what);
    if (st != HX_OK)
        return st;
    const unsigned bit = dev >= 0 && dev < 32 ? 1u << dev : 0u;
    if (bit && (__atomic_load_n(configured, __ATOMIC_RELAXED) & bit))
        return HX_OK;
    st = hx_cuda_err(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
        err, what);
    if (st != HX_OK)
        return st;
    if (max_shared) { // a hint
        (void)cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                   cudaSharedmemCarveoutMaxShared);
        (void)cudaGetLastError();
    }
    __atomic_fetch_or(configured, bit, __ATOMIC_RELAXED);
    return HX_OK;
}

// Launches a prefill attention kernel (any of the three) of `threads` threads a block of
// `bq` query rows, with `bytes` of dynamic shared memory (*configured: smem_opt_in's
// flags, one word per kernel).
template <typename Kernel>
static hx_status prefill_launch_kernel(Kernel kernel, int bq, int threads, size_t bytes,
                                       unsigned *configured, const char *what, int D,
                                       __nv_bfloat16 *out,
                                       const __nv_bfloat16 *q, const __nv_bfloat16 *cache,
                                       const hx_cuda_kv_layout *kv, int layer, const int *bt,
                                       const int *slot, const int *row0, const int *pos0,
                                       const int *n, int n_seqs, int max_n, int heads,
                                       cudaStream_t s, hx_err *err)
{
    hx_status st = smem_opt_in(kernel, bytes, false, configured, what, err);
    if (st != HX_OK)
        return st;
    dim3 grid((unsigned)heads, (unsigned)((max_n + bq - 1) / bq), (unsigned)n_seqs);
    const float scale_log2 = LOG2E / sqrtf((float)D);
    hx_launch(kernel, grid, threads, bytes, s, out, q, cache, *kv, layer, bt, slot, row0, pos0,
              n, heads, scale_log2);
    return hx_cuda_launched(err, what);
}

template <int D>
static hx_status prefill_launch(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                                const __nv_bfloat16 *cache, const hx_cuda_kv_layout *kv, int layer,
                                const int *bt, const int *slot, const int *row0, const int *pos0,
                                const int *n, int n_seqs, int max_n, int heads, cudaStream_t s,
                                hx_err *err)
{
    static unsigned configured = 0;
    return prefill_launch_kernel(prefill_attn_kernel<D>, PF_BQ, PF_THREADS, PfSmem<D>::bytes,
                                 &configured, "prefill_attention", D, out, q, cache, kv, layer, bt,
                                 slot, row0, pos0, n, n_seqs, max_n, heads, s, err);
}

/* ---- prefill, second kernel: mma.sync with register-resident softmax ----
 *
 * FlashAttention-2 as its authors wrote it for Ampere/Hopper: each warp keeps
 * its 16 query rows' scores S, probabilities P and output O in registers as
 * mma.m16n8k16 fragments (the accumulator layout of S is the A-operand
 * layout of P, so P never goes through shared memory), and the online
 * softmax runs on those registers with quad shuffles. Fragment layouts (PTX
 * ISA, mma.m16n8k16 with .bf16): g = lane / 4, t = lane % 4;
 *   A (16x16, row): r0 = A[g][2t..2t+1], r1 = A[g+8][2t..], r2 = A[g][2t+8..], r3 = A[g+8][2t+8..]
 *   B (16x8, col):  r0 = B[2t..2t+1][g], r1 = B[2t+8..2t+9][g]
 *   C (16x8, f32):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
 * (two bf16 per 32-bit register, the lower index in the low half).
 * The default (checked against the wmma kernel and the CPU on an H200: 2.3x
 * faster at 2048 tokens); hx_cuda_set_prefill_attention_variant(1) /
 * $HX_CUDA_PREFILL_ATTN=1 selects the wmma kernel.
 */

__device__ __forceinline__ void mma_bf16_16816(float *c, uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t ld_u32(const __nv_bfloat16 *p)
{
    return *reinterpret_cast<const uint32_t *>(p);
}


// Two bf16 from two places, the first in the low half.
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi)
{
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// The end of an online-softmax step of a warp's 16-row tile (accumulator layout: c 0, 1
// row g, c 2, 3 row g + 8): the probabilities prob(j, c) rounded to bf16 into the A
// fragments pa of P, their bf16 values summed into the rows' l after l is rescaled by a,
// and O rescaled by a. Shared by the mma.sync prefill kernels (their probabilities differ).
template <int NT, int DT, typename Prob>
__device__ __forceinline__ void pf_softmax_end(uint32_t (&pa)[NT][2], float (&o)[DT][4],
                                               float &l_lo, float &l_hi, float a_lo, float a_hi,
                                               Prob prob)
{
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const __nv_bfloat16 p0 = __float2bfloat16_rn(prob(j, 0));
        const __nv_bfloat16 p1 = __float2bfloat16_rn(prob(j, 1));
        const __nv_bfloat16 p2 = __float2bfloat16_rn(prob(j, 2));
        const __nv_bfloat16 p3 = __float2bfloat16_rn(prob(j, 3));
        sum_lo += __bfloat162float(p0) + __bfloat162float(p1);
        sum_hi += __bfloat162float(p2) + __bfloat162float(p3);
        pa[j][0] = pack_bf16(p0, p1); // row g
        pa[j][1] = pack_bf16(p2, p3); // row g + 8
    }
    l_lo = l_lo * a_lo + sum_lo;
    l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
    for (int j = 0; j < DT; j++) {
        o[j][0] *= a_lo;
        o[j][1] *= a_lo;
        o[j][2] *= a_hi;
        o[j][3] *= a_hi;
    }
}

// One 64-key tile of the online softmax of a warp's 16 rows, in this lane's
// registers (rows g and g + 8; S, O as C fragments, P as A fragments):
// scales S to log2 units and, when mask, sets the keys above lim_lo / lim_hi
// to -inf (key0 + 8j + e is the key of sc[j][e] and sc[j][2 + e]); then the
// rows' running maxima m, the rescaling of O and of this lane's part of the
// sums l, and P = exp2(S - m) rounded to bf16 into pa, whose rounded values
// are what l sums. A row with no key yet keeps 0 as its base: exp2(-inf - 0)
// = 0, never NaN.
template <int NT, int DT>
__device__ __forceinline__ void pf_softmax_tile(float (&sc)[NT][4], uint32_t (&pa)[NT][2],
                                                float (&o)[DT][4], float &m_lo, float &m_hi,
                                                float &l_lo, float &l_hi, float scale_log2,
                                                bool mask, int key0, int lim_lo, int lim_hi)
{
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; j++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int key = key0 + j * 8 + e;
            float vlo = sc[j][e] * scale_log2, vhi = sc[j][2 + e] * scale_log2;
            if (mask && key > lim_lo)
                vlo = -INFINITY;
            if (mask && key > lim_hi)
                vhi = -INFINITY;
            sc[j][e] = vlo;
            sc[j][2 + e] = vhi;
            mx_lo = fmaxf(mx_lo, vlo);
            mx_hi = fmaxf(mx_hi, vhi);
        }
    }
    // row maxima over the quad
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const float base_lo = mn_lo == -INFINITY ? 0.0f : mn_lo;
    const float base_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
    const float a_lo = mn_lo == -INFINITY ? 1.0f : exp2f(m_lo - base_lo);
    const float a_hi = mn_hi == -INFINITY ? 1.0f : exp2f(m_hi - base_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    pf_softmax_end(pa, o, l_lo, l_hi, a_lo, a_hi, [&](int j, int c) {
        return exp2f(sc[j][c] - (c < 2 ? base_lo : base_hi));
    });
}

// The end of a warp's 16 rows: the sums over the quad, then rows g (at o_lo) and
// g + 8 (o_lo + 8 qstride) = O / l in bf16, where valid.
template <int DT>
__device__ __forceinline__ void pf_store_rows(const float (&o)[DT][4], float l_lo, float l_hi,
                                              __nv_bfloat16 *o_lo, size_t qstride, bool lo_valid,
                                              bool hi_valid, int t)
{
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
    const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    __nv_bfloat16 *o_hi = o_lo + 8 * qstride;
#pragma unroll
    for (int j = 0; j < DT; j++) {
        if (lo_valid)
            *reinterpret_cast<uint32_t *>(o_lo + j * 8 + 2 * t) =
                hx_pack2(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (hi_valid)
            *reinterpret_cast<uint32_t *>(o_hi + j * 8 + 2 * t) =
                hx_pack2(o[j][2] * inv_hi, o[j][3] * inv_hi);
    }
}

template <int D> struct MmaSmem {
    static constexpr int LD = D + 8; // bf16 row stride: conflict-free fragment loads
    static constexpr size_t bytes = (size_t)3 * 64 * LD * 2;
};

template <int D>
__global__ void __launch_bounds__(PF_THREADS)
    prefill_mma_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *q, const __nv_bfloat16 *cache,
                       hx_cuda_kv_layout kv, int layer, const int *block_tables,
                       const int *seq_slot, const int *seq_row0, const int *seq_pos0,
                       const int *seq_n, int heads, float scale_log2)
{
    hx_pdl_begin();
    constexpr int LD = MmaSmem<D>::LD;
    constexpr int NT = PF_BK / 8; // key n-tiles of S
    constexpr int DT = D / 8;     // dimension n-tiles of O
    constexpr int CH = D / 8;     // 16-byte chunks per row
    extern __shared__ __align__(128) unsigned char smem[];
    __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *Ks = Qs + PF_BQ * LD;
    __nv_bfloat16 *Vs = Ks + PF_BK * LD;

    PfTile p;
    if (!pf_tile(p, PF_BQ, kv, block_tables, seq_slot, seq_row0, seq_pos0, seq_n, heads))
        return;
    const int h = p.h;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const size_t qstride = (size_t)heads * D;

    for (int idx = tid; idx < PF_BQ * CH; idx += PF_THREADS) {
        const int r = idx / CH, c = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < p.q_rows)
            v = *reinterpret_cast<const uint4 *>(q + (size_t)(p.row0 + p.q_begin + r) * qstride +
                                                 (size_t)h * D + c * 8);
        *reinterpret_cast<uint4 *>(Qs + r * LD + c * 8) = v;
    }
    __syncthreads();
    const int wrow0 = warp * 16;
    // the warp's Q as A fragments, for the whole kernel
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const __nv_bfloat16 *q0 = Qs + (wrow0 + g) * LD + kk * 16 + 2 * t;
        qa[kk][0] = ld_u32(q0);
        qa[kk][1] = ld_u32(q0 + 8 * LD);
        qa[kk][2] = ld_u32(q0 + 8);
        qa[kk][3] = ld_u32(q0 + 8 * LD + 8);
    }
    float o[DT][4];
#pragma unroll
    for (int j = 0; j < DT; j++)
        o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY; // running max of rows g and g + 8
    float l_lo = 0.0f, l_hi = 0.0f;           // this lane's part of the running sums
    const bool lo_valid = wrow0 + g < p.q_rows, hi_valid = wrow0 + g + 8 < p.q_rows;
    const int qpos_lo = p.pos0 + p.q_begin + wrow0 + g, qpos_hi = qpos_lo + 8;
    const int last_q_of_warp = min(wrow0 + 15, p.q_rows - 1);

    const int n_kt = (p.n_keys + PF_BK - 1) / PF_BK;
    for (int kt = 0; kt < n_kt; kt++) {
        const int k0 = kt * PF_BK;
        __syncthreads(); // the previous tile is no longer read
        for (int idx = tid; idx < PF_BK * CH; idx += PF_THREADS) {
            const int r = idx / CH, c = idx % CH;
            const int j = k0 + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (j < p.n_keys) {
                const int blk = p.bt[j / kv.block_tokens];
                const size_t off = hx_kv_offset(kv, blk, layer, 0, p.kvh) +
                                   (size_t)(j % kv.block_tokens) * D + c * 8;
                kv4 = *reinterpret_cast<const uint4 *>(cache + off);
                vv4 = *reinterpret_cast<const uint4 *>(cache + off +
                                                       (size_t)kv.kv_heads * kv.block_tokens * D);
            }
            *reinterpret_cast<uint4 *>(Ks + r * LD + c * 8) = kv4;
            *reinterpret_cast<uint4 *>(Vs + r * LD + c * 8) = vv4;
        }
        __syncthreads();
        if (wrow0 >= p.q_rows || k0 > p.pos0 + p.q_begin + last_q_of_warp)
            continue; // no row of this warp sees a key of this tile
        // S = Q K^T
        float sc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            const __nv_bfloat16 *k_row = Ks + (j * 8 + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
                mma_bf16_16816(sc[j], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3],
                               ld_u32(k_row + kk * 16), ld_u32(k_row + kk * 16 + 8));
        }
        // masks: every key past the row's position, and every key of a row past p.q_rows
        uint32_t pa[NT][2];
        pf_softmax_tile<NT, DT>(sc, pa, o, m_lo, m_hi, l_lo, l_hi, scale_log2, true, k0 + 2 * t,
                                lo_valid ? qpos_lo : -1, hi_valid ? qpos_hi : -1);
        // O += P V: keys 16kk.. are S tiles 2kk and 2kk + 1
#pragma unroll
        for (int kk = 0; kk < PF_BK / 16; kk++) {
            const __nv_bfloat16 *v0 = Vs + (kk * 16 + 2 * t) * LD + g;
#pragma unroll
            for (int j = 0; j < DT; j++) {
                const __nv_bfloat16 *vp = v0 + j * 8;
                const uint32_t b0 = pack_bf16(vp[0], vp[LD]);
                const uint32_t b1 = pack_bf16(vp[8 * LD], vp[9 * LD]);
                mma_bf16_16816(o[j], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0],
                               pa[2 * kk + 1][1], b0, b1);
            }
        }
    }
    pf_store_rows<DT>(o, l_lo, l_hi,
                      out + (size_t)(p.row0 + p.q_begin + wrow0 + g) * qstride + (size_t)h * D,
                      qstride, lo_valid, hi_valid, t);
}

/* ---- prefill, third kernel: the same tiles, pipelined ----
 *
 * prefill_mma_kernel's fragments and online softmax, with what
 * FlashAttention-2 adds around them:
 * - 128 query rows a block (8 warps of 16), so each K/V tile read from L2
 *   serves twice the rows;
 * - K/V tiles double-buffered with cp.async: tile kt + 1 loads while tile kt
 *   is multiplied (one barrier a tile); Q goes through the second buffer
 *   once, into registers, before the first tile lands there;
 * - fragments of K (and of Q) by ldmatrix, of V by ldmatrix.trans (4 matrices
 *   a load) instead of 32-bit and 16-bit shared loads;
 * - the causal mask only on the tiles that cross a warp's diagonal (the
 *   softmax compiled twice, with and without it);
 * - no division in the copies: each copy's key keeps its block table index
 *   and offset in the block from tile to tile, stepped by FA_BK's quotient
 *   and remainder by block_tokens;
 * - fewer instructions in the softmax: 2^x by ex2.approx.ftz (exp2f adds a
 *   compare and two multiplies to keep results below 2^-126 as denormals;
 *   here they are 0), and the scale folded into the exponent (one fmaf a
 *   score instead of a multiply and a subtraction).
 * Tiles and rounding are those of prefill_mma_kernel (64-key tiles, bf16
 * probabilities summed as rounded) but for the last two: the same results
 * up to the fp32 rounding of the tensor cores' sums and of the exponents
 * (the scaled score is not rounded before the maximum is subtracted), and
 * probabilities below 2^-126 flushed to 0.
 */

#define FA_BQ 128
#define FA_BK 64
#define FA_THREADS 256 // 8 warps x 16 query rows

template <int D> struct FaSmem {
    static constexpr int LD = D + 8;              // bf16 row stride: conflict-free ldmatrix
    static constexpr int STAGE = 2 * FA_BK * LD;  // a stage: K rows, then V rows
    static constexpr size_t bytes = (size_t)2 * STAGE * 2;
    static_assert(FA_BQ * LD <= STAGE, "Q fits a stage");
    static_assert(FA_BK * (D / 8) % FA_THREADS == 0, "whole copies a thread");
    static_assert(FA_THREADS % (D / 8) == 0, "a thread's copies in one column");
};

// Four 8x8 bf16 matrices from shared memory: lanes 8i .. 8i+7 give the row
// addresses of matrix i; register i holds this lane's pair of matrix i
// (row lane / 4, columns 2 (lane % 4) ..). trans: of the transposed matrices.
__device__ __forceinline__ void ldsm_x4(uint32_t *r, const __nv_bfloat16 *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t *r, const __nv_bfloat16 *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(p)));
#endif
}

// 2^x in one MUFU.EX2: ex2.approx with denormal results (and arguments) flushed to 0,
// -inf to 0.
__device__ __forceinline__ float fa_ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// pf_softmax_tile for prefill_fa_kernel: the same steps, with the mask (keys above lim_lo /
// lim_hi to -inf) a template argument, fa_ex2 for exp2f, and the scale folded into the
// exponent: the maxima are taken on the raw scores and then scaled (the same m: rounding
// is monotonic), and P = 2^fmaf(S, scale_log2, -m), the scaled score no longer rounded
// on its own. The rescaling factor of a row with no key yet is 2^(-inf - 0) = 0 (not 1):
// its O and l are still 0.
template <int NT, int DT, bool MASK>
__device__ __forceinline__ void fa_softmax_tile(float (&sc)[NT][4], uint32_t (&pa)[NT][2],
                                                float (&o)[DT][4], float &m_lo, float &m_hi,
                                                float &l_lo, float &l_hi, float scale_log2,
                                                int key0, int lim_lo, int lim_hi)
{
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; j++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int key = key0 + j * 8 + e;
            if (MASK && key > lim_lo)
                sc[j][e] = -INFINITY;
            if (MASK && key > lim_hi)
                sc[j][2 + e] = -INFINITY;
            mx_lo = fmaxf(mx_lo, sc[j][e]);
            mx_hi = fmaxf(mx_hi, sc[j][2 + e]);
        }
    }
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    const float mn_lo = fmaxf(m_lo, mx_lo * scale_log2), mn_hi = fmaxf(m_hi, mx_hi * scale_log2);
    const float base_lo = mn_lo == -INFINITY ? 0.0f : mn_lo;
    const float base_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
    const float a_lo = fa_ex2(m_lo - base_lo), a_hi = fa_ex2(m_hi - base_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    pf_softmax_end(pa, o, l_lo, l_hi, a_lo, a_hi, [&](int j, int c) {
        return fa_ex2(fmaf(sc[j][c], scale_log2, -(c < 2 ? base_lo : base_hi)));
    });
}

// A thread's copies of a tile: FA_CPT rows r_u = tid / (D/8) + u FA_RSTEP of K and the
// same of V, 16 bytes tid % (D/8) of each (FA_THREADS is a multiple of D/8).
#define FA_CPT(D) (FA_BK * ((D) / 8) / FA_THREADS)
#define FA_RSTEP(D) (FA_THREADS / ((D) / 8))

// Where a thread's copies read: the key k0 + r_u of copy u of the next tile to issue is at
// offset off[u] / D of block table entry bi[u] (its quotient and remainder by
// block_tokens); blk[u] = bt[bi[u]], loaded a tile ahead by fa_blocks. From a tile to the
// next, bi += bi_step and off += off_step, then one carry: off < off_end before, and
// off_step < off_end, so off < 2 off_end after.
template <int D> struct FaCopies {
    const __nv_bfloat16 *src;        // block 0's K of the layer and KV head, + this thread's 16 B
    size_t bstride, vstride;         // elements from a block to the next, from K to V
    int bi_step, off_step, off_end;  // FA_BK / block_tokens, (FA_BK % block_tokens) D,
                                     // block_tokens D
    int r0, dst0;                    // r_0 = tid / (D/8); its 16 bytes' offset in a stage
    int bi[FA_CPT(D)], off[FA_CPT(D)], blk[FA_CPT(D)];
};

// c for thread tid, at tile 0 (the only divisions).
template <int D>
__device__ __forceinline__ void fa_copies_init(FaCopies<D> &c, const __nv_bfloat16 *cache,
                                               const hx_cuda_kv_layout &kv, int layer, int kvh,
                                               int tid)
{
    const int bt = kv.block_tokens; // tokens a block (not a table here)
    c.src = cache + hx_kv_offset(kv, 0, layer, 0, kvh) + (tid % (D / 8)) * 8;
    c.bstride = hx_kv_offset(kv, 1, 0, 0, 0);
    c.vstride = (size_t)kv.kv_heads * bt * D;
    c.bi_step = FA_BK / bt;
    c.off_step = FA_BK % bt * D;
    c.off_end = bt * D;
    c.r0 = tid / (D / 8);
    c.dst0 = c.r0 * FaSmem<D>::LD + (tid % (D / 8)) * 8;
#pragma unroll
    for (int u = 0; u < FA_CPT(D); u++) {
        const int r = c.r0 + u * FA_RSTEP(D);
        c.bi[u] = r / bt;
        c.off[u] = r % bt * D;
    }
}

// The cache blocks of the next tile's copies, that at k0 (-1: the key is at or past
// n_keys). Loaded a tile ahead, before the barrier, so that the copies issued after it
// need not wait for them.
template <int D>
__device__ __forceinline__ void fa_blocks(FaCopies<D> &c, const int *bt, int k0, int n_keys)
{
#pragma unroll
    for (int u = 0; u < FA_CPT(D); u++)
        c.blk[u] = k0 + c.r0 + u * FA_RSTEP(D) < n_keys ? bt[c.bi[u]] : -1;
}

// Copies of the next tile's keys into a stage: K rows [FA_BK][LD], then V rows; then
// bi and off step to the tile after. Keys at or past n_keys are zero-filled (their P is 0,
// and 0 x V must not be NaN), read from block 0 (nothing read: a valid address).
template <int D>
__device__ __forceinline__ void fa_issue(__nv_bfloat16 *stage, FaCopies<D> &c)
{
    constexpr int LD = FaSmem<D>::LD;
    __nv_bfloat16 *dst = stage + c.dst0;
#pragma unroll
    for (int u = 0; u < FA_CPT(D); u++) {
        const bool ok = c.blk[u] >= 0;
        const __nv_bfloat16 *s = c.src + (size_t)(unsigned)max(c.blk[u], 0) * c.bstride + c.off[u];
        __nv_bfloat16 *d = dst + u * FA_RSTEP(D) * LD;
        hx_cp_async16(d, s, ok);
        hx_cp_async16(d + FA_BK * LD, s + c.vstride, ok);
        c.bi[u] += c.bi_step;
        c.off[u] += c.off_step;
        if (c.off[u] >= c.off_end) {
            c.off[u] -= c.off_end;
            c.bi[u]++;
        }
    }
}

template <int D>
__global__ void __launch_bounds__(FA_THREADS, D == 64 ? 2 : 1)
    prefill_fa_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *q, const __nv_bfloat16 *cache,
                      hx_cuda_kv_layout kv, int layer, const int *block_tables, const int *seq_slot,
                      const int *seq_row0, const int *seq_pos0, const int *seq_n, int heads,
                      float scale_log2)
{
    hx_pdl_begin();
    using S = FaSmem<D>;
    constexpr int LD = S::LD;
    constexpr int NT = FA_BK / 8; // key n-tiles of S
    constexpr int DT = D / 8;     // dimension n-tiles of O
    constexpr int CH = D / 8;     // 16-byte chunks per row
    extern __shared__ __align__(128) unsigned char smem[];
    __nv_bfloat16 *stage0 = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *stage1 = stage0 + S::STAGE;

    PfTile p;
    if (!pf_tile(p, FA_BQ, kv, block_tables, seq_slot, seq_row0, seq_pos0, seq_n, heads))
        return;
    const int h = p.h;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const size_t qstride = (size_t)heads * D;

    // Q [FA_BQ][LD] into stage 1 (rows past p.q_rows zero), key tile 0 into stage 0
    for (int i = tid; i < FA_BQ * CH; i += FA_THREADS) {
        const int r = i / CH, c = i % CH;
        const bool ok = r < p.q_rows;
        hx_cp_async16(stage1 + r * LD + c * 8,
                      q + (ok ? (size_t)(p.row0 + p.q_begin + r) * qstride + (size_t)h * D + c * 8
                              : 0),
                      ok);
    }
    FaCopies<D> cp;
    fa_copies_init<D>(cp, cache, kv, layer, p.kvh, tid);
    fa_blocks<D>(cp, p.bt, 0, p.n_keys);
    fa_issue<D>(stage0, cp);
    hx_cp_commit();
    hx_cp_wait<0>();
    __syncthreads();
    const int wrow0 = warp * 16;
    // the warp's Q as A fragments [D/16][4], for the whole kernel: matrices
    // (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) of each 16x16
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldsm_x4(qa[kk], stage1 + (wrow0 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    float o[DT][4]; // O [16][D] as C fragments
#pragma unroll
    for (int j = 0; j < DT; j++)
        o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY; // running max of rows g and g + 8 (log2 units)
    float l_lo = 0.0f, l_hi = 0.0f;           // this lane's part of the running sums
    const bool warp_live = wrow0 < p.q_rows;
    const int qpos_first = p.pos0 + p.q_begin + wrow0; // the warp's first row's position
    const int qpos_lo = qpos_first + g, qpos_hi = qpos_lo + 8;
    const int qpos_last = p.pos0 + p.q_begin + min(wrow0 + 15, p.q_rows - 1);

    const int n_kt = (p.n_keys + FA_BK - 1) / FA_BK;
    for (int kt = 0; kt < n_kt; kt++) {
        if (kt + 1 < n_kt) // the next tile's blocks: no shared memory, so before the barrier
            fa_blocks<D>(cp, p.bt, (kt + 1) * FA_BK, p.n_keys);
        // tile kt has landed, and every warp is done with tile kt - 1 (and with Q)
        hx_cp_wait<0>();
        __syncthreads();
        if (kt + 1 < n_kt)
            fa_issue<D>((kt & 1) ? stage0 : stage1, cp);
        hx_cp_commit();
        const int k0 = kt * FA_BK;
        if (!warp_live || k0 > qpos_last)
            continue; // no row of this warp sees a key of this tile
        const __nv_bfloat16 *Ks = (kt & 1) ? stage1 : stage0;
        const __nv_bfloat16 *Vs = Ks + FA_BK * LD;
        // S [16][FA_BK] = Q K^T: B fragments of keys 8j.. over dims 16kk.., two kk a load
        float sc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                uint32_t b[4];
                ldsm_x4(b, Ks + (j * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
                mma_bf16_16816(sc[j], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
                mma_bf16_16816(sc[j], qa[kk + 1][0], qa[kk + 1][1], qa[kk + 1][2], qa[kk + 1][3],
                               b[2], b[3]);
            }
        }
        // the causal mask only where the tile crosses the warp's diagonal (rows past
        // p.q_rows see every key: Q is zero there, and they are not stored)
        uint32_t pa[NT][2];
        if (k0 + FA_BK - 1 > qpos_first)
            fa_softmax_tile<NT, DT, true>(sc, pa, o, m_lo, m_hi, l_lo, l_hi, scale_log2,
                                          k0 + 2 * t, qpos_lo, qpos_hi);
        else
            fa_softmax_tile<NT, DT, false>(sc, pa, o, m_lo, m_hi, l_lo, l_hi, scale_log2,
                                           k0 + 2 * t, qpos_lo, qpos_hi);
        // O += P V: keys 16kk.. are S tiles 2kk and 2kk + 1; V's B fragments of
        // dims 8j.. and 8(j + 1).. in one transposed load
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++) {
#pragma unroll
            for (int j = 0; j < DT; j += 2) {
                uint32_t b[4];
                ldsm_x4_trans(b, Vs + (kk * 16 + (lane & 15)) * LD + j * 8 + (lane >> 4) * 8);
                mma_bf16_16816(o[j], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0],
                               pa[2 * kk + 1][1], b[0], b[1]);
                mma_bf16_16816(o[j + 1], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0],
                               pa[2 * kk + 1][1], b[2], b[3]);
            }
        }
    }
    if (warp_live)
        pf_store_rows<DT>(o, l_lo, l_hi,
                          out + (size_t)(p.row0 + p.q_begin + wrow0 + g) * qstride + (size_t)h * D,
                          qstride, wrow0 + g < p.q_rows, wrow0 + g + 8 < p.q_rows, t);
}

// 1: WMMA, 2: mma.sync, 3: pipelined mma.sync; -1: $HX_CUDA_PREFILL_ATTN decides on first
// use (default 2)
static int prefill_variant = -1;

extern "C" void hx_cuda_set_prefill_attention_variant(int v)
{
    prefill_variant = v == 1 || v == 3 ? v : 2;
}

static int prefill_variant_now(void)
{
    if (prefill_variant < 0) {
        const char *env = getenv("HX_CUDA_PREFILL_ATTN");
        hx_cuda_set_prefill_attention_variant(env ? atoi(env) : 2);
    }
    return prefill_variant;
}

template <int D>
static hx_status prefill_mma_launch(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                                    const __nv_bfloat16 *cache, const hx_cuda_kv_layout *kv,
                                    int layer, const int *bt, const int *slot, const int *row0,
                                    const int *pos0, const int *n, int n_seqs, int max_n, int heads,
                                    cudaStream_t s, hx_err *err)
{
    if (prefill_variant_now() == 3) {
        static unsigned fa_configured = 0;
        return prefill_launch_kernel(prefill_fa_kernel<D>, FA_BQ, FA_THREADS, FaSmem<D>::bytes,
                                     &fa_configured, "prefill_attention_fa", D, out, q, cache, kv,
                                     layer, bt, slot, row0, pos0, n, n_seqs, max_n, heads, s, err);
    }
    static unsigned configured = 0;
    return prefill_launch_kernel(prefill_mma_kernel<D>, PF_BQ, PF_THREADS, MmaSmem<D>::bytes,
                                 &configured, "prefill_attention_mma", D, out, q, cache, kv, layer,
                                 bt, slot, row0, pos0, n, n_seqs, max_n, heads, s, err);
}

extern "C" hx_status
hx_cuda_prefill_attention(hx_bf16 *d_out, const hx_bf16 *d_q, const hx_bf16 *d_cache,
                          const hx_cuda_kv_layout *kv, int layer, const int *d_block_tables,
                          const int *d_slot, const int *d_row0, const int *d_pos0, const int *d_n,
                          int n_seqs, int max_n, int heads, hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_prefill_check(kv, layer, heads, n_seqs, max_n, err);
    if (st != HX_OK)
        return st;
    __nv_bfloat16 *out = reinterpret_cast<__nv_bfloat16 *>(d_out);
    const __nv_bfloat16 *q = reinterpret_cast<const __nv_bfloat16 *>(d_q);
    const __nv_bfloat16 *c = reinterpret_cast<const __nv_bfloat16 *>(d_cache);
    if (prefill_variant_now() != 1) {
        if (kv->head_dim == 64)
            return prefill_mma_launch<64>(out, q, c, kv, layer, d_block_tables, d_slot, d_row0,
                                          d_pos0, d_n, n_seqs, max_n, heads, HX_STREAM(stream),
                                          err);
        return prefill_mma_launch<128>(out, q, c, kv, layer, d_block_tables, d_slot, d_row0, d_pos0,
                                       d_n, n_seqs, max_n, heads, HX_STREAM(stream), err);
    }
    if (kv->head_dim == 64)
        return prefill_launch<64>(out, q, c, kv, layer, d_block_tables, d_slot, d_row0, d_pos0, d_n,
                                  n_seqs, max_n, heads, HX_STREAM(stream), err);
    return prefill_launch<128>(out, q, c, kv, layer, d_block_tables, d_slot, d_row0, d_pos0, d_n,
                               n_seqs, max_n, heads, HX_STREAM(stream), err);
}

/* ---- decode ---- */

#define DC_THREADS 128
#define DC_MAX_G 8
#define DC_CHUNK HX_CUDA_DECODE_CHUNK_MAX

template <int D>
__global__ void __launch_bounds__(DC_THREADS)
    decode_attn_kernel(__nv_bfloat16 *out, float *work, const __nv_bfloat16 *q,
                       const __nv_bfloat16 *cache, hx_cuda_kv_layout kv, int layer,
                       const int *block_tables, const int *seq_slot, const int *seq_row,
                       const int *seq_len, int heads, float scale_log2, int min_chunk)
{
    hx_pdl_begin();
    constexpr int TPK = D / 4, NG = DC_THREADS / TPK; // P V: 4 dimensions a thread
    __shared__ float qs[DC_MAX_G][D];
    __shared__ float sc[DC_MAX_G][DC_CHUNK];
    __shared__ int kblk[DC_CHUNK];
    __shared__ float red[NG * DC_MAX_G * D];
    __shared__ int is_last;
    const int parts = gridDim.x, p = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
    const int len = seq_len[s];
    const int G = heads / kv.kv_heads;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int row = seq_row[s];
    __nv_bfloat16 *orow = out + (size_t)row * heads * D + (size_t)g * G * D;
    if (len <= 0) { // nothing to attend: zeros, as the merge writes for an empty sum
        if (p == 0)
            for (int i = tid; i < G * D; i += DC_THREADS)
                orow[i] = __float2bfloat16_rn(0.0f);
        return;
    }
    const int chunk = hx_cuda_decode_chunk(len, parts, min_chunk);
    const int start = p * chunk;
    if (start >= len)
        return;
    // the chunks that run (and arrive); more than parts only past the contract's lengths
    const int np = min((len + chunk - 1) / chunk, parts);
    const int nk = min(chunk, len - start);
    const int *bt = block_tables + (size_t)seq_slot[s] * kv.max_blocks_per_seq;
    float *rec = work + (size_t)s * hx_cuda_decode_rec_floats(heads, D, parts);
    int *counter = reinterpret_cast<int *>(rec) + g;
    float *o_part = rec + ((heads + 3) & ~3);
    float *ml_part = o_part + (size_t)heads * parts * D;

    for (int i = tid; i < G * D; i += DC_THREADS)
        qs[i / D][i % D] =
            __bfloat162float(q[(size_t)row * heads * D + (size_t)(g * G + i / D) * D + i % D]) *
            scale_log2;
    for (int jj = tid; jj < nk; jj += DC_THREADS)
        kblk[jj] = bt[(start + jj) / kv.block_tokens];
    __syncthreads();

    // scores: a thread per key
    for (int jj = tid; jj < nk; jj += DC_THREADS) {
        const int j = start + jj;
        const uint4 *kr = reinterpret_cast<const uint4 *>(
            cache + hx_kv_offset(kv, kblk[jj], layer, 0, g) + (size_t)(j % kv.block_tokens) * D);
        float acc[DC_MAX_G];
#pragma unroll
        for (int gq = 0; gq < DC_MAX_G; gq++)
            acc[gq] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < D / 8; c++) {
            float kf[8];
            hx_unpack8(kr[c], kf);
#pragma unroll
            for (int gq = 0; gq < DC_MAX_G; gq++) {
                if (gq < G) {
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        acc[gq] = fmaf(kf[e], qs[gq][c * 8 + e], acc[gq]);
                }
            }
        }
#pragma unroll
        for (int gq = 0; gq < DC_MAX_G; gq++)
            if (gq < G)
                sc[gq][jj] = acc[gq];
    }
    __syncthreads();

    // per query head: max and exp
    const size_t pidx0 = (size_t)g * G * parts + p;
    for (int gq = warp; gq < G; gq += DC_THREADS / 32) {
        float mx = -INFINITY;
        for (int jj = lane; jj < nk; jj += 32)
            mx = fmaxf(mx, sc[gq][jj]);
        mx = hx_warp_max(mx);
        float sum = 0.0f;
        for (int jj = lane; jj < nk; jj += 32) {
            const float e = exp2f(sc[gq][jj] - mx);
            sc[gq][jj] = e;
            sum += e;
        }
        sum = hx_warp_sum(sum);
        if (lane == 0) {
            const size_t pi = pidx0 + (size_t)gq * parts;
            ml_part[pi * 2] = mx;
            ml_part[pi * 2 + 1] = sum;
        }
    }
    __syncthreads();

    // P V: a thread per (4 dimensions, key group)
    const int c4 = tid % TPK, kg = tid / TPK;
    float acc[DC_MAX_G][4];
#pragma unroll
    for (int gq = 0; gq < DC_MAX_G; gq++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            acc[gq][e] = 0.0f;
#pragma unroll 4
    for (int jj = kg; jj < nk; jj += NG) {
        const int j = start + jj;
        const uint2 vv = *reinterpret_cast<const uint2 *>(
            cache + hx_kv_offset(kv, kblk[jj], layer, 1, g) + (size_t)(j % kv.block_tokens) * D +
            c4 * 4);
        const float v[4] = {hx_bf16_lo(vv.x), hx_bf16_hi(vv.x), hx_bf16_lo(vv.y),
                            hx_bf16_hi(vv.y)};
#pragma unroll
        for (int gq = 0; gq < DC_MAX_G; gq++) {
            if (gq < G) {
                const float pr = sc[gq][jj];
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[gq][e] = fmaf(pr, v[e], acc[gq][e]);
            }
        }
    }
#pragma unroll
    for (int gq = 0; gq < DC_MAX_G; gq++) {
        if (gq < G) {
#pragma unroll
            for (int e = 0; e < 4; e++)
                red[(kg * DC_MAX_G + gq) * D + 4 * c4 + e] = acc[gq][e];
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += DC_THREADS) {
        const int gq = i / D, d = i % D;
        float v = 0.0f;
        for (int k = 0; k < NG; k++)
            v += red[(k * DC_MAX_G + gq) * D + d];
        o_part[(pidx0 + (size_t)gq * parts) * D + d] = v;
    }

    // the last chunk of this (sequence, KV head) to arrive merges them all
    __threadfence();
    __syncthreads();
    if (tid == 0)
        is_last = atomicAdd(counter, 1) == np - 1;
    __syncthreads();
    if (!is_last)
        return;
    __threadfence();
    for (int i = tid; i < G * D; i += DC_THREADS) {
        const int gq = i / D, d = i % D;
        orow[i] = __float2bfloat16_rn(
            hx_decode_merge(o_part, ml_part, (size_t)(g * G + gq) * parts, np, D, d));
    }
    if (tid == 0)
        *counter = 0; // ready for the next call (a later kernel)
}

/* ---- decode, second kernel: fewer dependent memory round trips ----
 *
 * decode_attn_kernel waits on memory many times in a row: a thread walks
 * its key's K row a few uint4 at a time, then the P V loop walks V a few
 * rows at a time. At batch 1 (64 CTAs) that chain, not bandwidth, sets its
 * time. This kernel keeps its contract (grid, hx_cuda_decode_chunk's chunking, the
 * workspace, the merge by the last chunk to arrive) and orders the loads so
 * that a CTA waits on memory about three times before it computes:
 *   round 1  the sequence's len, row and block-table row (together: see
 *            dc2_ld_now)
 *   round 2  the chunk's block-table entries (-> K row offsets in shared
 *            memory) and the thread's slice of q (registers)
 *   round 3  the chunk's K and V rows, by cp.async into a ring of 32-key
 *            tiles in shared memory (64 KB: 8 tiles at head_dim 128, 16 at
 *            64): K tiles, then V tiles, as many at once as the ring holds
 *            (a chunk of up to 128 keys at head_dim 128, 256 at 64: all of
 *            it), a slot refilled as soon as its tile is consumed; the
 *            scores of K tile 0 start while the rest are still coming.
 * The grid (parts x KV heads x sequences) and 256 threads: at batch 1 one
 * CTA per SM does its chunk's work with 8 warps. 64 KB of dynamic shared
 * memory (opt-in) plus ~10 KB static: 2 CTAs per SM at large batch, where
 * 2 x 64 KB in flight per SM is more than HBM needs.
 * Scores: a group of LPK = D/8 lanes per key, each with a uint4 of K and
 * q's 8 dimensions for every head in registers; the G dot products are
 * summed across the group by a butterfly that halves the values each step
 * (GP - 1 + log2(LPK / GP) shuffles a key, not G log2(LPK)). Softmax per
 * chunk, as decode_attn_kernel. P V: a thread per (4 dimensions, key
 * group), V from the ring; the key groups are summed through the ring's
 * memory. The merge issues the loads of up to 8 partials at once.
 * Templated on GP, the query heads per KV head rounded up to a power of 2,
 * so that G = 4 does no work for 8. Numerics: those of decode_attn_kernel
 * up to fp32 summation order (q scaled in fp32, fmaf on fp32, exp2f).
 */

#define DC2_THREADS 256
#define DC2_TILE 32     // keys per cp.async tile
#define DC2_RING 65536  // bytes of K/V tiles in flight (dynamic shared memory)
#define DC2_MERGE 8     // partials whose loads the merge issues together

template <int D> struct Dc2Shape {
    static constexpr int LPK = D / 8;             // scores: lanes per key, 8 dimensions each
    static constexpr int KPP = DC2_THREADS / LPK; // scores: keys per pass (16 or 32)
    static constexpr int TPK = D / 4;             // P V: threads per key, 4 dimensions each
    static constexpr int NG = DC2_THREADS / TPK;  // P V: key groups (8 or 16)
    static constexpr int TILE = DC2_TILE * D;     // bf16 elements of a tile
    static constexpr int NS = DC2_RING / (TILE * 2);        // ring slots (8 or 16)
    static constexpr int CPT = TILE / 8 / DC2_THREADS;      // 16-byte copies a thread a tile
    static_assert(NS >= 2 && CPT >= 1 && TILE / 8 % DC2_THREADS == 0, "tile shape");
    static_assert(DC2_TILE % KPP == 0 && DC2_TILE % NG == 0, "tile shape");
    static_assert(NG * DC_MAX_G * D * 4 <= DC2_RING, "P V partial sums fit the ring");
};

// A load that the compiler keeps where it is written (it would sink a plain one past the
// branches that first use it, making it a round trip of its own)
__device__ __forceinline__ int dc2_ld_now(const int *p)
{
    int v;
    asm volatile("ld.volatile.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}
// Tile tt of the chunk into a ring slot: tiles 0 .. T-1 are K, keys
// 32 tt .. 32 tt + 31; tiles T .. 2T-1 are V, keys 32 (tt - T) ... Copy
// i = tid + u * DC2_THREADS is row r = i / (D/8), 16 bytes cc = i % (D/8):
// slot[r][8 cc ..] = row jj = 32 kt + r, at krow[jj] (K; + vstride: V).
// Rows at or past nk, and tiles at or past 2T, are zero-filled instead
// (never read): no branch, so the krow reads of a thread's copies go out
// together.
template <int D>
__device__ __forceinline__ void dc2_issue(__nv_bfloat16 *slot, const __nv_bfloat16 *cache,
                                          const size_t *krow, size_t vstride, int nk, int tt,
                                          int T, int tid)
{
    using S = Dc2Shape<D>;
    const bool is_v = tt >= T;
    const int kt = is_v ? tt - T : tt;
    const __nv_bfloat16 *base = cache + (is_v ? vstride : 0);
#pragma unroll
    for (int u = 0; u < S::CPT; u++) {
        const int i = tid + u * DC2_THREADS, r = i / (D / 8), cc = i % (D / 8);
        const int jj = kt * DC2_TILE + r;
        const bool ok = tt < 2 * T && jj < nk;
        hx_cp_async16(slot + r * D + cc * 8, base + krow[ok ? jj : 0] + cc * 8, ok);
    }
}

// One step of the ring, at tile tt (of 2T): wait for tile tt, then refill
// the slot of tile tt - 1 (which every thread has finished, past the
// barrier) with tile tt - 1 + NS. cp.async groups: the prologue commits NS
// groups (tiles 0 .. NS-1, some empty); step tt >= 1 commits one more, tile
// tt - 1 + NS (perhaps empty): tile t is group t. Before step tt's wait,
// NS + max(tt - 1, 0) groups are committed and groups 0 .. tt must be
// complete: at most NS - 1 pending at tt = 0, NS - 2 later. Returns tile
// tt's slot.
template <int D>
__device__ __forceinline__ const __nv_bfloat16 *
dc2_ring_step(__nv_bfloat16 *ring, int tt, int T, const __nv_bfloat16 *cache,
              const size_t *krow, size_t vstride, int nk, int tid)
{
    using S = Dc2Shape<D>;
    if (tt == 0)
        hx_cp_wait<S::NS - 1>();
    else
        hx_cp_wait<S::NS - 2>();
    __syncthreads(); // tile tt is in for every thread's copies; tile tt-1's slot is free
    if (tt >= 1) {
        const int nt = tt - 1 + S::NS;
        if (nt < 2 * T)
            dc2_issue<D>(ring + (size_t)(nt % S::NS) * S::TILE, cache, krow, vstride, nk, nt, T,
                         tid);
        hx_cp_commit();
    }
    return ring + (size_t)(tt % S::NS) * S::TILE;
}

// a[0 .. GP-1]: this lane's partial dot products for the heads; the lanes
// of a key's group (LPK of them, aligned) all hold such. Returns the sum
// over the group of head c / (LPK / GP), c = lane % LPK. Halving step st
// (offset o = LPK >> (st + 1), n = GP >> st values): a lane whose bit o is
// set keeps the upper n/2 values (and sends the lower), its partner the
// lower; each adds what it receives. Then plain xor sums over the bits
// below LPK / GP.
template <int GP, int LPK> __device__ __forceinline__ float dc2_group_sum(float *a, int lane)
{
    constexpr int LOG_GP = GP == 8 ? 3 : GP == 4 ? 2 : GP == 2 ? 1 : 0;
    static_assert(GP <= LPK, "a head per lane at most");
#pragma unroll
    for (int st = 0; st < LOG_GP; st++) {
        const int o = LPK >> (st + 1), half = (GP >> st) / 2;
        const bool up = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < half; i++) {
            const float send = up ? a[i] : a[i + half];
            const float keep = up ? a[i + half] : a[i];
            a[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
    }
    float v = a[0];
#pragma unroll
    for (int o = LPK / (2 * GP); o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int D, int GP>
__global__ void __launch_bounds__(DC2_THREADS, 2)
    decode2_attn_kernel(__nv_bfloat16 *out, float *work, const __nv_bfloat16 *q,
                        const __nv_bfloat16 *cache, hx_cuda_kv_layout kv, int layer,
                        const int *block_tables, const int *seq_slot, const int *seq_row,
                        const int *seq_len, int heads, float scale_log2, int min_chunk)
{
    hx_pdl_begin();
    using S = Dc2Shape<D>;
    extern __shared__ __align__(16) unsigned char dc2_smem[];
    // [NS][DC2_TILE][D] bf16 tiles; after P V, [NG][GP][D] fp32 partial sums
    __nv_bfloat16 *ring = reinterpret_cast<__nv_bfloat16 *>(dc2_smem);
    __shared__ __align__(16) float sc[DC_CHUNK * GP]; // [key][GP]: scores, then exp2
    __shared__ size_t krow[DC_CHUNK]; // element offset of key jj's K row (V: + vstride)
    __shared__ int is_last;
    const int parts = gridDim.x, p = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // round 1
    const int len = dc2_ld_now(seq_len + s), row = dc2_ld_now(seq_row + s),
              slot = dc2_ld_now(seq_slot + s);
    const int G = heads / kv.kv_heads;
    __nv_bfloat16 *orow = out + (size_t)row * heads * D + (size_t)g * G * D;
    if (len <= 0) { // nothing to attend: zeros, as the merge writes for an empty sum
        if (p == 0)
            for (int i = tid; i < G * D; i += DC2_THREADS)
                orow[i] = __float2bfloat16_rn(0.0f);
        return;
    }
    const int chunk = hx_cuda_decode_chunk(len, parts, min_chunk);
    const int start = p * chunk;
    if (start >= len)
        return;
    // the chunks that run (and arrive); more than parts only past the contract's lengths
    const int np = min((len + chunk - 1) / chunk, parts);
    const int nk = min(chunk, len - start); // 1 .. DC_CHUNK
    float *rec = work + (size_t)s * hx_cuda_decode_rec_floats(heads, D, parts);
    int *counter = reinterpret_cast<int *>(rec) + g;
    float *o_part = rec + ((heads + 3) & ~3);
    float *ml_part = o_part + (size_t)heads * parts * D;

    // round 2: row offsets of the chunk's keys (nk <= DC_CHUNK <= DC2_THREADS: one each) and
    // q: thread c = lane % LPK of a key group holds dimensions 8c .. 8c+7 of every head
    static_assert(DC_CHUNK <= DC2_THREADS, "a thread per key's block-table entry");
    if (tid < nk) {
        const int j = start + tid;
        krow[tid] = hx_kv_offset(kv, block_tables[(size_t)slot * kv.max_blocks_per_seq +
                                                  j / kv.block_tokens],
                                 layer, 0, g) +
                    (size_t)(j % kv.block_tokens) * D;
    }
    const int c = lane % S::LPK;
    uint4 qraw[GP];
#pragma unroll
    for (int h = 0; h < GP; h++)
        qraw[h] = h < G ? *reinterpret_cast<const uint4 *>(
                              q + ((size_t)row * heads + (size_t)g * G + h) * D + c * 8)
                        : make_uint4(0, 0, 0, 0);
    __syncthreads();

    // round 3: K tiles, then V tiles, as many as the ring holds (tile t: slot t % NS)
    const int T = (nk + DC2_TILE - 1) / DC2_TILE; // tiles of K, and as many of V
    const size_t vstride = (size_t)kv.kv_heads * kv.block_tokens * D; // K row -> V row
#pragma unroll
    for (int t = 0; t < S::NS; t++) {
        dc2_issue<D>(ring + (size_t)t * S::TILE, cache, krow, vstride, nk, t, T, tid);
        hx_cp_commit();
    }
    float qf[GP][8]; // q * scale_log2, as decode_attn_kernel's qs
#pragma unroll
    for (int h = 0; h < GP; h++) {
        hx_unpack8(qraw[h], qf[h]);
#pragma unroll
        for (int e = 0; e < 8; e++)
            qf[h][e] *= scale_log2;
    }

    // scores: pass ps, key r = tid / LPK + ps * KPP of the tile, its 16 bytes c
    for (int tt = 0; tt < T; tt++) {
        const __nv_bfloat16 *ks = dc2_ring_step<D>(ring, tt, T, cache, krow, vstride, nk, tid);
#pragma unroll
        for (int ps = 0; ps < DC2_TILE / S::KPP; ps++) {
            const int r = tid / S::LPK + ps * S::KPP, jj = tt * DC2_TILE + r;
            float kf[8];
            hx_unpack8(*reinterpret_cast<const uint4 *>(ks + r * D + c * 8), kf);
            float a[GP];
#pragma unroll
            for (int h = 0; h < GP; h++) {
                a[h] = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++)
                    a[h] = fmaf(kf[e], qf[h][e], a[h]);
            }
            // rows past nk are zeros (dc2_issue): summed within their own group, never stored
            const float v = dc2_group_sum<GP, S::LPK>(a, lane);
            const int hh = c / (S::LPK / GP);
            if (c % (S::LPK / GP) == 0 && hh < G && jj < nk)
                sc[jj * GP + hh] = v;
        }
    }

    // P V: a thread per (4 dimensions 4 c4 .., key group kg): rows kg, kg + NG, .. of a tile
    const int c4 = tid % S::TPK, kg = tid / S::TPK;
    const size_t pidx0 = (size_t)g * G * parts + p;
    float acc[GP][4];
#pragma unroll
    for (int h = 0; h < GP; h++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            acc[h][e] = 0.0f;
    for (int tt = T; tt < 2 * T; tt++) {
        const __nv_bfloat16 *vs = dc2_ring_step<D>(ring, tt, T, cache, krow, vstride, nk, tid);
        if (tt == T) { // every score is in (the step's barrier): per query head, max and exp
            for (int gq = warp; gq < G; gq += DC2_THREADS / 32) {
                float mx = -INFINITY;
                for (int jj = lane; jj < nk; jj += 32)
                    mx = fmaxf(mx, sc[jj * GP + gq]);
                mx = hx_warp_max(mx);
                float sum = 0.0f;
                for (int jj = lane; jj < nk; jj += 32) {
                    const float e = exp2f(sc[jj * GP + gq] - mx);
                    sc[jj * GP + gq] = e;
                    sum += e;
                }
                sum = hx_warp_sum(sum);
                if (lane == 0) {
                    const size_t pi = pidx0 + (size_t)gq * parts;
                    ml_part[pi * 2] = mx;
                    ml_part[pi * 2 + 1] = sum;
                }
            }
            __syncthreads();
        }
        const int kt = tt - T;
#pragma unroll
        for (int i = 0; i < DC2_TILE / S::NG; i++) {
            const int r = kg + i * S::NG, jj = kt * DC2_TILE + r;
            if (jj < nk) {
                const uint2 vv = *reinterpret_cast<const uint2 *>(vs + r * D + c4 * 4);
                const float v[4] = {hx_bf16_lo(vv.x), hx_bf16_hi(vv.x), hx_bf16_lo(vv.y),
                                    hx_bf16_hi(vv.y)};
                float pr[GP];
                if constexpr (GP >= 4) {
#pragma unroll
                    for (int h = 0; h < GP; h += 4) {
                        const float4 t4 = *reinterpret_cast<const float4 *>(sc + jj * GP + h);
                        pr[h] = t4.x;
                        pr[h + 1] = t4.y;
                        pr[h + 2] = t4.z;
                        pr[h + 3] = t4.w;
                    }
                } else {
#pragma unroll
                    for (int h = 0; h < GP; h++)
                        pr[h] = sc[jj * GP + h];
                }
#pragma unroll
                for (int h = 0; h < GP; h++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        acc[h][e] = fmaf(pr[h], v[e], acc[h][e]);
            }
        }
    }
    // the key groups' sums, through the ring. The last step waited for tile 2T - 1 (no
    // later tile is issued); the prologue's zero-fills of slots 2T .. NS-1 may still be
    // pending, and those slots overlap red: wait for every group.
    hx_cp_wait<0>();
    __syncthreads();
    float *red = reinterpret_cast<float *>(dc2_smem); // [NG][GP][D]
#pragma unroll
    for (int h = 0; h < GP; h++)
        *reinterpret_cast<float4 *>(red + (kg * GP + h) * D + 4 * c4) =
            make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    __syncthreads();
    for (int i = tid; i < G * D; i += DC2_THREADS) {
        const int gq = i / D, d = i % D;
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < S::NG; k++)
            v += red[(k * GP + gq) * D + d];
        o_part[(pidx0 + (size_t)gq * parts) * D + d] = v;
    }

    // the last chunk of this (sequence, KV head) to arrive merges them all
    __threadfence();
    __syncthreads();
    if (tid == 0)
        is_last = atomicAdd(counter, 1) == np - 1;
    __syncthreads();
    if (!is_last)
        return;
    __threadfence();
    // a thread per (head gq, 4 dimensions d ..): G D / 4 <= DC2_THREADS. (m, l) pairs and
    // o are 8-byte aligned: every offset into the workspace is even.
    if (tid < G * D / 4) {
        const int gq = tid / (D / 4), d = 4 * (tid % (D / 4));
        const size_t base = (size_t)(g * G + gq) * parts;
        const float2 *mlp = reinterpret_cast<const float2 *>(ml_part) + base; // (m, l)
        const float *op = o_part + base * D + d;
        float2 ml0[DC2_MERGE], oa[DC2_MERGE], ob[DC2_MERGE]; // the first DC2_MERGE partials
#pragma unroll
        for (int k = 0; k < DC2_MERGE; k++) {
            ml0[k] = oa[k] = ob[k] = make_float2(0.0f, 0.0f);
            if (k < np) {
                ml0[k] = __ldcg(mlp + k);
                oa[k] = __ldcg(reinterpret_cast<const float2 *>(op + (size_t)k * D));
                ob[k] = __ldcg(reinterpret_cast<const float2 *>(op + (size_t)k * D + 2));
            }
        }
        float M = -INFINITY;
#pragma unroll
        for (int k = 0; k < DC2_MERGE; k++)
            if (k < np)
                M = fmaxf(M, ml0[k].x);
        for (int p0 = DC2_MERGE; p0 < np; p0 += DC2_MERGE) {
            float m[DC2_MERGE];
#pragma unroll
            for (int k = 0; k < DC2_MERGE; k++)
                m[k] = p0 + k < np ? __ldcg(&mlp[p0 + k].x) : -INFINITY;
#pragma unroll
            for (int k = 0; k < DC2_MERGE; k++)
                M = fmaxf(M, m[k]);
        }
        float L = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll
        for (int k = 0; k < DC2_MERGE; k++) {
            if (k < np) {
                const float wgt = exp2f(ml0[k].x - M);
                L += wgt * ml0[k].y;
                a0 += wgt * oa[k].x;
                a1 += wgt * oa[k].y;
                a2 += wgt * ob[k].x;
                a3 += wgt * ob[k].y;
            }
        }
        for (int p0 = DC2_MERGE; p0 < np; p0 += DC2_MERGE) {
            float2 mlb[DC2_MERGE], oab[DC2_MERGE], obb[DC2_MERGE];
#pragma unroll
            for (int k = 0; k < DC2_MERGE; k++) {
                mlb[k] = oab[k] = obb[k] = make_float2(0.0f, 0.0f);
                if (p0 + k < np) {
                    mlb[k] = __ldcg(mlp + p0 + k);
                    oab[k] = __ldcg(reinterpret_cast<const float2 *>(op + (size_t)(p0 + k) * D));
                    obb[k] =
                        __ldcg(reinterpret_cast<const float2 *>(op + (size_t)(p0 + k) * D + 2));
                }
            }
#pragma unroll
            for (int k = 0; k < DC2_MERGE; k++) {
                if (p0 + k < np) {
                    const float wgt = exp2f(mlb[k].x - M);
                    L += wgt * mlb[k].y;
                    a0 += wgt * oab[k].x;
                    a1 += wgt * oab[k].y;
                    a2 += wgt * obb[k].x;
                    a3 += wgt * obb[k].y;
                }
            }
        }
        uint2 o;
        o.x = hx_pack2(L > 0.0f ? a0 / L : 0.0f, L > 0.0f ? a1 / L : 0.0f);
        o.y = hx_pack2(L > 0.0f ? a2 / L : 0.0f, L > 0.0f ? a3 / L : 0.0f);
        *reinterpret_cast<uint2 *>(orow + gq * D + d) = o;
    }
    if (tid == 0)
        *counter = 0; // ready for the next call (a later kernel)
}

extern "C" size_t hx_cuda_decode_attention_workspace(int n_seqs, int heads, int head_dim,
                                                     int max_parts)
{
    return (size_t)n_seqs * hx_cuda_decode_rec_floats(heads, head_dim, max_parts) * sizeof(float);
}

template <int D>
static hx_status decode_launch(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                               const __nv_bfloat16 *cache, const hx_cuda_kv_layout *kv, int layer,
                               const int *bt, const int *slot, const int *row, const int *len,
                               int n_seqs, int parts, int heads, float *part, cudaStream_t s,
                               hx_err *err)
{
    const float scale_log2 = LOG2E / sqrtf((float)D);
    // 256 (sequence, KV head) pairs or more fill an H100's 132 SMs: long chunks then
    const int min_chunk = n_seqs * kv->kv_heads >= 256 ? DC_CHUNK : 32;
    dim3 grid((unsigned)parts, (unsigned)kv->kv_heads, (unsigned)n_seqs);
    hx_launch(decode_attn_kernel<D>, grid, DC_THREADS, 0, s, out, part, q, cache, *kv, layer, bt,
              slot, row, len, heads, scale_log2, min_chunk);
    return hx_cuda_launched(err, "decode_attention");
}

// Which decode kernel runs: 1 decode_attn_kernel, 2 decode2_attn_kernel (the default: on
// an H200 11.8 -> 7.8 us at batch 1, 60.4 -> 56.6 us at batch 64, context 512).
static int decode_variant = -1; // -1: $HX_CUDA_DECODE_ATTN decides on first use (default 2)

extern "C" void hx_cuda_set_decode_attention_variant(int v)
{
    decode_variant = v == 1 ? 1 : 2;
}

static int decode_variant_now(void)
{
    if (decode_variant < 0) {
        const char *env = getenv("HX_CUDA_DECODE_ATTN");
        decode_variant = env && env[0] == '1' && env[1] == '\0' ? 1 : 2;
    }
    return decode_variant;
}

template <int D, int GP>
static hx_status decode2_launch(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                                const __nv_bfloat16 *cache, const hx_cuda_kv_layout *kv,
                                int layer, const int *bt, const int *slot, const int *row,
                                const int *len, int n_seqs, int parts, int heads, float *part,
                                cudaStream_t s, hx_err *err)
{
    // 64 KB of dynamic shared memory needs the opt-in; this kernel reads K and V through
    // cp.async.cg, so shared memory is preferred over L1
    static unsigned configured = 0;
    hx_status st = smem_opt_in(decode2_attn_kernel<D, GP>, DC2_RING, true, &configured,
                               "decode_attention2", err);
    if (st != HX_OK)
        return st;
    const float scale_log2 = LOG2E / sqrtf((float)D);
    // the same chunking as decode_launch (the emulation and the workspace follow it)
    const int min_chunk = n_seqs * kv->kv_heads >= 256 ? DC_CHUNK : 32;
    dim3 grid((unsigned)parts, (unsigned)kv->kv_heads, (unsigned)n_seqs);
    hx_launch(decode2_attn_kernel<D, GP>, grid, DC2_THREADS, DC2_RING, s, out, part, q, cache,
              *kv, layer, bt, slot, row, len, heads, scale_log2, min_chunk);
    return hx_cuda_launched(err, "decode_attention2");
}

template <int D>
static hx_status decode2_launch_g(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                                  const __nv_bfloat16 *cache, const hx_cuda_kv_layout *kv,
                                  int layer, const int *bt, const int *slot, const int *row,
                                  const int *len, int n_seqs, int parts, int heads, float *part,
                                  cudaStream_t s, hx_err *err)
{
    const int G = heads / kv->kv_heads; // 1 .. DC_MAX_G (hx_cuda_attn_check)
    if (G <= 1)
        return decode2_launch<D, 1>(out, q, cache, kv, layer, bt, slot, row, len, n_seqs, parts,
                                    heads, part, s, err);
    if (G <= 2)
        return decode2_launch<D, 2>(out, q, cache, kv, layer, bt, slot, row, len, n_seqs, parts,
                                    heads, part, s, err);
    if (G <= 4)
        return decode2_launch<D, 4>(out, q, cache, kv, layer, bt, slot, row, len, n_seqs, parts,
                                    heads, part, s, err);
    return decode2_launch<D, 8>(out, q, cache, kv, layer, bt, slot, row, len, n_seqs, parts,
                                heads, part, s, err);
}

extern "C" hx_status hx_cuda_decode_attention(hx_bf16 *d_out, const hx_bf16 *d_q,
                                              const hx_bf16 *d_cache, const hx_cuda_kv_layout *kv,
                                              int layer, const int *d_block_tables,
                                              const int *d_slot, const int *d_row, const int *d_len,
                                              int n_seqs, int max_parts, int heads, float *d_part,
                                              hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_decode_check(kv, layer, heads, n_seqs, max_parts, err);
    if (st != HX_OK)
        return st;
    __nv_bfloat16 *out = reinterpret_cast<__nv_bfloat16 *>(d_out);
    const __nv_bfloat16 *q = reinterpret_cast<const __nv_bfloat16 *>(d_q);
    const __nv_bfloat16 *c = reinterpret_cast<const __nv_bfloat16 *>(d_cache);
    if (decode_variant_now() == 2) {
        if (kv->head_dim == 64)
            return decode2_launch_g<64>(out, q, c, kv, layer, d_block_tables, d_slot, d_row, d_len,
                                        n_seqs, max_parts, heads, d_part, HX_STREAM(stream), err);
        return decode2_launch_g<128>(out, q, c, kv, layer, d_block_tables, d_slot, d_row, d_len,
                                     n_seqs, max_parts, heads, d_part, HX_STREAM(stream), err);
    }
    if (kv->head_dim == 64)
        return decode_launch<64>(out, q, c, kv, layer, d_block_tables, d_slot, d_row, d_len, n_seqs,
                                 max_parts, heads, d_part, HX_STREAM(stream), err);
    return decode_launch<128>(out, q, c, kv, layer, d_block_tables, d_slot, d_row, d_len, n_seqs,
                              max_parts, heads, d_part, HX_STREAM(stream), err);
}
