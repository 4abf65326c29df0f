"""Shared fixtures: the built-in pretrained models (prepared once into the cache) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests share the project's cache with `make demo` unless told otherwise.
os.environ.setdefault("MINICPM_COMPRESS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("MINICPM_COMPRESS_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from minicpm_compress.models.builtin import builtin_path  # noqa: E402
from minicpm_compress.models.checkpoint import load_tokenizer, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return builtin_path("smollm2-135m")


@pytest.fixture(scope="session")
def minicpm_path() -> Path:
    return builtin_path("minicpm-smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer model with SmolLM2's vocabulary, so the real tokenizer and text sets work with it."""
    from minicpm_compress.models.architectures import ARCHITECTURES

    settings = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=1024,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if model_type == "minicpm":
        settings.update(scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    settings.update(overrides)
    return ARCHITECTURES[model_type].config_class(**settings)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from minicpm_compress.models.architectures import ARCHITECTURES

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = ARCHITECTURES[model_type].model_class(config).eval()
    with torch.no_grad():  # larger-than-default weights, so the model's outputs depend on them visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    """Factory: write a tiny random checkpoint folder of the given type and return its path."""

    def make(model_type: str = "llama", name: str = "tiny", **overrides) -> Path:
        folder = tmp_path / f"{name}-{model_type}"
        save_checkpoint(tiny_model(model_type, **overrides), tokenizer, folder)
        return folder

    return make
