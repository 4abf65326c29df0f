"""SIGINT and SIGTERM in the middle of a stage: no output, no staging folder, a clean line, and a rerun
that completes — a training stage from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import leftovers, write_recipe

QAT = "  - qat: {bits: 4, group_size: 32, symmetric: true, steps: 20, checkpoint_every: 2, samples: 4, sequence_length: 64}\n"


def _start(recipe, out, log, cache=None):
    command = [sys.executable, "-c", "from minicpm_compress.cli import main; main()", "run", str(recipe), "--out", str(out)]
    env = os.environ.copy()
    if cache is not None:  # a cache of the test's own: another worker's training writes no resume file into it
        env["MINICPM_COMPRESS_CACHE"] = str(cache)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def _wait(predicate, process, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before the signal could be sent")
        time.sleep(0.05)
    process.kill()
    pytest.fail("timed out waiting for the run to reach the stage")


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_during_training_leaves_nothing_and_the_rerun_resumes(tmp_path, checkpoint, sig, code, name):
    recipe = write_recipe(tmp_path, checkpoint, QAT, name=f"qat-{name}")
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    cache = tmp_path / "cache"
    train = cache / "train"
    process = _start(recipe, out, log, cache)
    # a resume checkpoint exists (its final name, not the temporary file the signal would remove): training is under way
    _wait(lambda: train.is_dir() and list(train.glob("*.pt")), process)
    os.kill(process.pid, sig)
    assert process.wait(timeout=60) == code
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: interrupted ({name}); no output was written (staging folders removed)"], text
    assert "Traceback" not in text
    assert not out.exists() and leftovers(out) == []
    (checkpoint_file,) = set(train.iterdir())  # kept for the rerun; no temporary file left beside it

    rerun = _start(recipe, out, log, cache)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    qat = json.loads((out / "manifest.json").read_text())["stages"][-1]
    assert qat["name"] == "qat" and qat["details"]["resumed_at_step"] >= 2 and qat["details"]["steps"] == 20
    assert not checkpoint_file.exists()  # removed once the stage completed


def test_sigterm_during_an_export_leaves_nothing(tmp_path, checkpoint):
    recipe = write_recipe(tmp_path, checkpoint, "  - rtn: {bits: 4, group_size: 32}\n  - onnx: {bits: 4}\n", name="onnx")
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    process = _start(recipe, out, log)
    _wait(lambda: "onnx: estimated peak memory" in log.read_text(), process)  # the export has begun
    time.sleep(1.0)
    assert process.poll() is None, "the export finished within a second; the test needs a longer one"
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 143, log.read_text()
    assert not out.exists() and leftovers(out) == []


def test_sigkill_during_an_export_leaves_a_staging_folder_the_rerun_removes(tmp_path, checkpoint):
    """SIGKILL cannot be caught: the dead run's `.out.*.partial` stays until the next run into `out` (which holds
    the destination's lock, so no live run owns it) removes it."""
    recipe = write_recipe(tmp_path, checkpoint, "  - rtn: {bits: 4, group_size: 32}\n  - onnx: {bits: 4}\n", name="onnx")
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    process = _start(recipe, out, log)
    _wait(lambda: "onnx: estimated peak memory" in log.read_text(), process)
    time.sleep(1.0)
    assert process.poll() is None, "the export finished within a second; the test needs a longer one"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    stale = leftovers(out)  # what a hard kill leaves: the staging folder, and the lock file (no longer locked)
    assert len(stale) == 2 and ".out.lock" in stale and [s for s in stale if s.endswith(".partial")] and not out.exists()

    rerun = _start(recipe, out, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert (out / "manifest.json").is_file() and leftovers(out) == []
