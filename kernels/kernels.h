/*
 * kernels.h - the launch functions of the compute kernels, callable from C.
 *
 * The CUDA kernels live in kernels/cuda/ (.cu files) behind extern "C" functions
 * declared here; no CUDA type appears in this header. They exist only when
 * the build found a CUDA toolkit (HX_HAVE_CUDA); callers check that macro.
 */
#ifndef HX_KERNELS_H
#define HX_KERNELS_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * CUDA runtime version the backend was built against, as major*1000 +
 * minor*10 (13000 for 13.0).
 */
int hx_cuda_build_version(void);

/*
 * Number of CUDA devices visible now, or a negative value when the driver is
 * missing or reports an error (a machine without a GPU).
 */
int hx_cuda_device_count(void);

#ifdef __cplusplus
}
#endif

#endif /* HX_KERNELS_H */
