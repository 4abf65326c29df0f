"""Float16 for Core ML: the range check (the largest values a decoder's linears, norms and KV cache see on
calibration text, against float16's limits), and the rewrite that makes a decoder's activations fit float16
without changing its function.

Models with massive activations (a few residual-stream channels in the tens of thousands) overflow
float16 in three places: the residual stream itself, the norms that square it, and the few linears
that write those values (down_proj) or read them. The rewrite, all by powers of two (exact in floating
point, and for quantized weights a change of their scales only, their codes unchanged):

  * the residual stream is stored × 2^-k: the token embeddings are multiplied by 2^-k after the lookup
    (the table, shared with a tied head, is unchanged), o_proj and down_proj weights by 2^-k, and the
    eps of every norm that reads the stream by 4^-k (RMSNorm is scale-invariant up to its eps);
  * in layer l the MLP's inner activations are carried × 2^-m_l: up_proj weights × 2^-m_l (act(gate) × up
    and down_proj's input shrink with it) and down_proj weights × 2^(m_l - k) instead;
  * every RMSNorm divides its input by the row's largest |value| before squaring (then the squares are at
    most 1 and their mean at least 1/width), with its eps divided accordingly: the same function.

k and each m_l are the smallest shifts that bring the values measured on calibration text under
`LIMIT`, a 4× margin below float16's largest value for inputs the calibration did not show.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

FLOAT16_MAX = 65504.0
SQUARE_LIMIT = 256.0  # RMSNorm squares its input: in float16, x * x overflows once |x| reaches this
LIMIT = FLOAT16_MAX / 4
STREAM_LINEARS = ("self_attn.o_proj", "mlp.down_proj")  # the linears that write the residual stream
STREAM_NORMS = ("input_layernorm", "post_attention_layernorm")


class RowScaledRMSNorm(torch.nn.Module):
    """`norm`'s function, computed without squaring values above 1: x / max|x| first, eps / max|x|²."""

    def __init__(self, norm: torch.nn.Module, eps_factor: float = 1.0):
        super().__init__()
        self.weight = norm.weight
        self.eps_root = math.sqrt(norm.variance_epsilon * eps_factor)
        self.divisor = getattr(norm, "logit_divisor", None)  # MiniCPM's final norm divides the logits too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(-1, keepdim=True).clamp_min(1e-4)
        y = x / peak
        eps = (self.eps_root / peak) ** 2  # eps / peak², without forming peak² (it may exceed float16)
        out = self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))
        return out / self.divisor if self.divisor is not None else out


class ScaledEmbedding(torch.nn.Module):
    """An embedding whose rows are multiplied by `factor` after the lookup (its weight stays shared)."""

    def __init__(self, embedding: torch.nn.Embedding, factor: float):
        super().__init__()
        self.embedding = embedding
        self.factor = factor

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) * self.factor


@dataclass
class Float16Fit:
    stream_shift: int  # k
    mlp_shifts: dict[int, int] = field(default_factory=dict)  # layer → m_l, only layers with m_l > 0
    blocking: str | None = None  # a value no shift can bring into range (a gate or q/k/v output), if any
    largest_after: tuple[float, str] | None = None  # the largest value measured after the rewrite, and where

    def weight_factors(self, layers: int) -> dict[str, float]:
        """Linear name (relative to the model) → the power of two its weight (or its scales) is multiplied by."""
        out = {}
        for i in range(layers):
            m = self.mlp_shifts.get(i, 0)
            out[f"model.layers.{i}.self_attn.o_proj"] = 2.0 ** -self.stream_shift
            out[f"model.layers.{i}.mlp.up_proj"] = 2.0 ** -m
            out[f"model.layers.{i}.mlp.down_proj"] = 2.0 ** (m - self.stream_shift)
        return {k: v for k, v in out.items() if v != 1.0}

    def describe(self) -> dict:
        out = {"stream_shift": self.stream_shift, "mlp_shifts": {str(k): v for k, v in sorted(self.mlp_shifts.items())},
               "norms": "row-max scaled before squaring"}
        if self.largest_after:
            out["largest_after"] = {"module": self.largest_after[1], "peak": round(self.largest_after[0], 3)}
        return out | ({"blocking": self.blocking} if self.blocking else {})


def module_maxima(model: torch.nn.Module, run) -> dict[str, dict[str, float]]:
    """While `run()` feeds `model`: per module name, the largest |input| and |output| of every linear (and
    convolution), and the largest value every norm squares: |input| for RMSNorm, |input − mean| for
    LayerNorm (norms have no "output" entry)."""
    found: dict[str, dict[str, float]] = {}

    def record(name: str, kind: str, value: torch.Tensor) -> None:
        peak = value.detach().abs().max().item()
        entry = found.setdefault(name, {})
        entry[kind] = max(entry.get(kind, 0.0), peak)

    def linear_hook(name: str):
        def hook(module, inputs, output):
            record(name, "input", inputs[0])
            record(name, "output", output)
        return hook

    def norm_hook(name: str, centred: bool):
        def hook(module, inputs, output):
            x = inputs[0]
            record(name, "input", x - x.mean(-1, keepdim=True) if centred else x)
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
            handles.append(module.register_forward_hook(norm_hook(name, isinstance(module, torch.nn.LayerNorm))))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found


def _shift(peak: float) -> int:
    return max(0, math.ceil(math.log2(peak / LIMIT))) if peak > 0 else 0


def plan_fit(maxima: dict[str, dict[str, float]], layers: int) -> Float16Fit:
    """The smallest shifts that bring the measured values under LIMIT (see the module docstring)."""
    stream = max([v["output"] for n, v in maxima.items() if n.endswith(STREAM_LINEARS)]
                 + [v["input"] for n, v in maxima.items() if n.endswith(STREAM_NORMS) or n.endswith("model.norm")],
                 default=0.0)
    fit = Float16Fit(_shift(stream))
    for i in range(layers):
        up, down = maxima.get(f"model.layers.{i}.mlp.up_proj", {}), maxima.get(f"model.layers.{i}.mlp.down_proj", {})
        m = _shift(max(up.get("output", 0.0), down.get("input", 0.0)))
        if m:
            fit.mlp_shifts[i] = m
    for name, v in sorted(maxima.items()):  # outputs the rewrite cannot shift
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj")) and v.get("output", 0.0) >= LIMIT:
            fit.blocking = f"'{name}' outputs values up to {v['output']:.0f}"
            break
    return fit


def apply_fit(model: torch.nn.Module, fit: Float16Fit) -> torch.nn.Module:
    """A copy of `model` computing the same function with the fit's shifts and row-scaled norms."""
    model = copy.deepcopy(model)
    inner = model.model
    layers = len(inner.layers)
    with torch.no_grad():
        for name, factor in fit.weight_factors(layers).items():
            model.get_submodule(name).weight.mul_(factor)
    if fit.stream_shift:
        inner.embed_tokens = ScaledEmbedding(inner.embed_tokens, 2.0 ** -fit.stream_shift)
    stream_eps = 4.0 ** -fit.stream_shift
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, attr = name.rpartition(".")
            reads_stream = attr in STREAM_NORMS or name == "model.norm"
            setattr(model.get_submodule(parent), attr, RowScaledRMSNorm(module, stream_eps if reads_stream else 1.0))
    return model


def overflow(maxima: dict[str, dict[str, float]], squares: bool) -> str | None:
    """The first value at or above float16's maximum (or, where norms square their input, a norm input at
    or above 256), naming the module; None when everything fits."""
    for name, v in sorted(maxima.items(), key=lambda kv: -max(kv[1].values())):
        limit = SQUARE_LIMIT if squares and "input" in v and "output" not in v else FLOAT16_MAX
        for kind in ("output", "input"):
            if v.get(kind, 0.0) >= limit:
                return f"'{name}' {kind} reaches {v[kind]:.0f} (float16 limit {limit:.0f})"
    return None


def simulate_float16(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """`model` run in float16 on `ids` (torch; the norms here compute in float16 too), measured by the
    project's evaluator against itself in float32. A proxy for a float16 runtime, not Core ML itself."""
    from ...evaluate.evaluator import Evaluator
    from ...evaluate.metrics import reference_stats

    metrics = Evaluator(ids, reference_stats(model, ids)).measure(copy.deepcopy(model).half(),
                                                                   desc="float16 simulation")
    finite = math.isfinite(metrics.kld)
    return {"tokens": metrics.tokens, "kld": round(metrics.kld, 6) if finite else None,
            "top1": round(metrics.top1, 4), "finite": finite}


def activation_maxima(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """`module_maxima` of `model` fed `ids` (`batch_size` sequences at a time)."""
    return module_maxima(model, lambda: [model(chunk) for chunk in ids.split(batch_size)])


def activation_peaks(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, dict]:
    """The largest |value| entering any RMSNorm, leaving any linear, and leaving k_proj/v_proj (what the
    float16 KV-cache states hold) over `ids`, each with its module's name."""
    return peaks_of(activation_maxima(model, ids, batch_size))


def module_peaks(model: torch.nn.Module, run) -> dict[str, dict]:
    """While `run()` feeds `model`: the largest |output| of any linear or convolution, of k_proj/v_proj, and
    the largest value a norm squares (|input| for RMSNorm, |input − mean| for LayerNorm), with module names."""
    return peaks_of(module_maxima(model, run))


def peaks_of(maxima: dict[str, dict[str, float]]) -> dict[str, dict]:
    """`module_maxima`'s values reduced to the three peaks `module_peaks` describes."""
    def largest(values) -> dict:
        peak, name = max(values, default=(0.0, None))
        return {"module": name, "peak": round(peak, 3)}

    return {
        "norm_input": largest((v["input"], n) for n, v in maxima.items() if "output" not in v),
        "linear_output": largest((v["output"], n) for n, v in maxima.items() if "output" in v),
        "kv_output": largest((v["output"], n) for n, v in maxima.items() if n.endswith(("k_proj", "v_proj"))),
    }


def float16_overflow(peaks: dict[str, dict]) -> str | None:
    """Why float16 compute would overflow on these activations (naming the module), or None."""
    linear, norm = peaks["linear_output"], peaks["norm_input"]
    if linear["peak"] >= FLOAT16_MAX:
        return f"'{linear['module']}' outputs values up to {linear['peak']:.0f} (float16 max {FLOAT16_MAX:.0f})"
    if norm["peak"] >= SQUARE_LIMIT:
        return (f"'{norm['module']}' squares inputs up to {norm['peak']:.0f} "
                f"(float16 x*x overflows from {SQUARE_LIMIT:.0f})")
    return None


SIMULATED_WINDOWS = 2  # held-out windows run in float16 (torch) against the float32 read-back model


def fit_float16(state, samples: torch.Tensor, problem: str, maxima: dict[str, dict[str, float]]):
    """(fit, the refitted float model, what still overflows) for a model whose activations overflow float16:
    the rewrite above, planned from `maxima` (`activation_maxima` of the state's model on `samples`). The fit
    is kept only if the rewritten model's values, measured again on the same calibration text, all fit
    (None, None, problem otherwise)."""
    fit = plan_fit(maxima, state.config.num_hidden_layers)
    if fit.blocking:
        return fit, None, f"{problem}; no power-of-two rewrite fits it: {fit.blocking}"
    fitted = apply_fit(state.evaluated_model(), fit)
    after = activation_maxima(fitted, samples)
    fit.largest_after = max((max(v.values()), name) for name, v in after.items())
    left = overflow(after, squares=False)
    if left:
        return fit, None, f"{problem}; after the float16 rewrite still {left}"
    return fit, apply_fit(state.model, fit), None
