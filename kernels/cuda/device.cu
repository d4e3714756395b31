// device.cu - devices, memory, streams and CUDA graphs behind C functions.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "kernels/cuda_rules.h"

extern "C" int hx_cuda_available(void)
{
    return hx_cuda_device_count() > 0;
}

static int pdl_state = -1;  // -1: not decided yet; 0 off; 1 on
static int pdl_wanted = -1; // -1: $HX_CUDA_PDL decides (default off)

extern "C" void hx_cuda_set_pdl(int on)
{
    pdl_wanted = on != 0;
    pdl_state = -1;
}

int hx_cuda_pdl_on(void)
{
    if (pdl_state < 0) {
        int dev = 0, major = 0;
        const char *env = getenv("HX_CUDA_PDL");
        int on = pdl_wanted >= 0 ? pdl_wanted : (env && env[0] == '1');
        if (on && (cudaGetDevice(&dev) != cudaSuccess ||
                   cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                       cudaSuccess ||
                   major < 9))
            on = 0;
        (void)cudaGetLastError();
        pdl_state = on;
    }
    return pdl_state;
}

extern "C" hx_status hx_cuda_set_device(int device, hx_err *err)
{
    return hx_cuda_err(cudaSetDevice(device), err, "cudaSetDevice");
}

static int contains(const char *s, const char *needle)
{
    return strstr(s, needle) != NULL;
}

extern "C" hx_status hx_cuda_device_info(int device, char *name, size_t size,
                                         double *peak_bytes_per_s, double *peak_bf16_flops,
                                         hx_err *err)
{
    cudaDeviceProp p;
    hx_status st = hx_cuda_err(cudaGetDeviceProperties(&p, device), err, "cudaGetDeviceProperties");
    if (st != HX_OK)
        return st;
    if (name && size)
        snprintf(name, size, "%s", p.name);
    // Datasheet peaks by part (dense BF16 tensor FLOP/s, HBM bytes/s).
    double bw = 0, fl = 0;
    const char *n = p.name;
    if (contains(n, "H200")) {
        bw = 4.8e12;
        fl = 989e12;
    } else if (contains(n, "H100") || contains(n, "H800")) {
        if (contains(n, "PCIe")) {
            bw = 2.0e12;
            fl = 756e12;
        } else if (contains(n, "NVL")) {
            bw = 3.9e12;
            fl = 835e12;
        } else { // SXM5 ("NVIDIA H100 80GB HBM3")
            bw = 3.35e12;
            fl = 989e12;
        }
    } else if (contains(n, "A100")) {
        bw = contains(n, "40GB") ? 1.555e12 : (contains(n, "PCIe") ? 1.935e12 : 2.039e12);
        fl = 312e12;
    } else if (contains(n, "L40S")) {
        bw = 0.864e12;
        fl = 362e12;
    } else if (contains(n, "A6000")) {
        bw = 0.768e12;
        fl = contains(n, "Ada") ? 182e12 : 155e12;
    } else if (contains(n, "L4")) {
        bw = 0.3e12;
        fl = 121e12;
    }
    if (peak_bytes_per_s)
        *peak_bytes_per_s = bw;
    if (peak_bf16_flops)
        *peak_bf16_flops = fl;
    return HX_OK;
}

extern "C" hx_status hx_cuda_device_uuid(int device, char *out, size_t size, hx_err *err)
{
    if (!out || size < HX_CUDA_UUID_CHARS)
        return hx_err_set(err, HX_EINVAL, "cuda: device uuid: a buffer of %zu bytes, need %d",
                          out ? size : 0, HX_CUDA_UUID_CHARS);
    out[0] = '\0';
    cudaDeviceProp p;
    hx_status st = hx_cuda_err(cudaGetDeviceProperties(&p, device), err, "cudaGetDeviceProperties");
    if (st != HX_OK)
        return st;
    const unsigned char *u = reinterpret_cast<const unsigned char *>(p.uuid.bytes);
    static_assert(sizeof p.uuid.bytes == 16, "cudaUUID_t is 16 bytes");
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    memcpy(o, "GPU-", 4);
    o += 4;
    for (int i = 0; i < 16; i++) { // 8-4-4-4-12 hex digits
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[u[i] >> 4];
        *o++ = hex[u[i] & 15];
    }
    *o = '\0';
    return HX_OK;
}

extern "C" hx_status hx_cuda_malloc(void **ptr, size_t bytes, hx_err *err)
{
    *ptr = NULL;
    if (bytes == 0)
        bytes = 16;
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e != cudaSuccess) {
        *ptr = NULL;
        (void)cudaGetLastError();
        return hx_err_set(err, e == cudaErrorMemoryAllocation ? HX_ENOMEM : HX_EIO,
                          "cuda: cannot allocate %zu bytes of device memory: %s", bytes,
                          cudaGetErrorString(e));
    }
    return HX_OK;
}

extern "C" void hx_cuda_free(void *ptr)
{
    // a failed free must not surface as the next launch's error (hx_cuda_launched)
    if (ptr && cudaFree(ptr) != cudaSuccess)
        (void)cudaGetLastError();
}

extern "C" hx_status hx_cuda_host_alloc(void **ptr, size_t bytes, hx_err *err)
{
    *ptr = NULL;
    if (bytes == 0)
        bytes = 16;
    cudaError_t e = cudaMallocHost(ptr, bytes);
    if (e != cudaSuccess) {
        *ptr = NULL;
        (void)cudaGetLastError();
        return hx_err_set(err, HX_ENOMEM, "cuda: cannot allocate %zu bytes of pinned memory: %s",
                          bytes, cudaGetErrorString(e));
    }
    return HX_OK;
}

extern "C" void hx_cuda_host_free(void *ptr)
{
    if (ptr && cudaFreeHost(ptr) != cudaSuccess)
        (void)cudaGetLastError(); // as hx_cuda_free
}

extern "C" hx_status hx_cuda_memcpy(void *dst, const void *src, size_t bytes, hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    return hx_cuda_err(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), err, "cudaMemcpy");
}

extern "C" hx_status hx_cuda_memset(void *d_dst, int value, size_t bytes, hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    return hx_cuda_err(cudaMemset(d_dst, value, bytes), err, "cudaMemset");
}

extern "C" hx_status hx_cuda_memcpy_async(void *dst, const void *src, size_t bytes,
                                          hx_cuda_stream *stream, hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    return hx_cuda_err(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, HX_STREAM(stream)), err,
                       "cudaMemcpyAsync");
}

extern "C" hx_status hx_cuda_memcpy_2d_async(void *dst, size_t dst_pitch, const void *src,
                                             size_t src_pitch, size_t width_bytes, size_t rows,
                                             hx_cuda_stream *stream, hx_err *err)
{
    if (width_bytes == 0 || rows == 0)
        return HX_OK;
    hx_status st = hx_cuda_copy_2d_check(dst_pitch, src_pitch, width_bytes, err);
    if (st != HX_OK)
        return st;
    return hx_cuda_err(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width_bytes, rows,
                                         cudaMemcpyDefault, HX_STREAM(stream)),
                       err, "cudaMemcpy2DAsync");
}

extern "C" hx_status hx_cuda_sync(hx_err *err)
{
    return hx_cuda_err(cudaDeviceSynchronize(), err, "cudaDeviceSynchronize");
}

extern "C" hx_status hx_cuda_stream_new(hx_cuda_stream **out, hx_err *err)
{
    cudaStream_t s = NULL;
    hx_status st =
        hx_cuda_err(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), err, "cudaStreamCreate");
    *out = st == HX_OK ? reinterpret_cast<hx_cuda_stream *>(s) : NULL;
    return st;
}

extern "C" void hx_cuda_stream_free(hx_cuda_stream *s)
{
    if (s && cudaStreamDestroy(HX_STREAM(s)) != cudaSuccess)
        (void)cudaGetLastError(); // as hx_cuda_free
}

extern "C" hx_status hx_cuda_event_new(hx_cuda_event **out, hx_err *err)
{
    cudaEvent_t ev = NULL;
    hx_status st = hx_cuda_err(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), err,
                               "cudaEventCreate");
    *out = st == HX_OK ? reinterpret_cast<hx_cuda_event *>(ev) : NULL;
    return st;
}

extern "C" void hx_cuda_event_free(hx_cuda_event *ev)
{
    if (ev && cudaEventDestroy(reinterpret_cast<cudaEvent_t>(ev)) != cudaSuccess)
        (void)cudaGetLastError(); // as hx_cuda_free
}

extern "C" hx_status hx_cuda_stream_wait(hx_cuda_stream *waiter, hx_cuda_stream *on,
                                         hx_cuda_event *ev, hx_err *err)
{
    cudaEvent_t e = reinterpret_cast<cudaEvent_t>(ev);
    hx_status st = hx_cuda_err(cudaEventRecord(e, HX_STREAM(on)), err, "cudaEventRecord");
    if (st == HX_OK)
        st = hx_cuda_err(cudaStreamWaitEvent(HX_STREAM(waiter), e, 0), err,
                         "cudaStreamWaitEvent");
    return st;
}

extern "C" hx_status hx_cuda_stream_sync(hx_cuda_stream *s, hx_err *err)
{
    return hx_cuda_err(cudaStreamSynchronize(HX_STREAM(s)), err, "cudaStreamSynchronize");
}

/* ---- graphs ---- */

extern "C" hx_status hx_cuda_graph_begin(hx_cuda_stream *s, hx_err *err)
{
    return hx_cuda_err(cudaStreamBeginCapture(HX_STREAM(s), cudaStreamCaptureModeThreadLocal), err,
                       "cudaStreamBeginCapture");
}

extern "C" hx_status hx_cuda_graph_end(hx_cuda_stream *s, hx_cuda_graph **out, hx_err *err)
{
    *out = NULL;
    cudaGraph_t g = NULL;
    hx_status st = hx_cuda_err(cudaStreamEndCapture(HX_STREAM(s), &g), err, "cudaStreamEndCapture");
    if (st != HX_OK)
        return st;
    cudaGraphExec_t x = NULL;
    st = hx_cuda_err(cudaGraphInstantiate(&x, g, 0), err, "cudaGraphInstantiate");
    (void)cudaGraphDestroy(g);
    if (st != HX_OK)
        return st;
    *out = reinterpret_cast<hx_cuda_graph *>(x);
    return HX_OK;
}

extern "C" void hx_cuda_graph_abort(hx_cuda_stream *s)
{
    cudaGraph_t g = NULL;
    if (cudaStreamEndCapture(HX_STREAM(s), &g) == cudaSuccess && g)
        (void)cudaGraphDestroy(g);
    (void)cudaGetLastError();
}

extern "C" hx_status hx_cuda_graph_launch(hx_cuda_graph *g, hx_cuda_stream *s, hx_err *err)
{
    return hx_cuda_err(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(g), HX_STREAM(s)), err,
                       "cudaGraphLaunch");
}

extern "C" void hx_cuda_graph_free(hx_cuda_graph *g)
{
    if (g && cudaGraphExecDestroy(reinterpret_cast<cudaGraphExec_t>(g)) != cudaSuccess)
        (void)cudaGetLastError(); // as hx_cuda_free
}

extern "C" hx_status hx_cuda_mem_info(size_t *free_bytes, size_t *total_bytes, hx_err *err)
{
    return hx_cuda_err(cudaMemGetInfo(free_bytes, total_bytes), err, "cudaMemGetInfo");
}
