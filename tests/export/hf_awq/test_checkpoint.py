import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from minicpm_compress.cli import main
from minicpm_compress.errors import CompressError
from minicpm_compress.export.hf_awq.checkpoint import from_awq, pack_int4, to_awq, unpack_int4
from minicpm_compress.quant.qweight import QuantScheme, quantize


def _reference_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing written out literally: nibble i of column c holds column c*8 + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= intweight[:, c * 8 + order[i]].to(torch.int64) << (i * 4)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same bits as a signed int32


def test_packing_matches_autoawq_and_round_trips():
    values = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(packed, _reference_pack(values))
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_tensors_dequantize_to_our_weights_exactly(symmetric):
    torch.manual_seed(0)
    q = quantize(torch.randn(48, 128), QuantScheme(bits=4, group_size=32, symmetric=symmetric))
    tensors = to_awq("l", q)
    assert tensors["l.qweight"].shape == (128, 6) and tensors["l.qzeros"].shape == (4, 6)
    assert tensors["l.scales"].shape == (4, 48) and tensors["l.scales"].dtype == torch.float16
    assert torch.equal(from_awq(tensors, "l", 32), q.dequantize())


def test_layouts_awq_cannot_hold_are_refused_by_name():
    w = torch.randn(16, 96)
    with pytest.raises(CompressError, match="'x' \\[16, 96\\] does not split into groups of 64"):
        to_awq("x", quantize(w, QuantScheme(bits=4, group_size=64)))
    with pytest.raises(CompressError, match="'x' is 8-bit"):
        to_awq("x", quantize(w, QuantScheme(bits=8, group_size=32)))
    with pytest.raises(CompressError, match="float zero points"):
        to_awq("x", quantize(w, QuantScheme(bits=4, group_size=32, zero_point="float")))
    with pytest.raises(CompressError, match="'x' is on the IQ4_NL codebook"):
        to_awq("x", quantize(w, QuantScheme(layout="IQ4_NL")))


def test_awq_then_hf_awq_export_in_a_recipe(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_checkpoint('minicpm')}\n"
        "data: {eval_tokens: 512, eval_window: 128, calibration_samples: 4, sequence_length: 128}\n"
        "stages:\n  - awq: {bits: 4, group_size: 32, symmetric: true}\n  - hf_awq: {gate: {max_kld: 0.01}}\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    awq, export = manifest["stages"][1], manifest["stages"][2]
    # the read-back checkpoint behaves like the gated model (only float16 rounding of the other tensors)
    assert abs(export["metrics"]["ppl"] - awq["metrics"]["ppl"]) / awq["metrics"]["ppl"] < 0.01
    config = json.loads((tmp_path / "o/hf-awq/config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": None}
    tensors = load_file(str(tmp_path / "o/hf-awq/model.safetensors"))
    assert "model.layers.0.mlp.up_proj.qweight" in tensors and "model.layers.0.mlp.up_proj.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" not in tensors
    paths = {a["path"] for a in manifest["artifacts"]}
    assert "hf-awq/model.safetensors" in paths and "quantized.safetensors" in paths
