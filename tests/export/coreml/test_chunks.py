"""Core ML in chunks: the package wrappers chained equal the model, and the packages hold our codes."""

from collections.abc import Mapping

import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.evaluate.runners import StreamedRunner
from minicpm_compress.export.coreml import chunks as coreml_chunks
from minicpm_compress.export.coreml import program as coreml
from minicpm_compress.export.coreml.stage import CoreMLConfig
from minicpm_compress.export.coreml.program import causal_mask
from minicpm_compress.export.coreml.chunks import EmbedChunk, HeadChunk, LayersChunk, layer_groups, read_back_chunks, streamed_peaks, with_tables, write_chunks
from minicpm_compress.models.minicpm import mup_scales
from minicpm_compress.quant.qweight import QuantizedWeight, QuantScheme

from ...conftest import tiny_model
from .test_program import _state, activation_peaks


def test_layer_groups_cover_every_layer_once():
    assert [list(g) for g in layer_groups(5, 3)] == [[0, 1], [2, 3], [4]]
    assert layer_groups(32, 8)[-1] == range(28, 32)
    with pytest.raises(CompressError, match="between 1 and the 5 decoder layers"):
        layer_groups(5, 6)


def test_chained_chunks_token_by_token_equal_the_model():
    model = tiny_model("minicpm", num_hidden_layers=3)
    ids = torch.randint(0, 1000, (1, 9))
    embed = EmbedChunk(model.model.embed_tokens, mup_scales(model.config)[0], images=False)
    chunks = [LayersChunk(model, g, context=16) for g in layer_groups(3, 2)]
    head = HeadChunk(model.model.norm, model.lm_head)

    def step(tokens, mask):
        hidden = embed(tokens)
        for chunk in chunks:
            hidden = chunk(hidden, mask)
        return head(hidden)

    with torch.no_grad():
        full = model(ids).logits
        steps = [step(ids[:, :5], causal_mask(5))] + [step(ids[:, i:i + 1], causal_mask(1, past=i)) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_packages_hold_our_codes_and_the_embedding_read_back(tokenizer, tmp_path, monkeypatch):
    state = _state(tokenizer, QuantScheme(bits=4, group_size=32, symmetric=True))
    samples = torch.randint(0, 1000, (2, 16))
    # the streamed range check finds what the whole-model one finds
    assert streamed_peaks(state, samples) == activation_peaks(state.evaluated_model(), samples)
    config = CoreMLConfig(bits=4, context=32, chunks=2)
    quantized, paths, embeddings = write_chunks(state, tmp_path, config, "float16", 1.0, images=False)
    assert sorted(p.name for p in tmp_path.glob("*.mlpackage")) == [
        "embed.mlpackage", "head.mlpackage", "layers-0.mlpackage", "layers-1.mlpackage"]
    assert paths == {"lossless": 14, "requantized": 0, "embedding int8 per row": 1}
    tables, ops = read_back_chunks(tmp_path, quantized, embeddings, state.tied)
    assert ops["constexpr_blockwise_shift_scale"] == 14 + 2  # the tied table in both embed and head packages
    assert list(tables) == ["model.embed_tokens"] and tables["model.embed_tokens"] is embeddings["model.embed_tokens"]
    table = tables["model.embed_tokens"].dequantize()
    view = with_tables(state, tables)
    assert view.qweights["model.layers.0.mlp.up_proj"] is state.qweights["model.layers.0.mlp.up_proj"]
    assert torch.equal(view.tensor("model.embed_tokens.weight", quantized=True), table)
    assert not torch.equal(state.tensor("model.embed_tokens.weight", quantized=True), table)
    assert "model.embed_tokens" not in state.qweights
    # evaluated with the int8 table kept packed: the same logits as with the table's float values set in
    ids = torch.randint(0, 1000, (2, 12))
    packed = StreamedRunner(view, quantized=True).logits(ids)
    assert isinstance(StreamedRunner(view, quantized=True).head(), QuantizedWeight)  # the tied head too
    state.weights.set("model.embed_tokens.weight", table)
    torch.testing.assert_close(packed, StreamedRunner(state, quantized=True).logits(ids), atol=1e-5, rtol=1e-5)
    # a weight that is not what was written is caught
    name = next(iter(quantized))
    wrong = {**quantized, name: quantized[next(n for n in quantized if n != name and quantized[n].shape == quantized[name].shape)]}
    with pytest.raises(CompressError, match=f"weight of '{name}' read back from layers-0.mlpackage differs"):
        read_back_chunks(tmp_path, wrong, embeddings, state.tied)

    # our weights are read as each package's constants are compared, not all at once before
    events = []

    class Recorded(Mapping):  # as the exporter's weights: a mapping that reads each weight when asked
        def __getitem__(self, key):
            events.append(key)
            return quantized[key]

        def __iter__(self):
            return iter(quantized)

        def __len__(self):
            return len(quantized)

    real_read = coreml.read_program
    for module in (coreml, coreml_chunks):
        monkeypatch.setattr(module, "read_program", lambda path: events.append(path.name) or real_read(path),
                            raising=False)
    read_back_chunks(tmp_path, Recorded(), embeddings, state.tied)
    layer_1 = events.index("layers-1.mlpackage")
    assert events[0] == "embed.mlpackage" and len(events) == 4 + 14
    assert all(".layers.0." in e for e in events[events.index("layers-0.mlpackage") + 1 : layer_1])
    assert all(".layers.1." in e for e in events[layer_1 + 1 :])

    # the measured view reads the state's weights on use as the state does: with_tables copies none of them
    held = dict(state.qweights)

    class Stored(Recorded):  # as a state's weights read from an output folder
        def __getitem__(self, key):
            events.append(key)
            return held[key]

    events.clear()
    state.qweights = Stored()
    view = with_tables(state, tables)
    assert events == [] and view.qweights["model.embed_tokens"] is tables["model.embed_tokens"] and events == []
    assert view.qweights["model.layers.1.mlp.up_proj"] is held["model.layers.1.mlp.up_proj"]
    assert events == ["model.layers.1.mlp.up_proj"]
