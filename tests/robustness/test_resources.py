"""A model too large for the machine is refused with its estimate (exit 4), not killed by the kernel."""

import json
import struct

from minicpm_compress import footprint

from .conftest import SMALL, assert_refused, cli


def _huge_checkpoint(folder, tokenizer_folder):
    """A one-layer Llama whose layer alone is ~17 G parameters, as a sparse bfloat16 file (no disk used)."""
    import shutil

    hidden, inner, vocab = 32768, 131072, 49152
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inner,
              "num_hidden_layers": 1, "num_attention_heads": 256, "num_key_value_heads": 256, "head_dim": 128,
              "tie_word_embeddings": True, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "model.layers.0.input_layernorm.weight": [hidden], "model.layers.0.post_attention_layernorm.weight": [hidden]}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"model.layers.0.self_attn.{name}.weight"] = [hidden, hidden]
    shapes.update({"model.layers.0.mlp.gate_proj.weight": [inner, hidden], "model.layers.0.mlp.up_proj.weight": [inner, hidden],
                   "model.layers.0.mlp.down_proj.weight": [hidden, inner]})
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data are holes
    (folder / "config.json").write_text(json.dumps(config))
    for path in tokenizer_folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, folder / path.name)
    return folder


def test_a_model_too_large_for_the_machine_is_refused_with_its_estimate(tmp_path, checkpoint):
    model = _huge_checkpoint(tmp_path / "huge", checkpoint)
    out = tmp_path / "out"
    line = assert_refused(cli("rtn", "--model", model, "--out", out, *SMALL), 4, "stage 'load' needs about",
                          "GiB is available", "--no-memory-check", out=out)
    needed = float(line.split("needs about ")[1].split(" GiB")[0])
    assert needed > 100  # one layer of 17 G parameters in float32, three times over


def test_a_whole_model_stage_is_refused_when_memory_is_short(tmp_path, checkpoint, monkeypatch):
    """QAT holds the whole model several times; with memory for a streamed stage only, it is refused."""
    out = tmp_path / "out"
    base = footprint.PROCESS_BASE_BYTES
    monkeypatch.setattr(footprint, "available_memory", lambda: base + (400 << 20))
    result = cli("qat", "--model", checkpoint, "--bits", "4", "--group-size", "32", "--symmetric", "--steps", "1",
                 "--out", out, *SMALL)
    assert_refused(result, 4, "stage 'qat' needs about", "--no-memory-check", out=out)
