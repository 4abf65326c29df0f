"""Output error of a weight approximation through the Gram matrix of its inputs (G = Xᵀ X): the one measure the
calibrated methods (AWQ, GPTQ), the precision budget and the GGUF mixture search all minimise. No imports of
the package: every layer may use it."""

from __future__ import annotations

import torch


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of the squared output error for weight errors `delta` [..., out, in]: tr(Δ G Δᵀ)."""
    return ((delta @ gram) * delta).sum(dim=(-2, -1))


def relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Output error of `approx` in place of `weight`, relative to the output's own energy (both through G)."""
    return output_error(weight - approx, gram).item() / max(output_error(weight, gram).item(), 1e-30)
