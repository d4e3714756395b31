/*
 * local.c - the local hx_host back end: commands run as child processes
 * (/bin/sh -c) in their own session and process group, with pipes for stdin,
 * stdout and stderr driven by poll(2) under the command's deadline. On timeout
 * the whole process group is killed with SIGKILL.
 */
#define _GNU_SOURCE /* pipe2, O_CLOEXEC pipes: no fd leaks into parallel children */
#include "launcher/host_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void kill_group(pid_t pid)
{
    kill(-pid, SIGKILL); /* the child's process group (it called setsid) */
    kill(pid, SIGKILL);  /* in case it had not yet */
}

/* Reads what is there from *fd into b; closes *fd at EOF. 1 if bytes moved. */
static int drain(int *fd, hx_host_buf *b, hx_status *st)
{
    char buf[65536];
    int moved = 0;
    for (;;) {
        ssize_t r = read(*fd, buf, sizeof buf);
        if (r > 0) {
            moved = 1;
            if (hx_host_buf_append(b, buf, (size_t)r) != HX_OK)
                *st = HX_ENOMEM;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return moved;
        close_fd(fd); /* EOF or error */
        return moved;
    }
}

static hx_status local_exec(hx_host *h, hx_host_exec *x, hx_err *err)
{
    hx_status st = HX_OK;
    int inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1};
    pid_t pid = -1;
    int wstatus = 0, exited = 0, timed_out = 0, epipe = 0;
    sigset_t pipe_set, old_mask, pending;
    int sigpipe_was_pending;

    if (pipe2(inp, O_CLOEXEC) != 0 || pipe2(outp, O_CLOEXEC) != 0 ||
        pipe2(errp, O_CLOEXEC) != 0) {
        st = hx_err_set(err, hx_status_from_errno(errno), "cannot run a command on host '%s': %s",
                        h->name, hx_errno_text(errno));
        goto out_pipes;
    }

    /* Writing to a pipe whose reader is gone raises SIGPIPE: block it in
     * this thread around the writes and swallow one we caused. */
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigpending(&pending);
    sigpipe_was_pending = sigismember(&pending, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);

    pid = fork();
    if (pid < 0) {
        st = hx_err_set(err, hx_status_from_errno(errno), "cannot run a command on host '%s': "
                        "fork: %s", h->name, hx_errno_text(errno));
        goto out_mask;
    }
    if (pid == 0) {
        /* child: only async-signal-safe calls until exec */
        sigset_t none;
        sigemptyset(&none);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGPIPE, &dfl, NULL);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        if (dup2(inp[0], 0) < 0 || dup2(outp[1], 1) < 0 || dup2(errp[1], 2) < 0)
            _exit(127);
        execl("/bin/sh", "sh", "-c", x->command, (char *)NULL);
        _exit(127);
    }
    close_fd(&inp[0]);
    close_fd(&outp[1]);
    close_fd(&errp[1]);
    fcntl(inp[1], F_SETFL, fcntl(inp[1], F_GETFL) | O_NONBLOCK);
    fcntl(outp[0], F_SETFL, fcntl(outp[0], F_GETFL) | O_NONBLOCK);
    fcntl(errp[0], F_SETFL, fcntl(errp[0], F_GETFL) | O_NONBLOCK);

    double start = hx_host_now(), last_progress = start, input_done_at = 0;
    double deadline = x->timeout_s > 0 ? start + x->timeout_s : 0;
    for (;;) {
        int moved = 0;
        /* stdin */
        while (inp[1] >= 0) {
            const unsigned char *p = NULL;
            size_t n = 0;
            if (!x->input || hx_host_input_peek(x->input, &p, &n) != HX_OK || n == 0) {
                close_fd(&inp[1]); /* all written (or the source failed): EOF */
                input_done_at = hx_host_now();
                break;
            }
            ssize_t w = write(inp[1], p, n);
            if (w > 0) {
                hx_host_input_consume(x->input, (size_t)w);
                moved = 1;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (w < 0 && errno == EPIPE)
                epipe = 1; /* the command does not read its input: fine */
            close_fd(&inp[1]);
            input_done_at = hx_host_now();
        }
        /* stdout, stderr */
        if (outp[0] >= 0)
            moved |= drain(&outp[0], &x->out, &st);
        if (errp[0] >= 0)
            moved |= drain(&errp[0], &x->errb, &st);
        if (st != HX_OK) {
            hx_err_set(err, st, "out of memory");
            kill_group(pid);
            goto out_reap;
        }
        if (!exited && outp[0] < 0 && errp[0] < 0) {
            pid_t r = waitpid(pid, &wstatus, WNOHANG);
            if (r == pid)
                exited = 1;
        }
        if (exited && outp[0] < 0 && errp[0] < 0)
            break;

        double now = hx_host_now();
        if (moved)
            last_progress = now;
        int idle_kind;
        double idle = hx_host_idle_deadline(x, last_progress, input_done_at, &idle_kind);
        if (deadline > 0 && now >= deadline) {
            timed_out = HX_HOST_TIMED_OUT;
            break;
        }
        if (idle > 0 && now >= idle) {
            timed_out = idle_kind;
            break;
        }
        if (moved)
            continue;

        /* wait for the pipes, or poll the child's exit every 10 ms */
        struct pollfd pf[3];
        nfds_t nf = 0;
        if (inp[1] >= 0)
            pf[nf++] = (struct pollfd){.fd = inp[1], .events = POLLOUT};
        if (outp[0] >= 0)
            pf[nf++] = (struct pollfd){.fd = outp[0], .events = POLLIN};
        if (errp[0] >= 0)
            pf[nf++] = (struct pollfd){.fd = errp[0], .events = POLLIN};
        double wait_s = (outp[0] < 0 && errp[0] < 0) ? 0.01 : 1.0;
        if (deadline > 0 && deadline - now < wait_s)
            wait_s = deadline - now;
        if (idle > 0 && idle - now < wait_s)
            wait_s = idle - now;
        int ms = (int)(wait_s * 1000.0) + 1;
        if (nf)
            poll(pf, nf, ms);
        else
            nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 10 * 1000 * 1000}, NULL);
    }

    if (timed_out) {
        kill_group(pid);
        double elapsed = hx_host_now() - start;
        /* collect what is left in the pipes for the message */
        if (errp[0] >= 0)
            drain(&errp[0], &x->errb, &st);
        st = hx_host_timeout_err(h, x, timed_out, elapsed, err);
        goto out_reap;
    }
    x->exit_status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
    goto out_mask;

out_reap:
    if (!exited) {
        while (waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
        }
    }
    x->exit_status = -1;
out_mask:
    close_fd(&inp[1]);
    if (epipe && !sigpipe_was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
        }
    }
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
out_pipes:
    close_fd(&inp[0]);
    close_fd(&inp[1]);
    close_fd(&outp[0]);
    close_fd(&outp[1]);
    close_fd(&errp[0]);
    close_fd(&errp[1]);
    return st;
}

static void local_close(hx_host *h)
{
    (void)h;
}

static const hx_host_ops local_ops = {.exec = local_exec, .close = local_close};

hx_status hx_host_open_local(const char *name, hx_host **out, hx_err *err)
{
    if (!out)
        return hx_err_set(err, HX_EINVAL, "hx_host_open_local: no output pointer");
    *out = hx_host_alloc(&local_ops, name ? name : "localhost", "local", 1);
    if (!*out)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    return HX_OK;
}
