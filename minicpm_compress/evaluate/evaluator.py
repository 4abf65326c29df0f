"""The evaluator every stage and every artifact check uses: held-out windows + cached reference.

For a MiniCPM-V model the windows are image prompts: the reference's image features are attached once,
each measured state computes its own (and their cosine to the reference's is reported), and whole
modules or runtimes without a vision half of their own are given the reference's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..data.prompts import ImagePrompts
from ..models.checkpoint import model_fingerprint
from .metrics import Metrics, ReferenceStats, cached_reference_stats, compare, feature_cosine
from .runners import StreamedRunner, TorchRunner


class Evaluator:
    def __init__(self, windows, reference: ReferenceStats, batch_size: int = 4):
        self.windows = windows  # token windows, or image prompts with the reference's image features
        self.reference = reference
        self.batch_size = batch_size

    @classmethod
    def against(cls, reference, windows, batch_size: int = 4) -> "Evaluator":
        """An evaluator whose reference is `reference`, a ModelState (walked layer by layer) or a module; its
        statistics come from the cache when known."""
        from ..state import ModelState

        if isinstance(reference, ModelState):
            fingerprint = "state:" + reference.fingerprint()
            if isinstance(windows, ImagePrompts):
                windows = reference.vision.features(windows)
        else:
            fingerprint = model_fingerprint(reference)
        stats = cached_reference_stats(fingerprint, windows, lambda: reference, batch_size)
        return cls(windows, stats, batch_size)

    @property
    def images(self) -> bool:
        return isinstance(self.windows, ImagePrompts)

    def measure(self, subject, desc: str = "evaluate", features: list[torch.Tensor] | None = None) -> Metrics:
        """Metrics of a runner, a module, or a ModelState as deployed (quantized linears dequantized).

        MiniCPM-V: the subject runs on `features` (per window, e.g. from an exported vision encoder read
        back) when given; else a state on its own vision half's, a module or runtime on the reference's (a
        runtime with its own vision reports their cosine as `image_cosine`)."""
        from ..state import ModelState

        windows, cosine = self.windows, None
        if features is not None:
            windows = replace(windows, features=features)
            cosine = feature_cosine(self.windows.features, features)
        if isinstance(subject, ModelState):
            if self.images and subject.vision is not None and features is None:
                windows = subject.vision.features(replace(windows, features=None))
                cosine = feature_cosine(self.windows.features, windows.features)
            runner = StreamedRunner(subject, quantized=True)
        elif isinstance(subject, torch.nn.Module):
            runner = TorchRunner(subject)
        else:
            runner = subject
        metrics = compare(runner, windows, self.reference, self.batch_size, desc)
        if cosine is None and self.images:
            cosine = getattr(runner, "image_cosine", None)
        return replace(metrics, image_cosine=cosine) if cosine is not None else metrics
