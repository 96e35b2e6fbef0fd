"""Three real ``aat serve`` replicas sharing one bundle store, behind nginx running
``deploy/nginx.conf`` (upstreams, listen address and temp paths templated; everything else as
shipped), all on loopback.

Which replica served a request is read from nginx's access log (JSON lines carrying the request
id and ``$upstream_addr``, which lists every replica tried). The replica nginx should pick is
predicted by ``Ring``, nginx's consistent-hash ring recomputed here, so routing is checked
exactly and the task names can be chosen to cover every replica.

The tests run in file order on one cluster; the last ones stop replicas. Every wait is a
bounded poll; nothing sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from aat_serve.adapters.checkpoints import load_checkpoint
from tests.deploy.manifests import (
    NGINX_CONF,
    ROOT,
    dockerfile_stages,
    load_yaml,
    template_nginx,
    upstream_servers,
)
from tests.helpers import require_tool
from tests.service.helpers import ADMIN, make_bundle, wav_bytes, write_tiny_checkpoint

REFRESH_S = 1.0
"""AAT_REFRESH_S of the test replicas (the default is 5 s; the mechanism is the same)."""
CONVERGE_BOUND_S = REFRESH_S + 15.0
"""Longest wait for replicas to converge before failing (generous: 2 shared CPU cores)."""
AUDIO = wav_bytes(0.5, seed=1)
OTHER_AUDIO = wav_bytes(0.5, seed=4)
MEASURED: dict[str, object] = {}


# ---- nginx's consistent-hash ring (ngx_http_upstream_hash_module.c) -------------------------

class Ring:
    """160 points per server at crc32(host NUL port prev_hash); a key goes to the first point at
    or after crc32(key), and a failed server's requests walk on to the next point."""

    def __init__(self, servers: list[str]) -> None:
        points: list[tuple[int, str]] = []
        for server in servers:
            host, _, port = server.rpartition(":")
            base = host.encode() + b"\0" + port.encode()
            prev = 0
            for _ in range(160):
                prev = zlib.crc32(base + struct.pack("<I", prev))
                points.append((prev, server))
        points.sort(key=lambda p: p[0])
        self.points = [p for i, p in enumerate(points) if i == 0 or p[0] != points[i - 1][0]]
        self.hashes = [h for h, _ in self.points]

    def route(self, key: str, down: tuple[str, ...] = ()) -> str:
        i = bisect.bisect_left(self.hashes, zlib.crc32(key.encode()))
        for step in range(len(self.points)):
            server = self.points[(i + step) % len(self.points)][1]
            if server not in down:
                return server
        raise AssertionError("every server is down")


# ---- processes ---------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def aat_command() -> list[str]:
    script = Path(sys.executable).with_name("aat")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "aat_serve.cli.main", "serve"]


@dataclass
class Replica:
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def start(self) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(aat_command(), env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica {self.addr} exited {self.proc.returncode}:\n"
                                     + self.log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"replica {self.addr} not ready in {timeout_s} s:\n"
                             + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def logged_request_ids(self) -> set[str]:
        ids = set()
        for line in self.log.read_text().splitlines():
            if line.startswith("{") and '"request_id"' in line:
                ids.add(json.loads(line)["request_id"])
        return ids


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx_url: str
    access_log: Path
    ring: Ring
    workdir: Path
    nginx_proc: subprocess.Popen
    ckpt: object
    templated: str
    counter: list[int] = field(default_factory=lambda: [0])

    def replica(self, addr: str) -> Replica:
        return next(r for r in self.replicas if r.addr == addr)

    def rid(self, prefix: str) -> str:
        self.counter[0] += 1
        return f"{prefix}-{self.counter[0]}"

    def access(self) -> dict[str, dict]:
        """nginx's access log by request id."""
        out = {}
        for line in self.access_log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                out[entry["request_id"]] = entry
        return out

    def entry(self, rid: str) -> dict:
        """A request's access log line (polls: nginx writes it right after the response)."""
        deadline = time.monotonic() + 5
        while (entry := self.access().get(rid)) is None:
            assert time.monotonic() < deadline, f"no access log line for {rid}"
            time.sleep(0.02)
        return entry

    def upstreams(self, rid: str) -> list[str]:
        """The replicas nginx tried for a request, in order."""
        return [u.strip() for u in self.entry(rid)["upstream"].split(",") if u.strip()]


def classify(base: str, task: str, rid: str | None = None, audio: bytes = AUDIO,
             timeout: float = 30) -> httpx.Response:
    headers = {"Content-Type": "audio/wav"}
    if rid is not None:
        headers["X-Request-ID"] = rid
    return httpx.post(f"{base}/classify/{task}", content=audio, headers=headers,
                      timeout=timeout)


def put_bundle(base: str, task: str, data: bytes, rid: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"}
    if rid is not None:
        headers["X-Request-ID"] = rid
    return httpx.put(f"{base}/tasks/{task}", content=data, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nginx = require_tool("nginx")
    work = tmp_path_factory.mktemp("cluster")
    ckpt_dir = write_tiny_checkpoint(work / "tiny-ast")
    store = work / "store"
    store.mkdir()
    *ports, nginx_port = free_ports(4)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AAT_")}
    replicas = []
    for i, port in enumerate(ports):
        env = base_env | {
            "AAT_CHECKPOINT": str(ckpt_dir), "AAT_BUNDLE_DIR": str(store),
            "AAT_HOST": "127.0.0.1", "AAT_PORT": str(port), "AAT_ADMIN_TOKEN": ADMIN,
            "AAT_DEVICE": "cpu", "AAT_REFRESH_S": str(REFRESH_S), "AAT_PRELOAD": "lazy",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        replicas.append(Replica(port, work / f"replica-{i}.log", env))
    for r in replicas:
        r.start()
    conf = work / "nginx.conf"
    # nginx's workers run as `nobody` when the tests run as root: their temporary files go in a
    # directory they can reach (pytest's own are private to the user).
    nginx_tmp = Path(tempfile.mkdtemp(prefix="aat-nginx-"))
    nginx_tmp.chmod(0o755)
    templated = template_nginx(NGINX_CONF.read_text(), ports, nginx_port, nginx_tmp)
    conf.write_text(templated)
    nginx_args = [nginx, "-p", str(work), "-c", str(conf), "-e", "stderr",
                  "-g", f"pid {work / 'nginx.pid'};"]
    check = subprocess.run([*nginx_args, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    access_log = work / "access.log"
    proc = None
    try:
        for r in replicas:
            r.wait_ready()
        with open(access_log, "ab") as out, open(work / "nginx-error.log", "ab") as err:
            proc = subprocess.Popen([*nginx_args[:-1], nginx_args[-1] + " daemon off;"],
                                    stdout=out, stderr=err)
        url = f"http://127.0.0.1:{nginx_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (work / "nginx-error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)
        servers = [a for a, _ in upstream_servers(templated)]
        yield Cluster(replicas, url, access_log, Ring(servers), work, proc,
                      load_checkpoint(ckpt_dir), templated)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for r in replicas:
            r.stop()
        shutil.rmtree(nginx_tmp, ignore_errors=True)
        if MEASURED:
            print("\nmeasured:", json.dumps(MEASURED, indent=1))
            (work / "measured.json").write_text(json.dumps(MEASURED, indent=1))


def tasks_covering(ring: Ring, servers: list[str], prefix: str, per_server: int = 2
                   ) -> dict[str, str]:
    """Task names (prefix-0, prefix-1, ...) until each server is primary for ``per_server``."""
    chosen: dict[str, str] = {}
    counts = dict.fromkeys(servers, 0)
    i = 0
    while min(counts.values()) < per_server:
        name = f"{prefix}-{i}"
        owner = ring.route(name)
        if counts[owner] < per_server:
            chosen[name] = owner
            counts[owner] += 1
        i += 1
        assert i < 1000
    return chosen


# ---- tests -----------------------------------------------------------------------------------

def test_templating_changes_only_addresses_and_paths(cluster):
    shipped = NGINX_CONF.read_text().splitlines()
    templated = cluster.templated.splitlines()
    removed = [line for line in shipped if line not in templated]
    added = [line for line in templated if line not in shipped]
    assert len(removed) == 4 and all(re.match(r"\s*(server aat-serve-aat-\d|listen 8080)", ln)
                                     for ln in removed)
    assert all(re.match(r"\s*(server 127\.0\.0\.1:\d+ max_fails|listen 127\.0\.0\.1:\d+;|"
                        r"\w+_temp_path )", ln) for ln in added), added


def _healthcheck_commands() -> dict[str, list[str]]:
    """The image's HEALTHCHECK and compose's healthcheck, as argument lists."""
    _, stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    (hc,) = stages[-1].all("HEALTHCHECK")
    compose = load_yaml(ROOT / "docker-compose.yml")
    return {"image": json.loads(hc.split("CMD", 1)[1]),
            "compose": compose["services"]["aat"]["healthcheck"]["test"][1:]}


def test_healthchecks_pass_on_a_live_replica_and_fail_on_a_dead_port(cluster):
    (dead,) = free_ports(1)
    for name, cmd in _healthcheck_commands().items():
        assert cmd[0] == "python"
        argv = [sys.executable, *cmd[1:]]
        base = {k: v for k, v in os.environ.items() if not k.startswith("AAT_")}
        ok = subprocess.run(argv, env=base | {"AAT_PORT": str(cluster.replicas[0].port)},
                            capture_output=True, timeout=30)
        assert ok.returncode == 0, (name, ok.stderr)
        bad = subprocess.run(argv, env=base | {"AAT_PORT": str(dead)}, capture_output=True,
                             timeout=30)
        assert bad.returncode != 0 and b"Connection refused" in bad.stderr, name


def test_ring_model_predicts_nginx_and_spreads_tasks(cluster):
    """Each task's requests, uploads included, go to the replica the ring predicts; tasks
    cover every replica; requests without a task are spread round robin."""
    servers = [r.addr for r in cluster.replicas]
    tasks = tasks_covering(cluster.ring, servers, "pin")
    assert set(tasks.values()) == set(servers)
    for i, task in enumerate(tasks):
        rid = cluster.rid("put")
        r = put_bundle(cluster.nginx_url, task, make_bundle(cluster.ckpt, task, seed=10 + i,
                                                            method="aat_m").to_bytes(), rid)
        assert r.status_code == 201, r.text
        assert cluster.upstreams(rid) == [tasks[task]]
    for _ in range(3):
        for task, owner in tasks.items():
            rid = cluster.rid("pin")
            r = classify(cluster.nginx_url, task, rid)
            assert r.status_code == 200, r.text
            assert cluster.upstreams(rid) == [owner], task
    # no task in the path: no hash key, round robin over all replicas
    seen = set()
    for _ in range(6):
        rid = cluster.rid("list")
        assert httpx.get(f"{cluster.nginx_url}/tasks", headers={"X-Request-ID": rid}
                         ).status_code == 200
        seen.update(cluster.upstreams(rid))
    assert seen == set(servers)


def test_a_tasks_requests_keep_hitting_its_one_warm_replica(cluster):
    """Paging (issue 24) behind the hash ring: a store task is loaded (from disk) by the one
    replica that owns it, on its first request; its later requests hit that replica, warm (no
    load); no other replica loads it, so each replica's cache holds a share of the tasks."""
    servers = [r.addr for r in cluster.replicas]
    tasks = tasks_covering(cluster.ring, servers, "warm")
    store = Path(cluster.replicas[0].env["AAT_BUNDLE_DIR"])
    versions = {}
    for i, task in enumerate(tasks):
        b = make_bundle(cluster.ckpt, task, seed=40 + i, method="aat_ms")
        b.save(store / f"{task}.safetensors")  # placed by hand: no replica has read it
        versions[task] = b.manifest.version
    for round_ in range(3):
        for task, owner in tasks.items():
            rid = cluster.rid("warm")
            r = classify(cluster.nginx_url, task, rid)
            assert (r.status_code, r.json()["version"]) == (200, versions[task]), r.text
            assert cluster.upstreams(rid) == [owner], task
            assert r.headers.get("x-aat-task-load") == ("disk" if round_ == 0 else None), task
    for replica in cluster.replicas:
        listing = httpx.get(f"{replica.url}/tasks", timeout=10).json()["tasks"]
        active = {t["task"] for t in listing if t["state"] == "active"} & set(tasks)
        assert active == {t for t, owner in tasks.items() if owner == replica.addr}


def test_request_ids_reach_the_replica_and_come_back(cluster):
    task = "rid-task"
    assert put_bundle(cluster.nginx_url, task,
                      make_bundle(cluster.ckpt, task, seed=3).to_bytes()).status_code == 201
    owner = cluster.replica(cluster.ring.route(task))
    # the client's id is kept
    r = classify(cluster.nginx_url, task, "client-chosen.id:42")
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["client-chosen.id:42"]
    # none given: nginx makes one, the same in the response, its log and the replica's log
    r = classify(cluster.nginx_url, task)
    (made,) = r.headers.get_list("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert cluster.upstreams(made) == [owner.addr]
    # one the service would refuse is replaced, so both sides still log the same id
    r = classify(cluster.nginx_url, task, "not a valid id!")
    (replaced,) = r.headers.get_list("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", replaced) and replaced != made
    deadline = time.monotonic() + 5
    while not {"client-chosen.id:42", made, replaced} <= owner.logged_request_ids():
        assert time.monotonic() < deadline, "replica did not log the request ids"
        time.sleep(0.05)


def test_nginx_refuses_bodies_over_the_service_limit(cluster):
    limit = 25 * 1024 * 1024  # AAT_MAX_AUDIO_MB, in the service's MiB
    rid = cluster.rid("big")
    r = classify(cluster.nginx_url, "rid-task", rid, audio=b"\0" * (limit + 1))
    assert r.status_code == 413
    assert r.json() == {"error": {"type": "payload_too_large", "message":
                                  "request body is too large: the limit is 26214400 bytes "
                                  "(AAT_MAX_AUDIO_MB)"}}
    assert r.headers.get_list("x-request-id") == [rid]
    assert cluster.upstreams(rid) == []  # no replica saw it
    # exactly at the limit: nginx passes it on and the replica judges the content
    rid = cluster.rid("big")
    r = classify(cluster.nginx_url, "rid-task", rid, audio=b"\0" * limit)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_audio"
    assert len(cluster.upstreams(rid)) == 1


def test_an_upload_is_answered_identically_by_every_replica(cluster):
    task = "fresh"
    r = put_bundle(cluster.nginx_url, task, make_bundle(cluster.ckpt, task, seed=21).to_bytes())
    assert r.status_code == 201
    version = r.json()["version"]
    answers = [classify(x, task).json() for x in
               [cluster.nginx_url, *(rep.url for rep in cluster.replicas)]]
    assert {a["version"] for a in answers} == {version}
    first = answers[0]["predictions"]
    for a in answers[1:]:
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in first]
        assert [p["score"] for p in a["predictions"]] == pytest.approx(
            [p["score"] for p in first], abs=1e-6)
    # and the answer depends on the audio (identical answers are not a constant)
    other = classify(cluster.replicas[0].url, task, audio=OTHER_AUDIO).json()["predictions"]
    assert [p["score"] for p in other] != pytest.approx([p["score"] for p in first], abs=1e-6)


class Streamer:
    """Background clients classifying in a loop until stopped (bounded by count and time);
    each request is recorded as (end time, target, status, version, request id, start time)."""

    def __init__(self, targets: list[tuple[str, str]], threads: int = 1, prefix: str = "s",
                 max_requests: int = 3000, max_s: float = 60) -> None:
        self.targets, self.prefix = targets, prefix
        self.max_requests, self.max_s = max_requests, max_s
        self.results: list[tuple[float, str, int, str | None, str, float]] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(threads)]

    def _run(self, n: int) -> None:
        end = time.monotonic() + self.max_s
        i = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop_event.is_set() and time.monotonic() < end \
                    and len(self.results) < self.max_requests:
                base, task = self.targets[(i + n) % len(self.targets)]
                i += 1
                rid = f"{self.prefix}-{n}-{i}"
                started = time.monotonic()
                try:
                    r = client.post(f"{base}/classify/{task}", content=AUDIO,
                                    headers={"Content-Type": "audio/wav", "X-Request-ID": rid})
                    status = r.status_code
                    version = r.json().get("version") if status == 200 else None
                except httpx.TransportError as e:
                    status, version = -1, type(e).__name__
                with self.lock:
                    self.results.append((time.monotonic(), base, status, version, rid, started))

    def __enter__(self) -> Streamer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(40)

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(list(self.results)):
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


def test_replacing_a_bundle_while_clients_stream(cluster):
    """Every answer is the old or the new version, none fails, each replica switches once and
    for good, all within the refresh delay."""
    task = "swap"
    old = put_bundle(cluster.nginx_url, task, make_bundle(cluster.ckpt, task, seed=31).to_bytes())
    assert old.status_code == 201
    v_old = old.json()["version"]
    targets = [(u, task) for u in [cluster.nginx_url, *(r.url for r in cluster.replicas)]]
    bases = [b for b, _ in targets]
    with Streamer(targets, threads=2, prefix="swap") as s:
        s.wait_for(lambda res: all(sum(1 for r in res if r[1] == b) >= 3 for b in bases),
                   CONVERGE_BOUND_S, "every target answered")
        new = put_bundle(cluster.nginx_url, task,
                         make_bundle(cluster.ckpt, task, seed=32).to_bytes())
        t_put = time.monotonic()
        assert new.status_code == 200 and new.json()["previous_version"] == v_old
        v_new = new.json()["version"]

        def switched(res):
            return all(any(r[1] == b and r[0] > t_put and r[3] == v_new for r in res)
                       for b in bases)

        s.wait_for(switched, CONVERGE_BOUND_S, "every replica serves the new version")
        done = len(s.results)
        s.wait_for(lambda res: len(res) >= done + 3 * len(bases), CONVERGE_BOUND_S, "more")
    assert {r[2] for r in s.results} == {200}, [r for r in s.results if r[2] != 200][:5]
    assert {r[3] for r in s.results} == {v_old, v_new}
    delays = {}
    for b in bases:
        versions = [r[3] for r in sorted(s.results) if r[1] == b]
        flips = sum(1 for a, c in itertools.pairwise(versions) if a != c)
        assert flips == 1 and versions[0] == v_old and versions[-1] == v_new, b
        last_old = max(r[0] for r in s.results if r[1] == b and r[3] == v_old)
        name = "nginx" if b == cluster.nginx_url else b.removeprefix("http://")
        delays[name] = round(max(0.0, last_old - t_put), 3)
    MEASURED["swap_last_old_answer_after_put_s"] = delays
    MEASURED["swap_requests"] = len(s.results)


def test_delete_reaches_every_replica(cluster):
    task = "gone"
    assert put_bundle(cluster.nginx_url, task,
                      make_bundle(cluster.ckpt, task, seed=41).to_bytes()).status_code == 201
    for rep in cluster.replicas:  # every replica holds it now
        assert classify(rep.url, task).status_code == 200
    r = httpx.delete(f"{cluster.nginx_url}/tasks/{task}",
                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    t_del = time.monotonic()
    assert r.status_code == 200, r.text
    delays = {}
    for rep in cluster.replicas:
        deadline = time.monotonic() + CONVERGE_BOUND_S
        while True:
            r = classify(rep.url, task)
            if r.status_code == 404:
                assert r.json()["error"] == {"type": "unknown_task",
                                             "message": f"unknown task {task!r}"}
                delays[rep.addr] = round(time.monotonic() - t_del, 3)
                break
            assert r.status_code == 200, r.text
            assert time.monotonic() < deadline, f"{rep.addr} still serves {task}"
            time.sleep(0.05)
    assert classify(cluster.nginx_url, task).status_code == 404
    MEASURED["delete_404_after_s"] = delays


def _victim_and_spare(cluster, victim: Replica) -> tuple[str, Replica]:
    """A task ``victim`` is primary for, and the replica that task fails over to."""
    task = next(t for t in (f"fo-{i}" for i in range(1000))
                if cluster.ring.route(t) == victim.addr)
    spare = cluster.replica(cluster.ring.route(task, down=(victim.addr,)))
    return task, spare


def _failover_traffic(cluster, victim: Replica, seed: int) -> tuple[str, Replica, list]:
    """Upload a task whose primary is ``victim`` and one hashed elsewhere; stream both."""
    task, spare = _victim_and_spare(cluster, victim)
    elsewhere = next(t for t in (f"bg-{seed}-{i}" for i in range(1000))
                     if cluster.ring.route(t) != victim.addr)
    for i, name in enumerate((task, elsewhere)):
        r = put_bundle(cluster.nginx_url, name,
                       make_bundle(cluster.ckpt, name, seed=seed + i).to_bytes())
        assert r.status_code == 201, r.text
    return task, spare, [(cluster.nginx_url, t) for t in (task, task, elsewhere)]


def _check_failover(cluster, s: Streamer, task: str, victim: Replica, spare: Replica,
                    gone_at: float) -> dict:
    """No failed response; the victim's task ended on the victim or (retried) on the spare,
    and only on the spare once the victim was gone."""
    assert {r[2] for r in s.results} == {200}, [r for r in s.results if r[2] != 200][:5]
    mine = [r for r in s.results if cluster.entry(r[4])["task"] == task]
    after = [r for r in mine if r[5] > gone_at]
    assert after and len(s.results) > len(mine)  # traffic went on, for every task
    retried = 0
    for r in mine:
        ups = cluster.upstreams(r[4])
        assert ups in ([victim.addr], [spare.addr], [victim.addr, spare.addr]), ups
        retried += ups == [victim.addr, spare.addr]
    for r in after:
        assert cluster.upstreams(r[4])[-1] == spare.addr
    return {"requests": len(s.results), "failed": 0, "victim_task_requests": len(mine),
            "retried_on_spare": retried}


def test_sigterm_finishes_in_flight_requests_and_nginx_fails_over(cluster):
    victim = cluster.replicas[0]
    task, spare, targets = _failover_traffic(cluster, victim, seed=51)
    # keeps one request busy on the victim at SIGTERM: decoded, then 123 windows (of the tiny
    # backbone's 0.655 s, within AAT_MAX_WINDOWS) computed in batches
    long_clip = wav_bytes(80.0, seed=2)
    held: dict[str, httpx.Response] = {}

    def slow() -> None:
        held["r"] = classify(cluster.nginx_url, task, "held-1", audio=long_clip, timeout=60)

    # Until SIGTERM only the held request goes to the victim, so its queue depth shows when
    # that request is in flight there; the victim's task joins the stream right after.
    background = [tg for tg in targets if tg[1] != task]
    with Streamer(background, threads=2, prefix="term") as s:
        s.wait_for(lambda res: len(res) >= 8, CONVERGE_BOUND_S, "traffic flows")
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while not re.search(rb"^aat_queue_depth [1-9]", httpx.get(
                f"{victim.url}/metrics", timeout=5).content, re.M):
            assert time.monotonic() < deadline, "the long request never reached the victim"
            time.sleep(0.005)
        victim.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        s.targets.extend(tg for tg in targets if tg[1] == task)
        # graceful: uvicorn finishes its work, then re-raises SIGTERM (exit status 143)
        assert victim.proc.wait(40) in (0, -signal.SIGTERM)
        t_exit = time.monotonic()
        assert "Application shutdown complete" in victim.log.read_text()
        t.join(60)
        n = len(s.results)
        s.wait_for(lambda res: len(res) >= n + 20, CONVERGE_BOUND_S, "traffic goes on")
    assert held["r"].status_code == 200, held["r"].text  # in flight at SIGTERM: answered
    assert cluster.upstreams("held-1") == [victim.addr]
    MEASURED["sigterm"] = _check_failover(cluster, s, task, victim, spare, t_exit) | {
        "exit_after_sigterm_s": round(t_exit - t_term, 3)}

    # back: the restarted replica gets its tasks again once nginx retries it (fail_timeout)
    victim.start()
    victim.wait_ready()
    t_up = time.monotonic()
    deadline = t_up + 5 + CONVERGE_BOUND_S
    while True:
        rid = cluster.rid("back")
        assert classify(cluster.nginx_url, task, rid).status_code == 200
        if cluster.upstreams(rid) == [victim.addr]:
            break
        assert time.monotonic() < deadline, "nginx never sent the task back"
        time.sleep(0.1)
    MEASURED["task_back_on_restarted_replica_after_ready_s"] = round(time.monotonic() - t_up, 3)


def _unread_bytes_on(port: int, at_least: int = 1) -> bool:
    """Whether an established connection to ``port`` holds ``at_least`` request bytes nobody
    has read."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                rx_queue = int(cols[4].split(":")[1], 16)
                if local_port == port and cols[3] == "01" and rx_queue >= at_least:
                    return True
    return False


def test_sigkill_mid_request_is_retried_on_another_replica(cluster):
    victim = cluster.replicas[1]
    task, spare, targets = _failover_traffic(cluster, victim, seed=61)
    held: dict[str, httpx.Response] = {}

    # Longer than the streamer's clips, so the unread bytes that show it reached the frozen
    # victim are this request's and not a streamer request's (which, failing first, would
    # mark the victim down and send this one straight to the spare).
    held_audio = wav_bytes(1.5, seed=2)

    def pending() -> None:
        held["r"] = classify(cluster.nginx_url, task, "held-2", audio=held_audio, timeout=60)

    with Streamer(targets, threads=2, prefix="kill") as s:
        s.wait_for(lambda res: len(res) >= 8, CONVERGE_BOUND_S, "traffic flows")
        # freeze the victim, let nginx hand it a request, then kill it mid-request
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            t = threading.Thread(target=pending, daemon=True)
            t.start()
            deadline = time.monotonic() + 20
            while not _unread_bytes_on(victim.port, at_least=len(held_audio)):
                assert time.monotonic() < deadline, "nginx never forwarded to the victim"
                time.sleep(0.005)
        finally:
            victim.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        victim.proc.wait(10)
        t.join(60)
        n = len(s.results)
        s.wait_for(lambda res: len(res) >= n + 20, CONVERGE_BOUND_S, "traffic goes on")
    assert held["r"].status_code == 200, held["r"].text
    assert cluster.upstreams("held-2") == [victim.addr, spare.addr]  # retried once, answered
    MEASURED["sigkill"] = _check_failover(cluster, s, task, victim, spare, t_kill)
