"""The smoke test an app team can repeat: a fixed prompt and the greedy continuation it must produce.

Computed with the runners the evaluator uses. A runtime's runner decodes as an app does (`greedy`: the
prompt in one pass, then one token at a time with its cache: with int8 activations the numbers depend on
how many rows a pass holds); other runners recompute the whole sequence per new token (a few tokens
only). An exporter records its file's own continuation in its runtime; the pipeline adds the gated torch
model's for every exported artifact, and how many leading tokens the two share.
"""

from __future__ import annotations

import torch

SMOKE_PROMPT = "It is a truth universally acknowledged"
SMOKE_TOKENS = 8


def greedy_tokens(runner, prompt_ids: list[int], steps: int = SMOKE_TOKENS) -> list[int]:
    """`steps` tokens appended to `prompt_ids` by always taking the most likely next token."""
    if hasattr(runner, "greedy"):
        return runner.greedy(list(prompt_ids), steps)
    ids = list(prompt_ids)
    for _ in range(steps):
        logits = runner.logits(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def smoke_test(tokenizer, runner, by: str, prompt: str = SMOKE_PROMPT, steps: int = SMOKE_TOKENS) -> dict:
    """The prompt (as text and as the ids the model sees, special tokens included) and `runner`'s greedy
    continuation, as ids and text; `by` says which model and runtime produced it."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    tokens = greedy_tokens(runner, prompt_ids, steps)
    return {"prompt": prompt, "prompt_ids": prompt_ids, "tokens": tokens, "text": tokenizer.decode(tokens), "by": by}


def with_torch_agreement(smoke: dict, torch_tokens: list[int]) -> dict:
    """`smoke` plus how many of its leading tokens the gated torch model's greedy continuation shares."""
    shared = next((i for i, (a, b) in enumerate(zip(smoke["tokens"], torch_tokens)) if a != b), len(torch_tokens))
    return {**smoke, "torch_tokens": torch_tokens, "torch_agrees": shared}
