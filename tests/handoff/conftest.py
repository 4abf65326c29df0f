"""Manifests made by hand for the hand-off's unit tests (the CI recipe's real folder is `ci_output`)."""

from __future__ import annotations

import pytest

MIB = 2**20


def _metrics(kld: float, ppl_increase: float) -> dict:
    return {"ppl": 30 * (1 + ppl_increase), "ref_ppl": 30.0, "ppl_increase": ppl_increase, "kld": kld, "top1": 1 - kld,
            "tokens": 2048}


def _stage(index: int, name: str, kld: float, details: dict | None = None, gate: bool | None = True) -> dict:
    return {"index": index, "name": name, "settings": {}, "details": details or {}, "metrics": _metrics(kld, kld / 2),
            "gate": {"max_kld": 1.0} if gate is not None else None, "gate_passed": gate, "failures": [], "wall_s": 1.0}


def _ram(size: int, context: int = 2048) -> dict:
    return {"weights_bytes": size, "kv_cache_bytes": 64 * MIB, "context_tokens": context, "total_bytes": size + 64 * MIB}


def make_manifest(big: int = 3000 * MIB, small: int = 900 * MIB, licence: str | None = "apache-2.0") -> dict:
    """A 3-GB int8 and a 0.9-GB int4 GGUF file, and a 0.9-GB ONNX folder built for 1024 tokens."""
    stages = [
        _stage(0, "load", 0.0, {"model_type": "minicpm", "parameters": 4e9, "license": licence,
                                "tokenizer": {"class": "T", "vocab_size": 100, "bos_token": "<s>", "eos_token": "</s>",
                                              "adds_bos": True, "chat_template": "{{ messages }}"}}, gate=None),
        _stage(1, "gguf", 0.01, {"file": "model-Q8_0.gguf", "type": "Q8_0", "bits_per_weight": 8.5,
                                 "ram_estimate": _ram(big), "measured": "in llama.cpp"}),
        _stage(2, "gguf", 0.20, {"file": "model-Q4_0.gguf", "type": "Q4_0", "bits_per_weight": 4.5,
                                 "ram_estimate": _ram(small), "measured": "in llama.cpp"}),
        _stage(3, "onnx", 0.15, {"bits_per_weight": 4.6, "ram_estimate": _ram(small), "max_context": 1024,
                                 "measured": "in onnxruntime"}),
    ]
    artifacts = [
        {"path": "model-Q8_0.gguf", "format": "GGUF Q8_0", "bits": 8, "bytes": big, "sha256": "a" * 64, "stage": 1},
        {"path": "imatrix.gguf", "format": "llama.cpp imatrix", "bits": None, "bytes": 10, "sha256": "b" * 64, "stage": 1},
        {"path": "model-Q4_0.gguf", "format": "GGUF Q4_0", "bits": 4, "bytes": small, "sha256": "c" * 64, "stage": 2},
        {"path": "onnx-int4/model.onnx", "format": "ONNX int4", "bits": 4, "bytes": small, "sha256": "d" * 64, "stage": 3},
        {"path": "onnx-int4/genai_config.json", "format": "ONNX runtime config", "bits": None, "bytes": 1000,
         "sha256": "e" * 64, "stage": 3},
        {"path": "quantized.safetensors", "format": "minicpm-compress quantized weights", "bits": 4, "bytes": 5,
         "sha256": "f" * 64},
    ]
    return {"tool": {"name": "minicpm-compress", "version": "0"}, "status": "passed", "model": "m", "reference": "ref",
            "recipe": {"name": "r", "data": {"evaluation": ["austen-heldout"], "eval_window": 512}},
            "stages": stages, "artifacts": artifacts, "memory_estimate": None,
            "environment": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0", "llama-cpp-python": "0.3.36",
                            "onnxruntime-genai": "0.18.0", "onnxruntime": "1.31.1"}}


@pytest.fixture
def manifest() -> dict:
    return make_manifest()
