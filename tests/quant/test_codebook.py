"""IQ4_NL: symmetric 4-bit codes standing for llama.cpp's 16 non-linear levels, with a searched scale per group."""

import pytest
import torch
from pydantic import ValidationError

from minicpm_compress.quant.output_error import relative_error
from minicpm_compress.quant.qweight import (
    IQ4_NL_VALUES, QuantScheme, codebook_scales, encode, fake_quantize, group_view, load_qweights, per_column,
    quantize, save_qweights,
)

IQ4_NL = QuantScheme(layout="IQ4_NL")


@pytest.fixture
def weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 896, generator=g) * torch.rand(48, 1, generator=g) * 0.05
    w[5, 64:96] = 0  # an all-zero group
    w[7, 3] = 1.5  # an outlier
    return w


def test_the_scheme_is_llama_cpps_iq4_nl_and_nothing_else_takes_its_name():
    assert IQ4_NL == QuantScheme(bits=4, group_size=32, symmetric=True, codebook="iq4_nl")
    assert IQ4_NL.layout == "IQ4_NL" and QuantScheme(layout="Q4_0").layout == "Q4_0"
    assert IQ4_NL.bits_per_weight(896) == 4.5 and "non-linear" in IQ4_NL.describe()
    with pytest.raises(ValidationError, match="codebook iq4_nl takes symmetric 4-bit codes"):
        QuantScheme(bits=4, group_size=32, codebook="iq4_nl")  # asymmetric
    with pytest.raises(ValidationError, match="codebook iq4_nl takes symmetric 4-bit codes"):
        QuantScheme(bits=8, group_size=32, symmetric=True, codebook="iq4_nl")


def test_codes_stand_for_the_levels_and_each_weight_takes_its_nearest(weight):
    q = quantize(weight, IQ4_NL)
    levels = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
    s = per_column(q.scales, 32, weight.shape[1])
    assert torch.equal(q.dequantize(), levels[q.codes.long() + 8] * s)
    assert torch.equal(q.scales, q.scales.half().float())  # float16 scales, as the block stores them
    # no other level is nearer to any weight than the one its code names
    distance = (weight.unsqueeze(2) - levels * s.unsqueeze(2)).abs()
    assert (distance.gather(2, q.codes.long().unsqueeze(2) + 8).squeeze(2) <= distance.amin(dim=2) * (1 + 1e-6) + 1e-12).all()
    assert q.dequantize()[5, 64:96].abs().max() < 1e-3  # the all-zero group: the smallest scale


def test_the_scale_search_beats_its_own_first_guess_and_q4_0(weight):
    """The searched scale against the plain one (the group's peak on the outermost level) and against Q4_0's
    linear grid at the same 4.5 bits: lower squared error, and lower output error through a Gram matrix."""
    g = group_view(weight, 32)
    peak = g.gather(2, g.abs().argmax(dim=2, keepdim=True))
    plain = (peak / IQ4_NL_VALUES[0]).half().float().squeeze(2)
    plain = torch.where(plain == 0, 1e-5, plain)
    searched = quantize(weight, IQ4_NL)
    first = encode(weight, plain, None, IQ4_NL)
    q4_0 = quantize(weight, QuantScheme(layout="Q4_0"))
    x = torch.randn(512, weight.shape[1], generator=torch.Generator().manual_seed(1))
    gram = x.T @ x
    errors = {name: relative_error(weight, q.dequantize(), gram) for name, q in
              {"searched": searched, "first": first, "q4_0": q4_0}.items()}
    assert errors["searched"] < 0.97 * errors["first"], errors
    assert errors["searched"] < 0.85 * errors["q4_0"], errors
    assert (codebook_scales(g).squeeze(2)[5, 2] == 0)  # the all-zero group has no scale to fit


def test_fake_quantize_is_the_quantizer_and_trains(weight):
    q = quantize(weight, IQ4_NL, clip=torch.full((48, 1), 0.9))
    assert torch.equal(encode(weight, q.scales, None, IQ4_NL).codes, q.codes)
    scales = q.scales.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fake_quantize(w, scales, None, IQ4_NL)
    assert torch.equal(out.detach(), q.dequantize())
    (out - weight * 1.1).pow(2).sum().backward()
    assert scales.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_codes_are_stored_and_read_back(tmp_path, weight):
    q = quantize(weight, IQ4_NL)
    save_qweights({"w": q}, tmp_path / "q.safetensors")
    back = load_qweights(tmp_path / "q.safetensors")["w"]
    assert back.scheme == IQ4_NL and torch.equal(back.dequantize(), q.dequantize())
