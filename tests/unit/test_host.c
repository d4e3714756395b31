/*
 * test_host.c - launcher/host.h: running commands and pushing files on a
 * host, locally and over SSH.
 *
 * The local tests always run: stdin, stdout/stderr capture, exit statuses,
 * signals, timeouts that kill the whole command (no orphans), large full-duplex
 * transfers, push with skip-on-same-checksum and atomic replace, quoting,
 * connection refused and handshake timeouts against loopback sockets.
 *
 * The ssh_* tests need SSH hosts in network namespaces; they skip, saying so,
 * unless tests/integration/test_ssh.sh has set them up (it runs this binary
 * with HXT_DIR and the other variables of netns.sh's netns.env exported and
 * only the ssh_* tests selected). Host 1 serves the run/push tests, host 2 the
 * sshd stop/rekey/drop tests, host 3 the unreachable-address test.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launcher/host.h"

static char tmp_dir[256];

/* ---- helpers ---------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_s(double s)
{
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static void check_ok(hx_status st, const hx_err *err)
{
    if (st != HX_OK)
        fail_msg("unexpected failure %d (%s): %s", st, hx_strerror(st), err->msg);
}

static void expect_err(hx_status st, const hx_err *err, hx_status code, const char *needle)
{
    if (st != code || !strstr(err->msg, needle))
        fail_msg("got %d (%s) '%s'; expected %d with '%s'", st, hx_strerror(st), err->msg, code,
                 needle);
}

/* Runs a shell command here; its exit status. */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* First line of a shell command's output (static buffer). */
static const char *sh_out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *sh_out(const char *fmt, ...)
{
    static char line[1024];
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    line[0] = '\0';
    FILE *p = popen(cmd, "r");
    if (!p)
        return line;
    if (!fgets(line, sizeof line, p))
        line[0] = '\0';
    pclose(p);
    line[strcspn(line, "\n")] = '\0';
    return line;
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *random_bytes(size_t n, unsigned seed)
{
    unsigned char *p = malloc(n);
    assert_non_null(p);
    uint64_t x = 0x9e3779b97f4a7c15ull ^ seed;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (unsigned char)x;
    }
    return p;
}

static int files_equal(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        char ba[65536], bb[65536];
        size_t na = fread(ba, 1, sizeof ba, fa), nb = fread(bb, 1, sizeof bb, fb);
        if (na != nb || memcmp(ba, bb, na) != 0)
            same = 0;
        if (na == 0)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return same;
}

/* ---- the checks, for any host ------------------------------------------------ */

static void check_run_basic(hx_host *h)
{
    hx_err err = {0};
    char *out = NULL, *errs = NULL;
    int status = 99;
    check_ok(hx_host_run(h, "echo out; echo err >&2; exit 3", NULL, 0, &out, &errs, &status, 20,
                         &err),
             &err);
    assert_string_equal(out, "out\n");
    assert_string_equal(errs, "err\n");
    assert_int_equal(status, 3);
    free(out);
    free(errs);

    /* stdin, and NULL output pointers */
    check_ok(hx_host_run(h, "tr a-z A-Z", "hello\n", 6, &out, NULL, &status, 20, &err), &err);
    assert_string_equal(out, "HELLO\n");
    assert_int_equal(status, 0);
    free(out);
    check_ok(hx_host_run(h, "exit 0", NULL, 0, NULL, NULL, NULL, 20, &err), &err);

    /* /bin/sh semantics, empty output is "" */
    check_ok(hx_host_run(h, "x=1; [ \"$x\" = 1 ] && exit 42", NULL, 0, &out, &errs, &status, 20,
                         &err),
             &err);
    assert_int_equal(status, 42);
    assert_string_equal(out, "");
    assert_string_equal(errs, "");
    free(out);
    free(errs);

    /* killed by a signal */
    check_ok(hx_host_run(h, "kill -9 $$", NULL, 0, NULL, NULL, &status, 20, &err), &err);
    assert_int_equal(status, -1);

    /* a command that does not read its input */
    unsigned char *big = random_bytes(8u << 20, 1);
    check_ok(hx_host_run(h, "exit 7", big, 8u << 20, NULL, NULL, &status, 20, &err), &err);
    assert_int_equal(status, 7);

    /* full duplex: 8 MiB through cat while we are still writing */
    check_ok(hx_host_run(h, "cat", big, 8u << 20, &out, NULL, &status, 60, &err), &err);
    assert_int_equal(status, 0);
    assert_memory_equal(out, big, 8u << 20);
    free(out);
    free(big);

    /* lots of stderr */
    check_ok(hx_host_run(h, "i=0; while [ $i -lt 20000 ]; do echo line $i >&2; i=$((i+1)); done",
                         NULL, 0, NULL, &errs, &status, 60, &err),
             &err);
    assert_non_null(strstr(errs, "line 19999\n"));
    free(errs);

    /* run_checked */
    check_ok(hx_host_run_checked(h, "echo fine", NULL, 0, &out, 20, &err), &err);
    assert_string_equal(out, "fine\n");
    free(out);
    out = (char *)1;
    hx_status st = hx_host_run_checked(h, "echo nope >&2; exit 5", NULL, 0, &out, 20, &err);
    expect_err(st, &err, HX_EIO, "(exit status 5): nope");
    assert_non_null(strstr(err.msg, hx_host_name(h)));
    assert_null(out);
}

/* The command and a background child must both be gone after the timeout. */
static void check_run_timeout(hx_host *h)
{
    hx_err err = {0};
    char *out = (char *)1;
    int status = 0;
    char cmd[512], marker[64];
    snprintf(marker, sizeof marker, "sleep 7%06d.25", (int)getpid() % 1000000);
    snprintf(cmd, sizeof cmd, "echo started >&2; %s & %s", marker, marker);
    double t0 = now_s();
    hx_status st = hx_host_run(h, cmd, NULL, 0, &out, NULL, &status, 1.0, &err);
    double dt = now_s() - t0;
    expect_err(st, &err, HX_ETIMEDOUT, "timed out after 1.0 s");
    assert_non_null(strstr(err.msg, "started"));
    assert_null(out);
    assert_int_equal(status, -1);
    if (dt < 0.9 || dt > 3.0)
        fail_msg("timeout after %.2f s, expected about 1 s", dt);
    /* no orphan: the namespaces share our PID namespace, so pgrep sees them */
    int left = 1;
    for (int i = 0; i < 50 && left; i++) {
        /* "[s]leep": the pattern must not match the shell running pgrep */
        left = sh("pgrep -f '[%c]%s' >/dev/null", marker[0], marker + 1) == 0;
        if (left)
            sleep_s(0.1);
    }
    if (left)
        fail_msg("'%s' still runs after the timeout", marker);

    /* the host is still usable */
    check_ok(hx_host_run(h, "echo ok", NULL, 0, &out, NULL, &status, 20, &err), &err);
    assert_string_equal(out, "ok\n");
    free(out);
}

/* Pushes into remote_dir (an absolute path the test can also see locally). */
static void check_push(hx_host *h, const char *remote_dir)
{
    hx_err err = {0};
    char src[512], dst[2048];
    struct stat sb;
    int skipped = -1;
    size_t n = 3u << 20;
    unsigned char *data = random_bytes(n, 7);
    snprintf(src, sizeof src, "%s/push-src.bin", tmp_dir);
    write_file(src, data, n);
    snprintf(dst, sizeof dst, "%s/push/a/b c/it's.bin", remote_dir);

    check_ok(hx_host_push(h, src, dst, 0640, &skipped, &err), &err);
    assert_int_equal(skipped, 0);
    assert_true(files_equal(src, dst));
    assert_int_equal(stat(dst, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0640);
    ino_t ino1 = sb.st_ino;

    /* same checksum: skipped, mode still applied */
    check_ok(hx_host_push(h, src, dst, 0755, &skipped, &err), &err);
    assert_int_equal(skipped, 1);
    assert_int_equal(stat(dst, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0755);
    assert_true(sb.st_ino == ino1);

    /* changed: replaced by rename (a new inode), no temporary left behind */
    data[12345] ^= 0xff;
    write_file(src, data, n);
    check_ok(hx_host_push(h, src, dst, 0600, &skipped, &err), &err);
    assert_int_equal(skipped, 0);
    assert_true(files_equal(src, dst));
    assert_int_equal(stat(dst, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0600);
    assert_true(sb.st_ino != ino1);
    assert_string_equal(sh_out("ls -A \"%s/push/a/b c\" | tr '\\n' ' '", remote_dir), "it's.bin ");

    /* an empty file */
    char empty[512];
    snprintf(empty, sizeof empty, "%s/empty", tmp_dir);
    write_file(empty, "", 0);
    snprintf(dst, sizeof dst, "%s/push/empty", remote_dir);
    check_ok(hx_host_push(h, empty, dst, 0644, &skipped, &err), &err);
    assert_int_equal(skipped, 0);
    assert_int_equal(stat(dst, &sb), 0);
    assert_int_equal(sb.st_size, 0);

    /* failures: a missing source, a parent that is a file (old file untouched) */
    expect_err(hx_host_push(h, "/nonexistent/x", dst, 0644, &skipped, &err), &err, HX_ENOENT,
               "cannot push '/nonexistent/x': no such file");
    snprintf(dst, sizeof dst, "%s/push/empty/sub/x", remote_dir);
    hx_status st = hx_host_push(h, src, dst, 0644, &skipped, &err);
    expect_err(st, &err, HX_EIO, "cannot push");
    assert_non_null(strstr(err.msg, hx_host_name(h)));
    free(data);
}

/* ---- local -------------------------------------------------------------------- */

static void local_run(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    check_ok(hx_host_open_local("here", &h, &err), &err);
    assert_string_equal(hx_host_name(h), "here");
    assert_true(hx_host_is_local(h));
    check_run_basic(h);
    hx_host_close(h);
    hx_host_close(NULL);
}

static void local_timeout(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    check_ok(hx_host_open_local(NULL, &h, &err), &err);
    assert_string_equal(hx_host_name(h), "localhost");
    check_run_timeout(h);
    hx_host_close(h);
}

static void local_detached(void **state)
{
    /* a setsid'd background process with redirected output: run returns at
     * once with its pid, and the process survives the command */
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    char *out = NULL;
    int status = -1;
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && umask 077 && cat > secret && "
             "{ setsid nohup sleep 30 > detached.log 2>&1 < /dev/null & echo $!; }", tmp_dir);
    check_ok(hx_host_open_local(NULL, &h, &err), &err);
    double t0 = now_s();
    check_ok(hx_host_run(h, cmd, "s3cr3t", 6, &out, NULL, &status, 10, &err), &err);
    assert_true(now_s() - t0 < 2.0);
    assert_int_equal(status, 0);
    int pid = atoi(out);
    assert_true(pid > 0);
    free(out);
    char path[512];
    snprintf(path, sizeof path, "%s/secret", tmp_dir);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    assert_string_equal(sh_out("cat '%s'", path), "s3cr3t");
    sleep_s(0.1);
    assert_int_equal(kill(pid, 0), 0);
    kill(pid, SIGKILL);
    hx_host_close(h);
}

static void local_push(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    check_ok(hx_host_open_local(NULL, &h, &err), &err);
    check_push(h, tmp_dir);
    hx_host_close(h);
}

static void local_quote_and_hash(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    const char *tricky[] = {"plain", "it's", "a b", "$(rm -rf /)", "'", "''", "\\n\"`", ""};
    check_ok(hx_host_open_local(NULL, &h, &err), &err);
    for (size_t i = 0; i < sizeof tricky / sizeof tricky[0]; i++) {
        char *q = hx_host_shell_quote(tricky[i]);
        char cmd[256], *out = NULL;
        snprintf(cmd, sizeof cmd, "printf %%s %s", q);
        check_ok(hx_host_run_checked(h, cmd, NULL, 0, &out, 10, &err), &err);
        assert_string_equal(out, tricky[i]);
        free(out);
        free(q);
    }
    hx_host_close(h);

    char path[512], hex[65];
    snprintf(path, sizeof path, "%s/abc", tmp_dir);
    write_file(path, "abc", 3);
    check_ok(hx_host_sha256_file(path, hex, &err), &err);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    expect_err(hx_host_sha256_file("/nonexistent", hex, &err), &err, HX_ENOENT, "/nonexistent");
}

/* ---- SSH against loopback sockets (no namespaces needed) ----------------------- */

static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 4), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static void loopback_refused(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_host *h = (hx_host *)1;
    int port;
    int fd = listen_loopback(&port);
    close(fd); /* nothing listens there now */
    hx_host_ssh_options o = {.name = "lo", .address = "127.0.0.1", .port = port,
                             .connect_timeout_s = 5};
    char needle[256];
    snprintf(needle, sizeof needle, "cannot connect to host 'lo' (127.0.0.1:%d): connection "
             "refused", port);
    expect_err(hx_host_open_ssh(&o, &h, &err), &err, HX_ECONN, needle);
    assert_null(h);

    /* through name resolution */
    o.address = "localhost";
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    if (st != HX_ECONN || !strstr(err.msg, "connection refused") ||
        !strstr(err.msg, "cannot connect to host 'lo' (localhost:"))
        fail_msg("got %d '%s'", st, err.msg);
    o.address = "no-such-host.invalid";
    o.connect_timeout_s = 3;
    double t0 = now_s();
    st = hx_host_open_ssh(&o, &h, &err);
    if ((st != HX_ECONN && st != HX_ETIMEDOUT) ||
        !strstr(err.msg, "cannot resolve host 'lo' (no-such-host.invalid)") || now_s() - t0 > 4)
        fail_msg("got %d '%s' after %.1f s", st, err.msg, now_s() - t0);
}

static void loopback_silent_server(void **state)
{
    /* accepts TCP (the kernel does, from the backlog) but never speaks SSH */
    (void)state;
    hx_err err = {0};
    hx_host *h = NULL;
    int port;
    int fd = listen_loopback(&port);
    hx_host_ssh_options o = {.name = "mute", .address = "127.0.0.1", .port = port,
                             .connect_timeout_s = 1.0};
    double t0 = now_s();
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    double dt = now_s() - t0;
    expect_err(st, &err, HX_ETIMEDOUT, "SSH handshake with host 'mute'");
    if (dt < 0.9 || dt > 2.5)
        fail_msg("gave up after %.2f s, expected about 1 s", dt);
    close(fd);

    expect_err(hx_host_open_ssh(&(hx_host_ssh_options){.address = ""}, &h, &err), &err,
               HX_EINVAL, "bad arguments");
}

/* ---- SSH into network namespaces ---------------------------------------------- */

static const char *env(const char *name)
{
    const char *v = getenv(name);
    return v ? v : "";
}

static int have_netns(void)
{
    if (getenv("HXT_DIR") && getenv("HXT_NETNS_SH"))
        return 1;
    print_message("skipped: no SSH hosts (run through tests/integration/test_ssh.sh, as root "
                  "with ip netns)\n");
    return 0;
}

static int netns(const char *what, int i)
{
    return sh("'%s' %s '%s' %d", env("HXT_NETNS_SH"), what, env("HXT_DIR"), i);
}

static const char *addr(int i)
{
    static char buf[4][64];
    char name[32];
    snprintf(name, sizeof name, "HXT_ADDR_%d", i);
    snprintf(buf[i % 4], sizeof buf[i % 4], "%s", env(name));
    return buf[i % 4];
}

static hx_host_ssh_options opts(int i)
{
    static char names[4][16];
    snprintf(names[i % 4], sizeof names[i % 4], "h%d", i);
    return (hx_host_ssh_options){.name = names[i % 4], .address = addr(i), .port = 22,
                                 .user = "root", .identity_file = env("HXT_KEY"),
                                 .known_hosts = env("HXT_KNOWN_HOSTS"),
                                 .connect_timeout_s = 10};
}

static hx_host *open_host(int i)
{
    hx_err err = {0};
    hx_host *h = NULL;
    hx_host_ssh_options o = opts(i);
    check_ok(hx_host_open_ssh(&o, &h, &err), &err);
    assert_string_equal(hx_host_name(h), o.name);
    assert_false(hx_host_is_local(h));
    return h;
}

static void ssh_run(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_host *h = open_host(1);
    check_run_basic(h);
    /* it is really the namespace */
    char *out = NULL;
    hx_err err = {0};
    check_ok(hx_host_run_checked(h, "ip -4 -o addr show dev eth0", NULL, 0, &out, 10, &err),
             &err);
    assert_non_null(strstr(out, addr(1)));
    free(out);
    hx_host_close(h);
}

static void ssh_timeout(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_host *h = open_host(1);
    check_run_timeout(h);
    hx_host_close(h);
}

static void ssh_push(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_host *h = open_host(1);
    check_push(h, env("HXT_WORKDIR_1"));

    /* a large file streams (constant memory) */
    hx_err err = {0};
    char src[512], dst[512];
    int skipped = -1;
    snprintf(src, sizeof src, "%s/big.bin", tmp_dir);
    snprintf(dst, sizeof dst, "%s/big.bin", env("HXT_WORKDIR_1"));
    assert_int_equal(sh("head -c 200000000 /dev/urandom > '%s'", src), 0);
    double t0 = now_s();
    check_ok(hx_host_push(h, src, dst, 0644, &skipped, &err), &err);
    double dt = now_s() - t0;
    print_message("pushed 200 MB over SSH in %.2f s (%.0f MB/s, hashing included)\n", dt,
                  200.0 / dt);
    assert_int_equal(skipped, 0);
    assert_true(files_equal(src, dst));
    t0 = now_s();
    check_ok(hx_host_push(h, src, dst, 0644, &skipped, &err), &err);
    print_message("skipped the same 200 MB in %.2f s\n", now_s() - t0);
    assert_int_equal(skipped, 1);
    unlink(src);
    unlink(dst);
    hx_host_close(h);
}

static void ssh_refused(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    assert_int_equal(netns("sshd-stop", 2), 0);
    hx_host_ssh_options o = opts(2);
    char needle[256];
    snprintf(needle, sizeof needle, "cannot connect to host 'h2' (%s:22): connection refused",
             addr(2));
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    assert_int_equal(netns("sshd-start", 2), 0);
    expect_err(st, &err, HX_ECONN, needle);
    assert_null(h);
    hx_host_close(open_host(2));
}

static void ssh_unknown_and_accepted_key(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    char kh[512];
    snprintf(kh, sizeof kh, "%s/known_hosts_tofu", tmp_dir);
    unlink(kh);
    assert_int_equal(sh("ssh-keygen -q -t ed25519 -N '' -f '%s/stray' && "
                        "{ echo '# comment'; echo \"10.99.99.99 $(cut -d' ' -f1,2 '%s/stray.pub')\"; "
                        "echo 'bogus line'; } > '%s'", tmp_dir, tmp_dir, kh), 0);
    char fp[256];
    snprintf(fp, sizeof fp, "%s",
             sh_out("ssh-keygen -lf '%s/hosts/1/ssh_host_ed25519_key.pub' | cut -d' ' -f2",
                    env("HXT_DIR")));
    assert_true(strncmp(fp, "SHA256:", 7) == 0);

    hx_host_ssh_options o = opts(1);
    o.known_hosts = kh;
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    expect_err(st, &err, HX_ENOENT, "host key of 'h1'");
    expect_err(st, &err, HX_ENOENT, fp);
    expect_err(st, &err, HX_ENOENT, kh);
    expect_err(st, &err, HX_ENOENT, "--accept-new-host-keys");
    assert_null(h);

    o.accept_new_host_keys = 1;
    check_ok(hx_host_open_ssh(&o, &h, &err), &err);
    hx_host_close(h);
    assert_int_equal(sh("grep -q '^%s ssh-ed25519 ' '%s'", addr(1), kh), 0);
    assert_int_equal(sh("grep -q '^bogus line$' '%s'", kh), 0); /* kept */

    /* now known: connects without accepting */
    o.accept_new_host_keys = 0;
    check_ok(hx_host_open_ssh(&o, &h, &err), &err);
    hx_host_close(h);
    /* and the file did not grow */
    assert_string_equal(sh_out("wc -l < '%s'", kh), "4");
}

static void ssh_changed_key(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    char old_kh[512];
    snprintf(old_kh, sizeof old_kh, "%s/known_hosts_old", tmp_dir);
    assert_int_equal(sh("cp '%s' '%s'", env("HXT_KNOWN_HOSTS"), old_kh), 0);
    assert_int_equal(netns("rekey", 2), 0);
    hx_host_ssh_options o = opts(2);
    o.known_hosts = old_kh;
    o.accept_new_host_keys = 1;
    const char *fp = sh_out("ssh-keygen -lf '%s/hosts/2/ssh_host_ed25519_key.pub' | cut -d' ' -f2",
                            env("HXT_DIR"));
    char fp_new[1024];
    snprintf(fp_new, sizeof fp_new, "%s", fp);
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    expect_err(st, &err, HX_EEXIST, "HOST KEY OF 'h2'");
    expect_err(st, &err, HX_EEXIST, "HAS CHANGED");
    expect_err(st, &err, HX_EEXIST, fp_new);
    expect_err(st, &err, HX_EEXIST, old_kh);
    assert_null(h);
    /* nothing was added */
    assert_int_equal(sh("cmp -s '%s' '%s'", old_kh, env("HXT_KNOWN_HOSTS")), 1);
    assert_string_equal(sh_out("grep -c '^%s ' '%s'", addr(2), old_kh), "1");
    /* the fresh known_hosts (rewritten by rekey) works */
    hx_host_close(open_host(2));
}

static void ssh_wrong_identity(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    char key[512];
    snprintf(key, sizeof key, "%s/other_key", tmp_dir);
    unlink(key);
    assert_int_equal(sh("ssh-keygen -q -t ed25519 -N '' -f '%s'", key), 0);
    hx_host_ssh_options o = opts(1);
    o.identity_file = key;
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    expect_err(st, &err, HX_EINVAL, "authentication refused by host 'h1'");
    expect_err(st, &err, HX_EINVAL, "user 'root'");
    expect_err(st, &err, HX_EINVAL, key);
    expect_err(st, &err, HX_EINVAL, "accepts: publickey");
    assert_null(h);

    o.identity_file = "/nonexistent/key";
    expect_err(hx_host_open_ssh(&o, &h, &err), &err, HX_ENOENT,
               "cannot read identity file '/nonexistent/key'");
}

static void ssh_connect_timeout(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    assert_int_equal(netns("link-down", 3), 0);
    hx_host_ssh_options o = opts(3);
    o.connect_timeout_s = 1.5;
    double t0 = now_s();
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    double dt = now_s() - t0;
    assert_int_equal(netns("link-up", 3), 0);
    char needle[256];
    snprintf(needle, sizeof needle, "cannot connect to host 'h3' (%s:22): connection timed out "
             "after 1.5 s", addr(3));
    expect_err(st, &err, HX_ETIMEDOUT, needle);
    if (dt < 1.4 || dt > 2.5)
        fail_msg("gave up after %.2f s, expected about 1.5 s", dt);
}

static void ssh_default_keys_and_agent(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = NULL;
    char home[512], old_home[512];
    snprintf(old_home, sizeof old_home, "%s", env("HOME"));
    snprintf(home, sizeof home, "%s/home", tmp_dir);
    assert_int_equal(sh("mkdir -p '%s/.ssh' && cp '%s' '%s/.ssh/id_ed25519' && "
                        "cp '%s' '%s/.ssh/known_hosts'",
                        home, env("HXT_KEY"), home, env("HXT_KNOWN_HOSTS"), home), 0);
    setenv("HOME", home, 1);

    /* ~/.ssh/id_ed25519 and ~/.ssh/known_hosts, the current user */
    hx_host_ssh_options o = opts(1);
    o.identity_file = NULL;
    o.known_hosts = NULL;
    o.user = NULL;
    hx_status st = hx_host_open_ssh(&o, &h, &err);
    if (st == HX_OK)
        hx_host_close(h);

    /* the agent: holding a key the host does not accept, then the right one */
    char sock[512];
    snprintf(sock, sizeof sock, "%s/agent.sock", tmp_dir);
    int have_agent = st == HX_OK && sh("ssh-agent -a '%s' > '%s/agent.env' 2>/dev/null", sock,
                                       tmp_dir) == 0;
    hx_status st_wrong = HX_OK, st_right = HX_OK;
    hx_err err_wrong = {0}, err_right = {0};
    if (have_agent) {
        setenv("SSH_AUTH_SOCK", sock, 1);
        sh("rm -f '%s/.ssh/id_ed25519'; ssh-keygen -q -t ed25519 -N '' -f '%s/agentkey' && "
           "SSH_AUTH_SOCK='%s' ssh-add -q '%s/agentkey' 2>/dev/null",
           home, tmp_dir, sock, tmp_dir);
        st_wrong = hx_host_open_ssh(&o, &h, &err_wrong);
        if (st_wrong == HX_OK)
            hx_host_close(h);
        sh("SSH_AUTH_SOCK='%s' ssh-add -q '%s' 2>/dev/null", sock, env("HXT_KEY"));
        st_right = hx_host_open_ssh(&o, &h, &err_right);
        if (st_right == HX_OK)
            hx_host_close(h);
        sh(". '%s/agent.env' >/dev/null; ssh-agent -k >/dev/null 2>&1", tmp_dir);
        unsetenv("SSH_AUTH_SOCK");
    }
    setenv("HOME", old_home, 1);
    check_ok(st, &err);
    if (!have_agent) {
        print_message("skipped the agent part: ssh-agent not available\n");
        return;
    }
    expect_err(st_wrong, &err_wrong, HX_EINVAL, "the SSH agent (1 key)");
    check_ok(st_right, &err_right);
}

typedef struct drop_arg {
    double delay_s;
    int i;
} drop_arg;

static void *drop_later(void *p)
{
    drop_arg *a = p;
    sleep_s(a->delay_s);
    netns("drop", a->i);
    return NULL;
}

/* Drops host 2's connections once a push into its workdir is under way. */
static void *drop_mid_push(void *p)
{
    (void)p;
    for (int i = 0; i < 300; i++) {
        if (sh("find '%s' -name '.drop.bin.hxtmp.*' -size +20M | grep -q .",
               env("HXT_WORKDIR_2")) == 0)
            break;
        sleep_s(0.02);
    }
    netns("drop", 2);
    return NULL;
}

static void ssh_connection_drop(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    hx_err err = {0};
    hx_host *h = open_host(2);
    pthread_t t;
    drop_arg a = {.delay_s = 0.5, .i = 2};
    pthread_create(&t, NULL, drop_later, &a);
    double t0 = now_s();
    hx_status st = hx_host_run(h, "sleep 20", NULL, 0, NULL, NULL, NULL, 30, &err);
    double dt = now_s() - t0;
    pthread_join(t, NULL);
    expect_err(st, &err, HX_ECONN, "connection to host 'h2'");
    if (dt > 5)
        fail_msg("noticed the drop after %.2f s", dt);
    expect_err(hx_host_run(h, "true", NULL, 0, NULL, NULL, NULL, 10, &err), &err, HX_ECONN,
               "was lost earlier");
    hx_host_close(h);

    /* a push cut off in the middle leaves the old file in place */
    h = open_host(2);
    char src[512], dst[512], old[512];
    int skipped;
    snprintf(src, sizeof src, "%s/drop.bin", tmp_dir);
    snprintf(old, sizeof old, "%s/drop-old.bin", tmp_dir);
    snprintf(dst, sizeof dst, "%s/drop.bin", env("HXT_WORKDIR_2"));
    write_file(old, "old contents\n", 13);
    check_ok(hx_host_push(h, old, dst, 0644, &skipped, &err), &err);
    assert_int_equal(sh("head -c 1000000000 /dev/zero > '%s'", src), 0);
    pthread_t t2;
    pthread_create(&t2, NULL, drop_mid_push, NULL);
    st = hx_host_push(h, src, dst, 0644, &skipped, &err);
    pthread_join(t2, NULL);
    if (st == HX_OK)
        print_message("note: the push finished before the drop\n");
    else
        expect_err(st, &err, HX_ECONN, "cannot push");
    assert_true(files_equal(dst, st == HX_OK ? src : old));
    unlink(src);
    hx_host_close(h);
}

typedef struct par_arg {
    int i;
    hx_status st;
    hx_err err;
} par_arg;

static void *open_and_run(void *p)
{
    par_arg *a = p;
    hx_host *h = NULL;
    hx_host_ssh_options o = opts(a->i);
    a->st = hx_host_open_ssh(&o, &h, &a->err);
    if (a->st == HX_OK) {
        int status = -1;
        a->st = hx_host_run(h, "true", NULL, 0, NULL, NULL, &status, 10, &a->err);
        if (a->st == HX_OK && status != 0)
            a->st = HX_EIO;
    }
    hx_host_close(h);
    return NULL;
}

static void ssh_parallel(void **state)
{
    (void)state;
    if (!have_netns())
        skip();
    pthread_t t[3];
    par_arg a[3];
    for (int i = 0; i < 3; i++) {
        a[i] = (par_arg){.i = i + 1};
        pthread_create(&t[i], NULL, open_and_run, &a[i]);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        check_ok(a[i].st, &a[i].err);
    }
}

/* ---- setup ----------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx-test-host-XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    unsetenv("SSH_AUTH_SOCK");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    sh("rm -rf '%s'", tmp_dir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(local_run),
        cmocka_unit_test(local_timeout),
        cmocka_unit_test(local_detached),
        cmocka_unit_test(local_push),
        cmocka_unit_test(local_quote_and_hash),
        cmocka_unit_test(loopback_refused),
        cmocka_unit_test(loopback_silent_server),
        cmocka_unit_test(ssh_run),
        cmocka_unit_test(ssh_timeout),
        cmocka_unit_test(ssh_push),
        cmocka_unit_test(ssh_refused),
        cmocka_unit_test(ssh_unknown_and_accepted_key),
        cmocka_unit_test(ssh_changed_key),
        cmocka_unit_test(ssh_wrong_identity),
        cmocka_unit_test(ssh_default_keys_and_agent),
        cmocka_unit_test(ssh_connect_timeout),
        cmocka_unit_test(ssh_connection_drop),
        cmocka_unit_test(ssh_parallel),
    };
    const char *filter = getenv("HXT_TEST_FILTER");
    if (filter && filter[0])
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, setup, teardown);
}
