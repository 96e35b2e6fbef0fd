"""The GPU scripts run where aat-serve is not installed (the lent GPU machine's image has only
a copy of this tree): with the tree on PYTHONPATH, ``aat_serve`` finds the three package
folders pyproject.toml maps under it at the root (aat_serve/__init__.py), from any working
directory; an installed copy is left as it is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = ("import aat_serve.adapters.kernels.plan as a, aat_serve.service.settings as b, "
         "aat_serve.training as c, aat_serve.bench.serve_targets as d; "
         "print(a.__file__, b.__file__, c.__file__, d.__file__)")


def _python(cwd: Path, pythonpath: str, script: str = PROBE) -> subprocess.CompletedProcess:
    # -S: no site-packages processing, so this checkout's editable install is not seen; the
    # dependencies come from PYTHONPATH, as the image's own would
    site = sysconfig.get_paths()["purelib"]
    return subprocess.run([sys.executable, "-S", "-c", script], cwd=cwd, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{pythonpath}:{site}"})


def test_a_source_tree_on_pythonpath_imports_from_any_directory(tmp_path):
    for cwd in (ROOT, tmp_path):
        done = _python(cwd, str(ROOT))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(ROOT / p) for p in (
            "adapters/kernels/plan.py", "service/settings.py", "training/__init__.py",
            "aat_serve/bench/serve_targets.py")]


def test_a_copy_without_the_root_folders_is_not_extended(tmp_path):
    """The pair: an installed-looking copy (the package alone, no pyproject.toml or mapped
    folders beside it) does not find them, so the search above is what made them found."""
    shutil.copytree(ROOT / "aat_serve", tmp_path / "aat_serve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = _python(tmp_path, str(tmp_path))
    assert done.returncode != 0 and "No module named 'aat_serve.adapters'" in done.stderr
    alone = _python(tmp_path, str(tmp_path), "import aat_serve; print(aat_serve.__path__)")
    assert alone.stdout.strip() == repr([str(tmp_path / "aat_serve")])


def test_gpu_env_puts_the_tree_and_the_carried_tools_on_the_paths(tmp_path):
    tools = tmp_path / "tree"
    shutil.copytree(ROOT / "scripts", tools / "scripts")
    (tools / ".tools").mkdir()
    (tools / ".tools" / "hey").write_text("#!/bin/sh\n")
    (tools / ".tools" / "hey").chmod(0o755)
    script = ('PY=python3; PYTHONPATH=/x; . scripts/gpu_env.sh; '
              'echo "$PYTHONPATH"; command -v hey')
    done = subprocess.run(["bash", "-c", script], cwd=tools, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items()
                                           if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"{tools}:/x", str(tools / ".tools" / "hey")]


def test_the_gpu_scripts_source_it_and_prepare_names_what_the_image_lacks():
    for name in ("gpu_check.sh", "gpu_serve_check.sh"):
        assert ". scripts/gpu_env.sh" in (ROOT / "scripts" / name).read_text(), name
    prepare = (ROOT / "scripts" / "gpu_prepare.sh").read_text()
    declared = prepare.split("MISSING=(", 1)[1].split(")", 1)[0].split()
    for needed in ("soundfile", "fastapi", "uvicorn", "httptools", "orjson", "pydantic",
                   "pydantic-settings", "python-multipart", "fastapi_offline"):
        assert needed in declared, needed
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/.whl/" in ignored and "/.tools/" in ignored


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_closure(image: set[str]) -> set[str]:
    """aat-serve's runtime requirements and theirs, transitively, as installed here (markers
    evaluated for this interpreter; extras not followed); a package the image has brings its
    own requirements there (its version may differ from ours), so it is not followed."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    todo, seen = ["aat-serve"], set()
    while todo:
        name = todo.pop()
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if _norm(req.name) not in seen:
                seen.add(_norm(req.name))
                if _norm(req.name) not in image:
                    todo.append(req.name)
    return seen


def test_the_image_and_the_carried_wheels_cover_every_runtime_requirement():
    image = {_norm(line) for line in (ROOT / "scripts" / "gpu_image_packages.txt").read_text()
             .splitlines() if line.strip() and not line.startswith("#")}
    prepare = (ROOT / "scripts" / "gpu_prepare.sh").read_text()
    carried = {_norm(n) for n in prepare.split("MISSING=(", 1)[1].split(")", 1)[0].split()}
    needed = _runtime_closure(image)
    assert {"fastapi", "torch", "soundfile", "cffi"} <= needed  # the closure is transitive
    assert needed - image - carried == set()
    assert not carried & image - {"typing-extensions"}  # carried only what the image lacks


def test_json_report_prints_and_saves_a_reports_text_and_skips_a_missing_one(tmp_path):
    import json

    report = {"config": {"preset": "tiny", "batch": 2, "device": "cpu", "dtype": "float32",
                         "rounds": 1},
              "machine": {"cpu": "X", "cpu_count": 2, "torch_threads": 2, "torch": "2",
                          "gpu": None},
              "rows": [{"short": 32, "long": 64, "grouped_ms": 2.0, "padded_ms": 1.0,
                        "padded_over_grouped": 0.5, "tokens": {"grouped": 12, "padded": 16},
                        "shorter_clips_max_abs_diff": {"grouped": 0.0, "padded": 0.6}}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    from aat_serve.bench.lengths import format_report

    script = (f'. scripts/gpu_env.sh; json_report aat_serve.bench.lengths format_report '
              f'{tmp_path}/r.json {tmp_path}/r.txt; json_report no.such f {tmp_path}/none.json '
              f'{tmp_path}/none.txt')
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PY": sys.executable,
                                            "OUT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stderr
    assert done.stdout == format_report(report) + "\n"
    assert (tmp_path / "r.txt").read_text() == done.stdout
    assert not (tmp_path / "none.txt").exists() and (tmp_path / "out").is_dir()
