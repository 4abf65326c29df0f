"""The `executorch` stage end to end on a tiny checkpoint: our codes in the .pte, measured in ExecuTorch."""

import json
import subprocess
import sys

import pytest

from minicpm_compress.errors import CompressError
from minicpm_compress.export.executorch.stage import ExecuTorchConfig, program_model, refuse_zero_points
from minicpm_compress.handoff import HANDOFF_NAME
from minicpm_compress.models.source import ModelSource
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.recipe import build_recipe
from minicpm_compress.state import ModelState

from ...conftest import tiny_model
from ...handoff.test_snippets import run_by_tests

DATA = {"eval_tokens": 512, "eval_window": 128}


def test_symmetric_bfloat16_codes_go_in_exactly_and_are_measured_in_the_runtime(tmp_path, tiny_checkpoint):
    recipe = build_recipe(model=str(tiny_checkpoint("llama")), data=DATA, stages=[
        {"rtn": {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"}},
        {"executorch": {"bits": 4, "context": 64}}])
    _load, rtn, et = run_recipe(recipe, tmp_path / "o").stages
    d = et.details
    assert d["linears"] == {"lossless": 14, "requantized": 0}  # 2 layers × 7 linears, every code carried
    assert d["context"] == 128  # raised to the evaluation window
    assert d["embeddings"] == "int8"
    # the program computes what torch computes with the same codes and int8 activations, but for activation
    # codes that float summation order rounds the other way (test_program.py shows the weights are exact)
    assert d["against_torch"]["top1_agreement"] >= 0.9
    assert d["against_torch"]["max_abs_logit_difference"] <= 0.1 * d["against_torch"]["largest_abs_logit"]
    # measured in the runtime: the int8 activations and int8 table cost a little against the gated model
    assert et.metrics.kld < rtn.metrics.kld + 0.1 and et.metrics.top1 > rtn.metrics.top1 - 0.15
    assert d["smoke_test"]["torch_agrees"] >= 1
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    files = {a["path"] for a in manifest["artifacts"]}
    assert {"executorch-int4/model.pte", "executorch-int4/tokenizer.json"} <= files
    pte = tmp_path / "o/executorch-int4/model.pte"
    assert pte.read_bytes()[4:8] == b"ET12"  # an ExecuTorch flatbuffer program
    # the hand-off card's Python snippet runs as printed and continues like the stage's smoke test
    card = (tmp_path / "o" / HANDOFF_NAME).read_text()
    [(name, code)] = [(n, c) for n, c in run_by_tests(card) if n == "executorch-int4/"]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "o", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == d["smoke_test"]["text"] + "\n"
    assert "ExecuTorch LLM runner (Android, Kotlin; untested here)" in card


def test_zero_point_codes_are_refused_by_name_unless_requantizing_is_asked_for(tmp_path, tiny_checkpoint, tokenizer):
    model = str(tiny_checkpoint("llama"))
    stages = [{"rtn": {"bits": 4, "group_size": 32}}, {"executorch": {"bits": 4, "context": 64}}]
    with pytest.raises(CompressError, match=r"'model\.layers\.0\.self_attn\.q_proj' has zero points"):
        run_recipe(build_recipe(model=model, data=DATA, stages=stages), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # asked to requantize, every linear goes through RTN's symmetric bfloat16 codes (counted; the lowering and
    # the runtime are the first test's)
    state = ModelState.of(tiny_model("llama"), tokenizer, ModelSource("tiny", None, "tiny"))
    for name in state.linear_names():
        state.qweights[name] = quantize(state.tensor(f"{name}.weight"), QuantScheme(bits=4, group_size=32))
    config = ExecuTorchConfig(bits=4, zero_points="requantize")
    refuse_zero_points(state, config)
    assert program_model(state, config)[1] == {"lossless": 0, "requantized": 14}
