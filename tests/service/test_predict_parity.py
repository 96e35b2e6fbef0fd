"""A mixed stream of concurrent requests for four tasks answers, for every request, exactly
what ``aat predict`` gives for that file and task, and the batches really mix tasks."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.cli.main import main as aat
from tests.service.helpers import Gate, make_bundle, served, wait_until, wav_bytes

TASKS = ("birds", "words", "tags", "vpt")


@pytest.fixture
def four(ckpt, bundles):
    """The three shared tasks plus one with deep prompts (a longer sequence in the model)."""
    return {**bundles, "vpt": make_bundle(ckpt, "vpt", method="prompt", num_classes=6, seed=4)}


def _aat_predict(capsys, ckpt_dir, bundle_path, files, k) -> dict[str, list[dict]]:
    code = aat(["predict", *map(str, files), "--checkpoint", str(ckpt_dir), "--bundle",
                str(bundle_path), "--top-k", str(k), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["file"]: row["predictions"] for row in rows}


def test_mixed_concurrent_stream_matches_aat_predict(make_app, store, ckpt_dir, four, tmp_path,
                                                     capsys, monkeypatch):
    files = []
    for s in range(6):
        f = tmp_path / f"clip{s}.wav"
        f.write_bytes(wav_bytes(0.3 + 0.1 * s, seed=s, sr=(16000, 22050, 8000)[s % 3]))
        files.append(f)
    expected = {}
    for task, b in four.items():
        path = tmp_path / f"{task}.safetensors"
        b.save(path)
        b.save(store / f"{task}.safetensors")
        for file, labels in _aat_predict(capsys, ckpt_dir, path, files, 10).items():
            expected[(task, file)] = labels
    # the predictions differ between tasks and between files: a mix-up could not pass
    assert expected[("birds", str(files[0]))] != expected[("birds", str(files[1]))]
    assert expected[("words", str(files[0]))] != expected[("vpt", str(files[0]))]

    jobs = [(TASKS[i % 4], files[(i * 5) % 6]) for i in range(24)]  # every task, every file
    gate = Gate()
    monkeypatch.setattr(MultiTaskModel, "classify", gate.wrap(MultiTaskModel.classify))
    with served(make_app(max_batch=8, max_wait_ms=20)) as c:
        engine = c.app.state.service.engine
        # Hold the worker on the first clip so the rest queue up, in this interleaved order.
        gate.close()

        def post(job):
            task, file = job
            # the clips run to 0.8 s, the tiny backbone's window is 0.655 s: both sides score
            # two windows and aggregate them alike (adapters/windows.py)
            return c.post(f"/classify/{task}?top_k=10",
                          content=file.read_bytes(),
                          headers={"content-type": "audio/wav"})

        with ThreadPoolExecutor(len(jobs)) as pool:
            try:
                futures = [pool.submit(post, jobs[0])]
                assert gate.entered.wait(10)
                for n, job in enumerate(jobs[1:], start=1):
                    futures.append(pool.submit(post, job))
                    wait_until(lambda n=n: engine._admitted == n)
            finally:
                gate.opened.set()
            answers = [f.result(30) for f in futures]
        metrics = c.get("/metrics").text

    for (task, file), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and body["version"] == four[task].manifest.version
        want = expected[(task, str(file))]
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in want]
        for got, ref in zip(body["predictions"], want, strict=True):
            assert got["score"] == pytest.approx(ref["score"], abs=1e-5)  # fp32, other batch

    mixed = [b for b in (r.json() for r in answers) if b["batch_tasks"] > 1]
    assert len(mixed) >= 16  # after the held clip, 23 queued clips run as 8 + 8 + 7
    count = float(re.search(r"^aat_batch_tasks_count (\S+)$", metrics, re.M).group(1))
    single = float(re.search(r'^aat_batch_tasks_bucket\{le="1.0"\} (\S+)$', metrics,
                             re.M).group(1))
    assert count - single >= 3  # at least three forward passes held several tasks


def test_long_audio_scores_in_windows_as_classify_does(make_app, store, ckpt_dir, four,
                                                       tmp_path, capsys):
    """``aat predict`` and ``POST /classify`` cut long audio into the same windows and
    aggregate them alike: mean for a single-label task, max for a multi-label one."""
    f = tmp_path / "long.wav"
    f.write_bytes(wav_bytes(2.0, seed=7))
    for task in ("birds", "tags"):
        four[task].save(store / f"{task}.safetensors")
    with served(make_app()) as c:
        for task, how in (("birds", "mean"), ("tags", "max")):
            path = tmp_path / f"{task}.safetensors"
            four[task].save(path)
            code = aat(["predict", str(f), "--checkpoint", str(ckpt_dir), "--bundle", str(path),
                        "--top-k", "10", "--hop-s", "0.3", "--json"])
            row = json.loads(capsys.readouterr().out)
            assert code == 0 and row["aggregate"] == how
            body = c.post(f"/classify/{task}?top_k=10&hop_s=0.3", content=f.read_bytes(),
                          headers={"content-type": "audio/wav"}).json()
            assert row["windows"] == body["windows"] == 6  # 1 + ceil((2 - 0.655) / 0.3)
            assert len(row["window_logits"]) == 6 and row["logits"] == row["window_logits"][0]
            assert [p["label"] for p in row["predictions"]] == \
                [p["label"] for p in body["predictions"]]
            for got, ref in zip(row["predictions"], body["predictions"], strict=True):
                assert got["score"] == pytest.approx(ref["score"], abs=1e-5)
            # differs: the first window alone scores otherwise
            aat(["predict", str(f), "--checkpoint", str(ckpt_dir), "--bundle", str(path),
                 "--top-k", "10", "--aggregate", "first", "--json"])
            first = json.loads(capsys.readouterr().out)
            assert first["windows"] == 1 and "window_logits" not in first
            assert first["logits"] == pytest.approx(row["logits"], abs=1e-5)  # other batch
            assert [p["score"] for p in first["predictions"]] != \
                pytest.approx([p["score"] for p in row["predictions"]], abs=1e-5)
