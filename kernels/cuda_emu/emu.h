/*
 * emu.h - internals of the host emulation of kernels/cuda.h (kernels/cuda_emu),
 * shared by emu.c and nccl.c. Test infrastructure only (cmake -DHX_CUDA_EMU=ON).
 *
 * A "kernel" of the emulation is a function of one argument struct. Launch
 * functions fill the struct and hand it to emu_launch, which runs it at once
 * on the calling thread or, on a stream being captured, appends it (with a
 * heap copy of the struct) to the graph that the capture builds; a graph
 * launch runs them again in order. So a kernel must read everything it uses
 * from its struct and from (emulated) device memory, never from the host
 * state of the call that launched it.
 *
 * Inside a kernel, every access to device memory should be checked with
 * emu_need (or emu_align for the GPU code's vector loads): an access outside
 * the allocations the device can reach is a fault, recorded as the sticky
 * error that later calls report (HX_EIO, "cuda: <call>: an illegal memory
 * access was encountered (...)"), as on a GPU; the kernel then returns.
 */
#ifndef HX_CUDA_EMU_H
#define HX_CUDA_EMU_H

#include <stddef.h>

#include "kernels/cuda.h"

typedef void (*emu_kernel)(const void *args);

/*
 * Launches kernel fn with args[0..size) on stream s (NULL: the legacy
 * stream) as the CUDA runtime would: HX_EIO "cuda: <what>: <reason>" when
 * there is no device, after a sticky error, on a stream of another device
 * than the current one, or on a capture already invalidated; and, like
 * cudaGetLastError after a launch, the error a failed earlier call of this
 * thread left behind (hx_cuda_free of a bad pointer).
 */
hx_status emu_launch(hx_cuda_stream *s, emu_kernel fn, const void *args, size_t size,
                     const char *what, hx_err *err);

/* Whether stream s has a capture open (launches on it are recorded, not run). */
int emu_capturing(const hx_cuda_stream *s);

/* This thread's current device (hx_cuda_set_device; 0 at first). */
int emu_device(void);

/* The device of stream s (NULL: the current device). */
int emu_stream_device(const hx_cuda_stream *s);

/*
 * Inside a kernel: whether p[0..bytes) lies in one allocation that the
 * running kernel's device can reach (its device memory, or page-locked host
 * memory); otherwise records the fault (naming `name`) and returns 0.
 * bytes 0 always passes.
 */
int emu_need(const void *p, size_t bytes, const char *name);

/* Inside a kernel: whether p is a multiple of align; otherwise a "misaligned address" fault. */
int emu_align(const void *p, size_t align, const char *name);

/*
 * For tests: 1 makes hx_cuda_decode1's cooperative launch fail on a stream
 * being captured, invalidating the capture, as a driver that cannot capture
 * one would; 0 (the default) records it like any launch.
 */
void emu_refuse_coop_capture(int on);

/* HX_OK, or the sticky error of a kernel fault as "cuda: <what>: ..." (HX_EIO). */
hx_status emu_sticky(const char *what, hx_err *err);

#endif /* HX_CUDA_EMU_H */
