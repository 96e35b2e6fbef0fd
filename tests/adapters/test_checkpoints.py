"""Checkpoint loading: formats, layouts, stride inference, SSAST re-striding, strictness and
every error, fingerprints, labels and the checkpoint's own head as a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aat_serve.adapters.bundle import TaskBundle, head_bundle
from aat_serve.adapters.checkpoints import (
    CONVENTIONAL_LENGTHS,
    canonical_state_dict,
    checkpoint_filter_fn,
    detect_format,
    infer_grid,
    load_checkpoint,
    read_label_csv,
    to_hf_state_dict,
    to_original_state_dict,
)
from aat_serve.adapters.config import AUDIOSET_MEAN, AUDIOSET_STD, BackboneConfig
from aat_serve.adapters.errors import BackboneMismatchError, CheckpointError, ConfigError
from tests.adapters.ckpt_factory import (
    AUDIOSET_CSV,
    SPEECHCOMMANDS_CSV,
    random_canonical,
    write_hf_dir,
    write_original,
    write_ssast,
)

SMALL = BackboneConfig(embed_dim=64, depth=2, num_heads=1, mlp_hidden=128, freq_stride=10,
                       time_stride=10, target_length=128)
SC_LABELS = read_label_csv(SPEECHCOMMANDS_CSV)
DEIT_KEYS = ("module.v.head.bias", "module.v.head.weight", "module.v.head_dist.bias",
             "module.v.head_dist.weight")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small random 35-class model written in every layout."""
    d = tmp_path_factory.mktemp("small")
    canon = random_canonical(SMALL, 35, seed=3)
    files = {
        "hf": write_hf_dir(d / "hf", canon, SMALL, SC_LABELS),
        "hf_bin": write_hf_dir(d / "hf_bin", canon, SMALL, SC_LABELS,
                               weights="pytorch_model.bin"),
        "ast": write_original(d / "ast.pth", canon),
        "bare": write_original(d / "bare.pth", canon, prefix=""),
        "canonical": d / "canonical.pth",
        "safetensors": d / "orig.safetensors",
    }
    torch.save(canon, files["canonical"])
    save_file(to_original_state_dict(canon), str(files["safetensors"]))
    return canon, files, d


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(11)
    return 0.5 * torch.randn(2, 128, 128)


# -- layouts -----------------------------------------------------------------------------------

def test_hf_round_trip_fuses_query_key_value_in_order(small):
    canon = small[0]
    hf = to_hf_state_dict(canon)
    d = SMALL.embed_dim
    q = hf["audio_spectrogram_transformer.encoder.layer.1.attention.attention.query.weight"]
    k = hf["audio_spectrogram_transformer.encoder.layer.1.attention.attention.key.weight"]
    v = hf["audio_spectrogram_transformer.encoder.layer.1.attention.attention.value.weight"]
    qkv = canon["blocks.1.attn.qkv.weight"]
    assert torch.equal(q, qkv[:d]) and torch.equal(k, qkv[d:2 * d]) and torch.equal(v, qkv[2 * d:])
    back = checkpoint_filter_fn(hf)
    assert back.keys() == canon.keys()
    assert all(torch.equal(back[n], canon[n]) for n in canon)
    # Swapping query and key must be visible after fusing.
    swapped = dict(hf)
    qn = "audio_spectrogram_transformer.encoder.layer.1.attention.attention.query.weight"
    kn = qn.replace("query", "key")
    swapped[qn], swapped[kn] = hf[kn], hf[qn]
    assert not torch.equal(checkpoint_filter_fn(swapped)["blocks.1.attn.qkv.weight"], qkv)


def test_transformers_5_in_memory_names_map_to_the_same_tensors(small):
    """transformers 5 renames modules in memory (q_proj, layers.N, mlp.fc1); both map alike."""
    from transformers import ASTForAudioClassification

    canon, files, _ = small
    model = ASTForAudioClassification.from_pretrained(files["hf"])
    sd = model.state_dict()
    assert any(".q_proj." in k for k in sd)  # the renamed layout really is in use
    back = checkpoint_filter_fn(sd)
    assert back.keys() == canon.keys()
    assert all(torch.equal(back[n], canon[n]) for n in canon)


def test_original_layout_round_trip_and_format_detection(small):
    canon = small[0]
    orig = to_original_state_dict(canon, deit_head_classes=5)
    assert "module.v.blocks.0.attn.qkv.weight" in orig and "module.mlp_head.1.weight" in orig
    assert set(DEIT_KEYS) <= set(orig)
    back = checkpoint_filter_fn(orig)
    assert back.keys() == canon.keys()  # DeiT heads dropped
    assert all(torch.equal(back[n], canon[n]) for n in canon)
    assert detect_format(orig) == "ast"
    assert detect_format(to_hf_state_dict(canon)) == "hf"
    assert detect_format({**orig, "module.p_input_tdim": torch.tensor(1024)}) == "ssast"


# -- stride and length inference ---------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "stride", "length", "grid"), [
    (1212, 10, 1024, (12, 101)),   # audioset_10_10
    (850, 12, 1024, (10, 85)),     # audioset_12_12
    (657, 14, 1024, (9, 73)),      # audioset_14_14
    (512, 16, 1024, (8, 64)),      # audioset_16_16
    (144, 10, 128, (12, 12)),      # speechcommands_10_10
    (600, 10, 512, (12, 50)),      # ESC-50 fine-tune
    (468, 10, 400, (12, 39)),      # US8K
    (3588, 10, 3000, (12, 299)),   # GTZAN
    (256, 16, 512, (8, 32)),
    (64, 16, 128, (8, 8)),
])
def test_infer_grid_public_checkpoints(tokens, stride, length, grid):
    assert infer_grid(tokens, (16, 16)) == (stride, stride, grid, length)


def test_infer_grid_overrides_and_fallback():
    # 84 = 12 x 7 at stride 10: no conventional length gives 7 steps -> the shortest one.
    assert 76 not in CONVENTIONAL_LENGTHS
    assert infer_grid(84, (16, 16)) == (10, 10, (12, 7), 76)
    # 144 tokens also fit stride 14 (9 x 16); the override says so.
    assert infer_grid(144, (16, 16), freq_stride=14) == (14, 14, (9, 16), 226)
    assert infer_grid(144, (16, 16), freq_stride=10, time_stride=8) == (10, 8, (12, 12), 104)
    assert infer_grid(1212, (16, 16), target_length=512)[3] == 1024  # native stays native
    with pytest.raises(CheckpointError, match=r"127 patch tokens.*pass freq_stride"):
        infer_grid(127, (16, 16))
    with pytest.raises(CheckpointError, match=r"150 patch tokens.*freq_stride=16"):
        infer_grid(150, (16, 16), freq_stride=16)


# -- the formats -------------------------------------------------------------------------------

def test_hf_directory(small, features):
    canon, files, _ = small
    ckpt = load_checkpoint(files["hf"])
    cfg = ckpt.backbone.cfg
    assert ckpt.source_format == "hf" and ckpt.path == str(files["hf"])
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (64, 2, 1, 128)
    assert (cfg.freq_stride, cfg.time_stride, cfg.target_length, cfg.pos_grid) == (10, 10, 128,
                                                                                    None)
    assert cfg.norm_eps == cfg.head_norm_eps == 1e-12
    assert ckpt.labels == SC_LABELS and ckpt.num_classes == 35
    assert ckpt.dropped == ()
    # No preprocessor_config.json: AudioSet statistics at the model's max_length.
    f = ckpt.features
    assert (f.target_length, f.mean, f.std, f.sample_rate) == (128, AUDIOSET_MEAN, AUDIOSET_STD,
                                                               16000)
    assert not ckpt.backbone.training
    assert not any(p.requires_grad for p in ckpt.backbone.parameters())
    assert all(torch.equal(canonical_state_dict(ckpt)[k], canon[k]) for k in canon)
    assert ckpt.logits(features).shape == (2, 35)


def test_hf_preprocessor_config_is_honoured(small, tmp_path):
    canon = small[0]
    pre = {"feature_extractor_type": "ASTFeatureExtractor", "max_length": 128,
           "mean": -6.845978, "std": 5.5654526, "num_mel_bins": 128, "sampling_rate": 16000,
           "do_normalize": True}
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "a", canon, SMALL, preprocessor=pre))
    f = ckpt.features
    assert (f.target_length, f.mean, f.std, f.num_mel_bins) == (128, -6.845978, 5.5654526, 128)
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "b", canon, SMALL,
                                        preprocessor={**pre, "max_length": 100}))
    assert ckpt.features.target_length == 100
    assert load_checkpoint(tmp_path / "b", target_length=300).features.target_length == 300
    # do_normalize false: (x - 0) / (2 * 0.5) leaves features unchanged.
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "c", canon, SMALL,
                                        preprocessor={**pre, "do_normalize": False}))
    assert (ckpt.features.mean, ckpt.features.std) == (0.0, 0.5)


def test_original_pth(small):
    canon, files, _ = small
    ckpt = load_checkpoint(files["ast"])
    cfg = ckpt.backbone.cfg
    assert ckpt.source_format == "ast" and ckpt.labels is None
    assert (cfg.freq_stride, cfg.time_stride, cfg.target_length, cfg.num_heads) == (10, 10, 128, 1)
    assert (cfg.norm_eps, cfg.head_norm_eps) == (1e-6, 1e-5)
    assert ckpt.dropped == DEIT_KEYS
    f = ckpt.features
    assert (f.target_length, f.mean, f.std) == (128, AUDIOSET_MEAN, AUDIOSET_STD)
    sd = canonical_state_dict(ckpt)
    assert sd.keys() == canon.keys() and all(torch.equal(sd[k], canon[k]) for k in canon)


def test_every_layout_gives_the_same_backbone_and_fingerprint(small, features):
    canon, files, d = small
    loaded = {name: load_checkpoint(files[name]) for name in
              ("hf", "hf_bin", "ast", "bare", "canonical", "safetensors")}
    fps = {name: c.backbone.fingerprint() for name, c in loaded.items()}
    assert len(set(fps.values())) == 1, fps
    for c in loaded.values():
        assert torch.equal(c.head["fc.weight"], canon["head.fc.weight"])
    # One changed weight: another fingerprint and other logits.
    changed = dict(canon)
    changed["blocks.1.mlp.fc2.weight"] = canon["blocks.1.mlp.fc2.weight"].clone()
    changed["blocks.1.mlp.fc2.weight"][3, 7] += 1e-3
    other = load_checkpoint(write_original(d / "changed.pth", changed))
    assert other.backbone.fingerprint() != fps["ast"]
    with torch.no_grad():
        diff = (other.logits(features) - loaded["ast"].logits(features)).abs().max()
    assert diff > 0


def test_sharded_hf_directory_and_hf_layout_file(small, tmp_path):
    canon, files, _ = small
    hf = to_hf_state_dict(canon)
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    d = write_hf_dir(tmp_path / "sharded", canon, SMALL, SC_LABELS)
    (d / "model.safetensors").unlink()
    for shard, keys in shards.items():
        save_file({k: hf[k].contiguous() for k in keys}, str(d / shard))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = load_checkpoint(files["hf"]).backbone.fingerprint()
    assert load_checkpoint(d).backbone.fingerprint() == expected
    index["weight_map"][names[0]] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names a shard outside its directory"):
        load_checkpoint(d)
    # Hugging Face names in a lone file: architecture from shapes, HF epsilon, no labels.
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "hf.safetensors"))
    lone = load_checkpoint(tmp_path / "hf.safetensors")
    assert lone.source_format == "hf" and lone.labels is None
    assert lone.backbone.cfg.norm_eps == lone.backbone.cfg.head_norm_eps == 1e-12
    assert lone.backbone.fingerprint() == expected


def test_target_length_keeps_the_stored_grid(small):
    files = small[1]
    ckpt = load_checkpoint(files["ast"], target_length=512)
    cfg = ckpt.backbone.cfg
    assert (cfg.target_length, cfg.stored_grid, cfg.grid()) == (512, (12, 12), (12, 50))
    assert ckpt.features.target_length == 512
    assert ckpt.backbone.pos_embed.shape == (1, 2 + 144, 64)
    with torch.no_grad():
        assert ckpt.logits(torch.zeros(1, 512, 128)).shape == (1, 35)


# -- SSAST -------------------------------------------------------------------------------------

SSAST_DROPPED = {"module.p_input_fdim", "module.p_input_tdim", "module.mask_embed",
                 *(f"module.{m}.{i}.{k}" for m in ("cpredlayer", "gpredlayer") for i in (0, 2)
                   for k in ("weight", "bias")), *DEIT_KEYS}


def test_ssast_patch_model_is_restrided_for_fine_tuning(tmp_path):
    path, canon = write_ssast(tmp_path / "patch.pth", frame=False)
    ckpt = load_checkpoint(path)
    cfg = ckpt.backbone.cfg
    assert ckpt.source_format == "ssast" and ckpt.head is None and ckpt.labels is None
    assert set(ckpt.dropped) == SSAST_DROPPED
    assert (cfg.patch_freq, cfg.patch_time, cfg.freq_stride, cfg.time_stride) == (16, 16, 10, 10)
    assert (cfg.stored_grid, cfg.grid(1024), cfg.target_length) == ((8, 64), (12, 101), 1024)
    assert ckpt.backbone.patch_embed.proj.stride == (10, 10)
    assert torch.equal(ckpt.backbone.patch_embed.proj.weight, canon["patch_embed.proj.weight"])
    assert torch.equal(ckpt.backbone.pos_embed, canon["pos_embed"])
    with torch.no_grad():
        out = ckpt.backbone(torch.randn(2, 1024, 128))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    # SSAST's own pretraining stride keeps the grid as stored.
    same = load_checkpoint(path, freq_stride=16, time_stride=16)
    assert same.backbone.cfg.grid(1024) == (8, 64) == same.backbone.cfg.stored_grid
    assert torch.equal(same.backbone.pos_embed_for((8, 64)), canon["pos_embed"])


def test_ssast_frame_model_is_restrided_for_fine_tuning(tmp_path):
    path, canon = write_ssast(tmp_path / "frame.pth", frame=True)
    ckpt = load_checkpoint(path)
    cfg = ckpt.backbone.cfg
    assert set(ckpt.dropped) == SSAST_DROPPED and ckpt.head is None
    assert (cfg.patch_freq, cfg.patch_time, cfg.freq_stride, cfg.time_stride) == (128, 2, 128, 1)
    assert cfg.stored_grid == (1, 512) and cfg.grid(128) == (1, 127)
    # 127 < 512 time steps: centre cut, columns 256 - 63 .. 256 + 64.
    pos = ckpt.backbone.pos_embed_for((1, 127))
    assert torch.equal(pos[:, 2:], canon["pos_embed"][:, 2 + 193:2 + 320])
    assert torch.equal(pos[:, :2], canon["pos_embed"][:, :2])
    with torch.no_grad():
        out = ckpt.backbone(torch.randn(1, 128, 128))
    assert out.shape == (1, 64) and torch.isfinite(out).all()
    with pytest.raises(CheckpointError, match=r"has no classification head"):
        head_bundle(ckpt, "x")


# -- errors ------------------------------------------------------------------------------------

def _orig(small) -> dict[str, torch.Tensor]:
    return to_original_state_dict(small[0], deit_head_classes=3)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


class _NotATensor:
    pass


def test_unreadable_files(tmp_path):
    cases = {
        "missing": (tmp_path / "nope.pth", "does not exist"),
        "empty": (tmp_path / "empty.pth", "empty file"),
        "junk": (tmp_path / "junk.pth", "not a PyTorch or safetensors file"),
        "objects": (tmp_path / "obj.pth", "Python objects other than tensors"),
        "list": (tmp_path / "list.pth", "holds a list, expected a non-empty state dict"),
        "ints": (tmp_path / "ints.pth", r"entries 'epoch' are not tensors"),
        "badst": (tmp_path / "bad.safetensors", "cannot read safetensors checkpoint"),
    }
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"RIFF....WAVEfmt " * 20)
    torch.save({"a": _NotATensor()}, tmp_path / "obj.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "ints.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}junk")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        assert name


def test_not_an_ast_checkpoint(small, tmp_path):
    bundle = head_bundle(load_checkpoint(small[1]["hf"]), "sc")
    bundle.save(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"does not look like an AST checkpoint: it has "
                                              r"no 'cls_token'"):
        load_checkpoint(tmp_path / "b.safetensors")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda sd: sd.pop("module.v.blocks.1.mlp.fc2.bias"),
     r"missing tensors 'module\.v\.blocks\.1\.mlp\.fc2\.bias'"),
    (lambda sd: sd.update({"module.v.blocks.0.extra.weight": torch.zeros(2)}),
     r"unexpected tensors 'module\.v\.blocks\.0\.extra\.weight'"),
    (lambda sd: sd.update({"module.v.blocks.1.attn.proj.weight": torch.zeros(64, 32)}),
     r"tensor 'module\.v\.blocks\.1\.attn\.proj\.weight' has shape \(64, 32\), expected "
     r"\(64, 64\)"),
    (lambda sd: sd.update({"module.v.blocks.1.norm1.weight": torch.zeros(64, dtype=torch.int64)}),
     r"'module\.v\.blocks\.1\.norm1\.weight' has dtype torch\.int64"),
    (lambda sd: sd.pop("module.mlp_head.0.bias"),
     r"classifier is incomplete, missing 'module\.mlp_head\.0\.bias'"),
    (lambda sd: sd.update({"module.mlp_head.1.bias": torch.zeros(7)}),
     r"classifier tensor 'module\.mlp_head\.1\.bias' has shape \(7,\), expected \(35,\)"),
    (lambda sd: sd.update({"module.mlp_head.2.weight": torch.zeros(3)}),
     r"unexpected tensors 'module\.mlp_head\.2\.weight'"),
    (lambda sd: sd.update({"module.v.patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)}),
     r"patch embedding weight has shape \(64, 3, 16, 16\), expected \(D, 1,"),
    (lambda sd: sd.update({"module.v.pos_embed": torch.zeros(1, 2 + 127, 64)}),
     r"127 patch tokens"),
    (lambda sd: sd.pop("module.v.cls_token"), r"it has no 'cls_token'"),
    (lambda sd: sd.update({"module.v.pos_embed": torch.zeros(146, 64)}),
     r"'module\.v\.pos_embed' has shape \(146, 64\), expected \(1, tokens, D\)"),
    (lambda sd: sd.update({"module.v.pos_embed": torch.zeros(1, 2, 64)}),
     r"a positional embedding of 0 patch tokens"),
])
def test_original_strictness(small, tmp_path, mutate, message):
    sd = _orig(small)
    mutate(sd)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_save(tmp_path / "x.pth", sd))


def test_heads_cannot_be_inferred_for_odd_widths(tmp_path):
    cfg = BackboneConfig(embed_dim=48, depth=1, num_heads=2, mlp_hidden=96, target_length=128)
    path = write_original(tmp_path / "w48.pth", random_canonical(cfg, 3))
    with pytest.raises(CheckpointError, match=r"attention heads of a 48-wide model.*num_heads"):
        load_checkpoint(path)
    assert load_checkpoint(path, num_heads=2).backbone.cfg.num_heads == 2


def test_bad_keyword_arguments(small):
    with pytest.raises(CheckpointError, match="target_length must be a positive integer"):
        load_checkpoint(small[1]["ast"], target_length=0)
    with pytest.raises(CheckpointError, match=r"config\.json sets freq_stride 10, not 16"):
        load_checkpoint(small[1]["hf"], freq_stride=16)


def _ssast_sd(tmp_path):
    path, _ = write_ssast(tmp_path / "s.pth", frame=False)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda sd: sd.pop("module.p_input_tdim"), r"SSAST checkpoint without 'module\.p_input_tdim'"),
    (lambda sd: sd.update({"module.p_input_tdim": torch.tensor(512)}),
     r"has 512 patch tokens, but a 128x512 input in 16x16 patches gives 8x32"),
    (lambda sd: sd.update({"module.p_input_fdim": torch.tensor(12.5)}),
     r"p_input_fdim must be one positive integer"),
])
def test_ssast_strictness(tmp_path, mutate, message):
    sd = _ssast_sd(tmp_path)
    mutate(sd)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_save(tmp_path / "bad.pth", sd))


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(directory: Path, fn) -> None:
    from safetensors.torch import load_file
    sd = load_file(str(directory / "model.safetensors"))
    fn(sd)
    save_file(sd, str(directory / "model.safetensors"))


P = "audio_spectrogram_transformer.encoder.layer."


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: (d / "config.json").unlink(), r"is not a Hugging Face checkpoint: no config\.json"),
    (lambda d: (d / "model.safetensors").unlink(), r"has no model\.safetensors or pytorch_model"),
    (lambda d: (d / "config.json").write_text("{not json"), r"cannot read .*config\.json"),
    (lambda d: _edit_config(d, model_type="vit"), r"model_type is 'vit'"),
    (lambda d: _edit_config(d, hidden_act="relu"), r"hidden_act 'relu' is not supported"),
    (lambda d: _edit_config(d, hidden_size=128, num_attention_heads=2),
     r"'audio_spectrogram_transformer\.embeddings\.cls_token' has shape \(1, 1, 64\), expected "
     r"\(1, 1, 128\)"),
    (lambda d: _edit_config(d, max_length=512), r"position_embeddings' has shape \(1, 146, 64\)"),
    (lambda d: _edit_config(d, id2label={str(i): str(i) for i in range(5)},
                            label2id={str(i): i for i in range(5)}),
     r"config\.json names 5 labels but the classifier has 35 outputs"),
    (lambda d: _edit_weights(d, lambda sd: sd.pop(P + "0.output.dense.bias")),
     r"missing tensors 'audio_spectrogram_transformer\.encoder\.layer\.0\.output\.dense\.bias'"),
    (lambda d: _edit_weights(d, lambda sd: sd.update({P + "0.pooler.weight": torch.zeros(1)})),
     r"unexpected tensors .*layer\.0\.pooler\.weight'"),
    (lambda d: _edit_weights(d, lambda sd: sd.pop(P + "1.attention.attention.key.weight")),
     r"attention weight of layer 1 is incomplete: .* not the key part"),
    (lambda d: (d / "preprocessor_config.json").write_text(json.dumps({"num_mel_bins": 64})),
     r"num_mel_bins 64 does not match the model's 128"),
])
def test_hf_strictness(small, tmp_path, edit, message):
    d = write_hf_dir(tmp_path / "hf", small[0], SMALL, SC_LABELS)
    load_checkpoint(d)  # intact first
    edit(d)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


# -- labels ------------------------------------------------------------------------------------

def test_read_label_csv_real_files():
    audioset = read_label_csv(AUDIOSET_CSV)
    assert len(audioset) == 527
    assert audioset[:3] == ["Speech", "Male speech, man speaking", "Female speech, woman speaking"]
    assert SC_LABELS[:5] == ["backward", "follow", "five", "bed", "zero"]
    assert SC_LABELS[34] == "one" and len(SC_LABELS) == 35


@pytest.mark.parametrize(("text", "message"), [
    ("id,mid,name\n0,/m/a,x\n", "must start with the header"),
    ("index,mid,display_name\n0,/m/a,x\n2,/m/b,y\n", r"indices must be 0\.\.N-1"),
    ("index,mid,display_name\n0,/m/a\n", "line 2: expected 3 columns"),
    ("index,mid,display_name\nzero,/m/a,x\n", "index 'zero' is not an integer"),
    ("index,mid,display_name\n0,/m/a,x\n0,/m/b,y\n", "index 0 repeated"),
    ("", "must start with the header"),
])
def test_read_label_csv_errors(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_label_csv(path)
    with pytest.raises(ConfigError, match="cannot read label file"):
        read_label_csv(tmp_path / "absent.csv")


def test_read_label_csv_quoted_commas_in_any_order(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text('index,mid,display_name\n1,/m/b,"Bird, singing"\n0,/m/a,"Dog"\n')
    assert read_label_csv(path) == ["Dog", "Bird, singing"]


# -- the checkpoint's own head as a bundle -----------------------------------------------------

@pytest.mark.parametrize("layout", ["hf", "ast"])
def test_head_bundle_reproduces_the_checkpoint_logits_exactly(small, features, layout):
    ckpt = load_checkpoint(small[1][layout])
    with torch.no_grad():
        expected = ckpt.logits(features)
    bundle = TaskBundle.from_bytes(head_bundle(ckpt, "speech-commands", SC_LABELS).to_bytes())
    m = bundle.manifest
    assert (m.method, m.labels, m.multi_label) == ("head", SC_LABELS, False)
    assert m.backbone_fingerprint == ckpt.backbone.fingerprint()
    assert m.feature_config == ckpt.features
    assert m.recipe["source_format"] == layout
    fresh = load_checkpoint(small[1][layout]).backbone
    model = bundle.build_model(fresh).eval()
    with torch.no_grad():
        got = model(features)
    assert torch.equal(got, expected)
    # A changed head tensor changes the logits.
    bundle.tensors["head.fc.bias"] = bundle.tensors["head.fc.bias"] + 0.5
    with torch.no_grad():
        assert not torch.equal(bundle.build_model(fresh)(features), expected)


def test_head_bundle_leaves_attached_adapters_in_place(small):
    from aat_serve.adapters.modules import Adapter

    ckpt = load_checkpoint(small[1]["hf"])
    adapter = Adapter(64, 8)
    ckpt.backbone.blocks[1].mlp_adapter = adapter
    head_bundle(ckpt, "sc")
    assert ckpt.backbone.blocks[1].mlp_adapter is adapter
    assert ckpt.backbone.blocks[0].mlp_adapter is None


def test_head_bundle_labels_and_multi_label(small, tmp_path):
    files = small[1]
    hf = load_checkpoint(files["hf"])
    assert head_bundle(hf, "sc").manifest.labels == SC_LABELS  # id2label
    orig = load_checkpoint(files["ast"])
    assert head_bundle(orig, "sc").manifest.labels == [str(i) for i in range(35)]
    assert head_bundle(orig, "sc", multi_label=True).manifest.multi_label is True
    with pytest.raises(ConfigError, match="3 labels given for a head with 35 classes"):
        head_bundle(orig, "sc", ["a", "b", "c"])
    with pytest.raises(ConfigError, match="invalid task name"):
        head_bundle(orig, "Bad Name")
    # 527 AudioSet classes: labels from the AST csv, multi-label unless the config says not.
    audioset = read_label_csv(AUDIOSET_CSV)
    cfg527 = BackboneConfig(embed_dim=64, depth=1, num_heads=1, mlp_hidden=64, target_length=128)
    c527 = random_canonical(cfg527, 527, seed=5)
    as_hf = load_checkpoint(write_hf_dir(tmp_path / "as", c527, cfg527, audioset))
    b = head_bundle(as_hf, "audioset")
    assert b.manifest.labels == audioset and b.manifest.multi_label is True
    assert b.tensors["head.fc.weight"].shape == (527, 64)
    single = load_checkpoint(write_hf_dir(tmp_path / "as1", c527, cfg527, audioset,
                                          problem_type="single_label_classification"))
    assert head_bundle(single, "audioset").manifest.multi_label is False
    # Bundle of one backbone refused by another.
    with pytest.raises(BackboneMismatchError, match="was trained on backbone"):
        b.build_model(hf.backbone)


@pytest.mark.parametrize("value", ["../outside.safetensors", "sub/model.safetensors", ".hidden",
                                   "", 3, ["a.safetensors"], "..\\win.safetensors"])
def test_shard_index_names_only_files_beside_it(tmp_path, value):
    """One parser for local folders and hub downloads: a shard must be a plain file name."""
    from aat_serve.adapters.checkpoints.files import shard_names

    index = tmp_path / "model.safetensors.index.json"
    good = {"a": "model-2.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}
    index.write_text(json.dumps({"weight_map": good}))
    assert shard_names(index) == ["model-1.safetensors", "model-2.safetensors"]
    index.write_text(json.dumps({"weight_map": {**good, "d": value}}))
    with pytest.raises(CheckpointError, match=r"names a shard outside its directory: .*expected "
                                              r"file names beside the index"):
        shard_names(index)
    for bad in ({}, {"weight_map": {}}, {"weight_map": ["model-1.safetensors"]}):
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="is not a valid shard index"):
            shard_names(index)
