"""Which torch device (and ONNX Runtime providers) a setting like ``auto`` or ``cuda:1`` means."""

from __future__ import annotations

import torch

from aat_serve.adapters.errors import ConfigError


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; a CUDA device without CUDA is an error.

    ``setting`` names where the value came from (``AAT_DEVICE``, ``--device``) in messages.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}: unknown device {name!r}; expected auto, cpu, cuda or "
                          "cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is {name!r} but no CUDA device is available; use 'auto' "
                          "or 'cpu'")
    return dev


def onnx_providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers, in preference order, for a torch device."""
    if device.type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
