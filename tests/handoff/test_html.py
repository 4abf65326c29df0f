"""report.html rendered by a real browser (headless Chromium): the page loads and its plots are drawn."""

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from minicpm_compress.handoff import HTML_NAME, write_handoff
from minicpm_compress.handoff.html import render_html
from minicpm_compress.handoff.plots import STAGE_COLOURS, Point, pareto

from .conftest import make_manifest


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is needed (Debian package 'chromium'; `make test` installs it)")
    return path


def browse(page, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           *args, page.as_uri()], capture_output=True, text=True, timeout=timeout)


def test_frontier_keeps_what_nothing_beats_in_both_size_and_kld():
    points = [Point("a", 100, 0.5), Point("b", 200, 0.1), Point("c", 150, 0.6), Point("d", 300, 0.1)]
    assert [p.label for p in pareto(points)] == ["a", "b"]


def test_html_is_byte_identical_for_the_same_manifest(tmp_path):
    manifest = make_manifest()
    manifest["stages"][1]["details"]["linear_errors"] = {f"model.layers.{i}.mlp.down_proj": 0.01 * (i + 1)
                                                        for i in range(4)}
    first = render_html(manifest)
    assert render_html(manifest) == first and first.count('<img src="data:image/png;base64,') == 4


def test_the_ci_report_loads_in_chromium_with_every_plot_drawn(ci_output, tmp_path):
    folder, result = ci_output
    assert result.exit_code == 0, result.stderr
    page = folder / HTML_NAME
    dom = browse(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>ci — minicpm-compress report</title>" in dom.stdout and "PASSED" in dom.stdout
    # stage accuracy, AWQ's and GPTQ-free per-linear errors and scales, the frontier and the sizes
    images = dom.stdout.count('<img src="data:image/png;base64,')
    assert images == 5, images
    assert dom.stdout.count("<tr>") >= 13 + 1  # every stage of the recipe, and the header
    shot = tmp_path / "page.png"
    run = browse(page, f"--screenshot={shot}", "--window-size=1000,7000")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = np.array([int(STAGE_COLOURS[True][i : i + 2], 16) for i in (1, 3, 5)])
    drawn = (np.abs(pixels - blue).sum(axis=-1) < 30).sum()
    assert drawn > 2000, drawn  # the plots' bars and lines are drawn, not broken-image icons


def test_a_failed_run_reports_its_gate_in_red(tmp_path):
    manifest = make_manifest()
    manifest["status"], manifest["artifacts"] = "failed", []
    manifest["stages"][2].update(gate_passed=False, failures=["kld 0.2 > 0.1"])
    write_handoff(manifest, tmp_path)
    dom = browse(tmp_path / HTML_NAME, "--dump-dom")
    assert '<p class="fail">Gate of stage 2 gguf failed: kld 0.2 &gt; 0.1</p>' in dom.stdout
    assert "Artifacts" not in dom.stdout
