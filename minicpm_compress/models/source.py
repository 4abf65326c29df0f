"""Resolve what a user passes as `--model`: a built-in name, a checkpoint folder, or an output folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressError
from .builtin import BUILTIN_MODELS, builtin_path

MANIFEST_NAME = "manifest.json"
MODEL_SUBDIR = "model"
QWEIGHTS_NAME = "quantized.safetensors"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    checkpoint: Path  # the float checkpoint folder
    reference: str  # the original full-precision model (built-in name or folder)
    qweights: Path | None = None  # quantized weights of an output folder, if any


def resolve_model(spec: str) -> ModelSource:
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, builtin_path(spec), spec)
    folder = Path(spec)
    if (folder / MANIFEST_NAME).is_file() and (folder / MODEL_SUBDIR / "config.json").is_file():
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text())
            reference = manifest["reference"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CompressError(f"{folder / MANIFEST_NAME}: not a minicpm-compress manifest (no 'reference')") from None
        qweights = folder / QWEIGHTS_NAME
        return ModelSource(spec, folder / MODEL_SUBDIR, reference, qweights if qweights.is_file() else None)
    if (folder / "config.json").is_file():
        return ModelSource(spec, folder, str(folder))
    if folder.exists():
        raise CompressError(f"{folder}: not a checkpoint folder (no config.json) nor a minicpm-compress output folder")
    raise CompressError(f"{spec}: not a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing folder")
