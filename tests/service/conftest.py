"""Fixtures for the service tests: one tiny checkpoint per session and bundles on it."""

from __future__ import annotations

import pytest

from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.service.app import create_app
from aat_serve.service.settings import Settings
from tests.service.helpers import Gate, load_tiny, make_bundle, write_tiny_checkpoint


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ast")


@pytest.fixture(scope="session")
def ckpt(ckpt_dir):
    return load_tiny(ckpt_dir)


@pytest.fixture(scope="session")
def bundles(ckpt):
    """Three tasks of different methods and class counts."""
    return {
        "birds": make_bundle(ckpt, "birds", method="aat_ms", num_classes=4, seed=1),
        "words": make_bundle(ckpt, "words", method="aat_m", num_classes=5, seed=2),
        "tags": make_bundle(ckpt, "tags", method="head", num_classes=3, seed=3,
                            multi_label=True),
    }


@pytest.fixture
def store(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return d


def test_settings(ckpt_dir, store, **overrides) -> Settings:
    """The tiny checkpoint, the test's store, short batching waits and rescans; ``overrides``."""
    base = dict(checkpoint=ckpt_dir, bundle_dir=store, max_wait_ms=2.0, refresh_s=0.2)
    base.update(overrides)
    return Settings(**base)


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture
def make_app(ckpt_dir, store):
    """``make_app(**settings)``: an app on the tiny checkpoint and the test's store."""
    return lambda **overrides: create_app(test_settings(ckpt_dir, store, **overrides))


@pytest.fixture
def make_pair(ckpt_dir, store):
    """``make_pair(**settings)``: a front end and its model process (tests/service/
    front_end_pair.py), as ``make_app`` configures one process."""
    from tests.service.front_end_pair import FrontEndPair

    return lambda **overrides: FrontEndPair(test_settings(ckpt_dir, store, **overrides))


@pytest.fixture
def gate(monkeypatch):
    """Holds ``MultiTaskModel.classify`` while closed and records each call (``Gate``)."""
    g = Gate()
    monkeypatch.setattr(MultiTaskModel, "classify", g.wrap(MultiTaskModel.classify))
    yield g
    g.opened.set()
