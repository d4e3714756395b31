/* launch.c - deploying a plan; see launch.h. */
#define _XOPEN_SOURCE 700 /* realpath */
#include "launcher/launch.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/file.h"
#include "common/json.h"
#include "launcher/host.h"
#include "planner/model.h"
#include "planner/plan.h"
#include "runtime/deploy.h"
#include "runtime/proto.h"

/* Paths and commands are built in fixed buffers of PATH_MAX / MAX_CMD bytes;
 * what would not fit is refused where it matters (start_command). */
#pragma GCC diagnostic ignored "-Wformat-truncation"

#define CMD_TIMEOUT_S 60.0
#define MAX_CMD 8192

void hx_launch_options_init(hx_launch_options *o)
{
    memset(o, 0, sizeof *o);
    o->health_timeout_s = 180.0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double now_s(void)
{
    return hx_proto_now_ns() / 1e9;
}

/* ---- names and places ------------------------------------------------------------ */

static void state_dir_of(const char *given, char *out, size_t cap)
{
    const char *env = getenv("HEXFLOW_STATE_DIR");
    const char *home = getenv("HOME");
    if (given)
        snprintf(out, cap, "%s", given);
    else if (env && *env)
        snprintf(out, cap, "%s", env);
    else
        snprintf(out, cap, "%s/.local/state/hexflow", home && *home ? home : "/tmp");
}

/* mkdir -p */
static int mkdirs(const char *path)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, 0700) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    return mkdir(buf, 0700) != 0 && errno != EEXIST ? -1 : 0;
}

/* ID: the plan file's name without .json, and a hash of its absolute path. */
static void deployment_id(const char *abs_plan, char *out, size_t cap)
{
    uint64_t h = 1469598103934665603ULL;
    for (const char *p = abs_plan; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    const char *base = strrchr(abs_plan, '/');
    base = base ? base + 1 : abs_plan;
    char name[128];
    snprintf(name, sizeof name, "%s", base);
    char *dot = strrchr(name, '.');
    if (dot && dot != name)
        *dot = '\0';
    for (char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_'))
            *p = '_';
    snprintf(out, cap, "%s-%08llx", name, (unsigned long long)(h & 0xffffffffULL));
}

/* Single-quotes s for /bin/sh. */
static void shq(char *out, size_t cap, const char *s)
{
    size_t n = 0;
    if (cap < 3)
        return;
    out[n++] = '\'';
    for (; *s && n + 5 < cap; s++) {
        if (*s == '\'') {
            memcpy(out + n, "'\\''", 4);
            n += 4;
        } else {
            out[n++] = *s;
        }
    }
    out[n++] = '\'';
    out[n] = '\0';
}

static int is_local(const hx_plan_host *h)
{
    return !h->address || strcmp(h->address, "local") == 0;
}

/* ---- the launch ------------------------------------------------------------------- */

typedef struct proc {
    int host;
    int worker;          /* deploy index; -1 for the router */
    char name[96];       /* log name */
    long pid;            /* 0 until started */
    char log[PATH_MAX];
    int restart;         /* restart: this one is (re)started */
    int dead;            /* its pid is no longer ours (mark_dead; restart: or it has none) */
} proc;

typedef struct host_job {
    struct launch *L;
    int h;
    hx_host *session;
    char workdir[PATH_MAX];
    char bin[PATH_MAX];
    char plan[PATH_MAX];
    char model[PATH_MAX];
    hx_status st;
    hx_err err;
    pthread_t thread;
} host_job;

typedef struct launch {
    const hx_launch_options *o;
    hx_plan *plan;
    hx_deploy dep;
    char abs_plan[PATH_MAX], abs_model[PATH_MAX], self_bin[PATH_MAX];
    char id[200], state_dir[PATH_MAX], state_path[PATH_MAX], secret_path[PATH_MAX];
    hx_proto_secret secret;
    proc *procs;
    int nprocs;
    host_job *jobs; /* [nhosts] */
    pthread_mutex_t mu;
    /* a sharded model: which shards each host needs (model_wanted) */
    int restarting;        /* hx_launch_restart: sessions open, files there, start `restart` ones */
    json_t *index;         /* model.safetensors.index.json; NULL: push every file */
    json_t *weight_map;    /* borrowed from index: tensor name -> shard file */
    int model_layers;
} launch;

static void progress(launch *L, const char *host, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void progress(launch *L, const char *host, const char *fmt, ...)
{
    if (!L->o->progress)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&L->mu);
    fprintf(L->o->progress, "[%s] %s\n", host, line);
    fflush(L->o->progress);
    pthread_mutex_unlock(&L->mu);
}

static void workdir_of(const launch *L, int h, char *out, size_t cap)
{
    const hx_plan_host *ph = &L->plan->hosts[h];
    if (ph->workdir && *ph->workdir)
        snprintf(out, cap, "%s", ph->workdir);
    else if (is_local(ph))
        snprintf(out, cap, "%s/%s/%s", L->state_dir, L->id, ph->name);
    else
        snprintf(out, cap, ".hexflow/%s/%s", L->id, ph->name);
}

/* The shell command that starts process p on its host and prints its pid. */
static int start_command(const launch *L, const host_job *J, const proc *p, char *cmd,
                         size_t cap)
{
    char wd[PATH_MAX + 8], bin[PATH_MAX + 8], plan[PATH_MAX + 8], model[PATH_MAX + 8];
    shq(wd, sizeof wd, J->workdir);
    shq(bin, sizeof bin, J->bin);
    shq(plan, sizeof plan, J->plan);
    shq(model, sizeof model, J->model);
    char args[4 * PATH_MAX];
    if (p->worker >= 0) {
        char dev[256];
        shq(dev, sizeof dev, L->dep.workers[p->worker].device);
        snprintf(args, sizeof args, "worker --plan %s --model %s --device %s %s", plan, model,
                 dev, L->o->worker_args ? L->o->worker_args : "");
    } else {
        snprintf(args, sizeof args, "router --plan %s --model %s", plan, model);
    }
    int n = snprintf(cmd, cap,
                     "cd %s && umask 077 && mkdir -p run logs && cat > run/%s.secret && "
                     "{ setsid %s %s --secret-file run/%s.secret > logs/%s.log 2>&1 "
                     "< /dev/null & echo $! > run/%s.pid; echo $!; }",
                     wd, p->name, bin, args, p->name, p->name, p->name);
    return n > 0 && (size_t)n < cap;
}

/* ---- which model files a host needs ---------------------------------------------------- */

/*
 * A sharded model (model.safetensors.index.json naming each tensor's file)
 * reaches each host only in the shards holding tensors its workers load:
 * their stages' layers, the embedding on a first stage, the final norm and
 * lm_head on a last stage (and the embedding there too when there is no
 * lm_head: tied). Everything else (config, tokenizer, the index, a single
 * model.safetensors, files the index does not name) goes to every host;
 * a host with only the router gets no shard. A 140 GB model split over
 * eight hosts then moves about an eighth of it to each.
 */
static void model_index_load(launch *L)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", L->abs_model);
    hx_model m;
    hx_err e = {0};
    if (!hx_file_is_regular(path) || hx_model_load(L->abs_model, &m, &e) != HX_OK)
        return; /* one file, or a model the workers will refuse with a better message */
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(map)) {
        json_decref(root);
        return;
    }
    L->index = root;
    L->weight_map = map;
    L->model_layers = m.num_layers;
}

/* Whether a worker on host h loads tensor `name`. */
static int host_needs_tensor(const launch *L, int h, const char *name)
{
    int layer = -1, embed = strcmp(name, "model.embed_tokens.weight") == 0;
    int head = strcmp(name, "model.norm.weight") == 0 || strcmp(name, "lm_head.weight") == 0;
    int is_layer = sscanf(name, "model.layers.%d.", &layer) == 1;
    if (!embed && !head && !is_layer)
        return 1; /* a tensor this launcher does not know: wherever the model goes */
    const int tied = !json_object_get(L->weight_map, "lm_head.weight");
    for (int i = 0; i < L->dep.nworkers; i++) {
        const hx_deploy_worker *w = &L->dep.workers[i];
        if (w->host != h)
            continue;
        const hx_plan_stage *st = &L->plan->groups[w->group].stages[w->stage];
        const int first = st->first_layer, end = st->first_layer + st->num_layers;
        if ((is_layer && layer >= first && layer < end) || (embed && first == 0) ||
            ((head || (embed && tied)) && end == L->model_layers))
            return 1;
    }
    return 0;
}

/* Whether host h needs model file `file` (a name in the model directory). */
static int model_wanted(const launch *L, int h, const char *file)
{
    size_t n = strlen(file);
    if (!L->weight_map || n < 12 || strcmp(file + n - 12, ".safetensors") != 0)
        return 1;
    const char *name;
    json_t *v;
    int named = 0;
    json_object_foreach(L->weight_map, name, v) {
        if (!json_is_string(v) || strcmp(json_string_value(v), file) != 0)
            continue;
        named = 1;
        if (host_needs_tensor(L, h, name))
            return 1;
    }
    return !named;
}

/*
 * Removes from the host's model directory the files this model does not
 * have: a model launched earlier into the same workdir would otherwise
 * leave, say, its model.safetensors.index.json, which the workers prefer
 * to this model's own model.safetensors.
 */
static hx_status prune_model_dir(host_job *J, char **files, int n, hx_err *err)
{
    char wd[PATH_MAX + 8], cmd[MAX_CMD];
    shq(wd, sizeof wd, J->workdir);
    snprintf(cmd, sizeof cmd, "ls -1A %s/model 2>/dev/null || true", wd);
    char *out = NULL;
    hx_status st = hx_host_run_checked(J->session, cmd, NULL, 0, &out, CMD_TIMEOUT_S, err);
    if (st != HX_OK)
        return st;
    int len = snprintf(cmd, sizeof cmd, "cd %s/model && rm -f --", wd), stale = 0;
    /* strtok_r, never strtok: every host prunes at once, one thread each, and strtok's one
       hidden position would walk a thread into another host's listing (or a freed one) */
    char *save = NULL;
    for (char *line = out ? strtok_r(out, "\n", &save) : NULL; line && st == HX_OK;
         line = strtok_r(NULL, "\n", &save)) {
        int ours = 0;
        for (int i = 0; i < n && !ours; i++)
            ours = strcmp(files[i], line) == 0;
        if (ours || line[0] == '.') /* a push's temporary file cleans itself up */
            continue;
        char q[PATH_MAX + 8];
        shq(q, sizeof q, line);
        if (len + 1 + (int)strlen(q) + 1 >= (int)sizeof cmd) { /* flush a long list */
            st = hx_host_run_checked(J->session, cmd, NULL, 0, NULL, CMD_TIMEOUT_S, err);
            len = snprintf(cmd, sizeof cmd, "cd %s/model && rm -f --", wd);
        }
        len += snprintf(cmd + len, sizeof cmd - (size_t)len, " %s", q);
        stale++;
    }
    free(out);
    if (st == HX_OK && stale)
        st = hx_host_run_checked(J->session, cmd, NULL, 0, NULL, CMD_TIMEOUT_S, err);
    return st;
}

/* Collects the model directory's files (regular files, one level). -1 with errno set when
 * the directory cannot be read or memory runs out: a partial list would have the prune
 * remove files of this model. */
static int model_files(const char *dir, char ***out)
{
    *out = NULL;
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0, cap = 16;
    char **v = malloc((size_t)cap * sizeof *v);
    int fail = !v;
    struct dirent *e;
    while (!fail && (errno = 0, e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (!hx_file_is_regular(path))
            continue;
        if (n == cap) {
            char **g = realloc(v, (size_t)(cap *= 2) * sizeof *v);
            if (!g) {
                fail = 1;
                break;
            }
            v = g;
        }
        if ((v[n] = strdup(e->d_name)) == NULL)
            fail = 1;
        else
            n++;
    }
    int saved = fail ? ENOMEM : errno; /* readdir: NULL with errno 0 at the end */
    closedir(d);
    if (fail || saved) {
        for (int i = 0; v && i < n; i++)
            free(v[i]);
        free(v);
        errno = saved;
        return -1;
    }
    *out = v;
    return n;
}

/* Opens host J->h (local, or SSH with the plan's settings) into J->session. */
static hx_status open_host(host_job *J, hx_err *err)
{
    launch *L = J->L;
    const hx_plan_host *ph = &L->plan->hosts[J->h];
    if (is_local(ph))
        return hx_host_open_local(ph->name, &J->session, err);
    hx_host_ssh_options so = {ph->name, ph->address, ph->ssh_port, ph->ssh_user,
                              ph->ssh_identity, ph->ssh_known_hosts,
                              L->o->accept_new_host_keys, 10.0};
    progress(L, ph->name, "connecting to %s", ph->address);
    return hx_host_open_ssh(&so, &J->session, err);
}

static void *host_main(void *arg)
{
    host_job *J = arg;
    launch *L = J->L;
    const hx_plan_host *ph = &L->plan->hosts[J->h];
    hx_err *err = &J->err;
    workdir_of(L, J->h, J->workdir, sizeof J->workdir);
    if (is_local(ph)) {
        snprintf(J->bin, sizeof J->bin, "%s", L->self_bin);
        snprintf(J->plan, sizeof J->plan, "%s", L->abs_plan);
        snprintf(J->model, sizeof J->model, "%s", L->abs_model);
    } else {
        snprintf(J->bin, sizeof J->bin, "./hexflow");
        snprintf(J->plan, sizeof J->plan, "plan.json");
        snprintf(J->model, sizeof J->model, "model");
    }
    if (L->o->dry_run) {
        if (!is_local(ph))
            printf("[%s] ssh %s%s%s -p %d: push %s, %s and %s/*%s into %s\n", ph->name,
                   ph->ssh_user ? ph->ssh_user : "", ph->ssh_user ? "@" : "", ph->address,
                   ph->ssh_port ? ph->ssh_port : 22, L->self_bin, L->abs_plan, L->abs_model,
                   L->weight_map ? " (the shards its stages load)" : "", J->workdir);
        for (int i = 0; i < L->nprocs; i++)
            if (L->procs[i].host == J->h) {
                char cmd[MAX_CMD];
                start_command(L, J, &L->procs[i], cmd, sizeof cmd);
                printf("[%s] %s   (stdin: the deployment secret)\n", ph->name, cmd);
            }
        return NULL;
    }
    double t0 = now_s();
    J->st = J->session ? HX_OK : open_host(J, err); /* hx_launch_restart opens them first */
    if (J->st != HX_OK)
        return NULL;
    char wd[PATH_MAX + 8], cmd[MAX_CMD];
    shq(wd, sizeof wd, J->workdir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/run %s/logs", wd, wd);
    if ((J->st = hx_host_run_checked(J->session, cmd, NULL, 0, NULL, CMD_TIMEOUT_S, err)) != HX_OK)
        return NULL;
    if (!is_local(ph) && !L->restarting) {
        char dst[PATH_MAX * 2];
        int skipped = 0, pushed = 0, kept = 0;
        snprintf(dst, sizeof dst, "%s/hexflow", J->workdir);
        if ((J->st = hx_host_push(J->session, L->self_bin, dst, 0755, &skipped, err)) != HX_OK)
            return NULL;
        skipped ? kept++ : pushed++;
        snprintf(dst, sizeof dst, "%s/plan.json", J->workdir);
        if ((J->st = hx_host_push(J->session, L->abs_plan, dst, 0644, &skipped, err)) != HX_OK)
            return NULL;
        skipped ? kept++ : pushed++;
        char **files = NULL;
        int n = model_files(L->abs_model, &files), left_out = 0;
        if (n < 0) {
            J->st = hx_err_set(err, HX_EIO, "cannot list model directory '%s': %s",
                               L->abs_model, strerror(errno));
            return NULL;
        }
        J->st = prune_model_dir(J, files, n, err);
        for (int i = 0; i < n && J->st == HX_OK; i++) {
            char src[PATH_MAX * 2];
            if (!model_wanted(L, J->h, files[i])) {
                left_out++;
                continue;
            }
            snprintf(src, sizeof src, "%s/%s", L->abs_model, files[i]);
            snprintf(dst, sizeof dst, "%s/model/%s", J->workdir, files[i]);
            J->st = hx_host_push(J->session, src, dst, 0644, &skipped, err);
            if (J->st == HX_OK)
                skipped ? kept++ : pushed++;
        }
        for (int i = 0; i < n; i++)
            free(files[i]);
        free(files);
        if (J->st != HX_OK)
            return NULL;
        if (left_out)
            progress(L, ph->name, "files: %d pushed, %d already there, %d model shards its "
                     "stages do not load left out", pushed, kept, left_out);
        else
            progress(L, ph->name, "files: %d pushed, %d already there", pushed, kept);
        /* the workdir paths given to processes are relative to it */
    }
    int count = 0;
    for (int i = 0; i < L->nprocs; i++) {
        proc *p = &L->procs[i];
        if (p->host != J->h || (L->restarting && !p->restart))
            continue;
        count++;
        if (!start_command(L, J, p, cmd, sizeof cmd)) {
            J->st = hx_err_set(err, HX_EINVAL, "host '%s': the command for %s is too long "
                               "(paths over %d bytes)", ph->name, p->name, MAX_CMD);
            return NULL;
        }
        char *out = NULL;
        J->st = hx_host_run_checked(J->session, cmd, L->secret.bytes, L->secret.len, &out,
                                    CMD_TIMEOUT_S, err);
        if (J->st != HX_OK)
            return NULL;
        long pid = strtol(out ? out : "", NULL, 10);
        free(out);
        if (pid <= 0) {
            J->st = hx_err_set(err, HX_EIO, "host '%s': could not start %s (no pid)", ph->name,
                               p->name);
            return NULL;
        }
        pthread_mutex_lock(&L->mu);
        p->pid = pid;
        snprintf(p->log, sizeof p->log, "%s/logs/%s.log", J->workdir, p->name);
        pthread_mutex_unlock(&L->mu);
    }
    if (count)
        progress(L, ph->name, "started %d process%s in %.1f s", count, count == 1 ? "" : "es",
                 now_s() - t0);
    return NULL;
}

/* ---- the state file ------------------------------------------------------------------- */

static hx_status write_state(launch *L, const char *url, hx_err *err)
{
    json_t *root = json_object();
    json_t *hosts = json_array(), *procs = json_array();
    json_object_set_new(root, "schema", json_string("hexflow.state/1"));
    json_object_set_new(root, "plan", json_string(L->abs_plan));
    json_object_set_new(root, "model", json_string(L->abs_model));
    json_object_set_new(root, "router_url", json_string(url));
    json_object_set_new(root, "started_unix_s", json_integer((json_int_t)time(NULL)));
    json_object_set_new(root, "secret_file", json_string(L->secret_path));
    json_object_set_new(root, "binary", json_string(L->self_bin));
    json_object_set_new(root, "worker_args",
                        json_string(L->o->worker_args ? L->o->worker_args : ""));
    for (int h = 0; h < L->plan->nhosts; h++) {
        const hx_plan_host *ph = &L->plan->hosts[h];
        json_array_append_new(hosts, json_pack("{s:s, s:s, s:s, s:b}", "name", ph->name,
                                               "address", ph->address ? ph->address : "local",
                                               "workdir", L->jobs[h].workdir, "local",
                                               is_local(ph)));
    }
    for (int i = 0; i < L->nprocs; i++) {
        const proc *p = &L->procs[i];
        if (p->pid <= 0)
            continue;
        json_t *o = json_pack("{s:s, s:s, s:I, s:s}", "host", L->plan->hosts[p->host].name,
                              "kind", p->worker >= 0 ? "worker" : "router", "pid",
                              (json_int_t)p->pid, "log", p->log);
        if (p->worker >= 0) {
            const hx_deploy_worker *w = &L->dep.workers[p->worker];
            json_object_set_new(o, "device", json_string(w->device));
            json_object_set_new(o, "group", json_string(L->plan->groups[w->group].id));
            json_object_set_new(o, "role",
                                json_string(hx_role_name(L->plan->groups[w->group].role)));
            json_object_set_new(o, "stage", json_integer(w->stage));
            json_object_set_new(o, "rank", json_integer(w->rank));
            json_object_set_new(o, "port", json_integer(w->port));
        } else {
            json_object_set_new(o, "port", json_integer(L->dep.router_port));
        }
        json_array_append_new(procs, o);
    }
    json_object_set_new(root, "hosts", hosts);
    json_object_set_new(root, "processes", procs);
    hx_status st = hx_json_write_file(L->state_path, root, err);
    json_decref(root);
    return st;
}

/* ---- stopping ----------------------------------------------------------------------------- */

/*
 * The shell function `ours PID`: whether PID is still one of our processes, by its command
 * line, which has the `--secret-file run/NAME.secret` that start_command gives every process it
 * starts (whatever the binary is called). Not `kill -0`: after a reboot or a long run the
 * number may belong to anything, and an exited child that nobody has reaped yet (a zombie)
 * still answers kill -0 (its command line is empty).
 */
#define OURS_SH                                                                                    \
    "ours() { tr '\\0' ' ' < /proc/$1/cmdline 2>/dev/null | grep -qF -- '--secret-file run/'; }; "

/* Stops pids[0..n) on host s: TERM, wait up to grace_s, KILL. *alive: how many were running. */
static hx_status stop_pids(hx_host *s, const long *pids, int n, double grace_s, int *alive,
                           hx_err *err)
{
    char list[MAX_CMD] = "";
    size_t k = 0;
    for (int i = 0; i < n && k + 24 < sizeof list; i++)
        k += (size_t)snprintf(list + k, sizeof list - k, " %ld", pids[i]);
    if (!k) {
        *alive = 0;
        return HX_OK;
    }
    char cmd[MAX_CMD * 2 + 512];
    int waits = (int)(grace_s * 10);
    /* a pid is signalled only while it is still ours */
    snprintf(cmd, sizeof cmd,
             OURS_SH
             "n=0; for p in%s; do ours $p && n=$((n+1)) && kill -TERM $p 2>/dev/null; done; "
             "echo $n; i=0; while [ $i -lt %d ]; do left=0; for p in%s; do "
             "ours $p && left=1; done; [ $left = 0 ] && exit 0; sleep 0.1; "
             "i=$((i+1)); done; for p in%s; do ours $p && kill -KILL $p 2>/dev/null; done; exit 0",
             list, waits, list, list);
    char *out = NULL;
    hx_status st = hx_host_run_checked(s, cmd, NULL, 0, &out, grace_s + 30, err);
    *alive = out ? atoi(out) : 0;
    free(out);
    return st;
}

static void rollback(launch *L)
{
    for (int h = 0; h < L->plan->nhosts; h++) {
        host_job *J = &L->jobs[h];
        if (!J->session)
            continue;
        long pids[1024];
        int n = 0;
        for (int i = 0; i < L->nprocs && n < 1024; i++)
            if (L->procs[i].host == h && L->procs[i].pid > 0)
                pids[n++] = L->procs[i].pid;
        int alive = 0;
        hx_err e = {0};
        if (stop_pids(J->session, pids, n, 5.0, &alive, &e) != HX_OK)
            progress(L, L->plan->hosts[h].name, "could not stop its processes: %s", e.msg);
        else if (n)
            progress(L, L->plan->hosts[h].name, "stopped %d process%s", n, n == 1 ? "" : "es");
    }
    unlink(L->state_path);
    unlink(L->secret_path);
}

/* ---- health ------------------------------------------------------------------------------- */

/* GET /health: the HTTP status, or 0 when nobody answers. */
static int http_health(const char *host, int port, char *body, size_t cap)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, ps, &hints, &ai) != 0 || !ai)
        return 0;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int code = 0, connected = 0;
    if (fd >= 0) { /* connect within a second: a host that drops packets must not stall us */
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            connected = 1;
        } else if (errno == EINPROGRESS) {
            struct pollfd pw = {fd, POLLOUT, 0};
            int soerr = 0;
            socklen_t len = sizeof soerr;
            connected = poll(&pw, 1, 1000) == 1 &&
                        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0;
        }
    }
    if (connected) {
        char req[256];
        int n = snprintf(req, sizeof req, "GET /health HTTP/1.1\r\nHost: %s:%d\r\n"
                         "Connection: close\r\n\r\n", host, port);
        if (send(fd, req, (size_t)n, MSG_NOSIGNAL) == n) {
            char buf[4096];
            size_t got = 0;
            struct pollfd p = {fd, POLLIN, 0};
            while (got + 1 < sizeof buf && poll(&p, 1, 2000) > 0) {
                ssize_t r = recv(fd, buf + got, sizeof buf - 1 - got, 0);
                if (r <= 0)
                    break;
                got += (size_t)r;
            }
            buf[got] = '\0';
            if (sscanf(buf, "HTTP/1.%*d %d", &code) != 1)
                code = 0;
            const char *b = strstr(buf, "\r\n\r\n");
            snprintf(body, cap, "%s", b ? b + 4 : "");
        }
    }
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return code;
}

/* The last lines of a process's log, for an error message. */
static void log_tail(hx_host *s, const char *log, char *out, size_t cap)
{
    char q[PATH_MAX + 8], cmd[PATH_MAX + 64];
    shq(q, sizeof q, log);
    snprintf(cmd, sizeof cmd, "tail -n 3 %s 2>/dev/null", q);
    char *text = NULL;
    hx_err e = {0};
    out[0] = '\0';
    if (hx_host_run(s, cmd, NULL, 0, &text, NULL, NULL, 10, &e) == HX_OK && text) {
        size_t n = strlen(text);
        while (n && (text[n - 1] == '\n' || text[n - 1] == '\r'))
            text[--n] = '\0';
        for (char *p = text; *p; p++)
            if (*p == '\n')
                *p = '|';
        snprintf(out, cap, "%s", text);
    }
    free(text);
}

/* " PID PID ..." of host h's started processes into list; its length (0: none). */
static size_t pid_list(const launch *L, int h, char *list, size_t cap)
{
    size_t k = 0;
    list[0] = '\0';
    for (int i = 0; i < L->nprocs && k + 24 < cap; i++)
        if (L->procs[i].host == h && L->procs[i].pid > 0)
            k += (size_t)snprintf(list + k, cap - k, " %ld", L->procs[i].pid);
    return k;
}

/*
 * Asks host h which of its started processes are no longer ours (they exited, or their pid
 * now names another program): procs[i].dead of each of host h's processes is set to that
 * answer (0 for one never started, and for all of them on failure). timeout_s bounds the
 * query.
 */
static hx_status mark_dead(launch *L, int h, double timeout_s, hx_err *err)
{
    for (int i = 0; i < L->nprocs; i++)
        if (L->procs[i].host == h)
            L->procs[i].dead = 0;
    char list[MAX_CMD];
    if (!pid_list(L, h, list, sizeof list))
        return HX_OK;
    char cmd[MAX_CMD + 256];
    snprintf(cmd, sizeof cmd, OURS_SH "for p in%s; do ours $p || echo $p; done", list);
    char *out = NULL;
    hx_status st = hx_host_run_checked(L->jobs[h].session, cmd, NULL, 0, &out, timeout_s, err);
    if (st != HX_OK)
        return st;
    char *save = NULL;
    for (char *line = out ? strtok_r(out, "\n", &save) : NULL; line;
         line = strtok_r(NULL, "\n", &save)) {
        long pid = strtol(line, NULL, 10);
        for (int i = 0; pid > 0 && i < L->nprocs; i++)
            if (L->procs[i].host == h && L->procs[i].pid == pid)
                L->procs[i].dead = 1;
    }
    free(out);
    return HX_OK;
}

static hx_status wait_healthy(launch *L, const char *url_host, hx_err *err)
{
    double t0 = now_s(), next_check = t0 + 0.5;
    char body[4096] = "";
    for (;;) {
        int code = http_health(url_host, L->dep.router_port, body, sizeof body);
        if (code == 200)
            return HX_OK;
        if (now_s() >= next_check) {
            for (int h = 0; h < L->plan->nhosts; h++) {
                hx_err e = {0};
                if (mark_dead(L, h, 20, &e) != HX_OK)
                    continue; /* no answer this time: ask again at the next check */
                for (int i = 0; i < L->nprocs; i++)
                    if (L->procs[i].host == h && L->procs[i].dead) {
                        char tail[1024];
                        log_tail(L->jobs[h].session, L->procs[i].log, tail, sizeof tail);
                        return hx_err_set(err, HX_EIO,
                                          "host '%s': %s exited during start-up: %s",
                                          L->plan->hosts[h].name, L->procs[i].name,
                                          tail[0] ? tail : "(no log)");
                    }
            }
            next_check = now_s() + 1.0;
        }
        if (now_s() - t0 > L->o->health_timeout_s) {
            body[strcspn(body, "\r\n")] = '\0';
            return hx_err_set(err, HX_ETIMEDOUT,
                              "the deployment did not become healthy in %.0f s (router: %s)",
                              L->o->health_timeout_s,
                              code ? body : "not answering on its port");
        }
        sleep_ms(200);
    }
}

static hx_status paths_of(const char *plan_path, const char *state_dir, char *abs_plan,
                          char *sdir, char *id, size_t id_cap, char *state_path, hx_err *err)
{
    if (!realpath(plan_path, abs_plan))
        return hx_err_set(err, HX_ENOENT, "cannot open plan '%s': %s", plan_path,
                          strerror(errno));
    state_dir_of(state_dir, sdir, PATH_MAX);
    deployment_id(abs_plan, id, id_cap);
    snprintf(state_path, PATH_MAX, "%s/%s.json", sdir, id);
    return HX_OK;
}

/*
 * What launch and restart share: the paths, the plan and its deployment, the
 * model's index, and the processes (workers in plan order, the router last)
 * with a job per host. Frees nothing on failure (launch_release does).
 */
static hx_status launch_setup(launch *L, const hx_launch_options *o, hx_err *err)
{
    L->o = o;
    hx_status st;
    if ((st = paths_of(o->plan_path, o->state_dir, L->abs_plan, L->state_dir, L->id,
                       sizeof L->id, L->state_path, err)) != HX_OK)
        return st;
    snprintf(L->secret_path, sizeof L->secret_path, "%s/%s.secret", L->state_dir, L->id);
    if (!realpath(o->model_dir, L->abs_model))
        return hx_err_set(err, HX_ENOENT, "cannot open model directory '%s': %s",
                          o->model_dir, strerror(errno));
    if (!hx_file_is_dir(L->abs_model))
        return hx_err_set(err, HX_ENOENT, "model '%s' is not a directory", o->model_dir);
    if (o->binary ? !realpath(o->binary, L->self_bin)
                  : readlink("/proc/self/exe", L->self_bin, sizeof L->self_bin - 1) < 0)
        return hx_err_set(err, HX_ENOENT, "cannot find the hexflow binary '%s'",
                          o->binary ? o->binary : "/proc/self/exe");
    if ((st = hx_plan_load_err(L->abs_plan, &L->plan, err)) != HX_OK)
        return st;
    if ((st = hx_deploy_init(&L->dep, L->plan, err)) != HX_OK)
        return st;
    model_index_load(L);
    /* the processes: workers in plan order, the router last */
    L->nprocs = L->dep.nworkers + 1;
    L->procs = calloc((size_t)L->nprocs, sizeof *L->procs);
    L->jobs = calloc((size_t)L->plan->nhosts, sizeof *L->jobs);
    if (!L->procs || !L->jobs)
        return hx_err_set(err, HX_ENOMEM, "out of memory");
    for (int i = 0; i < L->dep.nworkers; i++) {
        const hx_deploy_worker *w = &L->dep.workers[i];
        L->procs[i].host = w->host;
        L->procs[i].worker = i;
        snprintf(L->procs[i].name, sizeof L->procs[i].name, "worker-%s-s%d-r%d",
                 L->plan->groups[w->group].id, w->stage, w->rank);
    }
    proc *rp = &L->procs[L->dep.nworkers];
    rp->host = hx_plan_find_host(L->plan, L->plan->router_host ? L->plan->router_host : "");
    if (rp->host < 0)
        rp->host = 0;
    rp->worker = -1;
    snprintf(rp->name, sizeof rp->name, "router");
    return HX_OK;
}

static void launch_release(launch *L)
{
    if (L->jobs)
        for (int h = 0; h < (L->plan ? L->plan->nhosts : 0); h++)
            hx_host_close(L->jobs[h].session);
    free(L->jobs);
    free(L->procs);
    json_decref(L->index);
    hx_deploy_release(&L->dep);
    hx_plan_free(L->plan);
    hx_proto_secret_release(&L->secret);
    pthread_mutex_destroy(&L->mu);
}

hx_status hx_launch_start(const hx_launch_options *o, char *url, size_t cap, hx_err *err)
{
    launch L_;
    launch *L = &L_;
    memset(L, 0, sizeof *L);
    pthread_mutex_init(&L->mu, NULL);
    hx_status st = launch_setup(L, o, err);
    if (st != HX_OK)
        goto out;
    if (!o->dry_run && hx_file_is_regular(L->state_path)) {
        st = hx_err_set(err, HX_EEXIST,
                        "plan '%s' is running already (state file %s); 'hexflow stop --plan %s' "
                        "first",
                        o->plan_path, L->state_path, o->plan_path);
        goto out;
    }
    const char *url_host = L->dep.router_address;
    snprintf(url, cap, "http://%s:%d", url_host, L->dep.router_port);

    if (!o->dry_run) {
        if (mkdirs(L->state_dir) != 0) {
            st = hx_err_set(err, HX_EIO, "cannot create state directory '%s': %s", L->state_dir,
                            strerror(errno));
            goto out;
        }
        if ((st = hx_proto_secret_generate(&L->secret, err)) != HX_OK ||
            (st = hx_proto_secret_write_file(L->secret_path, &L->secret, err)) != HX_OK)
            goto out;
    }
    for (int h = 0; h < L->plan->nhosts; h++) {
        L->jobs[h].L = L;
        L->jobs[h].h = h;
        if (pthread_create(&L->jobs[h].thread, NULL, host_main, &L->jobs[h]) != 0) {
            L->jobs[h].st = hx_err_set(&L->jobs[h].err, HX_ENOMEM, "cannot start a thread");
            L->jobs[h].thread = 0;
        }
    }
    for (int h = 0; h < L->plan->nhosts; h++)
        if (L->jobs[h].thread)
            pthread_join(L->jobs[h].thread, NULL);
    if (o->dry_run) {
        st = HX_OK;
        goto out;
    }
    for (int h = 0; h < L->plan->nhosts; h++)
        if (L->jobs[h].st != HX_OK) {
            /* whatever went wrong on a host is a failure at run time */
            st = L->jobs[h].st == HX_ETIMEDOUT ? HX_ETIMEDOUT : HX_EIO;
            *err = L->jobs[h].err;
            err->code = st;
            if (!strstr(err->msg, L->plan->hosts[h].name)) {
                char m[sizeof err->msg];
                snprintf(m, sizeof m, "host '%s': %s", L->plan->hosts[h].name, err->msg);
                snprintf(err->msg, sizeof err->msg, "%s", m);
            }
            rollback(L);
            goto out;
        }
    if ((st = write_state(L, url, err)) != HX_OK) {
        rollback(L);
        goto out;
    }
    progress(L, "launch", "waiting for every group to connect to the router at %s", url);
    double t0 = now_s();
    if ((st = wait_healthy(L, url_host, err)) != HX_OK) {
        rollback(L);
        goto out;
    }
    progress(L, "launch", "healthy after %.1f s", now_s() - t0);

out:
    launch_release(L);
    return st;
}

/* ---- stop, status, logs ----------------------------------------------------------------- */

typedef struct state {
    json_t *root;
    char path[PATH_MAX];
    char abs_plan[PATH_MAX];
    hx_plan *plan; /* the plan as it is now (SSH settings), NULL when it no longer loads:
                      the state file suffices otherwise */
} state;

static void state_release(state *s)
{
    hx_plan_free(s->plan);
    json_decref(s->root);
}

static hx_status state_load(const char *plan_path, const char *state_dir, state *s,
                            hx_err *err)
{
    char sdir[PATH_MAX], id[200];
    memset(s, 0, sizeof *s);
    hx_status st = paths_of(plan_path, state_dir, s->abs_plan, sdir, id, sizeof id, s->path, err);
    if (st != HX_OK)
        return st;
    if (!hx_file_is_regular(s->path))
        return hx_err_set(err, HX_ENOENT, "plan '%s' is not launched (no state file %s)",
                          plan_path, s->path);
    if ((st = hx_json_load_file(s->path, "state file", &s->root, err)) != HX_OK)
        return st;
    hx_err ignored = {0};
    hx_plan_load_err(s->abs_plan, &s->plan, &ignored);
    return HX_OK;
}

/* Opens the host named `name` as the state file recorded it (plan for SSH settings). */
static hx_status open_state_host(const state *s, const hx_plan *plan, json_t *hj, hx_host **out,
                                 hx_err *err)
{
    const char *name = json_string_value(json_object_get(hj, "name"));
    int local = json_is_true(json_object_get(hj, "local"));
    if (!name)
        return hx_err_set(err, HX_EPARSE, "state file %s: a host without a name", s->path);
    if (local)
        return hx_host_open_local(name, out, err);
    int h = plan ? hx_plan_find_host(plan, name) : -1;
    const hx_plan_host *ph = h >= 0 ? &plan->hosts[h] : NULL;
    hx_host_ssh_options so = {name, json_string_value(json_object_get(hj, "address")),
                              ph ? ph->ssh_port : 22, ph ? ph->ssh_user : NULL,
                              ph ? ph->ssh_identity : NULL, ph ? ph->ssh_known_hosts : NULL, 0,
                              10.0};
    return hx_host_open_ssh(&so, out, err);
}

hx_status hx_launch_stop(const char *plan_path, const char *state_dir, double grace_s,
                         FILE *progress_fp, int *stopped, hx_err *err)
{
    state s;
    *stopped = 0;
    hx_status st = state_load(plan_path, state_dir, &s, err);
    if (st == HX_ENOENT && s.path[0] && !hx_file_is_regular(s.path))
        return HX_OK; /* nothing running */
    if (st != HX_OK)
        return st;
    const hx_plan *plan = s.plan;
    json_t *hosts = json_object_get(s.root, "hosts"), *procs = json_object_get(s.root, "processes");
    size_t i;
    json_t *hj;
    hx_status first = HX_OK;
    json_array_foreach(hosts, i, hj) {
        const char *name = json_string_value(json_object_get(hj, "name"));
        long pids[1024];
        int n = 0;
        size_t k;
        json_t *pj;
        json_array_foreach(procs, k, pj) {
            const char *ph = json_string_value(json_object_get(pj, "host"));
            if (ph && name && strcmp(ph, name) == 0 && n < 1024)
                pids[n++] = (long)json_integer_value(json_object_get(pj, "pid"));
        }
        if (!n)
            continue;
        hx_host *h = NULL;
        hx_err e = {0};
        int alive = 0;
        st = open_state_host(&s, plan, hj, &h, &e);
        if (st == HX_OK)
            st = stop_pids(h, pids, n, grace_s, &alive, &e);
        hx_host_close(h);
        if (st != HX_OK) {
            if (first == HX_OK) {
                first = st;
                hx_err_set(err, st, "host '%s': %s", name, e.msg);
            }
            continue;
        }
        *stopped += alive;
        if (progress_fp && alive == n)
            fprintf(progress_fp, "[%s] stopped %d process%s\n", name, n, n == 1 ? "" : "es");
        else if (progress_fp)
            fprintf(progress_fp, "[%s] stopped %d of %d processes (the others had exited)\n",
                    name, alive, n);
    }
    if (first == HX_OK) {
        const char *secret = json_string_value(json_object_get(s.root, "secret_file"));
        if (secret)
            unlink(secret);
        unlink(s.path);
    }
    state_release(&s);
    return first;
}

/* ---- restart ------------------------------------------------------------------------------ */

hx_status hx_launch_restart(const hx_launch_options *o, const char *const *groups, int n_groups,
                            int *restarted, hx_err *err)
{
    *restarted = 0;
    state s;
    hx_status st = state_load(o->plan_path, o->state_dir, &s, err);
    if (st != HX_OK)
        return st;
    const char *model = json_string_value(json_object_get(s.root, "model"));
    const char *binary = json_string_value(json_object_get(s.root, "binary"));
    const char *wargs = json_string_value(json_object_get(s.root, "worker_args"));
    const char *url = json_string_value(json_object_get(s.root, "router_url"));
    const char *secret = json_string_value(json_object_get(s.root, "secret_file"));
    if (!model || !binary || !wargs || !url || !secret) {
        st = hx_err_set(err, HX_EINVAL,
                        "state file %s lacks what a restart needs (a launch of an older "
                        "hexflow?): 'hexflow stop --plan %s', then launch again",
                        s.path, o->plan_path);
        state_release(&s);
        return st;
    }
    hx_launch_options oo = *o;
    oo.model_dir = model;
    oo.binary = binary;
    oo.worker_args = wargs[0] ? wargs : NULL;
    oo.dry_run = 0;
    launch L_;
    launch *L = &L_;
    memset(L, 0, sizeof *L);
    pthread_mutex_init(&L->mu, NULL);
    if ((st = launch_setup(L, &oo, err)) != HX_OK)
        goto out;
    for (int k = 0; k < n_groups; k++)
        if (hx_plan_find_group(L->plan, groups[k]) < 0) {
            st = hx_err_set(err, HX_EINVAL, "plan '%s' has no group '%s'", o->plan_path,
                            groups[k]);
            goto out;
        }
    if ((st = hx_proto_secret_load_file(secret, &L->secret, err)) != HX_OK)
        goto out;
    snprintf(L->secret_path, sizeof L->secret_path, "%s", secret);
    /* what the state file says is running */
    json_t *pj;
    size_t k;
    json_array_foreach(json_object_get(s.root, "processes"), k, pj) {
        const char *kind = json_string_value(json_object_get(pj, "kind"));
        const char *device = json_string_value(json_object_get(pj, "device"));
        const char *log = json_string_value(json_object_get(pj, "log"));
        int i = kind && strcmp(kind, "router") == 0 ? L->dep.nworkers
                : device                            ? hx_deploy_find_device(&L->dep, device)
                                                    : -1;
        if (i < 0)
            continue;
        L->procs[i].pid = (long)json_integer_value(json_object_get(pj, "pid"));
        snprintf(L->procs[i].log, sizeof L->procs[i].log, "%s", log ? log : "");
    }
    for (int h = 0; h < L->plan->nhosts && st == HX_OK; h++) {
        host_job *J = &L->jobs[h];
        J->L = L;
        J->h = h;
        workdir_of(L, h, J->workdir, sizeof J->workdir);
        int used = 0;
        for (int i = 0; i < L->nprocs; i++)
            used |= L->procs[i].host == h;
        if (!used)
            continue;
        if ((st = open_host(J, &J->err)) == HX_OK)
            st = mark_dead(L, h, CMD_TIMEOUT_S, &J->err);
        if (st != HX_OK)
            hx_err_set(err, st, "host '%s': %s", L->plan->hosts[h].name, J->err.msg);
    }
    if (st != HX_OK)
        goto out;
    /* the groups to restart: those named, else those with a process down (dead, or not in
       the state file: never started); the router too when it is down */
    for (int i = 0; i < L->nprocs; i++)
        L->procs[i].dead |= L->procs[i].pid <= 0;
    int n = 0;
    for (int i = 0; i < L->dep.nworkers; i++) {
        const int g = L->dep.workers[i].group;
        int pick = 0;
        if (n_groups)
            for (int q = 0; q < n_groups; q++)
                pick |= strcmp(L->plan->groups[g].id, groups[q]) == 0;
        else
            for (int j = 0; j < L->dep.nworkers; j++)
                pick |= L->dep.workers[j].group == g && L->procs[j].dead;
        L->procs[i].restart = pick;
        n += pick;
    }
    L->procs[L->dep.nworkers].restart = L->procs[L->dep.nworkers].dead;
    n += L->procs[L->dep.nworkers].dead;
    if (!n) {
        progress(L, "restart", "every process of '%s' is up: nothing to restart",
                 o->plan_path);
        goto out;
    }
    /* a group restarts whole (its ranks run in lockstep): stop what is left of it */
    for (int h = 0; h < L->plan->nhosts && st == HX_OK; h++) {
        long pids[1024];
        int m = 0, alive = 0;
        for (int i = 0; i < L->nprocs && m < 1024; i++)
            if (L->procs[i].host == h && L->procs[i].restart && L->procs[i].pid > 0)
                pids[m++] = L->procs[i].pid;
        if (m && (st = stop_pids(L->jobs[h].session, pids, m, 5.0, &alive, err)) != HX_OK)
            hx_err_set(err, st, "host '%s': cannot stop %d process%s: %s",
                       L->plan->hosts[h].name, m, m == 1 ? "" : "es", err->msg);
    }
    for (int i = 0; i < L->nprocs && st == HX_OK; i++)
        if (L->procs[i].restart) {
            L->procs[i].pid = 0;
            const int g = L->procs[i].worker >= 0 ? L->dep.workers[L->procs[i].worker].group : -1;
            progress(L, L->plan->hosts[L->procs[i].host].name, "restarting %s%s%s%s",
                     L->procs[i].name, g >= 0 ? " (group '" : "",
                     g >= 0 ? L->plan->groups[g].id : "", g >= 0 ? "')" : "");
        }
    if (st != HX_OK)
        goto out;
    L->restarting = 1;
    for (int h = 0; h < L->plan->nhosts; h++) {
        host_job *J = &L->jobs[h];
        if (!J->session)
            continue;
        if (pthread_create(&J->thread, NULL, host_main, J) != 0) {
            J->st = hx_err_set(&J->err, HX_ENOMEM, "cannot start a thread");
            J->thread = 0;
        }
    }
    for (int h = 0; h < L->plan->nhosts; h++)
        if (L->jobs[h].thread)
            pthread_join(L->jobs[h].thread, NULL);
    for (int h = 0; h < L->plan->nhosts && st == HX_OK; h++)
        if (L->jobs[h].session && L->jobs[h].st != HX_OK) {
            st = L->jobs[h].st == HX_ETIMEDOUT ? HX_ETIMEDOUT : HX_EIO;
            hx_err_set(err, st, "host '%s': %s", L->plan->hosts[h].name, L->jobs[h].err.msg);
        }
    /* the state file lists what runs now, whatever happened */
    hx_err werr = {0};
    if (write_state(L, url, &werr) != HX_OK && st == HX_OK) {
        st = werr.code;
        *err = werr;
    }
    if (st == HX_OK) {
        double t0 = now_s();
        progress(L, "restart", "waiting for every group to connect to the router at %s", url);
        if ((st = wait_healthy(L, L->dep.router_address, err)) == HX_OK)
            progress(L, "restart", "healthy after %.1f s", now_s() - t0);
    }
    if (st == HX_OK)
        *restarted = n;
out:
    launch_release(L);
    state_release(&s);
    return st;
}

/* Requests a worker has served, by asking it; -1 when it does not answer. */
static long long worker_served(const char *address, int port, const hx_proto_secret *secret)
{
    hx_proto_conn *c = NULL;
    hx_err e = {0};
    long long n = -1;
    if (hx_proto_connect(address, port, secret, "launcher", hx_proto_deadline_in(3.0), &c, &e) !=
        HX_OK)
        return -1;
    hx_proto_frame f;
    hx_proto_health h;
    if (hx_proto_send_health(c, 1, hx_proto_deadline_in(3.0), &e) == HX_OK &&
        hx_proto_recv(c, &f, hx_proto_deadline_in(3.0), &e) == HX_OK &&
        hx_proto_decode_health_ok(&f, &h, &e) == HX_OK)
        n = (long long)h.requests_done;
    hx_proto_close(c);
    return n;
}

hx_status hx_launch_status(const char *plan_path, const char *state_dir, int json, FILE *out,
                           hx_err *err)
{
    state s;
    hx_status st = state_load(plan_path, state_dir, &s, err);
    if (st != HX_OK)
        return st;
    const hx_plan *plan = s.plan;
    hx_err perr = {0};
    hx_proto_secret secret;
    const char *sf = json_string_value(json_object_get(s.root, "secret_file"));
    int have_secret = sf && hx_proto_secret_load_file(sf, &secret, &perr) == HX_OK;
    json_t *hosts = json_object_get(s.root, "hosts"), *procs = json_object_get(s.root, "processes");
    json_t *rows = json_array();
    size_t i;
    json_t *hj;
    json_array_foreach(hosts, i, hj) {
        const char *name = json_string_value(json_object_get(hj, "name"));
        const char *addr = json_string_value(json_object_get(hj, "address"));
        hx_host *h = NULL;
        hx_err e = {0};
        hx_status hs = open_state_host(&s, plan, hj, &h, &e);
        size_t k;
        json_t *pj;
        json_array_foreach(procs, k, pj) {
            const char *ph = json_string_value(json_object_get(pj, "host"));
            if (!ph || !name || strcmp(ph, name) != 0)
                continue;
            long pid = (long)json_integer_value(json_object_get(pj, "pid"));
            int up = 0;
            if (hs == HX_OK) {
                char cmd[64];
                int code = -1;
                snprintf(cmd, sizeof cmd, "kill -0 %ld 2>/dev/null", pid);
                if (hx_host_run(h, cmd, NULL, 0, NULL, NULL, &code, 10, &e) == HX_OK)
                    up = code == 0;
            }
            json_t *row = json_deep_copy(pj);
            json_object_set_new(row, "up", json_boolean(up));
            if (hs != HX_OK)
                json_object_set_new(row, "error", json_string(e.msg));
            const char *kind = json_string_value(json_object_get(pj, "kind"));
            if (up && have_secret && kind && strcmp(kind, "worker") == 0) {
                const char *a = addr && strcmp(addr, "local") != 0 ? addr : "127.0.0.1";
                long long served =
                    worker_served(a, (int)json_integer_value(json_object_get(pj, "port")), &secret);
                if (served >= 0)
                    json_object_set_new(row, "requests_served", json_integer(served));
            }
            json_array_append_new(rows, row);
        }
        hx_host_close(h);
    }
    if (json) {
        json_t *doc = json_pack("{s:s, s:O, s:O}", "plan", s.abs_plan, "router_url",
                                json_object_get(s.root, "router_url"), "processes", rows);
        char *text = json_dumps(doc, JSON_INDENT(2));
        fprintf(out, "%s\n", text ? text : "{}");
        free(text);
        json_decref(doc);
    } else {
        fprintf(out, "router: %s\n", json_string_value(json_object_get(s.root, "router_url")));
        fprintf(out, "%-16s %-7s %-16s %-10s %-8s %-5s %8s %s\n", "HOST", "KIND", "DEVICE",
                "GROUP", "ROLE", "STATE", "SERVED", "PID");
        json_t *row;
        json_array_foreach(rows, i, row) {
            json_t *sv = json_object_get(row, "requests_served");
            char served[32] = "-";
            if (sv)
                snprintf(served, sizeof served, "%lld", (long long)json_integer_value(sv));
            const char *dev = json_string_value(json_object_get(row, "device"));
            const char *grp = json_string_value(json_object_get(row, "group"));
            const char *role = json_string_value(json_object_get(row, "role"));
            fprintf(out, "%-16s %-7s %-16s %-10s %-8s %-5s %8s %lld\n",
                    json_string_value(json_object_get(row, "host")),
                    json_string_value(json_object_get(row, "kind")), dev ? dev : "-",
                    grp ? grp : "-", role ? role : "-",
                    json_is_true(json_object_get(row, "up")) ? "up" : "down", served,
                    (long long)json_integer_value(json_object_get(row, "pid")));
        }
    }
    json_decref(rows);
    if (have_secret)
        hx_proto_secret_release(&secret);
    state_release(&s);
    return HX_OK;
}

/* One log being followed. */
typedef struct follow_log {
    int host;        /* index into the open sessions */
    char path[PATH_MAX];
    char label[160]; /* "host/process" */
    long long size;  /* bytes printed so far */
} follow_log;

/* Prints what was appended to f since the last call; returns 0 when the host failed. */
static int follow_once(hx_host *h, follow_log *f, FILE *out, const char **last)
{
    char q[PATH_MAX + 8], cmd[2 * PATH_MAX + 256];
    shq(q, sizeof q, f->path);
    snprintf(cmd, sizeof cmd,
             "s=$(wc -c < %s 2>/dev/null || echo 0); echo $s; "
             "if [ $s -gt %lld ]; then tail -c +%lld %s | head -c $((s-%lld)); fi",
             q, f->size, f->size + 1, q, f->size);
    char *text = NULL;
    hx_err e = {0};
    if (hx_host_run(h, cmd, NULL, 0, &text, NULL, NULL, 30, &e) != HX_OK)
        return 0;
    char *nl = text ? strchr(text, '\n') : NULL;
    if (nl) {
        long long size = atoll(text);
        if (size < f->size) /* truncated or replaced: start again */
            f->size = 0;
        else if (size > f->size && nl[1]) {
            if (*last != f->label)
                fprintf(out, "==> %s <==\n", f->label);
            *last = f->label;
            fputs(nl + 1, out);
            fflush(out);
            f->size = size;
        }
    }
    free(text);
    return 1;
}

hx_status hx_launch_logs(const char *plan_path, const char *state_dir, const char *host,
                         int lines, int follow, FILE *out, hx_err *err)
{
    state s;
    hx_status st = state_load(plan_path, state_dir, &s, err);
    if (st != HX_OK)
        return st;
    const hx_plan *plan = s.plan;
    json_t *hosts = json_object_get(s.root, "hosts"), *procs = json_object_get(s.root, "processes");
    size_t nh = json_array_size(hosts), np = json_array_size(procs);
    hx_host **sessions = calloc(nh ? nh : 1, sizeof *sessions);
    follow_log *logs = calloc(np ? np : 1, sizeof *logs);
    int nlogs = 0, found = 0;
    if (!sessions || !logs) {
        st = hx_err_set(err, HX_ENOMEM, "out of memory");
        goto out;
    }
    size_t i;
    json_t *hj;
    json_array_foreach(hosts, i, hj) {
        const char *name = json_string_value(json_object_get(hj, "name"));
        if (host && (!name || strcmp(host, name) != 0))
            continue;
        found = 1;
        char files[MAX_CMD] = "";
        size_t k, n = 0;
        json_t *pj;
        json_array_foreach(procs, k, pj) {
            const char *ph = json_string_value(json_object_get(pj, "host"));
            const char *log = json_string_value(json_object_get(pj, "log"));
            if (!ph || !log || strcmp(ph, name) != 0 || n + PATH_MAX + 8 >= sizeof files)
                continue;
            char q[PATH_MAX + 8];
            shq(q, sizeof q, log);
            n += (size_t)snprintf(files + n, sizeof files - n, " %s", q);
            follow_log *f = &logs[nlogs++];
            f->host = (int)i;
            snprintf(f->path, sizeof f->path, "%s", log);
            const char *base = strrchr(log, '/');
            snprintf(f->label, sizeof f->label, "%s/%s", name, base ? base + 1 : log);
        }
        if (!n)
            continue;
        hx_err e = {0};
        if ((st = open_state_host(&s, plan, hj, &sessions[i], &e)) != HX_OK) {
            hx_err_set(err, st, "host '%s': %s", name, e.msg);
            goto out;
        }
        char cmd[MAX_CMD + 64];
        snprintf(cmd, sizeof cmd, "tail -n %d%s", lines > 0 ? lines : 50, files);
        char *text = NULL;
        st = hx_host_run(sessions[i], cmd, NULL, 0, &text, NULL, NULL, 30, &e);
        if (st == HX_OK)
            fprintf(out, "==== host %s ====\n%s", name, text ? text : "");
        else
            hx_err_set(err, st, "host '%s': %s", name, e.msg);
        free(text);
        if (st != HX_OK)
            goto out;
        /* following starts from the end of what exists now */
        for (int l = 0; l < nlogs; l++)
            if (logs[l].host == (int)i) {
                char q[PATH_MAX + 8], c2[PATH_MAX + 64];
                shq(q, sizeof q, logs[l].path);
                snprintf(c2, sizeof c2, "wc -c < %s 2>/dev/null || echo 0", q);
                char *sz = NULL;
                if (hx_host_run(sessions[i], c2, NULL, 0, &sz, NULL, NULL, 30, &e) == HX_OK && sz)
                    logs[l].size = atoll(sz);
                free(sz);
            }
    }
    if (host && !found) {
        st = hx_err_set(err, HX_EINVAL, "no host '%s' in the launched plan", host);
        goto out;
    }
    fflush(out);
    const char *last = NULL;
    while (follow) { /* until interrupted (Ctrl-C) or a host goes away */
        sleep_ms(500);
        for (int l = 0; l < nlogs; l++)
            if (sessions[logs[l].host] && !follow_once(sessions[logs[l].host], &logs[l], out, &last)) {
                st = hx_err_set(err, HX_ECONN, "lost the connection to host of %s", logs[l].label);
                goto out;
            }
    }
out:
    for (size_t h = 0; sessions && h < nh; h++)
        hx_host_close(sessions[h]);
    free(sessions);
    free(logs);
    state_release(&s);
    return st;
}
