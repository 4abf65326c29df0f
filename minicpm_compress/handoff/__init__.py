"""What the people who receive an output folder read: HANDOFF.md (the model card), report.html, and an
Ollama Modelfile beside each GGUF file.

Both are rendered from the manifest (plus, for Core ML, the packages' specs), beside report.md.
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic

HANDOFF_NAME = "HANDOFF.md"
HTML_NAME = "report.html"


def write_handoff(manifest: dict, root: Path) -> None:
    from .card import render_handoff
    from .html import render_html
    from .ollama import write_modelfiles

    atomic.write_text(root / HTML_NAME, render_html(manifest))
    write_modelfiles(manifest, root)
    card = render_handoff(manifest, root)
    if card is not None:
        atomic.write_text(root / HANDOFF_NAME, card)
