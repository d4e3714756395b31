// probe.cu - what the CUDA backend was built with and what it sees at run time.
#include <cuda_runtime.h>

#include "kernels/kernels.h"

extern "C" int hx_cuda_build_version(void)
{
    return CUDART_VERSION;
}

extern "C" int hx_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return -1;
    }
    return n;
}
