"""The importance matrix: llama.cpp's file format, the statistic itself, and that llama.cpp's quantizer uses it."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from minicpm_compress.export.gguf.imatrix import collect_imatrix, gguf_names, read_imatrix, write_imatrix
from minicpm_compress.layerwise import InputStatistics
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.models.source import ModelSource
from minicpm_compress.state import ModelState

from ...conftest import tiny_model


def test_streamed_statistics_equal_a_direct_forward_and_the_file_reads_back(tmp_path, tokenizer):
    model = tiny_model("minicpm")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", tmp_path, "tiny"))
    samples = torch.randint(0, 49152, (3, 40), generator=torch.Generator().manual_seed(0))
    linears = quantizable_linears(model)
    stats = InputStatistics(linears, gram=False)
    with torch.inference_mode():
        model(samples)
    stats.close()

    entries = gguf_names(state, collect_imatrix(state, samples, batch_size=2))
    assert len(entries) == len(linears) == 14
    assert set(entries) == {f"blk.{i}.{t}.weight" for i in range(2) for t in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    sums, count = entries["blk.1.ffn_down.weight"]
    assert count == 120 and sums.shape == (160,)
    torch.testing.assert_close(torch.from_numpy(sums), stats.sum_squares("model.layers.1.mlp.down_proj").float(),
                               rtol=1e-4, atol=1e-6)

    write_imatrix(tmp_path / "imatrix.gguf", entries, "test text", 40)
    reader = GGUFReader(tmp_path / "imatrix.gguf")
    fields = reader.fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert fields["imatrix.chunk_size"].parts[-1][0] == 40 and fields["imatrix.chunk_count"].parts[-1][0] == 3
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.in_sum2"] == (64, 1) and shapes["blk.0.attn_q.weight.counts"] == (1, 1)
    means = read_imatrix(tmp_path / "imatrix.gguf")
    np.testing.assert_allclose(means["blk.1.ffn_down.weight"], sums / 120, rtol=1e-6)


@pytest.mark.slow
def test_llama_cpp_quantizes_better_with_our_importance_matrix(tmp_path):
    """Q3_K_M of the built-in MiniCPM, from the same float file, with and without the imatrix: llama.cpp's
    quantizer weights each column by it, and the file measures closer to the float model in llama.cpp."""
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    data = {"calibration_samples": 8, "eval_tokens": 2048}
    # one recipe: both files share the load and the reference's evaluation
    recipe = build_recipe(model="minicpm-smollm2", data=data, stages=[
        {"gguf": {"type": "Q3_K_M", "imatrix": False, "file": "plain.gguf"}},
        {"gguf": {"type": "Q3_K_M", "imatrix": True, "file": "weighted.gguf"}}])
    run_recipe(recipe, tmp_path / "out")
    stages = json.loads((tmp_path / "out/manifest.json").read_text())["stages"]
    kinds = {False: stages[1], True: stages[2]}
    assert "imatrix" not in kinds[False]["details"] and (tmp_path / "out/imatrix.gguf").is_file()
    assert kinds[True]["details"]["imatrix"]["tensors"] == 210
    assert kinds[True]["metrics"]["kld"] < 0.9 * kinds[False]["metrics"]["kld"]
