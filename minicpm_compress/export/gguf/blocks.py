"""Our quantized weights as GGUF blocks, byte for byte what llama.cpp (and gguf-py) decode back to them.

Each type here is a scheme of the one quantizer (`GGUF_GRIDS` in quant/qweight.py), so packing is lossless:
codes and scales are only rearranged. Legacy types have blocks of 32 with a float16 scale (and offset);
IQ4_NL's block is Q4_0's (a float16 scale, then code + 8 in nibbles), its codes indices into a table of levels;
K-quants have super-blocks of 256 whose group scales are integers times a float16 factor, held so by our
quantized weights (`KFactors` in qweight.py). Layouts follow ggml's block_q5_0, block_q4_K, block_q6_K, …
"""

from __future__ import annotations

import numpy as np

from ...quant.qweight import QuantizedWeight

BLOCK_WIDTH = {"Q8_0": 32, "Q4_0": 32, "IQ4_NL": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
               "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def is_lossless(q: QuantizedWeight, type_name: str) -> bool:
    """Whether `q` is exactly a `type_name` tensor (its scheme is that type's grid and its rows split into blocks)."""
    return type_name in BLOCK_WIDTH and q.scheme.layout == type_name and q.shape[1] % BLOCK_WIDTH[type_name] == 0


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 values that are float16-exact → their float16 bytes, [..., 2]."""
    half = values.astype(np.float16)
    return half.view(np.uint8).reshape(*values.shape, 2)


def _high_bits(bits: np.ndarray) -> np.ndarray:
    """[..., 32] bits (0/1) → [..., 4] bytes of a little-endian uint32 with bit i = bits[..., i]."""
    word = (bits.astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(*bits.shape[:-1], 4)


def _nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0x0F) | ((high & 0x0F) << 4)


def _pack_legacy(type_name: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """Blocks of 32: codes [n, 32], scales/zeros [n] → [n, bytes per block]."""
    d = _f16_bytes(scales)
    if type_name == "Q8_0":
        return np.concatenate([d, codes.astype(np.int8).view(np.uint8)], axis=1)
    bits = 4 if type_name in ("Q4_0", "IQ4_NL", "Q4_1") else 5
    u = codes.astype(np.int16) + (2 ** (bits - 1) if type_name in ("Q4_0", "IQ4_NL", "Q5_0") else 0)  # unsigned
    parts = [d] + ([_f16_bytes(zeros)] if type_name in ("Q4_1", "Q5_1") else [])
    if bits == 5:
        parts.append(_high_bits((u >> 4) & 1))
    parts.append(_nibbles(u[:, :16], u[:, 16:]).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] → the 12 bytes of block_q4_K / block_q5_K."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _crumbs(u: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values → the 64 bytes of block_q2_K / block_q3_K's qs: element h·128 + s·32 + b is bits
    2s..2s+1 of byte h·32 + b."""
    parts = (u.reshape(-1, 2, 4, 32) & 3) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return parts.sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def _pack_low_k(type_name: str, codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None,
                m: np.ndarray | None) -> np.ndarray:
    """Q2_K / Q3_K super-blocks (16 groups of 16): codes [n, 256], factors [n] and integers [n, 16] of the
    scales (and offsets) → [n, bytes per block]."""
    n = codes.shape[0]
    if type_name == "Q2_K":
        packed_scales = (sc | (m << 4)).astype(np.uint8)
        return np.concatenate([packed_scales, _crumbs(codes.astype(np.uint8)), _f16_bytes(d), _f16_bytes(dmin)], axis=1)
    s6 = (sc.astype(np.int16) + 32).astype(np.uint8)  # the scale integer, stored offset by 32 in 6 bits
    low = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
    high = (((s6.reshape(n, 4, 4) >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)).sum(
        axis=1, dtype=np.uint8)  # byte b holds scale k·4 + b in bits 2k..2k+1
    u = (codes.astype(np.int16) + 4).astype(np.uint8)  # 0..7: the low two bits, and the high bit in hmask
    hmask = (((u.reshape(n, 8, 32) >> 2) & 1) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(
        axis=1, dtype=np.uint8)  # element j·32 + b is bit j of byte b
    return np.concatenate([hmask, _crumbs(u), low, high, _f16_bytes(d)], axis=1)


def _pack_k(type_name: str, codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None,
            m: np.ndarray | None) -> np.ndarray:
    """Super-blocks of 256: codes [n, 256], factors [n] and integers [n, groups] of the scales (and offsets)
    → [n, bytes per block]."""
    n = codes.shape[0]
    if type_name in ("Q2_K", "Q3_K"):
        return _pack_low_k(type_name, codes, d, sc, dmin, m)
    if type_name == "Q6_K":
        u = codes.astype(np.int16) + 32
        halves = u.reshape(n, 2, 128)
        ql = _nibbles(halves[:, :, :64], halves[:, :, 64:]).reshape(n, 128)  # element h·128 + k·64 + b
        hi = (halves >> 4) & 3
        qh = (hi[:, :, 0:32] | (hi[:, :, 32:64] << 2) | (hi[:, :, 64:96] << 4) | (hi[:, :, 96:128] << 6)).reshape(n, 64)
        return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.astype(np.int8).view(np.uint8),
                               _f16_bytes(d)], axis=1)
    u = codes.astype(np.int16).reshape(n, 4, 2, 32)  # pairs of groups of 32
    qs = _nibbles(u[:, :, 0], u[:, :, 1]).reshape(n, 128).astype(np.uint8)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc.astype(np.uint8), m.astype(np.uint8))]
    if type_name == "Q5_K":
        groups = codes.astype(np.int16).reshape(n, 8, 32)
        qh = ((groups >> 4) & 1) << np.arange(8, dtype=np.int16).reshape(1, 8, 1)
        parts.append(qh.sum(axis=1).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def pack_blocks(q: QuantizedWeight, type_name: str) -> np.ndarray:
    """`q` as `type_name` blocks → uint8 [rows, blocks × bytes per block]."""
    if not is_lossless(q, type_name):
        raise ValueError(f"{q.scheme.describe()} [{q.shape[0]}, {q.shape[1]}] is not a {type_name} layout")
    rows, cols = q.shape
    width = BLOCK_WIDTH[type_name]
    n = rows * cols // width
    codes = q.codes.numpy().reshape(n, width)
    if width == 32:
        scales = q.scales.numpy().reshape(n)
        zeros = None if q.zeros is None else q.zeros.numpy().astype(np.float32).reshape(n)
        packed = _pack_legacy(type_name, codes, scales, zeros)
    else:
        (d, sc), offsets = q.k_factors
        dmin, m = (None, None) if offsets is None else (offsets.d.numpy().reshape(n), offsets.ints.numpy().reshape(n, -1))
        packed = _pack_k(type_name, codes, d.numpy().reshape(n), sc.numpy().reshape(n, -1), dmin, m)
    return np.ascontiguousarray(packed).reshape(rows, -1)
