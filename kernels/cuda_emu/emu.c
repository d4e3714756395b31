/*
 * emu.c - a host emulation of kernels/cuda.h: every function of the CUDA
 * backend but its NCCL section (kernels/cuda_emu/nccl.c), in plain C on the
 * CPU, so that the CUDA engine's host code (runtime/cuda_engine.c and what
 * drives it) can be tested where no GPU exists. cmake -DHX_CUDA_EMU=ON
 * builds hx_kernels_cuda from these files instead of the .cu files of
 * kernels/cuda; it is test infrastructure, never built into a release binary.
 *
 * Semantics follow the real kernels and the CUDA runtime under them; this is
 * not a performance model (the loops are plain). The same argument checks,
 * codes and messages; values rounded to bf16 (nearest even) where the GPU
 * code rounds them, fp32 where it keeps fp32; the paged KV layout; the
 * decode split with its chunking and the arrival counters in its workspace;
 * the sampler's block reductions in the GPU's order, so that its draws are
 * the GPU's wherever the GPU's arithmetic is fixed (not expf, whose last bit
 * may differ). Sums whose order the hardware leaves open (cuBLAS, tensor
 * cores) are plain loops; __expf is expf.
 *
 * The device, as the engine sees it:
 *   - $HX_CUDA_EMU_DEVICES devices (default 1; 0 is a host without one, -1
 *     one without a driver), each of $HX_CUDA_EMU_MEM_MB MiB (default 2048).
 *     Device and page-locked host memory are heap memory, 256-byte aligned,
 *     filled with 0xff bytes when allocated (NaN as fp32 or bf16, -1 as int:
 *     cudaMalloc promises no zeros) unless $HX_CUDA_EMU_POISON=0.
 *   - Work runs at the call, in order, on the calling thread: synchronising
 *     only reports errors.
 *   - Kernels check each access against the allocations their device can
 *     reach (its memory, page-locked host memory), and the GPU code's vector
 *     loads for alignment. A fault is sticky, as on a GPU: the launch itself
 *     succeeds, and every later call fails with "an illegal memory access
 *     was encountered" (or "misaligned address") and the emulation's account
 *     of the access.
 *   - Graph capture is CUDA's thread-local mode: kernels and async copies
 *     issued on a capturing stream are recorded, not run, and each graph
 *     launch replays them in order, reading device memory then. While a
 *     capture is open, its thread's synchronous calls (hx_cuda_memcpy,
 *     hx_cuda_memset, hx_cuda_malloc, hx_cuda_free, hx_cuda_host_free,
 *     hx_cuda_sync), a sync of the capturing stream, and an async copy to or
 *     from pageable host memory fail and invalidate the capture, so that
 *     graph_end fails too.
 *   - As cudaGetLastError does, a launch reports the error that an earlier
 *     void call of its thread left behind (hx_cuda_free of a pointer that
 *     is not device memory: "invalid argument").
 *
 * Not emulated: asynchrony. A host write to page-locked memory that a queued
 * copy has yet to read, or a read of results before the stream is
 * synchronised, is a race on a GPU and goes unnoticed here. Nor peer access
 * between devices (a kernel touching another device's memory faults).
 *
 * kernels/cuda_emu/emu.h declares what nccl.c shares: emu_launch and the
 * checks a kernel makes.
 */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#include "kernels/cuda_emu/emu.h"
#include "kernels/cuda_rules.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EMU_MAX_DEVICES 64
#define EMU_ALIGN 256 /* of every allocation, as cudaMalloc's */
#define LOG2E 1.4426950408889634f

/* The CUDA runtime's texts (cudaGetErrorString) for the errors emulated; compared by address. */
static const char E_NO_DEVICE[] = "no CUDA-capable device is detected";
static const char E_DRIVER[] = "CUDA driver version is insufficient for CUDA runtime version";
static const char E_ORDINAL[] = "invalid device ordinal";
static const char E_OOM[] = "out of memory";
static const char E_VALUE[] = "invalid argument";
static const char E_HANDLE[] = "invalid resource handle";
static const char E_CAPTURING[] = "operation not permitted when stream is capturing";
static const char E_INVALIDATED[] = "operation failed due to a previous error during capture";
static const char E_WRONG_THREAD[] =
    "attempt to terminate a thread-local capture sequence from another thread";
static const char E_STATE[] = "the operation cannot be performed in the present state";
static const char E_ILLEGAL[] = "an illegal memory access was encountered";
static const char E_MISALIGNED[] = "misaligned address";
static const char E_UNJOINED[] = "capturing stream has unjoined work";

/* ---- state ----------------------------------------------------------------------------------- */

enum { MEM_PAGEABLE = -1, MEM_OVERRUN = -2, MEM_DEVICE = 0, MEM_PINNED = 1 };

typedef struct emu_alloc {
    uintptr_t base;
    size_t bytes; /* as asked (16 for 0), what kernels may touch */
    size_t held;  /* bytes rounded up to EMU_ALIGN: what counts against the device */
    int kind;     /* MEM_DEVICE or MEM_PINNED */
    int device;   /* MEM_DEVICE: whose */
} emu_alloc;

/* A recorded launch: the kernel, a heap copy of its arguments, where it runs. */
typedef struct thunk {
    emu_kernel fn;
    void *args;
    int device;
    const char *what;
} thunk;

typedef struct thunk_list {
    thunk *t;
    int n, cap;
} thunk_list;

#define EMU_MAX_FORKS 8

struct hx_cuda_stream {
    int device;
    int capturing;   /* between graph_begin and graph_end (or abort) */
    int invalid;     /* the open capture was invalidated */
    pthread_t owner; /* the thread that began the capture */
    thunk_list cap;  /* what the open capture recorded */
    /* hx_cuda_stream_wait forks a stream into another's capture: its work is recorded there
       (in issue order: the emulation runs a graph's work in order), and it must be joined
       back before that capture ends */
    hx_cuda_stream *fork;                 /* the capturing stream this one was forked into */
    int unjoined;                         /* work issued on it since its fork or last join */
    hx_cuda_stream *forks[EMU_MAX_FORKS]; /* capturing: the streams forked into it */
    int n_forks;
};

struct hx_cuda_event {
    int unused; /* the emulation runs work at once, in order: nothing to record */
};

struct hx_cuda_graph {
    int device;
    thunk_list work;
};

struct hx_cuda_blas {
    void *workspace; /* as the real handle's: counts against device memory */
    int gemv_max_rows;
};

static struct {
    pthread_mutex_t lock; /* everything below but the three set once, by emu_init */
    int devices;          /* $HX_CUDA_EMU_DEVICES */
    size_t total;         /* bytes per device */
    int poison;           /* fill new allocations with 0xff */
    size_t used[EMU_MAX_DEVICES]; /* bytes held, per device */
    emu_alloc *allocs; /* [n_allocs], sorted by base */
    size_t n_allocs, cap_allocs;
    hx_cuda_stream **capturing; /* [n_capturing]: streams with an open capture */
    size_t n_capturing, cap_capturing;
    int sticky;           /* a kernel faulted: the context is lost */
    char sticky_msg[600]; /* its error text, written once */
} emu = {.lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t emu_once = PTHREAD_ONCE_INIT;
static atomic_int prefill_variant = -1; /* -1: $HX_CUDA_PREFILL_ATTN decides (default 2) */

static _Thread_local int tl_device;       /* cudaSetDevice's, per thread as CUDA's */
static _Thread_local const char *tl_last; /* an error not yet taken by cudaGetLastError */
static _Thread_local int tl_in_kernel;    /* running a kernel: the two below apply */
static _Thread_local int tl_run_device;
static _Thread_local const char *tl_run_what;

static long env_long(const char *name, long def, long lo, long hi)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return def;
    return v;
}

static void emu_init(void)
{
    emu.devices = (int)env_long("HX_CUDA_EMU_DEVICES", 1, -1, EMU_MAX_DEVICES);
    emu.total = (size_t)env_long("HX_CUDA_EMU_MEM_MB", 2048, 1, 1L << 24) << 20;
    emu.poison = env_long("HX_CUDA_EMU_POISON", 1, 0, 1) != 0;
}

static void init(void)
{
    pthread_once(&emu_once, emu_init);
}

static void lock(void)
{
    pthread_mutex_lock(&emu.lock);
}

static void unlock(void)
{
    pthread_mutex_unlock(&emu.lock);
}

/* Why no CUDA call can run now (no device, a sticky fault), or NULL. Lock held. */
static const char *unusable(void)
{
    if (emu.devices < 0)
        return E_DRIVER;
    if (emu.devices == 0)
        return E_NO_DEVICE;
    if (emu.sticky)
        return emu.sticky_msg;
    return NULL;
}

/* A failed runtime call, as hx_cuda_err reports it (which also clears the last error). */
static hx_status cuda_fail(hx_err *err, const char *what, const char *why)
{
    tl_last = NULL;
    return hx_err_set(err, why == E_OOM ? HX_ENOMEM : HX_EIO, "cuda: %s: %s", what, why);
}

/*
 * A call that thread-local capture forbids to the capturing thread: when
 * this thread has a capture open, it is invalidated and 1 returned. Lock held.
 */
static int capture_forbids(void)
{
    const pthread_t self = pthread_self();
    int hit = 0;
    for (size_t i = 0; i < emu.n_capturing; i++)
        if (pthread_equal(emu.capturing[i]->owner, self)) {
            emu.capturing[i]->invalid = 1;
            hit = 1;
        }
    return hit;
}

/* The stream whose capture work issued on s goes into: s, the one s was forked into, or NULL. */
static hx_cuda_stream *capture_of(hx_cuda_stream *s)
{
    if (!s)
        return NULL;
    if (s->capturing)
        return s;
    return s->fork && s->fork->capturing ? s->fork : NULL;
}

/* A capture ends (lock held): its forked streams leave it; 1 when one had unjoined work. */
static int forks_release(hx_cuda_stream *s)
{
    int unjoined = 0;
    for (int i = 0; i < s->n_forks; i++) {
        unjoined |= s->forks[i]->unjoined;
        s->forks[i]->fork = NULL;
        s->forks[i]->unjoined = 0;
    }
    s->n_forks = 0;
    return unjoined;
}

static void capturing_remove(hx_cuda_stream *s)
{
    for (size_t i = 0; i < emu.n_capturing; i++)
        if (emu.capturing[i] == s) {
            emu.capturing[i] = emu.capturing[--emu.n_capturing];
            return;
        }
}

/* ---- the allocation table -------------------------------------------------------------------- */

/* Index of the last allocation whose base is <= a, or -1. Lock held. */
static long alloc_at(uintptr_t a)
{
    size_t lo = 0, hi = emu.n_allocs; /* allocs[0, lo) have base <= a */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (emu.allocs[mid].base <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (long)lo - 1;
}

/* The allocation holding address a (its first bytes bytes, at least one), or NULL. Lock held. */
static const emu_alloc *alloc_holding(uintptr_t a)
{
    long i = alloc_at(a);
    if (i < 0)
        return NULL;
    const emu_alloc *m = &emu.allocs[i];
    return a - m->base < m->bytes ? m : NULL;
}

static int alloc_insert(const emu_alloc *m)
{
    if (emu.n_allocs == emu.cap_allocs) {
        size_t cap = emu.cap_allocs ? 2 * emu.cap_allocs : 64;
        emu_alloc *n = realloc(emu.allocs, cap * sizeof *n);
        if (!n)
            return -1;
        emu.allocs = n;
        emu.cap_allocs = cap;
    }
    size_t at = (size_t)(alloc_at(m->base) + 1);
    memmove(emu.allocs + at + 1, emu.allocs + at, (emu.n_allocs - at) * sizeof *m);
    emu.allocs[at] = *m;
    emu.n_allocs++;
    return 0;
}

/* Removes the allocation at base p of `kind`: 0, or -1 when there is none. Lock held. */
static int alloc_remove(uintptr_t p, int kind, emu_alloc *out)
{
    long i = alloc_at(p);
    if (i < 0 || emu.allocs[i].base != p || emu.allocs[i].kind != kind)
        return -1;
    *out = emu.allocs[i];
    memmove(emu.allocs + i, emu.allocs + i + 1, (emu.n_allocs - (size_t)i - 1) * sizeof *out);
    emu.n_allocs--;
    return 0;
}

/*
 * What p[0..bytes) is for a copy: MEM_DEVICE / MEM_PINNED inside one
 * allocation, MEM_OVERRUN when it starts in one and runs past its end
 * (cudaMemcpy's "invalid argument"), MEM_PAGEABLE otherwise. Lock held.
 */
static int range_kind(const void *p, size_t bytes)
{
    const uintptr_t a = (uintptr_t)p;
    const emu_alloc *m = alloc_holding(a);
    if (!m)
        return MEM_PAGEABLE;
    return bytes <= m->bytes - (a - m->base) ? m->kind : MEM_OVERRUN;
}

/* Memory of the current device (MEM_DEVICE) or page-locked; NULL and *why. Lock held. */
static void *heap_alloc(size_t bytes, int kind, const char **why)
{
    const size_t held = (bytes + EMU_ALIGN - 1) / EMU_ALIGN * EMU_ALIGN;
    const int dev = tl_device;
    if (held < bytes || (kind == MEM_DEVICE && held > emu.total - emu.used[dev])) {
        *why = E_OOM;
        return NULL;
    }
    void *p = aligned_alloc(EMU_ALIGN, held);
    emu_alloc m = {(uintptr_t)p, bytes, held, kind, kind == MEM_DEVICE ? dev : -1};
    if (!p || alloc_insert(&m) != 0) {
        free(p);
        *why = E_OOM;
        return NULL;
    }
    if (kind == MEM_DEVICE)
        emu.used[dev] += held;
    return p;
}

/* ---- running kernels, faults ----------------------------------------------------------------- */

static void run_kernel(emu_kernel fn, const void *args, int device, const char *what)
{
    const int in = tl_in_kernel, dev = tl_run_device;
    const char *w = tl_run_what;
    tl_in_kernel = 1;
    tl_run_device = device;
    tl_run_what = what;
    fn(args);
    tl_in_kernel = in;
    tl_run_device = dev;
    tl_run_what = w;
}

static int sticky_set(void)
{
    lock();
    int s = emu.sticky;
    unlock();
    return s;
}

/* A kernel's fault: the first one becomes the sticky error (kind: E_ILLEGAL, ...). */
__attribute__((format(printf, 2, 3))) static void fault(const char *kind, const char *fmt, ...)
{
    char detail[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    lock();
    if (!emu.sticky) {
        snprintf(emu.sticky_msg, sizeof emu.sticky_msg, "%s (host emulation: kernel %s, %s)",
                 kind, tl_in_kernel && tl_run_what ? tl_run_what : "?", detail);
        emu.sticky = 1;
    }
    unlock();
}

int emu_device(void)
{
    return tl_device;
}

int emu_stream_device(const hx_cuda_stream *s)
{
    return s ? s->device : tl_device;
}

hx_status emu_sticky(const char *what, hx_err *err)
{
    lock();
    const int s = emu.sticky;
    unlock();
    return s ? cuda_fail(err, what, emu.sticky_msg) : HX_OK;
}

/*
 * One buffer argument of a kernel, resolved at its first access to the
 * allocation that holds its base address; every access must fall inside that.
 */
typedef struct kbuf {
    const char *name;
    uintptr_t p, lo, hi;
    int state; /* 0 unresolved, 1 resolved, -1 faulted */
} kbuf;

static kbuf kb(const void *p, const char *name)
{
    kbuf b = {name, (uintptr_t)p, 0, 0, 0};
    return b;
}

/* Whether kernel access a[0..bytes) of buffer b is allowed; else a fault and 0. */
static int has(kbuf *b, uintptr_t a, size_t bytes)
{
    if (b->state < 0)
        return 0;
    if (b->state == 0) {
        const int dev = tl_in_kernel ? tl_run_device : tl_device;
        lock();
        const emu_alloc *m = alloc_holding(b->p);
        emu_alloc c = m ? *m : (emu_alloc){0};
        unlock();
        if (!m || (c.kind == MEM_DEVICE && c.device != dev)) {
            if (m)
                fault(E_ILLEGAL, "%s: %p is memory of device %d, the kernel runs on device %d",
                      b->name, (void *)b->p, c.device, dev);
            else
                fault(E_ILLEGAL, "%s: %p is not device memory%s", b->name, (void *)b->p,
                      b->p ? "" : " (NULL)");
            b->state = -1;
            return 0;
        }
        b->lo = c.base;
        b->hi = c.base + c.bytes;
        b->state = 1;
    }
    if (bytes == 0)
        return 1;
    if (a < b->lo || a >= b->hi || bytes > b->hi - a) {
        fault(E_ILLEGAL,
              "%s: %zu bytes at offset %lld of its allocation of %zu bytes (at %p; the argument "
              "%p)",
              b->name, bytes, (long long)(a - b->lo), (size_t)(b->hi - b->lo), (void *)b->lo,
              (void *)b->p);
        b->state = -1;
        return 0;
    }
    return 1;
}

int emu_need(const void *p, size_t bytes, const char *name)
{
    if (bytes == 0)
        return 1;
    kbuf b = kb(p, name);
    return has(&b, (uintptr_t)p, bytes);
}

int emu_align(const void *p, size_t align, const char *name)
{
    if ((uintptr_t)p % align == 0)
        return 1;
    fault(E_MISALIGNED, "%s: %p is not %zu-byte aligned, as the kernel accesses it", name, p,
          align);
    return 0;
}

/* Scratch memory for a kernel; a failure is a fault. */
static void *kalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        fault(E_OOM, "%zu bytes of host scratch memory", bytes);
    return p;
}

/* ---- launching and capturing ----------------------------------------------------------------- */

static int thunks_add(thunk_list *l, emu_kernel fn, const void *args, size_t size, int device,
                      const char *what)
{
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        thunk *t = realloc(l->t, (size_t)cap * sizeof *t);
        if (!t)
            return -1;
        l->t = t;
        l->cap = cap;
    }
    void *a = malloc(size ? size : 1);
    if (!a)
        return -1;
    memcpy(a, args, size);
    l->t[l->n++] = (thunk){fn, a, device, what};
    return 0;
}

static void thunks_free(thunk_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->t[i].args);
    free(l->t);
    l->t = NULL;
    l->n = l->cap = 0;
}

/*
 * Launches fn on s: runs it now, or records it into the capture open on s.
 * blas: the launch is cuBLAS's (its errors are cublasGemmEx's, and it does not
 * take the thread's last error).
 */
static hx_status launch(hx_cuda_stream *s, emu_kernel fn, const void *args, size_t size,
                        const char *what, int blas, hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    const int dev = s ? s->device : tl_device;
    int captured = 0;
    if (!why && dev != tl_device)
        why = E_HANDLE; /* a kernel launch on a stream of another device fails */
    hx_cuda_stream *cs = why ? NULL : capture_of(s);
    if (cs) {
        if (cs->invalid)
            why = E_INVALIDATED;
        else if (thunks_add(&cs->cap, fn, args, size, dev, what) != 0)
            why = E_OOM;
        else
            captured = 1;
        if (cs != s)
            s->unjoined = 1;
    }
    unlock();
    if (why) {
        if (blas)
            return hx_err_set(err, why == E_OOM ? HX_ENOMEM : HX_EIO, "cublas: cublasGemmEx: %s",
                              why == E_OOM ? "allocation failed (3)" : "execution failed (13)");
        return cuda_fail(err, what, why);
    }
    if (!captured)
        run_kernel(fn, args, dev, what);
    if (!blas && tl_last) { /* cudaGetLastError after the launch */
        const char *e = tl_last;
        tl_last = NULL;
        return hx_err_set(err, HX_EIO, "cuda: %s: %s", what, e);
    }
    return HX_OK;
}

hx_status emu_launch(hx_cuda_stream *s, emu_kernel fn, const void *args, size_t size,
                     const char *what, hx_err *err)
{
    return launch(s, fn, args, size, what, 0, err);
}

int emu_capturing(const hx_cuda_stream *s)
{
    if (!s)
        return 0;
    init();
    lock();
    const int c = capture_of((hx_cuda_stream *)(uintptr_t)s) != NULL;
    unlock();
    return c;
}

/* ---- bf16 and friends ------------------------------------------------------------------------ */

static inline float bf2f(hx_bf16 h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* __float2bfloat16_rn: to nearest even; every NaN becomes 0x7fff */
static inline hx_bf16 f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fff;
    return (hx_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf(float f)
{
    return bf2f(f2bf(f));
}

static inline float f_of(uint32_t b)
{
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint32_t bits_of(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

/* __half2float */
static float half2f(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h >> 15) << 31;
    const int e = (h >> 10) & 31, m = h & 1023;
    if (e == 0) {
        const float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31)
        return f_of(sign | 0x7f800000u | ((uint32_t)m << 13));
    return f_of(sign | ((uint32_t)(e - 15 + 127) << 23) | ((uint32_t)m << 13));
}

static float dot(const float *a, const float *b, size_t n)
{
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void widen(float *dst, const hx_bf16 *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = bf2f(src[i]);
}

/*
 * Block reductions in the GPU's order (common.cuh): hx_warp_sum's xor
 * butterfly over 32 lanes (every lane ends with the same sum), hx_block_sum's
 * warp sums, then a butterfly over them. v: one value per thread, clobbered.
 */
static float warp_sum(float *v)
{
    for (int o = 16; o > 0; o >>= 1) {
        float t[32];
        for (int l = 0; l < 32; l++)
            t[l] = v[l] + v[l ^ o];
        memcpy(v, t, sizeof t);
    }
    return v[0];
}

static float block_sum(float *v, int threads)
{
    const int n_warps = threads / 32;
    float red[32];
    for (int w = 0; w < 32; w++)
        red[w] = w < n_warps ? warp_sum(v + 32 * w) : 0.0f;
    return warp_sum(red);
}

/* 1 / sqrt(mean(v^2) + eps) as a block of 256 threads sums it (add_rmsnorm_kernel, gemv_norm) */
static float rms_scale(const float *v, int dim, float eps)
{
    float part[256] = {0};
    for (int i = 0; i < dim; i++)
        part[i % 256] = fmaf(v[i], v[i], part[i % 256]); /* ss += v * v, contracted */
    const float ss = block_sum(part, 256);
    return 1.0f / sqrtf(ss / (float)dim + eps);
}

/* Element offset of (block, layer, kv, head, position-in-block 0) in the paged cache. */
static size_t kv_offset(const hx_cuda_kv_layout *kv, int block, int layer, int which, int head)
{
    return ((((size_t)block * kv->layers + layer) * 2 + which) * kv->kv_heads + head) *
           (size_t)kv->block_tokens * kv->head_dim;
}

/* ---- devices and memory ---------------------------------------------------------------------- */

int hx_cuda_build_version(void)
{
    return 0; /* built against no CUDA runtime */
}

int hx_cuda_device_count(void)
{
    init();
    return emu.devices;
}

int hx_cuda_available(void)
{
    return hx_cuda_device_count() > 0;
}

void hx_cuda_set_pdl(int on)
{
    (void)on; /* the same maths either way */
}

void hx_cuda_set_gemv_variant(int v)
{
    (void)v; /* the same maths either way (up to fp32 summation order) */
}

void hx_cuda_set_decode_attention_variant(int v)
{
    (void)v; /* as hx_cuda_set_gemv_variant */
}

static const char *bad_device(int device)
{
    init();
    if (emu.devices < 0)
        return E_DRIVER;
    if (emu.devices == 0)
        return E_NO_DEVICE;
    return device < 0 || device >= emu.devices ? E_ORDINAL : NULL;
}

hx_status hx_cuda_set_device(int device, hx_err *err)
{
    const char *why = bad_device(device);
    if (why)
        return cuda_fail(err, "cudaSetDevice", why);
    tl_device = device;
    return HX_OK;
}

hx_status hx_cuda_device_info(int device, char *name, size_t size, double *peak_bytes_per_s,
                              double *peak_bf16_flops, hx_err *err)
{
    const char *why = bad_device(device);
    if (why)
        return cuda_fail(err, "cudaGetDeviceProperties", why);
    if (name && size)
        snprintf(name, size, "%s", "hexflow host emulation");
    if (peak_bytes_per_s)
        *peak_bytes_per_s = 0;
    if (peak_bf16_flops)
        *peak_bf16_flops = 0;
    return HX_OK;
}

/* One UUID per device number, the same in every process: as one physical GPU. */
hx_status hx_cuda_device_uuid(int device, char *out, size_t size, hx_err *err)
{
    if (!out || size < HX_CUDA_UUID_CHARS)
        return hx_err_set(err, HX_EINVAL, "cuda: device uuid: a buffer of %zu bytes, need %d",
                          out ? size : 0, HX_CUDA_UUID_CHARS);
    out[0] = '\0';
    const char *why = bad_device(device);
    if (why)
        return cuda_fail(err, "cudaGetDeviceProperties", why);
    snprintf(out, size, "GPU-00000000-0000-0000-0000-%012x", (unsigned)device);
    return HX_OK;
}

hx_status hx_cuda_malloc(void **ptr, size_t bytes, hx_err *err)
{
    *ptr = NULL;
    if (bytes == 0)
        bytes = 16;
    init();
    lock();
    const char *why = unusable();
    if (!why && capture_forbids())
        why = E_CAPTURING;
    void *p = why ? NULL : heap_alloc(bytes, MEM_DEVICE, &why);
    unlock();
    if (why) {
        tl_last = NULL;
        return hx_err_set(err, why == E_OOM ? HX_ENOMEM : HX_EIO,
                          "cuda: cannot allocate %zu bytes of device memory: %s", bytes, why);
    }
    if (emu.poison)
        memset(p, 0xff, bytes);
    *ptr = p;
    return HX_OK;
}

/* cudaFree / cudaFreeHost: a failure is left for the thread's next launch to report. */
static void heap_free(void *ptr, int kind)
{
    if (!ptr)
        return;
    init();
    emu_alloc m = {0};
    lock();
    int bad = capture_forbids() ? 1 : alloc_remove((uintptr_t)ptr, kind, &m) != 0 ? 2 : 0;
    if (!bad && kind == MEM_DEVICE)
        emu.used[m.device] -= m.held;
    unlock();
    if (bad) {
        tl_last = bad == 1 ? E_CAPTURING : E_VALUE;
        return;
    }
    free(ptr);
}

void hx_cuda_free(void *ptr)
{
    heap_free(ptr, MEM_DEVICE);
}

hx_status hx_cuda_host_alloc(void **ptr, size_t bytes, hx_err *err)
{
    *ptr = NULL;
    if (bytes == 0)
        bytes = 16;
    init();
    lock();
    const char *why = unusable();
    void *p = why ? NULL : heap_alloc(bytes, MEM_PINNED, &why);
    unlock();
    if (why) {
        tl_last = NULL;
        return hx_err_set(err, HX_ENOMEM, "cuda: cannot allocate %zu bytes of pinned memory: %s",
                          bytes, why);
    }
    if (emu.poison)
        memset(p, 0xff, bytes);
    *ptr = p;
    return HX_OK;
}

void hx_cuda_host_free(void *ptr)
{
    heap_free(ptr, MEM_PINNED);
}

hx_status hx_cuda_memcpy(void *dst, const void *src, size_t bytes, hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    init();
    lock();
    const char *why = unusable();
    if (!why && capture_forbids())
        why = E_CAPTURING;
    if (!why && (!dst || !src || range_kind(dst, bytes) == MEM_OVERRUN ||
                 range_kind(src, bytes) == MEM_OVERRUN))
        why = E_VALUE;
    unlock();
    if (why)
        return cuda_fail(err, "cudaMemcpy", why);
    memmove(dst, src, bytes);
    return HX_OK;
}

hx_status hx_cuda_memset(void *d_dst, int value, size_t bytes, hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    init();
    lock();
    const char *why = unusable();
    if (!why && capture_forbids())
        why = E_CAPTURING;
    if (!why) {
        const int k = range_kind(d_dst, bytes);
        if (k != MEM_DEVICE && k != MEM_PINNED) /* pageable memory, or past the end */
            why = E_VALUE;
    }
    unlock();
    if (why)
        return cuda_fail(err, "cudaMemset", why);
    memset(d_dst, value, bytes);
    return HX_OK;
}

/*
 * An async copy of `rows` rows of `width` bytes, as a kernel of its own so
 * that captures record it. dk, sk: what dst and src were when it was issued
 * (range_kind); device or page-locked memory must still be there when it runs.
 */
typedef struct copy_args {
    unsigned char *dst;
    const unsigned char *src;
    size_t dpitch, spitch, width, rows;
    int dk, sk;
} copy_args;

static void run_copy(const void *p)
{
    const copy_args *a = p;
    const size_t dlen = (a->rows - 1) * a->dpitch + a->width;
    const size_t slen = (a->rows - 1) * a->spitch + a->width;
    if (a->dk != MEM_PAGEABLE || a->sk != MEM_PAGEABLE) {
        lock();
        const int dk = range_kind(a->dst, dlen), sk = range_kind(a->src, slen);
        unlock();
        if ((a->dk != MEM_PAGEABLE && dk != a->dk) || (a->sk != MEM_PAGEABLE && sk != a->sk)) {
            fault(E_ILLEGAL, "a copy of %zu x %zu bytes from %p to %p: freed since it was issued",
                  a->rows, a->width, (const void *)a->src, (void *)a->dst);
            return;
        }
    }
    for (size_t r = 0; r < a->rows; r++)
        memmove(a->dst + r * a->dpitch, a->src + r * a->spitch, a->width);
}

static hx_status copy_async(const char *what, void *dst, size_t dpitch, const void *src,
                            size_t spitch, size_t width, size_t rows, hx_cuda_stream *s,
                            hx_err *err)
{
    copy_args a = {dst, src, dpitch, spitch, width, rows, MEM_PAGEABLE, MEM_PAGEABLE};
    init();
    lock();
    const char *why = unusable();
    hx_cuda_stream *cs = capture_of(s);
    const int capturing = cs != NULL;
    if (!why) {
        a.dk = range_kind(dst, (rows - 1) * dpitch + width);
        a.sk = range_kind(src, (rows - 1) * spitch + width);
        if (!dst || !src || a.dk == MEM_OVERRUN || a.sk == MEM_OVERRUN)
            why = E_VALUE;
    }
    if (!why && capturing && cs->invalid)
        why = E_INVALIDATED;
    if (!why && capturing && (a.dk == MEM_PAGEABLE || a.sk == MEM_PAGEABLE)) {
        cs->invalid = 1; /* a graph cannot hold a copy of pageable memory */
        why = E_CAPTURING;
    }
    if (!why && capturing &&
        thunks_add(&cs->cap, run_copy, &a, sizeof a, s->device, what) != 0)
        why = E_OOM;
    if (!why && capturing && cs != s)
        s->unjoined = 1;
    unlock();
    if (why)
        return cuda_fail(err, what, why);
    if (!capturing)
        run_kernel(run_copy, &a, s ? s->device : tl_device, what);
    return HX_OK;
}

hx_status hx_cuda_memcpy_async(void *dst, const void *src, size_t bytes, hx_cuda_stream *stream,
                               hx_err *err)
{
    if (bytes == 0)
        return HX_OK;
    return copy_async("cudaMemcpyAsync", dst, bytes, src, bytes, bytes, 1, stream, err);
}

hx_status hx_cuda_memcpy_2d_async(void *dst, size_t dst_pitch, const void *src, size_t src_pitch,
                                  size_t width_bytes, size_t rows, hx_cuda_stream *stream,
                                  hx_err *err)
{
    if (width_bytes == 0 || rows == 0)
        return HX_OK;
    hx_status st = hx_cuda_copy_2d_check(dst_pitch, src_pitch, width_bytes, err);
    if (st != HX_OK)
        return st;
    return copy_async("cudaMemcpy2DAsync", dst, dst_pitch, src, src_pitch, width_bytes, rows,
                      stream, err);
}

hx_status hx_cuda_sync(hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    if (!why && capture_forbids())
        why = E_CAPTURING;
    unlock();
    return why ? cuda_fail(err, "cudaDeviceSynchronize", why) : HX_OK;
}

hx_status hx_cuda_stream_new(hx_cuda_stream **out, hx_err *err)
{
    *out = NULL;
    init();
    lock();
    const char *why = unusable();
    unlock();
    if (why)
        return cuda_fail(err, "cudaStreamCreate", why);
    hx_cuda_stream *s = calloc(1, sizeof *s);
    if (!s)
        return cuda_fail(err, "cudaStreamCreate", E_OOM);
    s->device = tl_device;
    *out = s;
    return HX_OK;
}

void hx_cuda_stream_free(hx_cuda_stream *s)
{
    if (!s)
        return;
    lock();
    if (s->capturing) {
        capturing_remove(s);
        forks_release(s);
    }
    if (s->fork) { /* leaves the capture it was forked into */
        hx_cuda_stream *p = s->fork;
        for (int i = 0; i < p->n_forks; i++)
            if (p->forks[i] == s)
                p->forks[i] = p->forks[--p->n_forks];
    }
    unlock();
    thunks_free(&s->cap);
    free(s);
}

hx_status hx_cuda_stream_sync(hx_cuda_stream *s, hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    hx_cuda_stream *cs = why ? NULL : capture_of(s);
    if (cs) {
        cs->invalid = 1; /* a capturing stream cannot be waited for */
        why = E_CAPTURING;
    }
    unlock();
    return why ? cuda_fail(err, "cudaStreamSynchronize", why) : HX_OK;
}

hx_status hx_cuda_event_new(hx_cuda_event **out, hx_err *err)
{
    *out = NULL;
    init();
    lock();
    const char *why = unusable();
    unlock();
    if (why)
        return cuda_fail(err, "cudaEventCreate", why);
    if (!(*out = calloc(1, sizeof **out)))
        return cuda_fail(err, "cudaEventCreate", E_OOM);
    return HX_OK;
}

void hx_cuda_event_free(hx_cuda_event *ev)
{
    free(ev);
}

/*
 * Work runs at once and in order here, so only captures see a wait: waiting
 * on a stream in a capture forks the waiter into it (its work is recorded
 * there), and the capturing stream waiting on a stream forked into it joins
 * that one back.
 */
hx_status hx_cuda_stream_wait(hx_cuda_stream *waiter, hx_cuda_stream *on, hx_cuda_event *ev,
                              hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    if (!why && (!ev || !waiter || !on))
        why = E_HANDLE;
    hx_cuda_stream *cs = why || waiter == on ? NULL : capture_of(on); /* itself: nothing */
    if (!why && cs) {
        if (waiter == cs) { /* a join: what `on` issued so far is in the capture's order */
            on->unjoined = 0;
        } else if (waiter->capturing || (waiter->fork && waiter->fork != cs)) {
            why = E_STATE; /* already in another capture */
        } else if (!waiter->fork) { /* a fork */
            if (cs->n_forks == EMU_MAX_FORKS)
                why = E_OOM;
            else {
                cs->forks[cs->n_forks++] = waiter;
                waiter->fork = cs;
                waiter->unjoined = 0;
            }
        }
    }
    unlock();
    return why ? cuda_fail(err, "cudaStreamWaitEvent", why) : HX_OK;
}

/* ---- graphs ---------------------------------------------------------------------------------- */

hx_status hx_cuda_graph_begin(hx_cuda_stream *s, hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    if (!why && !s)
        why = E_CAPTURING; /* the legacy stream cannot be captured */
    if (!why && (s->capturing || s->fork))
        why = E_STATE;
    if (!why && emu.n_capturing == emu.cap_capturing) {
        size_t cap = emu.cap_capturing ? 2 * emu.cap_capturing : 8;
        hx_cuda_stream **n = realloc(emu.capturing, cap * sizeof *n);
        if (n) {
            emu.capturing = n;
            emu.cap_capturing = cap;
        } else {
            why = E_OOM;
        }
    }
    if (!why) {
        s->capturing = 1;
        s->invalid = 0;
        s->owner = pthread_self();
        emu.capturing[emu.n_capturing++] = s;
    }
    unlock();
    return why ? cuda_fail(err, "cudaStreamBeginCapture", why) : HX_OK;
}

hx_status hx_cuda_graph_end(hx_cuda_stream *s, hx_cuda_graph **out, hx_err *err)
{
    *out = NULL;
    thunk_list work = {0};
    init();
    lock();
    const char *why = NULL;
    if (!s || !s->capturing)
        why = E_STATE;
    else if (!pthread_equal(s->owner, pthread_self()))
        why = E_WRONG_THREAD; /* the capture stays open */
    else {
        capturing_remove(s);
        s->capturing = 0;
        work = s->cap;
        memset(&s->cap, 0, sizeof s->cap);
        const int unjoined = forks_release(s);
        why = s->invalid ? E_INVALIDATED : unjoined ? E_UNJOINED : unusable();
        s->invalid = 0;
    }
    unlock();
    if (why) {
        thunks_free(&work);
        return cuda_fail(err, "cudaStreamEndCapture", why);
    }
    hx_cuda_graph *g = calloc(1, sizeof *g);
    if (!g) {
        thunks_free(&work);
        return cuda_fail(err, "cudaGraphInstantiate", E_OOM);
    }
    g->device = s->device;
    g->work = work;
    *out = g;
    return HX_OK;
}

void hx_cuda_graph_abort(hx_cuda_stream *s)
{
    thunk_list work = {0};
    lock();
    if (s && s->capturing && pthread_equal(s->owner, pthread_self())) {
        capturing_remove(s);
        forks_release(s);
        s->capturing = 0;
        s->invalid = 0;
        work = s->cap;
        memset(&s->cap, 0, sizeof s->cap);
    }
    unlock();
    thunks_free(&work);
    tl_last = NULL; /* cudaGetLastError */
}

/* A graph's recorded work, in order, until a fault stops the device. */
static void run_graph(const void *p)
{
    const hx_cuda_graph *g = *(hx_cuda_graph *const *)p;
    for (int i = 0; i < g->work.n && !sticky_set(); i++)
        run_kernel(g->work.t[i].fn, g->work.t[i].args, g->work.t[i].device, g->work.t[i].what);
}

hx_status hx_cuda_graph_launch(hx_cuda_graph *g, hx_cuda_stream *s, hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    int captured = 0;
    if (!why && !g)
        why = E_HANDLE;
    hx_cuda_stream *cs = why ? NULL : capture_of(s);
    if (cs) { /* a graph launched into a capture: a child graph */
        if (cs->invalid)
            why = E_INVALIDATED;
        else if (thunks_add(&cs->cap, run_graph, &g, sizeof g, s->device, "cudaGraphLaunch") != 0)
            why = E_OOM;
        else
            captured = 1;
        if (cs != s)
            s->unjoined = 1;
    }
    unlock();
    if (why)
        return cuda_fail(err, "cudaGraphLaunch", why);
    if (!captured)
        run_kernel(run_graph, &g, g->device, "cudaGraphLaunch");
    return HX_OK;
}

void hx_cuda_graph_free(hx_cuda_graph *g)
{
    if (!g)
        return;
    thunks_free(&g->work);
    free(g);
}

hx_status hx_cuda_mem_info(size_t *free_bytes, size_t *total_bytes, hx_err *err)
{
    init();
    lock();
    const char *why = unusable();
    const size_t used = why ? 0 : emu.used[tl_device];
    unlock();
    if (why)
        return cuda_fail(err, "cudaMemGetInfo", why);
    if (free_bytes)
        *free_bytes = emu.total - used;
    if (total_bytes)
        *total_bytes = emu.total;
    return HX_OK;
}

/* ---- element conversion and initialisation --------------------------------------------------- */

typedef struct conv_args {
    hx_bf16 *dst;
    const void *src;
    int dtype;
    int64_t n;
} conv_args;

static void run_to_bf16(const void *p)
{
    const conv_args *a = p;
    const size_t n = (size_t)a->n, es = a->dtype == HX_CUDA_DTYPE_F32 ? 4 : 2;
    if (!emu_need(a->src, n * es, "d_src") || !emu_align(a->src, es, "d_src") ||
        !emu_need(a->dst, n * 2, "d_dst") || !emu_align(a->dst, 2, "d_dst"))
        return;
    for (size_t i = 0; i < n; i++) {
        if (a->dtype == HX_CUDA_DTYPE_F32)
            a->dst[i] = f2bf(((const float *)a->src)[i]);
        else if (a->dtype == HX_CUDA_DTYPE_F16)
            a->dst[i] = f2bf(half2f(((const uint16_t *)a->src)[i]));
        else
            a->dst[i] = ((const hx_bf16 *)a->src)[i];
    }
}

hx_status hx_cuda_to_bf16(hx_bf16 *d_dst, const void *d_src, int src_dtype, int64_t n,
                          hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_to_bf16_check(src_dtype, n, err);
    if (st != HX_OK)
        return st;
    if (n == 0)
        return HX_OK;
    conv_args a = {d_dst, d_src, src_dtype, n};
    return emu_launch(stream, run_to_bf16, &a, sizeof a, "to_bf16", err);
}

typedef struct widen_args {
    float *dst;
    const hx_bf16 *src;
    int64_t n;
} widen_args;

static void run_bf16_to_f32(const void *p)
{
    const widen_args *a = p;
    const size_t n = (size_t)a->n;
    if (!emu_need(a->src, n * 2, "d_src") || !emu_need(a->dst, n * 4, "d_dst"))
        return;
    widen(a->dst, a->src, n);
}

hx_status hx_cuda_bf16_to_f32(float *d_dst, const hx_bf16 *d_src, int64_t n,
                              hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    widen_args a = {d_dst, d_src, n};
    return emu_launch(stream, run_bf16_to_f32, &a, sizeof a, "bf16_to_f32", err);
}

typedef struct fill_args {
    void *dst;
    int64_t n;
    uint64_t seed;
    float lo, hi;
    int bf16;
} fill_args;

static float uniform01(uint64_t seed, uint64_t i)
{
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

static void run_fill(const void *p)
{
    const fill_args *a = p;
    const size_t n = (size_t)a->n;
    if (!emu_need(a->dst, n * (a->bf16 ? 2 : 4), "d_dst"))
        return;
    for (size_t i = 0; i < n; i++) {
        const float v = fmaf(a->hi - a->lo, uniform01(a->seed, i), a->lo); /* nvcc contracts */
        if (a->bf16)
            ((hx_bf16 *)a->dst)[i] = f2bf(v);
        else
            ((float *)a->dst)[i] = v;
    }
}

hx_status hx_cuda_fill_uniform_bf16(hx_bf16 *d_dst, int64_t n, uint64_t seed, float lo, float hi,
                                    hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    fill_args a = {d_dst, n, seed, lo, hi, 1};
    return emu_launch(stream, run_fill, &a, sizeof a, "fill_uniform_bf16", err);
}

hx_status hx_cuda_fill_uniform_f32(float *d_dst, int64_t n, uint64_t seed, float lo, float hi,
                                   hx_cuda_stream *stream, hx_err *err)
{
    if (n <= 0)
        return HX_OK;
    fill_args a = {d_dst, n, seed, lo, hi, 0};
    return emu_launch(stream, run_fill, &a, sizeof a, "fill_uniform_f32", err);
}

/* ---- GEMM ------------------------------------------------------------------------------------ */

#define HX_BLAS_WORKSPACE_BYTES ((size_t)32 << 20)
#define HX_GEMV_MAX_ROWS 8

hx_status hx_cuda_blas_new(int gemv_max_rows, hx_cuda_blas **out, hx_err *err)
{
    *out = NULL;
    hx_cuda_blas *b = calloc(1, sizeof *b);
    if (!b)
        return hx_err_set(err, HX_ENOMEM, "cublas: out of memory");
    b->gemv_max_rows = gemv_max_rows < 0                  ? 0
                       : gemv_max_rows > HX_GEMV_MAX_ROWS ? HX_GEMV_MAX_ROWS
                                                          : gemv_max_rows;
    init();
    lock();
    const int usable = unusable() == NULL;
    unlock();
    if (!usable) {
        free(b);
        return hx_err_set(err, HX_EIO, "cublas: %s: %s (%d)", "cublasCreate", "not initialized",
                          1);
    }
    hx_status st = hx_cuda_malloc(&b->workspace, HX_BLAS_WORKSPACE_BYTES, err);
    if (st != HX_OK) {
        hx_cuda_blas_free(b);
        return st;
    }
    *out = b;
    return HX_OK;
}

void hx_cuda_blas_free(hx_cuda_blas *b)
{
    if (!b)
        return;
    hx_cuda_free(b->workspace);
    free(b);
}

/*
 * y = x W^T (+ beta y): the GEMV kernel's or cuBLAS's, the same maths (fp32
 * sums of bf16 products; a bf16 y rounded once, after beta y is added).
 */
typedef struct gemm_args {
    void *y;
    const hx_bf16 *x, *w;
    int y_bf16, rows, in, out;
    float beta;
    int gemv; /* the GEMV kernel: 16-byte loads of x and w */
} gemm_args;

static void run_gemm(const void *p)
{
    const gemm_args *a = p;
    const size_t rows = (size_t)a->rows, in = (size_t)a->in, out = (size_t)a->out;
    if (!emu_need(a->x, rows * in * 2, "d_x") || !emu_need(a->w, out * in * 2, "d_w") ||
        !emu_need(a->y, rows * out * (a->y_bf16 ? 2 : 4), "d_y") ||
        !emu_align(a->y, a->y_bf16 ? 2 : 4, "d_y"))
        return;
    if (a->gemv && (!emu_align(a->x, 16, "d_x") || !emu_align(a->w, 16, "d_w")))
        return;
    float *xf = kalloc(rows * in * 4), *wf = kalloc(in * 4);
    if (xf && wf) {
        widen(xf, a->x, rows * in);
        for (size_t o = 0; o < out; o++) { /* W row by row, each once */
            widen(wf, a->w + o * in, in);
            for (size_t r = 0; r < rows; r++) {
                const float acc = dot(xf + r * in, wf, in);
                const size_t i = r * out + o;
                if (a->y_bf16) {
                    hx_bf16 *yb = a->y;
                    yb[i] = f2bf(acc + (a->beta != 0.0f ? a->beta * bf2f(yb[i]) : 0.0f));
                } else {
                    float *yf = a->y;
                    yf[i] = acc + (a->beta != 0.0f ? a->beta * yf[i] : 0.0f);
                }
            }
        }
    }
    free(xf);
    free(wf);
}

hx_status hx_cuda_gemm(hx_cuda_blas *b, void *d_y, int y_bf16, const hx_bf16 *d_x,
                       const hx_bf16 *d_w, int rows, int in, int out, float beta,
                       hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, out, err);
    if (st != HX_OK)
        return st;
    gemm_args a = {d_y, d_x, d_w, y_bf16 != 0, rows, in, out, beta,
                   hx_cuda_use_gemv(b->gemv_max_rows, rows, in, out)};
    if (a.gemv)
        return emu_launch(stream, run_gemm, &a, sizeof a, "gemv", err);
    return launch(stream, run_gemm, &a, sizeof a, "cublasGemmEx", 1, err);
}

hx_status hx_cuda_gemm_swiglu(hx_cuda_blas *b, float *d_y, const hx_bf16 *d_gate_up,
                              const hx_bf16 *d_w, hx_bf16 *d_act, int rows, int ff, int out,
                              hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, ff, out, err);
    if (st == HX_OK)
        st = hx_cuda_swiglu(d_act, d_gate_up, rows, ff, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_y, 0, d_act, d_w, rows, ff, out, 0.0f, stream, err);
    return st;
}

/*
 * gemv_norm_kernel: each row normalised into bf16 (as add_rmsnorm_kernel
 * without a delta), then the GEMV against all n_w weight rows: fp32 outputs
 * ([rows][n_w]), or with swiglu bf16(silu(bf16(gate)) * bf16(up)) of weight
 * rows o and ff + o ([rows][ff], ff = n_w / 2). x is only read.
 */
typedef struct gemvn_args {
    void *y;
    const float *x, *nw;
    const hx_bf16 *w;
    float eps;
    int rows, in, n_w, swiglu;
} gemvn_args;

static void run_gemv_norm(const void *p)
{
    const gemvn_args *a = p;
    const size_t rows = (size_t)a->rows, in = (size_t)a->in, n_w = (size_t)a->n_w;
    const size_t ny = a->swiglu ? rows * (n_w / 2) * 2 : rows * n_w * 4;
    if (!emu_need(a->x, rows * in * 4, "d_x") || !emu_need(a->nw, in * 4, "d_norm_w") ||
        !emu_need(a->w, n_w * in * 2, "d_w") || !emu_align(a->w, 16, "d_w") ||
        !emu_need(a->y, ny, a->swiglu ? "d_act" : "d_y"))
        return;
    float *h = kalloc(rows * in * 4), *wf = kalloc(in * 4), *acc = kalloc(rows * n_w * 4);
    if (h && wf && acc) {
        for (size_t r = 0; r < rows; r++) {
            const float *xr = a->x + r * in;
            const float scale = rms_scale(xr, a->in, a->eps);
            for (size_t i = 0; i < in; i++)
                h[r * in + i] = bf(xr[i] * scale * a->nw[i]);
        }
        for (size_t o = 0; o < n_w; o++) {
            widen(wf, a->w + o * in, in);
            for (size_t r = 0; r < rows; r++)
                acc[r * n_w + o] = dot(h + r * in, wf, in);
        }
        for (size_t r = 0; r < rows; r++) {
            if (a->swiglu) {
                const size_t ff = n_w / 2;
                for (size_t o = 0; o < ff; o++) {
                    const float g = bf(acc[r * n_w + o]), u = bf(acc[r * n_w + ff + o]);
                    ((hx_bf16 *)a->y)[r * ff + o] = f2bf(g / (1.0f + expf(-g)) * u);
                }
            } else {
                memcpy((float *)a->y + r * n_w, acc + r * n_w, n_w * 4);
            }
        }
    }
    free(h);
    free(wf);
    free(acc);
}

hx_status hx_cuda_gemm_rmsnorm(hx_cuda_blas *b, float *d_y, float *d_x, const float *d_norm_w,
                               float eps, hx_bf16 *d_h, const hx_bf16 *d_w, int rows, int in,
                               int out, hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, out, err);
    if (st != HX_OK)
        return st;
    if (hx_cuda_use_gemv_norm(b->gemv_max_rows, rows, in, out, 1)) { /* one kernel; d_h untouched */
        gemvn_args a = {d_y, d_x, d_norm_w, d_w, eps, rows, in, out, 0};
        return emu_launch(stream, run_gemv_norm, &a, sizeof a, "gemv_rmsnorm", err);
    }
    st = hx_cuda_add_rmsnorm(d_x, NULL, d_norm_w, d_h, NULL, rows, in, eps, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_y, 0, d_h, d_w, rows, in, out, 0.0f, stream, err);
    return st;
}

hx_status hx_cuda_gemm_rmsnorm_swiglu(hx_cuda_blas *b, hx_bf16 *d_act, hx_bf16 *d_gu, float *d_x,
                                      const float *d_norm_w, float eps, hx_bf16 *d_h,
                                      const hx_bf16 *d_w, int rows, int in, int ff,
                                      hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_gemm_check(rows, in, ff, err);
    if (st != HX_OK)
        return st;
    /* one kernel; d_h and d_gu untouched */
    if (hx_cuda_use_gemv_norm(b->gemv_max_rows, rows, in, 2 * ff, 2)) {
        gemvn_args a = {d_act, d_x, d_norm_w, d_w, eps, rows, in, 2 * ff, 1};
        return emu_launch(stream, run_gemv_norm, &a, sizeof a, "gemv_rmsnorm_swiglu", err);
    }
    st = hx_cuda_add_rmsnorm(d_x, NULL, d_norm_w, d_h, NULL, rows, in, eps, stream, err);
    if (st == HX_OK)
        st = hx_cuda_gemm(b, d_gu, 1, d_h, d_w, rows, in, 2 * ff, 0.0f, stream, err);
    if (st == HX_OK)
        st = hx_cuda_swiglu(d_act, d_gu, rows, ff, stream, err);
    return st;
}

/*
 * The fused kernel's outputs are, by construction, the two calls' (its sums
 * are the GEMV's, its RoPE rope_kv_kernel's expressions): here the two calls,
 * whatever hx_cuda_set_fused_rope says, which also write d_qkv (the GPU's
 * fused kernel leaves it alone).
 */
void hx_cuda_set_fused_rope(int on)
{
    (void)on;
}

hx_status hx_cuda_gemm_rmsnorm_rope_kv(hx_cuda_blas *b, hx_bf16 *d_q, hx_bf16 *d_cache,
                                       float *d_qkv, float *d_x, const float *d_norm_w, float eps,
                                       hx_bf16 *d_h, const hx_bf16 *d_w, int rows, int in,
                                       int heads, const hx_cuda_kv_layout *kv, int layer,
                                       const int *d_pos, const int *d_slot, const float *d_cos,
                                       const float *d_sin, hx_cuda_stream *stream, hx_err *err)
{
    const int out = (heads + 2 * kv->kv_heads) * kv->head_dim;
    hx_status st = hx_cuda_qkv_rope_check(rows, in, heads, kv, layer, err);
    if (st == HX_OK)
        st = hx_cuda_gemm_rmsnorm(b, d_qkv, d_x, d_norm_w, eps, d_h, d_w, rows, in, out, stream,
                                  err);
    if (st == HX_OK)
        st = hx_cuda_rope_kv(d_q, d_cache, d_qkv, d_pos, d_slot, d_cos, d_sin, rows, heads, kv,
                             layer, stream, err);
    return st;
}

/* ---- layer kernels --------------------------------------------------------------------------- */

typedef struct embed_args {
    float *x;
    const hx_bf16 *table;
    const int *tokens;
    int rows, hidden, vocab;
} embed_args;

static void run_embed(const void *p)
{
    const embed_args *a = p;
    const size_t hidden = (size_t)a->hidden;
    kbuf tab = kb(a->table, "d_table");
    if (!emu_need(a->tokens, (size_t)a->rows * 4, "d_tokens") ||
        !emu_need(a->x, (size_t)a->rows * hidden * 4, "d_x"))
        return;
    for (int r = 0; r < a->rows; r++) {
        int t = a->tokens[r];
        /* the host validates; never read outside */
        t = t < 0 ? 0 : (t >= a->vocab ? a->vocab - 1 : t);
        const hx_bf16 *src = a->table + (size_t)t * hidden;
        if (!has(&tab, (uintptr_t)src, hidden * 2))
            return;
        widen(a->x + (size_t)r * hidden, src, hidden);
    }
}

hx_status hx_cuda_embed(float *d_x, const hx_bf16 *d_table, const int *d_tokens, int rows,
                        int hidden, int vocab, hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || hidden < 1 || vocab < 1)
        return hx_err_set(err, HX_EINVAL, "cuda embed: bad sizes");
    embed_args a = {d_x, d_table, d_tokens, rows, hidden, vocab};
    return emu_launch(stream, run_embed, &a, sizeof a, "embed", err);
}

typedef struct add_args {
    float *x;
    const float *y;
    int64_t n;
} add_args;

static void run_add(const void *p)
{
    const add_args *a = p;
    const size_t n = (size_t)a->n;
    if (!emu_need(a->x, n * 4, "d_x") || !emu_need(a->y, n * 4, "d_y"))
        return;
    for (size_t i = 0; i < n; i++)
        a->x[i] += a->y[i];
}

hx_status hx_cuda_add(float *d_x, const float *d_y, int64_t n, hx_cuda_stream *stream,
                      hx_err *err)
{
    if (n < 0)
        return hx_err_set(err, HX_EINVAL, "cuda add: count %lld", (long long)n);
    if (n == 0)
        return HX_OK;
    add_args a = {d_x, d_y, n};
    return emu_launch(stream, run_add, &a, sizeof a, "add", err);
}

typedef struct norm_args {
    float *x;
    const float *delta, *w;
    hx_bf16 *out;
    const int *index;
    int rows, dim;
    float eps;
} norm_args;

static void run_add_rmsnorm(const void *p)
{
    const norm_args *a = p;
    const size_t dim = (size_t)a->dim;
    kbuf xb = kb(a->x, "d_x"), db = kb(a->delta, "d_delta");
    if (!emu_need(a->w, dim * 4, "d_w") || !emu_need(a->out, (size_t)a->rows * dim * 2, "d_out") ||
        (a->index && !emu_need(a->index, (size_t)a->rows * 4, "d_index")))
        return;
    float *v = kalloc(dim * 4);
    for (int r = 0; v && r < a->rows; r++) {
        const int s = a->index ? a->index[r] : r;
        float *xr = (float *)((uintptr_t)a->x + (size_t)s * dim * 4);
        const float *dr = a->delta ? (const float *)((uintptr_t)a->delta + (size_t)s * dim * 4)
                                   : NULL;
        if (!has(&xb, (uintptr_t)xr, dim * 4) || (dr && !has(&db, (uintptr_t)dr, dim * 4)))
            break;
        for (size_t i = 0; i < dim; i++) {
            v[i] = xr[i];
            if (dr) {
                v[i] += dr[i];
                if (!a->index)
                    xr[i] = v[i];
            }
        }
        const float scale = rms_scale(v, a->dim, a->eps);
        hx_bf16 *o = a->out + (size_t)r * dim;
        for (size_t i = 0; i < dim; i++)
            o[i] = f2bf(v[i] * scale * a->w[i]);
    }
    free(v);
}

hx_status hx_cuda_add_rmsnorm(float *d_x, const float *d_delta, const float *d_w, hx_bf16 *d_out,
                              const int *d_index, int rows, int dim, float eps,
                              hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || dim < 1)
        return hx_err_set(err, HX_EINVAL, "cuda add_rmsnorm: bad sizes");
    norm_args a = {d_x, d_delta, d_w, d_out, d_index, rows, dim, eps};
    return emu_launch(stream, run_add_rmsnorm, &a, sizeof a, "add_rmsnorm", err);
}

typedef struct rope_args {
    hx_bf16 *q, *cache;
    const float *qkv;
    const int *pos, *slot;
    const float *cos_t, *sin_t;
    int rows, heads;
    hx_cuda_kv_layout kv;
    int layer;
} rope_args;

/* hx_rope_pair (common.cuh): one product rounded, then a fused multiply-add */
static inline float rope_x(float a, float b, float c, float s)
{
    const float bs = b * s;
    return fmaf(a, c, -bs);
}

static inline float rope_y(float a, float b, float c, float s)
{
    const float as = a * s;
    return fmaf(b, c, as);
}

static void run_rope_kv(const void *p)
{
    const rope_args *a = p;
    const hx_cuda_kv_layout *kv = &a->kv;
    const int D = kv->head_dim, half = D / 2, heads = a->heads, K = kv->kv_heads;
    const size_t row_n = (size_t)(heads + 2 * K) * D;
    kbuf cb = kb(a->cos_t, "d_cos"), sb = kb(a->sin_t, "d_sin"), kvb = kb(a->cache, "d_cache");
    if (!emu_need(a->pos, (size_t)a->rows * 4, "d_pos") ||
        !emu_need(a->slot, (size_t)a->rows * 4, "d_slot") ||
        !emu_need(a->qkv, (size_t)a->rows * row_n * 4, "d_qkv") ||
        !emu_need(a->q, (size_t)a->rows * heads * D * 2, "d_q"))
        return;
    if (kv->block_tokens < 1) {
        fault(E_ILLEGAL, "a KV layout of %d tokens a block", kv->block_tokens);
        return;
    }
    for (int r = 0; r < a->rows; r++) {
        const int pp = a->pos[r], sl = a->slot[r];
        const int block = sl / kv->block_tokens, off = sl % kv->block_tokens;
        const float *src = a->qkv + (size_t)r * row_n;
        const uintptr_t ca = (uintptr_t)a->cos_t + (size_t)pp * half * 4;
        const uintptr_t sa = (uintptr_t)a->sin_t + (size_t)pp * half * 4;
        if (!has(&cb, ca, (size_t)half * 4) || !has(&sb, sa, (size_t)half * 4))
            return;
        const float *c = (const float *)ca, *sn = (const float *)sa;
        hx_bf16 *qo = a->q + (size_t)r * heads * D;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++) {
                const float x0 = src[h * D + i], x1 = src[h * D + i + half];
                qo[h * D + i] = f2bf(rope_x(x0, x1, c[i], sn[i]));
                qo[h * D + i + half] = f2bf(rope_y(x0, x1, c[i], sn[i]));
            }
        const float *ks = src + (size_t)heads * D, *vs = ks + (size_t)K * D;
        for (int h = 0; h < K; h++) {
            const uintptr_t kd = (uintptr_t)a->cache +
                                 (kv_offset(kv, block, a->layer, 0, h) + (size_t)off * D) * 2;
            const uintptr_t vd = (uintptr_t)a->cache +
                                 (kv_offset(kv, block, a->layer, 1, h) + (size_t)off * D) * 2;
            if (!has(&kvb, kd, (size_t)D * 2) || !has(&kvb, vd, (size_t)D * 2))
                return;
            hx_bf16 *kp = (hx_bf16 *)kd, *vp = (hx_bf16 *)vd;
            for (int i = 0; i < half; i++) {
                const float x0 = ks[h * D + i], x1 = ks[h * D + i + half];
                kp[i] = f2bf(rope_x(x0, x1, c[i], sn[i]));
                kp[i + half] = f2bf(rope_y(x0, x1, c[i], sn[i]));
            }
            for (int i = 0; i < D; i++)
                vp[i] = f2bf(vs[h * D + i]);
        }
    }
}

hx_status hx_cuda_rope_kv(hx_bf16 *d_q, hx_bf16 *d_cache, const float *d_qkv, const int *d_pos,
                          const int *d_slot, const float *d_cos, const float *d_sin, int rows,
                          int heads, const hx_cuda_kv_layout *kv, int layer,
                          hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_rope_check(rows, heads, kv, layer, err);
    if (st != HX_OK)
        return st;
    rope_args a = {d_q, d_cache, d_qkv, d_pos, d_slot, d_cos, d_sin, rows, heads, *kv, layer};
    return emu_launch(stream, run_rope_kv, &a, sizeof a, "rope_kv", err);
}

typedef struct swiglu_args {
    hx_bf16 *out;
    const hx_bf16 *gu;
    int rows, ff;
} swiglu_args;

static void run_swiglu(const void *p)
{
    const swiglu_args *a = p;
    const size_t rows = (size_t)a->rows, ff = (size_t)a->ff;
    if (!emu_need(a->gu, rows * 2 * ff * 2, "d_gate_up") ||
        !emu_need(a->out, rows * ff * 2, "d_out"))
        return;
    if (ff % 8 == 0 && (!emu_align(a->gu, 16, "d_gate_up") || !emu_align(a->out, 16, "d_out")))
        return; /* swiglu8_kernel */
    for (size_t r = 0; r < rows; r++) {
        const hx_bf16 *g = a->gu + r * 2 * ff, *u = g + ff;
        for (size_t i = 0; i < ff; i++) {
            const float gv = bf2f(g[i]);
            a->out[r * ff + i] = f2bf(gv / (1.0f + expf(-gv)) * bf2f(u[i]));
        }
    }
}

hx_status hx_cuda_swiglu(hx_bf16 *d_out, const hx_bf16 *d_gate_up, int rows, int ff,
                         hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || ff < 1 || rows > 65535)
        return hx_err_set(err, HX_EINVAL, "cuda swiglu: bad sizes");
    swiglu_args a = {d_out, d_gate_up, rows, ff};
    return emu_launch(stream, run_swiglu, &a, sizeof a, "swiglu", err);
}

/* ---- attention ------------------------------------------------------------------------------- */

/*
 * Rows of a sequence's K and V of one layer and KV head, through its block
 * table: K (or V with which 1) of position j at the returned address, after
 * checking the table entry and the row; 0 on a fault.
 */
static uintptr_t kv_row(const hx_cuda_kv_layout *kv, kbuf *cache, kbuf *tables, uintptr_t bt_row,
                        int layer, int which, int head, int j)
{
    if (kv->block_tokens < 1) {
        fault(E_ILLEGAL, "a KV layout of %d tokens a block", kv->block_tokens);
        return 0;
    }
    const uintptr_t e = bt_row + (size_t)(j / kv->block_tokens) * 4;
    if (!has(tables, e, 4))
        return 0;
    const int block = *(const int *)e;
    const uintptr_t r = (uintptr_t)cache->p +
                        (kv_offset(kv, block, layer, which, head) +
                         (size_t)(j % kv->block_tokens) * kv->head_dim) * 2;
    return has(cache, r, (size_t)kv->head_dim * 2) ? r : 0;
}

#define PF_BQ 64
#define PF_BK 64

typedef struct prefill_args {
    hx_bf16 *out;
    const hx_bf16 *q, *cache;
    hx_cuda_kv_layout kv;
    int layer;
    const int *bt, *slot, *row0, *pos0, *n;
    int n_seqs, max_n, heads;
    int mma; /* an mma.sync kernel (32-bit stores of the output) */
} prefill_args;

/*
 * Both prefill kernels' maths, a query row at a time: scores as fp32 sums of
 * bf16 products, scaled by log2(e) / sqrt(D); per 64-key tile the online
 * softmax (running max m, alpha = 2^(m_old - m_new)), the probabilities
 * rounded to bf16 and summed as rounded; O = alpha O + P V in fp32; out =
 * bf16(O / l). Query tiles past ceil(max_n / 64) are not computed, as the
 * grid has none.
 */
static void run_prefill(const void *p)
{
    const prefill_args *a = p;
    const hx_cuda_kv_layout *kv = &a->kv;
    const int D = kv->head_dim, K = kv->kv_heads, G = a->heads / K;
    const size_t qstride = (size_t)a->heads * D;
    const float scale_log2 = LOG2E / sqrtf((float)D);
    const int n_qt = (a->max_n + PF_BQ - 1) / PF_BQ;
    kbuf qb = kb(a->q, "d_q"), ob = kb(a->out, "d_out"), cb = kb(a->cache, "d_cache"),
         tb = kb(a->bt, "d_block_tables");
    if (!emu_need(a->n, (size_t)a->n_seqs * 4, "d_n") || !emu_align(a->q, 16, "d_q") ||
        !emu_align(a->cache, 16, "d_cache") || !emu_align(a->out, a->mma ? 4 : 2, "d_out"))
        return;
    float qf[128], o[128], sc[PF_BK], pr[PF_BK];
    for (int s = 0; s < a->n_seqs; s++) {
        const int n = a->n[s];
        if (n <= 0)
            continue;
        if (!emu_need(a->slot + s, 4, "d_slot") || !emu_need(a->row0 + s, 4, "d_row0") ||
            !emu_need(a->pos0 + s, 4, "d_pos0"))
            return;
        const int slot = a->slot[s], row0 = a->row0[s], pos0 = a->pos0[s];
        const uintptr_t bt_row = (uintptr_t)a->bt + (size_t)slot * kv->max_blocks_per_seq * 4;
        for (int qt = 0; qt < n_qt; qt++) {
            const int q_begin = qt * PF_BQ;
            if (q_begin >= n)
                break;
            const int q_rows = n - q_begin < PF_BQ ? n - q_begin : PF_BQ;
            const int n_keys = pos0 + q_begin + q_rows;
            const size_t nk = n_keys > 0 ? (size_t)n_keys : 0;
            if (nk > 0 && kv->block_tokens > 0 && /* the table's first and last entries */
                (!has(&tb, bt_row, 4) ||
                 !has(&tb, bt_row + (nk - 1) / (size_t)kv->block_tokens * 4, 4)))
                return;
            for (int kvh = 0; kvh < K; kvh++) {
                /* the tiles' K and V rows, widened: [n_keys][D] each */
                float *kf = kalloc(nk * D * 4), *vf = kalloc(nk * D * 4);
                int ok = kf && vf;
                for (size_t j = 0; ok && j < nk; j++) {
                    const uintptr_t kr = kv_row(kv, &cb, &tb, bt_row, a->layer, 0, kvh, (int)j);
                    const uintptr_t vr = kr ? kv_row(kv, &cb, &tb, bt_row, a->layer, 1, kvh, (int)j)
                                            : 0;
                    if (!vr)
                        ok = 0;
                    else {
                        widen(kf + j * D, (const hx_bf16 *)kr, (size_t)D);
                        widen(vf + j * D, (const hx_bf16 *)vr, (size_t)D);
                    }
                }
                for (int h = kvh * G; ok && h < (kvh + 1) * G; h++)
                    for (int r = 0; ok && r < q_rows; r++) {
                        const size_t row = (size_t)(row0 + q_begin + r);
                        const size_t at = (row * qstride + (size_t)h * D) * 2;
                        const uintptr_t qa = (uintptr_t)a->q + at, oa = (uintptr_t)a->out + at;
                        if (!has(&qb, qa, (size_t)D * 2) || !has(&ob, oa, (size_t)D * 2)) {
                            ok = 0;
                            break;
                        }
                        widen(qf, (const hx_bf16 *)qa, (size_t)D);
                        const int qpos = pos0 + q_begin + r;
                        /* a warp's 16 rows take the tiles that any of them sees */
                        const int w_last = r / 16 * 16 + 15 < q_rows - 1 ? r / 16 * 16 + 15
                                                                          : q_rows - 1;
                        const int k_last = pos0 + q_begin + w_last;
                        float m = -INFINITY, l = 0.0f;
                        for (int d = 0; d < D; d++)
                            o[d] = 0.0f;
                        for (int k0 = 0; k0 < n_keys && k0 <= k_last; k0 += PF_BK) {
                            float mx = -INFINITY;
                            for (int c = 0; c < PF_BK; c++) {
                                const int j = k0 + c;
                                float v = -INFINITY;
                                if (j <= qpos && j < n_keys)
                                    v = dot(qf, kf + (size_t)j * D, (size_t)D) * scale_log2;
                                sc[c] = v;
                                mx = fmaxf(mx, v);
                            }
                            const float m_new = fmaxf(m, mx);
                            const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
                            float sum = 0.0f;
                            for (int c = 0; c < PF_BK; c++) {
                                pr[c] = m_new == -INFINITY || sc[c] == -INFINITY
                                            ? 0.0f
                                            : bf(exp2f(sc[c] - m_new));
                                sum += pr[c];
                            }
                            l = l * alpha + sum;
                            for (int d = 0; d < D; d++)
                                o[d] *= alpha;
                            for (int c = 0; c < PF_BK && k0 + c < n_keys; c++) {
                                /* 0 * V too (tensor cores): NaN or inf there shows */
                                const float *vr = vf + (size_t)(k0 + c) * D;
                                for (int d = 0; d < D; d++)
                                    o[d] += pr[c] * vr[d];
                            }
                            m = m_new;
                        }
                        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                        hx_bf16 *out = (hx_bf16 *)oa;
                        for (int d = 0; d < D; d++)
                            out[d] = f2bf(o[d] * inv);
                    }
                free(kf);
                free(vf);
                if (!ok)
                    return;
            }
        }
    }
}

/* 1: WMMA, 2: mma.sync, 3: pipelined mma.sync (whose maths are 2's) */
static int prefill_variant_now(void)
{
    if (atomic_load(&prefill_variant) < 0) {
        const char *env = getenv("HX_CUDA_PREFILL_ATTN");
        hx_cuda_set_prefill_attention_variant(env ? atoi(env) : 2);
    }
    return atomic_load(&prefill_variant);
}

void hx_cuda_set_prefill_attention_variant(int v)
{
    atomic_store(&prefill_variant, v == 1 || v == 3 ? v : 2);
}

hx_status hx_cuda_prefill_attention(hx_bf16 *d_out, const hx_bf16 *d_q, const hx_bf16 *d_cache,
                                    const hx_cuda_kv_layout *kv, int layer,
                                    const int *d_block_tables, const int *d_slot,
                                    const int *d_row0, const int *d_pos0, const int *d_n,
                                    int n_seqs, int max_n, int heads, hx_cuda_stream *stream,
                                    hx_err *err)
{
    hx_status st = hx_cuda_prefill_check(kv, layer, heads, n_seqs, max_n, err);
    if (st != HX_OK)
        return st;
    static const char *const name[4] = {"", "prefill_attention", "prefill_attention_mma",
                                        "prefill_attention_fa"};
    const int v = prefill_variant_now();
    prefill_args a = {d_out, d_q, d_cache, *kv, layer, d_block_tables, d_slot, d_row0, d_pos0,
                      d_n, n_seqs, max_n, heads, v != 1};
    return emu_launch(stream, run_prefill, &a, sizeof a, name[v], err);
}

#define DC_THREADS 128
#define DC_MAX_G 8
#define DC_CHUNK HX_CUDA_DECODE_CHUNK_MAX

size_t hx_cuda_decode_attention_workspace(int n_seqs, int heads, int head_dim, int max_parts)
{
    return (size_t)n_seqs * hx_cuda_decode_rec_floats(heads, head_dim, max_parts) * sizeof(float);
}

typedef struct decode_args {
    hx_bf16 *out;
    const hx_bf16 *q, *cache;
    hx_cuda_kv_layout kv;
    int layer;
    const int *bt, *slot, *row, *len;
    int n_seqs, parts, heads;
    float *work;
} decode_args;

/*
 * decode_attn_kernel block by block: block (p, g, s) takes chunk p of
 * sequence s for KV head g, writes its partial (max, sum, P V) into the
 * workspace and adds one to the counter of (s, g); the block that finds the
 * counter at np - 1 merges the partials there and puts the counter back to 0.
 * Blocks arrive in chunk order here (any order on a GPU), so a counter that
 * was not 0 merges at the wrong arrival (or never), as it would there.
 */
static void run_decode(const void *p)
{
    const decode_args *a = p;
    const hx_cuda_kv_layout *kv = &a->kv;
    const int D = kv->head_dim, K = kv->kv_heads, G = a->heads / K, parts = a->parts;
    const int TPK = D / 4, NG = DC_THREADS / TPK; /* P V: a thread per (4 dimensions, key group) */
    const float scale_log2 = LOG2E / sqrtf((float)D);
    const int min_chunk = a->n_seqs * K >= 256 ? DC_CHUNK : 32;
    const size_t rec = hx_cuda_decode_rec_floats(a->heads, D, parts);
    kbuf qb = kb(a->q, "d_q"), ob = kb(a->out, "d_out"), cb = kb(a->cache, "d_cache"),
         tb = kb(a->bt, "d_block_tables"), wb = kb(a->work, "d_part");
    if (!emu_need(a->len, (size_t)a->n_seqs * 4, "d_len") ||
        !emu_need(a->row, (size_t)a->n_seqs * 4, "d_row") || !emu_align(a->cache, 16, "d_cache"))
        return;
    static _Thread_local float qs[DC_MAX_G][128], sc[DC_MAX_G][DC_CHUNK], part[32][128];
    for (int s = 0; s < a->n_seqs; s++) {
        const int len = a->len[s], row = a->row[s];
        for (int g = 0; g < K; g++) {
            const uintptr_t orow =
                (uintptr_t)a->out + ((size_t)row * a->heads * D + (size_t)g * G * D) * 2;
            if (len <= 0) { /* nothing to attend: zeros (block 0) */
                if (!has(&ob, orow, (size_t)G * D * 2))
                    return;
                memset((void *)orow, 0, (size_t)G * D * 2);
                continue;
            }
            const int chunk = hx_cuda_decode_chunk(len, parts, min_chunk);
            const int np0 = (len + chunk - 1) / chunk, np = np0 < parts ? np0 : parts;
            if (!emu_need(a->slot + s, 4, "d_slot"))
                return;
            const uintptr_t bt_row =
                (uintptr_t)a->bt + (size_t)a->slot[s] * kv->max_blocks_per_seq * 4;
            const uintptr_t rec0 = (uintptr_t)a->work + (size_t)s * rec * 4;
            const uintptr_t counter = rec0 + (size_t)g * 4;
            const uintptr_t o_part = rec0 + (size_t)((a->heads + 3) & ~3) * 4;
            const uintptr_t ml_part = o_part + (size_t)a->heads * parts * D * 4;
            const uintptr_t qrow =
                (uintptr_t)a->q + ((size_t)row * a->heads * D + (size_t)g * G * D) * 2;
            if (!has(&qb, qrow, (size_t)G * D * 2))
                return;
            for (int gq = 0; gq < G; gq++)
                for (int d = 0; d < D; d++)
                    qs[gq][d] = bf2f(((const hx_bf16 *)qrow)[gq * D + d]) * scale_log2;
            for (int pp = 0; pp < np; pp++) {
                const int start = pp * chunk;
                const int nk = chunk < len - start ? chunk : len - start;
                /* scores: a thread per key */
                for (int jj = 0; jj < nk; jj++) {
                    const uintptr_t kr = kv_row(kv, &cb, &tb, bt_row, a->layer, 0, g, start + jj);
                    if (!kr)
                        return;
                    const hx_bf16 *k = (const hx_bf16 *)kr;
                    for (int gq = 0; gq < G; gq++) {
                        float acc = 0.0f;
                        for (int d = 0; d < D; d++)
                            acc = fmaf(bf2f(k[d]), qs[gq][d], acc);
                        sc[gq][jj] = acc;
                    }
                }
                /* per query head: max and exp, a warp's lanes over the keys */
                for (int gq = 0; gq < G; gq++) {
                    float mx = -INFINITY, lane[32] = {0};
                    for (int jj = 0; jj < nk; jj++)
                        mx = fmaxf(mx, sc[gq][jj]);
                    for (int jj = 0; jj < nk; jj++) {
                        sc[gq][jj] = exp2f(sc[gq][jj] - mx);
                        lane[jj % 32] += sc[gq][jj];
                    }
                    const float sum = warp_sum(lane);
                    const uintptr_t ml = ml_part + ((size_t)(g * G + gq) * parts + pp) * 8;
                    if (!has(&wb, ml, 8))
                        return;
                    ((float *)ml)[0] = mx;
                    ((float *)ml)[1] = sum;
                }
                /* P V: key group kg sums keys kg, kg + NG, ...; then the groups in order */
                for (int gq = 0; gq < G; gq++) {
                    for (int kg = 0; kg < NG; kg++)
                        for (int d = 0; d < D; d++)
                            part[kg][d] = 0.0f;
                    for (int jj = 0; jj < nk; jj++) {
                        const uintptr_t vr =
                            kv_row(kv, &cb, &tb, bt_row, a->layer, 1, g, start + jj);
                        if (!vr)
                            return;
                        const hx_bf16 *v = (const hx_bf16 *)vr;
                        float *acc = part[jj % NG];
                        for (int d = 0; d < D; d++)
                            acc[d] = fmaf(sc[gq][jj], bf2f(v[d]), acc[d]);
                    }
                    const uintptr_t op = o_part + ((size_t)(g * G + gq) * parts + pp) * D * 4;
                    if (!has(&wb, op, (size_t)D * 4))
                        return;
                    for (int d = 0; d < D; d++) {
                        float v = 0.0f;
                        for (int k = 0; k < NG; k++)
                            v += part[k][d];
                        ((float *)op)[d] = v;
                    }
                }
                /* arrival; the last merges */
                int c;
                if (!has(&wb, counter, 4))
                    return;
                memcpy(&c, (const void *)counter, 4);
                const int next = (int)((unsigned)c + 1u); /* atomicAdd wraps */
                memcpy((void *)counter, &next, 4);
                if (c != np - 1)
                    continue;
                if (!has(&ob, orow, (size_t)G * D * 2))
                    return;
                for (int gq = 0; gq < G; gq++) {
                    const size_t base = (size_t)(g * G + gq) * parts;
                    const float *ml = (const float *)(ml_part + base * 8);
                    const float *op = (const float *)(o_part + base * D * 4);
                    if (!has(&wb, (uintptr_t)ml, (size_t)np * 8) ||
                        !has(&wb, (uintptr_t)op, (size_t)np * D * 4))
                        return;
                    float M = -INFINITY;
                    for (int q = 0; q < np; q++)
                        M = fmaxf(M, ml[q * 2]);
                    for (int d = 0; d < D; d++) {
                        float L = 0.0f, acc = 0.0f;
                        for (int q = 0; q < np; q++) {
                            const float wgt = exp2f(ml[q * 2] - M);
                            L = fmaf(wgt, ml[q * 2 + 1], L);
                            acc = fmaf(wgt, op[(size_t)q * D + d], acc);
                        }
                        ((hx_bf16 *)orow)[gq * D + d] = f2bf(L > 0.0f ? acc / L : 0.0f);
                    }
                }
                const int zero = 0;
                memcpy((void *)counter, &zero, 4);
            }
        }
    }
}

hx_status hx_cuda_decode_attention(hx_bf16 *d_out, const hx_bf16 *d_q, const hx_bf16 *d_cache,
                                   const hx_cuda_kv_layout *kv, int layer,
                                   const int *d_block_tables, const int *d_slot,
                                   const int *d_row, const int *d_len, int n_seqs,
                                   int max_parts, int heads, float *d_part,
                                   hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_decode_check(kv, layer, heads, n_seqs, max_parts, err);
    if (st != HX_OK)
        return st;
    decode_args a = {d_out, d_q, d_cache, *kv, layer, d_block_tables, d_slot, d_row, d_len,
                     n_seqs, max_parts, heads, d_part};
    return emu_launch(stream, run_decode, &a, sizeof a, "decode_attention", err);
}

/* ---- the one-row decode step in one kernel --------------------------------------------------- */

/* decode1_kernel's L2 requests are hints: nothing to emulate. */
void hx_cuda_set_decode1_prefetch(int kib)
{
    (void)kib;
}

/* Device memory of the running kernel's device, for what the GPU kernel keeps in registers;
   NULL after a fault. heap_free returns it. */
static void *kernel_scratch(size_t bytes)
{
    const char *why = NULL;
    const int dev = tl_device;
    lock();
    tl_device = tl_run_device;
    void *p = heap_alloc(bytes, MEM_DEVICE, &why);
    tl_device = dev;
    unlock();
    if (!p)
        fault(E_OOM, "%zu bytes of device scratch memory", bytes);
    return p;
}

/*
 * decode1_kernel, layer by layer: the calls it fuses, at one row, with their
 * maths and rounding points (the embedding when asked; per layer the norm +
 * q/k/v GEMV, RoPE and the KV write, decode attention, the o GEMV into x, the
 * norm + gate/up GEMV + SwiGLU, the down GEMV into x; the final norm and the
 * LM head when asked). The GPU kernel sums in other orders and may split the
 * attention into other chunks: fp32 differences only.
 */
static void run_decode1(const void *p)
{
    const hx_cuda_decode1_args *a = p;
    const int D = a->kv.head_dim, hd = a->heads * D, n_qkv = (a->heads + 2 * a->kv.kv_heads) * D;
    if (!emu_need(a->d_layers, (size_t)a->n_layers * sizeof *a->d_layers, "d_layers"))
        return;
    /* the final norm's output (16-byte aligned, as the GEMV reads it), q/k/v, the row index 0 */
    const size_t hn_bytes = ((size_t)a->hidden * 2 + 15) & ~(size_t)15;
    hx_bf16 *hn = kernel_scratch(hn_bytes + (size_t)n_qkv * 4 + sizeof(int));
    if (!hn)
        return;
    float *qkv = (float *)((char *)hn + hn_bytes);
    int *row = (int *)(qkv + n_qkv);
    *row = 0;
    if (a->d_embed) {
        const embed_args ea = {a->d_x, a->d_embed, a->d_token, 1, a->hidden, a->vocab};
        run_embed(&ea);
    }
    for (int l = 0; l < a->n_layers && !sticky_set(); l++) {
        const hx_cuda_layer w = a->d_layers[l];
        const gemvn_args qa = {qkv, a->d_x, w.attn_norm, w.wqkv, a->eps, 1, a->hidden, n_qkv, 0};
        run_gemv_norm(&qa);
        const rope_args ra = {a->d_q,   a->d_cache, qkv,      a->d_pos, a->d_kv_slot, a->d_cos,
                              a->d_sin, 1,          a->heads, a->kv,    l};
        run_rope_kv(&ra);
        const decode_args da = {a->d_att, a->d_q,         a->d_cache, a->kv, l,
                                a->d_block_tables, a->d_seq, row,  a->d_len, 1,
                                a->max_parts, a->heads, a->d_part};
        run_decode(&da);
        const gemm_args oa = {a->d_x, a->d_att, w.wo, 0, 1, hd, a->hidden, 1.0f, 1};
        run_gemm(&oa);
        const gemvn_args ga = {a->d_act, a->d_x, w.ffn_norm, w.wgu, a->eps, 1, a->hidden,
                               2 * a->ff, 1};
        run_gemv_norm(&ga);
        const gemm_args fa = {a->d_x, a->d_act, w.wdown, 0, 1, a->ff, a->hidden, 1.0f, 1};
        run_gemm(&fa);
    }
    if (a->d_final_norm && !sticky_set()) {
        const norm_args na = {a->d_x, NULL, a->d_final_norm, hn, NULL, 1, a->hidden, a->eps};
        run_add_rmsnorm(&na);
        const gemm_args ha = {a->d_logits, hn, a->d_lm_head, 0, 1, a->hidden, a->vocab, 0.0f, 1};
        run_gemm(&ha);
    }
    heap_free(hn, MEM_DEVICE);
}

static atomic_int coop_capture_refused; /* emu_refuse_coop_capture */

void emu_refuse_coop_capture(int on)
{
    atomic_store(&coop_capture_refused, on != 0);
}

hx_status hx_cuda_decode1(const hx_cuda_decode1_args *a, hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_decode1_check(a, err);
    if (st != HX_OK)
        return st;
    if (atomic_load(&coop_capture_refused)) { /* a driver that cannot capture it */
        init();
        lock();
        hx_cuda_stream *cs = capture_of(stream);
        if (cs)
            cs->invalid = 1;
        unlock();
        if (cs)
            return cuda_fail(err, "decode1", E_CAPTURING);
    }
    return emu_launch(stream, run_decode1, a, sizeof *a, "decode1", err);
}

/* ---- sampling -------------------------------------------------------------------------------- */

#define SAMPLE_THREADS 1024

uint64_t hx_cuda_rng_init(uint64_t seed)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z ? z : 0x2545f4914f6cdd1dull;
}

/* block_excl_scan<float>: lanes' inclusive scan (shfl_up steps), warp totals before, minus v */
static void block_excl_scan(const float *v, float *out)
{
    static _Thread_local float incl[SAMPLE_THREADS];
    float warp_tot[32];
    for (int w = 0; w < 32; w++) {
        float *x = incl + 32 * w;
        memcpy(x, v + 32 * w, 32 * sizeof *x);
        for (int o = 1; o < 32; o <<= 1) {
            float old[32];
            memcpy(old, x, sizeof old);
            for (int l = o; l < 32; l++)
                x[l] = old[l] + old[l - o];
        }
        warp_tot[w] = x[31];
    }
    for (int t = 0; t < SAMPLE_THREADS; t++) {
        float before = 0.0f;
        for (int w = 0; w < t / 32; w++)
            before += warp_tot[w];
        out[t] = before + incl[t] - v[t];
    }
}

/* mass(b): the sum of the probabilities >= float(b), thread-strided, then hx_block_sum */
static float mass(const float *pr, int vocab, uint32_t b, float *tmp)
{
    const float t = f_of(b);
    memset(tmp, 0, SAMPLE_THREADS * sizeof *tmp);
    for (int i = 0; i < vocab; i++)
        if (pr[i] >= t)
            tmp[i % SAMPLE_THREADS] += pr[i];
    return block_sum(tmp, SAMPLE_THREADS);
}

static int count_eq(const float *pr, int vocab, float v)
{
    int c = 0;
    for (int i = 0; i < vocab; i++)
        c += pr[i] == v;
    return c;
}

/* The k-th (0-based) token in index order whose probability is v; vocab - 1 if fewer. */
static int kth_equal(const float *pr, int vocab, float v, int k)
{
    for (int i = 0; i < vocab; i++)
        if (pr[i] == v && k-- == 0)
            return i;
    return vocab - 1;
}

typedef struct sample_args {
    int *tokens;
    const float *logits;
    int rows, vocab;
    const float *temp, *top_p;
    const int *rng_slot;
    uint64_t *rng;
} sample_args;

/* sample_kernel for one row (a block of SAMPLE_THREADS threads). */
static int sample_row(const float *x, int vocab, float T, float tp, float r, float *pr, float *tmp)
{
    /* softmax(x / T) as hx_cpu_softmax: max of x / T, the sum of exp, times 1 / sum */
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++)
        mx = fmaxf(mx, x[i] / T);
    memset(tmp, 0, SAMPLE_THREADS * sizeof *tmp);
    for (int i = 0; i < vocab; i++)
        tmp[i % SAMPLE_THREADS] += expf(x[i] / T - mx);
    const float inv_sum = 1.0f / block_sum(tmp, SAMPLE_THREADS);
    for (int i = 0; i < vocab; i++)
        pr[i] = expf(x[i] / T - mx) * inv_sum;

    if (tp <= 0.0f || tp >= 1.0f) { /* the whole vocabulary in index order */
        const int per = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
        static _Thread_local float local[SAMPLE_THREADS], cdf0[SAMPLE_THREADS];
        for (int t = 0; t < SAMPLE_THREADS; t++) {
            const int b0 = t * per, b1 = vocab < b0 + per ? vocab : b0 + per;
            local[t] = 0.0f;
            for (int i = b0; i < b1; i++)
                local[t] += pr[i];
        }
        block_excl_scan(local, cdf0);
        for (int t = 0; t < SAMPLE_THREADS; t++) { /* the lowest thread's find is the minimum */
            const int b0 = t * per, b1 = vocab < b0 + per ? vocab : b0 + per;
            float cdf = cdf0[t];
            for (int i = b0; i < b1; i++) {
                cdf += pr[i];
                if (r < cdf)
                    return i;
            }
        }
        return vocab - 1;
    }

    /* top-p: the nucleus is the tokens with p > eq_v and the first eq_k with p == eq_v */
    const float cutoff = (1.0f - tp) / (float)(vocab > 1 ? vocab - 1 : 1);
    const uint32_t b_cut = bits_of(cutoff) ? bits_of(cutoff) : 1u;
    const uint32_t b_top = 0x3f800001u; /* just above 1.0: no probability reaches it */
    float eq_v, C;
    int eq_k;
    const float total = mass(pr, vocab, b_cut, tmp);
    if (!(total > tp)) { /* every candidate (p >= cutoff) is in */
        eq_v = f_of(b_cut);
        eq_k = INT_MAX;
        C = total;
    } else {
        uint32_t ok = b_cut, bad = b_top; /* mass(ok) > tp >= mass(bad) */
        while (bad - ok > 1) {
            const uint32_t mid = ok + (bad - ok) / 2;
            if (mass(pr, vocab, mid, tmp) > tp)
                ok = mid;
            else
                bad = mid;
        }
        eq_v = f_of(ok);
        const float gt = mass(pr, vocab, ok + 1, tmp);
        const int n_eq = count_eq(pr, vocab, eq_v);
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
    /* the drawn token's probability u: the largest value whose nucleus mass exceeds target */
    uint32_t ok = bits_of(eq_v), bad = b_top;
    while (bad - ok > 1) {
        const uint32_t mid = ok + (bad - ok) / 2;
        if (mass(pr, vocab, mid, tmp) > target)
            ok = mid;
        else
            bad = mid;
    }
    const float u = f_of(ok);
    const float base = mass(pr, vocab, ok + 1, tmp);
    int limit = count_eq(pr, vocab, u);
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
    return kth_equal(pr, vocab, u, m > 0 ? m - 1 : 0);
}

static void run_sample(const void *p)
{
    const sample_args *a = p;
    const size_t vocab = (size_t)a->vocab;
    if (!emu_need(a->logits, (size_t)a->rows * vocab * 4, "d_logits") ||
        !emu_need(a->tokens, (size_t)a->rows * 4, "d_tokens") ||
        (a->temp && !emu_need(a->temp, (size_t)a->rows * 4, "d_temp")))
        return;
    float *pr = NULL, *tmp = NULL;
    kbuf rb = kb(a->rng, "d_rng");
    for (int row = 0; row < a->rows; row++) {
        const float *x = a->logits + (size_t)row * vocab;
        const float T = a->temp ? a->temp[row] : 0.0f;
        if (!(T > 0.0f)) { /* greedy: the first index of the maximum (NaN never wins) */
            float bv = -INFINITY;
            int bi = INT_MAX;
            for (size_t i = 0; i < vocab; i++)
                if (x[i] > bv) {
                    bv = x[i];
                    bi = (int)i;
                }
            a->tokens[row] = bi == INT_MAX ? 0 : bi;
            continue;
        }
        /* the draw, exactly as hx_llama_sampler's next_uniform */
        if (!emu_need(a->rng_slot + row, 4, "d_rng_slot"))
            break;
        const uintptr_t ra = (uintptr_t)a->rng + (size_t)a->rng_slot[row] * 8;
        if (!has(&rb, ra, 8))
            break;
        uint64_t s;
        memcpy(&s, (const void *)ra, 8);
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        memcpy((void *)ra, &s, 8);
        const float r = (float)((s * 0x2545f4914f6cdd1dull) >> 40) * (1.0f / 16777216.0f);
        if (a->top_p && !emu_need(a->top_p + row, 4, "d_top_p"))
            break;
        const float tp = a->top_p ? a->top_p[row] : 1.0f;
        if (!pr) {
            pr = kalloc(vocab * 4);
            tmp = kalloc(SAMPLE_THREADS * 4);
            if (!pr || !tmp)
                break;
        }
        a->tokens[row] = sample_row(x, a->vocab, T, tp, r, pr, tmp);
    }
    free(pr);
    free(tmp);
}

hx_status hx_cuda_sample(int *d_tokens, const float *d_logits, int rows, int vocab,
                         const float *d_temp, const float *d_top_p, const int *d_rng_slot,
                         uint64_t *d_rng, hx_cuda_stream *stream, hx_err *err)
{
    if (rows < 1 || vocab < 1 || rows > 65535 || (d_temp && (!d_rng_slot || !d_rng)))
        return hx_err_set(err, HX_EINVAL, "cuda sample: bad arguments (rows %d, vocab %d)", rows,
                          vocab);
    sample_args a = {d_tokens, d_logits, rows, vocab, d_temp, d_top_p, d_rng_slot, d_rng};
    return emu_launch(stream, run_sample, &a, sizeof a, "sample", err);
}

/* ---- L2 prefetch ----------------------------------------------------------------------------- */

typedef struct prefetch_args {
    const void *d;
    size_t bytes;
} prefetch_args;

/* prefetch_l2_kernel: a hint with no effect here; its range must be device memory */
static void run_prefetch(const void *p)
{
    const prefetch_args *a = p;
    (void)emu_need(a->d, a->bytes, "d");
}

hx_status hx_cuda_prefetch_l2(const void *d, size_t bytes, hx_cuda_stream *stream, hx_err *err)
{
    /* whole 16-byte units inside [d, d + bytes), as the GPU's */
    const uintptr_t a = ((uintptr_t)d + 15) & ~(uintptr_t)15;
    const uintptr_t end = ((uintptr_t)d + bytes) & ~(uintptr_t)15;
    if (!d || end <= a)
        return HX_OK;
    prefetch_args args = {(const void *)a, (size_t)(end - a)};
    return emu_launch(stream, run_prefetch, &args, sizeof args, "prefetch_l2", err);
}

/* ---- KV segments ----------------------------------------------------------------------------- */

typedef struct kvseg_args {
    void *seg; /* fp32, or bf16 when seg_bf16 */
    int seg_bf16;
    hx_bf16 *cache;
    hx_cuda_kv_layout kv;
    const int *blocks;
    int layer_first, num_layers, head_first, num_heads, token_first, tokens;
    int pack;
} kvseg_args;

/* kv_seg_kernel: whole rows of head_dim values (16-byte loads and stores: 8 at a time) */
static void run_kv_seg(const void *p)
{
    const kvseg_args *a = p;
    const hx_cuda_kv_layout *kv = &a->kv;
    const int D = kv->head_dim;
    if (D / 8 == 0)
        return; /* no chunk of 8: the grid has no work */
    const size_t n_rows = (size_t)a->num_layers * 2 * a->num_heads * a->tokens;
    kbuf cb = kb(a->cache, "d_cache"), tb = kb(a->blocks, "d_blocks");
    const size_t eb = a->seg_bf16 ? 2 : 4;
    if (!emu_need(a->seg, n_rows * D * eb, "d_seg") || !emu_align(a->seg, 16, "d_seg") ||
        !emu_align(a->cache, 16, "d_cache"))
        return;
    for (int l = 0; l < a->num_layers; l++)
        for (int which = 0; which < 2; which++)
            for (int h = 0; h < a->num_heads; h++)
                for (int t = 0; t < a->tokens; t++) {
                    const int pos = a->token_first + t;
                    const uintptr_t cp = kv_row(kv, &cb, &tb, (uintptr_t)a->blocks,
                                                a->layer_first + l, which, a->head_first + h, pos);
                    if (!cp)
                        return;
                    const size_t at = ((((size_t)l * 2 + which) * a->num_heads + h) *
                                           a->tokens + t) * D;
                    hx_bf16 *c = (hx_bf16 *)cp;
                    if (a->seg_bf16) {
                        hx_bf16 *sp = (hx_bf16 *)a->seg + at;
                        if (a->pack)
                            memcpy(sp, c, (size_t)D * sizeof *c);
                        else
                            memcpy(c, sp, (size_t)D * sizeof *c);
                        continue;
                    }
                    float *sp = (float *)a->seg + at;
                    for (int d = 0; d < D; d++) {
                        if (a->pack)
                            sp[d] = bf2f(c[d]);
                        else
                            c[d] = f2bf(sp[d]);
                    }
                }
}

hx_status hx_cuda_kv_pack(void *d_seg, int seg_bf16, const hx_bf16 *d_cache,
                          const hx_cuda_kv_layout *kv, const int *d_blocks, int layer_first,
                          int num_layers, int head_first, int num_heads, int token_first,
                          int tokens, hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_kv_seg_check(kv, layer_first, num_layers, head_first, num_heads,
                                        token_first, tokens, err);
    if (st != HX_OK)
        return st;
    kvseg_args a = {d_seg,       seg_bf16,   (hx_bf16 *)(uintptr_t)d_cache, *kv, d_blocks,
                    layer_first, num_layers, head_first, num_heads, token_first, tokens, 1};
    return emu_launch(stream, run_kv_seg, &a, sizeof a, "kv_pack", err);
}

hx_status hx_cuda_kv_unpack(hx_bf16 *d_cache, const void *d_seg, int seg_bf16,
                            const hx_cuda_kv_layout *kv, const int *d_blocks, int layer_first,
                            int num_layers, int head_first, int num_heads, int token_first,
                            int tokens, hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = hx_cuda_kv_seg_check(kv, layer_first, num_layers, head_first, num_heads,
                                        token_first, tokens, err);
    if (st != HX_OK)
        return st;
    kvseg_args a = {(void *)(uintptr_t)d_seg, seg_bf16,   d_cache,    *kv,
                    d_blocks,                 layer_first, num_layers, head_first,
                    num_heads,                token_first, tokens,     0};
    return emu_launch(stream, run_kv_seg, &a, sizeof a, "kv_unpack", err);
}
