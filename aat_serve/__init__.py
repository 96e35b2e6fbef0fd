"""aat-serve: many audio classification tasks served from one frozen Audio Spectrogram Transformer.

Everything installs under this one name so nothing collides with another library's top-level
package (PyPI's ``adapters``, for one):

- ``aat_serve.adapters``: the model (backbone, checkpoints, AAT adapters, task bundles, the
  multi-task model and its kernels). Knows nothing of HTTP or training loops.
- ``aat_serve.training``: data sets, recipes, the trainer; writes task bundles.
- ``aat_serve.service``: the HTTP service that serves task bundles.
- ``aat_serve.cli``: the ``aat`` command, a thin layer over the three.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MAPPED = ("adapters", "service", "training")
"""The packages pyproject.toml maps under this name from folders at the repository root."""


def _find_mapped_packages_in_a_source_tree() -> None:
    """A source tree that was never installed (a copy of the repository on a GPU machine,
    with only PYTHONPATH pointing at it) has ``adapters/``, ``service/`` and ``training/``
    beside this folder, not inside it: search the root too for this package's sub-packages.
    An installed copy has them inside and no ``pyproject.toml`` beside it: nothing changes."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and all(
            (root / name / "__init__.py").is_file() for name in MAPPED):
        __path__.append(str(root))


_find_mapped_packages_in_a_source_tree()

try:
    __version__ = version("aat-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
