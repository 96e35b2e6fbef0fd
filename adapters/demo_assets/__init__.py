"""The demo backbone and task bundles that ship inside the package (``aat demo build``).

``aat serve`` with no configuration serves these: ``BACKBONE_DIR`` is a Hugging Face AST
directory, ``TASKS_DIR`` a read-only bundle store of seed bundles (``<task>.safetensors``).
``docs/demo.md`` says how they were made and how well they do.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
BACKBONE_DIR = DEMO_DIR / "backbone"
TASKS_DIR = DEMO_DIR / "tasks"
BUILD_JSON = DEMO_DIR / "build.json"


def available() -> bool:
    """True when the backbone and at least one task bundle are present."""
    return (BACKBONE_DIR / "config.json").is_file() and any(TASKS_DIR.glob("*.safetensors"))
