"""Does llama.cpp run a GGUF whose decoder layers have different FFN widths?

    .venv/bin/python bench/gguf_ffn_widths.py > widths.json

Per architecture (llama, qwen2, minicpm): a tiny model (2 layers, FFN 160 wide) is written as an F32 GGUF
by our writer; the file is then copied with layer 0's FFN narrowed to its first 96 channels (gate/up
rows, down columns) and `<arch>.feed_forward_length` written as the per-layer array [96, 160]. The
torch model with layer 0's other 64 channels zeroed computes exactly what the narrowed one does;
llama.cpp's logits on the copy are compared with it. Prints JSON: per architecture whether llama.cpp
loaded the file (else its last log line), and the largest logit difference (and the same for the
uniform file, as the yardstick of float32 agreement).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

KEPT = 96


def narrowed_copy(source: Path, target: Path, arch: str, widths: list[int]) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == f"{arch}.feed_forward_length":
            writer.add_array(field.name, widths)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        value = MetadataDetails(field.types[0], field.contents(), sub_type=sub_type)
        writer.add_key_value(field.name, value.value, value.type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        data = np.array(tensor.data)  # numpy shape: (rows, columns) = torch's [out, in]
        if tensor.name in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"):
            data = data[:KEPT]
        elif tensor.name == "blk.0.ffn_down.weight":
            data = np.ascontiguousarray(data[:, :KEPT])
        tensors.append((tensor.name, data))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data)
    writer.close()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llama_cpp import Llama

    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.export.gguf.writer import gguf_architecture, write_gguf
    from minicpm_compress.export.native import native_log
    from minicpm_compress.models.checkpoint import load_tokenizer
    from minicpm_compress.models.source import ModelSource
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.state import ModelState
    from tests.conftest import tiny_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m").checkpoint)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    results = {"model": "tiny (2 layers, hidden 64, FFN 160)", "widths": [KEPT, 160], "architectures": {}}
    for model_type in ("llama", "qwen2", "minicpm"):
        model = tiny_model(model_type)
        arch = gguf_architecture(model.config)[0]
        result = results["architectures"][arch] = {}
        with tempfile.TemporaryDirectory() as tmp:
            uniform, narrowed = Path(tmp) / "uniform.gguf", Path(tmp) / "narrowed.gguf"
            write_gguf(ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny")), uniform, "F32")
            with torch.no_grad():
                result["uniform_max_logit_difference"] = float(
                    (LlamaCppRunner(uniform, 32).logits(ids) - model(ids).logits).abs().max())
                model.model.layers[0].mlp.down_proj.weight[:, KEPT:] = 0  # what the narrowed layer computes
                expected = model(ids).logits
            narrowed_copy(uniform, narrowed, arch, results["widths"])
            with native_log() as log:
                try:
                    Llama(model_path=str(narrowed), verbose=True)
                    got = LlamaCppRunner(narrowed, 32).logits(ids)
                except ValueError:  # llama-cpp-python's "Failed to load model": the finding is whether it loads
                    got = None
            if got is None:
                result.update(loaded=False, error=next(line.strip() for line in log if "error" in line))
            else:
                result.update(loaded=True, narrowed_max_logit_difference=float((got - expected).abs().max()),
                              logit_scale=float(expected.abs().max()))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
