/*
 * ssh.c - the SSH hx_host back end over libssh2.
 *
 * The session is non-blocking throughout: every libssh2 call that returns
 * LIBSSH2_ERROR_EAGAIN is repeated (with the same arguments, as libssh2
 * requires) after poll(2) on the socket in the directions libssh2 reports,
 * and never past the deadline of the step: connect_timeout_s for resolution,
 * TCP connect, handshake and authentication together; the command's timeout
 * (plus a grace for the host's own `timeout`) or the push stall timeout for
 * commands. Names are resolved with getaddrinfo_a under the same deadline.
 *
 * Commands run as `exec [timeout -s KILL T] /bin/sh -c 'COMMAND'` so that the
 * host itself kills the command's process group when its time is up.
 *
 * libssh2_init / libssh2_exit are reference counted over the open sessions.
 */
#define _GNU_SOURCE /* getaddrinfo_a, SOCK_CLOEXEC, TCP_USER_TIMEOUT */
#include "launcher/host_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <libssh2.h>
#include <openssl/evp.h>

#define SSH_DEFAULT_CONNECT_TIMEOUT_S 10.0
/* How long after a command's timeout we wait for the host's `timeout` to
 * report the kill before giving up on the connection. */
#define SSH_KILL_GRACE_S 5.0
/* Bound on closing a channel after a failure. */
#define SSH_CLOSE_S 2.0
#define SSH_FOREVER 1e300

typedef struct ssh_host {
    int sock;
    LIBSSH2_SESSION *session;
    int lib_ref; /* holds a libssh2_init reference */
    int broken;  /* the connection is unusable: every call fails with HX_ECONN */
    char *user;
} ssh_host;

/* ---- libssh2_init / libssh2_exit ------------------------------------------ */

static pthread_mutex_t lib_lock = PTHREAD_MUTEX_INITIALIZER;
static int lib_users;

static int lib_acquire(void)
{
    int rc = 0;
    pthread_mutex_lock(&lib_lock);
    if (lib_users == 0)
        rc = libssh2_init(0);
    if (rc == 0)
        lib_users++;
    pthread_mutex_unlock(&lib_lock);
    return rc;
}

static void lib_release(void)
{
    pthread_mutex_lock(&lib_lock);
    if (lib_users > 0 && --lib_users == 0)
        libssh2_exit();
    pthread_mutex_unlock(&lib_lock);
}

/* Serializes appends to known_hosts files within this process. */
static pthread_mutex_t known_hosts_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- helpers ---------------------------------------------------------------- */

static const char *ssh_errmsg(LIBSSH2_SESSION *s)
{
    char *msg = NULL;
    int len = 0;
    if (!s)
        return "unknown error";
    libssh2_session_last_error(s, &msg, &len, 0);
    return msg && msg[0] ? msg : "unknown error";
}

static int is_socket_error(int rc)
{
    return rc == LIBSSH2_ERROR_SOCKET_SEND || rc == LIBSSH2_ERROR_SOCKET_RECV ||
           rc == LIBSSH2_ERROR_SOCKET_DISCONNECT || rc == LIBSSH2_ERROR_BANNER_RECV ||
           rc == LIBSSH2_ERROR_SOCKET_TIMEOUT || rc == LIBSSH2_ERROR_SOCKET_NONE;
}

/*
 * Waits until the socket is ready in the directions libssh2 is blocked on, or
 * the deadline. HX_ETIMEDOUT once the deadline has passed.
 */
static hx_status ssh_wait(ssh_host *s, double deadline)
{
    double left = deadline - hx_host_now();
    if (left <= 0)
        return HX_ETIMEDOUT;
    int dir = libssh2_session_block_directions(s->session);
    struct pollfd p = {.fd = s->sock, .events = 0};
    if (dir & LIBSSH2_SESSION_BLOCK_INBOUND)
        p.events |= POLLIN;
    if (dir & LIBSSH2_SESSION_BLOCK_OUTBOUND)
        p.events |= POLLOUT;
    if (!p.events) {
        p.events = POLLIN;
        if (left > 0.05)
            left = 0.05;
    }
    if (left > 1.0)
        left = 1.0; /* callers re-check their own deadlines */
    int ms = (int)(left * 1000.0) + 1;
    while (poll(&p, 1, ms) < 0 && errno == EINTR) {
    }
    return HX_OK;
}

/* Repeats `call` while it returns EAGAIN, waiting on the socket, until deadline. */
#define SSH_RETRY(s, deadline, rc, call)                                                     \
    do {                                                                                     \
        (rc) = (call);                                                                       \
        if ((rc) != LIBSSH2_ERROR_EAGAIN)                                                    \
            break;                                                                           \
        if (ssh_wait((s), (deadline)) != HX_OK)                                              \
            break;                                                                           \
    } while (1)

static char *current_user(void)
{
    struct passwd pw, *res = NULL;
    char buf[4096];
    if (getpwuid_r(geteuid(), &pw, buf, sizeof buf, &res) == 0 && res)
        return strdup(pw.pw_name);
    const char *u = getenv("USER");
    return strdup(u ? u : "root");
}

/* ~/NAME into a new string ($HOME, else the password database). */
static char *home_path(const char *name)
{
    const char *home = getenv("HOME");
    struct passwd pw, *res = NULL;
    char buf[4096];
    if ((!home || !home[0]) && getpwuid_r(geteuid(), &pw, buf, sizeof buf, &res) == 0 && res)
        home = pw.pw_dir;
    if (!home)
        home = "/";
    size_t n = strlen(home) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", home, name);
    return p;
}

/* ---- resolving and connecting ----------------------------------------------- */

typedef struct resolve_req {
    struct gaicb cb;
    struct addrinfo hints;
    char service[16];
    char name[]; /* the host name */
} resolve_req;

/* Resolves under the deadline. HX_ECONN / HX_ETIMEDOUT with err set. */
static hx_status resolve(const char *name, const char *address, int port, double deadline,
                         double timeout_s, struct addrinfo **out, hx_err *err)
{
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    int rc = getaddrinfo(address, service, &hints, out);
    if (rc == 0)
        return HX_OK;

    /* a name: resolve it asynchronously so that the deadline holds */
    size_t n = strlen(address) + 1;
    resolve_req *r = calloc(1, sizeof *r + n);
    if (!r)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    memcpy(r->name, address, n);
    memcpy(r->service, service, sizeof service);
    r->hints = (struct addrinfo){.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                                 .ai_flags = AI_ADDRCONFIG | AI_NUMERICSERV};
    r->cb.ar_name = r->name;
    r->cb.ar_service = r->service;
    r->cb.ar_request = &r->hints;
    struct gaicb *list[1] = {&r->cb};
    rc = getaddrinfo_a(GAI_NOWAIT, list, 1, NULL);
    if (rc != 0) {
        free(r);
        return hx_err_set(err, HX_ECONN, "cannot resolve host '%s' (%s): %s", name, address,
                          gai_strerror(rc));
    }
    for (;;) {
        rc = gai_error(&r->cb);
        if (rc != EAI_INPROGRESS)
            break;
        double left = deadline - hx_host_now();
        if (left <= 0) {
            if (gai_cancel(&r->cb) == EAI_CANCELED || gai_error(&r->cb) != EAI_INPROGRESS) {
                if (gai_error(&r->cb) == 0 && r->cb.ar_result)
                    freeaddrinfo(r->cb.ar_result);
                free(r);
            }
            /* else the resolver thread still owns r: leave it (a small leak) */
            return hx_err_set(err, HX_ETIMEDOUT,
                              "cannot resolve host '%s' (%s): timed out after %.1f s", name,
                              address, timeout_s);
        }
        struct timespec ts = {.tv_sec = (time_t)left,
                              .tv_nsec = (long)((left - (double)(time_t)left) * 1e9)};
        const struct gaicb *wait_list[1] = {&r->cb};
        gai_suspend(wait_list, 1, &ts);
    }
    if (rc != 0) {
        free(r);
        return hx_err_set(err, HX_ECONN, "cannot resolve host '%s' (%s): %s", name, address,
                          rc == EAI_SYSTEM ? hx_errno_text(errno) : gai_strerror(rc));
    }
    *out = r->cb.ar_result;
    free(r);
    return HX_OK;
}

static const char *connect_errno_text(int e)
{
    switch (e) {
    case ECONNREFUSED: return "connection refused";
    case EHOSTUNREACH: return "no route to host";
    case ENETUNREACH: return "network is unreachable";
    case ETIMEDOUT: return "connection timed out";
    case ECONNRESET: return "connection reset by peer";
    default: return hx_errno_text(e);
    }
}

static void tune_socket(int fd)
{
    int one = 1, idle = 15, intvl = 5, cnt = 3;
    unsigned int user_timeout_ms = 30000;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
#ifdef TCP_USER_TIMEOUT
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);
#endif
}

/* TCP connect to the first address that answers. Sets s->sock. */
static hx_status tcp_connect(ssh_host *s, const hx_host *h, const char *address, int port,
                             double deadline, double timeout_s, hx_err *err)
{
    struct addrinfo *ai = NULL;
    hx_status st = resolve(h->name, address, port, deadline, timeout_s, &ai, err);
    if (st != HX_OK)
        return st;
    int last_errno = 0, timed_out = 0;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        a->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        tune_socket(fd);
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            s->sock = fd;
            break;
        }
        if (errno != EINPROGRESS) {
            last_errno = errno;
            close(fd);
            continue;
        }
        for (;;) {
            double left = deadline - hx_host_now();
            if (left <= 0) {
                timed_out = 1;
                break;
            }
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int r = poll(&p, 1, (int)(left * 1000.0) + 1);
            if (r < 0 && errno == EINTR)
                continue;
            if (r > 0) {
                int e = 0;
                socklen_t len = sizeof e;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len);
                if (e == 0)
                    s->sock = fd;
                else
                    last_errno = e;
                break;
            }
        }
        if (s->sock >= 0)
            break;
        close(fd);
        if (timed_out)
            break;
    }
    freeaddrinfo(ai);
    if (s->sock >= 0)
        return HX_OK;
    if (timed_out)
        return hx_err_set(err, HX_ETIMEDOUT,
                          "cannot connect to host '%s' (%s): connection timed out after %.1f s",
                          h->name, h->where, timeout_s);
    return hx_err_set(err, HX_ECONN, "cannot connect to host '%s' (%s): %s", h->name, h->where,
                      connect_errno_text(last_errno));
}

/* ---- host keys -------------------------------------------------------------- */

typedef struct key_type {
    int hostkey_type;  /* LIBSSH2_HOSTKEY_TYPE_* */
    int knownhost_key; /* LIBSSH2_KNOWNHOST_KEY_* */
    const char *label; /* as ssh-keygen -l prints it */
    const char *algs;  /* host key algorithm names of this key type, best first */
} key_type;

static const key_type key_types[] = {
    {LIBSSH2_HOSTKEY_TYPE_ED25519, LIBSSH2_KNOWNHOST_KEY_ED25519, "ED25519", "ssh-ed25519"},
    {LIBSSH2_HOSTKEY_TYPE_ECDSA_256, LIBSSH2_KNOWNHOST_KEY_ECDSA_256, "ECDSA",
     "ecdsa-sha2-nistp256"},
    {LIBSSH2_HOSTKEY_TYPE_ECDSA_384, LIBSSH2_KNOWNHOST_KEY_ECDSA_384, "ECDSA",
     "ecdsa-sha2-nistp384"},
    {LIBSSH2_HOSTKEY_TYPE_ECDSA_521, LIBSSH2_KNOWNHOST_KEY_ECDSA_521, "ECDSA",
     "ecdsa-sha2-nistp521"},
    {LIBSSH2_HOSTKEY_TYPE_RSA, LIBSSH2_KNOWNHOST_KEY_SSHRSA, "RSA",
     "rsa-sha2-512,rsa-sha2-256,ssh-rsa"},
    {LIBSSH2_HOSTKEY_TYPE_DSS, LIBSSH2_KNOWNHOST_KEY_SSHDSS, "DSA", "ssh-dss"},
};
#define N_KEY_TYPES (sizeof key_types / sizeof key_types[0])

/*
 * Loads known_hosts line by line (libssh2's readfile gives up on the first
 * line it does not understand, e.g. a security-key type). A missing file is
 * empty. HX_EIO when the file exists but cannot be read.
 */
static hx_status load_known_hosts(LIBSSH2_KNOWNHOSTS *kh, const char *path, hx_err *err)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        if (errno == ENOENT)
            return HX_OK;
        return hx_err_set(err, HX_EIO, "cannot read known hosts file '%s': %s", path,
                          hx_errno_text(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        const char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '#' || *p == '\n' || *p == '\0')
            continue;
        libssh2_knownhost_readline(kh, line, (size_t)n, LIBSSH2_KNOWNHOST_FILE_OPENSSH);
    }
    free(line);
    fclose(f);
    return HX_OK;
}

/* Bit set of the key_types[] recorded for address:port (whatever the key). */
static unsigned known_key_types(LIBSSH2_KNOWNHOSTS *kh, const char *address, int port)
{
    unsigned mask = 0;
    for (size_t i = 0; i < N_KEY_TYPES; i++) {
        int rc = libssh2_knownhost_checkp(kh, address, port, "\0", 1,
                                          LIBSSH2_KNOWNHOST_TYPE_PLAIN |
                                              LIBSSH2_KNOWNHOST_KEYENC_RAW |
                                              key_types[i].knownhost_key,
                                          NULL);
        if (rc == LIBSSH2_KNOWNHOST_CHECK_MISMATCH || rc == LIBSSH2_KNOWNHOST_CHECK_MATCH)
            mask |= 1u << i;
    }
    return mask;
}

static int alg_supported(const char **algs, int n, const char *name, size_t len)
{
    for (int i = 0; i < n; i++)
        if (strlen(algs[i]) == len && !strncmp(algs[i], name, len))
            return 1;
    return 0;
}

static int pref_has(const char *pref, const char *name, size_t len)
{
    const char *p = pref;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == len && !strncmp(p, name, len))
            return 1;
        if (!e)
            break;
        p = e + 1;
    }
    return 0;
}

static void pref_add(char *pref, size_t cap, const char *name, size_t len)
{
    size_t n = strlen(pref);
    if (pref_has(pref, name, len) || n + len + 2 > cap)
        return;
    if (n)
        pref[n++] = ',';
    memcpy(pref + n, name, len);
    pref[n + len] = '\0';
}

/*
 * Like OpenSSH: when known_hosts has keys of some types for this host, ask
 * for those host key algorithms first, so that a host with several keys shows
 * the one we know.
 */
static void prefer_known_hostkeys(LIBSSH2_SESSION *sess, unsigned known)
{
    if (!known)
        return;
    const char **algs = NULL;
    int n = libssh2_session_supported_algs(sess, LIBSSH2_METHOD_HOSTKEY, &algs);
    if (n <= 0)
        return;
    char pref[1024] = "";
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < N_KEY_TYPES; i++) {
            if (pass == 0 && !(known & (1u << i)))
                continue;
            const char *p = key_types[i].algs;
            while (*p) {
                const char *e = strchr(p, ',');
                size_t l = e ? (size_t)(e - p) : strlen(p);
                if (alg_supported(algs, n, p, l))
                    pref_add(pref, sizeof pref, p, l);
                p = e ? e + 1 : p + l;
            }
        }
    }
    for (int i = 0; i < n; i++)
        pref_add(pref, sizeof pref, algs[i], strlen(algs[i]));
    libssh2_free(sess, (void *)algs);
    if (pref[0])
        libssh2_session_method_pref(sess, LIBSSH2_METHOD_HOSTKEY, pref);
}

/* "SHA256:base64" of a host key, as ssh-keygen -l prints it. */
static void fingerprint(const unsigned char *key, size_t len, char *out, size_t size)
{
    unsigned char md[32];
    unsigned char b64[64];
    unsigned int md_len = 0;
    EVP_Digest(key, len, md, &md_len, EVP_sha256(), NULL);
    int n = EVP_EncodeBlock(b64, md, (int)md_len);
    while (n > 0 && b64[n - 1] == '=')
        n--;
    b64[n] = '\0';
    snprintf(out, size, "SHA256:%s", (const char *)b64);
}

/* Appends a key for address:port to known_hosts (creating it, 0600). */
static hx_status add_known_host(LIBSSH2_KNOWNHOSTS *kh, const hx_host *h, const char *path,
                                const char *address, int port, const char *key, size_t key_len,
                                int knownhost_key, hx_err *err)
{
    char host[512], line[16384];
    size_t line_len = 0;
    struct libssh2_knownhost *entry = NULL;
    hx_status st = HX_OK;
    if (port == 22)
        snprintf(host, sizeof host, "%s", address);
    else
        snprintf(host, sizeof host, "[%s]:%d", address, port);
    if (libssh2_knownhost_addc(kh, host, NULL, key, key_len, NULL, 0,
                               LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_RAW |
                                   knownhost_key,
                               &entry) != 0 ||
        libssh2_knownhost_writeline(kh, entry, line, sizeof line, &line_len,
                                    LIBSSH2_KNOWNHOST_FILE_OPENSSH) != 0)
        return hx_err_set(err, HX_EIO, "cannot record the host key of '%s' (%s): libssh2 failed",
                          h->name, h->where);

    pthread_mutex_lock(&known_hosts_lock);
    /* create ~/.ssh (or the file's directory) when missing */
    char *dir = strdup(path);
    if (dir) {
        char *slash = strrchr(dir, '/');
        if (slash && slash != dir) {
            *slash = '\0';
            if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
                /* fall through: open reports the problem */
            }
        }
        free(dir);
    }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        st = hx_err_set(err, HX_EIO, "cannot add the host key of '%s' (%s) to '%s': %s", h->name,
                        h->where, path, hx_errno_text(errno));
        goto out;
    }
    /* start on a new line when the file does not end with one */
    struct stat sb;
    if (fstat(fd, &sb) == 0 && sb.st_size > 0) {
        char last = '\n';
        int rfd = open(path, O_RDONLY | O_CLOEXEC);
        if (rfd >= 0) {
            if (pread(rfd, &last, 1, sb.st_size - 1) != 1)
                last = '\n';
            close(rfd);
        }
        if (last != '\n' && write(fd, "\n", 1) != 1) {
            /* reported by the next write */
        }
    }
    if (write(fd, line, line_len) != (ssize_t)line_len) {
        st = hx_err_set(err, HX_EIO, "cannot add the host key of '%s' (%s) to '%s': %s", h->name,
                        h->where, path, hx_errno_text(errno));
    }
    close(fd);
out:
    pthread_mutex_unlock(&known_hosts_lock);
    return st;
}

/* Checks the server's host key against known_hosts; adds an unknown one when allowed. */
static hx_status check_host_key(ssh_host *s, const hx_host *h, const hx_host_ssh_options *o,
                                LIBSSH2_KNOWNHOSTS *kh, const char *kh_path, unsigned known,
                                int port, hx_err *err)
{
    size_t key_len = 0;
    int type = 0;
    const char *key = libssh2_session_hostkey(s->session, &key_len, &type);
    if (!key)
        return hx_err_set(err, HX_EIO, "host '%s' (%s) sent no host key: %s", h->name, h->where,
                          ssh_errmsg(s->session));
    const key_type *kt = NULL;
    for (size_t i = 0; i < N_KEY_TYPES; i++)
        if (key_types[i].hostkey_type == type)
            kt = &key_types[i];
    if (!kt)
        return hx_err_set(err, HX_ENOTSUP, "host '%s' (%s) uses a host key type this build "
                          "cannot check", h->name, h->where);
    char fp[128];
    fingerprint((const unsigned char *)key, key_len, fp, sizeof fp);

    int rc = libssh2_knownhost_checkp(kh, o->address, port, key, key_len,
                                      LIBSSH2_KNOWNHOST_TYPE_PLAIN |
                                          LIBSSH2_KNOWNHOST_KEYENC_RAW | kt->knownhost_key,
                                      NULL);
    if (rc == LIBSSH2_KNOWNHOST_CHECK_MATCH)
        return HX_OK;
    if (rc == LIBSSH2_KNOWNHOST_CHECK_MISMATCH || (rc == LIBSSH2_KNOWNHOST_CHECK_NOTFOUND && known)) {
        char spec[300];
        if (port == 22)
            snprintf(spec, sizeof spec, "%s", o->address);
        else
            snprintf(spec, sizeof spec, "'[%s]:%d'", o->address, port);
        return hx_err_set(
            err, HX_EEXIST,
            "WARNING: HOST KEY OF '%s' (%s) HAS CHANGED: it offered %s key %s, which does not "
            "match the key recorded in '%s'. Someone could be intercepting the connection "
            "(man-in-the-middle), or the host was reinstalled. Refusing to connect, even with "
            "--accept-new-host-keys; if the change is expected, remove the old key with "
            "`ssh-keygen -R %s -f %s` and connect again",
            h->name, h->where, kt->label, fp, kh_path, spec, kh_path);
    }
    if (rc != LIBSSH2_KNOWNHOST_CHECK_NOTFOUND)
        return hx_err_set(err, HX_EIO, "cannot check the host key of '%s' (%s): %s", h->name,
                          h->where, ssh_errmsg(s->session));
    if (!o->accept_new_host_keys)
        return hx_err_set(err, HX_ENOENT,
                          "host key of '%s' (%s) is unknown: %s key fingerprint is %s, not in "
                          "'%s'; check the fingerprint and rerun with --accept-new-host-keys to "
                          "add it",
                          h->name, h->where, kt->label, fp, kh_path);
    return add_known_host(kh, h, kh_path, o->address, port, key, key_len, kt->knownhost_key,
                          err);
}

/* ---- authentication --------------------------------------------------------- */

static void tried_add(char *tried, size_t cap, const char *what)
{
    size_t n = strlen(tried);
    snprintf(tried + n, cap - n, "%s%s", n ? ", " : "", what);
}

/* One public key file. 1 authenticated, 0 refused, < 0 error (err set). */
static int auth_file(ssh_host *s, const hx_host *h, const char *path, double deadline,
                     int explicit_file, hx_err *err)
{
    int rc;
    SSH_RETRY(s, deadline, rc,
              libssh2_userauth_publickey_fromfile_ex(s->session, s->user,
                                                     (unsigned)strlen(s->user), NULL, path, NULL));
    if (rc == 0)
        return 1;
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return hx_err_set(err, HX_ETIMEDOUT, "authentication with host '%s' (%s) timed out",
                          h->name, h->where);
    if (is_socket_error(rc))
        return hx_err_set(err, HX_ECONN, "host '%s' (%s) closed the connection during "
                          "authentication: %s", h->name, h->where, ssh_errmsg(s->session));
    if (rc == LIBSSH2_ERROR_FILE && explicit_file)
        return hx_err_set(err, HX_EINVAL, "cannot use identity file '%s': %s (keys with a "
                          "passphrase must be loaded into ssh-agent)", path,
                          ssh_errmsg(s->session));
    return 0; /* refused (or an unusable default key file: try the next) */
}

static hx_status authenticate(ssh_host *s, const hx_host *h, const hx_host_ssh_options *o,
                              double deadline, double timeout_s, hx_err *err)
{
    char *methods = NULL;
    char tried[768] = "";
    int rc;
    for (;;) {
        methods = libssh2_userauth_list(s->session, s->user, (unsigned)strlen(s->user));
        if (methods || libssh2_userauth_authenticated(s->session))
            break;
        rc = libssh2_session_last_errno(s->session);
        if (rc != LIBSSH2_ERROR_EAGAIN)
            return hx_err_set(err, is_socket_error(rc) ? HX_ECONN : HX_EIO,
                              "SSH authentication with host '%s' (%s) failed: %s", h->name,
                              h->where, ssh_errmsg(s->session));
        if (ssh_wait(s, deadline) != HX_OK)
            return hx_err_set(err, HX_ETIMEDOUT,
                              "SSH authentication with host '%s' (%s) timed out after %.1f s",
                              h->name, h->where, timeout_s);
    }
    if (libssh2_userauth_authenticated(s->session))
        return HX_OK; /* "none" was accepted */
    char accepts[256];
    snprintf(accepts, sizeof accepts, "%s", methods);
    if (!strstr(accepts, "publickey"))
        return hx_err_set(err, HX_EINVAL,
                          "authentication refused by host '%s' (%s) for user '%s': it does not "
                          "accept public keys (it accepts: %s)",
                          h->name, h->where, s->user, accepts);

    if (o->identity_file) {
        if (access(o->identity_file, R_OK) != 0)
            return hx_err_set(err, errno == ENOENT ? HX_ENOENT : HX_EINVAL,
                              "cannot read identity file '%s': %s", o->identity_file,
                              hx_errno_text(errno));
        rc = auth_file(s, h, o->identity_file, deadline, 1, err);
        if (rc != 0)
            return rc > 0 ? HX_OK : (hx_status)rc;
        char what[600];
        snprintf(what, sizeof what, "'%s'", o->identity_file);
        tried_add(tried, sizeof tried, what);
    } else {
        const char *sock = getenv("SSH_AUTH_SOCK");
        if (sock && sock[0]) {
            LIBSSH2_AGENT *agent = libssh2_agent_init(s->session);
            int nkeys = 0, ok = 0;
            if (agent && libssh2_agent_connect(agent) == 0) {
                if (libssh2_agent_list_identities(agent) == 0) {
                    struct libssh2_agent_publickey *id = NULL, *prev = NULL;
                    while (!ok && libssh2_agent_get_identity(agent, &id, prev) == 0) {
                        nkeys++;
                        SSH_RETRY(s, deadline, rc, libssh2_agent_userauth(agent, s->user, id));
                        if (rc == 0)
                            ok = 1;
                        else if (rc == LIBSSH2_ERROR_EAGAIN || is_socket_error(rc))
                            break;
                        prev = id;
                    }
                }
                libssh2_agent_disconnect(agent);
                char what[96];
                snprintf(what, sizeof what, "the SSH agent (%d key%s)", nkeys,
                         nkeys == 1 ? "" : "s");
                tried_add(tried, sizeof tried, what);
            } else {
                tried_add(tried, sizeof tried, "the SSH agent (cannot connect to $SSH_AUTH_SOCK)");
            }
            if (agent)
                libssh2_agent_free(agent);
            if (ok)
                return HX_OK;
            if (hx_host_now() >= deadline)
                return hx_err_set(err, HX_ETIMEDOUT,
                                  "SSH authentication with host '%s' (%s) timed out after %.1f s",
                                  h->name, h->where, timeout_s);
        }
        static const char *const defaults[] = {".ssh/id_ed25519", ".ssh/id_ecdsa", ".ssh/id_rsa"};
        for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++) {
            char *path = home_path(defaults[i]);
            if (!path)
                return hx_err_set(err, HX_ENOMEM, "out of memory");
            if (access(path, R_OK) != 0) {
                free(path);
                continue;
            }
            rc = auth_file(s, h, path, deadline, 0, err);
            if (rc != 0) {
                free(path);
                return rc > 0 ? HX_OK : (hx_status)rc;
            }
            char what[600];
            snprintf(what, sizeof what, "'%s'", path);
            tried_add(tried, sizeof tried, what);
            free(path);
        }
    }
    return hx_err_set(err, HX_EINVAL,
                      "authentication refused by host '%s' (%s) for user '%s': tried publickey "
                      "with %s; the host accepts: %s",
                      h->name, h->where, s->user, tried[0] ? tried : "no keys (no identity file, "
                      "no SSH agent, no ~/.ssh/id_ed25519, id_ecdsa or id_rsa)", accepts);
}

/* ---- running commands ------------------------------------------------------- */

/* Frees a channel: close, wait for the host's close (bounded), free. 0 when done. */
static int channel_finish(ssh_host *s, LIBSSH2_CHANNEL *ch, double deadline)
{
    int rc;
    SSH_RETRY(s, deadline, rc, libssh2_channel_close(ch));
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return -1;
    if (rc == 0) {
        SSH_RETRY(s, deadline, rc, libssh2_channel_wait_closed(ch));
        if (rc == LIBSSH2_ERROR_EAGAIN)
            return -1;
    }
    SSH_RETRY(s, deadline, rc, libssh2_channel_free(ch));
    return rc == LIBSSH2_ERROR_EAGAIN ? -1 : 0;
}

/* Whether libssh2 holds a partly sent packet (its last send would block). */
static int outbound_pending(ssh_host *s)
{
    return (libssh2_session_block_directions(s->session) & LIBSSH2_SESSION_BLOCK_OUTBOUND) != 0;
}

static hx_status broken_err(const hx_host *h, hx_err *err)
{
    return hx_err_set(err, HX_ECONN, "the connection to host '%s' (%s) was lost earlier; "
                      "reconnect", h->name, h->where);
}

static hx_status ssh_exec(hx_host *h, hx_host_exec *x, hx_err *err)
{
    ssh_host *s = h->impl;
    hx_status st = HX_OK;
    LIBSSH2_CHANNEL *ch = NULL;
    char *quoted = NULL, *wrapped = NULL;
    char cmd[160], buf[32768];
    int rc, eof_sent = 0, timed_out = 0;
    enum { OWN_NONE, OWN_STDIN, OWN_STDOUT, OWN_STDERR } owner = OWN_NONE;

    x->exit_status = -1;
    if (s->broken)
        return broken_err(h, err);
    hx_host_cmd_abbrev(x->command, cmd, sizeof cmd);
    if (!(quoted = hx_host_shell_quote(x->command)) ||
        !(wrapped = malloc(strlen(quoted) + 96))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    if (x->timeout_s > 0)
        snprintf(wrapped, strlen(quoted) + 96, "exec timeout -s KILL %.3f /bin/sh -c %s",
                 x->timeout_s, quoted);
    else
        snprintf(wrapped, strlen(quoted) + 96, "exec /bin/sh -c %s", quoted);

    double start = hx_host_now(), last_progress = start, input_done_at = 0;
    double hard = x->timeout_s > 0 ? start + x->timeout_s + SSH_KILL_GRACE_S : SSH_FOREVER;

    /* open the channel and start the command (counted in the command's time) */
    double step = hard;
    if (x->stall_s > 0 && start + x->stall_s < step)
        step = start + x->stall_s;
    for (;;) {
        ch = libssh2_channel_open_session(s->session);
        if (ch)
            break;
        rc = libssh2_session_last_errno(s->session);
        if (rc != LIBSSH2_ERROR_EAGAIN) {
            st = is_socket_error(rc) ? HX_ECONN : HX_EIO;
            if (st == HX_ECONN)
                s->broken = 1;
            hx_err_set(err, st, "cannot run '%s' on host '%s' (%s): cannot open a channel: %s",
                       cmd, h->name, h->where, ssh_errmsg(s->session));
            goto out;
        }
        if (ssh_wait(s, step) != HX_OK) {
            s->broken = 1; /* a half-opened channel is left in libssh2 */
            st = hx_err_set(err, HX_ETIMEDOUT,
                            "cannot run '%s' on host '%s' (%s): opening a channel timed out",
                            cmd, h->name, h->where);
            goto out;
        }
    }
    SSH_RETRY(s, step, rc, libssh2_channel_exec(ch, wrapped));
    if (rc != 0) {
        if (rc == LIBSSH2_ERROR_EAGAIN) {
            st = hx_err_set(err, HX_ETIMEDOUT, "cannot run '%s' on host '%s' (%s): starting it "
                            "timed out", cmd, h->name, h->where);
            s->broken = 1;
        } else {
            st = hx_err_set(err, is_socket_error(rc) ? HX_ECONN : HX_EIO,
                            "cannot run '%s' on host '%s' (%s): %s", cmd, h->name, h->where,
                            ssh_errmsg(s->session));
            if (is_socket_error(rc))
                s->broken = 1;
        }
        goto out;
    }

    /*
     * libssh2 keeps one partly sent packet per session, and (1.10) a different
     * send while it is pending fails: channel_read's window adjust would fail
     * behind a partly sent channel_write, and the other way round. So when a
     * call returns EAGAIN with the socket blocked outbound, that call "owns"
     * the session and is the only one repeated until its packet is out.
     */
    owner = OWN_NONE;
    for (;;) {
        int moved = 0;
        /* stdin: the pending bytes, then EOF */
        while (!eof_sent && (owner == OWN_NONE || owner == OWN_STDIN)) {
            const unsigned char *p = NULL;
            size_t n = 0;
            if (x->input && hx_host_input_peek(x->input, &p, &n) != HX_OK)
                n = 0; /* local read error: send EOF; push reports it */
            ssize_t w = n == 0 ? libssh2_channel_send_eof(ch)
                               : libssh2_channel_write(ch, (const char *)p, n);
            if (w == LIBSSH2_ERROR_EAGAIN) {
                owner = outbound_pending(s) ? OWN_STDIN : OWN_NONE;
                break;
            }
            owner = OWN_NONE;
            if (w < 0 && is_socket_error((int)w))
                goto conn_lost;
            if (w < 0 || n == 0) {
                eof_sent = 1; /* sent, or the command closed its input or exited */
                input_done_at = hx_host_now();
                break;
            }
            hx_host_input_consume(x->input, (size_t)w);
            moved = 1;
        }
        /* stdout and stderr: read all that is there */
        for (int stream = 0; stream < 2; stream++) {
            int me = stream ? OWN_STDERR : OWN_STDOUT;
            while (owner == OWN_NONE || (int)owner == me) {
                ssize_t r = libssh2_channel_read_ex(ch, stream ? SSH_EXTENDED_DATA_STDERR : 0,
                                                    buf, sizeof buf);
                if (r == LIBSSH2_ERROR_EAGAIN) {
                    owner = outbound_pending(s) ? me : OWN_NONE;
                    break;
                }
                owner = OWN_NONE;
                if (r > 0) {
                    moved = 1;
                    if (hx_host_buf_append(stream ? &x->errb : &x->out, buf, (size_t)r) != HX_OK) {
                        st = hx_err_set(err, HX_ENOMEM, "out of memory");
                        goto fail_close;
                    }
                    continue;
                }
                if (r == 0) {
                    /* EOF, or libssh2 took in a packet of the other stream (or
                     * a window change): look again before waiting on the socket */
                    moved = 1;
                    break;
                }
                if (is_socket_error((int)r))
                    goto conn_lost;
                st = hx_err_set(err, HX_EIO, "reading the output of '%s' on host '%s' (%s) "
                                "failed: %s", cmd, h->name, h->where, ssh_errmsg(s->session));
                goto fail_close;
            }
        }
        if (owner == OWN_NONE && libssh2_channel_eof(ch))
            break;

        double now = hx_host_now();
        if (now >= hard) {
            timed_out = HX_HOST_TIMED_OUT;
            goto fail_close;
        }
        if (moved) {
            last_progress = now;
            continue;
        }
        int idle_kind;
        double idle = hx_host_idle_deadline(x, last_progress, input_done_at, &idle_kind);
        if (idle > 0 && now >= idle) {
            timed_out = idle_kind;
            goto fail_close;
        }
        double until = hard;
        if (idle > 0 && idle < until)
            until = idle;
        ssh_wait(s, until);
    }

    /* EOF from the host: wait for its close (and the exit status) */
    {
        int idle_kind = HX_HOST_TIMED_OUT;
        double until = hard;
        if (x->finish_s > 0) {
            double idle = hx_host_now() + x->finish_s;
            if (idle < until) {
                until = idle;
                idle_kind = HX_HOST_FINISH_LATE;
            }
        }
        SSH_RETRY(s, until, rc, libssh2_channel_close(ch));
        if (rc == 0)
            SSH_RETRY(s, until, rc, libssh2_channel_wait_closed(ch));
        if (rc == LIBSSH2_ERROR_EAGAIN) {
            timed_out = idle_kind;
            goto fail_close;
        }
    }
    if (rc < 0 && is_socket_error(rc))
        goto conn_lost;
    {
        char *signame = NULL;
        size_t siglen = 0;
        libssh2_channel_get_exit_signal(ch, &signame, &siglen, NULL, NULL, NULL, NULL);
        int status = libssh2_channel_get_exit_status(ch);
        double elapsed = hx_host_now() - start;
        int killed_by_timeout = x->timeout_s > 0 && elapsed >= x->timeout_s * 0.98 &&
                                ((signame && !strcmp(signame, "KILL")) || status == 124 ||
                                 status == 137);
        if (signame)
            libssh2_free(s->session, signame);
        x->exit_status = signame ? -1 : status;
        SSH_RETRY(s, hx_host_now() + SSH_CLOSE_S, rc, libssh2_channel_free(ch));
        if (rc == LIBSSH2_ERROR_EAGAIN)
            s->broken = 1;
        ch = NULL;
        if (killed_by_timeout) {
            x->exit_status = -1;
            st = hx_host_timeout_err(h, x, HX_HOST_TIMED_OUT, elapsed, err);
        }
    }
    goto out;

conn_lost:
    s->broken = 1;
    st = hx_err_set(err, HX_ECONN, "connection to host '%s' (%s) lost while running '%s': %s",
                    h->name, h->where, cmd, ssh_errmsg(s->session));
    /* the session is unusable: free the channel without network I/O */
    shutdown(s->sock, SHUT_RDWR);
    libssh2_channel_free(ch);
    ch = NULL;
    goto out;

fail_close:
    if (timed_out)
        st = hx_host_timeout_err(h, x, timed_out, hx_host_now() - start, err);
    /* a partly sent packet of this channel blocks the session for good */
    if (owner != OWN_NONE || channel_finish(s, ch, hx_host_now() + SSH_CLOSE_S) != 0) {
        s->broken = 1;
        shutdown(s->sock, SHUT_RDWR);
        libssh2_channel_free(ch);
    }
    ch = NULL;
    x->exit_status = -1;
out:
    free(quoted);
    free(wrapped);
    return st;
}

/* ---- open / close ----------------------------------------------------------- */

static void ssh_free_impl(ssh_host *s)
{
    if (!s)
        return;
    if (s->session) {
        if (!s->broken) {
            int rc;
            double deadline = hx_host_now() + 1.0;
            SSH_RETRY(s, deadline, rc,
                      libssh2_session_disconnect(s->session, "hexflow: closing"));
            (void)rc;
        }
        /* nothing may block now: make any pending I/O fail at once */
        if (s->sock >= 0)
            shutdown(s->sock, SHUT_RDWR);
        libssh2_session_free(s->session);
    }
    if (s->sock >= 0)
        close(s->sock);
    if (s->lib_ref)
        lib_release();
    free(s->user);
    free(s);
}

static void ssh_close(hx_host *h)
{
    ssh_free_impl(h->impl);
    h->impl = NULL;
}

static const hx_host_ops ssh_ops = {.exec = ssh_exec, .close = ssh_close};

hx_status hx_host_open_ssh(const hx_host_ssh_options *o, hx_host **out, hx_err *err)
{
    hx_status st = HX_OK;
    hx_host *h = NULL;
    ssh_host *s = NULL;
    LIBSSH2_KNOWNHOSTS *kh = NULL;
    char *kh_default = NULL;
    int rc;

    if (out)
        *out = NULL;
    if (!o || !out || !o->address || !o->address[0] || o->port < 0 || o->port > 65535)
        return hx_err_set(err, HX_EINVAL, "hx_host_open_ssh: bad arguments");
    int port = o->port ? o->port : 22;
    double timeout_s = o->connect_timeout_s > 0 ? o->connect_timeout_s
                                                : SSH_DEFAULT_CONNECT_TIMEOUT_S;
    double deadline = hx_host_now() + timeout_s;

    char where[300];
    if (strchr(o->address, ':'))
        snprintf(where, sizeof where, "[%s]:%d", o->address, port);
    else
        snprintf(where, sizeof where, "%s:%d", o->address, port);
    if (!(h = hx_host_alloc(&ssh_ops, o->name && o->name[0] ? o->name : o->address, where, 0)) ||
        !(s = calloc(1, sizeof *s))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    h->impl = s;
    s->sock = -1;
    if (!(s->user = o->user && o->user[0] ? strdup(o->user) : current_user())) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    const char *kh_path = o->known_hosts;
    if (!kh_path) {
        if (!(kh_default = home_path(".ssh/known_hosts"))) {
            st = hx_err_set(err, HX_ENOMEM, "out of memory");
            goto fail;
        }
        kh_path = kh_default;
    }
    if (lib_acquire() != 0) {
        st = hx_err_set(err, HX_EINTERNAL, "cannot initialize libssh2");
        goto fail;
    }
    s->lib_ref = 1;

    if ((st = tcp_connect(s, h, o->address, port, deadline, timeout_s, err)) != HX_OK)
        goto fail;

    if (!(s->session = libssh2_session_init_ex(NULL, NULL, NULL, NULL)) ||
        !(kh = libssh2_knownhost_init(s->session))) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto fail;
    }
    libssh2_session_set_blocking(s->session, 0);
    if ((st = load_known_hosts(kh, kh_path, err)) != HX_OK)
        goto fail;
    unsigned known = known_key_types(kh, o->address, port);
    prefer_known_hostkeys(s->session, known);

    SSH_RETRY(s, deadline, rc, libssh2_session_handshake(s->session, s->sock));
    if (rc == LIBSSH2_ERROR_EAGAIN) {
        st = hx_err_set(err, HX_ETIMEDOUT,
                        "SSH handshake with host '%s' (%s) timed out after %.1f s (is it an SSH "
                        "server?)", h->name, h->where, timeout_s);
        s->broken = 1;
        goto fail;
    }
    if (rc != 0) {
        st = hx_err_set(err, is_socket_error(rc) ? HX_ECONN : HX_EIO,
                        "SSH handshake with host '%s' (%s) failed: %s", h->name, h->where,
                        ssh_errmsg(s->session));
        s->broken = 1;
        goto fail;
    }
    if ((st = check_host_key(s, h, o, kh, kh_path, known, port, err)) != HX_OK)
        goto fail;
    if ((st = authenticate(s, h, o, deadline, timeout_s, err)) != HX_OK) {
        if (st == HX_ETIMEDOUT || st == HX_ECONN)
            s->broken = 1;
        goto fail;
    }
    libssh2_knownhost_free(kh);
    free(kh_default);
    *out = h;
    return HX_OK;

fail:
    if (kh)
        libssh2_knownhost_free(kh);
    free(kh_default);
    hx_host_close(h);
    return st;
}
