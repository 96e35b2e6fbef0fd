"""The bundle store: layout, atomic writes, versions kept and pruned, header-only manifests."""

from __future__ import annotations

import os

import pytest

from aat_serve.adapters.bundle import read_manifest
from aat_serve.adapters.errors import BundleError
from aat_serve.adapters.fileio import atomic_write
from aat_serve.service.store import ACTIVE, BundleStore


def _leftovers(root):
    return sorted(p.name for p in root.rglob(".*"))


def test_put_writes_the_version_and_activates_it(tmp_path, bundles):
    store = BundleStore(tmp_path)
    b = bundles["birds"]
    v = b.manifest.version
    entry = store.put("birds", v, b.to_bytes())
    assert entry.path == tmp_path / "birds" / f"{v}.safetensors"
    assert entry.version == v
    assert (tmp_path / "birds" / ACTIVE).read_text() == v + "\n"
    assert entry.path.read_bytes() == b.to_bytes()
    assert _leftovers(tmp_path) == []  # no temporary files left behind
    assert store.scan() == {"birds": entry}


def test_previous_version_is_kept_until_a_newer_one_is_active(tmp_path):
    store = BundleStore(tmp_path)
    d = tmp_path / "t"
    store.put("t", "aaaa", b"one")
    store.put("t", "bbbb", b"two")
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["aaaa.safetensors",
                                                               "bbbb.safetensors"]
    assert store.entry("t").version == "bbbb"
    os.utime(d / "bbbb.safetensors", ns=(2_000_000_000_000_000_000,) * 2)
    store.put("t", "cccc", b"three")  # bbbb is the previous one now; aaaa goes
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["bbbb.safetensors",
                                                               "cccc.safetensors"]
    store.activate("t", "bbbb")  # roll back
    assert store.entry("t").version == "bbbb"
    with pytest.raises(BundleError, match="store has no version aaaa of task 't'"):
        store.activate("t", "aaaa")


def test_uploaded_versions_take_precedence_over_a_seed_file(tmp_path, bundles):
    store = BundleStore(tmp_path)
    b = bundles["words"]
    b.save(tmp_path / "words.safetensors")
    seed = store.entry("words")
    assert seed.version is None and seed.path == tmp_path / "words.safetensors"
    store.put("words", "abcd", b"x")
    assert store.entry("words").version == "abcd"
    assert (tmp_path / "words.safetensors").exists()
    store.drop_seed("words")
    assert not (tmp_path / "words.safetensors").exists()
    assert store.delete("words") is True
    assert store.entry("words") is None and not (tmp_path / "words").exists()
    assert store.delete("words") is False


def test_scan_ignores_what_is_not_a_task(tmp_path, bundles):
    store = BundleStore(tmp_path)
    bundles["tags"].save(tmp_path / "tags.safetensors")
    for junk in (".tags.safetensors.x.tmp", "Upper.safetensors", "notes.txt", "-x.safetensors"):
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "emptydir").mkdir()  # a task directory without ACTIVE
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / ACTIVE).write_text("ffff\n")  # names a missing file
    assert list(store.scan()) == ["tags"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_read_manifest_reads_only_the_header(tmp_path, bundles):
    b = bundles["birds"]
    data = b.to_bytes()
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:8 + n])  # no tensor bytes at all
    assert read_manifest(cut) == b.manifest
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(BundleError,
                       match=r"bad\.safetensors: not a safetensors file: header is not JSON"):
        read_manifest(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(BundleError, match="not a safetensors file"):
        read_manifest(bad)
