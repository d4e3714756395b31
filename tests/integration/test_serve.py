#!/usr/bin/env python3
"""End-to-end serving on this machine: `hexflow launch` of hand-written local
plans (CPU devices), completions through the router compared with
`hexflow generate`, concurrency, bad requests, and a decode worker killed in
the middle of requests.

usage: test_serve.py HEXFLOW   (run by CTest; needs nothing but python3)
"""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="hx-serve-")
ENV = dict(os.environ, HEXFLOW_STATE_DIR=os.path.join(TMP, "state"), HEXFLOW_LOG="warn")
MODEL = os.path.join(TMP, "model")
# below the kernel's ephemeral ports (32768-60999), which outgoing connections take
PORT = 20000 + (os.getpid() * 7) % 12000
PROMPTS = ["The quick brown fox", "hello world", "a", "Once upon a time, in a land far away"]
MAX_TOKENS = 24
passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
        print("ok   " + what, flush=True)
    else:
        failed += 1
        print("FAIL " + what, flush=True)
    return cond


def hx(*args, timeout=300):
    return subprocess.run([HX, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def reference(prompt, max_tokens=MAX_TOKENS):
    r = hx("generate", "--model", MODEL, "--prompt", prompt, "--max-tokens", str(max_tokens),
           "--temperature", "0", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tokens"]


def write_plan(name, port, groups, routes):
    plan = {"schema": "hexflow.plan/1",
            "hosts": [{"name": "local", "address": "local"}],
            "router": {"host": "local", "port": port},
            "groups": groups, "routes": routes}
    path = os.path.join(TMP, name + ".json")
    with open(path, "w") as f:
        json.dump(plan, f)
    return path


def stage(first, n, devices):
    return {"first_layer": first, "num_layers": n, "devices": ["local:%d" % d for d in devices]}


def launch(plan, *extra):
    # the CPU backend explicitly: on a machine with a GPU, auto would take it
    r = hx("launch", "--plan", plan, "--model", MODEL, "--worker-args",
           "--threads 1 --backend cpu", "--timeout", "120", *extra)
    if r.returncode != 0:
        print(r.stderr)
        return None
    url = r.stdout.strip().splitlines()[-1]
    assert url.startswith("http://"), url
    host, port = url[len("http://"):].rsplit(":", 1)
    return host, int(port)


def state_of(plan):
    sdir = ENV["HEXFLOW_STATE_DIR"]
    for name in os.listdir(sdir):
        if name.endswith(".json"):
            with open(os.path.join(sdir, name)) as f:
                st = json.load(f)
            if st["plan"] == os.path.realpath(plan):
                return st
    return None


def request(addr, method, path, body=None, timeout=60):
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    c.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read().decode("utf-8", "replace")
    c.close()
    return r.status, data


def complete(addr, prompt, max_tokens=MAX_TOKENS):
    status, data = request(addr, "POST", "/v1/completions",
                           {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    if status != 200:
        return status, data
    return status, json.loads(data)["choices"][0]["token_ids"]


def stream(addr, prompt, max_tokens, on_first=None, timeout=120):
    """Streams a completion; returns (token ids, error message or None)."""
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    c.request("POST", "/v1/completions",
              body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        return [], "HTTP %d: %s" % (r.status, r.read()[:300])
    ids, error, first = [], None, True
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            error = chunk["error"].get("message", "error")
            continue
        ids += chunk["choices"][0].get("token_ids", [])
        if first and on_first:
            on_first()
        first = False
    c.close()
    return ids, error


def metric(addr, name):
    """The sum of a Prometheus metric's samples (every label set) at /metrics."""
    status, body = request(addr, "GET", "/metrics")
    assert status == 200, body
    return sum(float(line.split()[-1]) for line in body.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def stop(plan):
    r = hx("stop", "--plan", plan)
    return r.returncode == 0


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of an exited child still answers kill -0: look at its state
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def sanitizer_reports():
    """Lines of AddressSanitizer / UBSan / LeakSanitizer reports in any process log."""
    found = []
    for root, _, files in os.walk(TMP):  # launched workers, and those started by hand
        for name in files:
            if name.endswith(".log"):
                with open(os.path.join(root, name), errors="replace") as f:
                    for line in f:
                        if "Sanitizer" in line or "runtime error:" in line:
                            found.append(name + ": " + line.strip())
    return found


def layouts():
    return {
        "1P+1D": ([{"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
                   {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1])]}],
                  [{"prefill": "p0", "decode": "d0", "rps": 1}]),
        "prefill TP2 -> decode TP1": (
            [{"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0, 1])]},
             {"id": "d0", "role": "decode", "stages": [stage(0, 4, [2])]}],
            [{"prefill": "p0", "decode": "d0", "rps": 1}]),
        "prefill PP2 -> decode PP1": (
            [{"id": "p0", "role": "prefill", "stages": [stage(0, 1, [0]), stage(1, 3, [1])]},
             {"id": "d0", "role": "decode", "stages": [stage(0, 4, [2])]}],
            [{"prefill": "p0", "decode": "d0", "rps": 1}]),
        "decode TP2": (
            [{"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
             {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1, 2])]}],
            [{"prefill": "p0", "decode": "d0", "rps": 1}]),
        "colocated (both)": ([{"id": "b0", "role": "both", "stages": [stage(0, 4, [0])]}], []),
    }


def group_setup_refusals(port):
    """A group whose workers disagree (bad input: status 2), or that asks for NCCL where none
    can run (status 1), refuses to start: both workers end, each saying why."""
    secret = os.path.join(TMP, "setup.secret")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(secret, 0o600)
    plan = write_plan("setup", port, [{"id": "b0", "role": "both",
                                       "stages": [stage(0, 4, [0, 1])]}], [])
    cases = [("different --max-seqs", [["--max-seqs", "32"], ["--max-seqs", "100"]], 2,
              "mixes engines"),
             ("--tp-transport nccl on the CPU", [["--tp-transport", "nccl"], []], 1,
              "cannot sum over NCCL")]
    for name, extra, code, needle in cases:
        procs = [subprocess.Popen([HX, "worker", "--plan", plan, "--model", MODEL, "--device",
                                   "local:%d" % d, "--secret-file", secret, "--threads", "1",
                                   "--backend", "cpu", *extra[d]],
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for d in (0, 1)]
        outs = []
        for pr in procs:
            try:
                outs.append((pr.wait(timeout=60), pr.stderr.read()))
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
                outs.append((None, "hung"))
        check(all(rc == code and needle in err for rc, err in outs),
              "group setup: %s: both workers exit %d saying '%s' (%s)" %
              (name, code, needle, [(rc, err.strip().splitlines()[-1:] if err else "") for rc, err in outs]))


def smallest_cache_admits(port):
    """A TP group whose ranks have caches of different sizes admits what its smallest holds:
    rank 1's plan budget is 64 positions (4 blocks of 16; 512 bytes a position on the CPU),
    rank 0's far more. Requests that fit together run; a request that alone needs more than
    64 positions is refused with a message, and the group keeps serving."""
    plan = write_plan("smallest", port, [
        {"id": "b0", "role": "both", "stages": [stage(0, 4, [0, 1])],
         "memory": [{"device": "local:1", "kv_bytes": 64 * 512}]}], [])
    addr = launch(plan)
    if not check(addr is not None, "smallest cache: launch"):
        return
    try:
        # two requests of up to 16 + 16 - 1 positions (2 blocks each): 4 blocks, the whole
        # of rank 1's cache, one after the other or together
        results = [None] * 4
        prompts = ["hello world", "a", "The quick brown fox", "hello world"]

        def one(i):
            results[i] = complete(addr, prompts[i], 16)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        want = {p: reference(p, 16) for p in set(prompts)}
        check(all(r and r[0] == 200 and r[1] == want[prompts[i]] for i, r in enumerate(results)),
              "smallest cache: 4 concurrent requests on a 4-block rank all complete right (%s)" %
              [r[0] if r else None for r in results])
        time.sleep(2.5)  # the leader's next health report carries the group's limit
        status, body = complete(addr, "hello world", 80)
        check(status == 400 and "holds at most 64 for one request" in str(body),
              "smallest cache: a request needing more than 64 positions gets 400 naming the "
              "limit (%d %s)" % (status, str(body)[:200]))
        status, got = complete(addr, "a", 16)
        check(status == 200 and got == want["a"], "smallest cache: the group still serves")
    finally:
        check(stop(plan), "smallest cache: stop")


def kv_transport_nccl_refused(port):
    """--kv-transport nccl where no NCCL link can be made (CPU engines): the request fails
    with the reason, the worker keeps running, and --kv-transport tcp serves as before."""
    groups, routes = layouts()["1P+1D"]
    plan = write_plan("kvnccl", port, groups, routes)
    r = hx("launch", "--plan", plan, "--model", MODEL, "--worker-args",
           "--threads 1 --backend cpu --kv-transport nccl", "--timeout", "120")
    if not check(r.returncode == 0, "--kv-transport nccl: launch (%s)" % r.stderr[-200:]):
        return
    host, p = r.stdout.strip().splitlines()[-1][len("http://"):].rsplit(":", 1)
    try:
        status, body = complete((host, int(p)), PROMPTS[0])
        check(status != 200 and "cannot go over NCCL" in str(body),
              "--kv-transport nccl on CPU engines: the request fails saying why (%d %s)" %
              (status, str(body)[:200]))
        status, body = request((host, int(p)), "GET", "/health")
        check(status == 200, "--kv-transport nccl: the groups stay up (%d)" % status)
    finally:
        check(stop(plan), "--kv-transport nccl: stop")


def renamed_binary(port, expected):
    """`launch --binary` with a copy of hexflow under another name: the launcher knows its
    processes by their command line, not by the binary's name, when it checks them at
    start-up and when it stops them."""
    copy = os.path.join(TMP, "hxserve-copy")
    shutil.copy(HX, copy)
    plan = write_plan("renamed", port, [
        {"id": "b0", "role": "both", "stages": [stage(0, 4, [0])]}], [])
    addr = launch(plan, "--binary", copy)
    if not check(addr is not None, "renamed binary: launch"):
        return
    pids = [p["pid"] for p in state_of(plan)["processes"]]
    try:
        status, got = complete(addr, PROMPTS[0])
        check(status == 200 and got == expected[PROMPTS[0]], "renamed binary: serves")
    finally:
        check(stop(plan), "renamed binary: stop")
    check(not [p for p in pids if alive(p)], "renamed binary: stop leaves no process")


def start_by_hand(tag, plan, gpu_model, args, env_of=lambda d: {}, backend_of=lambda d: "cuda"):
    """Starts the plan's workers (devices local:0..2) and its router by hand, each worker
    with its own NCCL_HOSTID (NCCL refuses two ranks of one GPU on one host, and tells
    hosts apart by it: they then talk over NCCL's socket transport on loopback) plus
    env_of(device), on backend_of(device). Returns (processes, logs, router address, up)."""
    secret = os.path.join(TMP, tag + ".secret")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(secret, 0o600)
    procs, logs = [], []
    for d in range(3):
        env = dict(ENV, HEXFLOW_LOG="info", NCCL_HOSTID="hx-serve-%d" % d,
                   NCCL_SOCKET_IFNAME="lo", NCCL_IB_DISABLE="1", NCCL_NET="Socket",
                   **env_of(d))
        log = open(os.path.join(TMP, "%s-worker-%d.log" % (tag, d)), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [HX, "worker", "--plan", plan, "--model", gpu_model, "--device", "local:%d" % d,
             "--secret-file", secret, "--backend", backend_of(d)] + args, env=env, stdout=log,
            stderr=subprocess.STDOUT))
    rlog = open(os.path.join(TMP, tag + "-router.log"), "w+")
    logs.append(rlog)
    procs.append(subprocess.Popen([HX, "router", "--plan", plan, "--model", gpu_model,
                                   "--secret-file", secret], env=ENV, stdout=rlog,
                                  stderr=subprocess.STDOUT))
    with open(plan) as f:
        addr = ("127.0.0.1", json.load(f)["router"]["port"])
    up = False
    for _ in range(240):
        try:
            if request(addr, "GET", "/health", timeout=5)[0] == 200:
                up = True
                break
        except OSError:
            pass
        if any(pr.poll() is not None for pr in procs):
            break
        time.sleep(0.5)
    if not up:
        for log in logs:
            log.seek(0)
            print(log.read()[-1500:])
    return procs, logs, addr, up


def end_by_hand(procs, logs):
    """Stops what start_by_hand started; True when every process ended."""
    for pr in procs:
        if pr.poll() is None:
            pr.terminate()
    for pr in procs:
        try:
            pr.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
    for log in logs:
        log.close()
    return all(pr.returncode is not None for pr in procs)


def log_text(logs):
    text = ""
    for log in logs:
        log.seek(0)
        text += log.read()
    return text


def kill_tp_rank(what, addr, procs, logs, kill=True):
    """Kills decode TP rank local:2 (procs[2]) while 4 requests decode on d0 (kill False:
    the fault is already armed): its partner's all-reduce fails (a closed connection, the
    peer timeout, or at last the step watchdog), the requests fail naming the group, none
    hangs, the partner exits and the prefill worker stays."""
    results = [None] * 4
    started = threading.Semaphore(0)

    def long(i):
        try:
            results[i] = stream(addr, PROMPTS[i % 4], 1000, on_first=started.release,
                                timeout=150)
        except OSError as e:
            results[i] = ([], "hung: %s" % e)
    threads = [threading.Thread(target=long, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):
        started.acquire(timeout=60)
    if kill:
        procs[2].kill()
    t0 = time.time()
    for t in threads:
        t.join(160)
    hung = sum(1 for t, r in zip(threads, results) if t.is_alive() or not r or
               (r[1] or "").startswith("hung"))
    check(hung == 0, "%s: no request hangs after a decode TP rank is %s (%d hung; %.1f s)" %
          (what, "killed" if kill else "wedged", hung, time.time() - t0))
    errors = [r[1] for r in results if r and r[1]]
    check(len(errors) == 4 and all("d0" in e for e in errors),
          "%s: the requests on it fail naming the group (%s)" % (what, errors[:1]))
    try:
        procs[1].wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass
    if not check(procs[1].poll() is not None and procs[0].poll() is None,
                 "%s: d0's rank 0 exits, the prefill worker stays (%s, %s)" %
                 (what, procs[1].poll(), procs[0].poll())) or hung:
        print(log_text(logs[1:2])[-3000:])
    return log_text(logs[1:2])


def nccl_on_one_gpu(port, gpu_model, gpu_expected):
    """NCCL for the TP all-reduce and for KV, on one GPU (start_by_hand): prefill p0 ->
    decode d0 at TP 2, --tp-transport nccl --kv-transport nccl."""
    plan = write_plan("gpu-nccl", port, [
        {"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
        {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1, 2])]}],
        [{"prefill": "p0", "decode": "d0", "rps": 1}])
    # a short peer timeout: a hung all-reduce ends by the step watchdog after 25 s
    procs, logs, addr, up = start_by_hand("nccl", plan, gpu_model,
                                          ["--tp-transport", "nccl", "--kv-transport", "nccl",
                                           "--peer-timeout", "15"])
    try:
        if not check(up, "GPU NCCL: workers and router up"):
            return
        whole = 0
        for prompt in PROMPTS:
            status, got = complete(addr, prompt)
            want = gpu_expected[prompt] or []
            check(status == 200 and len(got) == MAX_TOKENS and got[:1] == want[:1],
                  "GPU NCCL '%s': %d tokens, the first equal to generate's (%s)" %
                  (prompt, len(got) if status == 200 else 0, got if status != 200 else "ok"))
            if status == 200:
                whole += got == want
        check(whole >= 3, "GPU NCCL: %d of 4 prompts equal generate whole" % whole)
        # a burst: KV for many requests over the links while the decode group all-reduces
        results = [None] * 16

        def one(i):
            results[i] = complete(addr, PROMPTS[i % 4])
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        first_ok = sum(1 for i, r in enumerate(results) if r and r[0] == 200 and
                       len(r[1]) == MAX_TOKENS and
                       r[1][:1] == (gpu_expected[PROMPTS[i % 4]] or [])[:1])
        check(first_ok == 16, "GPU NCCL: 16 concurrent requests complete (%d)" % first_ok)
        text = log_text(logs[:3])
        check("sums its TP partial results over NCCL" in text,
              "GPU NCCL: the decode stage sums over NCCL")
        check("goes over NCCL" in text, "GPU NCCL: KV goes over NCCL")
        kill_tp_rank("GPU NCCL", addr, procs, logs)
    finally:
        check(end_by_hand(procs, logs), "GPU NCCL: every process ended")


def gpu_cpu_mixed(port, gpu_model, gpu_expected, cpu_expected):
    """A cuda prefill group feeding a cpu decode group (TP 2), and the other way round: the
    KV goes in the sender's cache dtype, bf16 from the GPU (widened by the CPU), fp32 from
    the CPU (rounded by the GPU), and every request completes from it."""
    per_token = 4 * 2 * 2 * 64  # layers x K, V x KV heads x head_dim of the GPU model
    for name, pre, dec, want, elem in (("GPU -> CPU", "cuda", "cpu", gpu_expected, 2),
                                       ("CPU -> GPU", "cpu", "cuda", cpu_expected, 4)):
        plan = write_plan("mixed-" + pre, port, [
            {"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
            {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1, 2])]}],
            [{"prefill": "p0", "decode": "d0", "rps": 1}])
        port += 20
        procs, logs, addr, up = start_by_hand("mixed-" + pre, plan, gpu_model,
                                              ["--threads", "1"],
                                              backend_of=lambda d: pre if d == 0 else dec)
        try:
            if not check(up, "%s: workers and router up" % name):
                continue
            for prompt in PROMPTS:
                status, got = complete(addr, prompt)
                first = (want[prompt] or [])[:1]
                check(status == 200 and len(got) == MAX_TOKENS and got[:1] == first,
                      "%s '%s': %d tokens, the first the prefill backend's (%s)" %
                      (name, prompt, len(got) if status == 200 else 0,
                       "ok" if status == 200 and got[:1] == first else got))
            moved = metric(addr, "hexflow_kv_bytes_moved_total")
            prompt_tokens = metric(addr, "hexflow_prompt_tokens_total")
            check(prompt_tokens > 0 and moved == prompt_tokens * per_token * elem,
                  "%s: KV moves in %s (%d bytes for %d prompt tokens)" %
                  (name, "bf16" if elem == 2 else "fp32", moved, prompt_tokens))
        finally:
            check(end_by_hand(procs, logs), "%s: every process ended" % name)


def nccl_hang_emulated(port, gpu_model):
    """The last resort: an NCCL all-reduce that nothing stops (the emulation's
    HX_CUDA_EMU_NCCL_HANG=400 on d0's rank 0: its 400th operation, as a wedged kernel, a
    few dozen decode steps in). With --peer-timeout 4 its step watchdog ends it after 14 s,
    and the requests fail naming the group."""
    plan = write_plan("gpu-hang", port, [
        {"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
        {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1, 2])]}],
        [{"prefill": "p0", "decode": "d0", "rps": 1}])
    procs, logs, addr, up = start_by_hand("hang", plan, gpu_model,
                                          ["--tp-transport", "nccl", "--peer-timeout", "4"],
                                          lambda d: {"HX_CUDA_EMU_NCCL_HANG": "400"} if d == 1
                                          else {})
    try:
        if not check(up, "NCCL hang: workers and router up"):
            return
        text = kill_tp_rank("NCCL hang", addr, procs, logs, kill=False)
        check("a step has not ended" in text and procs[1].returncode == 1,
              "NCCL hang: its step watchdog ended d0's rank 0 (exit %s)" % procs[1].returncode)
    finally:
        check(end_by_hand(procs, logs), "NCCL hang: every process ended")


def nccl_fallback_emulated(port, gpu_model, gpu_expected):
    """Where a rank cannot join NCCL (the emulation's HX_CUDA_EMU_NCCL_JOIN=fail on decode
    rank local:2), --tp-transport/--kv-transport auto fall back to TCP for what involves
    it: d0's stage sums over TCP, KV to local:2 goes over TCP, to local:1 over NCCL; the
    answers stay right."""
    plan = write_plan("gpu-fallback", port, [
        {"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
        {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1, 2])]}],
        [{"prefill": "p0", "decode": "d0", "rps": 1}])
    procs, logs, addr, up = start_by_hand(
        "fallback", plan, gpu_model, [],
        lambda d: {"HX_CUDA_EMU_NCCL_JOIN": "fail"} if d == 2 else {})
    try:
        if not check(up, "NCCL fallback: workers and router up"):
            return
        # the first requests may find d0 still joining (20 s until its join times out):
        # its ranks decline links then, and p0 offers again 5 s later
        for round_ in range(2):
            if round_:
                time.sleep(6)
            got = [complete(addr, p) for p in PROMPTS]
            check(all(st == 200 and ids[:1] == (gpu_expected[p] or [])[:1] and
                      len(ids) == MAX_TOKENS for p, (st, ids) in zip(PROMPTS, got)),
                  "NCCL fallback: every prompt completes, the first token equal to "
                  "generate's (round %d)" % (round_ + 1))
        text = log_text(logs[:3])
        check("stage 0 sums its TP partial results over TCP" in text,
              "NCCL fallback: d0's stage sums over TCP after a rank failed to join")
        check("KV to local:2 goes over TCP" in text and "KV to local:1 goes over NCCL" in text,
              "NCCL fallback: KV to the rank that cannot join goes over TCP, to the other "
              "over NCCL")
    finally:
        check(end_by_hand(procs, logs), "NCCL fallback: every process ended")


def gpu_cases(port):
    """GPU prefill -> GPU decode, stages and TP slices, NCCL: on a GPU, or on the host
    emulation of the CUDA kernels (a build with -DHX_CUDA_EMU=ON, for the host code)."""
    version = hx("--version").stdout
    gpu = "host emulation" in version or (shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0)
    if "cuda" in version and gpu:
        # the GPU kernels take head_dim 64 or 128: a model of that shape, its own reference
        gpu_model = os.path.join(TMP, "gpu-model")
        r = hx("model", "make-tiny", "--out", gpu_model, "--layers", "4", "--hidden", "256",
               "--heads", "4", "--kv-heads", "2", "--intermediate", "512", "--seed", "7")
        assert r.returncode == 0, r.stderr
        # the reference: `hexflow generate` on the same engine (bf16 on the GPU), one
        # process; the fp32 CPU run may part from it at a near-tie, which is only reported
        gpu_expected, cpu_expected = {}, {}
        for prompt in PROMPTS:
            g = hx("generate", "--model", gpu_model, "--prompt", prompt, "--max-tokens",
                   str(MAX_TOKENS), "--temperature", "0", "--json", "--backend", "cuda")
            check(g.returncode == 0, "GPU: generate --backend cuda '%s' (%s)" %
                  (prompt, g.stderr[-200:]))
            gpu_expected[prompt] = json.loads(g.stdout)["tokens"] if g.returncode == 0 else None
            c = hx("generate", "--model", gpu_model, "--prompt", prompt, "--max-tokens",
                   str(MAX_TOKENS), "--temperature", "0", "--json")
            cpu = json.loads(c.stdout)["tokens"]
            cpu_expected[prompt] = cpu
            same = next((i for i, (x, y) in enumerate(zip(cpu, gpu_expected[prompt] or []))
                         if x != y), min(len(cpu), len(gpu_expected[prompt] or [])))
            print("info GPU (bf16) and CPU (fp32) greedy tokens agree for the first %d of %d"
                  " ('%s')" % (same, len(cpu), prompt))
        groups, routes = layouts()["1P+1D"]
        plan = write_plan("gpu", port, groups, routes)
        port += 20
        r = hx("launch", "--plan", plan, "--model", gpu_model, "--worker-args",
               "--backend cuda", "--timeout", "120")
        if check(r.returncode == 0, "GPU: launch with --backend cuda (%s)" % r.stderr[-300:]):
            host, p = r.stdout.strip().splitlines()[-1][len("http://"):].rsplit(":", 1)
            try:
                for prompt in PROMPTS:
                    status, got = complete((host, int(p)), prompt)
                    check(status == 200 and got == gpu_expected[prompt],
                          "GPU: prefill -> decode '%s' equals generate (%s)" %
                          (prompt, "ok" if got == gpu_expected[prompt] else got))
                # the KV went as the GPU cache holds it, bf16: 4 layers x K, V x 2 heads x 64
                # x 2 bytes a prompt token, half what fp32 would take
                addr = (host, int(p))
                moved = metric(addr, "hexflow_kv_bytes_moved_total")
                prompt_tokens = metric(addr, "hexflow_prompt_tokens_total")
                check(prompt_tokens > 0 and moved == prompt_tokens * 4 * 2 * 2 * 64 * 2,
                      "GPU: KV moves in bf16 (%d bytes for %d prompt tokens)" %
                      (moved, prompt_tokens))
            finally:
                check(stop(plan), "GPU: stop")
        # stages and TP slices on the GPU: prefill PP2 -> decode TP2, four processes on one
        # GPU (the TP stage sums over TCP: NCCL refuses two ranks on one GPU). Stages change
        # no arithmetic, so the first token is exact; TP sums the o and down projections in
        # another order, which may flip a bf16 near-tie later on, so 3 of 4 must agree whole
        plan = write_plan("gpu-split", port, [
            {"id": "p0", "role": "prefill", "stages": [stage(0, 2, [0]), stage(2, 2, [1])]},
            {"id": "d0", "role": "decode", "stages": [stage(0, 4, [2, 3])]}],
            [{"prefill": "p0", "decode": "d0", "rps": 1}])
        port += 20
        r = hx("launch", "--plan", plan, "--model", gpu_model, "--worker-args",
               "--backend cuda", "--timeout", "120")
        if check(r.returncode == 0, "GPU PP2 -> TP2: launch (%s)" % r.stderr[-300:]):
            host, p = r.stdout.strip().splitlines()[-1][len("http://"):].rsplit(":", 1)
            whole = 0
            try:
                for prompt in PROMPTS:
                    status, got = complete((host, int(p)), prompt)
                    want = gpu_expected[prompt] or []
                    check(status == 200 and len(got) == MAX_TOKENS and got[:1] == want[:1],
                          "GPU PP2 -> TP2 '%s': %d tokens, the first equal to generate's" %
                          (prompt, len(got) if status == 200 else 0))
                    if status == 200:
                        same = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y),
                                    len(got))
                        whole += same == len(want)
                        print("info GPU PP2 -> TP2 '%s': agrees with generate for %d of %d "
                              "tokens" % (prompt, same, len(want)))
                check(whole >= 3, "GPU PP2 -> TP2: %d of 4 prompts equal generate whole" % whole)
            finally:
                check(stop(plan), "GPU PP2 -> TP2: stop")
        nccl_on_one_gpu(port, gpu_model, gpu_expected)
        port += 20
        gpu_cpu_mixed(port, gpu_model, gpu_expected, cpu_expected)
        port += 40
        if "host emulation" in version:
            nccl_fallback_emulated(port, gpu_model, gpu_expected)
            port += 20
            nccl_hang_emulated(port, gpu_model)
            port += 20
    else:
        print("skip GPU prefill -> GPU decode: %s" %
              ("no CUDA backend in this build" if "cuda" not in version else "no GPU here"))


def main():
    r = hx("model", "make-tiny", "--out", MODEL, "--layers", "4", "--hidden", "64", "--heads",
           "4", "--kv-heads", "2", "--intermediate", "128", "--seed", "7")
    assert r.returncode == 0, r.stderr
    if os.environ.get("HX_SERVE_GPU_ONLY", "") not in ("", "0"):
        # the emulation build's pass: only what the CPU build cannot run
        gpu_cases(PORT)
        reports = sanitizer_reports()
        check(not reports, "no sanitizer report in any worker or router log %s" % reports[:3])
        return
    expected = {p: reference(p) for p in PROMPTS}

    port = PORT
    for i, (name, (groups, routes)) in enumerate(layouts().items()):
        plan = write_plan("plan%d" % i, port, groups, routes)
        port += 20
        addr = launch(plan)
        if not check(addr is not None, "%s: launch" % name):
            continue
        try:
            for p in PROMPTS:
                status, got = complete(addr, p)
                check(status == 200 and got == expected[p],
                      "%s: greedy '%s' equals generate (%s)" % (name, p,
                                                                  got if got != expected[p] else "ok"))
        finally:
            check(stop(plan), "%s: stop" % name)

    renamed_binary(port, expected)
    port += 20
    group_setup_refusals(port)
    port += 20
    smallest_cache_admits(port)
    port += 20
    kv_transport_nccl_refused(port)
    port += 20

    gpu_cases(port)
    port += 80

    # one deployment for concurrency, bad requests and a killed decode worker
    plan = write_plan("fault", port, [
        {"id": "p0", "role": "prefill", "stages": [stage(0, 4, [0])]},
        {"id": "d0", "role": "decode", "stages": [stage(0, 4, [1])]},
        {"id": "d1", "role": "decode", "stages": [stage(0, 4, [2])]}],
        [{"prefill": "p0", "decode": "d0", "rps": 1}, {"prefill": "p0", "decode": "d1", "rps": 1}])
    addr = launch(plan)
    if not check(addr is not None, "fault plan: launch"):
        return
    st = state_of(plan)
    pids = [p["pid"] for p in st["processes"]]
    try:
        # 64 concurrent streams
        results = [None] * 64

        def one(i):
            results[i] = stream(addr, PROMPTS[i % len(PROMPTS)], MAX_TOKENS)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        ok = sum(1 for i, r in enumerate(results)
                 if r and r[1] is None and r[0] == expected[PROMPTS[i % len(PROMPTS)]])
        check(ok == 64, "64 concurrent streaming requests complete with the right tokens "
                        "(%d/64 in %.1f s)" % (ok, time.time() - t0))

        # malformed requests
        status, body = request(addr, "POST", "/v1/completions", "{not json")
        check(400 <= status < 500 and "error" in json.loads(body), "malformed JSON -> %d" % status)
        status, body = request(addr, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0})
        check(status == 400 and "max_tokens" in body, "max_tokens 0 -> %d naming the field" % status)
        status, body = request(addr, "POST", "/v1/completions", {"max_tokens": 3})
        check(status == 400 and "prompt" in body, "missing prompt -> %d" % status)
        status, body = request(addr, "POST", "/v1/completions", {"prompt": [99999]})
        check(status == 400, "token id outside the vocabulary -> %d" % status)
        status, body = request(addr, "POST", "/v1/completions", {"prompt": [65] * 2100})
        check(status == 400 and "positions" in body, "a prompt longer than the context -> %d" % status)
        status, body = request(addr, "GET", "/v1/models")
        check(status == 200 and json.loads(body)["data"], "/v1/models lists the model")
        status, body = request(addr, "GET", "/metrics")
        check(status == 200 and "hexflow_ttft_seconds_bucket" in body and
              "hexflow_tpot_seconds_bucket" in body and "hexflow_kv_bytes_moved_total" in body,
              "/metrics has TTFT/TPOT histograms and KV bytes")

        # kill d0's worker while requests decode on it
        d0 = [p["pid"] for p in st["processes"] if p.get("group") == "d0"][0]
        results = [None] * 8
        started = threading.Semaphore(0)

        def long(i):
            results[i] = stream(addr, PROMPTS[i % len(PROMPTS)], 2000, on_first=started.release)
        threads = [threading.Thread(target=long, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for _ in range(8):
            started.acquire(timeout=60)
        os.kill(d0, signal.SIGKILL)
        t0 = time.time()
        for t in threads:
            t.join(120)
        hung = sum(1 for t in threads if t.is_alive())
        errors = [r[1] for r in results if r and r[1]]
        check(hung == 0, "no request hangs after the decode worker is killed (%.1f s)" %
              (time.time() - t0))
        check(len(errors) >= 1 and all("d0" in e for e in errors),
              "requests on the killed group fail with an error naming it (%d failed: %s)" %
              (len(errors), errors[:1]))
        check(any(r and r[1] is None and len(r[0]) > MAX_TOKENS for r in results),
              "requests on the other decode group run to completion")
        status, got = complete(addr, PROMPTS[0])
        check(status == 200 and got == expected[PROMPTS[0]],
              "the router keeps serving through the other decode group")
        status, body = request(addr, "GET", "/health")
        check(status == 503 and "d0" in body, "/health reports the lost group (%d)" % status)

        # hexflow restart brings the lost group back; the router reconnects by itself
        r = hx("restart", "--plan", plan, "--group", "nope")
        check(r.returncode == 2 and "no group 'nope'" in r.stderr,
              "restart --group of a group the plan lacks: exit 2 (%d)" % r.returncode)
        r = hx("restart", "--plan", plan, "--timeout", "120")
        check(r.returncode == 0 and "restarted 1 process" in r.stdout,
              "restart starts the killed decode worker again (%d: %s %s)" %
              (r.returncode, r.stdout.strip(), r.stderr.strip()[-300:]))
        status, body = request(addr, "GET", "/health")
        check(status == 200, "/health is 200 again after the restart (%d %s)" % (status, body[:120]))
        results = [complete(addr, p) for p in PROMPTS]
        check(all(st_ == 200 and got == expected[PROMPTS[i]]
                  for i, (st_, got) in enumerate(results)),
              "after the restart every prompt completes right (both decode groups serve)")
        new_pids = [p["pid"] for p in state_of(plan)["processes"]]
        check(d0 not in new_pids and len(new_pids) == len(pids),
              "the state file lists the restarted worker's new pid")
        pids = new_pids
        r = hx("restart", "--plan", plan)
        check(r.returncode == 0 and "restarted 0 processes" in r.stdout and
              "nothing to restart" in r.stderr,
              "restart with everything up does nothing (%s)" % r.stderr.strip()[-200:])
        r = hx("restart", "--plan", plan, "--group", "d1", "--timeout", "120")
        check(r.returncode == 0 and "restarted 1 process" in r.stdout,
              "restart --group d1 restarts a running group (%s)" % r.stdout.strip())
        status, got = complete(addr, PROMPTS[1])
        check(status == 200 and got == expected[PROMPTS[1]], "and it serves after that")
        pids = [p["pid"] for p in state_of(plan)["processes"]]
    finally:
        check(stop(plan), "fault plan: stop")
    time.sleep(0.5)
    left = [p for p in pids if alive(p)]
    check(not left, "no process left after stop (%s)" % left)
    r = hx("stop", "--plan", plan)
    check(r.returncode == 0, "stop is idempotent")
    reports = sanitizer_reports()
    check(not reports, "no sanitizer report in any worker or router log %s" % reports[:3])


if __name__ == "__main__":
    try:
        main()
    finally:
        sdir = ENV["HEXFLOW_STATE_DIR"]
        if os.path.isdir(sdir):  # never leave processes behind, even after a failure
            for name in os.listdir(sdir):
                if name.endswith(".json"):
                    try:
                        with open(os.path.join(sdir, name)) as f:
                            for p in json.load(f).get("processes", []):
                                try:
                                    os.kill(p["pid"], signal.SIGKILL)
                                except OSError:
                                    pass
                    except (OSError, ValueError):
                        pass
        shutil.rmtree(TMP, ignore_errors=True)
    print("serve: %d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)
