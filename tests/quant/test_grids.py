"""The GGUF grids as schemes of the one quantizer: 5- and 6-bit codes, K-quant super-block scales, fallbacks."""

import pytest
import torch
from pydantic import ValidationError

from minicpm_compress.quant.qweight import (
    GGUF_GRIDS, KFactors, QuantizedWeight, QuantScheme, encode, fake_quantize, full_grid, k_grid, load_qweights,
    per_column, quantize, save_qweights,
)

from ..conftest import WIDE

K_GRIDS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(24, 768) * torch.rand(24, 1) * 0.05


def test_bits_per_weight_counts_codes_scales_and_zero_points():
    g128 = QuantScheme(bits=4, group_size=128)
    assert g128.bits_per_weight(576) == pytest.approx(4 + 5 * (16 + 4) / 576)  # 5 groups, the last narrower
    assert QuantScheme(bits=4, group_size=32, symmetric=True).bits_per_weight(64) == 4.5
    assert QuantScheme(bits=8, group_size=None, symmetric=True).bits_per_weight(100) == 8.16
    assert QuantScheme(bits=4, group_size=32, zero_point="float").bits_per_weight(64) == 5.0
    # llama.cpp's block sizes: Q4_K 144 bytes, Q5_K 176, Q6_K 210 per 256 weights; Q5_0 22 per 32
    expected = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q5_0": 5.5, "Q5_1": 6.0,
                "Q8_0": 8.5}  # Q2_K 84 bytes per 256, Q3_K 110
    for grid, bits in expected.items():
        assert QuantScheme(layout=grid).bits_per_weight(1536) == bits, grid
    assert QuantScheme(layout="Q4_K").bits_per_weight(576) == 5.5  # falls back to Q5_0


def test_grid_names_expand_to_their_settings_and_conflicts_are_refused():
    assert QuantScheme(layout="Q5_1") == QuantScheme(bits=5, group_size=32, zero_point="float")
    assert QuantScheme(layout="Q4_K").layout == "Q4_K" and QuantScheme(bits=4, group_size=32, symmetric=True).layout == "Q4_0"
    with pytest.raises(ValidationError, match="layout Q4_K has bits 4, not 8"):
        QuantScheme(layout="Q4_K", bits=8)
    with pytest.raises(ValidationError, match="layout 'Q3_X' is not one of"):
        QuantScheme(layout="Q3_X")
    with pytest.raises(ValidationError, match="super_block and scale_bits go together"):
        QuantScheme(bits=4, group_size=32, super_block=256)
    with pytest.raises(ValidationError, match="must be one of Q4_K, Q5_K, Q6_K, Q3_K, Q2_K"):
        QuantScheme(bits=4, group_size=64, zero_point="float", super_block=256, scale_bits=6)
    with pytest.raises(ValidationError, match=r"3-bit codes exist on a K-quant grid only \(layout: Q3_K\)"):
        QuantScheme(bits=3, group_size=32)


def test_rows_that_do_not_split_into_super_blocks_take_llama_cpps_fallback():
    assert QuantScheme(layout="Q4_K").fitting(512) == QuantScheme(layout="Q4_K")
    assert QuantScheme(layout="Q4_K").fitting(576) == QuantScheme(layout="Q5_0")
    assert QuantScheme(layout="Q5_K").fitting(576) == QuantScheme(layout="Q5_1")
    assert QuantScheme(layout="Q6_K").fitting(576) == QuantScheme(layout="Q8_0")
    # llama.cpp's Q2_K / Q3_K fall back to IQ4_NL (the same 4.5 bits as Q4_0, on non-linear levels)
    assert QuantScheme(layout="Q3_K").fitting(576) == QuantScheme(layout="Q2_K").fitting(576) == QuantScheme(layout="IQ4_NL")
    q = quantize(torch.randn(4, 576), QuantScheme(layout="Q6_K"))
    assert q.scheme == QuantScheme(layout="Q8_0") and q.scales.shape == (4, 18)


@pytest.mark.parametrize("grid", K_GRIDS)
def test_k_grid_scales_are_float16_factors_times_integers_topped_per_super_block(weight, grid):
    scheme = QuantScheme(layout=grid)
    q = quantize(weight, scheme)
    top = 2 ** (scheme.scale_bits - scheme.symmetric) - 1  # Q6_K 127, Q3_K 31, Q4_K/Q5_K 63, Q2_K 15
    per_super = 256 // scheme.group_size
    for values in [q.scales] + ([] if q.zeros is None else [-q.zeros]):
        blocks = values.reshape(24, -1, per_super)
        d = blocks.amax(dim=2, keepdim=True) / top
        assert torch.equal(d, d.half().float())  # one float16 factor per super-block
        ints = blocks / d
        assert torch.equal(ints, ints.round()) and ints.min() >= 0 and ints.max() == top
    lo, hi = (-(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1) if scheme.symmetric else (0, 2**scheme.bits - 1)
    assert lo <= q.codes.min() and q.codes.max() <= hi
    scales, zeros = k_grid(q.scales, q.zeros, scheme)  # idempotent: the grid maps onto itself
    assert torch.equal(scales, q.scales) and (zeros is None or torch.equal(zeros, q.zeros))


@pytest.mark.parametrize("grid", sorted(GGUF_GRIDS))
def test_fake_quantize_and_encode_reproduce_the_quantizer_exactly(weight, grid):
    scheme = QuantScheme(layout=grid)
    q = quantize(weight, scheme, clip=torch.full((24, 1), 0.9))
    assert torch.equal(encode(weight, q.scales, q.zeros, scheme).codes, q.codes)
    assert torch.equal(fake_quantize(weight, q.scales, q.zeros, scheme), q.dequantize())
    step = per_column(q.scales, q.group_size, weight.shape[1])
    if scheme.codebook:  # tested in test_codebook.py
        return
    if full_grid(scheme):  # codes −8…7 (−16…15) times a signed scale: within half a step of the grid's range
        ends = step * -(2 ** (scheme.bits - 1)), step * (2 ** (scheme.bits - 1) - 1)
        held = weight.clamp(torch.minimum(*ends), torch.maximum(*ends))
        assert ((q.dequantize() - held).abs() <= step.abs() * 0.5 * (1 + 1e-6)).all()
    else:
        assert ((q.dequantize() - weight.clamp(-weight.abs().max() * 0.9, weight.abs().max() * 0.9)).abs()
                <= step * 0.5 + 0.1 * weight.abs().max()).all()


@pytest.mark.parametrize("grid", K_GRIDS)
def test_training_on_a_k_grid_reaches_the_scales_and_stays_on_the_grid(weight, grid):
    scheme = QuantScheme(layout=grid)
    q = quantize(weight, scheme)
    scales = (q.scales * 1.07).requires_grad_(True)  # off the grid, as a trained scale is
    w = weight.clone().requires_grad_(True)
    out = fake_quantize(w, scales, q.zeros, scheme)
    out.pow(2).sum().backward()
    assert scales.grad.abs().sum() > 0 and w.grad.abs().sum() > 0
    exported = encode(weight, scales.detach(), q.zeros, scheme)
    assert torch.equal(exported.dequantize(), out.detach())  # what trained is what is exported
    assert torch.equal(k_grid(exported.scales, exported.zeros, scheme)[0], exported.scales)


def test_errors_follow_the_bits(weight):
    def err(grid):
        return ((quantize(weight, QuantScheme(layout=grid)).dequantize() - weight).norm() / weight.norm()).item()

    assert err("Q6_K") < err("Q5_K") < err("Q4_K") < err("Q4_0") < err("Q3_K") < err("Q2_K")
    assert err("Q4_K") < 1.05 * err("Q4_1")  # the 6-bit scale grid costs almost nothing at 0.5 bit less
    assert err("Q5_K") < 1.05 * err("Q5_1") and err("Q5_1") < err("Q5_0")


@pytest.mark.parametrize("grid", K_GRIDS)
def test_k_grid_scales_are_held_and_stored_as_their_factors_and_integers(tmp_path, weight, grid):
    from safetensors import safe_open

    scheme = QuantScheme(layout=grid)
    q = quantize(weight, scheme)
    groups, supers = 768 // scheme.group_size, 768 // 256
    held = [f for f in q.k_factors if f is not None]
    assert len(held) == (1 if scheme.symmetric else 2)
    for f in held:  # a byte per group and a float16 per super-block: no float32 scales in memory
        assert f.ints.dtype == torch.uint8 and f.ints.shape == (24, groups)
        assert f.d.dtype == torch.float16 and f.d.shape == (24, supers)
    assert torch.equal(held[0].values(scheme), q.scales)
    save_qweights({"x": q}, tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["x.scales"].dtype == torch.uint8 and stored["x.scale_d"].dtype == torch.float16
    assert sum(t.numel() * t.element_size() for k, t in stored.items() if k != "x.codes") == sum(
        f.ints.numel() + f.d.numel() * 2 for f in held)
    back = load_qweights(tmp_path / "q.safetensors")["x"]
    assert torch.equal(back.scales, q.scales) and (q.zeros is None or torch.equal(back.zeros, q.zeros))
    # row selection, device moves and power-of-two scaling keep the factors
    index = torch.tensor([3, 0, 7])
    assert torch.equal(q.rows(index).dequantize(), q.dequantize()[index])
    assert torch.equal(q.scaled(4.0).dequantize(), q.dequantize() * 4)
    with pytest.raises(ValueError, match="out of float16"):  # subnormal factors would lose bits
        q.scaled(2.0**-20)
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


def test_scales_off_a_k_grid_are_refused_not_rounded(weight):
    scheme = QuantScheme(layout="Q4_K")
    q = quantize(weight, scheme)
    off = q.scales.clone()
    off[0, 1] *= 1.001
    with pytest.raises(ValueError, match="not on the Q4_K grid"):
        QuantizedWeight(q.codes, off, q.zeros, scheme)
    assert isinstance(QuantizedWeight(q.codes, q.scales, q.zeros, scheme).k_factors[0], KFactors)


def test_an_older_file_is_read_unless_it_holds_k_grid_weights(tmp_path, weight):
    import json

    from safetensors.torch import load_file, save_file

    from minicpm_compress.errors import CompressError

    def as_older(qweights, path):
        save_qweights(qweights, path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata()["minicpm_compress"]
        meta = json.loads(header)
        meta["format"] = "minicpm-compress-qweights/2"
        save_file(load_file(str(path)), str(path), metadata={"minicpm_compress": json.dumps(meta)})

    legacy = quantize(weight, QuantScheme(layout="Q4_1"))
    as_older({"x": legacy}, tmp_path / "plain.safetensors")
    assert torch.equal(load_qweights(tmp_path / "plain.safetensors")["x"].dequantize(), legacy.dequantize())
    as_older({"x": quantize(weight, QuantScheme(layout="Q4_K"))}, tmp_path / "k.safetensors")
    with pytest.raises(CompressError, match="k.safetensors: not a minicpm-compress-qweights/3 file .*rerun"):
        load_qweights(tmp_path / "k.safetensors")


def test_two_three_five_and_six_bit_codes_are_packed_and_round_trip(tmp_path, weight):
    qweights = {grid: quantize(weight[:, :700], QuantScheme(layout=grid)) for grid in ("Q5_0", "Q5_1")}
    qweights.update({grid: quantize(weight, QuantScheme(layout=grid)) for grid in K_GRIDS})
    for grid, q in qweights.items():
        assert q.packed.shape[1] == -(-q.shape[1] * q.scheme.bits // 8), grid
    save_qweights(qweights, tmp_path / "q.safetensors")
    back = load_qweights(tmp_path / "q.safetensors")
    for grid, q in qweights.items():
        assert back[grid].scheme == q.scheme
        assert torch.equal(back[grid].codes, q.codes) and torch.equal(back[grid].dequantize(), q.dequantize())


@pytest.mark.parametrize("stage,grid", [("rtn", "Q5_K"), ("awq", "Q4_K"), ("gptq", "Q6_K"), ("qat", "Q4_K"),
                                        ("gptq", "Q3_K"), ("awq", "IQ4_NL"), ("gptq", "IQ4_NL"), ("qat", "IQ4_NL")])
def test_every_quantizing_stage_searches_on_the_grid_the_gguf_file_holds(tmp_path, tiny_checkpoint, stage, grid):
    """Codes a stage chose on a K-quant grid are copied into the K-quant file, and llama.cpp measures the
    stage's model (not a requantized one)."""
    import json

    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    settings = {"layout": grid, **({"steps": 2, "samples": 4, "sequence_length": 64} if stage == "qat" else {})}
    recipe = build_recipe(model=str(tiny_checkpoint("llama", **WIDE)),
                          data={"calibration_samples": 4, "sequence_length": 64, "eval_tokens": 512},
                          stages=[{stage: settings}, {"gguf": {"type": grid}}])
    run_recipe(recipe, tmp_path / "o")
    quantized, gguf = json.loads((tmp_path / "o/manifest.json").read_text())["stages"][1:]
    assert grid in quantized["details"]["scheme"]
    assert gguf["details"]["tensors"] == {"lossless": 14, "requantized": 0, "float": 0}
    # llama.cpp adds its 8-bit activations and the Q8_0 embedding: on this random model 0.02-0.04 nats
    # (measured)
    assert quantized["metrics"]["kld"] * 0.95 < gguf["metrics"]["kld"] < 1.2 * quantized["metrics"]["kld"] + 0.01
