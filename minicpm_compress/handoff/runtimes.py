"""The runtimes an exporter stage's files are for: what they need, where they are, how to load them.

One entry per exporter stage, found by the stage's name (as stages are found in `stages.STAGES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import snippets

if TYPE_CHECKING:
    from .deliverables import Deliverable

# Core ML specification versions → the first OS releases that run them (Apple's coremltools docs).
COREML_OS = {9: "iOS 18 / macOS 15", 8: "iOS 17 / macOS 14", 7: "iOS 16 / macOS 13", 6: "iOS 15 / macOS 12"}


@dataclass(frozen=True)
class Runtime:
    stage: str  # the exporter stage whose files it runs
    label: str  # the column a person reads: "llama.cpp", "onnxruntime-genai", …
    package: str  # the Python package it was verified with (manifest environment key)
    mobile: bool  # part of the device recommendation
    location: Callable[["Deliverable"], str]  # the file or folder an app loads
    requirement: Callable[["Deliverable", dict], str]  # runtime and version it needs
    snippets: Callable[["Deliverable", Path], list[snippets.Snippet]]

    def tested_with(self, manifest: dict) -> str:
        version = manifest.get("environment", {}).get(self.package)
        return f"{self.package} {version}" if version else f"{self.package} (version not recorded)"


def _gguf_requirement(d: "Deliverable", manifest: dict) -> str:
    t = d.stage["details"].get("type", "")
    vision = " and libmtmd for the mmproj file" if "mmproj" in d.stage["details"] else ""
    arch = d.stage["details"].get("architecture")  # older manifests did not record it
    archs = f"the `{arch}` architecture" if arch else "the `minicpm`/`llama` architectures"
    return (f"llama.cpp with {archs} and {t} tensors{vision}; measured with "
            f"{RUNTIMES['gguf'].tested_with(manifest)} (its bundled llama.cpp); older builds were not tested")


def _onnx_requirement(d: "Deliverable", manifest: dict) -> str:
    env, details = manifest.get("environment", {}), d.stage["details"]
    from ..export.onnx.decoder import FUSED_OPS

    ops = (["MatMulNBits"] if details.get("bits") != 32 and details.get("int8") != "dynamic" else [])
    ops += ["GatherBlockQuantized"] if details.get("embeddings", "float") != "float" else []
    ops += list(FUSED_OPS) if details.get("graph") == "fused" else []
    level = f", accuracy level {details['accuracy_level']}" if details.get("accuracy_level") is not None else ""
    return (f"onnxruntime-genai {env.get('onnxruntime-genai', '?')} or newer "
            f"(onnxruntime {env.get('onnxruntime', '?')}, CPU execution provider"
            f"{'; onnxruntime contrib ops ' + ', '.join(ops) if ops else ''}{level}); older versions were not tested")


def _compute(details: dict) -> str:
    if details.get("precision") == "float16":
        return "float16 compute (Neural Engine eligible)"
    return f"{details.get('precision', 'float32')} compute (CPU/GPU: its activations do not fit float16)"


def _coreml_requirement(d: "Deliverable", manifest: dict) -> str:
    version = d.stage["details"].get("spec_version")
    return (f"{COREML_OS.get(version, f'Core ML specification {version}')} or newer (Core ML stateful model, "
            f"blockwise-quantized weights); {_compute(d.stage['details'])}; converted with "
            f"{RUNTIMES['coreml'].tested_with(manifest)}")


def _executorch_requirement(d: "Deliverable", manifest: dict) -> str:
    details = d.stage["details"]
    kernels = "the llama:: custom-ops kernels" + (" and the quantized kernels" if details.get("bits") != 32 else "")
    return (f"ExecuTorch {manifest.get('environment', {}).get('executorch', '?')} or newer with the XNNPACK backend "
            f"and {kernels} (int8 activations computed at run time); a static KV cache of "
            f"{details.get('context', '?')} tokens; measured in ExecuTorch's Python runtime on Linux, never on a phone")


def _hf_requirement(d: "Deliverable", manifest: dict) -> str:
    return ("a server runtime with AWQ GEMM kernels (e.g. vLLM or transformers with an AWQ backend); "
            "not a phone artifact")


RUNTIMES: dict[str, Runtime] = {
    "gguf": Runtime("gguf", "llama.cpp", "llama-cpp-python", True, lambda d: d.stage["details"]["file"],
                    _gguf_requirement, snippets.llama_cpp),
    "onnx": Runtime("onnx", "onnxruntime-genai", "onnxruntime-genai", True, lambda d: f"{d.top_folder()}/",
                    _onnx_requirement, snippets.onnxruntime_genai),
    "coreml": Runtime("coreml", "Core ML", "coremltools", True, lambda d: f"{d.top_folder()}/",
                      _coreml_requirement, snippets.coreml),
    "executorch": Runtime("executorch", "ExecuTorch", "executorch", True, lambda d: f"{d.top_folder()}/",
                          _executorch_requirement, snippets.executorch),
    "hf_awq": Runtime("hf_awq", "AWQ checkpoint (servers)", "transformers", False,
                      lambda d: f"{d.top_folder()}/", _hf_requirement, lambda d, root: []),
}
