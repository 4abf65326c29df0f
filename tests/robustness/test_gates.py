"""A failing gate, on every kind of stage: exit 3, no artifact anywhere, an earlier output kept intact."""

import json

import pytest

from .conftest import cli, leftovers, write_recipe

FAIL = "gate: {max_kld: 0.0}"  # every stage below changes the model (or measures a changed one)
BEFORE = {"": "", "rtn": "  - rtn: {bits: 4, group_size: 32}\n", "prune": "  - prune: {ratio: 0.25}\n"}

STAGE_KINDS = {
    # stage kind: (stages before it, the gated stage)
    "rtn": ("", "rtn: {bits: 4, group_size: 32, %s}"),
    "awq": ("", "awq: {bits: 4, group_size: 32, %s}"),
    "gptq": ("", "gptq: {bits: 4, group_size: 32, %s}"),
    "qat": ("", "qat: {bits: 4, group_size: 32, symmetric: true, steps: 2, samples: 4, sequence_length: 64, %s}"),
    "prune": ("", "prune: {ratio: 0.25, %s}"),
    "heal": ("prune", "heal: {steps: 2, samples: 4, sequence_length: 64, %s}"),
    "evaluate": ("rtn", "evaluate: {%s}"),
    "gguf": ("rtn", "gguf: {type: Q4_0, %s}"),
    "onnx": ("rtn", "onnx: {bits: 4, %s}"),
    "coreml": ("rtn", "coreml: {bits: 4, block_size: 32, context: 64, %s}"),
    "hf_awq": ("rtn", "hf_awq: {%s}"),
}


def _previous_output(out):
    out.mkdir()
    (out / "model-Q4_0.gguf").write_bytes(b"the good file from yesterday")
    (out / "manifest.json").write_text('{"tool": {"name": "minicpm-compress"}, "status": "passed"}')
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("kind", sorted(STAGE_KINDS))
def test_failed_gate_writes_no_artifact_and_keeps_the_previous_output(tmp_path, checkpoint, kind):
    before, stage = STAGE_KINDS[kind]
    recipe = write_recipe(tmp_path, checkpoint, BEFORE[before] + "  - " + stage % FAIL + "\n")
    out = tmp_path / "out"
    previous = _previous_output(out)

    result = cli("run", recipe, "--out", out, "--overwrite")
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"'{kind}': KL divergence" in errors[0] and "left as it was" in errors[0]
    assert "Traceback" not in result.stderr

    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous  # untouched, byte for byte
    record = tmp_path / "out.failed"
    assert sorted(p.name for p in record.iterdir()) == ["manifest.json", "report.html", "report.md"]  # no artifact
    manifest = json.loads((record / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["artifacts"] == []
    assert manifest["stages"][-1]["name"] == kind and manifest["stages"][-1]["gate_passed"] is False
    assert leftovers(out) == [] and leftovers(record) == []


def test_failed_export_into_a_new_folder_leaves_only_its_record(tmp_path, checkpoint):
    recipe = write_recipe(tmp_path, checkpoint, BEFORE["rtn"] + "  - " + STAGE_KINDS["gguf"][1] % FAIL + "\n")
    out = tmp_path / "out"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 3, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.html", "report.md"]  # no model-Q4_0.gguf
    assert not (tmp_path / "out.failed").exists()
    assert json.loads((out / "manifest.json").read_text())["artifacts"] == []
