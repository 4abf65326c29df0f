"""Output error of a weight approximation through the Gram matrix of its inputs (G = Xᵀ X): the one measure the
calibrated methods (AWQ, GPTQ), the precision budget and the GGUF mixture search all minimise. No imports of
the package: every layer may use it."""

from __future__ import annotations

import math

import torch


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of the squared output error for weight errors `delta` [..., out, in]: tr(Δ G Δᵀ)."""
    return ((delta @ gram) * delta).sum(dim=(-2, -1))


def relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Output error of `approx` in place of `weight`, relative to the output's own energy (both through G)."""
    return output_error(weight - approx, gram).item() / max(output_error(weight, gram).item(), 1e-30)


def diagonal_blocks(gram: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal blocks of `gram` [in, in] for groups of `group` columns → [n_groups, group, group] (float32;
    the last block zero-padded, so padded columns add nothing)."""
    cols = gram.shape[0]
    n_groups = math.ceil(cols / group)
    pad = n_groups * group - cols
    gram = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad)) if pad else gram.float()
    return torch.stack([gram[i * group : (i + 1) * group, i * group : (i + 1) * group] for i in range(n_groups)])


def group_errors(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Output error of each (row, group) of the weight errors `delta` [out, in] through the Gram matrix's
    diagonal `blocks` (`diagonal_blocks`) → [out, n_groups]: the error each group's inputs alone cause."""
    n_groups, group = blocks.shape[0], blocks.shape[1]
    d = torch.nn.functional.pad(delta.float(), (0, n_groups * group - delta.shape[1]))
    d = d.reshape(delta.shape[0], n_groups, group)
    return torch.einsum("ogi,gij,ogj->og", d, blocks, d)
