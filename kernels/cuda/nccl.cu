// nccl.cu - NCCL behind C functions: all-reduce for tensor parallelism and
// send/recv for KV segments between groups. The ncclUniqueId travels as
// bytes that the caller carries over its own authenticated connection.
// Without NCCL (HX_HAVE_NCCL undefined) every call is HX_ENOTSUP.
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

#ifdef HX_HAVE_NCCL
#include <nccl.h>

static_assert(sizeof(ncclUniqueId) == HX_CUDA_NCCL_ID_BYTES, "ncclUniqueId size");

struct hx_cuda_nccl {
    ncclComm_t comm;
    int rank, size;
};

static hx_status nccl_err(ncclResult_t r, hx_err *err, const char *what)
{
    if (r == ncclSuccess)
        return HX_OK;
    return hx_err_set(err, r == ncclSystemError || r == ncclRemoteError ? HX_ECONN : HX_EIO,
                      "nccl: %s: %s", what, ncclGetErrorString(r));
}

extern "C" int hx_cuda_nccl_available(void)
{
    return 1;
}

extern "C" hx_status hx_cuda_nccl_unique_id(uint8_t id[HX_CUDA_NCCL_ID_BYTES], hx_err *err)
{
    ncclUniqueId u;
    hx_status st = nccl_err(ncclGetUniqueId(&u), err, "ncclGetUniqueId");
    if (st == HX_OK)
        memcpy(id, &u, sizeof u);
    return st;
}

extern "C" hx_status hx_cuda_nccl_new(const uint8_t id[HX_CUDA_NCCL_ID_BYTES], int n_ranks,
                                      int rank, int device, hx_cuda_nccl **out, hx_err *err)
{
    *out = NULL;
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d", rank, n_ranks);
    hx_status st = hx_cuda_set_device(device, err);
    if (st != HX_OK)
        return st;
    hx_cuda_nccl *c = (hx_cuda_nccl *)calloc(1, sizeof *c);
    if (!c)
        return hx_err_set(err, HX_ENOMEM, "nccl: out of memory");
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    st = nccl_err(ncclCommInitRank(&c->comm, n_ranks, u, rank), err, "ncclCommInitRank");
    if (st != HX_OK) {
        free(c);
        return st;
    }
    c->rank = rank;
    c->size = n_ranks;
    *out = c;
    return HX_OK;
}

extern "C" void hx_cuda_nccl_free(hx_cuda_nccl *c)
{
    if (!c)
        return;
    ncclCommDestroy(c->comm);
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
    return nccl_err(ncclAllReduce(d_buf, d_buf, count, is_bf16 ? ncclBfloat16 : ncclFloat32,
                                  ncclSum, c->comm, HX_STREAM(stream)),
                    err, "ncclAllReduce");
}

extern "C" hx_status hx_cuda_nccl_send(hx_cuda_nccl *c, const void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    return nccl_err(ncclSend(d_buf, bytes, ncclUint8, peer, c->comm, HX_STREAM(stream)), err,
                    "ncclSend");
}

extern "C" hx_status hx_cuda_nccl_recv(hx_cuda_nccl *c, void *d_buf, size_t bytes, int peer,
                                       hx_cuda_stream *stream, hx_err *err)
{
    return nccl_err(ncclRecv(d_buf, bytes, ncclUint8, peer, c->comm, HX_STREAM(stream)), err,
                    "ncclRecv");
}

extern "C" hx_status hx_cuda_nccl_group_start(hx_err *err)
{
    return nccl_err(ncclGroupStart(), err, "ncclGroupStart");
}

extern "C" hx_status hx_cuda_nccl_group_end(hx_err *err)
{
    return nccl_err(ncclGroupEnd(), err, "ncclGroupEnd");
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
                                      int rank, int device, hx_cuda_nccl **out, hx_err *err)
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

#endif
