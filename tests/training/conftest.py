"""Fixtures of the training tests: a tiny labelled folder."""

from __future__ import annotations

import pytest

from tests.training import synth


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """A folder data set: 2 labels x 4 clips, with train/valid/test list files."""
    return synth.make_folder(tmp_path_factory.mktemp("pets"), per_label=4, lists="all")
