"""The ExecuTorch program: the model with ExecuTorch's cache and attention kernels, in its runtime."""

import pytest
import torch

from minicpm_compress.export.executorch.program import StaticCacheDecoder, carried_weight, lower
from minicpm_compress.export.executorch.runner import ExecuTorchRunner
from minicpm_compress.export.executorch.stage import ExecuTorchConfig, fits_xnnpack, program_model
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.state import ModelState

from ...conftest import tiny_model


@pytest.mark.parametrize("model_type", ["minicpm", "qwen2"])
def test_the_float_program_computes_the_model_prefill_and_token_by_token(model_type, tmp_path):
    """MiniCPM's muP scalings and Qwen2's biases are in the graph; the static cache gives a decode step the
    same logits as a whole-sequence pass."""
    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    program = lower(StaticCacheDecoder(model, 32))
    (tmp_path / "m.pte").write_bytes(program)
    runner = ExecuTorchRunner(tmp_path / "m.pte", 32)
    scale = expected.abs().max()
    assert (runner.logits(ids) - expected).abs().max() <= 1e-5 * scale
    steps = [runner.run(ids[:, :6], 0)] + [runner.run(ids[:, i:i + 1], i) for i in range(6, 10)]
    assert (torch.cat(steps, 1) - expected).abs().max() <= 1e-5 * scale
    assert runner.greedy(ids[0].tolist(), 3)[0] == int(expected[0, -1].argmax())
    with pytest.raises(ValueError, match="exceeds the program's context of 32"):
        runner.logits(torch.zeros(1, 33, dtype=torch.long))
    if model_type == "qwen2":  # same model, same program, byte for byte
        assert lower(StaticCacheDecoder(tiny_model(model_type), 32)) == program


def test_xnnpack_takes_symmetric_codes_with_positive_bfloat16_exact_scales_only():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    bf16 = quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype="bfloat16"))
    assert fits_xnnpack(bf16, 4) and not fits_xnnpack(bf16, 8)
    # the full symmetric grid's signed scales (XNNPACK rejects negative ones), zero points, float16 scales
    assert (quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True)).scales < 0).any()
    assert not fits_xnnpack(quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True)), 4)
    assert not fits_xnnpack(quantize(w, QuantScheme(bits=4, group_size=32, scale_dtype="bfloat16")), 4)
    assert not fits_xnnpack(quantize(w, QuantScheme(bits=8, group_size=None, symmetric=True)), 8)  # max/127 in float16
    assert fits_xnnpack(quantize(w, QuantScheme(bits=8, group_size=None, symmetric=True, scale_dtype="bfloat16")), 8)
    assert not fits_xnnpack(quantize(w, QuantScheme(bits=8, group_size=32, symmetric=True, scale_dtype="bfloat16")), 8)
    assert not fits_xnnpack(quantize(w[:, :96], QuantScheme(bits=4, group_size=64, symmetric=True,
                                                            scale_dtype="bfloat16")), 4)  # 96 = 1.5 groups


def test_carried_weights_compute_our_dequantized_weight_with_int8_activations():
    torch.manual_seed(0)
    q = quantize(torch.randn(24, 64) * 0.05, QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype="bfloat16"))
    carried = carried_weight(q)
    assert torch.equal(carried.dequantize(), q.dequantize())
    x = torch.randn(3, 64)
    exact, through = x @ q.dequantize().T, torch.nn.functional.linear(x, carried)
    err = (through - exact).abs().max()
    assert 0 < err < 0.02 * exact.abs().max()  # the activations are rounded to int8 per token, nothing else


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_xnnpack_computes_with_exactly_our_codes(bits, group, tmp_path):
    """A linear holding our codes, lowered to XNNPACK and run in ExecuTorch, on inputs whose per-token int8
    quantization is exact (integers spanning −128 … 127): its outputs are our dequantized weight's."""
    from executorch.runtime import Runtime

    from minicpm_compress.export.executorch.program import load_kernels

    torch.manual_seed(0)
    q = quantize(torch.randn(48, 128) * 0.05,
                 QuantScheme(bits=bits, group_size=group, symmetric=True, scale_dtype="bfloat16"))
    linear = torch.nn.Linear(128, 48, bias=False)
    linear.weight = torch.nn.Parameter(carried_weight(q), requires_grad=False)
    x = torch.randint(-128, 128, (5, 128)).float()
    x[:, 0], x[:, 1] = -128, 127  # each row's range is the int8 range: scale 1, zero point 0
    load_kernels()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(torch.export.export(linear.eval(), (x,), strict=False),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    (tmp_path / "l.pte").write_bytes(program.buffer)
    out = Runtime.get().load_program(tmp_path / "l.pte").load_method("forward").execute([x])[0]
    expected = x.double() @ q.dequantize().double().T
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_linears_that_do_not_fit_are_requantized_and_counted(tokenizer):
    model = tiny_model("llama")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    names = state.linear_names()
    bf16 = QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype="bfloat16")
    int8 = QuantScheme(bits=8, group_size=None, symmetric=True, scale_dtype="bfloat16")  # e.g. kept by a bit budget
    for i, name in enumerate(names):
        scheme = int8 if i == 2 else bf16 if i % 2 else QuantScheme(bits=4, group_size=32, symmetric=True)
        state.qweights[name] = quantize(state.tensor(f"{name}.weight"), scheme)
    program, paths = program_model(state, ExecuTorchConfig(bits=4))
    assert paths == {"lossless": len(names) // 2 + 1, "requantized": len(names) - len(names) // 2 - 1}
    for kept in (names[1], names[2]):  # carried as they are, the int8 one at 8 bits
        weight = program.get_submodule(kept).weight
        assert torch.equal(weight.dequantize(), state.qweights[kept].dequantize())
    assert program.get_submodule(names[2]).weight.target_dtype == torch.int8
    requantized = program.get_submodule(names[0]).weight
    assert torch.equal(requantized.dequantize(), quantize(state.tensor(f"{names[0]}.weight"), bf16).dequantize())
