// sample.cu - the next token from each logits row: argmax (lowest index on
// ties), or a draw from softmax(logits / temperature), optionally restricted
// to the top-p nucleus, with the per-sequence xorshift64* generator of
// runtime/llama.h's sampler. The nucleus and the draw walk the tokens in
// hx_llama_sample's order (probability descending, index ascending) without
// sorting: binary searches over the probability's bit pattern find the
// value at which the running sum crosses, then a scan finds the token among
// equal values.
#include <limits.h>

#include "common.cuh"

#define SAMPLE_THREADS 1024

extern "C" uint64_t hx_cuda_rng_init(uint64_t seed)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z ? z : 0x2545f4914f6cdd1dull;
}

struct Smem {
    float f[32];
    int i[32];
    float u;
};

__device__ __forceinline__ int block_sum_int(int v, Smem &sm)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0)
        sm.i[warp] = v;
    __syncthreads();
    int t = lane < (int)(blockDim.x >> 5) ? sm.i[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

__device__ __forceinline__ int block_min_int(int v, Smem &sm)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0)
        sm.i[warp] = v;
    __syncthreads();
    int t = lane < (int)(blockDim.x >> 5) ? sm.i[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        t = min(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// Exclusive prefix (in thread order) of v over the block.
template <typename T> __device__ __forceinline__ T block_excl_scan(T v, T *warp_tot)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o)
            incl += n;
    }
    __syncthreads();
    if (lane == 31)
        warp_tot[warp] = incl;
    __syncthreads();
    T before = 0;
    for (int w = 0; w < warp; w++)
        before += warp_tot[w];
    return before + incl - v;
}

// p(i) = softmax(x / t)[i], computed the same way at every call.
struct Probs {
    const float *x;
    float t, mx, inv_sum;
    __device__ __forceinline__ float operator()(int i) const
    {
        return expf(x[i] / t - mx) * inv_sum;
    }
};

// Index of the k-th (0-based) token, in index order, whose probability
// equals v; vocab - 1 if there are fewer. Threads own contiguous ranges.
__device__ int kth_equal(const Probs &P, int vocab, float v, int k, Smem &sm)
{
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int b0 = threadIdx.x * per, b1 = min(vocab, b0 + per);
    int cnt = 0;
    for (int i = b0; i < b1; i++)
        cnt += P(i) == v;
    const int before = block_excl_scan<int>(cnt, sm.i);
    int found = INT_MAX;
    if (k >= before && k < before + cnt) {
        int seen = before;
        for (int i = b0; i < b1; i++) {
            if (P(i) == v) {
                if (seen == k) {
                    found = i;
                    break;
                }
                seen++;
            }
        }
    }
    found = block_min_int(found, sm);
    return found == INT_MAX ? vocab - 1 : found;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int *tokens, const float *logits, int vocab, const float *temp,
                  const float *top_p, const int *rng_slot, unsigned long long *rng)
{
    hx_pdl_begin();
    __shared__ Smem sm;
    const int row = blockIdx.x;
    const float *x = logits + (size_t)row * vocab;
    const float T = temp ? temp[row] : 0.0f;

    if (!(T > 0.0f)) { // greedy: first index of the maximum
        float bv = -INFINITY;
        int bi = INT_MAX;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (x[i] > bv) {
                bv = x[i];
                bi = i;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) {
            sm.f[warp] = bv;
            sm.i[warp] = bi;
        }
        __syncthreads();
        if (warp == 0) {
            const int nw = (int)(blockDim.x >> 5);
            bv = lane < nw ? sm.f[lane] : -INFINITY;
            bi = lane < nw ? sm.i[lane] : INT_MAX;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
            if (lane == 0)
                tokens[row] = bi == INT_MAX ? 0 : bi;
        }
        return;
    }

    // the draw, exactly as hx_llama_sampler's next_uniform
    if (threadIdx.x == 0) {
        const int slot = rng_slot[row];
        unsigned long long s = rng[slot];
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        rng[slot] = s;
        sm.u = (float)((s * 0x2545f4914f6cdd1dull) >> 40) * (1.0f / 16777216.0f);
    }
    // softmax(x / T) as hx_cpu_softmax: max of x / T, the sum of exp, times 1 / sum
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        mx = fmaxf(mx, x[i] / T);
    mx = hx_block_max(mx, sm.f);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        sum += expf(x[i] / T - mx);
    sum = hx_block_sum(sum, sm.f);
    const float r = sm.u; // written before the barriers above
    const float inv_sum = 1.0f / sum;
    const Probs Q = {x, T, mx, inv_sum};
    const float tp = top_p ? top_p[row] : 1.0f;

    if (tp <= 0.0f || tp >= 1.0f) { // the whole vocabulary in index order
        const int per = (vocab + blockDim.x - 1) / blockDim.x;
        const int b0 = threadIdx.x * per, b1 = min(vocab, b0 + per);
        float local = 0.0f;
        for (int i = b0; i < b1; i++)
            local += Q(i);
        float cdf = block_excl_scan<float>(local, sm.f);
        int found = INT_MAX;
        for (int i = b0; i < b1; i++) {
            cdf += Q(i);
            if (r < cdf) {
                found = i;
                break;
            }
        }
        found = block_min_int(found, sm);
        if (threadIdx.x == 0)
            tokens[row] = found == INT_MAX ? vocab - 1 : found;
        return;
    }

    // ---- top-p ----
    // mass of the tokens with probability >= float(b)
    auto mass = [&](uint32_t b) -> float {
        const float t = __uint_as_float(b);
        float s = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float p = Q(i);
            if (p >= t)
                s += p;
        }
        return hx_block_sum(s, sm.f);
    };
    auto count_eq = [&](float v) -> int {
        int c = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            c += Q(i) == v;
        return block_sum_int(c, sm);
    };
    const float cutoff = (1.0f - tp) / (float)(vocab > 1 ? vocab - 1 : 1);
    const uint32_t b_cut = __float_as_uint(cutoff) ? __float_as_uint(cutoff) : 1u;
    const uint32_t b_top = 0x3f800001u; // just above 1.0: no probability reaches it
    // The nucleus: tokens with p > eq_v, and the first eq_k (index order) with p == eq_v.
    float eq_v, C;
    int eq_k;
    const float total = mass(b_cut);
    if (!(total > tp)) { // every candidate (p >= cutoff) is in
        eq_v = __uint_as_float(b_cut);
        eq_k = INT_MAX;
        C = total;
    } else {
        uint32_t ok = b_cut, bad = b_top; // mass(ok) > tp >= mass(bad)
        while (bad - ok > 1) {
            const uint32_t mid = ok + (bad - ok) / 2;
            if (mass(mid) > tp)
                ok = mid;
            else
                bad = mid;
        }
        eq_v = __uint_as_float(ok);
        const float gt = mass(ok + 1);
        const int n_eq = count_eq(eq_v);
        float cum = gt;
        int k = 0;
        while (k < n_eq) {
            cum += eq_v;
            k++;
            if (cum > tp)
                break;
        }
        eq_k = k;
        C = cum;
    }
    const float target = r * C;
    // The drawn token's probability u: the largest value whose nucleus mass
    // (tokens >= u) exceeds target.
    uint32_t ok = __float_as_uint(eq_v), bad = b_top;
    while (bad - ok > 1) {
        const uint32_t mid = ok + (bad - ok) / 2; // > eq_v: every such token is in
        if (mass(mid) > target)
            ok = mid;
        else
            bad = mid;
    }
    const float u = __uint_as_float(ok);
    const float base = mass(ok + 1);
    int limit = count_eq(u);
    if (u == eq_v && eq_k < limit)
        limit = eq_k;
    float cdf = base;
    int m = 0;
    while (m < limit) {
        cdf += u;
        m++;
        if (target < cdf)
            break;
    }
    const int tok = kth_equal(Q, vocab, u, m > 0 ? m - 1 : 0, sm);
    if (threadIdx.x == 0)
        tokens[row] = tok;
}

extern "C" hx_status hx_cuda_sample(int *d_tokens, const float *d_logits, int rows, int vocab,
                                    const float *d_temp, const float *d_top_p,
                                    const int *d_rng_slot, uint64_t *d_rng, hx_cuda_stream *stream,
                                    hx_err *err)
{
    if (rows < 1 || vocab < 1 || rows > 65535 || (d_temp && (!d_rng_slot || !d_rng)))
        return hx_err_set(err, HX_EINVAL, "cuda sample: bad arguments (rows %d, vocab %d)", rows,
                          vocab);
    hx_launch(sample_kernel, rows, SAMPLE_THREADS, 0, HX_STREAM(stream), d_tokens, d_logits, vocab,
              d_temp, d_top_p, d_rng_slot, reinterpret_cast<unsigned long long *>(d_rng));
    return hx_cuda_launched(err, "sample");
}
