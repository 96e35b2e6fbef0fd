"""Load the public AST checkpoints into our ``AST``: a Hugging Face directory (or model id), an
original AST ``.pth`` and an SSAST ``.pth``; convert between their layouts.

One module per job:

- ``convert``: pure state-dict renaming, original AST/SSAST ``module.v.*`` <-> canonical <->
  Hugging Face (``checkpoint_filter_fn``, ``to_original_state_dict``, ``to_hf_state_dict``);
- ``files``: reading tensor files (safetensors, ``torch.load(weights_only=True)``), a Hugging
  Face directory's weights, JSON and AST's label CSV; ``hub``: a model id -> the hub cache;
- ``geometry``: width, depth, patch and strides from tensor shapes (``infer_grid``);
  ``hf_config``: the same, labels and feature settings from a Hugging Face directory's JSON;
- ``load``: strict loading into a frozen backbone plus the checkpoint's own head.

The positional grid is kept as stored; ``AST.pos_embed_for`` cuts or interpolates it per input
length as AST and SSAST do. A checkpoint's own head becomes a task bundle with
``aat_serve.adapters.bundle.head_bundle``.
"""

from aat_serve.adapters.checkpoints.convert import (
    DEIT_HEAD_KEYS,
    HF_PREFIX,
    SSAST_DIM_KEYS,
    SSAST_PRETRAIN_PREFIXES,
    CanonicalStateDict,
    checkpoint_filter_fn,
    detect_format,
    to_canonical,
    to_hf_state_dict,
    to_original_state_dict,
)
from aat_serve.adapters.checkpoints.files import read_label_csv
from aat_serve.adapters.checkpoints.geometry import (
    CONVENTIONAL_LENGTHS,
    STRIDE_PREFERENCE,
    infer_grid,
)
from aat_serve.adapters.checkpoints.hub import looks_like_model_id, resolve_checkpoint
from aat_serve.adapters.checkpoints.load import (
    HEAD_KEYS,
    LoadedCheckpoint,
    build_backbone,
    canonical_state_dict,
    load_checkpoint,
)

__all__ = [
    "CONVENTIONAL_LENGTHS",
    "DEIT_HEAD_KEYS",
    "HEAD_KEYS",
    "HF_PREFIX",
    "SSAST_DIM_KEYS",
    "SSAST_PRETRAIN_PREFIXES",
    "STRIDE_PREFERENCE",
    "CanonicalStateDict",
    "LoadedCheckpoint",
    "build_backbone",
    "canonical_state_dict",
    "checkpoint_filter_fn",
    "detect_format",
    "infer_grid",
    "load_checkpoint",
    "looks_like_model_id",
    "read_label_csv",
    "resolve_checkpoint",
    "to_canonical",
    "to_hf_state_dict",
    "to_original_state_dict",
]
