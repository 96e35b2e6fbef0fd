"""``aat serve`` as a real process over a store holding a poisoned file and an orphan
temporary file: the other tasks serve, /readyz is 200, the orphan is gone; and short clips are
not held up by 600-second clips decoding at the same time.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server_process import Server
from tests.service.helpers import wav_bytes

WAV = {"content-type": "audio/wav"}


def _timed_post(url: str, body: bytes) -> tuple[int, float]:
    started = time.monotonic()
    r = httpx.post(url, content=body, headers=WAV, timeout=60)
    return r.status_code, time.monotonic() - started


def test_a_poisoned_store_and_long_clips_in_a_real_process(tmp_path, ckpt_dir, bundles):
    store = tmp_path / "store"
    store.mkdir()
    bundles["birds"].save(store / "birds.safetensors")
    (store / "words.safetensors").write_bytes(b"\x00" * 64)
    orphan = store / ".tags.safetensors.k3j2h1g0.tmp"
    orphan.write_bytes(b"half an upload")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    server = Server(tmp_path, "poisoned", ckpt_dir, store,
                    {"AAT_DECODE_WORKERS": "1", "AAT_REQUEST_TIMEOUT_S": "10",
                     "AAT_MAX_WAIT_MS": "1"})
    try:
        server.wait_ready()
        assert not orphan.exists()
        with httpx.Client(base_url=server.url, timeout=20) as c:
            assert c.get("/readyz").json()["failed_tasks"] == 1
            listed = {t["task"]: t["state"] for t in c.get("/tasks").json()["tasks"]}
            assert listed == {"birds": "active", "words": "failed"}
            assert c.post("/classify/birds", content=wav_bytes(), headers=WAV).status_code == 200
            r = c.post("/classify/words", content=wav_bytes(), headers=WAV)
            assert (r.status_code, r.json()["error"]["type"]) == (500, "task_failed")
            assert 'aat_bundles_failed{task="words"} 1.0' in c.get("/metrics").text
        # three 600-s clips (about 2 s of decoding each here) and short clips at the same time
        url = server.url + "/classify/birds?aggregate=first"  # 600 s: one window, all decoded
        long_clip, short_clip = wav_bytes(600.0), wav_bytes(0.5, seed=2)
        with ThreadPoolExecutor(4) as pool:
            longs = [pool.submit(_timed_post, url, long_clip) for _ in range(3)]
            time.sleep(0.5)  # bounded: the long bodies are on their way
            shorts = []
            # At least three short clips, and more while a long one is in flight (on a fast
            # machine the long clips may all finish early; bounded either way).
            while (len(shorts) < 3 or not all(f.done() for f in longs)) and len(shorts) < 40:
                shorts.append(_timed_post(url, short_clip))
            long_answers = [f.result(60) for f in longs]
        assert {s for s, _ in long_answers} <= {200, 504}, long_answers
        assert {s for s, _ in shorts} == {200}, shorts
        worst = max(t for _, t in shorts)
        print(f"long clips: {long_answers}; {len(shorts)} short clips meanwhile, "
              f"worst {worst:.3f} s")
        assert worst < 10  # generous: each answered well within its own deadline
    finally:
        server.stop()
