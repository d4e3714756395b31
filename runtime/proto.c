/*
 * proto.c - the runtime wire protocol: framing, the authentication handshake,
 * per-frame tags, message codecs, secrets, sockets. See proto.h and
 * docs/runtime-protocol.md.
 *
 * I/O model: sockets are non-blocking; every read and write first tries the
 * system call and, on EAGAIN, waits in poll() for at most the time left to the
 * deadline. Reads go through a 64 KiB buffer owned by the connection, except
 * that large payload reads go straight into the payload buffer; the tag is
 * computed on each piece as it lands, while it is in cache. Sends build no
 * frame buffer: header, payload parts and tag go out with sendmsg(), and the
 * tag is computed in 256 KiB windows just ahead of what is being sent.
 */
#include "runtime/proto.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "common/file.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "runtime/proto.c sends and decodes token ids and KV data in host order: little-endian hosts only"
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* (not Linux) SIGPIPE must then be ignored by the process */
#endif

#define RBUF_BYTES ((size_t)64 << 10)     /* connection read buffer */
#define DIRECT_READ_MIN ((size_t)16 << 10) /* reads at least this big bypass it */
#define MAC_WINDOW ((uint64_t)256 << 10)   /* bytes tagged ahead of the socket */
#define PEER_MAX 160

static const unsigned char MAGIC[4] = {'H', 'X', 'F', '1'};
static const char AUTH_LABEL[] = "hexflow-auth-v1";
static const char KEY_LABEL_C2S[] = "hexflow-key-v1 client->server";
static const char KEY_LABEL_S2C[] = "hexflow-key-v1 server->client";

/* ---- little-endian helpers ----------------------------------------------- */

static void put_u16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint16_t get_u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_f32(unsigned char *p, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    put_u32(p, v);
}

static float get_f32(const unsigned char *p)
{
    uint32_t v = get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

/* ---- message types --------------------------------------------------------- */

typedef struct type_info {
    const char *name;
    uint64_t max_bytes; /* default payload limit */
    int request_scoped; /* needs req_id != 0 */
} type_info;

static const type_info TYPES[HX_PROTO_TYPE_LIMIT] = {
    [HX_PROTO_AUTH_CHALLENGE] = {"AUTH_CHALLENGE", HX_PROTO_NONCE_BYTES, 0},
    [HX_PROTO_AUTH_RESPONSE] = {"AUTH_RESPONSE",
                                HX_PROTO_NONCE_BYTES + HX_PROTO_PROOF_BYTES + HX_PROTO_ROLE_MAX, 0},
    [HX_PROTO_AUTH_OK] = {"AUTH_OK", HX_PROTO_PROOF_BYTES, 0},
    [HX_PROTO_AUTH_FAIL] = {"AUTH_FAIL", HX_PROTO_AUTH_FAIL_MAX, 0},
    [HX_PROTO_HELLO] = {"HELLO", 12 + HX_PROTO_NAME_MAX + HX_PROTO_SOFTWARE_VERSION_MAX, 0},
    [HX_PROTO_PREFILL_REQUEST] = {"PREFILL_REQUEST", HX_PROTO_DEFAULT_MAX_PREFILL_BYTES, 1},
    [HX_PROTO_FIRST_TOKEN] = {"FIRST_TOKEN", HX_PROTO_FIRST_TOKEN_BYTES, 1},
    [HX_PROTO_KV_SEGMENT] = {"KV_SEGMENT", HX_PROTO_DEFAULT_MAX_KV_SEGMENT_BYTES, 1},
    [HX_PROTO_KV_ACK] = {"KV_ACK", HX_PROTO_KV_ACK_BYTES, 1},
    [HX_PROTO_TOKENS] = {"TOKENS", HX_PROTO_DEFAULT_MAX_TOKENS_BYTES, 1},
    [HX_PROTO_DONE] = {"DONE", HX_PROTO_DONE_BYTES, 1},
    [HX_PROTO_ERROR] = {"ERROR", 6 + HX_PROTO_ERROR_MESSAGE_MAX, 0},
    [HX_PROTO_HEALTH] = {"HEALTH", 0, 0},
    [HX_PROTO_HEALTH_OK] = {"HEALTH_OK", 8 + 8 * HX_PROTO_HEALTH_MAX_COUNTERS, 0},
    [HX_PROTO_SHUTDOWN] = {"SHUTDOWN", 6 + HX_PROTO_REASON_MAX, 0},
    [HX_PROTO_GROUP_OP] = {"GROUP_OP", HX_PROTO_DEFAULT_MAX_PREFILL_BYTES, 0},
    [HX_PROTO_TENSOR] = {"TENSOR", (uint64_t)1 << 30, 0},
    [HX_PROTO_STEP_TOKENS] = {"STEP_TOKENS", HX_PROTO_DEFAULT_MAX_TOKENS_BYTES, 0},
    [HX_PROTO_GROUP_SETUP] = {"GROUP_SETUP", HX_PROTO_GROUP_SETUP_BYTES, 0},
};

const char *hx_proto_type_name(int type)
{
    if (type < 0 || type >= HX_PROTO_TYPE_LIMIT)
        return NULL;
    return TYPES[type].name;
}

static int is_auth_type(int type)
{
    return type >= HX_PROTO_AUTH_CHALLENGE && type <= HX_PROTO_AUTH_FAIL;
}

uint64_t hx_proto_default_max_payload(hx_proto_type type)
{
    const char *name = hx_proto_type_name((int)type);
    return name ? TYPES[type].max_bytes : 0;
}

/* ---- deadlines ------------------------------------------------------------- */

int64_t hx_proto_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + (int64_t)ts.tv_nsec;
}

int64_t hx_proto_deadline_in(double seconds)
{
    int64_t now = hx_proto_now_ns();
    if (!(seconds > 0))
        return now;
    if (seconds >= 1e9) /* 31 years */
        return HX_PROTO_NO_DEADLINE;
    return now + (int64_t)(seconds * 1e9);
}

static int64_t min_deadline(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static double seconds_since(int64_t start_ns)
{
    return (double)(hx_proto_now_ns() - start_ns) * 1e-9;
}

/*
 * Waits until `fd` is ready for `events` or the deadline passes. HX_OK when
 * ready (or on POLLHUP/POLLERR: the next system call reports those).
 */
static hx_status wait_fd(int fd, short events, int64_t deadline_ns, int *sys_errno)
{
    for (;;) {
        int ms = -1;
        if (deadline_ns != HX_PROTO_NO_DEADLINE) {
            int64_t left = deadline_ns - hx_proto_now_ns();
            if (left < 0)
                left = 0;
            int64_t m = (left + 999999) / 1000000;
            ms = m > INT_MAX ? INT_MAX : (int)m;
        }
        struct pollfd p = {.fd = fd, .events = events, .revents = 0};
        int r = poll(&p, 1, ms);
        if (r > 0)
            return HX_OK;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *sys_errno = errno;
            return HX_EIO;
        }
        if (deadline_ns != HX_PROTO_NO_DEADLINE && hx_proto_now_ns() >= deadline_ns)
            return HX_ETIMEDOUT;
    }
}

static int set_nonblocking_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    int fd_fl = fcntl(fd, F_GETFD);
    if (fd_fl < 0 || fcntl(fd, F_SETFD, fd_fl | FD_CLOEXEC) < 0)
        return -1;
    return 0;
}

/* ---- secrets --------------------------------------------------------------- */

static hx_status secret_from_buffer(hx_proto_secret *out, const unsigned char *buf, size_t len,
                                    const char *what, hx_err *err)
{
    while (len > 0 && (buf[len - 1] == ' ' || buf[len - 1] == '\t' || buf[len - 1] == '\n' ||
                       buf[len - 1] == '\r'))
        len--;
    if (len < HX_PROTO_SECRET_MIN_BYTES)
        return hx_err_set(err, HX_EINVAL,
                          "%s holds %zu bytes of secret; at least %d are needed (generate one "
                          "with 'openssl rand -hex 32')",
                          what, len, HX_PROTO_SECRET_MIN_BYTES);
    if (len > HX_PROTO_SECRET_MAX_BYTES)
        return hx_err_set(err, HX_EINVAL, "%s holds %zu bytes of secret; at most %d are allowed",
                          what, len, HX_PROTO_SECRET_MAX_BYTES);
    memcpy(out->bytes, buf, len);
    out->len = len;
    return HX_OK;
}

hx_status hx_proto_secret_set(hx_proto_secret *out, const void *key, size_t len, hx_err *err)
{
    if (!out || (!key && len))
        return hx_err_set(err, HX_EINVAL, "hx_proto_secret_set: NULL argument");
    memset(out, 0, sizeof *out);
    /* no whitespace trimming for a key given as bytes */
    if (len < HX_PROTO_SECRET_MIN_BYTES || len > HX_PROTO_SECRET_MAX_BYTES)
        return hx_err_set(err, HX_EINVAL, "a secret of %zu bytes; %d to %d are needed", len,
                          HX_PROTO_SECRET_MIN_BYTES, HX_PROTO_SECRET_MAX_BYTES);
    memcpy(out->bytes, key, len);
    out->len = len;
    return HX_OK;
}

hx_status hx_proto_secret_load_file(const char *path, hx_proto_secret *out, hx_err *err)
{
    unsigned char buf[HX_PROTO_SECRET_MAX_BYTES + 256];
    char what[PATH_MAX + 32];
    hx_status st = HX_OK;
    size_t len = 0;
    if (!path || !out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_secret_load_file: NULL argument");
    memset(out, 0, sizeof *out);

    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        return hx_err_set(err, hx_status_from_errno(e), "cannot open secret file '%s': %s", path,
                          hx_errno_text(e));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        st = hx_err_set(err, HX_EIO, "cannot stat secret file '%s': %s", path, hx_errno_text(e));
        goto out_close;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = hx_err_set(err, HX_EINVAL, "secret file '%s' is not a regular file", path);
        goto out_close;
    }
    if (sb.st_uid != geteuid()) {
        st = hx_err_set(err, HX_EINVAL,
                        "secret file '%s' belongs to uid %lu, not to this user (uid %lu); the "
                        "secret must be owned by the user that runs hexflow",
                        path, (unsigned long)sb.st_uid, (unsigned long)geteuid());
        goto out_close;
    }
    unsigned mode = (unsigned)(sb.st_mode & 0777);
    if (mode & 077) {
        const char *how = (mode & 044) ? "readable" : (mode & 022) ? "writable" : "accessible";
        st = hx_err_set(err, HX_EINVAL, "secret file '%s' is %s by others (mode %04o); chmod 600 it",
                        path, how, mode);
        goto out_close;
    }
    for (;;) {
        if (len == sizeof buf) {
            st = hx_err_set(err, HX_EINVAL,
                            "secret file '%s' is larger than %zu bytes; is it the right file?",
                            path, sizeof buf - 1);
            goto out_close;
        }
        ssize_t r = read(fd, buf + len, sizeof buf - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            st = hx_err_set(err, HX_EIO, "cannot read secret file '%s': %s", path,
                            hx_errno_text(e));
            goto out_close;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    snprintf(what, sizeof what, "secret file '%s'", path);
    st = secret_from_buffer(out, buf, len, what, err);
out_close:
    close(fd);
    OPENSSL_cleanse(buf, sizeof buf);
    return st;
}

hx_status hx_proto_secret_load_fd(int fd, int64_t deadline_ns, hx_proto_secret *out,
                                  hx_err *err)
{
    unsigned char buf[HX_PROTO_SECRET_MAX_BYTES + 256];
    char what[64];
    hx_status st = HX_OK;
    size_t len = 0;
    if (!out || fd < 0)
        return hx_err_set(err, HX_EINVAL, "hx_proto_secret_load_fd: bad argument");
    memset(out, 0, sizeof *out);
    snprintf(what, sizeof what, "secret from file descriptor %d", fd);
    for (;;) {
        if (len == sizeof buf) {
            st = hx_err_set(err, HX_EINVAL, "%s is larger than %zu bytes", what, sizeof buf - 1);
            goto out;
        }
        int sys_errno = 0;
        hx_status w = wait_fd(fd, POLLIN, deadline_ns, &sys_errno);
        if (w == HX_ETIMEDOUT) {
            st = hx_err_set(err, HX_ETIMEDOUT,
                            "timed out reading the %s: got %zu bytes and no end of file", what,
                            len);
            goto out;
        }
        if (w != HX_OK) {
            st = hx_err_set(err, HX_EIO, "cannot wait for the %s: %s", what,
                            hx_errno_text(sys_errno));
            goto out;
        }
        ssize_t r = read(fd, buf + len, sizeof buf - len);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            int e = errno;
            st = hx_err_set(err, HX_EIO, "cannot read the %s: %s", what, hx_errno_text(e));
            goto out;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    st = secret_from_buffer(out, buf, len, what, err);
out:
    OPENSSL_cleanse(buf, sizeof buf);
    return st;
}

hx_status hx_proto_secret_generate(hx_proto_secret *out, hx_err *err)
{
    unsigned char raw[32];
    static const char hex[] = "0123456789abcdef";
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_secret_generate: NULL argument");
    memset(out, 0, sizeof *out);
    if (RAND_bytes(raw, (int)sizeof raw) != 1)
        return hx_err_set(err, HX_EINTERNAL, "cannot get random bytes from OpenSSL (RAND_bytes)");
    for (size_t i = 0; i < sizeof raw; i++) {
        out->bytes[2 * i] = (unsigned char)hex[raw[i] >> 4];
        out->bytes[2 * i + 1] = (unsigned char)hex[raw[i] & 15];
    }
    out->len = 2 * sizeof raw;
    OPENSSL_cleanse(raw, sizeof raw);
    return HX_OK;
}

hx_status hx_proto_secret_write_file(const char *path, const hx_proto_secret *s, hx_err *err)
{
    char tmp[PATH_MAX];
    hx_status st = HX_OK;
    if (!path || !s || s->len < HX_PROTO_SECRET_MIN_BYTES || s->len > HX_PROTO_SECRET_MAX_BYTES)
        return hx_err_set(err, HX_EINVAL, "hx_proto_secret_write_file: bad argument");
    if (snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path) >= (int)sizeof tmp)
        return hx_err_set(err, HX_EINVAL, "secret file path '%s' is too long", path);
    int fd = mkstemp(tmp); /* mode 0600 */
    if (fd < 0) {
        int e = errno;
        return hx_err_set(err, hx_status_from_errno(e), "cannot create secret file '%s': %s",
                          tmp, hx_errno_text(e));
    }
    const unsigned char nl = '\n';
    size_t off = 0;
    while (off < s->len + 1) {
        const unsigned char *p = off < s->len ? s->bytes + off : &nl;
        size_t n = off < s->len ? s->len - off : 1;
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            st = hx_err_set(err, HX_EIO, "cannot write secret file '%s': %s", tmp,
                            hx_errno_text(e));
            goto out_unlink;
        }
        off += (size_t)w;
    }
    if (fchmod(fd, 0600) != 0 || fsync(fd) != 0) {
        int e = errno;
        st = hx_err_set(err, HX_EIO, "cannot write secret file '%s': %s", tmp, hx_errno_text(e));
        goto out_unlink;
    }
    if (close(fd) != 0) {
        int e = errno;
        fd = -1;
        st = hx_err_set(err, HX_EIO, "cannot write secret file '%s': %s", tmp, hx_errno_text(e));
        goto out_unlink;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        int e = errno;
        st = hx_err_set(err, hx_status_from_errno(e), "cannot write secret file '%s': %s", path,
                        hx_errno_text(e));
        goto out_unlink;
    }
    return HX_OK;
out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return st;
}

void hx_proto_secret_release(hx_proto_secret *s)
{
    if (s)
        OPENSSL_cleanse(s, sizeof *s);
}

static int secret_ok(const hx_proto_secret *s)
{
    return s && s->len >= HX_PROTO_SECRET_MIN_BYTES && s->len <= HX_PROTO_SECRET_MAX_BYTES;
}

/* ---- connections ------------------------------------------------------------ */

struct hx_proto_conn {
    int fd;           /* owned */
    int is_server;
    int authed;
    char peer[PEER_MAX];                /* address */
    char role[HX_PROTO_ROLE_MAX + 1];   /* the client's role */
    char who[PEER_MAX + HX_PROTO_ROLE_MAX + 16]; /* address and role, for messages */
    uint64_t max_payload[HX_PROTO_TYPE_LIMIT];
    /* sending side */
    EVP_CIPHER_CTX *send_mac; /* owned; NULL before authentication */
    uint64_t send_seq;
    int send_broken;
    /* receiving side */
    EVP_CIPHER_CTX *recv_mac; /* owned; NULL before authentication */
    uint64_t recv_seq;
    int recv_broken;
    unsigned char *rbuf; /* owned [RBUF_BYTES] */
    size_t rpos, rend;   /* unread bytes are rbuf[rpos .. rend) */
    unsigned char *pbuf; /* owned [pcap], 64-byte aligned: payloads */
    size_t pcap;
    hx_proto_stats stats;
};

/* A server names its client with the client's role; a client names the server by address. */
static void conn_set_who(hx_proto_conn *c)
{
    if (c->is_server && c->role[0])
        snprintf(c->who, sizeof c->who, "%s (%s)", c->peer, c->role);
    else
        snprintf(c->who, sizeof c->who, "%s", c->peer);
}

size_t hx_proto_buffered(const hx_proto_conn *c)
{
    return c->rend - c->rpos;
}

const char *hx_proto_peer(const hx_proto_conn *c)
{
    return c ? c->peer : "";
}

const char *hx_proto_peer_role(const hx_proto_conn *c)
{
    return c ? c->role : "";
}

int hx_proto_fd(const hx_proto_conn *c)
{
    return c ? c->fd : -1;
}

size_t hx_proto_pending(const hx_proto_conn *c)
{
    return c ? c->rend - c->rpos : 0;
}

hx_status hx_proto_set_max_payload(hx_proto_conn *c, hx_proto_type type, uint64_t max_bytes)
{
    if (!c || !hx_proto_type_name((int)type) || is_auth_type((int)type))
        return HX_EINVAL;
    c->max_payload[type] = max_bytes;
    return HX_OK;
}

void hx_proto_trim(hx_proto_conn *c, size_t keep_bytes)
{
    if (c && c->pcap > keep_bytes) {
        free(c->pbuf);
        c->pbuf = NULL;
        c->pcap = 0;
    }
}

void hx_proto_get_stats(const hx_proto_conn *c, hx_proto_stats *out)
{
    if (!out)
        return;
    if (c)
        *out = c->stats;
    else
        memset(out, 0, sizeof *out);
}

void hx_proto_close(hx_proto_conn *c)
{
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    EVP_CIPHER_CTX_free(c->send_mac);
    EVP_CIPHER_CTX_free(c->recv_mac);
    free(c->rbuf);
    free(c->pbuf);
    OPENSSL_cleanse(c, sizeof *c);
    free(c);
}

/* A connection around `fd` (taken: closed on failure). */
static hx_status conn_new(int fd, int is_server, const char *peer_name, hx_proto_conn **out,
                          hx_err *err)
{
    hx_proto_conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return hx_err_set(err, HX_ENOMEM, "out of memory for a connection");
    }
    c->fd = fd;
    c->is_server = is_server;
    snprintf(c->peer, sizeof c->peer, "%s", peer_name && *peer_name ? peer_name : "peer");
    conn_set_who(c);
    for (int t = 0; t < HX_PROTO_TYPE_LIMIT; t++)
        c->max_payload[t] = TYPES[t].max_bytes;
    c->rbuf = malloc(RBUF_BYTES);
    if (!c->rbuf) {
        hx_proto_close(c);
        return hx_err_set(err, HX_ENOMEM, "out of memory for a connection");
    }
    if (set_nonblocking_cloexec(fd) != 0) {
        int e = errno;
        hx_proto_close(c);
        return hx_err_set(err, HX_EIO, "cannot set up the socket to %s: %s", peer_name ? peer_name : "peer",
                          hx_errno_text(e));
    }
    *out = c;
    return HX_OK;
}

/* ---- tags (AES-256-GMAC) ------------------------------------------------------ */

static EVP_CIPHER_CTX *mac_new(const unsigned char key[32])
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return NULL;
    if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1 ||
        EVP_EncryptInit_ex(ctx, NULL, NULL, key, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* Starts the tag of frame number `seq`: nonce = 4 zero bytes || seq (u64 LE). */
static int mac_begin(EVP_CIPHER_CTX *ctx, uint64_t seq)
{
    unsigned char iv[12] = {0};
    put_u64(iv + 4, seq);
    return EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) == 1;
}

static int mac_update(EVP_CIPHER_CTX *ctx, const unsigned char *p, size_t n)
{
    while (n > 0) {
        int k = n > ((size_t)1 << 30) ? (1 << 30) : (int)n;
        int outl = 0;
        if (EVP_EncryptUpdate(ctx, NULL, &outl, p, k) != 1)
            return 0;
        p += k;
        n -= (size_t)k;
    }
    return 1;
}

static int mac_final(EVP_CIPHER_CTX *ctx, unsigned char tag[HX_PROTO_TAG_BYTES])
{
    unsigned char none[16];
    int outl = 0;
    if (EVP_EncryptFinal_ex(ctx, none, &outl) != 1)
        return 0;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, HX_PROTO_TAG_BYTES, tag) == 1;
}

/* ---- reading ------------------------------------------------------------------ */

/*
 * One recv() of at most n bytes into dst, waiting until the deadline.
 * HX_ECONN with *sys_errno 0 when the peer closed, an errno when reset.
 */
static hx_status sock_read_some(hx_proto_conn *c, unsigned char *dst, size_t n,
                                int64_t deadline_ns, size_t *got, int *sys_errno)
{
    for (;;) {
        ssize_t r = recv(c->fd, dst, n, 0);
        if (r > 0) {
            *got = (size_t)r;
            return HX_OK;
        }
        if (r == 0) {
            *sys_errno = 0;
            return HX_ECONN;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            hx_status st = wait_fd(c->fd, POLLIN, deadline_ns, sys_errno);
            if (st != HX_OK)
                return st;
            continue;
        }
        *sys_errno = errno;
        return (errno == ECONNRESET || errno == EPIPE || errno == ENOTCONN ||
                errno == ETIMEDOUT || errno == EHOSTUNREACH || errno == ENETUNREACH)
                   ? HX_ECONN
                   : HX_EIO;
    }
}

/*
 * Reads exactly n bytes into dst, through the read buffer (large reads go
 * straight into dst). With `mac`, feeds every byte to the receive tag as it
 * lands. *done counts the bytes delivered, also on failure.
 */
static hx_status read_exact(hx_proto_conn *c, unsigned char *dst, size_t n, int mac,
                            int64_t deadline_ns, size_t *done, int *sys_errno)
{
    size_t got = 0;
    hx_status st = HX_OK;
    while (got < n) {
        size_t avail = c->rend - c->rpos;
        if (avail > 0) {
            size_t k = avail < n - got ? avail : n - got;
            memcpy(dst + got, c->rbuf + c->rpos, k);
            c->rpos += k;
            if (mac && !mac_update(c->recv_mac, dst + got, k)) {
                st = HX_EINTERNAL;
                break;
            }
            got += k;
            continue;
        }
        c->rpos = c->rend = 0;
        size_t r = 0;
        if (n - got >= DIRECT_READ_MIN) {
            st = sock_read_some(c, dst + got, n - got, deadline_ns, &r, sys_errno);
            if (st != HX_OK)
                break;
            if (mac && !mac_update(c->recv_mac, dst + got, r)) {
                st = HX_EINTERNAL;
                break;
            }
            got += r;
        } else {
            st = sock_read_some(c, c->rbuf, RBUF_BYTES, deadline_ns, &r, sys_errno);
            if (st != HX_OK)
                break;
            c->rend = r;
        }
    }
    *done = got;
    return st;
}

static hx_status ensure_pbuf(hx_proto_conn *c, size_t len, size_t limit)
{
    if (len <= c->pcap && c->pbuf)
        return HX_OK;
    size_t cap = c->pcap + c->pcap / 2;
    if (cap > limit)
        cap = limit;
    if (cap < len)
        cap = len;
    if (cap < 4096)
        cap = 4096;
    if (cap > SIZE_MAX - 4096)
        return HX_ENOMEM;
    cap = (cap + 4095) & ~(size_t)4095;
    free(c->pbuf);
    c->pcap = 0;
    c->pbuf = aligned_alloc(64, cap);
    if (!c->pbuf)
        return HX_ENOMEM;
    c->pcap = cap;
    return HX_OK;
}

/* Message for a read that failed after `done` of `want` bytes of `what`. */
static hx_status read_failure(hx_proto_conn *c, hx_status st, int sys_errno, int64_t start_ns,
                              const char *what, size_t done, size_t want, hx_err *err)
{
    c->recv_broken = 1;
    switch (st) {
    case HX_ECONN:
        if (sys_errno == 0)
            return hx_err_set(err, HX_ECONN,
                              "%s closed the connection in the middle of a frame (%s: got %zu "
                              "of %zu bytes)",
                              c->who, what, done, want);
        return hx_err_set(err, HX_ECONN, "connection to %s dropped (%s) while reading %s (%zu of %zu bytes)",
                          c->who, hx_errno_text(sys_errno), what, done, want);
    case HX_ETIMEDOUT:
        return hx_err_set(err, HX_ETIMEDOUT,
                          "timed out after %.3g s reading a frame from %s: %s: got %zu of %zu "
                          "bytes; the peer stopped sending mid-frame",
                          seconds_since(start_ns), c->who, what, done, want);
    case HX_EINTERNAL:
        return hx_err_set(err, HX_EINTERNAL, "frame tag computation failed (OpenSSL) reading from %s",
                          c->who);
    default:
        return hx_err_set(err, HX_EIO, "cannot read from %s (%s): %s", c->who, what,
                          hx_errno_text(sys_errno));
    }
}

/* Printable form of 4 magic bytes: 'GET ' or hex. */
static void describe_magic(const unsigned char *m, char *buf, size_t size)
{
    int printable = 1;
    for (int i = 0; i < 4; i++)
        if (m[i] < 0x20 || m[i] > 0x7e)
            printable = 0;
    if (printable)
        snprintf(buf, size, "'%c%c%c%c'", m[0], m[1], m[2], m[3]);
    else
        snprintf(buf, size, "%02x %02x %02x %02x", m[0], m[1], m[2], m[3]);
}

static hx_status recv_frame(hx_proto_conn *c, hx_proto_frame *out, int64_t deadline_ns,
                            hx_err *err)
{
    unsigned char hdr[HX_PROTO_HEADER_BYTES];
    unsigned char tag[HX_PROTO_TAG_BYTES], want_tag[HX_PROTO_TAG_BYTES];
    char what[96];
    size_t done = 0;
    int sys_errno = 0;
    int64_t start = hx_proto_now_ns();

    if (c->recv_broken)
        return hx_err_set(err, HX_ECONN,
                          "connection to %s cannot receive any more: an earlier error left it "
                          "out of step; close it",
                          c->who);
    /* the magic first, so that a stranger (an HTTP probe) is told off at once */
    hx_status st = read_exact(c, hdr, 4, 0, deadline_ns, &done, &sys_errno);
    if (st == HX_OK && memcmp(hdr, MAGIC, 4) == 0) {
        st = read_exact(c, hdr + 4, sizeof hdr - 4, 0, deadline_ns, &done, &sys_errno);
        done += 4;
    }
    if (st != HX_OK) {
        if (done == 0 && st == HX_ETIMEDOUT) /* between frames: still usable */
            return hx_err_set(err, HX_ETIMEDOUT, "timed out after %.3g s waiting for a frame from %s",
                              seconds_since(start), c->who);
        if (done == 0 && st == HX_ECONN && sys_errno == 0) {
            c->recv_broken = 1;
            return hx_err_set(err, HX_ECONN, "%s closed the connection", c->who);
        }
        return read_failure(c, st, sys_errno, start, "frame header", done, sizeof hdr, err);
    }

    if (memcmp(hdr, MAGIC, 4) != 0) {
        char m[32];
        describe_magic(hdr, m, sizeof m);
        c->recv_broken = 1;
        return hx_err_set(err, HX_EPARSE,
                          "%s sent bad magic %s instead of 'HXF1': not a hexflow runtime peer, "
                          "or the stream is out of step",
                          c->who, m);
    }
    uint16_t version = get_u16(hdr + 4);
    uint16_t type = get_u16(hdr + 6);
    uint32_t flags = get_u32(hdr + 8);
    uint64_t len = get_u64(hdr + 12);
    uint64_t req_id = get_u64(hdr + 20);
    if (version != HX_PROTO_VERSION) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_ENOTSUP,
                          "%s speaks hexflow runtime protocol version %u; this build speaks "
                          "version %d (run the same hexflow version everywhere)",
                          c->who, (unsigned)version, HX_PROTO_VERSION);
    }
    const char *tname = hx_proto_type_name(type);
    if (!tname) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_EPARSE, "unknown message type %u from %s (request %llu)",
                          (unsigned)type, c->who, (unsigned long long)req_id);
    }
    if (!c->authed && !is_auth_type(type)) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_EPARSE, "unexpected %s frame from %s before authentication",
                          tname, c->who);
    }
    if (c->authed && is_auth_type(type)) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_EPARSE, "unexpected %s frame from %s after authentication",
                          tname, c->who);
    }
    if (flags != 0) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_EPARSE, "%s frame from %s has unknown flags 0x%08x",
                          tname, c->who, (unsigned)flags);
    }
    if (len > c->max_payload[type] || len > SIZE_MAX / 2) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_ERANGE,
                          "%s frame from %s (request %llu) has a payload of %llu bytes, over the "
                          "limit of %llu bytes for %s",
                          tname, c->who, (unsigned long long)req_id, (unsigned long long)len,
                          (unsigned long long)c->max_payload[type], tname);
    }
    if (ensure_pbuf(c, (size_t)len, (size_t)c->max_payload[type]) != HX_OK) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_ENOMEM,
                          "out of memory for the %llu-byte payload of a %s frame from %s",
                          (unsigned long long)len, tname, c->who);
    }
    int mac = c->authed;
    if (mac && (!mac_begin(c->recv_mac, c->recv_seq) || !mac_update(c->recv_mac, hdr, sizeof hdr))) {
        c->recv_broken = 1;
        return hx_err_set(err, HX_EINTERNAL, "frame tag computation failed (OpenSSL) reading from %s",
                          c->who);
    }
    if (len > 0) {
        st = read_exact(c, c->pbuf, (size_t)len, mac, deadline_ns, &done, &sys_errno);
        if (st != HX_OK) {
            snprintf(what, sizeof what, "payload of %s (request %llu)", tname,
                     (unsigned long long)req_id);
            return read_failure(c, st, sys_errno, start, what, done, (size_t)len, err);
        }
    }
    if (mac) {
        st = read_exact(c, tag, sizeof tag, 0, deadline_ns, &done, &sys_errno);
        if (st != HX_OK) {
            snprintf(what, sizeof what, "tag of %s (request %llu)", tname,
                     (unsigned long long)req_id);
            return read_failure(c, st, sys_errno, start, what, done, sizeof tag, err);
        }
        if (!mac_final(c->recv_mac, want_tag)) {
            c->recv_broken = 1;
            return hx_err_set(err, HX_EINTERNAL,
                              "frame tag computation failed (OpenSSL) reading from %s", c->who);
        }
        if (CRYPTO_memcmp(tag, want_tag, sizeof tag) != 0) {
            c->recv_broken = 1;
            return hx_err_set(err, HX_EPARSE,
                              "%s frame #%llu (request %llu) from %s fails its integrity check: "
                              "it was altered, replayed or reordered on the way",
                              tname, (unsigned long long)c->recv_seq, (unsigned long long)req_id,
                              c->who);
        }
        c->recv_seq++;
    }
    c->stats.frames_received++;
    c->stats.bytes_received += sizeof hdr + len + (mac ? sizeof tag : 0);
    out->type = (hx_proto_type)type;
    out->flags = flags;
    out->req_id = req_id;
    out->payload = c->pbuf;
    out->len = (size_t)len;
    out->peer = c->who;
    return HX_OK;
}

hx_status hx_proto_recv(hx_proto_conn *c, hx_proto_frame *out, int64_t deadline_ns,
                        hx_err *err)
{
    if (!c || !out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_recv: NULL argument");
    if (!c->authed)
        return hx_err_set(err, HX_EINVAL, "hx_proto_recv: connection to %s is not authenticated",
                          c->who);
    return recv_frame(c, out, deadline_ns, err);
}

/* ---- writing ------------------------------------------------------------------- */

typedef struct seg {
    const unsigned char *p;
    size_t len;
} seg;

/*
 * Sends one frame: header, payload parts, and (when authenticated) the tag,
 * computed in MAC_WINDOW pieces just ahead of the bytes being sent.
 */
static hx_status send_frame(hx_proto_conn *c, int type, uint64_t req_id,
                            const hx_proto_part *parts, size_t nparts, int64_t deadline_ns,
                            hx_err *err)
{
    unsigned char hdr[HX_PROTO_HEADER_BYTES];
    unsigned char tag[HX_PROTO_TAG_BYTES];
    seg segs[HX_PROTO_MAX_PARTS + 2];
    struct iovec iov[HX_PROTO_MAX_PARTS + 2];
    const char *tname = hx_proto_type_name(type);
    int64_t start = hx_proto_now_ns();

    if (c->send_broken)
        return hx_err_set(err, HX_ECONN,
                          "connection to %s cannot send any more: an earlier error left it out "
                          "of step; close it",
                          c->who);
    if (nparts > HX_PROTO_MAX_PARTS)
        return hx_err_set(err, HX_EINVAL, "%s frame to %s: %zu payload parts; at most %d",
                          tname, c->who, nparts, HX_PROTO_MAX_PARTS);
    uint64_t plen = 0;
    for (size_t i = 0; i < nparts; i++) {
        if (!parts[i].data && parts[i].len)
            return hx_err_set(err, HX_EINVAL, "%s frame to %s: payload part %zu is NULL", tname,
                              c->who, i);
        if (parts[i].len > SIZE_MAX / 2 - plen)
            return hx_err_set(err, HX_ERANGE, "%s frame to %s: payload too large", tname, c->who);
        plen += parts[i].len;
    }
    if (plen > c->max_payload[type])
        return hx_err_set(err, HX_ERANGE,
                          "%s frame to %s (request %llu): payload of %llu bytes is over the limit "
                          "of %llu bytes for %s",
                          tname, c->who, (unsigned long long)req_id, (unsigned long long)plen,
                          (unsigned long long)c->max_payload[type], tname);

    memcpy(hdr, MAGIC, 4);
    put_u16(hdr + 4, HX_PROTO_VERSION);
    put_u16(hdr + 6, (uint16_t)type);
    put_u32(hdr + 8, 0);
    put_u64(hdr + 12, plen);
    put_u64(hdr + 20, req_id);

    int mac = c->authed;
    size_t nsegs = 0;
    segs[nsegs++] = (seg){hdr, sizeof hdr};
    for (size_t i = 0; i < nparts; i++)
        if (parts[i].len)
            segs[nsegs++] = (seg){parts[i].data, parts[i].len};
    if (mac)
        segs[nsegs++] = (seg){tag, sizeof tag};
    uint64_t frame_len = sizeof hdr + plen + (mac ? sizeof tag : 0);

    if (mac && (!mac_begin(c->send_mac, c->send_seq) || !mac_update(c->send_mac, hdr, sizeof hdr)))
        goto out_openssl;

    uint64_t sent = 0;      /* bytes of the frame on the wire */
    uint64_t macd = 0;      /* payload bytes fed to the tag */
    size_t mpart = 1;       /* segs index and offset of the next byte to tag */
    size_t moff = 0;
    int tag_ready = !mac;
    while (sent < frame_len) {
        if (mac && macd < plen) {
            uint64_t psent = sent > sizeof hdr ? sent - sizeof hdr : 0;
            uint64_t target = psent + MAC_WINDOW < plen ? psent + MAC_WINDOW : plen;
            while (macd < target) {
                size_t k = segs[mpart].len - moff;
                if (k > target - macd)
                    k = (size_t)(target - macd);
                if (!mac_update(c->send_mac, segs[mpart].p + moff, k))
                    goto out_openssl;
                macd += k;
                moff += k;
                if (moff == segs[mpart].len) {
                    mpart++;
                    moff = 0;
                }
            }
        }
        if (!tag_ready && macd == plen) {
            if (!mac_final(c->send_mac, tag))
                goto out_openssl;
            tag_ready = 1;
        }
        /* bytes ready to go: header, tagged payload, and the tag once final */
        uint64_t ready = sizeof hdr + (mac ? macd : plen) + (mac && tag_ready ? sizeof tag : 0);
        int niov = 0;
        uint64_t pos = 0;
        for (size_t i = 0; i < nsegs && pos < ready; i++) {
            uint64_t s0 = pos, s1 = pos + segs[i].len;
            pos = s1;
            if (s1 <= sent)
                continue;
            uint64_t from = sent > s0 ? sent : s0;
            uint64_t to = s1 < ready ? s1 : ready;
            iov[niov].iov_base = (void *)(segs[i].p + (from - s0));
            iov[niov].iov_len = (size_t)(to - from);
            niov++;
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)niov;
        ssize_t w = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (w >= 0) {
            sent += (uint64_t)w;
            continue;
        }
        if (errno == EINTR)
            continue;
        int sys_errno = errno;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            hx_status st = wait_fd(c->fd, POLLOUT, deadline_ns, &sys_errno);
            if (st == HX_OK)
                continue;
            if (st == HX_ETIMEDOUT) {
                if (sent == 0)
                    return hx_err_set(err, HX_ETIMEDOUT,
                                      "timed out after %.3g s sending a %s frame to %s: the peer "
                                      "is not reading",
                                      seconds_since(start), tname, c->who);
                c->send_broken = 1;
                return hx_err_set(err, HX_ETIMEDOUT,
                                  "timed out after %.3g s sending a %s frame (request %llu) to %s: "
                                  "sent %llu of %llu bytes; the peer stopped reading",
                                  seconds_since(start), tname, (unsigned long long)req_id, c->who,
                                  (unsigned long long)sent, (unsigned long long)frame_len);
            }
        }
        c->send_broken = 1;
        if (sys_errno == EPIPE || sys_errno == ECONNRESET || sys_errno == ENOTCONN ||
            sys_errno == ETIMEDOUT || sys_errno == EHOSTUNREACH || sys_errno == ENETUNREACH)
            return hx_err_set(err, HX_ECONN,
                              "connection to %s dropped (%s) while sending a %s frame (request "
                              "%llu): sent %llu of %llu bytes",
                              c->who, hx_errno_text(sys_errno), tname, (unsigned long long)req_id,
                              (unsigned long long)sent, (unsigned long long)frame_len);
        return hx_err_set(err, HX_EIO, "cannot send a %s frame to %s: %s", tname, c->who,
                          hx_errno_text(sys_errno));
    }
    if (mac)
        c->send_seq++;
    c->stats.frames_sent++;
    c->stats.bytes_sent += frame_len;
    return HX_OK;

out_openssl:
    c->send_broken = 1;
    return hx_err_set(err, HX_EINTERNAL, "frame tag computation failed (OpenSSL) sending %s to %s",
                      tname, c->who);
}

hx_status hx_proto_sendv(hx_proto_conn *c, hx_proto_type type, uint64_t req_id,
                         const hx_proto_part *parts, size_t nparts, int64_t deadline_ns,
                         hx_err *err)
{
    if (!c || (!parts && nparts))
        return hx_err_set(err, HX_EINVAL, "hx_proto_sendv: NULL argument");
    const char *tname = hx_proto_type_name((int)type);
    if (!tname)
        return hx_err_set(err, HX_EINVAL, "cannot send unknown message type %d to %s", (int)type,
                          c->who);
    if (is_auth_type((int)type))
        return hx_err_set(err, HX_EINVAL, "%s is a handshake frame; it cannot be sent by hand",
                          tname);
    if (!c->authed)
        return hx_err_set(err, HX_EINVAL, "connection to %s is not authenticated", c->who);
    return send_frame(c, (int)type, req_id, parts, nparts, deadline_ns, err);
}

hx_status hx_proto_send(hx_proto_conn *c, hx_proto_type type, uint64_t req_id,
                        const void *payload, size_t len, int64_t deadline_ns, hx_err *err)
{
    hx_proto_part part = {payload, len};
    return hx_proto_sendv(c, type, req_id, &part, len ? 1 : 0, deadline_ns, err);
}

/* ---- handshake ------------------------------------------------------------------ */

static int role_ok(const char *role, size_t len)
{
    if (len < 1 || len > HX_PROTO_ROLE_MAX)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char ch = role[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' ||
              ch == ':' || ch == '-'))
            return 0;
    }
    return 1;
}

/* HMAC-SHA256(secret, label || a || b || role) */
static int auth_hmac(const hx_proto_secret *secret, const char *label, const unsigned char *a,
                     const unsigned char *b, const char *role, size_t role_len,
                     unsigned char out[32])
{
    unsigned char msg[64 + 2 * HX_PROTO_NONCE_BYTES + HX_PROTO_ROLE_MAX];
    size_t ll = strlen(label), n = 0;
    memcpy(msg + n, label, ll);
    n += ll;
    memcpy(msg + n, a, HX_PROTO_NONCE_BYTES);
    n += HX_PROTO_NONCE_BYTES;
    memcpy(msg + n, b, HX_PROTO_NONCE_BYTES);
    n += HX_PROTO_NONCE_BYTES;
    memcpy(msg + n, role, role_len);
    n += role_len;
    unsigned int outl = 0;
    int ok = HMAC(EVP_sha256(), secret->bytes, (int)secret->len, msg, n, out, &outl) != NULL &&
             outl == 32;
    OPENSSL_cleanse(msg, sizeof msg);
    return ok;
}

/* Derives both directions' keys from the nonces and role, and arms the tags. */
static int derive_keys(hx_proto_conn *c, const hx_proto_secret *secret,
                       const unsigned char *sn, const unsigned char *cn)
{
    unsigned char kc2s[32], ks2c[32];
    size_t rl = strlen(c->role);
    int ok = auth_hmac(secret, KEY_LABEL_C2S, sn, cn, c->role, rl, kc2s) &&
             auth_hmac(secret, KEY_LABEL_S2C, sn, cn, c->role, rl, ks2c);
    if (ok) {
        c->send_mac = mac_new(c->is_server ? ks2c : kc2s);
        c->recv_mac = mac_new(c->is_server ? kc2s : ks2c);
        ok = c->send_mac && c->recv_mac;
    }
    OPENSSL_cleanse(kc2s, sizeof kc2s);
    OPENSSL_cleanse(ks2c, sizeof ks2c);
    if (ok) {
        c->authed = 1;
        c->send_seq = c->recv_seq = 0;
    }
    return ok;
}

static hx_status handshake_server(hx_proto_conn *c, const hx_proto_secret *secret,
                                  int64_t deadline_ns, hx_err *err)
{
    unsigned char sn[HX_PROTO_NONCE_BYTES], cn[HX_PROTO_NONCE_BYTES];
    unsigned char want[32], proof[32];
    hx_proto_frame f;
    hx_err e = {0};
    hx_status st;

    if (RAND_bytes(sn, sizeof sn) != 1)
        return hx_err_set(err, HX_EINTERNAL, "cannot get random bytes from OpenSSL (RAND_bytes)");
    hx_proto_part p = {sn, sizeof sn};
    st = send_frame(c, HX_PROTO_AUTH_CHALLENGE, 0, &p, 1, deadline_ns, &e);
    if (st != HX_OK)
        return hx_err_set(err, st, "authenticating client %s: %s", c->who, e.msg);
    st = recv_frame(c, &f, deadline_ns, &e);
    if (st != HX_OK)
        return hx_err_set(err, st, "authenticating client %s: %s", c->who, e.msg);
    if (f.type != HX_PROTO_AUTH_RESPONSE)
        return hx_err_set(err, HX_EPARSE,
                          "authenticating client %s: expected AUTH_RESPONSE, got %s", c->who,
                          hx_proto_type_name(f.type));
    if (f.len < 2 * HX_PROTO_NONCE_BYTES + 1)
        return hx_err_set(err, HX_EPARSE,
                          "authenticating client %s: AUTH_RESPONSE of %zu bytes is too short",
                          c->who, f.len);
    const char *role = (const char *)f.payload + 2 * HX_PROTO_NONCE_BYTES;
    size_t role_len = f.len - 2 * HX_PROTO_NONCE_BYTES;
    if (!role_ok(role, role_len))
        return hx_err_set(err, HX_EPARSE,
                          "authenticating client %s: AUTH_RESPONSE carries an invalid role "
                          "(1 to %d of a-z 0-9 . _ : -)",
                          c->who, HX_PROTO_ROLE_MAX);
    memcpy(cn, f.payload, sizeof cn);
    memcpy(proof, f.payload + HX_PROTO_NONCE_BYTES, sizeof proof);
    memcpy(c->role, role, role_len);
    c->role[role_len] = '\0';
    conn_set_who(c);
    if (!auth_hmac(secret, AUTH_LABEL, sn, cn, c->role, role_len, want))
        return hx_err_set(err, HX_EINTERNAL, "authenticating client %s: HMAC failed (OpenSSL)",
                          c->who);
    if (CRYPTO_memcmp(want, proof, sizeof want) != 0) {
        static const char reason[] = "wrong deployment secret";
        hx_proto_part fp = {reason, sizeof reason - 1};
        (void)send_frame(c, HX_PROTO_AUTH_FAIL, 0, &fp, 1, deadline_ns, NULL); /* best effort */
        return hx_err_set(err, HX_EINVAL,
                          "client %s failed authentication: its proof does not match this "
                          "deployment's secret (the secret files differ)",
                          c->who);
    }
    if (!auth_hmac(secret, AUTH_LABEL, cn, sn, c->role, role_len, proof))
        return hx_err_set(err, HX_EINTERNAL, "authenticating client %s: HMAC failed (OpenSSL)",
                          c->who);
    p = (hx_proto_part){proof, sizeof proof};
    st = send_frame(c, HX_PROTO_AUTH_OK, 0, &p, 1, deadline_ns, &e);
    if (st != HX_OK)
        return hx_err_set(err, st, "authenticating client %s: %s", c->who, e.msg);
    if (!derive_keys(c, secret, sn, cn))
        return hx_err_set(err, HX_EINTERNAL, "authenticating client %s: key setup failed (OpenSSL)",
                          c->who);
    return HX_OK;
}

static hx_status handshake_client(hx_proto_conn *c, const hx_proto_secret *secret,
                                  int64_t deadline_ns, hx_err *err)
{
    unsigned char sn[HX_PROTO_NONCE_BYTES], cn[HX_PROTO_NONCE_BYTES];
    unsigned char msg[2 * HX_PROTO_NONCE_BYTES + HX_PROTO_ROLE_MAX];
    unsigned char want[32];
    hx_proto_frame f;
    hx_err e = {0};
    hx_status st;
    size_t role_len = strlen(c->role);

    st = recv_frame(c, &f, deadline_ns, &e);
    if (st != HX_OK)
        return hx_err_set(err, st, "authenticating with server %s: %s", c->who, e.msg);
    if (f.type != HX_PROTO_AUTH_CHALLENGE || f.len != HX_PROTO_NONCE_BYTES)
        return hx_err_set(err, HX_EPARSE,
                          "authenticating with server %s: expected a %d-byte AUTH_CHALLENGE, "
                          "got %s of %zu bytes",
                          c->who, HX_PROTO_NONCE_BYTES, hx_proto_type_name(f.type), f.len);
    memcpy(sn, f.payload, sizeof sn);
    if (RAND_bytes(cn, sizeof cn) != 1)
        return hx_err_set(err, HX_EINTERNAL, "cannot get random bytes from OpenSSL (RAND_bytes)");
    memcpy(msg, cn, sizeof cn);
    if (!auth_hmac(secret, AUTH_LABEL, sn, cn, c->role, role_len, msg + sizeof cn))
        return hx_err_set(err, HX_EINTERNAL, "authenticating with server %s: HMAC failed (OpenSSL)",
                          c->who);
    memcpy(msg + 2 * HX_PROTO_NONCE_BYTES, c->role, role_len);
    hx_proto_part p = {msg, 2 * HX_PROTO_NONCE_BYTES + role_len};
    st = send_frame(c, HX_PROTO_AUTH_RESPONSE, 0, &p, 1, deadline_ns, &e);
    if (st != HX_OK)
        return hx_err_set(err, st, "authenticating with server %s: %s", c->who, e.msg);
    st = recv_frame(c, &f, deadline_ns, &e);
    if (st != HX_OK) {
        if (st == HX_ECONN)
            return hx_err_set(err, HX_ECONN,
                              "server %s closed the connection during authentication (wrong "
                              "deployment secret?): %s",
                              c->who, e.msg);
        return hx_err_set(err, st, "authenticating with server %s: %s", c->who, e.msg);
    }
    if (f.type == HX_PROTO_AUTH_FAIL) {
        char reason[HX_PROTO_AUTH_FAIL_MAX + 1];
        size_t n = 0;
        for (size_t i = 0; i < f.len && n < HX_PROTO_AUTH_FAIL_MAX; i++)
            reason[n++] = (f.payload[i] >= 0x20 && f.payload[i] <= 0x7e) ? (char)f.payload[i] : '?';
        reason[n] = '\0';
        return hx_err_set(err, HX_EINVAL,
                          "server %s rejected our authentication: %s (the secret files differ)",
                          c->who, n ? reason : "no reason given");
    }
    if (f.type != HX_PROTO_AUTH_OK || f.len != HX_PROTO_PROOF_BYTES)
        return hx_err_set(err, HX_EPARSE,
                          "authenticating with server %s: expected a %d-byte AUTH_OK, got %s of "
                          "%zu bytes",
                          c->who, HX_PROTO_PROOF_BYTES, hx_proto_type_name(f.type), f.len);
    if (!auth_hmac(secret, AUTH_LABEL, cn, sn, c->role, role_len, want))
        return hx_err_set(err, HX_EINTERNAL, "authenticating with server %s: HMAC failed (OpenSSL)",
                          c->who);
    if (CRYPTO_memcmp(want, f.payload, sizeof want) != 0)
        return hx_err_set(err, HX_EINVAL,
                          "server %s failed to prove that it holds the deployment secret (a "
                          "different deployment, or not a hexflow peer)",
                          c->who);
    if (!derive_keys(c, secret, sn, cn))
        return hx_err_set(err, HX_EINTERNAL,
                          "authenticating with server %s: key setup failed (OpenSSL)", c->who);
    return HX_OK;
}

hx_status hx_proto_handshake_fd(int fd, int is_server, const char *peer_name,
                                const hx_proto_secret *secret, const char *role,
                                int64_t deadline_ns, hx_proto_conn **out, hx_err *err)
{
    hx_proto_conn *c = NULL;
    hx_status st;
    if (!out) {
        if (fd >= 0)
            close(fd);
        return hx_err_set(err, HX_EINVAL, "hx_proto_handshake_fd: NULL argument");
    }
    *out = NULL;
    if (fd < 0)
        return hx_err_set(err, HX_EINVAL, "hx_proto_handshake_fd: bad descriptor");
    if (!secret_ok(secret)) {
        close(fd);
        return hx_err_set(err, HX_EINVAL,
                          "no deployment secret loaded for the connection to %s",
                          peer_name ? peer_name : "peer");
    }
    if (!is_server && (!role || !role_ok(role, strlen(role)))) {
        close(fd);
        return hx_err_set(err, HX_EINVAL,
                          "invalid role '%s' (1 to %d of a-z 0-9 . _ : -)", role ? role : "(null)",
                          HX_PROTO_ROLE_MAX);
    }
    st = conn_new(fd, is_server, peer_name, &c, err);
    if (st != HX_OK)
        return st;
    if (!is_server)
        snprintf(c->role, sizeof c->role, "%s", role);
    int64_t dl = min_deadline(deadline_ns, hx_proto_deadline_in(HX_PROTO_HANDSHAKE_TIMEOUT_S));
    st = is_server ? handshake_server(c, secret, dl, err) : handshake_client(c, secret, dl, err);
    if (st != HX_OK) {
        hx_proto_close(c);
        return st;
    }
    *out = c;
    return HX_OK;
}

/* ---- addresses, listening, connecting ------------------------------------------- */

struct hx_proto_listener {
    int fd; /* owned */
    int port;
    int is_unix;
    char address[PEER_MAX];
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    dev_t unix_dev; /* the socket file we made, removed on free if still ours */
    ino_t unix_ino;
};

static void format_sockaddr(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
    char host[96], serv[16]; /* numeric forms: INET6_ADDRSTRLEN + a scope id; a port */
    if (sa->sa_family == AF_UNIX) {
        const struct sockaddr_un *su = (const struct sockaddr_un *)(const void *)sa;
        if (len > (socklen_t)offsetof(struct sockaddr_un, sun_path) && su->sun_path[0])
            snprintf(buf, size, "unix:%.*s", (int)sizeof su->sun_path, su->sun_path);
        else
            snprintf(buf, size, "unix:(unnamed)");
        return;
    }
    if (getnameinfo(sa, len, host, sizeof host, serv, sizeof serv,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(buf, size, "(unknown address)");
        return;
    }
    const char *h = host;
    if (sa->sa_family == AF_INET6 && strncmp(h, "::ffff:", 7) == 0 && strchr(h + 7, '.'))
        h += 7; /* an IPv4 peer on a dual-stack socket */
    if (strchr(h, ':'))
        snprintf(buf, size, "[%s]:%s", h, serv);
    else
        snprintf(buf, size, "%s:%s", h, serv);
}

static int is_unix_address(const char *host)
{
    return host && strncmp(host, "unix:", 5) == 0;
}

static hx_status unix_address(const char *host, struct sockaddr_un *su, hx_err *err)
{
    const char *path = host + 5;
    memset(su, 0, sizeof *su);
    su->sun_family = AF_UNIX;
    if (!*path)
        return hx_err_set(err, HX_EINVAL, "'%s': a Unix socket address needs a path (unix:/path)",
                          host);
    if (strlen(path) >= sizeof su->sun_path)
        return hx_err_set(err, HX_EINVAL, "Unix socket path '%s' is longer than %zu bytes", path,
                          sizeof su->sun_path - 1);
    memcpy(su->sun_path, path, strlen(path) + 1);
    return HX_OK;
}

static void tune_tcp(int fd)
{
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    (void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
}

static hx_status listen_unix(const char *host, hx_proto_listener *l, hx_err *err)
{
    struct sockaddr_un su;
    struct stat sb;
    hx_status st = unix_address(host, &su, err);
    if (st != HX_OK)
        return st;
    if (lstat(su.sun_path, &sb) == 0) {
        if (!S_ISSOCK(sb.st_mode))
            return hx_err_set(err, HX_EEXIST, "cannot listen on %s: '%s' exists and is not a socket",
                              host, su.sun_path);
        /* a socket file: in use, or left behind by a process that died? */
        int probe = socket(AF_UNIX, SOCK_STREAM, 0);
        if (probe < 0) {
            int e = errno;
            return hx_err_set(err, HX_EIO, "cannot listen on %s: %s", host, hx_errno_text(e));
        }
        int r = connect(probe, (struct sockaddr *)&su, sizeof su);
        int e = errno;
        close(probe);
        if (r == 0)
            return hx_err_set(err, HX_EEXIST, "cannot listen on %s: another process listens there",
                              host);
        if (e == ECONNREFUSED)
            unlink(su.sun_path); /* stale */
    }
    l->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l->fd < 0) {
        int e = errno;
        return hx_err_set(err, HX_EIO, "cannot listen on %s: %s", host, hx_errno_text(e));
    }
    if (bind(l->fd, (struct sockaddr *)&su, sizeof su) != 0 || listen(l->fd, 128) != 0) {
        int e = errno;
        return hx_err_set(err, hx_status_from_errno(e), "cannot listen on %s: %s", host,
                          hx_errno_text(e));
    }
    if (stat(su.sun_path, &sb) == 0) {
        l->unix_dev = sb.st_dev;
        l->unix_ino = sb.st_ino;
    }
    l->is_unix = 1;
    memcpy(l->unix_path, su.sun_path, sizeof l->unix_path);
    snprintf(l->address, sizeof l->address, "%s", host);
    return HX_OK;
}

static hx_status listen_tcp(const char *host, int port, hx_proto_listener *l, hx_err *err)
{
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    int last_errno = 0;
    const char *shown = host && *host ? host : "*";
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof portstr, "%d", port);
    const char *node = host && *host ? host : "::";
    int gai = getaddrinfo(node, portstr, &hints, &res);
    if (gai != 0 && !(host && *host)) {
        node = "0.0.0.0"; /* no IPv6 here */
        gai = getaddrinfo(node, portstr, &hints, &res);
    }
    if (gai != 0)
        return hx_err_set(err, HX_ENOENT, "cannot listen on %s:%d: %s", shown, port,
                          gai_strerror(gai));
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        int one = 1, zero = 0;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (ai->ai_family == AF_INET6 && !(host && *host))
            (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
            l->fd = fd;
            break;
        }
        last_errno = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (l->fd < 0 && !(host && *host) && strcmp(node, "::") == 0)
        return listen_tcp("0.0.0.0", port, l, err); /* IPv6 present but unusable */
    if (l->fd < 0)
        return hx_err_set(err, hx_status_from_errno(last_errno), "cannot listen on %s:%d: %s",
                          shown, port, hx_errno_text(last_errno));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(l->fd, (struct sockaddr *)&ss, &sl) == 0) {
        format_sockaddr((struct sockaddr *)&ss, sl, l->address, sizeof l->address);
        if (ss.ss_family == AF_INET)
            l->port = ntohs(((struct sockaddr_in *)(void *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            l->port = ntohs(((struct sockaddr_in6 *)(void *)&ss)->sin6_port);
    }
    return HX_OK;
}

hx_status hx_proto_listen(const char *host, int port, hx_proto_listener **out, hx_err *err)
{
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_listen: NULL argument");
    *out = NULL;
    if (!is_unix_address(host) && (port < 0 || port > 65535))
        return hx_err_set(err, HX_EINVAL, "port %d is out of range (0-65535)", port);
    hx_proto_listener *l = calloc(1, sizeof *l);
    if (!l)
        return hx_err_set(err, HX_ENOMEM, "out of memory for a listener");
    l->fd = -1;
    hx_status st = is_unix_address(host) ? listen_unix(host, l, err) : listen_tcp(host, port, l, err);
    if (st == HX_OK && set_nonblocking_cloexec(l->fd) != 0) {
        int e = errno;
        st = hx_err_set(err, HX_EIO, "cannot set up the listening socket %s: %s", l->address,
                        hx_errno_text(e));
    }
    if (st != HX_OK) {
        hx_proto_listener_free(l);
        return st;
    }
    *out = l;
    return HX_OK;
}

int hx_proto_listener_port(const hx_proto_listener *l)
{
    return l ? l->port : 0;
}

const char *hx_proto_listener_address(const hx_proto_listener *l)
{
    return l ? l->address : "";
}

int hx_proto_listener_fd(const hx_proto_listener *l)
{
    return l ? l->fd : -1;
}

void hx_proto_listener_free(hx_proto_listener *l)
{
    if (!l)
        return;
    if (l->fd >= 0)
        close(l->fd);
    if (l->is_unix) {
        struct stat sb;
        if (lstat(l->unix_path, &sb) == 0 && S_ISSOCK(sb.st_mode) && sb.st_dev == l->unix_dev &&
            sb.st_ino == l->unix_ino)
            unlink(l->unix_path);
    }
    free(l);
}

hx_status hx_proto_accept(hx_proto_listener *l, const hx_proto_secret *secret,
                          int64_t deadline_ns, hx_proto_conn **out, hx_err *err)
{
    int64_t start = hx_proto_now_ns();
    if (!l || !out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_accept: NULL argument");
    *out = NULL;
    if (!secret_ok(secret))
        return hx_err_set(err, HX_EINVAL, "no deployment secret loaded for the listener on %s",
                          l->address);
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept(l->fd, (struct sockaddr *)&ss, &sl);
        if (fd >= 0) {
            char peer[PEER_MAX];
            if (l->is_unix)
                snprintf(peer, sizeof peer, "unix:%s", l->unix_path); /* clients are unnamed */
            else
                format_sockaddr((struct sockaddr *)&ss, sl, peer, sizeof peer);
            if (!l->is_unix)
                tune_tcp(fd);
            return hx_proto_handshake_fd(fd, 1, peer, secret, NULL, deadline_ns, out, err);
        }
        int e = errno;
        if (e == EINTR || e == ECONNABORTED || e == EPROTO)
            continue;
        if (e == EAGAIN || e == EWOULDBLOCK) {
            int sys_errno = 0;
            hx_status st = wait_fd(l->fd, POLLIN, deadline_ns, &sys_errno);
            if (st == HX_ETIMEDOUT)
                return hx_err_set(err, HX_ETIMEDOUT,
                                  "no connection on %s within %.3g s", l->address,
                                  seconds_since(start));
            if (st != HX_OK)
                return hx_err_set(err, HX_EIO, "cannot wait for connections on %s: %s",
                                  l->address, hx_errno_text(sys_errno));
            continue;
        }
        return hx_err_set(err, HX_EIO, "cannot accept a connection on %s: %s", l->address,
                          hx_errno_text(e));
    }
}

/* Connects fd (non-blocking) to sa before the deadline; 0 or an errno (ETIMEDOUT). */
static int connect_with_deadline(int fd, const struct sockaddr *sa, socklen_t sl,
                                 int64_t deadline_ns)
{
    for (;;) {
        if (connect(fd, sa, sl) == 0)
            return 0;
        int e = errno;
        if (e == EINTR)
            continue;
        if (e == EAGAIN) { /* a Unix socket with a full backlog: try again shortly */
            if (hx_proto_now_ns() >= deadline_ns)
                return ETIMEDOUT;
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (e != EINPROGRESS)
            return e;
        int sys_errno = 0;
        hx_status st = wait_fd(fd, POLLOUT, deadline_ns, &sys_errno);
        if (st == HX_ETIMEDOUT)
            return ETIMEDOUT;
        if (st != HX_OK)
            return sys_errno ? sys_errno : EIO;
        int so = 0;
        socklen_t len = sizeof so;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &len) != 0)
            return errno;
        return so;
    }
}

hx_status hx_proto_connect(const char *host, int port, const hx_proto_secret *secret,
                           const char *role, int64_t deadline_ns, hx_proto_conn **out,
                           hx_err *err)
{
    int64_t start = hx_proto_now_ns();
    char peer[PEER_MAX];
    if (!out || !host)
        return hx_err_set(err, HX_EINVAL, "hx_proto_connect: NULL argument");
    *out = NULL;
    if (!secret_ok(secret))
        return hx_err_set(err, HX_EINVAL, "no deployment secret loaded for connecting to %s",
                          host);
    if (!role || !role_ok(role, strlen(role)))
        return hx_err_set(err, HX_EINVAL, "invalid role '%s' (1 to %d of a-z 0-9 . _ : -)",
                          role ? role : "(null)", HX_PROTO_ROLE_MAX);

    if (is_unix_address(host)) {
        struct sockaddr_un su;
        hx_status st = unix_address(host, &su, err);
        if (st != HX_OK)
            return st;
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || set_nonblocking_cloexec(fd) != 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            return hx_err_set(err, HX_EIO, "cannot connect to %s: %s", host, hx_errno_text(e));
        }
        int e = connect_with_deadline(fd, (struct sockaddr *)&su, sizeof su, deadline_ns);
        if (e != 0) {
            close(fd);
            if (e == ETIMEDOUT)
                return hx_err_set(err, HX_ETIMEDOUT, "cannot connect to %s: timed out after %.3g s",
                                  host, seconds_since(start));
            return hx_err_set(err, (e == ENOENT || e == ECONNREFUSED) ? HX_ECONN
                                                                      : hx_status_from_errno(e),
                              "cannot connect to %s: %s", host, hx_errno_text(e));
        }
        return hx_proto_handshake_fd(fd, 0, host, secret, role, deadline_ns, out, err);
    }

    if (port <= 0 || port > 65535)
        return hx_err_set(err, HX_EINVAL, "cannot connect to %s: port %d is out of range", host,
                          port);
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(portstr, sizeof portstr, "%d", port);
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai != 0)
        return hx_err_set(err, HX_ECONN, "cannot connect to %s:%d: %s", host, port,
                          gai_strerror(gai));
    int fd = -1, last = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            last = errno;
            continue;
        }
        if (set_nonblocking_cloexec(fd) != 0) {
            last = errno;
            close(fd);
            fd = -1;
            continue;
        }
        last = connect_with_deadline(fd, ai->ai_addr, ai->ai_addrlen, deadline_ns);
        if (last == 0) {
            format_sockaddr(ai->ai_addr, ai->ai_addrlen, peer, sizeof peer);
            break;
        }
        close(fd);
        fd = -1;
        if (last == ETIMEDOUT)
            break;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        if (last == ETIMEDOUT)
            return hx_err_set(err, HX_ETIMEDOUT, "cannot connect to %s:%d: timed out after %.3g s",
                              host, port, seconds_since(start));
        return hx_err_set(err, last == ECONNREFUSED ? HX_ECONN : hx_status_from_errno(last),
                          "cannot connect to %s:%d: %s", host, port, hx_errno_text(last));
    }
    tune_tcp(fd);
    return hx_proto_handshake_fd(fd, 0, peer, secret, role, deadline_ns, out, err);
}

/* ---- message codecs ------------------------------------------------------------ */

const char *hx_proto_role_name(hx_proto_role role)
{
    switch (role) {
    case HX_PROTO_ROLE_ROUTER: return "router";
    case HX_PROTO_ROLE_PREFILL: return "prefill";
    case HX_PROTO_ROLE_DECODE: return "decode";
    case HX_PROTO_ROLE_BOTH: return "both";
    case HX_PROTO_ROLE_LAUNCHER: return "launcher";
    }
    return NULL;
}

const char *hx_proto_dtype_name(hx_proto_dtype d)
{
    switch (d) {
    case HX_PROTO_DTYPE_F32: return "f32";
    case HX_PROTO_DTYPE_F16: return "f16";
    case HX_PROTO_DTYPE_BF16: return "bf16";
    case HX_PROTO_DTYPE_F8_E4M3: return "f8_e4m3";
    }
    return NULL;
}

size_t hx_proto_dtype_bytes(hx_proto_dtype d)
{
    switch (d) {
    case HX_PROTO_DTYPE_F32: return 4;
    case HX_PROTO_DTYPE_F16: return 2;
    case HX_PROTO_DTYPE_BF16: return 2;
    case HX_PROTO_DTYPE_F8_E4M3: return 1;
    }
    return 0;
}

/* "malformed TYPE (request N) from PEER: ..." */
static hx_status bad_payload(const hx_proto_frame *f, hx_err *err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static hx_status bad_payload(const hx_proto_frame *f, hx_err *err, const char *fmt, ...)
{
    char detail[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    const char *tname = hx_proto_type_name(f->type);
    return hx_err_set(err, HX_EPARSE, "malformed %s (request %llu) from %s: %s",
                      tname ? tname : "frame", (unsigned long long)f->req_id,
                      f->peer ? f->peer : "peer", detail);
}

/* Checks the frame's type (and request id when request-scoped); NULL payload guards. */
static hx_status expect_type(const hx_proto_frame *f, hx_proto_type type, hx_err *err)
{
    if (!f || (!f->payload && f->len))
        return hx_err_set(err, HX_EINVAL, "decoding %s: NULL frame", hx_proto_type_name(type));
    if (f->type != type) {
        const char *got = hx_proto_type_name(f->type);
        return hx_err_set(err, HX_EINVAL, "decoding %s: the frame is a %s", hx_proto_type_name(type),
                          got ? got : "frame of unknown type");
    }
    if (TYPES[type].request_scoped && f->req_id == 0)
        return bad_payload(f, err, "request id 0; a %s belongs to a request",
                           hx_proto_type_name(type));
    return HX_OK;
}

/* Group ids, versions: printable ASCII without spaces. */
static int name_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e)
            return 0;
    return 1;
}

static int text_ok(const unsigned char *s, size_t n)
{
    int line, col;
    size_t off;
    return hx_file_is_text((const char *)s, n, &line, &col, &off);
}

/* Copies text into dst (size dst_size), cutting at a UTF-8 boundary and
 * replacing bytes that are not valid text by '?'. Returns the length. */
static size_t sanitize_text(const char *src, char *dst, size_t dst_size)
{
    size_t n = 0, i = 0, len = src ? strlen(src) : 0;
    while (i < len && n + 1 < dst_size) {
        unsigned char c = (unsigned char)src[i];
        size_t k = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
                              : (c & 0xF8) == 0xF0    ? 4 : 0;
        if (k == 0 || i + k > len || !text_ok((const unsigned char *)src + i, k)) {
            dst[n++] = '?';
            i++;
            continue;
        }
        if (n + k + 1 > dst_size)
            break;
        memcpy(dst + n, src + i, k);
        n += k;
        i += k;
    }
    dst[n] = '\0';
    return n;
}

static int tokens_ok(const int32_t *ids, uint32_t n, uint32_t *bad_index)
{
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] < 0) {
            *bad_index = i;
            return 0;
        }
    return 1;
}

/* HELLO: u16 role, u16 stage, u32 rank, u16 group_len, u16 version_len, group, version */
hx_status hx_proto_send_hello(hx_proto_conn *c, const hx_proto_hello *m, int64_t deadline_ns,
                              hx_err *err)
{
    unsigned char buf[12 + HX_PROTO_NAME_MAX + HX_PROTO_SOFTWARE_VERSION_MAX];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_hello: NULL argument");
    size_t gl = strnlen(m->group_id, sizeof m->group_id);
    size_t vl = strnlen(m->version, sizeof m->version);
    if (!hx_proto_role_name(m->role) || gl > HX_PROTO_NAME_MAX ||
        !name_ok((const unsigned char *)m->group_id, gl) || vl < 1 ||
        vl > HX_PROTO_SOFTWARE_VERSION_MAX || !name_ok((const unsigned char *)m->version, vl))
        return hx_err_set(err, HX_EINVAL,
                          "HELLO to %s: bad fields (role %d, group id '%.64s', version '%.32s')",
                          c->who, (int)m->role, m->group_id, m->version);
    put_u16(buf, (uint16_t)m->role);
    put_u16(buf + 2, m->stage);
    put_u32(buf + 4, m->rank);
    put_u16(buf + 8, (uint16_t)gl);
    put_u16(buf + 10, (uint16_t)vl);
    memcpy(buf + 12, m->group_id, gl);
    memcpy(buf + 12 + gl, m->version, vl);
    return hx_proto_send(c, HX_PROTO_HELLO, 0, buf, 12 + gl + vl, deadline_ns, err);
}

hx_status hx_proto_decode_hello(const hx_proto_frame *f, hx_proto_hello *out, hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_HELLO, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_hello: NULL argument");
    const unsigned char *p = f->payload;
    if (f->len < 12)
        return bad_payload(f, err, "%zu bytes; at least 12 expected", f->len);
    size_t gl = get_u16(p + 8), vl = get_u16(p + 10);
    if (f->len != 12 + gl + vl)
        return bad_payload(f, err, "%zu bytes, but the string lengths (%zu + %zu) need %zu",
                           f->len, gl, vl, 12 + gl + vl);
    uint16_t role = get_u16(p);
    if (!hx_proto_role_name((hx_proto_role)role))
        return bad_payload(f, err, "unknown role %u", (unsigned)role);
    if (gl > HX_PROTO_NAME_MAX || !name_ok(p + 12, gl))
        return bad_payload(f, err, "group id of %zu bytes is not a name (at most %d printable "
                                   "characters)",
                           gl, HX_PROTO_NAME_MAX);
    if (vl < 1 || vl > HX_PROTO_SOFTWARE_VERSION_MAX || !name_ok(p + 12 + gl, vl))
        return bad_payload(f, err, "software version of %zu bytes is not a name (1 to %d "
                                   "printable characters)",
                           vl, HX_PROTO_SOFTWARE_VERSION_MAX);
    memset(out, 0, sizeof *out);
    out->role = (hx_proto_role)role;
    out->stage = get_u16(p + 2);
    out->rank = get_u32(p + 4);
    memcpy(out->group_id, p + 12, gl);
    memcpy(out->version, p + 12 + gl, vl);
    return HX_OK;
}

/* PREFILL_REQUEST: u32 num_tokens, u32 max_tokens, f32 temperature, f32 top_p, u32 top_k,
 * u16 group_len, u16 0, u64 seed, i32 tokens[num_tokens], group */
static int sampling_ok(float temperature, float top_p)
{
    return temperature >= 0.0f && temperature <= 1e6f && top_p > 0.0f && top_p <= 1.0f;
}

hx_status hx_proto_send_prefill_request(hx_proto_conn *c, uint64_t req_id,
                                        const hx_proto_prefill_request *m, int64_t deadline_ns,
                                        hx_err *err)
{
    unsigned char fixed[HX_PROTO_PREFILL_FIXED_BYTES];
    uint32_t bad = 0;
    if (!c || !m || (!m->token_ids && m->num_tokens))
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_prefill_request: NULL argument");
    size_t gl = strnlen(m->decode_group, sizeof m->decode_group);
    if (req_id == 0 || m->num_tokens < 1 || m->max_tokens < 1 ||
        !sampling_ok(m->temperature, m->top_p) || gl > HX_PROTO_NAME_MAX ||
        !name_ok((const unsigned char *)m->decode_group, gl) ||
        !tokens_ok(m->token_ids, m->num_tokens, &bad))
        return hx_err_set(err, HX_EINVAL,
                          "PREFILL_REQUEST %llu to %s: bad fields (request id, %u tokens, "
                          "max_tokens %u, temperature %g, top_p %g, decode group '%.64s', or a "
                          "negative token id)",
                          (unsigned long long)req_id, c->who, m->num_tokens, m->max_tokens,
                          (double)m->temperature, (double)m->top_p, m->decode_group);
    put_u32(fixed, m->num_tokens);
    put_u32(fixed + 4, m->max_tokens);
    put_f32(fixed + 8, m->temperature);
    put_f32(fixed + 12, m->top_p);
    put_u32(fixed + 16, m->top_k);
    put_u16(fixed + 20, (uint16_t)gl);
    put_u16(fixed + 22, 0);
    put_u64(fixed + 24, m->seed);
    hx_proto_part parts[3] = {{fixed, sizeof fixed},
                              {m->token_ids, (size_t)m->num_tokens * 4},
                              {m->decode_group, gl}};
    return hx_proto_sendv(c, HX_PROTO_PREFILL_REQUEST, req_id, parts, 3, deadline_ns, err);
}

hx_status hx_proto_decode_prefill_request(const hx_proto_frame *f, hx_proto_prefill_request *out,
                                          hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_PREFILL_REQUEST, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_prefill_request: NULL argument");
    const unsigned char *p = f->payload;
    if (f->len < HX_PROTO_PREFILL_FIXED_BYTES)
        return bad_payload(f, err, "%zu bytes; at least %d expected", f->len,
                           HX_PROTO_PREFILL_FIXED_BYTES);
    uint32_t n = get_u32(p);
    size_t gl = get_u16(p + 20);
    uint64_t want = (uint64_t)HX_PROTO_PREFILL_FIXED_BYTES + 4 * (uint64_t)n + gl;
    if (f->len != want)
        return bad_payload(f, err, "%zu bytes, but %u tokens and a %zu-byte group id need %llu",
                           f->len, n, gl, (unsigned long long)want);
    if (n < 1)
        return bad_payload(f, err, "no prompt tokens");
    uint32_t max_tokens = get_u32(p + 4);
    if (max_tokens < 1)
        return bad_payload(f, err, "max_tokens is 0");
    float temperature = get_f32(p + 8), top_p = get_f32(p + 12);
    if (!sampling_ok(temperature, top_p))
        return bad_payload(f, err, "sampling parameters out of range (temperature %g, top_p %g)",
                           (double)temperature, (double)top_p);
    if (get_u16(p + 22) != 0)
        return bad_payload(f, err, "reserved field is not 0");
    const unsigned char *tok = p + HX_PROTO_PREFILL_FIXED_BYTES;
    if ((uintptr_t)tok % sizeof(int32_t) != 0)
        return hx_err_set(err, HX_EINVAL, "decoding PREFILL_REQUEST: payload is not 4-byte "
                                          "aligned (not a frame from hx_proto_recv?)");
    const int32_t *ids = (const int32_t *)(const void *)tok;
    uint32_t bad = 0;
    if (!tokens_ok(ids, n, &bad))
        return bad_payload(f, err, "token %u has the negative id %d", bad, (int)ids[bad]);
    const unsigned char *g = tok + 4 * (size_t)n;
    if (gl > HX_PROTO_NAME_MAX || !name_ok(g, gl))
        return bad_payload(f, err, "decode group of %zu bytes is not a name (at most %d "
                                   "printable characters)",
                           gl, HX_PROTO_NAME_MAX);
    memset(out, 0, sizeof *out);
    out->num_tokens = n;
    out->max_tokens = max_tokens;
    out->temperature = temperature;
    out->top_p = top_p;
    out->top_k = get_u32(p + 16);
    out->seed = get_u64(p + 24);
    memcpy(out->decode_group, g, gl);
    out->token_ids = ids;
    return HX_OK;
}

/* FIRST_TOKEN: i32 token, u32 num_prompt_tokens, u64 prefill_ns, u64 kv_bytes */
hx_status hx_proto_send_first_token(hx_proto_conn *c, uint64_t req_id,
                                    const hx_proto_first_token *m, int64_t deadline_ns,
                                    hx_err *err)
{
    unsigned char buf[HX_PROTO_FIRST_TOKEN_BYTES];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_first_token: NULL argument");
    if (req_id == 0 || m->token_id < 0)
        return hx_err_set(err, HX_EINVAL, "FIRST_TOKEN to %s: request id %llu, token %d",
                          c->who, (unsigned long long)req_id, (int)m->token_id);
    put_u32(buf, (uint32_t)m->token_id);
    put_u32(buf + 4, m->num_prompt_tokens);
    put_u64(buf + 8, m->prefill_ns);
    put_u64(buf + 16, m->kv_bytes);
    return hx_proto_send(c, HX_PROTO_FIRST_TOKEN, req_id, buf, sizeof buf, deadline_ns, err);
}

hx_status hx_proto_decode_first_token(const hx_proto_frame *f, hx_proto_first_token *out,
                                      hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_FIRST_TOKEN, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_first_token: NULL argument");
    if (f->len != HX_PROTO_FIRST_TOKEN_BYTES)
        return bad_payload(f, err, "%zu bytes; %d expected", f->len, HX_PROTO_FIRST_TOKEN_BYTES);
    int32_t tok = (int32_t)get_u32(f->payload);
    if (tok < 0)
        return bad_payload(f, err, "negative token id %d", (int)tok);
    out->token_id = tok;
    out->num_prompt_tokens = get_u32(f->payload + 4);
    out->prefill_ns = get_u64(f->payload + 8);
    out->kv_bytes = get_u64(f->payload + 16);
    return HX_OK;
}

/* KV_SEGMENT header (64 bytes):
 *  0 u16 src_stage  2 u16 src_rank  4 u16 dst_stage  6 u16 dst_rank
 *  8 u32 segment_index  12 u32 num_segments  16 u32 first_layer  20 u32 num_layers
 * 24 u32 first_kv_head  28 u32 num_kv_heads  32 u32 first_token  36 u32 num_tokens
 * 40 u32 head_dim  44 u16 dtype  46 u16 layout (0)  48 u64 data_bytes  56 u64 reserved (0) */
static hx_status kv_bytes(const hx_proto_kv_segment *m, uint64_t *out, char *why, size_t why_size)
{
    size_t eb = hx_proto_dtype_bytes(m->dtype);
    if (!eb) {
        snprintf(why, why_size, "unknown dtype %d", (int)m->dtype);
        return HX_EINVAL;
    }
    if (!m->num_layers || !m->num_kv_heads || !m->num_tokens || !m->head_dim) {
        snprintf(why, why_size, "a zero dimension (%u layers, %u KV heads, %u tokens, head_dim %u)",
                 m->num_layers, m->num_kv_heads, m->num_tokens, m->head_dim);
        return HX_EINVAL;
    }
    uint64_t dims[5] = {m->num_layers, 2, m->num_kv_heads, m->num_tokens, m->head_dim};
    uint64_t v = eb;
    for (int i = 0; i < 5; i++) {
        if (v > UINT64_MAX / dims[i]) {
            snprintf(why, why_size, "the geometry overflows 64 bits");
            return HX_ERANGE;
        }
        v *= dims[i];
    }
    *out = v;
    return HX_OK;
}

hx_status hx_proto_kv_segment_bytes(const hx_proto_kv_segment *m, uint64_t *out, hx_err *err)
{
    char why[160];
    if (!m || !out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_kv_segment_bytes: NULL argument");
    hx_status st = kv_bytes(m, out, why, sizeof why);
    if (st != HX_OK)
        return hx_err_set(err, st, "KV segment: %s", why);
    return HX_OK;
}

hx_status hx_proto_send_kv_segment(hx_proto_conn *c, uint64_t req_id,
                                   const hx_proto_kv_segment *m, int64_t deadline_ns,
                                   hx_err *err)
{
    unsigned char h[HX_PROTO_KV_HEADER_BYTES];
    char why[160];
    uint64_t want = 0;
    if (!c || !m || (!m->data && !m->remote) || m->remote > 1)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_kv_segment: NULL argument");
    hx_status st = kv_bytes(m, &want, why, sizeof why);
    if (st != HX_OK)
        return hx_err_set(err, st, "KV_SEGMENT %llu to %s: %s", (unsigned long long)req_id,
                          c->who, why);
    if (req_id == 0 || m->data_bytes != want || m->num_segments < 1 ||
        m->segment_index >= m->num_segments || want > SIZE_MAX)
        return hx_err_set(err, HX_EINVAL,
                          "KV_SEGMENT %llu to %s: bad fields (data_bytes %llu for a geometry of "
                          "%llu bytes, segment %u of %u)",
                          (unsigned long long)req_id, c->who, (unsigned long long)m->data_bytes,
                          (unsigned long long)want, m->segment_index, m->num_segments);
    put_u16(h, m->src_stage);
    put_u16(h + 2, m->src_rank);
    put_u16(h + 4, m->dst_stage);
    put_u16(h + 6, m->dst_rank);
    put_u32(h + 8, m->segment_index);
    put_u32(h + 12, m->num_segments);
    put_u32(h + 16, m->first_layer);
    put_u32(h + 20, m->num_layers);
    put_u32(h + 24, m->first_kv_head);
    put_u32(h + 28, m->num_kv_heads);
    put_u32(h + 32, m->first_token);
    put_u32(h + 36, m->num_tokens);
    put_u32(h + 40, m->head_dim);
    put_u16(h + 44, (uint16_t)m->dtype);
    put_u16(h + 46, 0);
    put_u64(h + 48, m->data_bytes);
    put_u64(h + 56, m->remote);
    hx_proto_part parts[2] = {{h, sizeof h}, {m->data, (size_t)m->data_bytes}};
    return hx_proto_sendv(c, HX_PROTO_KV_SEGMENT, req_id, parts, m->remote ? 1 : 2, deadline_ns,
                          err);
}

hx_status hx_proto_decode_kv_segment(const hx_proto_frame *f, hx_proto_kv_segment *out,
                                     hx_err *err)
{
    char why[160];
    uint64_t want = 0;
    hx_status st = expect_type(f, HX_PROTO_KV_SEGMENT, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_kv_segment: NULL argument");
    const unsigned char *h = f->payload;
    if (f->len < HX_PROTO_KV_HEADER_BYTES)
        return bad_payload(f, err, "%zu bytes; a KV segment header alone is %d", f->len,
                           HX_PROTO_KV_HEADER_BYTES);
    hx_proto_kv_segment m;
    memset(&m, 0, sizeof m);
    m.src_stage = get_u16(h);
    m.src_rank = get_u16(h + 2);
    m.dst_stage = get_u16(h + 4);
    m.dst_rank = get_u16(h + 6);
    m.segment_index = get_u32(h + 8);
    m.num_segments = get_u32(h + 12);
    m.first_layer = get_u32(h + 16);
    m.num_layers = get_u32(h + 20);
    m.first_kv_head = get_u32(h + 24);
    m.num_kv_heads = get_u32(h + 28);
    m.first_token = get_u32(h + 32);
    m.num_tokens = get_u32(h + 36);
    m.head_dim = get_u32(h + 40);
    m.dtype = (hx_proto_dtype)get_u16(h + 44);
    uint16_t layout = get_u16(h + 46);
    m.data_bytes = get_u64(h + 48);
    if (layout != 0)
        return bad_payload(f, err, "unknown layout %u (only 0, [layers][2][kv_heads][tokens]"
                                   "[head_dim], is defined)",
                           (unsigned)layout);
    const uint64_t remote = get_u64(h + 56);
    if (remote > 1)
        return bad_payload(f, err, "transport %llu (0: the payload follows, 1: over NCCL)",
                           (unsigned long long)remote);
    m.remote = (uint32_t)remote;
    if (m.num_segments < 1 || m.segment_index >= m.num_segments)
        return bad_payload(f, err, "segment %u of %u", m.segment_index, m.num_segments);
    if (kv_bytes(&m, &want, why, sizeof why) != HX_OK)
        return bad_payload(f, err, "%s", why);
    if (m.data_bytes != want)
        return bad_payload(f, err,
                           "data_bytes %llu does not match the geometry: %u layers x 2 x %u KV "
                           "heads x %u tokens x %u head_dim x %zu bytes (%s) = %llu",
                           (unsigned long long)m.data_bytes, m.num_layers, m.num_kv_heads,
                           m.num_tokens, m.head_dim, hx_proto_dtype_bytes(m.dtype),
                           hx_proto_dtype_name(m.dtype), (unsigned long long)want);
    if ((uint64_t)f->len - HX_PROTO_KV_HEADER_BYTES != (m.remote ? 0 : m.data_bytes))
        return bad_payload(f, err, "payload holds %zu data bytes; the header says %llu%s",
                           f->len - HX_PROTO_KV_HEADER_BYTES, (unsigned long long)m.data_bytes,
                           m.remote ? " over NCCL, and none here" : "");
    m.data = m.remote ? NULL : h + HX_PROTO_KV_HEADER_BYTES;
    *out = m;
    return HX_OK;
}

/* KV_ACK: u16 x4 ranks, u32 segment_index, i32 status, u64 bytes_received */
hx_status hx_proto_send_kv_ack(hx_proto_conn *c, uint64_t req_id, const hx_proto_kv_ack *m,
                               int64_t deadline_ns, hx_err *err)
{
    unsigned char b[HX_PROTO_KV_ACK_BYTES];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_kv_ack: NULL argument");
    if (req_id == 0 || m->status > 0)
        return hx_err_set(err, HX_EINVAL, "KV_ACK to %s: request id %llu, status %d", c->who,
                          (unsigned long long)req_id, (int)m->status);
    put_u16(b, m->src_stage);
    put_u16(b + 2, m->src_rank);
    put_u16(b + 4, m->dst_stage);
    put_u16(b + 6, m->dst_rank);
    put_u32(b + 8, m->segment_index);
    put_u32(b + 12, (uint32_t)m->status);
    put_u64(b + 16, m->bytes_received);
    return hx_proto_send(c, HX_PROTO_KV_ACK, req_id, b, sizeof b, deadline_ns, err);
}

hx_status hx_proto_decode_kv_ack(const hx_proto_frame *f, hx_proto_kv_ack *out, hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_KV_ACK, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_kv_ack: NULL argument");
    if (f->len != HX_PROTO_KV_ACK_BYTES)
        return bad_payload(f, err, "%zu bytes; %d expected", f->len, HX_PROTO_KV_ACK_BYTES);
    const unsigned char *b = f->payload;
    int32_t status = (int32_t)get_u32(b + 12);
    if (status > 0)
        return bad_payload(f, err, "status %d is not a status (0 or negative)", (int)status);
    out->src_stage = get_u16(b);
    out->src_rank = get_u16(b + 2);
    out->dst_stage = get_u16(b + 4);
    out->dst_rank = get_u16(b + 6);
    out->segment_index = get_u32(b + 8);
    out->status = status;
    out->bytes_received = get_u64(b + 16);
    return HX_OK;
}

/* TOKENS: u32 num_tokens, u32 0, u64 first_position, i32 tokens[num_tokens] */
hx_status hx_proto_send_tokens(hx_proto_conn *c, uint64_t req_id, const hx_proto_tokens *m,
                               int64_t deadline_ns, hx_err *err)
{
    unsigned char fixed[HX_PROTO_TOKENS_FIXED_BYTES];
    uint32_t bad = 0;
    if (!c || !m || !m->token_ids)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_tokens: NULL argument");
    if (req_id == 0 || m->num_tokens < 1 || !tokens_ok(m->token_ids, m->num_tokens, &bad))
        return hx_err_set(err, HX_EINVAL,
                          "TOKENS to %s: request id %llu, %u tokens (at least 1, none negative)",
                          c->who, (unsigned long long)req_id, m->num_tokens);
    put_u32(fixed, m->num_tokens);
    put_u32(fixed + 4, 0);
    put_u64(fixed + 8, m->first_position);
    hx_proto_part parts[2] = {{fixed, sizeof fixed}, {m->token_ids, (size_t)m->num_tokens * 4}};
    return hx_proto_sendv(c, HX_PROTO_TOKENS, req_id, parts, 2, deadline_ns, err);
}

hx_status hx_proto_decode_tokens(const hx_proto_frame *f, hx_proto_tokens *out, hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_TOKENS, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_tokens: NULL argument");
    if (f->len < HX_PROTO_TOKENS_FIXED_BYTES)
        return bad_payload(f, err, "%zu bytes; at least %d expected", f->len,
                           HX_PROTO_TOKENS_FIXED_BYTES);
    uint32_t n = get_u32(f->payload);
    uint64_t want = HX_PROTO_TOKENS_FIXED_BYTES + 4 * (uint64_t)n;
    if (f->len != want)
        return bad_payload(f, err, "%zu bytes, but %u tokens need %llu", f->len, n,
                           (unsigned long long)want);
    if (n < 1)
        return bad_payload(f, err, "no tokens");
    if (get_u32(f->payload + 4) != 0)
        return bad_payload(f, err, "reserved field is not 0");
    const unsigned char *tok = f->payload + HX_PROTO_TOKENS_FIXED_BYTES;
    if ((uintptr_t)tok % sizeof(int32_t) != 0)
        return hx_err_set(err, HX_EINVAL, "decoding TOKENS: payload is not 4-byte aligned (not "
                                          "a frame from hx_proto_recv?)");
    const int32_t *ids = (const int32_t *)(const void *)tok;
    uint32_t bad = 0;
    if (!tokens_ok(ids, n, &bad))
        return bad_payload(f, err, "token %u has the negative id %d", bad, (int)ids[bad]);
    out->first_position = get_u64(f->payload + 8);
    out->num_tokens = n;
    out->token_ids = ids;
    return HX_OK;
}

/* DONE: u32 finish, u32 num_generated_tokens, u64 elapsed_ns */
hx_status hx_proto_send_done(hx_proto_conn *c, uint64_t req_id, const hx_proto_done *m,
                             int64_t deadline_ns, hx_err *err)
{
    unsigned char b[HX_PROTO_DONE_BYTES];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_done: NULL argument");
    if (req_id == 0 || (unsigned)m->finish > HX_PROTO_FINISH_ERROR)
        return hx_err_set(err, HX_EINVAL, "DONE to %s: request id %llu, finish reason %d",
                          c->who, (unsigned long long)req_id, (int)m->finish);
    put_u32(b, (uint32_t)m->finish);
    put_u32(b + 4, m->num_generated_tokens);
    put_u64(b + 8, m->elapsed_ns);
    return hx_proto_send(c, HX_PROTO_DONE, req_id, b, sizeof b, deadline_ns, err);
}

hx_status hx_proto_decode_done(const hx_proto_frame *f, hx_proto_done *out, hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_DONE, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_done: NULL argument");
    if (f->len != HX_PROTO_DONE_BYTES)
        return bad_payload(f, err, "%zu bytes; %d expected", f->len, HX_PROTO_DONE_BYTES);
    uint32_t finish = get_u32(f->payload);
    if (finish > HX_PROTO_FINISH_ERROR)
        return bad_payload(f, err, "unknown finish reason %u", (unsigned)finish);
    out->finish = (hx_proto_finish)finish;
    out->num_generated_tokens = get_u32(f->payload + 4);
    out->elapsed_ns = get_u64(f->payload + 8);
    return HX_OK;
}

/* ERROR: i32 code, u16 message_len, message */
hx_status hx_proto_send_error(hx_proto_conn *c, uint64_t req_id, hx_status code,
                              const char *message, int64_t deadline_ns, hx_err *err)
{
    unsigned char b[6 + HX_PROTO_ERROR_MESSAGE_MAX + 1];
    if (!c)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_error: NULL argument");
    if ((int)code >= 0)
        return hx_err_set(err, HX_EINVAL, "ERROR to %s: code %d is not an error", c->who,
                          (int)code);
    size_t n = sanitize_text(message ? message : "", (char *)b + 6, HX_PROTO_ERROR_MESSAGE_MAX + 1);
    put_u32(b, (uint32_t)(int32_t)code);
    put_u16(b + 4, (uint16_t)n);
    return hx_proto_send(c, HX_PROTO_ERROR, req_id, b, 6 + n, deadline_ns, err);
}

hx_status hx_proto_decode_error(const hx_proto_frame *f, hx_proto_error *out, hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_ERROR, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_error: NULL argument");
    if (f->len < 6)
        return bad_payload(f, err, "%zu bytes; at least 6 expected", f->len);
    int32_t code = (int32_t)get_u32(f->payload);
    size_t n = get_u16(f->payload + 4);
    if (f->len != 6 + n)
        return bad_payload(f, err, "%zu bytes, but a %zu-byte message needs %zu", f->len, n, 6 + n);
    if (code >= 0)
        return bad_payload(f, err, "code %d is not an error (negative)", (int)code);
    if (n > HX_PROTO_ERROR_MESSAGE_MAX || !text_ok(f->payload + 6, n))
        return bad_payload(f, err, "the message is not text of at most %d bytes (UTF-8, no "
                                   "control characters)",
                           HX_PROTO_ERROR_MESSAGE_MAX);
    out->code = code;
    memcpy(out->message, f->payload + 6, n);
    out->message[n] = '\0';
    return HX_OK;
}

/* HEALTH: empty. HEALTH_OK: u32 num_counters (>= 10), u32 0, u64 counters[num_counters] */
hx_status hx_proto_send_health(hx_proto_conn *c, uint64_t req_id, int64_t deadline_ns,
                               hx_err *err)
{
    return hx_proto_send(c, HX_PROTO_HEALTH, req_id, NULL, 0, deadline_ns, err);
}

hx_status hx_proto_send_health_ok(hx_proto_conn *c, uint64_t req_id, const hx_proto_health *m,
                                  int64_t deadline_ns, hx_err *err)
{
    unsigned char b[8 + 8 * HX_PROTO_HEALTH_COUNTERS];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_health_ok: NULL argument");
    const uint64_t v[HX_PROTO_HEALTH_COUNTERS] = {
        m->uptime_ns,        m->requests_active, m->requests_queued, m->requests_done,
        m->requests_failed,  m->tokens_generated, m->kv_bytes_sent,  m->kv_bytes_received,
        m->kv_blocks_used,   m->kv_blocks_total,  m->max_request_tokens};
    put_u32(b, HX_PROTO_HEALTH_COUNTERS);
    put_u32(b + 4, 0);
    for (int i = 0; i < HX_PROTO_HEALTH_COUNTERS; i++)
        put_u64(b + 8 + 8 * i, v[i]);
    return hx_proto_send(c, HX_PROTO_HEALTH_OK, req_id, b, sizeof b, deadline_ns, err);
}

hx_status hx_proto_decode_health_ok(const hx_proto_frame *f, hx_proto_health *out,
                                    hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_HEALTH_OK, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_health_ok: NULL argument");
    if (f->len < 8)
        return bad_payload(f, err, "%zu bytes; at least 8 expected", f->len);
    uint32_t n = get_u32(f->payload);
    if (n < HX_PROTO_HEALTH_COUNTERS_MIN || n > HX_PROTO_HEALTH_MAX_COUNTERS)
        return bad_payload(f, err, "%u counters; %d to %d expected", n,
                           HX_PROTO_HEALTH_COUNTERS_MIN, HX_PROTO_HEALTH_MAX_COUNTERS);
    if (f->len != 8 + 8 * (size_t)n)
        return bad_payload(f, err, "%zu bytes, but %u counters need %zu", f->len, n,
                           8 + 8 * (size_t)n);
    if (get_u32(f->payload + 4) != 0)
        return bad_payload(f, err, "reserved field is not 0");
    uint64_t v[HX_PROTO_HEALTH_COUNTERS] = {0}; /* counters an older sender lacks: 0 */
    for (int i = 0; i < HX_PROTO_HEALTH_COUNTERS && i < (int)n; i++)
        v[i] = get_u64(f->payload + 8 + 8 * i);
    out->uptime_ns = v[0];
    out->requests_active = v[1];
    out->requests_queued = v[2];
    out->requests_done = v[3];
    out->requests_failed = v[4];
    out->tokens_generated = v[5];
    out->kv_bytes_sent = v[6];
    out->kv_bytes_received = v[7];
    out->kv_blocks_used = v[8];
    out->kv_blocks_total = v[9];
    out->max_request_tokens = v[10];
    return HX_OK;
}

/* SHUTDOWN: u32 flags, u16 reason_len, reason */
hx_status hx_proto_send_shutdown(hx_proto_conn *c, const hx_proto_shutdown *m,
                                 int64_t deadline_ns, hx_err *err)
{
    unsigned char b[6 + HX_PROTO_REASON_MAX + 1];
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_shutdown: NULL argument");
    if (m->flags & ~HX_PROTO_SHUTDOWN_DRAIN)
        return hx_err_set(err, HX_EINVAL, "SHUTDOWN to %s: unknown flags 0x%x", c->who,
                          (unsigned)m->flags);
    size_t n = sanitize_text(m->reason, (char *)b + 6, HX_PROTO_REASON_MAX + 1);
    put_u32(b, m->flags);
    put_u16(b + 4, (uint16_t)n);
    return hx_proto_send(c, HX_PROTO_SHUTDOWN, 0, b, 6 + n, deadline_ns, err);
}

hx_status hx_proto_decode_shutdown(const hx_proto_frame *f, hx_proto_shutdown *out,
                                   hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_SHUTDOWN, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_shutdown: NULL argument");
    if (f->len < 6)
        return bad_payload(f, err, "%zu bytes; at least 6 expected", f->len);
    uint32_t flags = get_u32(f->payload);
    size_t n = get_u16(f->payload + 4);
    if (f->len != 6 + n)
        return bad_payload(f, err, "%zu bytes, but a %zu-byte reason needs %zu", f->len, n, 6 + n);
    if (flags & ~HX_PROTO_SHUTDOWN_DRAIN)
        return bad_payload(f, err, "unknown flags 0x%x", (unsigned)flags);
    if (n > HX_PROTO_REASON_MAX || !text_ok(f->payload + 6, n))
        return bad_payload(f, err, "the reason is not text of at most %d bytes",
                           HX_PROTO_REASON_MAX);
    out->flags = flags;
    memcpy(out->reason, f->payload + 6, n);
    out->reason[n] = '\0';
    return HX_OK;
}

/* ---- group messages --------------------------------------------------------- */

hx_status hx_proto_send_group_op(hx_proto_conn *c, uint64_t req_id, const hx_proto_group_op *m,
                                 int64_t deadline_ns, hx_err *err)
{
    unsigned char fixed[HX_PROTO_GROUP_OP_FIXED_BYTES];
    uint32_t bad = 0;
    if (!c || !m || (m->num_tokens > 0 && !m->token_ids))
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_group_op: NULL argument");
    if (m->op < HX_PROTO_OP_ADD || m->op > HX_PROTO_OP_LAST ||
        (m->num_tokens > 0 && !tokens_ok(m->token_ids, m->num_tokens, &bad)))
        return hx_err_set(err, HX_EINVAL, "GROUP_OP to %s: op %d, %u tokens (none negative)",
                          c->who, (int)m->op, m->num_tokens);
    memset(fixed, 0, sizeof fixed);
    put_u32(fixed, (uint32_t)m->op);
    put_u32(fixed + 4, m->max_tokens);
    put_f32(fixed + 8, m->temperature);
    put_f32(fixed + 12, m->top_p);
    put_u64(fixed + 16, m->seed);
    put_u32(fixed + 24, (uint32_t)m->eos_id);
    put_u32(fixed + 28, m->hold_kv);
    put_u32(fixed + 32, (uint32_t)m->first_token);
    put_u32(fixed + 36, m->n_prompt);
    put_u16(fixed + 40, (uint16_t)(int16_t)m->src_group);
    put_u16(fixed + 42, (uint16_t)(int16_t)m->dst_group);
    put_u32(fixed + 44, m->num_tokens);
    hx_proto_part parts[2] = {{fixed, sizeof fixed},
                              {m->token_ids, (size_t)m->num_tokens * 4}};
    return hx_proto_sendv(c, HX_PROTO_GROUP_OP, req_id, parts, m->num_tokens ? 2 : 1,
                          deadline_ns, err);
}

hx_status hx_proto_decode_group_op(const hx_proto_frame *f, hx_proto_group_op *out,
                                   hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_GROUP_OP, err);
    if (st != HX_OK)
        return st;
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_proto_decode_group_op: NULL argument");
    if (f->len < HX_PROTO_GROUP_OP_FIXED_BYTES)
        return bad_payload(f, err, "%zu bytes; at least %d expected", f->len,
                           HX_PROTO_GROUP_OP_FIXED_BYTES);
    const unsigned char *p = f->payload;
    uint32_t n = get_u32(p + 44);
    uint64_t want = HX_PROTO_GROUP_OP_FIXED_BYTES + 4 * (uint64_t)n;
    if (f->len != want)
        return bad_payload(f, err, "%zu bytes, but %u tokens need %llu", f->len, n,
                           (unsigned long long)want);
    uint32_t op = get_u32(p);
    if (op < HX_PROTO_OP_ADD || op > HX_PROTO_OP_LAST)
        return bad_payload(f, err, "unknown operation %u", op);
    out->op = (hx_proto_op)op;
    out->max_tokens = get_u32(p + 4);
    out->temperature = get_f32(p + 8);
    out->top_p = get_f32(p + 12);
    out->seed = get_u64(p + 16);
    out->eos_id = (int32_t)get_u32(p + 24);
    out->hold_kv = get_u32(p + 28);
    out->first_token = (int32_t)get_u32(p + 32);
    out->n_prompt = get_u32(p + 36);
    out->src_group = (int16_t)(uint16_t)(p[40] | p[41] << 8);
    out->dst_group = (int16_t)(uint16_t)(p[42] | p[43] << 8);
    out->num_tokens = n;
    out->token_ids = n ? (const int32_t *)(const void *)(p + HX_PROTO_GROUP_OP_FIXED_BYTES) : NULL;
    uint32_t bad = 0;
    if (n && !tokens_ok(out->token_ids, n, &bad))
        return bad_payload(f, err, "token %u is negative", bad);
    if (!(out->temperature >= 0.0f) || !(out->top_p >= 0.0f && out->top_p <= 1.0f))
        return bad_payload(f, err, "sampling parameters out of range");
    return HX_OK;
}

/* Receives one frame of `type` into *f; an ERROR frame becomes its error. */
static hx_status recv_type(hx_proto_conn *c, hx_proto_type type, hx_proto_frame *f,
                           int64_t deadline_ns, hx_err *err)
{
    hx_status st = hx_proto_recv(c, f, deadline_ns, err);
    if (st != HX_OK)
        return st;
    if (f->type == HX_PROTO_ERROR) {
        hx_proto_error e;
        if (hx_proto_decode_error(f, &e, err) != HX_OK)
            return HX_EPARSE;
        return hx_err_set(err, e.code < 0 ? (hx_status)e.code : HX_EIO, "%s: %s", c->who,
                          e.message);
    }
    if (f->type != type)
        return hx_err_set(err, HX_EPARSE, "%s: got %s, expected %s", c->who,
                          hx_proto_type_name((int)f->type), hx_proto_type_name((int)type));
    return HX_OK;
}

/* Receives one frame of `type` holding exactly `bytes`; an ERROR frame becomes its error. */
static hx_status recv_exact(hx_proto_conn *c, hx_proto_type type, void *dst, size_t bytes,
                            int64_t deadline_ns, hx_err *err)
{
    hx_proto_frame f;
    hx_status st = recv_type(c, type, &f, deadline_ns, err);
    if (st != HX_OK)
        return st;
    if (f.len != bytes)
        return hx_err_set(err, HX_EPARSE, "%s: %s of %zu bytes, expected %zu", c->who,
                          hx_proto_type_name((int)type), f.len, bytes);
    memcpy(dst, f.payload, bytes);
    return HX_OK;
}

hx_status hx_proto_send_floats(hx_proto_conn *c, const float *x, size_t n, int64_t deadline_ns,
                               hx_err *err)
{
    return hx_proto_send(c, HX_PROTO_TENSOR, 0, x, n * sizeof(float), deadline_ns, err);
}

hx_status hx_proto_recv_floats(hx_proto_conn *c, float *x, size_t n, int64_t deadline_ns,
                               hx_err *err)
{
    return recv_exact(c, HX_PROTO_TENSOR, x, n * sizeof(float), deadline_ns, err);
}

hx_status hx_proto_send_step_tokens(hx_proto_conn *c, const int *tokens, int n,
                                    int64_t deadline_ns, hx_err *err)
{
    return hx_proto_send(c, HX_PROTO_STEP_TOKENS, 0, tokens, (size_t)n * sizeof(int),
                         deadline_ns, err);
}

hx_status hx_proto_recv_step_tokens(hx_proto_conn *c, int *tokens, int n, int64_t deadline_ns,
                                    hx_err *err)
{
    return recv_exact(c, HX_PROTO_STEP_TOKENS, tokens, (size_t)n * sizeof(int), deadline_ns,
                      err);
}

static const char *setup_phase_name(uint32_t phase)
{
    static const char *names[] = {"?", "OFFER", "PLAN", "NCCL_ID", "JOINED", "FINAL"};
    return phase >= 1 && phase <= HX_PROTO_SETUP_FINAL ? names[phase] : "unknown";
}

hx_status hx_proto_send_group_setup(hx_proto_conn *c, const hx_proto_group_setup *m,
                                    int64_t deadline_ns, hx_err *err)
{
    if (!c || !m)
        return hx_err_set(err, HX_EINVAL, "hx_proto_send_group_setup: NULL argument");
    if (m->phase < HX_PROTO_SETUP_OFFER || m->phase > HX_PROTO_SETUP_FINAL || m->nccl > 1)
        return hx_err_set(err, HX_EINVAL, "GROUP_SETUP to %s: phase %d, nccl %u", c->who,
                          (int)m->phase, m->nccl);
    unsigned char b[HX_PROTO_GROUP_SETUP_BYTES];
    memset(b, 0, sizeof b);
    put_u32(b, (uint32_t)m->phase);
    put_u32(b + 4, m->backend);
    put_u32(b + 8, m->step_rows);
    put_u32(b + 12, m->nccl);
    put_u32(b + 16, m->max_seqs);
    put_u32(b + 20, m->block_tokens);
    put_u32(b + 24, m->kv_tokens);
    put_u32(b + 28, m->nccl_host);
    size_t n = strnlen(m->device_uuid, HX_PROTO_UUID_MAX);
    memcpy(b + 32, m->device_uuid, n);
    memcpy(b + 32 + HX_PROTO_UUID_MAX + 1, m->nccl_id, HX_PROTO_NCCL_ID_BYTES);
    return hx_proto_send(c, HX_PROTO_GROUP_SETUP, 0, b, sizeof b, deadline_ns, err);
}

hx_status hx_proto_decode_group_setup(const hx_proto_frame *f, hx_proto_group_setup *out,
                                      hx_err *err)
{
    hx_status st = expect_type(f, HX_PROTO_GROUP_SETUP, err);
    if (st != HX_OK)
        return st;
    if (f->len != HX_PROTO_GROUP_SETUP_BYTES)
        return bad_payload(f, err, "%zu bytes, expected %d", f->len, HX_PROTO_GROUP_SETUP_BYTES);
    const unsigned char *b = f->payload;
    memset(out, 0, sizeof *out);
    const uint32_t phase = get_u32(b);
    if (phase < HX_PROTO_SETUP_OFFER || phase > HX_PROTO_SETUP_FINAL)
        return bad_payload(f, err, "unknown phase %u", phase);
    out->phase = (hx_proto_setup_phase)phase;
    out->backend = get_u32(b + 4);
    out->step_rows = get_u32(b + 8);
    out->nccl = get_u32(b + 12);
    out->max_seqs = get_u32(b + 16);
    out->block_tokens = get_u32(b + 20);
    out->kv_tokens = get_u32(b + 24);
    out->nccl_host = get_u32(b + 28);
    if (out->nccl > 1)
        return bad_payload(f, err, "%s: nccl %u", setup_phase_name(phase), out->nccl);
    memcpy(out->device_uuid, b + 32, HX_PROTO_UUID_MAX);
    out->device_uuid[HX_PROTO_UUID_MAX] = '\0';
    for (char *p = out->device_uuid; *p; p++)
        if (*p < 0x20 || *p > 0x7e)
            return bad_payload(f, err, "the device identity is not printable");
    memcpy(out->nccl_id, b + 32 + HX_PROTO_UUID_MAX + 1, HX_PROTO_NCCL_ID_BYTES);
    return HX_OK;
}

hx_status hx_proto_recv_group_setup(hx_proto_conn *c, hx_proto_setup_phase phase,
                                    hx_proto_group_setup *out, int64_t deadline_ns, hx_err *err)
{
    hx_proto_frame f;
    hx_status st = recv_type(c, HX_PROTO_GROUP_SETUP, &f, deadline_ns, err);
    if (st != HX_OK)
        return st;
    if ((st = hx_proto_decode_group_setup(&f, out, err)) != HX_OK)
        return st;
    if (out->phase != phase)
        return hx_err_set(err, HX_EPARSE, "%s: GROUP_SETUP %s, expected %s", c->who,
                          setup_phase_name((uint32_t)out->phase),
                          setup_phase_name((uint32_t)phase));
    return HX_OK;
}
