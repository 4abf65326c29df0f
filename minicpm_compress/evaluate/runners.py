"""Runners: one small adapter per runtime that returns next-token logits for a batch of token windows.

The evaluator works on any runner, so a stage's check and an artifact's check are the same code.
Exporters add runners for their runtimes (llama.cpp, onnxruntime, Core ML read-back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

import torch

from ..quant.qweight import QuantizedWeight

if TYPE_CHECKING:
    from ..state import ModelState



def head_logits(hidden: torch.Tensor, head: "torch.Tensor | QuantizedWeight", chunk: int = 8192) -> torch.Tensor:
    """hidden [..., H] @ head [V, H]ᵀ in float32, converting (or dequantizing) `head` a slice of the
    vocabulary at a time (a 73k × 4096 head is 1.2 GB in float32)."""
    hidden = hidden.float()
    out = torch.empty(*hidden.shape[:-1], head.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, head.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = head.rows(rows).dequantize() if isinstance(head, QuantizedWeight) else head[rows]
        out[..., rows] = hidden @ part.to(hidden.device, torch.float32).T
    return out


class Runner(Protocol):
    name: str

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids → [batch, seq, vocab] float32 logits."""


def logit_batches(runner: Runner, windows, batch_size: int) -> Iterator[torch.Tensor]:
    """[batch, seq, vocab] logits for consecutive batches of `windows` (token ids or image prompts); a runner
    may walk all windows at once."""
    if hasattr(runner, "batches"):
        yield from runner.batches(windows, batch_size)
        return
    for start in range(0, len(windows), batch_size):
        yield runner.logits(windows[start : start + batch_size])


class StreamedRunner:
    """A model state run layer by layer over all windows (never the whole model in memory)."""

    name = "torch"

    def __init__(self, state: "ModelState", quantized: bool = True, capture: list | None = None):
        self.state = state
        self.quantized = quantized
        self.capture = capture  # if given, each batch's head inputs (all but the last position) are appended

    def head(self) -> "torch.Tensor | QuantizedWeight":
        if "lm_head.bias" in self.state.weights:
            raise ValueError("output heads with a bias are not supported")
        name = self.state.head_name()
        if self.quantized and name.removesuffix(".weight") in self.state.qweights:
            return self.state.qweights[name.removesuffix(".weight")]  # packed: dequantized a slice at a time
        return self.state.weights.get(name, dtype=None)  # as stored: bf16 stays bf16

    def batches(self, windows, batch_size: int) -> Iterator[torch.Tensor]:
        from ..layerwise import head_inputs

        head = self.head()
        hidden = head_inputs(self.state, windows, batch_size, self.quantized)
        with torch.inference_mode():
            for h in hidden:
                h = h.float().cpu()
                if self.capture is not None:
                    self.capture.append(h[:, :-1])
                yield head_logits(h, head)

    def logits(self, input_ids) -> torch.Tensor:
        return torch.cat(list(self.batches(input_ids, len(input_ids))))


class TorchRunner:
    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def logits(self, input_ids) -> torch.Tensor:
        """Token windows, or image prompts (with their image features attached)."""
        from ..layerwise import image_features

        with torch.inference_mode(), image_features(self.model, input_ids) as ids:
            return self.model(input_ids=ids, use_cache=False).logits.float()
