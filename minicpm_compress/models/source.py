"""Resolve what a user passes as `--model`: a built-in name, a checkpoint folder, or an output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressError
from ..manifest_schema import read_manifest
from .builtin import BUILTIN_MODELS, builtin_path

MANIFEST_NAME = "manifest.json"
MODEL_SUBDIR = "model"  # output folders of earlier versions held a whole float checkpoint here
QWEIGHTS_NAME = "quantized.safetensors"
MODIFIED_NAME = "modified.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    checkpoint: Path  # the source checkpoint folder: weights (read lazily) and tokenizer
    reference: str  # the original full-precision model (built-in name or folder)
    qweights: Path | None = None  # quantized weights of an output folder, if any
    modified: Path | None = None  # float tensors (and AWQ scale vectors) an output folder changed
    config: Path | None = None  # the model's config.json when it is not the checkpoint's (output folders)
    weights_sha256: str | None = None  # what the source checkpoint's weights must hash to (output folders)


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


def verify_model_files(folder: Path, manifest: dict) -> None:
    """The files that make an output folder a model are there and hash to what its manifest recorded."""
    from .tensors import weights_sha256

    listed = {a.get("path"): a for a in manifest.get("artifacts") or [] if isinstance(a, dict)}
    model_files = [p for p in listed if p in (CONFIG_NAME, QWEIGHTS_NAME, MODIFIED_NAME)
                   or str(p).startswith(f"{MODEL_SUBDIR}/")]
    for name in (CONFIG_NAME, QWEIGHTS_NAME, MODIFIED_NAME):
        if (folder / name).is_file() and name not in listed:
            raise CompressError(f"{folder / name}: not listed in {MANIFEST_NAME} (added after the run?)")
    for name in model_files:
        path = folder / name
        if not path.is_file():
            raise CompressError(f"{path}: missing (listed in {MANIFEST_NAME}); the output folder is incomplete")
        if weights_sha256(folder, [path]) != listed[name].get("sha256"):
            raise CompressError(f"{path}: sha256 differs from {MANIFEST_NAME} (changed after the run)")


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
