"""Settings: AAT_ environment variables, defaults, overrides and fail-fast validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.service.settings import load_settings

ALL = ("CHECKPOINT", "BUNDLE_DIR", "ADMIN_TOKEN", "API_TOKEN", "HOST", "PORT", "DEVICE", "DTYPE",
       "MAX_BATCH", "MAX_WAIT_MS", "MAX_QUEUE", "REQUEST_TIMEOUT_S", "MAX_AUDIO_MB",
       "MAX_AUDIO_SECONDS", "MAX_BUNDLE_MB", "MAX_TASKS", "PRELOAD", "REFRESH_S", "LOG_LEVEL",
       "MAX_UPLOADS", "DECODE_WORKERS", "KEEP_FREED_MEMORY", "DEVICE_TASK_MB", "HOST_CACHE_MB",
       "PINNED_TASKS", "INFERENCE_THREADS", "SWITCH_INTERVAL_MS", "SLOT_WIDTH", "HTTP_PARSER")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ALL:
        monkeypatch.delenv(f"AAT_{name}", raising=False)


def test_defaults_are_the_documented_ones():
    s = load_settings()
    assert (s.checkpoint, s.bundle_dir, s.admin_token, s.api_token) == (None, None, None, None)
    assert (s.host, s.port, s.device, s.dtype) == ("127.0.0.1", 8000, "auto", "float32")
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.request_timeout_s) == (16, 5.0, 256, 30.0)
    assert (s.max_audio_mb, s.max_audio_seconds, s.max_bundle_mb) == (25.0, 600.0, 200.0)
    assert (s.max_tasks, s.preload, s.refresh_s, s.log_level) == (64, "eager", 5.0, "info")
    assert s.max_audio_bytes == 25 * 1024 * 1024 and s.max_bundle_bytes == 200 * 1024 * 1024
    assert not s.management_enabled
    assert s.keep_freed_memory is True
    assert (s.inference_threads, s.switch_interval_ms) == (None, 1.0)
    assert s.http_parser == "auto"


def test_environment_is_read_with_the_aat_prefix(monkeypatch, tmp_path):
    env = {"CHECKPOINT": str(tmp_path / "ckpt"), "BUNDLE_DIR": str(tmp_path / "store"),
           "ADMIN_TOKEN": "a" * 20 + "x1", "API_TOKEN": "b" * 20 + "y2", "HOST": "0.0.0.0",
           "PORT": "9001", "DEVICE": "CPU", "DTYPE": "bfloat16", "MAX_BATCH": "3",
           "MAX_WAIT_MS": "7.5", "MAX_QUEUE": "9", "REQUEST_TIMEOUT_S": "2",
           "MAX_AUDIO_MB": "1", "MAX_AUDIO_SECONDS": "12", "MAX_BUNDLE_MB": "4",
           "MAX_TASKS": "5", "PRELOAD": "lazy", "REFRESH_S": "0.5", "LOG_LEVEL": "DEBUG"}
    for k, v in env.items():
        monkeypatch.setenv(f"AAT_{k}", v)
    s = load_settings()
    assert s.checkpoint == Path(env["CHECKPOINT"]) and s.bundle_dir == Path(env["BUNDLE_DIR"])
    assert (s.admin_token, s.api_token) == (env["ADMIN_TOKEN"], env["API_TOKEN"])
    assert (s.host, s.port, s.device, s.dtype) == ("0.0.0.0", 9001, "cpu", "bfloat16")
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.request_timeout_s) == (3, 7.5, 9, 2.0)
    assert (s.max_audio_mb, s.max_audio_seconds, s.max_bundle_mb) == (1.0, 12.0, 4.0)
    assert (s.max_tasks, s.preload, s.refresh_s, s.log_level) == (5, "lazy", 0.5, "debug")
    assert s.management_enabled


def test_overrides_beat_the_environment_and_none_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("AAT_PORT", "9001")
    monkeypatch.setenv("AAT_HOST", "0.0.0.0")
    s = load_settings(port=9100, host=None, bundle_dir=tmp_path)
    assert (s.port, s.host, s.bundle_dir) == (9100, "0.0.0.0", tmp_path)


def test_empty_variables_count_as_unset(monkeypatch):
    monkeypatch.setenv("AAT_API_TOKEN", "")  # docker-compose writes `AAT_API_TOKEN:` this way
    assert load_settings().api_token is None


@pytest.mark.parametrize("name,value,message", [
    ("MAX_BATCH", "0", "AAT_MAX_BATCH: Input should be greater than or equal to 1 (got '0')"),
    ("PORT", "70000", "AAT_PORT: Input should be less than or equal to 65535 (got '70000')"),
    ("DEVICE", "tpu", "AAT_DEVICE: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
    ("PRELOAD", "sometimes", "AAT_PRELOAD: Input should be 'eager' or 'lazy' (got 'sometimes')"),
    ("HTTP_PARSER", "llhttp",
     "AAT_HTTP_PARSER: Input should be 'auto', 'httptools' or 'h11' (got 'llhttp')"),
    ("REQUEST_TIMEOUT_S", "-1",
     "AAT_REQUEST_TIMEOUT_S: Input should be greater than 0 (got '-1')"),
    ("MAX_WAIT_MS", "soon",
     "AAT_MAX_WAIT_MS: Input should be a valid number, unable to parse string as a number "
     "(got 'soon')"),
    ("DEVICE_TASK_MB", "0", "AAT_DEVICE_TASK_MB: Input should be greater than 0 (got '0')"),
    ("HOST_CACHE_MB", "-1",
     "AAT_HOST_CACHE_MB: Input should be greater than or equal to 0 (got '-1')"),
    ("PINNED_TASKS", "digits, Bad Name",
     "AAT_PINNED_TASKS: 'Bad Name' is not a task name; expected a comma-separated list of task "
     "names (1-64 characters of a-z, 0-9, '_' or '-') (got 'digits, Bad Name')"),
])
def test_a_bad_value_names_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(f"AAT_{name}", value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == f"invalid configuration: {message}"


def test_cache_budgets_and_pinned_tasks(monkeypatch):
    s = load_settings()
    assert (s.device_task_bytes, s.host_cache_bytes, s.pinned) == (None, 512 << 20, frozenset())
    for k, v in {"DEVICE_TASK_MB": "1.5", "HOST_CACHE_MB": "0", "PINNED_TASKS": "a, b-1"}.items():
        monkeypatch.setenv(f"AAT_{k}", v)
    s = load_settings()
    assert (s.device_task_bytes, s.host_cache_bytes, s.pinned) == (
        3 << 19, 0, frozenset({"a", "b-1"}))
    monkeypatch.setenv("AAT_MAX_TASKS", "2")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == ("invalid configuration: settings: AAT_PINNED_TASKS names 2 tasks but "
                            "AAT_MAX_TASKS is 2; leave at least one slot for the others")


@pytest.mark.parametrize("token", ["changeme", "CHANGEME", "changethis", "secret", "password"])
def test_placeholder_secrets_fail_fast(monkeypatch, tmp_path, token):
    monkeypatch.setenv("AAT_BUNDLE_DIR", str(tmp_path))
    monkeypatch.setenv("AAT_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == (f"invalid configuration: AAT_ADMIN_TOKEN: is a placeholder "
                            f"({token!r}); set a real secret")


def test_short_tokens_are_refused_without_echoing_them(monkeypatch):
    monkeypatch.setenv("AAT_API_TOKEN", "s3cr3t-x9")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == ("invalid configuration: AAT_API_TOKEN: is too short (9 characters); "
                            "use at least 16 random characters")
    assert "s3cr3t" not in str(e.value)


def test_identical_tokens_and_admin_without_store_are_refused(monkeypatch, tmp_path):
    token = "same-token-0123456789"
    with pytest.raises(ConfigError) as e:
        load_settings(admin_token=token, api_token=token, bundle_dir=tmp_path)
    assert str(e.value) == ("invalid configuration: settings: AAT_ADMIN_TOKEN and AAT_API_TOKEN "
                            "must differ")
    assert token not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_settings(admin_token=token)
    assert str(e.value) == ("invalid configuration: settings: AAT_ADMIN_TOKEN is set but "
                            "AAT_BUNDLE_DIR is not: uploaded bundles need a store directory")
    assert load_settings(admin_token=token, bundle_dir=tmp_path).management_enabled


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("0", False), ("true", True)])
def test_keep_freed_memory_reads_booleans(monkeypatch, value, expected):
    monkeypatch.setenv("AAT_KEEP_FREED_MEMORY", value)
    assert load_settings().keep_freed_memory is expected


_RSS_AFTER_FREE = """
import torch
from aat_serve.adapters.process_memory import rss_bytes as rss
from aat_serve.service.runtime import tune_process
from aat_serve.service.settings import load_settings
applied = tune_process(load_settings())
before = rss()
x = torch.ones(64 << 18)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
del x
print(applied, (rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt, /proc")
@pytest.mark.parametrize("on", [True, False])
def test_tune_process_keeps_freed_blocks_only_when_asked(on):
    """With the setting on, a freed 64 MiB tensor stays in the process for reuse; off (glibc's
    defaults), it is unmapped at once."""
    env = {**os.environ, "AAT_KEEP_FREED_MEMORY": "1" if on else "0"}
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE], capture_output=True,
                         text=True, timeout=120, check=True, env=env).stdout.split()
    assert out[0] == str(on)
    kept_mib = int(out[1])
    assert kept_mib >= 60 if on else kept_mib < 8


def test_inference_threads_and_switch_interval_are_read_and_bounded(monkeypatch):
    monkeypatch.setenv("AAT_INFERENCE_THREADS", "3")
    monkeypatch.setenv("AAT_SWITCH_INTERVAL_MS", "0.25")
    s = load_settings()
    assert (s.inference_threads, s.switch_interval_ms) == (3, 0.25)
    monkeypatch.setenv("AAT_INFERENCE_THREADS", "0")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == ("invalid configuration: AAT_INFERENCE_THREADS: Input should be "
                            "greater than or equal to 1 (got '0')")
