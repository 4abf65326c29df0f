"""The quantized-weight type, its scheme, the one quantizer that fills it, and its file format.

A `QuantizedWeight` holds integer codes for one linear's weight [out, in] plus, per output row and
group of `group_size` input columns, a scale and (asymmetric schemes) a zero point:

  symmetric              w = scale * code                     code in [-2^(b-1), 2^(b-1) - 1]  (int8)
                         (4 and 5 bits: the scale is signed, the group's largest |w| takes code -2^(b-1))
  asymmetric, int zero   w = scale * (code - zero)            code, zero in [0, 2^b - 1]        (uint8)
  asymmetric, float zero w = scale * code + zero              code in [0, 2^b - 1]; zero = the group's offset

Scales (and float zeros) are exactly representable in float16, so formats that store them in float16
(GGUF, AWQ, ONNX MatMulNBits, Core ML) carry them without rounding; with `scale_dtype: bfloat16` they are
exact in bfloat16 (hence in float16 too) and never negative, as ExecuTorch's XNNPACK int4 kernels need.
If `in` is not a multiple of the group size the last group is narrower.

K-quant grids (`super_block: 256`, GGUF Q2_K / Q3_K / Q4_K / Q5_K / Q6_K) quantize the scales themselves: within each
super-block of 256 columns, every group's scale is d · sc with one float16 d and an integer sc of
`scale_bits` bits (and every float offset is −dmin · m likewise), so scales are exact float32 products,
not float16 values. The largest sc (and m) of a super-block is always the top of its range, which makes
d = max(scale) / top exactly. A weight holds (and its file stores) them as the GGUF block does: d and the
integers (`KFactors`), not the float32 products. A weight whose width is
not a multiple of 256 takes a fallback type instead, as llama.cpp does (K_FALLBACK: Q4_K → Q5_0, Q5_K → Q5_1,
Q6_K → Q8_0, Q2_K / Q3_K → IQ4_NL).
Schemes can be named by the GGUF type whose layout they are: `layout: Q4_K` (see GGUF_GRIDS).

A codebook scheme (`codebook: iq4_nl`, GGUF IQ4_NL) keeps symmetric 4-bit codes −8 … 7 and one float16 scale
per group, but code c stands for scale · IQ4_NL_VALUES[c + 8], a non-linear grid denser near zero (llama.cpp's
table); its scale is searched per group, as llama.cpp's quantizer does, for the least squared error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError, safe_open

from .. import atomic
from ..errors import CompressError, SettingError

MIN_SCALE = 1e-5
FILE_FORMAT = "minicpm-compress-qweights/3"  # /2: 4-bit codes packed two per byte; /3: K-grid scales as integers
OLDER_FORMAT = "minicpm-compress-qweights/2"  # still read when it holds no K-grid weight


# GGUF types whose blocks hold our codes and scales exactly: the scheme each one is
GGUF_GRIDS: dict[str, dict] = {
    "Q8_0": dict(bits=8, group_size=32, symmetric=True),
    "Q4_0": dict(bits=4, group_size=32, symmetric=True),
    "IQ4_NL": dict(bits=4, group_size=32, symmetric=True, codebook="iq4_nl"),
    "Q4_1": dict(bits=4, group_size=32, symmetric=False, zero_point="float"),
    "Q5_0": dict(bits=5, group_size=32, symmetric=True),
    "Q5_1": dict(bits=5, group_size=32, symmetric=False, zero_point="float"),
    "Q4_K": dict(bits=4, group_size=32, symmetric=False, zero_point="float", super_block=256, scale_bits=6),
    "Q5_K": dict(bits=5, group_size=32, symmetric=False, zero_point="float", super_block=256, scale_bits=6),
    "Q6_K": dict(bits=6, group_size=16, symmetric=True, super_block=256, scale_bits=8),
    "Q3_K": dict(bits=3, group_size=16, symmetric=True, super_block=256, scale_bits=6),
    "Q2_K": dict(bits=2, group_size=16, symmetric=False, zero_point="float", super_block=256, scale_bits=4),
}
# the type a weight takes when its rows do not split into 256-wide super-blocks: llama.cpp's own fallback
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "IQ4_NL", "Q2_K": "IQ4_NL"}

# IQ4_NL's 16 levels (ggml's kvalues_iq4nl), in units of the group's scale: code c stands for scale · value[c + 8]
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class QuantScheme(BaseModel):
    """How a weight is quantized (the settings every quantizing stage shares)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 5, 6, 8] = Field(4, description="2 and 3 bits: K-quant grids only (layout Q2_K / Q3_K)")
    group_size: int | None = Field(128, description="input columns per scale; null = one scale per output channel")
    symmetric: bool = False
    zero_point: Literal["int", "float"] = Field(
        "int", description="asymmetric only: integer zero points (ONNX, Core ML, AWQ) or float offsets (GGUF Q4_1)"
    )
    super_block: Literal[256] | None = Field(
        None, description="K-quant grid: group scales (and offsets) quantized per super-block of 256 columns")
    scale_bits: Literal[4, 6, 8] | None = Field(None, description="K-quant grid: bits of each group's scale integer")
    codebook: Literal["iq4_nl"] | None = Field(
        None, description="symmetric int4 codes standing for a non-linear table of levels (GGUF IQ4_NL)")
    scale_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="scales exact in float16 (GGUF, ONNX, Core ML, AWQ), or in bfloat16 and never "
        "negative (ExecuTorch's XNNPACK int4 kernels; such scales are float16-exact too, so every format carries them)")

    @model_validator(mode="before")
    @classmethod
    def _named_layout(cls, data):
        """`layout: Q4_K` stands for the settings of that GGUF type (explicit settings must agree with it)."""
        if not isinstance(data, dict) or data.get("layout") is None:
            if isinstance(data, dict):
                data = {k: v for k, v in data.items() if k != "layout"}
            return data
        data = dict(data)
        name = data.pop("layout")
        if name not in GGUF_GRIDS:
            raise ValueError(f"layout '{name}' is not one of {', '.join(GGUF_GRIDS)}")
        for key, value in GGUF_GRIDS[name].items():
            if key in data and data[key] != value:
                raise ValueError(f"layout {name} has {key} {value!r}, not {data[key]!r}")
        return {**data, **GGUF_GRIDS[name]}

    @model_validator(mode="after")
    def _check(self):
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ValueError("group_size must be a multiple of 8 (e.g. 32, 64, 128) or null for per-channel")
        if (self.super_block is None) != (self.scale_bits is None):
            raise ValueError("super_block and scale_bits go together (a K-quant grid; e.g. layout: Q4_K)")
        if self.super_block is not None and self.layout is None:
            raise ValueError(f"a K-quant grid must be one of {', '.join(K_FALLBACK)} (use layout: NAME)")
        if self.bits < 4 and self.super_block is None:
            raise SettingError("bits", f"{self.bits}-bit codes exist on a K-quant grid only (layout: Q{self.bits}_K)")
        if self.codebook is not None and (self.bits != 4 or not self.symmetric or self.super_block is not None):
            raise ValueError("codebook iq4_nl takes symmetric 4-bit codes without super-blocks (e.g. layout: IQ4_NL)")
        if self.scale_dtype == "bfloat16" and (self.super_block is not None or self.codebook is not None):
            raise ValueError("scale_dtype bfloat16 is for plain integer grids (not K-quant grids or codebooks)")
        return self

    @property
    def layout(self) -> str | None:
        """The GGUF type whose blocks hold this scheme exactly, if any (bfloat16 scales are float16-exact)."""
        fields = {k: getattr(self, k) for k in QuantScheme.model_fields if k != "scale_dtype"}
        for name, spec in GGUF_GRIDS.items():
            full = QuantScheme.model_construct(**spec)
            if all(getattr(full, k) == v for k, v in fields.items()):
                return name
        return None

    def scheme(self) -> "QuantScheme":
        """Just the scheme, without the fields a subclass (a stage config) adds."""
        return QuantScheme(**{k: getattr(self, k) for k in QuantScheme.model_fields})

    def fitting(self, cols: int) -> "QuantScheme":
        """The scheme a weight of `cols` input columns takes: a K-quant grid falls back (as llama.cpp does)
        when the row does not split into super-blocks."""
        scheme = self.scheme()
        if scheme.super_block and cols % scheme.super_block:
            return QuantScheme(**GGUF_GRIDS[K_FALLBACK[scheme.layout]])
        return scheme

    def describe(self) -> str:
        if self.codebook:
            group = f"g{self.group_size}" if self.group_size else "per-channel"
            return f"{self.layout or 'iq4_nl codebook'} (int4 {group}, non-linear levels)"
        if self.super_block:
            return f"{self.layout} (int{self.bits} g{self.group_size}, {self.scale_bits}-bit scales per 256)"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        kind = "sym" if self.symmetric else ("asym" if self.zero_point == "int" else "asym-float-zero")
        scales = ", bfloat16 scales" if self.scale_dtype == "bfloat16" else ""
        return f"int{self.bits} {group} {kind}{scales}"

    def bits_per_weight(self, cols: int) -> float:
        """Stored bits per weight of a row of `cols` columns: codes, scales and zero points (float16 scales
        and offsets; a K-quant grid's integer scales plus its float16 factors per super-block)."""
        scheme = self.fitting(cols)
        group = scheme.group_size or cols
        groups = math.ceil(cols / group)
        if scheme.super_block:
            per_group = scheme.scale_bits * (1 if scheme.symmetric else 2)
            per_super = 16 * (1 if scheme.symmetric else 2)
            return scheme.bits + (groups * per_group + cols // scheme.super_block * per_super) / cols
        zero = 0 if scheme.symmetric else (scheme.bits if scheme.zero_point == "int" else 16)
        return scheme.bits + groups * (16 + zero) / cols


class KFactors(NamedTuple):
    """Values on a K-quant grid as the file holds them: per super-block a float16 factor `d` [out, n_super]
    and per group an integer [out, n_groups] (uint8), the value being d · int. Scales are held so (and float
    offsets as −d · int): 0.6 bits per weight beyond the codes, against 2 as float32 products."""

    d: torch.Tensor
    ints: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, scheme: QuantScheme) -> "KFactors":
        """Grid values [out, n_groups] (≥ 0; the largest integer of a super-block is the top of its range, so
        d = max / top exactly) → their factors. Values off the grid are refused, not rounded."""
        rows, per_super = values.shape[0], scheme.super_block // scheme.group_size
        v = values.to(torch.float32).reshape(rows, -1, per_super)
        d = v.amax(dim=2, keepdim=True) / k_top(scheme)
        ints = torch.where(d > 0, torch.round(v / torch.where(d > 0, d, 1.0)), 0.0)
        factors = cls(d.reshape(rows, -1).to(torch.float16), ints.reshape(rows, -1).to(torch.uint8))
        if not torch.equal(factors.values(scheme), values.to(torch.float32)):
            raise ValueError(f"scales are not on the {scheme.layout} grid (d · integer per super-block)")
        return factors

    def values(self, scheme: QuantScheme) -> torch.Tensor:
        """d · int as float32 [out, n_groups] (exact: an 11-bit factor times an integer of ≤ 8 bits)."""
        per_super = scheme.super_block // scheme.group_size
        return self.d.to(torch.float32).repeat_interleave(per_super, dim=1) * self.ints.to(torch.float32)

    def apply(self, fn) -> "KFactors":
        return KFactors(fn(self.d), fn(self.ints))


class QuantizedWeight:
    """One linear's quantized weight. Codes are held packed at their bit width (two int4 codes per byte,
    low nibble first, each row padded to whole bytes); `codes` unpacks them on demand. Scales are held as
    float16 (exact by construction), a K-quant grid's scales and offsets as their `KFactors`."""

    __slots__ = ("packed", "cols", "_scales", "_zeros", "scheme")

    def __init__(self, codes: torch.Tensor | None, scales: torch.Tensor | KFactors, zeros: torch.Tensor | KFactors | None,
                 scheme: QuantScheme, *, packed: torch.Tensor | None = None, cols: int | None = None):
        if packed is None:
            packed, cols = pack_codes(codes, scheme), codes.shape[1]
        self.packed = packed  # uint8 [out, ceil(cols · bits / 8)]; the int8/uint8 codes themselves for 8 bits
        self.cols = int(cols)
        self.scheme = scheme
        if scheme.super_block:
            self._scales = scales if isinstance(scales, KFactors) else KFactors.of(scales, scheme)
            self._zeros = zeros if zeros is None or isinstance(zeros, KFactors) else KFactors.of(-zeros, scheme)
        else:
            self._scales = scales.to(torch.float16)
            self._zeros = zeros  # [out, n_groups]: uint8 (int zero points) or float32 offsets; None if symmetric

    @property
    def scales(self) -> torch.Tensor:
        """[out, n_groups] float32 (float16-exact, or d · int on a K-quant grid)."""
        if self.scheme.super_block:
            return self._scales.values(self.scheme)
        return self._scales.to(torch.float32)

    @property
    def stored_scales(self) -> torch.Tensor:
        """The float16 scales as held (what a file stores; no copy), for a grid without super-blocks."""
        if self.scheme.super_block:
            raise ValueError(f"{self.scheme.describe()} holds its scales as K-grid factors (k_factors)")
        return self._scales

    @property
    def zeros(self) -> torch.Tensor | None:
        """[out, n_groups]: uint8 zero points or float32 offsets; None if symmetric."""
        if self.scheme.super_block and self._zeros is not None:
            return -self._zeros.values(self.scheme)
        return self._zeros

    @property
    def k_factors(self) -> tuple[KFactors, KFactors | None]:
        """A K-quant grid's scales and (negated) offsets as the file holds them."""
        if not self.scheme.super_block:
            raise ValueError(f"{self.scheme.describe()} is not a K-quant grid")
        return self._scales, self._zeros

    @property
    def codes(self) -> torch.Tensor:
        """[out, in] integer codes: int8 for symmetric schemes, uint8 otherwise."""
        return unpack_codes(self.packed, self.cols, self.scheme)

    @property
    def group_size(self) -> int:
        return self.scheme.group_size or self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.cols)

    def _with(self, scales_fn, zeros_fn, packed: torch.Tensor) -> "QuantizedWeight":
        zeros = None if self._zeros is None else zeros_fn(self._zeros)
        return QuantizedWeight(None, scales_fn(self._scales), zeros, self.scheme, packed=packed, cols=self.cols)

    def to(self, device) -> "QuantizedWeight":
        move = (lambda f: f.apply(lambda t: t.to(device))) if self.scheme.super_block else (lambda t: t.to(device))
        return self._with(move, move, self.packed.to(device))

    def scaled(self, factor: float) -> "QuantizedWeight":
        """The same codes standing for the weight × `factor` (a power of two keeps the scales exact)."""
        if self.scheme.super_block:
            def times(f: KFactors) -> KFactors:
                d = f.d.to(torch.float32) * factor
                if not torch.equal(d.to(torch.float16).to(torch.float32), d):
                    raise ValueError(f"× {factor} takes {self.scheme.layout} factors out of float16")
                return KFactors(d.to(torch.float16), f.ints)
            return self._with(times, times, self.packed)
        zeros = (lambda z: z * factor) if self.scheme.zero_point == "float" else (lambda z: z)
        return self._with(lambda s: s * factor, zeros, self.packed)

    def rows(self, index: torch.Tensor | slice) -> "QuantizedWeight":
        """The same weight with its output rows reordered or selected by `index` (a slice shares storage)."""
        pick = (lambda f: f.apply(lambda t: t[index])) if self.scheme.super_block else (lambda t: t[index])
        return self._with(pick, pick, self.packed[index])

    def dequantize(self) -> torch.Tensor:
        return grouped_values(self.codes.to(torch.float32), self.scales, self.zeros, self.scheme)


def pack_codes(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes [out, in] → their storage: 8-bit codes as they are; narrower codes bit-packed along each row,
    least significant bit first (for 4 bits: two per byte, the first in the low nibble), rows padded to
    whole bytes. Symmetric codes are stored in two's complement."""
    if scheme.bits == 8:
        return codes.contiguous()
    if scheme.bits == 4:  # the same layout as below, the fast way
        nib = codes.to(torch.uint8) & 0x0F
        if nib.shape[1] % 2:
            nib = torch.cat([nib, torch.zeros_like(nib[:, :1])], dim=1)
        return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    bits = scheme.bits
    values = codes.to(torch.int16) & (2**bits - 1)
    planes = (values.unsqueeze(2) >> torch.arange(bits, dtype=torch.int16, device=values.device)) & 1  # [out, in, bits]
    stream = planes.reshape(values.shape[0], -1).to(torch.uint8)
    pad = -stream.shape[1] % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(stream.shape[0], pad)], dim=1)
    weights = (1 << torch.arange(8, dtype=torch.int16, device=stream.device)).to(torch.uint8)
    return (stream.reshape(stream.shape[0], -1, 8) * weights).sum(dim=2, dtype=torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, cols: int, scheme: QuantScheme) -> torch.Tensor:
    if scheme.bits == 8:
        return packed
    if scheme.bits == 4:
        if scheme.symmetric:  # sign-extended by arithmetic shifts of the bytes read as int8
            low, high = (packed << 4).view(torch.int8) >> 4, packed.view(torch.int8) >> 4
        else:
            low, high = packed & 0x0F, packed >> 4
        return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :cols].contiguous()
    bits = scheme.bits
    stream = (packed.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # [out, bytes, 8]
    planes = stream.reshape(packed.shape[0], -1)[:, : cols * bits].reshape(packed.shape[0], cols, bits)
    values = (planes.to(torch.int16) << torch.arange(bits, dtype=torch.int16, device=planes.device)).sum(dim=2)
    if scheme.symmetric:
        half = 2 ** (bits - 1)
        return ((values ^ half) - half).to(torch.int8)  # sign-extend
    return values.to(torch.uint8).contiguous()


def per_column(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Per-group values [out, n_groups] expanded to one value per weight column [out, cols], as float32."""
    return t.to(torch.float32).repeat_interleave(group, dim=1)[:, :cols]


def group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, n_groups, group] view of w, the last group padded by repeating its last column."""
    out, cols = w.shape
    pad = -cols % group
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, group)


def float16_exact(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest float16 values, held as float32."""
    return t.to(torch.float16).to(torch.float32)


def exact_scales(t: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Scales rounded to the nearest values of the scheme's scale dtype (float16 or bfloat16), held as float32."""
    return t.to(getattr(torch, scheme.scale_dtype)).to(torch.float32)


def signed_floor(scales: torch.Tensor) -> torch.Tensor:
    """Signed scales (the full symmetric grid, a codebook) with their magnitude raised to at least MIN_SCALE."""
    return torch.where(scales.abs() < MIN_SCALE, torch.where(scales < 0, -MIN_SCALE, MIN_SCALE), scales)


def quantize(weight: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of `weight` [out, in] under `scheme`.

    `clip` ([out, n_groups] or broadcastable, values in (0, 1]) shrinks each group's range before the
    scale is chosen; activation-aware methods search it. This is the project's only quantizer: it
    chooses scales (and zero points) from each group's range (`group_params`), then `encode` rounds.
    """
    w = weight.detach().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    scheme = scheme.fitting(w.shape[1])
    return encode(w, *group_params(w, scheme, clip), scheme)


def quantize_rows(weight: torch.Tensor, scheme: QuantScheme, rows_per_chunk: int = 8192,
                  clip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> QuantizedWeight:
    """`quantize` a large matrix (a 73k-row token table) `rows_per_chunk` output rows at a time, from any
    float dtype: the float32 copies quantizing makes are one slice's, not the whole matrix's. Rows are
    quantized independently, so the result is `quantize`'s. `clip(rows)` gives a slice's clip."""
    if scheme.super_block:
        raise ValueError(f"{scheme.describe()}: K-quant blocks are not quantized in row slices")
    parts = []
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start : start + rows_per_chunk].float()
        parts.append(quantize(rows, scheme, clip=clip(rows) if clip else None))
    zeros = None if parts[0].zeros is None else torch.cat([q.zeros for q in parts])
    return QuantizedWeight(None, torch.cat([q.scales for q in parts]), zeros, parts[0].scheme,
                           packed=torch.cat([q.packed for q in parts]), cols=weight.shape[1])


def group_params(weight: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (output row, group): the scale [out, n_groups] and zero point (uint8, or a float offset; None if
    symmetric) that map the group's range, shrunk by `clip`, onto the code range. Scales and offsets are
    float16-exact, or on the scheme's K-quant grid (`k_grid`)."""
    w = weight.detach().to(torch.float32)
    scheme = scheme.fitting(w.shape[1])
    g = group_view(w, scheme.group_size or w.shape[1])
    shrink = 1.0 if clip is None else clip.reshape(clip.shape[0], -1, 1) if clip.dim() == 2 else clip
    return range_params(group_range(g, scheme), scheme, shrink)


class GroupRange(NamedTuple):
    """What `group_params` reads from each group of a `group_view` [out, n_groups, group] before a clip shrinks
    it, each [out, n_groups, 1]: the largest (`high`) and smallest (`low`) weight for asymmetric grids; for
    symmetric ones `high` alone: |w|'s peak, the signed peak (full grid), the reach of the non-negative bfloat16
    full grid, or a codebook's searched scale. A clip search computes it once and tries every ratio on it."""

    high: torch.Tensor
    low: torch.Tensor | None = None

    def repeat(self, times: int) -> "GroupRange":
        """The range of the same groups stacked `times` over along the rows."""
        return GroupRange(*(None if t is None else t.repeat(times, 1, 1) for t in self))


def group_range(g: torch.Tensor, scheme: QuantScheme) -> GroupRange:
    """The range of each group of `g` [out, n_groups, group] (a `group_view`) as `range_params` maps it."""
    if scheme.codebook:
        return GroupRange(codebook_scales(g))
    if scheme.symmetric and full_grid(scheme) and scheme.scale_dtype == "bfloat16":
        top = 2 ** (scheme.bits - 1)
        return GroupRange(torch.maximum(-g.amin(dim=2, keepdim=True) / top, g.amax(dim=2, keepdim=True) / (top - 1)))
    if scheme.symmetric and full_grid(scheme):
        return GroupRange(g.gather(2, g.abs().argmax(dim=2, keepdim=True)))
    if scheme.symmetric:
        return GroupRange(g.abs().amax(dim=2, keepdim=True))
    return GroupRange(g.amax(dim=2, keepdim=True), g.amin(dim=2, keepdim=True))


def range_params(r: GroupRange, scheme: QuantScheme, shrink: torch.Tensor | float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`group_params` from the groups' `group_range`, shrunk by `shrink` (broadcast over [out, n_groups, 1])."""
    if scheme.codebook:
        scales, zeros = float16_exact(signed_floor(r.high * shrink)), None
    elif scheme.symmetric and full_grid(scheme) and scheme.scale_dtype == "bfloat16":
        # non-negative scales: code −2^(b−1) reaches a negative peak, 2^(b−1) − 1 a positive one
        scales, zeros = exact_scales((r.high * shrink).clamp(min=MIN_SCALE), scheme), None
    elif scheme.symmetric and full_grid(scheme):
        # the group's largest-magnitude weight, with its sign, takes the code −2^(b−1): all 2^b codes in use
        top = 2 ** (scheme.bits - 1)
        scales, zeros = float16_exact(signed_floor(r.high * shrink / -top)), None
    elif scheme.symmetric:
        qmax = 2 ** (scheme.bits - 1) - 1
        scales = exact_scales((r.high * shrink).clamp(min=MIN_SCALE * qmax) / qmax, scheme)
        zeros = None
    else:
        qmax = 2**scheme.bits - 1
        hi, lo = r.high * shrink, r.low * shrink
        if scheme.super_block:
            lo = lo.clamp(max=0)  # K-quant offsets are −dmin · m with m ≥ 0
        scales = exact_scales(((hi - lo) / qmax).clamp(min=MIN_SCALE), scheme)
        if scheme.zero_point == "int":
            zeros = torch.clamp(torch.round(-lo / scales), 0, qmax).squeeze(2).to(torch.uint8)
        else:
            zeros = float16_exact(lo).squeeze(2)
    scales = scales.squeeze(2).contiguous()
    if scheme.super_block:
        return k_grid(scales, zeros, scheme)
    return scales, zeros


def codebook_levels(device=None) -> torch.Tensor:
    """IQ4_NL's levels as float32 [16]."""
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


_BINS_FROM, _BINS_TO = -130.0, 116.0  # half-unit bins covering the levels; beyond them, the end levels


def _level_bins(device) -> torch.Tensor:
    """The nearest level's index for every half-unit bin [from + k/2, from + (k + 1)/2): the midpoints between
    levels are multiples of 1/2, so no bin straddles one (a value on a midpoint goes to the upper level, as
    ggml's best_index_int8 does)."""
    levels = codebook_levels(device)
    edges = torch.arange(_BINS_FROM, _BINS_TO, 0.5, device=device)
    return torch.bucketize(edges, (levels[:-1] + levels[1:]) / 2, right=True)


def _nearest_level(x: torch.Tensor) -> torch.Tensor:
    """Index 0…15 of the level nearest to each x (in units of the scale; values beyond the ends go to the ends)."""
    bins = ((x.clamp(_BINS_FROM, _BINS_TO - 0.5) - _BINS_FROM) * 2).floor_().long()
    return torch.take(_level_bins(x.device), bins)


def codebook_scales(g: torch.Tensor, tries: int = 7, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per group of `g` [out, n_groups, group]: the scale of a codebook grid with the least squared error
    weighted by x² (llama.cpp's IQ4_NL search without an importance matrix), or by `importance` (broadcast
    to g: each input channel's weight in the output error) when given: the group's signed peak is
    placed near each end of the table (2·tries + 2 placements), each placement's codes are fixed and the
    least-squares scale for them is computed; the placement whose least-squares fit explains the most wins.
    → [out, n_groups, 1]; 0 for an all-zero group."""
    levels = codebook_levels(g.device)
    importance = g * g if importance is None else importance.expand_as(g)
    weighted = importance * g
    peak = g.gather(2, g.abs().argmax(dim=2, keepdim=True))
    peak = torch.where(peak == 0, 1.0, peak)
    best_d = torch.zeros_like(peak)
    best_fit = torch.full_like(peak, -1.0)
    top = float(-IQ4_NL_VALUES[0])
    for inverse in [top / peak] + [(t - top) / peak for t in range(-tries, tries + 1)]:
        q = torch.take(levels, _nearest_level(g * inverse))
        qx, q2 = (weighted * q).sum(2, keepdim=True), (importance * q * q).sum(2, keepdim=True)
        d = qx / torch.where(q2 > 0, q2, 1.0)
        fit = qx * d  # the squared error removed: Σwx² − Σw(x − dq)² = (Σwqx)² / Σwq²
        better = (q2 > 0) & (fit > best_fit)
        best_d, best_fit = torch.where(better, d, best_d), torch.where(better, fit, best_fit)
    return best_d


def full_grid(scheme: QuantScheme) -> bool:
    """Whether a symmetric scheme uses every code −2^(b−1) … 2^(b−1) − 1: its scale is the group's
    largest-magnitude weight, sign included, over −2^(b−1) (llama.cpp's Q4_0 / Q5_0 and onnxruntime-genai's
    int4 do the same), so a scale may be negative. int8 keeps max|w| / 127 (llama.cpp's Q8_0: its files'
    codes are reproduced exactly) and K-quant grids keep non-negative scales on their integer grid."""
    return scheme.symmetric and scheme.super_block is None and scheme.bits < 8 and scheme.codebook is None


def k_grid(scales: torch.Tensor, zeros: torch.Tensor | None, scheme: QuantScheme, rounding=torch.round
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [out, n_groups] (≥ 0) and float offsets (≤ 0) moved onto the scheme's K-quant grid: per
    super-block, d · sc with d float16 and sc an integer in [0, top], the largest sc equal to top (so d is
    max / top, exactly). Idempotent: scales already on the grid come back unchanged."""
    top = k_top(scheme)
    per_super = scheme.super_block // scheme.group_size

    def snap(v: torch.Tensor) -> torch.Tensor:
        rows = v.shape[0]
        v = v.reshape(rows, -1, per_super)
        peak = v.amax(dim=2, keepdim=True)
        d = float16_exact(peak / top)
        ints = torch.clamp(rounding(v / torch.where(d > 0, d, 1.0)), 0, top)
        ints = torch.where(v == peak, float(top), ints)
        return (d * torch.where(d > 0, ints, 0.0)).reshape(rows, -1)

    return snap(scales), (None if zeros is None else -snap(-zeros))


def k_top(scheme: QuantScheme) -> int:
    """The largest scale integer of a K-quant grid: Q6_K's are int8 and Q3_K's 6-bit signed (we use their
    non-negative half), Q4_K / Q5_K's 6-bit and Q2_K's 4-bit unsigned."""
    return 2 ** (scheme.scale_bits - (1 if scheme.symmetric else 0)) - 1


def code_range(scheme: QuantScheme) -> tuple[int, int]:
    """The smallest and largest integer code of `scheme`."""
    if scheme.symmetric:
        return -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    return 0, 2**scheme.bits - 1


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  scheme: QuantScheme) -> torch.Tensor:
    """Quantize-dequantize `weight` [out, in] with given per-group scales and zero points, differentiably.

    Rounding passes gradients straight through; clamped values pass none to the weight and their
    code to the scale (LSQ). The result equals `encode(weight, scales, zeros, scheme).dequantize()`
    bit for bit: both evaluate the same float32 expression.
    """
    scheme = scheme.fitting(weight.shape[1])
    if scheme.super_block:
        scales, zeros = k_grid(scales, zeros, scheme, _RoundSTE.apply)
    out, cols = weight.shape
    g = group_view(weight, scheme.group_size or cols)  # each group's parameters broadcast over its columns
    s, z = _per_group(scales, zeros)
    if scheme.codebook:  # the level times the scale (its gradient to the scale), the weight's passed straight through
        values = code_values(round_codes(g.detach(), s.detach(), z, scheme), s, z, scheme) + (g - g.detach())
    else:
        values = code_values(round_codes(g, s, z, scheme, _RoundSTE.apply), s, z, scheme)
    return values.reshape(out, -1)[:, :cols]


def round_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme,
                rounding=torch.round) -> torch.Tensor:
    """Codes (as float32) of weights `w` under scales `s` and zero points `z` of the same shape."""
    lo, hi = code_range(scheme)
    s = torch.where(s != 0, s, 1.0)  # a K-quant grid's all-zero super-block: every code stands for 0 (or the offset)
    if scheme.codebook:
        return (_nearest_level(w / s) - 8).to(torch.float32)
    if scheme.symmetric:
        return torch.clamp(rounding(w / s), lo, hi)
    if scheme.zero_point == "float":
        return torch.clamp(rounding((w - z) / s), lo, hi)
    return torch.clamp(rounding(w / s) + z, lo, hi)


def code_values(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """The weights that float32 `codes` stand for under scales `s` and zero points `z` of the same shape."""
    if scheme.codebook:
        return torch.take(codebook_levels(codes.device), codes.to(torch.long) + 8) * s
    if scheme.symmetric:
        return codes * s
    if scheme.zero_point == "float":
        return codes * s + z
    return (codes - z) * s


def grouped_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   scheme: QuantScheme) -> torch.Tensor:
    """The weights [out, in] that float32 `codes` [out, in] stand for under per-group `scales` and `zeros`
    [out, n_groups]: `code_values` with each group's parameters broadcast over its columns (not repeated per
    column; the same float32 values, about twice as fast)."""
    out, cols = codes.shape
    group = scheme.group_size or cols
    pad = -cols % group
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    values = code_values(codes.reshape(out, -1, group), *_per_group(scales, zeros), scheme).reshape(out, -1)
    return values[:, :cols] if pad else values


def _per_group(scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, n_groups] scales and zero points as float32 [out, n_groups, 1], to broadcast over `group_view`s."""
    return scales.to(torch.float32).unsqueeze(2), None if zeros is None else zeros.to(torch.float32).unsqueeze(2)


def rounded(weight: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None,
            params: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """`quantize(weight, scheme, clip).dequantize()` (or `encode(weight, *params, scheme).dequantize()`) bit for
    bit, without packing codes or a QuantizedWeight: what the searches score their many candidates by."""
    w = weight.detach().to(torch.float32)
    scheme = scheme.fitting(w.shape[1])
    with torch.no_grad():
        return fake_quantize(w, *(params if params is not None else group_params(w, scheme, clip)), scheme)


def encode(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           scheme: QuantScheme) -> QuantizedWeight:
    """The codes of `weight` [out, in] under given scales [out, n_groups] (and zero points)."""
    w = weight.detach().to(torch.float32)
    scheme = scheme.fitting(w.shape[1])
    if scheme.super_block:
        scales, zeros = k_grid(scales, zeros, scheme)
    group, cols = scheme.group_size or w.shape[1], w.shape[1]
    s = per_column(scales, group, cols)
    z = None if scheme.symmetric else per_column(zeros, group, cols)
    codes = round_codes(w, s, z, scheme).to(torch.int8 if scheme.symmetric else torch.uint8)
    return QuantizedWeight(codes.contiguous(), scales.to(torch.float32), zeros, scheme)


def save_qweights(qweights: "dict[str, QuantizedWeight] | StoredQWeights", path: Path) -> None:
    """One safetensors file: `<name>.codes` (packed), `.scales` (float16), `.zeros`; a K-quant grid's scales
    as their integers (`.scales`, uint8) and factors (`.scale_d`, float16), its offsets likewise (`.zeros`,
    `.zero_d`); schemes and widths in the header metadata. Weights read unchanged from a file are that file,
    copied as it is (no codes in memory)."""
    if isinstance(qweights, StoredQWeights) and qweights.unchanged:
        atomic.copy_file(qweights.path, path)
        return
    tensors, schemes = {}, {}
    for name in sorted(qweights):
        q = qweights[name]
        tensors[f"{name}.codes"] = q.packed.contiguous()
        if q.scheme.super_block:
            for part, factors in zip(("scale", "zero"), q.k_factors):
                if factors is not None:
                    tensors[f"{name}.{part}s"], tensors[f"{name}.{part}_d"] = factors.ints.contiguous(), factors.d.contiguous()
        else:
            # the held tensors themselves: a converted copy of every weight's scales would stay alive for the
            # whole write (0.5 GB at 8B, int4 g32)
            tensors[f"{name}.scales"] = q.stored_scales
            if q.zeros is not None:
                tensors[f"{name}.zeros"] = q.zeros if q.zeros.dtype == torch.uint8 else atomic.Cast(q.zeros, torch.float16)
        schemes[name] = {**q.scheme.model_dump(), "cols": q.cols}
    # One metadata key: safetensors writes its metadata map in no fixed order, and artifacts must be
    # byte-identical from run to run.
    header = json.dumps({"format": FILE_FORMAT, "schemes": schemes}, sort_keys=True)
    atomic.save_safetensors(tensors, path, {"minicpm_compress": header})


def _stored_parts(scheme: dict) -> tuple[str, ...]:
    """The tensors a weight of `scheme` has in a file of FILE_FORMAT."""
    parts = ("codes", "scales") + (() if scheme.get("symmetric") else ("zeros",))
    if scheme.get("super_block"):
        parts += ("scale_d",) + (() if scheme.get("symmetric") else ("zero_d",))
    return parts


class StoredQWeights(MutableMapping):
    """The quantized weights of a file, read one linear at a time when asked for and not kept, so a model's
    codes are in memory only while a stage uses them (an 8B model's are ~4 GB). Weights set afterwards (a
    later stage's) are held in memory; `unchanged` says whether the file still is the whole mapping."""

    def __init__(self, path: Path, schemes: dict[str, dict]):
        self.path, self.schemes = Path(path), schemes
        self.held: dict[str, QuantizedWeight] = {}
        self.removed: set[str] = set()

    @property
    def unchanged(self) -> bool:
        return not self.held and not self.removed

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name in self.held:
            return self.held[name]
        if name not in self.schemes or name in self.removed:
            raise KeyError(name)
        scheme = dict(self.schemes[name])
        cols = scheme.pop("cols")
        scheme = QuantScheme(**scheme)
        try:
            with safe_open(str(self.path), "pt") as f:
                parts = {p: f.get_tensor(f"{name}.{p}") for p in _stored_parts(scheme.model_dump())}
        except (SafetensorError, OSError) as e:
            raise CompressError(f"{self.path}: unreadable quantized-weights file ({e})") from None
        scales, zeros = parts["scales"], parts.get("zeros")
        if scheme.super_block:
            scales = KFactors(parts["scale_d"], scales)
            zeros = None if zeros is None else KFactors(parts["zero_d"], zeros)
        else:
            scales = scales.float()
            if zeros is not None and zeros.dtype != torch.uint8:
                zeros = zeros.float()  # float offsets, stored as float16 (exact)
        return QuantizedWeight(None, scales, zeros, scheme, packed=parts["codes"], cols=cols)

    def __setitem__(self, name: str, q: QuantizedWeight) -> None:
        self.held[name] = q
        self.removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.held.pop(name, None)
        if name in self.schemes:
            self.removed.add(name)

    def __contains__(self, name: object) -> bool:
        return name in self.held or (name in self.schemes and name not in self.removed)

    def __iter__(self):
        yield from (n for n in self.schemes if n not in self.removed and n not in self.held)
        yield from self.held

    def __len__(self) -> int:
        return sum(1 for _ in self)


def load_qweights(path: Path) -> StoredQWeights:
    """The quantized weights of `path` (checked now: format, schemes, every tensor present), read on use."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("minicpm_compress", "{}"))
            names = set(f.keys())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CompressError(f"{path}: unreadable quantized-weights file ({e})") from None
    fmt = meta.get("format")
    older_same = fmt == OLDER_FORMAT and not any(s.get("super_block") for s in meta.get("schemes", {}).values())
    if fmt != FILE_FORMAT and not older_same:  # /2 differs from /3 only in K-grid weights
        raise CompressError(f"{path}: not a {FILE_FORMAT} file (format '{fmt}'); rerun the stage that wrote it")
    for name, scheme in meta["schemes"].items():
        for part in _stored_parts(scheme):
            if f"{name}.{part}" not in names:
                raise CompressError(f"{path}: missing tensor '{name}.{part}'")
        try:
            QuantScheme(**{k: v for k, v in scheme.items() if k != "cols"})
        except ValueError as e:
            raise CompressError(f"{path}: scheme of '{name}' is invalid ({e})") from None
    return StoredQWeights(path, meta["schemes"])
