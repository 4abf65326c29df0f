"""Where prepared models, source text and reference logits are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$MINICPM_COMPRESS_CACHE` (default `~/.cache/minicpm-compress`), joined with `parts` and created."""
    root = Path(os.environ.get("MINICPM_COMPRESS_CACHE") or Path.home() / ".cache" / "minicpm-compress")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
