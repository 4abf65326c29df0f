"""Our quantized weights as GGUF blocks: bit-exact under gguf-py's own dequantize, for every type we pack."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from minicpm_compress.export.gguf.blocks import BLOCK_WIDTH, is_lossless, pack_blocks
from minicpm_compress.quant.qweight import QuantScheme, quantize


def _weight(rows, cols, seed=0):
    """Gaussian rows of different magnitudes, an outlier stretch, and one all-zero super-block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    w[0, 3:40] *= 25
    if rows > 2 and cols >= 512:
        w[2, 256:512] = 0
    return w


@pytest.mark.parametrize("type_name", sorted(BLOCK_WIDTH))
@pytest.mark.parametrize("rows,cols", [(3, 512), (1, 256), (7, 768)])
def test_packing_is_bit_exact_under_ggufs_own_dequantize(type_name, rows, cols):
    q = quantize(_weight(rows, cols), QuantScheme(layout=type_name))
    assert is_lossless(q, type_name)
    blocks = pack_blocks(q, type_name)
    qtype = GGMLQuantizationType[type_name]
    width, size = GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (rows, cols // width * size)
    back = dequantize(blocks, qtype).reshape(rows, cols)
    ours = q.dequantize().numpy()
    assert np.array_equal(back.view(np.uint32), ours.view(np.uint32))  # the same float32 bits


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_packing_survives_training_scales_and_tiny_weights(type_name):
    """Scales a stage chose (QAT, AWQ's clip) and weights small enough for float16 subnormal factors."""
    from minicpm_compress.quant.qweight import encode

    w = _weight(4, 512) * 1e-3
    q = quantize(w, QuantScheme(layout=type_name))
    g = torch.Generator().manual_seed(1)
    trained = encode(w, q.scales * (1 + 0.3 * torch.rand(q.scales.shape, generator=g)), q.zeros, q.scheme)
    for candidate in (q, trained):
        back = dequantize(pack_blocks(candidate, type_name), GGMLQuantizationType[type_name]).reshape(4, 512)
        assert np.array_equal(back, candidate.dequantize().numpy())


def test_other_layouts_are_not_taken_for_lossless():
    w = _weight(8, 576)
    assert not is_lossless(quantize(w, QuantScheme(bits=4, group_size=128, symmetric=True)), "Q4_0")
    assert not is_lossless(quantize(w, QuantScheme(bits=4, group_size=32)), "Q4_1")  # integer zero points
    assert not is_lossless(quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True)), "Q8_0")
    narrow = quantize(w, QuantScheme(layout="Q4_K"))  # 576 columns: no 256-wide super-blocks
    assert not is_lossless(narrow, "Q4_K") and is_lossless(narrow, "Q5_0")  # llama.cpp's fallback, exactly
    with pytest.raises(ValueError, match="not a Q4_K layout"):
        pack_blocks(narrow, "Q4_K")
