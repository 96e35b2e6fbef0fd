"""The bundle store: a directory, shareable between replicas, that is the source of truth.

Layout::

    <store>/<task>.safetensors             a bundle placed by hand (seed); optional
    <store>/<task>/<version>.safetensors   versions uploaded through PUT, named by content hash
    <store>/<task>/ACTIVE                  the version the task serves (one line)

A task directory with an ``ACTIVE`` file takes precedence over a hand-placed file. Every write
is atomic (temporary file in the same directory, fsync, rename, fsync of the directory), so a
reader sees the old or the new state and never a partial file. The previous version is kept
until a newer one is active; older ones are pruned. Other files (dotfiles, temporaries) are
ignored; temporary files that a killed write left behind are removed at start-up
(``remove_orphans``). A store may have a read-only layer of hand-placed bundles beneath it (the
demo's tasks, ``AAT_DEMO``): a task of the store's own shadows a read-only one of the same name,
writes go to the store, and a read-only task cannot be deleted. Nothing here loads tensors
(``aat_serve.adapters.bundle.read_manifest`` parses only the header).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from aat_serve.adapters.bundle import TASK_NAME_RE
from aat_serve.adapters.errors import BundleError
from aat_serve.adapters.fileio import atomic_write, fsync_dir

log = logging.getLogger(__name__)

ACTIVE = "ACTIVE"
SUFFIX = ".safetensors"
_VERSION_RE = TASK_NAME_RE  # content hashes are lowercase hex; the same charset is safe
TEMP_RE = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.tmp")
"""A temporary file of ``aat_serve.adapters.fileio.atomic_write``: ``.<name>.<random>.tmp``."""
ORPHAN_AGE_S = 600.0
"""A temporary file older than this is an orphan of a killed write (a live write renames its
file within seconds); younger ones may belong to another replica's upload and are kept."""


@dataclass(frozen=True)
class StoreEntry:
    """Where a task's active bundle lives in the store."""

    task: str
    path: Path
    version: str | None
    """From ``ACTIVE`` for uploaded bundles; None for hand-placed files (read the manifest)."""
    stamp: tuple[int, int]
    """(mtime_ns, size) of the file: a cheap change detector."""
    read_only: bool = False
    """From the read-only layer (the demo's tasks), not the store's own directory."""


class BundleStore:
    """File operations on the store directory; no model, no HTTP."""

    def __init__(self, root: str | os.PathLike,
                 read_only: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.read_only = Path(read_only) if read_only is not None else None
        """Hand-placed ``<task>.safetensors`` served beneath the store's own tasks."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise BundleError(f"bundle store {str(self.root)!r} is not readable")

    # -- reading --------------------------------------------------------------------------
    def entry(self, task: str) -> StoreEntry | None:
        """The active bundle of ``task`` (the store's own before the read-only layer's), or
        None if neither has one."""
        if not TASK_NAME_RE.fullmatch(task):
            return None
        own = self._own_entry(task)
        if own is not None or self.read_only is None:
            return own
        path = self.read_only / f"{task}{SUFFIX}"
        stamp = self._stamp(path)
        return StoreEntry(task, path, None, stamp, read_only=True) if stamp else None

    def _own_entry(self, task: str) -> StoreEntry | None:
        managed = self.root / task
        try:
            version = (managed / ACTIVE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            version = ""
        if version and _VERSION_RE.fullmatch(version):
            path = managed / f"{version}{SUFFIX}"
            stamp = self._stamp(path)
            if stamp is not None:
                return StoreEntry(task, path, version, stamp)
            log.warning("store: %s/ACTIVE names version %s but its file is missing", task,
                        version)
        flat = self.root / f"{task}{SUFFIX}"
        stamp = self._stamp(flat)
        return StoreEntry(task, flat, None, stamp) if stamp is not None else None

    def scan(self) -> dict[str, StoreEntry]:
        """Every task with an active bundle."""
        names: set[str] = set()
        children = []
        for folder in (self.root, self.read_only):
            if folder is None:
                continue
            try:
                children += list(os.scandir(folder))
            except OSError as e:
                raise BundleError(f"cannot list bundle store {str(folder)!r}: {e.strerror}"
                                  ) from None
        for child in children:
            name = child.name
            if name.endswith(SUFFIX):
                name = name[: -len(SUFFIX)]
            if TASK_NAME_RE.fullmatch(name):
                names.add(name)
        out = {}
        for name in sorted(names):
            e = self.entry(name)
            if e is not None:
                out[name] = e
        return out

    def version_path(self, task: str, version: str) -> Path:
        """Where an uploaded ``version`` of ``task`` is (or was) stored."""
        return self.root / task / f"{version}{SUFFIX}"

    def remove_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
        """Remove temporary files left by killed writes (in the store and its task folders)
        that are older than ``min_age_s``; returns what was removed."""
        removed = []
        now = time.time()
        folders = [self.root] + [p for p in self.root.iterdir()
                                 if p.is_dir() and TASK_NAME_RE.fullmatch(p.name)]
        for folder in folders:
            for p in folder.iterdir():
                if not TEMP_RE.fullmatch(p.name):
                    continue
                try:
                    if not p.is_file() or now - p.stat().st_mtime < min_age_s:
                        continue
                    p.unlink()
                except OSError as e:
                    log.warning("store: cannot remove temporary file %s: %s", p, e.strerror)
                    continue
                removed.append(p)
                log.info("store: removed an orphan temporary file", extra={"path": str(p)})
        return removed

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        return (st.st_mtime_ns, st.st_size)

    # -- writing --------------------------------------------------------------------------
    def put(self, task: str, version: str, data: bytes) -> StoreEntry:
        """Store ``data`` as ``task``'s version ``version`` and make it active, atomically."""
        if not TASK_NAME_RE.fullmatch(task) or not _VERSION_RE.fullmatch(version):
            raise BundleError(f"cannot store task {task!r} version {version!r}: bad name")
        d = self.root / task
        d.mkdir(exist_ok=True)
        target = d / f"{version}{SUFFIX}"
        if not target.is_file():
            atomic_write(target, data)
        atomic_write(d / ACTIVE, (version + "\n").encode())
        entry = self.entry(task)
        if entry is None or entry.version != version:
            raise BundleError(f"store {str(self.root)!r}: task {task!r} version {version} was "
                              "written but does not read back")
        self._prune(d, keep={version, self._previous(d, version)})
        return entry

    def drop_seed(self, task: str) -> None:
        """Remove a hand-placed ``<task>.safetensors`` once an uploaded version is active."""
        with contextlib.suppress(FileNotFoundError, PermissionError):
            (self.root / f"{task}{SUFFIX}").unlink()

    def activate(self, task: str, version: str) -> None:
        """Point ``task`` back at a stored version (used to roll back a failed activation)."""
        d = self.root / task
        if not (d / f"{version}{SUFFIX}").is_file():
            raise BundleError(f"store has no version {version} of task {task!r}")
        atomic_write(d / ACTIVE, (version + "\n").encode())

    def delete(self, task: str) -> bool:
        """Deactivate and remove every version of ``task``; False if there was none."""
        found = False
        d = self.root / task
        if (d / ACTIVE).exists():
            (d / ACTIVE).unlink(missing_ok=True)  # deactivation first: readers see "gone"
            found = True
        flat = self.root / f"{task}{SUFFIX}"
        if flat.exists():
            flat.unlink(missing_ok=True)
            found = True
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        fsync_dir(self.root)
        return found

    @staticmethod
    def _previous(d: Path, current: str) -> str | None:
        """The most recently written version other than ``current``."""
        others = [p for p in d.glob(f"*{SUFFIX}") if p.stem != current]
        if not others:
            return None
        return max(others, key=lambda p: p.stat().st_mtime_ns).stem

    @staticmethod
    def _prune(d: Path, keep: set[str | None]) -> None:
        for p in d.glob(f"*{SUFFIX}"):
            if p.stem not in keep:
                p.unlink(missing_ok=True)
