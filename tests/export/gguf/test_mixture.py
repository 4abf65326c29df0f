"""`gguf --type auto`: a mixture of types to a size, chosen by measured error, written exactly as planned."""

import json

import numpy as np
import pytest
from gguf import GGUFReader

from minicpm_compress.errors import CompressError
from minicpm_compress.export.gguf.stage import GGUFConfig
from minicpm_compress.export.gguf.mixture import fitting_types, tensor_bytes
from minicpm_compress.sizes import parse_size
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.quant.budget import climb
from minicpm_compress.recipe import build_recipe

from ...conftest import WIDE

DATA = {"calibration_samples": 4, "sequence_length": 64, "eval_tokens": 1024}


def _run(tmp_path, model, stages, name):
    run_recipe(build_recipe(model=str(model), data=DATA, stages=stages), tmp_path / name)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    return manifest["stages"][-1], tmp_path / name


def _file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_sizes_and_settings_are_read_and_checked():
    assert parse_size("90MiB") == 90 * 2**20
    assert parse_size("94.5 MB") == 94_500_000
    assert parse_size(1000) == parse_size("1000") == 1000
    with pytest.raises(ValueError, match="'ninety' is not a number"):
        parse_size("ninety")
    with pytest.raises(ValueError, match="needs one of target_size or target_bits"):
        GGUFConfig(type="auto")
    with pytest.raises(ValueError, match="apply to type auto only"):
        GGUFConfig(type="Q4_K", target_bits=5)
    with pytest.raises(ValueError, match="IQ4_XS not among"):  # a type none of our quantizers fills
        GGUFConfig(type="auto", target_bits=5, candidates=["Q4_0", "IQ4_XS"])
    assert GGUFConfig(type="auto", target_bits=5, candidates=["IQ4_NL", "Q4_0"]).candidates == ["Q4_0", "IQ4_NL"]
    # 576-wide rows (the built-in models) split into 32-wide blocks only
    assert fitting_types(576, ("Q4_0", "Q4_K", "Q8_0", "Q6_K")) == ["Q4_0", "Q8_0"]
    assert fitting_types(1536, ("Q4_0", "Q4_K")) == ["Q4_0", "Q4_K"]


def test_the_climb_buys_the_most_error_per_byte_within_the_budget():
    costs = {"a": [10, 20, 40], "b": [10, 15, 30], "c": [100, 150]}
    errors = {"a": [1.0, 0.2, 0.1], "b": [0.5, 0.45, 0.0], "c": [0.3, 0.0]}
    # a→1 removes 0.08/byte; b→2 0.025; c→1 0.006; a→2 after a→1 0.005; b→1 0.01
    assert climb(costs, errors, 120) == {"a": 0, "b": 0, "c": 0}  # nothing fits beyond the floor
    assert climb(costs, errors, 130) == {"a": 1, "b": 0, "c": 0}
    assert climb(costs, errors, 150) == {"a": 1, "b": 2, "c": 0}
    chosen = climb(costs, errors, 1000)
    assert chosen == {"a": 2, "b": 2, "c": 1}
    assert sum(costs[n][chosen[n]] for n in costs) <= 1000


def test_auto_fits_the_target_exactly_as_planned_and_records_every_tensor(tmp_path, tiny_checkpoint):
    """Two targets on the same model: each file is at most its target and exactly its planned size; the
    manifest's per-tensor types are the file's; the larger budget buys more bits and a lower error."""
    model = tiny_checkpoint("llama", **WIDE)
    outcomes = {}
    for bits in (5.7, 7.5):
        stage, out = _run(tmp_path, model, [{"gguf": {"type": "auto", "target_bits": bits}}], f"auto-{bits}")
        mixture = stage["details"]["mixture"]
        size = (out / "model-auto.gguf").stat().st_size
        assert size == mixture["planned_bytes"] <= mixture["target_bytes"]
        types = _file_types(out / "model-auto.gguf")
        recorded = mixture["tensors"]
        assert len(recorded) == 15  # 14 decoder linears and the tied embedding / head
        assert types["token_embd.weight"] == recorded["model.embed_tokens.weight"]["type"]
        assert types["blk.1.ffn_down.weight"] == recorded["model.layers.1.mlp.down_proj.weight"]["type"]
        assert sum(mixture["types"].values()) == 15
        assert stage["details"]["tensors"]["requantized"] == 15  # no stage before: GPTQ / RTN made every code
        outcomes[bits] = stage
    lean, roomy = outcomes[5.7], outcomes[7.5]
    assert lean["details"]["bits_per_weight"] < roomy["details"]["bits_per_weight"]
    assert roomy["details"]["mixture"]["predicted_kld"] < lean["details"]["mixture"]["predicted_kld"]
    sensitivity = lean["details"]["mixture"]["sensitivity"]
    assert set(sensitivity) == {"head", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all(v > 0 for v in sensitivity.values())
    assert roomy["metrics"]["kld"] < lean["metrics"]["kld"]  # measured in llama.cpp


def test_a_stages_own_codes_go_into_the_file_where_their_type_is_chosen(tmp_path, tiny_checkpoint):
    """gptq on the Q4_K grid, then auto choosing among Q4_K and Q8_0 with room for three linears' Q8_0 beyond
    all-Q4_K: every linear left at Q4_K holds gptq's codes, byte for byte as the plain Q4_K export writes them."""
    model = tiny_checkpoint("llama", **WIDE)
    gptq = {"gptq": {"layout": "Q4_K"}}
    plain, plain_out = _run(tmp_path, model, [gptq, {"gguf": {"type": "Q4_K"}}], "plain")
    embedding = (49152, 256)  # Q8_0 in the plain file
    all_q4k = (plain_out / "model-Q4_K.gguf").stat().st_size - tensor_bytes(embedding, "Q8_0") + tensor_bytes(
        embedding, "Q4_K")
    room = 3 * (tensor_bytes((256, 256), "Q8_0") - tensor_bytes((256, 256), "Q4_K"))
    stage, out = _run(tmp_path, model, [gptq, {"gguf": {"type": "auto", "target_size": all_q4k + room,
                                                        "candidates": ["Q4_K", "Q8_0"]}}], "auto")
    tensors = stage["details"]["mixture"]["tensors"]
    own = [n for n, t in tensors.items() if t["codes"] == "own"]
    assert 8 <= len(own) <= 14 and all(tensors[n]["type"] == "Q4_K" for n in own)
    assert stage["details"]["tensors"]["lossless"] == len(own)
    before = {t.name: np.array(t.data) for t in GGUFReader(plain_out / "model-Q4_K.gguf").tensors}
    after = {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(out / "model-auto.gguf").tensors}
    same = [n for n, (kind, data) in after.items() if kind == "Q4_K" and np.array_equal(data, before[n])]
    assert len(same) == len(own)


def test_a_target_below_the_smallest_types_is_a_clear_error(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("llama", **WIDE)
    with pytest.raises(CompressError, match=r"gguf auto: the target leaves .* MiB for quantized tensors; the "
                                            r"smallest candidate types need .* MiB"):
        _run(tmp_path, model, [{"gguf": {"type": "auto", "target_bits": 3.0}}], "small")
    assert not (tmp_path / "small").exists()
