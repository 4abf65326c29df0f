"""llama.cpp itself, through llama-cpp-python: its quantizer (for its own mixtures, with our importance matrix)
and a GGUF file as a runner, evaluated like a torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...devices import cpu_threads
from ...errors import CompressError


def llama_cpp_quantize(source: Path, target: Path, type_name: str, imatrix: dict | None = None) -> None:
    """llama.cpp's own quantizer, with our importance matrix (GGUF tensor name → (Σx², tokens)) if given."""
    try:
        import llama_cpp
    except ImportError:
        raise CompressError(f"gguf: type {type_name} needs llama-cpp-python (installed by `make install`)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = cpu_threads()
    if imatrix:
        from .imatrix import llama_cpp_imatrix

        array, _buffers = llama_cpp_imatrix(imatrix)  # the buffers stay referenced until quantizing is done
        params.imatrix = array
    from ..native import native_log

    with native_log() as log:  # llama.cpp prints a line per tensor
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
    if failed:
        last = next((line for line in reversed(log) if line.strip()), "no message")
        raise CompressError(f"gguf: llama.cpp could not quantize {source.name} to {type_name} ({last.strip()})")


class LlamaCppRunner:
    """Next-token logits from llama.cpp (llama-cpp-python), one window at a time."""

    name = "llama.cpp"

    def __init__(self, path: Path, window: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise CompressError("gguf: verification needs llama-cpp-python (installed by `make install`)") from None
        # use_mmap=False: llama.cpp repacks quantized weights for its CPU kernels; from a mapped file it
        # would hold the mapping and the repacked copy (twice the file in resident memory)
        self.llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                         n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False, seed=0,
                         use_mmap=False)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def greedy(self, prompt_ids: list[int], steps: int) -> list[int]:
        """Greedy decoding as llama.cpp's completion does it: the prompt in one batch, then one token each."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        out = []
        for i in range(steps):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if i + 1 < steps:
                self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()
