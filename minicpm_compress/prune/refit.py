"""Remove input columns of a linear and refit the ones that stay, by least squares on calibration inputs.

With G = XᵀX the Gram matrix of the linear's inputs, the summed squared output error of replacing W by
W' is tr((W − W′) G (W − W′)ᵀ). Keeping only the columns K, the best W′ is the least-squares refit
W′_K = W G[:, K] G[K, K]⁻¹: the kept channels take over what the removed ones carried, as far as their
correlation allows. The same refit written from H = G⁻¹ is the optimal-brain-surgeon update
(W′ = W − W_R H_RR⁻¹ H_R·), whose error, tr(W_R H_RR⁻¹ W_Rᵀ), scores a candidate set R before it is
removed. `remove_units` removes units (a single FFN channel, or a KV-head group's columns) greedily a
block at a time by that score, updating W and H after each block as ZipLM does, so each choice already
accounts for the refit of everything removed before it.

G is dampened (λ · mean diagonal added to the diagonal, as GPTQ does), which keeps dead channels harmless
and pulls the refit slightly towards the original weights.
"""

from __future__ import annotations

import torch

DAMPENING = 0.01


def _dampened(gram: torch.Tensor, dampening: float) -> torch.Tensor:
    g = gram.double().clone()
    diagonal = torch.diagonal(g)
    diagonal += dampening * diagonal.mean().clamp_min(1e-12)
    return g


def _inverse(gram: torch.Tensor, dampening: float) -> torch.Tensor:
    return torch.linalg.inv(_dampened(gram, dampening))  # 2.5x faster here than cholesky_inverse at 4864 wide


def _drop(weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> None:
    """Remove `columns` (in place): the kept columns absorb them, H loses them (a block downdate)."""
    h_rr = inverse[columns][:, columns]
    factor = torch.linalg.solve(h_rr, inverse[columns])  # H_RR⁻¹ H_R·
    weight -= weight[:, columns] @ factor
    inverse -= inverse[:, columns] @ factor
    weight[:, columns] = 0
    inverse[columns] = 0
    inverse[:, columns] = 0


def corrected_target(gram: torch.Tensor, correlation: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """E G⁻¹ (G dampened): the least-squares fit of a residual-stream drift D from the inputs X, given
    E = DᵀX; added to W it makes the full-width target the refit then prunes."""
    return torch.linalg.solve(_dampened(gram, dampening), correlation.double().T).T


def output_error(weight: torch.Tensor, refit: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W − W′) G (W − W′)ᵀ): the summed squared output error over the calibration tokens."""
    d = (weight.double() - refit.double())
    return float(((d @ gram.double()) * d).sum())


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                  dampening: float = DAMPENING) -> torch.Tensor:
    """W with only the columns `keep` left (the others zero), refit by least squares: W G[:, K] G[K, K]⁻¹."""
    w = weight.double().clone()
    inverse = _inverse(gram, dampening)
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[keep] = False
    if removed.any():
        _drop(w, inverse, removed.nonzero().squeeze(1))
    return w.to(weight.dtype)


def remove_units(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor, remove: int, block: int = 1,
                 dampening: float = DAMPENING) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove `remove` of the `units` ([units, columns per unit] column indices) whose removal, refit
    included, costs least. Returns (kept unit indices ascending, the refit weight with the removed units'
    columns zero).

    Single columns go `block` at a time: the block is chosen by exact sequential OBS among the 4 × block
    cheapest candidates (removing one channel changes the others' costs only through H's and W's entries
    on those channels), then W and H are updated once for the whole block. A block chosen by the costs
    before any of it is removed would take both halves of a redundant pair, each cheap only while the
    other stays."""
    w = weight.double().clone()
    inverse = _inverse(gram, dampening)
    alive = torch.ones(len(units), dtype=torch.bool)
    while (~alive).sum() < remove:
        take = min(block, remove - int((~alive).sum()))
        if units.shape[1] == 1:
            chosen = _cheapest_columns(w, inverse, units[:, 0], alive, take)
        else:
            costs = torch.full((len(units),), float("inf"), dtype=torch.float64)
            for u in alive.nonzero().squeeze(1).tolist():
                w_r = w[:, units[u]]
                costs[u] = (torch.linalg.solve(inverse[units[u]][:, units[u]], w_r.T) * w_r.T).sum()
            chosen = torch.topk(costs, take, largest=False).indices
        alive[chosen] = False
        _drop(w, inverse, units[chosen].reshape(-1))
    return alive.nonzero().squeeze(1), w.to(weight.dtype)


def _cost(w: torch.Tensor, inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each column alone, refit included: ‖W_j‖² / H_jj."""
    return (w**2).sum(0) / inverse_diagonal


def _cheapest_columns(w, inverse, columns, alive, take: int) -> torch.Tensor:
    """`take` unit indices removed one after another, each the cheapest after the ones before it."""
    costs = _cost(w, torch.diagonal(inverse).clamp_min(1e-300))[columns]
    costs[~alive] = float("inf")
    candidates = torch.topk(costs, min(4 * take, int(alive.sum())), largest=False).indices
    cols = columns[candidates]
    sub_w, sub_h = w[:, cols].clone(), inverse[cols][:, cols].clone()
    chosen = []
    for _ in range(take):
        costs = _cost(sub_w, torch.diagonal(sub_h).clamp_min(1e-300))
        costs[chosen] = float("inf")
        j = int(torch.argmin(costs))
        chosen.append(j)
        factor = sub_h[j] / sub_h[j, j]
        sub_w -= sub_w[:, j:j + 1] * factor
        sub_h -= sub_h[:, j:j + 1] * factor
    return candidates[chosen]
