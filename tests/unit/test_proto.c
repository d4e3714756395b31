/*
 * test_proto.c - the runtime wire protocol: the handshake (same secret, wrong
 * secret on either side, silent and garbage peers), every message type round
 * trip, a 64 MiB KV segment over loopback TCP, rejection of bad frames (magic,
 * version, type, flags, size, truncation, tampering, replay), deadlines and
 * dropped connections, secret files, Unix sockets, and a check of the wire
 * format against the specification computed independently with OpenSSL.
 *
 * Peers run in threads; cmocka assertions are only made on the main thread.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>

#include "runtime/proto.h"

static char tmp_dir[256];
static hx_proto_secret secret_a, secret_b;

/* ---- helpers ---------------------------------------------------------------- */

static void expect_err(hx_status st, const hx_err *err, hx_status code, const char *needle)
{
    if (st != code || !strstr(err->msg, needle))
        fail_msg("got %d (%s) '%s'; expected %d with '%s'", st, hx_strerror(st), err->msg, code,
                 needle);
}

static void check_ok(hx_status st, const hx_err *err)
{
    if (st != HX_OK)
        fail_msg("unexpected failure %d: %s", st, err->msg);
}

static void put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* A frame header as the spec lays it out. */
static void raw_header(unsigned char h[HX_PROTO_HEADER_BYTES], const char *magic, uint16_t version,
                       uint16_t type, uint32_t flags, uint64_t len, uint64_t req_id)
{
    memcpy(h, magic, 4);
    put16(h + 4, version);
    put16(h + 6, type);
    put32(h + 8, flags);
    put64(h + 12, len);
    put64(h + 20, req_id);
}

static void write_all(int fd, const void *p, size_t n)
{
    const unsigned char *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {fd, POLLOUT, 0};
            poll(&pf, 1, 1000);
            continue;
        }
        assert_true(w > 0);
        b += w;
        n -= (size_t)w;
    }
}

static void read_all(int fd, void *p, size_t n)
{
    unsigned char *b = p;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {fd, POLLIN, 0};
            poll(&pf, 1, 1000);
            continue;
        }
        assert_true(r > 0);
        b += r;
        n -= (size_t)r;
    }
}

static void make_pair(int fds[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
}

/* ---- handshake over a socketpair, the server side in a thread ------------------ */

typedef struct side_job {
    int fd;
    int is_server;
    const hx_proto_secret *secret;
    const char *role;
    int64_t deadline;
    hx_proto_conn *conn;
    hx_status st;
    hx_err err;
} side_job;

static void *side_thread(void *arg)
{
    side_job *j = arg;
    j->st = hx_proto_handshake_fd(j->fd, j->is_server, j->is_server ? "test-client" : "test-server",
                                  j->secret, j->role, j->deadline, &j->conn, &j->err);
    return NULL;
}

/*
 * Handshake between a server on server_fd (in a thread) and a client on
 * client_fd (here). Fills both jobs.
 */
static void run_handshake(int server_fd, int client_fd, const hx_proto_secret *ss,
                          const hx_proto_secret *cs, const char *role, side_job *server,
                          side_job *client)
{
    memset(server, 0, sizeof *server);
    memset(client, 0, sizeof *client);
    *server = (side_job){.fd = server_fd, .is_server = 1, .secret = ss, .deadline = hx_proto_deadline_in(5)};
    *client = (side_job){.fd = client_fd, .is_server = 0, .secret = cs, .role = role,
                         .deadline = hx_proto_deadline_in(5)};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, side_thread, server), 0);
    side_thread(client);
    pthread_join(t, NULL);
}

/* An authenticated pair over a socketpair: *s server, *c client. */
static void connected_pair(hx_proto_conn **s, hx_proto_conn **c)
{
    int fds[2];
    side_job sj, cj;
    make_pair(fds);
    run_handshake(fds[0], fds[1], &secret_a, &secret_a, "router", &sj, &cj);
    check_ok(sj.st, &sj.err);
    check_ok(cj.st, &cj.err);
    *s = sj.conn;
    *c = cj.conn;
}

/* ---- relay: a man in the middle that can flip or repeat bytes ------------------- */

typedef struct relay {
    int client_fd, server_fd; /* the relay's ends */
    int64_t flip_at;          /* client->server byte offset to flip, -1 none */
    int64_t dup_from, dup_len; /* client->server bytes to send twice, dup_len 0 none */
    unsigned char *c2s, *s2c;  /* captured bytes (first cap bytes) */
    size_t c2s_len, s2c_len, cap;
} relay;

static void *relay_thread(void *arg)
{
    relay *r = arg;
    unsigned char buf[65536];
    uint64_t c2s_off = 0;
    unsigned char *dup = r->dup_len ? malloc((size_t)r->dup_len) : NULL;
    for (;;) {
        struct pollfd p[2] = {{r->client_fd, POLLIN, 0}, {r->server_fd, POLLIN, 0}};
        if (poll(p, 2, 10000) <= 0)
            break;
        int done = 0;
        for (int i = 0; i < 2 && !done; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t n = read(p[i].fd, buf, sizeof buf);
            if (n <= 0) {
                done = 1;
                break;
            }
            if (i == 0) { /* client -> server */
                for (ssize_t k = 0; k < n; k++) {
                    uint64_t off = c2s_off + (uint64_t)k;
                    if ((int64_t)off == r->flip_at)
                        buf[k] ^= 0x01;
                    if (r->dup_len && (int64_t)off >= r->dup_from &&
                        (int64_t)off < r->dup_from + r->dup_len)
                        dup[off - (uint64_t)r->dup_from] = buf[k];
                }
                if (r->c2s_len + (size_t)n <= r->cap) {
                    memcpy(r->c2s + r->c2s_len, buf, (size_t)n);
                    r->c2s_len += (size_t)n;
                }
                write_all(r->server_fd, buf, (size_t)n);
                uint64_t end = c2s_off + (uint64_t)n;
                if (r->dup_len && c2s_off < (uint64_t)(r->dup_from + r->dup_len) &&
                    end >= (uint64_t)(r->dup_from + r->dup_len))
                    write_all(r->server_fd, dup, (size_t)r->dup_len); /* the replay */
                c2s_off = end;
            } else {
                if (r->s2c_len + (size_t)n <= r->cap) {
                    memcpy(r->s2c + r->s2c_len, buf, (size_t)n);
                    r->s2c_len += (size_t)n;
                }
                write_all(r->client_fd, buf, (size_t)n);
            }
        }
        if (done)
            break;
    }
    free(dup);
    close(r->client_fd);
    close(r->server_fd);
    return NULL;
}

/* client <-> relay <-> server; fills *s, *c and starts the relay thread. */
static void relayed_pair(relay *r, pthread_t *t, hx_proto_conn **s, hx_proto_conn **c)
{
    int a[2], b[2];
    side_job sj, cj;
    make_pair(a);
    make_pair(b);
    r->client_fd = a[1];
    r->server_fd = b[0];
    r->cap = 1 << 16;
    r->c2s = calloc(1, r->cap);
    r->s2c = calloc(1, r->cap);
    assert_int_equal(pthread_create(t, NULL, relay_thread, r), 0);
    run_handshake(b[1], a[0], &secret_a, &secret_a, "prefill", &sj, &cj);
    check_ok(sj.st, &sj.err);
    check_ok(cj.st, &cj.err);
    *s = sj.conn;
    *c = cj.conn;
}

static void relay_finish(pthread_t t, hx_proto_conn *s, hx_proto_conn *c)
{
    hx_proto_close(c);
    hx_proto_close(s);
    pthread_join(t, NULL);
}

static void relay_free(relay *r)
{
    free(r->c2s);
    free(r->s2c);
}

/* Bytes the client sends in the handshake with `role`. */
static size_t handshake_c2s_bytes(const char *role)
{
    return HX_PROTO_HEADER_BYTES + 2 * HX_PROTO_NONCE_BYTES + strlen(role);
}

/* ---- group setup ---------------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx_test_proto_XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    hx_err err = {0};
    if (hx_proto_secret_set(&secret_a, "0123456789abcdef0123456789abcdef", 32, &err) != HX_OK ||
        hx_proto_secret_set(&secret_b, "fedcba9876543210fedcba9876543210", 32, &err) != HX_OK)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- handshake -------------------------------------------------------------------- */

static void test_handshake_ok(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    connected_pair(&s, &c);
    assert_string_equal(hx_proto_peer_role(s), "router");
    assert_string_equal(hx_proto_peer_role(c), "router");
    assert_string_equal(hx_proto_peer(s), "test-client");

    /* HELLO both ways: both directions' keys work */
    hx_err err = {0};
    hx_proto_hello h = {.role = HX_PROTO_ROLE_ROUTER, .stage = 0, .rank = 0};
    snprintf(h.version, sizeof h.version, "0.1.0");
    check_ok(hx_proto_send_hello(c, &h, hx_proto_deadline_in(2), &err), &err);
    hx_proto_frame f;
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err);
    assert_int_equal(f.type, HX_PROTO_HELLO);
    hx_proto_hello got;
    check_ok(hx_proto_decode_hello(&f, &got, &err), &err);
    assert_int_equal(got.role, HX_PROTO_ROLE_ROUTER);
    assert_string_equal(got.version, "0.1.0");
    assert_string_equal(got.group_id, "");

    hx_proto_hello h2 = {.role = HX_PROTO_ROLE_DECODE, .stage = 1, .rank = 3};
    snprintf(h2.group_id, sizeof h2.group_id, "d0");
    snprintf(h2.version, sizeof h2.version, "0.1.0");
    check_ok(hx_proto_send_hello(s, &h2, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(c, &f, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_decode_hello(&f, &got, &err), &err);
    assert_int_equal(got.role, HX_PROTO_ROLE_DECODE);
    assert_int_equal(got.stage, 1);
    assert_int_equal(got.rank, 3);
    assert_string_equal(got.group_id, "d0");
    assert_string_equal(f.peer, "test-server");

    hx_proto_stats stats;
    hx_proto_get_stats(c, &stats);
    assert_int_equal(stats.frames_sent, 2); /* AUTH_RESPONSE + HELLO */
    hx_proto_close(s);
    hx_proto_close(c);
    hx_proto_close(NULL);
}

static void test_handshake_wrong_secret(void **state)
{
    (void)state;
    int fds[2];
    side_job sj, cj;
    make_pair(fds);
    int spare = dup(fds[1]); /* to see what the server does after */
    run_handshake(fds[0], fds[1], &secret_a, &secret_b, "decode", &sj, &cj);
    expect_err(sj.st, &sj.err, HX_EINVAL, "client test-client (decode) failed authentication");
    expect_err(sj.st, &sj.err, HX_EINVAL, "does not match this deployment's secret");
    expect_err(cj.st, &cj.err, HX_EINVAL, "server test-server rejected our authentication");
    expect_err(cj.st, &cj.err, HX_EINVAL, "wrong deployment secret");
    assert_null(sj.conn);
    assert_null(cj.conn);
    /* the server closed its end: end of file, nothing more */
    char b;
    assert_int_equal(read(spare, &b, 1), 0);
    close(spare);
}

static void test_handshake_server_without_secret(void **state)
{
    (void)state;
    /* a fake server: challenge, then an AUTH_OK whose proof is garbage */
    int fds[2];
    make_pair(fds);
    unsigned char buf[HX_PROTO_HEADER_BYTES + 32];
    raw_header(buf, "HXF1", 1, HX_PROTO_AUTH_CHALLENGE, 0, 32, 0);
    memset(buf + HX_PROTO_HEADER_BYTES, 7, 32);
    write_all(fds[0], buf, sizeof buf);
    raw_header(buf, "HXF1", 1, HX_PROTO_AUTH_OK, 0, 32, 0);
    memset(buf + HX_PROTO_HEADER_BYTES, 9, 32);
    write_all(fds[0], buf, sizeof buf);
    hx_proto_conn *c = NULL;
    hx_err err = {0};
    hx_status st = hx_proto_handshake_fd(fds[1], 0, "fake", &secret_a, "router",
                                         hx_proto_deadline_in(2), &c, &err);
    expect_err(st, &err, HX_EINVAL, "server fake failed to prove that it holds the deployment secret");
    assert_null(c);
    close(fds[0]);
}

static void test_handshake_bad_client_proof(void **state)
{
    (void)state;
    /* a client that answers the challenge with a made-up proof */
    int fds[2];
    make_pair(fds);
    unsigned char buf[HX_PROTO_HEADER_BYTES + 64 + 6];
    raw_header(buf, "HXF1", 1, HX_PROTO_AUTH_RESPONSE, 0, 64 + 6, 0);
    memset(buf + HX_PROTO_HEADER_BYTES, 1, 64);
    memcpy(buf + HX_PROTO_HEADER_BYTES + 64, "router", 6);
    write_all(fds[1], buf, sizeof buf);
    hx_proto_conn *s = NULL;
    hx_err err = {0};
    hx_status st = hx_proto_handshake_fd(fds[0], 1, "liar", &secret_a, NULL,
                                         hx_proto_deadline_in(2), &s, &err);
    expect_err(st, &err, HX_EINVAL, "client liar (router) failed authentication");
    /* what the liar sees: the challenge, then AUTH_FAIL with a reason */
    unsigned char in[HX_PROTO_HEADER_BYTES + 32 + HX_PROTO_HEADER_BYTES + 23];
    read_all(fds[1], in, sizeof in);
    const unsigned char *fail = in + HX_PROTO_HEADER_BYTES + 32;
    assert_int_equal(fail[6], HX_PROTO_AUTH_FAIL);
    assert_memory_equal(fail + HX_PROTO_HEADER_BYTES, "wrong deployment secret", 23);
    close(fds[1]);
}

static void test_handshake_garbage_and_silence(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_conn *s = NULL;
    int fds[2];

    /* an HTTP client at a worker's port */
    make_pair(fds);
    const char *http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    write_all(fds[1], http, strlen(http));
    hx_status st = hx_proto_handshake_fd(fds[0], 1, "web", &secret_a, NULL,
                                         hx_proto_deadline_in(2), &s, &err);
    expect_err(st, &err, HX_EPARSE, "bad magic 'GET '");
    close(fds[1]);

    /* an unauthenticated peer announcing a 1 GiB KV segment: refused from the header */
    make_pair(fds);
    unsigned char h[HX_PROTO_HEADER_BYTES];
    raw_header(h, "HXF1", 1, HX_PROTO_KV_SEGMENT, 0, (uint64_t)1 << 30, 5);
    write_all(fds[1], h, sizeof h);
    st = hx_proto_handshake_fd(fds[0], 1, "early", &secret_a, NULL, hx_proto_deadline_in(2), &s,
                               &err);
    expect_err(st, &err, HX_EPARSE, "unexpected KV_SEGMENT frame from early before authentication");
    close(fds[1]);

    /* a client that connects and says nothing: the server gives up at the deadline */
    make_pair(fds);
    int64_t t0 = hx_proto_now_ns();
    st = hx_proto_handshake_fd(fds[0], 1, "mute", &secret_a, NULL, hx_proto_deadline_in(0.3), &s,
                               &err);
    double el = (double)(hx_proto_now_ns() - t0) * 1e-9;
    expect_err(st, &err, HX_ETIMEDOUT, "authenticating client mute: timed out");
    assert_true(el >= 0.25 && el < 3.0);
    close(fds[1]);

    /* a server that never sends its challenge */
    make_pair(fds);
    hx_proto_conn *c = NULL;
    st = hx_proto_handshake_fd(fds[1], 0, "mute-server", &secret_a, "router",
                               hx_proto_deadline_in(0.3), &c, &err);
    expect_err(st, &err, HX_ETIMEDOUT, "authenticating with server mute-server: timed out");
    close(fds[0]);

    /* a server of a newer protocol */
    make_pair(fds);
    unsigned char ch[HX_PROTO_HEADER_BYTES + 32] = {0};
    raw_header(ch, "HXF1", 2, HX_PROTO_AUTH_CHALLENGE, 0, 32, 0);
    write_all(fds[0], ch, sizeof ch);
    st = hx_proto_handshake_fd(fds[1], 0, "future", &secret_a, "router", hx_proto_deadline_in(2),
                               &c, &err);
    expect_err(st, &err, HX_ENOTSUP, "future speaks hexflow runtime protocol version 2; this build speaks version 1");
    close(fds[0]);

    /* bad arguments */
    make_pair(fds);
    st = hx_proto_handshake_fd(fds[1], 0, "x", &secret_a, "Bad Role", hx_proto_deadline_in(1), &c,
                               &err);
    expect_err(st, &err, HX_EINVAL, "invalid role 'Bad Role'");
    close(fds[0]);
    hx_proto_secret empty = {0};
    make_pair(fds);
    st = hx_proto_handshake_fd(fds[1], 0, "x", &empty, "router", hx_proto_deadline_in(1), &c, &err);
    expect_err(st, &err, HX_EINVAL, "no deployment secret loaded");
    close(fds[0]);
}

/* ---- every message type ------------------------------------------------------------ */

static hx_proto_frame frame_of(hx_proto_type type, uint64_t req_id, const void *p, size_t n);

static void test_messages_round_trip(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    hx_proto_frame f;
    connected_pair(&s, &c);
    int64_t dl = hx_proto_deadline_in(5);

    /* PREFILL_REQUEST */
    int32_t prompt[300];
    for (int i = 0; i < 300; i++)
        prompt[i] = i * 7 + 1;
    hx_proto_prefill_request pr = {.max_tokens = 128, .temperature = 0.7f, .top_p = 0.9f,
                                   .top_k = 40, .seed = 0x1234567890ULL, .num_tokens = 300,
                                   .token_ids = prompt};
    snprintf(pr.decode_group, sizeof pr.decode_group, "g2");
    check_ok(hx_proto_send_prefill_request(c, 42, &pr, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    assert_int_equal(f.type, HX_PROTO_PREFILL_REQUEST);
    assert_int_equal(f.req_id, 42);
    hx_proto_prefill_request pr2;
    check_ok(hx_proto_decode_prefill_request(&f, &pr2, &err), &err);
    assert_int_equal(pr2.max_tokens, 128);
    assert_true(pr2.temperature == 0.7f && pr2.top_p == 0.9f);
    assert_int_equal(pr2.top_k, 40);
    assert_int_equal(pr2.seed, 0x1234567890ULL);
    assert_string_equal(pr2.decode_group, "g2");
    assert_int_equal(pr2.num_tokens, 300);
    assert_memory_equal(pr2.token_ids, prompt, sizeof prompt);

    /* FIRST_TOKEN, server -> client */
    hx_proto_first_token ft = {.token_id = 31999, .num_prompt_tokens = 300, .prefill_ns = 123456789,
                               .kv_bytes = 5000000000ull};
    check_ok(hx_proto_send_first_token(s, 42, &ft, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_first_token ft2;
    check_ok(hx_proto_decode_first_token(&f, &ft2, &err), &err);
    assert_int_equal(ft2.token_id, 31999);
    assert_int_equal(ft2.num_prompt_tokens, 300);
    assert_int_equal(ft2.prefill_ns, 123456789);
    assert_int_equal(ft2.kv_bytes, 5000000000ull);

    /* KV_SEGMENT (small) and KV_ACK */
    uint16_t kv[2 * 2 * 3 * 5 * 4];
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        kv[i] = (uint16_t)(i * 31);
    hx_proto_kv_segment seg = {.src_stage = 1, .src_rank = 2, .dst_stage = 0, .dst_rank = 1,
                               .segment_index = 1, .num_segments = 2, .first_layer = 40,
                               .num_layers = 2, .first_kv_head = 3, .num_kv_heads = 3,
                               .first_token = 0, .num_tokens = 5, .head_dim = 4,
                               .dtype = HX_PROTO_DTYPE_BF16, .data_bytes = sizeof kv, .data = kv};
    check_ok(hx_proto_send_kv_segment(c, 42, &seg, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    hx_proto_kv_segment seg2;
    check_ok(hx_proto_decode_kv_segment(&f, &seg2, &err), &err);
    assert_int_equal(seg2.src_stage, 1);
    assert_int_equal(seg2.src_rank, 2);
    assert_int_equal(seg2.dst_stage, 0);
    assert_int_equal(seg2.dst_rank, 1);
    assert_int_equal(seg2.segment_index, 1);
    assert_int_equal(seg2.num_segments, 2);
    assert_int_equal(seg2.first_layer, 40);
    assert_int_equal(seg2.num_layers, 2);
    assert_int_equal(seg2.first_kv_head, 3);
    assert_int_equal(seg2.num_kv_heads, 3);
    assert_int_equal(seg2.num_tokens, 5);
    assert_int_equal(seg2.head_dim, 4);
    assert_int_equal(seg2.dtype, HX_PROTO_DTYPE_BF16);
    assert_int_equal(seg2.data_bytes, sizeof kv);
    assert_memory_equal(seg2.data, kv, sizeof kv);
    assert_int_equal((uintptr_t)seg2.data % 64, 0);
    assert_int_equal(seg2.remote, 0);

    /* the header alone, its payload following over NCCL */
    hx_proto_kv_segment rem = seg;
    rem.data = NULL;
    rem.remote = 1;
    check_ok(hx_proto_send_kv_segment(c, 43, &rem, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    assert_int_equal(f.len, HX_PROTO_KV_HEADER_BYTES);
    check_ok(hx_proto_decode_kv_segment(&f, &seg2, &err), &err);
    assert_int_equal(seg2.remote, 1);
    assert_null(seg2.data);
    assert_int_equal(seg2.data_bytes, sizeof kv);
    rem.remote = 2;
    expect_err(hx_proto_send_kv_segment(c, 43, &rem, dl, &err), &err, HX_EINVAL, "NULL");
    {
        /* a frame flagged remote that still carries a payload, and an unknown transport */
        _Alignas(64) unsigned char b[HX_PROTO_KV_HEADER_BYTES + sizeof kv];
        check_ok(hx_proto_send_kv_segment(c, 44, &seg, dl, &err), &err);
        check_ok(hx_proto_recv(s, &f, dl, &err), &err);
        memcpy(b, f.payload, f.len);
        b[56] = 1;
        hx_proto_frame g = frame_of(HX_PROTO_KV_SEGMENT, 44, b, sizeof b);
        expect_err(hx_proto_decode_kv_segment(&g, &seg2, &err), &err, HX_EPARSE,
                   "over NCCL, and none here");
        b[56] = 2;
        expect_err(hx_proto_decode_kv_segment(&g, &seg2, &err), &err, HX_EPARSE, "transport 2");
    }

    hx_proto_kv_ack ack = {.src_stage = 1, .src_rank = 2, .dst_stage = 0, .dst_rank = 1,
                           .segment_index = 1, .status = HX_OK, .bytes_received = sizeof kv};
    check_ok(hx_proto_send_kv_ack(s, 42, &ack, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_kv_ack ack2;
    check_ok(hx_proto_decode_kv_ack(&f, &ack2, &err), &err);
    assert_memory_equal(&ack2, &ack, sizeof ack);
    ack.status = HX_ENOMEM;
    check_ok(hx_proto_send_kv_ack(s, 42, &ack, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    check_ok(hx_proto_decode_kv_ack(&f, &ack2, &err), &err);
    assert_int_equal(ack2.status, HX_ENOMEM);

    /* TOKENS */
    int32_t gen[3] = {5, 0, 32000};
    hx_proto_tokens tk = {.first_position = 17, .num_tokens = 3, .token_ids = gen};
    check_ok(hx_proto_send_tokens(s, 42, &tk, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_tokens tk2;
    check_ok(hx_proto_decode_tokens(&f, &tk2, &err), &err);
    assert_int_equal(tk2.first_position, 17);
    assert_int_equal(tk2.num_tokens, 3);
    assert_memory_equal(tk2.token_ids, gen, sizeof gen);

    /* DONE */
    hx_proto_done d = {.finish = HX_PROTO_FINISH_LENGTH, .num_generated_tokens = 128,
                       .elapsed_ns = 987654321};
    check_ok(hx_proto_send_done(s, 42, &d, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_done d2;
    check_ok(hx_proto_decode_done(&f, &d2, &err), &err);
    assert_int_equal(d2.finish, HX_PROTO_FINISH_LENGTH);
    assert_int_equal(d2.num_generated_tokens, 128);
    assert_int_equal(d2.elapsed_ns, 987654321);

    /* ERROR, with UTF-8 and an over-long message cut at a character boundary */
    check_ok(hx_proto_send_error(s, 42, HX_ERANGE, "prompt of 9000 tokens exceeds 8192 — too long",
                                 dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_error e2;
    check_ok(hx_proto_decode_error(&f, &e2, &err), &err);
    assert_int_equal(e2.code, HX_ERANGE);
    assert_string_equal(e2.message, "prompt of 9000 tokens exceeds 8192 — too long");
    char longmsg[2000];
    memset(longmsg, 'x', sizeof longmsg);
    memcpy(longmsg + 1021, "é", 2); /* straddles the 1023-byte cut */
    longmsg[1999] = '\0';
    check_ok(hx_proto_send_error(s, 0, HX_EIO, longmsg, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    check_ok(hx_proto_decode_error(&f, &e2, &err), &err);
    assert_true(strlen(e2.message) <= HX_PROTO_ERROR_MESSAGE_MAX);
    assert_true(strlen(e2.message) >= 1021);

    /* HEALTH / HEALTH_OK */
    check_ok(hx_proto_send_health(c, 77, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    assert_int_equal(f.type, HX_PROTO_HEALTH);
    assert_int_equal(f.req_id, 77);
    assert_int_equal(f.len, 0);
    hx_proto_health hl = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    check_ok(hx_proto_send_health_ok(s, 77, &hl, dl, &err), &err);
    check_ok(hx_proto_recv(c, &f, dl, &err), &err);
    hx_proto_health hl2;
    check_ok(hx_proto_decode_health_ok(&f, &hl2, &err), &err);
    assert_int_equal(f.req_id, 77);
    assert_memory_equal(&hl2, &hl, sizeof hl);

    /* SHUTDOWN */
    hx_proto_shutdown sd = {.flags = HX_PROTO_SHUTDOWN_DRAIN};
    snprintf(sd.reason, sizeof sd.reason, "hexflow stop");
    check_ok(hx_proto_send_shutdown(c, &sd, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    hx_proto_shutdown sd2;
    check_ok(hx_proto_decode_shutdown(&f, &sd2, &err), &err);
    assert_int_equal(sd2.flags, HX_PROTO_SHUTDOWN_DRAIN);
    assert_string_equal(sd2.reason, "hexflow stop");

    /* the type names */
    assert_string_equal(hx_proto_type_name(HX_PROTO_KV_SEGMENT), "KV_SEGMENT");
    assert_null(hx_proto_type_name(999));

    hx_proto_close(s);
    hx_proto_close(c);
}

static void test_send_side_checks(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    hx_proto_frame f;
    connected_pair(&s, &c);
    int64_t dl = hx_proto_deadline_in(5);
    float data[2 * 2 * 1 * 4 * 8];
    memset(data, 0, sizeof data);
    hx_proto_kv_segment seg = {.num_segments = 1, .num_layers = 2, .num_kv_heads = 1,
                               .num_tokens = 4, .head_dim = 8, .dtype = HX_PROTO_DTYPE_F32,
                               .data_bytes = sizeof data - 4, .data = data};
    expect_err(hx_proto_send_kv_segment(c, 1, &seg, dl, &err), &err, HX_EINVAL,
               "data_bytes 508 for a geometry of 512 bytes");
    seg.data_bytes = sizeof data;
    expect_err(hx_proto_send_kv_segment(c, 0, &seg, dl, &err), &err, HX_EINVAL, "KV_SEGMENT 0");
    /* a limit below the segment: refused locally, the connection stays usable */
    assert_int_equal(hx_proto_set_max_payload(c, HX_PROTO_KV_SEGMENT, 256), HX_OK);
    expect_err(hx_proto_send_kv_segment(c, 1, &seg, dl, &err), &err, HX_ERANGE,
               "payload of 576 bytes is over the limit of 256 bytes for KV_SEGMENT");
    assert_int_equal(hx_proto_set_max_payload(c, HX_PROTO_KV_SEGMENT, 1 << 20), HX_OK);
    check_ok(hx_proto_send_kv_segment(c, 1, &seg, dl, &err), &err);
    check_ok(hx_proto_recv(s, &f, dl, &err), &err);
    assert_int_equal(f.type, HX_PROTO_KV_SEGMENT);
    /* handshake types cannot be sent by hand; unknown types are refused */
    expect_err(hx_proto_send(c, HX_PROTO_AUTH_OK, 0, "x", 1, dl, &err), &err, HX_EINVAL,
               "AUTH_OK is a handshake frame");
    expect_err(hx_proto_send(c, (hx_proto_type)99, 0, NULL, 0, dl, &err), &err, HX_EINVAL,
               "unknown message type 99");
    assert_int_equal(hx_proto_set_max_payload(c, HX_PROTO_AUTH_OK, 5), HX_EINVAL);
    int32_t neg[2] = {1, -5};
    hx_proto_tokens tk = {.num_tokens = 2, .token_ids = neg};
    expect_err(hx_proto_send_tokens(c, 3, &tk, dl, &err), &err, HX_EINVAL, "TOKENS");
    hx_proto_prefill_request pr = {.max_tokens = 1, .temperature = 1.0f, .top_p = 1.5f,
                                   .num_tokens = 1, .token_ids = neg};
    expect_err(hx_proto_send_prefill_request(c, 3, &pr, dl, &err), &err, HX_EINVAL,
               "PREFILL_REQUEST 3");
    hx_proto_close(s);
    hx_proto_close(c);
}

/* ---- the 64 MiB KV segment over loopback TCP --------------------------------------- */

#define BIG_TOKENS 2048
#define BIG_LAYERS 16
#define BIG_HEADS 4
#define BIG_DIM 128 /* 16 x 2 x 4 x 2048 x 128 x 2 bytes = 64 MiB */

typedef struct big_job {
    int port;
    unsigned char *data;
    size_t bytes;
    hx_status st;
    hx_err err;
    hx_proto_kv_ack ack;
} big_job;

static void *big_sender(void *arg)
{
    big_job *j = arg;
    hx_proto_conn *c = NULL;
    j->st = hx_proto_connect("127.0.0.1", j->port, &secret_a, "prefill", hx_proto_deadline_in(10),
                             &c, &j->err);
    if (j->st != HX_OK)
        return NULL;
    hx_proto_kv_segment seg = {.src_stage = 0, .src_rank = 1, .dst_stage = 0, .dst_rank = 0,
                               .segment_index = 0, .num_segments = 1, .first_layer = 0,
                               .num_layers = BIG_LAYERS, .first_kv_head = 4,
                               .num_kv_heads = BIG_HEADS, .num_tokens = BIG_TOKENS,
                               .head_dim = BIG_DIM, .dtype = HX_PROTO_DTYPE_F16,
                               .data_bytes = j->bytes, .data = j->data};
    j->st = hx_proto_send_kv_segment(c, 9001, &seg, hx_proto_deadline_in(60), &j->err);
    if (j->st == HX_OK) {
        hx_proto_frame f;
        j->st = hx_proto_recv(c, &f, hx_proto_deadline_in(60), &j->err);
        if (j->st == HX_OK)
            j->st = hx_proto_decode_kv_ack(&f, &j->ack, &j->err);
    }
    hx_proto_close(c);
    return NULL;
}

static void test_kv_segment_64mib_tcp(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_listener *l = NULL;
    check_ok(hx_proto_listen("127.0.0.1", 0, &l, &err), &err);
    assert_true(hx_proto_listener_port(l) > 0);
    big_job j = {.port = hx_proto_listener_port(l)};
    j.bytes = (size_t)BIG_LAYERS * 2 * BIG_HEADS * BIG_TOKENS * BIG_DIM * 2;
    assert_int_equal(j.bytes, (size_t)64 << 20);
    j.data = malloc(j.bytes);
    assert_non_null(j.data);
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < j.bytes; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(j.data + i, &x, 8);
    }
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, big_sender, &j), 0);
    hx_proto_conn *s = NULL;
    hx_status st = hx_proto_accept(l, &secret_a, hx_proto_deadline_in(10), &s, &err);
    if (st != HX_OK) {
        pthread_join(t, NULL);
        fail_msg("accept: %s / sender: %s", err.msg, j.err.msg);
    }
    assert_string_equal(hx_proto_peer_role(s), "prefill");
    assert_non_null(strstr(hx_proto_peer(s), "127.0.0.1:"));
    hx_proto_frame f;
    st = hx_proto_recv(s, &f, hx_proto_deadline_in(60), &err);
    check_ok(st, &err);
    hx_proto_kv_segment seg;
    check_ok(hx_proto_decode_kv_segment(&f, &seg, &err), &err);
    assert_int_equal(f.req_id, 9001);
    assert_int_equal(seg.data_bytes, j.bytes);
    assert_int_equal(seg.first_kv_head, 4);
    assert_true(memcmp(seg.data, j.data, j.bytes) == 0);
    hx_proto_kv_ack ack = {.src_rank = 1, .bytes_received = seg.data_bytes};
    check_ok(hx_proto_send_kv_ack(s, 9001, &ack, hx_proto_deadline_in(5), &err), &err);
    pthread_join(t, NULL);
    check_ok(j.st, &j.err);
    assert_int_equal(j.ack.bytes_received, j.bytes);
    /* the buffer is kept for the next frame, and can be trimmed */
    hx_proto_trim(s, 1 << 20);
    hx_proto_close(s);
    hx_proto_listener_free(l);
    free(j.data);
}

/* ---- bad frames after authentication ----------------------------------------------- */

/* Writes raw bytes on the client's socket and returns the server's recv result. */
static hx_status inject(const void *bytes, size_t n, int close_after, double deadline_s,
                        hx_err *err)
{
    hx_proto_conn *s, *c;
    connected_pair(&s, &c);
    write_all(hx_proto_fd(c), bytes, n);
    if (close_after) {
        hx_proto_close(c);
        c = NULL;
    }
    hx_proto_frame f;
    hx_status st = hx_proto_recv(s, &f, hx_proto_deadline_in(deadline_s), err);
    /* after any such error the connection refuses to go on */
    if (st != HX_OK && st != HX_ETIMEDOUT) {
        hx_err e2 = {0};
        assert_int_equal(hx_proto_recv(s, &f, hx_proto_deadline_in(1), &e2), HX_ECONN);
        assert_non_null(strstr(e2.msg, "cannot receive any more"));
    }
    hx_proto_close(s);
    hx_proto_close(c);
    return st;
}

static void test_bad_frames(void **state)
{
    (void)state;
    hx_err err = {0};
    unsigned char h[HX_PROTO_HEADER_BYTES + 64];

    raw_header(h, "HXF2", 1, HX_PROTO_HELLO, 0, 0, 0);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "sent bad magic 'HXF2' instead of 'HXF1'");
    raw_header(h, "\x01\x02\x03\x04", 1, HX_PROTO_HELLO, 0, 0, 0);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "bad magic 01 02 03 04");

    raw_header(h, "HXF1", 7, HX_PROTO_HELLO, 0, 0, 0);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_ENOTSUP,
               "speaks hexflow runtime protocol version 7; this build speaks version 1");

    raw_header(h, "HXF1", 1, 999, 0, 0, 31);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "unknown message type 999 from test-client (router) (request 31)");
    raw_header(h, "HXF1", 1, 12, 0, 0, 0); /* a gap in the numbering */
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "unknown message type 12");

    raw_header(h, "HXF1", 1, HX_PROTO_HELLO, 0x10, 0, 0);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "HELLO frame from test-client (router) has unknown flags 0x00000010");

    raw_header(h, "HXF1", 1, HX_PROTO_AUTH_OK, 0, 32, 0);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_EPARSE,
               "unexpected AUTH_OK frame from test-client (router) after authentication");

    /* over the size limit: refused from the header alone, at once */
    int64_t t0 = hx_proto_now_ns();
    raw_header(h, "HXF1", 1, HX_PROTO_KV_SEGMENT, 0, HX_PROTO_DEFAULT_MAX_KV_SEGMENT_BYTES + 1, 8);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 10, &err), &err, HX_ERANGE,
               "KV_SEGMENT frame from test-client (router) (request 8) has a payload of "
               "1073741825 bytes, over the limit of 1073741824 bytes");
    assert_true((double)(hx_proto_now_ns() - t0) * 1e-9 < 5.0);
    raw_header(h, "HXF1", 1, HX_PROTO_FIRST_TOKEN, 0, 25, 8);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_ERANGE,
               "over the limit of 24 bytes for FIRST_TOKEN");
    raw_header(h, "HXF1", 1, HX_PROTO_HEALTH, 0, 1, 8);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 0, 2, &err), &err, HX_ERANGE,
               "over the limit of 0 bytes for HEALTH");

    /* truncated: header cut short, then the peer goes away */
    expect_err(inject(h, 10, 1, 2, &err), &err, HX_ECONN,
               "closed the connection in the middle of a frame (frame header: got 10 of 28 bytes)");
    /* truncated payload */
    raw_header(h, "HXF1", 1, HX_PROTO_HELLO, 0, 20, 0);
    memset(h + HX_PROTO_HEADER_BYTES, 'a', 5);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES + 5, 1, 2, &err), &err, HX_ECONN,
               "payload of HELLO (request 0): got 5 of 20 bytes");
    /* whole payload, no tag */
    raw_header(h, "HXF1", 1, HX_PROTO_HEALTH, 0, 0, 4);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES, 1, 2, &err), &err, HX_ECONN,
               "tag of HEALTH (request 4): got 0 of 16 bytes");
    /* a well-formed frame with a made-up tag */
    memset(h + HX_PROTO_HEADER_BYTES, 0x5a, 16);
    expect_err(inject(h, HX_PROTO_HEADER_BYTES + 16, 0, 2, &err), &err, HX_EPARSE,
               "HEALTH frame #0 (request 4) from test-client (router) fails its integrity check");
}

static void test_stall_mid_frame_times_out(void **state)
{
    (void)state;
    hx_err err = {0};
    unsigned char h[HX_PROTO_HEADER_BYTES + 12];
    raw_header(h, "HXF1", 1, HX_PROTO_TOKENS, 0, 100, 3);
    memset(h + HX_PROTO_HEADER_BYTES, 0, 12);
    int64_t t0 = hx_proto_now_ns();
    hx_status st = inject(h, sizeof h, 0, 0.3, &err); /* the peer keeps the connection open */
    double el = (double)(hx_proto_now_ns() - t0) * 1e-9;
    expect_err(st, &err, HX_ETIMEDOUT, "reading a frame from test-client (router): payload of "
                                       "TOKENS (request 3): got 12 of 100 bytes");
    expect_err(st, &err, HX_ETIMEDOUT, "stopped sending mid-frame");
    assert_true(el >= 0.28 && el < 3.0);
}

static void test_timeout_between_frames_keeps_connection(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    hx_proto_frame f;
    connected_pair(&s, &c);
    int64_t t0 = hx_proto_now_ns();
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(0.2), &err), &err, HX_ETIMEDOUT,
               "waiting for a frame from test-client (router)");
    double el = (double)(hx_proto_now_ns() - t0) * 1e-9;
    assert_true(el >= 0.18 && el < 3.0);
    check_ok(hx_proto_send_health(c, 5, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err);
    assert_int_equal(f.type, HX_PROTO_HEALTH);
    hx_proto_close(s);
    hx_proto_close(c);
}

static void test_peer_stops_reading(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    connected_pair(&s, &c);
    /* nobody reads s: a 16 MiB segment cannot go out, and the sender gives up on time */
    size_t n = (size_t)16 << 20;
    unsigned char *data = calloc(1, n);
    assert_non_null(data);
    hx_proto_kv_segment seg = {.num_segments = 1, .num_layers = 1, .num_kv_heads = 1,
                               .num_tokens = (uint32_t)(n / 2 / 128 / 4), .head_dim = 128,
                               .dtype = HX_PROTO_DTYPE_F32, .data_bytes = n, .data = data};
    int64_t t0 = hx_proto_now_ns();
    hx_status st = hx_proto_send_kv_segment(c, 9, &seg, hx_proto_deadline_in(0.3), &err);
    double el = (double)(hx_proto_now_ns() - t0) * 1e-9;
    expect_err(st, &err, HX_ETIMEDOUT, "sending a KV_SEGMENT frame (request 9) to test-server");
    expect_err(st, &err, HX_ETIMEDOUT, "of 16777324 bytes; the peer stopped reading");
    assert_true(el >= 0.28 && el < 3.0);
    /* half a frame went out: this direction is done for */
    expect_err(hx_proto_send_health(c, 1, hx_proto_deadline_in(1), &err), &err, HX_ECONN,
               "cannot send any more");
    free(data);
    hx_proto_close(s);
    hx_proto_close(c);
}

static void test_dropped_connection(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    hx_proto_frame f;

    /* the peer closes between frames */
    connected_pair(&s, &c);
    hx_proto_close(c);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_ECONN,
               "test-client (router) closed the connection");
    /* sending to it: HX_ECONN, not SIGPIPE */
    expect_err(hx_proto_send_health(s, 1, hx_proto_deadline_in(2), &err), &err, HX_ECONN,
               "connection to test-client (router) dropped");
    expect_err(hx_proto_send_health(s, 1, hx_proto_deadline_in(2), &err), &err, HX_ECONN,
               "cannot send any more");
    hx_proto_close(s);
}

typedef struct connect_job {
    const char *host;
    int port;
    const hx_proto_secret *secret;
    hx_proto_conn *conn;
    hx_status st;
    hx_err err;
} connect_job;

static void *connect_thread(void *arg)
{
    connect_job *j = arg;
    j->st = hx_proto_connect(j->host, j->port, j->secret, "decode", hx_proto_deadline_in(5),
                             &j->conn, &j->err);
    return NULL;
}

/* Accepts on l while a thread connects to host:port; both connections returned. */
static void tcp_pair(hx_proto_listener *l, const char *host, hx_proto_conn **s, hx_proto_conn **c)
{
    connect_job j = {.host = host, .port = hx_proto_listener_port(l), .secret = &secret_a};
    pthread_t t;
    hx_err err = {0};
    assert_int_equal(pthread_create(&t, NULL, connect_thread, &j), 0);
    hx_status st = hx_proto_accept(l, &secret_a, hx_proto_deadline_in(5), s, &err);
    pthread_join(t, NULL);
    check_ok(st, &err);
    check_ok(j.st, &j.err);
    *c = j.conn;
}

static void test_dropped_tcp_connection(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_listener *l = NULL;
    hx_proto_conn *s, *c;
    hx_proto_frame f;
    check_ok(hx_proto_listen("127.0.0.1", 0, &l, &err), &err);
    tcp_pair(l, "127.0.0.1", &s, &c);
    hx_proto_close(c);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_ECONN,
               "(decode) closed the connection");
    hx_status st = HX_OK;
    for (int i = 0; i < 100 && st == HX_OK; i++)
        st = hx_proto_send_health(s, 1, hx_proto_deadline_in(2), &err);
    expect_err(st, &err, HX_ECONN, "dropped");
    hx_proto_close(s);

    /* a peer that goes away in the middle of a large frame */
    tcp_pair(l, "localhost", &s, &c);
    unsigned char h[HX_PROTO_HEADER_BYTES];
    raw_header(h, "HXF1", 1, HX_PROTO_KV_SEGMENT, 0, 1 << 20, 77);
    write_all(hx_proto_fd(c), h, sizeof h);
    unsigned char *junk = calloc(1, 300000);
    write_all(hx_proto_fd(c), junk, 300000);
    free(junk);
    hx_proto_close(c);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(5), &err), &err, HX_ECONN,
               "payload of KV_SEGMENT (request 77): got 300000 of 1048576 bytes");
    hx_proto_close(s);
    hx_proto_listener_free(l);
}

static void test_tampering_and_replay(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_frame f;
    hx_proto_conn *s, *c;
    pthread_t t;
    size_t hs = handshake_c2s_bytes("prefill");
    int32_t ids[4] = {1, 2, 3, 4};
    hx_proto_tokens tk = {.first_position = 0, .num_tokens = 4, .token_ids = ids};

    /* a flipped payload bit */
    relay r = {.flip_at = (int64_t)(hs + HX_PROTO_HEADER_BYTES + 20), .dup_len = 0};
    relayed_pair(&r, &t, &s, &c);
    check_ok(hx_proto_send_tokens(c, 12, &tk, hx_proto_deadline_in(2), &err), &err);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_EPARSE,
               "TOKENS frame #0 (request 12) from test-client (prefill) fails its integrity check");
    relay_finish(t, s, c);
    relay_free(&r);

    /* a changed request id in the header */
    relay r2 = {.flip_at = (int64_t)(hs + 20), .dup_len = 0};
    relayed_pair(&r2, &t, &s, &c);
    check_ok(hx_proto_send_tokens(c, 12, &tk, hx_proto_deadline_in(2), &err), &err);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_EPARSE,
               "(request 13) from test-client (prefill) fails its integrity check");
    relay_finish(t, s, c);
    relay_free(&r2);

    /* a flipped tag bit */
    size_t frame = HX_PROTO_HEADER_BYTES + HX_PROTO_TOKENS_FIXED_BYTES + 16 + HX_PROTO_TAG_BYTES;
    relay r3 = {.flip_at = (int64_t)(hs + frame - 1), .dup_len = 0};
    relayed_pair(&r3, &t, &s, &c);
    check_ok(hx_proto_send_tokens(c, 12, &tk, hx_proto_deadline_in(2), &err), &err);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_EPARSE,
               "fails its integrity check");
    relay_finish(t, s, c);
    relay_free(&r3);

    /* a replayed frame: the first copy is fine, the second is refused */
    relay r4 = {.flip_at = -1, .dup_from = (int64_t)hs, .dup_len = (int64_t)frame};
    relayed_pair(&r4, &t, &s, &c);
    check_ok(hx_proto_send_tokens(c, 12, &tk, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err);
    assert_int_equal(f.type, HX_PROTO_TOKENS);
    expect_err(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err, HX_EPARSE,
               "TOKENS frame #1 (request 12) from test-client (prefill) fails its integrity check");
    relay_finish(t, s, c);
    relay_free(&r4);
}

/*
 * The wire format against docs/runtime-protocol.md, computed here with
 * OpenSSL's EVP_MAC (a different API from the one proto.c uses).
 */
static void hmac256(const hx_proto_secret *key, const unsigned char *msg, size_t n,
                    unsigned char out[32])
{
    unsigned int len = 0;
    assert_non_null(HMAC(EVP_sha256(), key->bytes, (int)key->len, msg, n, out, &len));
    assert_int_equal(len, 32);
}

static void spec_hmac(const char *label, const unsigned char *a, const unsigned char *b,
                      const char *role, unsigned char out[32])
{
    unsigned char msg[256];
    size_t n = strlen(label);
    memcpy(msg, label, n);
    memcpy(msg + n, a, 32);
    memcpy(msg + n + 32, b, 32);
    memcpy(msg + n + 64, role, strlen(role));
    hmac256(&secret_a, msg, n + 64 + strlen(role), out);
}

static void test_wire_format_matches_spec(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_frame f;
    hx_proto_conn *s, *c;
    pthread_t t;
    relay r = {.flip_at = -1};
    relayed_pair(&r, &t, &s, &c);
    hx_proto_hello h = {.role = HX_PROTO_ROLE_PREFILL, .stage = 2, .rank = 1};
    snprintf(h.group_id, sizeof h.group_id, "g0");
    snprintf(h.version, sizeof h.version, "0.1.0");
    check_ok(hx_proto_send_hello(c, &h, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_send_health(s, 99, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(c, &f, hx_proto_deadline_in(2), &err), &err);
    relay_finish(t, s, c);

    /* server -> client: AUTH_CHALLENGE(sn), AUTH_OK(proof), HEALTH + tag */
    const unsigned char *sc = r.s2c;
    size_t hl = HX_PROTO_HEADER_BYTES;
    assert_int_equal(r.s2c_len, (hl + 32) + (hl + 32) + (hl + 0 + 16));
    assert_memory_equal(sc, "HXF1\x01\x00\x01\x00\x00\x00\x00\x00", 12);
    assert_int_equal(get64(sc + 12), 32);
    const unsigned char *sn = sc + hl;
    /* client -> server: AUTH_RESPONSE(cn, proof, role), HELLO + tag */
    const unsigned char *cs = r.c2s;
    assert_int_equal(cs[6], HX_PROTO_AUTH_RESPONSE);
    assert_int_equal(get64(cs + 12), 64 + 7);
    const unsigned char *cn = cs + hl, *cproof = cs + hl + 32;
    assert_memory_equal(cs + hl + 64, "prefill", 7);
    unsigned char want[32];
    spec_hmac("hexflow-auth-v1", sn, cn, "prefill", want);
    assert_memory_equal(cproof, want, 32);
    const unsigned char *ok = sc + hl + 32;
    assert_int_equal(ok[6], HX_PROTO_AUTH_OK);
    spec_hmac("hexflow-auth-v1", cn, sn, "prefill", want);
    assert_memory_equal(ok + hl, want, 32);

    /* the first client frame: HELLO payload as specified, tag = GMAC(K_c2s, seq 0) */
    const unsigned char *hello = cs + hl + 64 + 7;
    size_t plen = 12 + 2 + 5;
    assert_int_equal(hello[6], HX_PROTO_HELLO);
    assert_int_equal(get64(hello + 12), plen);
    const unsigned char expect_payload[19] = {2, 0, 2, 0, 1, 0, 0, 0, 2, 0, 5, 0,
                                              'g', '0', '0', '.', '1', '.', '0'};
    assert_memory_equal(hello + hl, expect_payload, plen);
    assert_int_equal(r.c2s_len, (size_t)(hl + 64 + 7) + hl + plen + 16);

    unsigned char key[32];
    spec_hmac("hexflow-key-v1 client->server", sn, cn, "prefill", key);
    unsigned char iv[12] = {0}; /* 4 zero bytes, sequence number 0 */
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "GMAC", NULL);
    assert_non_null(mac);
    EVP_MAC_CTX *mc = EVP_MAC_CTX_new(mac);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_CIPHER, (char *)"AES-256-GCM", 0),
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_IV, iv, sizeof iv),
        OSSL_PARAM_construct_end()};
    assert_int_equal(EVP_MAC_init(mc, key, sizeof key, params), 1);
    assert_int_equal(EVP_MAC_update(mc, hello, hl + plen), 1);
    unsigned char tag[16];
    size_t tl = 0;
    assert_int_equal(EVP_MAC_final(mc, tag, &tl, sizeof tag), 1);
    assert_int_equal(tl, 16);
    assert_memory_equal(hello + hl + plen, tag, 16);

    /* the server's HEALTH: K_s2c, its own sequence number 0 */
    const unsigned char *health = sc + 2 * (hl + 32);
    assert_int_equal(health[6], HX_PROTO_HEALTH);
    assert_int_equal(get64(health + 20), 99);
    spec_hmac("hexflow-key-v1 server->client", sn, cn, "prefill", key);
    assert_int_equal(EVP_MAC_init(mc, key, sizeof key, params), 1);
    assert_int_equal(EVP_MAC_update(mc, health, hl), 1);
    assert_int_equal(EVP_MAC_final(mc, tag, &tl, sizeof tag), 1);
    assert_memory_equal(health + hl, tag, 16);
    EVP_MAC_CTX_free(mc);
    EVP_MAC_free(mac);
    relay_free(&r);
}

/* ---- decoders never trust the payload ------------------------------------------------ */

static hx_proto_frame frame_of(hx_proto_type type, uint64_t req_id, const void *p, size_t n)
{
    hx_proto_frame f = {.type = type, .req_id = req_id, .payload = p, .len = n, .peer = "p:1"};
    return f;
}

static void test_decoders_reject_malformed(void **state)
{
    (void)state;
    hx_err err = {0};
    _Alignas(64) unsigned char b[256];
    hx_proto_frame f;

    /* KV_SEGMENT */
    hx_proto_kv_segment kv;
    memset(b, 0, sizeof b);
    put32(b + 12, 1);           /* num_segments */
    put32(b + 20, 1);           /* num_layers */
    put32(b + 28, 1);           /* num_kv_heads */
    put32(b + 36, 2);           /* num_tokens */
    put32(b + 40, 4);           /* head_dim */
    put16(b + 44, HX_PROTO_DTYPE_F16);
    put64(b + 48, 32);          /* 1 x 2 x 1 x 2 x 4 x 2 */
    f = frame_of(HX_PROTO_KV_SEGMENT, 5, b, 64 + 32);
    check_ok(hx_proto_decode_kv_segment(&f, &kv, &err), &err);
    put64(b + 48, 30);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE,
               "malformed KV_SEGMENT (request 5) from p:1: data_bytes 30 does not match the "
               "geometry: 1 layers x 2 x 1 KV heads x 2 tokens x 4 head_dim x 2 bytes (f16) = 32");
    put64(b + 48, 32);
    f.len = 64 + 31;
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE,
               "payload holds 31 data bytes; the header says 32");
    f.len = 40;
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE,
               "40 bytes; a KV segment header alone is 64");
    f.len = 64 + 32;
    put16(b + 44, 9);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE, "unknown dtype 9");
    put16(b + 44, HX_PROTO_DTYPE_F16);
    put16(b + 46, 1);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE, "unknown layout 1");
    put16(b + 46, 0);
    put32(b + 8, 1); /* segment 1 of 1 */
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE, "segment 1 of 1");
    put32(b + 8, 0);
    put32(b + 40, 0);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE, "a zero dimension");
    put32(b + 20, 0xffffffffu);
    put32(b + 28, 0xffffffffu);
    put32(b + 36, 0xffffffffu);
    put32(b + 40, 0xffffffffu);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE, "overflows 64 bits");
    f = frame_of(HX_PROTO_KV_SEGMENT, 0, b, 96);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EPARSE,
               "request id 0; a KV_SEGMENT belongs to a request");
    f = frame_of(HX_PROTO_TOKENS, 5, b, 96);
    expect_err(hx_proto_decode_kv_segment(&f, &kv, &err), &err, HX_EINVAL,
               "decoding KV_SEGMENT: the frame is a TOKENS");

    /* PREFILL_REQUEST */
    hx_proto_prefill_request pr;
    memset(b, 0, sizeof b);
    put32(b, 2);                 /* tokens */
    put32(b + 4, 16);            /* max_tokens */
    float one = 1.0f, nan = 0.0f / 0.0f;
    uint32_t bits;
    memcpy(&bits, &one, 4);
    put32(b + 12, bits);         /* top_p 1, temperature 0 */
    put16(b + 20, 2);            /* group "d1" */
    put32(b + 32, 10);
    put32(b + 36, 11);
    memcpy(b + 40, "d1", 2);
    f = frame_of(HX_PROTO_PREFILL_REQUEST, 1, b, 42);
    check_ok(hx_proto_decode_prefill_request(&f, &pr, &err), &err);
    assert_string_equal(pr.decode_group, "d1");
    assert_int_equal(pr.token_ids[1], 11);
    f.len = 41;
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE,
               "41 bytes, but 2 tokens and a 2-byte group id need 42");
    f.len = 42;
    put32(b + 36, 0x80000000u);
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE,
               "token 1 has the negative id");
    put32(b + 36, 11);
    memcpy(&bits, &nan, 4);
    put32(b + 8, bits);
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE,
               "sampling parameters out of range");
    put32(b + 8, 0);
    memcpy(b + 40, "d ", 2);
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE,
               "decode group of 2 bytes is not a name");
    memcpy(b + 40, "d1", 2);
    put32(b, 0xffffffffu); /* a huge count must not overflow the size check */
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE,
               "but 4294967295 tokens");
    put32(b, 2);
    put32(b + 4, 0);
    expect_err(hx_proto_decode_prefill_request(&f, &pr, &err), &err, HX_EPARSE, "max_tokens is 0");

    /* HELLO */
    hx_proto_hello he;
    memset(b, 0, sizeof b);
    put16(b, 9);
    put16(b + 10, 1);
    b[12] = '1';
    f = frame_of(HX_PROTO_HELLO, 0, b, 13);
    expect_err(hx_proto_decode_hello(&f, &he, &err), &err, HX_EPARSE, "unknown role 9");
    put16(b, HX_PROTO_ROLE_ROUTER);
    check_ok(hx_proto_decode_hello(&f, &he, &err), &err);
    put16(b + 8, 200);
    expect_err(hx_proto_decode_hello(&f, &he, &err), &err, HX_EPARSE,
               "13 bytes, but the string lengths (200 + 1) need 213");
    put16(b + 8, 0);
    put16(b + 10, 0);
    f.len = 12;
    expect_err(hx_proto_decode_hello(&f, &he, &err), &err, HX_EPARSE, "software version of 0 bytes");

    /* TOKENS */
    hx_proto_tokens tk;
    memset(b, 0, sizeof b);
    put32(b, 3);
    f = frame_of(HX_PROTO_TOKENS, 2, b, 16 + 8);
    expect_err(hx_proto_decode_tokens(&f, &tk, &err), &err, HX_EPARSE, "24 bytes, but 3 tokens need 28");
    put32(b, 0);
    f.len = 16;
    expect_err(hx_proto_decode_tokens(&f, &tk, &err), &err, HX_EPARSE, "no tokens");
    put32(b, 1);
    f = frame_of(HX_PROTO_TOKENS, 2, b + 1, 20); /* misaligned: not from hx_proto_recv */
    memmove(b + 1, b, 20);
    expect_err(hx_proto_decode_tokens(&f, &tk, &err), &err, HX_EINVAL, "not 4-byte aligned");

    /* ERROR */
    hx_proto_error er;
    memset(b, 0, sizeof b);
    put32(b, (uint32_t)(int32_t)HX_EIO);
    put16(b + 4, 3);
    memcpy(b + 6, "a\xff" "b", 3);
    f = frame_of(HX_PROTO_ERROR, 0, b, 9);
    expect_err(hx_proto_decode_error(&f, &er, &err), &err, HX_EPARSE, "the message is not text");
    put32(b, 3);
    memcpy(b + 6, "abc", 3);
    expect_err(hx_proto_decode_error(&f, &er, &err), &err, HX_EPARSE, "code 3 is not an error");

    /* DONE, FIRST_TOKEN, KV_ACK, HEALTH_OK, SHUTDOWN */
    hx_proto_done dn;
    memset(b, 0, sizeof b);
    put32(b, 9);
    f = frame_of(HX_PROTO_DONE, 1, b, 16);
    expect_err(hx_proto_decode_done(&f, &dn, &err), &err, HX_EPARSE, "unknown finish reason 9");
    f.len = 15;
    expect_err(hx_proto_decode_done(&f, &dn, &err), &err, HX_EPARSE, "15 bytes; 16 expected");
    hx_proto_first_token ft;
    put32(b, 0xffffffffu);
    f = frame_of(HX_PROTO_FIRST_TOKEN, 1, b, 24);
    expect_err(hx_proto_decode_first_token(&f, &ft, &err), &err, HX_EPARSE, "negative token id -1");
    f.len = 16; /* the size before kv_bytes */
    expect_err(hx_proto_decode_first_token(&f, &ft, &err), &err, HX_EPARSE, "16 bytes; 24 expected");
    hx_proto_kv_ack ka;
    memset(b, 0, sizeof b);
    put32(b + 12, 4);
    f = frame_of(HX_PROTO_KV_ACK, 1, b, 24);
    expect_err(hx_proto_decode_kv_ack(&f, &ka, &err), &err, HX_EPARSE, "status 4 is not a status");
    hx_proto_health hh;
    memset(b, 0, sizeof b);
    put32(b, 5);
    f = frame_of(HX_PROTO_HEALTH_OK, 0, b, 48);
    expect_err(hx_proto_decode_health_ok(&f, &hh, &err), &err, HX_EPARSE, "5 counters; 10 to 64 expected");
    put32(b, 12); /* a newer peer with more counters: the known ones are read */
    put64(b + 8, 42);
    f.len = 8 + 8 * 12;
    check_ok(hx_proto_decode_health_ok(&f, &hh, &err), &err);
    assert_int_equal(hh.uptime_ns, 42);
    put32(b, 10); /* an older peer without max_request_tokens: 0, "not said" */
    put64(b + 8 + 8 * 10, 99);
    f.len = 8 + 8 * 10;
    check_ok(hx_proto_decode_health_ok(&f, &hh, &err), &err);
    assert_int_equal(hh.max_request_tokens, 0);
    hx_proto_shutdown sd;
    memset(b, 0, sizeof b);
    put32(b, 6);
    f = frame_of(HX_PROTO_SHUTDOWN, 0, b, 6);
    expect_err(hx_proto_decode_shutdown(&f, &sd, &err), &err, HX_EPARSE, "unknown flags 0x6");
}

/* ---- secrets ---------------------------------------------------------------------------- */

/* GROUP_OP, TENSOR and STEP_TOKENS: what a group's ranks exchange. */
static void test_group_messages(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    connected_pair(&s, &c);
    int32_t prompt[3] = {5, 0, 511};
    hx_proto_group_op op = {HX_PROTO_OP_ADD, 16, 0.5f, 0.9f, 42, 257, 1, 0, 0, -1, 3, 3, prompt};
    check_ok(hx_proto_send_group_op(c, 7, &op, HX_PROTO_NO_DEADLINE, &err), &err);
    hx_proto_group_op back;
    hx_proto_frame f;
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(5), &err), &err);
    assert_int_equal(f.type, HX_PROTO_GROUP_OP);
    assert_int_equal(f.req_id, 7);
    check_ok(hx_proto_decode_group_op(&f, &back, &err), &err);
    assert_int_equal(back.op, HX_PROTO_OP_ADD);
    assert_int_equal(back.max_tokens, 16);
    assert_true(back.temperature == 0.5f && back.top_p == 0.9f);
    assert_int_equal(back.seed, 42);
    assert_int_equal(back.eos_id, 257);
    assert_int_equal(back.hold_kv, 1);
    assert_int_equal(back.src_group, -1);
    assert_int_equal(back.dst_group, 3);
    assert_int_equal(back.num_tokens, 3);
    assert_memory_equal(back.token_ids, prompt, sizeof prompt);

    hx_proto_group_op pre = {HX_PROTO_OP_ADD_PREFILLED, 8, 0, 1, 1, -1, 0, 99, 12, 2, -1, 0, NULL};
    check_ok(hx_proto_send_group_op(c, 8, &pre, HX_PROTO_NO_DEADLINE, &err), &err);
    check_ok(hx_proto_recv(s, &f, hx_proto_deadline_in(5), &err), &err);
    check_ok(hx_proto_decode_group_op(&f, &back, &err), &err);
    assert_int_equal(back.op, HX_PROTO_OP_ADD_PREFILLED);
    assert_int_equal(back.first_token, 99);
    assert_int_equal(back.n_prompt, 12);
    assert_int_equal(back.src_group, 2);
    assert_int_equal(back.eos_id, -1);
    assert_int_equal(back.num_tokens, 0);
    assert_null(back.token_ids);

    /* rows and tokens: exact sizes, and a frame of the wrong size or type is refused */
    float x[6] = {1, -2, 3.5f, 0, 1e-30f, 7}, y[6];
    check_ok(hx_proto_send_floats(c, x, 6, HX_PROTO_NO_DEADLINE, &err), &err);
    check_ok(hx_proto_recv_floats(s, y, 6, hx_proto_deadline_in(5), &err), &err);
    assert_memory_equal(x, y, sizeof x);
    int t[2] = {4, 9}, u[2];
    check_ok(hx_proto_send_step_tokens(c, t, 2, HX_PROTO_NO_DEADLINE, &err), &err);
    check_ok(hx_proto_recv_step_tokens(s, u, 2, hx_proto_deadline_in(5), &err), &err);
    assert_memory_equal(t, u, sizeof t);
    check_ok(hx_proto_send_floats(c, x, 5, HX_PROTO_NO_DEADLINE, &err), &err);
    expect_err(hx_proto_recv_floats(s, y, 6, hx_proto_deadline_in(5), &err), &err, HX_EPARSE,
               "TENSOR of 20 bytes, expected 24");
    check_ok(hx_proto_send_step_tokens(c, t, 2, HX_PROTO_NO_DEADLINE, &err), &err);
    expect_err(hx_proto_recv_floats(s, y, 2, hx_proto_deadline_in(5), &err), &err, HX_EPARSE,
               "got STEP_TOKENS, expected TENSOR");
    /* an ERROR in place of the rows carries the peer's failure */
    check_ok(hx_proto_send_error(c, 0, HX_ETIMEDOUT, "rank 1 gave up", HX_PROTO_NO_DEADLINE,
                                 &err), &err);
    expect_err(hx_proto_recv_floats(s, y, 6, hx_proto_deadline_in(5), &err), &err, HX_ETIMEDOUT,
               "rank 1 gave up");
    /* nothing buffered between frames */
    assert_int_equal(hx_proto_buffered(s), 0);

    /* the sender refuses a bad operation; the decoder a bad payload */
    hx_proto_group_op bad = op;
    bad.op = (hx_proto_op)9;
    expect_err(hx_proto_send_group_op(c, 1, &bad, HX_PROTO_NO_DEADLINE, &err), &err, HX_EINVAL,
               "op 9");
    _Alignas(64) unsigned char b[64];
    memset(b, 0, sizeof b);
    put32(b, 9);
    hx_proto_frame g = frame_of(HX_PROTO_GROUP_OP, 1, b, HX_PROTO_GROUP_OP_FIXED_BYTES);
    expect_err(hx_proto_decode_group_op(&g, &back, &err), &err, HX_EPARSE, "unknown operation 9");
    put32(b, HX_PROTO_OP_ADD);
    put32(b + 44, 2); /* two tokens announced, none there */
    expect_err(hx_proto_decode_group_op(&g, &back, &err), &err, HX_EPARSE, "2 tokens need 56");
    put32(b + 44, 0);
    put32(b + 12, 0x40000000); /* top_p 2.0 */
    expect_err(hx_proto_decode_group_op(&g, &back, &err), &err, HX_EPARSE, "sampling");
    hx_proto_close(s);
    hx_proto_close(c);
}

/* GROUP_SETUP: each phase round-trips; the wrong phase, a bad flag or an ERROR is refused. */
static void test_group_setup(void **state)
{
    (void)state;
    hx_proto_conn *s, *c;
    hx_err err = {0};
    connected_pair(&s, &c);
    hx_proto_group_setup m = {.phase = HX_PROTO_SETUP_OFFER, .backend = 2, .step_rows = 512,
                              .nccl = 1, .max_seqs = 32, .block_tokens = 16,
                              .kv_tokens = 1 << 20, .nccl_host = 0xdeadbeef};
    snprintf(m.device_uuid, sizeof m.device_uuid, "GPU-0123abcd-0000-1111-2222-333344445555");
    for (int i = 0; i < HX_PROTO_NCCL_ID_BYTES; i++)
        m.nccl_id[i] = (uint8_t)(i * 7 + 1);
    check_ok(hx_proto_send_group_setup(c, &m, HX_PROTO_NO_DEADLINE, &err), &err);
    hx_proto_group_setup back;
    check_ok(hx_proto_recv_group_setup(s, HX_PROTO_SETUP_OFFER, &back, hx_proto_deadline_in(5),
                                       &err), &err);
    assert_int_equal(back.phase, HX_PROTO_SETUP_OFFER);
    assert_int_equal(back.backend, 2);
    assert_int_equal(back.step_rows, 512);
    assert_int_equal(back.nccl, 1);
    assert_int_equal(back.max_seqs, 32);
    assert_int_equal(back.block_tokens, 16);
    assert_int_equal(back.kv_tokens, 1 << 20);
    assert_int_equal(back.nccl_host, 0xdeadbeef);
    assert_string_equal(back.device_uuid, m.device_uuid);
    assert_memory_equal(back.nccl_id, m.nccl_id, HX_PROTO_NCCL_ID_BYTES);

    /* a frame of another phase than the one awaited */
    m.phase = HX_PROTO_SETUP_JOINED;
    check_ok(hx_proto_send_group_setup(c, &m, HX_PROTO_NO_DEADLINE, &err), &err);
    expect_err(hx_proto_recv_group_setup(s, HX_PROTO_SETUP_FINAL, &back, hx_proto_deadline_in(5),
                                         &err), &err, HX_EPARSE, "GROUP_SETUP JOINED, expected FINAL");
    /* the leader's refusal arrives as an ERROR in place of the plan */
    check_ok(hx_proto_send_error(c, 0, HX_EINVAL, "group 'g' mixes engines", HX_PROTO_NO_DEADLINE,
                                 &err), &err);
    expect_err(hx_proto_recv_group_setup(s, HX_PROTO_SETUP_PLAN, &back, hx_proto_deadline_in(5),
                                         &err), &err, HX_EINVAL, "mixes engines");
    /* the sender refuses a phase or flag out of range */
    m.phase = (hx_proto_setup_phase)6;
    expect_err(hx_proto_send_group_setup(c, &m, HX_PROTO_NO_DEADLINE, &err), &err, HX_EINVAL,
               "phase 6");
    m.phase = HX_PROTO_SETUP_PLAN;
    m.nccl = 2;
    expect_err(hx_proto_send_group_setup(c, &m, HX_PROTO_NO_DEADLINE, &err), &err, HX_EINVAL,
               "nccl 2");
    /* a frame of the right type but the wrong size */
    int t[1] = {1};
    check_ok(hx_proto_send_step_tokens(c, t, 1, HX_PROTO_NO_DEADLINE, &err), &err);
    expect_err(hx_proto_recv_group_setup(s, HX_PROTO_SETUP_PLAN, &back, hx_proto_deadline_in(5),
                                         &err), &err, HX_EPARSE, "expected GROUP_SETUP");
    hx_proto_close(s);
    hx_proto_close(c);
}

static void write_file_mode(const char *path, const char *text, mode_t mode)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(chmod(path, mode), 0);
}

static void test_secret_files(void **state)
{
    (void)state;
    char path[512], msg[700];
    hx_proto_secret sec;
    hx_err err = {0};

    snprintf(path, sizeof path, "%s/secret", tmp_dir);
    write_file_mode(path, "00112233445566778899aabbccddeeff\n", 0644);
    snprintf(msg, sizeof msg, "secret file '%s' is readable by others (mode 0644); chmod 600 it",
             path);
    expect_err(hx_proto_secret_load_file(path, &sec, &err), &err, HX_EINVAL, msg);
    assert_int_equal(sec.len, 0);

    assert_int_equal(chmod(path, 0620), 0);
    expect_err(hx_proto_secret_load_file(path, &sec, &err), &err, HX_EINVAL,
               "is writable by others (mode 0620); chmod 600 it");
    assert_int_equal(chmod(path, 0640), 0);
    expect_err(hx_proto_secret_load_file(path, &sec, &err), &err, HX_EINVAL, "is readable by others");

    assert_int_equal(chmod(path, 0600), 0);
    check_ok(hx_proto_secret_load_file(path, &sec, &err), &err);
    assert_int_equal(sec.len, 32); /* the newline is not part of it */
    assert_memory_equal(sec.bytes, "00112233445566778899aabbccddeeff", 32);
    hx_proto_secret_release(&sec);
    assert_int_equal(sec.len, 0);
    assert_int_equal(chmod(path, 0400), 0);
    check_ok(hx_proto_secret_load_file(path, &sec, &err), &err);

    snprintf(path, sizeof path, "%s/missing", tmp_dir);
    snprintf(msg, sizeof msg, "cannot open secret file '%s': no such file", path);
    expect_err(hx_proto_secret_load_file(path, &sec, &err), &err, HX_ENOENT, msg);

    snprintf(path, sizeof path, "%s/short", tmp_dir);
    write_file_mode(path, "tooshort\n", 0600);
    expect_err(hx_proto_secret_load_file(path, &sec, &err), &err, HX_EINVAL,
               "holds 8 bytes of secret; at least 16 are needed");

    expect_err(hx_proto_secret_load_file(tmp_dir, &sec, &err), &err, HX_EINVAL,
               "is not a regular file");

    /* generated by the launcher, written 0600, read back */
    hx_proto_secret gen, back;
    check_ok(hx_proto_secret_generate(&gen, &err), &err);
    assert_int_equal(gen.len, 64);
    snprintf(path, sizeof path, "%s/generated", tmp_dir);
    check_ok(hx_proto_secret_write_file(path, &gen, &err), &err);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    check_ok(hx_proto_secret_load_file(path, &back, &err), &err);
    assert_int_equal(back.len, 64);
    assert_memory_equal(back.bytes, gen.bytes, 64);

    /* from a file descriptor (the launcher's pipe to stdin) */
    int p[2];
    assert_int_equal(pipe(p), 0);
    write_all(p[1], "  a secret with spaces inside \r\n", 32);
    close(p[1]);
    check_ok(hx_proto_secret_load_fd(p[0], hx_proto_deadline_in(2), &sec, &err), &err);
    assert_int_equal(sec.len, 29);
    assert_memory_equal(sec.bytes, "  a secret with spaces inside", 29);
    close(p[0]);
    assert_int_equal(pipe(p), 0); /* nobody writes and nobody closes: no hang */
    expect_err(hx_proto_secret_load_fd(p[0], hx_proto_deadline_in(0.2), &sec, &err), &err,
               HX_ETIMEDOUT, "timed out reading the secret from file descriptor");
    close(p[0]);
    close(p[1]);
}

/* ---- listeners, Unix sockets, connecting ------------------------------------------------ */

static void test_unix_socket(void **state)
{
    (void)state;
    char addr[400];
    hx_err err = {0};
    hx_proto_listener *l = NULL;
    hx_proto_conn *s, *c;
    hx_proto_frame f;
    snprintf(addr, sizeof addr, "unix:%s/w0.sock", tmp_dir);
    check_ok(hx_proto_listen(addr, 0, &l, &err), &err);
    assert_string_equal(hx_proto_listener_address(l), addr);

    connect_job j = {.host = addr, .secret = &secret_a};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, connect_thread, &j), 0);
    check_ok(hx_proto_accept(l, &secret_a, hx_proto_deadline_in(5), &s, &err), &err);
    pthread_join(t, NULL);
    check_ok(j.st, &j.err);
    c = j.conn;
    assert_string_equal(hx_proto_peer(c), addr);
    assert_string_equal(hx_proto_peer_role(s), "decode");
    assert_string_equal(hx_proto_peer(s), addr);
    check_ok(hx_proto_send_health(s, 3, hx_proto_deadline_in(2), &err), &err);
    check_ok(hx_proto_recv(c, &f, hx_proto_deadline_in(2), &err), &err);
    assert_int_equal(f.req_id, 3);

    /* a second listener on the same path is refused while the first is alive */
    hx_proto_listener *l2 = NULL;
    expect_err(hx_proto_listen(addr, 0, &l2, &err), &err, HX_EEXIST, "another process listens there");
    hx_proto_close(s);
    hx_proto_close(c);
    hx_proto_listener_free(l);
    assert_int_not_equal(access(addr + 5, F_OK), 0); /* removed */

    /* a socket file left behind by a dead process is replaced */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un su = {.sun_family = AF_UNIX};
    assert_true(strlen(addr + 5) < sizeof su.sun_path);
    memcpy(su.sun_path, addr + 5, strlen(addr + 5) + 1);
    assert_int_equal(bind(fd, (struct sockaddr *)&su, sizeof su), 0);
    close(fd);
    assert_int_equal(access(addr + 5, F_OK), 0);
    check_ok(hx_proto_listen(addr, 0, &l, &err), &err);
    hx_proto_listener_free(l);

    /* nobody there */
    expect_err(hx_proto_connect(addr, 0, &secret_a, "router", hx_proto_deadline_in(1), &c, &err),
               &err, HX_ECONN, "cannot connect to unix:");
    char lng[300];
    memset(lng, 'a', sizeof lng);
    memcpy(lng, "unix:/", 6);
    lng[299] = '\0';
    expect_err(hx_proto_listen(lng, 0, &l, &err), &err, HX_EINVAL, "is longer than 107 bytes");
}

static void test_tcp_connect_and_accept_errors(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_proto_listener *l = NULL;
    hx_proto_conn *c = NULL, *s = NULL;

    /* refused */
    check_ok(hx_proto_listen("127.0.0.1", 0, &l, &err), &err);
    int port = hx_proto_listener_port(l);
    hx_proto_listener_free(l);
    char msg[128];
    snprintf(msg, sizeof msg, "cannot connect to 127.0.0.1:%d: Connection refused", port);
    expect_err(hx_proto_connect("127.0.0.1", port, &secret_a, "router", hx_proto_deadline_in(2),
                                &c, &err),
               &err, HX_ECONN, msg);

    /* nobody comes */
    check_ok(hx_proto_listen("127.0.0.1", 0, &l, &err), &err);
    int64_t t0 = hx_proto_now_ns();
    expect_err(hx_proto_accept(l, &secret_a, hx_proto_deadline_in(0.2), &s, &err), &err,
               HX_ETIMEDOUT, "no connection on 127.0.0.1:");
    assert_true((double)(hx_proto_now_ns() - t0) * 1e-9 < 3.0);

    /* a client with the wrong secret over TCP; the listener keeps working after */
    connect_job j = {.host = "127.0.0.1", .port = hx_proto_listener_port(l), .secret = &secret_b};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, connect_thread, &j), 0);
    expect_err(hx_proto_accept(l, &secret_a, hx_proto_deadline_in(5), &s, &err), &err, HX_EINVAL,
               "(decode) failed authentication");
    pthread_join(t, NULL);
    expect_err(j.st, &j.err, HX_EINVAL, "server 127.0.0.1:");
    expect_err(j.st, &j.err, HX_EINVAL, "rejected our authentication");
    tcp_pair(l, "127.0.0.1", &s, &c);
    hx_proto_close(s);
    hx_proto_close(c);
    hx_proto_listener_free(l);

    /* IPv6 loopback, where the system has it */
    if (hx_proto_listen("::1", 0, &l, &err) == HX_OK) {
        tcp_pair(l, "::1", &s, &c);
        assert_non_null(strstr(hx_proto_peer(c), "[::1]:"));
        hx_proto_close(s);
        hx_proto_close(c);
        hx_proto_listener_free(l);
    } else {
        print_message("IPv6 loopback not available, skipped: %s\n", err.msg);
    }
    /* every interface, reached through 127.0.0.1 */
    check_ok(hx_proto_listen(NULL, 0, &l, &err), &err);
    tcp_pair(l, "127.0.0.1", &s, &c);
    assert_non_null(strstr(hx_proto_peer(s), "127.0.0.1:")); /* not ::ffff:127.0.0.1 */
    assert_null(strstr(hx_proto_peer(s), "ffff"));
    hx_proto_close(s);
    hx_proto_close(c);
    hx_proto_listener_free(l);

    expect_err(hx_proto_listen("127.0.0.1", 70000, &l, &err), &err, HX_EINVAL, "port 70000");
    expect_err(hx_proto_connect("127.0.0.1", 5000, &secret_a, "", hx_proto_deadline_in(1), &c,
                                &err),
               &err, HX_EINVAL, "invalid role ''");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshake_ok),
        cmocka_unit_test(test_handshake_wrong_secret),
        cmocka_unit_test(test_handshake_server_without_secret),
        cmocka_unit_test(test_handshake_bad_client_proof),
        cmocka_unit_test(test_handshake_garbage_and_silence),
        cmocka_unit_test(test_messages_round_trip),
        cmocka_unit_test(test_group_messages),
        cmocka_unit_test(test_group_setup),
        cmocka_unit_test(test_send_side_checks),
        cmocka_unit_test(test_kv_segment_64mib_tcp),
        cmocka_unit_test(test_bad_frames),
        cmocka_unit_test(test_stall_mid_frame_times_out),
        cmocka_unit_test(test_timeout_between_frames_keeps_connection),
        cmocka_unit_test(test_peer_stops_reading),
        cmocka_unit_test(test_dropped_connection),
        cmocka_unit_test(test_dropped_tcp_connection),
        cmocka_unit_test(test_tampering_and_replay),
        cmocka_unit_test(test_wire_format_matches_spec),
        cmocka_unit_test(test_decoders_reject_malformed),
        cmocka_unit_test(test_secret_files),
        cmocka_unit_test(test_unix_socket),
        cmocka_unit_test(test_tcp_connect_and_accept_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
