
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from minicpm_compress.export.gguf.writer import rope_permutation, write_gguf
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.state import ModelState

from ...conftest import tiny_model


def test_rope_permutation_matches_the_reference_reshape():
    w = torch.arange(4 * 8 * 3).reshape(4 * 8, 3)  # 4 heads of 8 rows
    n, rows, cols = 4, 32, 3
    expected = w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert torch.equal(w[rope_permutation(rows, n)], expected)


def _fields(path):
    reader = GGUFReader(str(path))
    return reader, {k: f for k, f in reader.fields.items()}


def test_minicpm_file_has_its_scales_tied_embeddings_and_tokenizer(tmp_path, tokenizer):
    model = tiny_model("minicpm")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    state.qweights = {"model.layers.0.mlp.up_proj": quantize(model.model.layers[0].mlp.up_proj.weight,
                                                             QuantScheme(bits=4, group_size=32, symmetric=True))}
    paths = write_gguf(state, tmp_path / "m.gguf", "Q4_0")
    assert paths == {"lossless": 1, "requantized": 13, "float": 0}
    reader, fields = _fields(tmp_path / "m.gguf")
    assert fields["general.architecture"].contents() == "minicpm"
    assert fields["minicpm.embedding_scale"].contents() == pytest.approx(12.0)
    assert fields["minicpm.residual_scale"].contents() == pytest.approx(1.4 / 2 ** 0.5)
    assert fields["minicpm.logit_scale"].contents() == pytest.approx(64 / 16)
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and names["token_embd.weight"].tensor_type.name == "Q8_0"
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # as llama.cpp's converter names SmolLM2's
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 49152
    up = names["blk.0.ffn_up.weight"]
    assert np.array_equal(dequantize(up.data, up.tensor_type).astype(np.float32),
                          state.qweights["model.layers.0.mlp.up_proj"].dequantize().numpy())


# ---------------------------------------------------------------- verified in llama.cpp itself

def _torch_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def real_state(minicpm_path):
    from minicpm_compress.state import load_checkpoint

    model, tok = load_checkpoint(minicpm_path)
    return ModelState.of(model, tok, ModelSource("minicpm-smollm2", minicpm_path, "minicpm-smollm2"))


@pytest.fixture(scope="module")
def windows(real_state):
    from minicpm_compress.data.textsets import evaluation_windows

    return evaluation_windows(real_state.tokenizer, ["austen-heldout"], 1024, 256)


def test_minicpm_f32_file_reproduces_torch_logits_in_llama_cpp(tmp_path, real_state, windows):
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner

    write_gguf(real_state, tmp_path / "f32.gguf", "F32")
    runner = LlamaCppRunner(tmp_path / "f32.gguf", 256)
    try:
        ours = runner.logits(windows[:2])
    finally:
        runner.close()
    theirs = _torch_logits(real_state.model, windows[:2])
    assert (ours - theirs).abs().max().item() < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.99


def test_lossless_q4_1_agrees_with_the_gated_torch_model(tmp_path, real_state, windows):
    """The built-in weights on their native grid (int4 g32 float offsets) → Q4_1 blocks, copied.

    The file holds exactly the gated weights (bit-exact, tested above); what remains is llama.cpp's CPU
    kernels quantizing activations to 8 bits for quantized matmuls (an F32 file agrees at 99.95%)."""
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.models.architectures import quantizable_linears

    scheme = QuantScheme(bits=4, group_size=32, zero_point="float")
    state = ModelState.of(real_state.model, real_state.tokenizer, real_state.source,
                       {n: quantize(l.weight, scheme) for n, l in quantizable_linears(real_state.model).items()})
    assert write_gguf(state, tmp_path / "q41.gguf", "Q4_1")["lossless"] == 210
    evaluator = Evaluator.against(state.evaluated_model(), windows)  # the gated model is the reference here
    runner = LlamaCppRunner(tmp_path / "q41.gguf", 256)
    try:
        agreement = evaluator.measure(runner)
    finally:
        runner.close()
    assert agreement.top1 >= 0.94 and agreement.kld < 0.006


@pytest.mark.parametrize("grid,fallback", [("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0")])
def test_k_quant_files_hold_the_gated_codes_and_agree_in_llama_cpp(tmp_path, real_state, windows, grid, fallback):
    """Our codes on a K-quant grid, copied into a K-quant file. The built-in model's 576-wide rows take
    llama.cpp's fallback type (also copied); down_proj's 1536-wide rows are K-quant super-blocks."""
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.models.architectures import quantizable_linears

    scheme = QuantScheme(layout=grid)
    state = ModelState.of(real_state.model, real_state.tokenizer, real_state.source,
                          {n: quantize(l.weight, scheme) for n, l in quantizable_linears(real_state.model).items()})
    path = tmp_path / f"{grid}.gguf"
    assert write_gguf(state, path, grid)["lossless"] == 210
    names = {t.name: t for t in GGUFReader(path).tensors}
    assert names["blk.0.ffn_down.weight"].tensor_type.name == grid
    assert names["blk.0.attn_q.weight"].tensor_type.name == fallback
    down = names["blk.3.ffn_down.weight"]
    assert np.array_equal(dequantize(down.data, down.tensor_type).astype(np.float32),
                          state.qweights["model.layers.3.mlp.down_proj"].dequantize().numpy())
    evaluator = Evaluator.against(state.evaluated_model(), windows)
    runner = LlamaCppRunner(path, 256)
    try:
        agreement = evaluator.measure(runner)
    finally:
        runner.close()
    # the file is exact (above); llama.cpp's kernels round activations to 8 bits for K-quant dot products
    # (Q8_K, per 256) as for Q4_1's (measured: KLD 0.006-0.008, top-1 94-95%)
    assert agreement.top1 >= 0.93 and agreement.kld < 0.01


def test_tokenizer_round_trip_matches_hugging_face(tmp_path, real_state):
    from llama_cpp import Llama

    write_gguf(real_state, tmp_path / "f16.gguf", "F16")
    llm = Llama(model_path=str(tmp_path / "f16.gguf"), vocab_only=True, verbose=False)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.  床前明月光，疑是地上霜。 Numbers 12345 and   spaces\n\nnew lines. "
            "<|im_start|>user\nHi<|im_end|>")
    hf = real_state.tokenizer(text)["input_ids"]
    ours = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.close()
    assert ours == hf


@pytest.fixture(scope="module")
def sentencepiece_minicpm(tmp_path_factory):
    """A tiny MiniCPM with a SentencePiece tokenizer (trained here on the calibration text, deterministic)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from minicpm_compress.data.textsets import read_documents
    from minicpm_compress.models.checkpoint import save_checkpoint
    from minicpm_compress.state import load_checkpoint

    folder = tmp_path_factory.mktemp("spm")
    model_file = io.BytesIO()
    docs = read_documents("austen-calib")[:3000] + read_documents("zh-calib")[:500]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model_file, vocab_size=2000, model_type="bpe", byte_fallback=True,
        num_threads=1, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, split_digits=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    save_checkpoint(tiny_model("minicpm", vocab_size=2000), tokenizer, folder / "model")
    model, tokenizer = load_checkpoint(folder / "model")
    return ModelState.of(model, tokenizer, ModelSource("spm", folder / "model", "spm"))


def test_sentencepiece_minicpm_tokenizes_and_computes_like_torch_in_llama_cpp(tmp_path, sentencepiece_minicpm):
    from llama_cpp import Llama

    state = sentencepiece_minicpm
    write_gguf(state, tmp_path / "spm.gguf", "F32")
    _, fields = _fields(tmp_path / "spm.gguf")
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    llm = Llama(model_path=str(tmp_path / "spm.gguf"), n_ctx=128, logits_all=True, verbose=False)
    text = "It is a truth universally acknowledged, that a single man 床前明月光 in 1811."
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    ours = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    theirs = _torch_logits(state.model, torch.tensor([ids]))[0]
    assert (ours - theirs).abs().max().item() < 1e-2


def llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner

    runner = LlamaCppRunner(path, ids.shape[1])
    try:
        return runner.logits(ids)
    finally:
        runner.close()


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 1024,
            "long_factor": [1.0 + 0.37 * i for i in range(8)], "short_factor": [1.0 + 0.21 * i for i in range(8)]}


def test_minicpm4_longrope_and_untied_head_compute_in_llama_cpp_like_in_torch(tmp_path, tokenizer):
    """MiniCPM4's fields: LongRoPE (factors as rope_factors_* tensors), an untied lm_head, a vocabulary
    larger than the tokenizer's."""
    from gguf import GGUFReader

    model = tiny_model("minicpm", rope_scaling=LONGROPE, max_position_embeddings=1024, tie_word_embeddings=False,
                       vocab_size=49152 + 64)
    assert model.model.rotary_emb.rope_type == "longrope"
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    write_gguf(state, tmp_path / "m.gguf", "F32")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert np.allclose(tensors["rope_factors_short.weight"].data, LONGROPE["short_factor"])
    assert "output.weight" in tensors
    ids = torch.tensor([tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]])
    ours = llama_cpp_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        theirs = model(ids).logits
        plain = tiny_model("minicpm", max_position_embeddings=1024, tie_word_embeddings=False,
                           vocab_size=49152 + 64)(ids).logits  # same weights, ordinary rope
    assert (ours - theirs).abs().max().item() < 1e-2
    assert (plain - theirs).abs().max().item() > 0.1  # the factors matter, so the match above means something


def test_longrope_with_an_attention_factor_is_refused(tmp_path, tokenizer):
    from minicpm_compress.errors import CompressError

    model = tiny_model("minicpm", rope_scaling=LONGROPE, max_position_embeddings=4096)
    with pytest.raises(CompressError, match="attention factor"):
        write_gguf(ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny")), tmp_path / "m.gguf", "F32")
    assert not (tmp_path / "m.gguf").exists()


def test_a_mixture_missing_a_quantized_tensor_is_refused_by_name(tmp_path, tokenizer):
    from minicpm_compress.errors import CompressError

    model = tiny_model("minicpm")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    up, down = (f"model.layers.0.mlp.{n}" for n in ("up_proj", "down_proj"))
    state.qweights = {name: quantize(model.get_submodule(name).weight, scheme) for name in (up, down)}
    with pytest.raises(CompressError, match=f"'{down}.weight' is quantized but the mixture chose no type"):
        write_gguf(state, tmp_path / "m.gguf", "auto", chosen={f"{up}.weight": state.qweights[up]})


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_files_compute_in_llama_cpp_like_in_torch(model_type, tmp_path, tokenizer):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): llama.cpp's qwen2 / qwen3 archs, rope on halves (no q/k
    row permutation)."""
    model = tiny_model(model_type)
    extra = {n: p for n, p in model.named_parameters() if n.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight"))}
    assert extra  # q/k/v biases (Qwen2) or q/k norms (Qwen3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in extra.items():  # away from their defaults, so the file must carry them
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if n.endswith("norm.weight") else 0.0))
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    write_gguf(state, tmp_path / "q.gguf", "F32")
    ids = torch.tensor([tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]])
    ours = llama_cpp_logits(tmp_path / "q.gguf", ids)
    with torch.no_grad():
        theirs = model(ids).logits
        for n, p in extra.items():  # at their defaults the logits differ, so the match means something
            p.fill_(1.0 if n.endswith("norm.weight") else 0.0)
        changed = model(ids).logits
    assert (ours - theirs).abs().max().item() < 2e-2
    assert (changed - theirs).abs().max().item() > 0.1


def test_llama_cpp_quantizer_reads_matrices_as_held_and_makes_the_same_file(tmp_path, tokenizer):
    """The file handed to llama.cpp's quantizer holds bf16 matrices as bf16 (half an F32 file: 16 GB instead
    of 32 for an 8B model) and changed ones as F32; llama.cpp's Q4_K_M from it is byte for byte the one it
    makes from an all-F32 file."""
    from minicpm_compress.export.gguf.llama_cpp import llama_cpp_quantize

    model = tiny_model("minicpm", tie_word_embeddings=False).to(torch.bfloat16)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    changed = "model.layers.1.mlp.down_proj.weight"
    state.weights.set(changed, state.weights.get(changed) * 1.5)
    write_gguf(state, tmp_path / "stored.gguf", "stored")
    write_gguf(state, tmp_path / "f32.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "stored.gguf")).tensors}
    assert types["blk.1.ffn_down.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "BF16"
    assert sum(t == "BF16" for t in types.values()) == 2 * 7 + 2 - 1  # linears, embedding, head
    for name in ("stored", "f32"):
        llama_cpp_quantize(tmp_path / f"{name}.gguf", tmp_path / f"{name}-q4_k_m.gguf", "Q4_K_M")
    made = (tmp_path / "stored-q4_k_m.gguf").read_bytes()
    assert made == (tmp_path / "f32-q4_k_m.gguf").read_bytes()
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "stored.gguf")).tensors}
    assert np.array_equal(tensors["blk.1.ffn_down.weight"].data, state.weights.get(changed).numpy())
    assert np.array_equal(tensors["blk.0.ffn_up.weight"].data.view(np.int16),
                          model.get_parameter("model.layers.0.mlp.up_proj.weight").detach().view(torch.int16).numpy())


def test_pre_tokenizers_are_recognised_by_llama_cpps_check_hash(tmp_path, tokenizer, monkeypatch):
    """SmolLM2's tokenizer is llama.cpp's `smollm`; a tokenizer no table knows is refused naming its hash and
    the option that names the pre-tokenizer."""
    from minicpm_compress.errors import CompressError
    from minicpm_compress.export.gguf import pretokenizers as gguf_pretokenizers
    from minicpm_compress.export.gguf import writer as gguf

    assert gguf_pretokenizers.recognise(tokenizer)[0] == "smollm"
    monkeypatch.setattr(gguf_pretokenizers, "PRE_TOKENIZERS", {})
    monkeypatch.setattr(gguf, "KNOWN_PRE_TOKENIZERS", {})
    state = ModelState.of(tiny_model("llama"), tokenizer, ModelSource("tiny", None, "tiny"))
    with pytest.raises(CompressError, match="pre-tokenizer not recognised.*855059429035d75a.*--tokenizer-pre"):
        write_gguf(state, tmp_path / "never.gguf", "F32")
