"""``aat serve --front-ends N`` as real processes: N front ends accept on the one port and
answer as the model computes; a front end that dies is replaced; SIGTERM stops them all after
the request in flight is answered; a
model process killed outright takes its front ends with it; a port in use stops start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from aat_serve.bench.process_cpu import children
from tests.server_process import Server, aat_command
from tests.service.helpers import make_bundle, reference_scores, wait_until, wav_bytes

WAV = {"Content-Type": "audio/wav"}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def connected(server: Server) -> int:
    try:
        r = httpx.get(server.url + "/readyz", timeout=5)
    except httpx.HTTPError:
        return -1
    return r.json().get("front_ends", -1) if r.status_code == 200 else -1


@pytest.fixture
def split_server(tmp_path, ckpt_dir, ckpt):
    store = tmp_path / "store"
    store.mkdir()
    bundle = make_bundle(ckpt, "birds", num_classes=4, seed=1)
    bundle.save(store / "birds.safetensors")
    server = Server(tmp_path, "split", checkpoint=ckpt_dir, store=store,
                    env={"AAT_FRONT_ENDS": "2", "AAT_MAX_WAIT_MS": "2"})
    try:
        server.wait_ready()
        wait_until(lambda: connected(server) == 2, 60)  # two front ends connected
        yield server, bundle
    finally:
        server.stop()


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    with conn:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _classify(server: Server, clip: bytes) -> torch.Tensor:
    r = httpx.post(server.url + "/classify/birds?top_k=4", content=clip, headers=WAV,
                   timeout=30)
    assert r.status_code == 200, r.text
    return torch.tensor([p["score"] for p in sorted(r.json()["predictions"],
                                                    key=lambda p: p["label"])])


def test_front_ends_answer_replace_the_dead_and_stop_on_sigterm(split_server, ckpt):
    server, bundle = split_server
    clip = wav_bytes(0.5, seed=3)
    want = reference_scores(ckpt, bundle, clip)
    assert torch.allclose(_classify(server, clip), want, atol=1e-5)
    assert not torch.allclose(want, reference_scores(ckpt, bundle, wav_bytes(0.5, seed=4)),
                              atol=1e-3)  # the pair: another clip scores differently
    first = children(server.proc.pid)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(set(children(server.proc.pid)) - {victim}) == 2  # replaced
               and connected(server) == 2, 60)
    assert victim not in children(server.proc.pid)
    for _ in range(8):  # every request still answered, by either front end
        assert torch.allclose(_classify(server, clip), want, atol=1e-5)
    fronts = children(server.proc.pid)
    # a request whose body is half sent at SIGTERM: its front end finishes it (the model
    # process serves until the front ends are gone)
    body = wav_bytes(0.5, seed=5)
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    conn.sendall(b"POST /classify/birds?top_k=4 HTTP/1.1\r\nHost: t\r\nContent-Type: audio/wav"
                 b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                 + body[:len(body) // 2])
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    conn.sendall(body[len(body) // 2:])
    answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    got = json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"]
    scores = torch.tensor([p["score"] for p in sorted(got, key=lambda p: p["label"])])
    assert torch.allclose(scores, reference_scores(ckpt, bundle, body), atol=1e-5)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    wait_until(lambda: not any(alive(p) for p in fronts), 60)  # front ends stopped
    log = server.log.read_text()
    assert "front end exited; starting another" in log
    assert log.count("Application shutdown complete") == 3  # both front ends, then the model


def test_front_ends_exit_when_their_model_process_is_killed(split_server):
    server, _ = split_server
    fronts = children(server.proc.pid)
    assert len(fronts) == 2
    server.proc.kill()
    server.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in fronts), 60)  # orphaned front ends exiting


def test_a_port_in_use_stops_start_up_with_its_reason(tmp_path, ckpt_dir):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AAT_")}
        env["AAT_FRONT_ENDS"] = "2"
        done = subprocess.run([*aat_command(), "serve", "--port", str(port), "--checkpoint",
                               str(ckpt_dir)], env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        holder.close()
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} (AAT_HOST, AAT_PORT)" in done.stderr
