"""Resolve what a user passes as `--model`: a built-in name, a checkpoint folder, or an output folder."""

from __future__ import annotations

from pathlib import Path

from .builtin import BUILTIN_MODELS, builtin_path
from .errors import CompressError
from .manifest_schema import read_manifest
from .models.source import (CONFIG_NAME, MANIFEST_NAME, MODEL_SUBDIR, MODIFIED_NAME, QWEIGHTS_NAME, ModelSource,
                            verify_model_files)


def model_license(reference: str, checkpoint: Path) -> str | None:
    """The source model's licence: a built-in model's, else the `license:` of the checkpoint's README.md
    front matter (as Hugging Face model cards state it); None when neither says."""
    if reference in BUILTIN_MODELS:
        return BUILTIN_MODELS[reference].license
    readme = checkpoint / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    for line in front.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def resolve_model(spec: str) -> ModelSource:
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, builtin_path(spec), spec)
    folder = Path(spec)
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder / MANIFEST_NAME)
        reference, origin = manifest["reference"], manifest.get("source")
        if manifest.get("status") == "failed":
            raise CompressError(f"{folder / MANIFEST_NAME}: this run failed its gate (status 'failed') and holds "
                                "no model; rerun it or use an earlier output folder")
        verify_model_files(folder, manifest)
        qweights = folder / QWEIGHTS_NAME
        qweights = qweights if qweights.is_file() else None
        if isinstance(origin, dict) and (folder / CONFIG_NAME).is_file():
            checkpoint = Path(str(origin.get("checkpoint")))
            if not (checkpoint / CONFIG_NAME).is_file():
                raise CompressError(f"{folder / MANIFEST_NAME}: source checkpoint {checkpoint} is missing (moved or "
                                    "deleted?); output folders hold only what changed and need it")
            modified = folder / MODIFIED_NAME
            return ModelSource(spec, checkpoint, reference, qweights, modified if modified.is_file() else None,
                               folder / CONFIG_NAME, origin.get("weights_sha256"))
        if (folder / MODEL_SUBDIR / CONFIG_NAME).is_file():
            return ModelSource(spec, folder / MODEL_SUBDIR, reference, qweights)
    if (folder / "config.json").is_file():
        return ModelSource(spec, folder, str(folder))
    if folder.exists():
        raise CompressError(f"{folder}: not a checkpoint folder (no config.json) nor a minicpm-compress output folder")
    raise CompressError(f"{spec}: not a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing folder")
