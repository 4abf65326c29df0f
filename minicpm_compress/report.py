"""report.md and the terminal summary, both rendered from the manifest."""

from __future__ import annotations

from . import markdown

STAGE_HEADER = ["#", "stage", "settings", "ppl", "Δppl", "KLD", "top-1", "gate", "time"]


def _settings(stage: dict) -> str:
    details = stage["details"]
    if "summary" in details:
        return details["summary"]
    if "scheme" in details:
        return details["scheme"]
    if stage["name"] == "load":
        return f"{details.get('model_type', '')}, {details.get('parameters', 0) / 1e6:.1f}M params"
    return ", ".join(f"{k}={v}" for k, v in stage["settings"].items() if v not in (None, False, [], {}))


def _gate(stage: dict) -> str:
    if stage["gate_passed"] is None:
        return "-"
    return "pass" if stage["gate_passed"] else "FAIL"


def _has_images(manifest: dict) -> bool:
    return any("image_cosine" in s["metrics"] for s in manifest["stages"])


def stage_header(manifest: dict) -> list[str]:
    """The stage table's columns (MiniCPM-V runs add the image-feature cosine before the gate)."""
    return STAGE_HEADER[:-2] + ["img cos"] + STAGE_HEADER[-2:] if _has_images(manifest) else STAGE_HEADER


def stage_rows(manifest: dict) -> list[list[str]]:
    rows = []
    images = _has_images(manifest)
    for s in manifest["stages"]:
        m = s["metrics"]
        rows.append([
            str(s["index"]), s["name"], _settings(s), f"{m['ppl']:.3f}", f"{m['ppl_increase']:+.2%}",
            f"{m['kld']:.4f}", f"{m['top1']:.2%}",
            *([f"{m['image_cosine']:.4f}" if "image_cosine" in m else "-"] if images else []),
            _gate(s), "reused" if s.get("reused") else f"{s['wall_s']:.0f}s",
        ])
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are Markdown: put text from outside through `markdown.text` (which escapes pipes too) first."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(manifest: dict) -> str:
    """The table printed at the end of a run."""
    first = manifest["stages"][0]["metrics"]
    head = (f"{manifest['recipe']['name']}: {manifest['model']} vs reference {manifest['reference']} "
            f"({first['tokens']} held-out tokens)")
    out = [head, "", text_table(stage_header(manifest), stage_rows(manifest))]
    if manifest["memory_estimate"]:
        mem = manifest["memory_estimate"]
        out.append(f"\nestimated memory: {_mib(mem['weights_bytes'])} weights + {_mib(mem['kv_cache_bytes'])} "
                   f"KV cache at {mem['context_tokens']} tokens")
    out.append(f"status: {manifest['status'].upper()}")
    return "\n".join(out)


def render_report(manifest: dict) -> str:
    first = manifest["stages"][0]["metrics"]
    recipe = manifest["recipe"]
    parts = [
        f"# {markdown.text(recipe['name'])}: {manifest['status'].upper()}",
        "",
        f"Model {markdown.code(manifest['model'])}, measured against the full-precision reference "
        f"{markdown.code(manifest['reference'])} on {first['tokens']} held-out tokens "
        f"({markdown.text(', '.join(recipe['data']['evaluation']))}, windows of "
        f"{recipe['data']['eval_window']}). Reference perplexity {first['ref_ppl']:.3f}.",
        "",
        "## Stages",
        "",
        md_table(stage_header(manifest), [[markdown.text(c) for c in row] for row in stage_rows(manifest)]),
        "",
        "Δppl is relative to the reference; KLD is the mean KL divergence (nats) of next-token distributions "
        "from the reference; top-1 is the share of positions whose most likely token agrees with it.",
    ]
    if _has_images(manifest):
        parts += ["", "MiniCPM-V: every held-out window starts with a held-out image; only the text after it is "
                  "scored. img cos is the mean cosine similarity of the image features the LLM receives (the "
                  "resampler's output rows; in llama.cpp, mtmd's) to the reference's."]
    for s in manifest["stages"]:
        if s["gate"]:
            limits = ", ".join(f"{k} {v}" for k, v in s["gate"].items() if v is not None)
            verdict = "passed" if s["gate_passed"] else "FAILED: " + "; ".join(s["failures"])
            parts.append(f"- Gate of stage {s['index']} `{s['name']}` ({limits}): {verdict}.")
    if manifest.get("source"):
        src = manifest["source"]
        parts += ["", f"This folder stores only what changed against its source checkpoint {markdown.code(src['checkpoint'])} "
                      f"(weights sha256 {src['weights_sha256'][:16]}…), which must stay in place for the folder "
                      "to be used as `--model`."]
    if manifest["artifacts"]:
        parts += ["", "## Artifacts", "", md_table(
            ["path", "format", "bits", "size", "sha256"],
            [[markdown.text(a["path"]), markdown.text(a["format"]), str(a["bits"] or "-"), _mib(a["bytes"]),
              a["sha256"][:16] + "…"]
             for a in manifest["artifacts"]],
        )]
    if manifest["memory_estimate"]:
        mem = manifest["memory_estimate"]
        parts += ["", "## Memory estimate", "",
                  f"{_mib(mem['total_bytes'])} in all: {_mib(mem['weights_bytes'])} of weights and "
                  f"{_mib(mem['kv_cache_bytes'])} of KV cache at {mem['context_tokens']} tokens "
                  f"({mem['assumes']})."]
    parts += ["", "## Recipe", "", "```json", __import__("json").dumps(recipe, indent=2), "```",
              "", f"Written by minicpm-compress {manifest['tool']['version']} (torch "
              f"{manifest['environment']['torch']}, transformers {manifest['environment']['transformers']})."]
    return "\n".join(parts) + "\n"
