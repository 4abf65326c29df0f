"""manifest.json and the output folder: one record of the run, written atomically.

An output folder that holds a model is itself a valid `--model`. It stores only what changed against
its source checkpoint, which the manifest names (path and sha256 of its weights):
    config.json              the model's config (pruning changes it)
    modified.safetensors     float tensors a stage changed (healed/pruned layers, AWQ-folded norms) and
                             AWQ's column/row scale vectors; absent when nothing changed
    quantized.safetensors    quantized weights (packed codes, scales, zero points; see quant/qweight.py)
    manifest.json            source, settings, metrics, gates, artifacts (sha256), memory estimate
    report.md                the same, for people
A model loaded with --trust-remote-code has no streamable source; its folder holds the whole float
checkpoint under model/ instead.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, atomic
from .models.checkpoint import WEIGHTS_NAME, save_checkpoint
from .models.source import CONFIG_NAME, MANIFEST_NAME, MODEL_SUBDIR, MODIFIED_NAME, QWEIGHTS_NAME
from .models.tensors import CheckpointTensors
from .quant.qweight import save_qweights

if TYPE_CHECKING:
    from .pipeline import RunRecord
    from .state import ModelState


def artifact_entry(root: Path, path: Path, fmt: str, bits: int | None) -> dict:
    """A manifest entry for a file written under the output folder `root`."""
    return {
        "path": path.relative_to(root).as_posix(),
        "format": fmt,
        "bits": bits,
        "bytes": path.stat().st_size,
        "sha256": atomic.sha256_file(path),
    }


def source_entry(state: "ModelState") -> dict | None:
    """The source checkpoint an output folder refers to, or None when the state has none to refer to."""
    base = state.weights.base
    base = getattr(base, "base", base)  # a MiniCPM-V LLM's view of its checkpoint
    if not isinstance(base, CheckpointTensors):
        return None
    return {"checkpoint": str(base.folder.resolve()), "weights_sha256": base.fingerprint()}


def write_model(state: "ModelState", root: Path) -> list[dict]:
    """The composable part of an output folder; returns its artifact entries."""
    artifacts = []
    if source_entry(state) is None:
        save_checkpoint(state.model, state.tokenizer, root / MODEL_SUBDIR)
        for path in sorted((root / MODEL_SUBDIR).iterdir()):
            fmt = "safetensors float32 checkpoint" if path.name == WEIGHTS_NAME else "checkpoint metadata"
            artifacts.append(artifact_entry(root, path, fmt, 32 if path.name == WEIGHTS_NAME else None))
    else:
        atomic.write_text(root / CONFIG_NAME, json.dumps(state.config_dict(), indent=2, sort_keys=True) + "\n")
        artifacts.append(artifact_entry(root, root / CONFIG_NAME, "model config", None))
        if state.weights.changed():
            state.weights.save_changes(root / MODIFIED_NAME)
            artifacts.append(artifact_entry(root, root / MODIFIED_NAME,
                                            "minicpm-compress modified float tensors and scale vectors", 32))
    if state.qweights:
        save_qweights(state.qweights, root / QWEIGHTS_NAME)
        bits = sorted({q.scheme.bits for q in state.qweights.values()})
        artifacts.append(artifact_entry(root, root / QWEIGHTS_NAME,
                                        "minicpm-compress quantized weights (codes packed at their bit width)", max(bits)))
    return artifacts


RUNTIME_PACKAGES = ("llama-cpp-python", "onnxruntime", "onnxruntime-genai", "coremltools", "executorch")


def runtime_versions() -> dict:
    """The versions of the runtimes (and converters) the artifacts were verified with; absent ones omitted."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in RUNTIME_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def build_manifest(record: "RunRecord", artifacts: list[dict], source: dict | None = None) -> dict:
    import torch
    import transformers

    load = record.stages[0]
    return {
        "tool": {"name": atomic.TOOL_NAME, "version": __version__},
        "status": "failed" if record.failed else "passed",
        "model": load.details.get("model"),
        "reference": load.details.get("reference"),
        **({"source": source} if source else {}),
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
                **({"reused": True} if s.reused else {}),
            }
            for s in record.stages
        ],
        "artifacts": artifacts,
        "memory_estimate": record.memory,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **runtime_versions(),
        },
    }


def write_outputs(record: "RunRecord", state: "ModelState | None", root: Path) -> dict:
    """manifest.json (and the model files it lists) into `root`; returns the manifest. What people read is
    rendered from it afterwards (handoff.write_handoff)."""
    # a failed run ships nothing; each shipped file names the stage that wrote (and measured) it, and a file
    # a later stage wrote again (two exporters, one file name) is listed once, as that stage's
    written = {} if record.failed else {a["path"]: {**a, "stage": s.index} for s in record.stages for a in s.artifacts}
    artifacts = sorted(written.values(), key=lambda a: a["stage"])
    artifacts += write_model(state, root) if state is not None else []
    manifest = build_manifest(record, artifacts, source_entry(state) if state is not None else None)
    atomic.write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest
