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

try:
    __version__ = version("aat-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
