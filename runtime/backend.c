/* backend.c - the cpu and cuda engines behind one table; see backend.h. */
#include "runtime/backend.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/bufpool.h"
#include "common/log.h"
#include "runtime/llama.h"
#include "runtime/llama_weights.h"
#ifdef HX_HAVE_CUDA
#include "kernels/cuda.h"
#include "runtime/cuda_engine.h"
_Static_assert(HX_BACKEND_NCCL_ID_BYTES == HX_CUDA_NCCL_ID_BYTES, "NCCL id size");
#endif

struct hx_backend {
    hx_backend_kind kind;
    hx_model cfg;        /* the whole model */
    int kv_heads;        /* held here */
    int max_seq_tokens;
    int max_tokens;
    /* cpu */
    hx_llama *model;
    hx_batch *eng;
    int tp, tp_rank;
    int step_rows;       /* rows a step may take */
    int max_seqs, block_tokens;
    /* cuda */
    void *cuda;          /* hx_cuda_engine */
    void *nccl;          /* hx_cuda_nccl: the stage's TP all-reduce, when joined */
    int device;          /* CUDA device ordinal */
    /*
     * Device buffers that KV payloads arrived in over NCCL, kept for reuse:
     * a cudaFree waits for the whole GPU, so freeing each payload would make
     * the engine's step wait for transfers in flight on other threads.
     */
    hx_bufpool pool;
    /* (trash_mu) given back from any thread but outside the pool: freed by the next step,
       on the engine's thread, outside the caller's locks */
    pthread_mutex_t trash_mu;
    void **trash;
    int cap_trash;
    atomic_int n_trash;
};

#ifdef HX_HAVE_CUDA
static hx_status dev_alloc(void *ctx, size_t bytes, void **out, hx_err *err);
static void dev_free_later(void *ctx, void *p);
static void trash_flush(hx_backend *b);
#endif

/* The pool holds at most this much device memory (a bigger payload is allocated apart). */
#define DEV_POOL_BYTES ((size_t)1 << 30)

hx_status hx_backend_parse(const char *s, hx_backend_kind *out, hx_err *err)
{
    if (strcmp(s, "auto") == 0)
        *out = HX_BACKEND_AUTO;
    else if (strcmp(s, "cpu") == 0)
        *out = HX_BACKEND_CPU;
    else if (strcmp(s, "cuda") == 0)
        *out = HX_BACKEND_CUDA;
    else
        return hx_err_set(err, HX_EINVAL, "unknown backend '%s' (auto, cpu or cuda)", s);
    return HX_OK;
}

const char *hx_backend_name(hx_backend_kind k)
{
    return k == HX_BACKEND_CPU ? "cpu" : k == HX_BACKEND_CUDA ? "cuda" : "auto";
}

static int cuda_usable(void)
{
#ifdef HX_HAVE_CUDA
    return hx_cuda_available();
#else
    return 0;
#endif
}

/* KV blocks for a budget: what it holds, at most what max_seqs full sequences need. */
static int blocks_for(const hx_backend_options *o, double bytes_per_token, int block_tokens,
                      int max_seqs, int max_seq_tokens)
{
    double budget = o->kv_budget_bytes > 0 ? o->kv_budget_bytes : 2.0 * (1 << 30);
    double fit = budget / (bytes_per_token * block_tokens);
    double need = (double)max_seqs * ((max_seq_tokens + block_tokens - 1) / block_tokens);
    return (int)(fit < need ? fit : need);
}

static hx_status open_cpu(const hx_backend_options *o, const hx_batch_comm *comm, hx_backend *b,
                          hx_err *err)
{
    hx_llama_options lo;
    hx_llama_options_init(&lo);
    lo.first_layer = o->first_layer;
    lo.num_layers = o->num_layers;
    lo.tp_rank = o->tp_rank;
    lo.tp_size = o->tp_size;
    lo.threads = o->threads;
    hx_status st = hx_llama_load(o->model_dir, &lo, &b->model, err);
    if (st != HX_OK)
        return st;
    b->cfg = *hx_llama_config(b->model);
    hx_llama_slice sl;
    hx_llama_slice_of(b->model, &sl);
    b->kv_heads = sl.kv_heads;
    hx_batch_options bo;
    hx_batch_options_init(&bo);
    bo.max_seqs = o->max_seqs > 0 ? o->max_seqs : 32;
    bo.max_step_tokens = bo.max_seqs > 64 ? bo.max_seqs : 64;
    bo.block_tokens = o->block_tokens > 0 ? o->block_tokens : 16;
    bo.max_seq_tokens = o->max_seq_tokens;
    double per_token = 2.0 * hx_llama_num_layers(b->model) * sl.kv_heads * b->cfg.head_dim *
                       sizeof(float);
    bo.max_blocks = blocks_for(o, per_token, bo.block_tokens, bo.max_seqs, bo.max_seq_tokens);
    if (bo.max_blocks < 1)
        return hx_err_set(err, HX_EINVAL, "a KV budget of %.0f bytes holds no block of %d "
                          "positions (%.0f bytes each)", o->kv_budget_bytes, bo.block_tokens,
                          per_token * bo.block_tokens);
    int whole = hx_llama_has_embedding(b->model) && hx_llama_has_head(b->model) &&
                hx_llama_tp_size(b->model) == 1;
    if ((st = hx_batch_new(b->model, &bo, whole ? NULL : comm, &b->eng, err)) != HX_OK)
        return st;
    b->max_seq_tokens = bo.max_seq_tokens;
    b->max_tokens = hx_kvcache_max_blocks(hx_batch_kvcache(b->eng)) * bo.block_tokens;
    b->tp = sl.tp_size;
    b->tp_rank = sl.tp_rank;
    b->step_rows = bo.max_step_tokens;
    b->max_seqs = bo.max_seqs;
    b->block_tokens = bo.block_tokens;
    return HX_OK;
}

static hx_status open_cuda(const hx_backend_options *o, const hx_batch_comm *comm,
                           hx_backend *b, hx_err *err)
{
#ifdef HX_HAVE_CUDA
    hx_status st = hx_model_load(o->model_dir, &b->cfg, err);
    if (st != HX_OK)
        return st;
    const int tp = o->tp_size > 1 ? o->tp_size : 1;
    const int nl = o->num_layers > 0 ? o->num_layers : b->cfg.num_layers - o->first_layer;
    hx_llama_slice sl; /* the engine's slice, for the KV budget in blocks */
    if ((st = hx_llama_slice_plan(&b->cfg, "cuda backend", o->tp_rank, tp, &sl, err)) != HX_OK)
        return st;
    int n = hx_cuda_device_count();
    hx_cuda_options co;
    hx_cuda_options_init(&co);
    co.device = n > 0 ? o->device % n : 0;
    if (n > 0 && o->device >= n)
        HX_WARN("device %d runs on CUDA device %d: this host has %d", o->device, co.device, n);
    co.first_layer = o->first_layer;
    co.num_layers = nl;
    co.tp_rank = o->tp_rank;
    co.tp_size = tp;
    co.max_seqs = o->max_seqs > 0 ? o->max_seqs : 32;
    if (co.max_step_tokens < co.max_seqs)
        co.max_step_tokens = co.max_seqs;
    co.block_tokens = o->block_tokens > 0 ? o->block_tokens : 16;
    co.max_seq_tokens = o->max_seq_tokens;
    double per_token = 2.0 * nl * sl.kv_heads * b->cfg.head_dim * 2;
    co.max_blocks = blocks_for(o, per_token, co.block_tokens, co.max_seqs, co.max_seq_tokens);
    if (co.max_blocks < 1)
        return hx_err_set(err, HX_EINVAL, "a KV budget of %.0f bytes holds no block of %d "
                          "positions (%.0f bytes each)", o->kv_budget_bytes, co.block_tokens,
                          per_token * co.block_tokens);
    hx_cuda_engine *e = NULL;
    if ((st = hx_cuda_engine_new(o->model_dir, &co, &e, err)) != HX_OK)
        return st;
    b->cuda = e;
    b->device = co.device;
    const int whole = o->first_layer == 0 && nl == b->cfg.num_layers && tp == 1;
    if (!whole && (st = hx_cuda_engine_set_comm(e, comm, err)) != HX_OK)
        return st;
    b->kv_heads = sl.kv_heads;
    b->tp = tp;
    b->tp_rank = o->tp_rank;
    b->step_rows = co.max_step_tokens;
    b->max_seqs = co.max_seqs;
    b->block_tokens = co.block_tokens;
    b->max_seq_tokens = co.max_seq_tokens;
    b->max_tokens = co.max_blocks * co.block_tokens;
    return HX_OK;
#else
    (void)o;
    (void)comm;
    (void)b;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (backends: cpu)");
#endif
}

hx_status hx_backend_open(const hx_backend_options *o, const hx_batch_comm *comm,
                          hx_backend **out, hx_err *err)
{
    hx_backend *b = calloc(1, sizeof *b);
    if (!b)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    pthread_mutex_init(&b->trash_mu, NULL);
#ifdef HX_HAVE_CUDA
    hx_bufpool_init(&b->pool, DEV_POOL_BYTES, dev_alloc, dev_free_later, b);
#endif
    b->kind = o->kind;
    if (b->kind == HX_BACKEND_AUTO)
        b->kind = cuda_usable() ? HX_BACKEND_CUDA : HX_BACKEND_CPU;
    if (b->kind == HX_BACKEND_CUDA && !cuda_usable()) {
        free(b);
#ifdef HX_HAVE_CUDA
        return hx_err_set(err, HX_ENOTSUP, "backend cuda: no CUDA device can be used here");
#else
        return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (backends: cpu)");
#endif
    }
    hx_backend_options oo = *o;
    hx_status st;
    if (oo.max_seq_tokens <= 0) { /* the default: min(context, 4096) */
        hx_model m;
        if ((st = hx_model_load(o->model_dir, &m, err)) != HX_OK) {
            free(b);
            return st;
        }
        oo.max_seq_tokens = m.max_position_tokens < 4096 ? m.max_position_tokens : 4096;
    }
    st = b->kind == HX_BACKEND_CPU ? open_cpu(&oo, comm, b, err) : open_cuda(&oo, comm, b, err);
    if (st != HX_OK) {
        hx_backend_close(b);
        return st;
    }
    *out = b;
    return HX_OK;
}

void hx_backend_close(hx_backend *b)
{
    if (!b)
        return;
    hx_batch_free(b->eng);
    hx_llama_free(b->model);
#ifdef HX_HAVE_CUDA
    hx_cuda_engine_free(b->cuda); /* waits for its stream: the communicator goes after */
    hx_cuda_nccl_free(b->nccl);
    hx_bufpool_release(&b->pool); /* into the trash, */
    trash_flush(b);               /* freed here */
#endif
    pthread_mutex_destroy(&b->trash_mu);
    free(b);
}

hx_backend_kind hx_backend_kind_of(const hx_backend *b)
{
    return b->kind;
}

const hx_model *hx_backend_config(const hx_backend *b)
{
    return &b->cfg;
}

int hx_backend_kv_heads(const hx_backend *b)
{
    return b->kv_heads;
}

int hx_backend_max_seq_tokens(const hx_backend *b)
{
    return b->max_seq_tokens;
}

int hx_backend_max_tokens(const hx_backend *b)
{
    return b->max_tokens;
}

#ifdef HX_HAVE_CUDA
#define CUDA_OR(b, cuda_call, cpu_call) ((b)->cuda ? (cuda_call) : (cpu_call))
#else
#define CUDA_OR(b, cuda_call, cpu_call) (cpu_call)
#endif

int hx_backend_step_rows(const hx_backend *b)
{
    return b->step_rows;
}

int hx_backend_max_seqs(const hx_backend *b)
{
    return b->max_seqs;
}

int hx_backend_block_tokens(const hx_backend *b)
{
    return b->block_tokens;
}

int hx_backend_free_tokens(const hx_backend *b)
{
    return b->block_tokens * CUDA_OR(b, hx_cuda_engine_free_blocks(b->cuda),
                                     hx_batch_free_blocks(b->eng));
}

/* ---- NCCL for a TP stage ---- */

int hx_backend_nccl_capable(const hx_backend *b)
{
#ifdef HX_HAVE_CUDA
    return b->cuda && b->tp > 1 && hx_cuda_nccl_available();
#else
    (void)b;
    return 0;
#endif
}

hx_status hx_backend_device_uuid(const hx_backend *b, char *out, size_t size, hx_err *err)
{
    if (size > 0)
        out[0] = '\0';
#ifdef HX_HAVE_CUDA
    if (b->cuda)
        return hx_cuda_device_uuid(b->device, out, size, err);
#else
    (void)b;
    (void)err;
#endif
    return HX_OK;
}

hx_status hx_backend_nccl_unique_id(uint8_t id[HX_BACKEND_NCCL_ID_BYTES], hx_err *err)
{
#ifdef HX_HAVE_CUDA
    return hx_cuda_nccl_unique_id(id, err);
#else
    memset(id, 0, HX_BACKEND_NCCL_ID_BYTES);
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

hx_status hx_backend_nccl_join(hx_backend *b, const uint8_t id[HX_BACKEND_NCCL_ID_BYTES],
                               double timeout_s, double step_timeout_s, hx_err *err)
{
#ifdef HX_HAVE_CUDA
    if (!hx_backend_nccl_capable(b) || b->nccl)
        return hx_err_set(err, HX_EINVAL, "backend %s at TP rank %d of %d cannot join NCCL%s",
                          hx_backend_name(b->kind), b->tp_rank, b->tp,
                          b->nccl ? " twice" : "");
    hx_cuda_nccl *c = NULL;
    hx_status st = hx_cuda_nccl_new(id, b->tp, b->tp_rank, b->device, timeout_s, &c, err);
    if (st != HX_OK)
        return st;
    if ((st = hx_cuda_engine_set_nccl(b->cuda, c, step_timeout_s, err)) != HX_OK) {
        hx_cuda_nccl_free(c);
        return st;
    }
    b->nccl = c;
    return HX_OK;
#else
    (void)b;
    (void)id;
    (void)timeout_s;
    (void)step_timeout_s;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

void hx_backend_nccl_leave(hx_backend *b)
{
#ifdef HX_HAVE_CUDA
    if (!b->nccl)
        return;
    (void)hx_cuda_engine_set_nccl(b->cuda, NULL, 0, NULL);
    hx_cuda_nccl_free(b->nccl);
    b->nccl = NULL;
#else
    (void)b;
#endif
}

uint32_t hx_backend_nccl_host(void)
{
    /* NCCL's rule: ranks on one host are those of one NCCL_HOSTID, else one host name */
    char name[256];
    const char *id = getenv("NCCL_HOSTID");
    if (!id || !*id) {
        if (gethostname(name, sizeof name) != 0)
            name[0] = '\0';
        name[sizeof name - 1] = '\0';
        id = name;
    }
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h;
}

/* ---- NCCL links for KV between a prefill rank and a decode rank ---- */

#ifdef HX_HAVE_CUDA
struct hx_backend_link {
    hx_cuda_nccl *comm;
    hx_cuda_stream *stream;
    int device;
    int rank;
    double op_timeout_s;
    void *buf; /* rank 0: the packed payload on the device */
    size_t cap;
    size_t packed; /* bytes packed in buf, not sent yet */
};
#else
struct hx_backend_link {
    int unused;
};
#endif

int hx_backend_link_capable(const hx_backend *b)
{
#ifdef HX_HAVE_CUDA
    return b && b->cuda && hx_cuda_nccl_available();
#else
    (void)b;
    return 0;
#endif
}

void hx_backend_link_close(hx_backend_link *l)
{
    if (!l)
        return;
#ifdef HX_HAVE_CUDA
    (void)hx_cuda_set_device(l->device, NULL);
    hx_cuda_nccl_free(l->comm);
    hx_cuda_stream_free(l->stream);
    hx_cuda_free(l->buf);
#endif
    free(l);
}

hx_status hx_backend_link_open(const hx_backend *b, const uint8_t id[HX_BACKEND_NCCL_ID_BYTES],
                               int rank, double timeout_s, double op_timeout_s,
                               hx_backend_link **out, hx_err *err)
{
    *out = NULL;
#ifdef HX_HAVE_CUDA
    if (!hx_backend_link_capable(b) || rank < 0 || rank > 1)
        return hx_err_set(err, HX_EINVAL, "backend %s cannot open an NCCL link as rank %d",
                          hx_backend_name(b->kind), rank);
    hx_backend_link *l = calloc(1, sizeof *l);
    if (!l)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    l->device = b->device;
    l->rank = rank;
    l->op_timeout_s = op_timeout_s > 0 ? op_timeout_s : 60.0;
    hx_status st = hx_cuda_set_device(l->device, err);
    if (st == HX_OK)
        st = hx_cuda_stream_new(&l->stream, err);
    if (st == HX_OK)
        st = hx_cuda_nccl_new(id, 2, rank, l->device, timeout_s, &l->comm, err);
    /* a first transfer of a few bytes: the ranks connect now, not on the first request */
    if (st == HX_OK)
        st = hx_cuda_malloc(&l->buf, 16, err);
    if (st == HX_OK)
        st = hx_cuda_memset(l->buf, 0, 16, err); /* no uninitialised bytes on the wire */
    if (st == HX_OK) {
        l->cap = 16;
        st = rank == 0 ? hx_cuda_nccl_send(l->comm, l->buf, 16, 1, l->stream, err)
                       : hx_cuda_nccl_recv(l->comm, l->buf, 16, 0, l->stream, err);
    }
    if (st == HX_OK) { /* one deadline for the join and the first transfer */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double left = timeout_s - (double)(t1.tv_sec - t0.tv_sec) -
                      1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        st = hx_cuda_nccl_wait(l->comm, l->stream, left > 1.0 ? left : 1.0, err);
    }
    if (st != HX_OK) {
        hx_backend_link_close(l);
        return st;
    }
    *out = l;
    return HX_OK;
#else
    (void)b;
    (void)id;
    (void)rank;
    (void)timeout_s;
    (void)op_timeout_s;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

hx_status hx_backend_link_pack(hx_backend *b, hx_backend_link *l, uint64_t id, int layer_first,
                               int num_layers, int head_first, int num_heads, size_t bytes,
                               hx_err *err)
{
#ifdef HX_HAVE_CUDA
    if (!b->cuda || l->rank != 0)
        return hx_err_set(err, HX_EINVAL, "KV over NCCL: only a cuda engine's link rank 0 sends");
    hx_status st = hx_cuda_set_device(l->device, err);
    if (st != HX_OK)
        return st;
    if (bytes > l->cap) {
        hx_cuda_free(l->buf);
        l->buf = NULL;
        l->cap = 0;
        if ((st = hx_cuda_malloc(&l->buf, bytes, err)) != HX_OK)
            return st;
        l->cap = bytes;
    }
    size_t got = 0;
    st = hx_cuda_engine_pack_kv_device(b->cuda, id, layer_first, num_layers, head_first,
                                       num_heads, l->buf, l->cap, &got, err);
    if (st == HX_OK && got != bytes)
        st = hx_err_set(err, HX_EINVAL, "KV over NCCL: request %llu packs into %zu bytes, not %zu",
                        (unsigned long long)id, got, bytes);
    l->packed = st == HX_OK ? bytes : 0;
    return st;
#else
    (void)b;
    (void)l;
    (void)id;
    (void)layer_first;
    (void)num_layers;
    (void)head_first;
    (void)num_heads;
    (void)bytes;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

hx_status hx_backend_link_send(hx_backend_link *l, hx_err *err)
{
#ifdef HX_HAVE_CUDA
    if (l->rank != 0 || !l->packed)
        return hx_err_set(err, HX_EINVAL, "KV over NCCL: nothing packed to send");
    const size_t bytes = l->packed;
    l->packed = 0;
    hx_status st = hx_cuda_set_device(l->device, err);
    if (st == HX_OK)
        st = hx_cuda_nccl_send(l->comm, l->buf, bytes, 1, l->stream, err);
    if (st == HX_OK)
        st = hx_cuda_nccl_wait(l->comm, l->stream, l->op_timeout_s, err);
    return st;
#else
    (void)l;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

#ifdef HX_HAVE_CUDA
/* b->pool's allocator; the current device must be b's. */
static hx_status dev_alloc(void *ctx, size_t bytes, void **out, hx_err *err)
{
    (void)ctx;
    return hx_cuda_malloc(out, bytes, err);
}

/*
 * A device buffer of at least `bytes` from b's pool (the smallest free one
 * that fits), or a new one (rounded up), kept in the pool while it has room (entries and
 * DEV_POOL_BYTES), else apart. The current device must be b's.
 */
static hx_status dev_get(hx_backend *b, size_t bytes, void **out, hx_err *err)
{
    /* sizes in steps of a quarter of their power of two (at least 256 KiB): reusable */
    size_t step = (size_t)1 << 18;
    while (step * 4 < bytes)
        step *= 2;
    bytes = (bytes + step - 1) / step * step;
    return hx_bufpool_get(&b->pool, bytes, out, err);
}
#endif

hx_status hx_backend_link_recv(hx_backend *b, hx_backend_link *l, size_t bytes, void **out,
                               hx_err *err)
{
    *out = NULL;
#ifdef HX_HAVE_CUDA
    if (l->rank != 1)
        return hx_err_set(err, HX_EINVAL, "KV over NCCL: only link rank 1 receives");
    void *d = NULL;
    hx_status st = hx_cuda_set_device(l->device, err);
    if (st == HX_OK)
        st = dev_get(b, bytes ? bytes : 16, &d, err);
    if (st == HX_OK)
        st = hx_cuda_nccl_recv(l->comm, d, bytes, 0, l->stream, err);
    if (st == HX_OK)
        st = hx_cuda_nccl_wait(l->comm, l->stream, l->op_timeout_s, err);
    if (st != HX_OK) {
        hx_backend_device_free(b, d);
        return st;
    }
    *out = d;
    return HX_OK;
#else
    (void)b;
    (void)l;
    (void)bytes;
    return hx_err_set(err, HX_ENOTSUP, "this hexflow was built without CUDA (no NCCL)");
#endif
}

void hx_backend_device_free(hx_backend *b, void *p)
{
#ifdef HX_HAVE_CUDA
    hx_bufpool_put(&b->pool, p); /* outside the pool: dev_free_later */
#else
    (void)b;
    (void)p;
#endif
}

#ifdef HX_HAVE_CUDA
/* b->pool's free: device memory given back outside the pool, into the trash (any thread). */
static void dev_free_later(void *ctx, void *p)
{
    hx_backend *b = ctx;
    pthread_mutex_lock(&b->trash_mu);
    if (b->n_trash == b->cap_trash) {
        const int cap = b->cap_trash ? 2 * b->cap_trash : 16;
        void **g = realloc(b->trash, (size_t)cap * sizeof *g);
        if (!g) { /* out of memory: free it here, slow but right */
            pthread_mutex_unlock(&b->trash_mu);
            (void)hx_cuda_set_device(b->device, NULL);
            hx_cuda_free(p);
            return;
        }
        b->trash = g;
        b->cap_trash = cap;
    }
    b->trash[b->n_trash++] = p;
    pthread_mutex_unlock(&b->trash_mu);
}

/* Frees what hx_backend_device_free queued (the engine's thread, no lock of the caller's). */
static void trash_flush(hx_backend *b)
{
    if (b->n_trash == 0)
        return;
    pthread_mutex_lock(&b->trash_mu);
    void **t = b->trash;
    const int n = b->n_trash;
    b->trash = NULL;
    b->n_trash = b->cap_trash = 0;
    pthread_mutex_unlock(&b->trash_mu);
    (void)hx_cuda_set_device(b->device, NULL);
    for (int i = 0; i < n; i++)
        hx_cuda_free(t[i]);
    free(t);
}
#endif

/* 64 bytes in front of each block say how it was allocated */
#define HOST_HEADER 64
enum { HOST_PLAIN = 1, HOST_PINNED = 2 };

void *hx_backend_host_alloc(const hx_backend *b, size_t bytes)
{
    unsigned char *base = NULL;
    const size_t n = HOST_HEADER + ((bytes + 63) & ~(size_t)63);
#ifdef HX_HAVE_CUDA
    if (b && b->cuda) {
        hx_err e = {0};
        /* on the engine's device: a thread that never chose one would make a context on 0 */
        if (hx_cuda_set_device(b->device, &e) == HX_OK &&
            hx_cuda_host_alloc((void **)&base, n, &e) == HX_OK) {
            base[0] = HOST_PINNED;
            return base + HOST_HEADER;
        }
        HX_WARN("page-locked memory: %s; using pageable memory", e.msg);
    }
#else
    (void)b;
#endif
    base = aligned_alloc(64, n);
    if (!base)
        return NULL;
    base[0] = HOST_PLAIN;
    return base + HOST_HEADER;
}

void hx_backend_host_free(void *p)
{
    if (!p)
        return;
    unsigned char *base = (unsigned char *)p - HOST_HEADER;
#ifdef HX_HAVE_CUDA
    if (base[0] == HOST_PINNED) {
        hx_cuda_host_free(base);
        return;
    }
#endif
    free(base);
}

int hx_backend_seq_count(const hx_backend *b)
{
    return CUDA_OR(b, hx_cuda_engine_seq_count(b->cuda), hx_batch_seq_count(b->eng));
}

int hx_backend_can_admit(const hx_backend *b, int n_prompt, int max_new_tokens)
{
    return CUDA_OR(b, hx_cuda_engine_can_admit(b->cuda, n_prompt, max_new_tokens),
                   hx_batch_can_admit(b->eng, n_prompt, max_new_tokens));
}

int hx_backend_seq_tokens(const hx_backend *b, uint64_t id)
{
#ifdef HX_HAVE_CUDA
    if (b->cuda)
        return hx_cuda_engine_seq_tokens(b->cuda, id);
#endif
    int seq = hx_batch_seq_kv(b->eng, id);
    return seq < 0 ? -1 : hx_kvcache_seq_tokens(hx_batch_kvcache(b->eng), seq);
}

hx_status hx_backend_add(hx_backend *b, const hx_batch_request *req, hx_err *err)
{
    return CUDA_OR(b, hx_cuda_engine_add(b->cuda, req, err), hx_batch_add(b->eng, req, err));
}

hx_status hx_backend_add_prefilled(hx_backend *b, const hx_batch_request *req, int first_token,
                                   const hx_kv_segment *segs, int n_segs, hx_err *err)
{
    return CUDA_OR(b, hx_cuda_engine_add_prefilled(b->cuda, req, first_token, segs, n_segs, err),
                   hx_batch_add_prefilled(b->eng, req, first_token, segs, n_segs, err));
}

hx_status hx_backend_remove(hx_backend *b, uint64_t id, hx_err *err)
{
    return CUDA_OR(b, hx_cuda_engine_remove(b->cuda, id, err), hx_batch_remove(b->eng, id, err));
}

hx_status hx_backend_step(hx_backend *b, const hx_batch_event **events, int *n_events,
                          hx_err *err)
{
#ifdef HX_HAVE_CUDA
    trash_flush(b);
#endif
    return CUDA_OR(b, hx_cuda_engine_step(b->cuda, events, n_events, err),
                   hx_batch_step(b->eng, events, n_events, err));
}

int hx_backend_kv_dtype(const hx_backend *b)
{
#ifdef HX_HAVE_CUDA
    if (b->cuda)
        return HX_KV_DTYPE_BF16;
#endif
    (void)b;
    return HX_KV_DTYPE_F32;
}

hx_status hx_backend_pack_kv(hx_backend *b, uint64_t id, int layer_first, int num_layers,
                             int head_first, int num_heads, void *out, size_t out_size,
                             size_t *out_bytes, hx_err *err)
{
#ifdef HX_HAVE_CUDA
    if (b->cuda)
        return hx_cuda_engine_pack_kv(b->cuda, id, layer_first, num_layers, head_first,
                                      num_heads, out, out_size, out_bytes, err);
#endif
    int seq = hx_batch_seq_kv(b->eng, id);
    if (seq < 0)
        return hx_err_set(err, HX_ENOENT, "no request %llu in the engine",
                          (unsigned long long)id);
    return hx_kvcache_pack(hx_batch_kvcache(b->eng), seq, layer_first, num_layers, head_first,
                           num_heads, out, out_size, out_bytes, err);
}
