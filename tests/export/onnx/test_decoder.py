"""The decoder graph built from onnxruntime's fused ops: the ops a runtime team expects, the model's function
(MiniCPM's muP included), cached decoding, and where it falls back to the traced graph."""

import json

import numpy as np
import onnx
import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.export.onnx.stage import OnnxConfig, uses_fused_graph, write_onnx
from minicpm_compress.export.onnx.runner import OnnxRunner
from minicpm_compress.export.onnx.decoder import rotary_length, unfused_reason
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.state import ModelState

from ...conftest import tiny_model

INT4 = QuantScheme(bits=4, group_size=32, symmetric=True)


def _state(tokenizer, model_type="llama", schemes=None, **overrides):
    """A tiny model's state with every linear quantized (`schemes`: per-linear override by name suffix)."""
    model = tiny_model(model_type, **overrides)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    schemes = schemes or {}
    state.qweights = {n: quantize(lin.weight, next((s for k, s in schemes.items() if n.endswith(k)), INT4))
                      for n, lin in quantizable_linears(model).items()}
    return state


def _ops(folder):
    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen2"])
def test_fused_graph_has_the_runtime_ops_and_computes_the_gated_model(tmp_path, tokenizer, model_type):
    state = _state(tokenizer, model_type)
    if model_type == "qwen2":  # q/k/v biases, made visible (a fresh model's are zero)
        biases = [n for n in state.weights.names() if n.endswith(".bias")]
        assert len(biases) == 2 * 3
        for n in biases:
            state.weights.set(n, torch.randn(state.weights.shape(n), generator=torch.Generator().manual_seed(7)))
    paths = write_onnx(state, tmp_path, OnnxConfig(bits=4, accuracy_level=0, embeddings="float"))
    assert paths == {"lossless": 14, "requantized": 0}
    ops = _ops(tmp_path)
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SimplifiedLayerNormalization") == 1
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 2  # after attention, after the MLP (the last: final norm)
    assert ops.count("MatMulNBits") == 2 * 5  # q|k|v, o, gate, up, down per layer
    for unfused in ("Softmax", "Transpose", "Concat", "Cos", "Sin", "Pow", "ReduceMean", "Where"):
        assert unfused not in ops, unfused
    # MiniCPM's muP: the embedding scale, two residual-branch scales per layer, the logit divisor
    assert ops.count("Div") == (1 if model_type == "minicpm" else 0)
    assert ops.count("Mul") == 2 * 2 + (1 + 2 * 2 if model_type == "minicpm" else 0)  # SiLU·gate, ·up per layer
    assert ops.count("Add") == (2 if model_type == "qwen2" else 0)  # the packed q|k|v bias per layer
    inputs = [i.name for i in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and "position_ids" not in inputs

    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = state.evaluated_model()(ids).logits
    runner = OnnxRunner(tmp_path / "model.onnx", state.config)
    assert (runner.logits(ids) - gated).abs().max().item() < 1e-4
    full, _ = runner.run(ids.numpy())
    logits, cache = runner.run(ids.numpy()[:, :4])
    steps = [logits]
    for t in range(4, 10):  # one token at a time, the cache fed back (not shared: onnxruntime concatenates)
        logits, cache = runner.run(ids.numpy()[:, t : t + 1], cache, t)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-5

    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]


def test_qkv_of_different_layouts_stay_separate_nodes(tmp_path, tokenizer):
    """A bit budget that keeps k_proj at int8: q, k and v go to GroupQueryAttention as three MatMulNBits."""
    state = _state(tokenizer, schemes={"k_proj": QuantScheme(bits=8, group_size=32, symmetric=True)})
    paths = write_onnx(state, tmp_path, OnnxConfig(bits=4, accuracy_level=0, embeddings="float"))
    assert paths == {"lossless": 14, "requantized": 0}
    nodes = [n for n in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    bits = sorted(a.i for n in nodes for a in n.attribute if a.name == "bits")
    assert len(nodes) == 2 * 7 and bits.count(8) == 2
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        gated = state.evaluated_model()(ids).logits
    assert (OnnxRunner(tmp_path / "model.onnx", state.config).logits(ids) - gated).abs().max().item() < 1e-4


def test_fused_and_traced_graphs_compute_the_same_int8_table_model(tmp_path, tokenizer):
    """The quantized table and tied head are the same blocks in both builders: equal logits, equal size."""
    state = _state(tokenizer, "minicpm")
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(5))
    out = {}
    for graph in ("fused", "traced"):
        write_onnx(state, tmp_path / graph, OnnxConfig(bits=4, accuracy_level=0, embeddings="int8", graph=graph))
        out[graph] = OnnxRunner(tmp_path / graph / "model.onnx", state.config).logits(ids)
    assert "GroupQueryAttention" not in _ops(tmp_path / "traced")
    assert (out["fused"] - out["traced"]).abs().max().item() < 1e-4
    size = {g: (tmp_path / g / "model.onnx.data").stat().st_size for g in out}
    assert abs(size["fused"] - size["traced"]) < 0.02 * size["traced"]


def test_longrope_tables_stop_where_the_short_factors_stop(tmp_path, tokenizer):
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 256,
            "long_factor": [1.0 + 0.37 * i for i in range(8)], "short_factor": [1.0 + 0.21 * i for i in range(8)]}
    model = tiny_model("minicpm", rope_scaling=rope, max_position_embeddings=1024, tie_word_embeddings=False)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    assert rotary_length(state.config) == 256
    write_onnx(state, tmp_path, OnnxConfig(bits=32))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert [list(i.dims) for i in graph.initializer if i.name == "cos_cache"] == [[256, 8]]
    assert json.loads((tmp_path / "genai_config.json").read_text())["model"]["context_length"] == 256
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model(ids).logits
    assert (OnnxRunner(tmp_path / "model.onnx", state.config).logits(ids) - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type, reason", [("qwen3", "model_type 'qwen3'")])
def test_other_architectures_are_traced_and_fused_is_refused(tokenizer, model_type, reason):
    state = _state(tokenizer, model_type)
    assert reason in unfused_reason(state)
    assert not uses_fused_graph(state, OnnxConfig(bits=4))
    with pytest.raises(CompressError, match=f"graph 'fused' is not available for this model: {reason}"):
        uses_fused_graph(state, OnnxConfig(bits=4, graph="fused"))
    assert not uses_fused_graph(_state(tokenizer), OnnxConfig(bits=8, int8="dynamic"))
    mistral = _state(tokenizer, "mistral", sliding_window=64)
    assert unfused_reason(mistral) == "sliding-window attention"


def test_a_float_graph_stores_a_tied_table_once(tmp_path, tokenizer):
    state = _state(tokenizer, "minicpm")
    state.qweights = {}
    write_onnx(state, tmp_path, OnnxConfig(bits=32))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.initializer if 49152 in i.dims] == ["model.embed_tokens.weight"]
    assert "FusedMatMul" in [n.op_type for n in graph.node]
    ids = torch.randint(0, 49152, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = state.evaluated_model()(ids).logits
    assert (OnnxRunner(tmp_path / "model.onnx", state.config).logits(ids) - theirs).abs().max().item() < 1e-4
