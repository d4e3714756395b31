/*
 * host.h - a session to one host of a deployment: run shell commands on it and
 * push files into it, either on this machine (local) or over SSH (libssh2).
 *
 * The launcher opens one hx_host per inventory host, pushes the hexflow binary
 * and the model files into the host's workdir, and starts, checks and stops
 * processes with shell commands:
 *
 *     hx_host_ssh_options o = {.name = "h100-a", .address = "10.0.0.11", .user = "root",
 *                              .accept_new_host_keys = 0};
 *     hx_host *h;
 *     if (hx_host_open_ssh(&o, &h, &err) != HX_OK) { ... err.msg ... }
 *     int skipped;
 *     hx_host_push(h, "build/hexflow", "/var/lib/hexflow/hexflow", 0755, &skipped, &err);
 *     char *out;
 *     int status;
 *     hx_host_run(h, "cd /var/lib/hexflow && umask 077 && mkdir -p run logs && "
 *                    "cat > run/secret && { setsid nohup ./hexflow worker ... "
 *                    "--secret-file run/secret > logs/w0.log 2>&1 < /dev/null & echo $!; }",
 *                 secret, secret_len, &out, NULL, &status, 30, &err);
 *     ...
 *     hx_host_close(h);
 *
 * Secrets travel on stdin, never on a command line (command lines are visible
 * in `ps` on the host and are quoted in error messages). Mind the shell's
 * grammar: in `a && cat > f && b &` the whole && list goes to the background,
 * with stdin from /dev/null, so cat reads nothing; put the background part in
 * braces as above, or separate with `;`.
 *
 * Commands run with /bin/sh -c: in the login directory of the SSH user (the
 * home directory) or, for a local host, in the current directory. A command
 * that starts background processes must redirect their stdout and stderr
 * (as above): hx_host_run returns when the command has exited AND its stdout
 * and stderr are closed. Start long-lived processes with `setsid` so that they
 * leave the command's process group: on timeout the whole process group of
 * the command is killed.
 *
 * Over SSH the command is sent as `exec timeout -s KILL T /bin/sh -c 'COMMAND'`
 * (without `timeout` when there is no time limit) and runs through the user's
 * login shell first, so that shell's startup files run too (a slow ~/.bashrc
 * costs every command its time). The host needs /bin/sh and, for commands
 * with a time limit, coreutils `timeout`.
 *
 * Threads: hx_host objects are independent (open and use many in parallel,
 * one thread per host), but one hx_host must be used by one thread at a time.
 *
 * Errors (hx_err messages name the host, its address:port and what failed):
 *   HX_ECONN      cannot resolve the address, connection refused, no route to
 *                 host, network unreachable, the connection dropped (then the
 *                 host is broken: every later call fails with HX_ECONN; close
 *                 it and open a new one)
 *   HX_ETIMEDOUT  connecting, the SSH handshake or authentication did not end
 *                 within connect_timeout_s; a command did not end within its
 *                 timeout_s (it was killed; the host stays usable unless the
 *                 connection itself had stalled, which then gives HX_ECONN on
 *                 the next call); a push made no progress for the stall timeout
 *   HX_ENOENT     the host key is unknown (not in known_hosts; the message
 *                 gives its fingerprint, the known_hosts path and the hint
 *                 --accept-new-host-keys); a missing local file or identity file
 *   HX_EEXIST     the host key CHANGED: known_hosts holds another key for this
 *                 host. Always refused, even with accept_new_host_keys.
 *   HX_EINVAL     authentication refused (the message lists the methods and
 *                 keys tried and the methods the server accepts); bad arguments
 *   HX_EIO        a remote command that hx_host_push or hx_host_run_checked
 *                 runs failed (the message has its exit status and stderr),
 *                 local I/O errors, SSH protocol errors
 *   HX_ENOMEM     out of memory
 */
#ifndef HX_LAUNCHER_HOST_H
#define HX_LAUNCHER_HOST_H

#include <stddef.h>

#include "common/status.h"

typedef struct hx_host hx_host; /* opaque: a session to one host */

/* How to reach a host over SSH. All strings are borrowed for the call only. */
typedef struct hx_host_ssh_options {
    const char *name;          /* host name for messages ("h100-a"); NULL: the address */
    const char *address;       /* IP address or DNS name (required) */
    int port;                  /* 0: 22 */
    const char *user;          /* NULL: the current user */
    const char *identity_file; /* private key (OpenSSH format, unencrypted; ed25519 or
                                  ECDSA: libssh2 1.10 signs RSA with SHA-1, which
                                  OpenSSH >= 8.8 refuses). NULL: the keys of the SSH
                                  agent ($SSH_AUTH_SOCK), then ~/.ssh/id_ed25519,
                                  id_ecdsa, id_rsa */
    const char *known_hosts;   /* NULL: ~/.ssh/known_hosts */
    int accept_new_host_keys;  /* 1: append an unknown host key to known_hosts and go on
                                  (trust on first use); a CHANGED key is never accepted */
    double connect_timeout_s;  /* bound on name resolution + TCP connect + SSH handshake
                                  + authentication together; <= 0: 10 */
} hx_host_ssh_options;

/*
 * Opens a session to this machine: commands run as child processes (fork and
 * /bin/sh -c), pushes copy files locally. `name` is for messages (NULL:
 * "localhost"). On success *out is a new host the caller closes.
 */
hx_status hx_host_open_local(const char *name, hx_host **out, hx_err *err);

/*
 * Connects to o->address:o->port, checks the host key against known_hosts and
 * authenticates with public keys. Blocks at most about o->connect_timeout_s
 * (names resolve asynchronously under the same deadline). On success *out is
 * a new host the caller closes; on failure *out is NULL and err says which
 * step failed (see the list above).
 *
 * Host keys follow OpenSSH: entries "addr" (port 22) or "[addr]:port", plain
 * or hashed; when known_hosts records keys of some types for the host, those
 * types are negotiated first, and a host that then offers a different key, or
 * only a key of an unrecorded type, counts as CHANGED. Lines libssh2 cannot
 * parse are skipped (and kept: new keys are appended, never rewritten).
 * libssh2 is initialized with the first open session and released with the
 * last (thread-safe).
 */
hx_status hx_host_open_ssh(const hx_host_ssh_options *o, hx_host **out, hx_err *err);

/*
 * Runs `command` with /bin/sh -c on the host, writing the stdin_len bytes of
 * stdin_data (may be NULL: empty stdin) to its standard input and then closing
 * it, and capturing its stdout and stderr into NUL-terminated buffers that the
 * caller frees (out_stdout / out_stderr may be NULL to discard; each keeps at
 * most 64 MiB, the rest is discarded). *exit_status (may be NULL) gets the
 * exit status, or -1 when the command was killed by a signal.
 *
 * A non-zero exit status is not an error here: the call returns HX_OK.
 * HX_ETIMEDOUT when the command has not finished after timeout_s seconds
 * (<= 0: no limit): the command's process group is killed (SSH: with
 * `timeout -s KILL` on the host), and the message quotes the end of its stderr.
 * HX_ECONN when the connection drops. On any failure the out buffers are set
 * to NULL and *exit_status to -1.
 */
hx_status hx_host_run(hx_host *h, const char *command, const void *stdin_data,
                      size_t stdin_len, char **out_stdout, char **out_stderr,
                      int *exit_status, double timeout_s, hx_err *err);

/*
 * hx_host_run that treats a non-zero exit status as a failure: HX_EIO with
 * "command 'CMD' failed on host 'h1' (exit status 1): LAST LINE OF STDERR".
 * out_stdout as for hx_host_run (set only on success).
 */
hx_status hx_host_run_checked(hx_host *h, const char *command, const void *stdin_data,
                              size_t stdin_len, char **out_stdout, double timeout_s,
                              hx_err *err);

/*
 * Copies the local regular file `local_path` to `remote_path` on the host
 * (relative paths: from the login directory / current directory). Missing
 * parent directories are created; the file gets permission bits `mode`
 * (e.g. 0755). The data is streamed (constant memory, any size) into a
 * temporary file beside the target (".NAME.hxtmp.XXXXXX"), whose SHA-256 is
 * checked on the host before it is renamed over the target: the target is
 * never half-written, and an interrupted push leaves the old file in place.
 *
 * When the host already has a file at remote_path with the same SHA-256 (by
 * `sha256sum` on the host), nothing is copied, only its mode is set, and
 * *skipped (may be NULL) is 1; otherwise *skipped is 0.
 * Needs sha256sum, mktemp, cat, chmod, mv (coreutils) on the host.
 *
 * Time limits: HX_ETIMEDOUT when the transfer makes no progress for the stall
 * timeout (hx_host_set_stall_timeout, default 60 s), or when a checksum on the
 * host takes longer than 60 s + 1 s per 50 MB of the file. A push cut off
 * (timeout, dropped connection) leaves the old target; its temporary file is
 * removed unless the shell on the host was killed with it.
 */
hx_status hx_host_push(hx_host *h, const char *local_path, const char *remote_path, int mode,
                       int *skipped, hx_err *err);

/* Sets how long hx_host_push waits without progress before HX_ETIMEDOUT
 * (default 60 s; <= 0: no stall limit). */
void hx_host_set_stall_timeout(hx_host *h, double stall_s);

/* The name given at open (never NULL; owned by h). */
const char *hx_host_name(const hx_host *h);

/* Whether h runs commands on this machine (hx_host_open_local). */
int hx_host_is_local(const hx_host *h);

/*
 * Quotes `s` for a POSIX shell ('it'\''s'), to build command lines from paths.
 * Returns a new string the caller frees, or NULL when out of memory.
 */
char *hx_host_shell_quote(const char *s);

/*
 * SHA-256 of a local file as 64 lowercase hex digits plus NUL into hex_out.
 * HX_ENOENT / HX_EIO with "cannot read 'PATH': ..." on failure.
 */
hx_status hx_host_sha256_file(const char *path, char hex_out[65], hx_err *err);

/* Closes the session (the SSH connection; running remote commands that were
 * started in the background keep running). NULL is a no-op. */
void hx_host_close(hx_host *h);

#endif /* HX_LAUNCHER_HOST_H */
