"""Where a model's files are (`ModelSource`) and the names of an output folder's model files; resolve.py
turns what a user passes as `--model` into one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressError

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
