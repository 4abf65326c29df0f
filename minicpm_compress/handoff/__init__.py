"""What the people who receive an output folder read: report.md, report.html, HANDOFF.md (the model card)
and an Ollama Modelfile beside each GGUF file, all rendered from the finished manifest (plus, for Core ML,
the packages' specs).
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic

HANDOFF_NAME = "HANDOFF.md"
HTML_NAME = "report.html"
REPORT_NAME = "report.md"


def write_handoff(manifest: dict, root: Path) -> None:
    from .card import render_handoff
    from .html import render_html
    from .ollama import write_modelfiles
    from ..report import render_report

    atomic.write_text(root / REPORT_NAME, render_report(manifest))
    atomic.write_text(root / HTML_NAME, render_html(manifest))
    write_modelfiles(manifest, root)
    card = render_handoff(manifest, root)
    if card is not None:
        atomic.write_text(root / HANDOFF_NAME, card)
