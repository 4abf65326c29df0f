"""Scale searches: each group's scale (and offset) chosen for the output error, not only from its range.

Three searches, one module (the awq and gptq stages and the ONNX token table's clip use them):
  * `search_clip`: a shrink ratio of the group's range per (output row, group), the one minimising the
    group's output error through the diagonal block of the inputs' Gram matrix G (AWQ's clip search);
  * `weighted_params`: the importance-weighted search below;
  * `search_params`: both, each group (each super-block of a K grid) taking whichever leaves the smaller
    output error through its block of G.

`group_params` maps a group's range (shrunk by a clip) onto the codes. Where the importance of each input
channel is known — the diagonal of its inputs' Gram matrix, Σ x² over the calibration tokens — the error
that reaches the output is, to first order, Σ_j importance_j · (w_j − ŵ_j)², and a group's best scale and
offset are rarely its range's. `weighted_params` searches them per group as llama.cpp's importance-matrix
quantizers do (ggml-quants.c: `make_qkx2_quants`, `make_qx_quants`, IQ4_NL's search):

  * asymmetric grids (integer zero points, float offsets, the K grids with offsets): 21 placements of the
    range on the codes, iscale = (2^b − 2 + k/10) / (max − min) for k = 0…20; each placement's codes are
    fixed and the scale and offset fitted to them by weighted least squares (a K grid's offset kept ≤ 0);
  * symmetric grids: 19 placements of the group's peak, iscale = (top + k/10) / peak for k = −9…9 (the
    signed peak on code −2^(b−1) for the full 4/5-bit grid, |peak| on the top code otherwise), each with its
    least-squares scale;
  * IQ4_NL: its own scale search (`codebook_scales`), weighted by the importance instead of x².
Scales of a K grid's symmetric types (Q3_K, Q6_K) stay non-negative: |peak| goes on the top code.

Each candidate is scored as it will be stored (float16 scale, integer zero point or float16 offset, codes
re-rounded), and the min–max parameters are always one of the candidates, so no group ends with a larger
weighted error than min–max gives (a K grid then snaps the chosen scales to its super-block integers).
"""

from __future__ import annotations

import torch

from .output_error import diagonal_blocks, group_errors
from .qweight import (
    MIN_SCALE,
    QuantScheme,
    code_range,
    code_values,
    codebook_scales,
    exact_scales,
    fake_quantize,
    float16_exact,
    full_grid,
    group_params,
    group_range,
    group_view,
    k_grid,
    range_params,
    round_codes,
    rounded,
    signed_floor,
)


def search_clip(weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme, grid: int,
                max_shrink: float) -> torch.Tensor:
    """Per (output channel, group) clipping ratio minimising that group's output error → [out, n_groups].
    Each ratio's weights are the quantizer's own values (`rounded`'s: quantize → dequantize bit for bit,
    without packing codes), from the groups' ranges read once; the largest ratio wins ties."""
    scheme = scheme.fitting(weight.shape[1])
    group = scheme.group_size or weight.shape[1]
    blocks = diagonal_blocks(gram, group)
    ratios = torch.tensor([1 - i / grid for i in range(max(1, int(max_shrink * grid)))], device=weight.device)
    w = weight.detach().float()
    span = group_range(group_view(w, group), scheme)
    errors = torch.stack([group_errors(w - fake_quantize(w, *range_params(span, scheme, r), scheme), blocks)
                          for r in ratios])
    return ratios[errors.argmin(dim=0)]


def group_importance(importance: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """Per-column importance [cols] → [1, n_groups, group] beside `group_view`'s groups (padding weighs 0)."""
    imp = importance.detach().to(torch.float32).reshape(1, cols).clamp(min=0)
    pad = -cols % group
    if pad:
        imp = torch.cat([imp, imp.new_zeros(1, pad)], dim=1)
    return imp.reshape(1, -1, group)


def _stored(scale: torch.Tensor, offset: torch.Tensor | None, scheme: QuantScheme):
    """A candidate's scale and offset as the weight would hold them: float16, a nonzero scale (signed where the
    full grid allows it), an integer zero point in the code range or a float16 offset."""
    if (full_grid(scheme) or scheme.codebook) and scheme.scale_dtype == "float16":  # signed scales
        scale = signed_floor(scale)
    else:
        scale = scale.abs().clamp(min=MIN_SCALE)
    scale = exact_scales(scale, scheme)
    if offset is None:
        return scale, None
    if scheme.zero_point == "int":
        lo, hi = code_range(scheme)
        return scale, torch.clamp(torch.round(-offset / scale), lo, hi)
    return scale, float16_exact(offset)


def _error(g: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           scheme: QuantScheme) -> torch.Tensor:
    """Σ importance · (w − ŵ)² per group [out, n_groups, 1] for the stored scale and zero point."""
    s = scale.expand_as(g)
    z = None if zero is None else zero.expand_as(g)
    approx = code_values(round_codes(g, s, z, scheme), s, z, scheme)
    return (imp * (g - approx) ** 2).sum(2, keepdim=True)


def _symmetric_candidates(g: torch.Tensor, imp: torch.Tensor, scheme: QuantScheme):
    lo, hi = code_range(scheme)
    if full_grid(scheme):
        peak = g.gather(2, g.abs().argmax(dim=2, keepdim=True))
        top = float(-lo)
        peak_code = -1.0  # the signed peak goes to the bottom code
    else:
        peak = g.abs().amax(dim=2, keepdim=True)
        top = float(hi)
        peak_code = 1.0
    peak = torch.where(peak == 0, 1.0, peak)
    for k in range(-9, 10):
        inverse = peak_code * (top + k / 10) / peak
        codes = torch.clamp(torch.round(g * inverse), lo, hi)
        lx, l2 = (imp * codes * g).sum(2, keepdim=True), (imp * codes * codes).sum(2, keepdim=True)
        yield torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, 1.0), 1 / inverse), None


def _codebook_candidates(g: torch.Tensor, imp: torch.Tensor, scheme: QuantScheme):
    yield codebook_scales(g, importance=imp), None  # stored as float16 with its sign by _stored


def _asymmetric_candidates(g: torch.Tensor, imp: torch.Tensor, scheme: QuantScheme):
    top = float(2**scheme.bits - 1)
    low, high = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    if scheme.super_block:
        low = low.clamp(max=0)  # K-quant offsets are −dmin · m with m ≥ 0
    span = torch.where(high > low, high - low, 1.0)
    w_sum, x_sum = imp.sum(2, keepdim=True), (imp * g).sum(2, keepdim=True)
    for k in range(21):
        codes = torch.clamp(torch.round((g - low) * ((top - 1 + k / 10) / span)), 0, top)
        l_sum, l2, lx = (imp * codes).sum(2, keepdim=True), (imp * codes * codes).sum(2, keepdim=True), \
            (imp * codes * g).sum(2, keepdim=True)
        det = w_sum * l2 - l_sum * l_sum
        ok = det > 0
        safe = torch.where(ok, det, 1.0)
        scale = torch.where(ok, (w_sum * lx - x_sum * l_sum) / safe, span / top)
        offset = torch.where(ok, (l2 * x_sum - l_sum * lx) / safe, low)
        if scheme.super_block:  # an offset above 0 is not on the grid: fit the scale alone
            positive = offset > 0
            scale = torch.where(positive, lx / torch.where(l2 > 0, l2, 1.0), scale)
            offset = torch.where(positive, 0.0, offset)
        yield scale, offset


def weighted_params(weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`group_params`'s scales [out, n_groups] and zero points for `weight` [out, in], searched per group for
    the least Σ importance · (w − ŵ)², `importance` [in] being each input channel's weight (e.g. diag of
    the inputs' Gram matrix). 8-bit codes keep min–max (Q8_0's rule, near lossless)."""
    w = weight.detach().to(torch.float32)
    scheme = scheme.fitting(w.shape[1])
    if scheme.bits == 8:
        return group_params(w, scheme)
    group = scheme.group_size or w.shape[1]
    g = group_view(w, group)
    imp = group_importance(importance, w.shape[1], group)
    # candidates are compared as stored, before a K grid snaps the chosen scales to its super-block integers
    base_scale, base_zero = group_params(w, scheme)
    best_scale = base_scale.unsqueeze(2)
    best_zero = None if base_zero is None else base_zero.to(torch.float32).unsqueeze(2)
    best_error = _error(g, imp, best_scale, best_zero, scheme)
    candidates = (_codebook_candidates if scheme.codebook else _symmetric_candidates if scheme.symmetric
                  else _asymmetric_candidates)
    for scale, offset in candidates(g, imp, scheme):
        scale, zero = _stored(scale, offset, scheme)
        error = _error(g, imp, scale, zero, scheme)
        better = error < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    scales = best_scale.squeeze(2).contiguous()
    zeros = None if best_zero is None else best_zero.squeeze(2)
    if scheme.super_block:
        return k_grid(scales, zeros, scheme)
    if zeros is not None and scheme.zero_point == "int":
        zeros = zeros.to(torch.uint8)
    return scales, zeros


SEARCHES = ("clip", "weighted", "both")


def search_params(weight: torch.Tensor, scheme: QuantScheme, gram: torch.Tensor, how: str = "both",
                  clip_grid: int = 20, max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points for `weight` [out, in] with its inputs' Gram matrix `gram`, by the search `how`:
    `clip`, `weighted` (importance diag(gram)), or `both`: per group the one that leaves the smaller output
    error through the group's block of `gram` (on a K grid per super-block, so the chosen scales stay on one
    grid per super-block)."""
    w = weight.detach().to(torch.float32)
    scheme = scheme.fitting(w.shape[1])
    gram = gram.float()
    if how not in SEARCHES:
        raise ValueError(f"unknown scale search '{how}' (known: {', '.join(SEARCHES)})")
    if how == "weighted":
        return weighted_params(w, scheme, torch.diagonal(gram))
    clipped = group_params(w, scheme, search_clip(w, gram, scheme, clip_grid, max_shrink))
    if how == "clip":
        return clipped
    group = scheme.group_size or w.shape[1]
    weighted = weighted_params(w, scheme, torch.diagonal(gram))
    blocks = diagonal_blocks(gram, group)
    errors = [group_errors(w - rounded(w, scheme, params=p), blocks) for p in (clipped, weighted)]
    if scheme.super_block:
        per = scheme.super_block // group
        errors = [e.reshape(e.shape[0], -1, per).sum(2).repeat_interleave(per, dim=1) for e in errors]
    pick = errors[1] < errors[0]
    scales = torch.where(pick, weighted[0], clipped[0])
    zeros = None if clipped[1] is None else torch.where(pick, weighted[1], clipped[1])
    return scales, zeros
