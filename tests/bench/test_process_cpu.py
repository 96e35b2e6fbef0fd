"""CPU per request from /proc (aat_serve/bench/process_cpu.py): each thread's time lands in its
group (this process's main thread, its other threads, a child's main thread), and a process
that is not a child is not counted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aat_serve.bench.process_cpu import GROUPS, children, cpu_seconds, per_request_us
from tests.service.helpers import wait_until

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def _burn(seconds: float) -> None:
    exec(BURN.format(s=seconds))


def _grew(before: dict, after: dict) -> set[str]:
    return {g for g in GROUPS if after[g] - before[g] >= 0.1}


def test_the_main_thread_and_the_others_count_apart():
    me = os.getpid()
    before = cpu_seconds(me)
    _burn(0.3)
    assert _grew(before, cpu_seconds(me)) == {"model_loop"}

    before = cpu_seconds(me)
    burnt, done = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (_burn(0.3), burnt.set(), done.wait(60)))
    t.start()  # measured while it lives: a thread's time leaves /proc with it
    try:
        assert burnt.wait(60)
        assert _grew(before, cpu_seconds(me)) == {"model_threads"}
    finally:
        done.set()
        t.join()


def _own_cpu(pid: int) -> float:
    """CPU seconds of one process (a cheap read: polling must not burn this one's CPU)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_childs_main_thread_is_a_front_end_loop_and_a_grandchild_is_nothing():
    me = os.getpid()
    before = cpu_seconds(me)
    child = _spawn(BURN.format(s=0.4) + "time.sleep(60)")
    try:
        assert child.pid in children(me)
        wait_until(lambda: _own_cpu(child.pid) >= 0.4, 60)
        assert _grew(before, cpu_seconds(me)) == {"front_end_loops"}
    finally:
        child.kill()
        child.wait()

    before = cpu_seconds(me)
    grandchild_code = BURN.format(s=0.4) + "time.sleep(60)"
    grandchild = None
    parent = _spawn(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
                    f"{grandchild_code!r}])")
    try:
        (grandchild,) = wait_until(lambda: children(parent.pid), 60)
        wait_until(lambda: _own_cpu(grandchild) >= 0.4, 60)  # it burnt ...
        assert _grew(before, cpu_seconds(me)) == set()  # ... and is not counted here
    finally:
        for p in (grandchild, parent.pid):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p, signal.SIGKILL)
        parent.wait()


def test_per_request_divides_the_differences():
    zero = dict.fromkeys(GROUPS, 1.0)
    later = {"model_loop": 1.5, "model_threads": 1.0, "front_end_loops": 3.0,
             "front_end_threads": 0.5}  # a group that shrank (a process gone) counts 0
    got = per_request_us([(zero, later), (zero, later)], 1000)
    assert got == {"model_loop": 1000.0, "model_threads": 0.0, "front_end_loops": 4000.0,
                   "front_end_threads": 0.0}
    assert per_request_us([(zero, later)], 0) == dict.fromkeys(GROUPS, 0.0)
