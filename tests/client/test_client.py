"""``aat_serve.client`` against a real ``aat serve`` process on 127.0.0.1 (upload, classify from
every kind of audio, list, read, delete, typed errors, tokens from the environment), and its
503 retries against a scripted transport (a live server cannot be made to answer 503 on cue)."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
import soundfile
import torch

from aat_serve.client import (
    AsyncClient,
    AuthError,
    BadRequest,
    Client,
    InvalidBundle,
    NotFound,
    Unavailable,
)
from tests.server_process import Server
from tests.service.helpers import (
    ADMIN,
    load_tiny,
    make_bundle,
    reference_scores,
    wav_bytes,
    write_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    ckpt_dir = write_tiny_checkpoint(tmp / "tiny-ast")
    (tmp / "store").mkdir()
    server = Server(tmp, "client", ckpt_dir, tmp / "store", {"AAT_ADMIN_TOKEN": ADMIN})
    try:
        server.wait_ready()
        yield server, load_tiny(ckpt_dir)
    finally:
        server.stop()


def test_upload_classify_list_read_delete(live, tmp_path, monkeypatch):
    server, ckpt = live
    bundle = make_bundle(ckpt, "birds", method="aat_ms", num_classes=4, seed=1)
    path = bundle.save(tmp_path / "birds.safetensors")
    monkeypatch.setenv("AAT_ADMIN_TOKEN", ADMIN)  # the token comes from the environment
    with Client(server.url) as aat:
        up = aat.upload("birds", path)
        assert (up.task, up.version, up.created) == ("birds", bundle.manifest.version, True)
        audio = wav_bytes(0.6, seed=4)  # one window of the tiny backbone (0.655 s)
        expected = reference_scores(ckpt, bundle, audio)
        samples, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
        for given in (str(path.with_name("a.wav")), audio, io.BytesIO(audio), samples):
            if isinstance(given, str):
                with open(given, "wb") as f:
                    f.write(audio)
            got = aat.classify("birds", given, sample_rate=rate, top_k=4)
            assert got.version == bundle.manifest.version and got.task == "birds"
            scores = torch.tensor([p.score for p in sorted(got.predictions,
                                                           key=lambda p: p.label)])
            order = sorted(range(4), key=lambda i: bundle.manifest.labels[i])
            assert torch.allclose(scores, expected[order], atol=1e-4)
            assert got.top.score == max(p.score for p in got.predictions)
        # The differs check: other audio gives other scores.
        other = aat.classify("birds", wav_bytes(0.7, seed=9), top_k=4)
        assert other.predictions != got.predictions
        assert [t.task for t in aat.tasks()] == ["birds"]
        assert aat.task("birds").manifest["method"] == "aat_ms"
        assert aat.delete("birds") == bundle.manifest.version
        with pytest.raises(NotFound) as e:
            aat.classify("birds", audio)
        assert (e.value.status, e.value.type) == (404, "unknown_task")


def test_service_errors_are_typed(live):
    server, ckpt = live
    with Client(server.url, admin_token="wrong-token") as aat:
        with pytest.raises(AuthError) as e:
            aat.upload("x", make_bundle(ckpt, "x").to_bytes())
        assert e.value.status in (401, 403) and e.value.type
    with Client(server.url, admin_token=ADMIN) as aat:
        with pytest.raises(InvalidBundle) as e:
            aat.upload("x", b"not a bundle")
        assert (e.value.status, e.value.type) == (422, "invalid_bundle")
        assert e.value.message == "not a safetensors file: bad header length"
        aat.upload("x", make_bundle(ckpt, "x").to_bytes())
        with pytest.raises(BadRequest) as e:
            aat.classify("x", b"RIFF garbage")
        assert (e.value.status, e.value.type) == (400, "invalid_audio")
        with pytest.raises(ValueError, match="sample_rate"):
            aat.classify("x", np.zeros(1600, dtype=np.float32))
        aat.delete("x")


def test_async_client_classifies(live, tmp_path):
    server, ckpt = live
    bundle = make_bundle(ckpt, "words", method="aat_m", num_classes=5, seed=2)

    async def go():
        async with AsyncClient(server.url, admin_token=ADMIN) as aat:
            await aat.upload("words", bundle.to_bytes())
            results = await asyncio.gather(*(aat.classify("words", wav_bytes(0.5, seed=s))
                                             for s in range(4)))
            names = [t.task for t in await aat.tasks()]
            await aat.delete("words")
            return results, names

    results, names = asyncio.run(go())
    assert names == ["words"]
    assert {r.version for r in results} == {bundle.manifest.version}
    assert len({tuple(p.score for p in r.predictions) for r in results}) == 4  # 4 clips differ


def _scripted(statuses: list[int], retry_after: str = "0"
              ) -> tuple[httpx.MockTransport, list[float]]:
    """A transport answering ``statuses`` in turn; ``seen`` gets each request's time."""
    seen: list[float] = []
    answers = iter(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        if next(answers) == 503:
            return httpx.Response(503, headers={"Retry-After": retry_after},
                                  json={"error": {"type": "overloaded", "message": "full"}})
        return httpx.Response(200, json={"tasks": [], "count": 0})

    return httpx.MockTransport(handle), seen


def test_503_is_retried_as_retry_after_says_and_bounded():
    transport, seen = _scripted([503, 503, 200], retry_after="0.2")
    with Client("http://aat.test", transport=transport, retries=3) as aat:
        assert aat.tasks() == []
    assert len(seen) == 3
    assert seen[1] - seen[0] >= 0.2 and seen[2] - seen[1] >= 0.2  # waited as told
    transport, seen = _scripted([503] * 10)
    with Client("http://aat.test", transport=transport, retries=2) as aat, \
            pytest.raises(Unavailable) as e:
        aat.tasks()
    assert len(seen) == 3 and (e.value.status, e.value.type) == (503, "overloaded")
    transport, seen = _scripted([503, 200])
    with Client("http://aat.test", transport=transport, retries=0) as aat, \
            pytest.raises(Unavailable):
        aat.tasks()
    assert len(seen) == 1  # no retry asked for, none made
    # A huge Retry-After is capped by max_retry_wait_s.
    transport, seen = _scripted([503, 200], retry_after="3600")
    with Client("http://aat.test", transport=transport, max_retry_wait_s=0.01) as aat:
        assert aat.tasks() == []
    assert seen[1] - seen[0] < 60
