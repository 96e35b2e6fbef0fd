"""AudioClassifier: identity at init, trainable sets, frozen weights, prompts and the block formula.

Every check runs on tiny backbones (tests/helpers.py) in well under a second each.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST, Block
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import METHODS
from aat_serve.adapters.model import AudioClassifier, count_trainable
from aat_serve.adapters.modules import Adapter
from tests.helpers import tiny_backbone, tiny_config

NUM_CLASSES = 5

# Trainable parameter names of each method, written independently of adapters/model.py.
HEAD = [r"head\.(norm|fc)\.(weight|bias)"]
MLP_AD = [r"backbone\.blocks\.\d+\.mlp_adapter\.fc[12]\.(weight|bias)"]
SPATIAL_AD = [r"backbone\.blocks\.\d+\.spatial_adapter\.fc[12]\.(weight|bias)"]
PROMPTS = [r"prompts\.tokens"]


def trainable_patterns(method: str, depth: int) -> list[str]:
    last_half = "|".join(str(i) for i in range(depth // 2, depth))
    return {
        "full": [r".*"],
        "head": HEAD,
        "partial": [*HEAD, rf"backbone\.blocks\.({last_half})\..*"],
        "prompt": HEAD + PROMPTS,
        "aat_m": HEAD + MLP_AD,
        "aat_ms": HEAD + MLP_AD + SPATIAL_AD,
        "joint": HEAD + MLP_AD + SPATIAL_AD + PROMPTS,
    }[method]


def features(batch: int = 3, frames: int = 64, mel: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, mel, generator=g)


def adamw_steps(model: AudioClassifier, x: torch.Tensor, steps: int = 1) -> None:
    """Real gradients: CE on random labels; AdamW sees *every* parameter (frozen ones too)."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, model.num_classes, (x.shape[0],), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", ["aat_m", "aat_ms"])
def test_fresh_adapters_are_the_identity_then_training_moves_them(method):
    backbone = tiny_backbone(seed=0)
    x = features()
    with torch.no_grad():
        frozen_pooled = backbone(x)
    model = AudioClassifier(copy.deepcopy(backbone), method, NUM_CLASSES)
    probe = AudioClassifier(copy.deepcopy(backbone), "head", NUM_CLASSES)
    probe.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), frozen_pooled)
        assert torch.equal(model(x), probe(x))
    # The adapters exist and are not trivially zero everywhere (fc1 is random).
    block = model.backbone.blocks[0]
    assert block.mlp_adapter is not None
    assert (block.spatial_adapter is not None) == (method == "aat_ms")
    assert block.mlp_adapter.fc1.weight.abs().sum() > 0

    adamw_steps(model, x, steps=1)
    with torch.no_grad():
        after = model.forward_features(x)
    assert not torch.equal(after, frozen_pooled)
    assert (after - frozen_pooled).abs().max() > 1e-6
    assert block.mlp_adapter.fc2.weight.abs().sum() > 0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("depth", [3, 4])
def test_trainable_set_and_frozen_weights_stay_bit_identical(method, depth):
    model = AudioClassifier(tiny_backbone(seed=0, depth=depth), method, NUM_CLASSES)
    patterns = [re.compile(p) for p in trainable_patterns(method, depth)]
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if any(p.fullmatch(n) for p in patterns)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert count_trainable(model) == sum(p.numel() for n, p in model.named_parameters()
                                         if n in expected)
    # The method's modules exist (the patterns must match something beyond the head).
    extra = {"aat_m": MLP_AD, "aat_ms": SPATIAL_AD, "joint": PROMPTS + SPATIAL_AD,
             "prompt": PROMPTS}.get(method, [])
    for pat in extra:
        assert any(re.fullmatch(pat, n) for n in names), (method, pat)
    if method != "full":
        assert trainable != set(names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adamw_steps(model, features(), steps=3)
    for n, p in model.named_parameters():
        if n in expected:
            assert not torch.equal(p, before[n]), f"{method}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{method}: frozen {n} changed"
            assert p.grad is None, f"{method}: frozen {n} received a gradient"


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_partial_trains_exactly_the_last_half_and_the_head(depth):
    model = AudioClassifier(tiny_backbone(seed=0, depth=depth), "partial", NUM_CLASSES)
    trained_blocks = {int(m.group(1)) for n, p in model.named_parameters() if p.requires_grad
                      for m in [re.match(r"backbone\.blocks\.(\d+)\.", n)] if m}
    assert trained_blocks == set(range(depth // 2, depth))
    others = {n for n, p in model.named_parameters()
              if p.requires_grad and not n.startswith("backbone.blocks.")}
    assert others == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    assert not model.backbone.norm.weight.requires_grad
    assert not model.backbone.pos_embed.requires_grad


def reference_prompted_pool(backbone: AST, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """VPT-deep written out: insert after the prefix tokens, run the block, drop the prompts."""
    n = backbone.cfg.num_prefix_tokens
    h = backbone.embed(x)
    for i, block in enumerate(backbone.blocks):
        p = prompts[i].expand(x.shape[0], -1, -1)
        out = block(torch.cat([h[:, :n], p, h[:, n:]], dim=1))
        h = torch.cat([out[:, :n], out[:, n + p.shape[1]:]], dim=1)
    return backbone.norm(h)[:, :n].mean(dim=1)


def overwrite_prompted_pool(backbone: AST, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The AAT reference code's variant (prompts overwrite the first patch tokens): not ours."""
    n = backbone.cfg.num_prefix_tokens
    h = backbone.embed(x)
    for i, block in enumerate(backbone.blocks):
        p = prompts[i].expand(x.shape[0], -1, -1)
        h = block(torch.cat([h[:, :n], p, h[:, n + p.shape[1]:]], dim=1))
    return backbone.norm(h)[:, :n].mean(dim=1)


@pytest.mark.parametrize("method", ["prompt", "joint"])
def test_deep_prompts_are_inserted_after_prefix_and_dropped(method):
    model = AudioClassifier(tiny_backbone(seed=0), method, NUM_CLASSES).eval()
    cfg = model.backbone.cfg
    prompts = model.prompts.tokens
    assert prompts.shape == (cfg.depth, 12, cfg.embed_dim)
    if method == "joint":  # make the adapters matter too
        with torch.no_grad():
            for block in model.backbone.blocks:
                for ad in (block.mlp_adapter, block.spatial_adapter):
                    ad.fc2.weight.normal_(0, 0.05)
    x = features(batch=2)
    f, t = cfg.grid(x.shape[1])
    seen_in, seen_norm = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].detach().clone()))
             for b in model.backbone.blocks]
    hooks.append(model.backbone.norm.register_forward_pre_hook(
        lambda m, a: seen_norm.append(a[0].shape)))
    with torch.no_grad():
        got = model.forward_features(x)
    for h in hooks:
        h.remove()
    # Each block sees prefix + prompts + patches; the prompts sit right after the prefix.
    assert [s.shape for s in seen_in] == [(2, 2 + 12 + f * t, cfg.embed_dim)] * cfg.depth
    for i, s in enumerate(seen_in):
        assert torch.equal(s[:, 2:14], prompts[i].detach().expand(2, -1, -1))
    assert seen_norm == [(2, 2 + f * t, cfg.embed_dim)]  # dropped before the final norm

    with torch.no_grad():
        ref = reference_prompted_pool(model.backbone, x, prompts)
        wrong = overwrite_prompted_pool(model.backbone, x, prompts)
        no_prompts = model.backbone(x)
    assert torch.equal(got, ref)
    assert (got - wrong).abs().max() > 1e-4
    assert (got - no_prompts).abs().max() > 1e-4


# -- the block formula, against an fp64 hand computation -----------------------------------

def _ln(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * w + b


def _gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _lin(z: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return z @ lin.weight.double().T + lin.bias.double()


def _adapter(z: torch.Tensor, ad: Adapter) -> torch.Tensor:
    return _lin(_gelu(_lin(z, ad.fc1)), ad.fc2)


def _mhsa(z: torch.Tensor, block: Block) -> torch.Tensor:
    heads = block.attn.num_heads
    b, n, d = z.shape
    q, k, v = _lin(z, block.attn.qkv).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return _lin((att @ v).transpose(1, 2).reshape(b, n, d), block.attn.proj)


def hand_block(x: torch.Tensor, block: Block, eps: float, variant: str = "design") -> torch.Tensor:
    """design.md: x_s = x + a + A_s(a); out = x_s + MLP(LN2(x_s)) + A_m(LN2(x_s)) (fp64)."""
    def ln(z: torch.Tensor, m: torch.nn.LayerNorm) -> torch.Tensor:
        return _ln(z, m.weight.double(), m.bias.double(), eps)

    a = _mhsa(ln(x, block.norm1), block)
    if variant == "spatial_without_shortcut":
        x_s = x + _adapter(a, block.spatial_adapter)
    else:
        x_s = x + a + _adapter(a, block.spatial_adapter)
    h2 = ln(x_s, block.norm2)
    mlp = _lin(_gelu(_lin(h2, block.mlp.fc1)), block.mlp.fc2)
    if variant == "mlp_adapter_with_shortcut":
        return x_s + mlp + h2 + _adapter(h2, block.mlp_adapter)
    if variant == "sequential_mlp_adapter":
        return x_s + mlp + _adapter(mlp, block.mlp_adapter)
    return x_s + mlp + _adapter(h2, block.mlp_adapter)


def test_block_with_both_adapters_matches_fp64_hand_computation():
    cfg = tiny_config()
    model = AudioClassifier(tiny_backbone(seed=0), "aat_ms", NUM_CLASSES)
    block = model.backbone.blocks[0]
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero adapters, large enough to matter
        for ad in (block.mlp_adapter, block.spatial_adapter):
            ad.fc1.weight.normal_(0, 0.3)
            ad.fc1.bias.normal_(0, 0.1)
            ad.fc2.weight.normal_(0, 0.3)
            ad.fc2.bias.normal_(0, 0.1)
    x = torch.randn(2, 7, cfg.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        want = hand_block(x, block, cfg.norm_eps)
        got64 = copy.deepcopy(block).double()(x)
        got32 = block(x.float())
        torch.testing.assert_close(got64, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-4)
        for variant in ("spatial_without_shortcut", "mlp_adapter_with_shortcut",
                        "sequential_mlp_adapter"):
            other = hand_block(x, block, cfg.norm_eps, variant)
            assert (other - want).abs().max() > 1e-2, variant


def test_adapter_module_init_and_formula():
    torch.manual_seed(0)
    ad = Adapter(64, 16)
    assert ad.fc1.weight.shape == (16, 64) and ad.fc2.weight.shape == (64, 16)
    assert torch.count_nonzero(ad.fc2.weight) == 0 and torch.count_nonzero(ad.fc2.bias) == 0
    assert torch.count_nonzero(ad.fc1.bias) == 0
    assert ad.fc1.weight.abs().max() <= 0.04 and 0.01 < ad.fc1.weight.std() < 0.03
    z = torch.randn(4, 64)
    assert torch.equal(ad(z), torch.zeros(4, 64))
    with torch.no_grad():
        ad.fc2.weight.normal_()
    want = _adapter(z.double(), ad)
    torch.testing.assert_close(ad(z).double(), want, rtol=0, atol=1e-5)
    # exact (erf) GELU, not the tanh approximation
    tanh = _lin(F.gelu(_lin(z.double(), ad.fc1), approximate="tanh"), ad.fc2)
    assert (tanh - want).abs().max() > 1e-7


def test_classifier_validation_and_task_state_dict_errors():
    with pytest.raises(ConfigError, match="num_classes must be positive, got 0"):
        AudioClassifier(tiny_backbone(), "head", 0)
    with pytest.raises(ConfigError, match="unknown method 'adapters'"):
        AudioClassifier(tiny_backbone(), "adapters", 3)
    model = AudioClassifier(tiny_backbone(), "aat_m", 3)
    sd = model.task_state_dict()
    assert "blocks.0.mlp_adapter.fc1.weight" in sd and "prompts" not in sd
    bad = dict(sd)
    bad.pop("head.fc.bias")
    with pytest.raises(ConfigError, match=r"missing \['head.fc.bias'\]"):
        model.load_task_state_dict(bad)
    bad = {**sd, "head.fc.weight": torch.zeros(4, 32)}
    msg = r"'head.fc.weight' has shape \(4, 32\), expected \(3, 32\)"
    with pytest.raises(ConfigError, match=msg):
        model.load_task_state_dict(bad)


def _snapshot(backbone: AST) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter's value (cloned) and requires_grad flag, by state-dict name."""
    params = dict(backbone.named_parameters())
    return {k: (v.detach().clone(), params[k].requires_grad if k in params else False)
            for k, v in backbone.state_dict().items()}


@pytest.mark.parametrize("method", ["aat_ms", "prompt", "joint", "full", "partial"])
def test_classifier_leaves_the_callers_backbone_unchanged(method):
    backbone = tiny_backbone(seed=0, depth=4)
    backbone.blocks[1].requires_grad_(False)  # a mix of flags, so "kept" is not "all True"
    before = _snapshot(backbone)
    model = AudioClassifier(backbone, method, NUM_CLASSES)
    adamw_steps(model, features(), steps=2)

    after = _snapshot(backbone)
    assert list(after) == list(before)  # no adapter modules were added to its blocks
    for name, (value, trainable) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == trainable, name
    assert all(b.mlp_adapter is None and b.spatial_adapter is None for b in backbone.blocks)

    # The classifier's own backbone does differ: its flags follow the method, it carries the
    # method's adapters, and a method that trains the backbone has moved its own copy.
    own = _snapshot(model.backbone)
    assert model.backbone is not backbone
    assert [f for _, f in own.values()] != [f for _, f in before.values()]
    has_adapters = any("adapter" in k for k in own)
    assert has_adapters == (method in ("aat_ms", "joint"))
    moved = any(not torch.equal(own[k][0], v) for k, (v, _) in before.items())
    assert moved == (method in ("full", "partial"))


@pytest.mark.parametrize(("method", "shared"), [("aat_ms", True), ("head", True),
                                                 ("full", False)])
def test_frozen_backbone_methods_share_the_frozen_storage(method, shared):
    backbone = tiny_backbone(seed=0)
    model = AudioClassifier(backbone, method, NUM_CLASSES)
    mine, theirs = model.backbone.blocks[0].mlp.fc1.weight, backbone.blocks[0].mlp.fc1.weight
    assert mine is not theirs
    assert (mine.data_ptr() == theirs.data_ptr()) == shared
    assert mine.requires_grad == (not shared) and theirs.requires_grad
