"""Strings from outside (checkpoint names, chat templates, licence lines, paths, generated text) put into
Markdown so that they show as written and cannot end a block, open a link or carry raw HTML."""

from __future__ import annotations

import re

_ESCAPED = re.compile(r"([\\`\[\]|])")


def text(value) -> str:
    """Inline text: one line; HTML's <, > and & as entities; backslash, backtick, brackets and pipes escaped."""
    s = " ".join(str(value).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _ESCAPED.sub(r"\\\1", s)


def _longest_run(value: str, char: str) -> int:
    return max((len(m) for m in re.findall(f"{re.escape(char)}+", value)), default=0)


def code(value) -> str:
    """An inline code span that holds `value` (one line) whatever backticks it contains."""
    s = " ".join(str(value).split())
    ticks = "`" * (_longest_run(s, "`") + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def fence(body: str, language: str = "") -> list[str]:
    """A fenced code block holding `body` verbatim: its fence is longer than any backtick or tilde run inside."""
    body = body.rstrip("\n")
    ticks = "`" * max(3, _longest_run(body, "`") + 1)
    return [f"{ticks}{text(language) if language else ''}", body, ticks]
