"""The evaluator every stage and every artifact check uses: held-out windows + cached reference."""

from __future__ import annotations

import torch

from ..models.checkpoint import model_fingerprint
from .metrics import Metrics, ReferenceStats, cached_reference_stats, compare
from .runners import Runner, TorchRunner


class Evaluator:
    def __init__(self, windows: torch.Tensor, reference: ReferenceStats, batch_size: int = 4):
        self.windows = windows
        self.reference = reference
        self.batch_size = batch_size

    @classmethod
    def against(cls, reference_model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> "Evaluator":
        """An evaluator whose reference is `reference_model` (its statistics come from the cache when known)."""
        fingerprint = model_fingerprint(reference_model)
        stats = cached_reference_stats(fingerprint, windows, lambda: reference_model, batch_size)
        return cls(windows, stats, batch_size)

    def measure(self, subject: Runner | torch.nn.Module, desc: str = "evaluate") -> Metrics:
        runner = TorchRunner(subject) if isinstance(subject, torch.nn.Module) else subject
        return compare(runner, self.windows, self.reference, self.batch_size, desc)
