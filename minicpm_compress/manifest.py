"""manifest.json and the output folder: one record of the run, written atomically.

An output folder that holds a model is itself a valid `--model`:
    model/                   float checkpoint the quantized weights were derived from
    quantized.safetensors    quantized weights (codes, scales, zero points; see quant/qweight.py)
    manifest.json            settings, metrics, gates, artifacts (sha256), memory estimate
    report.md                the same, for people
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, atomic
from .models.checkpoint import WEIGHTS_NAME, save_checkpoint
from .models.source import MANIFEST_NAME, MODEL_SUBDIR, QWEIGHTS_NAME
from .quant.qweight import save_qweights

if TYPE_CHECKING:
    from .pipeline import RunRecord
    from .state import ModelState

REPORT_NAME = "report.md"


def artifact_entry(root: Path, path: Path, fmt: str, bits: int | None) -> dict:
    """A manifest entry for a file written under the output folder `root`."""
    return {
        "path": path.relative_to(root).as_posix(),
        "format": fmt,
        "bits": bits,
        "bytes": path.stat().st_size,
        "sha256": atomic.sha256_file(path),
    }


def write_model(state: "ModelState", root: Path) -> list[dict]:
    """The composable part of an output folder; returns its artifact entries."""
    save_checkpoint(state.model, state.tokenizer, root / MODEL_SUBDIR)
    artifacts = []
    for path in sorted((root / MODEL_SUBDIR).iterdir()):
        if path.name == WEIGHTS_NAME:
            artifacts.append(artifact_entry(root, path, "safetensors float32 checkpoint", 32))
        else:
            artifacts.append(artifact_entry(root, path, "checkpoint metadata", None))
    if state.qweights:
        save_qweights(state.qweights, root / QWEIGHTS_NAME)
        bits = sorted({q.scheme.bits for q in state.qweights.values()})
        artifacts.append(artifact_entry(root, root / QWEIGHTS_NAME,
                                   "minicpm-compress quantized weights (codes unpacked, one per byte)", max(bits)))
    return artifacts


def build_manifest(record: "RunRecord", artifacts: list[dict]) -> dict:
    import torch
    import transformers

    load = record.stages[0]
    return {
        "tool": {"name": "minicpm-compress", "version": __version__},
        "status": "failed" if record.failed else "passed",
        "model": load.details.get("model"),
        "reference": load.details.get("reference"),
        "recipe": record.recipe.resolved(),
        "stages": [
            {
                "index": s.index,
                "name": s.name,
                "settings": s.settings,
                "details": s.details,
                "metrics": s.metrics.as_dict(),
                "gate": s.gate,
                "gate_passed": s.passed,
                "failures": s.failures,
                "wall_s": round(s.wall_s, 3),
            }
            for s in record.stages
        ],
        "artifacts": artifacts,
        "memory_estimate": record.memory,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def write_outputs(record: "RunRecord", state: "ModelState | None", root: Path) -> dict:
    from .report import render_report

    artifacts = [a for s in record.stages for a in s.artifacts]
    artifacts += write_model(state, root) if state is not None else []
    manifest = build_manifest(record, artifacts)
    atomic.write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    atomic.write_text(root / REPORT_NAME, render_report(manifest))
    return manifest
