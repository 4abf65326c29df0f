"""MiniCPM-V 2.6 / 4.0 / 4.5 (`model_type: minicpmv`): a SigLIP vision tower, a resampler and an LLM.

Real checkpoints ship this as remote code; here the vision half is part of the package (no code from
the checkpoint runs) and the LLM half is one of the decoders of `architectures.py`. Tensor names are the
checkpoint's own: `vpm.*` (the vision tower, Idefics2/navit-style SigLIP with 70 × 70 position buckets for
variable resolution), `resampler.*` (64 learned queries attending over the projected patch features, with
a 2-D sin-cos position embedding added to the keys; not stored), `llm.*` (the LLM's usual names).

The vision half maps one image piece (the overview or one slice, normalised, [3, h·14, w·14]) to
`query_num` rows of the LLM's width; those rows replace the embeddings of the image's placeholder tokens
at the LLM's first layer (after any embedding scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CompressError

# the LLM decoder of each MiniCPM-V version, and llama.cpp's `clip.minicpmv_version` for it
LLM_TYPES = {"2.6": "qwen2", "4.0": "minicpm", "4.5": "qwen3"}
LLAMA_CPP_VERSIONS = {"2.6": 3, "4.0": 5, "4.5": 6}
# top-level config keys that describe the vision half (everything else configures the LLM)
VISION_KEYS = ("vision_config", "query_num", "image_size", "patch_size", "slice_config", "slice_mode",
               "batch_vision_input", "drop_vision_last_layer", "use_image_id", "version", "image_feature_size",
               "vision_batch_size", "init_vision", "init_resampler", "init_audio", "init_tts", "stream_input")
VISION_PREFIXES = ("vpm.", "resampler.")
LLM_PREFIX = "llm."
RESAMPLER_HEAD_DIM = 128  # the resampler has width // 128 heads (llama.cpp's graph assumes it too)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    image_size: int = 980  # position buckets: (image_size / patch_size)² = 70 × 70
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def buckets(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VLMSettings:
    """What a MiniCPM-V config says about the vision half and the image layout."""

    version: str
    vision: VisionConfig
    query_num: int = 64
    scale_resolution: int = 448  # `image_size` at the top level: the side of a slice's target area
    patch_size: int = 14
    max_slice_nums: int = 9
    slice_mode: bool = True
    use_image_id: bool = True
    llm_width: int = 0

    @property
    def llm_type(self) -> str:
        return LLM_TYPES[self.version]

    @property
    def llama_cpp_version(self) -> int:
        return LLAMA_CPP_VERSIONS[self.version]


def is_minicpmv(raw: dict) -> bool:
    return raw.get("model_type") == "minicpmv"


def vlm_settings(raw: dict, source="config.json") -> VLMSettings:
    try:
        version = f"{float(raw.get('version', 2.6)):.1f}"
    except (TypeError, ValueError):
        raise CompressError(f"{source}: 'version' must be a number (2.6, 4.0 or 4.5)") from None
    if version not in LLM_TYPES:
        raise CompressError(f"{source}: MiniCPM-V version {version} is not supported (2.6, 4.0, 4.5)")
    vc = raw.get("vision_config") or {}
    if not isinstance(vc, dict):
        raise CompressError(f"{source}: 'vision_config' must be an object")
    known = VisionConfig.__dataclass_fields__
    try:
        vision = VisionConfig(**{k: type(known[k].default)(v) for k, v in vc.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CompressError(f"{source}: invalid vision_config ({e})") from None
    slices = raw.get("slice_config") or {}
    settings = VLMSettings(
        version=version, vision=vision, query_num=int(raw.get("query_num", 64)),
        scale_resolution=int(raw.get("image_size", 448)), patch_size=int(raw.get("patch_size", vision.patch_size)),
        max_slice_nums=int(slices.get("max_slice_nums", 9)), slice_mode=bool(raw.get("slice_mode", True)),
        use_image_id=bool(raw.get("use_image_id", True)), llm_width=int(raw.get("hidden_size", 0)),
    )
    if settings.llm_width % RESAMPLER_HEAD_DIM:
        raise CompressError(f"{source}: hidden_size {settings.llm_width} is not a multiple of {RESAMPLER_HEAD_DIM} "
                            "(the resampler's attention heads are 128 wide)")
    return settings


def llm_config_dict(raw: dict) -> dict:
    """The LLM's config.json settings inside a MiniCPM-V config (model_type set from `version`)."""
    settings = {k: v for k, v in raw.items() if k not in VISION_KEYS and k not in ("auto_map", "architectures")}
    settings["model_type"] = vlm_settings(raw).llm_type
    return settings


# -- the vision tower (`vpm.*`) -------------------------------------------------------------------------
def patch_positions(h: int, w: int, buckets: int = 70) -> torch.Tensor:
    """navit's bucketed positions of an h × w patch grid on the buckets × buckets table (as the reference
    computes them: float fractions bucketized against float boundaries)."""
    boundaries = torch.arange(1 / buckets, 1.0, 1 / buckets)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
    return (rows[:, None] * buckets + cols).flatten()


class _Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.buckets**2, c.hidden_size)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.patch_embedding(pixels.unsqueeze(0)).flatten(2).transpose(1, 2)  # [1, h·w, hidden]
        if positions is None:
            h, w = pixels.shape[1] // self.c.patch_size, pixels.shape[2] // self.c.patch_size
            positions = patch_positions(h, w, self.c.buckets).to(pixels.device)
        return patches + self.position_embedding(positions)


class _Attention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(c.hidden_size, c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate="tanh"))


class _EncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = _Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(pixels, positions)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# -- the resampler (`resampler.*`) ----------------------------------------------------------------------
def sincos_2d(width: int, h: int, w: int) -> torch.Tensor:
    """[h·w, width] MiniCPM-V's key position embedding: the column's 1-D sin-cos in the first half, the row's
    in the second; each half is sin then cos with frequencies 1 / 10000^(i / (width/4)) (float64 → float32)."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def one(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one(cols), one(rows)], axis=1)).float()


class Resampler(nn.Module):
    def __init__(self, query_num: int, width: int, kv_width: int, eps: float = 1e-6):
        super().__init__()
        self.width = width
        self.query = nn.Parameter(torch.zeros(query_num, width))
        self.kv_proj = nn.Linear(kv_width, width, bias=False)
        self.attn = nn.MultiheadAttention(width, width // RESAMPLER_HEAD_DIM)
        self.ln_q = nn.LayerNorm(width, eps=eps)
        self.ln_kv = nn.LayerNorm(width, eps=eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, width))

    def forward(self, x: torch.Tensor, h: int, w: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        """[1, h·w, kv_width] patch features → [query_num, width] (`pos`: the keys' position embedding)."""
        x = self.ln_kv(self.kv_proj(x)).transpose(0, 1)  # [h·w, 1, width]
        pos = (sincos_2d(self.width, h, w) if pos is None else pos).to(x.device, x.dtype).unsqueeze(1)
        q = self.ln_q(self.query).unsqueeze(1)
        out = self.attn(q, x + pos, x, need_weights=False)[0].transpose(0, 1)
        return (self.ln_post(out) @ self.proj)[0]


class VisionModel(nn.Module):
    """`vpm` + `resampler`: one normalised image piece → `query_num` LLM-width rows."""

    def __init__(self, settings: VLMSettings):
        super().__init__()
        self.settings = settings
        self.vpm = VisionTower(settings.vision)
        self.resampler = Resampler(settings.query_num, settings.llm_width, settings.vision.hidden_size,
                                   settings.vision.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.settings.vision.patch_size
        if pixels.shape[1] % p or pixels.shape[2] % p:
            raise ValueError(f"image piece {tuple(pixels.shape)} is not a whole number of {p}-pixel patches")
        return self.resampler(self.vpm(pixels), pixels.shape[1] // p, pixels.shape[2] // p)


def vision_skeleton(settings: VLMSettings) -> VisionModel:
    with torch.device("meta"):
        return VisionModel(settings).eval()


def seeded_vision(settings: VLMSettings, seed: int, output_rms: float) -> VisionModel:
    """A vision half with seeded weights (no pretrained weights are available offline); its output rows are
    scaled to `output_rms` per element, the size of the LLM's own input embeddings."""
    g = torch.Generator().manual_seed(seed)
    model = VisionModel(settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        model.vpm.embeddings.position_embedding.weight.mul_(0.1)
        model.resampler.query.copy_(torch.randn(model.resampler.query.shape, generator=g))
        model.resampler.proj.mul_(output_rms)  # ln_post gives unit variance; x @ proj keeps about |proj| per column
    return model.eval()


class VisionPart:
    """The vision half of a MiniCPM-V state: settings and tensors (read when first needed), run in float32."""

    def __init__(self, settings: VLMSettings, raw_config: dict, tensors):
        self.settings = settings
        self.raw_config = raw_config  # the checkpoint's config.json (output folders write it back)
        self.tensors = tensors
        self._model: VisionModel | None = None

    def check(self, source) -> None:
        expected = {n: tuple(p.shape) for n, p in vision_skeleton(self.settings).state_dict().items()}
        for name in self.tensors.names():
            if name not in expected:
                raise CompressError(f"{source}: unexpected tensor '{name}' for MiniCPM-V {self.settings.version}")
            if tuple(self.tensors.shape(name)) != expected[name]:
                raise CompressError(f"{source}: tensor '{name}' has shape {tuple(self.tensors.shape(name))}, "
                                    f"config expects {expected[name]}")
        missing = [n for n in expected if n not in set(self.tensors.names())]
        if missing:
            raise CompressError(f"{source}: missing tensor '{missing[0]}'"
                                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))

    def names(self) -> list[str]:
        return self.tensors.names()

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors.get(name).to(torch.float32)

    def parameter_count(self) -> int:
        return sum(torch.Size(self.tensors.shape(n)).numel() for n in self.names())

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(repr(self.settings).encode())
        for name in self.names():
            h.update(name.encode())
            h.update(self.tensor(name).contiguous().numpy().tobytes())
        return h.hexdigest()

    def model(self) -> VisionModel:
        """The vision half as a float32 module (it is ~1/20 of a MiniCPM-V model: materialised whole, once)."""
        if self._model is None:
            model = VisionModel(self.settings)
            model.load_state_dict({n: self.tensor(n) for n in self.names()})
            self._model = model.eval()
        return self._model

    def features(self, prompts):
        """`prompts` with each row's image features ([slots, width], overview then slices) attached."""
        from ..progress import progress

        model = self.model()
        done: dict[int, torch.Tensor] = {}
        rows = []
        with torch.inference_mode():
            for image in progress(prompts.images, desc="vision", unit="image"):
                if id(image) not in done:
                    done[id(image)] = torch.cat([model(p) for p in image.pieces])
                rows.append(done[id(image)])
        return prompts.with_features(rows)
