// gemm.cu - y = x W^T with bf16 inputs and fp32 accumulation: cuBLAS
// (cublasGemmEx, tensor cores) for many rows, and a weight-streaming GEMV
// kernel for the few rows of a decode step, where the step is bound by
// reading the weights once.
#include <stdlib.h>

#include <cublas_v2.h>

#include "common.cuh"

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

#define GEMVN_SMEM_MAX (44 * 1024) // the normalized rows, in shared memory (48 KB with the rest)
#define GEMVN_F32 0
#define GEMVN_SWIGLU 1

template <int NR, int NW, int MODE>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_norm_kernel(void *y, const float *x, const float *nw, float eps,
                     const __nv_bfloat16 *w, int in, int tasks, int y_stride)
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
        wr[k] = reinterpret_cast<const uint4 *>(w + ((size_t)k * tasks + (active ? o : 0)) * in);
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
            if (MODE == GEMVN_SWIGLU) {
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
                             cudaStream_t s)
{
    const int warps_per_block = GEMV_THREADS / 32;
    dim3 grid((unsigned)((tasks + warps_per_block - 1) / warps_per_block));
    const size_t smem = (size_t)rows * in * 2;
    switch (rows) {
#define HX_GEMVN_CASE(n)                                                                           \
    case n:                                                                                        \
        hx_launch(gemv_norm_kernel<n, NW, MODE>, grid, GEMV_THREADS, smem, s, y, x, nw, eps, w,    \
                  in, tasks, y_stride);                                                            \
        break;
        HX_GEMVN_CASE(1)
        HX_GEMVN_CASE(2)
#undef HX_GEMVN_CASE
    default: break; // use_gemv_norm: at most 2 rows
    }
}

// The GEMV reads each weight once whatever the rows, but its fp32 FMAs grow
// with them: measured on an H100 (bench/gpu_bench --micro), it beats cuBLAS
// at every shape up to 4 rows, and up to 8 rows on matrices of at most 8M
// elements (q/k/v, o of a 1B model); cuBLAS's tensor cores win beyond.
static int use_gemv(const hx_cuda_blas *b, int rows, int in, int out)
{
    if (rows < 1 || rows > b->gemv_max_rows || in % 8 != 0)
        return 0;
    return rows <= 4 || (int64_t)in * out <= ((int64_t)8 << 20);
}

static hx_status check_dims(int rows, int in, int out, hx_err *err)
{
    if (rows < 1 || in < 1 || out < 1)
        return hx_err_set(err, HX_EINVAL, "cuda gemm: bad sizes rows %d, in %d, out %d", rows, in,
                          out);
    return HX_OK;
}

extern "C" hx_status hx_cuda_gemm(hx_cuda_blas *b, void *d_y, int y_bf16, const hx_bf16 *d_x,
                                  const hx_bf16 *d_w, int rows, int in, int out, float beta,
                                  hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = check_dims(rows, in, out, err);
    if (st != HX_OK)
        return st;
    cudaStream_t s = HX_STREAM(stream);
    const __nv_bfloat16 *x = reinterpret_cast<const __nv_bfloat16 *>(d_x);
    const __nv_bfloat16 *w = reinterpret_cast<const __nv_bfloat16 *>(d_w);
    if (use_gemv(b, rows, in, out)) {
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
    hx_status st = check_dims(rows, ff, out, err);
    if (st == HX_OK)
        st = hx_cuda_swiglu(d_act, d_gate_up, rows, ff, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_y, 0, d_act, d_w, rows, ff, out, 0.0f, stream, err);
    return st;
}

// Whether the GEMV with the norm in front serves rows x [in] -> out: the GEMV
// would, the normalized rows fit in shared memory, and there are at most
// max_rows of them. Each block's prologue costs about 2.3 us a row (H200,
// bench/gpu_bench --micro: q/k/v of a 1B model at 8 rows 28.7 us fused
// against 15 us for the norm kernel and the GEMV; at 1 row 9.0 us against
// 10.9), so it pays at a row or two only.
static int use_gemv_norm(const hx_cuda_blas *b, int rows, int in, int out, int max_rows)
{
    return rows <= max_rows && use_gemv(b, rows, in, out) &&
           (size_t)rows * in * 2 <= GEMVN_SMEM_MAX;
}

extern "C" hx_status hx_cuda_gemm_rmsnorm(hx_cuda_blas *b, float *d_y, float *d_x,
                                          const float *d_norm_w, float eps, hx_bf16 *d_h,
                                          const hx_bf16 *d_w, int rows, int in, int out,
                                          hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = check_dims(rows, in, out, err);
    if (st != HX_OK)
        return st;
    const __nv_bfloat16 *w = reinterpret_cast<const __nv_bfloat16 *>(d_w);
    if (use_gemv_norm(b, rows, in, out, 1)) {
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
    hx_status st = check_dims(rows, in, ff, err);
    if (st != HX_OK)
        return st;
    if (use_gemv_norm(b, rows, in, 2 * ff, 2)) { // SwiGLU's kernel saved too: 2 rows
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
