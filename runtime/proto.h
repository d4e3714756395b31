/*
 * proto.h - the wire protocol between the router and the workers, and between
 * workers: versioned frames over TCP or Unix domain sockets, every connection
 * authenticated with the deployment's secret and every frame integrity-checked.
 * docs/runtime-protocol.md is the specification; this header is its C API.
 *
 * A frame on the wire:
 *
 *   offset  size  field
 *        0     4  magic "HXF1"
 *        4     2  version (u16, HX_PROTO_VERSION)
 *        6     2  type (u16, hx_proto_type)
 *        8     4  flags (u32, none defined: must be 0)
 *       12     8  payload length in bytes (u64)
 *       20     8  request id (u64; 0 = not about a request)
 *       28     N  payload
 *     28+N    16  tag: AES-256-GMAC over header || payload, keyed per
 *                 connection and direction, nonce = frame sequence number
 *                 (absent on the four handshake frames)
 *
 * All integers are little-endian. Every connection starts with a handshake
 * in which both sides prove they hold the deployment secret (HMAC-SHA256
 * over both sides' random nonces and the client's role) and derive the
 * session keys; see hx_proto_accept and hx_proto_connect.
 *
 * Using it:
 *
 *     hx_proto_secret secret;
 *     hx_proto_secret_load_file("/run/hexflow/secret", &secret, &err);
 *
 *     // server                                  // client
 *     hx_proto_listen("0.0.0.0", 7000, &l, &err);
 *     hx_proto_accept(l, &secret,                hx_proto_connect("10.0.0.5", 7000, &secret,
 *         hx_proto_deadline_in(5), &c, &err);        "router", hx_proto_deadline_in(5), &c, &err);
 *
 *     hx_proto_send_hello(c, &hello, hx_proto_deadline_in(5), &err);
 *     hx_proto_frame f;
 *     hx_proto_recv(c, &f, hx_proto_deadline_in(5), &err);
 *     if (f.type == HX_PROTO_KV_SEGMENT) {
 *         hx_proto_kv_segment kv;
 *         hx_proto_decode_kv_segment(&f, &kv, &err);   // kv.data points into c's buffer
 *     }
 *
 * Errors (hx_err messages name the peer, the message type and the byte counts):
 *   HX_ECONN      the peer closed or reset the connection, or refused it
 *   HX_ETIMEDOUT  the deadline passed (a recv that times out before any byte
 *                 of the next frame leaves the connection usable; one that
 *                 times out in the middle of a frame does not)
 *   HX_EINVAL     authentication failed (wrong secret on one side), bad
 *                 arguments, or a secret file with unsafe permissions
 *   HX_EPARSE     bad magic, unknown type or flags, a frame whose tag does not
 *                 verify (altered, replayed, reordered), a malformed payload
 *   HX_ENOTSUP    the peer speaks another protocol version
 *   HX_ERANGE     a payload over the limit for its type (either direction)
 *   HX_ENOENT     a missing secret file; HX_EIO other I/O failures
 * After any error other than a between-frames timeout the connection is
 * broken: later calls in that direction return HX_ECONN and the caller
 * closes it.
 *
 * Deadlines are absolute CLOCK_MONOTONIC times in nanoseconds
 * (hx_proto_deadline_in). Every blocking call takes one. HX_PROTO_NO_DEADLINE
 * is for an idle wait whose end the caller does not bound (a worker waiting
 * for its next request); the handshake is always bounded, by the deadline or
 * HX_PROTO_HANDSHAKE_TIMEOUT_S, whichever comes first.
 *
 * Threads: a connection may be used by one sending thread and one receiving
 * thread at the same time; two threads must not send (or receive) at once.
 * A listener may be used by one accepting thread. Signals: sends use
 * MSG_NOSIGNAL, so a closed peer gives HX_ECONN, never SIGPIPE.
 *
 * Requires OpenSSL's libcrypto (HMAC-SHA256, AES-GCM, RAND_bytes).
 */
#ifndef HX_PROTO_H
#define HX_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

/* ---- constants ------------------------------------------------------------ */

#define HX_PROTO_VERSION 1
#define HX_PROTO_HEADER_BYTES 28
#define HX_PROTO_TAG_BYTES 16
#define HX_PROTO_NONCE_BYTES 32
#define HX_PROTO_PROOF_BYTES 32

/* Secrets: the key bytes of a secret file, trailing whitespace removed. */
#define HX_PROTO_SECRET_MIN_BYTES 16
#define HX_PROTO_SECRET_MAX_BYTES 1024

/* Lengths of strings carried in payloads (bytes, no NUL on the wire). */
#define HX_PROTO_ROLE_MAX 32           /* handshake role: [a-z0-9._:-], 1..32 */
#define HX_PROTO_NAME_MAX 64           /* group ids: printable ASCII, 0..64 */
#define HX_PROTO_SOFTWARE_VERSION_MAX 32
#define HX_PROTO_ERROR_MESSAGE_MAX 1023 /* UTF-8 text, fits an hx_err */
#define HX_PROTO_REASON_MAX 255         /* SHUTDOWN reason, UTF-8 text */
#define HX_PROTO_AUTH_FAIL_MAX 200      /* AUTH_FAIL reason, printable ASCII */

/* Payload sizes of the fixed-layout messages. */
#define HX_PROTO_KV_HEADER_BYTES 64
#define HX_PROTO_KV_ACK_BYTES 24
#define HX_PROTO_FIRST_TOKEN_BYTES 24
#define HX_PROTO_DONE_BYTES 16
#define HX_PROTO_PREFILL_FIXED_BYTES 32
#define HX_PROTO_TOKENS_FIXED_BYTES 16
#define HX_PROTO_HEALTH_COUNTERS 11     /* sent */
#define HX_PROTO_HEALTH_COUNTERS_MIN 10 /* what a reader needs; later ones it may not know */
#define HX_PROTO_HEALTH_MAX_COUNTERS 64

/* Default payload limits (bytes) of the variable-size messages. */
#define HX_PROTO_DEFAULT_MAX_KV_SEGMENT_BYTES ((uint64_t)1 << 30)   /* 1 GiB */
#define HX_PROTO_DEFAULT_MAX_PREFILL_BYTES ((uint64_t)16 << 20)     /* 16 MiB: ~4M tokens */
#define HX_PROTO_DEFAULT_MAX_TOKENS_BYTES ((uint64_t)1 << 20)       /* 1 MiB */

/* The handshake never takes longer than this, whatever the deadline. */
#define HX_PROTO_HANDSHAKE_TIMEOUT_S 10.0

#define HX_PROTO_NO_DEADLINE INT64_MAX

/* At most this many parts in one hx_proto_sendv. */
#define HX_PROTO_MAX_PARTS 8

/* ---- message types -------------------------------------------------------- */

typedef enum hx_proto_type {
    /* handshake only: sent before authentication, refused after it */
    HX_PROTO_AUTH_CHALLENGE = 1, /* server -> client: server nonce */
    HX_PROTO_AUTH_RESPONSE = 2,  /* client -> server: client nonce, proof, role */
    HX_PROTO_AUTH_OK = 3,        /* server -> client: server proof */
    HX_PROTO_AUTH_FAIL = 4,      /* server -> client: why, then the server closes */
    /* after authentication: every frame carries a tag */
    HX_PROTO_HELLO = 16,
    HX_PROTO_PREFILL_REQUEST = 17,
    HX_PROTO_FIRST_TOKEN = 18,
    HX_PROTO_KV_SEGMENT = 19,
    HX_PROTO_KV_ACK = 20,
    HX_PROTO_TOKENS = 21,
    HX_PROTO_DONE = 22,
    HX_PROTO_ERROR = 23,
    HX_PROTO_HEALTH = 24,
    HX_PROTO_HEALTH_OK = 25,
    HX_PROTO_SHUTDOWN = 26,
    /* inside a group (and router -> group leader for ADD_PREFILLED) */
    HX_PROTO_GROUP_OP = 27,    /* the group leader's scheduling decision, in order */
    HX_PROTO_TENSOR = 28,      /* fp32 rows: stage-to-stage activations, TP partial sums */
    HX_PROTO_STEP_TOKENS = 29, /* the tokens the last stage sampled in a step */
    HX_PROTO_GROUP_SETUP = 30  /* a group's start: backends agree, TP transport chosen */
} hx_proto_type;

#define HX_PROTO_TYPE_LIMIT 32 /* every type value is below this */

/* "KV_SEGMENT", "AUTH_CHALLENGE", ...; NULL for a value that is not a type. */
const char *hx_proto_type_name(int type);

/* ---- deadlines ------------------------------------------------------------ */

/* CLOCK_MONOTONIC now, in nanoseconds. */
int64_t hx_proto_now_ns(void);
/* now + seconds (saturating; a negative or NaN value gives now). */
int64_t hx_proto_deadline_in(double seconds);

/* ---- the deployment secret ------------------------------------------------ */

/* Caller-owned storage; wipe with hx_proto_secret_release. */
typedef struct hx_proto_secret {
    unsigned char bytes[HX_PROTO_SECRET_MAX_BYTES];
    size_t len; /* HX_PROTO_SECRET_MIN_BYTES .. HX_PROTO_SECRET_MAX_BYTES once loaded */
} hx_proto_secret;

/*
 * Reads the secret from `path` (borrowed). The file must be a regular file
 * owned by this user with no group or other permission bits:
 *   secret file 'x' is readable by others (mode 0644); chmod 600 it   HX_EINVAL
 *   cannot open secret file 'x': no such file                         HX_ENOENT
 * The key is the file's bytes less trailing spaces, tabs, CRs and LFs, at
 * least HX_PROTO_SECRET_MIN_BYTES and at most HX_PROTO_SECRET_MAX_BYTES.
 */
hx_status hx_proto_secret_load_file(const char *path, hx_proto_secret *out, hx_err *err);

/*
 * Reads the secret from `fd` (borrowed, not closed; e.g. 0 for stdin) until
 * end of file or `deadline_ns`. Same key rules; no permission check.
 */
hx_status hx_proto_secret_load_fd(int fd, int64_t deadline_ns, hx_proto_secret *out,
                                  hx_err *err);

/* Copies `len` bytes of `key` (borrowed), with the same length rules. */
hx_status hx_proto_secret_set(hx_proto_secret *out, const void *key, size_t len, hx_err *err);

/* A new secret: 32 random bytes written as 64 lowercase hex characters. */
hx_status hx_proto_secret_generate(hx_proto_secret *out, hx_err *err);

/*
 * Writes the secret and a newline to `path` with mode 0600, atomically (temp
 * file + fsync + rename). For the launcher, which hands the secret out.
 */
hx_status hx_proto_secret_write_file(const char *path, const hx_proto_secret *s, hx_err *err);

/* Wipes the key. NULL is a no-op. */
void hx_proto_secret_release(hx_proto_secret *s);

/* ---- listening and connecting --------------------------------------------- */

typedef struct hx_proto_listener hx_proto_listener; /* opaque */
typedef struct hx_proto_conn hx_proto_conn;         /* opaque */

/*
 * Listens on `host` (borrowed) and `port`:
 *   "0.0.0.0", "10.0.0.5", "::", "::1", "localhost", a host name; NULL or ""
 *   is every interface (IPv6 and IPv4 where the system allows, else IPv4);
 *   "unix:/path" is a Unix domain socket (port ignored; a stale socket file
 *   nobody listens on is replaced; the file is removed by listener_free).
 * Port 0 picks a free port (hx_proto_listener_port says which). The socket is
 * non-blocking, close-on-exec, with SO_REUSEADDR. *out is the caller's, freed
 * with hx_proto_listener_free.
 */
hx_status hx_proto_listen(const char *host, int port, hx_proto_listener **out, hx_err *err);

int hx_proto_listener_port(const hx_proto_listener *l);           /* 0 for unix */
const char *hx_proto_listener_address(const hx_proto_listener *l); /* "[::]:7000"; borrowed */
int hx_proto_listener_fd(const hx_proto_listener *l);              /* for poll(); borrowed */
void hx_proto_listener_free(hx_proto_listener *l);                 /* NULL is a no-op */

/*
 * Waits until `deadline_ns` for one connection and runs the server side of
 * the handshake with `secret` (borrowed; only read during the call). The
 * handshake itself is also bounded by HX_PROTO_HANDSHAKE_TIMEOUT_S, so a
 * silent client cannot hold the caller. On success *out is a new connection
 * the caller closes with hx_proto_close. On failure the accepted socket is
 * closed, the listener stays usable, and `err` names the client:
 *   client 127.0.0.1:40312 (role 'decode') failed authentication: its proof
 *   does not match this deployment's secret                         HX_EINVAL
 */
hx_status hx_proto_accept(hx_proto_listener *l, const hx_proto_secret *secret,
                          int64_t deadline_ns, hx_proto_conn **out, hx_err *err);

/*
 * Connects to `host`:`port` (host as for hx_proto_listen; every address it
 * resolves to is tried in order) and runs the client side of the handshake,
 * announcing `role` (borrowed; 1..HX_PROTO_ROLE_MAX of [a-z0-9._:-], e.g.
 * "router", "prefill", "decode"). Name resolution (getaddrinfo) is not
 * bounded by the deadline; numeric addresses never wait. *out as above.
 *   cannot connect to 10.0.0.5:7000: connection refused            HX_ECONN
 *   server 10.0.0.5:7000 rejected our authentication: wrong deployment
 *   secret (the secret files differ)                                HX_EINVAL
 */
hx_status hx_proto_connect(const char *host, int port, const hx_proto_secret *secret,
                           const char *role, int64_t deadline_ns, hx_proto_conn **out,
                           hx_err *err);

/*
 * Runs one side of the handshake over an already connected stream socket
 * `fd` (a socketpair, an inherited descriptor). Takes ownership of `fd`: it
 * is closed on failure and by hx_proto_close. `is_server` picks the side;
 * `role` is required of the client and ignored for the server; `peer_name`
 * (borrowed, may be NULL) names the peer in messages.
 */
hx_status hx_proto_handshake_fd(int fd, int is_server, const char *peer_name,
                                const hx_proto_secret *secret, const char *role,
                                int64_t deadline_ns, hx_proto_conn **out, hx_err *err);

/* Closes the socket and frees the connection and its buffers. NULL is a no-op. */
void hx_proto_close(hx_proto_conn *c);

/* "10.0.0.5:7000", "[::1]:7000", "unix:/run/x.sock"; borrowed from c. */
const char *hx_proto_peer(const hx_proto_conn *c);
/* The role the client announced in the handshake (on both sides); borrowed from c. */
const char *hx_proto_peer_role(const hx_proto_conn *c);

/*
 * The socket, for poll() in an event loop. Bytes may already wait in the
 * connection's receive buffer: when hx_proto_pending(c) is non-zero, call
 * hx_proto_recv before polling again.
 */
int hx_proto_fd(const hx_proto_conn *c);
/*
 * Bytes received and not yet returned as frames. A caller that polls
 * hx_proto_fd before hx_proto_recv must first check this: a frame may sit
 * here already while the socket has nothing more to read.
 */
size_t hx_proto_buffered(const hx_proto_conn *c);
/* Threads: one thread may send on a connection while another receives on it;
 * two senders (or two receivers) need the caller's lock. */
size_t hx_proto_pending(const hx_proto_conn *c);

/*
 * Payload limit (bytes) for frames of `type` this side receives and sends.
 * Defaults: KV_SEGMENT 1 GiB (HX_PROTO_DEFAULT_MAX_KV_SEGMENT_BYTES),
 * PREFILL_REQUEST 16 MiB, TOKENS 1 MiB, and the largest valid payload for
 * each other type. A frame over the limit is refused from its header, before
 * any allocation. HX_EINVAL for a handshake type or a value that is not a type.
 */
uint64_t hx_proto_default_max_payload(hx_proto_type type);
hx_status hx_proto_set_max_payload(hx_proto_conn *c, hx_proto_type type, uint64_t max_bytes);

/*
 * The receive buffer grows to the largest payload received and is reused
 * for every later frame (no allocation per message). hx_proto_trim frees it
 * when it is larger than `keep_bytes`.
 */
void hx_proto_trim(hx_proto_conn *c, size_t keep_bytes);

typedef struct hx_proto_stats {
    uint64_t frames_sent, frames_received;
    uint64_t bytes_sent, bytes_received; /* whole frames: header + payload + tag */
} hx_proto_stats;
void hx_proto_get_stats(const hx_proto_conn *c, hx_proto_stats *out);

/* ---- frames ----------------------------------------------------------------- */

typedef struct hx_proto_frame {
    hx_proto_type type;
    uint32_t flags;
    uint64_t req_id;
    /* Borrowed from the connection's receive buffer (64-byte aligned); valid
     * until the next hx_proto_recv, hx_proto_trim or hx_proto_close on it. */
    const unsigned char *payload;
    size_t len;
    /* The peer ("10.0.0.5:7000 (decode)") for messages; borrowed from the
     * connection, valid until hx_proto_close. May be NULL in a frame built by hand. */
    const char *peer;
} hx_proto_frame;

/* One piece of a payload; `data` borrowed for the call. */
typedef struct hx_proto_part {
    const void *data;
    size_t len;
} hx_proto_part;

/*
 * Sends one frame whose payload is `payload` (borrowed; may be NULL when len
 * is 0), or the concatenation of `parts` (at most HX_PROTO_MAX_PARTS). The
 * tag is computed while the payload streams out, so a large payload is read
 * once, in cache-sized windows, and never copied into a frame buffer.
 * Handshake types are refused (HX_EINVAL).
 */
hx_status hx_proto_send(hx_proto_conn *c, hx_proto_type type, uint64_t req_id,
                        const void *payload, size_t len, int64_t deadline_ns, hx_err *err);
hx_status hx_proto_sendv(hx_proto_conn *c, hx_proto_type type, uint64_t req_id,
                         const hx_proto_part *parts, size_t nparts, int64_t deadline_ns,
                         hx_err *err);

/*
 * Receives the next frame into *out, checking magic, version, type, flags,
 * the limit for its type and the tag before returning it. The payload stays
 * in the connection's buffer (see hx_proto_frame). The message structure is
 * not checked here: use the hx_proto_decode_* functions.
 */
hx_status hx_proto_recv(hx_proto_conn *c, hx_proto_frame *out, int64_t deadline_ns,
                        hx_err *err);

/* ---- messages --------------------------------------------------------------- */
/*
 * Each message has a plain value struct, a send function (the frame's request
 * id is `req_id`) and a decode function that checks the payload's size and
 * every field and never trusts it. Decoded pointers borrow the frame's
 * payload. Strings are NUL-terminated in the structs, length-prefixed (u16)
 * on the wire. Request-scoped messages (PREFILL_REQUEST, FIRST_TOKEN,
 * KV_SEGMENT, KV_ACK, TOKENS, DONE) need req_id != 0.
 */

typedef enum hx_proto_role {
    HX_PROTO_ROLE_ROUTER = 1,
    HX_PROTO_ROLE_PREFILL = 2,
    HX_PROTO_ROLE_DECODE = 3,
    HX_PROTO_ROLE_BOTH = 4, /* a colocated group */
    HX_PROTO_ROLE_LAUNCHER = 5
} hx_proto_role;
const char *hx_proto_role_name(hx_proto_role role); /* "router", ...; NULL when unknown */

/* HELLO: who is speaking. Sent first by the client, answered by the server. */
typedef struct hx_proto_hello {
    hx_proto_role role;
    uint16_t stage; /* pipeline stage within the group (0 for the router) */
    uint32_t rank;  /* tensor-parallel rank within the stage */
    char group_id[HX_PROTO_NAME_MAX + 1];        /* plan group id; "" for the router */
    char version[HX_PROTO_SOFTWARE_VERSION_MAX + 1]; /* software version, "0.1.0" */
} hx_proto_hello;
hx_status hx_proto_send_hello(hx_proto_conn *c, const hx_proto_hello *m, int64_t deadline_ns,
                              hx_err *err);
hx_status hx_proto_decode_hello(const hx_proto_frame *f, hx_proto_hello *out, hx_err *err);

/* PREFILL_REQUEST: a prompt to prefill; the frame's req_id is the request id. */
typedef struct hx_proto_prefill_request {
    uint32_t max_tokens;  /* tokens to generate, >= 1 */
    float temperature;    /* >= 0; 0 is greedy */
    float top_p;          /* (0, 1] */
    uint32_t top_k;       /* 0 = off */
    uint64_t seed;
    char decode_group[HX_PROTO_NAME_MAX + 1]; /* decode group to continue on; "" = none */
    uint32_t num_tokens;      /* >= 1 */
    const int32_t *token_ids; /* [num_tokens]; send: borrowed from the caller;
                                 decode: borrowed from the frame (4-byte aligned) */
} hx_proto_prefill_request;
hx_status hx_proto_send_prefill_request(hx_proto_conn *c, uint64_t req_id,
                                        const hx_proto_prefill_request *m, int64_t deadline_ns,
                                        hx_err *err);
hx_status hx_proto_decode_prefill_request(const hx_proto_frame *f, hx_proto_prefill_request *out,
                                          hx_err *err);

/* FIRST_TOKEN: prefill's output token. */
typedef struct hx_proto_first_token {
    int32_t token_id;
    uint32_t num_prompt_tokens;
    uint64_t prefill_ns; /* time the prefill took */
    uint64_t kv_bytes;   /* KV payload bytes the prefill group sent on (all its ranks; 0: none) */
} hx_proto_first_token;
hx_status hx_proto_send_first_token(hx_proto_conn *c, uint64_t req_id,
                                    const hx_proto_first_token *m, int64_t deadline_ns,
                                    hx_err *err);
hx_status hx_proto_decode_first_token(const hx_proto_frame *f, hx_proto_first_token *out,
                                      hx_err *err);

typedef enum hx_proto_dtype {
    HX_PROTO_DTYPE_F32 = 0,
    HX_PROTO_DTYPE_F16 = 1,
    HX_PROTO_DTYPE_BF16 = 2,
    HX_PROTO_DTYPE_F8_E4M3 = 3
} hx_proto_dtype;
const char *hx_proto_dtype_name(hx_proto_dtype d); /* "f32", ...; NULL when unknown */
size_t hx_proto_dtype_bytes(hx_proto_dtype d);     /* 4, 2, 2, 1; 0 when unknown */

/*
 * KV_SEGMENT: the KV cache of one request moving from one prefill rank to
 * one decode rank, as one contiguous segment: a 64-byte header, then
 * data_bytes = num_layers * 2 * num_kv_heads * num_tokens * head_dim *
 * dtype bytes, laid out (layout 0, the only one)
 *     data: [num_layers][2: K then V][num_kv_heads][num_tokens][head_dim]
 * for layers first_layer.., KV heads first_kv_head.., token positions
 * first_token... The data starts 64 bytes into the payload, so 64-byte
 * aligned in the receive buffer.
 */
typedef struct hx_proto_kv_segment {
    uint16_t src_stage, src_rank; /* sending (prefill) stage and TP rank */
    uint16_t dst_stage, dst_rank; /* receiving (decode) stage and TP rank */
    uint32_t segment_index;       /* 0 .. num_segments-1 */
    uint32_t num_segments;        /* segments the receiving rank gets for this request */
    uint32_t first_layer, num_layers;
    uint32_t first_kv_head, num_kv_heads;
    uint32_t first_token, num_tokens;
    uint32_t head_dim;
    hx_proto_dtype dtype;
    uint64_t data_bytes;
    const void *data; /* [data_bytes]; send: borrowed from the caller; decode:
                         borrowed from the frame; NULL when remote */
    uint32_t remote;  /* 1: the payload is not in the frame but follows over the
                         connection's NCCL link (the frame is the header alone) */
} hx_proto_kv_segment;
hx_status hx_proto_send_kv_segment(hx_proto_conn *c, uint64_t req_id,
                                   const hx_proto_kv_segment *m, int64_t deadline_ns,
                                   hx_err *err);
hx_status hx_proto_decode_kv_segment(const hx_proto_frame *f, hx_proto_kv_segment *out,
                                     hx_err *err);
/* The data_bytes the geometry of m implies; HX_ERANGE on overflow, HX_EINVAL for a zero
 * dimension or unknown dtype. */
hx_status hx_proto_kv_segment_bytes(const hx_proto_kv_segment *m, uint64_t *out, hx_err *err);

/* KV_ACK: the receiving rank has (or could not take) a segment. */
typedef struct hx_proto_kv_ack {
    uint16_t src_stage, src_rank, dst_stage, dst_rank; /* as in the segment */
    uint32_t segment_index;
    int32_t status;          /* HX_OK, or a negative hx_status */
    uint64_t bytes_received; /* data bytes taken */
} hx_proto_kv_ack;
hx_status hx_proto_send_kv_ack(hx_proto_conn *c, uint64_t req_id, const hx_proto_kv_ack *m,
                               int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_kv_ack(const hx_proto_frame *f, hx_proto_kv_ack *out, hx_err *err);

/* TOKENS: generated tokens, streamed. */
typedef struct hx_proto_tokens {
    uint64_t first_position;  /* index of token_ids[0] among the generated tokens */
    uint32_t num_tokens;      /* >= 1 */
    const int32_t *token_ids; /* [num_tokens]; borrowed as in prefill_request */
} hx_proto_tokens;
hx_status hx_proto_send_tokens(hx_proto_conn *c, uint64_t req_id, const hx_proto_tokens *m,
                               int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_tokens(const hx_proto_frame *f, hx_proto_tokens *out, hx_err *err);

typedef enum hx_proto_finish {
    HX_PROTO_FINISH_STOP = 0,      /* end-of-sequence or a stop token */
    HX_PROTO_FINISH_LENGTH = 1,    /* max_tokens reached */
    HX_PROTO_FINISH_CANCELLED = 2, /* the client went away */
    HX_PROTO_FINISH_ERROR = 3      /* an ERROR frame for the request went before */
} hx_proto_finish;

/* DONE: the request is finished; nothing more comes for its req_id. */
typedef struct hx_proto_done {
    hx_proto_finish finish;
    uint32_t num_generated_tokens;
    uint64_t elapsed_ns;
} hx_proto_done;
hx_status hx_proto_send_done(hx_proto_conn *c, uint64_t req_id, const hx_proto_done *m,
                             int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_done(const hx_proto_frame *f, hx_proto_done *out, hx_err *err);

/* ERROR: a failure; req_id 0 for one about the connection. */
typedef struct hx_proto_error {
    int32_t code; /* a negative hx_status */
    char message[HX_PROTO_ERROR_MESSAGE_MAX + 1];
} hx_proto_error;
/* `message` (borrowed) longer than HX_PROTO_ERROR_MESSAGE_MAX is cut at a UTF-8 boundary. */
hx_status hx_proto_send_error(hx_proto_conn *c, uint64_t req_id, hx_status code,
                              const char *message, int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_error(const hx_proto_frame *f, hx_proto_error *out, hx_err *err);

/* HEALTH (empty payload) is answered by HEALTH_OK with the same req_id. */
typedef struct hx_proto_health {
    uint64_t uptime_ns;
    uint64_t requests_active, requests_queued, requests_done, requests_failed;
    uint64_t tokens_generated;
    uint64_t kv_bytes_sent, kv_bytes_received;
    uint64_t kv_blocks_used, kv_blocks_total;
    uint64_t max_request_tokens; /* KV positions one request may take here (group leaders: in
                                    every rank's cache); 0 when the sender did not say */
} hx_proto_health;
hx_status hx_proto_send_health(hx_proto_conn *c, uint64_t req_id, int64_t deadline_ns,
                               hx_err *err);
hx_status hx_proto_send_health_ok(hx_proto_conn *c, uint64_t req_id, const hx_proto_health *m,
                                  int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_health_ok(const hx_proto_frame *f, hx_proto_health *out,
                                    hx_err *err);

#define HX_PROTO_SHUTDOWN_DRAIN 1u /* finish running requests first */
typedef struct hx_proto_shutdown {
    uint32_t flags; /* HX_PROTO_SHUTDOWN_* */
    char reason[HX_PROTO_REASON_MAX + 1];
} hx_proto_shutdown;
hx_status hx_proto_send_shutdown(hx_proto_conn *c, const hx_proto_shutdown *m,
                                 int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_shutdown(const hx_proto_frame *f, hx_proto_shutdown *out,
                                   hx_err *err);

/*
 * GROUP_OP: what every engine of a group applies, in the order the leader
 * sends them (runtime/batch.h lockstep). req_id is the request's (0 for STEP).
 *   ADD            a request to prefill (and decode, in a `both` group):
 *                  token_ids is the prompt; hold_kv 1 in a prefill group;
 *                  dst_group: the decode group (plan index) its KV goes to, -1 none.
 *   ADD_PREFILLED  a request whose KV comes from prefill group src_group
 *                  (plan index): n_prompt positions, first_token already
 *                  sampled. Also what the router sends a decode group's leader.
 *   REMOVE         drop a request (cancelled, or its KV sent on).
 *   STEP           run one engine step.
 *   STOP           leave the loop and exit.
 *   CHECK_KV       before ADD_PREFILLED: every rank answers whether the
 *                  request's KV segments from src_group reached it (waiting
 *                  up to 10 s), so the leader admits it everywhere or nowhere.
 */
typedef enum hx_proto_op {
    HX_PROTO_OP_ADD = 1,
    HX_PROTO_OP_ADD_PREFILLED = 2,
    HX_PROTO_OP_REMOVE = 3,
    HX_PROTO_OP_STEP = 4,
    HX_PROTO_OP_STOP = 5,
    HX_PROTO_OP_CHECK_KV = 6 /* does each rank hold request's KV from src_group? each answers
                                STEP_TOKENS {1} or {0} on its connection to the leader */
} hx_proto_op;
#define HX_PROTO_OP_LAST HX_PROTO_OP_CHECK_KV

#define HX_PROTO_GROUP_OP_FIXED_BYTES 48

typedef struct hx_proto_group_op {
    hx_proto_op op;
    uint32_t max_tokens;      /* tokens to generate in all, the first included */
    float temperature;
    float top_p;
    uint64_t seed;
    int32_t eos_id;           /* < 0: none */
    uint32_t hold_kv;
    int32_t first_token;      /* ADD_PREFILLED */
    uint32_t n_prompt;        /* ADD_PREFILLED: positions of KV */
    int32_t src_group;        /* ADD_PREFILLED: prefill group index */
    int32_t dst_group;        /* ADD: decode group index, -1 none */
    uint32_t num_tokens;      /* ADD: prompt length */
    const int32_t *token_ids; /* ADD: [num_tokens]; borrowed as in prefill_request */
} hx_proto_group_op;
hx_status hx_proto_send_group_op(hx_proto_conn *c, uint64_t req_id, const hx_proto_group_op *m,
                                 int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_group_op(const hx_proto_frame *f, hx_proto_group_op *out,
                                   hx_err *err);

/*
 * TENSOR: n fp32 values (little-endian); the receiver knows the shape from
 * the step it is in. STEP_TOKENS: n int32 token ids. Both with req_id 0.
 * hx_proto_recv_floats / recv_tokens receive one such frame into the
 * caller's buffer of exactly n values (HX_EPARSE for another size or type;
 * an ERROR frame from the peer gives its code and message).
 */
hx_status hx_proto_send_floats(hx_proto_conn *c, const float *x, size_t n, int64_t deadline_ns,
                               hx_err *err);
hx_status hx_proto_recv_floats(hx_proto_conn *c, float *x, size_t n, int64_t deadline_ns,
                               hx_err *err);
hx_status hx_proto_send_step_tokens(hx_proto_conn *c, const int *tokens, int n,
                                    int64_t deadline_ns, hx_err *err);
hx_status hx_proto_recv_step_tokens(hx_proto_conn *c, int *tokens, int n, int64_t deadline_ns,
                                    hx_err *err);

/*
 * GROUP_SETUP: once a group's workers are connected, before the first
 * GROUP_OP, they agree on how the group runs (req_id 0):
 *   OFFER    rank -> leader: its backend (hx_backend_kind), rows per step,
 *            requests at once, KV block size and KV positions in all, nccl 1
 *            when its engine can sum TP partial sums over NCCL, its GPU's
 *            identity (device_uuid, "" for cpu) and its host's as NCCL sees
 *            it (nccl_host: NCCL refuses two ranks with both the same).
 *   PLAN     leader -> rank: nccl 1 when the rank's stage is to try NCCL
 *            (every rank of it capable, on distinct GPUs, and the worker's
 *            --tp-transport allows it), 0 for TCP. An ERROR frame instead
 *            says why the group cannot run (mixed backends, say).
 *   NCCL_ID  stage rank 0 -> the stage's other ranks: the communicator's id.
 *   JOINED   rank -> leader: nccl 1 when it joined its stage's communicator.
 *   FINAL    leader -> rank: nccl 1 when every rank of its stage joined (it
 *            keeps NCCL), 0 when one failed (every rank of the stage leaves
 *            it and sums over TCP).
 * hx_proto_recv_group_setup takes one frame of the given phase: HX_EPARSE
 * for another type or phase; an ERROR frame gives its code and message.
 *
 * The same frames open a KV link (KV over NCCL) on a prefill rank's KV
 * connection to a decode rank, right after its HELLO: OFFER (prefill ->
 * decode), PLAN (nccl 1: the decode rank can join and is another GPU),
 * NCCL_ID, both join, JOINED (decode -> prefill), FINAL (nccl 1: the link
 * is kept; KV_SEGMENTs flagged remote then carry only their header, the
 * payload following over NCCL).
 */
typedef enum hx_proto_setup_phase {
    HX_PROTO_SETUP_OFFER = 1,
    HX_PROTO_SETUP_PLAN = 2,
    HX_PROTO_SETUP_NCCL_ID = 3,
    HX_PROTO_SETUP_JOINED = 4,
    HX_PROTO_SETUP_FINAL = 5
} hx_proto_setup_phase;

#define HX_PROTO_UUID_MAX 63
#define HX_PROTO_NCCL_ID_BYTES 128
#define HX_PROTO_GROUP_SETUP_BYTES (32 + HX_PROTO_UUID_MAX + 1 + HX_PROTO_NCCL_ID_BYTES)

typedef struct hx_proto_group_setup {
    hx_proto_setup_phase phase;
    uint32_t backend;   /* OFFER */
    uint32_t step_rows; /* OFFER */
    uint32_t nccl;      /* OFFER, PLAN, JOINED, FINAL: see above */
    uint32_t max_seqs;     /* OFFER */
    uint32_t block_tokens; /* OFFER */
    uint32_t kv_tokens;    /* OFFER */
    uint32_t nccl_host;    /* OFFER: hash of the host as NCCL tells hosts apart */
    char device_uuid[HX_PROTO_UUID_MAX + 1];  /* OFFER */
    uint8_t nccl_id[HX_PROTO_NCCL_ID_BYTES];  /* NCCL_ID */
} hx_proto_group_setup;
hx_status hx_proto_send_group_setup(hx_proto_conn *c, const hx_proto_group_setup *m,
                                    int64_t deadline_ns, hx_err *err);
hx_status hx_proto_recv_group_setup(hx_proto_conn *c, hx_proto_setup_phase phase,
                                    hx_proto_group_setup *out, int64_t deadline_ns, hx_err *err);
hx_status hx_proto_decode_group_setup(const hx_proto_frame *f, hx_proto_group_setup *out,
                                      hx_err *err);

#endif /* HX_PROTO_H */
