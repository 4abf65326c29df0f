"""The evaluator every stage and every artifact check uses: held-out windows + cached reference."""

from __future__ import annotations

import torch

from ..models.checkpoint import model_fingerprint
from .metrics import Metrics, ReferenceStats, cached_reference_stats, compare
from .runners import StreamedRunner, TorchRunner


class Evaluator:
    def __init__(self, windows: torch.Tensor, reference: ReferenceStats, batch_size: int = 4):
        self.windows = windows
        self.reference = reference
        self.batch_size = batch_size

    @classmethod
    def against(cls, reference, windows: torch.Tensor, batch_size: int = 4) -> "Evaluator":
        """An evaluator whose reference is `reference`, a ModelState (walked layer by layer) or a module; its
        statistics come from the cache when known."""
        from ..state import ModelState

        if isinstance(reference, ModelState):
            fingerprint = "state:" + reference.fingerprint()
        else:
            fingerprint = model_fingerprint(reference)
        stats = cached_reference_stats(fingerprint, windows, lambda: reference, batch_size)
        return cls(windows, stats, batch_size)

    def measure(self, subject, desc: str = "evaluate") -> Metrics:
        """Metrics of a runner, a module, or a ModelState as deployed (quantized linears dequantized)."""
        from ..state import ModelState

        if isinstance(subject, ModelState):
            runner = StreamedRunner(subject, quantized=True)
        elif isinstance(subject, torch.nn.Module):
            runner = TorchRunner(subject)
        else:
            runner = subject
        return compare(runner, self.windows, self.reference, self.batch_size, desc)
