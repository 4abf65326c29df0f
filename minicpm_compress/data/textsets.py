"""Named text sets, user text files, and their cutting into calibration samples and evaluation windows.

Built-in sets (never overlapping; see calibration/README.md):
  austen-calib    Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey
  austen-heldout  Persuasion, in its original order
  zh-calib        fortunes-zh entries outside the held-out tenth
  zh-heldout      a fixed, seeded tenth of the fortunes-zh entries

A user file is a path: `.txt` (paragraphs separated by blank lines) or `.jsonl` (one object with a
"text" field per line).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Annotated, Callable

import torch
from pydantic import AfterValidator

from ..errors import CompressError
from . import sources

ZH_SPLIT_SEED = 20240601  # fixes which tenth of fortunes-zh is held out; never change it
ZH_HELDOUT_FRACTION = 0.1


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _zh_split() -> tuple[list[str], list[str]]:
    entries = list(sources.chinese_entries())
    order = list(range(len(entries)))
    random.Random(ZH_SPLIT_SEED).shuffle(order)
    n_held = int(len(entries) * ZH_HELDOUT_FRACTION)
    held = set(order[:n_held])
    return [e for i, e in enumerate(entries) if i not in held], [e for i, e in enumerate(entries) if i in held]


BUILTIN_SETS: dict[str, Callable[[], list[str]]] = {
    "austen-calib": lambda: [p for n in sources.AUSTEN_NOVELS[:-1] for p in _paragraphs(sources.austen_novels()[n])],
    "austen-heldout": lambda: _paragraphs(sources.austen_novels()["persuasion"]),
    "zh-calib": lambda: _zh_split()[0],
    "zh-heldout": lambda: _zh_split()[1],
}


def _existing_text_source(name: str) -> str:
    if name not in BUILTIN_SETS and not Path(name).is_file():
        raise ValueError(f"'{name}' is not a built-in text set ({', '.join(BUILTIN_SETS)}) nor an existing file")
    return name


TextSource = Annotated[str, AfterValidator(_existing_text_source)]  # a recipe field naming text


def read_documents(source: str) -> list[str]:
    """The documents (paragraphs / records) of a built-in set name or a user .txt/.jsonl file."""
    if source in BUILTIN_SETS:
        return BUILTIN_SETS[source]()
    path = Path(source)
    if not path.is_file():
        raise CompressError(
            f"{source}: not a built-in text set ({', '.join(BUILTIN_SETS)}) nor an existing .txt/.jsonl file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CompressError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CompressError(f"{path}:{n}: each line needs a string field 'text'")
            docs.append(record["text"])
    else:
        docs = _paragraphs(text)
    if not any(d.strip() for d in docs):
        raise CompressError(f"{path}: contains no text")
    return docs


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_samples(tokenizer, sources_and_weights: list[tuple[str, float]], n_samples: int,
                        length: int, seed: int) -> torch.Tensor:
    """[n_samples, length] token ids: non-overlapping windows over each source's documents in a seeded order.

    Samples are divided among the sources in proportion to their weights.
    """
    total = sum(w for _, w in sources_and_weights)
    counts = [int(n_samples * w / total) for _, w in sources_and_weights]
    for i in range(n_samples - sum(counts)):  # hand out the remainder, first sources first
        counts[i % len(counts)] += 1
    rows = []
    for (source, _), count in zip(sources_and_weights, counts):
        if count == 0:
            continue
        docs = read_documents(source)
        random.Random(seed).shuffle(docs)
        stream: list[int] = []
        need = count * length
        for start in range(0, len(docs), 64):
            stream += _encode(tokenizer, "\n\n".join(docs[start : start + 64]) + "\n\n")
            if len(stream) >= need:
                break
        if len(stream) < need:
            raise CompressError(
                f"calibration source '{source}' has {len(stream)} tokens, fewer than the {need} needed for "
                f"{count} samples of {length} tokens"
            )
        rows.append(torch.tensor(stream[:need], dtype=torch.long).view(count, length))
    return torch.cat(rows)


def evaluation_windows(tokenizer, source_names: list[str], n_tokens: int, window: int) -> torch.Tensor:
    """[n_windows, window] token ids: the first tokens of each held-out source, in reading order.

    `n_tokens` is divided evenly among the sources and rounded down to whole windows.
    """
    per_source = n_tokens // len(source_names) // window
    if per_source < 1:
        raise CompressError(f"eval_tokens {n_tokens} is less than one window of {window} tokens per source")
    rows = []
    for source in source_names:
        need = per_source * window
        stream = _encode(tokenizer, "\n\n".join(read_documents(source)))
        if len(stream) < need:
            raise CompressError(f"evaluation source '{source}' has {len(stream)} tokens, fewer than the {need} needed")
        rows.append(torch.tensor(stream[:need], dtype=torch.long).view(per_source, window))
    return torch.cat(rows)
