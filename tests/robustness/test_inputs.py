"""MiniCPM-V checkpoints with a broken vision half, bad text data, and output folders used as inputs that
are stale or tampered with."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ..conftest import write_tiny_vlm
from .conftest import SMALL, assert_refused, cli


def _rtn(model, out, *flags):
    return cli("rtn", "--model", model, "--bits", "4", "--group-size", "32", "--out", out, *SMALL, *flags)


def _edit_vlm(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


VLM_DAMAGE = {
    "vision tower missing": (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("vpm.")]], "vpm."),
    "resampler missing": (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("resampler.")]], "resampler."),
    "resampler query of the wrong shape": (lambda t: t.update({"resampler.query": torch.zeros(3, 128)}), "resampler.query"),
    "resampler of another width": (lambda t: t.update({"resampler.kv_proj.weight": torch.zeros(128, 32)}),
                                   "resampler.kv_proj.weight"),
}


@pytest.mark.parametrize("case", sorted(VLM_DAMAGE))
def test_minicpmv_with_a_broken_vision_half_is_refused(tmp_path, vlm_tokenizer, case):
    damage, needle = VLM_DAMAGE[case]
    folder = write_tiny_vlm(tmp_path / "vlm", "4.0", vlm_tokenizer)
    _edit_vlm(folder, damage)
    out = tmp_path / "out"
    assert_refused(_rtn(folder, out), 2, "vlm", needle, out=out)


def test_minicpmv_with_an_unknown_version(tmp_path, vlm_tokenizer):
    folder = write_tiny_vlm(tmp_path / "vlm", "4.0", vlm_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["version"] = 9.5
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(_rtn(folder, out), 2, "config.json", "9.5", out=out)


def _text_file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_TEXT = {
    # case: (file name, bytes, words of the error)
    "empty": ("empty.txt", b"", "empty"),
    "whitespace only": ("blank.txt", b"\n\n   \n", "no text"),
    "not UTF-8": ("latin1.txt", "caf\xe9 ".encode("latin-1") * 50, "UTF-8"),
    "malformed jsonl": ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2: not valid JSON"),
    "jsonl without text": ("notext.jsonl", b'{"body": "no text key"}\n', "text"),
    "jsonl of numbers": ("nums.jsonl", b"1\n2\n", "nums.jsonl:1:"),
    "unknown extension": ("data.csv", b"a,b\n1,2\n", ".csv"),
    "too short": ("short.txt", b"A few words only.\n", "tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_calibration_text_is_refused(tmp_path, checkpoint, case):
    name, data, needle = BAD_TEXT[case]
    path = _text_file(tmp_path, name, data)
    out = tmp_path / "out"
    result = cli("awq", "--model", checkpoint, "--bits", "4", "--group-size", "32", "--calibration", path,
                 "--calibration-samples", "4", "--out", out, *SMALL)
    assert_refused(result, 2, name, needle, out=out)


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_evaluation_text_is_refused(tmp_path, checkpoint, case):
    name, data, needle = BAD_TEXT[case]
    path = _text_file(tmp_path, name, data)
    out = tmp_path / "out"
    result = cli("rtn", "--model", checkpoint, "--bits", "4", "--group-size", "32", "--evaluation", path, "--out", out)
    assert_refused(result, 2, name, needle, out=out)


def test_missing_text_file(tmp_path, checkpoint):
    out = tmp_path / "out"
    result = cli("rtn", "--model", checkpoint, "--evaluation", tmp_path / "gone.txt", "--out", out, *SMALL)
    assert_refused(result, 2, "gone.txt", out=out)


@pytest.fixture
def quantized(tmp_path, checkpoint):
    """An rtn output folder (an input to exporters)."""
    out = tmp_path / "q"
    result = _rtn(checkpoint, out)
    assert result.exit_code == 0, result.stderr
    return out


def _gguf(model, out):
    return cli("export", "gguf", "--model", model, "--type", "Q4_0", "--out", out, *SMALL)


def test_tampered_quantized_weights_are_refused(tmp_path, quantized):
    path = quantized / "quantized.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor's data: still a valid file
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "quantized.safetensors", "sha256", out=out)


def test_tampered_config_is_refused(tmp_path, quantized):
    config = json.loads((quantized / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    (quantized / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "config.json", "sha256", out=out)


def test_missing_quantized_weights_are_refused(tmp_path, quantized):
    (quantized / "quantized.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "quantized.safetensors", "missing", out=out)


def test_output_folder_of_an_older_version_is_refused(tmp_path, quantized):
    from minicpm_compress.quant.qweight import FILE_FORMAT

    from safetensors import safe_open

    path = quantized / "quantized.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()["minicpm_compress"]
    header = header.replace(FILE_FORMAT, "minicpm-compress-qweights/1")  # codes one per byte in /1
    save_file(load_file(str(path)), str(path), metadata={"minicpm_compress": header})
    manifest = json.loads((quantized / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:  # a consistent old folder: its manifest matches its files
        if artifact["path"] == "quantized.safetensors":
            import hashlib

            artifact["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            artifact["bytes"] = path.stat().st_size
    (quantized / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "quantized.safetensors", "/1", out=out)


def test_manifest_that_is_not_json(tmp_path, quantized):
    (quantized / "manifest.json").write_text("{ truncated")
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "manifest.json", out=out)


def test_failed_run_folder_is_not_a_model(tmp_path, checkpoint):
    failed = tmp_path / "failed"
    result = cli("rtn", "--model", checkpoint, "--bits", "4", "--group-size", "32", "--max-kld", "0", "--out", failed, *SMALL)
    assert result.exit_code == 3, result.stderr
    out = tmp_path / "out"
    assert_refused(_gguf(failed, out), 2, "manifest.json", "failed", out=out)


MANIFEST_DAMAGE = {
    # case: (edit of the parsed manifest, the key the error must name)
    "no reference": (lambda m: m.pop("reference"), "reference: missing"),
    "stages empty": (lambda m: m.update(stages=[]), "stages"),
    "metrics without tokens": (lambda m: m["stages"][0]["metrics"].pop("tokens"), "stages[0].metrics.tokens: missing"),
    "artifact path escaping the folder": (lambda m: m["artifacts"][0].update(path="../../etc/passwd"), "artifacts[0].path"),
    "artifact sha256 not a digest": (lambda m: m["artifacts"][0].update(sha256="abc"), "artifacts[0].sha256"),
    "not our tool": (lambda m: m["tool"].update(name="other"), "tool.name"),
    "a list": (lambda m: m.clear(), "(top level)"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_key(tmp_path, quantized, case):
    edit, key = MANIFEST_DAMAGE[case]
    manifest = json.loads((quantized / "manifest.json").read_text())
    edit(manifest)
    (quantized / "manifest.json").write_text(json.dumps(manifest if manifest else [1]))
    out = tmp_path / "out"
    assert_refused(_gguf(quantized, out), 2, "manifest.json", key, out=out)
    result = cli("compare", quantized)  # compare reads manifests through the same schema
    assert_refused(result, 2, "manifest.json", key)
