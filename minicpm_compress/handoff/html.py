"""report.html: the run's stages, plots and artifacts in one self-contained page (images inlined)."""

from __future__ import annotations

import base64
import html

from ..report import stage_header, stage_rows
from . import plots
from .deliverables import deliverables

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.fail { color: #b00; font-weight: bold; } .pass { color: #070; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 3) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = "fail" if c == "FAIL" else "pass" if c == "pass" else "num" if i >= numeric_from else ""
            cells.append(f'<td class="{cls}">{html.escape(c)}</td>' if cls else f"<td>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def variant_points(manifest: dict, prefix: str = "") -> list[plots.Point]:
    return [plots.Point(prefix + d.name.rstrip("/"), d.bytes, d.metrics["kld"]) for d in deliverables(manifest)]


def render_html(manifest: dict) -> str:
    recipe, first = manifest["recipe"], manifest["stages"][0]["metrics"]
    status = manifest["status"]
    parts = [f"<h1>{html.escape(recipe['name'])}: <span class=\"{'pass' if status == 'passed' else 'fail'}\">"
             f"{status.upper()}</span></h1>",
             f"<p>Model <code>{html.escape(str(manifest['model']))}</code> against the full-precision reference "
             f"<code>{html.escape(str(manifest['reference']))}</code> on {first['tokens']:,} held-out tokens "
             f"({html.escape(', '.join(recipe['data']['evaluation']))}); "
             f"reference perplexity {first['ref_ppl']:.3f}.</p>",
             # without the time column: the page is byte-identical for the same recipe and inputs
             "<h2>Stages</h2>", _table(stage_header(manifest)[:-1], [r[:-1] for r in stage_rows(manifest)]),
             _figure(plots.stage_accuracy(manifest), "accuracy per stage",
                     "KLD (bars) and perplexity increase (line) after each stage, against the reference.")]
    failures = [s for s in manifest["stages"] if s["failures"]]
    for s in failures:
        parts.append(f'<p class="fail">Gate of stage {s["index"]} {html.escape(s["name"])} failed: '
                     f"{html.escape('; '.join(s['failures']))}</p>")
    per_layer = []
    for s in manifest["stages"]:
        for png, what in ((plots.linear_errors(s), "quantization error per linear and layer"),
                          (plots.awq_scales(s), "AWQ scale exponent per group and layer"),
                          (plots.block_influence(s), "pruning: importance of each layer")):
            if png:
                per_layer.append(_figure(png, what, f"Stage {s['index']} {s['name']}: {what}."))
    if per_layer:
        parts += ["<h2>Per layer</h2>", *per_layer]
    points = variant_points(manifest)
    if points:
        parts += ["<h2>Artifacts</h2>", "<p>Which file to ship, with RAM, licence and load code: "
                  '<a href="HANDOFF.md">HANDOFF.md</a>.</p>',
                  _table(["artifact", "size (MiB)", "KLD"],
                         [[p.label, f"{p.bytes / 2**20:.1f}", f"{p.kld:.4f}"] for p in points], numeric_from=1),
                  _figure(plots.frontier(points), "accuracy versus size",
                          "Every artifact in this folder: size against KLD; the blue line joins those that no other "
                          "artifact beats in both."),
                  _figure(plots.sizes(points), "artifact sizes", "Size of each artifact (all its files).")]
    parts.append(f"<p><small>Written by minicpm-compress {html.escape(manifest['tool']['version'])}; every number "
                 "is also in manifest.json.</small></p>")
    title = html.escape(f"{recipe['name']} — minicpm-compress report")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
