"""The learning check's library part raises library errors; only its script turns them into an
exit status and a message."""

from __future__ import annotations

import subprocess

import pytest

from aat_serve.adapters.errors import AATError, ConfigError
from aat_serve.training import learning_check as LC


def _no_espeak(monkeypatch):
    monkeypatch.setattr(LC.shutil, "which", lambda name: None)


def test_synthesize_without_espeak_raises_config_error(monkeypatch, tmp_path):
    _no_espeak(monkeypatch)
    with pytest.raises(ConfigError, match=r"espeak-ng is not installed.*apt-get install "
                                          r"espeak-ng") as err:
        LC.synthesize(tmp_path / "keywords")
    assert isinstance(err.value, AATError) and not isinstance(err.value, SystemExit)
    assert str(tmp_path / "keywords") in str(err.value)  # names where it was writing
    assert not (tmp_path / "keywords").exists()


def test_synthesize_with_espeak_writes_the_split_lists(monkeypatch, tmp_path):
    """The differs case: with espeak-ng on PATH the same call runs it once per clip."""
    calls = []
    monkeypatch.setattr(LC.shutil, "which", lambda name: "/opt/bin/espeak-ng")
    monkeypatch.setattr(LC.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    n = LC.synthesize(tmp_path, words=("yes",), voices=("en-us",), variants=("m1", "m4", "f4"))
    assert n == 6 and len(calls) == 6 and calls[0][0] == "/opt/bin/espeak-ng"
    assert (tmp_path / "validation_list.txt").read_text().splitlines() == [
        "yes/en-us+m4_s150_p40.wav", "yes/en-us+m4_s185_p60.wav"]
    assert (tmp_path / "testing_list.txt").read_text().splitlines() == [
        "yes/en-us+f4_s150_p40.wav", "yes/en-us+f4_s185_p60.wav"]


def test_script_exits_1_with_the_message(monkeypatch, capsys, tmp_path):
    _no_espeak(monkeypatch)
    rc = LC.main(["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("espeak-ng is not installed;") and "apt-get install espeak-ng" in err
    assert "Traceback" not in err
