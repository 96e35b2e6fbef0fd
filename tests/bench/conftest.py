"""The service tests' tiny checkpoint, store and bundles, for the serving benchmark's tests."""

from tests.service.conftest import bundles, ckpt, ckpt_dir, store  # noqa: F401
