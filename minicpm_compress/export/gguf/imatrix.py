"""Importance matrices for llama.cpp: our calibration statistics in the format its quantizer reads.

llama.cpp's importance matrix holds, per weight tensor, Σx² over the calibration tokens of each input
channel (`NAME.in_sum2`) and the token count (`NAME.counts`); its quantizer weights each column's rounding
error by their ratio, the mean x². We compute the same statistic one decoder layer at a time on the
recipe's calibration samples, write it as an `imatrix.gguf` (general.type "imatrix", as llama-imatrix
writes it, so `llama-quantize --imatrix imatrix.gguf` takes it), and hand it to llama_model_quantize
directly for the llama.cpp types this package requantizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...layerwise import InputStatistics, run_layer, state_layer_inputs
from ...models.architectures import architecture_of, layer_prefix
from ...progress import progress


def collect_imatrix(state, samples, batch_size: int = 8) -> dict[str, tuple[np.ndarray, int]]:
    """Per decoder linear (its name in the checkpoint, without `.weight`): (Σx² per input channel, tokens),
    over `samples` run through the state's float layers (AWQ-scaled, if AWQ ran: what a requantizer reads)."""
    arch = architecture_of(state.config)
    inputs = state_layer_inputs(state, samples, batch_size)
    out = {}
    for index in progress(range(state.num_layers), desc="importance matrix", total=state.num_layers, unit="layer"):
        with state.layer(index) as layer:
            stats = InputStatistics({n: layer.get_submodule(n) for n in arch.linears}, gram=False)
            try:
                outputs = run_layer(layer, inputs)
            finally:
                stats.close()
        for name in arch.linears:
            out[f"{layer_prefix(index)}.{name}"] = (stats.sum_squares(name).numpy().astype(np.float32),
                                                   stats.tokens[name])
        inputs = outputs
    return out


def gguf_names(state, stats: dict[str, tuple[np.ndarray, int]]) -> dict[str, tuple[np.ndarray, int]]:
    """The same statistics keyed by the GGUF tensor names llama.cpp looks them up by (blk.N.attn_q.weight)."""
    import gguf

    from .writer import gguf_architecture

    names = gguf.get_tensor_name_map(gguf_architecture(state.config)[1], state.config.num_hidden_layers)
    return {names.get_name(f"{key}.weight", try_suffixes=(".weight",)): value for key, value in stats.items()}


def write_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, int]], dataset: str, chunk_size: int) -> None:
    """An imatrix.gguf as llama-imatrix writes it: per tensor NAME.in_sum2 [1, n] and NAME.counts [1, 1]."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    tokens = max((count for _, count in entries.values()), default=0)
    writer.add_uint32("imatrix.chunk_count", tokens // chunk_size)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        sums, count = entries[name]
        writer.add_tensor(f"{name}.in_sum2", sums.reshape(1, -1).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Mean x² per input channel for each tensor of an imatrix.gguf (in_sum2 / counts, as llama.cpp reads it)."""
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in GGUFReader(path).tensors}
    return {name.removesuffix(".in_sum2"): sums / tensors[name.removesuffix(".in_sum2") + ".counts"][0]
            for name, sums in tensors.items() if name.endswith(".in_sum2")}


def llama_cpp_imatrix(entries: dict[str, tuple[np.ndarray, int]]):
    """The C array llama_model_quantize takes (mean x² per tensor, terminated by a null name), and the
    buffers it points into (keep them alive while llama.cpp quantizes)."""
    import ctypes

    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep = []
    for i, name in enumerate(sorted(entries)):
        sums, count = entries[name]
        values = np.ascontiguousarray(sums / max(count, 1), dtype=np.float32)
        encoded = name.encode()
        keep += [values, encoded]
        array[i].name = encoded
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    array[len(entries)].name = None
    return array, keep

