/*
 * nccl.c - a host emulation of the NCCL wrappers of kernels/cuda.h
 * (kernels/cuda/nccl.cu), so that their callers (the TP all-reduce of
 * runtime/cuda_engine.c, the KV links of runtime/backend.c, their setup in
 * runtime/worker.c) run and are tested on machines without GPUs:
 * `cmake -DHX_CUDA_EMU=ON`. Test infrastructure only, never in a release build.
 *
 * Transport: a star through rank 0 over Linux abstract-namespace Unix stream
 * sockets, "\0hexflow-nccl-emu-<32 hex>" after the id's 16 random bytes, for
 * ranks in other processes and in threads of one process alike. Rank 0 binds
 * first, takes every other rank's HELLO and, once all have joined, answers
 * each. Every message is a frame {kind, sequence number, bytes} and its
 * payload; all I/O is non-blocking, waits in poll() up to a deadline.
 *
 * Device memory is host memory and streams run their work at the call
 * (kernels/cuda_emu/emu.c), so an operation is done when its call returns,
 * or at the outermost group_end for those of a group, which progress
 * together in one poll loop; hx_cuda_nccl_wait only reports the state.
 * Sends are eager: done once written. All-reduce: the other ranks send
 * their buffers to rank 0, which sums in rank order (fp32 in fp32; bf16
 * summed in fp32 and rounded to nearest even once at the end, so results
 * are deterministic, which NCCL's are not) and sends the sum back.
 *
 * The contract is nccl.cu's: each operation is bounded (20 s, as
 * HX_NCCL_ENQUEUE_S; $HX_CUDA_EMU_NCCL_OP_S for tests); a peer gone, a
 * deadline passed or a mismatch aborts the communicator (its peers are told
 * and abort theirs), and every later call on it is HX_ECONN. Where NCCL
 * would hang the emulation fails fast: the ranks' operations are matched
 * per pair of ranks, sends with receives and all-reduces with all-reduces in
 * order; sizes that differ, or two ungrouped operations of different kinds
 * facing each other (a deadlock under NCCL), abort with HX_EIO naming both.
 * Buffers go through the emulated device first (emu_need): one that is not
 * its memory is a sticky fault, reported by the next call, as on a GPU.
 *
 * $HX_CUDA_EMU_NCCL_JOIN=fail makes every join of the process fail at once
 * (HX_ECONN; its peers time out), for tests of the callers' fallbacks;
 * $HX_CUDA_EMU_NCCL_HANG=N makes the process's N-th operation hang for good
 * (a wedged NCCL kernel that no abort stops), for tests of the callers'
 * last resort.
 *
 * An operation outside a group on a stream being captured is recorded into
 * the graph and runs at each replay (grouped ones run at group_end).
 *
 * Not emulated: send/recv between two ranks other than 0 (HX_ENOTSUP);
 * grouped operations on a stream being captured (they run at the call); free
 * waiting for the peers; speed.
 */
#include <errno.h>
#include <stdatomic.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cuda.h"
#include "kernels/cuda_emu/emu.h"

#define OP_S_DEFAULT 20.0 /* an operation's bound, as HX_NCCL_ENQUEUE_S */
#define GROUP_MAX 16      /* communicators per group, as HX_NCCL_GROUP_MAX */
#define WHY_MAX 480       /* what made a communicator abort */

/* ---- ids and frames ---- */

static const char ID_MAGIC[8] = {'H', 'X', 'N', 'C', 'E', 'M', 'U', '1'};
#define KEY_AT 8
#define KEY_BYTES 16
#define WIRE_MAGIC 0x454e5848u /* "HXNE" */

enum {
    F_HELLO = 1, /* a rank joins: hello below */
    F_WELCOME,   /* rank 0: all joined */
    F_REFUSE,    /* rank 0: joining failed; op = the status, payload = why */
    F_SEND,      /* ncclSend's data */
    F_AR_UP,     /* a rank's all-reduce buffer, to rank 0 */
    F_AR_DOWN,   /* the sum, from rank 0 */
    F_ABORT,     /* the sender aborted the communicator; payload = why */
    F_BYE        /* the sender freed its communicator */
};
enum { FL_BF16 = 1, FL_SOLO = 2 }; /* solo: the only operation of its batch on the communicator */

typedef struct wire {
    uint32_t magic, kind, seq, flags;
    uint64_t bytes; /* of the payload that follows */
    uint64_t op;    /* the sender's operation number (F_REFUSE: the status) */
} wire;

typedef struct hello {
    uint32_t magic, kind;
    int32_t rank, n_ranks;
    uint8_t key[KEY_BYTES];
} hello;

/* A frame that arrived before any operation took it. */
typedef struct frame {
    struct frame *next;
    wire h;
    unsigned char *data;
} frame;

/* The connection to one peer: rank 0 has one to every other rank, they one to rank 0. */
typedef struct peer_link {
    int fd; /* -1: none, or closed */
    uint32_t seq_out, seq_in;
    int mid_frame; /* a frame's write began and has not ended */
    frame *stash, *stash_tail;
} peer_link;

struct hx_cuda_nccl {
    int rank, size, device;
    int aborted;
    char why[WHY_MAX + 32];
    uint64_t n_ops;
    peer_link *links; /* [size]; used: rank 0 all but its own, others links[0] */
};

enum { OP_AR, OP_SEND, OP_RECV };
static const char *const OP_NAME[] = {"ncclAllReduce", "ncclSend", "ncclRecv"};

/* An operation, as issued (a group keeps these until its end; the buffers are the caller's). */
typedef struct op {
    hx_cuda_nccl *c;
    int kind, bf16, peer;
    void *buf;
    size_t bytes;
    hx_cuda_stream *stream;
    uint64_t no;
} op;

/* ---- time, limits ---- */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec t;
    t.tv_sec = (time_t)s;
    t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    nanosleep(&t, NULL);
}

/* poll()'s timeout for the time left to deadline (0 when none is left). */
static int ms_left(double deadline)
{
    double left = deadline - now_s();
    if (left <= 0)
        return 0;
    if (left > 3600)
        left = 3600;
    return (int)ceil(left * 1000);
}

static double op_bound;
static pthread_once_t op_bound_once = PTHREAD_ONCE_INIT;

static void op_bound_init(void)
{
    const char *s = getenv("HX_CUDA_EMU_NCCL_OP_S");
    char *end = NULL;
    double v = s ? strtod(s, &end) : 0;
    op_bound = s && end != s && v > 0 && v < 1e6 ? v : OP_S_DEFAULT;
}

static double op_s(void)
{
    pthread_once(&op_bound_once, op_bound_init);
    return op_bound;
}

/* ---- bf16 ---- */

static float bf16_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it one (quiet) */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1); /* to nearest even */
    return (uint16_t)(u >> 16);
}

/* ---- aborting ---- */

/* Best effort, never waiting: a frame on a link (not inside another frame). */
static void send_note(peer_link *l, uint32_t kind, const char *text)
{
    if (l->fd < 0 || l->mid_frame)
        return;
    unsigned char buf[sizeof(wire) + WHY_MAX + 32];
    size_t n = text ? strlen(text) : 0;
    wire h = {WIRE_MAGIC, kind, l->seq_out++, 0, n, 0};
    memcpy(buf, &h, sizeof h);
    if (n)
        memcpy(buf + sizeof h, text, n);
    (void)send(l->fd, buf, sizeof h + n, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static void drop_links(hx_cuda_nccl *c, uint32_t note, const char *text)
{
    for (int i = 0; c->links && i < c->size; i++) {
        peer_link *l = &c->links[i];
        if (l->fd >= 0) {
            if (note)
                send_note(l, note, text);
            close(l->fd);
            l->fd = -1;
        }
        while (l->stash) {
            frame *f = l->stash;
            l->stash = f->next;
            free(f->data);
            free(f);
        }
        l->stash_tail = NULL;
    }
}

/* Aborts c (once): its peers are told why, its connections closed. */
static void abort_comm(hx_cuda_nccl *c, const char *why)
{
    if (c->aborted)
        return;
    snprintf(c->why, sizeof c->why, "%s", why);
    c->aborted = 1;
    drop_links(c, F_ABORT, c->why);
}

static hx_status aborted_err(const hx_cuda_nccl *c, hx_err *err)
{
    return hx_err_set(err, HX_ECONN, "nccl: communicator aborted after %s; rank %d of %d", c->why,
                      c->rank, c->size);
}

/* ---- socket helpers (joining) ---- */

static void id_addr(const uint8_t key[KEY_BYTES], struct sockaddr_un *a, socklen_t *len,
                    char name[64])
{
    int n = snprintf(name, 64, "hexflow-nccl-emu-");
    for (int i = 0; i < KEY_BYTES; i++)
        n += snprintf(name + n, (size_t)(64 - n), "%02x", key[i]);
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path + 1, name, (size_t)n); /* sun_path[0] = 0: the abstract namespace */
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

enum { IO_OK = 0, IO_EOF = -1, IO_TIMEOUT = -2, IO_ERR = -3 };

/* All of buf, by deadline, on a non-blocking socket: IO_OK, or why not (errno for IO_ERR). */
static int io_all(int fd, void *buf, size_t len, int writing, double deadline)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t r = writing ? send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL)
                            : recv(fd, p, len, MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            len -= (size_t)r;
            continue;
        }
        if (r == 0 && !writing)
            return IO_EOF;
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return errno == EPIPE || errno == ECONNRESET ? IO_EOF : IO_ERR;
        int ms = ms_left(deadline);
        if (ms == 0)
            return IO_TIMEOUT;
        struct pollfd pf = {fd, (short)(writing ? POLLOUT : POLLIN), 0};
        if (poll(&pf, 1, ms) < 0 && errno != EINTR)
            return IO_ERR;
    }
    return IO_OK;
}

static int new_socket(void)
{
    return socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

/* rank 0's answer to a joining rank: welcome, or refuse (code and why). */
static int answer(int fd, uint32_t kind, hx_status code, const char *why, double deadline)
{
    unsigned char buf[sizeof(wire) + 512];
    size_t n = why ? strnlen(why, 512) : 0;
    wire h = {WIRE_MAGIC, kind, 0, 0, n, (uint64_t)(int64_t)code};
    memcpy(buf, &h, sizeof h);
    if (n)
        memcpy(buf + sizeof h, why, n);
    return io_all(fd, buf, sizeof h + n, 1, deadline);
}

/* ---- joining ---- */

typedef struct pending {
    int fd;
    size_t got;
    hello h;
} pending;

/* Rank 0: binds, takes the others' HELLOs until all n-1 have joined, answers them. */
static hx_status join_root(hx_cuda_nccl *c, const uint8_t key[KEY_BYTES], double timeout_s,
                           hx_err *err)
{
    const double deadline = now_s() + timeout_s;
    struct sockaddr_un a;
    socklen_t alen;
    char name[64];
    id_addr(key, &a, &alen, name);
    hx_err mine = {0};
    int lfd = new_socket();
    if (lfd < 0)
        return hx_err_set(&mine, HX_ECONN, "nccl: rank 0 of %d: socket: %s", c->size,
                          strerror(errno));
    if (bind(lfd, (struct sockaddr *)&a, alen) != 0 || listen(lfd, c->size + 8) != 0) {
        int e = errno;
        close(lfd);
        if (e == EADDRINUSE)
            return hx_err_set(&mine, HX_EIO,
                              "nccl: rank 0 of %d: joining failed: another rank 0 uses this id "
                              "(@%s)",
                              c->size, name);
        return hx_err_set(&mine, HX_ECONN, "nccl: rank 0 of %d: bind/listen @%s: %s", c->size, name,
                          strerror(e));
    }
    enum { PEND_MAX = 64 };
    pending pend[PEND_MAX];
    int n_pend = 0, joined = 0;
    struct pollfd *pf = calloc((size_t)(1 + PEND_MAX + c->size), sizeof *pf);
    int *who = calloc((size_t)(1 + PEND_MAX + c->size), sizeof *who);
    char why[400] = "";
    hx_status st = HX_OK;
    if (!pf || !who)
        st = hx_err_set(&mine, HX_ENOMEM, "nccl: out of memory");
    while (st == HX_OK && joined < c->size - 1) {
        int ms = ms_left(deadline);
        if (ms == 0) {
            st = HX_ETIMEDOUT;
            break;
        }
        int n = 0;
        pf[n] = (struct pollfd){lfd, POLLIN, 0};
        who[n++] = -1;
        for (int i = 0; i < n_pend; i++) {
            pf[n] = (struct pollfd){pend[i].fd, POLLIN, 0};
            who[n++] = i;
        }
        for (int r = 1; r < c->size; r++) /* a joined rank says nothing: readable = it left */
            if (c->links[r].fd >= 0) {
                pf[n] = (struct pollfd){c->links[r].fd, POLLIN, 0};
                who[n++] = PEND_MAX + r;
            }
        if (poll(pf, (nfds_t)n, ms) < 0) {
            if (errno == EINTR)
                continue;
            st = hx_err_set(&mine, HX_ECONN, "nccl: rank 0 of %d: poll: %s", c->size,
                            strerror(errno));
            break;
        }
        for (int k = n - 1; k >= 0 && st == HX_OK; k--) { /* backwards: pend[] shrinks */
            if (!pf[k].revents)
                continue;
            if (who[k] == -1) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (n_pend == PEND_MAX)
                        close(fd);
                    else
                        pend[n_pend++] = (pending){fd, 0, {0}};
                }
                continue;
            }
            if (who[k] >= PEND_MAX) { /* a joined rank left (gave up): it is missing again */
                int r = who[k] - PEND_MAX;
                close(c->links[r].fd);
                c->links[r].fd = -1;
                joined--;
                continue;
            }
            pending *p = &pend[who[k]];
            ssize_t got = recv(p->fd, (char *)&p->h + p->got, sizeof p->h - p->got, MSG_DONTWAIT);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                continue;
            if (got > 0)
                p->got += (size_t)got;
            if (got > 0 && p->got < sizeof p->h)
                continue;
            const hello h = p->h;
            const int fd = p->fd, complete = got > 0;
            *p = pend[--n_pend];
            if (!complete) { /* it went away before saying who it is */
                close(fd);
                continue;
            }
            if (h.magic != WIRE_MAGIC || h.kind != F_HELLO ||
                memcmp(h.key, key, KEY_BYTES) != 0) {
                (void)answer(fd, F_REFUSE, HX_EIO, "not a rank of this communicator", deadline);
                close(fd);
                continue;
            }
            if (h.n_ranks != c->size)
                snprintf(why, sizeof why, "rank %d joined a communicator of %d ranks, not %d",
                         h.rank, h.n_ranks, c->size);
            else if (h.rank < 1 || h.rank >= c->size)
                snprintf(why, sizeof why, "a rank %d joined a communicator of %d ranks", h.rank,
                         c->size);
            else if (c->links[h.rank].fd >= 0)
                snprintf(why, sizeof why, "rank %d joined twice", h.rank);
            if (why[0]) {
                (void)answer(fd, F_REFUSE, HX_EIO, why, deadline);
                close(fd);
                st = hx_err_set(&mine, HX_EIO, "nccl: rank 0 of %d: joining failed: %s", c->size,
                                why);
                break;
            }
            c->links[h.rank].fd = fd;
            joined++;
        }
    }
    close(lfd);
    for (int i = 0; i < n_pend; i++)
        close(pend[i].fd);
    if (st == HX_ETIMEDOUT) {
        int n = 0;
        for (int r = 1; r < c->size && n < (int)sizeof why - 16; r++)
            if (c->links[r].fd < 0)
                n += snprintf(why + n, sizeof why - (size_t)n, "%s%d", n ? ", " : "", r);
        st = hx_err_set(&mine, HX_ETIMEDOUT,
                        "nccl: rank 0 of %d: the other ranks did not join within %.0f s "
                        "(missing: rank%s %s)",
                        c->size, timeout_s, strchr(why, ',') ? "s" : "", why);
    }
    /* all joined: welcome them; otherwise tell those that came why it failed */
    const double answer_by = (deadline > now_s() ? deadline : now_s()) + 1.0;
    for (int r = 1; r < c->size; r++) {
        if (c->links[r].fd < 0)
            continue;
        int io = st == HX_OK ? answer(c->links[r].fd, F_WELCOME, HX_OK, NULL, answer_by)
                             : answer(c->links[r].fd, F_REFUSE, st, mine.msg, answer_by);
        if (st == HX_OK && io != IO_OK)
            st = hx_err_set(&mine, HX_ECONN, "nccl: rank 0 of %d: joining failed: rank %d left",
                            c->size, r);
    }
    free(pf);
    free(who);
    if (st != HX_OK && err)
        *err = mine;
    return st;
}

/* A rank other than 0: connects to rank 0 (retrying until it is there), says HELLO, waits. */
static hx_status join_peer(hx_cuda_nccl *c, const uint8_t key[KEY_BYTES], double timeout_s,
                           hx_err *err)
{
    const double deadline = now_s() + timeout_s;
    struct sockaddr_un a;
    socklen_t alen;
    char name[64];
    id_addr(key, &a, &alen, name);
    double pause = 1e-3;
    int fd = -1;
    for (;;) {
        if (now_s() >= deadline)
            return hx_err_set(err, HX_ETIMEDOUT,
                              "nccl: rank %d of %d: the other ranks did not join within %.0f s "
                              "(rank 0 never listened)",
                              c->rank, c->size, timeout_s);
        if ((fd = new_socket()) < 0)
            return hx_err_set(err, HX_ECONN, "nccl: rank %d of %d: socket: %s", c->rank, c->size,
                              strerror(errno));
        if (connect(fd, (struct sockaddr *)&a, alen) == 0)
            break;
        int e = errno;
        if (e == EINPROGRESS) { /* (not Unix sockets' way, but allowed) */
            struct pollfd pf = {fd, POLLOUT, 0};
            int so = 0;
            socklen_t sl = sizeof so;
            if (poll(&pf, 1, ms_left(deadline)) == 1 &&
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) == 0 && so == 0)
                break;
            e = so ? so : ETIMEDOUT;
        }
        close(fd);
        fd = -1;
        if (e != ECONNREFUSED && e != ENOENT && e != EAGAIN && e != ETIMEDOUT && e != EINTR)
            return hx_err_set(err, HX_ECONN, "nccl: rank %d of %d: connect @%s: %s", c->rank,
                              c->size, name, strerror(e));
        double left = deadline - now_s();
        sleep_s(pause < left ? pause : left);
        if (pause < 0.05)
            pause *= 2;
    }
    hello h = {WIRE_MAGIC, F_HELLO, c->rank, c->size, {0}};
    memcpy(h.key, key, KEY_BYTES);
    wire w;
    int io = io_all(fd, &h, sizeof h, 1, deadline);
    if (io == IO_OK)
        io = io_all(fd, &w, sizeof w, 0, deadline);
    hx_status st = HX_OK;
    if (io == IO_TIMEOUT) {
        st = hx_err_set(err, HX_ETIMEDOUT,
                        "nccl: rank %d of %d: the other ranks did not join within %.0f s", c->rank,
                        c->size, timeout_s);
    } else if (io != IO_OK) {
        st = hx_err_set(err, HX_ECONN,
                        "nccl: rank %d of %d: joining failed: rank 0 closed the connection",
                        c->rank, c->size);
    } else if (w.magic != WIRE_MAGIC || (w.kind != F_WELCOME && w.kind != F_REFUSE)) {
        st = hx_err_set(err, HX_EIO, "nccl: rank %d of %d: joining failed: a bad answer from @%s",
                        c->rank, c->size, name);
    } else if (w.kind == F_REFUSE) {
        char why[513] = "";
        size_t n = w.bytes < 512 ? (size_t)w.bytes : 512;
        if (io_all(fd, why, n, 0, now_s() + 1.0) != IO_OK)
            n = 0;
        why[n] = '\0';
        if ((hx_status)(int64_t)w.op == HX_ETIMEDOUT)
            st = hx_err_set(err, HX_ETIMEDOUT,
                            "nccl: rank %d of %d: the other ranks did not join within %.0f s "
                            "(rank 0 says: %s)",
                            c->rank, c->size, timeout_s, why);
        else
            st = hx_err_set(err, HX_EIO, "nccl: rank %d of %d: joining failed: rank 0 refused: %s",
                            c->rank, c->size, why);
    }
    if (st != HX_OK) {
        close(fd);
        return st;
    }
    c->links[0].fd = fd;
    return HX_OK;
}

/* ---- the API ---- */

int hx_cuda_nccl_available(void)
{
    return 1;
}

hx_status hx_cuda_nccl_unique_id(uint8_t id[HX_CUDA_NCCL_ID_BYTES], hx_err *err)
{
    memset(id, 0, HX_CUDA_NCCL_ID_BYTES);
    size_t got = 0;
    while (got < KEY_BYTES) {
        ssize_t r = getrandom(id + KEY_AT + got, KEY_BYTES - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return hx_err_set(err, HX_EIO, "nccl: ncclGetUniqueId: getrandom: %s",
                              strerror(errno));
        got += (size_t)r;
    }
    memcpy(id, ID_MAGIC, sizeof ID_MAGIC);
    return HX_OK;
}

hx_status hx_cuda_nccl_new(const uint8_t id[HX_CUDA_NCCL_ID_BYTES], int n_ranks, int rank,
                           int device, double timeout_s, hx_cuda_nccl **out, hx_err *err)
{
    *out = NULL;
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d", rank, n_ranks);
    if (!(timeout_s > 0) || timeout_s > 1e9)
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: bad timeout %g s", rank, n_ranks,
                          timeout_s);
    if (memcmp(id, ID_MAGIC, sizeof ID_MAGIC) != 0)
        return hx_err_set(err, HX_EINVAL,
                          "nccl: rank %d of %d: not an id of hx_cuda_nccl_unique_id (emulated)",
                          rank, n_ranks);
    /* fault injection for the callers' fallbacks: this process never joins (the others
       then time out, as with a rank that cannot reach them) */
    const char *join = getenv("HX_CUDA_EMU_NCCL_JOIN");
    if (join && strcmp(join, "fail") == 0)
        return hx_err_set(err, HX_ECONN,
                          "nccl: rank %d of %d: ncclCommInitRankConfig: remote process exited "
                          "or there was a network error (emulated: HX_CUDA_EMU_NCCL_JOIN=fail)",
                          rank, n_ranks);
    hx_status st = hx_cuda_set_device(device, err);
    if (st != HX_OK)
        return st;
    hx_cuda_nccl *c = calloc(1, sizeof *c);
    peer_link *links = calloc((size_t)n_ranks, sizeof *links);
    if (!c || !links) {
        free(c);
        free(links);
        return hx_err_set(err, HX_ENOMEM, "nccl: out of memory");
    }
    c->rank = rank;
    c->size = n_ranks;
    c->device = device;
    c->links = links;
    for (int i = 0; i < n_ranks; i++)
        links[i].fd = -1;
    if (n_ranks > 1)
        st = rank == 0 ? join_root(c, id + KEY_AT, timeout_s, err)
                       : join_peer(c, id + KEY_AT, timeout_s, err);
    if (st != HX_OK) {
        drop_links(c, 0, NULL);
        free(c->links);
        free(c);
        return st;
    }
    *out = c;
    return HX_OK;
}

int hx_cuda_nccl_rank(const hx_cuda_nccl *c)
{
    return c->rank;
}

int hx_cuda_nccl_size(const hx_cuda_nccl *c)
{
    return c->size;
}

/* ---- running operations ---- */

/*
 * A batch is the operations that progress together: one outside a group,
 * a group's at its end. Per communicator and link, the frames to write (in
 * the order issued) and those expected, which arriving frames take in order,
 * each kind apart; a frame no operation of the batch takes is kept in the
 * link's stash for a later batch.
 */
typedef struct xout {
    wire h;
    const unsigned char *data;
    size_t done; /* of header and payload */
    int ar;      /* -1, or the all-reduce whose sum must be ready first */
} xout;

typedef struct xin {
    uint32_t kind, flags;
    unsigned char *dst;
    size_t bytes;
    const op *o;
    int ar; /* -1, or the all-reduce this is a part of */
    int matched, done;
} xin;

typedef struct xlink {
    xout *out;
    int n_out, i_out;
    xin *in;
    int n_in, n_matched, n_done;
    /* the frame being read */
    int reading;
    wire h;
    size_t h_got, left;
    unsigned char *dst;
    xin *target;
    frame *fr;               /* into the stash */
    char note[WHY_MAX + 32]; /* an F_ABORT's text */
    int note_frame;
} xlink;

typedef struct xar {
    const op *o;
    unsigned char **part; /* rank 0: [size] the others' buffers */
    int got, summed;
} xar;

typedef struct xcomm {
    hx_cuda_nccl *c;
    const char *what;
    int solo, n_ops, n_ar, failed;
    xlink *lk; /* [size] */
    xar *ar;
} xcomm;

typedef struct batch {
    xcomm x[GROUP_MAX];
    int n;
    hx_status first;
    hx_err *err;
} batch;

/* The communicator failed in this batch: abort it; the batch's first failure is its error. */
static void x_fail(batch *b, xcomm *x, hx_status code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void x_fail(batch *b, xcomm *x, hx_status code, const char *fmt, ...)
{
    if (x->failed)
        return;
    char why[WHY_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    abort_comm(x->c, why);
    x->failed = 1;
    if (b->first == HX_OK)
        b->first = hx_err_set(b->err, code, "nccl: rank %d of %d: %s; communicator aborted",
                              x->c->rank, x->c->size, why);
}

static int peer_of(const xcomm *x, int l)
{
    return x->c->rank == 0 ? l : 0;
}

static int link_of(const hx_cuda_nccl *c, int peer)
{
    return c->rank == 0 ? peer : 0;
}

static size_t elem_bytes(int bf16)
{
    return bf16 ? 2 : 4;
}

static void op_desc(char *out, size_t n, const op *o)
{
    if (o->kind == OP_AR)
        snprintf(out, n, "ncclAllReduce #%llu (%zu %s values)", (unsigned long long)o->no,
                 o->bytes / elem_bytes(o->bf16), o->bf16 ? "bf16" : "fp32");
    else
        snprintf(out, n, "%s #%llu (%zu bytes %s rank %d)", OP_NAME[o->kind],
                 (unsigned long long)o->no, o->bytes, o->kind == OP_SEND ? "to" : "from",
                 o->peer);
}

static void frame_desc(char *out, size_t n, const wire *h, int peer)
{
    if (h->kind == F_SEND)
        snprintf(out, n, "rank %d's ncclSend #%llu (%llu bytes)", peer,
                 (unsigned long long)h->op, (unsigned long long)h->bytes);
    else
        snprintf(out, n, "rank %d's ncclAllReduce #%llu (%llu %s values)", peer,
                 (unsigned long long)h->op,
                 (unsigned long long)(h->bytes / elem_bytes(h->flags & FL_BF16)),
                 h->flags & FL_BF16 ? "bf16" : "fp32");
}

/* rank 0: all parts of all-reduce a are in: sum in rank order into its buffer. */
static void ar_sum(const xcomm *x, xar *a)
{
    const op *o = a->o;
    const int n = x->c->size;
    if (!o->bf16) {
        float *acc = (float *)o->buf;
        for (int r = 1; r < n; r++)
            for (size_t j = 0; j < o->bytes / 4; j++) {
                float v, s;
                memcpy(&v, a->part[r] + 4 * j, 4);
                memcpy(&s, (unsigned char *)acc + 4 * j, 4);
                s += v;
                memcpy((unsigned char *)acc + 4 * j, &s, 4);
            }
    } else {
        unsigned char *dst = o->buf;
        for (size_t j = 0; j < o->bytes / 2; j++) {
            uint16_t v;
            memcpy(&v, dst + 2 * j, 2);
            float s = bf16_f32(v);
            for (int r = 1; r < n; r++) {
                memcpy(&v, a->part[r] + 2 * j, 2);
                s += bf16_f32(v);
            }
            v = f32_bf16(s);
            memcpy(dst + 2 * j, &v, 2);
        }
    }
    a->summed = 1;
}

/* A frame's payload has landed where it was going. */
static void took(const xcomm *x, xin *it)
{
    it->done = 1;
    if (it->ar >= 0) {
        xar *a = &x->ar[it->ar];
        if (++a->got == x->c->size - 1)
            ar_sum(x, a);
    }
}

/* The first expected frame of that kind not taken yet on link xl, or NULL. */
static xin *expect(xlink *xl, uint32_t kind)
{
    for (int i = 0; i < xl->n_in; i++)
        if (!xl->in[i].matched && xl->in[i].kind == kind)
            return &xl->in[i];
    return NULL;
}

static const xin *first_open(const xlink *xl)
{
    for (int i = 0; i < xl->n_in; i++)
        if (!xl->in[i].matched)
            return &xl->in[i];
    return NULL;
}

/*
 * Frame h from link l: does expected `it` take it (1), or may the stash
 * keep it (0)? Fails the communicator (-1) when sizes differ, or when an
 * operation alone faces a peer's other operation alone: under NCCL they
 * would wait for each other for ever.
 */
static int x_match(batch *b, xcomm *x, int l, const wire *h, xin *it)
{
    char mine[160], theirs[160];
    if (it) {
        if (h->bytes == it->bytes && (h->flags & FL_BF16) == (it->flags & FL_BF16))
            return 1;
        op_desc(mine, sizeof mine, it->o);
        frame_desc(theirs, sizeof theirs, h, peer_of(x, l));
        x_fail(b, x, HX_EIO, "%s failed: %s met %s: the %s differ", x->what, mine, theirs,
               h->kind == F_SEND ? "sizes" : "counts or types");
        return -1;
    }
    const xin *open = first_open(&x->lk[l]);
    if (!(x->solo && (h->flags & FL_SOLO)) || !open)
        return 0;
    op_desc(mine, sizeof mine, open->o);
    frame_desc(theirs, sizeof theirs, h, peer_of(x, l));
    x_fail(b, x, HX_EIO,
           "%s failed: %s met %s first: the ranks call their operations in different orders "
           "(NCCL would hang)",
           x->what, mine, theirs);
    return -1;
}

/* The link's stash against the batch's expected frames. */
static void x_stash(batch *b, xcomm *x, int l)
{
    peer_link *lnk = &x->c->links[l];
    xlink *xl = &x->lk[l];
    frame **pp = &lnk->stash, *prev = NULL;
    while (*pp && xl->n_matched < xl->n_in) {
        frame *f = *pp;
        xin *it = expect(xl, f->h.kind);
        int m = x_match(b, x, l, &f->h, it);
        if (m < 0)
            return;
        if (m == 0) {
            prev = f;
            pp = &f->next;
            continue;
        }
        if (f->h.bytes)
            memcpy(it->dst, f->data, f->h.bytes);
        it->matched = 1;
        xl->n_matched++;
        xl->n_done++;
        took(x, it);
        *pp = f->next;
        if (lnk->stash_tail == f)
            lnk->stash_tail = prev;
        free(f->data);
        free(f);
    }
}

static void add_out(xcomm *x, int l, uint32_t kind, const op *o, int ar)
{
    xlink *xl = &x->lk[l];
    uint32_t flags = (o->bf16 && kind != F_SEND ? FL_BF16 : 0) | (x->solo ? FL_SOLO : 0);
    xl->out[xl->n_out++] = (xout){{WIRE_MAGIC, kind, 0, flags, o->bytes, o->no}, o->buf, 0, ar};
}

static void add_in(xcomm *x, int l, uint32_t kind, const op *o, unsigned char *dst, int ar)
{
    xlink *xl = &x->lk[l];
    xl->in[xl->n_in++] = (xin){kind, o->bf16 && kind != F_SEND ? FL_BF16 : 0, dst, o->bytes, o,
                               ar, 0, 0};
}

/* Sends and receives of a rank to itself, paired within the batch: copies. */
static void x_self(batch *b, xcomm *x, op *ops, int n)
{
    const int me = x->c->rank;
    int is = 0, ir = 0;
    for (;;) {
        while (is < n && !(ops[is].c == x->c && ops[is].kind == OP_SEND && ops[is].peer == me))
            is++;
        while (ir < n && !(ops[ir].c == x->c && ops[ir].kind == OP_RECV && ops[ir].peer == me))
            ir++;
        if (is == n && ir == n)
            return;
        char d[160];
        if (is == n || ir == n) {
            op_desc(d, sizeof d, &ops[is < n ? is : ir]);
            x_fail(b, x, HX_ETIMEDOUT,
                   "%s failed: %s has no %s in the same group: NCCL would never finish it",
                   x->what, d, is < n ? "ncclRecv from itself" : "ncclSend to itself");
            return;
        }
        if (ops[is].bytes != ops[ir].bytes) {
            char d2[160];
            op_desc(d, sizeof d, &ops[is]);
            op_desc(d2, sizeof d2, &ops[ir]);
            x_fail(b, x, HX_EIO, "%s failed: %s met %s: the sizes differ", x->what, d, d2);
            return;
        }
        memmove(ops[ir].buf, ops[is].buf, ops[is].bytes);
        is++;
        ir++;
    }
}

/* Lays out communicator x's part of the batch: frames to write and to read. */
static void x_setup(batch *b, xcomm *x, op *ops, int n, int grouped)
{
    hx_cuda_nccl *c = x->c;
    for (int i = 0; i < n; i++)
        if (ops[i].c == c) {
            x->n_ops++;
            x->n_ar += ops[i].kind == OP_AR;
        }
    x->solo = x->n_ops == 1;
    x->what = grouped ? "ncclGroupEnd" : NULL;
    x->lk = calloc((size_t)c->size, sizeof *x->lk);
    x->ar = calloc((size_t)(x->n_ar ? x->n_ar : 1), sizeof *x->ar);
    int ok = x->lk && x->ar;
    for (int l = 0; ok && l < c->size; l++) {
        x->lk[l].out = malloc((size_t)x->n_ops * sizeof(xout));
        x->lk[l].in = malloc((size_t)x->n_ops * sizeof(xin));
        ok = x->lk[l].out && x->lk[l].in;
    }
    if (!ok) {
        x->what = x->what ? x->what : "an operation";
        x_fail(b, x, HX_ENOMEM, "%s failed: out of memory", x->what);
        return;
    }
    int n_ar = 0;
    for (int i = 0; i < n; i++) {
        op *o = &ops[i];
        if (o->c != c)
            continue;
        if (!x->what)
            x->what = OP_NAME[o->kind];
        if (o->kind == OP_AR && c->size > 1) {
            xar *a = &x->ar[n_ar];
            a->o = o;
            if (c->rank == 0) {
                if (!(a->part = calloc((size_t)c->size, sizeof *a->part))) {
                    x_fail(b, x, HX_ENOMEM, "%s failed: out of memory", x->what);
                    return;
                }
                for (int r = 1; r < c->size; r++) {
                    if (!(a->part[r] = malloc(o->bytes))) {
                        x_fail(b, x, HX_ENOMEM, "%s failed: out of memory", x->what);
                        return;
                    }
                    add_in(x, r, F_AR_UP, o, a->part[r], n_ar);
                    add_out(x, r, F_AR_DOWN, o, n_ar);
                }
            } else {
                add_out(x, 0, F_AR_UP, o, -1);
                add_in(x, 0, F_AR_DOWN, o, o->buf, -1);
            }
            n_ar++;
        } else if (o->kind == OP_SEND && o->peer != c->rank) {
            add_out(x, link_of(c, o->peer), F_SEND, o, -1);
        } else if (o->kind == OP_RECV && o->peer != c->rank) {
            add_in(x, link_of(c, o->peer), F_SEND, o, o->buf, -1);
        }
    }
    x_self(b, x, ops, n);
    for (int l = 0; l < c->size && !x->failed; l++)
        if (x->lk[l].n_in)
            x_stash(b, x, l);
}

static int x_done(const xcomm *x)
{
    if (x->failed)
        return 1;
    for (int l = 0; l < x->c->size; l++) {
        const xlink *xl = &x->lk[l];
        if (xl->i_out < xl->n_out || xl->n_done < xl->n_in || xl->reading)
            return 0;
    }
    return 1;
}

static short x_events(const xcomm *x, int l)
{
    const xlink *xl = &x->lk[l];
    short ev = 0;
    if (xl->i_out < xl->n_out) {
        const xout *o = &xl->out[xl->i_out];
        if (o->ar < 0 || x->ar[o->ar].summed)
            ev |= POLLOUT;
    }
    if (xl->reading || xl->n_matched < xl->n_in)
        ev |= POLLIN;
    return ev;
}

/* The peer of link l is gone (end of file, a reset, EPIPE): it may have said why first. */
static void x_gone(batch *b, xcomm *x, int l)
{
    const int peer = peer_of(x, l);
    peer_link *lnk = &x->c->links[l];
    xlink *xl = &x->lk[l];
    /* a closed peer's frames are all here already: look for an F_ABORT among them */
    if (!xl->reading) {
        unsigned char skip[4096];
        wire h;
        while (io_all(lnk->fd, &h, sizeof h, 0, 0) == IO_OK && h.magic == WIRE_MAGIC) {
            uint64_t left = h.bytes;
            if (h.kind == F_ABORT && left < sizeof xl->note) {
                if (io_all(lnk->fd, xl->note, (size_t)left, 0, 0) != IO_OK)
                    break;
                xl->note[left] = '\0';
                x_fail(b, x, HX_ECONN, "%s failed: rank %d aborted the communicator after %s",
                       x->what, peer, xl->note);
                return;
            }
            if (h.kind == F_BYE)
                break;
            while (left > 0) {
                size_t n = left < sizeof skip ? (size_t)left : sizeof skip;
                ssize_t r = recv(lnk->fd, skip, n, MSG_DONTWAIT);
                if (r <= 0)
                    goto closed;
                left -= (uint64_t)r;
            }
        }
    }
closed:
    x_fail(b, x, HX_ECONN, "%s failed: peer rank %d closed the connection (its process may have "
                           "died)",
           x->what, peer);
}

/* A header has arrived on link l: where does its payload go? */
static void x_route(batch *b, xcomm *x, int l)
{
    peer_link *lnk = &x->c->links[l];
    xlink *xl = &x->lk[l];
    const wire *h = &xl->h;
    const int peer = peer_of(x, l);
    const uint32_t data_kind = x->c->rank == 0 ? F_AR_UP : F_AR_DOWN;
    if (h->magic != WIRE_MAGIC || h->seq != lnk->seq_in) {
        x_fail(b, x, HX_EIO, "%s failed: a garbled frame from rank %d", x->what, peer);
        return;
    }
    lnk->seq_in++;
    xl->dst = NULL;
    xl->target = NULL;
    xl->note_frame = 0;
    xl->left = (size_t)h->bytes;
    if (h->kind == F_ABORT) {
        if (h->bytes >= sizeof xl->note) {
            x_fail(b, x, HX_EIO, "%s failed: a garbled frame from rank %d", x->what, peer);
            return;
        }
        xl->dst = (unsigned char *)xl->note;
        xl->note_frame = 1;
        return;
    }
    if (h->kind == F_BYE) {
        x_fail(b, x, HX_ECONN, "%s failed: peer rank %d freed its communicator", x->what, peer);
        return;
    }
    if (h->kind != F_SEND && h->kind != data_kind) {
        x_fail(b, x, HX_EIO, "%s failed: a garbled frame from rank %d", x->what, peer);
        return;
    }
    xin *it = expect(xl, h->kind);
    int m = x_match(b, x, l, h, it);
    if (m < 0)
        return;
    if (m == 1) {
        it->matched = 1;
        xl->n_matched++;
        xl->target = it;
        xl->dst = it->dst;
        return;
    }
    frame *f = calloc(1, sizeof *f);
    unsigned char *data = f ? malloc(h->bytes ? (size_t)h->bytes : 1) : NULL;
    if (!data) {
        free(f);
        x_fail(b, x, HX_ENOMEM, "%s failed: out of memory for a frame from rank %d", x->what,
               peer);
        return;
    }
    f->h = *h;
    f->data = data;
    xl->fr = f;
    xl->dst = data;
}

/* A frame has been read in full. */
static void x_landed(batch *b, xcomm *x, int l)
{
    peer_link *lnk = &x->c->links[l];
    xlink *xl = &x->lk[l];
    xl->reading = 0;
    xl->h_got = 0;
    if (xl->note_frame) {
        xl->note[xl->h.bytes] = '\0';
        x_fail(b, x, HX_ECONN, "%s failed: rank %d aborted the communicator after %s", x->what,
               peer_of(x, l), xl->note);
    } else if (xl->target) {
        xl->n_done++;
        took(x, xl->target);
    } else if (xl->fr) {
        if (lnk->stash_tail)
            lnk->stash_tail->next = xl->fr;
        else
            lnk->stash = xl->fr;
        lnk->stash_tail = xl->fr;
    }
    xl->fr = NULL;
    xl->target = NULL;
}

/*
 * A read or write on link l failed (errno): 1 to try again (EINTR), else 0,
 * having noted a peer gone or failed the batch (EAGAIN: nothing to do now).
 */
static int x_io_failed(batch *b, xcomm *x, int l, const char *doing)
{
    if (errno == EINTR)
        return 1;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
    if (errno == ECONNRESET || errno == EPIPE)
        x_gone(b, x, l);
    else
        x_fail(b, x, HX_ECONN, "%s failed: %s rank %d: %s", x->what, doing, peer_of(x, l),
               strerror(errno));
    return 0;
}

/* Reads on link l what there is, as long as the batch wants it. */
static void x_read(batch *b, xcomm *x, int l)
{
    const int fd = x->c->links[l].fd;
    xlink *xl = &x->lk[l];
    while (!x->failed && (xl->reading || xl->n_matched < xl->n_in)) {
        void *p;
        size_t want;
        if (!xl->reading || xl->h_got < sizeof xl->h) {
            p = (unsigned char *)&xl->h + xl->h_got;
            want = sizeof xl->h - xl->h_got;
        } else {
            p = xl->dst;
            want = xl->left;
        }
        ssize_t r = want ? recv(fd, p, want, MSG_DONTWAIT) : 0;
        if (want && r == 0) {
            x_gone(b, x, l);
            return;
        }
        if (r < 0) {
            if (x_io_failed(b, x, l, "reading from"))
                continue;
            return;
        }
        if (!xl->reading || xl->h_got < sizeof xl->h) {
            xl->reading = 1;
            xl->h_got += (size_t)r;
            if (xl->h_got < sizeof xl->h)
                continue;
            x_route(b, x, l);
            if (x->failed)
                return;
        } else {
            xl->dst += r;
            xl->left -= (size_t)r;
        }
        if (xl->left == 0)
            x_landed(b, x, l);
    }
}

/* Writes on link l what is ready, in order. */
static void x_write(batch *b, xcomm *x, int l)
{
    peer_link *lnk = &x->c->links[l];
    xlink *xl = &x->lk[l];
    while (!x->failed && xl->i_out < xl->n_out) {
        xout *o = &xl->out[xl->i_out];
        if (o->ar >= 0 && !x->ar[o->ar].summed)
            return;
        const size_t total = sizeof o->h + (size_t)o->h.bytes;
        if (o->done == 0) /* numbered as written: an abort's note may follow any frame */
            o->h.seq = lnk->seq_out;
        struct iovec iov[2];
        int n = 0;
        if (o->done < sizeof o->h)
            iov[n++] = (struct iovec){(unsigned char *)&o->h + o->done, sizeof o->h - o->done};
        if (o->h.bytes) {
            size_t at = o->done > sizeof o->h ? o->done - sizeof o->h : 0;
            iov[n++] = (struct iovec){(void *)(uintptr_t)(o->data + at), (size_t)o->h.bytes - at};
        }
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)n;
        ssize_t r = sendmsg(lnk->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0) {
            if (x_io_failed(b, x, l, "writing to"))
                continue;
            return;
        }
        if (o->done == 0)
            lnk->seq_out++;
        lnk->mid_frame = 1;
        o->done += (size_t)r;
        if (o->done == total) {
            lnk->mid_frame = 0;
            xl->i_out++;
        }
    }
}

/* What an unfinished communicator was waiting for, for the timeout's message. */
static void x_waiting(const xcomm *x, char *out, size_t n)
{
    snprintf(out, n, "nothing left to do");
    for (int l = 0; l < x->c->size; l++) {
        const xlink *xl = &x->lk[l];
        const peer_link *lnk = &x->c->links[l];
        const int peer = peer_of(x, l);
        if (xl->reading || xl->n_matched < xl->n_in) {
            char d[160] = "a frame", s[200] = "";
            const xin *it = first_open(xl);
            if (it && !xl->reading)
                op_desc(d, sizeof d, it->o);
            if (lnk->stash) {
                char t[160];
                frame_desc(t, sizeof t, &lnk->stash->h, peer);
                snprintf(s, sizeof s, "; it sent %s, which nothing here took", t);
            }
            snprintf(out, n, "%s waits for rank %d%s", d, peer, s);
            return;
        }
        if (xl->i_out < xl->n_out) {
            snprintf(out, n, "rank %d does not read what this rank sends it", peer);
            return;
        }
    }
}

/* Runs ops[0..n) together: one op outside a group, a group's ops at its end. */
/* $HX_CUDA_EMU_NCCL_HANG: the operation (counted over the process) that never ends; 0: none. */
static atomic_llong ops_run;

static void maybe_hang(void)
{
    const char *s = getenv("HX_CUDA_EMU_NCCL_HANG");
    const long long n = s ? atoll(s) : 0;
    if (n > 0 && atomic_fetch_add(&ops_run, 1) + 1 >= n)
        for (;;)
            pause();
}

static hx_status run_batch(op *ops, int n, int grouped, hx_err *err)
{
    maybe_hang();
    batch b;
    memset(&b, 0, sizeof b);
    b.err = err;
    for (int i = 0; i < n; i++) {
        if (ops[i].c->aborted)
            continue;
        int k = 0;
        while (k < b.n && b.x[k].c != ops[i].c)
            k++;
        if (k == b.n && b.n < GROUP_MAX)
            b.x[b.n++].c = ops[i].c;
    }
    int n_links = 0;
    for (int k = 0; k < b.n; k++) {
        x_setup(&b, &b.x[k], ops, n, grouped);
        n_links += b.x[k].c->size;
    }
    struct pollfd *pf = calloc((size_t)n_links + 1, sizeof *pf);
    int *at = calloc((size_t)n_links + 1, sizeof *at);
    if (!pf || !at)
        for (int k = 0; k < b.n; k++)
            x_fail(&b, &b.x[k], HX_ENOMEM, "%s failed: out of memory",
                   b.x[k].what ? b.x[k].what : "an operation");
    const double bound = op_s(), deadline = now_s() + bound;
    for (;;) {
        int np = 0;
        for (int k = 0; k < b.n; k++) {
            xcomm *x = &b.x[k];
            for (int l = 0; !x_done(x) && l < x->c->size; l++) {
                short ev = x->c->links[l].fd >= 0 ? x_events(x, l) : 0;
                if (ev) {
                    pf[np] = (struct pollfd){x->c->links[l].fd, ev, 0};
                    at[np++] = k * 65536 + l;
                }
            }
        }
        if (np == 0)
            break;
        int ms = ms_left(deadline);
        if (ms == 0) {
            for (int k = 0; k < b.n; k++) {
                if (x_done(&b.x[k]))
                    continue;
                char w[400];
                x_waiting(&b.x[k], w, sizeof w);
                x_fail(&b, &b.x[k], HX_ETIMEDOUT,
                       "%s did not finish within %.0f s (a peer may have died; %s)",
                       b.x[k].what, bound, w);
            }
            break;
        }
        if (poll(pf, (nfds_t)np, ms) < 0) {
            if (errno == EINTR)
                continue;
            for (int k = 0; k < b.n; k++)
                x_fail(&b, &b.x[k], HX_ECONN, "%s failed: poll: %s", b.x[k].what,
                       strerror(errno));
            break;
        }
        for (int i = 0; i < np; i++) {
            xcomm *x = &b.x[at[i] / 65536];
            const int l = at[i] % 65536;
            if (!pf[i].revents || x->failed)
                continue;
            if (pf[i].events & POLLIN)
                x_read(&b, x, l);
            if ((pf[i].events & POLLOUT) && !x->failed)
                x_write(&b, x, l);
        }
    }
    free(pf);
    free(at);
    for (int k = 0; k < b.n; k++) {
        xcomm *x = &b.x[k];
        for (int l = 0; x->lk && l < x->c->size; l++) {
            if (x->lk[l].fr) {
                free(x->lk[l].fr->data);
                free(x->lk[l].fr);
            }
            free(x->lk[l].out);
            free(x->lk[l].in);
        }
        for (int a = 0; x->ar && a < x->n_ar; a++) {
            for (int r = 0; x->ar[a].part && r < x->c->size; r++)
                free(x->ar[a].part[r]);
            free(x->ar[a].part);
        }
        free(x->lk);
        free(x->ar);
    }
    return b.first;
}

/* ---- groups ---- */

static hx_status device_check(const struct op *o, int *faulted, hx_err *err);

/*
 * Per thread: the depth of hx_cuda_nccl_group_start calls, the
 * communicators used inside the outermost group and its operations, run by
 * its group_end; whether an operation of the group was refused (NCCL then
 * drops the group and fails its communicators).
 */
static _Thread_local int group_depth;
static _Thread_local int group_n;
static _Thread_local hx_cuda_nccl *group_comms[GROUP_MAX];
static _Thread_local op *group_ops;
static _Thread_local int group_n_ops, group_cap;
static _Thread_local char group_refused[300];

static hx_status group_add(hx_cuda_nccl *c, hx_err *err)
{
    for (int i = 0; i < group_n; i++)
        if (group_comms[i] == c)
            return HX_OK;
    if (group_n == GROUP_MAX)
        return hx_err_set(err, HX_EINVAL, "nccl: a group uses more than %d communicators",
                          GROUP_MAX);
    group_comms[group_n++] = c;
    return HX_OK;
}

hx_status hx_cuda_nccl_group_start(hx_err *err)
{
    (void)err;
    if (group_depth++ == 0) {
        group_n = 0;
        group_n_ops = 0;
        group_refused[0] = '\0';
    }
    return HX_OK;
}

hx_status hx_cuda_nccl_group_end(hx_err *err)
{
    if (group_depth == 0)
        return hx_err_set(err, HX_EINVAL, "nccl: ncclGroupEnd: invalid usage (no group started)");
    if (--group_depth > 0) /* an inner group: the outermost one launches */
        return HX_OK;
    op *ops = group_ops;
    const int n = group_n_ops, n_comms = group_n;
    group_ops = NULL;
    group_n_ops = group_cap = group_n = 0;
    hx_status st = HX_OK;
    if (group_refused[0]) {
        for (int i = 0; i < n_comms; i++) {
            hx_cuda_nccl *c = group_comms[i];
            if (c->aborted)
                continue;
            char why[WHY_MAX];
            snprintf(why, sizeof why, "ncclGroupEnd failed: invalid argument (%s)",
                     group_refused);
            abort_comm(c, why);
            if (st == HX_OK)
                st = hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: %s; communicator aborted",
                                c->rank, c->size, why);
        }
        if (st == HX_OK)
            st = hx_err_set(err, HX_EINVAL, "nccl: ncclGroupEnd: invalid argument (%s)",
                            group_refused);
        group_refused[0] = '\0';
    } else {
        /* launch: what the device refuses fails its communicator; a buffer it faults on is
           left out (the sticky error tells); empty operations are nothing to do */
        int k = 0;
        for (int i = 0; i < n; i++) {
            op *o = &ops[i];
            int faulted = 0;
            hx_err e = {0};
            if (o->c->aborted)
                continue;
            hx_status dst = device_check(o, &faulted, &e);
            if (dst != HX_OK) {
                char why[WHY_MAX];
                snprintf(why, sizeof why, "ncclGroupEnd failed: %.400s", e.msg);
                abort_comm(o->c, why);
                if (st == HX_OK)
                    st = hx_err_set(err, dst, "nccl: rank %d of %d: %s; communicator aborted",
                                    o->c->rank, o->c->size, why);
                continue;
            }
            if (!faulted && o->bytes > 0)
                ops[k++] = *o;
        }
        if (k > 0) {
            hx_status rst = run_batch(ops, k, 1, st == HX_OK ? err : NULL);
            if (st == HX_OK)
                st = rst;
        }
    }
    free(ops);
    return st;
}

/* ---- operations ---- */

typedef struct check_args {
    const void *p;
    size_t bytes;
    const char *name;
} check_args;

static void check_kernel(const void *args)
{
    const check_args *a = args;
    (void)emu_need(a->p, a->bytes, a->name);
}

/*
 * As NCCL's kernel would touch o's buffer on its stream: through the
 * emulated device on the communicator's device. HX_OK and *faulted 1 when
 * the buffer is not the device's (the sticky error then says so at the next
 * call, as on a GPU, and the operation is not done); an error when the
 * device refuses the launch.
 */
static const char *const buf_name[] = {"ncclAllReduce buffer", "ncclSend buffer",
                                       "ncclRecv buffer"};

static hx_status device_check(const op *o, int *faulted, hx_err *err)
{
    *faulted = 0;
    const int was = emu_device();
    hx_status st = was == o->c->device ? HX_OK : hx_cuda_set_device(o->c->device, err);
    if (st != HX_OK)
        return st;
    check_args a = {o->buf, o->bytes, buf_name[o->kind]};
    st = emu_launch(o->stream, check_kernel, &a, sizeof a, OP_NAME[o->kind], err);
    if (st == HX_OK && emu_sticky(OP_NAME[o->kind], NULL) != HX_OK)
        *faulted = 1;
    if (was != o->c->device)
        (void)hx_cuda_set_device(was, NULL);
    return st;
}

/*
 * An operation captured into a CUDA graph (NCCL's kernel is a node of it):
 * it runs at each replay, numbered then, as every rank replays its graph in
 * the same order; a failure aborts the communicator (run_batch), which the
 * next call or hx_cuda_nccl_wait reports, as an asynchronous NCCL error.
 */
static void replay_kernel(const void *args)
{
    op o = *(const op *)args;
    if (o.c->aborted || !emu_need(o.buf, o.bytes, buf_name[o.kind]) || o.bytes == 0)
        return;
    o.no = ++o.c->n_ops;
    hx_err ignored = {0};
    (void)run_batch(&o, 1, 0, &ignored);
}

static hx_status issue(hx_cuda_nccl *c, int kind, void *buf, size_t n, int bf16, int peer,
                       hx_cuda_stream *stream, hx_err *err)
{
    if (c->aborted)
        return aborted_err(c, err);
    hx_status st = group_depth > 0 ? group_add(c, err) : HX_OK;
    if (st != HX_OK)
        return st;
    /* NCCL's argument checks: invalid argument (HX_EINVAL, as nccl.cu maps it) */
    const size_t esz = kind == OP_AR ? elem_bytes(bf16) : 1;
    char bad[200] = "";
    if (kind != OP_AR && (peer < 0 || peer >= c->size))
        snprintf(bad, sizeof bad, "peer %d is not a rank of %d", peer, c->size);
    else if (n > SIZE_MAX / esz)
        snprintf(bad, sizeof bad, "count %zu is too large", n);
    else if (n > 0 && !buf)
        snprintf(bad, sizeof bad, "a NULL buffer");
    if (bad[0]) {
        if (group_depth > 0 && !group_refused[0])
            snprintf(group_refused, sizeof group_refused, "%s: %s", OP_NAME[kind], bad);
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: %s: invalid argument (%s)", c->rank,
                          c->size, OP_NAME[kind], bad);
    }
    if (kind != OP_AR && c->rank != 0 && peer != 0 && peer != c->rank)
        return hx_err_set(err, HX_ENOTSUP,
                          "nccl emulation: %s between ranks %d and %d of %d is not emulated "
                          "(only rank 0 talks to the others)",
                          kind == OP_SEND ? "send" : "recv", c->rank, peer, c->size);
    if (group_depth == 0 && emu_capturing(stream)) {
        op o = {c, kind, bf16 != 0, peer, buf, n * esz, stream, 0};
        return emu_launch(stream, replay_kernel, &o, sizeof o, OP_NAME[kind], err);
    }
    op o = {c, kind, bf16 != 0, peer, buf, n * esz, stream, ++c->n_ops};
    if (group_depth > 0) {
        if (group_n_ops == group_cap) {
            int cap = group_cap ? 2 * group_cap : 16;
            op *grown = realloc(group_ops, (size_t)cap * sizeof *grown);
            if (!grown) {
                if (!group_refused[0])
                    snprintf(group_refused, sizeof group_refused, "out of memory");
                return hx_err_set(err, HX_ENOMEM, "nccl: out of memory");
            }
            group_ops = grown;
            group_cap = cap;
        }
        group_ops[group_n_ops++] = o;
        return HX_OK;
    }
    int faulted = 0;
    if ((st = device_check(&o, &faulted, err)) != HX_OK || faulted || o.bytes == 0)
        return st;
    return run_batch(&o, 1, 0, err);
}

hx_status hx_cuda_nccl_allreduce(hx_cuda_nccl *c, void *d_buf, size_t count, int is_bf16,
                                 hx_cuda_stream *stream, hx_err *err)
{
    return issue(c, OP_AR, d_buf, count, is_bf16, 0, stream, err);
}

hx_status hx_cuda_nccl_send(hx_cuda_nccl *c, const void *d_buf, size_t bytes, int peer,
                            hx_cuda_stream *stream, hx_err *err)
{
    return issue(c, OP_SEND, (void *)(uintptr_t)d_buf, bytes, 0, peer, stream, err);
}

hx_status hx_cuda_nccl_recv(hx_cuda_nccl *c, void *d_buf, size_t bytes, int peer,
                            hx_cuda_stream *stream, hx_err *err)
{
    return issue(c, OP_RECV, d_buf, bytes, 0, peer, stream, err);
}

hx_status hx_cuda_nccl_wait(hx_cuda_nccl *c, hx_cuda_stream *s, double timeout_s, hx_err *err)
{
    (void)s;
    if (c->aborted)
        return aborted_err(c, err);
    if (!(timeout_s > 0))
        return hx_err_set(err, HX_EINVAL, "nccl: rank %d of %d: bad timeout %g s", c->rank,
                          c->size, timeout_s);
    return emu_sticky("cudaStreamQuery", err); /* the work itself was done at the call */
}

void hx_cuda_nccl_free(hx_cuda_nccl *c)
{
    if (!c)
        return;
    if (!c->aborted)
        drop_links(c, F_BYE, NULL);
    for (int i = 0; i < group_n; i++) /* a group left open by an error */
        if (group_comms[i] == c)
            group_comms[i] = group_comms[--group_n];
    int k = 0;
    for (int i = 0; i < group_n_ops; i++)
        if (group_ops[i].c != c)
            group_ops[k++] = group_ops[i];
    group_n_ops = k;
    free(c->links);
    free(c);
}
