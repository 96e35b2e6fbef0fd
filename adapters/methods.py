"""The seven fine-tuning methods of the AAT paper: which modules exist and which train.

| method  | adds                       | trains                          |
|---------|----------------------------|---------------------------------|
| full    | -                          | everything                      |
| head    | -                          | head (LayerNorm + Linear)       |
| partial | -                          | head + last half of the blocks  |
| prompt  | 12 deep prompts per block  | prompts + head                  |
| aat_m   | MLP adapters               | adapters + head                 |
| aat_ms  | MLP + spatial adapters     | adapters + head                 |
| joint   | aat_ms + deep prompts      | adapters + prompts + head       |

Only methods that leave the backbone frozen export a task bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from aat_serve.adapters.config import AdapterConfig
from aat_serve.adapters.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What a method adds to the backbone and what it trains."""

    name: str
    adapters: AdapterConfig
    trains_backbone: str  # "none", "all" or "last_half"
    description: str

    @property
    def exports_bundle(self) -> bool:
        """True when the backbone stays frozen, so the task is a small bundle."""
        return self.trains_backbone == "none"


DEFAULT_PROMPTS = 12

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("full", AdapterConfig(), "all", "fine-tune every parameter"),
        MethodSpec("head", AdapterConfig(), "none", "linear probe: train the head only"),
        MethodSpec("partial", AdapterConfig(), "last_half",
                   "train the head and the last half of the blocks"),
        MethodSpec("prompt", AdapterConfig(num_prompts=DEFAULT_PROMPTS), "none",
                   "VPT-deep prompts (12 per block) and the head"),
        MethodSpec("aat_m", AdapterConfig(mlp=True), "none",
                   "AAT^M: an MLP adapter in parallel with each block's MLP, and the head"),
        MethodSpec("aat_ms", AdapterConfig(mlp=True, spatial=True), "none",
                   "AAT^MS: MLP adapters and spatial adapters after attention, and the head"),
        MethodSpec("joint", AdapterConfig(mlp=True, spatial=True, num_prompts=DEFAULT_PROMPTS),
                   "none", "AAT^MS adapters plus deep prompts, and the head"),
    )
}

BUNDLE_METHODS = tuple(name for name, m in METHODS.items() if m.exports_bundle)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None
