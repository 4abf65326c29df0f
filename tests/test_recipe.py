from pathlib import Path

import pytest

from minicpm_compress.errors import CompressError
from minicpm_compress.recipe import build_recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    names = [name for name, _ in recipe.stage_list()]
    assert names[0] == "load" and len(names) >= 2


def _error(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(CompressError) as err:
        load_recipe(path)
    return str(err.value)


def test_wrong_type_names_file_line_key_and_expectation(tmp_path):
    msg = _error(tmp_path, "model: minicpm-smollm2\nstages:\n  - rtn: {bits: 7}\n")
    assert msg == f"{tmp_path}/r.yaml:3: stages[0].rtn.bits: Input should be 2, 3, 4, 5, 6 or 8 (got 7)"
    # a check across settings blames its key too: 3 bits need a K-quant grid
    msg = _error(tmp_path, "model: minicpm-smollm2\nstages:\n  - rtn:\n      group_size: 32\n      bits: 3\n")
    assert msg == f"{tmp_path}/r.yaml:5: stages[0].rtn.bits: 3-bit codes exist on a K-quant grid only (layout: Q3_K)"


def test_unknown_key_and_unknown_stage(tmp_path):
    msg = _error(tmp_path, "model: minicpm-smollm2\nstages:\n  - rtn:\n      bitz: 4\n  - awqq: {}\n")
    assert f"{tmp_path}/r.yaml:4: stages[0].rtn.bitz: unknown key 'bitz'" in msg
    assert f"{tmp_path}/r.yaml:5: stages[1].awqq: unknown stage 'awqq' (known: awq, coreml, evaluate, executorch, gguf, gptq, heal, heal_layers, hf_awq, load, onnx, prune, qat, rtn)" in msg
    msg = _error(tmp_path, "model: minicpm-smollm2\ncolour: blue\nstages: [rtn]\n")
    assert msg == f"{tmp_path}/r.yaml:2: colour: unknown key 'colour'"


def test_missing_key_missing_model_and_missing_file(tmp_path):
    assert _error(tmp_path, "stages: [rtn]\n") == f"{tmp_path}/r.yaml:1: model: missing required key 'model'"
    msg = _error(tmp_path, "model: ./no/such/folder\nstages: [rtn]\n")
    assert msg.startswith(f"{tmp_path}/r.yaml:1: model: './no/such/folder' is not a built-in model")
    msg = _error(tmp_path, "model: minicpm-smollm2\ndata:\n  evaluation: [held.txt]\nstages: [rtn]\n")
    assert msg.startswith(f"{tmp_path}/r.yaml:3: data.evaluation[0]: 'held.txt' is not a built-in text set")


def test_yaml_problems(tmp_path):
    assert "duplicate key 'model'" in _error(tmp_path, "model: a\nmodel: b\nstages: [rtn]\n")
    assert _error(tmp_path, "model: [unclosed\n").startswith(f"{tmp_path}/r.yaml:2: not valid YAML")
    assert "is a mapping" in _error(tmp_path, "- just\n- a list\n")
    assert "cannot read recipe" in str(pytest.raises(CompressError, load_recipe, tmp_path / "absent.yaml").value)


def test_gate_values_are_checked(tmp_path):
    msg = _error(tmp_path, "model: minicpm-smollm2\nstages:\n  - rtn: {gate: {min_top1: 1.5}}\n")
    assert msg == f"{tmp_path}/r.yaml:3: stages[0].rtn.gate.min_top1: Input should be less than or equal to 1 (got 1.5)"


def test_cli_recipes_are_the_same_objects():
    built = build_recipe(model="minicpm-smollm2", stages=[{"rtn": {"bits": 8, "group_size": None}}])
    assert [n for n, _ in built.stage_list()] == ["load", "rtn"]
    assert built.resolved()["stages"][1]["rtn"]["bits"] == 8
    with pytest.raises(CompressError, match="command line: stages\\[0\\].rtn.bits"):
        build_recipe(model="minicpm-smollm2", stages=[{"rtn": {"bits": 3}}])  # 3 bits: K-quant grids only
