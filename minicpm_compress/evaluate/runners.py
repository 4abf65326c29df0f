"""Runners: one small adapter per runtime that returns next-token logits for a batch of token windows.

The evaluator works on any runner, so a stage's check and an artifact's check are the same code.
Exporters add runners for their runtimes (llama.cpp, onnxruntime, Core ML read-back).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Runner(Protocol):
    name: str

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids → [batch, seq, vocab] float32 logits."""


class TorchRunner:
    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(input_ids=input_ids, use_cache=False).logits.float()
