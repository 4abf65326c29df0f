"""The streamed model state: one layer materialised at a time, exact against the whole model."""

import json

import pytest
import torch

from minicpm_compress.evaluate.evaluator import Evaluator
from minicpm_compress.models.source import ModelSource
from minicpm_compress.resolve import resolve_model
from minicpm_compress.quant.awq import AWQConfig, apply_awq
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.recipe import build_recipe
from minicpm_compress.stages import RunContext
from minicpm_compress.state import ModelState

from .conftest import tiny_model


def _open(folder) -> ModelState:
    return ModelState.open(resolve_model(str(folder)))


def test_a_layer_is_the_only_thing_materialised(tiny_checkpoint):
    state = _open(tiny_checkpoint("minicpm"))
    skeleton = state.skeleton()
    assert all(p.is_meta for p in skeleton.parameters())  # opening reads no weight
    with state.layer(1) as layer:
        real = {n for n, p in skeleton.named_parameters() if not p.is_meta}
        assert real == {f"model.layers.1.{n}" for n, _ in layer.named_parameters()} and len(real) == 9
    assert all(p.is_meta for p in skeleton.parameters())  # and released afterwards


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen3"])
def test_streamed_evaluation_equals_the_whole_model(model_type, tiny_checkpoint, tokenizer):
    folder = tiny_checkpoint(model_type)
    state = _open(folder)
    scheme = QuantScheme(bits=4, group_size=32)
    state.qweights = {n: quantize(state.tensor(f"{n}.weight"), scheme) for n in state.linear_names()}
    windows = torch.randint(0, 49152, (3, 64), generator=torch.Generator().manual_seed(0))
    whole = state.materialize()  # the reference, whole, through the old path
    streamed_ref = Evaluator.against(_open(folder), windows, batch_size=2)
    whole_ref = Evaluator.against(whole, windows, batch_size=2)
    torch.testing.assert_close(streamed_ref.reference.hidden, whole_ref.reference.hidden, atol=1e-5, rtol=1e-5)
    a = streamed_ref.measure(state)
    b = whole_ref.measure(state.evaluated_model())
    assert a.kld > 0.001 and abs(a.kld - b.kld) < 1e-6 and abs(a.ppl - b.ppl) / b.ppl < 1e-5 and a.top1 == b.top1


def _manifest(folder, artifacts, weights_sha256):
    """The smallest manifest the schema accepts (the loader validates every manifest it reads back)."""
    metrics = {"ppl": 1.0, "kld": 0.0, "top1": 1.0, "ref_ppl": 1.0, "tokens": 1, "ppl_increase": 0.0}
    stage = {"index": 0, "name": "awq", "settings": {}, "details": {}, "metrics": metrics, "gate": None,
             "gate_passed": None, "failures": [], "wall_s": 0.0}
    return {"tool": {"name": "minicpm-compress", "version": "test"}, "status": "passed", "model": None,
            "reference": str(folder), "recipe": {"name": "t", "data": {"evaluation": ["t"]}}, "stages": [stage],
            "artifacts": artifacts,
            "source": {"checkpoint": str(folder.resolve()), "weights_sha256": weights_sha256}}


def test_awq_keeps_scales_as_vectors_and_a_folder_round_trips(tmp_path, tiny_checkpoint):
    from minicpm_compress.manifest import write_model

    folder = tiny_checkpoint("llama")
    state = _open(folder)
    before = state.materialize()
    recipe = build_recipe(model=str(folder), data={"calibration_samples": 4, "sequence_length": 64},
                          stages=[{"awq": {"bits": 4, "group_size": 32}}])
    apply_awq(AWQConfig(bits=4, group_size=32), state, RunContext(recipe))
    ops = state.weights.ops
    assert ops and all(len(s.shape) == 1 for v in ops.values() for _, s in v)  # vectors, not weights
    assert not state.weights.overrides
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # folded scales keep the float function
        torch.testing.assert_close(state.materialize()(ids).logits, before(ids).logits, atol=2e-4, rtol=1e-4)

    out = tmp_path / "awq-out"
    out.mkdir()
    artifacts = write_model(state, out)
    (out / "manifest.json").write_text(json.dumps(_manifest(folder, artifacts, state.weights.base.fingerprint())))
    changes = (out / "modified.safetensors").stat().st_size
    assert changes < 0.05 * (folder / "model.safetensors").stat().st_size  # norms and scale vectors only
    again = _open(out)
    for name in state.weights.names():
        assert torch.equal(again.tensor(name), state.tensor(name)), name
    for name, q in state.qweights.items():
        assert torch.equal(again.qweights[name].codes, q.codes) and torch.equal(again.qweights[name].scales, q.scales)


def test_an_output_folder_names_a_moved_or_changed_source(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from minicpm_compress.cli import main

    folder = tiny_checkpoint("llama")
    run = CliRunner().invoke(main, ["rtn", "--model", str(folder), "--bits", "8", "--eval-tokens", "512",
                                    "--out", str(tmp_path / "q")])
    assert run.exit_code == 0, run.stderr
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4] + bytes(4))  # same size, other weights
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "q"), "--eval-tokens", "512",
                                       "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "weights changed since" in result.stderr and str(folder) in result.stderr
    folder.rename(tmp_path / "moved")
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "q"), "--eval-tokens", "512",
                                       "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "source checkpoint" in result.stderr and "missing" in result.stderr


def test_commit_keeps_only_what_changed(tokenizer):
    model = tiny_model("llama")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    changed = state.materialize()
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(2)
    state.commit(changed)
    assert list(state.weights.overrides) == ["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(state.tensor("model.layers.1.mlp.up_proj.weight"), model.model.layers[1].mlp.up_proj.weight * 2)


def test_a_stage_that_would_not_fit_in_memory_is_refused(tmp_path, tiny_checkpoint, monkeypatch):
    from click.testing import CliRunner

    from minicpm_compress import footprint
    from minicpm_compress.cli import main

    monkeypatch.setattr(footprint, "available_memory", lambda: 1 << 20)
    args = ["rtn", "--model", str(tiny_checkpoint("llama")), "--eval-tokens", "512", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 4 and "stage 'load' needs about" in result.stderr and "--no-memory-check" in result.stderr
    assert not (tmp_path / "o").exists()
    assert CliRunner().invoke(main, args + ["--no-memory-check"]).exit_code == 0


def test_devices():
    from minicpm_compress.devices import compute_device
    from minicpm_compress.errors import CompressError

    assert compute_device("auto", "float32") == ("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    assert compute_device("cpu", "bfloat16") == ("cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="no CUDA device"):
            compute_device("cuda")


def test_streamed_stages_never_build_the_whole_model(tmp_path, tiny_checkpoint, monkeypatch):
    """load, awq, rtn, evaluate, gguf and onnx work one layer / one tensor at a time."""
    from click.testing import CliRunner

    from minicpm_compress.cli import main

    def refuse(self, quantized=False):
        raise AssertionError("a streamed stage materialised the whole model")

    monkeypatch.setattr(ModelState, "materialize", refuse)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nmodel: {tiny_checkpoint('minicpm')}\n"
        "data: {eval_tokens: 512, eval_window: 128, calibration_samples: 4, sequence_length: 64}\n"
        "stages:\n  - awq: {bits: 4, group_size: 32, symmetric: true}\n  - rtn: {bits: 4, group_size: 32, symmetric: true}\n"
        "  - evaluate: {}\n  - gguf: {type: Q4_0}\n  - onnx: {bits: 4, accuracy_level: 0, embeddings: float}\n")
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    gguf, onnx = manifest["stages"][4], manifest["stages"][5]
    assert gguf["details"]["tensors"]["lossless"] == 14 and onnx["details"]["linears"] == {"lossless": 14, "requantized": 0}
    assert abs(onnx["metrics"]["kld"] - manifest["stages"][3]["metrics"]["kld"]) < 1e-4


def test_bfloat16_compute_runs_every_streamed_stage_and_stays_close(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from minicpm_compress.cli import main

    folder = tiny_checkpoint("llama")
    klds = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = CliRunner().invoke(main, ["awq", "--model", str(folder), "--bits", "4", "--group-size", "32",
                                           "--eval-tokens", "512", "--dtype", dtype, "--out", str(out)])
        assert result.exit_code == 0, result.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stages"][0]["details"]["dtype"] == dtype
        klds[dtype] = manifest["stages"][1]["metrics"]["kld"]
    assert 0 < klds["bfloat16"] < 1.5 * klds["float32"] + 0.01
