"""Damaged, surprising or dangerous checkpoints: refused with one line naming the file and tensor; no
checkpoint code ever runs."""

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import SMALL, assert_refused, cli

WEIGHTS = "model.safetensors"


def _rtn(checkpoint, out, *flags):
    return cli("rtn", "--model", checkpoint, "--bits", "4", "--group-size", "32", "--out", out, *SMALL, *flags)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def _truncate(folder):
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_header(folder):
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    path.write_bytes(bytes(data))


def _huge_header_length(folder):
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))


def _shard(folder, missing=True):
    tensors = load_file(str(folder / WEIGHTS))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        if not (missing and shard.startswith("model-00002")):
            save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    (folder / WEIGHTS).unlink()
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_not_json(folder):
    _shard(folder, missing=False)
    (folder / "model.safetensors.index.json").write_text("{ nope")


def _shard_elsewhere(folder, pattern):
    """The second shard moved beside the checkpoint folder and the index pointing at it there (transformers
    would read it; we refuse any weight file outside the folder)."""
    _shard(folder, missing=False)
    name = "model-00002-of-00002.safetensors"
    (folder / name).rename(folder.parent / name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    target = None if pattern is None else pattern.format(name=name, parent=folder.parent)
    index["weight_map"] = {k: (target if v == name else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _to_pickle(folder):
    torch.save(load_file(str(folder / WEIGHTS)), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()


def _no_weights(folder):
    (folder / WEIGHTS).unlink()


def _first(prefix):
    return lambda t: next(k for k in sorted(t) if k.startswith(prefix))


BAD_CHECKPOINTS = {
    # case: (damage(folder), words the error must contain (the folder's name is always required))
    "no config.json": (lambda f: (f / "config.json").unlink(), ["no config.json"]),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{ model_type: llama"), ["config.json", "JSON"]),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), ["config.json"]),
    "config.json not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), ["config.json"]),
    "no model_type": (lambda f: _edit_config(f, model_type=None), ["config.json", "model_type"]),
    "unknown model_type": (lambda f: _edit_config(f, model_type="gpt-17"), ["config.json", "gpt-17"]),
    "hidden_size a string": (lambda f: _edit_config(f, hidden_size="big"), ["config.json", "hidden_size"]),
    "heads do not divide hidden": (lambda f: _edit_config(f, num_attention_heads=7, num_key_value_heads=7,
                                                          head_dim=None), ["config.json", "num_attention_heads 7"]),
    "kv heads do not divide heads": (lambda f: _edit_config(f, num_key_value_heads=3),
                                     ["config.json", "num_key_value_heads"]),
    "negative layer count": (lambda f: _edit_config(f, num_hidden_layers=-1), ["config.json", "num_hidden_layers"]),
    "vocab_size zero": (lambda f: _edit_config(f, vocab_size=0), ["config.json", "vocab_size"]),
    "no weights": (_no_weights, ["no weights"]),
    "truncated safetensors": (_truncate, [WEIGHTS]),
    "corrupt header": (_corrupt_header, [WEIGHTS, "header is not valid JSON"]),
    "absurd header length": (_huge_header_length, [WEIGHTS, "header"]),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(_first("model.layers.1.mlp.down_proj")(t))),
                       ["model.layers.1.mlp.down_proj.weight", "missing"]),
    "wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(65)})),
                    ["model.norm.weight", "shape"]),
    "integer tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
                       ["model.norm.weight", "int32"]),
    "fp8 tensor": (lambda f: _edit_tensors(f, lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)})),
        ["model.layers.0.mlp.up_proj.weight", "float8"]),
    "unexpected tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.9.extra": torch.ones(2)})),
                          ["model.layers.9.extra"]),
    "NaN in a weight": (lambda f: _edit_tensors(f, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan"))),
                        ["model.layers.0.self_attn.q_proj.weight", "NaN"]),
    "shard index names a missing shard": (_shard, ["model-00002-of-00002.safetensors"]),
    "shard index not JSON": (_index_not_json, ["model.safetensors.index.json"]),
    "shard outside the folder by ..": (lambda f: _shard_elsewhere(f, "../{name}"), ["../model-00002", "outside"]),
    "shard at an absolute path": (lambda f: _shard_elsewhere(f, "{parent}/{name}"), ["/model-00002", "outside"]),
    "shard name not a string": (lambda f: _shard_elsewhere(f, None), ["model.safetensors.index.json", "not a file name"]),
    "pickle without --allow-pickle": (_to_pickle, ["pytorch_model.bin", "--allow-pickle"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused(tmp_path, checkpoint, case):
    damage, needles = BAD_CHECKPOINTS[case]
    damage(checkpoint)
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out), 2, checkpoint.name, *needles, out=out)


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the test checks the marker never appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_a_code_payload_does_not_run_even_with_allow_pickle(tmp_path, checkpoint):
    marker = tmp_path / "payload-ran"
    (checkpoint / WEIGHTS).unlink()
    with open(checkpoint / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Payload(marker)}, f)
    out = tmp_path / "out"
    line = assert_refused(_rtn(checkpoint, out, "--allow-pickle"), 2, "pytorch_model.bin", out=out)
    assert not marker.exists()
    assert "weights_only=False" not in line  # torch's advice would be unsafe to relay


def test_garbage_pickle_with_allow_pickle(tmp_path, checkpoint):
    (checkpoint / WEIGHTS).unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 100)
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out, "--allow-pickle"), 2, "pytorch_model.bin", out=out)


def test_remote_code_is_not_run_without_the_flag(tmp_path, checkpoint):
    marker = tmp_path / "remote-code-ran"
    (checkpoint / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (checkpoint / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(checkpoint, model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                          "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out), 2, "config.json", "evil", "--trust-remote-code", out=out)
    assert not marker.exists()


def test_a_supported_type_ignores_its_auto_map(tmp_path, checkpoint):
    """A Llama checkpoint that also names remote code loads with our implementation; the code never runs."""
    marker = tmp_path / "remote-code-ran"
    (checkpoint / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(checkpoint, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    out = tmp_path / "out"
    result = _rtn(checkpoint, out)
    assert result.exit_code == 0, result.stderr
    assert not marker.exists()


def test_missing_tokenizer(tmp_path, checkpoint):
    for path in checkpoint.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out), 2, checkpoint.name, "tokenizer", out=out)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    out = tmp_path / "out"
    assert_refused(_rtn(folder, out), 2, "empty", "config.json", out=out)


def test_model_that_is_a_file(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint / WEIGHTS, out), 2, WEIGHTS, out=out)


def test_unreadable_weights(tmp_path, checkpoint):
    """A weight file replaced by a folder (the closest to an unreadable file when tests run as root)."""
    (checkpoint / WEIGHTS).unlink()
    (checkpoint / WEIGHTS).mkdir()
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out), 2, WEIGHTS, out=out)
    shutil.rmtree(checkpoint / WEIGHTS)


def test_a_shard_symlinked_from_inside_the_folder_is_read(tmp_path, checkpoint):
    """Hugging Face's cache keeps shards as symlinks into a blobs folder: names inside the folder are fine."""
    _shard(checkpoint, missing=False)
    name = "model-00002-of-00002.safetensors"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (checkpoint / name).rename(blobs / "0123abcd")
    (checkpoint / name).symlink_to(blobs / "0123abcd")
    result = _rtn(checkpoint, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
