"""What an output folder ships, grouped per runtime file set: one deliverable per exporter stage.

Everything is read from the manifest (artifacts name the stage that wrote and measured them), so the
model card, the HTML report and `compare` agree with manifest.json by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from .runtimes import RUNTIMES, Runtime

SUPPORT_FORMATS = ("imatrix",)  # written beside a file for the record, not needed to run it


@dataclass(frozen=True)
class Deliverable:
    stage: dict  # the manifest's entry of the exporter stage
    runtime: Runtime
    files: tuple[dict, ...]  # artifact entries needed at run time
    kv_bytes_per_token: float  # the runtime's KV cache, from the stage's (or the run's) RAM estimate

    @property
    def name(self) -> str:
        """What a person calls it: the GGUF file, or the folder of an ONNX / Core ML / HF export."""
        return self.runtime.location(self)

    @property
    def metrics(self) -> dict:
        return self.stage["metrics"]

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)

    @property
    def bits_per_weight(self) -> float | None:
        return self.stage["details"].get("bits_per_weight")

    @property
    def max_context(self) -> int | None:
        """The longest context the files were built for (ONNX's genai_config, Core ML's state), if fixed."""
        return self.stage["details"].get("max_context")

    def ram_bytes(self, context: int) -> int | None:
        """Files loaded whole (weights, vision half, tokenizer) plus the KV cache of `context` tokens;
        None past the context the files were built for."""
        if self.max_context and context > self.max_context:
            return None
        return self.bytes + round(self.kv_bytes_per_token * min(context, self.max_context or context))

    def top_folder(self) -> str | None:
        parts = {PurePosixPath(f["path"]).parts[0] for f in self.files if "/" in f["path"]}
        return parts.pop() if len(parts) == 1 else None


def _kv_per_token(stage: dict, manifest: dict) -> float:
    est = stage["details"].get("ram_estimate") or manifest.get("memory_estimate") or {}
    return est["kv_cache_bytes"] / est["context_tokens"] if est.get("context_tokens") else 0.0


def deliverables(manifest: dict) -> list[Deliverable]:
    """The deliverables of a passed run, in stage order (none for a failed run: it ships nothing)."""
    by_stage: dict[int, list[dict]] = {}
    for a in manifest.get("artifacts", []):
        if "stage" in a and not any(k in a["format"] for k in SUPPORT_FORMATS):
            by_stage.setdefault(a["stage"], []).append(a)
    out = []
    for stage in manifest["stages"]:
        runtime = RUNTIMES.get(stage["name"])
        if runtime and stage["index"] in by_stage:
            out.append(Deliverable(stage, runtime, tuple(by_stage[stage["index"]]), _kv_per_token(stage, manifest)))
    return out
