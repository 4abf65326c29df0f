import json

import pytest

from minicpm_compress.errors import CompressError
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.quant.budget import BudgetConfig, choose_promotions, promotions
from minicpm_compress.quant.gptq import GPTQConfig
from minicpm_compress.quant.qweight import QuantScheme
from minicpm_compress.recipe import build_recipe

from ..conftest import EXACT_ONNX

G128 = QuantScheme(bits=4, group_size=128)


def test_the_budget_buys_the_most_error_per_bit_and_is_not_exceeded():
    shapes = {"big": (512, 512), "small": (64, 512), "mid": (256, 512), "useless": (64, 512)}
    errors4 = {"big": 0.05, "small": 0.04, "mid": 0.03, "useless": 0.001}
    errors8 = {"big": [0.001], "small": [0.001], "mid": [0.001], "useless": [0.001]}
    base = G128.bits_per_weight(512)
    total = sum(o * i for o, i in shapes.values())
    small_cost = 64 * 512 * 4 / total  # the 4 extra code bits (and zero bits) of "small", per weight of all
    chosen, average = choose_promotions(BudgetConfig(target_bits=base + 1.2 * small_cost), G128, shapes, errors4,
                                        errors8)
    assert chosen == {"small": 0}  # the largest error removed per bit; "big" removes more but does not fit
    assert base < average <= base + 1.2 * small_cost
    everything, average = choose_promotions(BudgetConfig(target_bits=9), G128, shapes, errors4, errors8)
    assert set(everything) == {"big", "small", "mid"}  # no gain, no promotion
    with pytest.raises(CompressError, match="target_bits 4.0 is below the 4.156 bits/weight of int4 g128 asym"):
        choose_promotions(BudgetConfig(target_bits=4.0), G128, shapes, errors4, errors8)


def test_a_k_quant_budget_climbs_the_ladder_where_a_bit_buys_most():
    """Q4_K → Q5_K → Q6_K → Q8_0: each linear goes up as far as the error it removes per bit justifies."""
    q4k = QuantScheme(layout="Q4_K")
    assert [s.layout for s in promotions(q4k)] == ["Q5_K", "Q6_K", "Q8_0"]
    shapes = {"sensitive": (256, 512), "mild": (256, 512), "flat": (256, 512)}
    errors = {"sensitive": 0.08, "mild": 0.02, "flat": 0.01}
    errors_up = {"sensitive": [0.03, 0.01, 0.001], "mild": [0.008, 0.004, 0.0005], "flat": [0.0099, 0.0098, 0.0097]}
    # per extra bit: sensitive→Q5_K removes 0.05, then →Q6_K 0.019, mild→Q5_K 0.012, sensitive→Q8_0 0.0046
    chosen, average = choose_promotions(BudgetConfig(target_bits=5.5), q4k, shapes, errors, errors_up)
    assert chosen == {"sensitive": 1} and average <= 5.5  # mild's Q5_K (1 bit) no longer fits after Q6_K
    roomy, average = choose_promotions(BudgetConfig(target_bits=6.5), q4k, shapes, errors, errors_up)
    assert roomy["sensitive"] == 2 and roomy["mild"] == 0 and average <= 6.5
    lean, lean_average = choose_promotions(BudgetConfig(target_bits=4.9), q4k, shapes, errors, errors_up)
    assert lean == {"sensitive": 0} and lean_average <= 4.9  # one rung (Q5_K) is all that fits


def test_budget_settings_are_checked():
    with pytest.raises(ValueError, match="bits: 4 only"):
        GPTQConfig(bits=8, target_bits=8.5)
    with pytest.raises(ValueError, match="not both"):
        GPTQConfig(int8_linears=2, target_bits=4.5)


def test_a_bit_budget_is_kept_by_the_stage_and_every_exporter(tmp_path, tiny_checkpoint):
    """int4 g32 symmetric with a budget of 5 bits/weight: the linears kept at int8 (g32 symmetric) stay Q8_0 in a
    Q4_0 file, 8-bit MatMulNBits in ONNX and int8 constants in Core ML (none is requantized), and float16
    linears that AWQ loaders do not convert in a Hugging Face AWQ checkpoint."""
    scheme = {"group_size": 32, "symmetric": True}
    recipe = build_recipe(model=str(tiny_checkpoint("llama")), data={"calibration_samples": 4, "eval_tokens": 512},
                          stages=[{"gptq": {**scheme, "target_bits": 5.0}}, {"gguf": {"type": "Q4_0"}},
                                  {"onnx": {"bits": 4, "block_size": 32, **EXACT_ONNX}},
                                  {"coreml": {"bits": 4, "block_size": 32, "context": 64}}, {"hf_awq": {}}])
    run_recipe(recipe, tmp_path / "o")
    gptq, gguf_stage, onnx, coreml, hf = json.loads((tmp_path / "o/manifest.json").read_text())["stages"][1:]
    int8 = gptq["details"]["int8_linears"]
    assert int8 and 4.5 < gptq["details"]["linear_bits_per_weight"] <= 5.0
    assert gguf_stage["details"]["tensors"] == {"lossless": 14, "requantized": 0, "float": 0}
    assert onnx["details"]["linears"] == {"lossless": 14, "requantized": 0}
    assert coreml["details"]["linears"]["lossless"] == 14
    assert hf["details"]["not_converted_linears"] == sorted(int8)
    hf_config = json.loads((tmp_path / "o/hf-awq/config.json").read_text())["quantization_config"]
    assert hf_config["modules_to_not_convert"] == sorted(int8)
    for export in (gguf_stage, onnx, hf):  # measured in their runtimes / read back: the budgeted model's loss
        assert abs(export["metrics"]["kld"] - gptq["metrics"]["kld"]) < 0.1 * gptq["metrics"]["kld"] + 2e-3

    import gguf

    reader = gguf.GGUFReader(tmp_path / "o/model-Q4_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    expected = {f"blk.{n.split('.')[2]}.{gguf_name[n.split('.', 3)[3]]}.weight" for n in int8}
    assert {n for n, t in types.items() if t == "Q8_0" and n.startswith("blk.")} == expected


def test_a_k_quant_budget_reaches_the_gguf_file_rung_by_rung(tmp_path, tiny_checkpoint):
    """GPTQ on Q4_K with 5.2 bits/weight: promoted linears keep their own layout (Q5_K, Q6_K or Q8_0) in the
    Q4_K file, every tensor copied."""
    from gguf import GGUFReader

    from ..conftest import WIDE

    recipe = build_recipe(model=str(tiny_checkpoint("llama", **WIDE)),
                          data={"calibration_samples": 4, "sequence_length": 64, "eval_tokens": 512},
                          stages=[{"gptq": {"layout": "Q4_K", "target_bits": 5.2}}, {"gguf": {"type": "Q4_K"}}])
    run_recipe(recipe, tmp_path / "o")
    gptq, gguf = json.loads((tmp_path / "o/manifest.json").read_text())["stages"][1:]
    promoted = gptq["details"]["promoted"]
    assert promoted and 4.5 < gptq["details"]["linear_bits_per_weight"] <= 5.2
    assert gguf["details"]["tensors"] == {"lossless": 14, "requantized": 0, "float": 0}
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "o/model-Q4_K.gguf").tensors}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for linear, described in promoted.items():
        layer, name = linear.removeprefix("model.layers.").split(".", 1)
        assert types[f"blk.{layer}.{names[name]}.weight"] == described.split()[0].replace("int8", "Q8_0")
    assert sorted(set(types.values()) - {"F32", "Q8_0"}) >= ["Q4_K"]
