"""Rerunning a recipe reuses the leading stages whose inputs and settings are unchanged, and the output
is the same bytes as a run that reused nothing."""

import hashlib
import json

import pytest
from click.testing import CliRunner

from minicpm_compress.cli import main

DATA = "data: {eval_tokens: 256, eval_window: 128, calibration_samples: 4, sequence_length: 64}\n"
STAGES = "  - awq: {bits: 4, group_size: 32%s}\n  - gguf: {type: %s}\n"


@pytest.fixture
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPM_COMPRESS_STAGE_CACHE", str(tmp_path / "stages"))
    return tmp_path / "stages"


def _run(tmp_path, checkpoint, out, gguf="Q4_0", gate="", *flags):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {checkpoint}\n{DATA}stages:\n" + STAGES % (gate, gguf))
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / out), *flags])
    manifest = tmp_path / out / "manifest.json"
    return result, json.loads(manifest.read_text()) if manifest.is_file() else None


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("report.md", "manifest.json")}


def test_changing_the_last_stage_reruns_only_it(tmp_path, tiny_checkpoint, cached):
    checkpoint = tiny_checkpoint("llama")
    first, m1 = _run(tmp_path, checkpoint, "a")
    assert first.exit_code == 0, first.stderr
    assert not any(s.get("reused") for s in m1["stages"]) and "reused" not in first.stderr

    second, m2 = _run(tmp_path, checkpoint, "b", "Q8_0")  # only the exporter changed
    assert second.exit_code == 0, second.stderr
    assert [s.get("reused", False) for s in m2["stages"]] == [False, True, False]
    assert "[1] awq: reused from the stage cache" in second.stderr and "[2] gguf: ppl" in second.stderr
    assert m2["stages"][1]["metrics"] == m1["stages"][1]["metrics"]
    assert "| reused |" in (tmp_path / "b/report.md").read_text()

    fresh, _ = _run(tmp_path, checkpoint, "c", "Q8_0", "", "--no-cache")  # nothing reused: the same bytes
    assert fresh.exit_code == 0, fresh.stderr
    assert _hashes(tmp_path / "b") == _hashes(tmp_path / "c")

    again, m3 = _run(tmp_path, checkpoint, "d", "Q8_0")  # everything reused, the exported file put back
    assert again.exit_code == 0, again.stderr
    assert [s.get("reused", False) for s in m3["stages"]] == [False, True, True]
    assert _hashes(tmp_path / "d") == _hashes(tmp_path / "c")
    # the previous run's entries that this recipe no longer uses (awq → gguf Q4_0) are gone
    assert len([p for p in cached.iterdir() if p.name != "runs"]) == 2


def test_a_reused_stage_meets_the_new_gate_and_a_changed_cached_file_is_not_reused(tmp_path, tiny_checkpoint, cached):
    checkpoint = tiny_checkpoint("llama")
    assert _run(tmp_path, checkpoint, "a")[0].exit_code == 0
    failed, m = _run(tmp_path, checkpoint, "b", "Q4_0", ", gate: {max_kld: 0.000001}")
    assert failed.exit_code == 3 and m["stages"][1]["reused"] and "KL divergence 0.2" in failed.stderr
    reused, _ = _run(tmp_path, checkpoint, "a2")  # a failed run drops no entry: both stages come back
    assert reused.exit_code == 0 and "[2] gguf: reused" in reused.stderr
    # outputs hold copies: changing one in place changes neither the cache nor another output
    copy = tmp_path / "a2/model-Q4_0.gguf"
    last = copy.read_bytes()[-1]
    with open(copy, "r+b") as f:
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "a2")
    assert _run(tmp_path, checkpoint, "c")[1]["stages"][2]["reused"]
    assert _hashes(tmp_path / "c") == _hashes(tmp_path / "a")
    # a damaged cache entry is not reused: the stage runs again
    (cached_file,) = cached.glob("*/files/model-Q4_0.gguf")
    cached_file.write_bytes(cached_file.read_bytes()[:-1])
    rerun, m2 = _run(tmp_path, checkpoint, "d")
    assert rerun.exit_code == 0, rerun.stderr
    assert [s.get("reused", False) for s in m2["stages"]] == [False, True, False]
    assert _hashes(tmp_path / "d") == _hashes(tmp_path / "a")
