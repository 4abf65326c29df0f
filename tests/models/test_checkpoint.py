import json

import pytest
import torch
from safetensors.torch import save_file

from minicpm_compress.errors import CompressError
from minicpm_compress.models.checkpoint import model_fingerprint, read_weights
from minicpm_compress.state import load_checkpoint

from ..conftest import tiny_model


def _logits(model, n=10):
    ids = torch.arange(n).unsqueeze(0) * 7
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "minicpm"])
def test_save_and_load_round_trip(tiny_checkpoint, model_type):
    folder = tiny_checkpoint(model_type)
    model, tokenizer = load_checkpoint(folder)
    assert model.config.model_type == model_type
    torch.testing.assert_close(_logits(model), _logits(tiny_model(model_type)), atol=0, rtol=0)
    assert tokenizer("hello").input_ids


def test_tied_embeddings_stored_once_and_still_tied(tiny_checkpoint):
    folder = tiny_checkpoint("minicpm")
    assert "lm_head.weight" not in read_weights(folder)
    model, _ = load_checkpoint(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_loads(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    tensors = read_weights(folder)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_checkpoint(folder)
    torch.testing.assert_close(_logits(model), _logits(tiny_model("llama")), atol=0, rtol=0)


def test_pickle_weights_refused_unless_allowed(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    torch.save(read_weights(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CompressError, match=r"pytorch_model\.bin: pickle weights are refused"):
        load_checkpoint(folder)
    model, _ = load_checkpoint(folder, allow_pickle=True)
    torch.testing.assert_close(_logits(model), _logits(tiny_model("llama")), atol=0, rtol=0)


def test_remote_code_checkpoint_loads_with_builtin_minicpm(tiny_checkpoint):
    """A real MiniCPM config names remote code in auto_map; it must load without running any of it."""
    folder = tiny_checkpoint("minicpm")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_minicpm.py").write_text("raise SystemExit('checkpoint code was executed')\n")
    model, _ = load_checkpoint(folder)
    assert type(model).__module__ == "minicpm_compress.models.minicpm"


def test_missing_tensor_is_named(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    tensors = read_weights(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CompressError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_checkpoint(folder)


def test_wrong_shape_is_named(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    tensors = read_weights(folder)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CompressError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(3, 3\)"):
        load_checkpoint(folder)


def test_unsupported_model_type_and_bad_json_are_clear(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CompressError, match="model_type 'gpt_neox' is not supported"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CompressError, match=r"config\.json: not valid JSON"):
        load_checkpoint(folder)
    with pytest.raises(CompressError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_fingerprint_tracks_weights():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
