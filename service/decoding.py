"""Audio bodies to PCM, off the event loop: the decode pools of a process that takes requests.

The one-process service and each front-end process (``service.frontend``) decode the same way:
in a pool of single-threaded-torch threads, or, for bodies over ``LARGE_AUDIO_BYTES``, in a
one-thread pool of their own, so a few long clips never keep short ones from the decode threads.
Features are not computed here: the model process computes the whole batch's log-mel at once on
the model's device (``service.batch_features``).
"""

from __future__ import annotations

import asyncio
import time

import torch

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.features import load_audio
from aat_serve.service.errors import timed_out
from aat_serve.service.threads import decode_pool

LARGE_AUDIO_BYTES = 1 << 20
"""Audio bodies above this (about 30 s of 16 kHz 16-bit WAV) decode in a pool of their own, one
thread: a few long clips never keep short ones from the decode pool."""


def decode_pcm(audio: bytes, cfg: FeatureConfig, deadline: float = float("inf"),
               timeout_s: float = 0.0) -> torch.Tensor:
    """Mono float32 PCM at the task's rate (resampled only if the audio's rate differs). A
    request whose deadline passed while it waited for a decode thread is not decoded (504)."""
    if time.monotonic() >= deadline:
        raise timed_out(timeout_s)
    return load_audio(audio, sample_rate=cfg.sample_rate, max_duration_s=cfg.max_duration_s)


class Decoder:
    """The decode pools: ``workers`` threads (None: one per usable core) and one for large
    bodies; ``timeout_s`` is the request timeout named in 504 answers."""

    def __init__(self, workers: int | None, timeout_s: float) -> None:
        self.pool = decode_pool(workers)
        self.large_pool = decode_pool(1, "aat-decode-large")
        self.timeout_s = timeout_s

    async def decode(self, audio: bytes, cfg: FeatureConfig, deadline: float = float("inf"),
                     ) -> torch.Tensor:
        """Mono PCM at ``cfg.sample_rate``, decoded in a pool thread. 504 at ``deadline``, even
        while the decode still waits for a thread (it then never runs) or still runs."""
        loop = asyncio.get_running_loop()
        pool = self.large_pool if len(audio) > LARGE_AUDIO_BYTES else self.pool
        work = loop.run_in_executor(pool, decode_pcm, audio, cfg, deadline, self.timeout_s)
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise timed_out(self.timeout_s) from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.large_pool.shutdown(wait=False, cancel_futures=True)
