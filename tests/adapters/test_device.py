"""Device settings: auto, explicit devices, and clear errors naming the setting."""

from __future__ import annotations

import pytest
import torch

from aat_serve.adapters.device import onnx_providers, resolve_device
from aat_serve.adapters.errors import ConfigError


def test_auto_and_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_device_names_the_setting():
    with pytest.raises(ConfigError, match=r"^AAT_DEVICE: unknown device 'gpu0'; expected auto"):
        resolve_device("gpu0", "AAT_DEVICE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match=r"^--device is 'cuda:1' but no CUDA device"):
        resolve_device("cuda:1", "--device")


def test_onnx_providers_follow_the_device():
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    assert onnx_providers(torch.device("cuda")) == ["CUDAExecutionProvider",
                                                    "CPUExecutionProvider"]
