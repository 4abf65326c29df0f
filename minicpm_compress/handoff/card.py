"""HANDOFF.md: the model card an app developer reads instead of manifest.json.

Per deliverable: runtime and version, files with sha256, size, bits per weight, RAM at 2k and 8k context,
accuracy against the original measured in that runtime, load snippets and a smoke test; then which file
to ship per device tier, the tokenizer and prompt format, and the source model's licence.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import markdown
from ..report import md_table
from . import tiers
from .deliverables import Deliverable, deliverables

CONTEXTS = (2048, 8192)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ram(d: Deliverable, context: int) -> str:
    ram = d.ram_bytes(context)
    return _mib(ram) if ram is not None else f"n/a (built for {d.max_context})"


def _accuracy(m: dict) -> list[str]:
    cells = [f"{m['ppl_increase']:+.2%}", f"{m['kld']:.4f}", f"{m['top1']:.2%}"]
    return cells + ([f"{m['image_cosine']:.4f}"] if "image_cosine" in m else [])


def _overview(items: list[Deliverable], images: bool) -> str:
    header = ["file", "runtime", "size", "bits/weight", *(f"RAM at {c // 1024}k" for c in CONTEXTS),
              "Δppl", "KLD", "top-1", *(["img cos"] if images else [])]
    rows = [[f"`{d.name}`", d.runtime.label, _mib(d.bytes),
             f"{d.bits_per_weight:.2f}" if d.bits_per_weight else "-", *(_ram(d, c) for c in CONTEXTS),
             *_accuracy(d.metrics), *(["-"] * (images and "image_cosine" not in d.metrics))]
            for d in items]
    return md_table(header, rows)


def _tier_table(items: list[Deliverable]) -> list[str]:
    recs = tiers.recommendations(items)
    if not recs or not recs[0][1]:
        return ["No phone or tablet artifact in this folder."]
    labels = list(recs[0][1])
    rows = [[f"{gb} GB", *(f"`{d.name}`" if d else "nothing fits" for d in picks.values())] for gb, picks in recs]
    return [md_table(["device RAM", *labels], rows), "",
            f"Computed from the numbers below: a file fits a device when its RAM estimate at "
            f"{tiers.CONTEXT} tokens of context (or the shorter context it was built for) is at most "
            f"{tiers.MODEL_SHARE:.0%} of the device's RAM (our "
            "assumption: the OS and the app keep the rest); of the files that fit, the one closest to the "
            "original (lowest KLD) is recommended. Longer contexts need more: see the RAM at 8k."]


def _section(d: Deliverable, manifest: dict, root: Path) -> list[str]:
    details, m = d.stage["details"], d.metrics
    images = f", image features cosine {m['image_cosine']:.4f}" if "image_cosine" in m else ""
    out = [f"### `{d.name}` — {d.runtime.label}", "",
           f"- Runtime: {d.runtime.requirement(d, manifest)}.",
           f"- Size {_mib(d.bytes)}" + (f", {d.bits_per_weight:.2f} bits per weight" if d.bits_per_weight else "")
           + "; RAM " + ", ".join(f"{_ram(d, c)} at {c} tokens" for c in CONTEXTS)
           + " (the files plus the runtime's KV cache)"
           + (f"; the files hold at most {d.max_context} tokens of context" if d.max_context else "") + ".",
           f"- Accuracy against the original, measured {details.get('measured', 'in its runtime')}: "
           f"Δppl {m['ppl_increase']:+.2%}, KLD {m['kld']:.4f}, top-1 agreement {m['top1']:.2%}{images} "
           f"(stage {d.stage['index']} `{d.stage['name']}`, gate "
           f"{'passed' if d.stage['gate_passed'] else 'none' if d.stage['gate_passed'] is None else 'FAILED'}).",
           "", md_table(["file", "bytes", "sha256"],
                        [[f"`{f['path']}`", f"{f['bytes']:,}", f"`{f['sha256']}`"] for f in d.files]), ""]
    for s in d.runtime.snippets(d, root):
        tested = " (run by the test suite)" if s.runs else ""
        out += [f"{s.title}{tested}:", "", *markdown.fence(s.code, s.language), ""]
    smoke = details.get("smoke_test")
    if smoke:
        agrees = smoke.get("torch_agrees", len(smoke["tokens"]))
        torch_note = ("" if smoke["by"].startswith("the gated model in torch")
                      else "; the gated model in torch gives the same tokens" if agrees == len(smoke["tokens"])
                      else f"; the gated model in torch agrees on the first {agrees} of {len(smoke['tokens'])}")
        out += [f"Smoke test: greedy decoding of {markdown.code(json.dumps(smoke['prompt']))} must continue with "
                f"{markdown.code(json.dumps(smoke['text']))} (token ids {smoke['tokens']}; measured with "
                f"{markdown.text(smoke['by'])}{torch_note}).",
                ""]
    return out


def _tokenizer(load: dict) -> list[str]:
    tok = load.get("tokenizer")
    if not tok:
        return []
    out = ["## Tokenizer and prompt format", "",
           f"{markdown.text(tok['class'])}, {tok['vocab_size']:,} tokens; BOS {markdown.code(json.dumps(tok['bos_token']))} "
           f"({'added' if tok['adds_bos'] else 'not added'} to plain prompts), EOS "
           f"{markdown.code(json.dumps(tok['eos_token']))}. "
           "Every runtime folder carries `tokenizer.json`; GGUF files carry the tokenizer and the chat template."]
    if tok.get("chat_template"):
        out += ["", "Chat template (Jinja, as in `tokenizer_config.json` / `chat_template.jinja`):", "",
                *markdown.fence(tok["chat_template"], "jinja")]
    vision = load.get("vision")
    if vision:
        out += ["", f"Images (MiniCPM-V {markdown.text(vision['version'])}): llama.cpp's mtmd builds the image block itself from "
                "the mmproj file. Elsewhere each image becomes `<image>` + one `<unk>` slot per query "
                f"({vision.get('query_num', 64)}) + `</image>` (plus `<slice>` blocks for large images and "
                "`<image_id>` when the model uses it), then the text; the vision model's output rows replace the "
                "slots' embeddings."]
    return out + [""]


def render_handoff(manifest: dict, root: Path) -> str | None:
    """The card's Markdown, or None when the folder ships no runtime artifact."""
    items = deliverables(manifest)
    if not items:
        return None
    load = manifest["stages"][0]
    first = load["metrics"]
    data = manifest["recipe"]["data"]
    licence = load["details"].get("license") or ("not stated by the source checkpoint (no `license:` in its "
                                                  "README.md): check it before shipping")
    images = any("image_cosine" in d.metrics for d in items)
    parts = [
        f"# Hand-off: {markdown.text(manifest['model'])} ({markdown.text(manifest['recipe']['name'])})", "",
        f"Compressed from {markdown.code(manifest['reference'])} ({markdown.text(load['details'].get('model_type', ''))}, "
        f"{load['details'].get('parameters', 0) / 1e6:.1f}M parameters) by minicpm-compress "
        f"{manifest['tool']['version']}. Every file below was measured in its own runtime against the original "
        f"full-precision model on {first['tokens']:,} held-out tokens ({markdown.text(', '.join(data['evaluation']))}): Δppl is "
        "the perplexity increase, KLD the mean KL divergence of next-token distributions, top-1 the share of "
        "positions whose most likely next token agrees" + (", img cos the cosine of image features" if images else "")
        + ".", "",
        f"Licence of the source model: **{markdown.text(licence) if load['details'].get('license') else licence}**. "
        "Your app must comply with it.", "",
        "## Which file to ship", "", *_tier_table(items), "",
        "## Files", "", _overview(items, images), "",
    ]
    for d in items:
        parts += _section(d, manifest, root)
    parts += _tokenizer(load["details"])
    parts += ["Everything here comes from `manifest.json` in this folder; `report.md` / `report.html` have "
              "every stage's numbers."]
    return "\n".join(parts).rstrip("\n") + "\n"
