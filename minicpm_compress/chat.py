"""`minicpm-compress chat`: type a prompt and read what a compressed artifact answers, in the runtime the
artifact is for (llama.cpp for GGUF, onnxruntime-genai for ONNX, torch for the output folder's own model).

The prompt goes through the checkpoint's chat template (the one every artifact carries), decoding is greedy
and stops at the model's end-of-turn tokens, and tokens are printed as they come. `--compare` runs the same
prompt through the full-precision reference model, so a person sees what compression changed.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from .errors import CompressError
from .manifest import MANIFEST_NAME

RUNS_HERE = ("gguf", "onnx")  # exporter stages whose files chat runs (besides the folder's torch model)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


class Decoder(Protocol):
    label: str  # the runtime, as a person calls it

    def tokens(self, prompt_ids: list[int], limit: int) -> Iterator[int]:
        """Greedy continuation of `prompt_ids`, one token at a time (at most `limit`)."""


class LlamaCppDecoder:
    """A GGUF file in llama.cpp: the prompt in one batch, then one token per call, argmax of the last logits."""

    label = "llama.cpp"

    def __init__(self, path: Path, context: int):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=min(context, 512), verbose=False,
                                   seed=0)
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        logits = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab,))))

    def tokens(self, prompt_ids, limit):
        self.llm.reset()
        self.llm.eval(list(prompt_ids))
        for i in range(limit):
            token = self._next()
            yield token
            if i + 1 < limit:
                self.llm.eval([token])


class GenaiDecoder:
    """An ONNX folder (model.onnx + genai_config.json) in onnxruntime-genai, greedy search."""

    label = "onnxruntime-genai"

    def __init__(self, folder: Path):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise CompressError("chat: ONNX artifacts run in onnxruntime-genai (pip install onnxruntime-genai)") from None
        self._og = og
        self.model = og.Model(str(folder))

    def tokens(self, prompt_ids, limit):
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + limit)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for _ in range(limit):
            if generator.is_done():
                return
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


class TorchDecoder:
    """A model in torch (the output folder's gated model, or the float reference) with its KV cache."""

    def __init__(self, model, label: str):
        self.model, self.label = model, label

    def tokens(self, prompt_ids, limit):
        import torch

        ids, cache = torch.tensor([list(prompt_ids)]), None
        with torch.no_grad():
            for _ in range(limit):
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                yield token
                ids = torch.tensor([[token]])


@dataclass
class Answer:
    ids: list[int]
    text: str
    seconds: float
    stopped: bool  # ended on an end-of-turn token (False: reached the token limit)

    def as_dict(self) -> dict:
        rate = len(self.ids) / self.seconds if self.seconds > 0 else None
        return {"ids": self.ids, "text": self.text, "stopped": self.stopped, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(rate, 1) if rate else None}


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Chat:
    """One artifact of an output folder, ready to answer: the decoder, the tokenizer and the stop tokens."""

    folder: Path
    artifact: str  # the file or folder, as the hand-off card names it ("torch" for the folder's own model)
    decoder: Decoder
    tokenizer: object
    stop_ids: set[int]
    reference: Callable[[], Decoder]  # the full-precision model, built when first asked for
    context: int  # tokens the decoder holds: prompt and answer together
    history: list[dict] = field(default_factory=list)

    def _ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str, system: str | None = None, answer_room: int = 0) -> list[int]:
        """The conversation so far plus `prompt`, through the chat template (plain text if there is none);
        the oldest turns are left out until `answer_room` tokens still fit in the context."""
        system_turn = [{"role": "system", "content": system}] if system else []
        turns = list(self.history)
        while True:
            ids = self._ids(system_turn + turns + [{"role": "user", "content": prompt}])
            if len(ids) + answer_room <= self.context or not turns:
                break
            turns = turns[2:]
        if len(ids) + answer_room > self.context:
            raise CompressError(f"chat: the prompt is {len(ids)} tokens; with {answer_room} for the answer it does "
                                f"not fit the {self.context}-token context")
        return ids

    def answer(self, prompt_ids: list[int], limit: int, decoder: Decoder | None = None,
               stream: Callable[[str], None] | None = None) -> Answer:
        """Decode until an end-of-turn token or `limit` tokens; `stream` receives text as it becomes final."""
        start, ids, shown, stopped = time.perf_counter(), [], "", False
        for token in (decoder or self.decoder).tokens(prompt_ids, limit):
            if token in self.stop_ids:
                stopped = True
                break
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if stream and not text.endswith("\ufffd"):  # a multi-byte character is complete
                stream(text[len(shown):])
                shown = text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stream and text != shown:
            stream(text[len(shown):])
        return Answer(ids, text, time.perf_counter() - start, stopped)


def _stop_ids(tokenizer, config: dict) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = config.get("eos_token_id")
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN if t in vocab}


def _pick(deliverables: list, artifact: str | None, folder: Path):
    """The deliverable `artifact` names (a kind or its file/folder), or the first one a runtime here can run."""
    if artifact == "torch":
        return None
    if artifact is None:
        runnable = [d for d in deliverables if d.runtime.stage in RUNS_HERE]
        return runnable[0] if runnable else None
    for d in deliverables:
        if artifact in (d.runtime.stage, d.name, d.name.rstrip("/")):
            return d
    names = ", ".join(["torch"] + [d.name for d in deliverables])
    raise CompressError(f"{folder}: no artifact '{artifact}' in this output folder (it has: {names})")


def open_chat(folder: Path, artifact: str | None = None, context: int = 2048) -> Chat:
    """The chat for an output folder's artifact (default: its first GGUF or ONNX file, else its torch model)."""
    from .handoff.compare import read_manifest
    from .handoff.deliverables import deliverables
    from .models.checkpoint import load_tokenizer
    from .resolve import resolve_model
    from .state import ModelState

    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise CompressError(f"{folder}: not a minicpm-compress output folder (no {MANIFEST_NAME})")
    manifest = read_manifest(folder)
    source = resolve_model(str(folder))
    config = json.loads((source.config or source.checkpoint / "config.json").read_text())
    if config.get("model_type") == "minicpmv":
        raise CompressError(f"{folder}: a MiniCPM-V output folder; chat takes text models only for now (try the "
                            "GGUF and mmproj with llama.cpp's mtmd as HANDOFF.md shows)")
    chosen = _pick(deliverables(manifest), artifact, folder)
    tokenizer = load_tokenizer(source.checkpoint)
    if chosen is None:
        decoder, name = TorchDecoder(ModelState.open(source).materialize().eval(), "torch"), "torch"
    elif chosen.runtime.stage == "gguf":
        decoder, name = LlamaCppDecoder(folder / chosen.name, context), chosen.name
    elif chosen.runtime.stage == "onnx":
        decoder, name = GenaiDecoder(folder / chosen.name), chosen.name
    elif chosen.runtime.stage == "coreml" and platform.system() != "Darwin":
        raise CompressError(f"{folder / chosen.name}: Core ML runs on macOS only; on this machine try "
                            "--artifact gguf, onnx or torch")
    else:
        raise CompressError(f"{folder / chosen.name}: chat does not run {chosen.runtime.label} artifacts yet; "
                            "try --artifact gguf, onnx or torch")

    def reference() -> Decoder:
        return TorchDecoder(ModelState.open(resolve_model(manifest["reference"])).materialize().eval(),
                            "torch, full precision")

    return Chat(folder, name, decoder, tokenizer, _stop_ids(tokenizer, config), reference, context)


def try_table(manifest: dict, folder: Path) -> str:
    """What a run's summary ends with: the command that tries each artifact `chat` runs here (GGUF, ONNX and
    the folder's torch model), and where the others are described."""
    from .handoff.deliverables import deliverables
    from .report import text_table

    found = deliverables(manifest)
    rows = [(d.name, d.runtime.label, f"{d.bytes / 2**20:.1f} MiB", f"minicpm-compress chat {folder} --artifact "
             f"{d.name.rstrip('/')}") for d in found if d.runtime.stage in RUNS_HERE]
    if not found:
        return ""
    rows.append(("(gated model)", "torch", "", f"minicpm-compress chat {folder} --artifact torch"))
    others = sorted({d.runtime.label for d in found if d.runtime.stage not in RUNS_HERE})
    note = f"\n{' and '.join(others)} artifacts: how to load them is in HANDOFF.md" if others else ""
    return ("try an artifact (greedy answers, in its own runtime; --compare shows the reference's beside it):\n"
            + text_table(["artifact", "runtime", "size", "command"], rows) + note)
