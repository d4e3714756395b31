// nccl.cu - NCCL behind C functions: all-reduce for tensor parallelism and
// send/recv for KV segments between groups. The ncclUniqueId travels as
// bytes that the caller carries over its own authenticated connection.
// Without NCCL (HX_HAVE_NCCL undefined) every call is HX_ENOTSUP.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.cuh"

#ifdef HX_HAVE_NCCL
#include <nccl.h>
#include <pthread.h>
#include <sched.h>

// 2.19 fixed aborting communicators from several threads; the non-blocking
// calls this file relies on (ncclCommInitRankConfig, ncclCommFinalize) came in 2.14.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 19, 0)
#error "hexflow needs NCCL 2.19 or later"
#endif

// NCCL does not promise that operations issued at the same time from several
// threads to different communicators of one device are safe (a decode worker
// receives KV on connection threads while its engine thread all-reduces):
// every NCCL call that queues or creates is made under this lock, held for
// the call only, never while waiting for completion. Aborts and destroys are
// not: they may wait for the GPU (a cudaFree inside them waits for another
// communicator's kernel), and an abort must be able to stop a communicator
// while another thread is inside NCCL. Recursive, as a failed call may be
// followed by another under it.
static pthread_mutex_t api_mu;
static pthread_once_t api_once = PTHREAD_ONCE_INIT;

static void api_init(void)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&api_mu, &a);
    pthread_mutexattr_destroy(&a);
}

static void api_lock(void)
{
    pthread_once(&api_once, api_init);
    pthread_mutex_lock(&api_mu);
}

static void api_unlock(void)
{
    pthread_mutex_unlock(&api_mu);
}

static_assert(sizeof(ncclUniqueId) == HX_CUDA_NCCL_ID_BYTES, "ncclUniqueId size");

// Every communicator is non-blocking (config.blocking = 0): no NCCL call
// waits on a peer, so a peer that dies cannot hang this process. A call that
// answers ncclInProgress has handed its work to NCCL's own threads; the
// communicator's state (ncclCommGetAsyncError) says when that is done, and
// no other NCCL call may use the communicator before it is (NCCL's rule).
// Work that NCCL has put on a stream is waited for by hx_cuda_nccl_wait.
// Any asynchronous error, or a deadline passing, aborts the communicator
// (ncclCommAbort also stops its kernels on the GPU); from then on every call
// on it fails at once with HX_ECONN.

// Bounds the wait for an operation to be handed to the stream (the first
// send/recv to a peer also connects to it there): generous, it only has
// to turn a hang into an error.
#define HX_NCCL_ENQUEUE_S 20.0
// hx_cuda_nccl_free: how long the work already queued may take to flush.
#define HX_NCCL_FINALIZE_S 10.0
// Communicators one thread may use inside one group (send/recv/all-reduce
// between hx_cuda_nccl_group_start and _end).
#define HX_NCCL_GROUP_MAX 16

struct hx_cuda_nccl {
    ncclComm_t comm; // NULL once aborted
    int rank, size;
    int aborted;     // 1 after ncclCommAbort: every later call is HX_ECONN
    char why[512];   // what made it abort
};

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void sleep_s(double s)
{
    struct timespec t;
    t.tv_sec = (time_t)s;
    t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    nanosleep(&t, NULL);
}

static hx_status nccl_code(ncclResult_t r)
{
    return r == ncclSystemError || r == ncclRemoteError                ? HX_ECONN
           : r == ncclInvalidArgument || r == ncclInvalidUsage ? HX_EINVAL
                                                                        : HX_EIO;
}

static hx_status nccl_err(ncclResult_t r, hx_err *err, const char *what)
{
    if (r == ncclSuccess)
        return HX_OK;
    return hx_err_set(err, nccl_code(r), "nccl: %s: %s", what, ncclGetErrorString(r));
}

// NCCL's own text of its last error, or "" when it has none. NCCL keeps
// one such text per process, never cleared: with several communicators it
// may be another one's (hence the wording).
static void last_error(char *out, size_t size)
{
    const char *m = ncclGetLastError(NULL);
    if (m && m[0])
        snprintf(out, size, " (NCCL's last message: %s)", m);
    else if (size)
        out[0] = '\0';
}

// Between two polls of something that is usually done within microseconds
// (an operation handed to its stream: a step makes two per layer), having
// waited `waited` seconds: yields the CPU for the first 200 us (a sleep
// would last at least the timer slack, 50 us), then sleeps 20 us until
// 10 ms, then 1 ms (a peer connecting, a slow join).
static void pause_after(double waited)
{
    if (waited < 200e-6)
        sched_yield();
    else
        sleep_s(waited < 10e-3 ? 20e-6 : 1e-3);
}

// Polls the communicator until its state is no longer ncclInProgress or
// `deadline` (now_s()) passes: returns that state (ncclInProgress on timeout).
static ncclResult_t poll_comm(ncclComm_t comm, double deadline)
{
    const double t0 = now_s();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(comm, &state);
        if (r != ncclSuccess)
            return r;
        const double t = now_s();
        if (state != ncclInProgress || t >= deadline)
            return state;
        pause_after(t - t0);
    }
}

// Aborts the communicator (once): its kernels stop, its resources go; the
// struct stays until hx_cuda_nccl_free and remembers why.
static void abort_comm(hx_cuda_nccl *c, const char *why)
{
    if (c->aborted)
        return;
    snprintf(c->why, sizeof c->why, "%s", why);
    if (c->comm)
        (void)ncclCommAbort(c->comm); // not under api_mu (see there)
    c->comm = NULL;
    c->aborted = 1;
}

static hx_status aborted_err(const hx_cuda_nccl *c, hx_err *err)
{
    return hx_err_set(err, HX_ECONN, "nccl: communicator aborted after %s; rank %d of %d", c->why,
                      c->rank, c->size);
}

// The communicator failed asynchronously (`state`, an error) or timed out
// (state ncclInProgress) during `what`: aborts it and says so.
static hx_status fail_comm(hx_cuda_nccl *c, ncclResult_t state, const char *what,
                           double timeout_s, hx_err *err)
{
    char why[480], detail[300];
    hx_status code;
    if (state == ncclInProgress) {
        snprintf(why, sizeof why, "%s did not finish within %.0f s (a peer may have died)", what,
                 timeout_s);
        code = HX_ETIMEDOUT;
    } else {
        last_error(detail, sizeof detail);
        snprintf(why, sizeof why, "%s failed: %s%s", what, ncclGetErrorString(state), detail);
        code = nccl_code(state);
    }
    abort_comm(c, why);
    return hx_err_set(err, code, "nccl: rank %d of %d: %s; communicator aborted", c->rank,
                      c->size, why);
}

// Per thread: the depth of hx_cuda_nccl_group_start calls and the
// communicators used inside the outermost group, polled by its group_end.
static thread_local int group_depth;
static thread_local int group_n;
static thread_local hx_cuda_nccl *group_comms[HX_NCCL_GROUP_MAX];

static hx_status group_add(hx_cuda_nccl *c, hx_err *err)
{
    for (int i = 0; i < group_n; i++)
        if (group_comms[i] == c)
            return HX_OK;
    if (group_n == HX_NCCL_GROUP_MAX)
        return hx_err_set(err, HX_EINVAL, "nccl: a group uses more than %d communicators",
                          HX_NCCL_GROUP_MAX);
    group_comms[group_n++] = c;
    return HX_OK;
}

// Before an operation on c: fails fast when it was aborted; inside a group,
// remembers it for group_end.
static hx_status op_begin(hx_cuda_nccl *c, hx_err *err)
{
    if (c->aborted)
        return aborted_err(c, err);
    return group_depth > 0 ? group_add(c, err) : HX_OK;
}

// After an operation on c answered r. Outside a group, NCCL may still be
// handing it to the stream, whether the call said ncclInProgress or (as
// single sends and receives on non-blocking communicators may)
// ncclSuccess: wait until the communicator's state leaves ncclInProgress
// (bounded); before that the stream may not hold the operation yet, and
// waiting for the stream would see nothing to wait for. Inside a group,
// group_end does this, and aborts: NCCL defers an abort inside a group, so
// an error here is only reported. Outside, an error that left the
// communicator broken (its state is an error) aborts it; one that did not
// (a bad argument) is just reported.
static hx_status op_end(hx_cuda_nccl *c, ncclResult_t r, const char *what, hx_err *err)
{
    if (r == ncclInProgress || r == ncclSuccess) {
        if (group_depth > 0)
            return HX_OK;
        ncclResult_t state = poll_comm(c->comm, now_s() + HX_NCCL_ENQUEUE_S);
        if (state == ncclSuccess)
            return HX_OK;
        char doing[64];
        snprintf(doing, sizeof doing, "queueing %s", what);
        return fail_comm(c, state, doing, HX_NCCL_ENQUEUE_S, err);
    }
    ncclResult_t state = ncclSuccess;
    if (group_depth == 0 && ncclCommGetAsyncError(c->comm, &state) == ncclSuccess &&
        state != ncclSuccess &&
        state != ncclInProgress)
        return fail_comm(c, state, what, 0, err);
    char detail[300];
    last_error(detail, sizeof detail);
    return hx_err_set(err, nccl_code(r), "nccl: rank %d of %d: %s: %s%s", c->rank, c->size, what,
                      ncclGetErrorString(r), detail);
}

// The library loaded at run time may be older than the headers.
static int runtime_version(void)
{
    int v = 0;
    return ncclGetVersion(&v) == ncclSuccess ? v : 0;
}

static hx_status old_nccl(hx_err *err)
{
    int v = runtime_version();
    return hx_err_set(err, HX_ENOTSUP, "nccl: the library loaded is %d.%d.%d; hexflow needs 2.19 "
                      "or later", v / 10000, v / 100 % 100, v % 100);
}

extern "C" int hx_cuda_nccl_available(void)
{
    return runtime_version() >= NCCL_VERSION(2, 19, 0);
}

extern "C" hx_status hx_cuda_nccl_unique_id(uint8_t id[HX_CUDA_NCCL_ID_BYTES], hx_err *err)
{
    if (!hx_cuda_nccl_available())
        return old_nccl(err);
    ncclUniqueId u;
    hx_status st = nccl_err(ncclGetUniqueId(&u), err, "ncclGetUniqueId");
    if (st == HX_OK)
        memcpy(id, &u, sizeof u);
    return st;
}

extern "C" hx_status hx_cuda_nccl_new(const uint8_t id[HX_CUDA_NCCL_ID_BYTES], int n_ranks,
                                      int rank, int device, double timeout_s, hx_cuda_nccl **out,
                                      hx_err *err)
{
    *out = NULL;
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d", rank, n_ranks);
    if (!(timeout_s > 0) || timeout_s > 1e9)
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: bad timeout %g s", rank, n_ranks,
                          timeout_s);
    if (!hx_cuda_nccl_available())
        return old_nccl(err);
    hx_status st = hx_cuda_set_device(device, err);
    if (st != HX_OK)
        return st;
    hx_cuda_nccl *c = (hx_cuda_nccl *)calloc(1, sizeof *c);
    if (!c)
        return hx_err_set(err, HX_ENOMEM, "nccl: out of memory");
    c->rank = rank;
    c->size = n_ranks;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    double deadline = now_s() + timeout_s;
    c->comm = NULL;
    api_lock();
    ncclResult_t r = ncclCommInitRankConfig(&c->comm, n_ranks, u, rank, &config);
    api_unlock();
    if (r == ncclSuccess || r == ncclInProgress)
        r = c->comm ? poll_comm(c->comm, deadline) : ncclInternalError;
    if (r == ncclSuccess) {
        *out = c;
        return HX_OK;
    }
    char detail[300];
    last_error(detail, sizeof detail);
    if (c->comm)
        (void)ncclCommAbort(c->comm); // not under api_mu (see there)
    free(c);
    if (r == ncclInProgress)
        return hx_err_set(err, HX_ETIMEDOUT,
                          "nccl: rank %d of %d: the other ranks did not join within %.0f s", rank,
                          n_ranks, timeout_s);
    return hx_err_set(err, nccl_code(r), "nccl: rank %d of %d: ncclCommInitRankConfig: %s%s", rank,
                      n_ranks, ncclGetErrorString(r), detail);
}

extern "C" void hx_cuda_nccl_free(hx_cuda_nccl *c)
{
    if (!c)
        return;
    if (!c->aborted && c->comm) {
        // Flush what is queued (non-blocking: polled, bounded), then free
        // locally; a communicator that does not quiesce in time is aborted.
        api_lock();
        ncclResult_t r = ncclCommFinalize(c->comm);
        api_unlock();
        if (r == ncclSuccess || r == ncclInProgress)
            r = poll_comm(c->comm, now_s() + HX_NCCL_FINALIZE_S);
        if (r == ncclSuccess) // neither under api_mu (see there)
            (void)ncclCommDestroy(c->comm);
        else
            (void)ncclCommAbort(c->comm);
    }
    for (int i = 0; i < group_n; i++) // a group left open by an error
        if (group_comms[i] == c)
            group_comms[i] = group_comms[--group_n];
    free(c);
}

extern "C" int hx_cuda_nccl_rank(const hx_cuda_nccl *c)
{
    return c->rank;
}

extern "C" int hx_cuda_nccl_size(const hx_cuda_nccl *c)
{
    return c->size;
}

extern "C" hx_status hx_cuda_nccl_allreduce(hx_cuda_nccl *c, void *d_buf, size_t count, int is_bf16,
                                            hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = op_begin(c, err);
    if (st != HX_OK)
        return st;
    api_lock();
    ncclResult_t r = ncclAllReduce(d_buf, d_buf, count, is_bf16 ? ncclBfloat16 : ncclFloat32,
                                   ncclSum, c->comm, HX_STREAM(stream));
    api_unlock();
    return op_end(c, r, "ncclAllReduce", err);
}

extern "C" hx_status hx_cuda_nccl_send(hx_cuda_nccl *c, const void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = op_begin(c, err);
    if (st != HX_OK)
        return st;
    api_lock();
    ncclResult_t r = ncclSend(d_buf, bytes, ncclUint8, peer, c->comm, HX_STREAM(stream));
    api_unlock();
    return op_end(c, r, "ncclSend", err);
}

extern "C" hx_status hx_cuda_nccl_recv(hx_cuda_nccl *c, void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    hx_status st = op_begin(c, err);
    if (st != HX_OK)
        return st;
    api_lock();
    ncclResult_t r = ncclRecv(d_buf, bytes, ncclUint8, peer, c->comm, HX_STREAM(stream));
    api_unlock();
    return op_end(c, r, "ncclRecv", err);
}

extern "C" hx_status hx_cuda_nccl_group_start(hx_err *err)
{
    api_lock();
    ncclResult_t r0 = ncclGroupStart();
    api_unlock();
    hx_status st = nccl_err(r0, err, "ncclGroupStart");
    if (st != HX_OK)
        return st;
    if (group_depth++ == 0)
        group_n = 0;
    return HX_OK;
}

extern "C" hx_status hx_cuda_nccl_group_end(hx_err *err)
{
    api_lock();
    ncclResult_t r = ncclGroupEnd();
    api_unlock();
    if (group_depth > 0)
        group_depth--;
    if (group_depth > 0) // an inner group: the outermost one launches
        return nccl_err(r == ncclInProgress ? ncclSuccess : r, err, "ncclGroupEnd");
    // The group's operations are being handed to their streams: wait for
    // every communicator it used (one shared deadline), aborting those that
    // failed or did not get there in time.
    int n = group_n;
    group_n = 0;
    double deadline = now_s() + HX_NCCL_ENQUEUE_S;
    hx_status first = HX_OK;
    for (int i = 0; i < n; i++) {
        hx_cuda_nccl *c = group_comms[i];
        if (c->aborted)
            continue;
        ncclResult_t state = poll_comm(c->comm, deadline);
        if (state != ncclSuccess) {
            hx_status st = fail_comm(c, state, "ncclGroupEnd", HX_NCCL_ENQUEUE_S,
                                     first == HX_OK ? err : NULL);
            if (first == HX_OK)
                first = st;
        }
    }
    if (first != HX_OK)
        return first;
    if (r != ncclSuccess && r != ncclInProgress) {
        char detail[300];
        last_error(detail, sizeof detail);
        return hx_err_set(err, nccl_code(r), "nccl: ncclGroupEnd: %s%s", ncclGetErrorString(r),
                          detail);
    }
    return HX_OK;
}

extern "C" hx_status hx_cuda_nccl_wait(hx_cuda_nccl *c, hx_cuda_stream *s, double timeout_s,
                                       hx_err *err)
{
    if (c->aborted)
        return aborted_err(c, err);
    if (!(timeout_s > 0))
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: bad timeout %g s", c->rank,
                          c->size, timeout_s);
    const double t0 = now_s(), deadline = t0 + timeout_s;
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(c->comm, &state);
        if (r != ncclSuccess)
            state = r;
        if (state != ncclSuccess && state != ncclInProgress)
            return fail_comm(c, state, "waiting for the stream", 0, err);
        // while NCCL still hands work to the stream, the stream may look done
        cudaError_t e = state == ncclInProgress ? cudaErrorNotReady : cudaStreamQuery(HX_STREAM(s));
        if (e == cudaSuccess)
            return HX_OK;
        if (e != cudaErrorNotReady)
            return hx_cuda_err(e, err, "cudaStreamQuery");
        const double t = now_s();
        if (t >= deadline)
            return fail_comm(c, ncclInProgress, "the work on the stream", timeout_s, err);
        pause_after(t - t0);
    }
}

#else // no NCCL in this build

struct hx_cuda_nccl {
    int rank, size;
};

static hx_status no_nccl(hx_err *err)
{
    return hx_err_set(err, HX_ENOTSUP, "nccl: this build has no NCCL");
}

extern "C" int hx_cuda_nccl_available(void)
{
    return 0;
}
extern "C" hx_status hx_cuda_nccl_unique_id(uint8_t id[HX_CUDA_NCCL_ID_BYTES], hx_err *err)
{
    memset(id, 0, HX_CUDA_NCCL_ID_BYTES);
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_new(const uint8_t id[HX_CUDA_NCCL_ID_BYTES], int n_ranks,
                                      int rank, int device, double timeout_s, hx_cuda_nccl **out,
                                      hx_err *err)
{
    *out = NULL;
    return no_nccl(err);
}
extern "C" void hx_cuda_nccl_free(hx_cuda_nccl *c)
{
    free(c);
}
extern "C" int hx_cuda_nccl_rank(const hx_cuda_nccl *c)
{
    return c->rank;
}
extern "C" int hx_cuda_nccl_size(const hx_cuda_nccl *c)
{
    return c->size;
}
extern "C" hx_status hx_cuda_nccl_allreduce(hx_cuda_nccl *c, void *d_buf, size_t count, int is_bf16,
                                            hx_cuda_stream *stream, hx_err *err)
{
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_send(hx_cuda_nccl *c, const void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_recv(hx_cuda_nccl *c, void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_group_start(hx_err *err)
{
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_group_end(hx_err *err)
{
    return no_nccl(err);
}
extern "C" hx_status hx_cuda_nccl_wait(hx_cuda_nccl *c, hx_cuda_stream *s, double timeout_s,
                                       hx_err *err)
{
    return no_nccl(err);
}

#endif
