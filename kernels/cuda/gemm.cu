// gemm.cu - y = x W^T with bf16 inputs and fp32 accumulation: cuBLAS
// (cublasGemmEx, tensor cores) for many rows, and a weight-streaming GEMV
// kernel for the few rows of a decode step, where the step is bound by
// reading the weights once.
#include <stdlib.h>

#include <cublas_v2.h>

#include "common.cuh"
#include "kernels/cuda_rules.h"

#define HX_BLAS_WORKSPACE_BYTES ((size_t)32 << 20)
#define HX_GEMV_MAX_ROWS 8

struct hx_cuda_blas {
    cublasHandle_t handle;
    void *workspace; // [HX_BLAS_WORKSPACE_BYTES], so that no GEMM allocates (graph capture)
    int gemv_max_rows;
};

static const char *blas_text(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

static hx_status blas_err(cublasStatus_t s, hx_err *err, const char *what)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return HX_OK;
    return hx_err_set(err, s == CUBLAS_STATUS_ALLOC_FAILED ? HX_ENOMEM : HX_EIO,
                      "cublas: %s: %s (%d)", what, blas_text(s), (int)s);
}

extern "C" hx_status hx_cuda_blas_new(int gemv_max_rows, hx_cuda_blas **out, hx_err *err)
{
    *out = NULL;
    hx_cuda_blas *b = (hx_cuda_blas *)calloc(1, sizeof *b);
    if (!b)
        return hx_err_set(err, HX_ENOMEM, "cublas: out of memory");
    b->gemv_max_rows = gemv_max_rows < 0                  ? 0
                       : gemv_max_rows > HX_GEMV_MAX_ROWS ? HX_GEMV_MAX_ROWS
                                                          : gemv_max_rows;
    hx_status st = blas_err(cublasCreate(&b->handle), err, "cublasCreate");
    if (st != HX_OK) {
        free(b);
        return st;
    }
    st = hx_cuda_malloc(&b->workspace, HX_BLAS_WORKSPACE_BYTES, err);
    if (st == HX_OK)
        st = blas_err(cublasSetWorkspace(b->handle, b->workspace, HX_BLAS_WORKSPACE_BYTES), err,
                      "cublasSetWorkspace");
    if (st != HX_OK) {
        hx_cuda_blas_free(b);
        return st;
    }
    *out = b;
    return HX_OK;
}

extern "C" void hx_cuda_blas_free(hx_cuda_blas *b)
{
    if (!b)
        return;
    if (b->handle)
        cublasDestroy(b->handle);
    hx_cuda_free(b->workspace);
    free(b);
}

/* ---- GEMV: one warp per output feature, weights streamed in 16-byte loads ---- */

#define GEMV_THREADS 256
#define GEMV_UNROLL 4

// Loads the 8 activations (bf16) of row r at chunk c.
__device__ __forceinline__ void gemv_x8(const __nv_bfloat16 *x, size_t row_stride, int r, int c,
                                        float *xf)
{
    const __nv_bfloat16 *row = x + (size_t)r * row_stride;
    hx_unpack8(__ldg(reinterpret_cast<const uint4 *>(row) + c), xf);
}

template <int NR, bool OUT_BF16>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_kernel(void *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int in, int out,
                float beta)
{
    const int o = (int)((blockIdx.x * (unsigned)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (o >= out)
        return;
    const size_t x_stride = (size_t)in;
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)o * in);
    const int chunks = in >> 3;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; r++)
        acc[r] = 0.0f;
    // The weights are constant: the first sweep's loads are issued before
    // waiting for the previous kernel (programmatic dependent launch), so the
    // weight stream starts while it finishes.
    uint4 wv[GEMV_UNROLL];
    int c0 = lane;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        const int c = c0 + u * 32;
        wv[u] = c < chunks ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);
    }
    hx_pdl_begin();
    for (;;) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + u * 32;
            if (c < chunks) {
                float wf[8];
                hx_unpack8(wv[u], wf);
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    float xf[8];
                    gemv_x8(x, x_stride, r, c, xf);
                    float s = acc[r];
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        s = fmaf(wf[e], xf[e], s);
                    acc[r] = s;
                }
            }
        }
        c0 += 32 * GEMV_UNROLL;
        if (c0 >= chunks)
            break;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + u * 32;
            wv[u] = c < chunks ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
        acc[r] = hx_warp_sum(acc[r]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const size_t i = (size_t)r * out + o;
            if (OUT_BF16) {
                __nv_bfloat16 *yb = static_cast<__nv_bfloat16 *>(y);
                float v = acc[r] + (beta != 0.0f ? beta * __bfloat162float(yb[i]) : 0.0f);
                yb[i] = __float2bfloat16_rn(v);
            } else {
                float *yf = static_cast<float *>(y);
                yf[i] = acc[r] + (beta != 0.0f ? beta * yf[i] : 0.0f);
            }
        }
    }
}

template <bool OUT_BF16>
static void gemv_launch(int rows, void *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int in,
                        int out, float beta, cudaStream_t s)
{
    const int warps_per_block = GEMV_THREADS / 32;
    dim3 grid((unsigned)((out + warps_per_block - 1) / warps_per_block));
    switch (rows) {
#define HX_GEMV_CASE(n)                                                                            \
    case n:                                                                                        \
        hx_launch(gemv_kernel<n, OUT_BF16>, grid, GEMV_THREADS, 0, s, y, x, w, in, out, beta);     \
        break;
        HX_GEMV_CASE(1)
        HX_GEMV_CASE(2)
        HX_GEMV_CASE(3)
        HX_GEMV_CASE(4)
        HX_GEMV_CASE(5)
        HX_GEMV_CASE(6)
        HX_GEMV_CASE(7)
        HX_GEMV_CASE(8)
#undef HX_GEMV_CASE
    default: break;
    }
}

/* ---- GEMV with RMSNorm in front (and SwiGLU behind) ----
 *
 * A decode step's norm and SwiGLU are tiny kernels whose launches cost more
 * than their work: here each GEMV block normalizes the fp32 residual rows
 * itself (bf16, into shared memory; the same arithmetic, in the same order,
 * as add_rmsnorm_kernel without a delta) and streams the weights against
 * them. Each warp computes NW outputs, o and o + tasks (NW 2 halves the
 * blocks, so the prologue's reads of x and the norm weights): for SwiGLU the
 * gate and up features of one activation, written as
 * bf16(silu(bf16(gate)) * bf16(up)) as swiglu8_kernel does. */

#define GEMVN_F32 0
#define GEMVN_SWIGLU 1
#define GEMVN_ROPE 2 // NW 2: outputs i and i + head_dim/2 of a head, then RoPE and the KV write

// Weight row of output k (0 .. NW-1) of warp task o: o + k * tasks, or with GEMVN_ROPE
// the pair (i, i + half) of head o / half, i = o % half.
template <int MODE>
__device__ __forceinline__ size_t gemvn_row(int k, int o, int tasks, int half)
{
    if (MODE == GEMVN_ROPE)
        return (size_t)(o / half) * 2 * half + o % half + (size_t)k * half;
    return (size_t)k * tasks + o;
}

template <int NR, int NW, int MODE>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_norm_kernel(void *y, const float *x, const float *nw, float eps,
                     const __nv_bfloat16 *w, int in, int tasks, int y_stride, gemvn_rope rp)
{
    extern __shared__ uint4 xs[]; // [NR][in / 8] normalized rows, bf16
    __shared__ float red[32];
    const int lane = threadIdx.x & 31;
    const int o = (int)((blockIdx.x * (unsigned)blockDim.x + threadIdx.x) >> 5);
    const bool active = o < tasks;
    const int chunks = in >> 3;
    const uint4 *wr[NW];
#pragma unroll
    for (int k = 0; k < NW; k++)
        wr[k] = reinterpret_cast<const uint4 *>(
            w + gemvn_row<MODE>(k, active ? o : 0, tasks, rp.kv.head_dim / 2) * in);
    // the weights are constant: their first sweep is issued before waiting
    uint4 wv[NW][GEMV_UNROLL];
    int c0 = lane;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        const int c = c0 + u * 32;
#pragma unroll
        for (int k = 0; k < NW; k++)
            wv[k][u] = active && c < chunks ? __ldcs(wr[k] + c) : make_uint4(0, 0, 0, 0);
    }
    hx_pdl_begin();
    // prologue: the normalized rows (every thread of the block takes part)
    __nv_bfloat16 *xb = reinterpret_cast<__nv_bfloat16 *>(xs);
#pragma unroll 1
    for (int r = 0; r < NR; r++) {
        const float *xr = x + (size_t)r * in;
        float ss = 0.0f;
        for (int i = threadIdx.x; i < in; i += blockDim.x) {
            const float v = xr[i];
            ss += v * v;
        }
        ss = hx_block_sum(ss, red);
        const float scale = 1.0f / sqrtf(ss / (float)in + eps);
        for (int i = threadIdx.x; i < in; i += blockDim.x)
            xb[(size_t)r * in + i] = __float2bfloat16_rn(xr[i] * scale * nw[i]);
    }
    __syncthreads();
    if (!active)
        return;
    float acc[NW][NR];
#pragma unroll
    for (int k = 0; k < NW; k++)
#pragma unroll
        for (int r = 0; r < NR; r++)
            acc[k][r] = 0.0f;
    for (;;) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + u * 32;
            if (c < chunks) {
                float wf[NW][8];
#pragma unroll
                for (int k = 0; k < NW; k++)
                    hx_unpack8(wv[k][u], wf[k]);
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    float xf[8];
                    hx_unpack8(xs[r * chunks + c], xf);
#pragma unroll
                    for (int k = 0; k < NW; k++) {
                        float s = acc[k][r];
#pragma unroll
                        for (int e = 0; e < 8; e++)
                            s = fmaf(wf[k][e], xf[e], s);
                        acc[k][r] = s;
                    }
                }
            }
        }
        c0 += 32 * GEMV_UNROLL;
        if (c0 >= chunks)
            break;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + u * 32;
#pragma unroll
            for (int k = 0; k < NW; k++)
                wv[k][u] = c < chunks ? __ldcs(wr[k] + c) : make_uint4(0, 0, 0, 0);
        }
    }
#pragma unroll
    for (int k = 0; k < NW; k++)
#pragma unroll
        for (int r = 0; r < NR; r++)
            acc[k][r] = hx_warp_sum(acc[k][r]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (MODE == GEMVN_ROPE) {
                const int half = rp.kv.head_dim / 2;
                gemvn_rope_store(rp, r, o / half, o % half, half, acc[0][r], acc[NW - 1][r]);
            } else if (MODE == GEMVN_SWIGLU) {
                const float g = __bfloat162float(__float2bfloat16_rn(acc[0][r]));
                const float u = __bfloat162float(__float2bfloat16_rn(acc[NW - 1][r]));
                static_cast<__nv_bfloat16 *>(y)[(size_t)r * y_stride + o] =
                    __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
            } else {
#pragma unroll
                for (int k = 0; k < NW; k++)
                    static_cast<float *>(y)[(size_t)r * y_stride + (size_t)k * tasks + o] =
                        acc[k][r];
            }
        }
    }
}

template <int NW, int MODE>
static void gemv_norm_launch(int rows, void *y, const float *x, const float *nw, float eps,
                             const __nv_bfloat16 *w, int in, int tasks, int y_stride,
                             cudaStream_t s, const gemvn_rope &rp = gemvn_rope())
{
    const int warps_per_block = GEMV_THREADS / 32;
    dim3 grid((unsigned)((tasks + warps_per_block - 1) / warps_per_block));
    const size_t smem = (size_t)rows * in * 2;
    switch (rows) {
#define HX_GEMVN_CASE(n)                                                                           \
    case n:                                                                                        \
        hx_launch(gemv_norm_kernel<n, NW, MODE>, grid, GEMV_THREADS, smem, s, y, x, nw, eps, w,    \
                  in, tasks, y_stride, rp);                                                        \
        break;
        HX_GEMVN_CASE(1)
        HX_GEMVN_CASE(2)
#undef HX_GEMVN_CASE
    default: break; // hx_cuda_use_gemv_norm: at most 2 rows
    }
}

/* ---- GEMV, variant 2: persistent blocks, split-K over warps, tensor cores ----
 *
 * Variant 1 gives each warp one output row and each block 8 of them: at
 * in = 2048 a warp makes two round trips of 2 KB and ends, so a small
 * matrix is one short wave whose time is launch, two latencies and a tail,
 * and the fused norm's prologue is redone by every block (up to ~1000).
 * Here (hx_cuda_set_gemv_variant(2), $HX_CUDA_GEMV=2):
 *
 * - grid = min(tiles, 2 x SMs) blocks of 16 warps (<= 64 registers, so that
 *   two blocks fit an SM) that stay resident and walk the tiles blockIdx.x,
 *   + gridDim.x, ...  A tile is 8 rows of W (SwiGLU: the gate and up rows of
 *   4 features) by all of `in`: 32 KB at in = 2048, so a 2048-row matrix is
 *   256 tiles, about one per block, and a block's tiles differ by at most one.
 * - the 16 warps of a block split a tile's columns. A step is two 16-byte
 *   weight loads a lane: lane (g, t) = (lane / 4, lane % 4) loads chunks c
 *   and c + 64 (chunks of 8 bf16) of the tile's row g, c = 4 (warp + 32 k) + t
 *   at step k: 8 rows x 2 x 64 B a warp, 8 rows x 2 KB contiguous a block.
 *   Every warp makes the same steps a tile, ceil(in / 1024).
 * - loads run GEMV2_DEPTH (3) steps ahead through a ring of registers that
 *   continues across tiles, so the next tile's weights are in flight while
 *   this one is computed and reduced: 3 x 32 B x 512 threads = 48 KB a
 *   block, 96 KB an SM. The first steps are issued before the PDL wait and
 *   before the prologue, which they overlap. The loads are unpredicated
 *   (rows past `out` read the last row, chunks past `in` the row's last
 *   chunk, against zero activations; an Inf weight there would turn that
 *   row's +-Inf into NaN): ptxas turns a `ok ? load : 0` into a load into
 *   other registers and a copy that waits for it at once.
 * - the products run on the tensor cores (mma.m16n8k16, bf16 in, fp32
 *   accumulate): 4 mma a step whatever the rows, where fp32 FMAs would take
 *   8 NR FMAs and 8 (NR + 1) bf16 unpacks a lane and 16 bytes, more than the
 *   SM issues at 8 rows. The lane's weight chunk is its B fragment and its
 *   activation chunk its A fragment as loaded (k order permuted, below).
 * - no barrier in the loop: a warp done with a tile leaves its partial sums
 *   in one of GEMV2_SLOTS slots of shared memory and counts itself in; the
 *   16th to arrive adds the 16 partials in warp order (a fixed order,
 *   whoever is last) and writes the outputs. A warp waits only to reuse a
 *   slot whose previous tile is not reduced yet (3 tiles ahead).
 * - the prologue, once per block after the PDL wait: x into shared memory
 *   with cp.async (no registers: the ring holds most of them) where it fits
 *   (NR in 2 <= 32 KB; else every step reads it through L1); or for the norm
 *   modes the RMSNorm of the fp32 rows, as add_rmsnorm_kernel without a
 *   delta: threads 0..255 sum the squares in that kernel's order (the other
 *   warps add +0 in hx_block_sum, which leaves the sum's bits alone), so h is
 *   bit for bit that kernel's, and prefetch the norm weights into L1 on the
 *   way, so that the second pass hits L1.
 *
 * Measured on an H200 (bench/gpu_bench, CUDA events; 4.8 TB/s peak), us,
 * variant 1 -> 2: qkv 1 row 6.2 -> 8.2, 8 rows 11.3 -> 9.0; o 5.3 -> 6.3,
 * 10.0 -> 7.0; gate_up 18.8 -> 21.4, 19.5 -> 19.5; down 14.2 -> 12.6, 15.3
 * -> 15.4; lm_head 32.7 -> 37.5 (3.5 TB/s), 35.3 -> 35.2; a decode step of
 * the 1B model 1.092 -> 1.127 ms at batch 1, 1.533 -> 1.404 ms at batch 8.
 * What holds it back at 1 row is not established: ncu shows its warps
 * seldom waiting for memory (variant 1's mostly do) with DRAM at ~70%
 * against ~80% on lm_head, and twice the L2 requests per byte (each load
 * instruction reads 64 B of 8 rows where variant 1 reads 512 B of one).
 * These did not help (each measured): a block barrier at each tile's end
 * instead of the slots (~10% slower), one load a lane a step (1.4x the
 * instructions), the refill issued before the step's mma, two accumulator
 * chains, 1 block an SM with 96 or 160 KB in flight (slower still).
 *
 * Fragments (PTX ISA, mma.m16n8k16 .bf16, as in attention.cu):
 *   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
 *   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
 *   C (16x8, f32):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
 * With A = the activations (row m = input row, m < NR real, the rest 0) and
 * B = the tile's W rows (column n = tile row), lane (g, t) holds W chunk
 * q = W[row n=g][8c .. 8c+7] and x chunk p = x[m=g][8c .. 8c+7], c = 4j + t.
 * Let mma 1's k = 2t, 2t+1 stand for columns 8c, 8c+1 and k = 2t+8, 2t+9 for
 * 8c+2, 8c+3, and mma 2's for 8c+4 .. 8c+7: the map depends on t only, so A
 * and B agree on it, and over t = 0..3 the two mma cover the group's 32
 * columns once. Then mma 1 is a = (p.x, 0, p.y, 0), b = (q.x, q.y) and mma 2
 * a = (p.z, 0, p.w, 0), b = (q.z, q.w) (the low half of each register is the
 * lower column in both), and c0, c1 accumulate y[input row g][tile rows 2t,
 * 2t+1]; c2, c3 (input rows g+8) stay 0.
 * SwiGLU tiles: tile row n is the gate row of feature 4 tile + n / 2 for n
 * even and its up row (ff + that feature) for n odd, so c0 is the gate and
 * c1 the up of feature 4 tile + t, in the same lane.
 */

#define GEMV2_THREADS 512
#define GEMV2_WARPS (GEMV2_THREADS / 32)
// Measured on an H200 (see the design note above): 2 blocks of depth 3 beat 1 block of
// depth 6 (the same bytes in flight, half the warps) and of depth 10 (160 KB an SM).
#define GEMV2_BLOCKS_PER_SM 2 // resident blocks an SM: 64 registers a thread at most
#define GEMV2_DEPTH 3         // steps in flight a lane (2 loads of 16 B each): the most that
                              // fits 64 registers without spills in every mode (ptxas)
#define GEMV2_F32 0           // y fp32 (+ beta y)
#define GEMV2_BF16 1          // y bf16 (+ beta y)
#define GEMV2_NORM_F32 2      // RMSNorm in front; y fp32
#define GEMV2_NORM_SWIGLU 3   // RMSNorm in front, SwiGLU behind; y bf16
#define GEMV2_NORM_SUM 256    // add_rmsnorm_kernel's threads (ops.cu), whose sum order is kept
#define GEMV2_SLOTS 3         // tiles whose partial sums can wait for their last warp at once
#define GEMV2_XS_MAX (32 * 1024) // plain GEMV: x into shared memory up to this (48 KB in all)

// acc (c0..c3) += A B with A's rows g+8 zero: a = (a0, 0, a2, 0), b = (b0, b1).
__device__ __forceinline__ void gemv2_mma(float *acc, uint32_t a0, uint32_t a2, uint32_t b0,
                                          uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
#endif
}

// The row of W that lanes g stream in `tile`: plain, row 8 tile + g of
// [n_out][in]; SwiGLU, feature f = 4 tile + g / 2 of n_out (= ff): gate row
// f for g even, up row ff + f for g odd, of [2 ff][in]. Past the last row (a
// partial last tile) the last row instead, read for nothing: its sums are
// never written, and an unpredicated load costs fewer instructions than a
// predicated one with zeros.
template <bool SWIGLU>
__device__ __forceinline__ const uint4 *gemv2_row(const __nv_bfloat16 *w, int tile, int g, int in,
                                                  int n_out)
{
    const int f = min(SWIGLU ? tile * 4 + (g >> 1) : tile * 8 + g, n_out - 1);
    const int row = SWIGLU && (g & 1) ? n_out + f : f;
    return reinterpret_cast<const uint4 *>(w + (size_t)row * in);
}

// Writes the sums s = (tile row 2t, 2t+1) of input row r (SwiGLU: the gate and
// up of feature 4 tile + t), as variant 1 does.
template <int MODE>
__device__ __forceinline__ void gemv2_store(void *y, int tile, int r, int t, float2 s, int n_out,
                                            int y_stride, float beta)
{
    if constexpr (MODE == GEMV2_NORM_SWIGLU) {
        const int f = tile * 4 + t;
        if (f < n_out) {
            const float g = __bfloat162float(__float2bfloat16_rn(s.x));
            const float u = __bfloat162float(__float2bfloat16_rn(s.y));
            static_cast<__nv_bfloat16 *>(y)[(size_t)r * y_stride + f] =
                __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int f = tile * 8 + 2 * t + e;
            if (f >= n_out)
                break;
            const float v = e ? s.y : s.x;
            const size_t i = (size_t)r * y_stride + f;
            if (MODE == GEMV2_BF16) {
                __nv_bfloat16 *yb = static_cast<__nv_bfloat16 *>(y);
                yb[i] = __float2bfloat16_rn(v +
                                            (beta != 0.0f ? beta * __bfloat162float(yb[i]) : 0.0f));
            } else if (MODE == GEMV2_F32) {
                float *yf = static_cast<float *>(y);
                yf[i] = v + (beta != 0.0f ? beta * yf[i] : 0.0f);
            } else {
                static_cast<float *>(y)[i] = v;
            }
        }
    }
}

// y[r][f] for r < NR rows, f < n_out outputs (SwiGLU: features).
//   plain:  x: [NR][in] bf16, w: [n_out][in], y: [NR][y_stride] (y_stride = n_out)
//   NORM:   x: [NR][in] fp32 (normalized here with nw: [in], eps)
//   SwiGLU: w: [2 n_out][in] (gate rows, then up rows), y: [NR][y_stride] bf16
// grid <= tiles (every block has a tile); GEMV2_THREADS threads. XS (NORM
// always): the rows go to dynamic shared memory, NR * in * 2 bytes; else
// each step reads them from global memory (L1).
template <int NR, int MODE, bool XS>
__global__ void __launch_bounds__(GEMV2_THREADS, GEMV2_BLOCKS_PER_SM)
    gemv2_kernel(void *y, const void *xin, const float *nw, float eps, const __nv_bfloat16 *w,
                 int in, int n_out, int y_stride, float beta)
{
    constexpr bool NORM = MODE == GEMV2_NORM_F32 || MODE == GEMV2_NORM_SWIGLU;
    static_assert(XS || !NORM, "the normalized rows live in shared memory");
    constexpr bool SWIGLU = MODE == GEMV2_NORM_SWIGLU;
    extern __shared__ uint4 xs[]; // XS: [NR][in / 8] the (normalized) rows, bf16
    // a tile's per-warp sums by lane (< 4 NR), in GEMV2_SLOTS slots used in turn
    __shared__ float2 part[GEMV2_SLOTS][GEMV2_WARPS][4 * NR];
    __shared__ int arrived[GEMV2_SLOTS]; // warps done with the slot's tiles, all uses
    __shared__ int reduced[GEMV2_SLOTS]; // the slot's tiles reduced
    __shared__ float red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = in >> 3; // 16-byte chunks a row
    // Step k (0 <= k < steps) of a tile reads chunks c = 4 (warp + 32 k) + t
    // and c + 64 of the row (column groups warp + 32 k and warp + 16 + 32 k):
    // over the 16 warps, the steps and t = 0..3 that is each chunk 0 .. 128
    // steps - 1 (>= chunks - 1) once. Chunks past the row load the row's last
    // chunk again (L1 hits; only where `in` is not a multiple of 1024) and
    // meet zero activations. The cursors below hold c itself: c0 = 4 warp + t
    // at a tile's first step, + 128 a step, the tile's last step at c_end - 128.
    const int steps = (chunks + 127) / 128; // a warp's, a tile
    const int c0 = 4 * warp + t, c_end = c0 + 128 * steps;
    const int tiles = SWIGLU ? (n_out + 3) / 4 : (n_out + 7) / 8;
    // this block's tiles: blockIdx.x + i gridDim.x < tiles, i >= 0 (blockIdx.x < tiles)
    const int my_tiles = (tiles - 1 - (int)blockIdx.x) / (int)gridDim.x + 1;

    // The load cursor: chunk lc of tile lt, whose row for this lane is at lp.
    int lt = blockIdx.x, lc = c0;
    const uint4 *lp = gemv2_row<SWIGLU>(w, lt, g, in, n_out);
    uint4 ring[GEMV2_DEPTH][2];
    // Steps past the block's last tile load nothing (a warp-uniform test) and
    // are never consumed.
#define GEMV2_FILL(u)                                                                              \
    do {                                                                                           \
        if (lt < tiles) {                                                                          \
            ring[u][0] = __ldcs(lp + min(lc, chunks - 1));                                         \
            ring[u][1] = __ldcs(lp + min(lc + 64, chunks - 1));                                    \
        }                                                                                          \
        lc += 128;                                                                                 \
        if (lc == c_end) {                                                                         \
            lc = c0;                                                                               \
            lt += gridDim.x;                                                                       \
            lp = gemv2_row<SWIGLU>(w, lt, g, in, n_out);                                           \
        }                                                                                          \
    } while (0)
    // The weights are constant: the first GEMV2_DEPTH steps are issued before
    // waiting for the previous kernel (and before the prologue).
#pragma unroll
    for (int u = 0; u < GEMV2_DEPTH; u++) {
        ring[u][0] = ring[u][1] = make_uint4(0, 0, 0, 0);
        GEMV2_FILL(u);
    }
    hx_pdl_begin();

    // Prologue, once per block: the rows into shared memory.
    if (threadIdx.x < GEMV2_SLOTS) {
        arrived[threadIdx.x] = 0;
        reduced[threadIdx.x] = 0;
    }
    if (NORM) {
        // RMSNorm, as add_rmsnorm_kernel without a delta: threads 0..255 sum the
        // squares of x[i], i = thread + 256 k in that kernel's order (the other
        // warps add +0 in hx_block_sum, which leaves the sum's bits alone), and
        // pull nw into L1 meanwhile, so that the second pass hits L1 only.
        const float *x = static_cast<const float *>(xin);
        __nv_bfloat16 *xb = reinterpret_cast<__nv_bfloat16 *>(xs);
        float ss[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            ss[r] = 0.0f;
        if (threadIdx.x < GEMV2_NORM_SUM) {
#pragma unroll 4
            for (int i = threadIdx.x; i < in; i += GEMV2_NORM_SUM) {
                asm volatile("prefetch.global.L1 [%0];" ::"l"(nw + i));
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    const float v = x[(size_t)r * in + i];
                    ss[r] += v * v;
                }
            }
        }
        float scale[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            scale[r] = 1.0f / sqrtf(hx_block_sum(ss[r], red) / (float)in + eps);
        for (int i = threadIdx.x; i < in; i += GEMV2_THREADS) {
            const float wi = nw[i];
#pragma unroll
            for (int r = 0; r < NR; r++)
                xb[(size_t)r * in + i] =
                    __float2bfloat16_rn(x[(size_t)r * in + i] * scale[r] * wi);
        }
    } else if (XS) {
        // cp.async: straight into shared memory, all at once, no registers
        // (the ring holds most of them)
        const uint4 *x = static_cast<const uint4 *>(xin);
        for (int i = threadIdx.x; i < NR * chunks; i += GEMV2_THREADS)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                             (unsigned)__cvta_generic_to_shared(xs + i)),
                         "l"(x + i)
                         : "memory");
        asm volatile("cp.async.wait_all;" ::: "memory");
    }
    __syncthreads(); // the block's only barrier
    // lane row g's activations: A's rows g < NR (the others are zero)
    const int xoff = g * chunks; // (in xs)
    const uint4 *xg = static_cast<const uint4 *>(xin) + (g < NR ? xoff : 0); // (!XS)

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int cc = c0, n = 0; // the compute cursor: chunk cc of the block's n-th tile
    for (int left = my_tiles * steps; left > 0; left -= GEMV2_DEPTH) {
#pragma unroll
        for (int u = 0; u < GEMV2_DEPTH; u++) {
            if (u >= left) // the same for the whole block
                break;
            uint4 p0 = make_uint4(0, 0, 0, 0), p1 = p0;
            if (g < NR) {
                if (cc < chunks)
                    p0 = XS ? xs[xoff + cc] : __ldg(xg + cc);
                if (cc + 64 < chunks)
                    p1 = XS ? xs[xoff + cc + 64] : __ldg(xg + cc + 64);
            }
            gemv2_mma(acc, p0.x, p0.y, ring[u][0].x, ring[u][0].y); // columns 8cc .. 8cc+3
            gemv2_mma(acc, p0.z, p0.w, ring[u][0].z, ring[u][0].w); // 8cc+4 .. 8cc+7
            gemv2_mma(acc, p1.x, p1.y, ring[u][1].x, ring[u][1].y); // the same at cc + 64
            gemv2_mma(acc, p1.z, p1.w, ring[u][1].z, ring[u][1].w);
            GEMV2_FILL(u); // ring[u] is free: the loads GEMV2_DEPTH steps ahead
            cc += 128;
            if (cc == c_end) {
                // This warp is done with tile n: lane (g, t) holds its sums of
                // input row g, tile rows 2t, 2t+1 in acc[0], acc[1]. No block
                // barrier: the warp leaves them in slot n % SLOTS, and the last
                // of the 16 warps to do so adds the 16 in warp order (a fixed
                // order, whoever is last) and writes the outputs. The slot's
                // previous tile, n - SLOTS, must have been reduced first (only
                // a warp that ran SLOTS - 1 tiles ahead of another waits).
                const int slot = n % GEMV2_SLOTS, use = n / GEMV2_SLOTS;
                while (*(volatile int *)&reduced[slot] != use)
                    __nanosleep(32);
                __threadfence_block();
                if (lane < 4 * NR)
                    part[slot][warp][lane] = make_float2(acc[0], acc[1]);
                __threadfence_block();
                __syncwarp();
                int last = 0;
                if (lane == 0)
                    last = atomicAdd(&arrived[slot], 1) == GEMV2_WARPS * (use + 1) - 1;
                if (__shfl_sync(0xffffffffu, last, 0)) {
                    __threadfence_block();
                    if (lane < 4 * NR) {
                        float2 sum = part[slot][0][lane];
#pragma unroll 5 // the ring stays live: few loads at a time
                        for (int k = 1; k < GEMV2_WARPS; k++) {
                            const float2 v = part[slot][k][lane];
                            sum.x += v.x;
                            sum.y += v.y;
                        }
                        gemv2_store<MODE>(y, blockIdx.x + n * gridDim.x, g, t, sum, n_out,
                                          y_stride, beta);
                    }
                    __syncwarp();
                    __threadfence_block();
                    if (lane == 0)
                        *(volatile int *)&reduced[slot] = use + 1;
                }
#pragma unroll
                for (int i = 0; i < 4; i++)
                    acc[i] = 0.0f;
                cc = c0;
                n++;
            }
        }
    }
#undef GEMV2_FILL
}

static int gemv_variant_wanted = -1; // -1: not decided yet ($HX_CUDA_GEMV, default 0: by shape)

extern "C" void hx_cuda_set_gemv_variant(int v)
{
    gemv_variant_wanted = v == 1 || v == 2 ? v : 0;
}

#define GEMV_PLAIN 0 // hx_cuda_gemm
#define GEMV_NORM 1  // hx_cuda_gemm_rmsnorm
#define GEMV_NORM_SWIGLU 2 // hx_cuda_gemm_rmsnorm_swiglu

// The kernel (1 or 2) for rows x [in] -> out. By shape (variant 0), from
// single-kernel timings on an H200 (bench/gpu_bench --micro, 1B-class
// matrices; variant 1 / 2 in us): at 2-8 rows variant 2 is as fast or faster
// everywhere (8 rows: q/k/v 10.4 / 8.3, o 9.3 / 6.7, lm_head 36.6 / 36.0,
// gate_up and down even); at 1 row it wins on long rows (down, in 8192:
// 16.7 / 12.3 with the SwiGLU kernel) and with the norm in front of q/k/v
// (9.3 / 8.2), and loses on the rest (q/k/v 5.8 / 7.7, o 5.1 / 5.5, gate_up
// 19.4 / 21.6, lm_head 32.8 / 37.2, norm + gate_up + SwiGLU 23.0 / 25.1).
static int gemv_variant(int kind, int rows, int in, int out)
{
    if (gemv_variant_wanted < 0) {
        const char *env = getenv("HX_CUDA_GEMV");
        const int v = env ? atoi(env) : 0;
        gemv_variant_wanted = v == 1 || v == 2 ? v : 0;
    }
    if (gemv_variant_wanted)
        return gemv_variant_wanted;
    switch (kind) {
    case GEMV_NORM: return 2;
    case GEMV_NORM_SWIGLU: return 1;
    default: return rows >= 2 || in >= 2 * out ? 2 : 1;
    }
}

// The SM count of the current device, asked once (the grid of variant 2).
static int gemv2_sms(void)
{
    static int sms = 0;
    if (sms < 1) {
        int dev = 0, n = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
            n < 1) {
            (void)cudaGetLastError();
            return 132; // not cached: asked again next time
        }
        sms = n;
    }
    return sms;
}

// rows x [in] -> n_out (SwiGLU: features); the rows variant 1 serves: 1..8
// plain, 1..2 with the norm (hx_cuda_use_gemv_norm); others launch nothing.
template <int MODE>
static void gemv2_launch(int rows, void *y, const void *x, const float *nw, float eps,
                         const __nv_bfloat16 *w, int in, int n_out, int y_stride, float beta,
                         cudaStream_t s)
{
    constexpr bool NORM = MODE == GEMV2_NORM_F32 || MODE == GEMV2_NORM_SWIGLU;
    const int tiles = MODE == GEMV2_NORM_SWIGLU ? (n_out + 3) / 4 : (n_out + 7) / 8;
    const int max_blocks = GEMV2_BLOCKS_PER_SM * gemv2_sms();
    const dim3 grid((unsigned)(tiles < max_blocks ? tiles : max_blocks));
    const size_t x_bytes = (size_t)rows * in * 2; // NORM: <= 44 KB (hx_cuda_use_gemv_norm)
    const bool xs = NORM || x_bytes <= GEMV2_XS_MAX;
#define HX_GEMV2_CASE(n)                                                                           \
    case n:                                                                                        \
        if (xs)                                                                                    \
            hx_launch(gemv2_kernel<n, MODE, true>, grid, GEMV2_THREADS, x_bytes, s, y, x, nw, eps, \
                      w, in, n_out, y_stride, beta);                                               \
        else if constexpr (!NORM)                                                                  \
            hx_launch(gemv2_kernel<n, MODE, false>, grid, GEMV2_THREADS, 0, s, y, x, nw, eps, w,   \
                      in, n_out, y_stride, beta);                                                  \
        break;
    if constexpr (NORM) {
        switch (rows) {
            HX_GEMV2_CASE(1)
            HX_GEMV2_CASE(2)
        default: break;
        }
    } else {
        switch (rows) {
            HX_GEMV2_CASE(1)
            HX_GEMV2_CASE(2)
            HX_GEMV2_CASE(3)
            HX_GEMV2_CASE(4)
            HX_GEMV2_CASE(5)
            HX_GEMV2_CASE(6)
            HX_GEMV2_CASE(7)
            HX_GEMV2_CASE(8)
        default: break;
        }
    }
#undef HX_GEMV2_CASE
}

extern "C" hx_status hx_cuda_gemm(hx_cuda_blas *b, void *d_y, int y_bf16, const hx_bf16 *d_x,
                                  const hx_bf16 *d_w, int rows, int in, int out, float beta,
                                  hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, out, err);
    if (st != HX_OK)
        return st;
    cudaStream_t s = HX_STREAM(stream);
    const __nv_bfloat16 *x = reinterpret_cast<const __nv_bfloat16 *>(d_x);
    const __nv_bfloat16 *w = reinterpret_cast<const __nv_bfloat16 *>(d_w);
    if (hx_cuda_use_gemv(b->gemv_max_rows, rows, in, out)) {
        if (gemv_variant(GEMV_PLAIN, rows, in, out) == 2) {
            if (y_bf16)
                gemv2_launch<GEMV2_BF16>(rows, d_y, x, NULL, 0.0f, w, in, out, out, beta, s);
            else
                gemv2_launch<GEMV2_F32>(rows, d_y, x, NULL, 0.0f, w, in, out, out, beta, s);
            return hx_cuda_launched(err, "gemv2");
        }
        if (y_bf16)
            gemv_launch<true>(rows, d_y, x, w, in, out, beta, s);
        else
            gemv_launch<false>(rows, d_y, x, w, in, out, beta, s);
        return hx_cuda_launched(err, "gemv");
    }
    // Column-major view: C[out x rows] = W^T(col-major [in x out])^T * X(col-major [in x rows]).
    st = blas_err(cublasSetStream(b->handle, s), err, "cublasSetStream");
    if (st != HX_OK)
        return st;
    const float alpha = 1.0f;
    return blas_err(cublasGemmEx(b->handle, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, d_w,
                                 CUDA_R_16BF, in, d_x, CUDA_R_16BF, in, &beta, d_y,
                                 y_bf16 ? CUDA_R_16BF : CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT),
                    err, "cublasGemmEx");
}

extern "C" hx_status hx_cuda_gemm_swiglu(hx_cuda_blas *b, float *d_y, const hx_bf16 *d_gate_up,
                                         const hx_bf16 *d_w, hx_bf16 *d_act, int rows, int ff,
                                         int out, hx_cuda_stream *stream, hx_err *err)
{
    // SwiGLU, then the GEMM (a GEMV that recomputed the SwiGLU per output
    // feature measured 2x slower at 1 row and 10x at 8 rows than this).
    hx_status st = hx_cuda_gemm_check(rows, ff, out, err);
    if (st == HX_OK)
        st = hx_cuda_swiglu(d_act, d_gate_up, rows, ff, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_y, 0, d_act, d_w, rows, ff, out, 0.0f, stream, err);
    return st;
}

extern "C" hx_status hx_cuda_gemm_rmsnorm(hx_cuda_blas *b, float *d_y, float *d_x,
                                          const float *d_norm_w, float eps, hx_bf16 *d_h,
                                          const hx_bf16 *d_w, int rows, int in, int out,
                                          hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, out, err);
    if (st != HX_OK)
        return st;
    const __nv_bfloat16 *w = reinterpret_cast<const __nv_bfloat16 *>(d_w);
    if (hx_cuda_use_gemv_norm(b->gemv_max_rows, rows, in, out, 1)) {
        if (gemv_variant(GEMV_NORM, rows, in, out) == 2) {
            gemv2_launch<GEMV2_NORM_F32>(rows, d_y, d_x, d_norm_w, eps, w, in, out, out, 0.0f,
                                         HX_STREAM(stream));
            return hx_cuda_launched(err, "gemv2_rmsnorm");
        }
        if (out % 2 == 0)
            gemv_norm_launch<2, GEMVN_F32>(rows, d_y, d_x, d_norm_w, eps, w, in, out / 2, out,
                                           HX_STREAM(stream));
        else
            gemv_norm_launch<1, GEMVN_F32>(rows, d_y, d_x, d_norm_w, eps, w, in, out, out,
                                           HX_STREAM(stream));
        return hx_cuda_launched(err, "gemv_rmsnorm");
    }
    st = hx_cuda_add_rmsnorm(d_x, NULL, d_norm_w, d_h, NULL, rows, in, eps, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_y, 0, d_h, d_w, rows, in, out, 0.0f, stream, err);
    return st;
}

extern "C" hx_status hx_cuda_gemm_rmsnorm_swiglu(hx_cuda_blas *b, hx_bf16 *d_act, hx_bf16 *d_gu,
                                                 float *d_x, const float *d_norm_w, float eps,
                                                 hx_bf16 *d_h, const hx_bf16 *d_w, int rows,
                                                 int in, int ff, hx_cuda_stream *stream,
                                                 hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, ff, err);
    if (st != HX_OK)
        return st;
    // SwiGLU's kernel saved too: 2 rows
    if (hx_cuda_use_gemv_norm(b->gemv_max_rows, rows, in, 2 * ff, 2)) {
        if (gemv_variant(GEMV_NORM_SWIGLU, rows, in, 2 * ff) == 2) {
            gemv2_launch<GEMV2_NORM_SWIGLU>(rows, d_act, d_x, d_norm_w, eps,
                                            reinterpret_cast<const __nv_bfloat16 *>(d_w), in, ff,
                                            ff, 0.0f, HX_STREAM(stream));
            return hx_cuda_launched(err, "gemv2_rmsnorm_swiglu");
        }
        gemv_norm_launch<2, GEMVN_SWIGLU>(rows, d_act, d_x, d_norm_w, eps,
                                          reinterpret_cast<const __nv_bfloat16 *>(d_w), in, ff, ff,
                                          HX_STREAM(stream));
        return hx_cuda_launched(err, "gemv_rmsnorm_swiglu");
    }
    st = hx_cuda_add_rmsnorm(d_x, NULL, d_norm_w, d_h, NULL, rows, in, eps, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_gu, 1, d_h, d_w, rows, in, 2 * ff, 0.0f, stream, err);
    if (st == HX_OK)
        st = hx_cuda_swiglu(d_act, d_gu, rows, ff, stream, err);
    return st;
}

static int fused_rope_wanted = -1; // -1: not decided yet ($HX_CUDA_FUSED_ROPE, default 0: off)

extern "C" void hx_cuda_set_fused_rope(int on)
{
    fused_rope_wanted = on != 0;
}

extern "C" hx_status hx_cuda_gemm_rmsnorm_rope_kv(
    hx_cuda_blas *b, hx_bf16 *d_q, hx_bf16 *d_cache, float *d_qkv, float *d_x,
    const float *d_norm_w, float eps, hx_bf16 *d_h, const hx_bf16 *d_w, int rows, int in,
    int heads, const hx_cuda_kv_layout *kv, int layer, const int *d_pos, const int *d_slot,
    const float *d_cos, const float *d_sin, hx_cuda_stream *stream, hx_err *err)
{
    if (fused_rope_wanted < 0) {
        const char *env = getenv("HX_CUDA_FUSED_ROPE");
        fused_rope_wanted = env && env[0] == '1';
    }
    const int out = (heads + 2 * kv->kv_heads) * kv->head_dim;
    hx_status st = hx_cuda_qkv_rope_check(rows, in, heads, kv, layer, err);
    if (st != HX_OK)
        return st;
    if (!fused_rope_wanted || !hx_cuda_use_gemv_norm(b->gemv_max_rows, rows, in, out, 2)) {
        st = hx_cuda_gemm_rmsnorm(b, d_qkv, d_x, d_norm_w, eps, d_h, d_w, rows, in, out, stream,
                                  err);
        if (st == HX_OK)
            st = hx_cuda_rope_kv(d_q, d_cache, d_qkv, d_pos, d_slot, d_cos, d_sin, rows, heads,
                                 kv, layer, stream, err);
        return st;
    }
    gemvn_rope rp;
    rp.q = reinterpret_cast<__nv_bfloat16 *>(d_q);
    rp.cache = reinterpret_cast<__nv_bfloat16 *>(d_cache);
    rp.kv = *kv;
    rp.layer = layer;
    rp.heads = heads;
    rp.pos = d_pos;
    rp.slot = d_slot;
    rp.cos_t = d_cos;
    rp.sin_t = d_sin;
    gemv_norm_launch<2, GEMVN_ROPE>(rows, NULL, d_x, d_norm_w, eps,
                                    reinterpret_cast<const __nv_bfloat16 *>(d_w), in, out / 2, 0,
                                    HX_STREAM(stream), rp);
    return hx_cuda_launched(err, "gemv_rmsnorm_rope_kv");
}
