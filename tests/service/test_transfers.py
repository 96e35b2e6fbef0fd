"""Host/device transfers of a batch: waveforms in one (pinned, on a GPU) host buffer, and the
scores back in one device-to-host copy. The CPU semantics run everywhere; the pinned and
device checks need CUDA."""

from __future__ import annotations

import pytest
import torch

from aat_serve.adapters.multitask import MultiTaskModel, pieces_to_host
from aat_serve.service.batch_features import BatchFeatures
from tests.service.helpers import make_bundle

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_pieces_come_back_in_one_copy_with_their_shapes_and_clips(monkeypatch):
    pieces = [([2, 0], torch.arange(8.0).view(2, 4)), ([1], torch.tensor([[9.0, 8.0, 7.0]])),
              ([3], torch.zeros(1, 5))]
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape)
                        or real_cpu(t, *a, **k))
    host = pieces_to_host(pieces)
    assert copies == [torch.Size([16])]  # one flat copy for three pieces
    assert [c for c, _ in host] == [[2, 0], [1], [3]]
    for (_, got), (_, want) in zip(host, pieces, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    assert not torch.equal(host[0][1], pieces[0][1].flip(0))  # differs: row order is kept
    assert pieces_to_host([]) == []


def test_the_host_batch_is_zero_padded_and_unpinned_on_the_cpu():
    waves = [torch.ones(3), torch.full((5,), 2.0)]
    host = BatchFeatures("cpu").host_batch(waves)
    assert torch.equal(host, torch.tensor([[1.0, 1, 1, 0, 0], [2.0, 2, 2, 2, 2]]))
    assert not host.is_pinned()


@cuda
def test_on_a_gpu_the_host_batch_is_pinned():
    assert BatchFeatures("cuda").host_batch([torch.ones(4)]).is_pinned()


@cuda
def test_on_a_gpu_the_scores_equal_the_cpu_ones_in_one_copy_per_batch(ckpt, monkeypatch):
    import copy

    bundles = [make_bundle(ckpt, "a", num_classes=4, seed=1),
               make_bundle(ckpt, "b", method="head", num_classes=3, seed=2)]
    models = {}
    for dev in ("cpu", "cuda"):
        m = MultiTaskModel(copy.deepcopy(ckpt.backbone), max_tasks=4, device=torch.device(dev))
        for b in bundles:
            m.load_task(b)
        models[dev] = m
    feats = torch.randn(5, ckpt.features.target_length, ckpt.features.num_mel_bins)
    tasks = ["a", "b", "a", "b", "b"]
    want = models["cpu"].classify(feats, tasks)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.device.type)
                        or real_cpu(t, *a, **k))
    got = models["cuda"].classify(feats, tasks)
    assert copies.count("cuda") == 1
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cpu"
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
