/*
 * launch.h - deploying a plan: start every worker and the router on the
 * plan's hosts, wait until healthy, and stop, inspect or read the logs of
 * what was started.
 *
 * For each host of the plan, at once (a thread per host): open it
 * (launcher/host.h: `address: local` runs here without SSH), make its
 * workdir, put the files it needs there (SSH hosts: the hexflow binary, the
 * plan and the model files, each skipped when the same SHA-256 is there;
 * local hosts use them where they are), and start its processes with
 * `setsid`, each with the deployment secret on its stdin (written by the
 * host into WORKDIR/run/NAME.secret, mode 0600; never on a command line). Then
 * wait until the router's /health answers 200 (every group connected),
 * watching that every process is still alive. Any failure stops everything
 * already started, on every host, and names the host and the reason (a
 * dead process's reason is the last lines of its log).
 *
 * The workdir of a host is the plan's `workdir`, else
 *   local:  STATE_DIR/ID/HOST      SSH: .hexflow/ID/HOST (under the login directory)
 * holding run/ (secret, pids) and logs/ (one log per process:
 * router.log, worker-G-sS-rR.log). ID is the plan file's name and a hash of
 * its absolute path, so two plans never share a workdir.
 *
 * The state file STATE_DIR/ID.json (STATE_DIR: $HEXFLOW_STATE_DIR, else
 * ~/.local/state/hexflow) records what was started:
 *
 *   {"schema": "hexflow.state/1", "plan": ABS_PATH, "model": DIR,
 *    "router_url": "http://127.0.0.1:8000", "started_unix_s": N,
 *    "hosts": [{"name": "h1", "address": "10.0.0.2", "workdir": "...", "local": false}],
 *    "processes": [{"host": "h1", "kind": "worker" | "router", "device": "h1:0",
 *                   "group": "g0", "role": "prefill", "pid": 1234, "port": 8001,
 *                   "log": "WORKDIR/logs/worker-g0-s0-r0.log"}],
 *    "secret_file": "STATE_DIR/ID.secret", "binary": "/usr/bin/hexflow",
 *    "worker_args": "--threads 8"}
 *
 * (the secret kept for `status`, mode 0600). It is written (atomically)
 * before the health wait, so `hexflow stop` can clean up after a launch
 * that was killed, and removed by a rollback or a stop.
 */
#ifndef HX_LAUNCH_H
#define HX_LAUNCH_H

#include <stdio.h>

#include "common/status.h"

typedef struct hx_launch_options {
    const char *plan_path;     /* borrowed */
    const char *model_dir;     /* borrowed */
    const char *binary;        /* NULL: this executable */
    int accept_new_host_keys;
    int dry_run;               /* print the commands per host; run nothing */
    double health_timeout_s;   /* default 180 */
    const char *state_dir;     /* NULL: $HEXFLOW_STATE_DIR or ~/.local/state/hexflow */
    FILE *progress;            /* per-host progress lines; NULL: quiet */
    const char *worker_args;   /* extra arguments for every worker (e.g. "--threads 1") */
} hx_launch_options;

void hx_launch_options_init(hx_launch_options *o);

/*
 * Launches the plan (see above). On success url (caller-owned, cap bytes)
 * gets "http://HOST:PORT". Bad input, found before any host is contacted:
 * HX_EINVAL, HX_EPARSE, HX_ENOENT (plan, model or binary missing), HX_EEXIST
 * (a state file says the plan is running already). Failures at run time
 * (HX_EIO, HX_ETIMEDOUT): every started process is stopped, the state file
 * removed, err names the host and the reason.
 */
hx_status hx_launch_start(const hx_launch_options *o, char *url, size_t cap, hx_err *err);

/*
 * Restarts what is down of a launched plan: every group with a process that
 * exited (a group restarts whole, its ranks run in lockstep: what is left of
 * it is stopped first), and the router when it exited; with groups[0..n)
 * given, those groups whatever their state. The processes are started again
 * as the launch started them (the state file keeps the model, the binary and
 * the worker arguments; the files are already on the hosts), the state file
 * gets their pids, and it waits until the router is healthy (the router
 * reconnects to a restarted group by itself). *restarted: the processes
 * started (0: everything was up). HX_ENOENT when the plan is not launched,
 * HX_EINVAL for a group the plan lacks or a state file of an older launch;
 * a failure to start or to become healthy leaves the rest running.
 */
hx_status hx_launch_restart(const hx_launch_options *o, const char *const *groups, int n_groups,
                            int *restarted, hx_err *err);

/*
 * Stops what the plan's state file lists: SIGTERM, then SIGKILL after
 * grace_s; removes the state file. *stopped gets the processes that were
 * running. No state file: HX_OK with *stopped 0 (idempotent).
 */
hx_status hx_launch_stop(const char *plan_path, const char *state_dir, double grace_s,
                         FILE *progress, int *stopped, hx_err *err);

/*
 * Prints per process: host, kind, device, group, role, up/down, and for
 * workers the requests served (asked of the worker itself). json: one JSON
 * document instead of a table. HX_ENOENT when the plan is not launched.
 */
hx_status hx_launch_status(const char *plan_path, const char *state_dir, int json, FILE *out,
                           hx_err *err);

/* Prints the logs (the last `lines` of each; host NULL: all hosts; follow: tail -f). */
hx_status hx_launch_logs(const char *plan_path, const char *state_dir, const char *host,
                         int lines, int follow, FILE *out, hx_err *err);

#endif /* HX_LAUNCH_H */
