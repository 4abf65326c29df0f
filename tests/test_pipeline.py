import dataclasses
import json

import pytest
from click.testing import CliRunner

from minicpm_compress.cli import main
from minicpm_compress.stages import STAGES

SMALL_DATA = "data: {eval_tokens: 512, eval_window: 128, evaluation: [austen-heldout]}\n"


def _recipe(tmp_path, model, stages: str, name="r") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {model}\n{SMALL_DATA}stages:\n{stages}")
    return str(path)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_failed_gate_exits_3_and_nothing_after_it_runs(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("minicpm")
    recipe = _recipe(tmp_path, model, "  - rtn: {bits: 4, group_size: 32, gate: {max_kld: 0.0}}\n  - rtn: {bits: 8}\n")
    out = tmp_path / "out"
    result = _run("run", recipe, "--out", out)
    assert result.exit_code == 3
    assert "error: gate failed after stage 1 'rtn': KL divergence" in result.stderr
    manifest = _manifest(out)
    assert manifest["status"] == "failed"
    assert [s["name"] for s in manifest["stages"]] == ["load", "rtn"]  # the int8 stage never ran
    assert manifest["stages"][1]["gate_passed"] is False and manifest["stages"][1]["metrics"]["kld"] > 0
    assert not (out / "model").exists() and manifest["artifacts"] == []  # no artifact from a failed run


def test_a_crash_leaves_no_output_and_keeps_the_old_one(tmp_path, tiny_checkpoint, monkeypatch):
    def boom(*_args):
        raise RuntimeError("stage crashed")

    monkeypatch.setitem(STAGES, "rtn", dataclasses.replace(STAGES["rtn"], handler=boom))
    recipe = _recipe(tmp_path, tiny_checkpoint("llama"), "  - rtn: {}\n")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _run("run", recipe, "--out", out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    out.mkdir()
    (out / "keep.txt").write_text("old result")
    (out / "manifest.json").write_text('{"tool": {"name": "minicpm-compress"}}')  # an earlier output of ours
    result = _run("run", recipe, "--out", out)
    assert result.exit_code == 2 and "output folder exists and is not empty" in result.stderr
    with pytest.raises(RuntimeError):
        _run("run", recipe, "--out", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json"]


def test_same_recipe_twice_gives_identical_manifests_and_artifacts(tmp_path, tiny_checkpoint):
    recipe = _recipe(tmp_path, tiny_checkpoint("minicpm"), "  - rtn: {bits: 4, group_size: 32, symmetric: true}\n"
                                                            "  - coreml: {bits: 4, context: 32}\n")
    manifests = []
    for name in ("a", "b"):
        assert _run("run", recipe, "--out", tmp_path / name).exit_code == 0
        manifest = _manifest(tmp_path / name)
        for stage in manifest["stages"]:
            stage.pop("wall_s")
        manifests.append(manifest)
    assert manifests[0] == manifests[1]
    paths = {a["path"] for a in manifests[0]["artifacts"]}
    assert paths >= {"config.json", "quantized.safetensors", "coreml-int4/model.mlpackage/Manifest.json",
                     "coreml-int4/model.mlpackage/Data/com.apple.CoreML/model.mlmodel"}
    assert not any(p.startswith("model/") for p in paths)  # the float model is referenced, not copied
    assert (tmp_path / "a/report.md").read_text().split("## Recipe")[1] == (tmp_path / "b/report.md").read_text().split("## Recipe")[1]


def test_an_output_folder_is_a_model_for_the_next_command(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("minicpm")
    recipe = _recipe(tmp_path, source, "  - rtn: {bits: 4, group_size: 32}\n")
    assert _run("run", recipe, "--out", tmp_path / "q").exit_code == 0
    quantized = _manifest(tmp_path / "q")["stages"][1]["metrics"]
    assert quantized["kld"] > 0

    # evaluating the folder measures the quantized model against the original float model
    result = _run("eval", "--model", tmp_path / "q", "--eval-tokens", 512, "--out", tmp_path / "e",
                  "--evaluation", "austen-heldout")
    assert result.exit_code == 0, result.stderr
    manifest = _manifest(tmp_path / "e")
    assert manifest["reference"] == str(source.resolve())
    assert manifest["stages"][0]["details"]["quantized_linears"] == 14
    # eval uses windows of 512, the rtn run 128: same model, same reference, other windows
    assert manifest["stages"][0]["metrics"]["kld"] > 0 and manifest["artifacts"] == []

    # and the same windows give the very same numbers
    again = _recipe(tmp_path, tmp_path / "q", "  - evaluate: {}\n", name="again")
    assert _run("run", again, "--out", tmp_path / "e2").exit_code == 0
    assert _manifest(tmp_path / "e2")["stages"][0]["metrics"] == quantized


def test_manifest_records_settings_metrics_gates_and_artifacts(tmp_path, tiny_checkpoint):
    recipe = _recipe(tmp_path, tiny_checkpoint("llama"),
                     "  - rtn: {bits: 8, group_size: null, symmetric: true, gate: {max_ppl_increase: 0.5}}\n")
    assert _run("run", recipe, "--out", tmp_path / "o").exit_code == 0
    m = _manifest(tmp_path / "o")
    assert m["tool"]["name"] == "minicpm-compress" and m["status"] == "passed"
    rtn = m["stages"][1]
    assert rtn["settings"] == {"bits": 8, "group_size": None, "symmetric": True, "zero_point": "int",
                               "super_block": None, "scale_bits": None, "codebook": None, "scale_dtype": "float16"}
    assert rtn["gate"]["max_ppl_increase"] == 0.5 and rtn["gate_passed"] is True
    assert set(rtn["metrics"]) >= {"ppl", "kld", "top1", "ppl_increase", "ref_ppl", "tokens"}
    for artifact in m["artifacts"]:
        path = tmp_path / "o" / artifact["path"]
        assert path.stat().st_size == artifact["bytes"] and len(artifact["sha256"]) == 64
    assert m["memory_estimate"]["weights_bytes"] > 0 and m["memory_estimate"]["kv_cache_bytes"] > 0
    report = (tmp_path / "o/report.md").read_text()
    assert "| 1 | rtn | int8 per-channel sym |" in report and "## Memory estimate" in report


def test_exporters_of_one_model_share_its_torch_smoke_test(tmp_path, tiny_checkpoint, monkeypatch):
    from minicpm_compress.evaluate import greedy

    computed = []

    def counting(tokenizer, runner, by, **kwargs):
        computed.append(by)
        return real(tokenizer, runner, by, **kwargs)

    real = greedy.smoke_test
    monkeypatch.setattr(greedy, "smoke_test", counting)
    stages = ("  - rtn: {bits: 4, group_size: 32, symmetric: true}\n  - gguf: {type: Q4_0}\n  - gguf: {type: Q8_0}\n"
              "  - rtn: {bits: 8, group_size: 32, symmetric: true}\n  - gguf: {type: Q8_0}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {tiny_checkpoint('llama')}\ncache: false\n{SMALL_DATA}stages:\n{stages}")
    result = _run("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    # once for the int4 model (two exports), once again after the int8 rtn changed the model
    assert [by for by in computed if by == "the gated model in torch"] == ["the gated model in torch"] * 2
    smokes = [s["details"]["smoke_test"] for s in _manifest(tmp_path / "out")["stages"] if s["name"] == "gguf"]
    assert len(smokes) == 3 and smokes[0]["torch_tokens"] == smokes[1]["torch_tokens"]
    assert all(len(s["torch_tokens"]) == len(s["tokens"]) for s in smokes)
