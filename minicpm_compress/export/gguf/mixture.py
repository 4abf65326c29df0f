"""`type: auto`: a GGUF file of mixed types that fits a size, each tensor's type chosen by measurement.

llama.cpp's own mixtures (Q4_K_M, …) choose types per tensor by a fixed rule of names and layer positions.
Here every quantized tensor — each decoder linear and the output head (the embedding, when tied) — is
measured in every candidate type that fits its rows (K-quants need rows of 256k columns, the others 32k):
the relative output error over the calibration tokens, tr(ΔGΔᵀ) / tr(WGWᵀ) with G the Gram matrix of
the tensor's inputs, of round-to-nearest on that type's grid, or of the tensor's own calibrated codes
where they already have that type's layout (an earlier rtn/awq/gptq/qat stage). Each class of tensor
(q_proj, …, down_proj, the head) is probed in the same walk for its sensitivity, the KLD its errors
cause per unit (`measure_layers`), which turns every error into a predicted KLD. Types are then bought
greedily (`budget.climb`), the one that removes the most predicted KLD per byte first, until the file
would pass the target size. Last, each tensor gets its codes: its own where its type was chosen,
otherwise GPTQ on the chosen grid (a second walk over the layers, each fed by the quantized layers before
it, as the gptq stage does) or round-to-nearest. An untied embedding table is only looked up, so its
error is unweighted (G = I); the head and the embedding are quantized by round-to-nearest.

Sizes are exact: a dry run of the file's metadata and tensor directory gives every byte that is not
tensor data, and each tensor's data is counted in its blocks with the file's 32-byte alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CompressError
from ...layerwise import layer_grams, run_layer, state_layer_inputs
from ...models.architectures import layer_prefix
from ...progress import progress
from ...quant.budget import climb
from ...quant.output_error import relative_error
from ...quant.qweight import QuantizedWeight, QuantScheme, quantize
from .blocks import BLOCK_WIDTH, is_lossless
from .writer import aligned, gguf_bytes

# the types `auto` chooses from by default: every type whose blocks hold our codes exactly
AUTO_TYPES = ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
def tensor_bytes(shape: tuple[int, int], type_name: str) -> int:
    """Bytes of a [rows, cols] tensor's data in `type_name` blocks, padded to the file's alignment."""
    return aligned(gguf_bytes(shape, type_name))


def fitting_types(cols: int, candidates: tuple[str, ...]) -> list[str]:
    """The candidates whose blocks split a row of `cols` columns."""
    return [t for t in candidates if cols % BLOCK_WIDTH[t] == 0]


@dataclass
class Options:
    """One tensor's candidate types, cheapest first: their bytes in the file and their measured errors (relative
    output error, then × its class's sensitivity: the predicted KLD)."""

    shape: tuple[int, int]
    types: list[str]
    costs: list[int]
    errors: list[float]
    own: str | None  # the type whose option is the tensor's own codes, if any
    kind: str = ""  # its class: the linear's name in a layer (`mlp.down_proj`) or `head` / `embedding`

    @classmethod
    def measure(cls, weight: torch.Tensor, gram: torch.Tensor | None, own: QuantizedWeight | None,
                candidates: tuple[str, ...], kind: str) -> tuple["Options", torch.Tensor]:
        """Every candidate that fits `weight` [out, in], with its relative output error through `gram` (None:
        the plain relative squared error); `own` codes stand in for round-to-nearest in their own layout.
        Also the weight as the cheapest option stores it (the sensitivity probe)."""
        types = fitting_types(weight.shape[1], candidates)
        if not types:
            raise CompressError(f"gguf auto: rows of {weight.shape[1]} columns fit none of {', '.join(candidates)}")
        types.sort(key=lambda t: (tensor_bytes(tuple(weight.shape), t), t))
        gram = torch.eye(weight.shape[1]) if gram is None else gram.float()
        own_type = next((t for t in types if own is not None and is_lossless(own, t)), None)
        errors, probe = [], None
        for t in types:
            approx = own.dequantize() if t == own_type else quantize(weight, QuantScheme(layout=t)).dequantize()
            errors.append(relative_error(weight, approx, gram))
            probe = approx if probe is None else probe
        costs = [tensor_bytes(tuple(weight.shape), t) for t in types]
        return cls(tuple(weight.shape), types, costs, errors, own_type, kind), probe


def _kld(reference: list[torch.Tensor], hidden: list[torch.Tensor], head: torch.Tensor,
         probe_head: torch.Tensor | None = None) -> float:
    """Mean KLD per token of the head's outputs on `hidden` (with `probe_head` if given) from those on `reference`."""
    from ...evaluate.runners import head_logits

    total = tokens = 0.0
    with torch.inference_mode():
        for ref_batch, batch in zip(reference, hidden):
            for ref_row, row in zip(ref_batch, batch):  # one window at a time: vocabulary-wide logits are large
                logp = torch.log_softmax(head_logits(ref_row, head), dim=-1)
                logq = torch.log_softmax(head_logits(row, head if probe_head is None else probe_head), dim=-1)
                total += (logp.exp() * (logp - logq)).sum().item()
                tokens += row.shape[0]
    return max(total / tokens, 0.0)


def measure_layers(state, samples, candidates: tuple[str, ...], batch_size: int, probe_windows: int
                   ) -> tuple[dict[str, Options], dict[str, float]]:
    """Options for every decoder linear (keyed by its checkpoint tensor name) and the head, in one layer walk
    through the state's float layers, and each class's sensitivity.

    Relative errors of different linears do not cost the model alike (a head's error reaches the logits
    directly, a q_proj's through softmax and the residual stream), so each class of tensor is probed: the
    first `probe_windows` calibration windows run through the model with that class alone at its cheapest
    option in every layer, and the KLD from the float model over the sum of those options' errors is its
    sensitivity (KLD per unit of relative error). Errors are scaled by it, so the climb buys predicted KLD."""
    arch = state.arch
    options: dict[str, Options] = {}
    with state.computing_in(torch.float32):
        inputs = state_layer_inputs(state, samples, batch_size)
        probe_samples = samples[:probe_windows] if isinstance(samples, torch.Tensor) else samples
        reference = state_layer_inputs(state, probe_samples, batch_size)
        streams = {name: reference for name in arch.linears}  # per class: the probe's hidden states
        for index in progress(range(state.num_layers), desc="gguf auto: measure types", total=state.num_layers,
                              unit="layer"):
            prefix = layer_prefix(index)
            with state.layer(index) as layer:
                grams, outputs = layer_grams(layer, arch, inputs)
                for name in arch.linears:
                    module = layer.get_submodule(name)
                    weight = module.weight.detach().float()
                    options[f"{prefix}.{name}.weight"], probe = Options.measure(
                        weight, grams[name], state.qweights.get(f"{prefix}.{name}"), candidates, name)
                    saved, module.weight.data = module.weight.data, probe.to(module.weight.dtype)
                    try:
                        streams[name] = run_layer(layer, streams[name])
                    finally:
                        module.weight.data = saved
                reference = run_layer(layer, reference)
            inputs = outputs
        with state.modules("model.norm") as model, torch.inference_mode():
            normed = [model.model.norm(h).reshape(-1, h.shape[-1]).double() for h in inputs.hidden]
            reference = [model.model.norm(h).float() for h in reference.hidden]
            streams = {n: [model.model.norm(h).float() for h in s.hidden] for n, s in streams.items()}
        head_gram = sum(h.T @ h for h in normed)
        del inputs, normed
        head = state.tensor(state.head_name())
        options[state.head_name()], head_probe = Options.measure(head, head_gram, None, candidates, "head")
        klds = {name: _kld(reference, stream, head) for name, stream in streams.items()}
        klds["head"] = _kld(reference, reference, head, head_probe)
        del head_probe, streams
        if not state.tied:  # looked up only: unweighted
            options["model.embed_tokens.weight"], _ = Options.measure(
                state.tensor("model.embed_tokens.weight"), None, None, candidates, "embedding")
    sensitivity = {}
    for kind, kld in klds.items():
        probed = sum(o.errors[0] for o in options.values() if o.kind == kind)
        sensitivity[kind] = kld / probed if probed > 0 else 0.0
    if not state.tied:  # not probed: taken to be as sensitive per unit of error as the head
        sensitivity["embedding"] = sensitivity["head"]
    for o in options.values():
        o.errors = [e * sensitivity[o.kind] for e in o.errors]
    return options, sensitivity


def choose_types(options: dict[str, Options], budget: int) -> dict[str, int]:
    """The option each tensor takes so that their bytes stay within `budget` (error removed per byte, greedily)."""
    floor = sum(o.costs[0] for o in options.values())
    if floor > budget:
        raise CompressError(f"gguf auto: the target leaves {budget / 2**20:.2f} MiB for quantized tensors; the "
                            f"smallest candidate types need {floor / 2**20:.2f} MiB")
    return climb({n: o.costs for n, o in options.items()}, {n: o.errors for n, o in options.items()}, budget)


def make_codes(state, samples, chosen: dict[str, str], requantize: str, batch_size: int) -> dict[str, QuantizedWeight]:
    """Codes for every chosen tensor (checkpoint name → weight): its own when they have the chosen layout,
    else GPTQ (decoder linears, `requantize: gptq`) or round-to-nearest on the chosen grid."""
    from ...quant.gptq import GPTQConfig, gptq_quantize

    def own(key: str) -> QuantizedWeight | None:
        q = state.qweights.get(key.removesuffix(".weight"))
        return q if q is not None and is_lossless(q, chosen[key]) else None

    codes = {key: q for key in chosen if (q := own(key)) is not None}
    arch = state.arch
    layered = [k for k in chosen if k not in codes and k.startswith("model.layers.")]
    if requantize == "gptq" and layered:
        with state.computing_in(torch.float32):
            inputs = state_layer_inputs(state, samples, batch_size)
            for index in progress(range(state.num_layers), desc="gguf auto: gptq", total=state.num_layers,
                                  unit="layer"):
                prefix = layer_prefix(index)
                with state.layer(index) as layer:
                    grams, _ = layer_grams(layer, arch, inputs)
                    for name in arch.linears:
                        key = f"{prefix}.{name}.weight"
                        module = layer.get_submodule(name)
                        if key not in codes:
                            scheme = QuantScheme(layout=chosen[key])
                            try:
                                codes[key] = gptq_quantize(module.weight.detach().float(), grams[name], scheme,
                                                           GPTQConfig(layout=chosen[key], act_order=True, clip=True))
                            except CompressError as e:
                                raise CompressError(f"gguf auto: gptq of '{key}': {e}") from None
                        with torch.no_grad():  # the next layer sees this one as it will be in the file
                            module.weight.copy_(codes[key].dequantize())
                    del grams
                    inputs = run_layer(layer, inputs)
    for key in chosen:
        if key not in codes:
            codes[key] = quantize(state.tensor(key), QuantScheme(layout=chosen[key]))
    return codes


def plan_mixture(state, samples, budget: int, candidates: tuple[str, ...], requantize: str,
                 batch_size: int = 8, probe_windows: int = 8) -> tuple[dict[str, QuantizedWeight], dict]:
    """The codes of every quantized tensor for a file whose quantized tensors take at most `budget` bytes,
    and what was chosen (per tensor: type and measured error), for the manifest."""
    options, sensitivity = measure_layers(state, samples, tuple(candidates), batch_size, probe_windows)
    level = choose_types(options, budget)
    chosen = {n: o.types[level[n]] for n, o in options.items()}
    codes = make_codes(state, samples, chosen, requantize, batch_size)
    counts: dict[str, int] = {}
    for t in chosen.values():
        counts[t] = counts.get(t, 0) + 1
    spent = sum(o.costs[level[n]] for n, o in options.items())
    details = {
        "budget_bytes": budget,
        "quantized_bytes": spent,
        "types": dict(sorted(counts.items())),
        "requantize": requantize,
        "predicted_kld": round(sum(o.errors[level[n]] for n, o in options.items()), 6),
        "sensitivity": {k: round(v, 6) for k, v in sensitivity.items()},
        "tensors": {n: {"type": chosen[n], "predicted_kld": round(o.errors[level[n]], 8),
                        "codes": "own" if chosen[n] == o.own else requantize if n.startswith("model.layers.") else "rtn"}
                    for n, o in options.items()},
    }
    return codes, details
