"""The built-in MiniCPM-V test model `minicpmv-smollm2` (MiniCPM-V 4.0 layout: MiniCPM LLM + SigLIP + resampler).

* LLM: `minicpm-smollm2`'s function, widened from 576 to 640 channels (the resampler's attention heads are
  128 wide, in MiniCPM-V and in llama.cpp, so the LLM width must be a multiple of 128). The extra channels
  are zero everywhere and the RMSNorm weights and epsilon are rescaled, so the logits are smollm2's.
  Its tokenizer gains MiniCPM-V's image tokens (`<image>`, `</image>`, `<slice>`, `</slice>`,
  `<image_id>`, `</image_id>`), whose embeddings are seeded near the mean embedding.
* Vision: no package installable here ships pretrained SigLIP weights, so the vision tower (4 layers,
  width 384) and resampler are seeded. Their output rows are scaled to the size of the LLM's own input
  embeddings: the LLM reads them as plausible (if meaningless) inputs, so what compression does to the
  LLM's response to image features is measurable, but nothing here measures visual understanding.

The benchmark VLM `minicpmv-qwen2.5` (MiniCPM-V 2.6 layout) is built from real parts where they exist:
* LLM: the pretrained `qwen2.5-0.5b` as it is (Qwen2, width 896 = 7 × 128: no widening), its tokenizer
  gaining the image tokens and `<unk>` (the slot placeholder) in rows the vocabulary pads anyway;
* vision tower: the trained DINOv2 ViT-S/14 mapped onto the navit/SigLIP tower (dinov2.py says what is
  exact and what is not: its patch features are within 0.95 mean cosine of DINOv2's own);
* resampler: seeded as above (no trained one exists for these features), `use_image_id: true` as 2.6.
What it measures: how compression changes the features of a trained tower and the response of a trained
LLM to image rows. What it cannot: visual understanding — the LLM has never seen these features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import atomic
from ..models import architectures, dinov2
from ..models.checkpoint import config_dict
from ..models.minicpmv import VisionConfig, VLMSettings, seeded_vision
from ..models.tensors import WEIGHTS_NAME
from ..state import load_checkpoint
from .smollm2 import (
    MINICPM_DIM_MODEL_BASE,
    MINICPM_SCALE_DEPTH,
    MINICPM_SCALE_EMB,
    minicpm_from_llama,
)

WIDTH = 640
IMAGE_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")
VISION = VisionConfig(hidden_size=384, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=6)
SEED = 20261127


def widen(model: torch.nn.Module, width: int) -> torch.nn.Module:
    """The same Llama/MiniCPM function at hidden size `width`, with width / head_dim attention heads.

    Channels are added as zeros; RMSNorm weights and epsilon are rescaled (the mean of squares now runs over
    `width` channels) and MiniCPM's logit divisor hidden_size / dim_model_base is compensated in the final
    norm. Key/value heads are repeated so every query head has its own (grouped-query attention written
    as multi-head), and the added heads are all zero: their attention output is zero.
    """
    c = model.config
    old, head_dim = c.hidden_size, architectures.head_dim(c)
    heads, kv_heads, new_heads = c.num_attention_heads, c.num_key_value_heads, width // head_dim
    if width % head_dim or new_heads < heads:
        raise ValueError(f"cannot widen {old} → {width} with {head_dim}-wide heads")
    settings = c.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "head_dim"):
        settings.pop(key, None)
    settings.update(hidden_size=width, num_attention_heads=new_heads, num_key_value_heads=new_heads,
                    rms_norm_eps=c.rms_norm_eps * old / width)
    out = type(model)(type(c)(**settings))
    norm_scale = math.sqrt(old / width)  # mean of squares over `width` channels is old/width of the old mean
    divisor = width / old if getattr(c, "dim_model_base", None) else 1.0
    kv_rows = torch.cat([torch.arange(h // (heads // kv_heads) * head_dim, (h // (heads // kv_heads) + 1) * head_dim)
                         for h in range(heads)])  # each query head's key/value rows
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            value = value[kv_rows]
        elif key.endswith("norm.weight"):
            value = value * norm_scale * (divisor if key == "model.norm.weight" else 1.0)
        new = torch.zeros_like(out.state_dict()[key])
        new[tuple(slice(0, n) for n in value.shape)] = value
        state[key] = new
    out.load_state_dict(state)
    return out.eval()


def build(out: Path, smollm2: Path) -> None:
    """`minicpmv-smollm2` from the prepared `smollm2-135m` checkpoint folder."""
    llama, tokenizer = load_checkpoint(smollm2)
    llm = widen(minicpm_from_llama(llama, MINICPM_SCALE_EMB, MINICPM_SCALE_DEPTH, MINICPM_DIM_MODEL_BASE), WIDTH)
    g = torch.Generator().manual_seed(SEED)
    embed = _add_image_tokens(llm, tokenizer, g)
    settings = VLMSettings(version="4.0", vision=VISION, use_image_id=False, llm_width=WIDTH)
    text_rms = (embed.float().pow(2).mean() * MINICPM_SCALE_EMB**2).sqrt().item()
    vision = seeded_vision(settings, SEED, text_rms * math.sqrt(WIDTH / 576))
    with torch.no_grad():
        vision.resampler.proj[:, 576:] = 0  # image rows live in the channels the LLM reads, like text
    _write(out, llm, tokenizer, settings, vision, skip=("lm_head.weight",))


def build_qwen(out: Path, qwen: Path) -> None:
    """`minicpmv-qwen2.5` from the prepared `qwen2.5-0.5b` folder: the pretrained Qwen2.5 LLM, the trained
    DINOv2 tower (mapped), a seeded resampler."""
    llm, tokenizer = load_checkpoint(qwen)
    g = torch.Generator().manual_seed(SEED)
    embed = _add_image_tokens(llm, tokenizer, g, unk="<unk>")
    settings = VLMSettings(version="2.6", vision=dinov2.CONFIG, use_image_id=True, llm_width=llm.config.hidden_size)
    vision = seeded_vision(settings, SEED, embed.float().pow(2).mean().sqrt().item())  # Qwen2 scales no embedding
    tower = dinov2.navit_tensors(dinov2.dinov2_tensors(dinov2.onnx_file()))
    vision.vpm.load_state_dict(tower)
    _write(out, llm, tokenizer, settings, vision)


def _add_image_tokens(llm: torch.nn.Module, tokenizer, g: torch.Generator, unk: str | None = None) -> torch.Tensor:
    """MiniCPM-V's image tokens (and an `<unk>` slot placeholder where the tokenizer has none) added to the
    tokenizer, their embedding rows seeded near the mean embedding; returns the trained rows."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS), **({"unk_token": unk} if unk else {})})
    trained = min(llm.model.embed_tokens.weight.shape[0], len(tokenizer) - len(IMAGE_TOKENS) - (1 if unk else 0))
    embed = llm.model.embed_tokens.weight.detach()[:trained].clone()
    if len(tokenizer) > llm.model.embed_tokens.weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = embed.mean(0) + embed.std(0) * torch.randn(len(tokenizer) - trained, embed.shape[1], generator=g)
    with torch.no_grad():
        llm.model.embed_tokens.weight[trained:len(tokenizer)] = rows
    return embed


def _write(out: Path, llm: torch.nn.Module, tokenizer, settings: VLMSettings, vision, skip: tuple[str, ...] = ()) -> None:

    config = config_dict(llm.config)
    v = settings.vision
    config.update(
        model_type="minicpmv", architectures=["MiniCPMV"], version=float(settings.version), query_num=settings.query_num,
        image_size=settings.scale_resolution, patch_size=v.patch_size, slice_mode=True,
        slice_config={"max_slice_nums": settings.max_slice_nums}, use_image_id=settings.use_image_id,
        vision_config={k: getattr(v, k) for k in VisionConfig.__dataclass_fields__} | {"model_type": "siglip"},
        dtype="float32",
    )
    tensors = {f"llm.{k}": t.detach().float().contiguous() for k, t in llm.state_dict().items() if k not in skip}
    tensors.update({k: t.detach().float().contiguous() for k, t in vision.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic.save_safetensors(dict(sorted(tensors.items())), out / WEIGHTS_NAME, metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
