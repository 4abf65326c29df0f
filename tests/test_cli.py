import json

import pytest
import torch
from click.testing import CliRunner

from minicpm_compress.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_models_lists_the_builtins(minicpm_path):
    result = _run("models")
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "minicpm-smollm2" in result.output and "prepared" in result.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    result = _run("rtn", "--model", tmp_path / "nothing-here", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "is not a built-in model" in result.stderr
    result = _run("rtn", "--model", "minicpm-smollm2", "--group-size", "abc", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--group-size: expected an integer or 'channel'" in result.stderr
    assert not (tmp_path / "o").exists()
    result = _run("export", "gguf", "--model", "minicpm-smollm2", "--type", "auto", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "type auto needs one of target_size or target_bits" in result.stderr
    result = _run("export", "gguf", "--model", "minicpm-smollm2", "--type", "auto", "--target-size", "ninety MiB",
                  "--out", tmp_path / "o")
    assert result.exit_code == 2 and "size 'ninety MiB' is not a number" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "o").exists()


def test_ci_recipe_end_to_end_on_the_real_model(ci_output):
    """int4 RTN costs real perplexity on the pretrained MiniCPM-architecture model, int8 does not, AWQ
    takes back part of int4's loss, and the exported AWQ checkpoint and GGUF files measure like the
    gated model in their runtimes."""
    folder, result = ci_output
    assert result.exit_code == 0, result.stderr
    assert "awq" in result.stdout and "status: PASSED" in result.stdout
    stages = json.loads((folder / "manifest.json").read_text())["stages"]
    names = [s["name"] for s in stages]
    assert names == ["load", "rtn", "onnx", "rtn", "awq", "hf_awq", "gguf", "gguf", "qat", "gguf", "onnx", "coreml",
                     "evaluate"]
    int8, onnx8, int4, awq, exported, q4_0, q8_0, qat, qat_q4_0, onnx4, coreml4, zh = (
        s["metrics"] for s in stages[1:])
    assert abs(int8["ppl_increase"]) < 0.02 and int8["top1"] > 0.9
    assert int4["ppl_increase"] > 0.05 and int4["kld"] > 10 * int8["kld"]
    assert awq["kld"] < int4["kld"] and awq["ppl_increase"] < int4["ppl_increase"]
    assert abs(exported["ppl"] - awq["ppl"]) / awq["ppl"] < 0.005
    # GGUF, measured in llama.cpp: Q4_0 holds the AWQ codes themselves, Q8_0 is requantized from float
    assert stages[6]["details"]["tensors"] == {"lossless": 210, "requantized": 0, "float": 0}
    assert abs(q4_0["ppl"] - awq["ppl"]) / awq["ppl"] < 0.02 and q4_0["kld"] < 1.1 * awq["kld"]
    assert q8_0["ppl_increase"] < 0.02 and stages[7]["details"]["tensors"]["requantized"] == 210
    # QAT starts from every AWQ weight; six short steps must not make it worse; its codes export losslessly
    assert stages[8]["details"]["initialised_from"] == {"given": 210, "rtn": 0}
    assert qat["kld"] < 1.02 * awq["kld"]
    assert stages[9]["details"]["tensors"] == {"lossless": 210, "requantized": 0, "float": 0}
    assert abs(qat_q4_0["ppl"] - qat["ppl"]) / qat["ppl"] < 0.02
    # ONNX in onnxruntime: our int8 and int4 codes as MatMulNBits, the embedding table as int8 blocks shared
    # with the tied head, at the accuracy level that decoded faster here; measuring close to the gated torch
    # models (int8 activations at level 4 cost ~0.003 KLD on this model; the int8 table ~0.0002)
    for index in (2, 10):
        details = stages[index]["details"]
        assert details["linears"] == {"lossless": 210, "requantized": 0} and details["embeddings"] == "int8"
        assert details["accuracy_level"] in (0, 4) and set(details["accuracy_level_choice"]["decode_tokens_per_s"]) == {"0", "4"}
    assert abs(onnx8["ppl"] - int8["ppl"]) / int8["ppl"] < 0.01 and abs(onnx8["kld"] - int8["kld"]) < 0.006
    assert abs(onnx4["ppl"] - qat["ppl"]) / qat["ppl"] < 0.01 and abs(onnx4["kld"] - qat["kld"]) < 0.01
    size = sum(p.stat().st_size for p in (folder / "onnx-int4").glob("model.onnx*"))
    assert size < 0.6 * 184.8e6  # the int4 file with a float32 table was 184.8 MB
    assert (folder / "onnx-int4/genai_config.json").is_file() and (folder / "onnx-int4/tokenizer.json").is_file()
    # Core ML: the same codes as blockwise constants (+ an int8 embedding), read back and measured in torch
    details = stages[11]["details"]
    assert details["linears"] == {"lossless": 210, "requantized": 0, "embedding int8 per row": 1}
    assert details["quantized_constants"] == 211 and "read back" in details["measured"]
    assert abs(coreml4["ppl"] - qat["ppl"]) / qat["ppl"] < 0.01 and coreml4["kld"] < qat["kld"] + 0.01
    # this model's massive activations overflow float16 as it is; the power-of-two rewrite makes them fit, so
    # the package computes in float16, and run in float16 (torch) it stays within KLD 0.01 of float32
    assert "down_proj" in details["float16_check"]["overflow"] and details["float16_fit"]["fits"]
    assert details["precision"] == "float16" and details["float16_fit"]["stream_shift"] == 6
    assert details["float16_simulation"]["finite"] and details["float16_simulation"]["kld"] < 0.01
    assert details["bits_per_weight"] < 6 and (folder / "coreml-int4/model.mlpackage/Manifest.json").is_file()
    assert zh["tokens"] == 1022 and zh["ref_ppl"] != stages[0]["metrics"]["ref_ppl"]


def test_rtn_command_writes_a_composable_folder(tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    result = _run("rtn", "--model", tiny_checkpoint("qwen3"), "--bits", "4", "--group-size", "32",
                  "--eval-tokens", "512", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "quantized.safetensors").is_file()
    # rtn changes no float tensor: the folder references its source instead of copying it
    assert not (out / "model").exists() and not (out / "modified.safetensors").exists()
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["checkpoint"] == str(tiny_checkpoint("qwen3").resolve()) and len(source["weights_sha256"]) == 64
    assert "int4 g32 asym" in result.stdout


def test_export_gguf_from_an_output_folder(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("llama")
    assert _run("rtn", "--model", source, "--bits", "4", "--group-size", "32", "--symmetric",
                "--eval-tokens", "512", "--out", tmp_path / "q").exit_code == 0
    result = _run("export", "gguf", "--model", tmp_path / "q", "--type", "Q4_0", "--eval-tokens", "512",
                  "--out", tmp_path / "g")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "g/manifest.json").read_text())
    export = manifest["stages"][1]
    assert export["details"]["tensors"] == {"lossless": 14, "requantized": 0, "float": 0}
    assert manifest["reference"] == str(source.resolve())
    # measured in llama.cpp against the float original: the int4 loss, not more
    quantized = json.loads((tmp_path / "q/manifest.json").read_text())["stages"][1]["metrics"]
    assert abs(export["metrics"]["kld"] - quantized["kld"]) < 0.25 * quantized["kld"] + 1e-3
    [artifact] = manifest["artifacts"]
    assert artifact["path"] == "model-Q4_0.gguf" and (tmp_path / "g/model-Q4_0.gguf").stat().st_size == artifact["bytes"]


def test_export_coreml_from_an_output_folder(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("minicpm")
    assert _run("rtn", "--model", source, "--bits", "8", "--eval-tokens", "512", "--out", tmp_path / "q").exit_code == 0
    result = _run("export", "coreml", "--model", tmp_path / "q", "--bits", "8", "--context", "64",
                  "--eval-tokens", "512", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    details, metrics = manifest["stages"][1]["details"], manifest["stages"][1]["metrics"]
    assert details["linears"] == {"lossless": 14, "requantized": 0, "embedding int8 per row": 1}
    assert details["precision"] == "float16" and details["float16_check"]["overflow"] is None
    quantized = json.loads((tmp_path / "q/manifest.json").read_text())["stages"][1]["metrics"]
    assert abs(metrics["ppl"] - quantized["ppl"]) / quantized["ppl"] < 0.01  # + the int8 embedding only
    paths = {a["path"] for a in manifest["artifacts"]}
    assert "coreml-int8/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin" in paths
    assert "coreml-int8/tokenizer.json" in paths
    # in chunks (the int8 embedding kept packed while measured): the same weights, the same measurement
    chunked = _run("export", "coreml", "--model", tmp_path / "q", "--bits", "8", "--context", "64", "--chunks", "2",
                   "--eval-tokens", "512", "--out", tmp_path / "c2")
    assert chunked.exit_code == 0, chunked.stderr
    stage = json.loads((tmp_path / "c2/manifest.json").read_text())["stages"][1]
    assert stage["details"]["packages"] == ["embed.mlpackage", "head.mlpackage", "layers-0.mlpackage", "layers-1.mlpackage"]
    assert stage["details"]["linears"] == details["linears"]
    for key in ("ppl", "kld", "top1"):
        assert stage["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key


def test_export_coreml_float16_fits_what_it_can_and_refuses_what_it_cannot(tmp_path, tokenizer):
    from minicpm_compress.models.checkpoint import save_checkpoint

    from .conftest import tiny_model

    def export(weight: str, *options):
        model = tiny_model("llama")
        with torch.no_grad():
            model.get_submodule(f"model.layers.0.mlp.{weight}").weight.mul_(1e5)  # values beyond float16
        save_checkpoint(model, tokenizer, tmp_path / weight)
        out = tmp_path / f"out-{weight}{''.join(options)}"
        result = _run("export", "coreml", "--model", tmp_path / weight, *options, "--context", "64",
                      "--eval-tokens", "512", "--out", out)
        return result, out

    # down_proj writes the residual stream: scaling the stream by a power of two makes it fit
    fitted, out = export("down_proj", "--precision", "float16")
    assert fitted.exit_code == 0, fitted.stderr
    details = json.loads((out / "manifest.json").read_text())["stages"][1]["details"]
    assert details["precision"] == "float16" and details["float16_fit"]["stream_shift"] > 0
    # gate_proj feeds SiLU, which no scaling passes through: float16 is refused, auto falls back to float32
    forced, out = export("gate_proj", "--precision", "float16")
    assert forced.exit_code != 0 and not out.exists()
    assert forced.stderr.strip().splitlines()[-1].startswith("error: coreml: float16 compute would overflow")
    assert "no power-of-two rewrite fits it: 'model.layers.0.mlp.gate_proj' outputs values up to" in forced.stderr
    auto, out = export("gate_proj")
    assert auto.exit_code == 0, auto.stderr
    details = json.loads((out / "manifest.json").read_text())["stages"][1]["details"]
    assert details["precision"] == "float32" and details["float16_fit"]["fits"] is False


def test_ci_prune_recipe_end_to_end_on_the_real_model(tmp_path, minicpm_path):
    """prune → heal → awq → gguf: a smaller dense checkpoint that still goes through every later stage."""
    from minicpm_compress.models.checkpoint import read_config

    result = _run("run", "recipes/ci-prune.yaml", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "p/manifest.json").read_text())
    load, prune, heal, awq, gguf = manifest["stages"]
    assert 0.88 < prune["details"]["parameters_kept"] <= 0.9
    assert prune["details"]["units_after"] % 32 == 0 and prune["details"]["units_after"] < 1536
    assert read_config(tmp_path / "p")["intermediate_size"] == prune["details"]["units_after"]
    assert prune["metrics"]["ppl_increase"] > 0.01  # pruning costs something real
    assert heal["metrics"]["kld"] < prune["metrics"]["kld"]
    assert gguf["details"]["tensors"] == {"lossless": 210, "requantized": 0, "float": 0}
    assert abs(gguf["metrics"]["ppl"] - awq["metrics"]["ppl"]) / awq["metrics"]["ppl"] < 0.02


def test_prune_and_qat_commands_compose(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("minicpm")
    result = _run("prune", "--model", source, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "give exactly one of target_params" in result.stderr
    result = _run("prune", "--model", source, "--ratio", "0.4", "--correct-drift", "--heal-steps", "2",
                  "--eval-tokens", "512", "--max-ppl-increase", "5", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    stages = json.loads((tmp_path / "p/manifest.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["load", "prune", "heal"]
    assert stages[1]["details"]["units_after"] == 96 and stages[2]["gate"]["max_ppl_increase"] == 5.0 and stages[1]["gate"] is None
    assert stages[1]["details"]["correct_drift"] is True and stages[1]["details"]["refit"] is True
    assert _run("rtn", "--model", tmp_path / "p", "--bits", "4", "--group-size", "32", "--symmetric",
                "--eval-tokens", "512", "--out", tmp_path / "r").exit_code == 0
    result = _run("qat", "--model", tmp_path / "r", "--bits", "4", "--group-size", "32", "--symmetric",
                  "--steps", "2", "--batch-size", "1", "--sequence-length", "32", "--samples", "2",
                  "--eval-tokens", "512", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "q/manifest.json").read_text())
    assert manifest["stages"][1]["details"]["initialised_from"] == {"given": 14, "rtn": 0}
    assert manifest["reference"] == str(source.resolve())  # still measured against the unpruned original


@pytest.mark.large
def test_minicpmv_recipe_end_to_end(tmp_path):
    """The CI recipe on the built-in VLM: AWQ (calibrated on image prompts) beats RTN on text after held-out
    images; GGUF + mmproj in llama.cpp, ONNX in onnxruntime and Core ML (read back) measure like the gated
    model, image features included; and both runtimes continue an image prompt with the gated model's tokens."""
    from minicpm_compress.data.images import read_images
    from minicpm_compress.data.prompts import image_prompts
    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.export.gguf.mmproj import MtmdRunner
    from minicpm_compress.export.onnx.vision import OnnxVisionRunner
    from minicpm_compress.models.minicpm import input_scale
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.state import ModelState

    from .export.onnx.test_vision import torch_greedy

    out = tmp_path / "vlm"
    result = _run("run", "recipes/minicpmv.yaml", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "img cos" in result.stdout
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["load", "rtn", "awq", "gguf", "onnx", "coreml"]
    rtn, awq, gguf, onnx, coreml = (s["metrics"] for s in stages[1:])
    assert awq["kld"] < 0.6 * rtn["kld"] and awq["image_cosine"] == 1.0
    # the same int4 codes in every runtime
    assert stages[3]["details"]["tensors"] == {"lossless": 210, "requantized": 0, "float": 0}
    assert stages[4]["details"]["linears"] == {"lossless": 210, "requantized": 0}
    assert stages[5]["details"]["linears"]["lossless"] == 210 and stages[5]["details"]["vision"]["precision"] == "float16"
    assert abs(gguf["kld"] - awq["kld"]) < 0.02 and gguf["image_cosine"] > 0.999
    assert abs(onnx["kld"] - awq["kld"]) < 2e-3 and onnx["image_cosine"] > 0.9999
    assert abs(coreml["kld"] - awq["kld"]) < 0.02 and coreml["image_cosine"] > 0.999
    assert (out / "mmproj-F16.gguf").is_file() and (out / "coreml-int4/vision.mlpackage").is_dir()
    # the hand-off card: image metrics per file, the mtmd command with the mmproj file, the image prompt layout
    card = (out / "HANDOFF.md").read_text()
    assert f"| {gguf['top1']:.2%} | {gguf['image_cosine']:.4f} |" in card
    assert "llama-mtmd-cli -m model-Q4_0.gguf --mmproj mmproj-F16.gguf" in card
    assert "one `<unk>` slot per query (64)" in card and "onnxruntime-genai has no MiniCPM-V model type" in card
    assert "mmproj-F16.gguf" in [a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]]

    state = ModelState.open(resolve_model(str(out)))
    windows = evaluation_windows(state.tokenizer, ["austen-heldout"], 256, 128)
    prompts = state.vision.features(image_prompts(state.tokenizer, state.vision.settings,
                                                  read_images("skimage-heldout")[:1], windows[:1]))
    expected = torch_greedy(state.evaluated_model(), prompts, 8)
    assert OnnxVisionRunner(out / "onnx-int4", state).generate(prompts, 0, 8) == expected
    llama = MtmdRunner(out / "model-Q4_0.gguf", out / "mmproj-F16.gguf", 512, input_scale(state.config))
    try:
        assert llama.generate(prompts, 0, 8) == expected
    finally:
        llama.close()
