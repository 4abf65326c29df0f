"""ExecuTorch's runtime as a runner: a .pte evaluated like a torch model, and decoding as an app does."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from .program import load_kernels


@contextlib.contextmanager
def _runtime_log():
    """ExecuTorch's C++ runtime logs to the process's stderr on every call ("No temp allocator provided"): keep
    that out of the user's terminal, and put its last lines into the error if a call fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as e:
            os.dup2(saved, 2)
            log.seek(0)
            lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
            raise RuntimeError(f"ExecuTorch: {e}" + (f" ({lines[-1].strip()})" if lines else "")) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ExecuTorchRunner:
    """Next-token logits from ExecuTorch's runtime (XNNPACK on CPU): each window one prefill from position 0
    (the program's cache is overwritten from there and attention stops at the window's last token)."""

    name = "ExecuTorch"

    def __init__(self, path: Path, context: int):
        from executorch.runtime import Runtime

        load_kernels()
        with _runtime_log():
            self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self.context = context

    def run(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, S, vocab] for `tokens` [1, S] placed at `start` in the cache."""
        with _runtime_log():
            return self.method.execute([tokens.to(torch.long), torch.tensor([start], dtype=torch.long)])[0]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.context:
            raise ValueError(f"window of {input_ids.shape[1]} tokens exceeds the program's context of {self.context}")
        return torch.cat([self.run(row[None], 0) for row in input_ids]).float()

    def greedy(self, prompt_ids: list[int], steps: int) -> list[int]:
        """As an app decodes: the prompt in one pass, then one token per pass at the next position."""
        logits = self.run(torch.tensor([prompt_ids]), 0)
        out = []
        for i in range(steps):
            out.append(int(logits[0, -1].argmax()))
            if i + 1 < steps:
                logits = self.run(torch.tensor([out[-1:]]), len(prompt_ids) + i)
        return out

