// common.cuh - what the .cu files of the CUDA backend share: error checks,
// bf16 packing helpers, block reductions. Internal to kernels/cuda.
#ifndef HX_CUDA_COMMON_CUH
#define HX_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda.h"

#define HX_STREAM(s) (reinterpret_cast<cudaStream_t>(s))

// ---- programmatic dependent launch (Hopper) ----
// Kernels are launched with hx_launch, which when PDL is on (hx_cuda_set_pdl,
// $HX_CUDA_PDL; devices of compute capability 9.0+) lets a kernel start
// while the previous one on the stream finishes. Every kernel so
// launched calls hx_pdl_begin() (or hx_pdl_wait()) before it reads anything
// an earlier kernel wrote: griddepcontrol.wait returns once the previous
// grid has completed and its writes are visible.
__device__ __forceinline__ void hx_pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void hx_pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void hx_pdl_begin()
{
    hx_pdl_wait();
    hx_pdl_trigger();
}

int hx_cuda_pdl_on(void); // device.cu

template <typename... KArgs, typename... Args>
static inline cudaError_t hx_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, Args... args)
{
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = hx_cuda_pdl_on() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

static inline hx_status hx_cuda_err(cudaError_t e, hx_err *err, const char *what)
{
    if (e == cudaSuccess)
        return HX_OK;
    (void)cudaGetLastError(); // clear a sticky-less error
    hx_status code = e == cudaErrorMemoryAllocation ? HX_ENOMEM : HX_EIO;
    return hx_err_set(err, code, "cuda: %s: %s", what, cudaGetErrorString(e));
}

// After a kernel launch: reports a launch failure naming the kernel.
static inline hx_status hx_cuda_launched(hx_err *err, const char *what)
{
    return hx_cuda_err(cudaGetLastError(), err, what);
}

// bf16 <-> fp32 on raw bits: exact widening.
__device__ __forceinline__ float hx_bf16_lo(uint32_t u)
{
    return __uint_as_float(u << 16);
}
__device__ __forceinline__ float hx_bf16_hi(uint32_t u)
{
    return __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void hx_unpack8(uint4 v, float *f)
{
    f[0] = hx_bf16_lo(v.x);
    f[1] = hx_bf16_hi(v.x);
    f[2] = hx_bf16_lo(v.y);
    f[3] = hx_bf16_hi(v.y);
    f[4] = hx_bf16_lo(v.z);
    f[5] = hx_bf16_hi(v.z);
    f[6] = hx_bf16_lo(v.w);
    f[7] = hx_bf16_hi(v.w);
}
__device__ __forceinline__ float hx_bf2f(__nv_bfloat16 h)
{
    return __bfloat162float(h);
}
__device__ __forceinline__ __nv_bfloat16 hx_f2bf(float f)
{
    return __float2bfloat16_rn(f);
}
__device__ __forceinline__ uint32_t hx_pack2(float a, float b)
{
    __nv_bfloat16 x = __float2bfloat16_rn(a), y = __float2bfloat16_rn(b);
    return (uint32_t)__bfloat16_as_ushort(x) | ((uint32_t)__bfloat16_as_ushort(y) << 16);
}

__device__ __forceinline__ float hx_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float hx_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024). `red` is
// __shared__ float[32]; every thread gets the result. Contains barriers:
// every thread of the block must call it.
__device__ __forceinline__ float hx_block_sum(float v, float *red)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    v = hx_warp_sum(v);
    __syncthreads();
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? red[lane] : 0.0f;
    return hx_warp_sum(t);
}
__device__ __forceinline__ float hx_block_max(float v, float *red)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    v = hx_warp_max(v);
    __syncthreads();
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? red[lane] : -INFINITY;
    return hx_warp_max(t);
}

// ---- asynchronous copies (sm_80+) ----
// 16 bytes global -> shared, asynchronously (L2 only); !ok: 16 zero bytes, src not read.
// No "memory" clobber, so that the compiler may hoist the shared-memory reads of the
// addresses above a run of these: a kernel orders its buffers' reads and refills
// with barriers (and hx_cp_wait's clobber).
__device__ __forceinline__ void hx_cp_async16(void *dst, const void *src, bool ok)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                     (unsigned)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(ok ? 16 : 0));
#else
    *reinterpret_cast<uint4 *>(dst) = ok ? *reinterpret_cast<const uint4 *>(src)
                                         : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void hx_cp_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void hx_cp_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// RoPE of the pair (a, b) = (x[i], x[i + head_dim/2]) by the angle whose cosine and sine
// are c and s: (a c - b s, b c + a s), with the roundings fixed (one product rounded, then
// a fused multiply-add), so that every kernel rotating gets the same bits, and the
// emulation's fmaf too.
__device__ __forceinline__ float2 hx_rope_pair(float a, float b, float c, float s)
{
    return make_float2(__fmaf_rn(a, c, -__fmul_rn(b, s)), __fmaf_rn(b, c, __fmul_rn(a, s)));
}

// Element offset of (block, layer, kv, head, position-in-block 0) in the paged cache.
__device__ __forceinline__ size_t hx_kv_offset(const hx_cuda_kv_layout &kv, int block, int layer,
                                               int which, int head)
{
    return ((((size_t)block * kv.layers + layer) * 2 + which) * kv.kv_heads + head) *
           (size_t)kv.block_tokens * kv.head_dim;
}

// Decode attention's merge of np chunk partials of one query head, dimension d: each
// chunk's (max, sum) of exp2 at ml_part[(base + p) 2 ..] and its P V sums at
// o_part[(base + p) D + d], written by other blocks (read through L2). The output before
// its bf16 rounding; 0 for an empty sum.
__device__ __forceinline__ float hx_decode_merge(const float *o_part, const float *ml_part,
                                                 size_t base, int np, int D, int d)
{
    float M = -INFINITY;
    for (int p = 0; p < np; p++)
        M = fmaxf(M, __ldcg(ml_part + (base + p) * 2));
    float L = 0.0f, acc = 0.0f;
    for (int p = 0; p < np; p++) {
        const float wgt = exp2f(__ldcg(ml_part + (base + p) * 2) - M);
        L += wgt * __ldcg(ml_part + (base + p) * 2 + 1);
        acc += wgt * __ldcg(o_part + (base + p) * D + d);
    }
    return L > 0.0f ? acc / L : 0.0f;
}

// Where a GEMV that ends in RoPE writes its pairs of q/k/v outputs (hx_cuda_rope_kv's
// arguments): gemm.cu's GEMVN_ROPE mode and decode1.cu.
struct gemvn_rope {
    __nv_bfloat16 *q;     // [rows][heads][head_dim]
    __nv_bfloat16 *cache; // the paged cache; layer `layer` is written
    hx_cuda_kv_layout kv;
    int layer, heads;
    const int *pos, *slot;      // [rows]
    const float *cos_t, *sin_t; // [max_pos][head_dim / 2]
};

// The epilogue of such a GEMV for row r, its cache slot sl, and the cosine c and sine sn of
// its position's angle i (unused for a value head): a and b are outputs i and i + half of
// head hh (of the q, k and v heads in that order): as rope_kv_kernel (ops.cu) computes them
// from the sums.
__device__ __forceinline__ void gemvn_rope_put(const gemvn_rope &rp, int r, int hh, int i,
                                               int half, float a, float b, int sl, float c,
                                               float sn)
{
    const int D = 2 * half, K = rp.kv.kv_heads;
    const int block = sl / rp.kv.block_tokens, off = sl % rp.kv.block_tokens;
    if (hh >= rp.heads + K) { // a value: as it is
        __nv_bfloat16 *vd = rp.cache + hx_kv_offset(rp.kv, block, rp.layer, 1, hh - rp.heads - K) +
                            (size_t)off * D;
        vd[i] = __float2bfloat16_rn(a);
        vd[i + half] = __float2bfloat16_rn(b);
        return;
    }
    const float2 v = hx_rope_pair(a, b, c, sn);
    __nv_bfloat16 *d = hh < rp.heads
                           ? rp.q + ((size_t)r * rp.heads + hh) * D
                           : rp.cache + hx_kv_offset(rp.kv, block, rp.layer, 0, hh - rp.heads) +
                                 (size_t)off * D;
    d[i] = __float2bfloat16_rn(v.x);
    d[i + half] = __float2bfloat16_rn(v.y);
}

// The same, reading row r's slot, position and angle from rp.
__device__ __forceinline__ void gemvn_rope_store(const gemvn_rope &rp, int r, int hh, int i,
                                                 int half, float a, float b)
{
    const int p = rp.pos[r];
    gemvn_rope_put(rp, r, hh, i, half, a, b, rp.slot[r], rp.cos_t[(size_t)p * half + i],
                   rp.sin_t[(size_t)p * half + i]);
}

#endif // HX_CUDA_COMMON_CUH
