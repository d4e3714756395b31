/*
 * proto_bench.c - what the runtime protocol costs on top of a bare socket:
 *
 *   1. KV_SEGMENT send + recv throughput (GB/s) of S MiB segments over
 *      loopback TCP (and a Unix socket), against a plain write()/read() loop
 *      moving the same bytes without framing or tags;
 *   2. round trips per second of a small control message (HEALTH ->
 *      HEALTH_OK, 28-byte header + 80-byte payload + 16-byte tags) against a
 *      plain ping-pong of the same sizes;
 *   3. single-core speed of the two MACs considered for per-frame integrity:
 *      AES-256-GMAC (used) and HMAC-SHA256 (used only in the handshake).
 *
 *   proto_bench [--mib S] [--count N] [--repeat R] [--pings P]
 *
 * Defaults: 64 MiB segments, 16 per run (1 GiB), best of 3 runs, 20000 round
 * trips. The sender and the receiver are two threads of this process, so on
 * a machine with two cores both are busy. Prints numbers; never run as a test.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "runtime/proto.h"

static size_t seg_bytes = (size_t)64 << 20;
static int seg_count = 16;
static int repeats = 3;
static int pings = 20000;
static hx_proto_secret secret;
static unsigned char *send_buf;

static double now_s(void)
{
    return (double)hx_proto_now_ns() * 1e-9;
}

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "proto_bench: %s: %s\n", what, msg);
    exit(1);
}

/* ---- plain sockets -------------------------------------------------------------- */

static void write_full(int fd, const void *p, size_t n)
{
    const unsigned char *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write", strerror(errno));
        b += w;
        n -= (size_t)w;
    }
}

static void read_full(int fd, void *p, size_t n)
{
    unsigned char *b = p;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("read", r == 0 ? "end of file" : strerror(errno));
        b += r;
        n -= (size_t)r;
    }
}

/* A connected pair of plain sockets: TCP over 127.0.0.1, or a Unix socketpair. */
static void plain_pair(int tcp, int fds[2])
{
    if (!tcp) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0)
            die("socketpair", strerror(errno));
        return;
    }
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 1) != 0 ||
        getsockname(l, (struct sockaddr *)&a, &al) != 0)
        die("listen", strerror(errno));
    fds[1] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[1] < 0 || connect(fds[1], (struct sockaddr *)&a, sizeof a) != 0)
        die("connect", strerror(errno));
    fds[0] = accept(l, NULL, NULL);
    if (fds[0] < 0)
        die("accept", strerror(errno));
    close(l);
    int one = 1;
    setsockopt(fds[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fds[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

typedef struct plain_job {
    int fd;
    unsigned char *buf;
} plain_job;

static void *plain_sender(void *arg)
{
    plain_job *j = arg;
    for (int i = 0; i < seg_count; i++)
        write_full(j->fd, send_buf, seg_bytes);
    return NULL;
}

static double plain_run(int tcp)
{
    int fds[2];
    plain_pair(tcp, fds);
    unsigned char *buf = malloc(seg_bytes);
    if (!buf)
        die("malloc", "out of memory");
    memset(buf, 0, seg_bytes); /* fault the pages in, as the protocol's buffer is after one use */
    plain_job j = {fds[1], NULL};
    pthread_t t;
    double t0 = now_s();
    pthread_create(&t, NULL, plain_sender, &j);
    for (int i = 0; i < seg_count; i++)
        read_full(fds[0], buf, seg_bytes);
    double el = now_s() - t0;
    pthread_join(t, NULL);
    close(fds[0]);
    close(fds[1]);
    free(buf);
    return (double)seg_bytes * seg_count / el / 1e9;
}

/* ---- the protocol ------------------------------------------------------------------ */

typedef struct proto_job {
    const char *host;
    int port;
    int mode; /* 0: send segments, 1: answer pings */
    hx_proto_conn *conn;
    hx_err err;
} proto_job;

static void *proto_client(void *arg)
{
    proto_job *j = arg;
    hx_proto_frame f;
    if (hx_proto_connect(j->host, j->port, &secret, "prefill", hx_proto_deadline_in(10), &j->conn,
                         &j->err) != HX_OK)
        return NULL;
    size_t dims = seg_bytes / 2; /* f16 elements: layers x 2 x heads x tokens x dim */
    hx_proto_kv_segment seg = {.num_segments = 1, .num_layers = 1, .num_kv_heads = 1,
                               .num_tokens = (uint32_t)(dims / 2 / 128), .head_dim = 128,
                               .dtype = HX_PROTO_DTYPE_F16, .data_bytes = seg_bytes,
                               .data = send_buf};
    if (j->mode == 0) {
        for (int i = 0; i < seg_count; i++)
            if (hx_proto_send_kv_segment(j->conn, (uint64_t)i + 1, &seg, hx_proto_deadline_in(60),
                                         &j->err) != HX_OK)
                return NULL;
        /* wait for the receiver to finish before closing */
        if (hx_proto_recv(j->conn, &f, hx_proto_deadline_in(60), &j->err) != HX_OK)
            return NULL;
    } else {
        hx_proto_health h = {0};
        for (int i = 0; i < pings; i++) {
            if (hx_proto_recv(j->conn, &f, hx_proto_deadline_in(10), &j->err) != HX_OK ||
                hx_proto_send_health_ok(j->conn, f.req_id, &h, hx_proto_deadline_in(10),
                                        &j->err) != HX_OK)
                return NULL;
        }
    }
    return NULL;
}

static hx_proto_conn *proto_accept(hx_proto_listener *l, proto_job *j, pthread_t *t)
{
    hx_err err = {0};
    hx_proto_conn *s = NULL;
    pthread_create(t, NULL, proto_client, j);
    if (hx_proto_accept(l, &secret, hx_proto_deadline_in(10), &s, &err) != HX_OK)
        die("accept", err.msg);
    return s;
}

static double proto_run(hx_proto_listener *l, const char *host)
{
    proto_job j = {.host = host, .port = hx_proto_listener_port(l), .mode = 0};
    pthread_t t;
    hx_err err = {0};
    hx_proto_frame f;
    hx_proto_kv_segment seg;
    hx_proto_conn *s = proto_accept(l, &j, &t);
    /* the receive buffer grows on the first frame; reuse after that, as a worker would */
    double t0 = 0;
    for (int i = 0; i < seg_count; i++) {
        if (i == 1)
            t0 = now_s();
        if (hx_proto_recv(s, &f, hx_proto_deadline_in(60), &err) != HX_OK ||
            hx_proto_decode_kv_segment(&f, &seg, &err) != HX_OK)
            die("recv", err.msg);
    }
    double el = now_s() - t0;
    hx_proto_send_health(s, 1, hx_proto_deadline_in(5), &err);
    pthread_join(t, NULL);
    if (j.err.msg[0])
        die("sender", j.err.msg);
    hx_proto_close(j.conn);
    hx_proto_close(s);
    return (double)seg_bytes * (seg_count - 1) / el / 1e9;
}

/* ---- small messages ----------------------------------------------------------------- */

static void *plain_ponger(void *arg)
{
    int fd = *(int *)arg;
    unsigned char in[44], out[124];
    memset(out, 0, sizeof out);
    for (int i = 0; i < pings; i++) {
        read_full(fd, in, sizeof in);
        write_full(fd, out, sizeof out);
    }
    return NULL;
}

static double plain_pings(int tcp)
{
    int fds[2];
    plain_pair(tcp, fds);
    pthread_t t;
    pthread_create(&t, NULL, plain_ponger, &fds[1]);
    unsigned char out[44] = {0}, in[124];
    double t0 = now_s();
    for (int i = 0; i < pings; i++) {
        write_full(fds[0], out, sizeof out);
        read_full(fds[0], in, sizeof in);
    }
    double el = now_s() - t0;
    pthread_join(t, NULL);
    close(fds[0]);
    close(fds[1]);
    return el / pings * 1e6;
}

static double proto_pings(hx_proto_listener *l, const char *host)
{
    proto_job j = {.host = host, .port = hx_proto_listener_port(l), .mode = 1};
    pthread_t t;
    hx_err err = {0};
    hx_proto_frame f;
    hx_proto_health h;
    hx_proto_conn *s = proto_accept(l, &j, &t);
    double t0 = now_s();
    for (int i = 0; i < pings; i++) {
        if (hx_proto_send_health(s, (uint64_t)i + 1, hx_proto_deadline_in(10), &err) != HX_OK ||
            hx_proto_recv(s, &f, hx_proto_deadline_in(10), &err) != HX_OK ||
            hx_proto_decode_health_ok(&f, &h, &err) != HX_OK)
            die("ping", err.msg);
    }
    double el = now_s() - t0;
    pthread_join(t, NULL);
    hx_proto_close(j.conn);
    hx_proto_close(s);
    return el / pings * 1e6;
}

/* ---- MACs alone ---------------------------------------------------------------------- */

static double gmac_speed(void)
{
    unsigned char key[32] = {1}, iv[12] = {0}, tag[16];
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, iv);
    double best = 0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now_s();
        int outl;
        EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv);
        for (size_t o = 0; o < seg_bytes; o += (size_t)256 << 10) {
            size_t n = seg_bytes - o < ((size_t)256 << 10) ? seg_bytes - o : (size_t)256 << 10;
            EVP_EncryptUpdate(c, NULL, &outl, send_buf + o, (int)n);
        }
        EVP_EncryptFinal_ex(c, tag, &outl);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag);
        double v = (double)seg_bytes / (now_s() - t0) / 1e9;
        best = v > best ? v : best;
    }
    EVP_CIPHER_CTX_free(c);
    return best;
}

static double hmac_speed(void)
{
    unsigned char key[32] = {1}, md[32];
    unsigned int ml;
    double best = 0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now_s();
        HMAC(EVP_sha256(), key, 32, send_buf, seg_bytes, md, &ml);
        double v = (double)seg_bytes / (now_s() - t0) / 1e9;
        best = v > best ? v : best;
    }
    return best;
}

static double best_of(double (*fn)(int), int arg, int higher_better)
{
    double best = fn(arg);
    for (int r = 1; r < repeats; r++) {
        double v = fn(arg);
        best = higher_better ? (v > best ? v : best) : (v < best ? v : best);
    }
    return best;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            seg_bytes = (size_t)atol(argv[++i]) << 20;
        else if (!strcmp(argv[i], "--count") && i + 1 < argc)
            seg_count = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--repeat") && i + 1 < argc)
            repeats = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--pings") && i + 1 < argc)
            pings = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: proto_bench [--mib S] [--count N] [--repeat R] [--pings P]\n");
            return 2;
        }
    }
    if (seg_bytes < ((size_t)1 << 20) || seg_count < 2 || repeats < 1 || pings < 1) {
        fprintf(stderr, "proto_bench: --mib >= 1, --count >= 2, --repeat >= 1, --pings >= 1\n");
        return 2;
    }
    hx_err err = {0};
    if (hx_proto_secret_generate(&secret, &err) != HX_OK)
        die("secret", err.msg);
    send_buf = malloc(seg_bytes);
    if (!send_buf)
        die("malloc", "out of memory");
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i + 8 <= seg_bytes; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(send_buf + i, &x, 8);
    }

    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    printf("proto_bench: %zu MiB KV segments x %d per run, best of %d; %ld online cores\n\n",
           seg_bytes >> 20, seg_count, repeats, cores);

    char upath[64];
    snprintf(upath, sizeof upath, "unix:/tmp/hx_proto_bench_%ld.sock", (long)getpid());
    const struct {
        const char *name, *listen, *host;
        int tcp;
    } transports[2] = {{"loopback TCP", "127.0.0.1", "127.0.0.1", 1},
                       {"Unix socket ", upath, upath, 0}};

    printf("%-13s %14s %14s %9s\n", "transport", "plain GB/s", "KV_SEGMENT GB/s", "ratio");
    for (int k = 0; k < 2; k++) {
        hx_proto_listener *l = NULL;
        if (hx_proto_listen(transports[k].listen, 0, &l, &err) != HX_OK)
            die("listen", err.msg);
        double plain = best_of(plain_run, transports[k].tcp, 1);
        double proto = 0;
        for (int r = 0; r < repeats; r++) {
            double v = proto_run(l, transports[k].host);
            proto = v > proto ? v : proto;
        }
        printf("%-13s %14.2f %14.2f %8.0f%%\n", transports[k].name, plain, proto,
               100.0 * proto / plain);
        hx_proto_listener_free(l);
    }

    printf("\n%-13s %14s %14s\n", "round trip", "plain us", "HEALTH us");
    for (int k = 0; k < 2; k++) {
        hx_proto_listener *l = NULL;
        if (hx_proto_listen(transports[k].listen, 0, &l, &err) != HX_OK)
            die("listen", err.msg);
        double plain = best_of(plain_pings, transports[k].tcp, 0);
        double proto = 1e30;
        for (int r = 0; r < repeats; r++) {
            double v = proto_pings(l, transports[k].host);
            proto = v < proto ? v : proto;
        }
        printf("%-13s %14.2f %14.2f\n", transports[k].name, plain, proto);
        hx_proto_listener_free(l);
    }

    printf("\nMAC alone, one core, %zu MiB: AES-256-GMAC %.2f GB/s, HMAC-SHA256 %.2f GB/s\n",
           seg_bytes >> 20, gmac_speed(), hmac_speed());
    free(send_buf);
    hx_proto_secret_release(&secret);
    return 0;
}
