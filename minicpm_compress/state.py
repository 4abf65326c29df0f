"""The model state that flows from stage to stage."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .models.source import ModelSource
from .quant.qweight import QuantizedWeight


@dataclass
class ModelState:
    model: torch.nn.Module  # the float model, after any folding or pruning
    tokenizer: object
    source: ModelSource
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)  # linear name → quantized weight

    def evaluated_model(self) -> torch.nn.Module:
        """The model as deployed: a copy whose quantized linears hold their dequantized weights."""
        if not self.qweights:
            return self.model
        fake = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, q in self.qweights.items():
                fake.get_submodule(name).weight.copy_(q.dequantize())
        return fake.eval()
