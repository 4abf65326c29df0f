"""The robustness corpus: bad inputs and faults, each asserting a clean refusal and nothing left behind.

Every case runs the real command line in-process (`catch_exceptions=False`: an unexpected exception fails
the test with its traceback) and asserts, through `assert_refused`:
- the exit code (2 bad input, 3 gate, 4 resources, 130/143 interrupted),
- exactly one `error:` line on stderr, naming the file, key or tensor, and no traceback,
- nothing under the final output name and no staging folder beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from minicpm_compress.cli import main

# evaluation small enough that a case costs about a second
SMALL = ("--eval-tokens", "512")
SMALL_DATA = "data: {eval_tokens: 256, eval_window: 128, evaluation: [austen-heldout], calibration_samples: 4, sequence_length: 64}\n"


def cli(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def leftovers(out: Path) -> list[str]:
    """Staging or backup folders of `out` beside it (`.NAME.*.partial`, `.NAME.old-PID`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_refused(result, code: int, *needles: str, out: Path | None = None) -> str:
    """The run exited with `code` and one `error:` line containing every needle; returns that line."""
    text = result.stderr
    assert "Traceback" not in text + result.stdout, text
    assert result.exit_code == code, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert leftovers(out) == []
    return errors[0]


def write_recipe(folder: Path, model, stages: str, name: str = "r", extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {model}\n{SMALL_DATA}{extra}stages:\n{stages}")
    return path


@pytest.fixture
def checkpoint(tiny_checkpoint):
    """A valid tiny Llama checkpoint folder (each test may damage its own copy)."""
    return tiny_checkpoint("llama")
