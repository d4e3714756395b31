// ops.cu - the element-wise and per-row kernels of a Llama layer: embedding
// lookup, RMSNorm fused with the residual add, RoPE fused with the KV-cache
// write, SwiGLU; dtype conversion and random fills; KV segment pack/unpack.
#include "common.cuh"
#include "kernels/cuda_rules.h"

static inline unsigned grid_for(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    if (b > 1048576)
        b = 1048576; // kernels below loop (grid-stride) beyond this
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- conversion and fills ---- */

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const void *src, int dtype, int64_t n)
{
    hx_pdl_begin();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v;
        if (dtype == HX_CUDA_DTYPE_F32)
            v = static_cast<const float *>(src)[i];
        else if (dtype == HX_CUDA_DTYPE_F16)
            v = __half2float(static_cast<const __half *>(src)[i]);
        else {
            dst[i] = static_cast<const __nv_bfloat16 *>(src)[i];
            continue;
        }
        dst[i] = __float2bfloat16_rn(v);
    }
}

extern "C" hx_status hx_cuda_to_bf16(hx_bf16 *d_dst, const void *d_src, int src_dtype, int64_t n,
                                     hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_to_bf16_check(src_dtype, n, err);
    if (st != HX_OK)
        return st;
    if (n == 0)
        return HX_OK;
    hx_launch(to_bf16_kernel, grid_for(n, 256), 256, 0, HX_STREAM(stream),
              reinterpret_cast<__nv_bfloat16 *>(d_dst), d_src, src_dtype, n);
    return hx_cuda_launched(err, "to_bf16");
}

__global__ void bf16_to_f32_kernel(float *dst, const __nv_bfloat16 *src, int64_t n)
{
    hx_pdl_begin();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

extern "C" hx_status hx_cuda_bf16_to_f32(float *d_dst, const hx_bf16 *d_src, int64_t n,
                                         hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    hx_launch(bf16_to_f32_kernel, grid_for(n, 256), 256, 0, HX_STREAM(stream), d_dst,
              reinterpret_cast<const __nv_bfloat16 *>(d_src), n);
    return hx_cuda_launched(err, "bf16_to_f32");
}

__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t i)
{
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

template <typename T>
__global__ void fill_uniform_kernel(T *dst, int64_t n, uint64_t seed, float lo, float hi)
{
    hx_pdl_begin();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = lo + (hi - lo) * uniform01(seed, (uint64_t)i);
        if constexpr (sizeof(T) == 2)
            dst[i] = __float2bfloat16_rn(v);
        else
            dst[i] = v;
    }
}

extern "C" hx_status hx_cuda_fill_uniform_bf16(hx_bf16 *d_dst, int64_t n, uint64_t seed, float lo,
                                               float hi, hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    hx_launch(fill_uniform_kernel<__nv_bfloat16>, grid_for(n, 256), 256, 0, HX_STREAM(stream),
              reinterpret_cast<__nv_bfloat16 *>(d_dst), n, seed, lo, hi);
    return hx_cuda_launched(err, "fill_uniform_bf16");
}

extern "C" hx_status hx_cuda_fill_uniform_f32(float *d_dst, int64_t n, uint64_t seed, float lo,
                                              float hi, hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    hx_launch(fill_uniform_kernel<float>, grid_for(n, 256), 256, 0, HX_STREAM(stream), d_dst, n,
              seed, lo, hi);
    return hx_cuda_launched(err, "fill_uniform_f32");
}

/* ---- embedding ---- */

__global__ void embed_kernel(float *x, const __nv_bfloat16 *table, const int *tokens, int hidden,
                             int vocab)
{
    hx_pdl_begin();
    const int r = blockIdx.x;
    int t = tokens[r];
    t = t < 0 ? 0 : (t >= vocab ? vocab - 1 : t); // the host validates; never read outside
    const __nv_bfloat16 *src = table + (size_t)t * hidden;
    float *dst = x + (size_t)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

extern "C" hx_status hx_cuda_embed(float *d_x, const hx_bf16 *d_table, const int *d_tokens,
                                   int rows, int hidden, int vocab, hx_cuda_stream *stream,
                                   hx_err *err)
{
    if (rows < 1 || hidden < 1 || vocab < 1)
        return hx_err_set(err, HX_EINVAL, "cuda embed: bad sizes");
    hx_launch(embed_kernel, rows, 256, 0, HX_STREAM(stream), d_x,
              reinterpret_cast<const __nv_bfloat16 *>(d_table), d_tokens, hidden, vocab);
    return hx_cuda_launched(err, "embed");
}

/* ---- residual add (of all-reduced TP partial sums) ---- */

__global__ void add_kernel(float *x, const float *y, int64_t n)
{
    hx_pdl_begin();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" hx_status hx_cuda_add(float *d_x, const float *d_y, int64_t n, hx_cuda_stream *stream,
                                 hx_err *err)
{
    if (n < 0)
        return hx_err_set(err, HX_EINVAL, "cuda add: count %lld", (long long)n);
    if (n == 0)
        return HX_OK;
    hx_launch(add_kernel, grid_for(n, 256), 256, 0, HX_STREAM(stream), d_x, d_y, n);
    return hx_cuda_launched(err, "add");
}

/* ---- RMSNorm with the residual add ---- */

#define NORM_THREADS 256

__global__ void __launch_bounds__(NORM_THREADS)
    add_rmsnorm_kernel(float *x, const float *delta, const float *w, __nv_bfloat16 *out,
                       const int *index, int dim, float eps)
{
    hx_pdl_begin();
    __shared__ float red[32];
    const int r = blockIdx.x;
    const int s = index ? index[r] : r;
    float *xr = x + (size_t)s * dim;
    const float *dr = delta ? delta + (size_t)s * dim : NULL;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (dr) {
            v += dr[i];
            if (!index)
                xr[i] = v;
        }
        ss += v * v;
    }
    ss = hx_block_sum(ss, red);
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    __nv_bfloat16 *o = out + (size_t)r * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (dr && index)
            v += dr[i];
        o[i] = __float2bfloat16_rn(v * scale * w[i]);
    }
}

extern "C" hx_status hx_cuda_add_rmsnorm(float *d_x, const float *d_delta, const float *d_w,
                                         hx_bf16 *d_out, const int *d_index, int rows, int dim,
                                         float eps, hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || dim < 1)
        return hx_err_set(err, HX_EINVAL, "cuda add_rmsnorm: bad sizes");
    hx_launch(add_rmsnorm_kernel, rows, NORM_THREADS, 0, HX_STREAM(stream), d_x, d_delta, d_w,
              reinterpret_cast<__nv_bfloat16 *>(d_out), d_index, dim, eps);
    return hx_cuda_launched(err, "add_rmsnorm");
}

/* ---- RoPE + KV write ---- */

__global__ void rope_kv_kernel(__nv_bfloat16 *q_out, __nv_bfloat16 *cache, const float *qkv,
                               const int *pos, const int *slot, const float *cos_t,
                               const float *sin_t, int heads, hx_cuda_kv_layout kv, int layer)
{
    hx_pdl_begin();
    const int r = blockIdx.x;
    const int D = kv.head_dim, half = D / 2;
    const int p = pos[r];
    const int sl = slot[r];
    const int block = sl / kv.block_tokens, off = sl % kv.block_tokens;
    const float *src = qkv + (size_t)r * (heads + 2 * kv.kv_heads) * D;
    const float *c = cos_t + (size_t)p * half;
    const float *sn = sin_t + (size_t)p * half;
    // queries
    __nv_bfloat16 *qo = q_out + (size_t)r * heads * D;
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        const float2 v = hx_rope_pair(src[h * D + i], src[h * D + i + half], c[i], sn[i]);
        qo[h * D + i] = __float2bfloat16_rn(v.x);
        qo[h * D + i + half] = __float2bfloat16_rn(v.y);
    }
    // keys (rotated) and values into the cache
    const float *ks = src + (size_t)heads * D;
    const float *vs = ks + (size_t)kv.kv_heads * D;
    for (int idx = threadIdx.x; idx < kv.kv_heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        const float2 v = hx_rope_pair(ks[h * D + i], ks[h * D + i + half], c[i], sn[i]);
        __nv_bfloat16 *kd = cache + hx_kv_offset(kv, block, layer, 0, h) + (size_t)off * D;
        kd[i] = __float2bfloat16_rn(v.x);
        kd[i + half] = __float2bfloat16_rn(v.y);
    }
    for (int idx = threadIdx.x; idx < kv.kv_heads * D; idx += blockDim.x) {
        const int h = idx / D, i = idx % D;
        __nv_bfloat16 *vd = cache + hx_kv_offset(kv, block, layer, 1, h) + (size_t)off * D;
        vd[i] = __float2bfloat16_rn(vs[h * D + i]);
    }
}

extern "C" hx_status hx_cuda_rope_kv(hx_bf16 *d_q, hx_bf16 *d_cache, const float *d_qkv,
                                     const int *d_pos, const int *d_slot, const float *d_cos,
                                     const float *d_sin, int rows, int heads,
                                     const hx_cuda_kv_layout *kv, int layer, hx_cuda_stream *stream,
                                     hx_err *err)
{
    hx_status st = hx_cuda_rope_check(rows, heads, kv, layer, err);
    if (st != HX_OK)
        return st;
    hx_launch(rope_kv_kernel, rows, 128, 0, HX_STREAM(stream),
              reinterpret_cast<__nv_bfloat16 *>(d_q), reinterpret_cast<__nv_bfloat16 *>(d_cache),
              d_qkv, d_pos, d_slot, d_cos, d_sin, heads, *kv, layer);
    return hx_cuda_launched(err, "rope_kv");
}

/* ---- SwiGLU ---- */

__global__ void swiglu_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *gu, int ff)
{
    hx_pdl_begin();
    const int r = blockIdx.y;
    const __nv_bfloat16 *g = gu + (size_t)r * 2 * ff;
    const __nv_bfloat16 *u = g + ff;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < ff; i += gridDim.x * blockDim.x) {
        const float gv = __bfloat162float(g[i]);
        out[(size_t)r * ff + i] =
            __float2bfloat16_rn(gv / (1.0f + __expf(-gv)) * __bfloat162float(u[i]));
    }
}

// The same arithmetic 8 elements at a time (16-byte loads and stores), for ff % 8 == 0.
__global__ void swiglu8_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *gu, int ff)
{
    hx_pdl_begin();
    const int r = blockIdx.y;
    const uint4 *g = reinterpret_cast<const uint4 *>(gu + (size_t)r * 2 * ff);
    const uint4 *u = reinterpret_cast<const uint4 *>(gu + (size_t)r * 2 * ff + ff);
    uint4 *o = reinterpret_cast<uint4 *>(out + (size_t)r * ff);
    const int n8 = ff / 8;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        float gf[8], uf[8], a[8];
        hx_unpack8(g[i], gf);
        hx_unpack8(u[i], uf);
#pragma unroll
        for (int e = 0; e < 8; e++)
            a[e] = gf[e] / (1.0f + __expf(-gf[e])) * uf[e];
        uint4 v;
        v.x = hx_pack2(a[0], a[1]);
        v.y = hx_pack2(a[2], a[3]);
        v.z = hx_pack2(a[4], a[5]);
        v.w = hx_pack2(a[6], a[7]);
        o[i] = v;
    }
}

extern "C" hx_status hx_cuda_swiglu(hx_bf16 *d_out, const hx_bf16 *d_gate_up, int rows, int ff,
                                    hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || ff < 1 || rows > 65535)
        return hx_err_set(err, HX_EINVAL, "cuda swiglu: bad sizes");
    __nv_bfloat16 *out = reinterpret_cast<__nv_bfloat16 *>(d_out);
    const __nv_bfloat16 *gu = reinterpret_cast<const __nv_bfloat16 *>(d_gate_up);
    if (ff % 8 == 0) {
        const int n8 = ff / 8;
        dim3 grid((unsigned)((n8 + 255) / 256 < 64 ? (n8 + 255) / 256 : 64), (unsigned)rows);
        hx_launch(swiglu8_kernel, grid, 256, 0, HX_STREAM(stream), out, gu, ff);
    } else {
        dim3 grid((unsigned)((ff + 255) / 256 < 64 ? (ff + 255) / 256 : 64), (unsigned)rows);
        hx_launch(swiglu_kernel, grid, 256, 0, HX_STREAM(stream), out, gu, ff);
    }
    return hx_cuda_launched(err, "swiglu");
}

/* ---- L2 prefetch ---- */

#define PREFETCH_BULK 65536 // bytes per bulk request (sm_90)
#define PREFETCH_LINE 128   // bytes per line request (before)

// p 16-byte aligned, bytes a multiple of 16. Each thread issues every stride-th request.
__global__ void prefetch_l2_kernel(const char *p, size_t bytes)
{
    // after the kernel before it (programmatic dependent launch would otherwise let the
    // requests compete with the GEMV they are meant to follow)
    hx_pdl_begin();
    const size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t g = __cvta_generic_to_global(p); // the .global state space's address
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (size_t off = t * PREFETCH_BULK; off < bytes; off += stride * PREFETCH_BULK) {
        const unsigned n = (unsigned)(bytes - off < PREFETCH_BULK ? bytes - off : PREFETCH_BULK);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(g + off), "r"(n)
                     : "memory");
    }
#else
    for (size_t off = t * PREFETCH_LINE; off < bytes; off += stride * PREFETCH_LINE)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(g + off));
#endif
}


extern "C" hx_status hx_cuda_prefetch_l2(const void *d, size_t bytes, hx_cuda_stream *stream,
                                         hx_err *err)
{
    // whole 16-byte units inside [d, d + bytes)
    const uintptr_t a = ((uintptr_t)d + 15) & ~(uintptr_t)15;
    const uintptr_t end = ((uintptr_t)d + bytes) & ~(uintptr_t)15;
    if (!d || end <= a)
        return HX_OK;
    // one grid for either form: 8192 threads, each walking its share of the lines (before
    // sm_90) or of the 64 KiB requests (sm_90: one each up to 512 MiB, the rest exit)
    hx_launch(prefetch_l2_kernel, dim3(32), 256, 0, HX_STREAM(stream),
              reinterpret_cast<const char *>(a), (size_t)(end - a));
    return hx_cuda_launched(err, "prefetch_l2");
}

/* ---- KV segments ---- */

// One thread per 8 consecutive elements of a (layer, kv, head, token) row of the payload:
// seg is fp32 ([total][8] floats, two 16-byte accesses) or, when BF16, the cache's own
// values ([total][8] bf16, one 16-byte access).
template <bool PACK, bool BF16>
__global__ void kv_seg_kernel(void *seg, __nv_bfloat16 *cache, hx_cuda_kv_layout kv,
                              const int *blocks, int layer_first, int num_layers, int head_first,
                              int num_heads, int token_first, int tokens)
{
    hx_pdl_begin();
    const int D = kv.head_dim, C = D / 8;
    const int64_t total = (int64_t)num_layers * 2 * num_heads * tokens * C;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t q = i;
        const int c = (int)(q % C);
        q /= C;
        const int t = (int)(q % tokens);
        q /= tokens;
        const int h = (int)(q % num_heads);
        q /= num_heads;
        const int which = (int)(q % 2);
        const int l = (int)(q / 2);
        const int p = token_first + t;
        const int block = blocks[p / kv.block_tokens];
        __nv_bfloat16 *cp = cache +
                            hx_kv_offset(kv, block, layer_first + l, which, head_first + h) +
                            (size_t)(p % kv.block_tokens) * D + c * 8;
        if (BF16) {
            uint4 *sp = static_cast<uint4 *>(seg) + i;
            if (PACK)
                *sp = *reinterpret_cast<const uint4 *>(cp);
            else
                *reinterpret_cast<uint4 *>(cp) = *sp;
            continue;
        }
        float4 *sp = reinterpret_cast<float4 *>(static_cast<float *>(seg) + i * 8);
        if (PACK) {
            float f[8];
            hx_unpack8(*reinterpret_cast<const uint4 *>(cp), f);
            sp[0] = make_float4(f[0], f[1], f[2], f[3]);
            sp[1] = make_float4(f[4], f[5], f[6], f[7]);
        } else {
            const float4 a = sp[0], b = sp[1];
            uint4 v;
            v.x = hx_pack2(a.x, a.y);
            v.y = hx_pack2(a.z, a.w);
            v.z = hx_pack2(b.x, b.y);
            v.w = hx_pack2(b.z, b.w);
            *reinterpret_cast<uint4 *>(cp) = v;
        }
    }
}

// The kernel for a direction and payload dtype.
template <bool PACK>
static void kv_seg_launch(void *seg, int seg_bf16, __nv_bfloat16 *cache,
                          const hx_cuda_kv_layout *kv, const int *blocks, int layer_first,
                          int num_layers, int head_first, int num_heads, int token_first,
                          int tokens, cudaStream_t s)
{
    const int64_t n = (int64_t)num_layers * 2 * num_heads * tokens * (kv->head_dim / 8);
    if (seg_bf16)
        hx_launch(kv_seg_kernel<PACK, true>, grid_for(n, 256), 256, 0, s, seg, cache, *kv,
                  blocks, layer_first, num_layers, head_first, num_heads, token_first, tokens);
    else
        hx_launch(kv_seg_kernel<PACK, false>, grid_for(n, 256), 256, 0, s, seg, cache, *kv,
                  blocks, layer_first, num_layers, head_first, num_heads, token_first, tokens);
}

extern "C" hx_status hx_cuda_kv_pack(void *d_seg, int seg_bf16, const hx_bf16 *d_cache,
                                     const hx_cuda_kv_layout *kv, const int *d_blocks,
                                     int layer_first, int num_layers, int head_first, int num_heads,
                                     int token_first, int tokens, hx_cuda_stream *stream,
                                     hx_err *err)
{
    hx_status st = hx_cuda_kv_seg_check(kv, layer_first, num_layers, head_first, num_heads,
                                        token_first, tokens, err);
    if (st != HX_OK)
        return st;
    kv_seg_launch<true>(d_seg, seg_bf16,
                        reinterpret_cast<__nv_bfloat16 *>(const_cast<hx_bf16 *>(d_cache)), kv,
                        d_blocks, layer_first, num_layers, head_first, num_heads, token_first,
                        tokens, HX_STREAM(stream));
    return hx_cuda_launched(err, "kv_pack");
}

extern "C" hx_status hx_cuda_kv_unpack(hx_bf16 *d_cache, const void *d_seg, int seg_bf16,
                                       const hx_cuda_kv_layout *kv, const int *d_blocks,
                                       int layer_first, int num_layers, int head_first,
                                       int num_heads, int token_first, int tokens,
                                       hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_kv_seg_check(kv, layer_first, num_layers, head_first, num_heads,
                                        token_first, tokens, err);
    if (st != HX_OK)
        return st;
    kv_seg_launch<false>(const_cast<void *>(d_seg), seg_bf16,
                         reinterpret_cast<__nv_bfloat16 *>(d_cache), kv, d_blocks, layer_first,
                         num_layers, head_first, num_heads, token_first, tokens,
                         HX_STREAM(stream));
    return hx_cuda_launched(err, "kv_unpack");
}
