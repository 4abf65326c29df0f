"""A Hugging Face AWQ checkpoint (quant_method awq, GEMM packing).

Per quantized linear of shape [out, in] with group size g:
  qweight  int32 [in, out / 8]   eight 4-bit codes per int32, column c·8 + AWQ_ORDER[i] in nibble i
  qzeros   int32 [in / g, out / 8]   zero points, packed the same way
  scales   float16 [in / g, out]
and w = (code − zero) · scale. Symmetric codes c ∈ [−8, 7] are stored as c + 8 with zero point 8, which
is the same value exactly. Every other tensor is stored in float16, as AWQ checkpoints are. The codes
are ours (from rtn/awq/qat), copied, never re-quantized. A MiniCPM-V model is written whole, as its
checkpoints are: the LLM under `llm.`, the vision half (`vpm.*`, `resampler.*`) in float16 and listed in
`modules_to_not_convert`.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import CompressError
from ...quant.qweight import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in 0..15 → int32 [rows, cols / 8] in AWQ's interleaved nibble order."""
    v = values.to(torch.int64).numpy().astype(np.uint32)
    rows, cols = v.shape
    v = v.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i in range(8):
        packed |= v[:, :, i] << np.uint32(4 * i)
    return torch.from_numpy(packed.view(np.int32))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 → uint8 [rows, cols]."""
    p = packed.numpy().view(np.uint32)
    nibbles = np.stack([(p >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1)
    out = np.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return torch.from_numpy(out.reshape(p.shape[0], -1).astype(np.uint8))


def to_awq(name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    out, cols = q.shape
    if q.scheme.bits != 4:
        raise CompressError(f"hf_awq: '{name}' is {q.scheme.bits}-bit; AWQ checkpoints hold 4-bit weights only")
    if q.scheme.codebook:
        raise CompressError(f"hf_awq: '{name}' is on the {q.scheme.layout or 'iq4_nl'} codebook; AWQ checkpoints hold "
                            "evenly spaced int4 codes (quantize with layout Q4_0 or an int4 group size instead)")
    if not q.scheme.symmetric and q.scheme.zero_point != "int":
        raise CompressError(f"hf_awq: '{name}' has float zero points; AWQ stores integer zero points")
    if cols % q.group_size or out % 8:
        raise CompressError(
            f"hf_awq: '{name}' [{out}, {cols}] does not split into groups of {q.group_size} (AWQ needs whole groups "
            "and out divisible by 8); quantize with a group size that divides the input size, e.g. 32 or 64"
        )
    if q.scheme.symmetric:
        codes, zeros = (q.codes.to(torch.int16) + 8).to(torch.uint8), torch.full_like(q.scales, 8, dtype=torch.uint8)
    else:
        codes, zeros = q.codes, q.zeros
    return {
        f"{name}.qweight": pack_int4(codes.T.contiguous()),
        f"{name}.qzeros": pack_int4(zeros.T.contiguous()),
        f"{name}.scales": q.scales.T.contiguous().to(torch.float16),
    }


def from_awq(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> torch.Tensor:
    """The float [out, in] weight an AWQ loader computes from `name`'s packed tensors."""
    codes = unpack_int4(tensors[f"{name}.qweight"]).to(torch.float32)
    zeros = unpack_int4(tensors[f"{name}.qzeros"]).to(torch.float32).repeat_interleave(group_size, dim=0)
    scales = tensors[f"{name}.scales"].to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((codes - zeros) * scales).T.contiguous()
