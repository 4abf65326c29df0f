"""RTN on the real pretrained model: int8 is near-free, int4 g128 costs real accuracy."""

import copy

import pytest
import torch

from minicpm_compress.data.textsets import evaluation_windows
from minicpm_compress.evaluate.evaluator import Evaluator
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.state import load_checkpoint
from minicpm_compress.quant.qweight import QuantScheme, quantize


@pytest.fixture(scope="module")
def real(minicpm_path):
    model, tokenizer = load_checkpoint(minicpm_path)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], 2048, 512)
    return model, Evaluator.against(model, windows)


def _fake_quant(model, scheme):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for linear in quantizable_linears(out).values():
            linear.weight.copy_(quantize(linear.weight, scheme).dequantize())
    return out


def test_int8_is_near_lossless_and_int4_g128_is_not(real):
    model, evaluator = real
    int8 = evaluator.measure(_fake_quant(model, QuantScheme(bits=8, group_size=None, symmetric=True)))
    int4 = evaluator.measure(_fake_quant(model, QuantScheme(bits=4, group_size=128)))
    assert abs(int8.ppl_increase) < 0.01 and int8.kld < 0.01 and int8.top1 > 0.95
    assert int4.ppl_increase > 0.05 and int4.kld > 0.05
    assert int4.kld > 10 * int8.kld


def test_builtin_weights_sit_on_the_int4_g32_asymmetric_grid(smollm2_path):
    """The honesty note in the docs: re-quantizing with the GGUF's own grid changes nothing."""
    model, _ = load_checkpoint(smollm2_path)
    scheme = QuantScheme(bits=4, group_size=32, zero_point="float")
    for name, linear in list(quantizable_linears(model).items())[:14]:
        w = linear.weight.detach()
        err = (quantize(w, scheme).dequantize() - w).abs().max().item()
        assert err <= 2e-3 * w.abs().max().item(), name
    # whereas group 128 cannot represent them
    w = quantizable_linears(model)["model.layers.0.mlp.up_proj"].weight.detach()
    assert (quantize(w, QuantScheme(bits=4, group_size=128)).dequantize() - w).abs().max() > 1e-2 * w.abs().max()
