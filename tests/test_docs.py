"""README.md and docs/ stay true: every relative link leads to a file (and heading) that exists, and every
command shown — `minicpm-compress …`, `make …`, `bench/….py …` — names a command, target or script that
exists and only flags it accepts."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from minicpm_compress.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "calibration" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", page.read_text())) if not re.match(r"[a-z]+:", t)]


def _shown_commands(page: Path) -> list[str]:
    """Command lines in code blocks, and inline code spans that are a command."""
    text = page.read_text()
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    lines += SPAN.findall(FENCE.sub("", text))
    out = []
    for line in lines:
        line = re.sub(r"^\$ ", "", line.strip())
        line = re.sub(r"^(\.venv/bin/|\$\(BIN\)/)", "", line)
        line = line.split("#")[0].split(" > ")[0].strip()
        if line.split(" ")[0] in cli.commands and " --" in line:  # `export gguf --type Q4_K` in prose
            line = f"minicpm-compress {line}"
        if re.match(r"(minicpm-compress|make|python \S+\.py|bench/\S+\.py)( |$)", line):
            out.append(line)
    return out


def test_the_pages_exist_and_the_readme_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    assert len(PAGES) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _click_command(words: list[str]) -> tuple[click.Command, list[str]]:
    command, path = cli, ["minicpm-compress"]
    for word in words[1:]:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            path.append(word)
        elif isinstance(command, click.Group) and re.fullmatch(r"[a-z][a-z-]+", word):
            raise AssertionError(f"`{' '.join(path)} {word}`: no such command")
        else:
            break
    return command, path


def _accepted(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


def _check(line: str) -> str | None:
    words = line.split()
    flags = FLAG.findall(line)
    if words[0] == "minicpm-compress":
        try:
            command, path = _click_command(words)
        except AssertionError as e:
            return str(e)
        unknown = [f for f in flags if f not in _accepted(command)]
        return f"`{' '.join(path)}` does not take {', '.join(unknown)}" if unknown else None
    if words[0] == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and t not in _makefile_targets()]
        return f"no make target {', '.join(missing)}" if missing else None
    script = next(w for w in words if w.endswith(".py"))
    if not (ROOT / script).exists():
        return f"no script {script}"
    source = (ROOT / script).read_text()
    unknown = [f for f in flags if f'"{f}"' not in source]
    return f"{script} does not take {', '.join(unknown)}" if unknown else None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_shown_exist_with_their_flags(page):
    problems = [f"{line!r}: {p}" for line in _shown_commands(page) if (p := _check(line))]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_checks_catch_a_wrong_flag_and_a_broken_link(tmp_path):
    assert _check("minicpm-compress export gguf --model M --type Q4_0 --out DIR") is None
    assert "does not take --no-such-flag" in _check("minicpm-compress awq --model M --no-such-flag")
    assert "no such command" in _check("minicpm-compress export tflite --model M")
    assert "no make target" in _check("make deploy")
    assert "does not take --nope" in _check("bench/onnx_export.py --model x --nope")
    page = tmp_path / "page.md"
    page.write_text("# A page\n[ok](#a-page) [gone](missing.md) [bad](#nowhere)\n")
    assert _links(page) == ["#a-page", "missing.md", "#nowhere"]
    assert _anchors(page) == {"a-page"}
