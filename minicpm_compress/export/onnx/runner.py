"""onnxruntime as a runner: an exported decoder evaluated like a torch model, and its decode speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...devices import cpu_threads
from ...models.architectures import head_dim
from .graph import io_names


class OnnxRunner:
    """Next-token logits from onnxruntime: the whole window as one prefill with an empty cache."""

    name = "onnxruntime"

    def __init__(self, path: Path, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = cpu_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers, self.kv, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, head_dim(config)
        self.inputs = {i.name for i in self.session.get_inputs()}  # a graph without position_ids derives them

    def feeds(self, input_ids: np.ndarray, past: list[np.ndarray] | None, past_len: int,
              first: str = "input_ids") -> dict:
        """The decoder's inputs; `first` names the first one (input_ids, or inputs_embeds [B, S, D])."""
        batch, seq = input_ids.shape[:2]
        inputs, _ = io_names(self.layers)
        if past is None:
            past = [np.zeros((batch, self.kv, 0, self.head_dim), np.float32)] * (2 * self.layers)
        feeds = {
            first: input_ids.astype(np.int64 if first == "input_ids" else np.float32),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(np.int64),
            **dict(zip(inputs[3:], past)),
        }
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None, past_len: int = 0):
        """(logits, present key/values) for `input_ids` after a cache of `past_len` tokens."""
        out = self.session.run(None, self.feeds(input_ids, past, past_len))
        return out[0], out[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(input_ids.numpy())[0]).float()

    def greedy(self, prompt_ids: list[int], steps: int) -> list[int]:
        """Greedy decoding as onnxruntime-genai does it: the prompt in one pass, then one token per pass."""
        logits, cache = self.run(np.array([prompt_ids]))
        out = []
        for i in range(steps):
            out.append(int(logits[0, -1].argmax()))
            if i + 1 < steps:
                logits, cache = self.run(np.array([out[-1:]]), cache, len(prompt_ids) + i)
        return out


def decode_tokens_per_s(runner: "OnnxRunner", prompt: np.ndarray, steps: int) -> float:
    """Greedy decoding speed after a prefill of `prompt` [1, n], one token at a time with the cache."""
    import time

    logits, cache = runner.run(prompt)
    token = np.array([[int(logits[0, -1].argmax())]])
    start = time.perf_counter()
    for i in range(steps):
        logits, cache = runner.run(token, cache, prompt.shape[1] + i)
        token = np.array([[int(logits[0, -1].argmax())]])
    return steps / (time.perf_counter() - start)
