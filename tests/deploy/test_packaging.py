"""One installed top-level name: ``aat_serve`` (plus the ``aat`` script), in editable and
regular installs, so a library that owns a generic name (PyPI's ``adapters``, say) cannot
shadow ours or be overwritten by ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
STAND_INS = ("adapters", "service", "training", "cli")
IMPORTS = ("from aat_serve.adapters import TaskBundle; "
           "import aat_serve.service.app, aat_serve.training.trainer, aat_serve.cli.main; "
           "print('imported')")


def package_folders() -> dict[str, Path]:
    """Every importable package under the mapped folders, by its installed name."""
    found: dict[str, Path] = {}
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            found[".".join((name, *rel))] = init.parent
    return found


def write_stand_ins(where: Path, marker: Path) -> None:
    """Packages named like our folders that record being imported (as a rival library would be
    imported in our place)."""
    for name in STAND_INS:
        pkg = where / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
            "TaskBundle = 'a stand-in, not aat-serve'\n")


def run(cmd: list[str], cwd: Path, pythonpath: Path | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == set(package_folders())
    assert {n.split(".")[0] for n in listed} == {"aat_serve"}
    assert PYPROJECT["project"]["scripts"] == {"aat": "aat_serve.cli.main:main"}


def test_stand_in_packages_earlier_on_the_path_do_not_shadow_aat_serve(tmp_path):
    stand_ins, marker = tmp_path / "rivals", tmp_path / "imported.txt"
    write_stand_ins(stand_ins, marker)
    # The stand-ins are importable, and first: ``import adapters`` finds them ("differs").
    shadow = run([sys.executable, "-c", "import adapters, service; print(adapters.TaskBundle)"],
                 tmp_path, stand_ins)
    assert shadow.returncode == 0 and "a stand-in" in shadow.stdout
    assert marker.read_text().split() == ["adapters", "service"]
    marker.unlink()
    # Ours are unaffected, from the library and from the installed ``aat`` script.
    ours = run([sys.executable, "-c", IMPORTS], tmp_path, stand_ins)
    assert ours.returncode == 0, ours.stderr
    aat = shutil.which("aat", path=str(Path(sys.executable).parent)) or "aat"
    cli = run([aat, "methods", "--classes", "5", "--frames", "128", "--json"], tmp_path,
              stand_ins)
    assert cli.returncode == 0, cli.stderr
    assert '"methods"' in cli.stdout
    assert not marker.exists()


@pytest.mark.slow
def test_a_wheel_installs_only_aat_serve(tmp_path):
    """A regular (non-editable) install: build the wheel from a copy of the sources, unpack it
    into a fresh target, and import from there with the stand-ins ahead of it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("aat_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"aat_serve", next(t for t in tops if t.endswith(".dist-info"))}
    assert "aat_serve/adapters/demo_assets/backbone/model.safetensors" in names
    assert "aat_serve/cli/main.py" in names and "aat_serve/service/app.py" in names
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "aat = aat_serve.cli.main:main" in entry

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    stand_ins, marker = tmp_path / "rivals", tmp_path / "imported.txt"
    write_stand_ins(stand_ins, marker)
    probe = "import aat_serve.adapters.bundle as b; print(b.__file__); " + IMPORTS
    ours = run([sys.executable, "-c", probe], tmp_path, f"{stand_ins}{os.pathsep}{target}")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.splitlines()[0].startswith(str(target))  # not the source tree
    assert not marker.exists()
